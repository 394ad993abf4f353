// A well-written dense fp32 decode attention for the CPU, the baseline packed attention must beat.
// Same parallel split as the packed path (KV head x chunk of tokens, merged flash-decoding style),
// the same vectorised exp, and AVX2 + FMA dot products and updates chosen at run time as the
// library's kernels are, so the comparison measures the data format, not effort or build flags.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "core/softmax_merge.hpp"
#include "cpu_kernels/kernels.hpp"  // softmax_rows (the same exp as the packed path) and the ISA check

namespace packkv::bench {

namespace dense {

inline float dot_scalar(const float* a, const float* b, int n) {
  float s = 0.0f;
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}
inline void axpy_scalar(float w, const float* x, float* y, int n) {
  for (int i = 0; i < n; ++i) y[i] += w * x[i];
}
#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) inline float dot_avx2(const float* a, const float* b, int n) {
  __m256 acc = _mm256_setzero_ps();
  for (int i = 0; i < n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}
__attribute__((target("avx2,fma"))) inline void axpy_avx2(float w, const float* x, float* y, int n) {
  const __m256 wv = _mm256_set1_ps(w);
  for (int i = 0; i < n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
}
#endif

}  // namespace dense

/// K and V as [len][kv_heads][head_dim] fp32 (head_dim a multiple of 8); q and out as
/// [q_heads][head_dim].
inline void dense_decode_attention(const float* k, const float* v, std::size_t len, int kv_heads, int q_heads,
                                   int dim, const float* q, float* out, float scale, int threads) {
  float (*dot)(const float*, const float*, int) = dense::dot_scalar;
  void (*axpy)(float, const float*, float*, int) = dense::axpy_scalar;
#if defined(__x86_64__)
  if (detail::cpu::supported(detail::cpu::Isa::avx2)) {
    dot = dense::dot_avx2;
    axpy = dense::axpy_avx2;
  }
#endif
  const int group = q_heads / kv_heads;
  const std::size_t row = static_cast<std::size_t>(kv_heads) * dim;
  const int chunks = std::max<int>(1, std::min<int>(static_cast<int>(len / 1024), (2 * threads + kv_heads - 1) / kv_heads));
  const int tasks = kv_heads * chunks;
  std::vector<float> partial(static_cast<std::size_t>(tasks) * group * (dim + 2));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int task = 0; task < tasks; ++task) {
    const int h = task / chunks, c = task % chunks;
    const std::size_t begin = len * c / chunks, end = len * (c + 1) / chunks;
    thread_local std::vector<float> s;
    s.resize(static_cast<std::size_t>(group) * (end - begin));
    std::vector<float> qs(static_cast<std::size_t>(group) * dim);
    for (int i = 0; i < group * dim; ++i) qs[i] = q[static_cast<std::size_t>(h) * group * dim + i] * scale;
    for (std::size_t t = begin; t < end; ++t) {
      const float* kr = k + t * row + static_cast<std::size_t>(h) * dim;
      for (int g = 0; g < group; ++g) s[g * (end - begin) + (t - begin)] = dot(kr, &qs[g * dim], dim);
    }
    float* part = partial.data() + static_cast<std::size_t>(task) * group * (dim + 2);
    for (int g = 0; g < group; ++g) {
      float* sg = s.data() + g * (end - begin);
      float m, l;
      detail::cpu::kernels().softmax_rows(sg, static_cast<int>(end - begin), end - begin, 1, &m, &l);
      part[g * (dim + 2)] = m;
      part[g * (dim + 2) + 1] = l;
      std::fill(part + g * (dim + 2) + 2, part + (g + 1) * (dim + 2), 0.0f);
    }
    for (std::size_t t = begin; t < end; ++t) {
      const float* vr = v + t * row + static_cast<std::size_t>(h) * dim;
      for (int g = 0; g < group; ++g) axpy(s[g * (end - begin) + (t - begin)], vr, part + g * (dim + 2) + 2, dim);
    }
  }
  for (int h = 0; h < kv_heads; ++h) {
    for (int g = 0; g < group; ++g) {
      auto part_of = [&](int c) { return partial.data() + (static_cast<std::size_t>(h * chunks + c) * group + g) * (dim + 2); };
      detail::SoftmaxMerge merge;
      for (int c = 0; c < chunks; ++c) merge.observe(part_of(c)[0]);
      float* o = out + (static_cast<std::size_t>(h) * group + g) * dim;
      std::fill(o, o + dim, 0.0f);
      for (int c = 0; c < chunks; ++c) {
        merge.add(part_of(c)[0], part_of(c)[1]);
        axpy(merge.weight(part_of(c)[0]), part_of(c) + 2, o, dim);
      }
      for (int d = 0; d < dim; ++d) o[d] /= merge.sum;
    }
  }
}

}  // namespace packkv::bench

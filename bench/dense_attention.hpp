// A well-written dense fp32 decode attention for the CPU, the baseline packed attention must beat.
// Same parallel split as the packed path (KV head x chunk of tokens, merged flash-decoding style)
// and the same AVX2 + FMA vectorisation, so the comparison measures the data format, not effort.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "cpu_kernels/kernels.hpp"  // softmax_rows: both paths use the same vectorised exp

namespace packkv::bench {

/// K and V as [len][kv_heads][head_dim] fp32; q and out as [q_heads][head_dim].
inline void dense_decode_attention(const float* k, const float* v, std::size_t len, int kv_heads, int q_heads,
                                   int dim, const float* q, float* out, float scale, int threads) {
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
      for (int g = 0; g < group; ++g) {
        float dot = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
        __m256 acc = _mm256_setzero_ps();
        for (int d = 0; d < dim; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(kr + d), _mm256_loadu_ps(&qs[g * dim + d]), acc);
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, acc);
        for (float x : lanes) dot += x;
#else
        for (int d = 0; d < dim; ++d) dot += kr[d] * qs[g * dim + d];
#endif
        s[g * (end - begin) + (t - begin)] = dot;
      }
    }
    float* part = partial.data() + static_cast<std::size_t>(task) * group * (dim + 2);
    for (int g = 0; g < group; ++g) {
      float* sg = s.data() + g * (end - begin);
      float m, l;
      detail::cpu::kernels().softmax_rows(sg, static_cast<int>(end - begin), end - begin, 1, &m, &l);  // same exp as packed
      part[g * (dim + 2)] = m;
      part[g * (dim + 2) + 1] = l;
      std::fill(part + g * (dim + 2) + 2, part + (g + 1) * (dim + 2), 0.0f);
    }
    for (std::size_t t = begin; t < end; ++t) {
      const float* vr = v + t * row + static_cast<std::size_t>(h) * dim;
      for (int g = 0; g < group; ++g) {
        const float w = s[g * (end - begin) + (t - begin)];
        float* o = part + g * (dim + 2) + 2;
        for (int d = 0; d < dim; ++d) o[d] += w * vr[d];
      }
    }
  }
  for (int h = 0; h < kv_heads; ++h) {
    for (int g = 0; g < group; ++g) {
      float m = -INFINITY;
      for (int c = 0; c < chunks; ++c) m = std::max(m, partial[(static_cast<std::size_t>(h * chunks + c) * group + g) * (dim + 2)]);
      double l = 0.0;
      float* o = out + (static_cast<std::size_t>(h) * group + g) * dim;
      std::fill(o, o + dim, 0.0f);
      for (int c = 0; c < chunks; ++c) {
        const float* part = partial.data() + (static_cast<std::size_t>(h * chunks + c) * group + g) * (dim + 2);
        const float w = std::exp(part[0] - m);
        l += w * part[1];
        for (int d = 0; d < dim; ++d) o[d] += w * part[2 + d];
      }
      for (int d = 0; d < dim; ++d) o[d] = static_cast<float>(o[d] / l);
    }
  }
}

}  // namespace packkv::bench

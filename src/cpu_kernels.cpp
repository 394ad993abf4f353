// CPU kernels on packed sections. The AVX2 path unpacks 8 codes at a time with one byte shuffle
// and one variable shift (8 codes of w bits are exactly w bytes, and no code spans more than two
// bytes); the scalar path uses format::unpack16, the format's reference.
#include "cpu_kernels.hpp"

#include <array>
#include <cmath>
#include <limits>
#include <type_traits>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PACKKV_CPU_AVX2 1
#include <immintrin.h>
#endif

namespace packkv::detail::cpu {

using format::SectionLayout;

namespace {

inline float half_to_float(fp16_t h) {
#if PACKKV_CPU_AVX2
  return _cvtsh_ss(h.bits);
#else
  return to_float(h);
#endif
}

// Per-token (or per-channel) step and min of a section as floats.
void load_params(const std::uint8_t* section, std::uint32_t count, float* step, float* min) {
  const auto* params = reinterpret_cast<const format::Params*>(section);
  for (std::uint32_t i = 0; i < count; ++i) {
    step[i] = half_to_float(params[i].step);
    min[i] = half_to_float(params[i].min);
  }
}

// Walks a section's packs in storage order: fn(round, channel, codes-as-16-floats).
#if PACKKV_CPU_AVX2
struct UnpackTables {
  alignas(32) std::uint8_t shuffle[9][32];
  alignas(32) std::uint32_t shift[9][8];
};

constexpr UnpackTables make_unpack_tables() {
  UnpackTables t{};
  for (int w = 0; w <= 8; ++w) {
    for (int i = 0; i < 8; ++i) {
      const int bit = i * w, byte = bit >> 3;
      // Dword i lives in 128-bit lane i/4; each lane holds the 8 source bytes twice (0-7, 8-15).
      std::uint8_t* control = &t.shuffle[w][i * 4];
      control[0] = static_cast<std::uint8_t>(byte);
      control[1] = static_cast<std::uint8_t>(byte + 1);
      control[2] = 0x80;
      control[3] = 0x80;
      t.shift[w][i] = static_cast<std::uint32_t>(bit & 7);
    }
  }
  return t;
}
constexpr UnpackTables kUnpack = make_unpack_tables();

inline std::uint64_t load_u64(const std::uint8_t* p) {
  std::uint64_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// 8 values of `width` bits at p as integers (reads 8 bytes; the format guarantees the slack).
inline __m256i unpack8_epi32(const std::uint8_t* p, std::uint32_t width) {
  const __m256i bytes = _mm256_set1_epi64x(static_cast<long long>(load_u64(p)));
  __m256i x = _mm256_shuffle_epi8(bytes, _mm256_load_si256(reinterpret_cast<const __m256i*>(kUnpack.shuffle[width])));
  x = _mm256_srlv_epi32(x, _mm256_load_si256(reinterpret_cast<const __m256i*>(kUnpack.shift[width])));
  return _mm256_and_si256(x, _mm256_set1_epi32(static_cast<int>((1u << width) - 1u)));
}

// 8 codes of `width` bits at p, plus pack_min, as floats.
inline __m256 unpack8(const std::uint8_t* p, std::uint32_t width, __m256i pack_min) {
  return _mm256_cvtepi32_ps(_mm256_add_epi32(unpack8_epi32(p, width), pack_min));
}

// Widths and minimums of one round's packs. Both are bit streams whose groups of 8 channels
// take exactly 4 (widths) and `bits` (minimums) bytes, the layout unpack8 reads, so a round's
// descriptors decode 8 channels per step before the pack loop. Returns the first pack.
struct RoundDescriptors {
  alignas(32) std::int32_t width[256];
  alignas(32) std::int32_t min[256];
};
inline const std::uint8_t* load_round_descriptors(const SectionLayout& L, const std::uint8_t* section,
                                                  std::uint32_t round, RoundDescriptors& d) {
  const format::RoundView view = format::round_view(section, L, round);
  if (view.plain) {
    const __m256i width = _mm256_set1_epi32(static_cast<int>(L.bits)), zero = _mm256_setzero_si256();
    for (std::uint32_t c = 0; c < L.head_dim; c += 8) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(d.width + c), width);
      _mm256_store_si256(reinterpret_cast<__m256i*>(d.min + c), zero);
    }
  } else {
    for (std::uint32_t c = 0; c < L.head_dim; c += 8) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(d.width + c), unpack8_epi32(view.widths + c / 2, 4));
      _mm256_store_si256(reinterpret_cast<__m256i*>(d.min + c), unpack8_epi32(view.mins + c / 8 * L.bits, L.bits));
    }
  }
  return view.packs;
}

template <int G>
void scores_avx2(const SectionLayout& L, const std::uint8_t* section, const float* q, float raw[][16],
                 std::uint32_t round) {
  const std::uint32_t dim = L.head_dim;
  RoundDescriptors d;
  const std::uint8_t* p = load_round_descriptors(L, section, round, d);
  __m256 acc[G][2];
  for (int g = 0; g < G; ++g) acc[g][0] = acc[g][1] = _mm256_setzero_ps();
  for (std::uint32_t c = 0; c < dim; ++c) {
    const auto width = static_cast<std::uint32_t>(d.width[c]);
    const __m256i mn = _mm256_set1_epi32(d.min[c]);
    const __m256 lo = unpack8(p, width, mn);
    const __m256 hi = unpack8(p + width, width, mn);
    p += 2 * width;
    for (int g = 0; g < G; ++g) {
      const __m256 qv = _mm256_broadcast_ss(q + g * dim + c);
      acc[g][0] = _mm256_fmadd_ps(qv, lo, acc[g][0]);
      acc[g][1] = _mm256_fmadd_ps(qv, hi, acc[g][1]);
    }
  }
  for (int g = 0; g < G; ++g) {
    _mm256_storeu_ps(raw[g], acc[g][0]);
    _mm256_storeu_ps(raw[g] + 8, acc[g][1]);
  }
}

template <int G>
void accumulate_v_avx2(const SectionLayout& L, const std::uint8_t* section, const float* wstep, std::size_t ws,
                       float* acc) {
  const std::uint32_t dim = L.head_dim;
  RoundDescriptors d;
  for (std::uint32_t r = 0; r < L.rounds; ++r) {
    const std::uint8_t* p = load_round_descriptors(L, section, r, d);
    __m256 wlo[G], whi[G];
    for (int g = 0; g < G; ++g) {
      wlo[g] = _mm256_loadu_ps(wstep + g * ws + r * 16);
      whi[g] = _mm256_loadu_ps(wstep + g * ws + r * 16 + 8);
    }
    for (std::uint32_t c = 0; c < dim; ++c) {
      const auto width = static_cast<std::uint32_t>(d.width[c]);
      const __m256i mn = _mm256_set1_epi32(d.min[c]);
      const __m256 lo = unpack8(p, width, mn);
      const __m256 hi = unpack8(p + width, width, mn);
      p += 2 * width;
      for (int g = 0; g < G; ++g) {
        float* a = acc + (static_cast<std::size_t>(g) * dim + c) * 8;
        __m256 v = _mm256_load_ps(a);
        v = _mm256_fmadd_ps(wlo[g], lo, v);
        v = _mm256_fmadd_ps(whi[g], hi, v);
        _mm256_store_ps(a, v);
      }
    }
  }
}
#endif  // PACKKV_CPU_AVX2

// raw[g][i] = sum_c q[g][c] * code_ic for the 16 tokens of one round.
template <int G>
void round_raw_scores(const SectionLayout& L, const std::uint8_t* section, const float* q, float raw[][16],
                      std::uint32_t round) {
#if PACKKV_CPU_AVX2
  scores_avx2<G>(L, section, q, raw, round);
#else
  const std::uint32_t dim = L.head_dim;
  const format::RoundView view = format::round_view(section, L, round);
  const std::uint8_t* p = view.packs;
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < 16; ++i) raw[g][i] = 0.0f;
  std::uint8_t values[16];
  for (std::uint32_t c = 0; c < dim; ++c) {
    const auto [width, mn] = format::pack_descriptor(view, c, L.bits);
    format::unpack16(p, width, values);
    p += 2 * width;
    for (int g = 0; g < G; ++g) {
      const float qv = q[g * dim + c];
      for (int i = 0; i < 16; ++i) raw[g][i] += qv * static_cast<float>(values[i] + mn);
    }
  }
#endif
}

template <int G>
void scores_impl(const SectionLayout& L, bool per_channel, const std::uint8_t* section, const float* q, float* out,
                 std::size_t out_stride) {
  const std::uint32_t dim = L.head_dim;
  alignas(32) float step[256], min[256];
  load_params(section, L.param_count, step, min);
  alignas(32) float qs[G * 256];
  float bias[G];
  const float* qk = q;
  if (per_channel) {
    // Fold the per-channel step into q and the per-channel min into a constant.
    for (int g = 0; g < G; ++g) {
      float b = 0.0f;
      for (std::uint32_t c = 0; c < dim; ++c) {
        qs[g * dim + c] = q[g * dim + c] * step[c];
        b += q[g * dim + c] * min[c];
      }
      bias[g] = b;
    }
    qk = qs;
  } else {
    for (int g = 0; g < G; ++g) {
      float s = 0.0f;
      for (std::uint32_t c = 0; c < dim; ++c) s += q[g * dim + c];
      bias[g] = s;  // multiplied by each token's min below
    }
  }
  float raw[G][16];
  for (std::uint32_t r = 0; r < L.rounds; ++r) {
    round_raw_scores<G>(L, section, qk, raw, r);
    for (int g = 0; g < G; ++g) {
      float* o = out + g * out_stride + r * 16;
      if (per_channel) {
        for (int i = 0; i < 16; ++i) o[i] = raw[g][i] + bias[g];
      } else {
        for (int i = 0; i < 16; ++i) o[i] = step[r * 16 + i] * raw[g][i] + min[r * 16 + i] * bias[g];
      }
    }
  }
}

template <int G>
void accumulate_v_impl(const SectionLayout& L, const std::uint8_t* section, const float* w, std::size_t w_stride,
                       float* acc, float* min_term) {
  const std::uint32_t tokens = L.rounds * 16;
  alignas(32) float step[256], min[256];
  load_params(section, L.param_count, step, min);
  // Fold each token's step into its weight: sum_i w_i (min_i + step_i code_i).
  alignas(32) float wstep[G * 256];
  for (int g = 0; g < G; ++g) {
    float m = 0.0f;
    for (std::uint32_t i = 0; i < tokens; ++i) {
      wstep[g * 256 + i] = w[g * w_stride + i] * step[i];
      m += w[g * w_stride + i] * min[i];
    }
    min_term[g] += m;
  }
#if PACKKV_CPU_AVX2
  accumulate_v_avx2<G>(L, section, wstep, 256, acc);
#else
  const std::uint32_t dim = L.head_dim;
  std::uint8_t values[16];
  for (std::uint32_t r = 0; r < L.rounds; ++r) {
    const format::RoundView view = format::round_view(section, L, r);
    const std::uint8_t* p = view.packs;
    for (std::uint32_t c = 0; c < dim; ++c) {
      const auto [width, mn] = format::pack_descriptor(view, c, L.bits);
      format::unpack16(p, width, values);
      p += 2 * width;
      for (int g = 0; g < G; ++g) {
        float* a = acc + (static_cast<std::size_t>(g) * dim + c) * 8;
        for (int i = 0; i < 16; ++i) a[i % 8] += wstep[g * 256 + r * 16 + i] * static_cast<float>(values[i] + mn);
      }
    }
  }
#endif
}

template <class Fn>
void dispatch_group(int groups, Fn&& fn) {
  switch (groups) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 5: fn(std::integral_constant<int, 5>{}); break;
    case 6: fn(std::integral_constant<int, 6>{}); break;
    case 7: fn(std::integral_constant<int, 7>{}); break;
    default: fn(std::integral_constant<int, 8>{}); break;
  }
}

}  // namespace

void section_scores(const SectionLayout& layout, bool per_channel, const std::uint8_t* section, const float* q,
                    int groups, float* out, std::size_t out_stride) {
  dispatch_group(groups, [&](auto g) {
    scores_impl<decltype(g)::value>(layout, per_channel, section, q, out, out_stride);
  });
}

void section_accumulate_v(const SectionLayout& layout, const std::uint8_t* section, const float* w,
                          std::size_t w_stride, int groups, float* acc, float* min_term) {
  dispatch_group(groups, [&](auto g) {
    accumulate_v_impl<decltype(g)::value>(layout, section, w, w_stride, acc, min_term);
  });
}

void finish_v(const float* acc, const float* min_term, int groups, int head_dim, float* out) {
  for (int g = 0; g < groups; ++g) {
    for (int c = 0; c < head_dim; ++c) {
      const float* a = acc + (static_cast<std::size_t>(g) * head_dim + c) * 8;
      out[g * head_dim + c] = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])) + min_term[g];
    }
  }
}

namespace {
#if PACKKV_CPU_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const fp16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const bf16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}
#endif
}  // namespace

namespace {
#if PACKKV_CPU_AVX2
// e^x for x <= 0 (softmax arguments): 2^n * e^r with |r| <= ln2/2 and a degree-6 polynomial.
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));  // e^-87 is the smallest normal's neighbourhood
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif
}  // namespace

void softmax_rows(float* s, int n, std::size_t stride, int groups, float* max_out, float* sum_out) {
  for (int g = 0; g < groups; ++g) {
    float* row = s + static_cast<std::size_t>(g) * stride;
    float m = -std::numeric_limits<float>::infinity();
    for (int i = 0; i < n; ++i) m = std::max(m, row[i]);
    float sum = 0.0f;
    int i = 0;
#if PACKKV_CPU_AVX2
    const __m256 mv = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
      const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + i), mv));
      _mm256_storeu_ps(row + i, e);
      acc = _mm256_add_ps(acc, e);
    }
    sum = hsum(acc);
#endif
    for (; i < n; ++i) {
      row[i] = std::exp(row[i] - m);
      sum += row[i];
    }
    max_out[g] = m;
    sum_out[g] = sum;
  }
}

template <class T>
void dense_scores(const T* rows, std::size_t row_stride, int tokens, int head_dim, const float* q, int groups,
                  float* out, std::size_t out_stride) {
  for (int t = 0; t < tokens; ++t) {
    const T* row = rows + static_cast<std::size_t>(t) * row_stride;
    for (int g = 0; g < groups; ++g) {
      const float* qg = q + static_cast<std::size_t>(g) * head_dim;
#if PACKKV_CPU_AVX2
      __m256 acc = _mm256_setzero_ps();
      for (int c = 0; c < head_dim; c += 8) acc = _mm256_fmadd_ps(load8(row + c), _mm256_loadu_ps(qg + c), acc);
      out[g * out_stride + t] = hsum(acc);
#else
      float s = 0.0f;
      for (int c = 0; c < head_dim; ++c) s += to_float(row[c]) * qg[c];
      out[g * out_stride + t] = s;
#endif
    }
  }
}

template <class T>
void dense_accumulate_v(const T* rows, std::size_t row_stride, int tokens, int head_dim, const float* w,
                        std::size_t w_stride, int groups, float* acc) {
  // acc uses the same [G][head_dim][8] layout as the packed path; dense rows add to lane 0 only.
  for (int t = 0; t < tokens; ++t) {
    const T* row = rows + static_cast<std::size_t>(t) * row_stride;
    for (int g = 0; g < groups; ++g) {
      const float wt = w[g * w_stride + t];
      float* a = acc + static_cast<std::size_t>(g) * head_dim * 8;
      for (int c = 0; c < head_dim; ++c) a[c * 8] += wt * to_float(row[c]);
    }
  }
}

template void dense_scores<float>(const float*, std::size_t, int, int, const float*, int, float*, std::size_t);
template void dense_scores<fp16_t>(const fp16_t*, std::size_t, int, int, const float*, int, float*, std::size_t);
template void dense_scores<bf16_t>(const bf16_t*, std::size_t, int, int, const float*, int, float*, std::size_t);
template void dense_accumulate_v<float>(const float*, std::size_t, int, int, const float*, std::size_t, int, float*);
template void dense_accumulate_v<fp16_t>(const fp16_t*, std::size_t, int, int, const float*, std::size_t, int,
                                         float*);
template void dense_accumulate_v<bf16_t>(const bf16_t*, std::size_t, int, int, const float*, std::size_t, int,
                                         float*);

}  // namespace packkv::detail::cpu

// The AVX2 kernels (with FMA and F16C). They unpack 8 codes at a time with one byte shuffle and
// one variable shift: 8 codes of w bits are exactly w bytes (format/bits.hpp), and no code spans
// more than two bytes. Round descriptors are bit streams of the same layout, so a round's widths
// and minimums decode 8 channels per step too.
//
// This file is compiled for the baseline instruction set like every other; only the functions
// marked PACKKV_AVX2 use AVX2, so no AVX2 instruction reaches an inline function that other
// translation units share. The dispatcher (kernels_dispatch.cpp) calls them only when the
// processor has AVX2, FMA and F16C.
#if defined(__x86_64__)

#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>

#define PACKKV_AVX2 __attribute__((target("avx2,fma,f16c")))
#define PACKKV_KERNEL_TARGET PACKKV_AVX2

#include "cpu_kernels/kernels.hpp"
#include "cpu_kernels/section_ops.hpp"

namespace packkv::detail::cpu {

namespace {

using format::SectionLayout;

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
PACKKV_AVX2 inline __m256i unpack8_epi32(const std::uint8_t* p, std::uint32_t width) {
  const __m256i bytes = _mm256_set1_epi64x(static_cast<long long>(load_u64(p)));
  __m256i x = _mm256_shuffle_epi8(bytes, _mm256_load_si256(reinterpret_cast<const __m256i*>(kUnpack.shuffle[width])));
  x = _mm256_srlv_epi32(x, _mm256_load_si256(reinterpret_cast<const __m256i*>(kUnpack.shift[width])));
  return _mm256_and_si256(x, _mm256_set1_epi32(static_cast<int>((1u << width) - 1u)));
}

// 8 codes of `width` bits at p, plus pack_min, as floats.
PACKKV_AVX2 inline __m256 unpack8_ps(const std::uint8_t* p, std::uint32_t width, __m256i pack_min) {
  return _mm256_cvtepi32_ps(_mm256_add_epi32(unpack8_epi32(p, width), pack_min));
}

// Widths and minimums of one round's packs, 8 channels per step. Returns the first pack.
struct RoundDescriptors {
  alignas(32) std::int32_t width[256];
  alignas(32) std::int32_t min[256];
};
PACKKV_AVX2 inline const std::uint8_t* load_round_descriptors(const SectionLayout& L, const std::uint8_t* section,
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

struct Avx2Ops {
  PACKKV_AVX2 static void convert_halves(const fp16_t* x, float* out, std::size_t n) {
    std::size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))));
    }
    for (; i < n; ++i) out[i] = to_float(x[i]);
  }

  template <int G>
  PACKKV_AVX2 static void round_scores(const SectionLayout& L, const std::uint8_t* section, const float* q,
                                       float raw[][16], std::uint32_t round) {
    const std::uint32_t dim = L.head_dim;
    RoundDescriptors d;
    const std::uint8_t* p = load_round_descriptors(L, section, round, d);
    __m256 acc[G][2];
    for (int g = 0; g < G; ++g) acc[g][0] = acc[g][1] = _mm256_setzero_ps();
    for (std::uint32_t c = 0; c < dim; ++c) {
      const auto width = static_cast<std::uint32_t>(d.width[c]);
      const __m256i mn = _mm256_set1_epi32(d.min[c]);
      const __m256 lo = unpack8_ps(p, width, mn);
      const __m256 hi = unpack8_ps(p + width, width, mn);
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
  PACKKV_AVX2 static void accumulate_rounds(const SectionLayout& L, const std::uint8_t* section, const float* wstep,
                                            std::size_t ws, float* acc) {
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
        const __m256 lo = unpack8_ps(p, width, mn);
        const __m256 hi = unpack8_ps(p + width, width, mn);
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
};

// e^x for x <= 0 (softmax arguments): 2^n * e^r with |r| <= ln2/2 and a degree-6 polynomial.
PACKKV_AVX2 inline __m256 exp_nonpositive(__m256 x) {
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

PACKKV_AVX2 inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

PACKKV_AVX2 void softmax_rows(float* s, int n, std::size_t stride, int groups, float* max_out, float* sum_out) {
  for (int g = 0; g < groups; ++g) {
    float* row = s + static_cast<std::size_t>(g) * stride;
    float m = -std::numeric_limits<float>::infinity();
    for (int i = 0; i < n; ++i) m = row[i] > m ? row[i] : m;
    const __m256 mv = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + i), mv));
      _mm256_storeu_ps(row + i, e);
      acc = _mm256_add_ps(acc, e);
    }
    float sum = hsum(acc);
    for (; i < n; ++i) {
      row[i] = std::exp(row[i] - m);
      sum += row[i];
    }
    max_out[g] = m;
    sum_out[g] = sum;
  }
}

// A section's codes, [tokens][dim] in stored order. Each pack is 16 tokens of one channel, so
// its codes go to one column: unpacked 8 at a time, then scattered byte by byte.
PACKKV_AVX2 void unpack_section(const SectionLayout& L, const std::uint8_t* section, std::uint8_t* codes) {
  const std::uint32_t dim = L.head_dim;
  RoundDescriptors d;
  alignas(32) std::uint32_t values[16];
  for (std::uint32_t r = 0; r < L.rounds; ++r) {
    const std::uint8_t* p = load_round_descriptors(L, section, r, d);
    std::uint8_t* round_codes = codes + static_cast<std::size_t>(r) * 16 * dim;
    for (std::uint32_t c = 0; c < dim; ++c) {
      const auto width = static_cast<std::uint32_t>(d.width[c]);
      const __m256i mn = _mm256_set1_epi32(d.min[c]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(values), _mm256_add_epi32(unpack8_epi32(p, width), mn));
      _mm256_store_si256(reinterpret_cast<__m256i*>(values + 8), _mm256_add_epi32(unpack8_epi32(p + width, width), mn));
      p += 2 * width;
      for (int i = 0; i < 16; ++i) round_codes[static_cast<std::size_t>(i) * dim + c] = static_cast<std::uint8_t>(values[i]);
    }
  }
}

PACKKV_AVX2 void dequantize_row(const std::uint8_t* row, std::uint32_t dim, const float* steps, const float* mins,
                                float step, float min, float* dst) {
  for (std::uint32_t c = 0; c < dim; c += 8) {
    const __m256 code = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + c))));
    const __m256 s = steps ? _mm256_loadu_ps(steps + c) : _mm256_set1_ps(step);
    const __m256 m = mins ? _mm256_loadu_ps(mins + c) : _mm256_set1_ps(min);
    _mm256_storeu_ps(dst + c, _mm256_fmadd_ps(code, s, m));  // = format::dequantize (fmaf)
  }
}

void decode_section(const SectionLayout& layout, bool per_channel, const std::uint8_t* section, float* out) {
  alignas(32) std::uint8_t codes[256 * 256];
  unpack_section(layout, section, codes);
  decode_from_codes<Avx2Ops>(layout, per_channel, section, codes, out, &dequantize_row);
}

PACKKV_AVX2 void unpack8(const std::uint8_t* p, std::uint32_t width, std::uint32_t* values) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(values), unpack8_epi32(p, width));
}

// ---- the encoder's row operations (n is a multiple of 8: head_dim is) ----

PACKKV_AVX2 inline __m256 canonical8(__m256 x) { return _mm256_add_ps(x, _mm256_setzero_ps()); }  // -0 -> +0

/// All-ones lanes where |x| <= 65504 (NaN fails).
PACKKV_AVX2 inline __m256 storable8(__m256 x) {
  const __m256 magnitude = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  return _mm256_cmp_ps(magnitude, _mm256_set1_ps(kFp16Max), _CMP_LE_OQ);
}

PACKKV_AVX2 bool row_range(const float* x, std::size_t n, format::Range& range) {
  __m256 lo = _mm256_set1_ps(range.lo), hi = _mm256_set1_ps(range.hi), ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  for (std::size_t i = 0; i < n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    ok = _mm256_and_ps(ok, storable8(v));
    const __m256 c = canonical8(v);
    lo = _mm256_min_ps(c, lo);  // (a < b ? a : b) with c first: what Range::extend computes
    hi = _mm256_max_ps(c, hi);
  }
  alignas(32) float l[8], h[8];
  _mm256_store_ps(l, lo);
  _mm256_store_ps(h, hi);
  for (int i = 0; i < 8; ++i) {
    range.lo = l[i] < range.lo ? l[i] : range.lo;
    range.hi = h[i] > range.hi ? h[i] : range.hi;
  }
  return _mm256_movemask_ps(ok) == 0xFF;
}

PACKKV_AVX2 bool extend_ranges(const float* x, std::size_t n, float* lo, float* hi) {
  __m256 ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  for (std::size_t i = 0; i < n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    ok = _mm256_and_ps(ok, storable8(v));
    const __m256 c = canonical8(v);
    _mm256_storeu_ps(lo + i, _mm256_min_ps(c, _mm256_loadu_ps(lo + i)));
    _mm256_storeu_ps(hi + i, _mm256_max_ps(c, _mm256_loadu_ps(hi + i)));
  }
  return _mm256_movemask_ps(ok) == 0xFF;
}

// round((x - min) * inv_step) to nearest even, clamped to [0, max_code], as bytes: the same
// operations in the same order as format::quantize.
PACKKV_AVX2 inline void store_codes8(__m256 x, __m256 min, __m256 inv, __m256i max_code, std::uint8_t* out) {
  const __m256 scaled = _mm256_mul_ps(_mm256_sub_ps(x, min), inv);
  __m256i code = _mm256_cvtps_epi32(_mm256_round_ps(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  code = _mm256_min_epi32(_mm256_max_epi32(code, _mm256_setzero_si256()), max_code);
  const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packus_epi16(words, words));
}

PACKKV_AVX2 void quantize_row(const float* x, std::size_t n, const format::Quantizer& q, int max_code,
                              std::uint8_t* codes) {
  const __m256 min = _mm256_set1_ps(q.min), inv = _mm256_set1_ps(q.inv_step);
  const __m256i top = _mm256_set1_epi32(max_code);
  for (std::size_t i = 0; i < n; i += 8) store_codes8(_mm256_loadu_ps(x + i), min, inv, top, codes + i);
}

PACKKV_AVX2 void quantize_row_per_channel(const float* x, std::size_t n, const float* mins, const float* inv_steps,
                                          int max_code, std::uint8_t* codes) {
  const __m256i top = _mm256_set1_epi32(max_code);
  for (std::size_t i = 0; i < n; i += 8) {
    store_codes8(_mm256_loadu_ps(x + i), _mm256_loadu_ps(mins + i), _mm256_loadu_ps(inv_steps + i), top, codes + i);
  }
}

PACKKV_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
PACKKV_AVX2 inline __m256 load8(const fp16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
PACKKV_AVX2 inline __m256 load8(const bf16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

template <class T>
PACKKV_AVX2 void dense_scores(const T* rows, std::size_t row_stride, int tokens, int head_dim, const float* q,
                              int groups, float* out, std::size_t out_stride) {
  for (int t = 0; t < tokens; ++t) {
    const T* row = rows + static_cast<std::size_t>(t) * row_stride;
    for (int g = 0; g < groups; ++g) {
      const float* qg = q + static_cast<std::size_t>(g) * head_dim;
      __m256 acc = _mm256_setzero_ps();
      for (int c = 0; c < head_dim; c += 8) acc = _mm256_fmadd_ps(load8(row + c), _mm256_loadu_ps(qg + c), acc);
      out[g * out_stride + t] = hsum(acc);
    }
  }
}

/// r[j] := lane j of every r[i], as lane i (an 8 x 8 transpose).
PACKKV_AVX2 inline void transpose8(__m256 (&r)[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

template <class T>
PACKKV_AVX2 void dense_accumulate_v(const T* rows, std::size_t row_stride, int tokens, int head_dim, const float* w,
                                    std::size_t w_stride, int groups, float* acc) {
  // acc uses the packed path's [G][head_dim][8] layout: 8 partial sums per channel, which
  // finish_v adds up. Eight tokens at a time go to the 8 lanes (token t + i to lane i), so a
  // channel takes one vector multiply-add per group: the tokens' rows, transposed 8 channels at
  // a time, times their 8 weights. The last tokens (fewer than 8) go to lane 0.
  int t = 0;
  for (; t + 8 <= tokens; t += 8) {
    const T* block = rows + static_cast<std::size_t>(t) * row_stride;
    for (int c = 0; c < head_dim; c += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = load8(block + static_cast<std::size_t>(i) * row_stride + c);
      transpose8(r);  // r[j]: channel c + j of the 8 tokens
      for (int g = 0; g < groups; ++g) {
        const __m256 wt = _mm256_loadu_ps(w + g * w_stride + t);
        float* a = acc + (static_cast<std::size_t>(g) * head_dim + c) * 8;
        for (int j = 0; j < 8; ++j) _mm256_storeu_ps(a + 8 * j, _mm256_fmadd_ps(wt, r[j], _mm256_loadu_ps(a + 8 * j)));
      }
    }
  }
  alignas(32) float values[256];
  for (; t < tokens; ++t) {
    const T* row = rows + static_cast<std::size_t>(t) * row_stride;
    for (int c = 0; c < head_dim; c += 8) _mm256_store_ps(values + c, load8(row + c));
    for (int g = 0; g < groups; ++g) {
      const float wt = w[g * w_stride + t];
      float* a = acc + static_cast<std::size_t>(g) * head_dim * 8;
      for (int c = 0; c < head_dim; ++c) a[c * 8] += wt * values[c];
    }
  }
}

template <class T>
PACKKV_AVX2 void convert(const T* x, float* out, std::size_t n) {
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, load8(x + i));
  for (; i < n; ++i) out[i] = packkv::to_float(x[i]);
}

/// Eight floats to the storage type with the bits of packkv::from_float: fp16 by F16C (round to
/// nearest even; a NaN becomes the quiet NaN of its sign, as the scalar rule makes it), bf16 by
/// the scalar rule's integer rounding.
PACKKV_AVX2 inline void store8(float* out, __m256 x) { _mm256_storeu_ps(out, x); }
PACKKV_AVX2 inline void store8(fp16_t* out, __m256 x) {
  __m128i h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  if (_mm256_movemask_ps(nan) != 0) {
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i quiet = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x8000)),
                                          _mm256_set1_epi32(0x7E00));
    const __m256i wide = _mm256_blendv_epi8(_mm256_cvtepu16_epi32(h), quiet, _mm256_castps_si256(nan));
    h = _mm_packus_epi32(_mm256_castsi256_si128(wide), _mm256_extracti128_si256(wide, 1));
  }
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), h);
}
PACKKV_AVX2 inline void store8(bf16_t* out, __m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd)), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
  r = _mm256_and_si256(r, _mm256_set1_epi32(0xFFFF));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                   _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}

template <class T>
PACKKV_AVX2 void convert_back(const float* x, T* out, std::size_t n) {
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) store8(out + i, _mm256_loadu_ps(x + i));
  for (; i < n; ++i) out[i] = packkv::from_float<T>(x[i]);
}

template <class T>
constexpr DenseKernels<T> dense_kernels() {
  return DenseKernels<T>{&dense_scores<T>, &dense_accumulate_v<T>, &convert<T>, &convert_back<T>};
}

}  // namespace

const Kernels kAvx2Kernels = {
    Isa::avx2,
    &section_scores<Avx2Ops>,
    &section_accumulate_v<Avx2Ops>,
    &softmax_rows,
    &unpack_section,
    &decode_section,
    &unpack8,
    &row_range,
    &extend_ranges,
    &quantize_row,
    &quantize_row_per_channel,
    dense_kernels<float>(),
    dense_kernels<fp16_t>(),
    dense_kernels<bf16_t>(),
};

}  // namespace packkv::detail::cpu

#endif  // __x86_64__

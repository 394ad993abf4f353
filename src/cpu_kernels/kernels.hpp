// CPU kernels that compute on packed sections directly (no dequantized copy of the cache), chosen
// at run time: every binary carries a scalar set (the format's reference arithmetic) and, on
// x86-64, an AVX2 set, and uses the best one the processor supports. Tests run both in one binary
// and require the integer paths (unpacking, descriptors) and the dequantized values to agree bit
// for bit.
//
// A "group" is the G query heads that share one KV head (GQA); every packed section is decoded
// once per group. Kernels take G <= kMaxGroup; callers split larger groups.
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>
#include <type_traits>
#include <vector>

#include "packkv/format.hpp"

namespace packkv::detail::cpu {

inline constexpr int kMaxGroup = 8;

/// 32-byte aligned storage for the [G][head_dim][8] accumulators the vector paths load aligned.
template <class U>
struct Aligned32Allocator {
  using value_type = U;
  Aligned32Allocator() = default;
  template <class V>
  Aligned32Allocator(const Aligned32Allocator<V>&) {}
  U* allocate(std::size_t n) { return static_cast<U*>(::operator new(n * sizeof(U), std::align_val_t{32})); }
  void deallocate(U* p, std::size_t) { ::operator delete(p, std::align_val_t{32}); }
  template <class V>
  bool operator==(const Aligned32Allocator<V>&) const {
    return true;
  }
};
using AlignedFloats = std::vector<float, Aligned32Allocator<float>>;

enum class Isa : std::uint8_t { scalar, avx2 };
const char* to_string(Isa isa);

/// Dense rows in the storage type T: row t of a head at rows[t * row_stride].
template <class T>
struct DenseKernels {
  /// out[g * out_stride + t] = q_g . row_t
  void (*scores)(const T* rows, std::size_t row_stride, int tokens, int head_dim, const float* q, int groups,
                 float* out, std::size_t out_stride);
  /// sum over lanes of acc[(g * head_dim + c) * 8 + lane] += w[g * w_stride + t] * row_t[c] (the
  /// packed layout's 8 partial sums per channel; a kernel set picks the lanes)
  void (*accumulate_v)(const T* rows, std::size_t row_stride, int tokens, int head_dim, const float* w,
                       std::size_t w_stride, int groups, float* acc);
  /// out[i] = float(x[i]), exactly
  void (*to_float)(const T* x, float* out, std::size_t n);
  /// out[i] = packkv::from_float<T>(x[i]), the same bits (round to nearest even; NaN as it makes it)
  void (*from_float)(const float* x, T* out, std::size_t n);
};

/// One instruction set's kernels.
struct Kernels {
  Isa isa;
  /// Raw scores of one K section, stored token order:
  ///   per-token K:   out[g*out_stride + i] = step_i * (q_g . codes_i) + min_i * sum(q_g)
  ///   per-channel K: out[g*out_stride + i] = sum_c q_gc * (min_c + step_c * code_ic)
  /// q is [G][head_dim] in fp32 (already multiplied by the softmax scale if wanted).
  void (*section_scores)(const format::SectionLayout& layout, bool per_channel, const std::uint8_t* section,
                         const float* q, int groups, float* out, std::size_t out_stride);
  /// Accumulates weights x V for one V section (weights in stored token order, [G][w_stride]):
  ///   acc[(g*head_dim + c)*8 + lane] += partial sums of sum_i w_gi * step_i * code_ic
  ///   min_term[g] += sum_i w_gi * min_i
  /// so that out[g][c] = sum over lanes of acc + min_term[g] (finish_v).
  void (*section_accumulate_v)(const format::SectionLayout& layout, const std::uint8_t* section, const float* w,
                               std::size_t w_stride, int groups, float* acc, float* min_term);
  /// For each of `groups` rows of n scores (row stride `stride`): max_out[g] = max, the row becomes
  /// exp(s - max), sum_out[g] = sum of the row. Relative error of exp below 2e-7.
  void (*softmax_rows)(float* s, int n, std::size_t stride, int groups, float* max_out, float* sum_out);
  /// A section's codes, [block_tokens][head_dim] in stored token order (pack minimums added).
  void (*unpack_section)(const format::SectionLayout& layout, const std::uint8_t* section, std::uint8_t* codes);
  /// A section dequantized, [block_tokens][head_dim] in stored order: format::dequantize bit for bit.
  void (*decode_section)(const format::SectionLayout& layout, bool per_channel, const std::uint8_t* section,
                         float* out);
  /// 8 values of `width` bits at p (the format's pack8 groups); reads 8 bytes (the slack allows it).
  void (*unpack8)(const std::uint8_t* p, std::uint32_t width, std::uint32_t* values);
  /// The encoder's row operations, bit for bit the spec's (format/quant.hpp):
  /// range of x[0..n) over canonical values; false when a value is not storable.
  bool (*row_range)(const float* x, std::size_t n, format::Range& range);
  /// lo[i] = min(lo[i], canonical(x[i])), hi[i] likewise, over one row (per-channel ranges); false
  /// when a value is not storable.
  bool (*extend_ranges)(const float* x, std::size_t n, float* lo, float* hi);
  /// codes[i] = format::quantize(x[i], q, max_code) for one quantizer (per-token) ...
  void (*quantize_row)(const float* x, std::size_t n, const format::Quantizer& q, int max_code, std::uint8_t* codes);
  /// ... or one quantizer per element (per-channel: mins[i], inv_steps[i]).
  void (*quantize_row_per_channel)(const float* x, std::size_t n, const float* mins, const float* inv_steps,
                                   int max_code, std::uint8_t* codes);
  DenseKernels<float> dense_f32;
  DenseKernels<fp16_t> dense_f16;
  DenseKernels<bf16_t> dense_bf16;

  template <class T>
  const DenseKernels<T>& dense() const {
    if constexpr (std::is_same_v<T, float>) return dense_f32;
    else if constexpr (std::is_same_v<T, fp16_t>) return dense_f16;
    else return dense_bf16;
  }
};

/// Whether this processor can run `isa`'s kernels.
bool supported(Isa isa);
/// The kernels of `isa` (for tests and benchmarks); throws packkv::error when unsupported.
const Kernels& kernels_for(Isa isa);
/// The best supported kernels, chosen once.
const Kernels& kernels();

/// out[g*head_dim + c] = sum_lane acc[(g*head_dim + c)*8 + lane] + min_term[g] (a fixed order).
void finish_v(const float* acc, const float* min_term, int groups, int head_dim, float* out);

/// out[i] = float(x[i]) for a run of values, with the best kernels.
template <class T>
void convert_to_float(const T* x, float* out, std::size_t n) {
  if constexpr (std::is_same_v<T, float>) {
    for (std::size_t i = 0; i < n; ++i) out[i] = x[i];
  } else {
    kernels().dense<T>().to_float(x, out, n);
  }
}

// Each instruction set's table (kernels_scalar.cpp, kernels_avx2.cpp).
extern const Kernels kScalarKernels;
#if defined(__x86_64__)
extern const Kernels kAvx2Kernels;
#endif

}  // namespace packkv::detail::cpu

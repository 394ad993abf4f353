// CPU kernels that compute on packed sections directly (no dequantized copy of the cache).
//
// A "group" is the G query heads that share one KV head (GQA); every packed section is decoded
// once per group. Kernels take G <= kMaxGroup; callers split larger groups.
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

#include "packkv/format.hpp"

namespace packkv::detail::cpu {

inline constexpr int kMaxGroup = 8;

/// 32-byte aligned storage for the [G][head_dim][8] accumulators the AVX2 path loads aligned.
template <class U>
struct Aligned32Allocator {
  using value_type = U;
  Aligned32Allocator() = default;
  template <class V>
  Aligned32Allocator(const Aligned32Allocator<V>&) {}
  U* allocate(std::size_t n) { return static_cast<U*>(::operator new(n * sizeof(U), std::align_val_t{32})); }
  void deallocate(U* p, std::size_t) { ::operator delete(p, std::align_val_t{32}); }
  template <class V>
  bool operator==(const Aligned32Allocator<V>&) const { return true; }
};
using AlignedFloats = std::vector<float, Aligned32Allocator<float>>;

/// Raw scores of one K section, packed token order:
///   per-token K:   out[g*out_stride + i] = step_i * (q_g . codes_i) + min_i * sum(q_g)
///   per-channel K: out[g*out_stride + i] = sum_c q_gc * (min_c + step_c * code_ic)
/// q is [G][head_dim] in fp32 (already multiplied by the softmax scale if wanted).
void section_scores(const format::SectionLayout& layout, bool per_channel, const std::uint8_t* section,
                    const float* q, int groups, float* out, std::size_t out_stride);

/// Accumulates weights x V for one V section (weights in packed token order, [G][w_stride]):
///   acc[(g*head_dim + c)*8 + lane] += partial sums of sum_i w_gi * step_i * code_ic
///   min_term[g] += sum_i w_gi * min_i
/// so that out[g][c] = sum over lanes of acc + min_term[g] (see finish_v).
void section_accumulate_v(const format::SectionLayout& layout, const std::uint8_t* section, const float* w,
                          std::size_t w_stride, int groups, float* acc, float* min_term);

/// out[g*head_dim + c] = sum_lane acc[(g*head_dim + c)*8 + lane] + min_term[g]
void finish_v(const float* acc, const float* min_term, int groups, int head_dim, float* out);

/// For each of `groups` rows of n scores (row stride `stride`): max_out[g] = max, the row becomes
/// exp(s - max), sum_out[g] = sum of the row. Vectorised exp with relative error below 2e-7.
void softmax_rows(float* s, int n, std::size_t stride, int groups, float* max_out, float* sum_out);

/// Dense rows in the storage type T: row t of head h at rows[t*row_stride + h*head_dim].
template <class T>
void dense_scores(const T* rows, std::size_t row_stride, int tokens, int head_dim, const float* q, int groups,
                  float* out, std::size_t out_stride);
template <class T>
void dense_accumulate_v(const T* rows, std::size_t row_stride, int tokens, int head_dim, const float* w,
                        std::size_t w_stride, int groups, float* acc);

}  // namespace packkv::detail::cpu

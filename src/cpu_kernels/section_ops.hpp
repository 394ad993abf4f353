// The arithmetic around the packed rounds, shared by every instruction set: per-token (or
// per-channel) parameters are applied once per token, not per element:
//   q . k_i = step_i * (q . codes_i) + min_i * sum(q)          (per-token K)
//   q . k_i = (q * step) . codes_i + q . min                     (per-channel K)
//   sum_i w_i v_i = sum_i (w_i step_i) codes_i + sum_i w_i min_i
// An instruction set supplies the inner loops over one round (`Ops`, see kernels_scalar.cpp):
//   Ops::round_scores<G>(layout, section, q, raw, r)   raw[g][i] = q_g . codes_i for round r
//   Ops::accumulate_rounds<G>(layout, section, wstep, ws, acc)
//   Ops::convert_halves(halves, floats, n)
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "cpu_kernels/kernels.hpp"
#include "packkv/format.hpp"

// Each kernel translation unit compiles its own copy (an anonymous namespace), for its instruction
// set: kernels_avx2.cpp defines PACKKV_KERNEL_TARGET before including this header.
#ifndef PACKKV_KERNEL_TARGET
#define PACKKV_KERNEL_TARGET
#endif

namespace packkv::detail::cpu {
namespace {

/// A section's (step, min) pairs as floats; Ops::convert_halves turns n fp16 values into floats.
/// Compact parameters (format version 3) are decoded group by group (exact integer arithmetic).
template <class Ops>
PACKKV_KERNEL_TARGET void load_params(const format::SectionLayout& L, const std::uint8_t* section, float* step,
                                      float* min) {
  const std::uint32_t count = L.param_count;
  if (L.compact != 0u) {
    // format::group_params in integer operations and multiplies the compiler vectorises.
    const auto biased = static_cast<std::uint32_t>(format::section_step_exponent(section) + 127);
    const int top = (1 << L.bits) - 1;
    const std::uint8_t* p = section + L.params_offset;
    for (std::uint32_t i = 0; i < count; ++i) {
      step[i] = format::compact_step_from_bits(p[2 * i], biased);
      min[i] = format::compact_min(static_cast<std::int8_t>(p[2 * i + 1]), step[i], top);
    }
    return;
  }
  alignas(32) float pairs[2 * 256];
  Ops::convert_halves(reinterpret_cast<const fp16_t*>(format::section_params(section)), pairs, 2 * count);
  for (std::uint32_t i = 0; i < count; ++i) {
    step[i] = pairs[2 * i];
    min[i] = pairs[2 * i + 1];
  }
}

template <class Ops, int G>
PACKKV_KERNEL_TARGET void section_scores_group(const format::SectionLayout& L, bool per_channel, const std::uint8_t* section, const float* q,
                          float* out, std::size_t out_stride) {
  const std::uint32_t dim = L.head_dim;
  alignas(32) float step[256], min[256];
  load_params<Ops>(L, section, step, min);
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
    Ops::template round_scores<G>(L, section, qk, raw, r);
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

template <class Ops, int G>
PACKKV_KERNEL_TARGET void section_accumulate_v_group(const format::SectionLayout& L, const std::uint8_t* section, const float* w,
                                std::size_t w_stride, float* acc, float* min_term) {
  const std::uint32_t tokens = L.rounds * 16;
  alignas(32) float step[256], min[256];
  load_params<Ops>(L, section, step, min);
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
  Ops::template accumulate_rounds<G>(L, section, wstep, 256, acc);
}

/// Calls fn(std::integral_constant<int, G>) for G = groups (1..kMaxGroup).
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

template <class Ops>
void section_scores(const format::SectionLayout& layout, bool per_channel, const std::uint8_t* section, const float* q,
                    int groups, float* out, std::size_t out_stride) {
  dispatch_group(groups, [&](auto g) {
    section_scores_group<Ops, decltype(g)::value>(layout, per_channel, section, q, out, out_stride);
  });
}

template <class Ops>
void section_accumulate_v(const format::SectionLayout& layout, const std::uint8_t* section, const float* w,
                          std::size_t w_stride, int groups, float* acc, float* min_term) {
  dispatch_group(groups, [&](auto g) {
    section_accumulate_v_group<Ops, decltype(g)::value>(layout, section, w, w_stride, acc, min_term);
  });
}

/// Dequantizes a section from its unpacked codes: out[i][c] = dequantize(code, step, min).
template <class Ops, class DequantizeRow>
PACKKV_KERNEL_TARGET void decode_from_codes(const format::SectionLayout& L, bool per_channel, const std::uint8_t* section,
                       const std::uint8_t* codes, float* out, DequantizeRow&& row) {
  alignas(32) float step[256], min[256];
  load_params<Ops>(L, section, step, min);
  const std::uint32_t dim = L.head_dim, tokens = L.rounds * 16;
  for (std::uint32_t i = 0; i < tokens; ++i) {
    row(codes + static_cast<std::size_t>(i) * dim, dim, per_channel ? step : nullptr, per_channel ? min : nullptr,
        per_channel ? 0.0f : step[i], per_channel ? 0.0f : min[i], out + static_cast<std::size_t>(i) * dim);
  }
}

}  // namespace
}  // namespace packkv::detail::cpu

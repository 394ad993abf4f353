// Host checks of the values an append brings, made when they arrive: everything the encoder will
// need when their block is compressed, so that a value accepted into the tail never makes a later
// append fail (format/quant.hpp has the rules).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>

#include <fmt/format.h>

#include "core/tail.hpp"
#include "packkv/cache.hpp"
#include "packkv/codec.hpp"
#include "packkv/error.hpp"

namespace packkv::detail {

/// Index of the first value that cannot be stored (not finite, or |x| > limit: 65504, or
/// format::kCompactMaxAbs with compact parameters), or n when all can.
template <class T>
std::size_t first_unstorable(const T* x, std::size_t n, float limit = kFp16Max) {
  const auto storable = [limit](float v) { return v >= -limit && v <= limit; };  // false for NaN
  // Branch-free passes the compiler vectorises; the exact place is searched only on failure.
  bool ok = true;
  bool fast = false;
  if constexpr (std::is_same_v<T, fp16_t>) {
    // fp16 magnitudes order like their bit patterns without the sign, Inf and NaN above every
    // finite value: one vectorised maximum of the bits against the limit's (65504 and 16384 are
    // exact fp16 values).
    const fp16_t bound = fp16_from_float(limit);
    if (to_float(bound) == limit) {
      std::uint16_t magnitude = 0;
      for (std::size_t i = 0; i < n; ++i) {
        const auto m = static_cast<std::uint16_t>(x[i].bits & 0x7FFFu);
        magnitude = m > magnitude ? m : magnitude;
      }
      ok = magnitude <= bound.bits;
      fast = true;
    }
  }
  if (!fast) {
    unsigned bad = 0;
    for (std::size_t i = 0; i < n; ++i) bad |= static_cast<unsigned>(!storable(to_float(x[i])));
    ok = bad == 0;
  }
  if (ok) return n;
  for (std::size_t i = 0; i < n; ++i) {
    if (!storable(to_float(x[i]))) return i;
  }
  return n;
}

/// Checks the new tokens of `plan` (host rows). Values must be storable. With one-bit codes a
/// group's range must also fit one fp16 step (the only case where a range of storable values can
/// fail): each new token of a per-token side, and for per-channel K each channel over every block
/// the new tokens fall in, the tokens of that block already in the tail included.
template <class T>
void check_append_values(const CodecParams& codec, const TokenRows<T>& rows, const AppendPlan& plan,
                         const std::string& where) {
  const format::BlockGeometry& g = codec.geometry;
  const std::size_t row = static_cast<std::size_t>(rows.row_elems);
  for (format::Side side : {format::Side::k, format::Side::v}) {
    const T* x = side == format::Side::k ? rows.in_k : rows.in_v;
    const std::size_t count = static_cast<std::size_t>(plan.n_tokens) * row;
    const float limit = g.compact_params ? format::kCompactMaxAbs : kFp16Max;
    const std::size_t i = first_unstorable(x, count, limit);
    if (i == count) continue;
    const std::size_t token = i / row, head = i % row / static_cast<std::size_t>(g.head_dim);
    const std::size_t channel = i % static_cast<std::size_t>(g.head_dim);
    throw_error(fmt::format("{}: {} value {} at token {}, head {}, channel {} is NaN, Inf or beyond +-{} ({})", where,
                            side == format::Side::k ? "K" : "V", to_float(x[i]), plan.first_new() + token, head,
                            channel, limit,
                            g.compact_params ? "the limit of compact parameters, CacheConfig::compact_params"
                                             : "packkv stores per-token parameters in fp16"));
  }
  for (format::Side side : {format::Side::k, format::Side::v}) {
    const int max_code = codec.max_code(side);
    if (max_code != 1) continue;  // any storable range fits a step of at most 131008 / max_code
    const char* name = side == format::Side::k ? "K" : "V";
    if (!g.per_channel(side)) {
      for (std::int64_t p = plan.first_new(); p < plan.end(); ++p) {
        for (int h = 0; h < g.num_heads; ++h) {
          const T* values = rows.row(side, p) + static_cast<std::size_t>(h) * g.head_dim;
          format::Range range;
          for (int c = 0; c < g.head_dim; ++c) range.extend(to_float(values[c]));
          PACKKV_REQUIRE(format::range_fits(range, max_code),
                         fmt::format("{}: {} token {} of head {} spans [{}, {}], too wide for one fp16 step at rel 1 "
                                     "(use a smaller rel)",
                                     where, name, p, h, range.lo, range.hi));
        }
      }
      continue;
    }
    // Per-channel K: every block the new tokens fall in, from its first token still held.
    const std::int64_t block = g.block_tokens;
    for (std::int64_t first = plan.first_new() / block * block; first < plan.end(); first += block) {
      const std::int64_t from = std::max(first, plan.before.begin), to = std::min(first + block, plan.end());
      for (int h = 0; h < g.num_heads; ++h) {
        for (int c = 0; c < g.head_dim; ++c) {
          format::Range range;
          for (std::int64_t p = from; p < to; ++p) {
            range.extend(to_float(rows.row(side, p)[static_cast<std::size_t>(h) * g.head_dim + c]));
          }
          PACKKV_REQUIRE(format::range_fits(range, max_code),
                         fmt::format("{}: K channel {} of head {} spans [{}, {}] over the block of tokens {}..{}, too "
                                     "wide for one fp16 step at rel 1 (use a smaller rel)",
                                     where, c, h, range.lo, range.hi, first, first + block - 1));
        }
      }
    }
  }
}

/// Checks that q (or attention weights) holds finite values only.
inline void check_finite(const float* x, std::size_t n, const char* what) {
  bool ok = true;
  for (std::size_t i = 0; i < n; ++i) ok &= std::isfinite(x[i]);
  if (ok) return;
  for (std::size_t i = 0; i < n; ++i) {
    PACKKV_REQUIRE(std::isfinite(x[i]), fmt::format("{} element {} is {}: only finite values are accepted", what, i, x[i]));
  }
}

template <class T>
void check_finite(const T* x, std::size_t n, const char* what) {
  for (std::size_t i = 0; i < n; ++i) {
    const float f = to_float(x[i]);
    PACKKV_REQUIRE(std::isfinite(f), fmt::format("{} element {} is {}: only finite values are accepted", what, i, f));
  }
}

}  // namespace packkv::detail

// Quantization of the packed format: which values can be stored, how a group's range is reduced,
// the stored (step, min) pair, codes, and the one dequantization every decoder uses.
//
// A group is one token of one head (per-token K, and V) or one channel of one head over a block
// (per-channel K). Host and device compute the same bits: every rounding here is pinned.
#pragma once

#include <cmath>
#include <cstdint>

#include "packkv/types.hpp"

namespace packkv::format {

/// Per-group parameters as stored: x' = dequantize(code, step, min).
struct QuantParams {
  fp16_t step;
  fp16_t min;
};
static_assert(sizeof(QuantParams) == 4);

/// The storable-value rule: parameters are fp16 and every reconstruction stays in the fp16 range,
/// so packkv stores finite values with |x| <= 65504, whatever the storage type.
PACKKV_HOST_DEVICE bool storable(float x) { return x >= -kFp16Max && x <= kFp16Max; }  // false for NaN

/// The signed-zero rule: a group's range is reduced over canonical values, with -0 read as +0,
/// so the stored min of a group does not depend on the order in which a reduction meets zeros.
PACKKV_HOST_DEVICE float canonical(float x) { return x + 0.0f; }

/// Range of a group so far; extend() with canonical values (min/max of equal values then agree).
struct Range {
  float lo = INFINITY;
  float hi = -INFINITY;
  PACKKV_HOST_DEVICE void extend(float x) {
    const float c = canonical(x);
    lo = c < lo ? c : lo;
    hi = c > hi ? c : hi;
  }
  PACKKV_HOST_DEVICE void merge(const Range& o) {
    lo = o.lo < lo ? o.lo : lo;
    hi = o.hi > hi ? o.hi : hi;
  }
};

/// The dequantization: x' = code * step + min with one rounding (a fused multiply-add), on every
/// backend and in every decoder, so that read-back values agree bit for bit.
PACKKV_HOST_DEVICE float dequantize(std::uint32_t code, float step, float min) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(static_cast<float>(code), step, min);
#else
  return std::fmaf(static_cast<float>(code), step, min);
#endif
}

/// Whether (step, min) decodes every code in [0, max_code] to a finite value inside the fp16 range.
/// Block validation requires it of every stored pair; the encoder only writes such pairs.
PACKKV_HOST_DEVICE bool params_in_range(float step, float min, int max_code) {
  if (!(step >= 0.0f && step <= kFp16Max && min >= -kFp16Max && min <= kFp16Max)) return false;  // NaN too
  return dequantize(static_cast<std::uint32_t>(max_code), step, min) <= kFp16Max;
}

/// A group's parameters in two bytes (block format version 3, CacheConfig::compact_params):
/// step = (16 + m) * 2^(E + e - 4), with e the high and m the low nibble of `step_code` and E the
/// section's step exponent; min = (zero - W) * step / 2, with W = 2^bits - 1 the largest code of
/// the section's width. Every step has 5 significant bits and every min is a multiple of step / 2
/// with at most 9 bits of multiplier, so code * step + min is exact in fp32 (no rounding at all).
struct CompactParams {
  std::uint8_t step_code;
  std::int8_t zero;
};
static_assert(sizeof(CompactParams) == 2);

/// Quantization of one group with codes in [0, max_code] (fp16 parameters), or in [0, W] with
/// compact parameters.
struct Quantizer {
  QuantParams stored;     ///< what the block stores (fp16 parameters)
  CompactParams compact;  ///< what the block stores (compact parameters)
  float min;              ///< the stored min as a float
  float inv_step;         ///< 1 / step, or 0 when step is 0
  bool ok;                ///< false when the group's range cannot be stored (see make_quantizer)
};

/// The stored min is lo rounded down to fp16 and the stored step is (hi - min) / max_code rounded
/// up, so min + [0, max_code] * step covers [lo, hi] and |x - x'| <= step / 2. When rounding up
/// would carry the largest code past 65504 (hi near the limit), the step is rounded down instead:
/// the largest code then decodes to at most hi, and the error of the values it takes stays below
/// max_code * ulp(step) < step / 2. Not ok when the range is not storable, or when one fp16 step
/// cannot cover it (rel 1: a range above 65504).
PACKKV_HOST_DEVICE Quantizer make_quantizer(float lo, float hi, int max_code) {
  Quantizer q{};
  q.ok = storable(lo) && storable(hi) && lo <= hi;
  if (!q.ok) return q;
  q.stored.min = fp16_round_down(static_cast<double>(lo));
  q.min = to_float(q.stored.min);
  const double step = (static_cast<double>(hi) - static_cast<double>(q.min)) / static_cast<double>(max_code);
  if (step > static_cast<double>(kFp16Max)) {
    q.ok = false;
    return q;
  }
  q.stored.step = fp16_round_up(step);
  if (dequantize(static_cast<std::uint32_t>(max_code), to_float(q.stored.step), q.min) > kFp16Max) {
    q.stored.step = fp16_round_down(step);
  }
  const float step_f = to_float(q.stored.step);
  q.inv_step = step_f > 0.0f ? 1.0f / step_f : 0.0f;
  return q;
}

/// Whether a group with this range can be quantized: the check that append makes when values
/// arrive, long before their block is encoded.
PACKKV_HOST_DEVICE bool range_fits(const Range& r, int max_code) { return make_quantizer(r.lo, r.hi, max_code).ok; }

/// Code of x: round((x - min) / step), ties to even, clamped to [0, max_code]. Written so that no
/// compiler may fuse it into an FMA: the CPU and GPU encoders must produce the same codes.
PACKKV_HOST_DEVICE std::uint8_t quantize(float x, const Quantizer& q, int max_code) {
  const float shifted = x - q.min;
  const float scaled = shifted * q.inv_step;
#if defined(__CUDA_ARCH__)
  int code = __float2int_rn(scaled);
#else
  int code = static_cast<int>(std::nearbyintf(scaled));  // ties to even, as __float2int_rn
#endif
  code = code < 0 ? 0 : code;
  code = code > max_code ? max_code : code;
  return static_cast<std::uint8_t>(code);
}

// ---- compact parameters (format version 3) -----------------------------------------------------

/// Values a cache with compact parameters stores: |x| <= 16384. A quarter of the fp16 range keeps
/// every group's grid of W + 1 codes inside +-65504 with room for the alignment of its min.
inline constexpr float kCompactMaxAbs = 16384.0f;
PACKKV_HOST_DEVICE bool storable_compact(float x) { return x >= -kCompactMaxAbs && x <= kCompactMaxAbs; }

/// A section's step exponent E, stored biased by kCompactExponentBias in the section's first byte.
inline constexpr int kCompactExponentMin = -40;
inline constexpr int kCompactExponentMax = 8;
inline constexpr int kCompactExponentBias = 64;
/// The step codes span 2^16 above 2^E: E sits this far below the section's largest need, leaving
/// two octaves for steps that must grow to align their min.
inline constexpr int kCompactExponentHeadroom = 13;

/// The float whose bit pattern is `bits`.
PACKKV_HOST_DEVICE float float_from_bits(std::uint32_t bits) {
  float f;
#if defined(__CUDA_ARCH__)
  f = __uint_as_float(bits);
#else
  __builtin_memcpy(&f, &bits, sizeof f);
#endif
  return f;
}

/// 2^e as a float, exact, for e in [-126, 127].
PACKKV_HOST_DEVICE float exp2_exact(int e) { return float_from_bits(static_cast<std::uint32_t>(e + 127) << 23); }

PACKKV_HOST_DEVICE float compact_step(std::uint8_t step_code, int exponent) {
  return static_cast<float>(16 + (step_code & 15)) * exp2_exact(exponent + (step_code >> 4) - 4);
}
/// The same value, (16 + m) * 2^(E + e - 4) = (1 + m / 16) * 2^(E + e), built from its float fields
/// (E + e is within [-40, 23], a normal exponent; biased_exponent = E + 127): integer operations
/// alone, which a CPU loop over a section vectorises. The encoder and the device keep the product
/// (in the CUDA encoder this form cost registers and a spill).
PACKKV_HOST_DEVICE float compact_step_from_bits(std::uint32_t step_code, std::uint32_t biased_exponent) {
  return float_from_bits(((biased_exponent + (step_code >> 4)) << 23) | ((step_code & 15u) << 19));
}
/// The min of a group: (zero - top_code) * step / 2, exact.
PACKKV_HOST_DEVICE float compact_min(std::int8_t zero, float step, int top_code) {
  return static_cast<float>(static_cast<int>(zero) - top_code) * (step * 0.5f);
}

/// The step a group needs at least: its error-bound step (range / (max_code - 1/2): one half step
/// goes to aligning the min when no code is spare) or, for a group far from zero, the step that
/// lets `zero` reach it. The section's exponent comes from the largest need of its groups.
PACKKV_HOST_DEVICE double compact_need(float lo, float hi, int max_code, int top_code) {
  const double cover = (static_cast<double>(hi) - static_cast<double>(lo)) / (static_cast<double>(max_code) - 0.5);
  const double far = 2.0 * (hi > -lo ? static_cast<double>(hi) : -static_cast<double>(lo)) / (126.0 + top_code);
  return cover > far ? cover : far;
}

/// A section's step exponent for the largest need of its groups (0 when every group is zero).
PACKKV_HOST_DEVICE int compact_exponent(double largest_need) {
  int e = kCompactExponentMin;
  if (largest_need > 0.0) {
    int exp2 = 0;
#if defined(__CUDA_ARCH__)
    frexp(largest_need, &exp2);
#else
    std::frexp(largest_need, &exp2);
#endif
    e = exp2 - 1 - kCompactExponentHeadroom;  // largest_need in [2^(exp2 - 1), 2^exp2)
  }
  return e < kCompactExponentMin ? kCompactExponentMin : (e > kCompactExponentMax ? kCompactExponentMax : e);
}

/// The smallest step code whose step is >= target (0 when the target is below 2^E; 256 when no
/// code reaches it).
PACKKV_HOST_DEVICE int compact_step_code_at_least(double target, int exponent) {
  const double floor_step = static_cast<double>(exp2_exact(exponent));
  if (!(target > floor_step)) return 0;
  int exp2 = 0;
#if defined(__CUDA_ARCH__)
  const double frac = frexp(target / floor_step, &exp2);  // target / 2^E = frac * 2^exp2, frac in [0.5, 1)
#else
  const double frac = std::frexp(target / floor_step, &exp2);
#endif
  int e = exp2 - 1;
  int m = static_cast<int>(ceil(frac * 32.0)) - 16;  // (16 + m) / 16 >= 2 frac
  if (m > 15) {
    m = 0;
    ++e;
  }
  int code = e * 16 + m;
  if (code > 255) return 256;
  while (code < 256 && static_cast<double>(compact_step(static_cast<std::uint8_t>(code), exponent)) < target) ++code;
  return code;
}

/// Compact quantization of one group with codes in [0, top_code] (top_code = 2^bits - 1) and an
/// error-bound step of (hi - lo) / max_code: the smallest step code at or above that step (or the
/// section's floor 2^E) for which some `zero` puts [lo, hi] inside the grid's W + 1 codes, with
/// the grid inside +-65504 and `zero` inside int8. So |x - x'| <= step / 2 with
/// step <= (17/16) * max(range / (max_code - 1/2), 2 max(hi, -lo) / (126 + W), 2^E) (docs/format.md).
/// Not ok when a value is not storable_compact, or (never for such values and the section's own
/// exponent) when no code fits.
PACKKV_HOST_DEVICE Quantizer make_compact_quantizer(float lo, float hi, int max_code, int top_code, int exponent) {
  Quantizer q{};
  q.ok = storable_compact(lo) && storable_compact(hi) && lo <= hi;
  if (!q.ok) return q;
  const double target = (static_cast<double>(hi) - static_cast<double>(lo)) / static_cast<double>(max_code);
  for (int code = compact_step_code_at_least(target, exponent); code < 256; ++code) {
    const float step = compact_step(static_cast<std::uint8_t>(code), exponent);
    const double half = 0.5 * static_cast<double>(step);
    // min = (z - W) half <= lo and max = (z + W) half >= hi, both inside +-65504, z in int8.
    const double limit = floor(static_cast<double>(kFp16Max) / half);
    double z_hi = floor(static_cast<double>(lo) / half) + top_code;
    double z_lo = ceil(static_cast<double>(hi) / half) - top_code;
    z_hi = z_hi < 127.0 ? z_hi : 127.0;
    z_hi = z_hi < limit - top_code ? z_hi : limit - top_code;
    z_lo = z_lo > -128.0 ? z_lo : -128.0;
    z_lo = z_lo > top_code - limit ? z_lo : top_code - limit;
    if (z_lo > z_hi) continue;
    const auto zero = static_cast<std::int8_t>(static_cast<int>(z_hi));
    const float min = compact_min(zero, step, top_code);
    // The bounds hold exactly in fp32 (min and the grid's top are exact); checked, not assumed.
    if (!(min <= lo && min + static_cast<float>(top_code) * step >= hi)) continue;
    q.compact = CompactParams{static_cast<std::uint8_t>(code), zero};
    q.min = min;
    q.inv_step = 1.0f / step;
    return q;
  }
  q.ok = false;
  return q;
}

}  // namespace packkv::format

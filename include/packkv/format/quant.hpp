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

/// Quantization of one group with codes in [0, max_code].
struct Quantizer {
  QuantParams stored;  ///< what the block stores
  float min;           ///< to_float(stored.min)
  float inv_step;      ///< 1 / to_float(stored.step), or 0 when step is 0
  bool ok;             ///< false when the group's range cannot be stored (see make_quantizer)
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

}  // namespace packkv::format

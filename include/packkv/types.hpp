// 16-bit storage types (fp16, bf16) with exact host conversions, plus the host/device macro.
//
// The CPU build must not need CUDA headers, so these are plain bit containers: conversions are
// integer code that compiles identically for host and device. Directed-rounding conversions are
// part of the packed format (docs/format.md): the encoder rounds a token's min down and its step up
// so that the stored fp16 pair always covers the token's range.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#define PACKKV_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PACKKV_HOST_DEVICE inline
#endif

namespace packkv {

namespace detail {
PACKKV_HOST_DEVICE std::uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}
PACKKV_HOST_DEVICE float bits_float(std::uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}
}  // namespace detail

/// IEEE 754 binary16, stored as its bit pattern.
struct fp16_t {
  std::uint16_t bits = 0;
  constexpr fp16_t() = default;
  static constexpr fp16_t from_bits(std::uint16_t b) {
    fp16_t h;
    h.bits = b;
    return h;
  }
};

/// bfloat16 (the top half of an IEEE binary32), stored as its bit pattern.
struct bf16_t {
  std::uint16_t bits = 0;
  constexpr bf16_t() = default;
  static constexpr bf16_t from_bits(std::uint16_t b) {
    bf16_t h;
    h.bits = b;
    return h;
  }
};

static_assert(sizeof(fp16_t) == 2 && std::is_trivially_copyable_v<fp16_t>);
static_assert(sizeof(bf16_t) == 2 && std::is_trivially_copyable_v<bf16_t>);

/// Largest finite fp16 value.
inline constexpr float kFp16Max = 65504.0f;

/// fp16 -> float, exact.
PACKKV_HOST_DEVICE float to_float(fp16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h.bits & 0x8000u) << 16;
  std::uint32_t exp = (h.bits >> 10) & 0x1Fu;
  std::uint32_t mant = h.bits & 0x3FFu;
  // Inf, or NaN made quiet (as hardware conversions do: F16C, CUDA).
  if (exp == 0x1F) return detail::bits_float(sign | 0x7F800000u | (mant << 13) | (mant ? 0x400000u : 0u));
  if (exp == 0) {
    if (mant == 0) return detail::bits_float(sign);
    // Subnormal: value = mant * 2^-24, exactly representable in float.
    float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return detail::bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

/// bf16 -> float, exact.
PACKKV_HOST_DEVICE float to_float(bf16_t h) {
  return detail::bits_float(static_cast<std::uint32_t>(h.bits) << 16);
}
PACKKV_HOST_DEVICE float to_float(float f) { return f; }

/// float -> fp16, round to nearest even; overflow gives inf, NaN stays NaN.
PACKKV_HOST_DEVICE fp16_t fp16_from_float(float f) {
  const std::uint32_t u = detail::float_bits(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t abs = u & 0x7FFFFFFFu;
  if (abs >= 0x7F800000u) {  // inf or nan
    return fp16_t::from_bits(sign | 0x7C00u | (abs > 0x7F800000u ? 0x200u : 0u));
  }
  if (abs >= 0x477FF000u) return fp16_t::from_bits(sign | 0x7C00u);  // rounds past 65504
  if (abs < 0x38800000u) {
    // Result is subnormal (or zero): round abs * 2^24 to an integer, ties to even.
    if (abs < 0x33000000u) return fp16_t::from_bits(sign);  // below half the smallest subnormal
    const std::uint32_t exp = abs >> 23;
    const std::uint32_t mant = (abs & 0x7FFFFFu) | 0x800000u;
    const std::uint32_t shift = 126u - exp;  // 14..24 bits dropped
    std::uint32_t q = mant >> shift;
    const std::uint32_t rem = mant & ((1u << shift) - 1u);
    const std::uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return fp16_t::from_bits(static_cast<std::uint16_t>(sign | q));
  }
  // Normal: rebias the exponent and round 13 mantissa bits away, ties to even.
  std::uint32_t r = abs - 0x38000000u;
  const std::uint32_t rem = r & 0x1FFFu;
  r >>= 13;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return fp16_t::from_bits(static_cast<std::uint16_t>(sign | r));
}

/// float -> bf16, round to nearest even; NaN stays NaN.
PACKKV_HOST_DEVICE bf16_t bf16_from_float(float f) {
  const std::uint32_t u = detail::float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return bf16_t::from_bits(static_cast<std::uint16_t>((u >> 16) | 0x40u));
  const std::uint32_t rounding = 0x7FFFu + ((u >> 16) & 1u);
  return bf16_t::from_bits(static_cast<std::uint16_t>((u + rounding) >> 16));
}

/// Conversion from float to any storage type, rounding to nearest even.
template <class T>
PACKKV_HOST_DEVICE T from_float(float f) {
  if constexpr (std::is_same_v<T, float>) {
    return f;
  } else if constexpr (std::is_same_v<T, fp16_t>) {
    return fp16_from_float(f);
  } else {
    static_assert(std::is_same_v<T, bf16_t>, "packkv storage types: float, fp16_t, bf16_t");
    return bf16_from_float(f);
  }
}

namespace detail {
/// Next fp16 towards +inf from a finite fp16 (bit arithmetic on sign-magnitude).
PACKKV_HOST_DEVICE std::uint16_t fp16_next_up(std::uint16_t b) {
  if (b == 0x8000u) return 0x0001u;       // -0 -> smallest positive subnormal
  if (b & 0x8000u) return static_cast<std::uint16_t>(b - 1u);  // negative: magnitude shrinks
  return static_cast<std::uint16_t>(b + 1u);
}
PACKKV_HOST_DEVICE std::uint16_t fp16_next_down(std::uint16_t b) {
  if (b == 0x0000u) return 0x8001u;
  if (b & 0x8000u) return static_cast<std::uint16_t>(b + 1u);
  return static_cast<std::uint16_t>(b - 1u);
}
}  // namespace detail

/// Largest fp16 <= x (x finite and within fp16 range; the caller checks the range).
PACKKV_HOST_DEVICE fp16_t fp16_round_down(double x) {
  fp16_t h = fp16_from_float(static_cast<float>(x));
  // float(x) may round either way and fp16 rounding again: step down until h <= x.
  while (static_cast<double>(to_float(h)) > x) h.bits = detail::fp16_next_down(h.bits);
  return h;
}

/// Smallest fp16 >= x (x finite, >= 0, and within fp16 range; the caller checks).
PACKKV_HOST_DEVICE fp16_t fp16_round_up(double x) {
  fp16_t h = fp16_from_float(static_cast<float>(x));
  while (static_cast<double>(to_float(h)) < x) h.bits = detail::fp16_next_up(h.bits);
  return h;
}

/// Storage types a PackedKVCache may hold.
template <class T>
inline constexpr bool is_storage_type_v =
    std::is_same_v<T, float> || std::is_same_v<T, fp16_t> || std::is_same_v<T, bf16_t>;

/// Human-readable name of a storage type ("float", "fp16", "bf16").
template <class T>
constexpr const char* type_name() {
  if constexpr (std::is_same_v<T, float>) return "float";
  else if constexpr (std::is_same_v<T, fp16_t>) return "fp16";
  else return "bf16";
}

}  // namespace packkv

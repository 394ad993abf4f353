// fp16 intrinsics of the CPU emulator: exact conversions through packkv's own bit code.
#pragma once

#include <cstdint>

#include "packkv/types.hpp"

struct __half {
  std::uint16_t bits;
};
inline __half __ushort_as_half(unsigned short bits) { return __half{bits}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline float __half2float(__half h) { return packkv::to_float(packkv::fp16_t::from_bits(h.bits)); }
inline __half __float2half_rn(float f) { return __half{packkv::fp16_from_float(f).bits}; }

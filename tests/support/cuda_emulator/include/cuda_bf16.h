// bf16 intrinsics of the CPU emulator.
#pragma once

#include <cstdint>

#include "packkv/types.hpp"

struct __nv_bfloat16 {
  std::uint16_t bits;
};
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) { return __nv_bfloat16{bits}; }
inline float __bfloat162float(__nv_bfloat16 h) { return packkv::to_float(packkv::bf16_t::from_bits(h.bits)); }

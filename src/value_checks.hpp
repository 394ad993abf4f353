// Which input values packkv can store: finite, |x| <= 65504 (per-token parameters are fp16).
#pragma once

#include <cmath>
#include <type_traits>

#include "packkv/types.hpp"

namespace packkv::detail {

template <class T>
bool storable(T x) {
  if constexpr (std::is_same_v<T, fp16_t>) {
    return (x.bits & 0x7C00u) != 0x7C00u;  // every finite fp16 is within range
  } else {
    const float f = to_float(x);
    return std::isfinite(f) && std::fabs(f) <= kFp16Max;
  }
}

/// Index of the first value that cannot be stored, or n when all can.
template <class T>
std::size_t first_unstorable(const T* x, std::size_t n) {
  bool ok = true;
  for (std::size_t i = 0; i < n; ++i) ok &= storable(x[i]);  // branch-free pass: vectorises
  if (ok) return n;
  for (std::size_t i = 0; i < n; ++i) {
    if (!storable(x[i])) return i;
  }
  return n;
}

}  // namespace packkv::detail

// The Hadamard rotation of head vectors (CacheConfig::rotate_k, rotate_v), on every backend.
//
// A head vector x of head_dim values is stored as y = H S x: S flips the signs of a fixed
// pseudo-random half of the channels, H is the normalised Walsh-Hadamard matrix of the largest
// power of two P that divides head_dim, applied to each P-channel chunk. H S is orthogonal, so
// dot products are unchanged (q.k = (H S q).(H S k)) and one rotation back after the weighted sum
// recovers V's output. Rotation spreads an outlier channel's range over all channels of its chunk:
// per-token ranges shrink, so the same relative bound costs less error.
//
// Every implementation runs the same float operations in the same order (signs, then butterfly
// stages of span 1, 2, 4, ..., P/2, then one multiply by the scale), so host and device results
// are bit-identical.
#pragma once

#include <cstdint>

#include "packkv/types.hpp"

namespace packkv::detail {

/// The rotation's chunk: the largest power of two dividing head_dim (head_dim is a multiple of 8).
PACKKV_HOST_DEVICE constexpr int rotation_chunk(int head_dim) { return head_dim & -head_dim; }

/// S's sign of channel c (a fixed sequence: the top bit of a SplitMix64 step of c).
PACKKV_HOST_DEVICE constexpr bool rotation_flips(int c) {
  std::uint64_t z = static_cast<std::uint64_t>(c) + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return ((z ^ (z >> 31)) >> 63) != 0;
}

/// 1 / sqrt(P) for P = 2^k: an exact power of two times 1 or 1/sqrt(2) (the float nearest it).
PACKKV_HOST_DEVICE constexpr float rotation_scale(int chunk) {
  int k = 0;
  while ((1 << k) < chunk) ++k;
  float s = (k % 2) ? 0.70710678118654752f : 1.0f;
  for (int i = 0; i < k / 2; ++i) s *= 0.5f;
  return s;
}

/// One butterfly stage of span h over a chunk: (a, b) -> (a + b, a - b).
PACKKV_HOST_DEVICE void hadamard_stage(float* x, int chunk, int h) {
  for (int i = 0; i < chunk; i += 2 * h) {
    for (int j = i; j < i + h; ++j) {
      const float a = x[j], b = x[j + h];
      x[j] = a + b;
      x[j + h] = a - b;
    }
  }
}

/// x := H x for each chunk of x[0, head_dim) (H normalised; H is its own inverse).
PACKKV_HOST_DEVICE void hadamard(float* x, int head_dim) {
  const int chunk = rotation_chunk(head_dim);
  const float scale = rotation_scale(chunk);
  for (int c0 = 0; c0 < head_dim; c0 += chunk) {
    for (int h = 1; h < chunk; h *= 2) hadamard_stage(x + c0, chunk, h);
    for (int c = c0; c < c0 + chunk; ++c) x[c] *= scale;
  }
}

/// x := H S x (into the rotated space).
PACKKV_HOST_DEVICE void rotate_forward(float* x, int head_dim) {
  for (int c = 0; c < head_dim; ++c) x[c] = rotation_flips(c) ? -x[c] : x[c];
  hadamard(x, head_dim);
}

/// x := S H x (back from the rotated space).
PACKKV_HOST_DEVICE void rotate_back(float* x, int head_dim) {
  hadamard(x, head_dim);
  for (int c = 0; c < head_dim; ++c) x[c] = rotation_flips(c) ? -x[c] : x[c];
}

}  // namespace packkv::detail

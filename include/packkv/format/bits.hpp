// Bit streams of the packed format: the one primitive that every field with sub-byte values uses.
//
// Eight values of `width` bits (0..8) form a little-endian bit stream of exactly `width` bytes:
// value i occupies bits [i * width, i * width + width), bit j being bit j % 8 of byte j / 8. A pack
// (16 codes) is two such groups; a round's pack widths (4 bits per channel) and pack minimums
// (`bits` bits per channel) are such groups of 8 channels each. Every fast path (AVX2, CUDA) must
// match these scalar functions bit for bit; tests check it exhaustively.
#pragma once

#include <bit>
#include <cstdint>

#include "packkv/types.hpp"

namespace packkv::format {

static_assert(std::endian::native == std::endian::little,
              "packkv's formats are little-endian and are read and written with plain copies");

PACKKV_HOST_DEVICE std::uint32_t load_u32(const std::uint8_t* p) {
  return static_cast<std::uint32_t>(p[0]) | (static_cast<std::uint32_t>(p[1]) << 8) |
         (static_cast<std::uint32_t>(p[2]) << 16) | (static_cast<std::uint32_t>(p[3]) << 24);
}
PACKKV_HOST_DEVICE void store_u32(std::uint8_t* p, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<std::uint8_t>(v >> (8 * i));
}

/// Writes 8 values of `width` bits (each < 2^width) as `width` bytes.
PACKKV_HOST_DEVICE void pack8(const std::uint8_t* values, std::uint32_t width, std::uint8_t* out) {
  std::uint64_t stream = 0;
  for (int i = 0; i < 8; ++i) stream |= static_cast<std::uint64_t>(values[i]) << (i * width);
  for (std::uint32_t b = 0; b < width; ++b) out[b] = static_cast<std::uint8_t>(stream >> (8 * b));
}

/// Reads 8 values of `width` bits from `width` bytes (reads nothing when width is 0).
PACKKV_HOST_DEVICE void unpack8(const std::uint8_t* in, std::uint32_t width, std::uint8_t* values) {
  std::uint64_t stream = 0;
  for (std::uint32_t b = 0; b < width; ++b) stream |= static_cast<std::uint64_t>(in[b]) << (8 * b);
  const std::uint32_t mask = (1u << width) - 1u;
  for (int i = 0; i < 8; ++i) values[i] = static_cast<std::uint8_t>((stream >> (i * width)) & mask);
}

/// Value i of a stream of `width`-bit values (the 8-value groups above, one after the other).
/// Reads at most 2 bytes, the second only when the value crosses into it.
PACKKV_HOST_DEVICE std::uint32_t stream_value(const std::uint8_t* stream, std::uint32_t i, std::uint32_t width) {
  const std::uint32_t bit = i * width, shift = bit & 7u;
  std::uint32_t two = stream[bit >> 3];
  if (shift + width > 8) two |= static_cast<std::uint32_t>(stream[(bit >> 3) + 1]) << 8;
  return (two >> shift) & ((1u << width) - 1u);
}

/// A pack: 16 values of `width` bits in 2 * width bytes (values 0..7, then 8..15).
PACKKV_HOST_DEVICE void pack16(const std::uint8_t* values, std::uint32_t width, std::uint8_t* out) {
  pack8(values, width, out);
  pack8(values + 8, width, out + width);
}
PACKKV_HOST_DEVICE void unpack16(const std::uint8_t* in, std::uint32_t width, std::uint8_t* values) {
  unpack8(in, width, values);
  unpack8(in + width, width, values + 8);
}

/// Bits needed for values in [0, range]: 0 for a constant pack.
PACKKV_HOST_DEVICE constexpr std::uint32_t width_for_range(std::uint32_t range) {
  std::uint32_t w = 0;
  while (range >> w) ++w;
  return w;
}

}  // namespace packkv::format

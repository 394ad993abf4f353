// Sequence images, version 3: the transfer format of export_sequence / import_sequence.
//
//   ImageHeader (48 B) | per layer: LayerRecord (24 B), u32 block_bytes[block_count],
//                        the blocks, tail K then tail V (tail_tokens x kv_heads x head_dim x T),
//                        sink K then sink V (sink_tokens x kv_heads x head_dim x T)
//
// The header carries the config fields a reader needs to decode the blocks, the body size and a
// CRC-32C of the body, plus a CRC-32C of the header itself (docs/format.md).
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "packkv/types.hpp"

namespace packkv::format {

inline constexpr char kImageMagic[8] = {'P', 'A', 'C', 'K', 'K', 'V', 'S', 'Q'};
/// Version 3 adds each layer's exact sink rows (CacheConfig::sink_tokens). Version 2 records each
/// layer's code ranges in its LayerRecord (per-layer bounds) and leaves the header's four code
/// fields zero; version 1 has one range in the header for every layer, record fields zero. Both
/// are still read (as images without sink rows).
inline constexpr std::uint32_t kImageVersion = 3;
inline constexpr std::uint32_t kImageVersionPerLayer = 2;
inline constexpr std::uint32_t kImageVersionUniform = 1;

/// Storage type codes of images.
enum DtypeCode : std::uint8_t { kDtypeFloat = 0, kDtypeFp16 = 1, kDtypeBf16 = 2 };

template <class T>
constexpr std::uint8_t dtype_code() {
  if constexpr (std::is_same_v<T, float>) return kDtypeFloat;
  else if constexpr (std::is_same_v<T, fp16_t>) return kDtypeFp16;
  else return kDtypeBf16;
}

/// The bits of ImageHeader::options (images written before an option existed have it clear).
enum ImageOptions : std::uint8_t {
  kImageRotateK = 1u << 0,        ///< CacheConfig::rotate_k
  kImageRotateV = 1u << 1,        ///< CacheConfig::rotate_v
  kImageCompactParams = 1u << 2,  ///< CacheConfig::compact_params: the blocks are version 3
};
inline constexpr std::uint8_t kImageOptionsKnown = kImageRotateK | kImageRotateV | kImageCompactParams;

struct ImageHeader {
  char magic[8];
  std::uint32_t version;
  std::uint32_t header_bytes;  ///< sizeof(ImageHeader)
  std::uint8_t dtype;          ///< DtypeCode
  std::uint8_t k_mode;         ///< QuantMode
  std::uint8_t permuted;       ///< 1 when blocks carry a token permutation
  std::uint8_t k_bits, v_bits;          ///< version 1 only (zero in version 2)
  std::uint8_t k_max_code, v_max_code;  ///< version 1 only (zero in version 2)
  std::uint8_t options;    ///< ImageOptions: K rotated, V rotated, compact parameters; others zero
  std::uint16_t num_kv_heads, head_dim, block_tokens, layer_count;
  std::uint64_t body_bytes;
  std::uint32_t body_crc;    ///< CRC-32C of the body
  std::uint32_t header_crc;  ///< CRC-32C of the header's first 44 bytes
};
static_assert(sizeof(ImageHeader) == 48);
static_assert(offsetof(ImageHeader, header_crc) == 44);

/// Layers an image can hold (layer_count is 16 bits); CacheConfig::num_layers is capped at it.
inline constexpr int kMaxImageLayers = 65535;

struct LayerRecord {
  std::uint32_t layer;
  std::uint32_t block_count;
  std::uint32_t tail_tokens;
  std::uint8_t k_max_code;  ///< the layer's largest K and V codes (version 2; zero in version 1),
  std::uint8_t v_max_code;  ///< code widths follow from them (bits_for_max_code)
  std::uint16_t sink_tokens;  ///< exact sink rows after the tail (version 3; 0 without blocks, and in versions 1-2)
  std::uint64_t length;    ///< block_count * block_tokens + tail_tokens
};
static_assert(sizeof(LayerRecord) == 24);

}  // namespace packkv::format

// Sequence images: the transfer format of export_sequence / import_sequence (docs/format.md).
//
//   ImageHeader (48 B) | per layer: LayerRecord (24 B), u32 block_bytes[block_count],
//                        the blocks, tail K then tail V (tail_tokens x kv_heads x head_dim x T)
//
// The header carries the config fields a reader needs to decode the blocks, the body size and a
// CRC-32C of the body, plus a CRC-32C of the header itself. Parsing treats the bytes as hostile:
// every count is checked against the bytes actually present before anything is allocated.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "packkv/codec.hpp"

namespace packkv::detail {

inline constexpr char kImageMagic[8] = {'P', 'A', 'C', 'K', 'K', 'V', 'S', 'Q'};
inline constexpr std::uint32_t kImageVersion = 1;

struct ImageHeader {
  char magic[8];
  std::uint32_t version;
  std::uint32_t header_bytes;   ///< sizeof(ImageHeader)
  std::uint8_t dtype;           ///< 0 float, 1 fp16, 2 bf16
  std::uint8_t k_mode;          ///< QuantMode
  std::uint8_t permuted;        ///< 1 when blocks carry a token permutation
  std::uint8_t k_bits, v_bits;
  std::uint8_t k_max_code, v_max_code;
  std::uint8_t reserved0;
  std::uint16_t num_kv_heads, head_dim, block_tokens, layer_count;
  std::uint64_t body_bytes;
  std::uint32_t body_crc;       ///< CRC-32C of the body
  std::uint32_t header_crc;     ///< CRC-32C of the header's first 44 bytes
};
static_assert(sizeof(ImageHeader) == 48);

struct LayerRecord {
  std::uint32_t layer;
  std::uint32_t block_count;
  std::uint32_t tail_tokens;
  std::uint32_t reserved;
  std::uint64_t length;         ///< block_count * block_tokens + tail_tokens
};
static_assert(sizeof(LayerRecord) == 24);

/// CRC-32C (Castagnoli), with the SSE4.2 instruction when the build has it.
std::uint32_t crc32c(const std::uint8_t* data, std::size_t n, std::uint32_t crc = 0);

template <class T>
constexpr std::uint8_t dtype_code() {
  if constexpr (std::is_same_v<T, float>) return 0;
  else if constexpr (std::is_same_v<T, fp16_t>) return 1;
  else return 2;
}

/// Header for images of this codec and storage type (counts and checksums filled by the writer).
ImageHeader make_image_header(const CodecParams& codec, QuantMode k_mode, std::uint8_t dtype);

/// Fills in body size and both checksums; `image` starts with the header.
void seal_image(std::vector<std::uint8_t>& image);

struct ParsedLayer {
  int layer = 0;
  std::int64_t length = 0;
  std::vector<std::span<const std::uint8_t>> blocks;
  int tail_tokens = 0;
  const std::uint8_t* tail_k = nullptr;  ///< tail_tokens rows of T (unaligned: copy before use)
  const std::uint8_t* tail_v = nullptr;
};

/// Validates an image completely (header, checksums, compatibility, counts, every block) and
/// returns views into it. Throws packkv::error describing the first problem.
std::vector<ParsedLayer> parse_image(std::span<const std::uint8_t> image, const CodecParams& codec, QuantMode k_mode,
                                     std::uint8_t dtype, std::size_t value_bytes, int num_layers,
                                     int max_tail_tokens);

}  // namespace packkv::detail

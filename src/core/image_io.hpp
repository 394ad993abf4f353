// Writing and parsing sequence images (format/image.hpp, docs/format.md). Parsing treats the
// bytes as hostile: every count is checked against the bytes actually present before anything is
// allocated, and every block is validated.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "packkv/codec.hpp"
#include "packkv/config.hpp"
#include "packkv/format/image.hpp"

namespace packkv::detail {

/// CRC-32C (Castagnoli), with the SSE4.2 instruction when the build has it.
std::uint32_t crc32c(const std::uint8_t* data, std::size_t n, std::uint32_t crc = 0);

/// The image header's options byte of a config: bit 0 rotate_k, bit 1 rotate_v, bit 2
/// compact_params (format::ImageOptions).
inline std::uint8_t option_bits(const CacheConfig& c) {
  unsigned bits = 0;
  if (c.rotate_k) bits |= format::kImageRotateK;
  if (c.rotate_v) bits |= format::kImageRotateV;
  if (c.compact_params) bits |= format::kImageCompactParams;
  return static_cast<std::uint8_t>(bits);
}

/// Header for images of this codec and storage type (counts and checksums filled by the writer);
/// `options` as option_bits.
format::ImageHeader make_image_header(const CodecParams& codec, QuantMode k_mode, std::uint8_t options,
                                      std::uint8_t dtype);

/// The record of one layer of an image, with that layer's code ranges.
format::LayerRecord make_layer_record(const CodecParams& codec, int layer, int block_count, int tail_tokens,
                                      std::int64_t length, int sink_tokens);

/// `shape` with other code ranges (and the code widths they need).
CodecParams codec_with_codes(const CodecParams& shape, int k_max_code, int v_max_code);

/// Fills in body size and both checksums; `image` starts with the header.
void seal_image(std::vector<std::uint8_t>& image);

struct ParsedLayer {
  CodecParams codec{};  ///< the codec the layer's blocks were validated against
  int layer = 0;
  std::int64_t length = 0;
  std::vector<std::span<const std::uint8_t>> blocks;
  int tail_tokens = 0;
  const std::uint8_t* tail_k = nullptr;  ///< tail_tokens rows of T (unaligned: copy before use)
  const std::uint8_t* tail_v = nullptr;
  int sink_tokens = 0;                   ///< exact sink rows (only with blocks)
  const std::uint8_t* sink_k = nullptr;  ///< sink_tokens rows of T (unaligned)
  const std::uint8_t* sink_v = nullptr;
};

/// Validates an image completely (header, checksums, compatibility, counts, every block) and
/// returns views into it. `codec` gives the shape (block, head_dim, heads, repacking, K mode);
/// `layer_codecs` (index = layer) the code ranges each layer must have, or, empty, accepts the
/// ranges the image records (version 1: the header's for every layer). Throws packkv::error
/// describing the first problem. Sink rows are bounded by the block size.
std::vector<ParsedLayer> parse_image(std::span<const std::uint8_t> image, const CodecParams& codec,
                                     std::span<const CodecParams> layer_codecs, QuantMode k_mode, std::uint8_t options,
                                     std::uint8_t dtype, std::size_t value_bytes, int num_layers, int max_tail_tokens);

}  // namespace packkv::detail

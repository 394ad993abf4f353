// The CPU block codec: encodes one block of K/V (all KV heads, block_tokens tokens) into the
// format of format.hpp, decodes it back, measures it, and validates untrusted block bytes. It is
// the reference that the CUDA encoder matches byte for byte.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "packkv/config.hpp"
#include "packkv/format.hpp"

namespace packkv {

/// What the encoder needs from a CacheConfig, resolved once.
struct CodecParams {
  format::BlockGeometry geometry;
  int k_max_code;
  int v_max_code;
  RepackMethod repack;

  int max_code(format::Side side) const { return side == format::Side::k ? k_max_code : v_max_code; }
  /// The largest code a block of this codec stores on a side (format::code_limit).
  int code_limit(format::Side side) const { return format::code_limit(geometry.layout(side), max_code(side)); }
  bool operator==(const CodecParams&) const = default;
};

/// The codec of one layer (its K and V bounds: k_rel_of / v_rel_of); every layer shares the shape.
CodecParams make_codec_params(const CacheConfig& config, int layer = 0);

/// The codec of every layer, index = layer.
std::vector<CodecParams> make_layer_codecs(const CacheConfig& config);

/// The shape every layer shares with the widest K and V code bits of any layer: its block and
/// section bounds hold every layer's (sizes grow with the code bits), so it sizes what all layers
/// share (staging, slots, shared memory).
format::BlockGeometry widest_geometry(std::span<const CodecParams> layer_codecs);

/// Reusable scratch for encode_block (avoids allocations on the append path).
struct EncodeScratch {
  std::vector<std::uint8_t> k_codes, v_codes;  // [block_tokens][head_dim], original order
  std::vector<std::uint8_t> k_params, v_params;  // parameter areas, groups in arrival order
  std::vector<std::uint8_t> order;  // stored position -> original token
};

/// Sizes of a block's parts, for memory statistics.
struct BlockBytes {
  std::size_t payload = 0, params = 0, descriptors = 0, permutations = 0, headers = 0;
  std::size_t k_sections = 0, v_sections = 0;  ///< the same bytes by side (see MemoryBreakdown)
  std::size_t total() const { return payload + params + descriptors + permutations + headers; }
  BlockBytes& operator+=(const BlockBytes& o);
  BlockBytes& operator-=(const BlockBytes& o);
  bool operator==(const BlockBytes&) const = default;
};

/// Encodes one block. Element (t, h, c) of K is k[t * row_stride + h * head_dim + c], likewise V.
/// `out` must hold geometry.max_block_bytes(); returns the block's size and, when `bytes` is not
/// null, its parts. Throws packkv::error naming the token and head when a value is NaN, Inf,
/// beyond +-65504, or when a group's range cannot be stored (rel 1 and a range above 65504).
template <class T>
std::uint32_t encode_block(const CodecParams& params, const T* k, const T* v, std::size_t row_stride,
                           std::uint8_t* out, EncodeScratch& scratch, BlockBytes* bytes = nullptr);

/// Decodes a block to float in the original token order, same indexing as encode_block. Every
/// element is format::dequantize(code, step, min): the same bits on every backend.
void decode_block(const CodecParams& params, const std::uint8_t* block, float* k, float* v, std::size_t row_stride);

/// The parts of an encoded (or validated) block.
BlockBytes block_bytes_breakdown(const CodecParams& params, const std::uint8_t* block);

/// Checks that `bytes` is a well-formed block for `params`: header fields, offsets, widths, pack
/// minimums, codes, the permutation, sizes, and parameters that decode inside the fp16 range.
/// Throws packkv::error describing the first problem.
void validate_block(const CodecParams& params, std::span<const std::uint8_t> bytes);

/// The codes of one section in stored order ([block_tokens][head_dim]), for tests and tools.
void unpack_section_codes(const format::SectionLayout& layout, const std::uint8_t* section, std::uint8_t* codes);

}  // namespace packkv

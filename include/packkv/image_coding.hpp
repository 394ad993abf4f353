// Entropy-coded sequence images, for offload and transfer: the same image, smaller.
//
// A sequence image (export_sequence) stores its codes bit-packed in 16-token frame-of-reference
// packs, which the read path needs. At rest nothing needs them, and an adaptive arithmetic coder
// with one model per (layer, head, side, channel) stores the same codes in fewer bits: every
// channel keeps to a narrow band of codes from token to token. encode_image_entropy writes that
// form (docs/format.md, "Entropy-coded images"); decode_image_entropy gives back the exact bytes
// of the original image, and import_sequence takes either form.
//
// What the coded form keeps as it is: the image header, layer records, block size tables, block
// headers, directories, token orders and tails. What it codes: the (step, min) parameters and the
// codes of every pack. Pack descriptors and round offsets are not stored: the section writer
// derives them from the codes on decoding, as the encoder did.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace packkv {

/// True when `bytes` starts like an entropy-coded image (its magic), whatever follows.
bool is_entropy_coded_image(std::span<const std::uint8_t> bytes);

/// The entropy-coded form of a sequence image made by export_sequence (any storage type, K mode
/// and geometry). Throws packkv::error if `image` is not a valid image.
std::vector<std::uint8_t> encode_image_entropy(std::span<const std::uint8_t> image);

/// The original image of an entropy-coded one, byte for byte. Throws packkv::error naming the
/// problem if `coded` is truncated, corrupt or of an unknown version.
std::vector<std::uint8_t> decode_image_entropy(std::span<const std::uint8_t> coded);

}  // namespace packkv

// Entropy-coded sequence images (include/packkv/image_coding.hpp, docs/format.md).
//
//   CodedHeader (56 B) | skeleton | code stream
//
// The skeleton is the original image without the parameters and rounds of its sections (round
// offsets, descriptors, packs): image header, and per layer its record, block size table, every
// block's prefix (header, directory, token orders) and trailing bytes, then the tails. The code
// stream holds every section's parameters, byte by byte, then every code of its packs, in storage
// order (layer, block, head, K then V, round, channel, token), range coded with adaptive models
// per (layer, head, side, channel) for codes and per (layer, head, side, byte) for parameters.
// Decoding rebuilds each section with the encoder's section writer; the encoder rebuilds every
// block the same way before it accepts it, so decoding cannot disagree.
#include "packkv/image_coding.hpp"

#include <algorithm>
#include <cstring>
#include <limits>
#include <numeric>

#include <fmt/format.h>

#include "codec/section_writer.hpp"
#include "core/image_io.hpp"
#include "packkv/error.hpp"
#include "packkv/format/rounds.hpp"

namespace packkv {

namespace {

using format::ImageHeader;
using format::LayerRecord;
using format::QuantParams;
using format::SectionLayout;
using format::Side;

constexpr char kCodedMagic[8] = {'P', 'A', 'C', 'K', 'K', 'V', 'E', 'C'};
constexpr std::uint32_t kCodedVersion = 1;

struct CodedHeader {
  char magic[8];
  std::uint32_t version;
  std::uint32_t header_bytes;  ///< sizeof(CodedHeader)
  std::uint64_t image_bytes;   ///< the original image's size
  std::uint64_t skeleton_bytes;
  std::uint64_t stream_bytes;
  std::uint32_t image_crc;   ///< CRC-32C of the original image
  std::uint32_t body_crc;    ///< CRC-32C of skeleton and stream
  std::uint32_t header_crc;  ///< CRC-32C of the bytes before it
  std::uint32_t reserved;    ///< zero
};
static_assert(sizeof(CodedHeader) == 56);

// ---- range coder (carry-less, after Subbotin): 32-bit state, byte output ------------------------

constexpr std::uint32_t kTop = 1u << 24, kBottom = 1u << 16;

class RangeEncoder {
 public:
  explicit RangeEncoder(std::vector<std::uint8_t>& out) : out_(out) {}
  void encode(std::uint32_t cum, std::uint32_t freq, std::uint32_t total) {
    range_ /= total;
    low_ += cum * range_;
    range_ *= freq;
    normalize();
  }
  void finish() {
    for (int i = 0; i < 4; ++i) {
      out_.push_back(static_cast<std::uint8_t>(low_ >> 24));
      low_ <<= 8;
    }
  }

 private:
  void normalize() {
    // Emit the top byte once it can no longer change; when the range gets too small without that,
    // give up the part of it that straddles the next byte boundary.
    while ((low_ ^ (low_ + range_)) < kTop || (range_ < kBottom && ((range_ = (0u - low_) & (kBottom - 1u)), true))) {
      out_.push_back(static_cast<std::uint8_t>(low_ >> 24));
      low_ <<= 8;
      range_ <<= 8;
    }
  }
  std::vector<std::uint8_t>& out_;
  std::uint32_t low_ = 0, range_ = 0xFFFFFFFFu;
};

class RangeDecoder {
 public:
  RangeDecoder(const std::uint8_t* data, std::size_t size) : p_(data), end_(data + size) {
    for (int i = 0; i < 4; ++i) code_ = (code_ << 8) | next();
  }
  /// The cumulative frequency the next symbol's interval contains (then call consume).
  std::uint32_t target(std::uint32_t total) {
    range_ /= total;
    const std::uint32_t v = (code_ - low_) / range_;
    PACKKV_REQUIRE(v < total, "entropy-coded image: corrupt code stream");
    return v;
  }
  void consume(std::uint32_t cum, std::uint32_t freq) {
    low_ += cum * range_;
    range_ *= freq;
    while ((low_ ^ (low_ + range_)) < kTop || (range_ < kBottom && ((range_ = (0u - low_) & (kBottom - 1u)), true))) {
      code_ = (code_ << 8) | next();
      low_ <<= 8;
      range_ <<= 8;
    }
  }
  /// Bytes read past the stream's end (zeros were read instead; a valid stream reads none).
  std::size_t overrun() const { return overrun_; }

 private:
  std::uint32_t next() {
    if (p_ < end_) return *p_++;
    ++overrun_;
    return 0;
  }
  const std::uint8_t* p_;
  const std::uint8_t* end_;
  std::uint32_t low_ = 0, range_ = 0xFFFFFFFFu, code_ = 0;
  std::size_t overrun_ = 0;
};

/// Adaptive frequencies over `levels` symbols: every symbol starts at 1, a coded one gains
/// kIncrement, and all are halved before the total would pass the coder's limit.
class AdaptiveModel {
 public:
  static constexpr std::uint32_t kIncrement = 24;
  void reset(int levels) {
    freq_.assign(static_cast<std::size_t>(levels), 1);
    total_ = static_cast<std::uint32_t>(levels);
  }
  void encode(RangeEncoder& coder, std::uint32_t symbol) {
    std::uint32_t cum = 0;
    for (std::uint32_t s = 0; s < symbol; ++s) cum += freq_[s];
    coder.encode(cum, freq_[symbol], total_);
    update(symbol);
  }
  std::uint32_t decode(RangeDecoder& coder) {
    const std::uint32_t target = coder.target(total_);
    std::uint32_t symbol = 0, cum = 0;
    while (cum + freq_[symbol] <= target) cum += freq_[symbol++];  // target < total: ends in range
    coder.consume(cum, freq_[symbol]);
    update(symbol);
    return symbol;
  }

 private:
  void update(std::uint32_t symbol) {
    freq_[symbol] = static_cast<std::uint16_t>(freq_[symbol] + kIncrement);
    total_ += kIncrement;
    if (total_ > kBottom - kIncrement) {
      total_ = 0;
      for (std::uint16_t& f : freq_) {
        f = static_cast<std::uint16_t>((f + 1) / 2);
        total_ += f;
      }
    }
  }
  std::vector<std::uint16_t> freq_;
  std::uint32_t total_ = 0;
};

// ---- what the image header says ---------------------------------------------------------------

struct ImageShape {
  CodecParams codec;  ///< the shape; the code ranges of version 1 (one for every layer)
  bool uniform;       ///< version 1
  QuantMode k_mode;
  std::uint8_t options;
  std::uint8_t dtype;
  std::size_t value_bytes;
  int layer_count;
};

/// The codec an image header describes, its fields checked before any geometry is derived.
ImageShape image_shape(const ImageHeader& h, const char* what) {
  auto bad = [&](const std::string& why) { return error(fmt::format("{}: {}", what, why)); };
  if (std::memcmp(h.magic, format::kImageMagic, sizeof h.magic) != 0) throw bad("not a packkv sequence image (bad magic)");
  if (h.version < format::kImageVersionUniform || h.version > format::kImageVersion) {
    throw bad(fmt::format("image version {} is not supported", h.version));
  }
  if (h.head_dim < 8 || h.head_dim > 256 || h.head_dim % 8 != 0) throw bad(fmt::format("head_dim {} is invalid", h.head_dim));
  if (h.block_tokens < 16 || h.block_tokens > 256 || h.block_tokens % 16 != 0) {
    throw bad(fmt::format("block_tokens {} is invalid", h.block_tokens));
  }
  if (h.num_kv_heads < 1) throw bad("no KV heads");
  if (h.k_mode > 1 || h.permuted > 1 || h.dtype > 2) throw bad("invalid k_mode, permuted or dtype");
  if ((h.options & ~format::kImageOptionsKnown) != 0) throw bad(fmt::format("options byte {} has unknown bits", h.options));
  const bool uniform = h.version == format::kImageVersionUniform;
  if (uniform) {
    for (const auto& [max_code, bits] : {std::pair<int, int>{h.k_max_code, h.k_bits}, std::pair<int, int>{h.v_max_code, h.v_bits}}) {
      if (max_code < 1 || bits != bits_for_max_code(max_code)) throw bad(fmt::format("code range {} with {} bits is invalid", max_code, bits));
    }
  } else if (h.k_max_code != 0 || h.v_max_code != 0 || h.k_bits != 0 || h.v_bits != 0) {
    throw bad(fmt::format("a version {} header's code ranges must be zero (they are in the layer records)", h.version));
  }
  ImageShape s{};
  s.uniform = uniform;
  s.codec.geometry.block_tokens = h.block_tokens;
  s.codec.geometry.head_dim = h.head_dim;
  s.codec.geometry.num_heads = h.num_kv_heads;
  // Versions 2 and 3: the widest codes, so that the shape's sizes bound every layer's (layer_codec).
  s.codec.geometry.k_bits = uniform ? h.k_bits : 8;
  s.codec.geometry.v_bits = uniform ? h.v_bits : 8;
  s.codec.geometry.permuted = h.permuted != 0;
  s.codec.geometry.k_per_channel = h.k_mode == static_cast<std::uint8_t>(QuantMode::per_channel);
  s.codec.geometry.compact_params = (h.options & format::kImageCompactParams) != 0;
  s.codec.k_max_code = uniform ? h.k_max_code : 255;
  s.codec.v_max_code = uniform ? h.v_max_code : 255;
  s.codec.repack = h.permuted ? RepackMethod::median : RepackMethod::none;
  s.k_mode = static_cast<QuantMode>(h.k_mode);
  s.options = h.options;
  s.dtype = h.dtype;
  s.value_bytes = h.dtype == format::kDtypeFloat ? 4 : 2;
  s.layer_count = h.layer_count;
  return s;
}

/// The codec of one layer: the header's code ranges (version 1) or its record's (version 2).
CodecParams layer_codec(const ImageShape& s, const LayerRecord& record, const char* what) {
  if (s.uniform) {
    if (record.k_max_code != 0 || record.v_max_code != 0) {
      throw error(fmt::format("{}: layer {}: a version 1 layer record's code fields must be zero", what, record.layer));
    }
    return s.codec;
  }
  if (record.k_max_code < 1 || record.v_max_code < 1) {
    throw error(fmt::format("{}: layer {} records code ranges K {} V {}; both must be at least 1", what, record.layer,
                            record.k_max_code, record.v_max_code));
  }
  return detail::codec_with_codes(s.codec, record.k_max_code, record.v_max_code);
}

/// The models of the layer being coded: codes per (head, side, channel); parameter bytes per
/// (head, side, byte of the (step, min) pair: fp16 high bytes, sign and exponent, are far from
/// uniform; low bytes nearly are). A layer starts from fresh models, made only when it has blocks,
/// so what a header claims costs memory only once the bytes behind it are there.
class Models {
 public:
  explicit Models(const ImageShape& s) : heads_(s.codec.geometry.num_heads), dim_(s.codec.geometry.head_dim) {}
  /// Fresh models for a layer of this codec (its code ranges set the alphabets).
  void start_layer(const CodecParams& codec) {
    const int levels[2] = {codec.code_limit(Side::k) + 1, codec.code_limit(Side::v) + 1};
    models_.resize(static_cast<std::size_t>(heads_) * 2 * dim_);
    for (std::size_t i = 0; i < models_.size(); ++i) models_[i].reset(levels[(i / dim_) % 2]);
    param_models_.resize(static_cast<std::size_t>(heads_) * 2 * sizeof(QuantParams));
    for (AdaptiveModel& m : param_models_) m.reset(256);
  }
  AdaptiveModel& at(int head, Side side, int channel) {
    return models_[(static_cast<std::size_t>(head) * 2 + (side == Side::k ? 0 : 1)) * dim_ + channel];
  }
  AdaptiveModel& param_byte(int head, Side side, int byte) {
    return param_models_[(static_cast<std::size_t>(head) * 2 + (side == Side::k ? 0 : 1)) * sizeof(QuantParams) + byte];
  }

 private:
  int heads_, dim_;
  std::vector<AdaptiveModel> models_, param_models_;
};

/// Bounded reads from the skeleton.
class SkeletonReader {
 public:
  explicit SkeletonReader(std::span<const std::uint8_t> bytes) : bytes_(bytes) {}
  const std::uint8_t* take(std::size_t n, const char* what) {
    PACKKV_REQUIRE(n <= bytes_.size() - at_,
                   fmt::format("entropy-coded image: truncated skeleton (reading {}: {} bytes, {} left)", what, n,
                               bytes_.size() - at_));
    const std::uint8_t* p = bytes_.data() + at_;
    at_ += n;
    return p;
  }
  std::size_t remaining() const { return bytes_.size() - at_; }

 private:
  std::span<const std::uint8_t> bytes_;
  std::size_t at_ = 0;
};

void append(std::vector<std::uint8_t>& out, const void* p, std::size_t n) {
  const auto* b = static_cast<const std::uint8_t*>(p);
  out.insert(out.end(), b, b + n);
}

constexpr Side kSides[2] = {Side::k, Side::v};

}  // namespace

bool is_entropy_coded_image(std::span<const std::uint8_t> bytes) {
  return bytes.size() >= sizeof kCodedMagic && std::memcmp(bytes.data(), kCodedMagic, sizeof kCodedMagic) == 0;
}

std::vector<std::uint8_t> encode_image_entropy(std::span<const std::uint8_t> image) {
  PACKKV_REQUIRE(image.size() >= sizeof(ImageHeader),
                 fmt::format("entropy coding: image of {} bytes is shorter than its 48-byte header", image.size()));
  ImageHeader h;
  std::memcpy(&h, image.data(), sizeof h);
  const ImageShape shape = image_shape(h, "entropy coding");
  // The full check of an import (checksums, counts, every block), against the header's own codec.
  const std::vector<detail::ParsedLayer> layers =
      detail::parse_image(image, shape.codec, {}, shape.k_mode, shape.options, shape.dtype, shape.value_bytes,
                          format::kMaxImageLayers, std::numeric_limits<int>::max());
  const format::BlockGeometry& shape_g = shape.codec.geometry;
  const int tokens = shape_g.block_tokens, dim = shape_g.head_dim;
  const std::size_t row_bytes = static_cast<std::size_t>(shape_g.num_heads) * dim * shape.value_bytes;

  std::vector<std::uint8_t> skeleton, stream;
  skeleton.reserve(image.size() / 4);
  append(skeleton, image.data(), sizeof h);
  RangeEncoder coder(stream);
  Models models(shape);
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(tokens) * dim), rebuilt(shape_g.max_block_bytes());
  std::vector<std::uint8_t> identity(static_cast<std::size_t>(tokens));
  std::iota(identity.begin(), identity.end(), std::uint8_t{0});
  std::uint8_t values[format::kPackTokens];
  for (std::size_t li = 0; li < layers.size(); ++li) {
    const detail::ParsedLayer& layer = layers[li];
    const format::BlockGeometry& g = layer.codec.geometry;
    LayerRecord record = detail::make_layer_record(layer.codec, layer.layer, static_cast<int>(layer.blocks.size()),
                                                   layer.tail_tokens, layer.length, layer.sink_tokens);
    if (shape.uniform) record.k_max_code = record.v_max_code = 0;
    append(skeleton, &record, sizeof record);
    for (const auto& block : layer.blocks) {
      const auto size = static_cast<std::uint32_t>(block.size());
      append(skeleton, &size, 4);
    }
    if (!layer.blocks.empty()) models.start_layer(layer.codec);
    for (std::size_t b = 0; b < layer.blocks.size(); ++b) {
      const std::uint8_t* block = layer.blocks[b].data();
      const std::uint32_t size = static_cast<std::uint32_t>(layer.blocks[b].size());
      append(skeleton, block, g.sections_offset());
      std::memcpy(rebuilt.data(), block, g.sections_offset());
      std::uint32_t offset = g.sections_offset();
      BlockBytes parts;
      for (int head = 0; head < g.num_heads; ++head) {
        for (Side side : kSides) {
          const SectionLayout layout = g.layout(side);
          const std::uint8_t* section = format::section(block, g, head, side);
          for (std::uint32_t i = 0; i < layout.round_end_offset; ++i) {  // the parameters, byte by byte
            models.param_byte(head, side, static_cast<int>(i % sizeof(QuantParams))).encode(coder, section[i]);
          }
          for (std::uint32_t r = 0; r < layout.rounds; ++r) {
            format::for_each_pack(section, layout, r, [&](std::uint32_t c, const std::uint8_t* pack, std::uint32_t width,
                                                          std::uint32_t min) {
              format::unpack16(pack, width, values);
              AdaptiveModel& model = models.at(head, side, static_cast<int>(c));
              for (int i = 0; i < format::kPackTokens; ++i) {
                const std::uint32_t code = values[i] + min;
                PACKKV_REQUIRE(code <= static_cast<std::uint32_t>(layer.codec.code_limit(side)),
                               fmt::format("entropy coding: layer {} block {} holds code {} above the image's largest, {}",
                                           layer.layer, b, code, layer.codec.code_limit(side)));
                codes[(r * format::kPackTokens + static_cast<std::size_t>(i)) * dim + c] = static_cast<std::uint8_t>(code);
                model.encode(coder, code);
              }
            });
          }
          offset += detail::write_section(layout, codes.data(), section, !g.per_channel(side), identity.data(),
                                          rebuilt.data() + offset, parts);
        }
      }
      // Everything after the sections (the trailing slack) is kept as it is.
      PACKKV_REQUIRE(offset <= size && std::memcmp(rebuilt.data(), block, offset) == 0,
                     fmt::format("entropy coding: layer {} block {} does not rebuild from its codes (its sections are "
                                 "not in the encoder's order)",
                                 layer.layer, b));
      append(skeleton, block + offset, size - offset);
    }
    const std::size_t tail_bytes = static_cast<std::size_t>(layer.tail_tokens) * row_bytes;
    append(skeleton, layer.tail_k, tail_bytes);
    append(skeleton, layer.tail_v, tail_bytes);
    const std::size_t sink_bytes = static_cast<std::size_t>(layer.sink_tokens) * row_bytes;
    append(skeleton, layer.sink_k, sink_bytes);
    append(skeleton, layer.sink_v, sink_bytes);
  }
  coder.finish();

  CodedHeader ch{};
  std::memcpy(ch.magic, kCodedMagic, sizeof ch.magic);
  ch.version = kCodedVersion;
  ch.header_bytes = sizeof ch;
  ch.image_bytes = image.size();
  ch.skeleton_bytes = skeleton.size();
  ch.stream_bytes = stream.size();
  ch.image_crc = detail::crc32c(image.data(), image.size());
  ch.body_crc = detail::crc32c(stream.data(), stream.size(), detail::crc32c(skeleton.data(), skeleton.size()));
  ch.header_crc = detail::crc32c(reinterpret_cast<const std::uint8_t*>(&ch), offsetof(CodedHeader, header_crc));
  std::vector<std::uint8_t> out(sizeof ch + skeleton.size() + stream.size());
  std::memcpy(out.data(), &ch, sizeof ch);
  std::memcpy(out.data() + sizeof ch, skeleton.data(), skeleton.size());
  if (!stream.empty()) std::memcpy(out.data() + sizeof ch + skeleton.size(), stream.data(), stream.size());
  return out;
}

std::vector<std::uint8_t> decode_image_entropy(std::span<const std::uint8_t> coded) {
  PACKKV_REQUIRE(coded.size() >= sizeof(CodedHeader),
                 fmt::format("entropy-coded image of {} bytes is shorter than its 56-byte header", coded.size()));
  CodedHeader ch;
  std::memcpy(&ch, coded.data(), sizeof ch);
  PACKKV_REQUIRE(is_entropy_coded_image(coded), "not an entropy-coded packkv image (bad magic)");
  PACKKV_REQUIRE(detail::crc32c(coded.data(), offsetof(CodedHeader, header_crc)) == ch.header_crc,
                 "entropy-coded image: header checksum mismatch (corrupt header)");
  PACKKV_REQUIRE(ch.version == kCodedVersion,
                 fmt::format("entropy-coded image version {} is not supported (this build reads {})", ch.version,
                             kCodedVersion));
  PACKKV_REQUIRE(ch.header_bytes == sizeof ch && ch.reserved == 0, "entropy-coded image: invalid header fields");
  const std::size_t body = coded.size() - sizeof ch;
  PACKKV_REQUIRE(ch.skeleton_bytes <= body && ch.stream_bytes == body - ch.skeleton_bytes,
                 fmt::format("entropy-coded image: body should be {} + {} bytes, {} were given (truncated?)",
                             ch.skeleton_bytes, ch.stream_bytes, body));
  const std::span<const std::uint8_t> skeleton = coded.subspan(sizeof ch, ch.skeleton_bytes);
  const std::span<const std::uint8_t> stream = coded.subspan(sizeof ch + ch.skeleton_bytes);
  PACKKV_REQUIRE(detail::crc32c(stream.data(), stream.size(), detail::crc32c(skeleton.data(), skeleton.size())) == ch.body_crc,
                 "entropy-coded image: body checksum mismatch (corrupt data)");
  // Codes can be coded in far less than a bit each, so the stream alone does not bound what it
  // decodes to: the recorded original size does, checked against what a coded image can be (images
  // code to 3/4 of their size or more; 256 times is beyond any) and before every block grows the
  // decoded image.
  PACKKV_REQUIRE(ch.image_bytes >= sizeof(ImageHeader) && ch.image_bytes / 256 <= coded.size(),
                 fmt::format("entropy-coded image: implausible original size {} for {} coded bytes", ch.image_bytes,
                             coded.size()));

  SkeletonReader in(skeleton);
  ImageHeader h;
  std::memcpy(&h, in.take(sizeof h, "the image header"), sizeof h);
  const ImageShape shape = image_shape(h, "entropy-coded image");
  const format::BlockGeometry& shape_g = shape.codec.geometry;
  const int tokens = shape_g.block_tokens, dim = shape_g.head_dim;
  const std::size_t row_bytes = static_cast<std::size_t>(shape_g.num_heads) * dim * shape.value_bytes;

  std::vector<std::uint8_t> image(sizeof h);
  std::memcpy(image.data(), &h, sizeof h);
  image.reserve(static_cast<std::size_t>(std::min<std::uint64_t>(ch.image_bytes, 4 * coded.size())));
  auto fits = [&](std::size_t more, const char* what) {
    PACKKV_REQUIRE(more <= ch.image_bytes - std::min<std::uint64_t>(ch.image_bytes, image.size()),
                   fmt::format("entropy-coded image: {} would make the image larger than its recorded {} bytes", what,
                               ch.image_bytes));
  };
  RangeDecoder coder(stream.data(), stream.size());
  Models models(shape);
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(tokens) * dim), identity(static_cast<std::size_t>(tokens));
  std::iota(identity.begin(), identity.end(), std::uint8_t{0});
  std::vector<std::uint8_t> params(std::max(shape_g.k_layout().round_end_offset, shape_g.v_layout().round_end_offset));
  std::vector<std::uint8_t> scratch(std::max(shape_g.k_layout().max_section_bytes(), shape_g.v_layout().max_section_bytes()));
  for (int li = 0; li < shape.layer_count; ++li) {
    LayerRecord record;
    std::memcpy(&record, in.take(sizeof record, "a layer record"), sizeof record);
    fits(sizeof record, "a layer record");
    append(image, &record, sizeof record);
    const CodecParams codec = layer_codec(shape, record, "entropy-coded image");
    const format::BlockGeometry& g = codec.geometry;
    const std::uint32_t min_block = g.min_block_bytes(), max_block = g.max_block_bytes();
    PACKKV_REQUIRE(record.block_count <= in.remaining() / 4,
                   fmt::format("entropy-coded image: layer {} claims {} blocks", record.layer, record.block_count));
    const std::uint8_t* sizes = in.take(4ull * record.block_count, "a block size table");
    fits(4ull * record.block_count, "a block size table");
    append(image, sizes, 4ull * record.block_count);
    if (record.block_count > 0) {
      // The first block's prefix (at least 8 bytes per head) must be there before the models are.
      PACKKV_REQUIRE(g.sections_offset() <= in.remaining(),
                     fmt::format("entropy-coded image: truncated skeleton in layer {}", record.layer));
      models.start_layer(codec);
    }
    for (std::uint32_t b = 0; b < record.block_count; ++b) {
      std::uint32_t size;
      std::memcpy(&size, sizes + 4ull * b, 4);
      PACKKV_REQUIRE(size >= min_block && size <= max_block,
                     fmt::format("entropy-coded image: layer {} block {} has impossible size {}", record.layer, b, size));
      fits(size, "a block");
      const std::size_t block_at = image.size();
      image.resize(block_at + size);
      std::memcpy(image.data() + block_at, in.take(g.sections_offset(), "a block prefix"), g.sections_offset());
      std::uint32_t offset = g.sections_offset();
      BlockBytes parts;
      for (int head = 0; head < g.num_heads; ++head) {
        for (Side side : kSides) {
          const SectionLayout layout = g.layout(side);
          for (std::uint32_t i = 0; i < layout.round_end_offset; ++i) {
            params[i] = static_cast<std::uint8_t>(
                models.param_byte(head, side, static_cast<int>(i % sizeof(QuantParams))).decode(coder));
          }
          for (std::uint32_t r = 0; r < layout.rounds; ++r) {
            for (int c = 0; c < dim; ++c) {
              AdaptiveModel& model = models.at(head, side, c);
              for (int i = 0; i < format::kPackTokens; ++i) {
                codes[(r * format::kPackTokens + static_cast<std::size_t>(i)) * dim + static_cast<std::size_t>(c)] =
                    static_cast<std::uint8_t>(model.decode(coder));
              }
            }
          }
          // A section is at most max_section_bytes: written to scratch, then checked against the block.
          const std::uint32_t bytes = detail::write_section(layout, codes.data(), params.data(), !g.per_channel(side),
                                                            identity.data(), scratch.data(), parts);
          PACKKV_REQUIRE(offset + bytes <= size,
                         fmt::format("entropy-coded image: layer {} block {}: its sections overrun the block", record.layer, b));
          std::memcpy(image.data() + block_at + offset, scratch.data(), bytes);
          offset += bytes;
        }
      }
      std::memcpy(image.data() + block_at + offset, in.take(size - offset, "a block's trailing bytes"), size - offset);
    }
    PACKKV_REQUIRE(record.tail_tokens <= in.remaining() / (2 * row_bytes),
                   fmt::format("entropy-coded image: layer {} claims {} tail tokens", record.layer, record.tail_tokens));
    const std::size_t tail_bytes = static_cast<std::size_t>(record.tail_tokens) * row_bytes;
    const std::uint8_t* tails = in.take(2 * tail_bytes, "the tails");
    fits(2 * tail_bytes, "the tails");
    append(image, tails, 2 * tail_bytes);
    // Exact sink rows (version 3), bounded by the block size, copied as they are.
    PACKKV_REQUIRE(record.sink_tokens <= tokens,
                   fmt::format("entropy-coded image: layer {} claims {} sink rows", record.layer, record.sink_tokens));
    const std::size_t sink_bytes = static_cast<std::size_t>(record.sink_tokens) * row_bytes;
    const std::uint8_t* sinks = in.take(2 * sink_bytes, "the sink rows");
    fits(2 * sink_bytes, "the sink rows");
    append(image, sinks, 2 * sink_bytes);
  }
  PACKKV_REQUIRE(in.remaining() == 0 && coder.overrun() <= 4,
                 "entropy-coded image: the skeleton and the code stream do not end together (corrupt data)");
  PACKKV_REQUIRE(image.size() == ch.image_bytes && detail::crc32c(image.data(), image.size()) == ch.image_crc,
                 "entropy-coded image: the decoded image does not match its checksum (corrupt data)");
  return image;
}

}  // namespace packkv

#include "core/image_io.hpp"

#include <array>
#include <cstddef>
#include <cstring>
#include <string>

#include <fmt/format.h>

#include "packkv/error.hpp"

#if defined(__x86_64__)
#include <cpuid.h>
#include <nmmintrin.h>
#endif

namespace packkv::detail {

namespace {

constexpr std::array<std::uint32_t, 256> make_crc_table() {
  std::array<std::uint32_t, 256> table{};
  for (std::uint32_t i = 0; i < 256; ++i) {
    std::uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;  // reflected Castagnoli
    table[i] = c;
  }
  return table;
}
constexpr std::array<std::uint32_t, 256> kCrcTable = make_crc_table();

const char* dtype_name(std::uint8_t code) {
  switch (code) {
    case 0: return "float";
    case 1: return "fp16";
    case 2: return "bf16";
    default: return "unknown";
  }
}

// Bounds-checked reader over hostile bytes.
class Reader {
 public:
  Reader(std::span<const std::uint8_t> bytes, std::size_t at) : bytes_(bytes), at_(at) {}
  std::size_t remaining() const { return bytes_.size() - at_; }
  const std::uint8_t* take(std::size_t n, const char* what) {
    PACKKV_REQUIRE(n <= remaining(), fmt::format("import: image is truncated: {} needs {} bytes, {} remain", what,
                                                 n, remaining()));
    const std::uint8_t* p = bytes_.data() + at_;
    at_ += n;
    return p;
  }
  template <class Pod>
  Pod read(const char* what) {
    Pod value;
    std::memcpy(&value, take(sizeof value, what), sizeof value);
    return value;
  }

 private:
  std::span<const std::uint8_t> bytes_;
  std::size_t at_;
};

#if defined(__x86_64__)
// The SSE4.2 instruction, chosen at run time (every build carries it, only capable CPUs run it).
__attribute__((target("sse4.2"))) std::uint32_t crc32c_sse42(const std::uint8_t* data, std::size_t n,
                                                              std::uint32_t crc) {
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    std::uint64_t word;
    std::memcpy(&word, data + i, 8);
    crc = static_cast<std::uint32_t>(_mm_crc32_u64(crc, word));
  }
  for (; i < n; ++i) crc = _mm_crc32_u8(crc, data[i]);
  return crc;
}

bool has_sse42() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 20));
}
#endif

}  // namespace

std::uint32_t crc32c(const std::uint8_t* data, std::size_t n, std::uint32_t crc) {
  crc = ~crc;
#if defined(__x86_64__)
  static const bool sse42 = has_sse42();
  if (sse42) return ~crc32c_sse42(data, n, crc);
#endif
  for (std::size_t i = 0; i < n; ++i) crc = kCrcTable[(crc ^ data[i]) & 0xFFu] ^ (crc >> 8);
  return ~crc;
}

format::ImageHeader make_image_header(const CodecParams& codec, QuantMode k_mode, std::uint8_t options,
                                      std::uint8_t dtype) {
  format::ImageHeader h{};
  std::memcpy(h.magic, format::kImageMagic, sizeof h.magic);
  h.version = format::kImageVersion;
  h.header_bytes = sizeof(format::ImageHeader);
  h.dtype = dtype;
  h.k_mode = static_cast<std::uint8_t>(k_mode);
  h.options = options;
  h.permuted = codec.geometry.permuted ? 1 : 0;
  // Code ranges are per layer, in the layer records (make_layer_record).
  h.num_kv_heads = static_cast<std::uint16_t>(codec.geometry.num_heads);
  h.head_dim = static_cast<std::uint16_t>(codec.geometry.head_dim);
  h.block_tokens = static_cast<std::uint16_t>(codec.geometry.block_tokens);
  return h;
}

format::LayerRecord make_layer_record(const CodecParams& codec, int layer, int block_count, int tail_tokens,
                                      std::int64_t length, int sink_tokens) {
  format::LayerRecord r{};
  r.layer = static_cast<std::uint32_t>(layer);
  r.block_count = static_cast<std::uint32_t>(block_count);
  r.tail_tokens = static_cast<std::uint32_t>(tail_tokens);
  r.k_max_code = static_cast<std::uint8_t>(codec.k_max_code);
  r.v_max_code = static_cast<std::uint8_t>(codec.v_max_code);
  r.sink_tokens = static_cast<std::uint16_t>(sink_tokens);
  r.length = static_cast<std::uint64_t>(length);
  return r;
}

CodecParams codec_with_codes(const CodecParams& shape, int k_max_code, int v_max_code) {
  CodecParams c = shape;
  c.k_max_code = k_max_code;
  c.v_max_code = v_max_code;
  c.geometry.k_bits = bits_for_max_code(k_max_code);
  c.geometry.v_bits = bits_for_max_code(v_max_code);
  return c;
}

void seal_image(std::vector<std::uint8_t>& image) {
  format::ImageHeader h;
  std::memcpy(&h, image.data(), sizeof h);
  h.body_bytes = image.size() - sizeof h;
  h.body_crc = crc32c(image.data() + sizeof h, image.size() - sizeof h);
  std::memcpy(image.data(), &h, sizeof h);
  h.header_crc = crc32c(image.data(), offsetof(format::ImageHeader, header_crc));
  std::memcpy(image.data(), &h, sizeof h);
}

std::vector<ParsedLayer> parse_image(std::span<const std::uint8_t> image, const CodecParams& codec,
                                     std::span<const CodecParams> layer_codecs, QuantMode k_mode, std::uint8_t options,
                                     std::uint8_t dtype, std::size_t value_bytes, int num_layers, int max_tail_tokens) {
  using format::ImageHeader;
  using format::LayerRecord;
  PACKKV_REQUIRE(image.size() >= sizeof(ImageHeader),
                 fmt::format("import: image of {} bytes is shorter than its 48-byte header", image.size()));
  ImageHeader h;
  std::memcpy(&h, image.data(), sizeof h);
  PACKKV_REQUIRE(std::memcmp(h.magic, format::kImageMagic, sizeof h.magic) == 0,
                 "import: not a packkv sequence image (bad magic)");
  PACKKV_REQUIRE(crc32c(image.data(), offsetof(format::ImageHeader, header_crc)) == h.header_crc,
                 "import: image header checksum mismatch (corrupt header)");
  PACKKV_REQUIRE(h.version >= format::kImageVersionUniform && h.version <= format::kImageVersion,
                 fmt::format("import: image version {} is not supported (this build reads {} to {})", h.version,
                             format::kImageVersionUniform, format::kImageVersion));
  const bool uniform = h.version == format::kImageVersionUniform;
  PACKKV_REQUIRE(h.header_bytes == sizeof(ImageHeader),
                 fmt::format("import: header size {} should be {}", h.header_bytes, sizeof(ImageHeader)));
  PACKKV_REQUIRE(h.body_bytes == image.size() - sizeof h,
                 fmt::format("import: image body should be {} bytes, {} were given (truncated?)", h.body_bytes,
                             image.size() - sizeof h));
  PACKKV_REQUIRE(crc32c(image.data() + sizeof h, image.size() - sizeof h) == h.body_crc,
                 "import: image body checksum mismatch (corrupt data)");

  PACKKV_REQUIRE((h.options & ~format::kImageOptionsKnown) == 0,
                 fmt::format("import: the options byte is {}: only bits 0 to 2 may be set", h.options));
  const ImageHeader want = make_image_header(codec, k_mode, options, dtype);
  const unsigned rotation = h.options & 3u, want_rotation = want.options & 3u;
  PACKKV_REQUIRE(rotation == want_rotation,
                 fmt::format("import: image rotation (K {}, V {}) does not match this cache's rotate_k / rotate_v ({}, {})",
                             rotation & 1, rotation >> 1, want_rotation & 1, want_rotation >> 1));
  const bool compact = (h.options & format::kImageCompactParams) != 0;
  PACKKV_REQUIRE(compact == ((want.options & format::kImageCompactParams) != 0),
                 fmt::format("import: the image's blocks store {} parameters, this cache {} ones (compact_params)",
                             compact ? "compact" : "fp16", compact ? "fp16" : "compact"));
  PACKKV_REQUIRE(h.dtype == want.dtype, fmt::format("import: image holds {} values, this cache holds {}",
                                                    dtype_name(h.dtype), dtype_name(want.dtype)));
  PACKKV_REQUIRE(h.num_kv_heads == want.num_kv_heads && h.head_dim == want.head_dim &&
                     h.block_tokens == want.block_tokens,
                 fmt::format("import: image shape (kv_heads {}, head_dim {}, block {}) does not match this cache "
                             "({}, {}, {})",
                             h.num_kv_heads, h.head_dim, h.block_tokens, want.num_kv_heads, want.head_dim,
                             want.block_tokens));
  PACKKV_REQUIRE(h.k_mode == want.k_mode && h.permuted == want.permuted,
                 fmt::format("import: image k_mode {} / permuted {} do not match this cache ({} / {})", h.k_mode,
                             h.permuted, want.k_mode, want.permuted));
  if (uniform) {
    PACKKV_REQUIRE(h.k_max_code >= 1 && h.v_max_code >= 1 && h.k_bits == bits_for_max_code(h.k_max_code) &&
                       h.v_bits == bits_for_max_code(h.v_max_code),
                   fmt::format("import: version 1 image code ranges (K {} in {} bits, V {} in {} bits) are invalid",
                               h.k_max_code, h.k_bits, h.v_max_code, h.v_bits));
  } else {
    PACKKV_REQUIRE(h.k_max_code == 0 && h.v_max_code == 0 && h.k_bits == 0 && h.v_bits == 0,
                   fmt::format("import: a version {} image keeps its code ranges in the layer records; the header's "
                               "must be zero", h.version));
  }
  PACKKV_REQUIRE(h.layer_count >= 1 && h.layer_count <= num_layers,
                 fmt::format("import: image has {} layers, this cache {}", h.layer_count, num_layers));

  const std::size_t row_bytes = static_cast<std::size_t>(h.num_kv_heads) * h.head_dim * value_bytes;
  std::vector<bool> seen(static_cast<std::size_t>(num_layers), false);
  std::vector<ParsedLayer> layers;
  Reader in(image, sizeof h);
  for (int i = 0; i < h.layer_count; ++i) {
    const auto record = in.read<LayerRecord>("a layer record");
    PACKKV_REQUIRE(record.layer < static_cast<std::uint32_t>(num_layers) && !seen[record.layer],
                   fmt::format("import: layer index {} is out of range or repeated", record.layer));
    seen[record.layer] = true;
    if (h.version < format::kImageVersion) {
      PACKKV_REQUIRE(record.sink_tokens == 0,
                     fmt::format("import: layer {}: a version {} layer record's reserved field is not zero", record.layer,
                                 h.version));
    }
    PACKKV_REQUIRE(record.sink_tokens == 0 || (record.block_count > 0 && record.sink_tokens <= h.block_tokens),
                   fmt::format("import: layer {} has {} sink rows; only a layer with blocks has any, at most block_tokens "
                               "({})",
                               record.layer, record.sink_tokens, h.block_tokens));
    if (uniform) {
      PACKKV_REQUIRE(record.k_max_code == 0 && record.v_max_code == 0,
                     fmt::format("import: layer {}: a version 1 layer record's code fields must be zero", record.layer));
    } else {
      PACKKV_REQUIRE(record.k_max_code >= 1 && record.v_max_code >= 1,
                     fmt::format("import: layer {} records code ranges K {} V {}; both must be at least 1",
                                 record.layer, record.k_max_code, record.v_max_code));
    }
    const CodecParams layer_codec = uniform ? codec_with_codes(codec, h.k_max_code, h.v_max_code)
                                            : codec_with_codes(codec, record.k_max_code, record.v_max_code);
    if (!layer_codecs.empty()) {
      const CodecParams& mine = layer_codecs[record.layer];
      PACKKV_REQUIRE(layer_codec.k_max_code == mine.k_max_code && layer_codec.v_max_code == mine.v_max_code,
                     fmt::format("import: layer {} was stored with codes up to K {} V {}; this cache's layer {} stores "
                                 "codes up to K {} V {} (its k_rel / v_rel differ)",
                                 record.layer, layer_codec.k_max_code, layer_codec.v_max_code, record.layer,
                                 mine.k_max_code, mine.v_max_code));
    }
    const std::uint32_t min_block = layer_codec.geometry.min_block_bytes();
    const std::uint32_t max_block = layer_codec.geometry.max_block_bytes();
    // Counts must be affordable by the bytes present before anything is allocated from them.
    PACKKV_REQUIRE(record.block_count <= in.remaining() / (4 + static_cast<std::size_t>(min_block)),
                   fmt::format("import: layer {} claims {} blocks, more than the image can hold", record.layer,
                               record.block_count));
    PACKKV_REQUIRE(record.tail_tokens <= static_cast<std::uint32_t>(max_tail_tokens),
                   fmt::format("import: layer {} has {} tail tokens; at most {} are possible", record.layer,
                               record.tail_tokens, max_tail_tokens));
    PACKKV_REQUIRE(record.length == static_cast<std::uint64_t>(record.block_count) * h.block_tokens + record.tail_tokens,
                   fmt::format("import: layer {} length {} does not equal {} blocks x {} + {} tail tokens",
                               record.layer, record.length, record.block_count, h.block_tokens, record.tail_tokens));
    ParsedLayer layer;
    layer.codec = layer_codec;
    layer.layer = static_cast<int>(record.layer);
    layer.length = static_cast<std::int64_t>(record.length);
    layer.tail_tokens = static_cast<int>(record.tail_tokens);
    const std::uint8_t* sizes = in.take(4ull * record.block_count, "the block size table");
    layer.blocks.reserve(record.block_count);
    for (std::uint32_t b = 0; b < record.block_count; ++b) {
      std::uint32_t size;
      std::memcpy(&size, sizes + 4ull * b, 4);
      PACKKV_REQUIRE(size >= min_block && size <= max_block,
                     fmt::format("import: layer {} block {} has impossible size {} (must be in [{}, {}])",
                                 record.layer, b, size, min_block, max_block));
      const std::span<const std::uint8_t> block(in.take(size, "a block"), size);
      try {
        validate_block(layer_codec, block);
      } catch (const error& e) {
        throw error(fmt::format("import: layer {} block {}: {}", record.layer, b, e.message()));
      }
      layer.blocks.push_back(block);
    }
    const std::size_t tail_bytes = record.tail_tokens * row_bytes;
    layer.tail_k = in.take(tail_bytes, "tail K");
    layer.tail_v = in.take(tail_bytes, "tail V");
    const std::size_t sink_bytes = record.sink_tokens * row_bytes;
    layer.sink_tokens = record.sink_tokens;
    layer.sink_k = in.take(sink_bytes, "sink K");
    layer.sink_v = in.take(sink_bytes, "sink V");
    layers.push_back(std::move(layer));
  }
  PACKKV_REQUIRE(in.remaining() == 0, fmt::format("import: {} unexpected bytes after the last layer", in.remaining()));
  return layers;
}

}  // namespace packkv::detail

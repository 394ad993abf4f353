// The packed block format, version 1: the one normative definition (docs/format.md explains it).
//
// A block holds `block_tokens` consecutive tokens of one (sequence, layer) for every KV head:
//
//   [BlockHeader 16 B][directory: {u32 k_offset, u32 v_offset} per head, padded to 16 B]
//   [permutation: u8[num_heads][block_tokens], only if permuted]
//   per head: [K section][V section]          (each section 16-B aligned)
//   [16 B trailing slack, zero]               (lets decoders read 8 B past any pack)
//
// A section holds the codes of one head's K or V (block_tokens x head_dim, in packed token order):
//
//   params       {fp16 step, fp16 min} per token (per channel for per-channel K)     4 B each
//   round_start  u16 per 16-token round: payload offset of the round, padded to 4 B
//   descriptors  per (round, channel), round-major: (pack_min << 4) | width
//                1 byte when the codes have <= 4 bits, else u16 little-endian
//   payload      per round, per channel: 16 values (code - pack_min) of `width` bits,
//                a little-endian bit stream of 2*width bytes (value i at bits [i*w, i*w + w))
//   padding      to a multiple of 16 B
//
// Reconstruction: x = min + code * step (fp32), with per-token or per-channel (step, min).
// All multi-byte fields are little-endian. Everything here compiles for host and device.
#pragma once

#include <cstddef>
#include <cmath>
#include <cstdint>

#include "packkv/types.hpp"

namespace packkv::format {

inline constexpr std::uint8_t kVersion = 1;
inline constexpr int kPackTokens = 16;          ///< tokens per frame-of-reference pack
inline constexpr std::uint32_t kAlign = 16;     ///< alignment of sections and blocks
inline constexpr std::uint32_t kTrailingSlack = 16;
inline constexpr int kMaxCodeBits = 8;

enum BlockFlags : std::uint8_t {
  kFlagPermuted = 1u << 0,        ///< a token permutation is stored
  kFlagKPerChannel = 1u << 1,     ///< K params are per channel (KIVI-style), not per token
};

struct BlockHeader {
  std::uint32_t block_bytes;   ///< total size of the block, including the trailing slack
  std::uint16_t block_tokens;
  std::uint16_t head_dim;
  std::uint16_t num_heads;
  std::uint8_t version;        ///< kVersion
  std::uint8_t flags;          ///< BlockFlags
  std::uint8_t k_bits;         ///< code bits of K, 1..8
  std::uint8_t v_bits;         ///< code bits of V, 1..8
  std::uint16_t reserved;      ///< zero
};
static_assert(sizeof(BlockHeader) == 16, "BlockHeader is 16 bytes on every backend");

struct HeadEntry {
  std::uint32_t k_offset;  ///< K section offset from the block start
  std::uint32_t v_offset;  ///< V section offset from the block start
};
static_assert(sizeof(HeadEntry) == 8);

/// Quantization parameters of one token (or channel): x = min + code * step.
struct Params {
  fp16_t step;
  fp16_t min;
};
static_assert(sizeof(Params) == 4);

PACKKV_HOST_DEVICE constexpr std::uint32_t align_up(std::uint32_t n, std::uint32_t a) {
  return (n + a - 1) / a * a;
}

/// Bytes per pack descriptor for codes of `bits` bits.
PACKKV_HOST_DEVICE constexpr std::uint32_t descriptor_bytes(int bits) { return bits <= 4 ? 1u : 2u; }

/// Layout of a section, fixed by the geometry except for the payload size.
struct SectionLayout {
  std::uint32_t param_count;     ///< tokens (per-token) or channels (per-channel)
  std::uint32_t rounds;          ///< block_tokens / 16
  std::uint32_t head_dim;
  std::uint32_t desc_bytes;      ///< 1 or 2
  std::uint32_t round_start_offset;
  std::uint32_t desc_offset;
  std::uint32_t payload_offset;  ///< bytes before the payload
  std::uint32_t max_payload;     ///< payload size if every pack used `bits` bits

  PACKKV_HOST_DEVICE constexpr std::uint32_t section_bytes(std::uint32_t payload) const {
    return align_up(payload_offset + payload, kAlign);
  }
  PACKKV_HOST_DEVICE constexpr std::uint32_t max_section_bytes() const { return section_bytes(max_payload); }
};

PACKKV_HOST_DEVICE constexpr SectionLayout make_section_layout(int block_tokens, int head_dim, int bits,
                                                               bool per_channel) {
  SectionLayout s{};
  s.param_count = per_channel ? static_cast<std::uint32_t>(head_dim) : static_cast<std::uint32_t>(block_tokens);
  s.rounds = static_cast<std::uint32_t>(block_tokens / kPackTokens);
  s.head_dim = static_cast<std::uint32_t>(head_dim);
  s.desc_bytes = descriptor_bytes(bits);
  s.round_start_offset = s.param_count * sizeof(Params);
  s.desc_offset = s.round_start_offset + align_up(2u * s.rounds, 4u);
  s.payload_offset = s.desc_offset + s.rounds * s.head_dim * s.desc_bytes;
  s.max_payload = s.rounds * s.head_dim * 2u * static_cast<std::uint32_t>(bits);
  return s;
}

/// Everything about a block that the cache's config fixes.
struct BlockGeometry {
  int block_tokens;
  int head_dim;
  int num_heads;
  int k_bits;
  int v_bits;
  bool permuted;
  bool k_per_channel;

  PACKKV_HOST_DEVICE constexpr std::uint8_t flags() const {
    return static_cast<std::uint8_t>((permuted ? kFlagPermuted : 0) | (k_per_channel ? kFlagKPerChannel : 0));
  }
  PACKKV_HOST_DEVICE constexpr std::uint32_t directory_offset() const { return sizeof(BlockHeader); }
  PACKKV_HOST_DEVICE constexpr std::uint32_t permutation_offset() const {
    return directory_offset() + align_up(sizeof(HeadEntry) * static_cast<std::uint32_t>(num_heads), kAlign);
  }
  PACKKV_HOST_DEVICE constexpr std::uint32_t permutation_bytes() const {
    return permuted ? static_cast<std::uint32_t>(num_heads * block_tokens) : 0u;
  }
  /// Offset of head 0's K section: the end of the fixed block prefix.
  PACKKV_HOST_DEVICE constexpr std::uint32_t sections_offset() const {
    return permutation_offset() + align_up(permutation_bytes(), kAlign);
  }
  PACKKV_HOST_DEVICE constexpr SectionLayout k_layout() const {
    return make_section_layout(block_tokens, head_dim, k_bits, k_per_channel);
  }
  PACKKV_HOST_DEVICE constexpr SectionLayout v_layout() const {
    return make_section_layout(block_tokens, head_dim, v_bits, false);
  }
  /// Upper bound on a block's size (every pack at full width); the encoder's scratch size.
  PACKKV_HOST_DEVICE constexpr std::uint32_t max_block_bytes() const {
    return sections_offset() +
           static_cast<std::uint32_t>(num_heads) * (k_layout().max_section_bytes() + v_layout().max_section_bytes()) +
           kTrailingSlack;
  }
  /// Lower bound on a block's size (every pack of width 0).
  PACKKV_HOST_DEVICE constexpr std::uint32_t min_block_bytes() const {
    return sections_offset() +
           static_cast<std::uint32_t>(num_heads) * (k_layout().section_bytes(0) + v_layout().section_bytes(0)) +
           kTrailingSlack;
  }
};

/// Payload offset of round r of a section (its stored u16 round_start).
PACKKV_HOST_DEVICE std::uint32_t round_start(const std::uint8_t* section, const SectionLayout& layout,
                                             std::uint32_t r) {
  const std::uint8_t* p = section + layout.round_start_offset + 2 * r;
  return static_cast<std::uint32_t>(p[0]) | (static_cast<std::uint32_t>(p[1]) << 8);
}

// ---- Pack descriptors --------------------------------------------------------------------------

PACKKV_HOST_DEVICE constexpr std::uint32_t make_descriptor(std::uint32_t pack_min, std::uint32_t width) {
  return (pack_min << 4) | width;
}
PACKKV_HOST_DEVICE constexpr std::uint32_t descriptor_width(std::uint32_t d) { return d & 0xFu; }
PACKKV_HOST_DEVICE constexpr std::uint32_t descriptor_min(std::uint32_t d) { return d >> 4; }

PACKKV_HOST_DEVICE std::uint32_t load_descriptor(const std::uint8_t* descs, std::uint32_t index,
                                                 std::uint32_t desc_bytes) {
  if (desc_bytes == 1) return descs[index];
  return static_cast<std::uint32_t>(descs[2 * index]) | (static_cast<std::uint32_t>(descs[2 * index + 1]) << 8);
}

PACKKV_HOST_DEVICE void store_descriptor(std::uint8_t* descs, std::uint32_t index, std::uint32_t desc_bytes,
                                         std::uint32_t d) {
  if (desc_bytes == 1) {
    descs[index] = static_cast<std::uint8_t>(d);
  } else {
    descs[2 * index] = static_cast<std::uint8_t>(d & 0xFFu);
    descs[2 * index + 1] = static_cast<std::uint8_t>(d >> 8);
  }
}

/// Bits needed for values in [0, range]: 0 for a constant pack.
PACKKV_HOST_DEVICE constexpr std::uint32_t width_for_range(std::uint32_t range) {
  std::uint32_t w = 0;
  while (range >> w) ++w;
  return w;
}

// ---- Bit-packing of one 16-value pack (the scalar reference every fast path must match) -------

/// Writes 16 values of `width` bits as a little-endian bit stream of 2*width bytes.
PACKKV_HOST_DEVICE void pack16(const std::uint8_t* values, std::uint32_t width, std::uint8_t* out) {
  // Values 0..7 fill bytes [0, width) and values 8..15 fill bytes [width, 2*width) exactly.
  for (int half = 0; half < 2; ++half) {
    std::uint64_t bits = 0;
    for (int i = 0; i < 8; ++i) bits |= static_cast<std::uint64_t>(values[half * 8 + i]) << (i * width);
    for (std::uint32_t b = 0; b < width; ++b) out[half * width + b] = static_cast<std::uint8_t>(bits >> (8 * b));
  }
}

/// Reads 16 values of `width` bits written by pack16.
PACKKV_HOST_DEVICE void unpack16(const std::uint8_t* in, std::uint32_t width, std::uint8_t* values) {
  const std::uint32_t mask = (1u << width) - 1u;
  for (int half = 0; half < 2; ++half) {
    std::uint64_t bits = 0;
    for (std::uint32_t b = 0; b < width; ++b) bits |= static_cast<std::uint64_t>(in[half * width + b]) << (8 * b);
    for (int i = 0; i < 8; ++i) values[half * 8 + i] = static_cast<std::uint8_t>((bits >> (i * width)) & mask);
  }
}

// ---- Quantization (host and device compute the same bits) -------------------------------------

/// Quantization of one group (a token's or a channel's values) with codes in [0, max_code].
struct Quantizer {
  Params stored;     ///< what the block stores
  float min;         ///< to_float(stored.min)
  float inv_step;    ///< 1 / to_float(stored.step), or 0 when step is 0
  bool ok;           ///< false when the group's range does not fit fp16 parameters
};

/// The stored min is lo rounded down to fp16 and the stored step is (hi - min) / max_code rounded
/// up, so min + [0, max_code] * step covers [lo, hi]; step <= rel * (hi - lo + ulp(lo)) * (1 + 2^-10).
PACKKV_HOST_DEVICE Quantizer make_quantizer(float lo, float hi, int max_code) {
  Quantizer q{};
  q.ok = lo >= -kFp16Max && hi <= kFp16Max && lo <= hi;
  if (!q.ok) return q;
  q.stored.min = fp16_round_down(static_cast<double>(lo));
  q.min = to_float(q.stored.min);
  const double step = (static_cast<double>(hi) - static_cast<double>(q.min)) / static_cast<double>(max_code);
  if (step > static_cast<double>(kFp16Max)) {
    q.ok = false;
    return q;
  }
  q.stored.step = fp16_round_up(step);
  const float step_f = to_float(q.stored.step);
  q.inv_step = step_f > 0.0f ? 1.0f / step_f : 0.0f;
  return q;
}

/// Code of x: round((x - min) / step) clamped to [0, max_code]. Written so that no compiler may
/// fuse it into an FMA: the CPU and GPU encoders must produce the same codes.
PACKKV_HOST_DEVICE std::uint8_t quantize(float x, const Quantizer& q, int max_code) {
  const float shifted = x - q.min;
  const float scaled = shifted * q.inv_step;
#if defined(__CUDA_ARCH__)
  int code = __float2int_rn(scaled);
#else
  int code = static_cast<int>(std::nearbyintf(scaled));  // ties to even, as __float2int_rn
#endif
  code = code < 0 ? 0 : code;
  code = code > max_code ? max_code : code;
  return static_cast<std::uint8_t>(code);
}

PACKKV_HOST_DEVICE float dequantize(std::uint32_t code, float step, float min) {
  return min + static_cast<float>(code) * step;
}

}  // namespace packkv::format

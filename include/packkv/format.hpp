// The packed block format, version 2: the one normative definition (docs/format.md explains it).
//
// A block holds `block_tokens` consecutive tokens of one (sequence, layer) for every KV head:
//
//   [BlockHeader 16 B][directory: {u32 k_offset, u32 v_offset} per head, padded to 16 B]
//   [permutation: u8[num_heads][block_tokens], only if permuted]
//   per head: [K section][V section]          (each section 16-B aligned)
//   [16 B trailing slack, zero]               (lets decoders read 8 B past any pack)
//
// A section holds the codes of one head's K or V (block_tokens x head_dim, in packed token order),
// in rounds of 16 tokens; a pack is the 16 codes of one channel in one round:
//
//   params      {fp16 step, fp16 min} per token (per channel for per-channel K)      4 B each
//   round_end   u32 per round: end of the round, counted from the first round's start
//   rounds      per round, either
//                 plain: per channel, 16 codes of `bits` bits                  (2 * bits B per pack)
//               or, only when it is strictly smaller than plain,
//                 frame of reference: pack widths (4 bits per channel), pack minimums (`bits` bits
//                 per channel), then per channel 16 values (code - pack_min) of `width` bits
//               a pack is a little-endian bit stream of 2*width bytes (value i at bits [i*w, i*w+w))
//   padding     to a multiple of 16 B
//
// A round's kind follows from its size: plain rounds are exactly head_dim * 2 * bits bytes.
// Reconstruction: x = min + code * step (fp32), with per-token or per-channel (step, min).
// All multi-byte fields are little-endian. Everything here compiles for host and device.
#pragma once

#include <cstddef>
#include <cmath>
#include <cstdint>

#include "packkv/types.hpp"

namespace packkv::format {

inline constexpr std::uint8_t kVersion = 2;
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

/// Layout of a section, fixed by the geometry except for the size of its rounds.
struct SectionLayout {
  std::uint32_t param_count;        ///< tokens (per-token) or channels (per-channel)
  std::uint32_t rounds;             ///< block_tokens / 16
  std::uint32_t head_dim;
  std::uint32_t bits;               ///< code bits, 1..8
  std::uint32_t round_end_offset;   ///< the u32 round_end table
  std::uint32_t rounds_offset;      ///< start of the first round
  std::uint32_t plain_round_bytes;  ///< a plain round: head_dim packs of 2 * bits bytes
  std::uint32_t widths_bytes;       ///< frame-of-reference round: 4-bit widths, head_dim / 2 bytes
  std::uint32_t descriptor_bytes;   ///< frame-of-reference round: widths and `bits`-bit minimums

  PACKKV_HOST_DEVICE constexpr std::uint32_t section_bytes(std::uint32_t rounds_bytes) const {
    return align_up(rounds_offset + rounds_bytes, kAlign);
  }
  /// Every round plain: the largest a section can be.
  PACKKV_HOST_DEVICE constexpr std::uint32_t max_section_bytes() const {
    return section_bytes(rounds * plain_round_bytes);
  }
  /// Every round frame-of-reference with constant packs: the smallest a section can be.
  PACKKV_HOST_DEVICE constexpr std::uint32_t min_section_bytes() const {
    return section_bytes(rounds * descriptor_bytes);
  }
};

PACKKV_HOST_DEVICE constexpr SectionLayout make_section_layout(int block_tokens, int head_dim, int bits,
                                                               bool per_channel) {
  SectionLayout s{};
  s.param_count = per_channel ? static_cast<std::uint32_t>(head_dim) : static_cast<std::uint32_t>(block_tokens);
  s.rounds = static_cast<std::uint32_t>(block_tokens / kPackTokens);
  s.head_dim = static_cast<std::uint32_t>(head_dim);
  s.bits = static_cast<std::uint32_t>(bits);
  s.round_end_offset = s.param_count * sizeof(Params);
  s.rounds_offset = s.round_end_offset + 4u * s.rounds;
  s.plain_round_bytes = s.head_dim * 2u * s.bits;
  s.widths_bytes = s.head_dim / 2u;  // head_dim is a multiple of 8: whole bytes below too
  s.descriptor_bytes = s.widths_bytes + s.head_dim * s.bits / 8u;
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
  /// Upper bound on a block's size (every round plain); the encoder's scratch size.
  PACKKV_HOST_DEVICE constexpr std::uint32_t max_block_bytes() const {
    return sections_offset() +
           static_cast<std::uint32_t>(num_heads) * (k_layout().max_section_bytes() + v_layout().max_section_bytes()) +
           kTrailingSlack;
  }
  /// Lower bound on a block's size (every round frame-of-reference, every pack of width 0).
  PACKKV_HOST_DEVICE constexpr std::uint32_t min_block_bytes() const {
    return sections_offset() +
           static_cast<std::uint32_t>(num_heads) * (k_layout().min_section_bytes() + v_layout().min_section_bytes()) +
           kTrailingSlack;
  }
};

// ---- Rounds ------------------------------------------------------------------------------------

PACKKV_HOST_DEVICE std::uint32_t load_u32(const std::uint8_t* p) {
  return static_cast<std::uint32_t>(p[0]) | (static_cast<std::uint32_t>(p[1]) << 8) |
         (static_cast<std::uint32_t>(p[2]) << 16) | (static_cast<std::uint32_t>(p[3]) << 24);
}
PACKKV_HOST_DEVICE void store_u32(std::uint8_t* p, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<std::uint8_t>(v >> (8 * i));
}

/// End of round r, counted from the start of round 0 (the stored round_end).
PACKKV_HOST_DEVICE std::uint32_t round_end(const std::uint8_t* section, const SectionLayout& layout,
                                           std::uint32_t r) {
  return load_u32(section + layout.round_end_offset + 4 * r);
}
PACKKV_HOST_DEVICE std::uint32_t round_begin(const std::uint8_t* section, const SectionLayout& layout,
                                             std::uint32_t r) {
  return r == 0 ? 0u : round_end(section, layout, r - 1);
}

/// Where one round's descriptors and packs are. In a plain round every pack has width `bits` and
/// minimum 0, and `widths` / `mins` are not used.
struct RoundView {
  const std::uint8_t* widths;  ///< 4 bits per channel; even channels in the low nibble
  const std::uint8_t* mins;    ///< `bits` bits per channel, a little-endian bit stream
  const std::uint8_t* packs;   ///< the first channel's pack
  bool plain;
};

PACKKV_HOST_DEVICE RoundView round_view(const std::uint8_t* section, const SectionLayout& layout,
                                        std::uint32_t r) {
  const std::uint32_t begin = round_begin(section, layout, r);
  const std::uint8_t* start = section + layout.rounds_offset + begin;
  if (round_end(section, layout, r) - begin == layout.plain_round_bytes) return RoundView{start, start, start, true};
  return RoundView{start, start + layout.widths_bytes, start + layout.descriptor_bytes, false};
}

/// Width of channel c's pack in a frame-of-reference round.
PACKKV_HOST_DEVICE std::uint32_t pack_width(const std::uint8_t* widths, std::uint32_t c) {
  return (widths[c >> 1] >> ((c & 1u) * 4u)) & 0xFu;
}
/// Minimum of channel c's pack in a frame-of-reference round. Reads 2 bytes: the packs (or the
/// block's trailing slack) always follow the minimums.
PACKKV_HOST_DEVICE std::uint32_t pack_min(const std::uint8_t* mins, std::uint32_t c, std::uint32_t bits) {
  const std::uint32_t bit = c * bits;
  const std::uint32_t two =
      static_cast<std::uint32_t>(mins[bit >> 3]) | (static_cast<std::uint32_t>(mins[(bit >> 3) + 1]) << 8);
  return (two >> (bit & 7u)) & ((1u << bits) - 1u);
}

/// Width and minimum of channel c's pack in a round, plain or not.
struct PackDescriptor {
  std::uint32_t width;
  std::uint32_t min;
};
PACKKV_HOST_DEVICE PackDescriptor pack_descriptor(const RoundView& round, std::uint32_t c, std::uint32_t bits) {
  if (round.plain) return PackDescriptor{bits, 0u};
  return PackDescriptor{pack_width(round.widths, c), pack_min(round.mins, c, bits)};
}

/// Bytes of a frame-of-reference round whose pack widths sum to `width_sum`.
PACKKV_HOST_DEVICE constexpr std::uint32_t for_round_bytes(const SectionLayout& layout, std::uint32_t width_sum) {
  return layout.descriptor_bytes + 2u * width_sum;
}
/// The encoder's choice: frame of reference only when it is strictly smaller than plain, so a
/// round's size tells its kind.
PACKKV_HOST_DEVICE constexpr bool use_plain_round(const SectionLayout& layout, std::uint32_t width_sum) {
  return for_round_bytes(layout, width_sum) >= layout.plain_round_bytes;
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

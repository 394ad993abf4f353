// The packed block, versions 2 and 3: header, directory, permutation and section layout, with the
// accessors every encoder and decoder uses (docs/format.md explains each field). Version 3 differs
// only in the parameters: two bytes per group (CompactParams) after a 4-byte section prefix.
//
//   [BlockHeader 16 B][directory: {u32 k_offset, u32 v_offset} per head, padded to 16 B]
//   [permutation: u8[num_heads][block_tokens], only if permuted]
//   per head: [K section][V section]          (each section 16-B aligned)
//   [16 B trailing slack, zero]               (lets decoders read 8 B past any pack)
//
// A section holds one head's K or V codes (block_tokens x head_dim, in stored token order):
//
//   params      QuantParams per token (per channel for per-channel K)                4 B each
//               version 3: [u8 step exponent + 64, 3 zero bytes], then CompactParams   2 B each
//   round_end   u32 per round: end of the round, counted from the first round's start
//   rounds      per 16-token round, plain or frame of reference (format/rounds.hpp)
//   padding     to a multiple of 16 B
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "packkv/format/bits.hpp"
#include "packkv/format/quant.hpp"
#include "packkv/types.hpp"

namespace packkv::format {

inline constexpr std::uint8_t kVersion = 2;         ///< fp16 (step, min) per group
inline constexpr std::uint8_t kVersionCompact = 3;  ///< compact (step, min) per group
inline constexpr int kPackTokens = 16;          ///< tokens per pack and per round
inline constexpr std::uint32_t kAlign = 16;     ///< alignment of sections and blocks
inline constexpr std::uint32_t kTrailingSlack = 16;
inline constexpr int kMaxCodeBits = 8;

enum BlockFlags : std::uint8_t {
  kFlagPermuted = 1u << 0,     ///< a token permutation is stored
  kFlagKPerChannel = 1u << 1,  ///< K params are per channel (KIVI-style), not per token
};

/// Which half of a head's data a section holds.
enum class Side : std::uint8_t { k = 0, v = 1 };

struct BlockHeader {
  std::uint32_t block_bytes;  ///< total size of the block, including the trailing slack
  std::uint16_t block_tokens;
  std::uint16_t head_dim;
  std::uint16_t num_heads;
  std::uint8_t version;  ///< kVersion, or kVersionCompact
  std::uint8_t flags;    ///< BlockFlags
  std::uint8_t k_bits;   ///< code bits of K, 1..8
  std::uint8_t v_bits;   ///< code bits of V, 1..8
  std::uint16_t reserved;  ///< zero
};
static_assert(sizeof(BlockHeader) == 16, "BlockHeader is 16 bytes on every backend");

struct HeadEntry {
  std::uint32_t k_offset;  ///< K section offset from the block start
  std::uint32_t v_offset;  ///< V section offset from the block start

  PACKKV_HOST_DEVICE constexpr std::uint32_t offset(Side side) const { return side == Side::k ? k_offset : v_offset; }
};
static_assert(sizeof(HeadEntry) == 8);

PACKKV_HOST_DEVICE constexpr std::uint32_t align_up(std::uint32_t n, std::uint32_t a) { return (n + a - 1) / a * a; }

/// Layout of a section, fixed by the geometry except for the size of its rounds.
struct SectionLayout {
  std::uint32_t param_count;        ///< tokens (per-token) or channels (per-channel)
  std::uint32_t compact;            ///< 1: compact parameters (version 3), 0: fp16 (version 2)
  std::uint32_t params_offset;      ///< the first group's parameters: 0, or 4 after the compact prefix
  std::uint32_t param_bytes;        ///< per group: 4 (QuantParams) or 2 (CompactParams)
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
                                                               bool per_channel, bool compact = false) {
  SectionLayout s{};
  s.param_count = per_channel ? static_cast<std::uint32_t>(head_dim) : static_cast<std::uint32_t>(block_tokens);
  s.compact = compact ? 1u : 0u;
  s.params_offset = compact ? 4u : 0u;
  s.param_bytes = static_cast<std::uint32_t>(compact ? sizeof(CompactParams) : sizeof(QuantParams));
  s.rounds = static_cast<std::uint32_t>(block_tokens / kPackTokens);
  s.head_dim = static_cast<std::uint32_t>(head_dim);
  s.bits = static_cast<std::uint32_t>(bits);
  // A multiple of 4 (param_count is a multiple of 8): the round table stays aligned.
  s.round_end_offset = s.params_offset + s.param_count * s.param_bytes;
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
  bool compact_params = false;  ///< version 3 blocks (CacheConfig::compact_params)

  constexpr bool operator==(const BlockGeometry&) const = default;

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
    return make_section_layout(block_tokens, head_dim, k_bits, k_per_channel, compact_params);
  }
  PACKKV_HOST_DEVICE constexpr SectionLayout v_layout() const {
    return make_section_layout(block_tokens, head_dim, v_bits, false, compact_params);
  }
  PACKKV_HOST_DEVICE constexpr std::uint8_t version() const { return compact_params ? kVersionCompact : kVersion; }
  PACKKV_HOST_DEVICE constexpr SectionLayout layout(Side side) const {
    return side == Side::k ? k_layout() : v_layout();
  }
  PACKKV_HOST_DEVICE constexpr bool per_channel(Side side) const { return side == Side::k && k_per_channel; }
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

/// The header of a block of this geometry and size.
PACKKV_HOST_DEVICE constexpr BlockHeader make_block_header(const BlockGeometry& g, std::uint32_t block_bytes) {
  BlockHeader h{};
  h.block_bytes = block_bytes;
  h.block_tokens = static_cast<std::uint16_t>(g.block_tokens);
  h.head_dim = static_cast<std::uint16_t>(g.head_dim);
  h.num_heads = static_cast<std::uint16_t>(g.num_heads);
  h.version = g.version();
  h.flags = g.flags();
  h.k_bits = static_cast<std::uint8_t>(g.k_bits);
  h.v_bits = static_cast<std::uint8_t>(g.v_bits);
  h.reserved = 0;
  return h;
}

// ---- accessors: the only code that computes addresses inside a block ---------------------------

/// Head h's directory entry (block starts are 16-byte aligned, so the entry is 4-byte aligned).
PACKKV_HOST_DEVICE HeadEntry head_entry(const std::uint8_t* block, const BlockGeometry& g, int head) {
  HeadEntry e;
#if defined(__CUDA_ARCH__)
  e = reinterpret_cast<const HeadEntry*>(block + g.directory_offset())[head];
#else
  std::memcpy(&e, block + g.directory_offset() + static_cast<std::size_t>(head) * sizeof e, sizeof e);
#endif
  return e;
}
PACKKV_HOST_DEVICE void set_head_entry(std::uint8_t* block, const BlockGeometry& g, int head, HeadEntry e) {
#if defined(__CUDA_ARCH__)
  reinterpret_cast<HeadEntry*>(block + g.directory_offset())[head] = e;
#else
  std::memcpy(block + g.directory_offset() + static_cast<std::size_t>(head) * sizeof e, &e, sizeof e);
#endif
}

/// Head h's section of one side.
PACKKV_HOST_DEVICE const std::uint8_t* section(const std::uint8_t* block, const BlockGeometry& g, int head, Side side) {
  return block + head_entry(block, g, head).offset(side);
}

/// Head h's stored token order: order[i] is the original index of the token stored at position i;
/// null when the block keeps arrival order.
PACKKV_HOST_DEVICE const std::uint8_t* token_order(const std::uint8_t* block, const BlockGeometry& g, int head) {
  return g.permuted ? block + g.permutation_offset() + static_cast<std::size_t>(head) * g.block_tokens : nullptr;
}
PACKKV_HOST_DEVICE std::uint8_t* token_order(std::uint8_t* block, const BlockGeometry& g, int head) {
  return g.permuted ? block + g.permutation_offset() + static_cast<std::size_t>(head) * g.block_tokens : nullptr;
}

/// A section's parameters, one per token in stored order (per channel for per-channel K): fp16
/// parameters (version 2).
PACKKV_HOST_DEVICE const QuantParams* section_params(const std::uint8_t* section) {
  return reinterpret_cast<const QuantParams*>(section);
}

/// The largest code a section may hold: the error bound's max_code with fp16 parameters; every
/// code of the width with compact ones (whose min is aligned to half steps, so the grid may sit up
/// to a step off the range).
PACKKV_HOST_DEVICE constexpr int code_limit(const SectionLayout& layout, int max_code) {
  return layout.compact != 0u ? (1 << layout.bits) - 1 : max_code;
}

/// A compact section's step exponent E (its first byte, biased).
PACKKV_HOST_DEVICE int section_step_exponent(const std::uint8_t* section) {
  return static_cast<int>(section[0]) - kCompactExponentBias;
}

/// Group i's (step, min) as floats, in either encoding: x' = dequantize(code, step, min).
struct GroupParams {
  float step, min;
};
PACKKV_HOST_DEVICE GroupParams group_params(const std::uint8_t* section, const SectionLayout& layout, std::uint32_t i) {
  if (layout.compact == 0u) {
    const QuantParams p = section_params(section)[i];
    return GroupParams{to_float(p.step), to_float(p.min)};
  }
  const std::uint8_t* p = section + layout.params_offset + 2u * i;
  const float step = compact_step(p[0], section_step_exponent(section));
  return GroupParams{step, compact_min(static_cast<std::int8_t>(p[1]), step, (1 << layout.bits) - 1)};
}

/// The block size recorded in a block's header.
PACKKV_HOST_DEVICE std::uint32_t block_bytes(const std::uint8_t* block) { return load_u32(block); }

}  // namespace packkv::format

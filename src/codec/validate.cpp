// Validation of untrusted block bytes (imported images, fuzzers): every field a decoder will
// follow is checked before it is followed, and every parameter must decode inside the fp16 range.
#include <array>
#include <cstring>

#include <fmt/format.h>

#include "packkv/codec.hpp"
#include "packkv/error.hpp"

namespace packkv {

using format::SectionLayout;
using format::Side;

namespace {

const char* side_name(Side side) { return side == Side::k ? "K" : "V"; }

// Checks one section's rounds (sizes, widths, minimums, codes) and returns the bytes they take.
std::uint32_t validate_rounds(const SectionLayout& layout, const std::uint8_t* section, std::uint32_t available,
                              int max_code, int head, const char* name) {
  std::uint32_t offset = 0;
  std::uint8_t values[format::kPackTokens];
  for (std::uint32_t r = 0; r < layout.rounds; ++r) {
    const std::uint32_t end = format::round_end(section, layout, r);
    PACKKV_REQUIRE(end > offset && end - offset <= layout.plain_round_bytes && end - offset >= layout.descriptor_bytes,
                   fmt::format("head {} {} round {} ends at {}: a round after {} takes between {} and {} bytes", head,
                               name, r, end, offset, layout.descriptor_bytes, layout.plain_round_bytes));
    PACKKV_REQUIRE(end <= available, fmt::format("head {} {} round {} ends at {}, past the block end ({} bytes left)",
                                                 head, name, r, end, available));
    const bool plain = format::round_view(section, layout, r).plain;
    std::uint32_t bytes = plain ? 0 : layout.descriptor_bytes;  // of the round, so far
    format::for_each_pack(section, layout, r, [&](std::uint32_t c, const std::uint8_t* pack, std::uint32_t width,
                                                  std::uint32_t lo) {
      PACKKV_REQUIRE(width <= layout.bits, fmt::format("head {} {} pack (round {}, channel {}) has width {} above the "
                                                       "{} code bits",
                                                       head, name, r, c, width, layout.bits));
      PACKKV_REQUIRE(lo <= static_cast<std::uint32_t>(max_code),
                     fmt::format("head {} {} pack (round {}, channel {}) min {} exceeds the largest code {}", head, name,
                                 r, c, lo, max_code));
      PACKKV_REQUIRE(offset + bytes + 2 * width <= end,
                     fmt::format("head {} {} pack (round {}, channel {}) runs past its round's end {}", head, name, r, c,
                                 end));
      format::unpack16(pack, width, values);
      for (std::uint8_t value : values) {
        PACKKV_REQUIRE(lo + value <= static_cast<std::uint32_t>(max_code),
                       fmt::format("head {} {} pack (round {}, channel {}) holds code {} above the largest code {}",
                                   head, name, r, c, lo + value, max_code));
      }
      bytes += 2 * width;
    });
    PACKKV_REQUIRE(offset + bytes == end, fmt::format("head {} {} round {} holds {} bytes of packs but ends at {}",
                                                      head, name, r, bytes, end));
    offset = end;
  }
  return offset;
}

}  // namespace

void validate_block(const CodecParams& p, std::span<const std::uint8_t> bytes) {
  const format::BlockGeometry& g = p.geometry;
  PACKKV_REQUIRE(bytes.size() >= sizeof(format::BlockHeader),
                 fmt::format("block of {} bytes is shorter than its 16-byte header", bytes.size()));
  format::BlockHeader h;
  std::memcpy(&h, bytes.data(), sizeof h);
  PACKKV_REQUIRE(h.version == format::kVersion || h.version == format::kVersionCompact,
                 fmt::format("block format version {} is not supported (this build reads {} and {})", h.version,
                             format::kVersion, format::kVersionCompact));
  PACKKV_REQUIRE(h.version == g.version(),
                 fmt::format("block format version {} stores {} parameters, but this cache stores {} ones "
                             "(CacheConfig::compact_params is {})",
                             h.version, h.version == format::kVersionCompact ? "compact" : "fp16",
                             g.compact_params ? "compact" : "fp16", g.compact_params ? "on" : "off"));
  PACKKV_REQUIRE(h.block_bytes == bytes.size(),
                 fmt::format("block header says {} bytes, but {} were given", h.block_bytes, bytes.size()));
  const format::BlockHeader want = format::make_block_header(g, h.block_bytes);
  PACKKV_REQUIRE(h.block_tokens == want.block_tokens && h.head_dim == want.head_dim && h.num_heads == want.num_heads,
                 fmt::format("block shape (tokens {}, head_dim {}, heads {}) does not match the cache ({}, {}, {})",
                             h.block_tokens, h.head_dim, h.num_heads, g.block_tokens, g.head_dim, g.num_heads));
  PACKKV_REQUIRE(h.flags == want.flags && h.k_bits == want.k_bits && h.v_bits == want.v_bits && h.reserved == 0,
                 fmt::format("block flags {} / code bits K {} V {} / reserved {} do not match the cache ({} / {} {} / 0)",
                             h.flags, h.k_bits, h.v_bits, h.reserved, want.flags, want.k_bits, want.v_bits));
  PACKKV_REQUIRE(h.block_bytes >= g.min_block_bytes() && h.block_bytes <= g.max_block_bytes() &&
                     h.block_bytes % format::kAlign == 0,
                 fmt::format("block size {} is impossible for this geometry (must be a multiple of 16 in [{}, {}])",
                             h.block_bytes, g.min_block_bytes(), g.max_block_bytes()));
  for (int head = 0; head < g.num_heads; ++head) {
    const std::uint8_t* order = format::token_order(bytes.data(), g, head);
    if (order == nullptr) break;
    std::array<bool, 256> seen{};
    for (int i = 0; i < g.block_tokens; ++i) {
      PACKKV_REQUIRE(order[i] < g.block_tokens && !seen[order[i]],
                     fmt::format("head {}: stored token order is not a permutation (entry {} = {})", head, i, order[i]));
      seen[order[i]] = true;
    }
  }
  const std::uint32_t end = h.block_bytes - format::kTrailingSlack;
  std::uint32_t expected_offset = g.sections_offset();
  for (int head = 0; head < g.num_heads; ++head) {
    const format::HeadEntry entry = format::head_entry(bytes.data(), g, head);
    for (Side side : {Side::k, Side::v}) {
      const SectionLayout layout = g.layout(side);
      const int max_code = p.code_limit(side);
      const std::uint32_t section_offset = entry.offset(side);
      const char* name = side_name(side);
      PACKKV_REQUIRE(section_offset == expected_offset,
                     fmt::format("head {} {} section offset {} should be {}", head, name, section_offset,
                                 expected_offset));
      PACKKV_REQUIRE(section_offset + layout.rounds_offset <= end,
                     fmt::format("head {} {} section at {} runs past the block end", head, name, section_offset));
      const std::uint8_t* section = bytes.data() + section_offset;
      if (layout.compact != 0u) {
        const int exponent = format::section_step_exponent(section);
        PACKKV_REQUIRE(exponent >= format::kCompactExponentMin && exponent <= format::kCompactExponentMax &&
                           section[1] == 0 && section[2] == 0 && section[3] == 0,
                       fmt::format("head {} {} section: step exponent {} outside [{}, {}] or a non-zero reserved "
                                   "byte in its prefix",
                                   head, name, exponent, format::kCompactExponentMin, format::kCompactExponentMax));
      }
      for (std::uint32_t i = 0; i < layout.param_count; ++i) {
        const auto [step, min] = format::group_params(section, layout, i);
        PACKKV_REQUIRE(format::params_in_range(step, min, max_code),
                       fmt::format("head {} {} parameter {}: step {} / min {} decode outside [-65504, 65504] (or are "
                                   "not finite, or the step is negative)",
                                   head, name, i, step, min));
      }
      const std::uint32_t rounds_bytes =
          validate_rounds(layout, section, end - section_offset - layout.rounds_offset, max_code, head, name);
      const std::uint32_t size = layout.section_bytes(rounds_bytes);
      PACKKV_REQUIRE(section_offset + size <= end,
                     fmt::format("head {} {} section ({} bytes at {}) runs past the block end {}", head, name, size,
                                 section_offset, h.block_bytes));
      expected_offset = section_offset + size;
    }
  }
  PACKKV_REQUIRE(expected_offset + format::kTrailingSlack == h.block_bytes,
                 fmt::format("block is {} bytes but its sections end at {}", h.block_bytes, expected_offset));
}

}  // namespace packkv

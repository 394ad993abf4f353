// Rounds of a section: 16 tokens of every channel, stored plain or as frame of reference.
//
//   plain:               per channel, 16 codes of `bits` bits                (2 * bits B per pack)
//   frame of reference:  pack widths (4 bits per channel), pack minimums (`bits` bits per
//                        channel), then per channel 16 values (code - pack_min) of `width` bits
//
// The encoder writes frame of reference only when it is strictly smaller than plain, so a
// round's size tells its kind: plain rounds are exactly head_dim * 2 * bits bytes.
#pragma once

#include <cstdint>

#include "packkv/format/bits.hpp"
#include "packkv/format/block.hpp"

namespace packkv::format {

/// End of round r, counted from the start of round 0 (the stored round_end).
PACKKV_HOST_DEVICE std::uint32_t round_end(const std::uint8_t* section, const SectionLayout& layout, std::uint32_t r) {
  return load_u32(section + layout.round_end_offset + 4 * r);
}
PACKKV_HOST_DEVICE std::uint32_t round_begin(const std::uint8_t* section, const SectionLayout& layout,
                                             std::uint32_t r) {
  return r == 0 ? 0u : round_end(section, layout, r - 1);
}
PACKKV_HOST_DEVICE void set_round_end(std::uint8_t* section, const SectionLayout& layout, std::uint32_t r,
                                      std::uint32_t end) {
  store_u32(section + layout.round_end_offset + 4 * r, end);
}
/// Bytes of all rounds of a section (the last round's end).
PACKKV_HOST_DEVICE std::uint32_t rounds_bytes(const std::uint8_t* section, const SectionLayout& layout) {
  return round_end(section, layout, layout.rounds - 1);
}

/// Bytes of a frame-of-reference round whose pack widths sum to `width_sum`.
PACKKV_HOST_DEVICE constexpr std::uint32_t frame_round_bytes(const SectionLayout& layout, std::uint32_t width_sum) {
  return layout.descriptor_bytes + 2u * width_sum;
}
/// The encoder's choice: frame of reference only when it is strictly smaller than plain.
PACKKV_HOST_DEVICE constexpr bool use_plain_round(const SectionLayout& layout, std::uint32_t width_sum) {
  return frame_round_bytes(layout, width_sum) >= layout.plain_round_bytes;
}
/// A round's size from its pack widths, as the encoder stores it.
PACKKV_HOST_DEVICE constexpr std::uint32_t round_bytes(const SectionLayout& layout, std::uint32_t width_sum) {
  return use_plain_round(layout, width_sum) ? layout.plain_round_bytes : frame_round_bytes(layout, width_sum);
}

/// Where one round's descriptors and packs are. In a plain round every pack has width `bits` and
/// minimum 0, and `widths` / `mins` are not used.
struct RoundView {
  const std::uint8_t* widths;  ///< 4 bits per channel, a bit stream (even channels in low nibbles)
  const std::uint8_t* mins;    ///< `bits` bits per channel, a bit stream
  const std::uint8_t* packs;   ///< the first channel's pack
  bool plain;
};

PACKKV_HOST_DEVICE RoundView round_view(const std::uint8_t* section, const SectionLayout& layout, std::uint32_t r) {
  const std::uint32_t begin = round_begin(section, layout, r);
  const std::uint8_t* start = section + layout.rounds_offset + begin;
  if (round_end(section, layout, r) - begin == layout.plain_round_bytes) return RoundView{start, start, start, true};
  return RoundView{start, start + layout.widths_bytes, start + layout.descriptor_bytes, false};
}

/// Width and minimum of one channel's pack in a round, plain or not.
struct PackDescriptor {
  std::uint32_t width;
  std::uint32_t min;
};
PACKKV_HOST_DEVICE PackDescriptor pack_descriptor(const RoundView& round, std::uint32_t c, std::uint32_t bits) {
  if (round.plain) return PackDescriptor{bits, 0u};
  return PackDescriptor{stream_value(round.widths, c, 4), stream_value(round.mins, c, bits)};
}

/// Writes a frame-of-reference round's descriptors: widths as a 4-bit stream, then minimums as a
/// `bits`-bit stream, both in groups of 8 channels (pack8). Returns where the packs begin.
PACKKV_HOST_DEVICE std::uint8_t* write_round_descriptors(const SectionLayout& layout, const std::uint8_t* widths,
                                                         const std::uint8_t* mins, std::uint8_t* round) {
  for (std::uint32_t c = 0; c < layout.head_dim; c += 8) {
    pack8(widths + c, 4, round + c / 2);
    pack8(mins + c, layout.bits, round + layout.widths_bytes + c / 8 * layout.bits);
  }
  return round + layout.descriptor_bytes;
}

/// Every channel's pack width and minimum of a round (plain: bits and 0).
PACKKV_HOST_DEVICE void read_round_descriptors(const SectionLayout& layout, const RoundView& round,
                                               std::uint8_t* widths, std::uint8_t* mins) {
  for (std::uint32_t c = 0; c < layout.head_dim; c += 8) {
    if (round.plain) {
      for (int i = 0; i < 8; ++i) {
        widths[c + i] = static_cast<std::uint8_t>(layout.bits);
        mins[c + i] = 0;
      }
    } else {
      unpack8(round.widths + c / 2, 4, widths + c);
      unpack8(round.mins + c / 8 * layout.bits, layout.bits, mins + c);
    }
  }
}

/// Calls fn(channel, pack, width, min) for every pack of round r, in storage order.
template <class Fn>
PACKKV_HOST_DEVICE void for_each_pack(const std::uint8_t* section, const SectionLayout& layout, std::uint32_t r,
                                      Fn&& fn) {
  const RoundView round = round_view(section, layout, r);
  const std::uint8_t* pack = round.packs;
  for (std::uint32_t c = 0; c < layout.head_dim; ++c) {
    const PackDescriptor d = pack_descriptor(round, c, layout.bits);
    fn(c, pack, d.width, d.min);
    pack += 2 * d.width;
  }
}

}  // namespace packkv::format

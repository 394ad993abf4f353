// The format spec's own functions (include/packkv/format): the bit streams, the descriptors, the
// header builder and accessors, and the quantization rules, each against a model written here.
#include <cmath>
#include <cstring>

#include "test_util.hpp"

namespace packkv {
namespace {

TEST(FormatBits, StreamValueReadsWhatPack8Wrote) {
  synthetic::Rng rng(3);
  for (std::uint32_t width = 1; width <= 8; ++width) {
    std::uint8_t values[32], stream[33] = {};
    for (auto& v : values) v = static_cast<std::uint8_t>(rng.next() & ((1u << width) - 1));
    for (int group = 0; group < 4; ++group) format::pack8(values + 8 * group, width, stream + group * width);
    for (std::uint32_t i = 0; i < 32; ++i) ASSERT_EQ(format::stream_value(stream, i, width), values[i]) << width;
    // Bit i * width + j of the stream is bit j of value i.
    for (std::uint32_t i = 0; i < 32; ++i) {
      for (std::uint32_t j = 0; j < width; ++j) {
        const std::uint32_t bit = i * width + j;
        ASSERT_EQ((stream[bit / 8] >> (bit % 8)) & 1u, (values[i] >> j) & 1u);
      }
    }
  }
}

TEST(FormatBits, Pack8WritesExactlyWidthBytes) {
  for (std::uint32_t width = 0; width <= 8; ++width) {
    std::uint8_t values[8], out[16];
    for (int i = 0; i < 8; ++i) values[i] = static_cast<std::uint8_t>(((1u << width) - 1) & (0x5Au + 37u * i));
    std::memset(out, 0xEE, sizeof out);
    format::pack8(values, width, out);
    for (std::uint32_t b = width; b < 16; ++b) ASSERT_EQ(out[b], 0xEE) << "width " << width;
  }
}

TEST(FormatRounds, DescriptorsRoundTripThroughTheWriterAndReader) {
  for (int bits = 1; bits <= 8; ++bits) {
    const format::SectionLayout layout = format::make_section_layout(64, 96, bits, false);
    synthetic::Rng rng(static_cast<std::uint64_t>(bits));
    std::uint8_t widths[96], mins[96], round[256] = {};
    for (int c = 0; c < 96; ++c) {
      widths[c] = static_cast<std::uint8_t>(rng.next() % (bits + 1));
      mins[c] = static_cast<std::uint8_t>(rng.next() & ((1u << bits) - 1));
    }
    const std::uint8_t* packs = format::write_round_descriptors(layout, widths, mins, round);
    EXPECT_EQ(packs - round, static_cast<std::ptrdiff_t>(layout.descriptor_bytes));
    const format::RoundView view{round, round + layout.widths_bytes, round + layout.descriptor_bytes, false};
    std::uint8_t w2[96], m2[96];
    format::read_round_descriptors(layout, view, w2, m2);
    for (int c = 0; c < 96; ++c) {
      ASSERT_EQ(w2[c], widths[c]);
      ASSERT_EQ(m2[c], mins[c]);
      const format::PackDescriptor d = format::pack_descriptor(view, static_cast<std::uint32_t>(c), layout.bits);
      ASSERT_EQ(d.width, widths[c]);
      ASSERT_EQ(d.min, mins[c]);
    }
    // Widths are nibbles: even channels in the low half of byte c / 2.
    EXPECT_EQ(round[3] & 0xF, widths[6]);
    EXPECT_EQ(round[3] >> 4, widths[7]);
  }
}

TEST(FormatBlock, HeaderAndAccessorsFollowTheGeometry) {
  format::BlockGeometry g{64, 128, 8, 4, 3, true, false};
  const format::BlockHeader h = format::make_block_header(g, 4096);
  EXPECT_EQ(h.block_bytes, 4096u);
  EXPECT_EQ(h.block_tokens, 64);
  EXPECT_EQ(h.head_dim, 128);
  EXPECT_EQ(h.num_heads, 8);
  EXPECT_EQ(h.version, format::kVersion);
  EXPECT_EQ(h.flags, format::kFlagPermuted);
  EXPECT_EQ(h.k_bits, 4);
  EXPECT_EQ(h.v_bits, 3);
  EXPECT_EQ(h.reserved, 0);
  std::vector<std::uint8_t> block(g.max_block_bytes(), 0);
  for (int head = 0; head < 8; ++head) format::set_head_entry(block.data(), g, head, {100u + head, 200u + head});
  for (int head = 0; head < 8; ++head) {
    EXPECT_EQ(format::head_entry(block.data(), g, head).k_offset, 100u + head);
    EXPECT_EQ(format::section(block.data(), g, head, format::Side::v) - block.data(), 200 + head);
    EXPECT_EQ(format::token_order(block.data(), g, head) - block.data(), g.permutation_offset() + head * 64);
  }
  // 16 B header, 64 B directory, 512 B permutation: sections start at 592.
  EXPECT_EQ(g.directory_offset(), 16u);
  EXPECT_EQ(g.permutation_offset(), 80u);
  EXPECT_EQ(g.sections_offset(), 592u);
  g.permuted = false;
  EXPECT_EQ(format::token_order(block.data(), g, 3), nullptr);
}

TEST(FormatQuant, DequantizeIsOneFusedMultiplyAdd) {
  // 3 * (1 + 3 * 2^-23) = 3 + 9 * 2^-23 needs one bit more than a float holds: rounded on its own
  // it becomes 3 + 8 * 2^-23, so only a fused multiply-add gives 9 * 2^-23 after adding -3.
  const float step = 1.0f + 3 * 0x1p-23f;
  EXPECT_EQ(format::dequantize(3, step, -3.0f), 9 * 0x1p-23f);
}

TEST(FormatQuant, ZerosAreReducedAsPositiveZero) {
  format::Range a, b;
  a.extend(-0.0f);
  a.extend(0.0f);
  b.extend(0.0f);
  b.extend(-0.0f);
  EXPECT_FALSE(std::signbit(a.lo));
  EXPECT_FALSE(std::signbit(b.lo));
  EXPECT_EQ(format::make_quantizer(a.lo, a.hi, 10).stored.min.bits, format::make_quantizer(b.lo, b.hi, 10).stored.min.bits);
}

TEST(FormatQuant, StorableValuesAreFiniteAndWithinTheFp16Range) {
  EXPECT_TRUE(format::storable(65504.0f));
  EXPECT_TRUE(format::storable(-65504.0f));
  EXPECT_FALSE(format::storable(65504.5f));
  EXPECT_FALSE(format::storable(NAN));
  EXPECT_FALSE(format::storable(INFINITY));
}

// At the fp16 limit the step is rounded down, so that no code decodes past 65504, and every value
// still decodes within half a step.
TEST(FormatQuant, TheLargestCodeNeverDecodesPastTheFp16Limit) {
  synthetic::Rng rng(11);
  for (int max_code : {1, 2, 3, 5, 10, 15, 31, 100, 255}) {
    for (int trial = 0; trial < 300; ++trial) {
      const float lo = trial % 3 == 0 ? -65504.0f : static_cast<float>(-65504.0 * rng.uniform());
      const float hi = trial % 2 == 0 ? 65504.0f : static_cast<float>(65000.0 + 504.0 * rng.uniform());
      const format::Quantizer q = format::make_quantizer(lo, hi, max_code);
      if (max_code == 1 && static_cast<double>(hi) - lo > 65504.0) {
        EXPECT_FALSE(q.ok);
        continue;
      }
      ASSERT_TRUE(q.ok) << lo << " " << hi << " " << max_code;
      const float step = to_float(q.stored.step), min = to_float(q.stored.min);
      ASSERT_TRUE(format::params_in_range(step, min, max_code)) << lo << " " << hi << " " << max_code;
      for (float x : {lo, hi, 0.5f * (lo + hi), hi - 0.25f * step}) {
        const float y = format::dequantize(format::quantize(x, q, max_code), step, min);
        ASSERT_LE(std::fabs(static_cast<double>(x) - y), 0.5 * step * (1 + 1e-6) + 0.02) << x << " " << max_code;
        ASSERT_LE(std::fabs(y), 65504.0f);
      }
    }
  }
}

TEST(FormatQuant, ParamsInRangeRejectsWhatDecodesOutside) {
  EXPECT_TRUE(format::params_in_range(1.0f, 0.0f, 255));
  EXPECT_FALSE(format::params_in_range(65504.0f, 65504.0f, 5));
  EXPECT_FALSE(format::params_in_range(300.0f, 0.0f, 255));
  EXPECT_FALSE(format::params_in_range(-1.0f, 0.0f, 3));
  EXPECT_FALSE(format::params_in_range(NAN, 0.0f, 3));
  EXPECT_FALSE(format::params_in_range(1.0f, -INFINITY, 3));
}

}  // namespace
}  // namespace packkv

// Compact parameters (CacheConfig::compact_params, block format version 3): each group's (step,
// min) in two bytes. The quantizer covers every range of storable values within the documented
// step, every reconstruction is exact, blocks validate and decode within that bound, corrupt
// parameters are refused, and a cache with the option reads, measures, exports and imports as one
// with fp16 parameters does, with 16 bits fewer per group.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "packkv/cache.hpp"
#include "packkv/codec.hpp"
#include "packkv/image_coding.hpp"
#include "packkv/synthetic.hpp"
#include "test_util.hpp"

namespace packkv {
namespace {

using test::expect_error;
using test::random_values;

int top_code_of(int max_code) { return (1 << bits_for_max_code(max_code)) - 1; }

/// The step the compact quantizer promises at most (format/quant.hpp, docs/format.md).
double documented_step(double lo, double hi, int max_code, int top_code, int exponent) {
  const double threshold =
      std::max((hi - lo) / (max_code - 0.5), 2.0 * std::max(hi, -lo) / (127.0 + top_code));
  return std::max(17.0 / 16.0 * threshold, static_cast<double>(format::exp2_exact(exponent)));
}

/// Checks one group against every promise of make_compact_quantizer.
void check_group(float lo, float hi, int max_code, int exponent_shift) {
  const int top = top_code_of(max_code);
  const int exponent =
      format::compact_exponent(std::ldexp(format::compact_need(lo, hi, max_code, top), exponent_shift));
  const format::Quantizer q = format::make_compact_quantizer(lo, hi, max_code, top, exponent);
  ASSERT_TRUE(q.ok) << "[" << lo << ", " << hi << "] max_code " << max_code << " shift " << exponent_shift;
  const float step = format::compact_step(q.compact.step_code, exponent);
  const float min = format::compact_min(q.compact.zero, step, top);
  ASSERT_EQ(min, q.min);
  const double top_value = static_cast<double>(min) + static_cast<double>(top) * step;
  ASSERT_LE(min, lo) << "the grid starts above the range";
  ASSERT_GE(top_value, hi) << "the grid ends below the range";
  ASSERT_GE(min, -kFp16Max);
  ASSERT_LE(top_value, kFp16Max);
  ASSERT_LE(step, documented_step(lo, hi, max_code, top, exponent) * (1 + 1e-12))
      << "[" << lo << ", " << hi << "] max_code " << max_code << " exponent " << exponent;
  // Every code decodes exactly: the fused multiply-add rounds nothing.
  for (int code = 0; code <= top; code += std::max(1, top / 17)) {
    const double exact = static_cast<double>(code) * step + min;
    ASSERT_EQ(static_cast<double>(format::dequantize(static_cast<std::uint32_t>(code), step, min)), exact);
  }
  // And values of the range come back within half a step.
  for (double f : {0.0, 0.13, 0.5, 0.77, 1.0}) {
    const auto x = static_cast<float>(lo + f * (static_cast<double>(hi) - lo));
    const float back = format::dequantize(format::quantize(x, q, top), step, min);
    ASSERT_LE(std::fabs(static_cast<double>(x) - back),
              step / 2.0 * (1 + 1e-6) + 4 * 0x1p-24 * std::max(std::fabs(lo), std::fabs(hi)))
        << "x " << x << " in [" << lo << ", " << hi << "]";
  }
}

TEST(CompactQuantizer, CoversEveryRangeWithinTheDocumentedStep) {
  synthetic::Rng rng(7);
  const int max_codes[] = {1, 2, 3, 5, 7, 10, 15, 16, 20, 31, 50, 63, 100, 127, 128, 200, 255};
  for (int max_code : max_codes) {
    // Edge ranges: zero, constants, one-sided, the storable limit.
    const std::vector<std::pair<float, float>> edges = {
        {0.0f, 0.0f},         {3.0f, 3.0f},          {-16384.0f, -16384.0f}, {16384.0f, 16384.0f},
        {-16384.0f, 16384.0f}, {0.0f, 16384.0f},      {-16384.0f, 0.0f},      {16000.0f, 16384.0f},
        {1e-30f, 2e-30f},      {-1e-20f, 1e-20f},     {100.0f, 100.5f},       {-7.0f, -6.999f}};
    for (auto [lo, hi] : edges) {
      for (int shift : {0, 6, 13, 30}) check_group(lo, hi, max_code, shift);
    }
    for (int i = 0; i < 300; ++i) {
      const double scale = std::ldexp(1.0, static_cast<int>(rng.uniform() * 44) - 30);
      double a = (2 * rng.uniform() - 1) * scale, b = (2 * rng.uniform() - 1) * scale;
      if (i % 3 == 0) b = a + std::fabs(b) * 1e-3;  // narrow ranges far from zero
      auto lo = static_cast<float>(std::clamp(std::min(a, b), -16384.0, 16384.0));
      auto hi = static_cast<float>(std::clamp(std::max(a, b), -16384.0, 16384.0));
      check_group(lo, hi, max_code, i % 4 == 0 ? static_cast<int>(rng.uniform() * 20) : 0);
    }
  }
}

TEST(CompactQuantizer, SpareCodesKeepTheStepAtTheErrorBound) {
  // With a code to spare (max_code < 2^bits - 1) the min's alignment costs no step: only the
  // grid's rounding up (at most 1/16) separates the step from (hi - lo) / max_code.
  for (int max_code : {2, 5, 10, 20, 50, 100, 200}) {
    const int top = top_code_of(max_code);
    ASSERT_LT(max_code, top);
    for (float hi : {0.37f, 1.0f, 5.5f, 1000.0f}) {
      const float lo = -0.8f * hi;
      const int exponent = format::compact_exponent(format::compact_need(lo, hi, max_code, top));
      const format::Quantizer q = format::make_compact_quantizer(lo, hi, max_code, top, exponent);
      ASSERT_TRUE(q.ok);
      const double step = format::compact_step(q.compact.step_code, exponent);
      const double ideal = (static_cast<double>(hi) - lo) / max_code;
      EXPECT_GE(step, ideal);
      EXPECT_LE(step, ideal * 17.0 / 16.0) << "max_code " << max_code << " hi " << hi;
    }
  }
}

TEST(CompactQuantizer, BothStepFormsAgreeForEveryCodeAndExponent) {
  for (int exponent = format::kCompactExponentMin; exponent <= format::kCompactExponentMax; ++exponent) {
    for (int code = 0; code < 256; ++code) {
      const float a = format::compact_step(static_cast<std::uint8_t>(code), exponent);
      const float b = format::compact_step_from_bits(static_cast<std::uint32_t>(code),
                                                     static_cast<std::uint32_t>(exponent + 127));
      ASSERT_EQ(std::memcmp(&a, &b, sizeof a), 0) << "code " << code << " exponent " << exponent;
    }
  }
}

TEST(CompactQuantizer, RefusesValuesBeyondItsLimit) {
  EXPECT_FALSE(format::make_compact_quantizer(-1.0f, 16385.0f, 10, 15, 0).ok);
  EXPECT_FALSE(format::make_compact_quantizer(-16400.0f, 0.0f, 10, 15, 0).ok);
  EXPECT_FALSE(format::make_compact_quantizer(NAN, 1.0f, 10, 15, 0).ok);
  EXPECT_TRUE(format::make_compact_quantizer(-16384.0f, 16384.0f, 10, 15, format::compact_exponent(4000.0)).ok);
}

// ---- blocks -------------------------------------------------------------------------------------

CacheConfig codec_config(float rel, int dim, int block, QuantMode mode, bool compact) {
  CacheConfig c;
  c.num_kv_heads = 2;
  c.num_q_heads = 2;
  c.head_dim = dim;
  c.block_tokens = block;
  c.k_rel = rel;
  c.v_rel = std::min(1.0f, 2 * rel);
  c.k_mode = mode;
  c.repack = block % 32 == 0 ? RepackMethod::median : RepackMethod::none;
  c.compact_params = compact;
  return c;
}

std::vector<std::uint8_t> encode(const CodecParams& p, const std::vector<float>& k, const std::vector<float>& v,
                                 std::size_t row) {
  std::vector<std::uint8_t> block(p.geometry.max_block_bytes());
  EncodeScratch scratch;
  block.resize(encode_block(p, k.data(), v.data(), row, block.data(), scratch));
  return block;
}

TEST(CompactCodec, EveryElementIsWithinHalfItsDocumentedStep) {
  std::uint64_t seed = 300;
  for (float rel : {1.0f / 255.0f, 0.02f, 1.0f / 15.0f, 0.1f, 0.2f, 1.0f / 3.0f, 1.0f}) {
    for (int dim : {8, 64, 96, 128, 256}) {
      for (int block : {16, 64, 256}) {
        for (QuantMode mode : {QuantMode::per_token, QuantMode::per_channel}) {
          const CacheConfig cfg = codec_config(rel, dim, block, mode, true);
          const CodecParams p = make_codec_params(cfg);
          const format::BlockGeometry& g = p.geometry;
          const std::size_t row = 2 * static_cast<std::size_t>(dim), n = block * row;
          const std::vector<float> k = seed % 2 ? test::mixed_rounds_values(block, row, seed, 3.0) : random_values(n, seed, 3.0);
          const std::vector<float> v = random_values(n, seed + 1);
          ++seed;
          const std::vector<std::uint8_t> bytes = encode(p, k, v, row);
          ASSERT_NO_THROW(validate_block(p, bytes));
          format::BlockHeader h;
          std::memcpy(&h, bytes.data(), sizeof h);
          ASSERT_EQ(h.version, format::kVersionCompact);
          std::vector<float> k2(n), v2(n);
          decode_block(p, bytes.data(), k2.data(), v2.data(), row);
          for (int head = 0; head < 2; ++head) {
            const std::uint8_t* order = format::token_order(bytes.data(), g, head);
            for (format::Side side : {format::Side::k, format::Side::v}) {
              const bool per_channel = g.per_channel(side);
              const format::SectionLayout layout = g.layout(side);
              const std::uint8_t* section = format::section(bytes.data(), g, head, side);
              const int exponent = format::section_step_exponent(section);
              const std::vector<float>& x = side == format::Side::k ? k : v;
              const std::vector<float>& y = side == format::Side::k ? k2 : v2;
              const int groups = per_channel ? dim : block, members = per_channel ? block : dim;
              for (int gi = 0; gi < groups; ++gi) {
                // Group gi in stored order: a token (through the permutation) or a channel.
                const int group = per_channel || order == nullptr ? gi : order[gi];
                auto at = [&](int m) {
                  return per_channel ? static_cast<std::size_t>(m) * row + head * dim + group
                                     : static_cast<std::size_t>(group) * row + head * dim + m;
                };
                double lo = INFINITY, hi = -INFINITY;
                for (int m = 0; m < members; ++m) {
                  lo = std::min<double>(lo, x[at(m)]);
                  hi = std::max<double>(hi, x[at(m)]);
                }
                const format::GroupParams gp = format::group_params(section, layout, static_cast<std::uint32_t>(gi));
                ASSERT_LE(gp.step, documented_step(lo, hi, p.max_code(side), p.code_limit(side), exponent) * (1 + 1e-12))
                    << "rel " << rel << " dim " << dim << " block " << block << " group " << gi;
                // Half a step, up to fp32 rounding of (x - min) / step (as for fp16 parameters).
                const double bound = gp.step / 2.0 * (1 + 1e-6) + 4 * 0x1p-24 * std::max(std::fabs(lo), std::fabs(hi));
                for (int m = 0; m < members; ++m) {
                  ASSERT_LE(std::fabs(static_cast<double>(x[at(m)]) - y[at(m)]), bound)
                      << "rel " << rel << " dim " << dim << " block " << block << " group " << gi << " member " << m;
                }
              }
            }
          }
        }
      }
    }
  }
}

TEST(CompactCodec, ParametersTakeTwoBytesPerGroupAndTheRestIsUnchanged) {
  for (QuantMode mode : {QuantMode::per_token, QuantMode::per_channel}) {
    const CodecParams wide = make_codec_params(codec_config(0.1f, 64, 64, mode, false));
    const CodecParams compact = make_codec_params(codec_config(0.1f, 64, 64, mode, true));
    const std::size_t row = 128, n = 64 * row;
    const std::vector<float> k = test::mixed_rounds_values(64, row, 5, 2.0), v = random_values(n, 6);
    const BlockBytes a = block_bytes_breakdown(wide, encode(wide, k, v, row).data());
    const BlockBytes b = block_bytes_breakdown(compact, encode(compact, k, v, row).data());
    const std::size_t k_groups = mode == QuantMode::per_channel ? 64 : 64, v_groups = 64;
    EXPECT_EQ(a.params, 2 * (4 * k_groups + 4 * v_groups));
    EXPECT_EQ(b.params, 2 * (4 + 2 * k_groups + 4 + 2 * v_groups));
    EXPECT_EQ(a.permutations, b.permutations);
    // Codes move by the min's alignment; the payload stays within a few percent.
    EXPECT_NEAR(static_cast<double>(b.payload + b.descriptors), static_cast<double>(a.payload + a.descriptors),
                0.05 * static_cast<double>(a.payload + a.descriptors));
  }
}

TEST(CompactCodec, ValidateRejectsCorruptParameters) {
  const CodecParams p = make_codec_params(codec_config(0.1f, 32, 32, QuantMode::per_token, true));
  const std::vector<std::uint8_t> good = encode(p, random_values(32 * 64, 11), random_values(32 * 64, 12), 64);
  ASSERT_NO_THROW(validate_block(p, good));
  format::HeadEntry e;
  std::memcpy(&e, good.data() + p.geometry.directory_offset(), sizeof e);
  auto corrupt = [&](auto&& mutate, const std::string& needle) {
    std::vector<std::uint8_t> bad = good;
    mutate(bad);
    expect_error([&] { validate_block(p, bad); }, needle);
  };
  corrupt([&](auto& b) { b[e.k_offset] = 0; }, "step exponent -64");
  corrupt([&](auto& b) { b[e.k_offset] = format::kCompactExponentMax + format::kCompactExponentBias + 1; },
          "step exponent 9");
  corrupt([&](auto& b) { b[e.v_offset + 2] = 1; }, "reserved byte");
  // The largest exponent and step code: the grid reaches far past 65504.
  corrupt([&](auto& b) {
    b[e.k_offset] = format::kCompactExponentMax + format::kCompactExponentBias;
    b[e.k_offset + 4] = 0xFF;
  }, "parameter 0");
  // A block with compact parameters read by a codec with fp16 ones, and the reverse.
  const CodecParams wide = make_codec_params(codec_config(0.1f, 32, 32, QuantMode::per_token, false));
  expect_error([&] { validate_block(wide, good); }, "stores compact parameters, but this cache stores fp16 ones");
  const std::vector<std::uint8_t> old = encode(wide, random_values(32 * 64, 11), random_values(32 * 64, 12), 64);
  expect_error([&] { validate_block(p, old); }, "stores fp16 parameters, but this cache stores compact ones");
}

// ---- the cache ----------------------------------------------------------------------------------

CacheConfig cache_config(bool compact) {
  CacheConfig c;
  c.num_layers = 2;
  c.num_kv_heads = 2;
  c.num_q_heads = 4;
  c.head_dim = 64;
  c.block_tokens = 32;
  c.residual_tokens = 8;
  c.k_rel = 0.1f;
  c.v_rel = 0.2f;
  c.rotate_v = true;
  c.sink_tokens = 2;
  c.compact_params = compact;
  c.num_threads = 2;
  return c;
}

struct Filled {
  std::vector<float> k, v;
};

Filled fill(PackedKVCache<float>& cache, SeqId id, int n, std::uint64_t seed) {
  const CacheConfig& c = cache.config();
  const std::size_t row = static_cast<std::size_t>(c.num_kv_heads) * c.head_dim;
  Filled f{random_values(n * row, seed, 1.5), random_values(n * row, seed + 1)};
  cache.add_sequence(id);
  for (int l = 0; l < c.num_layers; ++l) {
    for (int t = 0; t < n; t += 13) {
      const int count = std::min(13, n - t);
      cache.append(id, l, f.k.data() + t * row, f.v.data() + t * row, count);
    }
  }
  return f;
}

TEST(CompactCache, SavesTwoBytesPerGroupAtAboutTheSameError) {
  PackedKVCache<float> wide(cache_config(false)), compact(cache_config(true));
  const int n = 200;
  const Filled x = fill(wide, 1, n, 40);
  fill(compact, 1, n, 40);
  const MemoryStats a = wide.memory_stats(), b = compact.memory_stats();
  ASSERT_EQ(a.total.compressed_tokens, b.total.compressed_tokens);
  // Per layer 6 blocks of 32 tokens, 2 heads, K and V: fp16 pairs against prefix + 2-byte pairs.
  const std::size_t sections = 2 * 6 * 2 * 2;
  EXPECT_EQ(a.total.params, sections * 32 * 4);
  EXPECT_EQ(b.total.params, sections * (4 + 32 * 2));
  EXPECT_LT(b.total.total(), a.total.total());
  // Reconstruction error: compact steps are up to 1/16 coarser.
  const std::size_t row = 128;
  for (int l = 0; l < 2; ++l) {
    std::vector<float> ka(n * row), va(n * row), kb(n * row), vb(n * row);
    wide.read_back(1, l, ka.data(), va.data());
    compact.read_back(1, l, kb.data(), vb.data());
    double ea = 0, eb = 0;
    for (std::size_t i = 0; i < ka.size(); ++i) {
      ea += std::pow(ka[i] - x.k[i], 2) + std::pow(va[i] - x.v[i], 2);
      eb += std::pow(kb[i] - x.k[i], 2) + std::pow(vb[i] - x.v[i], 2);
    }
    EXPECT_GT(eb, 0.0);
    EXPECT_LT(eb, 1.25 * ea) << "layer " << l;
  }
}

TEST(CompactCache, AttentionMatchesItsOwnDecodedValues) {
  const CacheConfig c = cache_config(true);
  PackedKVCache<float> cache(c);
  const int n = 150;
  fill(cache, 1, n, 50);
  const std::size_t row = 128;
  std::vector<float> k(n * row), v(n * row);
  cache.read_back(1, 1, k.data(), v.data());
  const std::vector<float> q = random_values(4 * 64, 51, 0.5);
  std::vector<float> out(4 * 64);
  const SeqId ids[] = {1};
  cache.attention(ids, 1, q.data(), out.data(), 0.125f);
  for (int h = 0; h < 4; ++h) {
    const std::vector<double> want = test::reference_attention(k.data(), v.data(), n, 2, 64, h / 2, q.data() + h * 64, 0.125);
    for (int d = 0; d < 64; ++d) ASSERT_NEAR(out[h * 64 + d], want[d], 1e-4) << "head " << h << " dim " << d;
  }
}

TEST(CompactCache, RefusesValuesBeyondItsLimitAndKeepsItsState) {
  PackedKVCache<float> cache(cache_config(true));
  fill(cache, 1, 40, 60);
  const test::Snapshot before = test::snapshot(cache);
  std::vector<float> k(128, 0.5f), v(128, 0.5f);
  k[70] = 20000.0f;
  expect_error([&] { cache.append(1, 0, k.data(), v.data(), 1); }, "beyond +-16384");
  EXPECT_EQ(test::snapshot(cache), before);
  // The same value is fine with fp16 parameters.
  PackedKVCache<float> wide(cache_config(false));
  wide.add_sequence(1);
  EXPECT_NO_THROW(wide.append(1, 0, k.data(), v.data(), 1));
  // fp16 storage takes a check on the bit patterns: the limit itself passes, the next value up,
  // infinities and NaN do not (K: this config rotates V, whose stored values are the rotated ones).
  PackedKVCache<fp16_t> half(cache_config(true));
  half.add_sequence(1);
  std::vector<fp16_t> hk(128, fp16_from_float(0.5f)), hv(128, fp16_from_float(0.5f));
  hk[5] = fp16_from_float(-16384.0f);
  hk[6] = fp16_from_float(16384.0f);
  EXPECT_NO_THROW(half.append(1, 0, hk.data(), hv.data(), 1));
  for (float bad : {16400.0f, -INFINITY, NAN}) {
    hk[3] = fp16_from_float(bad);
    expect_error([&] { half.append(1, 0, hk.data(), hv.data(), 1); }, "beyond +-16384");
  }
  EXPECT_EQ(half.length(1, 0), 1);
}

TEST(CompactCache, ImagesRecordTheOptionAndRoundTrip) {
  PackedKVCache<float> a(cache_config(true));
  fill(a, 1, 120, 70);
  const std::vector<std::uint8_t> image = a.export_sequence(1);
  EXPECT_EQ(image[offsetof(format::ImageHeader, options)] & format::kImageCompactParams, format::kImageCompactParams);
  PackedKVCache<float> b(cache_config(true));
  b.import_sequence(1, image);
  EXPECT_EQ(test::snapshot(b).contents, test::snapshot(a).contents);
  EXPECT_EQ(b.export_sequence(1), image);
  // Entropy-coded images know the parameters' layout too.
  const std::vector<std::uint8_t> coded = encode_image_entropy(image);
  EXPECT_EQ(decode_image_entropy(coded), image);
  EXPECT_LT(coded.size(), image.size());
  // A cache with fp16 parameters refuses the blocks, and stays empty.
  PackedKVCache<float> wide(cache_config(false));
  expect_error([&] { wide.import_sequence(1, image); }, "store compact parameters, this cache fp16 ones");
  EXPECT_FALSE(wide.contains(1));
}

}  // namespace
}  // namespace packkv

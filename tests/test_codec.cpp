// The block codec: error bound, bit-packing, repacking, validation, and the golden file.
#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>
#include <tuple>

#include "cpu_kernels/kernels.hpp"
#include "test_util.hpp"

namespace packkv {
namespace {

using test::error_bound;
using test::random_values;

TEST(BitPacking, EveryWidthRoundTrips) {
  synthetic::Rng rng(7);
  for (std::uint32_t width = 0; width <= 8; ++width) {
    for (int trial = 0; trial < 200; ++trial) {
      std::uint8_t values[16], back[16];
      for (auto& v : values) v = static_cast<std::uint8_t>(width ? rng.next() & ((1u << width) - 1) : 0);
      std::uint8_t packed[32] = {};
      format::pack16(values, width, packed);
      // Nothing is written past 2 * width bytes.
      for (std::uint32_t b = 2 * width; b < 32; ++b) ASSERT_EQ(packed[b], 0);
      format::unpack16(packed, width, back);
      ASSERT_EQ(0, std::memcmp(values, back, 16)) << "width " << width;
    }
  }
}

TEST(BitPacking, LayoutIsLittleEndianBitStream) {
  // Width 3: value i occupies bits [3i, 3i + 3) of the stream; check against a bit-by-bit model.
  const std::uint8_t values[16] = {1, 2, 3, 4, 5, 6, 7, 0, 7, 6, 5, 4, 3, 2, 1, 0};
  std::uint8_t packed[6] = {};
  format::pack16(values, 3, packed);
  std::uint8_t expected[6] = {};
  for (int i = 0; i < 16; ++i) {
    for (int b = 0; b < 3; ++b) {
      const int bit = i * 3 + b;
      if (values[i] >> b & 1) expected[bit / 8] |= static_cast<std::uint8_t>(1u << (bit % 8));
    }
  }
  EXPECT_EQ(0, std::memcmp(packed, expected, 6));
}

TEST(Quantizer, MaxCodeAndBits) {
  EXPECT_EQ(max_code_for_rel(0.1f), 10);
  EXPECT_EQ(bits_for_max_code(10), 4);
  EXPECT_EQ(max_code_for_rel(0.2f), 5);
  EXPECT_EQ(bits_for_max_code(5), 3);
  EXPECT_EQ(max_code_for_rel(1.0f), 1);
  EXPECT_EQ(max_code_for_rel(1.0f / 255.0f), 255);
  EXPECT_EQ(bits_for_max_code(255), 8);
  EXPECT_EQ(max_code_for_rel(1.0f / 3.0f), 3);
  EXPECT_THROW(max_code_for_rel(0.003f), error);
  EXPECT_THROW(max_code_for_rel(1.5f), error);
  EXPECT_THROW(max_code_for_rel(NAN), error);
}

TEST(Quantizer, HandComputedToken) {
  // Values 0..7, rel 1/3: min 0, step 7/3 rounded up to fp16, codes round(x / step).
  format::Quantizer q = format::make_quantizer(0.0f, 7.0f, 3);
  ASSERT_TRUE(q.ok);
  EXPECT_EQ(to_float(q.stored.min), 0.0f);
  const float step = to_float(q.stored.step);
  EXPECT_GE(step, 7.0f / 3.0f);
  EXPECT_LT(step, 7.0f / 3.0f * (1 + 1.0f / 1024));
  const int expected[8] = {0, 0, 1, 1, 2, 2, 3, 3};  // x / 2.3339 = 0, .43, .86, 1.29, 1.71, 2.14, 2.57, 3.0
  for (int x = 0; x < 8; ++x) EXPECT_EQ(format::quantize(static_cast<float>(x), q, 3), expected[x]) << x;
}

TEST(Quantizer, ConstantGroupIsExactWhenRepresentable) {
  format::Quantizer q = format::make_quantizer(1.5f, 1.5f, 10);
  ASSERT_TRUE(q.ok);
  EXPECT_EQ(to_float(q.stored.step), 0.0f);
  EXPECT_EQ(format::quantize(1.5f, q, 10), 0);
  EXPECT_EQ(format::dequantize(0, 0.0f, q.min), 1.5f);
}

struct CodecCase {
  float rel;
  int head_dim;
  int block;
  QuantMode k_mode;
  RepackMethod repack;
};

CacheConfig config_for(const CodecCase& c, int heads) {
  CacheConfig cfg;
  cfg.num_kv_heads = heads;
  cfg.num_q_heads = heads;
  cfg.head_dim = c.head_dim;
  cfg.block_tokens = c.block;
  cfg.k_rel = c.rel;
  cfg.v_rel = std::min(1.0f, c.rel * 2);
  cfg.k_mode = c.k_mode;
  cfg.repack = c.repack;
  return cfg;
}

void check_error_bound(const CodecCase& c, std::uint64_t seed) {
  const int heads = 2;
  const CacheConfig cfg = config_for(c, heads);
  const CodecParams params = make_codec_params(cfg);
  const std::size_t row = static_cast<std::size_t>(heads) * c.head_dim;
  const std::size_t n = static_cast<std::size_t>(c.block) * row;
  // Odd seeds: rounds alternate between plain and frame of reference.
  const std::vector<float> k = seed % 2 ? test::mixed_rounds_values(c.block, row, seed, 3.0) : random_values(n, seed, 3.0);
  const std::vector<float> v = seed % 2 ? test::mixed_rounds_values(c.block, row, seed + 1) : random_values(n, seed + 1);
  std::vector<std::uint8_t> block(params.geometry.max_block_bytes());
  EncodeScratch scratch;
  const std::uint32_t size = encode_block(params, k.data(), v.data(), row, block.data(), scratch);
  ASSERT_LE(size, params.geometry.max_block_bytes());
  ASSERT_GE(size, params.geometry.min_block_bytes());
  ASSERT_NO_THROW(validate_block(params, {block.data(), size}));
  std::vector<float> k2(n), v2(n);
  decode_block(params, block.data(), k2.data(), v2.data(), row);
  for (int h = 0; h < heads; ++h) {
    // K groups: tokens (per-token) or channels (per-channel); V groups: tokens.
    for (int which = 0; which < 2; ++which) {
      const std::vector<float>& x = which == 0 ? k : v;
      const std::vector<float>& y = which == 0 ? k2 : v2;
      const bool per_channel = which == 0 && c.k_mode == QuantMode::per_channel;
      const double rel = which == 0 ? cfg.k_rel : cfg.v_rel;
      const int groups = per_channel ? c.head_dim : c.block;
      const int members = per_channel ? c.block : c.head_dim;
      for (int gi = 0; gi < groups; ++gi) {
        auto at = [&](int m) {
          return per_channel ? static_cast<std::size_t>(m) * row + h * c.head_dim + gi
                             : static_cast<std::size_t>(gi) * row + h * c.head_dim + m;
        };
        double lo = INFINITY, hi = -INFINITY;
        for (int m = 0; m < members; ++m) {
          lo = std::min<double>(lo, x[at(m)]);
          hi = std::max<double>(hi, x[at(m)]);
        }
        const double bound = error_bound(lo, hi, rel);
        for (int m = 0; m < members; ++m) {
          ASSERT_LE(std::fabs(static_cast<double>(x[at(m)]) - y[at(m)]), bound)
              << (which ? "V" : "K") << " head " << h << " group " << gi << " member " << m << " rel " << rel
              << " dim " << c.head_dim << " block " << c.block;
        }
      }
    }
  }
}

TEST(Codec, ErrorBoundHoldsForEveryElement) {
  const float rels[] = {1.0f / 255.0f, 0.01f, 0.06f, 0.1f, 0.2f, 0.34f, 0.68f, 1.0f};
  const int dims[] = {8, 16, 64, 80, 96, 128, 256};
  const int blocks[] = {16, 48, 64, 256};
  std::uint64_t seed = 100;
  for (float rel : rels) {
    for (int dim : dims) {
      for (int block : blocks) {
        for (QuantMode mode : {QuantMode::per_token, QuantMode::per_channel}) {
          const RepackMethod repack = (seed / 2 % 2) ? RepackMethod::median : RepackMethod::none;
          check_error_bound({rel, dim, block, mode, repack}, seed++);
        }
      }
    }
  }
}

TEST(Codec, GreedyRepackKeepsTheBoundAndOrder) {
  for (int dim : {16, 64, 128}) {
    check_error_bound({0.1f, dim, 64, QuantMode::per_token, RepackMethod::greedy}, 900 + dim);
    check_error_bound({0.2f, dim, 32, QuantMode::per_channel, RepackMethod::greedy}, 950 + dim);
  }
}

TEST(Codec, SectionCodesMatchQuantizedInputInStoredOrder) {
  CodecCase c{0.1f, 64, 64, QuantMode::per_token, RepackMethod::median};
  const CacheConfig cfg = config_for(c, 1);
  const CodecParams params = make_codec_params(cfg);
  const std::size_t n = 64 * 64;
  const std::vector<float> k = random_values(n, 5), v = random_values(n, 6);
  std::vector<std::uint8_t> block(params.geometry.max_block_bytes());
  EncodeScratch scratch;
  encode_block(params, k.data(), v.data(), 64, block.data(), scratch);
  format::HeadEntry entry;
  std::memcpy(&entry, block.data() + params.geometry.directory_offset(), sizeof entry);
  const std::uint8_t* order = block.data() + params.geometry.permutation_offset();
  std::vector<std::uint8_t> codes(n);
  unpack_section_codes(params.geometry.v_layout(), block.data() + entry.v_offset, codes.data());
  // Independently quantize each original token and compare with the stored (permuted) codes.
  int previous_median = -1;
  for (int i = 0; i < 64; ++i) {
    const float* row = v.data() + order[i] * 64;
    const float lo = *std::min_element(row, row + 64), hi = *std::max_element(row, row + 64);
    const format::Quantizer q = format::make_quantizer(lo, hi, params.v_max_code);
    std::vector<int> sorted;
    for (int ch = 0; ch < 64; ++ch) {
      const int code = format::quantize(row[ch], q, params.v_max_code);
      ASSERT_EQ(codes[i * 64 + ch], code) << "packed token " << i << " channel " << ch;
      sorted.push_back(code);
    }
    // Median repacking: medians never decrease along the stored order.
    std::sort(sorted.begin(), sorted.end());
    EXPECT_GE(sorted[31], previous_median);
    previous_median = sorted[31];
  }
}

TEST(Codec, RepackingShrinksBlocksOnCorrelatedTokens) {
  // Tokens come in two interleaved families with very different V medians: sorting groups them.
  CacheConfig cfg;
  cfg.head_dim = 64;
  cfg.block_tokens = 64;
  cfg.k_rel = 0.1f;
  cfg.v_rel = 0.1f;
  const std::size_t n = 64 * 64;
  std::vector<float> k(n), v(n);
  synthetic::Rng rng(3);
  for (int t = 0; t < 64; ++t) {
    for (int c = 0; c < 64; ++c) {
      const double family = (t % 2) ? 1.0 : -1.0;
      // Channels 0 and 1 pin every token's range to [-3, 3]; the bulk sits high or low in it.
      v[t * 64 + c] = static_cast<float>(c == 0 ? 3.0 : c == 1 ? -3.0 : family * 0.8 + 0.1 * rng.normal());
      k[t * 64 + c] = static_cast<float>(family * (c % 8) + 0.1 * rng.normal());
    }
  }
  std::uint32_t sizes[3];
  int i = 0;
  for (RepackMethod m : {RepackMethod::none, RepackMethod::median, RepackMethod::greedy}) {
    cfg.repack = m;
    const CodecParams params = make_codec_params(cfg);
    std::vector<std::uint8_t> block(params.geometry.max_block_bytes());
    EncodeScratch scratch;
    sizes[i++] = encode_block(params, k.data(), v.data(), 64, block.data(), scratch);
  }
  EXPECT_LT(sizes[1], sizes[0]) << "median repacking should beat arrival order here";
  EXPECT_LT(sizes[2], sizes[0]) << "greedy repacking should beat arrival order here";
}

TEST(Codec, RejectsNonFiniteAndOutOfRangeValues) {
  CacheConfig cfg;
  cfg.head_dim = 16;
  cfg.block_tokens = 16;
  const CodecParams params = make_codec_params(cfg);
  std::vector<std::uint8_t> block(params.geometry.max_block_bytes());
  EncodeScratch scratch;
  for (float bad : {NAN, INFINITY, -INFINITY, 70000.0f, -1e6f}) {
    std::vector<float> k(256, 1.0f), v(256, 1.0f);
    k[37] = bad;
    test::expect_error([&] { encode_block(params, k.data(), v.data(), 16, block.data(), scratch); }, "token 2");
  }
}

// One block of `row`-wide rows, trimmed to its size.
std::vector<std::uint8_t> encode_one(const CodecParams& params, const std::vector<float>& k,
                                     const std::vector<float>& v, std::size_t row) {
  std::vector<std::uint8_t> block(params.geometry.max_block_bytes());
  EncodeScratch scratch;
  block.resize(encode_block(params, k.data(), v.data(), row, block.data(), scratch));
  return block;
}

TEST(Codec, RoundKindFollowsTheData) {
  // Per-token V, rel 0.1 (4-bit codes), no repacking: noisy rounds are stored plain, rounds of a
  // repeated channel profile as frame of reference; the section size is what the rounds need.
  CodecCase c{0.05f, 64, 64, QuantMode::per_token, RepackMethod::none};
  const CacheConfig cfg = config_for(c, 1);
  const CodecParams params = make_codec_params(cfg);
  const std::vector<std::uint8_t> block =
      encode_one(params, test::mixed_rounds_values(64, 64, 21), test::mixed_rounds_values(64, 64, 22), 64);
  format::HeadEntry entry;
  std::memcpy(&entry, block.data() + params.geometry.directory_offset(), sizeof entry);
  const format::SectionLayout layout = params.geometry.v_layout();
  const std::uint8_t* section = block.data() + entry.v_offset;
  std::vector<std::uint8_t> codes(64 * 64);
  unpack_section_codes(layout, section, codes.data());
  for (std::uint32_t r = 0; r < layout.rounds; ++r) {
    // Expected size from the codes alone: plain, or descriptors plus 2 * width bytes per pack.
    std::uint32_t for_bytes = layout.head_dim / 2 + layout.head_dim * layout.bits / 8;
    for (int ch = 0; ch < 64; ++ch) {
      int lo = 255, hi = 0;
      for (int i = 0; i < 16; ++i) {
        lo = std::min<int>(lo, codes[(r * 16 + i) * 64 + ch]);
        hi = std::max<int>(hi, codes[(r * 16 + i) * 64 + ch]);
      }
      int width = 0;
      while ((hi - lo) >> width) ++width;
      for_bytes += 2 * width;
    }
    const std::uint32_t plain_bytes = 64 * 2 * layout.bits;
    const std::uint32_t size = format::round_end(section, layout, r) - format::round_begin(section, layout, r);
    EXPECT_EQ(size, std::min(for_bytes, plain_bytes)) << "round " << r;
    EXPECT_EQ(format::round_view(section, layout, r).plain, r % 2 == 0) << "round " << r;
  }
}

TEST(Codec, ValidateRejectsCorruptBlocks) {
  CodecCase c{0.1f, 32, 32, QuantMode::per_token, RepackMethod::none};
  const CacheConfig cfg = config_for(c, 2);
  const CodecParams params = make_codec_params(cfg);
  const std::vector<std::uint8_t> good =
      encode_one(params, test::mixed_rounds_values(32, 64, 11), test::mixed_rounds_values(32, 64, 12), 64);
  ASSERT_NO_THROW(validate_block(params, good));
  format::HeadEntry e;
  std::memcpy(&e, good.data() + params.geometry.directory_offset(), sizeof e);
  const format::SectionLayout kl = params.geometry.k_layout();
  // Head 0's K: round 0 plain, round 1 frame of reference (4-bit codes, largest code 10).
  ASSERT_TRUE(format::round_view(good.data() + e.k_offset, kl, 0).plain);
  ASSERT_FALSE(format::round_view(good.data() + e.k_offset, kl, 1).plain);
  const std::size_t round1 = e.k_offset + kl.rounds_offset + format::round_end(good.data() + e.k_offset, kl, 0);

  auto corrupt = [&](auto&& mutate, const std::string& needle) {
    std::vector<std::uint8_t> bad = good;
    mutate(bad);
    test::expect_error([&] { validate_block(params, bad); }, needle);
  };
  corrupt([](auto& b) { b[10] = 9; }, "version");                        // header version byte
  corrupt([](auto& b) { b[8] = 9; }, "heads");                           // header num_heads
  corrupt([](auto& b) { b.resize(b.size() - 16); }, "bytes");            // truncated
  corrupt([&](auto& b) { b[params.geometry.directory_offset()] += 16; }, "offset");
  corrupt([&](auto& b) { b[e.k_offset + kl.round_end_offset] += 1; }, "round 0");    // round table
  corrupt([&](auto& b) { b[round1] = 0x0F; }, "width");                 // channel 0: width 15
  corrupt([&](auto& b) {  // a pack one bit narrower: the packs end before the round does
    std::uint32_t c = 0;
    while (c + 1 < 32 && format::stream_value(b.data() + round1, c, 4) == 0) ++c;  // head_dim 32
    b[round1 + c / 2] = static_cast<std::uint8_t>(b[round1 + c / 2] - (c % 2 ? 0x10 : 0x01));
  }, "bytes of packs");
  corrupt([&](auto& b) { b[round1 + kl.widths_bytes] = 0xFF; }, "min");  // channel 0: min 15 > 10
  corrupt([&](auto& b) { b[e.k_offset + kl.rounds_offset] = 0xFF; }, "holds code");  // plain code 15
  corrupt([&](auto& b) {
    b[e.k_offset + 1] = 0x7C;  // step of token 0 becomes inf (fp16 0x7Cxx)
  }, "parameter");
}

TEST(Codec, ValidateRejectsBadPermutations) {
  CodecCase c{0.1f, 32, 32, QuantMode::per_token, RepackMethod::median};
  const CacheConfig cfg = config_for(c, 2);
  const CodecParams params = make_codec_params(cfg);
  const std::vector<std::uint8_t> good = encode_one(params, random_values(32 * 64, 11), random_values(32 * 64, 12), 64);
  ASSERT_NO_THROW(validate_block(params, good));
  for (int entry : {0, 1}) {
    std::vector<std::uint8_t> bad = good;
    const std::size_t at = params.geometry.permutation_offset();
    if (entry == 0) bad[at] = 200;
    else bad[at + 1] = bad[at];
    test::expect_error([&] { validate_block(params, bad); }, "permutation");
  }
}

// Fixed input for the golden file: a formula, so the input never depends on a generator.
void golden_input(std::vector<float>& k, std::vector<float>& v, std::size_t n) {
  k.resize(n);
  v.resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    const double x = static_cast<double>(i);
    k[i] = static_cast<float>(std::sin(x * 0.37) * 2.0 + ((i % 16) == 3 ? 5.0 : 0.0));
    v[i] = static_cast<float>(std::cos(x * 0.11) + 0.25 * std::sin(x * 1.7));
  }
}

// The golden file of one block version: the encoder's bytes must not change without a new version.
void check_golden(bool compact, const char* file) {
  CacheConfig cfg;
  cfg.compact_params = compact;
  cfg.num_kv_heads = 2;
  cfg.num_q_heads = 2;
  cfg.head_dim = 16;
  cfg.block_tokens = 32;
  cfg.k_rel = 0.1f;
  cfg.v_rel = 0.2f;
  cfg.repack = RepackMethod::median;
  const CodecParams params = make_codec_params(cfg);
  const std::size_t row = 32, n = 32 * row;
  std::vector<float> k, v;
  golden_input(k, v, n);
  std::vector<std::uint8_t> block(params.geometry.max_block_bytes());
  EncodeScratch scratch;
  block.resize(encode_block(params, k.data(), v.data(), row, block.data(), scratch));

  const std::string path = std::string(PACKKV_TEST_DATA_DIR) + "/" + file;
  if (std::getenv("PACKKV_WRITE_GOLDEN")) {
    std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(block.data()),
                                                static_cast<std::streamsize>(block.size()));
  }
  std::ifstream in(path, std::ios::binary);
  ASSERT_TRUE(in) << "missing " << path;
  const std::vector<std::uint8_t> golden((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ASSERT_EQ(golden.size(), block.size()) << "the encoder's output size changed: format change?";
  for (std::size_t i = 0; i < golden.size(); ++i) ASSERT_EQ(golden[i], block[i]) << "byte " << i << " differs";

  // The golden bytes also decode to the input within each token's bound (they are not just any bytes).
  std::vector<float> k2(n), v2(n);
  decode_block(params, golden.data(), k2.data(), v2.data(), row);
  for (std::size_t t = 0; t < 32; ++t) {
    for (int head = 0; head < 2; ++head) {
      for (int which = 0; which < 2; ++which) {
        const float* x = (which ? v.data() : k.data()) + t * row + head * 16;
        const float* y = (which ? v2.data() : k2.data()) + t * row + head * 16;
        // Compact steps are up to 1/16 coarser than fp16 ones (the grid of step codes).
        const double bound = error_bound(*std::min_element(x, x + 16), *std::max_element(x, x + 16),
                                         which ? cfg.v_rel : cfg.k_rel) * (compact ? 17.0 / 16.0 : 1.0);
        for (int c = 0; c < 16; ++c) ASSERT_LE(std::fabs(x[c] - y[c]), bound) << "token " << t << " channel " << c;
      }
    }
  }
  format::BlockHeader h;
  std::memcpy(&h, golden.data(), sizeof h);
  EXPECT_EQ(h.version, compact ? 3 : 2);
  EXPECT_EQ(h.block_tokens, 32);
  EXPECT_EQ(h.head_dim, 16);
  EXPECT_EQ(h.num_heads, 2);
  EXPECT_EQ(h.k_bits, 4);
  EXPECT_EQ(h.v_bits, 3);
  EXPECT_EQ(h.flags, format::kFlagPermuted);
  // The golden bytes pin both kinds of round.
  int plain = 0, frame_of_reference = 0;
  for (int head = 0; head < 2; ++head) {
    format::HeadEntry e;
    std::memcpy(&e, golden.data() + params.geometry.directory_offset() + head * sizeof e, sizeof e);
    for (std::uint32_t r = 0; r < 2; ++r) {
      (format::round_view(golden.data() + e.k_offset, params.geometry.k_layout(), r).plain ? plain : frame_of_reference)++;
      (format::round_view(golden.data() + e.v_offset, params.geometry.v_layout(), r).plain ? plain : frame_of_reference)++;
    }
  }
  EXPECT_GT(plain, 0);
  EXPECT_GT(frame_of_reference, 0);
}

TEST(Codec, GoldenBlockIsByteIdentical) { check_golden(false, "golden_block_v2.bin"); }
TEST(Codec, GoldenCompactBlockIsByteIdentical) { check_golden(true, "golden_block_v3.bin"); }

// The SIMD section kernels must agree with arithmetic on the reference-unpacked codes.
TEST(CpuKernels, SectionScoresAndValuesMatchScalarReference) {
  for (detail::cpu::Isa isa : {detail::cpu::Isa::scalar, detail::cpu::Isa::avx2}) {
  if (!detail::cpu::supported(isa)) continue;
  const detail::cpu::Kernels& kern = detail::cpu::kernels_for(isa);
  for (auto [dim, block, rel, per_channel, groups] :
       {std::tuple{64, 64, 0.1f, false, 4}, std::tuple{128, 32, 0.02f, false, 1}, std::tuple{8, 16, 1.0f, false, 3},
        std::tuple{80, 48, 0.1f, true, 8}, std::tuple{256, 16, 1.0f / 200, true, 2}}) {
    CacheConfig cfg;
    cfg.head_dim = dim;
    cfg.block_tokens = block;
    cfg.k_rel = rel;
    cfg.v_rel = rel;
    cfg.k_mode = per_channel ? QuantMode::per_channel : QuantMode::per_token;
    const CodecParams params = make_codec_params(cfg);
    const std::size_t n = static_cast<std::size_t>(block) * dim;
    // Both kinds of round in K and V.
    const std::vector<float> k = test::mixed_rounds_values(block, dim, dim + block);
    const std::vector<float> v = test::mixed_rounds_values(block, dim, dim * block);
    std::vector<std::uint8_t> buf(params.geometry.max_block_bytes());
    EncodeScratch scratch;
    encode_block(params, k.data(), v.data(), dim, buf.data(), scratch);
    format::HeadEntry e;
    std::memcpy(&e, buf.data() + params.geometry.directory_offset(), sizeof e);
    // Dequantized K and V in stored order, from the scalar reference decoder.
    std::vector<float> kd(n), vd(n);
    decode_block(params, buf.data(), kd.data(), vd.data(), dim);
    const std::uint8_t* order = buf.data() + params.geometry.permutation_offset();

    const std::vector<float> q = random_values(static_cast<std::size_t>(groups) * dim, 77);
    std::vector<float> s(static_cast<std::size_t>(groups) * block);
    kern.section_scores(params.geometry.k_layout(), per_channel, buf.data() + e.k_offset, q.data(), groups,
                                s.data(), block);
    const std::vector<float> w = random_values(static_cast<std::size_t>(groups) * block, 78);
    detail::cpu::AlignedFloats acc(static_cast<std::size_t>(groups) * dim * 8, 0.0f);
    std::vector<float> min_term(groups, 0.0f), out(static_cast<std::size_t>(groups) * dim);
    kern.section_accumulate_v(params.geometry.v_layout(), buf.data() + e.v_offset, w.data(), block, groups,
                                      acc.data(), min_term.data());
    detail::cpu::finish_v(acc.data(), min_term.data(), groups, dim, out.data());
    for (int g = 0; g < groups; ++g) {
      for (int i = 0; i < block; ++i) {
        double ref = 0, mag = 0;
        for (int c = 0; c < dim; ++c) {
          ref += static_cast<double>(q[g * dim + c]) * kd[order[i] * dim + c];
          mag += std::fabs(static_cast<double>(q[g * dim + c]) * kd[order[i] * dim + c]);
        }
        ASSERT_NEAR(s[g * block + i], ref, 1e-5 * mag + 1e-6) << "score g " << g << " i " << i << " dim " << dim;
      }
      for (int c = 0; c < dim; ++c) {
        double ref = 0, mag = 0;
        for (int i = 0; i < block; ++i) {
          ref += static_cast<double>(w[g * block + i]) * vd[order[i] * dim + c];
          mag += std::fabs(static_cast<double>(w[g * block + i]) * vd[order[i] * dim + c]);
        }
        ASSERT_NEAR(out[g * dim + c], ref, 1e-5 * mag + 1e-6) << "value g " << g << " c " << c << " dim " << dim;
      }
    }
  }
  }
}

}  // namespace
}  // namespace packkv

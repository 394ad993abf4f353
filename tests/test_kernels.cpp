// The CPU kernel sets (scalar and AVX2, both in this binary) against the format's scalar
// reference: integer paths bit for bit, exhaustively where the input space allows; dequantized
// values bit for bit; the floating-point products within fp32 tolerance.
#include <bit>
#include <cstring>
#include <tuple>

#include "cpu_kernels/kernels.hpp"
#include "test_util.hpp"

namespace packkv {
namespace {

using detail::cpu::Isa;
using detail::cpu::Kernels;

std::vector<const Kernels*> kernel_sets() {
  std::vector<const Kernels*> sets;
  for (Isa isa : {Isa::scalar, Isa::avx2}) {
    if (detail::cpu::supported(isa)) sets.push_back(&detail::cpu::kernels_for(isa));
  }
  return sets;
}

TEST(Kernels, DispatchPicksTheBestSupportedSet) {
  EXPECT_TRUE(detail::cpu::supported(Isa::scalar));
  EXPECT_EQ(detail::cpu::kernels().isa, detail::cpu::supported(Isa::avx2) ? Isa::avx2 : Isa::scalar);
  if (!detail::cpu::supported(Isa::avx2)) {
    EXPECT_THROW(detail::cpu::kernels_for(Isa::avx2), error);
  }
  RecordProperty("kernels", detail::cpu::to_string(detail::cpu::kernels().isa));
}

// Checks one 8-byte input at every width against format::unpack8.
void check_unpack8(const Kernels& k, const std::uint8_t (&bytes)[8], std::uint32_t width) {
  std::uint8_t want[8];
  format::unpack8(bytes, width, want);
  std::uint32_t got[8];
  k.unpack8(bytes, width, got);
  for (int i = 0; i < 8; ++i) {
    ASSERT_EQ(got[i], want[i]) << detail::cpu::to_string(k.isa) << " width " << width << " value " << i << " bytes "
                               << std::hex << static_cast<int>(bytes[0]) << " " << static_cast<int>(bytes[1]);
  }
}

TEST(Kernels, Unpack8MatchesTheSpecForEveryWidthAndBytePattern) {
  synthetic::Rng rng(5);
  for (const Kernels* k : kernel_sets()) {
    for (std::uint32_t width = 0; width <= 8; ++width) {
      std::uint8_t bytes[8];
      // Bytes past the width must not matter: they are random in every case below.
      auto randomise = [&] {
        for (auto& b : bytes) b = static_cast<std::uint8_t>(rng.next());
      };
      if (width <= 2) {  // every pattern of the bytes that hold values
        for (std::uint32_t pattern = 0; pattern < (1u << (8 * width)); ++pattern) {
          randomise();
          for (std::uint32_t b = 0; b < width; ++b) bytes[b] = static_cast<std::uint8_t>(pattern >> (8 * b));
          check_unpack8(*k, bytes, width);
        }
      } else {  // every value of every byte, the others random, then random patterns
        for (std::uint32_t at = 0; at < width; ++at) {
          for (int value = 0; value < 256; ++value) {
            randomise();
            bytes[at] = static_cast<std::uint8_t>(value);
            check_unpack8(*k, bytes, width);
          }
        }
        for (int trial = 0; trial < 20000; ++trial) {
          randomise();
          check_unpack8(*k, bytes, width);
        }
      }
      if (HasFatalFailure()) return;
    }
  }
}

TEST(Kernels, StorageTypeConversionsAreExactForEveryBitPattern) {
  std::vector<fp16_t> halves(65536);
  std::vector<bf16_t> brains(65536);
  for (std::uint32_t i = 0; i < 65536; ++i) {
    halves[i] = fp16_t::from_bits(static_cast<std::uint16_t>(i));
    brains[i] = bf16_t::from_bits(static_cast<std::uint16_t>(i));
  }
  for (const Kernels* k : kernel_sets()) {
    std::vector<float> h(65536), b(65536);
    k->dense_f16.to_float(halves.data(), h.data(), h.size());
    k->dense_bf16.to_float(brains.data(), b.data(), b.size());
    for (std::uint32_t i = 0; i < 65536; ++i) {
      const float want_h = to_float(halves[i]), want_b = to_float(brains[i]);
      ASSERT_EQ(std::memcmp(&h[i], &want_h, 4), 0) << detail::cpu::to_string(k->isa) << " fp16 " << std::hex << i;
      ASSERT_EQ(std::memcmp(&b[i], &want_b, 4), 0) << detail::cpu::to_string(k->isa) << " bf16 " << std::hex << i;
    }
  }
}

// The way back, float to the storage type: the bits of packkv::from_float for every kernel set,
// over every fp16 rounding boundary and its neighbours, every 9973rd float bit pattern, and
// the specials (zeros, infinities, NaNs of both signs, subnormals, the fp16 overflow threshold).
TEST(Kernels, StorageTypeRoundingMatchesTheScalarRule) {
  std::vector<float> x;
  auto add_bits = [&](std::uint32_t u) { x.push_back(std::bit_cast<float>(u)); };
  for (std::uint32_t h = 0; h < 0x7C00u; ++h) {
    const std::uint32_t mid = std::bit_cast<std::uint32_t>(to_float(fp16_t::from_bits(static_cast<std::uint16_t>(h)))) + 0x1000u;
    for (std::uint32_t d : {0u, 1u, 2u}) {
      for (std::uint32_t sign : {0u, 0x80000000u}) {
        add_bits((mid + d) | sign);
        add_bits((mid - d) | sign);
      }
    }
  }
  for (std::uint64_t u = 0; u <= 0xFFFFFFFFull; u += 9973) add_bits(static_cast<std::uint32_t>(u));
  for (std::uint32_t u : {0u, 0x80000000u, 0x7F800000u, 0xFF800000u, 0x7FC00000u, 0xFFC00000u, 0x7F800001u, 0xFFBFFFFFu,
                          0x00000001u, 0x807FFFFFu, 0x477FEFFFu, 0x477FF000u, 0x33000000u, 0x33000001u, 0x7F7FFFFFu})
    add_bits(u);
  while (x.size() % 8 != 3) add_bits(0x3F800000u);  // a scalar remainder as well
  for (const Kernels* k : kernel_sets()) {
    std::vector<fp16_t> h(x.size());
    std::vector<bf16_t> b(x.size());
    k->dense_f16.from_float(x.data(), h.data(), x.size());
    k->dense_bf16.from_float(x.data(), b.data(), x.size());
    for (std::size_t i = 0; i < x.size(); ++i) {
      ASSERT_EQ(h[i].bits, fp16_from_float(x[i]).bits)
          << detail::cpu::to_string(k->isa) << " fp16 of " << std::hex << std::bit_cast<std::uint32_t>(x[i]);
      ASSERT_EQ(b[i].bits, bf16_from_float(x[i]).bits)
          << detail::cpu::to_string(k->isa) << " bf16 of " << std::hex << std::bit_cast<std::uint32_t>(x[i]);
    }
  }
}

struct SectionCase {
  int head_dim, block;
  float rel;
  bool per_channel;
};

// Random blocks in many geometries and code widths; both kinds of round in every section.
TEST(Kernels, SectionCodesAndValuesAreBitExactAcrossKernelSets) {
  const SectionCase cases[] = {{8, 16, 1.0f, false},     {16, 32, 0.5f, true},     {64, 64, 0.1f, false},
                               {128, 64, 0.2f, false},   {128, 128, 0.02f, true},  {256, 16, 1.0f / 255, false},
                               {96, 48, 1.0f / 60, true}, {40, 256, 0.25f, false}, {256, 256, 0.1f, true}};
  std::uint64_t seed = 1;
  for (const SectionCase& c : cases)
  for (bool compact : {false, true}) {
    CacheConfig cfg;
    cfg.compact_params = compact;
    cfg.head_dim = c.head_dim;
    cfg.block_tokens = c.block;
    cfg.k_rel = c.rel;
    cfg.v_rel = std::min(1.0f, 2 * c.rel);
    cfg.k_mode = c.per_channel ? QuantMode::per_channel : QuantMode::per_token;
    const CodecParams params = make_codec_params(cfg);
    const format::BlockGeometry& g = params.geometry;
    const std::size_t n = static_cast<std::size_t>(c.block) * c.head_dim;
    const std::vector<float> k = test::mixed_rounds_values(c.block, c.head_dim, seed++, 3.0);
    const std::vector<float> v = test::mixed_rounds_values(c.block, c.head_dim, seed++);
    std::vector<std::uint8_t> block(g.max_block_bytes());
    EncodeScratch scratch;
    encode_block(params, k.data(), v.data(), c.head_dim, block.data(), scratch);
    for (format::Side side : {format::Side::k, format::Side::v}) {
      const format::SectionLayout layout = g.layout(side);
      const std::uint8_t* section = format::section(block.data(), g, 0, side);
      std::vector<std::uint8_t> ref(n);
      unpack_section_codes(layout, section, ref.data());  // the reference unpacker
      for (const Kernels* kern : kernel_sets()) {
        std::vector<std::uint8_t> codes(n);
        std::vector<float> values(n);
        kern->unpack_section(layout, section, codes.data());
        ASSERT_EQ(codes, ref) << detail::cpu::to_string(kern->isa) << " dim " << c.head_dim << " block " << c.block;
        kern->decode_section(layout, g.per_channel(side), section, values.data());
        for (std::size_t i = 0; i < n; ++i) {
          const std::size_t t = i / c.head_dim, ch = i % c.head_dim;
          const format::GroupParams p =
              format::group_params(section, layout, static_cast<std::uint32_t>(g.per_channel(side) ? ch : t));
          const float want = format::dequantize(ref[i], p.step, p.min);
          ASSERT_EQ(std::memcmp(&values[i], &want, 4), 0)
              << detail::cpu::to_string(kern->isa) << (compact ? " compact" : "") << " element " << i << ": " << values[i] << " vs " << want;
        }
      }
    }
  }
}

// The encoder's row operations give format::quantize's codes and Range's bits on every kernel set,
// zeros of both signs, exact ties and values at the fp16 limit included.
TEST(Kernels, EncoderRowOperationsAreBitExactAcrossKernelSets) {
  synthetic::Rng rng(21);
  for (int trial = 0; trial < 400; ++trial) {
    const std::size_t n = 8 * (1 + rng.next() % 32);
    std::vector<float> x(n);
    for (float& v : x) {
      switch (rng.next() % 6) {
        case 0: v = 0.0f; break;
        case 1: v = -0.0f; break;
        case 2: v = static_cast<float>(static_cast<int>(rng.next() % 21) - 10) * 0.5f; break;  // ties
        case 3: v = trial % 7 == 0 ? 65504.0f : 1.0f; break;
        default: v = static_cast<float>(rng.normal() * 3.0);
      }
    }
    if (trial % 50 == 49) x[rng.next() % n] = NAN;  // not storable
    format::Range want;
    bool want_ok = true;
    for (float v : x) {
      want_ok &= format::storable(v);
      want.extend(v);
    }
    const int max_code = 1 + static_cast<int>(rng.next() % 255);
    const format::Quantizer q = format::make_quantizer(want.lo, want.hi, max_code);
    std::vector<float> lo0(n), hi0(n), mins(n), invs(n);
    for (std::size_t i = 0; i < n; ++i) {
      lo0[i] = static_cast<float>(rng.normal());
      hi0[i] = lo0[i] + 1.0f;
      mins[i] = static_cast<float>(-4.0 + rng.uniform());
      invs[i] = static_cast<float>(rng.uniform() * 4.0);
    }
    for (const Kernels* kern : kernel_sets()) {
      format::Range got;
      const bool ok = kern->row_range(x.data(), n, got);
      ASSERT_EQ(ok, want_ok);
      if (!want_ok) continue;
      ASSERT_EQ(std::memcmp(&got.lo, &want.lo, 4), 0) << got.lo << " " << want.lo;
      ASSERT_EQ(std::memcmp(&got.hi, &want.hi, 4), 0) << got.hi << " " << want.hi;
      std::vector<float> lo = lo0, hi = hi0;
      ASSERT_TRUE(kern->extend_ranges(x.data(), n, lo.data(), hi.data()));
      std::vector<std::uint8_t> codes(n), codes_pc(n);
      if (q.ok) kern->quantize_row(x.data(), n, q, max_code, codes.data());
      kern->quantize_row_per_channel(x.data(), n, mins.data(), invs.data(), max_code, codes_pc.data());
      for (std::size_t i = 0; i < n; ++i) {
        format::Range r{lo0[i], hi0[i]};
        r.extend(x[i]);
        ASSERT_EQ(std::memcmp(&lo[i], &r.lo, 4), 0);
        ASSERT_EQ(std::memcmp(&hi[i], &r.hi, 4), 0);
        if (q.ok) ASSERT_EQ(codes[i], format::quantize(x[i], q, max_code)) << x[i];
        format::Quantizer qc{};
        qc.min = mins[i];
        qc.inv_step = invs[i];
        ASSERT_EQ(codes_pc[i], format::quantize(x[i], qc, max_code)) << x[i];
      }
    }
  }
}

// The floating-point products agree within fp32 rounding (they sum in different orders).
TEST(Kernels, DenseProductsAgreeAcrossKernelSets) {
  const int dim = 128, tokens = 37, groups = 4;
  const std::vector<float> rows = test::random_values(static_cast<std::size_t>(tokens) * dim, 3);
  const std::vector<fp16_t> half_rows = test::convert<fp16_t>(rows);
  const std::vector<float> q = test::random_values(static_cast<std::size_t>(groups) * dim, 4);
  const std::vector<float> w = test::random_values(static_cast<std::size_t>(groups) * tokens, 5);
  std::vector<std::vector<float>> scores, values;
  for (const Kernels* kern : kernel_sets()) {
    std::vector<float> s(static_cast<std::size_t>(groups) * tokens);
    kern->dense_f16.scores(half_rows.data(), dim, tokens, dim, q.data(), groups, s.data(), tokens);
    detail::cpu::AlignedFloats acc(static_cast<std::size_t>(groups) * dim * 8, 0.0f);
    kern->dense_f16.accumulate_v(half_rows.data(), dim, tokens, dim, w.data(), tokens, groups, acc.data());
    scores.push_back(s);
    // Each (group, channel) keeps 8 partial sums (the packed path's layout; kernel sets may
    // spread tokens over them differently): their total is the product.
    std::vector<float> sums(static_cast<std::size_t>(groups) * dim, 0.0f);
    for (std::size_t i = 0; i < sums.size(); ++i) {
      for (int lane = 0; lane < 8; ++lane) sums[i] += acc[i * 8 + static_cast<std::size_t>(lane)];
    }
    values.push_back(sums);
  }
  for (std::size_t set = 1; set < scores.size(); ++set) {
    for (std::size_t i = 0; i < scores[0].size(); ++i) EXPECT_NEAR(scores[set][i], scores[0][i], 1e-4);
    for (std::size_t i = 0; i < values[0].size(); ++i) EXPECT_NEAR(values[set][i], values[0][i], 1e-4);
  }
  // And the values against float64: sum over tokens of weight x the fp16 row's value.
  for (int g = 0; g < groups; ++g) {
    for (int c = 0; c < dim; ++c) {
      double expected = 0.0;
      for (int t = 0; t < tokens; ++t)
        expected += static_cast<double>(w[static_cast<std::size_t>(g) * tokens + t]) *
                    to_float(half_rows[static_cast<std::size_t>(t) * dim + c]);
      for (const std::vector<float>& v : values) EXPECT_NEAR(v[static_cast<std::size_t>(g) * dim + c], expected, 1e-4);
    }
  }
}

TEST(Kernels, SoftmaxRowsAgreeAcrossKernelSets) {
  const int n = 203;
  const std::vector<float> scores = test::random_values(2 * static_cast<std::size_t>(n), 8, 4.0);
  std::vector<std::vector<float>> rows;
  std::vector<std::pair<float, float>> stats;
  for (const Kernels* kern : kernel_sets()) {
    std::vector<float> s = scores;
    float max[2], sum[2];
    kern->softmax_rows(s.data(), n, n, 2, max, sum);
    rows.push_back(s);
    stats.emplace_back(max[1], sum[1]);
  }
  for (std::size_t set = 1; set < rows.size(); ++set) {
    EXPECT_EQ(stats[set].first, stats[0].first);
    EXPECT_NEAR(stats[set].second, stats[0].second, 2e-6 * stats[0].second);
    for (std::size_t i = 0; i < rows[0].size(); ++i) EXPECT_NEAR(rows[set][i], rows[0][i], 2e-7 * rows[0][i] + 1e-30);
  }
}

}  // namespace
}  // namespace packkv

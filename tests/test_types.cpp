#include <cmath>
#include <cstdint>
#include <limits>

#include <gtest/gtest.h>

#include "packkv/types.hpp"

namespace packkv {
namespace {

TEST(Fp16, EveryFiniteHalfRoundTripsThroughFloat) {
  for (std::uint32_t b = 0; b < 0x10000; ++b) {
    const fp16_t h = fp16_t::from_bits(static_cast<std::uint16_t>(b));
    const float f = to_float(h);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(to_float(fp16_from_float(f))));
      continue;
    }
    EXPECT_EQ(fp16_from_float(f).bits, h.bits) << "bits " << b;
  }
}

TEST(Fp16, KnownValues) {
  EXPECT_EQ(fp16_from_float(1.0f).bits, 0x3C00);
  EXPECT_EQ(fp16_from_float(-2.0f).bits, 0xC000);
  EXPECT_EQ(fp16_from_float(65504.0f).bits, 0x7BFF);
  EXPECT_EQ(fp16_from_float(65520.0f).bits, 0x7C00);  // rounds to inf
  EXPECT_EQ(fp16_from_float(5.9604644775390625e-8f).bits, 0x0001);
  EXPECT_EQ(fp16_from_float(2.98e-8f).bits, 0x0000);
  EXPECT_FLOAT_EQ(to_float(fp16_t::from_bits(0x3555)), 0.333251953125f);
}

TEST(Fp16, RoundToNearestEvenMatchesDoubleReference) {
  // Compare against a reference that picks the nearer of the two neighbouring halves.
  std::uint32_t state = 12345;
  for (int i = 0; i < 200000; ++i) {
    state = state * 1664525u + 1013904223u;
    const float f = std::ldexp(static_cast<float>(state >> 8) / 16777216.0f, static_cast<int>(state % 40) - 26);
    const fp16_t h = fp16_from_float(f);
    const double got = to_float(h);
    const fp16_t up = fp16_t::from_bits(static_cast<std::uint16_t>(h.bits + 1));
    const fp16_t down = fp16_t::from_bits(static_cast<std::uint16_t>(h.bits - 1));
    if (h.bits != 0) EXPECT_LE(std::abs(got - f), std::abs(static_cast<double>(to_float(down)) - f));
    if (h.bits < 0x7BFF) EXPECT_LE(std::abs(got - f), std::abs(static_cast<double>(to_float(up)) - f));
  }
}

TEST(Fp16, DirectedRoundingBracketsTheValue) {
  const double values[] = {0.0, 1e-9, -1e-9, 0.1, -0.1, 3.14159, -65504.0, 65504.0, 1234.5678, -7e-6};
  for (double x : values) {
    const float lo = to_float(fp16_round_down(x));
    EXPECT_LE(lo, x);
    if (x >= 0) {
      const float hi = to_float(fp16_round_up(x));
      EXPECT_GE(hi, x);
      if (x > 0) EXPECT_LT(to_float(fp16_t::from_bits(static_cast<std::uint16_t>(fp16_round_up(x).bits - 1))), x);
    }
  }
}

TEST(Bf16, RoundTripAndRounding) {
  for (std::uint32_t b = 0; b < 0x10000; b += 7) {
    const bf16_t h = bf16_t::from_bits(static_cast<std::uint16_t>(b));
    const float f = to_float(h);
    if (std::isnan(f)) continue;
    EXPECT_EQ(bf16_from_float(f).bits, h.bits);
  }
  EXPECT_EQ(bf16_from_float(1.0f).bits, 0x3F80);
  // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: ties to even keeps 1.
  EXPECT_EQ(bf16_from_float(1.00390625f).bits, 0x3F80);
  EXPECT_EQ(bf16_from_float(1.01171875f).bits, 0x3F82);
  EXPECT_TRUE(std::isnan(to_float(bf16_from_float(std::numeric_limits<float>::quiet_NaN()))));
}

}  // namespace
}  // namespace packkv

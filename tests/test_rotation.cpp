// The Hadamard rotation of head vectors (CacheConfig::rotate_k / rotate_v), CPU backend: the
// transform itself, what it does to the quantization error of outlier channels, attention and
// read_back through it, and images that record it.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/rotation.hpp"
#include "cpu/attention.hpp"
#include "packkv/cache.hpp"
#include "test_util.hpp"

namespace packkv {
namespace {

using test::convert;
using test::expect_error;
using test::random_values;

TEST(Rotation, IsOrthogonalAndUndoesItself) {
  for (int dim : {8, 40, 64, 96, 128, 256}) {
    const auto x = random_values(static_cast<std::size_t>(dim), 3 + dim, 2.0);
    std::vector<float> y = x;
    detail::rotate_forward(y.data(), dim);
    double nx = 0, ny = 0, moved = 0;
    for (int c = 0; c < dim; ++c) {
      nx += static_cast<double>(x[c]) * x[c];
      ny += static_cast<double>(y[c]) * y[c];
      moved += std::fabs(static_cast<double>(y[c]) - x[c]);
    }
    EXPECT_NEAR(ny, nx, 1e-5 * nx) << "dim " << dim;
    EXPECT_GT(moved, 0.1) << "dim " << dim << ": the rotation changed nothing";
    detail::rotate_back(y.data(), dim);
    for (int c = 0; c < dim; ++c) ASSERT_NEAR(y[c], x[c], 1e-5 * std::sqrt(nx)) << "dim " << dim << " channel " << c;
  }
}

// The CPU's rows rotation (sign masks fixed in advance, stages with a compile-time chunk) gives
// the bits of the format's rotate_forward / rotate_back, which the CUDA kernels run: every chunk
// size, both directions, storage types that round.
TEST(Rotation, HostRowsMatchTheSharedTransformBitForBit) {
  for (int dim : {8, 16, 24, 32, 40, 64, 96, 128, 192, 256}) {
    const std::size_t vectors = 3;
    const auto x = random_values(vectors * static_cast<std::size_t>(dim), 70 + dim, 3.0);
    for (bool forward : {true, false}) {
      std::vector<float> rows(x.size());
      detail::cpu::rotate_rows(x.data(), rows.data(), vectors, dim, forward, 1);
      std::vector<float> in_place = x;
      detail::cpu::rotate_rows_back(in_place.data(), vectors, dim, 1);
      std::vector<fp16_t> halves(x.size());
      const std::vector<fp16_t> x16 = convert<fp16_t>(x);
      detail::cpu::rotate_rows(x16.data(), halves.data(), vectors, dim, forward, 1);
      for (std::size_t v = 0; v < vectors; ++v) {
        std::vector<float> want(x.begin() + v * dim, x.begin() + (v + 1) * dim);
        std::vector<float> want16(static_cast<std::size_t>(dim));
        for (int c = 0; c < dim; ++c) want16[c] = to_float(x16[v * dim + c]);
        if (forward) {
          detail::rotate_forward(want.data(), dim);
          detail::rotate_forward(want16.data(), dim);
        } else {
          detail::rotate_back(want.data(), dim);
          detail::rotate_back(want16.data(), dim);
        }
        for (int c = 0; c < dim; ++c) {
          const std::size_t i = v * dim + c;
          ASSERT_EQ(std::bit_cast<std::uint32_t>(rows[i]), std::bit_cast<std::uint32_t>(want[c]))
              << "dim " << dim << (forward ? " forward" : " back") << " vector " << v << " channel " << c;
          if (!forward) ASSERT_EQ(std::bit_cast<std::uint32_t>(in_place[i]), std::bit_cast<std::uint32_t>(want[c]));
          ASSERT_EQ(halves[i].bits, from_float<fp16_t>(want16[c]).bits) << "fp16, dim " << dim << " channel " << c;
        }
      }
    }
  }
}

TEST(Rotation, SpreadsOneChannelOverItsChunk) {
  // head_dim 96: chunks of 32 (the largest power of two dividing it); a unit vector on channel
  // 40 becomes +-1/sqrt(32) on channels 32..63 and 0 elsewhere.
  std::vector<float> x(96, 0.0f);
  x[40] = 1.0f;
  detail::rotate_forward(x.data(), 96);
  for (int c = 0; c < 96; ++c) {
    const double expected = c >= 32 && c < 64 ? 1.0 / std::sqrt(32.0) : 0.0;
    EXPECT_NEAR(std::fabs(x[c]), expected, 1e-7) << c;
  }
  EXPECT_EQ(detail::rotation_chunk(96), 32);
  EXPECT_EQ(detail::rotation_chunk(128), 128);
  EXPECT_EQ(detail::rotation_chunk(40), 8);
}

CacheConfig rotation_config(bool rotate_k, bool rotate_v) {
  CacheConfig c;
  c.num_layers = 1;
  c.num_kv_heads = 2;
  c.num_q_heads = 4;
  c.head_dim = 64;
  c.block_tokens = 32;
  c.residual_tokens = 8;
  c.k_rel = 0.1f;
  c.v_rel = 0.1f;
  c.rotate_k = rotate_k;
  c.rotate_v = rotate_v;
  return c;
}

/// Values with two outlier channels per head (the case rotation is for): [n][kv_heads][dim].
std::vector<float> outlier_values(const CacheConfig& c, int n, std::uint64_t seed) {
  auto x = random_values(static_cast<std::size_t>(n) * c.num_kv_heads * c.head_dim, seed);
  for (int t = 0; t < n; ++t) {
    for (int h = 0; h < c.num_kv_heads; ++h) {
      float* row = x.data() + (static_cast<std::size_t>(t) * c.num_kv_heads + h) * c.head_dim;
      row[5] *= 25.0f;
      row[33] = 20.0f + row[33];
    }
  }
  return x;
}

double mean_squared_error(const CacheConfig& c, const std::vector<float>& k, const std::vector<float>& v, int n,
                          bool of_v) {
  PackedKVCache<float> cache(c);
  cache.add_sequence(1);
  cache.append(1, 0, k.data(), v.data(), n);
  std::vector<float> rk(k.size()), rv(v.size());
  cache.read_back(1, 0, rk.data(), rv.data());
  const std::vector<float>& x = of_v ? v : k;
  const std::vector<float>& r = of_v ? rv : rk;
  double sum = 0;
  for (std::size_t i = 0; i < x.size(); ++i) sum += (static_cast<double>(r[i]) - x[i]) * (r[i] - x[i]);
  return sum / static_cast<double>(x.size());
}

// read_back returns unrotated values, and with outlier channels the rotated side's error under the
// same rel is several times smaller; the other side is untouched.
TEST(Rotation, ShrinksTheErrorOfOutlierChannels) {
  const int n = 256;
  const CacheConfig plain = rotation_config(false, false);
  const auto k = outlier_values(plain, n, 1), v = outlier_values(plain, n, 2);
  const double v_plain = mean_squared_error(plain, k, v, n, true);
  const double v_rotated = mean_squared_error(rotation_config(false, true), k, v, n, true);
  const double k_rotated = mean_squared_error(rotation_config(true, false), k, v, n, false);
  const double k_plain = mean_squared_error(plain, k, v, n, false);
  EXPECT_LT(v_rotated, 0.25 * v_plain) << "V error, rotated " << v_rotated << " vs plain " << v_plain;
  EXPECT_LT(k_rotated, 0.25 * k_plain) << "K error, rotated " << k_rotated << " vs plain " << k_plain;
  EXPECT_EQ(mean_squared_error(rotation_config(true, false), k, v, n, true), v_plain);  // V not rotated
}

// A rotated cache stores exactly what a plain cache stores for inputs rotated beforehand (each
// vector rotated in float and rounded to T): images differ only in their header.
TEST(Rotation, StoresTheRotatedInputsBlockForBlock) {
  const CacheConfig rotated_config = rotation_config(true, true);
  CacheConfig plain_config = rotation_config(false, false);
  const int n = 100;
  const auto k = convert<fp16_t>(outlier_values(plain_config, n, 5)), v = convert<fp16_t>(outlier_values(plain_config, n, 6));
  auto pre_rotate = [&](std::vector<fp16_t> x) {
    for (std::size_t i = 0; i < x.size(); i += plain_config.head_dim) {
      float row[64];
      for (int c = 0; c < 64; ++c) row[c] = to_float(x[i + c]);
      detail::rotate_forward(row, 64);
      for (int c = 0; c < 64; ++c) x[i + c] = from_float<fp16_t>(row[c]);
    }
    return x;
  };
  PackedKVCache<fp16_t> rotated(rotated_config), plain(plain_config);
  rotated.add_sequence(1);
  plain.add_sequence(1);
  rotated.append(1, 0, k.data(), v.data(), n);
  const auto rk = pre_rotate(k), rv = pre_rotate(v);
  plain.append(1, 0, rk.data(), rv.data(), n);
  const auto a = rotated.export_sequence(1), b = plain.export_sequence(1);
  ASSERT_EQ(a.size(), b.size());
  EXPECT_TRUE(std::equal(a.begin() + 48, a.end(), b.begin() + 48)) << "bodies differ";
  EXPECT_NE(a[offsetof(format::ImageHeader, options)], b[offsetof(format::ImageHeader, options)]);
}

// Attention in the rotated space equals float64 attention over the unrotated read_back values,
// with the query the cache used: rotated, rounded to T, rotated back.
template <class T>
void check_rotated_attention(bool rotate_k, bool rotate_v) {
  const CacheConfig c = rotation_config(rotate_k, rotate_v);
  PackedKVCache<T> cache(c);
  const int n = 150, dim = c.head_dim, group = c.num_q_heads / c.num_kv_heads;
  cache.add_sequence(1);
  const auto k = convert<T>(outlier_values(c, n, 7)), v = convert<T>(outlier_values(c, n, 8));
  cache.append(1, 0, k.data(), v.data(), n);
  const std::size_t row = static_cast<std::size_t>(c.num_kv_heads) * dim;
  std::vector<float> rk(n * row), rv(n * row);
  cache.read_back(1, 0, rk.data(), rv.data());
  const auto q = convert<T>(random_values(static_cast<std::size_t>(c.num_q_heads) * dim, 9));
  std::vector<T> out(q.size(), from_float<T>(NAN));
  const SeqId id = 1;
  const float scale = 0.125f;
  cache.attention(std::span(&id, 1), 0, q.data(), out.data(), scale);
  double vmax = 0;
  for (float x : rv) vmax = std::max(vmax, static_cast<double>(std::fabs(x)));
  for (int h = 0; h < c.num_q_heads; ++h) {
    float qe[64];
    for (int d = 0; d < dim; ++d) qe[d] = to_float(q[h * dim + d]);
    if (rotate_k) {
      detail::rotate_forward(qe, dim);
      for (int d = 0; d < dim; ++d) qe[d] = to_float(from_float<T>(qe[d]));
      detail::rotate_back(qe, dim);
    }
    const auto ref = test::reference_attention(rk.data(), rv.data(), n, c.num_kv_heads, dim, h / group, qe, scale);
    double ref_max = 0;
    for (double x : ref) ref_max = std::max(ref_max, std::fabs(x));
    for (int d = 0; d < dim; ++d) {
      const double u = test::unit_roundoff<T>();
      // The output is rounded to T in the rotated space and again after rotating back.
      const double tol = 2 * u * std::fabs(ref[d]) + (rotate_v ? 2 * u * ref_max : 0.0) + 2e-5 * vmax;
      ASSERT_NEAR(to_float(out[h * dim + d]), ref[d], tol) << "head " << h << " dim " << d;
    }
  }
}

TEST(Rotation, AttentionMatchesTheReferenceOverReadBack) {
  for (auto [rk, rv] : {std::pair{true, false}, std::pair{false, true}, std::pair{true, true}}) {
    check_rotated_attention<float>(rk, rv);
    check_rotated_attention<fp16_t>(rk, rv);
    check_rotated_attention<bf16_t>(rk, rv);
    if (HasFatalFailure()) return;
  }
}

// scores sees the same rotated query; attn_v's output comes back out of V's space.
TEST(Rotation, PrimitivesWorkInTheUnrotatedSpace) {
  const CacheConfig c = rotation_config(true, true);
  PackedKVCache<float> cache(c);
  const int n = 70, dim = c.head_dim, group = c.num_q_heads / c.num_kv_heads;
  cache.add_sequence(1);
  const auto k = outlier_values(c, n, 11), v = outlier_values(c, n, 12);
  cache.append(1, 0, k.data(), v.data(), n);
  const std::size_t row = static_cast<std::size_t>(c.num_kv_heads) * dim;
  std::vector<float> rk(n * row), rv(n * row);
  cache.read_back(1, 0, rk.data(), rv.data());
  const auto q = random_values(static_cast<std::size_t>(c.num_q_heads) * dim, 13);
  std::vector<float> scores(static_cast<std::size_t>(c.num_q_heads) * n), out(q.size());
  cache.scores(1, 0, q.data(), scores.data());
  const auto w = random_values(scores.size(), 14, 0.1);
  cache.attn_v(1, 0, w.data(), out.data());
  for (int h = 0; h < c.num_q_heads; ++h) {
    const int kv = h / group;
    for (int t = 0; t < n; ++t) {
      double dot = 0;
      for (int d = 0; d < dim; ++d) dot += static_cast<double>(q[h * dim + d]) * rk[t * row + kv * dim + d];
      ASSERT_NEAR(scores[h * n + t], dot, 1e-4 * (1 + std::fabs(dot))) << "head " << h << " token " << t;
    }
    for (int d = 0; d < dim; ++d) {
      double sum = 0;
      for (int t = 0; t < n; ++t) sum += static_cast<double>(w[h * n + t]) * rv[t * row + kv * dim + d];
      ASSERT_NEAR(out[h * dim + d], sum, 1e-4 * (1 + std::fabs(sum))) << "head " << h << " dim " << d;
    }
  }
}

TEST(Rotation, ImagesRecordItAndMismatchesAreRefused) {
  PackedKVCache<float> rotated(rotation_config(false, true)), other(rotation_config(false, true)),
      plain(rotation_config(false, false));
  rotated.add_sequence(1);
  const auto k = outlier_values(rotated.config(), 40, 1), v = outlier_values(rotated.config(), 40, 2);
  rotated.append(1, 0, k.data(), v.data(), 40);
  const auto image = rotated.export_sequence(1);
  EXPECT_EQ(image[offsetof(format::ImageHeader, options)], 2);
  other.import_sequence(7, image);
  EXPECT_EQ(test::snapshot(other).contents, test::snapshot(rotated).contents);
  const auto before = test::snapshot(plain);
  expect_error([&] { plain.import_sequence(7, image); }, "rotation (K 0, V 1) does not match");
  EXPECT_EQ(test::snapshot(plain), before);
}

}  // namespace
}  // namespace packkv

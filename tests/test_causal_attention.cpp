// attention_causal (CPU backend): several queries per sequence over the packed cache, causal among
// themselves, with the log-sum-exp of each (query, head); checked against float64 attention over
// each query's prefix of the dequantized cache, against attention(), and through the merge rule.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "packkv/cache.hpp"
#include "test_util.hpp"

namespace packkv {
namespace {

using test::convert;
using test::expect_error;
using test::random_values;

CacheConfig causal_config(int block, int residual, QuantMode k_mode = QuantMode::per_token) {
  CacheConfig c;
  c.num_layers = 2;
  c.num_kv_heads = 2;
  c.num_q_heads = 8;  // groups of 4
  c.head_dim = 64;
  c.block_tokens = block;
  c.residual_tokens = residual;
  c.k_mode = k_mode;
  return c;
}

template <class T>
void fill(PackedKVCache<T>& cache, SeqId id, int layer, int n, std::uint64_t seed) {
  const CacheConfig& c = cache.config();
  const std::size_t elems = static_cast<std::size_t>(n) * c.num_kv_heads * c.head_dim;
  const auto k = convert<T>(random_values(elems, seed, 1.5)), v = convert<T>(random_values(elems, seed + 1, 1.5));
  cache.append(id, layer, k.data(), v.data(), n);
}

/// float64 attention of one query head over the first `len` rows of K/V, and the log-sum-exp of
/// its scaled scores.
struct Reference {
  std::vector<double> out;
  double lse;
};
Reference reference(const std::vector<float>& k, const std::vector<float>& v, std::int64_t len, const CacheConfig& c,
                    int kv_head, const float* q, double scale) {
  const std::size_t row = static_cast<std::size_t>(c.num_kv_heads) * c.head_dim;
  std::vector<double> s(static_cast<std::size_t>(len));
  double m = -std::numeric_limits<double>::infinity();
  for (std::int64_t t = 0; t < len; ++t) {
    double dot = 0;
    for (int d = 0; d < c.head_dim; ++d) dot += static_cast<double>(q[d]) * k[t * row + kv_head * c.head_dim + d];
    s[static_cast<std::size_t>(t)] = dot * scale;
    m = std::max(m, s[static_cast<std::size_t>(t)]);
  }
  double sum = 0;
  for (double& x : s) sum += (x = std::exp(x - m));
  Reference r{std::vector<double>(static_cast<std::size_t>(c.head_dim), 0.0), m + std::log(sum)};
  for (std::int64_t t = 0; t < len; ++t) {
    for (int d = 0; d < c.head_dim; ++d) r.out[d] += s[t] / sum * v[t * row + kv_head * c.head_dim + d];
  }
  return r;
}

/// Runs attention_causal on `ids` with `counts` queries each and checks every (query, head)
/// against the float64 reference over its prefix (out poisoned, so an unwritten row fails).
template <class T>
void check_causal(const PackedKVCache<T>& cache, const std::vector<SeqId>& ids, const std::vector<int>& counts,
                  int layer, std::uint64_t seed) {
  const CacheConfig& c = cache.config();
  const int group = c.num_q_heads / c.num_kv_heads;
  const int queries = std::accumulate(counts.begin(), counts.end(), 0);
  const std::size_t qsize = static_cast<std::size_t>(queries) * c.num_q_heads * c.head_dim;
  const std::vector<T> q = convert<T>(random_values(qsize, seed));
  std::vector<T> out(qsize, from_float<T>(NAN));
  std::vector<float> lse(static_cast<std::size_t>(queries) * c.num_q_heads, NAN);
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  cache.attention_causal(ids, counts, layer, q.data(), out.data(), scale, lse.data());
  const std::size_t row = static_cast<std::size_t>(c.num_kv_heads) * c.head_dim;
  int first = 0;
  for (std::size_t b = 0; b < ids.size(); ++b) {
    const std::int64_t len = cache.length(ids[b], layer);
    std::vector<float> k(len * row), v(len * row);
    cache.read_back(ids[b], layer, k.data(), v.data());
    double vmax = 0;
    for (float x : v) vmax = std::max(vmax, static_cast<double>(std::fabs(x)));
    for (int j = 0; j < counts[b]; ++j) {
      const std::int64_t visible = len - counts[b] + j + 1;
      for (int qh = 0; qh < c.num_q_heads; ++qh) {
        const std::size_t at = static_cast<std::size_t>(first + j) * c.num_q_heads + static_cast<std::size_t>(qh);
        std::vector<float> qr(static_cast<std::size_t>(c.head_dim));
        for (int d = 0; d < c.head_dim; ++d) qr[d] = to_float(q[at * c.head_dim + d]);
        const Reference ref = reference(k, v, visible, c, qh / group, qr.data(), scale);
        ASSERT_NEAR(lse[at], ref.lse, 1e-5 * std::max(1.0, std::fabs(ref.lse)))
            << "sequence " << ids[b] << " query " << j << " head " << qh;
        for (int d = 0; d < c.head_dim; ++d) {
          const double got = to_float(out[at * c.head_dim + d]);
          const double tol = 2 * test::unit_roundoff<T>() * std::fabs(ref.out[d]) + 2e-5 * vmax;
          ASSERT_LE(std::fabs(got - ref.out[d]), tol)
              << "sequence " << ids[b] << " (len " << len << ") query " << j << " of " << counts[b] << " (sees "
              << visible << ") head " << qh << " dim " << d << " ref " << ref.out[d];
        }
      }
    }
    first += counts[b];
  }
}

template <class T>
class CausalTyped : public ::testing::Test {};
using StorageTypes = ::testing::Types<float, fp16_t, bf16_t>;
TYPED_TEST_SUITE(CausalTyped, StorageTypes);

// Masked keys in packed blocks (residual 0: the newest positions are sealed, in median order) and
// in the tail; query counts from 1 to beyond a block; per-token and per-channel K.
TYPED_TEST(CausalTyped, EveryQueryMatchesFloat64AttentionOverItsPrefix) {
  using T = TypeParam;
  for (auto [block, residual, mode] : {std::tuple{32, 0, QuantMode::per_token}, std::tuple{32, 24, QuantMode::per_token},
                                       std::tuple{16, 0, QuantMode::per_channel}}) {
    PackedKVCache<T> cache(causal_config(block, residual, mode));
    const std::vector<int> lengths = {100, 37, 250, 64};
    const std::vector<int> counts = {5, 1, 40, 64};  // the last: every token of the sequence is a query
    std::vector<SeqId> ids;
    for (std::size_t i = 0; i < lengths.size(); ++i) {
      ids.push_back(10 + i);
      cache.add_sequence(ids.back());
      fill(cache, ids.back(), 1, lengths[i], 100 + 7 * i);
    }
    check_causal(cache, ids, counts, 1, 5);
  }
}

// A long sequence is split across threads: every query row still merges its chunks exactly.
TEST(CausalAttention, SplitAcrossThreadsMatchesTheReference) {
  CacheConfig c = causal_config(64, 16);
  c.num_threads = 4;
  PackedKVCache<float> cache(c);
  cache.add_sequence(1);
  fill(cache, 1, 0, 5000, 3);
  check_causal(cache, {1}, {7}, 0, 11);
}

// The last query of a chunk sees the whole sequence: it is what attention() computes.
TEST(CausalAttention, LastQueryEqualsDecodeAttention) {
  const CacheConfig c = causal_config(32, 8);
  PackedKVCache<float> cache(c);
  cache.add_sequence(1);
  fill(cache, 1, 0, 300, 21);
  const int n = 6, heads = c.num_q_heads, dim = c.head_dim;
  const auto q = random_values(static_cast<std::size_t>(n) * heads * dim, 4);
  std::vector<float> out(q.size()), last(static_cast<std::size_t>(heads) * dim);
  const SeqId id = 1;
  const int count = n;
  cache.attention_causal(std::span(&id, 1), std::span(&count, 1), 0, q.data(), out.data(), 0.125f);
  cache.attention(std::span(&id, 1), 0, q.data() + (n - 1) * heads * dim, last.data(), 0.125f);
  for (std::size_t i = 0; i < last.size(); ++i) {
    ASSERT_NEAR(out[(n - 1) * heads * dim + i], last[i], 1e-6 * std::max(1.0f, std::fabs(last[i]))) << i;
  }
  // And the first query sees one token fewer than the second: they differ.
  EXPECT_NE(out[0], out[static_cast<std::size_t>(heads) * dim]);
}

// The documented merge rule: attention over a packed prefix (from the cache, with its lse) merged
// with an engine's own attention over the remaining keys equals attention over the whole.
TEST(CausalAttention, LseMergeOfTwoPartsEqualsAttentionOverTheWhole) {
  const CacheConfig c = causal_config(32, 0);  // residual 0: the prefix's blocks are the whole's
  const int dim = c.head_dim, heads = c.num_q_heads, group = heads / c.num_kv_heads;
  const int prefix = 96, total = 150;
  PackedKVCache<float> cache(c);
  cache.add_sequence(1);
  cache.add_sequence(2);
  const std::size_t row = static_cast<std::size_t>(c.num_kv_heads) * dim;
  const auto k = random_values(total * row, 31, 1.5), v = random_values(total * row, 32, 1.5);
  cache.append(1, 0, k.data(), v.data(), prefix);
  cache.append(2, 0, k.data(), v.data(), total);
  std::vector<float> kw(total * row), vw(total * row);
  cache.read_back(2, 0, kw.data(), vw.data());

  const auto q = random_values(static_cast<std::size_t>(heads) * dim, 33);
  const float scale = 0.125f;
  std::vector<float> o1(q.size()), lse1(static_cast<std::size_t>(heads)), whole(q.size()), lse_whole(lse1.size());
  const SeqId first = 1, both = 2;
  const int one = 1;
  cache.attention_causal(std::span(&first, 1), std::span(&one, 1), 0, q.data(), o1.data(), scale, lse1.data());
  cache.attention_causal(std::span(&both, 1), std::span(&one, 1), 0, q.data(), whole.data(), scale, lse_whole.data());
  for (int h = 0; h < heads; ++h) {
    // The engine's part: keys [prefix, total) as dense rows, in float64.
    double m = -INFINITY;
    std::vector<double> s(total - prefix);
    for (int t = prefix; t < total; ++t) {
      double dot = 0;
      for (int d = 0; d < dim; ++d) dot += static_cast<double>(q[h * dim + d]) * kw[t * row + (h / group) * dim + d];
      s[t - prefix] = dot * scale;
      m = std::max(m, s[t - prefix]);
    }
    double sum = 0;
    for (double& x : s) sum += (x = std::exp(x - m));
    const double lse2 = m + std::log(sum);
    std::vector<double> o2(dim, 0.0);
    for (int t = prefix; t < total; ++t) {
      for (int d = 0; d < dim; ++d) o2[d] += s[t - prefix] / sum * vw[t * row + (h / group) * dim + d];
    }
    // The merge rule of attention_causal's documentation.
    const double mx = std::max<double>(lse1[h], lse2);
    const double lse = mx + std::log(std::exp(lse1[h] - mx) + std::exp(lse2 - mx));
    EXPECT_NEAR(lse, lse_whole[h], 2e-5 * std::max(1.0, std::fabs(lse))) << "head " << h;
    for (int d = 0; d < dim; ++d) {
      const double merged = std::exp(lse1[h] - lse) * o1[h * dim + d] + std::exp(lse2 - lse) * o2[d];
      ASSERT_NEAR(merged, whole[h * dim + d], 1e-5) << "head " << h << " dim " << d;
    }
  }
}

TEST(CausalAttention, RefusalsNameTheProblem) {
  const CacheConfig c = causal_config(32, 8);
  PackedKVCache<float> cache(c);
  cache.add_sequence(1);
  cache.add_sequence(2);
  fill(cache, 1, 0, 40, 1);
  std::vector<float> q(static_cast<std::size_t>(64) * c.num_q_heads * c.head_dim), out(q.size());
  const std::vector<SeqId> ids = {1};
  const std::vector<int> ok = {3}, zero = {0}, too_many = {41}, two = {1, 1};
  const auto before = test::snapshot(cache);
  expect_error([&] { cache.attention_causal(ids, zero, 0, q.data(), out.data(), 1.0f); }, "n_queries[0]");
  expect_error([&] { cache.attention_causal(ids, too_many, 0, q.data(), out.data(), 1.0f); }, "exceeds the 40 tokens");
  expect_error([&] { cache.attention_causal(ids, two, 0, q.data(), out.data(), 1.0f); }, "2 query counts for 1");
  expect_error([&] { cache.attention_causal(std::vector<SeqId>{2}, ok, 0, q.data(), out.data(), 1.0f); }, "no tokens");
  expect_error([&] { cache.attention_causal(std::vector<SeqId>{9}, ok, 0, q.data(), out.data(), 1.0f); },
               "unknown sequence id 9");
  expect_error([&] { cache.attention_causal(ids, ok, 0, q.data(), out.data(), INFINITY); }, "softmax_scale");
  q[5] = NAN;
  expect_error([&] { cache.attention_causal(ids, ok, 0, q.data(), out.data(), 1.0f); }, "query");
  EXPECT_EQ(test::snapshot(cache), before);
}

}  // namespace
}  // namespace packkv

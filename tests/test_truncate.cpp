// PackedKVCache::truncate (CPU backend): against sequences built without the dropped tokens, the
// values the cache held before the cut, the codec's error bound, and its refusals.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "packkv/cache.hpp"
#include "test_util.hpp"

namespace packkv {
namespace {

using test::error_bound;
using test::expect_error;
using test::random_values;
using test::snapshot;

// 16-token packs, 32-token blocks, 8 residual tokens: a layer of 100 tokens holds blocks
// [0, 32) and [32, 64) and a tail [64, 100).
CacheConfig truncate_config() {
  CacheConfig c;
  c.num_layers = 2;
  c.num_kv_heads = 2;
  c.num_q_heads = 4;
  c.head_dim = 64;
  c.block_tokens = 32;
  c.residual_tokens = 8;
  return c;
}

std::size_t row_of(const CacheConfig& c) { return static_cast<std::size_t>(c.num_kv_heads) * c.head_dim; }

template <class T>
struct Tokens {
  std::vector<T> k, v;
  int n = 0;
  const T* k_at(const CacheConfig& c, int t) const { return k.data() + t * row_of(c); }
  const T* v_at(const CacheConfig& c, int t) const { return v.data() + t * row_of(c); }
};
template <class T>
Tokens<T> make_tokens(const CacheConfig& c, int n, std::uint64_t seed) {
  const std::size_t count = static_cast<std::size_t>(n) * row_of(c);
  return {test::convert<T>(random_values(count, seed, 1.5)), test::convert<T>(random_values(count, seed + 1, 0.8)), n};
}

/// Appends tokens [first, first + n) of `x` to every layer, in chunks of at most `chunk`.
template <class T>
void append_range(PackedKVCache<T>& cache, SeqId id, const Tokens<T>& x, int first, int n, int chunk = 13) {
  const CacheConfig& c = cache.config();
  for (int l = 0; l < c.num_layers; ++l) {
    for (int t = first; t < first + n; t += chunk) {
      const int count = std::min(chunk, first + n - t);
      cache.append(id, l, x.k_at(c, t), x.v_at(c, t), count);
    }
  }
}

struct Layers {
  std::vector<std::vector<float>> k, v;
};
template <class T>
Layers read_all(const PackedKVCache<T>& cache, SeqId id) {
  const CacheConfig& c = cache.config();
  Layers out;
  for (int l = 0; l < c.num_layers; ++l) {
    const std::size_t n = static_cast<std::size_t>(cache.length(id, l)) * row_of(c);
    out.k.emplace_back(n);
    out.v.emplace_back(n);
    if (n) cache.read_back(id, l, out.k.back().data(), out.v.back().data());
  }
  return out;
}

TEST(Truncate, WithinTheTailThenAppendEqualsASequenceBuiltWithoutTheDroppedTokens) {
  const CacheConfig c = truncate_config();
  const auto x = make_tokens<float>(c, 100, 1), y = make_tokens<float>(c, 45, 3);
  PackedKVCache<float> cut(c), fresh(c);
  cut.add_sequence(1);
  append_range(cut, 1, x, 0, 100);
  // 80 >= 64 (the first tail token) + 8 (residual): a sequence of 80 tokens seals the same blocks.
  cut.truncate(1, 80);
  for (int l = 0; l < c.num_layers; ++l) EXPECT_EQ(cut.length(1, l), 80);
  append_range(cut, 1, y, 0, 45, 7);
  fresh.add_sequence(1);
  append_range(fresh, 1, x, 0, 80, 80);
  append_range(fresh, 1, y, 0, 45, 45);
  EXPECT_EQ(cut.export_sequence(1), fresh.export_sequence(1));
}

TEST(Truncate, KeepsEveryKeptValueBitForBit) {
  const CacheConfig c = truncate_config();
  const auto x = make_tokens<float>(c, 100, 5);
  // In the tail before the residual window, inside block 1, on a block boundary, inside block 0.
  for (const std::int64_t n : {66, 50, 32, 7}) {
    PackedKVCache<float> cache(c);
    cache.add_sequence(4);
    append_range(cache, 4, x, 0, 100);
    const Layers before = read_all(cache, 4);
    cache.truncate(4, n);
    const Layers after = read_all(cache, 4);
    for (int l = 0; l < c.num_layers; ++l) {
      ASSERT_EQ(cache.length(4, l), n);
      const auto kept = static_cast<std::ptrdiff_t>(n * row_of(c));
      EXPECT_TRUE(std::equal(after.k[l].begin(), after.k[l].end(), before.k[l].begin(), before.k[l].begin() + kept))
          << "K, cut at " << n << ", layer " << l;
      EXPECT_TRUE(std::equal(after.v[l].begin(), after.v[l].end(), before.v[l].begin(), before.v[l].begin() + kept))
          << "V, cut at " << n << ", layer " << l;
    }
    const MemoryStats m = cache.memory_stats();
    // Blocks before the cut stay packed; a cut block's kept tokens are back in the tail.
    const std::size_t packed = n >= 64 ? 64 : static_cast<std::size_t>(n / 32 * 32);
    EXPECT_EQ(m.total.compressed_tokens, packed * c.num_layers) << "cut at " << n;
    EXPECT_EQ(m.total.tail_tokens, (static_cast<std::size_t>(n) - packed) * c.num_layers) << "cut at " << n;
  }
}

TEST(Truncate, ResealedTokensMoveByAtMostTheirBound) {
  const CacheConfig c = truncate_config();
  const auto x = make_tokens<float>(c, 100, 7), y = make_tokens<float>(c, 40, 9);
  PackedKVCache<float> cache(c);
  cache.add_sequence(2);
  append_range(cache, 2, x, 0, 100);
  const Layers before = read_all(cache, 2);
  cache.truncate(2, 50);  // tokens 32..49 leave block 1 for the tail
  append_range(cache, 2, y, 0, 40);  // 90 tokens: block [32, 64) is sealed again
  EXPECT_EQ(cache.memory_stats().total.compressed_tokens, 64u * c.num_layers);
  const Layers after = read_all(cache, 2);
  for (int l = 0; l < c.num_layers; ++l) {
    for (int side = 0; side < 2; ++side) {
      const std::vector<float>& was = side == 0 ? before.k[l] : before.v[l];
      const std::vector<float>& now = side == 0 ? after.k[l] : after.v[l];
      const double rel = side == 0 ? c.k_rel : c.v_rel;
      for (int t = 0; t < 50; ++t) {
        for (int h = 0; h < c.num_kv_heads; ++h) {
          const float* a = was.data() + t * row_of(c) + h * c.head_dim;
          const float* b = now.data() + t * row_of(c) + h * c.head_dim;
          // Per-token groups: the bound of the token's values as the cache held them.
          const double bound = t < 32 ? 0.0 : error_bound(*std::min_element(a, a + c.head_dim),
                                                          *std::max_element(a, a + c.head_dim), rel);
          for (int i = 0; i < c.head_dim; ++i) {
            ASSERT_LE(std::fabs(static_cast<double>(a[i]) - b[i]), bound)
                << (side ? "V" : "K") << " layer " << l << " token " << t << " head " << h << " channel " << i;
          }
        }
      }
    }
  }
}

TEST(Truncate, UndoesAStepThatSealedNothingExactly) {
  const CacheConfig c = truncate_config();
  const auto x = make_tokens<float>(c, 103, 11);
  PackedKVCache<float> cache(c);
  cache.add_sequence(9);
  append_range(cache, 9, x, 0, 100);
  const std::vector<std::uint8_t> image = cache.export_sequence(9);
  append_range(cache, 9, x, 100, 3);  // 103 - 8 residual < 96: no block sealed
  cache.truncate(9, 100);
  EXPECT_EQ(cache.export_sequence(9), image);
}

TEST(Truncate, EvensOutTheLayersAfterAStepThatFailedPartWay) {
  CacheConfig c = truncate_config();
  c.num_layers = 3;
  const auto x = make_tokens<float>(c, 101, 13);
  PackedKVCache<float> cache(c);
  cache.add_sequence(3);
  append_range(cache, 3, x, 0, 100);
  const std::vector<std::uint8_t> image = cache.export_sequence(3);
  cache.append(3, 0, x.k_at(c, 100), x.v_at(c, 100), 1);  // the step reached layer 0 only
  cache.truncate(3, cache.length(3, 2));
  for (int l = 0; l < c.num_layers; ++l) EXPECT_EQ(cache.length(3, l), 100);
  EXPECT_EQ(cache.export_sequence(3), image);
  // Shorter layers are left alone.
  cache.truncate(3, 200);
  EXPECT_EQ(cache.export_sequence(3), image);
}

TEST(Truncate, ToZeroEmptiesTheLayersAndFreesTheirMemory) {
  const CacheConfig c = truncate_config();
  const auto x = make_tokens<float>(c, 100, 15);
  PackedKVCache<float> cache(c), fresh(c);
  cache.add_sequence(5);
  fresh.add_sequence(5);
  const std::size_t empty_total = cache.memory_stats().total.total();
  append_range(cache, 5, x, 0, 100);
  cache.truncate(5, 0);
  const MemoryStats m = cache.memory_stats();
  EXPECT_EQ(m.total.total(), empty_total);
  EXPECT_EQ(m.pool.live_blocks, 0u);
  for (int l = 0; l < c.num_layers; ++l) EXPECT_EQ(cache.length(5, l), 0);
  append_range(cache, 5, x, 0, 40);
  append_range(fresh, 5, x, 0, 40);
  EXPECT_EQ(cache.export_sequence(5), fresh.export_sequence(5));
}

TEST(Truncate, Fp16KeptTokensOfACutBlockMoveByAtMostHalfAnUlp) {
  const CacheConfig c = truncate_config();
  const auto x = make_tokens<fp16_t>(c, 100, 17);
  PackedKVCache<fp16_t> cache(c);
  cache.add_sequence(6);
  append_range(cache, 6, x, 0, 100);
  const Layers before = read_all(cache, 6);
  cache.truncate(6, 45);
  const Layers after = read_all(cache, 6);
  int moved = 0;
  for (int l = 0; l < c.num_layers; ++l) {
    for (int side = 0; side < 2; ++side) {
      const std::vector<float>& was = side == 0 ? before.k[l] : before.v[l];
      const std::vector<float>& now = side == 0 ? after.k[l] : after.v[l];
      ASSERT_EQ(now.size(), 45 * row_of(c));
      for (std::size_t i = 0; i < now.size(); ++i) {
        const double limit = i < 32 * row_of(c) ? 0.0 : test::fp16_ulp(was[i]) / 2;
        ASSERT_LE(std::fabs(static_cast<double>(was[i]) - now[i]), limit) << "side " << side << " element " << i;
        moved += was[i] != now[i];
      }
    }
  }
  EXPECT_GT(moved, 0) << "dequantized values are not all fp16 numbers: rounding must show somewhere";
}

TEST(Truncate, RefusalsChangeNothing) {
  const CacheConfig c = truncate_config();
  const auto x = make_tokens<float>(c, 100, 19);
  PackedKVCache<float> cache(c);
  cache.add_sequence(1);
  append_range(cache, 1, x, 0, 100);
  const auto before = snapshot(cache);
  expect_error([&] { cache.truncate(1, -1); }, "new_length must be >= 0, got -1");
  expect_error([&] { cache.truncate(2, 10); }, "truncate: unknown sequence id 2");
  EXPECT_EQ(snapshot(cache), before);
}

TEST(Truncate, ACutIntoBlocksThatDoesNotFitTheBudgetIsRefusedWholesale) {
  CacheConfig c = truncate_config();
  const auto x = make_tokens<float>(c, 640, 21);
  std::size_t resident = 0;
  {
    PackedKVCache<float> probe(c);
    probe.add_sequence(1);
    append_range(probe, 1, x, 0, 640, 64);
    resident = probe.memory_stats().resident_bytes;
  }
  c.memory_budget_bytes = resident;
  PackedKVCache<float> cache(c);
  cache.add_sequence(1);
  append_range(cache, 1, x, 0, 640, 64);
  ASSERT_EQ(cache.memory_stats().resident_bytes, resident);
  const auto before = snapshot(cache);
  // 19 blocks and a tail from 608: cutting at 600 keeps 18 blocks, a copy of them until the old
  // layer is freed.
  expect_error([&] { cache.truncate(1, 600); }, "truncate of sequence 1 to 600 tokens: memory budget");
  EXPECT_EQ(snapshot(cache), before);
  // A cut in the tail needs no memory.
  cache.truncate(1, 630);
  EXPECT_EQ(cache.length(1, 1), 630);
}

}  // namespace
}  // namespace packkv

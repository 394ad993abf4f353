// PackedKVCache::fork (CPU backend): forked sequences against independently built ones, shared
// blocks counted once and freed with their last owner, compaction, and refusals.
#include <gtest/gtest.h>

#include <vector>

#include "packkv/cache.hpp"
#include "test_util.hpp"

namespace packkv {
namespace {

using test::expect_error;
using test::random_values;
using test::snapshot;

// 32-token blocks, 8 residual tokens: 100 tokens are blocks [0, 64) and a tail [64, 100).
CacheConfig fork_config() {
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

struct Tokens {
  std::vector<float> k, v;
};
Tokens make_tokens(const CacheConfig& c, int n, std::uint64_t seed) {
  const std::size_t count = static_cast<std::size_t>(n) * row_of(c);
  return {random_values(count, seed, 1.5), random_values(count, seed + 1, 0.8)};
}

/// Appends `x` (n tokens) to every layer in chunks of at most `chunk`.
void append_all(PackedKVCache<float>& cache, SeqId id, const Tokens& x, int n, int chunk = 11) {
  const CacheConfig& c = cache.config();
  for (int l = 0; l < c.num_layers; ++l) {
    for (int t = 0; t < n; t += chunk) {
      const int count = std::min(chunk, n - t);
      cache.append(id, l, x.k.data() + t * row_of(c), x.v.data() + t * row_of(c), count);
    }
  }
}

std::size_t block_bytes(const MemoryBreakdown& m) {
  return m.payload + m.params + m.descriptors + m.permutations + m.headers;
}

TEST(Fork, DivergentAppendsEqualTwoIndependentlyBuiltSequences) {
  const CacheConfig c = fork_config();
  const Tokens prompt = make_tokens(c, 100, 1), a = make_tokens(c, 70, 3), b = make_tokens(c, 45, 5);
  PackedKVCache<float> cache(c), reference(c);
  cache.add_sequence(1);
  append_all(cache, 1, prompt, 100);
  cache.fork(1, 2);
  EXPECT_EQ(cache.export_sequence(2), cache.export_sequence(1));
  append_all(cache, 1, a, 70, 9);
  append_all(cache, 2, b, 45, 1);  // token by token: the child seals its own blocks
  for (SeqId id : {SeqId{1}, SeqId{2}}) reference.add_sequence(id);
  append_all(reference, 1, prompt, 100);
  append_all(reference, 1, a, 70, 70);
  append_all(reference, 2, prompt, 100, 100);
  append_all(reference, 2, b, 45, 45);
  EXPECT_EQ(cache.export_sequence(1), reference.export_sequence(1));
  EXPECT_EQ(cache.export_sequence(2), reference.export_sequence(2));
}

TEST(Fork, SharedBlocksAreCountedOnce) {
  const CacheConfig c = fork_config();
  const Tokens prompt = make_tokens(c, 100, 7);
  PackedKVCache<float> cache(c);
  cache.add_sequence(1);
  append_all(cache, 1, prompt, 100);
  const MemoryStats before = cache.memory_stats();
  ASSERT_GT(block_bytes(before.total), 0u);
  for (SeqId child = 2; child <= 4; ++child) cache.fork(1, child);
  const MemoryStats after = cache.memory_stats();
  EXPECT_EQ(block_bytes(after.total), block_bytes(before.total));
  EXPECT_EQ(after.shared_block_bytes, 3 * block_bytes(before.total));
  EXPECT_EQ(after.pool.live_blocks, before.pool.live_blocks);
  EXPECT_EQ(after.pool.live_bytes, before.pool.live_bytes);
  EXPECT_EQ(after.total.compressed_tokens, 4 * before.total.compressed_tokens);
  EXPECT_EQ(after.total.tail_tokens, 4 * before.total.tail_tokens);
  // The children hold tails, tables and bookkeeping of their own, no block memory.
  EXPECT_EQ(after.pool.reserved_bytes, before.pool.reserved_bytes);
  EXPECT_EQ(after.resident_bytes - before.resident_bytes,
            after.total.tail + after.total.block_tables - before.total.tail - before.total.block_tables);
}

TEST(Fork, BlocksLiveUntilTheirLastOwnerIsRemoved) {
  const CacheConfig c = fork_config();
  const Tokens prompt = make_tokens(c, 100, 9);
  PackedKVCache<float> cache(c);
  cache.add_sequence(1);
  append_all(cache, 1, prompt, 100);
  const std::vector<std::uint8_t> image = cache.export_sequence(1);
  const std::size_t live = cache.memory_stats().pool.live_blocks;
  cache.fork(1, 2);
  cache.remove_sequence(1);
  EXPECT_EQ(cache.export_sequence(2), image);
  MemoryStats m = cache.memory_stats();
  EXPECT_EQ(m.pool.live_blocks, live);
  EXPECT_EQ(m.shared_block_bytes, 0u);
  cache.remove_sequence(2);
  m = cache.memory_stats();
  EXPECT_EQ(m.pool.live_blocks, 0u);
  EXPECT_EQ(m.pool.reserved_bytes, 0u);
}

TEST(Fork, CompactionMovesSharedBlocksForEveryOwner) {
  const CacheConfig c = fork_config();
  PackedKVCache<float> cache(c);
  for (SeqId id = 1; id <= 8; ++id) {
    cache.add_sequence(id);
    append_all(cache, id, make_tokens(c, 300, 20 + id), 300, 40);
  }
  cache.fork(8, 9);
  cache.fork(8, 10);
  for (SeqId id = 1; id <= 6; ++id) cache.remove_sequence(id);
  std::vector<std::vector<std::uint8_t>> images;
  for (SeqId id : {SeqId{7}, SeqId{8}, SeqId{9}, SeqId{10}}) images.push_back(cache.export_sequence(id));
  const MemoryStats before = cache.memory_stats();
  cache.release_unused_memory();
  const MemoryStats after = cache.memory_stats();
  ASSERT_LT(after.pool.reserved_bytes, before.pool.reserved_bytes) << "nothing was compacted: the test proves nothing";
  std::size_t i = 0;
  for (SeqId id : {SeqId{7}, SeqId{8}, SeqId{9}, SeqId{10}}) EXPECT_EQ(cache.export_sequence(id), images[i++]) << id;
  EXPECT_EQ(after.shared_block_bytes, before.shared_block_bytes);
  // Removing every owner of the shared blocks frees them all.
  for (SeqId id : {SeqId{8}, SeqId{9}, SeqId{10}}) cache.remove_sequence(id);
  cache.release_unused_memory();
  EXPECT_EQ(cache.export_sequence(7), images[0]);
  EXPECT_EQ(cache.memory_stats().pool.live_blocks, static_cast<std::size_t>(c.num_layers) * 9);
}

TEST(Fork, TruncatingOrAppendingToTheChildLeavesTheParentAlone) {
  const CacheConfig c = fork_config();
  const Tokens prompt = make_tokens(c, 100, 11), more = make_tokens(c, 50, 13);
  PackedKVCache<float> cache(c);
  cache.add_sequence(1);
  append_all(cache, 1, prompt, 100);
  const std::vector<std::uint8_t> image = cache.export_sequence(1);
  cache.fork(1, 2);
  cache.truncate(2, 40);  // into block 1: the child rebuilds its layers
  append_all(cache, 2, more, 50);
  cache.fork(1, 3);
  cache.truncate(3, 90);  // in the tail
  append_all(cache, 3, more, 50, 50);
  EXPECT_EQ(cache.export_sequence(1), image);
  const std::vector<std::uint8_t> child = cache.export_sequence(3);
  cache.remove_sequence(1);
  EXPECT_EQ(cache.export_sequence(3), child);  // the removed parent's blocks, still live for 3
  EXPECT_EQ(cache.length(3, 1), 140);
}

TEST(Fork, LayersOfDifferentLengthsAndEmptyLayers) {
  CacheConfig c = fork_config();
  c.num_layers = 3;
  const Tokens prompt = make_tokens(c, 100, 15);
  PackedKVCache<float> cache(c);
  cache.add_sequence(1);
  cache.append(1, 0, prompt.k.data(), prompt.v.data(), 100);
  cache.append(1, 1, prompt.k.data(), prompt.v.data(), 5);
  cache.fork(1, 2);
  EXPECT_EQ(cache.length(2, 0), 100);
  EXPECT_EQ(cache.length(2, 1), 5);
  EXPECT_EQ(cache.length(2, 2), 0);
  EXPECT_EQ(cache.export_sequence(2), cache.export_sequence(1));
}

TEST(Fork, RefusalsChangeNothing) {
  CacheConfig c = fork_config();
  const Tokens prompt = make_tokens(c, 100, 17);
  std::size_t resident = 0;
  {
    PackedKVCache<float> probe(c);
    probe.add_sequence(1);
    append_all(probe, 1, prompt, 100);
    probe.add_sequence(5);
    resident = probe.memory_stats().resident_bytes;
  }
  c.memory_budget_bytes = resident;
  PackedKVCache<float> cache(c);
  cache.add_sequence(1);
  append_all(cache, 1, prompt, 100);
  cache.add_sequence(5);
  const auto before = snapshot(cache);
  expect_error([&] { cache.fork(3, 4); }, "fork: unknown sequence id 3");
  expect_error([&] { cache.fork(1, 5); }, "fork: sequence id 5 already exists");
  expect_error([&] { cache.fork(1, 1); }, "fork: parent and child are the same sequence id 1");
  // The child's tails and tables do not fit.
  expect_error([&] { cache.fork(1, 2); }, "fork of sequence 1 into 2: memory budget");
  EXPECT_FALSE(cache.contains(2));
  EXPECT_EQ(snapshot(cache), before);
}

}  // namespace
}  // namespace packkv

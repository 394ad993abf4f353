// Admission control (CPU backend): worst_case_bytes against the memory a step really takes, a
// scheduler that admits by it, and the budget fields of memory_stats.
#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include "packkv/cache.hpp"
#include "test_util.hpp"

namespace packkv {
namespace {

using test::expect_error;
using test::random_values;

CacheConfig admission_config() {
  CacheConfig c;
  c.num_layers = 3;
  c.num_kv_heads = 2;
  c.num_q_heads = 4;
  c.head_dim = 64;
  c.block_tokens = 32;
  c.residual_tokens = 8;
  return c;
}

/// Appends counts[i] tokens to ids[i] in every layer, one append_batch per layer.
void step(PackedKVCache<float>& cache, const std::vector<SeqId>& ids, const std::vector<int>& counts, std::uint64_t seed) {
  const CacheConfig& c = cache.config();
  const int total = std::accumulate(counts.begin(), counts.end(), 0);
  const std::size_t n = static_cast<std::size_t>(total) * c.num_kv_heads * c.head_dim;
  const auto k = random_values(n, seed, 2.0), v = random_values(n, seed + 1, 0.5);
  for (int l = 0; l < c.num_layers; ++l) cache.append_batch(ids, l, k.data(), v.data(), counts);
}

TEST(Admission, TheBoundCoversEveryStepAndIsZeroWhenNothingGrows) {
  const CacheConfig c = admission_config();
  PackedKVCache<float> cache(c);
  const std::vector<SeqId> ids = {1, 2, 3, 4};
  for (SeqId id : ids) cache.add_sequence(id);
  std::uint64_t seed = 100;
  int steps_without_growth = 0, steps_with_blocks = 0;
  for (int s = 0; s < 120; ++s) {
    // Ragged prefill chunks first, then decode steps.
    const std::vector<int> counts = s < 3 ? std::vector<int>{37 + 20 * s, 5, 64, 90 - s} : std::vector<int>{1, 1, 1, 1};
    const std::size_t bound = cache.worst_case_bytes(ids, counts);
    const MemoryStats before = cache.memory_stats();
    step(cache, ids, counts, seed += 2);
    const MemoryStats after = cache.memory_stats();
    const std::size_t grown = after.resident_bytes > before.resident_bytes ? after.resident_bytes - before.resident_bytes : 0;
    ASSERT_LE(grown, bound) << "step " << s;
    if (bound == 0) ++steps_without_growth;
    if (after.total.compressed_tokens > before.total.compressed_tokens) ++steps_with_blocks;
  }
  EXPECT_GT(steps_without_growth, 60) << "decode steps that seal nothing with full rings need nothing";
  EXPECT_GT(steps_with_blocks, 3);
}

TEST(Admission, NewSequencesAreBoundedTooAndNothingChanges) {
  const CacheConfig c = admission_config();
  PackedKVCache<float> cache(c);
  cache.add_sequence(1);
  step(cache, {1}, {70}, 3);
  const std::vector<int> prompts = {300, 50, 1};
  const std::size_t bound = cache.worst_case_bytes({}, {}, prompts);
  const auto before = test::snapshot(cache);
  EXPECT_EQ(test::snapshot(cache), before);  // the query changes nothing
  const std::size_t resident = cache.memory_stats().resident_bytes;
  std::vector<SeqId> ids;
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    ids.push_back(10 + i);
    cache.add_sequence(ids.back());
  }
  step(cache, ids, prompts, 9);
  EXPECT_LE(cache.memory_stats().resident_bytes - resident, bound);
  // Both kinds in one query: at least either alone, at most the two apart (blocks of one step
  // share the pool's pages).
  const std::vector<SeqId> old = {1};
  const std::vector<int> one = {64};
  const std::size_t joint = cache.worst_case_bytes(old, one, prompts);
  EXPECT_LE(joint, cache.worst_case_bytes(old, one) + cache.worst_case_bytes({}, {}, prompts));
  EXPECT_GE(joint, std::max(cache.worst_case_bytes(old, one), cache.worst_case_bytes({}, {}, prompts)));
}

TEST(Admission, ASchedulerThatAdmitsByTheBoundNeverHitsTheBudget) {
  CacheConfig c = admission_config();
  c.memory_budget_bytes = 3u << 20;
  PackedKVCache<float> cache(c);
  std::vector<SeqId> running;
  SeqId next = 1;
  int refused = 0, admitted = 0;
  std::uint64_t seed = 500;
  for (int s = 0; s < 200; ++s) {
    // One new request of 150 tokens per step if it fits next to the running ones' decode step.
    const std::vector<int> decode(running.size(), 1);
    const std::vector<int> prompt = {150};
    if (cache.worst_case_bytes(running, decode, prompt) <= cache.memory_stats().free_budget_bytes) {
      cache.add_sequence(next);
      step(cache, {next}, {150}, seed += 2);
      running.push_back(next++);
      ++admitted;
    } else {
      ++refused;
    }
    const std::vector<int> ones(running.size(), 1);
    ASSERT_LE(cache.worst_case_bytes(running, ones), cache.memory_stats().free_budget_bytes) << "step " << s;
    ASSERT_NO_THROW(step(cache, running, ones, seed += 2)) << "step " << s;
    if (s % 25 == 24) {  // a request finishes now and then
      cache.remove_sequence(running.front());
      running.erase(running.begin());
    }
  }
  EXPECT_GT(admitted, 5);
  EXPECT_GT(refused, 20) << "the budget never bound: the test proves nothing";
}

TEST(Admission, MemoryStatsSayWhatIsLeftAndWhatCanBeReclaimed) {
  CacheConfig c = admission_config();
  c.memory_budget_bytes = 64u << 20;
  PackedKVCache<float> cache(c);
  for (SeqId id = 1; id <= 10; ++id) {
    cache.add_sequence(id);
    step(cache, {id}, {400}, 40 + id);
  }
  for (SeqId id = 1; id <= 10; id += 2) cache.remove_sequence(id);
  const MemoryStats before = cache.memory_stats();
  EXPECT_EQ(before.budget_bytes, c.memory_budget_bytes);
  EXPECT_EQ(before.free_budget_bytes, c.memory_budget_bytes - before.resident_bytes);
  ASSERT_GT(before.reclaimable_bytes, 0u) << "no fragmentation: the test proves nothing";
  cache.release_unused_memory();
  const MemoryStats after = cache.memory_stats();
  EXPECT_EQ(before.resident_bytes - after.resident_bytes, before.reclaimable_bytes);
  EXPECT_EQ(after.reclaimable_bytes, 0u);
  PackedKVCache<float> unlimited(admission_config());
  EXPECT_EQ(unlimited.memory_stats().budget_bytes, 0u);
  EXPECT_EQ(unlimited.memory_stats().free_budget_bytes, 0u);
}

TEST(Admission, BadQueriesAreRefused) {
  PackedKVCache<float> cache(admission_config());
  cache.add_sequence(1);
  const std::vector<SeqId> ids = {1}, twice = {1, 1}, unknown = {2};
  const std::vector<int> one = {1}, two = {1, 1}, negative = {-1};
  expect_error([&] { (void)cache.worst_case_bytes(ids, two); }, "worst_case_bytes: 2 token counts for 1 sequence ids");
  expect_error([&] { (void)cache.worst_case_bytes(unknown, one); }, "worst_case_bytes: unknown sequence id 2");
  expect_error([&] { (void)cache.worst_case_bytes(twice, two); }, "sequence 1 appears twice");
  expect_error([&] { (void)cache.worst_case_bytes(ids, negative); }, "must be in [0, 2^24], got -1");
  expect_error([&] { (void)cache.worst_case_bytes({}, {}, negative); }, "new_sequence_tokens[0] must be in [0, 2^24]");
}

}  // namespace
}  // namespace packkv

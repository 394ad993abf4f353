// Batched calls of an engine's decode loop (CPU backend): append_batch against the per-sequence
// calls it replaces, and its refusals.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <vector>

#include "packkv/cache.hpp"
#include "test_util.hpp"

namespace packkv {
namespace {

using test::expect_error;
using test::random_values;
using test::snapshot;

CacheConfig batch_config() {
  CacheConfig c;
  c.num_layers = 2;
  c.num_kv_heads = 2;
  c.num_q_heads = 8;
  c.head_dim = 64;
  c.block_tokens = 32;
  c.residual_tokens = 8;
  return c;
}

/// Values for `n` tokens, different per (seed, token): [n][num_kv_heads][head_dim].
std::vector<float> tokens(const CacheConfig& c, int n, std::uint64_t seed) {
  return random_values(static_cast<std::size_t>(n) * c.num_kv_heads * c.head_dim, seed, 1.5);
}

/// One batched step's inputs: the tokens of every entry back to back.
struct Step {
  std::vector<SeqId> ids;
  std::vector<int> counts;
  std::vector<float> k, v;
};
Step make_step(const CacheConfig& c, const std::vector<SeqId>& ids, const std::vector<int>& counts, std::uint64_t seed) {
  Step s{ids, counts, {}, {}};
  for (std::size_t i = 0; i < ids.size(); ++i) {
    const auto k = tokens(c, counts[i], seed + 2 * i), v = tokens(c, counts[i], seed + 2 * i + 1);
    s.k.insert(s.k.end(), k.begin(), k.end());
    s.v.insert(s.v.end(), v.begin(), v.end());
  }
  return s;
}
/// The same tokens, one append per entry.
void append_one_by_one(PackedKVCache<float>& cache, int layer, const Step& s) {
  const std::size_t row = static_cast<std::size_t>(cache.config().num_kv_heads) * cache.config().head_dim;
  std::size_t offset = 0;
  for (std::size_t i = 0; i < s.ids.size(); ++i) {
    cache.append(s.ids[i], layer, s.k.data() + offset * row, s.v.data() + offset * row, s.counts[i]);
    offset += static_cast<std::size_t>(s.counts[i]);
  }
}

TEST(AppendBatch, EqualsThePerSequenceCallsByteForByte) {
  const CacheConfig c = batch_config();
  PackedKVCache<float> batched(c), single(c);
  const std::vector<SeqId> ids = {4, 11, 2, 7, 30};
  for (SeqId id : ids) {
    batched.add_sequence(id);
    single.add_sequence(id);
  }
  std::uint64_t seed = 100;
  // Ragged prefill chunks (some seal several blocks, some stay in the tail), then decode steps that
  // cross block boundaries at different times for different sequences.
  std::vector<Step> steps = {make_step(c, ids, {1, 7, 33, 64, 100}, seed)};
  seed += 100;
  for (int t = 0; t < 45; ++t, seed += 100) steps.push_back(make_step(c, ids, {1, 1, 1, 1, 1}, seed));
  steps.push_back(make_step(c, {30, 2}, {5, 40}, seed));
  for (int layer = 0; layer < c.num_layers; ++layer) {
    for (const Step& s : steps) {
      batched.append_batch(s.ids, layer, s.k.data(), s.v.data(), s.counts);
      append_one_by_one(single, layer, s);
    }
  }
  for (SeqId id : ids) {
    EXPECT_EQ(batched.export_sequence(id), single.export_sequence(id)) << "sequence " << id;
    EXPECT_EQ(batched.length(id, 1), single.length(id, 1));
  }
  EXPECT_EQ(snapshot(batched), snapshot(single));
}

class AppendBatchErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    cfg_ = batch_config();
    cache_ = std::make_unique<PackedKVCache<float>>(cfg_);
    for (SeqId id : {1, 2, 3}) {
      cache_->add_sequence(id);
      const auto k = tokens(cfg_, 20 + static_cast<int>(id), id), v = tokens(cfg_, 20 + static_cast<int>(id), id + 9);
      cache_->append(id, 0, k.data(), v.data(), 20 + static_cast<int>(id));
    }
    before_ = snapshot(*cache_);
    for (SeqId id : {1, 2, 3}) images_.push_back(cache_->export_sequence(id));
  }
  void TearDown() override {
    EXPECT_EQ(snapshot(*cache_), before_) << "a refused call changed the cache";
    for (SeqId id : {1, 2, 3}) EXPECT_EQ(cache_->export_sequence(id), images_[static_cast<std::size_t>(id - 1)]);
  }

  CacheConfig cfg_;
  std::unique_ptr<PackedKVCache<float>> cache_;
  test::Snapshot before_;
  std::vector<std::vector<std::uint8_t>> images_;
};

TEST_F(AppendBatchErrors, ABadValueInTheLastEntryRefusesTheWholeBatch) {
  // The first entries seal blocks and fill tails; the last one carries the bad value.
  Step s = make_step(cfg_, {1, 2, 3}, {40, 1, 12}, 7);
  const std::size_t row = static_cast<std::size_t>(cfg_.num_kv_heads) * cfg_.head_dim;
  s.v[(41 + 5) * row + 3] = NAN;
  expect_error([&] { cache_->append_batch(s.ids, 0, s.k.data(), s.v.data(), s.counts); }, "sequence 3 layer 0");
  s.v[(41 + 5) * row + 3] = 0.5f;
  s.k[(41 + 11) * row] = 1e6f;
  expect_error([&] { cache_->append_batch(s.ids, 0, s.k.data(), s.v.data(), s.counts); }, "NaN, Inf or beyond");
}

TEST_F(AppendBatchErrors, BadBatchesAreRefusedBeforeAnythingChanges) {
  const Step s = make_step(cfg_, {1, 2, 3}, {40, 1, 12}, 8);
  const SeqId unknown[] = {1, 2, 9};
  expect_error([&] { cache_->append_batch(unknown, 0, s.k.data(), s.v.data(), s.counts); }, "unknown sequence id 9");
  const SeqId twice[] = {1, 3, 1};
  expect_error([&] { cache_->append_batch(twice, 0, s.k.data(), s.v.data(), s.counts); }, "sequence 1 appears twice");
  const int two_counts[] = {40, 1};
  expect_error([&] { cache_->append_batch(s.ids, 0, s.k.data(), s.v.data(), two_counts); }, "2 token counts for 3");
  const int zero[] = {40, 0, 12};
  expect_error([&] { cache_->append_batch(s.ids, 0, s.k.data(), s.v.data(), zero); }, "n_tokens[1] (sequence 2)");
  expect_error([&] { cache_->append_batch({}, 0, s.k.data(), s.v.data(), {}); }, "empty");
  expect_error([&] { cache_->append_batch(s.ids, 2, s.k.data(), s.v.data(), s.counts); }, "layer 2 is out of range");
  expect_error([&] { cache_->append_batch(s.ids, 0, nullptr, s.v.data(), s.counts); }, "must not be null");
}

TEST(AppendBatch, OverBudgetRefusesTheWholeBatch) {
  CacheConfig c = batch_config();
  const Step first = make_step(c, {1, 2}, {64, 64}, 3), second = make_step(c, {1, 2}, {40, 300}, 4);
  // What the two batches take, measured on an unlimited cache.
  PackedKVCache<float> probe(c);
  for (SeqId id : {1, 2}) probe.add_sequence(id);
  probe.append_batch(first.ids, 0, first.k.data(), first.v.data(), first.counts);
  const std::size_t after_first = probe.memory_stats().resident_bytes;
  probe.append_batch(second.ids, 0, second.k.data(), second.v.data(), second.counts);
  const std::size_t after_second = probe.memory_stats().resident_bytes;
  ASSERT_GT(after_second, after_first);
  // A budget between the two: the first batch fits, the second does not, and nothing of it stays.
  c.memory_budget_bytes = (after_first + after_second) / 2;
  PackedKVCache<float> cache(c);
  for (SeqId id : {1, 2}) cache.add_sequence(id);
  cache.append_batch(first.ids, 0, first.k.data(), first.v.data(), first.counts);
  const test::Snapshot before = snapshot(cache);
  expect_error([&] { cache.append_batch(second.ids, 0, second.k.data(), second.v.data(), second.counts); },
               "memory budget");
  EXPECT_EQ(snapshot(cache), before);
  EXPECT_EQ(cache.length(2, 0), 64);
}

// scores_batch and attn_v_batch: the per-sequence calls, back to back (ragged layout).
TEST(ScoresAttnVBatch, EqualThePerSequenceCalls) {
  const CacheConfig c = batch_config();
  PackedKVCache<float> cache(c);
  const int lengths[] = {70, 1, 31, 96};
  for (SeqId id : {1, 2, 3, 4}) {
    cache.add_sequence(id);
    const int n = lengths[id - 1];
    const std::vector<float> k = tokens(c, n, 10 + id), v = tokens(c, n, 20 + id);
    cache.append(id, 1, k.data(), v.data(), n);
  }
  cache.add_sequence(5);  // no tokens: no scores, attn_v gives zeros
  const std::vector<SeqId> ids = {3, 1, 5, 4, 2, 1};
  const std::size_t vector = static_cast<std::size_t>(c.num_q_heads) * c.head_dim;
  const std::vector<float> q = random_values(ids.size() * vector, 5, 1.0);
  std::size_t values = 0;
  for (SeqId id : ids) values += static_cast<std::size_t>(c.num_q_heads) * cache.length(id, 1);
  std::vector<float> scores(values, NAN);
  cache.scores_batch(ids, 1, q.data(), scores.data());
  const std::vector<float> weights = random_values(values, 6, 0.1);
  std::vector<float> out(ids.size() * vector, NAN);
  cache.attn_v_batch(ids, 1, weights.data(), out.data());

  std::size_t at = 0;
  for (std::size_t i = 0; i < ids.size(); ++i) {
    const std::size_t n = static_cast<std::size_t>(c.num_q_heads) * cache.length(ids[i], 1);
    std::vector<float> one(n + 1, NAN), one_out(vector, NAN);  // + 1: never a null pointer
    cache.scores(ids[i], 1, q.data() + i * vector, one.data());
    one.pop_back();
    EXPECT_EQ(std::vector<float>(scores.begin() + static_cast<std::ptrdiff_t>(at),
                                 scores.begin() + static_cast<std::ptrdiff_t>(at + n)),
              one)
        << "scores of entry " << i;
    cache.attn_v(ids[i], 1, weights.data() + at, one_out.data());
    EXPECT_EQ(std::vector<float>(out.begin() + static_cast<std::ptrdiff_t>(i * vector),
                                 out.begin() + static_cast<std::ptrdiff_t>((i + 1) * vector)),
              one_out)
        << "attn_v of entry " << i;
    at += n;
  }
  EXPECT_EQ(at, values);
  EXPECT_EQ(std::vector<float>(out.begin() + 2 * static_cast<std::ptrdiff_t>(vector),
                               out.begin() + 3 * static_cast<std::ptrdiff_t>(vector)),
            std::vector<float>(vector, 0.0f))
      << "a sequence without tokens";
}

TEST(ScoresAttnVBatch, BadBatchesAreRefusedAndWriteNothing) {
  const CacheConfig c = batch_config();
  PackedKVCache<float> cache(c);
  for (SeqId id : {1, 2}) {
    cache.add_sequence(id);
    const std::vector<float> k = tokens(c, 40, id), v = tokens(c, 40, 5 + id);
    cache.append(id, 0, k.data(), v.data(), 40);
  }
  const SeqId ids[] = {2, 1};
  const std::size_t vector = static_cast<std::size_t>(c.num_q_heads) * c.head_dim;
  std::vector<float> q = random_values(2 * vector, 3, 1.0);
  std::vector<float> weights = random_values(2 * 40 * static_cast<std::size_t>(c.num_q_heads), 4, 0.1);
  std::vector<float> scores(weights.size(), 7.0f), out(2 * vector, 7.0f);
  const test::Snapshot before = snapshot(cache);
  auto both = [&](auto&& call, const std::string& needle) {
    expect_error(call, needle);
    EXPECT_EQ(scores, std::vector<float>(scores.size(), 7.0f)) << needle;
    EXPECT_EQ(out, std::vector<float>(out.size(), 7.0f)) << needle;
  };
  const SeqId unknown[] = {1, 9};
  both([&] { cache.scores_batch(unknown, 0, q.data(), scores.data()); }, "unknown sequence id 9");
  both([&] { cache.attn_v_batch(unknown, 0, weights.data(), out.data()); }, "unknown sequence id 9");
  both([&] { cache.scores_batch({}, 0, q.data(), scores.data()); }, "empty");
  both([&] { cache.attn_v_batch({}, 0, weights.data(), out.data()); }, "empty");
  both([&] { cache.scores_batch(ids, 2, q.data(), scores.data()); }, "layer 2 is out of range");
  both([&] { cache.attn_v_batch(ids, -1, weights.data(), out.data()); }, "out of range");
  both([&] { cache.scores_batch(ids, 0, nullptr, scores.data()); }, "must not be null");
  both([&] { cache.scores_batch(ids, 0, q.data(), nullptr); }, "must not be null");
  both([&] { cache.attn_v_batch(ids, 0, nullptr, out.data()); }, "must not be null");
  both([&] { cache.attn_v_batch(ids, 0, weights.data(), nullptr); }, "must not be null");
  q[vector + 3] = NAN;  // the last entry's query
  both([&] { cache.scores_batch(ids, 0, q.data(), scores.data()); }, "query");
  weights.back() = INFINITY;  // the last entry's last weight
  both([&] { cache.attn_v_batch(ids, 0, weights.data(), out.data()); }, "weight");
  EXPECT_EQ(snapshot(cache), before);
}

TEST(PollDeviceError, TheCpuRefusesInTheCallSoThereIsNothingToPoll) {
  CacheConfig c = batch_config();
  c.cuda_poll_errors = true;  // a CUDA option: no effect on the CPU
  PackedKVCache<float> cache(c);
  cache.add_sequence(1);
  std::vector<float> k = tokens(c, 4, 1), v = tokens(c, 4, 2);
  v[3] = NAN;
  expect_error([&] { cache.append(1, 0, k.data(), v.data(), 4); }, "append to sequence 1 layer 0");
  EXPECT_EQ(cache.poll_device_error(), std::nullopt);
}

}  // namespace
}  // namespace packkv

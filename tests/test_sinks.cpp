// CacheConfig::sink_tokens on the CPU backend: the first tokens of a sequence are read exactly by
// every reader once their block is sealed (attention, causal attention, scores, attn_v,
// read_back), and they survive fork, truncate, export / import (also entropy-coded) and the
// statistics. References are float64 computations over what read_back returns, and a cache
// without sinks shows that the sinks change the outputs (so a reader that ignored them fails).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "packkv/cache.hpp"
#include "packkv/image_coding.hpp"
#include "core/image_io.hpp"
#include "test_util.hpp"

namespace packkv {
namespace {

using test::expect_error;
using test::random_values;

constexpr int kSinks = 4;

// Coarse bounds (big quantization errors, so exact and decoded sinks differ clearly), 32-token
// blocks, 8 residual tokens: a layer of 100 tokens holds blocks [0, 32) and [32, 64) and a tail.
CacheConfig sink_config(int sinks = kSinks) {
  CacheConfig c;
  c.num_layers = 2;
  c.num_kv_heads = 2;
  c.num_q_heads = 4;
  c.head_dim = 64;
  c.block_tokens = 32;
  c.residual_tokens = 8;
  c.k_rel = 0.34f;
  c.v_rel = 0.34f;
  c.sink_tokens = sinks;
  c.num_threads = 2;
  return c;
}

std::size_t row_of(const CacheConfig& c) { return static_cast<std::size_t>(c.num_kv_heads) * c.head_dim; }

struct Tokens {
  std::vector<float> k, v;
};

/// Tokens whose first kSinks keys share a direction with the test queries, so the sinks take a
/// large share of attention, as in a real model.
Tokens make_tokens(const CacheConfig& c, int n, std::uint64_t seed) {
  const std::size_t row = row_of(c);
  Tokens t{random_values(n * row, seed, 1.0), random_values(n * row, seed + 1, 1.0)};
  for (int p = 0; p < std::min(n, kSinks); ++p) {
    for (std::size_t i = 0; i < row; ++i) t.k[p * row + i] = 2.5f + 0.3f * t.k[p * row + i];
  }
  return t;
}

void append_all(PackedKVCache<float>& cache, SeqId id, const Tokens& x, int first, int n, int chunk = 11) {
  const CacheConfig& c = cache.config();
  const std::size_t row = row_of(c);
  for (int l = 0; l < c.num_layers; ++l) {
    for (int t = first; t < first + n; t += chunk) {
      const int count = std::min(chunk, first + n - t);
      cache.append(id, l, x.k.data() + t * row, x.v.data() + t * row, count);
    }
  }
}

struct Rows {
  std::vector<float> k, v;
};
Rows read_rows(const PackedKVCache<float>& cache, SeqId id, int layer) {
  const std::size_t n = static_cast<std::size_t>(cache.length(id, layer)) * row_of(cache.config());
  Rows r{std::vector<float>(n), std::vector<float>(n)};
  if (n) cache.read_back(id, layer, r.k.data(), r.v.data());
  return r;
}

std::vector<float> queries(const CacheConfig& c, int n, std::uint64_t seed) {
  std::vector<float> q = random_values(static_cast<std::size_t>(n) * c.num_q_heads * c.head_dim, seed, 0.3);
  for (float& x : q) x += 0.2f;  // leans towards the sinks' keys
  return q;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(static_cast<double>(a[i]) - b[i]));
  return m;
}

TEST(Sinks, ReadBackGivesTheFirstTokensExactlyOnceTheirBlockIsSealed) {
  const CacheConfig c = sink_config();
  const Tokens x = make_tokens(c, 100, 1);
  PackedKVCache<float> cache(c), plain(sink_config(0));
  cache.add_sequence(1);
  plain.add_sequence(1);
  append_all(cache, 1, x, 0, 100);
  append_all(plain, 1, x, 0, 100);
  const std::size_t row = row_of(c), sink_values = kSinks * row;
  for (int l = 0; l < c.num_layers; ++l) {
    const Rows r = read_rows(cache, 1, l), p = read_rows(plain, 1, l);
    for (std::size_t i = 0; i < sink_values; ++i) {
      ASSERT_EQ(r.k[i], x.k[i]) << "layer " << l << " K value " << i;
      ASSERT_EQ(r.v[i], x.v[i]) << "layer " << l << " V value " << i;
    }
    // Without sinks the same block decodes them with errors this coarse bound makes visible.
    EXPECT_GT(max_abs_diff({p.v.begin(), p.v.begin() + sink_values}, {x.v.begin(), x.v.begin() + sink_values}), 0.05);
    // Every later token reads as it does without sinks: the blocks are the same.
    EXPECT_TRUE(std::equal(r.k.begin() + sink_values, r.k.end(), p.k.begin() + sink_values));
    EXPECT_TRUE(std::equal(r.v.begin() + sink_values, r.v.end(), p.v.begin() + sink_values));
  }
  const MemoryStats m = cache.memory_stats();
  EXPECT_EQ(m.total.sinks, c.num_layers * sink_values * 2 * sizeof(float));
  EXPECT_EQ(m.layers[0].sinks, sink_values * 2 * sizeof(float));
  EXPECT_EQ(plain.memory_stats().total.sinks, 0u);
  // The sinks are the only difference between the two caches' bytes.
  EXPECT_EQ(m.total.total() - m.total.sinks, plain.memory_stats().total.total());
  EXPECT_EQ(m.resident_bytes - m.total.sinks, plain.memory_stats().resident_bytes);
}

TEST(Sinks, BeforeTheFirstBlockTheTailHoldsThemAndNoSinkRowsExist) {
  const CacheConfig c = sink_config();
  const Tokens x = make_tokens(c, 39, 2);  // 39 < block + residual: nothing sealed
  PackedKVCache<float> cache(c);
  cache.add_sequence(1);
  append_all(cache, 1, x, 0, 39);
  EXPECT_EQ(cache.memory_stats().total.sinks, 0u);
  const Rows r = read_rows(cache, 1, 0);
  EXPECT_EQ(r.k, std::vector<float>(x.k.begin(), x.k.begin() + 39 * row_of(c)));
  append_all(cache, 1, x, 0, 1);  // the 40th token seals block 0 in every layer
  EXPECT_EQ(cache.memory_stats().total.sinks, c.num_layers * kSinks * row_of(c) * 2 * sizeof(float));
}

/// float64 causal attention of the last `nq` positions over read-back rows: query j sees
/// positions < len - nq + j + 1.
std::vector<double> reference(const CacheConfig& c, const Rows& r, const std::vector<float>& q, int nq, double scale) {
  const std::int64_t len = static_cast<std::int64_t>(r.k.size() / row_of(c));
  const int group = c.num_q_heads / c.num_kv_heads;
  std::vector<double> out;
  for (int j = 0; j < nq; ++j) {
    for (int h = 0; h < c.num_q_heads; ++h) {
      const float* qh = q.data() + (static_cast<std::size_t>(j) * c.num_q_heads + h) * c.head_dim;
      const std::vector<double> o =
          test::reference_attention(r.k.data(), r.v.data(), len - nq + j + 1, c.num_kv_heads, c.head_dim, h / group, qh, scale);
      out.insert(out.end(), o.begin(), o.end());
    }
  }
  return out;
}

TEST(Sinks, AttentionAndCausalAttentionUseTheExactRows) {
  const CacheConfig c = sink_config();
  const Tokens x = make_tokens(c, 100, 3);
  PackedKVCache<float> cache(c), plain(sink_config(0));
  for (auto* k : {&cache, &plain}) {
    k->add_sequence(1);
    k->add_sequence(2);
    append_all(*k, 1, x, 0, 100);
    append_all(*k, 2, x, 0, 70, 7);
  }
  const double scale = 1.0 / 8.0;
  for (const int nq : {1, 5}) {
    const std::vector<float> q = queries(c, 2 * nq, 10 + nq);
    const std::size_t per_seq = static_cast<std::size_t>(nq) * c.num_q_heads * c.head_dim;
    const std::vector<SeqId> ids{1, 2};
    const std::vector<int> counts{nq, nq};
    for (int l = 0; l < c.num_layers; ++l) {
      std::vector<float> out(2 * per_seq), plain_out(2 * per_seq);
      cache.attention_causal(ids, counts, l, q.data(), out.data(), static_cast<float>(scale));
      plain.attention_causal(ids, counts, l, q.data(), plain_out.data(), static_cast<float>(scale));
      double worst = 0, moved = 0;
      for (int b = 0; b < 2; ++b) {
        const std::vector<float> qb(q.begin() + b * per_seq, q.begin() + (b + 1) * per_seq);
        const std::vector<double> want = reference(c, read_rows(cache, ids[b], l), qb, nq, scale);
        for (std::size_t i = 0; i < want.size(); ++i) {
          worst = std::max(worst, std::fabs(out[b * per_seq + i] - want[i]));
          moved = std::max(moved, std::fabs(static_cast<double>(plain_out[b * per_seq + i]) - out[b * per_seq + i]));
        }
      }
      EXPECT_LT(worst, 2e-5) << "layer " << l << " queries " << nq;
      EXPECT_GT(moved, 1e-3) << "the sinks must change the output (layer " << l << ")";
    }
  }
  // Decode attention (one query per sequence) is the causal call with one query each.
  const std::vector<float> q = queries(c, 2, 20);
  std::vector<float> a(q.size()), b(q.size());
  const std::vector<SeqId> ids{1, 2};
  cache.attention(ids, 1, q.data(), a.data(), 0.125f);
  cache.attention_causal(ids, std::vector<int>{1, 1}, 1, q.data(), b.data(), 0.125f);
  EXPECT_EQ(a, b);
}

TEST(Sinks, ScoresAndAttnVUseTheExactRows) {
  const CacheConfig c = sink_config();
  const Tokens x = make_tokens(c, 100, 4);
  PackedKVCache<float> cache(c);
  cache.add_sequence(1);
  append_all(cache, 1, x, 0, 100);
  const std::int64_t len = cache.length(1, 0);
  const int group = c.num_q_heads / c.num_kv_heads;
  const std::size_t row = row_of(c);
  for (int l = 0; l < c.num_layers; ++l) {
    const Rows r = read_rows(cache, 1, l);
    const std::vector<float> q = queries(c, 1, 30 + l);
    std::vector<float> s(static_cast<std::size_t>(c.num_q_heads) * len);
    cache.scores(1, l, q.data(), s.data());
    const std::vector<float> w = random_values(s.size(), 40 + l, 1.0);
    std::vector<float> out(static_cast<std::size_t>(c.num_q_heads) * c.head_dim);
    cache.attn_v(1, l, w.data(), out.data());
    for (int h = 0; h < c.num_q_heads; ++h) {
      const std::size_t kv = static_cast<std::size_t>(h / group) * c.head_dim;
      for (std::int64_t t = 0; t < len; ++t) {
        // fp32 sums (over codes, then scaled) against float64: a relative tolerance of the terms.
        double dot = 0, size = 0;
        for (int i = 0; i < c.head_dim; ++i) {
          dot += static_cast<double>(q[h * c.head_dim + i]) * r.k[t * row + kv + i];
          size += std::fabs(static_cast<double>(q[h * c.head_dim + i]) * r.k[t * row + kv + i]);
        }
        ASSERT_NEAR(s[h * len + t], dot, 1e-5 * size + 1e-6) << "layer " << l << " head " << h << " position " << t;
      }
      for (int i = 0; i < c.head_dim; ++i) {
        double acc = 0, size = 0;
        for (std::int64_t t = 0; t < len; ++t) {
          acc += static_cast<double>(w[h * len + t]) * r.v[t * row + kv + i];
          size += std::fabs(static_cast<double>(w[h * len + t]) * r.v[t * row + kv + i]);
        }
        ASSERT_NEAR(out[h * c.head_dim + i], acc, 1e-5 * size + 1e-6) << "layer " << l << " head " << h << " channel " << i;
      }
    }
  }
}

TEST(Sinks, ForkAndTruncateKeepThem) {
  const CacheConfig c = sink_config();
  const Tokens x = make_tokens(c, 100, 5);
  const std::size_t sink_values = kSinks * row_of(c);
  PackedKVCache<float> cache(c);
  cache.add_sequence(1);
  append_all(cache, 1, x, 0, 100);
  cache.fork(1, 2);
  for (int l = 0; l < c.num_layers; ++l) {
    const Rows a = read_rows(cache, 1, l), b = read_rows(cache, 2, l);
    EXPECT_EQ(a.k, b.k);
    EXPECT_EQ(a.v, b.v);
  }
  EXPECT_EQ(cache.memory_stats().total.sinks, 2 * c.num_layers * sink_values * 2 * sizeof(float));
  cache.remove_sequence(1);
  // A cut inside block 1 keeps block 0 and its sinks; a cut inside block 0 returns them to the
  // tail, exactly; both keep every other value it held.
  for (const int cut : {45, 20}) {
    const Rows before = read_rows(cache, 2, 0);
    cache.truncate(2, cut);
    const Rows after = read_rows(cache, 2, 0);
    ASSERT_EQ(after.k.size(), static_cast<std::size_t>(cut) * row_of(c));
    EXPECT_TRUE(std::equal(after.k.begin(), after.k.end(), before.k.begin())) << "cut " << cut;
    EXPECT_TRUE(std::equal(after.v.begin(), after.v.end(), before.v.begin())) << "cut " << cut;
    EXPECT_TRUE(std::equal(after.v.begin(), after.v.begin() + sink_values, x.v.begin())) << "cut " << cut;
  }
  EXPECT_EQ(cache.memory_stats().total.sinks, 0u);  // no block left
  // Appending again seals block 0 anew, with the tail's (exact) sinks.
  append_all(cache, 2, x, 20, 40);
  const Rows again = read_rows(cache, 2, 1);
  EXPECT_TRUE(std::equal(again.k.begin(), again.k.begin() + sink_values, x.k.begin()));
  EXPECT_GT(cache.memory_stats().total.sinks, 0u);
}

TEST(Sinks, ImagesCarryThemAndRefuseACacheThatKeepsADifferentNumber) {
  const CacheConfig c = sink_config();
  const Tokens x = make_tokens(c, 100, 6);
  PackedKVCache<float> cache(c);
  cache.add_sequence(1);
  append_all(cache, 1, x, 0, 100);
  const std::vector<std::uint8_t> image = cache.export_sequence(1);
  format::LayerRecord record;
  std::memcpy(&record, image.data() + sizeof(format::ImageHeader), sizeof record);
  EXPECT_EQ(record.sink_tokens, kSinks);
  for (const auto& form : {image, encode_image_entropy(image)}) {
    PackedKVCache<float> copy(c);
    copy.import_sequence(7, form);
    for (int l = 0; l < c.num_layers; ++l) {
      const Rows a = read_rows(cache, 1, l), b = read_rows(copy, 7, l);
      EXPECT_EQ(a.k, b.k);
      EXPECT_EQ(a.v, b.v);
    }
    EXPECT_EQ(copy.export_sequence(7), image);
  }
  for (const int other : {0, 2}) {
    PackedKVCache<float> elsewhere(sink_config(other));
    elsewhere.add_sequence(3);
    const test::Snapshot before = test::snapshot(elsewhere);
    expect_error([&] { elsewhere.import_sequence(7, image); }, "keeps 4 exact sink rows; this cache keeps");
    EXPECT_EQ(test::snapshot(elsewhere), before);
  }
  // A sink value that cannot be stored is refused, and nothing changes.
  std::vector<std::uint8_t> bad = image;
  const std::size_t at = test::image_layers(bad, sizeof(float)).at(1).sink_k;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(bad.data() + at + 8, &nan, sizeof nan);
  detail::seal_image(bad);
  PackedKVCache<float> target(c);
  expect_error([&] { target.import_sequence(9, bad); }, "sink K row 0 holds a value that cannot be stored");
  EXPECT_FALSE(target.contains(9));
}

TEST(Sinks, ImageRecordsAreValidated) {
  const CacheConfig c = sink_config();
  const Tokens x = make_tokens(c, 100, 9);
  PackedKVCache<float> cache(c);
  cache.add_sequence(1);
  cache.add_sequence(2);
  append_all(cache, 1, x, 0, 100);
  append_all(cache, 2, x, 0, 10);  // no block: records 0 sink rows
  PackedKVCache<float> target(c);
  // An older version has a reserved zero where version 3 counts the sink rows.
  std::vector<std::uint8_t> old = cache.export_sequence(1);
  format::ImageHeader h;
  std::memcpy(&h, old.data(), sizeof h);
  h.version = format::kImageVersionPerLayer;
  std::memcpy(old.data(), &h, sizeof h);
  detail::seal_image(old);
  expect_error([&] { target.import_sequence(3, old); }, "a version 2 layer record's reserved field is not zero");
  // Sink rows on a layer without blocks.
  std::vector<std::uint8_t> short_image = cache.export_sequence(2);
  format::LayerRecord record;
  const std::size_t at = test::image_layers(short_image, sizeof(float)).at(0).record;
  std::memcpy(&record, short_image.data() + at, sizeof record);
  ASSERT_EQ(record.sink_tokens, 0);
  record.sink_tokens = 1;
  std::memcpy(short_image.data() + at, &record, sizeof record);
  detail::seal_image(short_image);
  expect_error([&] { target.import_sequence(3, short_image); }, "only a layer with blocks has any");
  EXPECT_EQ(target.num_sequences(), 0u);
}

TEST(Sinks, ConfigBoundsAreChecked) {
  CacheConfig c = sink_config(33);
  expect_error([&] { PackedKVCache<float> cache(c); }, "sink_tokens must be in [0, block_tokens = 32], got 33");
  c.sink_tokens = -1;
  expect_error([&] { PackedKVCache<float> cache(c); }, "sink_tokens must be in [0, block_tokens = 32], got -1");
  c.sink_tokens = 32;  // a whole block of sinks is allowed
  PackedKVCache<float> cache(c);
  cache.add_sequence(1);
  const Tokens x = make_tokens(c, 100, 7);
  append_all(cache, 1, x, 0, 100);
  const Rows r = read_rows(cache, 1, 0);
  EXPECT_TRUE(std::equal(r.k.begin(), r.k.begin() + 32 * row_of(c), x.k.begin()));
}

TEST(Sinks, WorstCaseBytesCoverTheSinkRows) {
  const CacheConfig c = sink_config();
  const Tokens x = make_tokens(c, 100, 8);
  PackedKVCache<float> cache(c), plain(sink_config(0));
  const std::vector<SeqId> ids{1};
  for (auto* k : {&cache, &plain}) {
    k->add_sequence(1);
    append_all(*k, 1, x, 0, 39, 39);  // one token short of sealing block 0
  }
  const std::size_t sink_bytes = c.num_layers * kSinks * row_of(c) * 2 * sizeof(float);
  // The append that seals block 0 brings the sink rows; a later one does not.
  const std::size_t bound = cache.worst_case_bytes(ids, std::vector<int>{1});
  EXPECT_EQ(bound, plain.worst_case_bytes(ids, std::vector<int>{1}) + sink_bytes);
  const std::size_t before = cache.memory_stats().resident_bytes;
  append_all(cache, 1, x, 39, 1);
  append_all(plain, 1, x, 39, 1);
  EXPECT_LE(cache.memory_stats().resident_bytes - before, bound);
  EXPECT_EQ(cache.worst_case_bytes(ids, std::vector<int>{40}), plain.worst_case_bytes(ids, std::vector<int>{40}));
}

}  // namespace
}  // namespace packkv

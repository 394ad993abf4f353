// Reliability: sequence images (export/import), hostile bytes, memory pressure, concurrency and
// numerical edge cases.
#include <atomic>
#include <chrono>
#include <map>
#include <thread>

#include "core/image_io.hpp"
#include "test_util.hpp"

namespace packkv {
namespace {

using test::convert;
using test::expect_error;
using test::random_values;
using test::snapshot;

CacheConfig config(int layers = 2) {
  CacheConfig c;
  c.num_layers = layers;
  c.num_kv_heads = 2;
  c.num_q_heads = 4;
  c.head_dim = 16;
  c.block_tokens = 16;
  c.residual_tokens = 4;
  return c;
}

template <class T>
void fill(PackedKVCache<T>& cache, SeqId id, int layer, int tokens, std::uint64_t seed) {
  synthetic::KVStream stream(cache.config().num_kv_heads, cache.config().head_dim, seed);
  std::vector<float> k, v;
  stream.next(tokens, k, v);
  cache.append(id, layer, convert<T>(k).data(), convert<T>(v).data(), tokens);
}

template <class T>
std::vector<float> contents(const PackedKVCache<T>& cache, SeqId id, int layer) {
  const CacheConfig& c = cache.config();
  const std::size_t n = static_cast<std::size_t>(cache.length(id, layer)) * c.num_kv_heads * c.head_dim;
  std::vector<float> k(n), v(n);
  if (n) cache.read_back(id, layer, k.data(), v.data());
  k.insert(k.end(), v.begin(), v.end());
  return k;
}

// ---- export / import ----------------------------------------------------------------------------

TEST(SequenceImage, RoundTripIntoTheSameAndACompatibleCache) {
  PackedKVCache<fp16_t> a(config());
  a.add_sequence(1);
  fill(a, 1, 0, 75, 1);
  fill(a, 1, 1, 40, 2);
  const std::vector<std::uint8_t> image = a.export_sequence(1);
  const auto layer0 = contents(a, 1, 0), layer1 = contents(a, 1, 1);

  // Same cache: remove, import back, identical contents and statistics.
  const MemoryStats before = a.memory_stats();
  a.remove_sequence(1);
  a.import_sequence(1, image);
  EXPECT_EQ(contents(a, 1, 0), layer0);
  EXPECT_EQ(contents(a, 1, 1), layer1);
  EXPECT_EQ(a.memory_stats().total.total(), before.total.total());

  // Another cache: more query heads, no residual tokens (the imported tail gets compressed).
  CacheConfig other = config();
  other.num_q_heads = 8;
  other.residual_tokens = 0;
  PackedKVCache<fp16_t> b(other);
  b.import_sequence(7, image);
  ASSERT_EQ(b.length(7, 0), 75);
  const auto imported = contents(b, 7, 0);
  // Blocks are copied bit for bit: the first 64 tokens read back identically.
  const std::size_t block_part = 64 * 32;
  EXPECT_TRUE(std::equal(layer0.begin(), layer0.begin() + block_part, imported.begin()));
  // Then appending continues normally.
  fill(b, 7, 0, 30, 3);
  EXPECT_EQ(b.length(7, 0), 105);
}

TEST(SequenceImage, OneLayerAtATime) {
  PackedKVCache<float> a(config(3));
  a.add_sequence(1);
  for (int l = 0; l < 3; ++l) fill(a, 1, l, 20 + 17 * l, 10 + l);
  PackedKVCache<float> b(config(3));
  const int first[] = {2};
  b.import_sequence(1, a.export_sequence(1, first));
  EXPECT_EQ(b.length(1, 0), 0);
  EXPECT_EQ(b.length(1, 2), 54);
  const int rest[] = {0, 1};
  b.import_sequence(1, a.export_sequence(1, rest));
  for (int l = 0; l < 3; ++l) EXPECT_EQ(contents(b, 1, l), contents(a, 1, l)) << "layer " << l;
  // Importing into a layer that is no longer empty is refused.
  const test::Snapshot s = snapshot(b);
  expect_error([&] { b.import_sequence(1, a.export_sequence(1, first)); }, "layer 2 of sequence 1 is not empty");
  EXPECT_EQ(snapshot(b), s);
  const int twice[] = {1, 1};
  expect_error([&] { a.export_sequence(1, twice); }, "listed twice");
}

TEST(SequenceImage, IncompatibleCachesAreRefused) {
  PackedKVCache<float> a(config());
  a.add_sequence(1);
  fill(a, 1, 0, 50, 1);
  const auto image = a.export_sequence(1);
  auto refused = [&](CacheConfig c, const std::string& needle) {
    PackedKVCache<float> b(c);
    expect_error([&] { b.import_sequence(1, image); }, needle);
    EXPECT_FALSE(b.contains(1));
  };
  CacheConfig c = config();
  c.head_dim = 32;
  refused(c, "shape");
  c = config();
  c.k_rel = 0.05f;
  refused(c, "layer 0 was stored with codes up to K 10 V 5; this cache's layer 0 stores codes up to K 20");
  c = config();
  c.k_mode = QuantMode::per_channel;
  refused(c, "k_mode");
  c = config();
  c.repack = RepackMethod::none;
  refused(c, "permuted");
  c = config(1);
  refused(c, "layers");
  PackedKVCache<bf16_t> wrong_type(config());
  expect_error([&] { wrong_type.import_sequence(1, image); }, "holds float values");
}

TEST(SequenceImage, EveryCorruptionAndTruncationIsRejectedCleanly) {
  PackedKVCache<float> a(config());
  a.add_sequence(1);
  fill(a, 1, 0, 40, 1);
  fill(a, 1, 1, 21, 2);
  const auto image = a.export_sequence(1);
  PackedKVCache<float> b(config());
  b.add_sequence(5);
  fill(b, 5, 0, 33, 9);
  const test::Snapshot s = snapshot(b);
  // Every single-bit flip is caught (checksums), every truncation too.
  for (std::size_t i = 0; i < image.size(); i += 3) {
    std::vector<std::uint8_t> bad = image;
    bad[i] ^= static_cast<std::uint8_t>(1u << (i % 8));
    EXPECT_THROW(b.import_sequence(1, bad), error) << "flip at byte " << i;
  }
  for (std::size_t n = 0; n < image.size(); n += 7) {
    EXPECT_THROW(b.import_sequence(1, std::span(image.data(), n)), error) << "truncated to " << n;
  }
  EXPECT_EQ(snapshot(b), s);
}

TEST(SequenceImage, HostileButCorrectlySealedImagesNeverCorruptTheCache) {
  // An attacker can recompute checksums: structural validation must still hold the line.
  PackedKVCache<float> a(config());
  a.add_sequence(1);
  fill(a, 1, 0, 40, 1);
  const auto image = a.export_sequence(1);
  synthetic::Rng rng(99);
  int accepted = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    PackedKVCache<float> b(config());
    std::vector<std::uint8_t> bad = image;
    const int flips = 1 + static_cast<int>(rng.next() % 4);
    for (int f = 0; f < flips; ++f) {
      bad[sizeof(format::ImageHeader) + rng.next() % (bad.size() - sizeof(format::ImageHeader))] ^=
          static_cast<std::uint8_t>(1u << (rng.next() % 8));
    }
    detail::seal_image(bad);
    try {
      b.import_sequence(1, bad);
    } catch (const error&) {
      EXPECT_FALSE(b.contains(1));
      EXPECT_EQ(b.memory_stats().pool.live_blocks, 0u);
      continue;
    }
    // Accepted (a flip in a payload value or a parameter can be valid data): results stay finite.
    ++accepted;
    std::vector<float> q(4 * 16, 0.3f), out(4 * 16, NAN);
    const SeqId ids[] = {1};
    b.attention(ids, 0, q.data(), out.data(), 0.25f);
    for (float x : out) ASSERT_TRUE(std::isfinite(x)) << "trial " << trial;
  }
  RecordProperty("accepted", accepted);
}

// ---- memory pressure ------------------------------------------------------------------------------

TEST(MemoryPressure, RecoverByRemovingOrExportingThenReuse) {
  CacheConfig c = config(1);
  c.memory_budget_bytes = 4 << 20;  // 64 pages of 64 KiB: class granularity costs a few pages
  PackedKVCache<float> cache(c);
  SeqId next = 0;
  std::map<SeqId, std::vector<std::uint8_t>> offloaded;
  // Fill until the budget says no.
  for (;; ++next) {
    try {
      cache.add_sequence(next);
      fill(cache, next, 0, 200, next);
    } catch (const error& e) {
      EXPECT_NE(std::string(e.what()).find("memory budget"), std::string::npos);
      break;
    }
  }
  ASSERT_GT(next, 3);
  EXPECT_LE(cache.memory_stats().resident_bytes, c.memory_budget_bytes);
  // The failed sequence may exist (added, then its append refused): it holds no tokens.
  if (cache.contains(next)) {
    EXPECT_EQ(cache.length(next, 0), 0);
    cache.remove_sequence(next);
  }
  // Offload half the sequences to host images; the freed memory then takes new sequences of the
  // same shapes. Pages serve one size class at a time, so a few may be stranded: at least 90% of
  // the freed sequences must fit again without growing past the budget.
  for (SeqId id = 0; id < next / 2; ++id) {
    offloaded[id] = cache.export_sequence(id);
    cache.remove_sequence(id);
  }
  SeqId refilled = 0;
  for (SeqId id = 1000; id < 1000 + next / 2; ++id, ++refilled) {
    try {
      cache.add_sequence(id);
      fill(cache, id, 0, 200, id - 1000);
    } catch (const error&) {
      if (cache.contains(id)) cache.remove_sequence(id);
      break;
    }
  }
  EXPECT_GE(refilled * 10, (next / 2) * 9) << "only " << refilled << " of " << next / 2 << " fit again";
  EXPECT_LE(cache.memory_stats().resident_bytes, c.memory_budget_bytes);
  // Bring the offloaded ones back after removing the new ones. The pool reclaims stranded pages
  // (compaction) before refusing, so all but a few percent of them fit where they were before.
  for (SeqId id = 1000; id < 1000 + refilled; ++id) cache.remove_sequence(id);
  std::size_t restored = 0;
  for (auto& [id, image] : offloaded) {
    try {
      cache.import_sequence(id, image);
    } catch (const error& e) {
      EXPECT_NE(std::string(e.what()).find("memory budget"), std::string::npos) << e.what();
      break;
    }
    EXPECT_EQ(cache.length(id, 0), 200);
    ++restored;
  }
  EXPECT_GE(restored * 100, offloaded.size() * 95) << restored << " of " << offloaded.size() << " restored";
  // Empty everything: no live block is left and release_unused_memory returns every page.
  for (SeqId id : cache.sequence_ids()) cache.remove_sequence(id);
  const MemoryStats m = cache.memory_stats();
  EXPECT_EQ(m.pool.live_blocks, 0u);
  EXPECT_EQ(m.pool.live_bytes, 0u);
  cache.release_unused_memory();
  EXPECT_EQ(cache.memory_stats().pool.reserved_bytes, 0u);
  EXPECT_EQ(cache.memory_stats().resident_bytes, 0u);
}

// A randomised run of thousands of operations against a simple model of the cache: the model keeps
// the raw tokens of every sequence; every read-back must be within the error bound of them and
// every attention must match a float64 reference on the read-back. Forks copy the model (the cache
// shares blocks); a truncation cuts it, and the kept tokens of the block the cut falls in become
// what the cache read back at that moment (they may be quantized again: docs/architecture.md,
// "Truncation"). Removing everything at the end must free every block: no reference leaks.
TEST(Stress, RandomOperationsAgainstAReferenceModel) {
  CacheConfig c = config(2);
  c.memory_budget_bytes = 384 << 10;  // small enough that the run keeps hitting it
  PackedKVCache<float> cache(c);
  struct Model {
    std::vector<float> k[2], v[2];
  };
  std::map<SeqId, Model> model;
  std::map<SeqId, std::pair<std::vector<std::uint8_t>, Model>> offloaded;
  synthetic::Rng rng(2024);
  SeqId next_id = 0;
  int ops = 0, budget_refusals = 0, attentions = 0, forks = 0, truncations = 0;
  const std::size_t row = 32;
  auto check_sequence = [&](SeqId id, const Model& m) {
    for (int l = 0; l < 2; ++l) {
      ASSERT_EQ(cache.length(id, l), static_cast<std::int64_t>(m.k[l].size() / row));
      if (m.k[l].empty()) continue;
      std::vector<float> k(m.k[l].size()), v(m.v[l].size());
      cache.read_back(id, l, k.data(), v.data());
      for (std::size_t t = 0; t < k.size() / 16; ++t) {
        for (int which = 0; which < 2; ++which) {
          const float* x = (which ? m.v[l] : m.k[l]).data() + t * 16;
          const float* y = (which ? v : k).data() + t * 16;
          const float lo = *std::min_element(x, x + 16), hi = *std::max_element(x, x + 16);
          const double bound = (which ? c.v_rel : c.k_rel) * (hi - lo) * 0.5 * 1.01 + 1e-3 * std::fabs(lo) + 1e-6;
          for (int d = 0; d < 16; ++d) ASSERT_LE(std::fabs(x[d] - y[d]), bound) << "sequence " << id;
        }
      }
    }
  };
  for (; ops < 20000; ++ops) {
    const std::uint64_t r = rng.next() % 100;
    if (r < 15 || model.empty()) {  // add
      try {
        cache.add_sequence(next_id);
        model[next_id];
      } catch (const error&) {
        ++budget_refusals;
      }
      ++next_id;
    } else if (r < 50) {  // append
      auto it = std::next(model.begin(), static_cast<long>(rng.next() % model.size()));
      const int layer = static_cast<int>(rng.next() % 2);
      const int n = 1 + static_cast<int>(rng.next() % (rng.next() % 4 == 0 ? 70 : 3));
      const std::vector<float> k = random_values(n * row, rng.next(), 2.0), v = random_values(n * row, rng.next());
      try {
        cache.append(it->first, layer, k.data(), v.data(), n);
        it->second.k[layer].insert(it->second.k[layer].end(), k.begin(), k.end());
        it->second.v[layer].insert(it->second.v[layer].end(), v.begin(), v.end());
      } catch (const error& e) {
        ASSERT_NE(std::string(e.what()).find("memory budget"), std::string::npos) << e.what();
        ++budget_refusals;
      }
    } else if (r < 68) {  // attention over a random batch
      std::vector<SeqId> ids;
      const int layer = static_cast<int>(rng.next() % 2);
      for (auto& [id, m] : model) {
        if (!m.k[layer].empty() && rng.next() % 3 == 0) ids.push_back(id);
      }
      if (ids.empty()) continue;
      const std::vector<float> q = random_values(ids.size() * 4 * 16, rng.next());
      std::vector<float> out(q.size(), NAN);
      cache.attention(ids, layer, q.data(), out.data(), 0.25f);
      ++attentions;
      for (std::size_t b = 0; b < ids.size(); ++b) {
        const std::int64_t len = cache.length(ids[b], layer);
        std::vector<float> k(len * row), v(len * row);
        cache.read_back(ids[b], layer, k.data(), v.data());
        for (int h = 0; h < 4; ++h) {
          const auto ref = test::reference_attention(k.data(), v.data(), len, 2, 16, h / 2, &q[(b * 4 + h) * 16], 0.25);
          for (int d = 0; d < 16; ++d) ASSERT_NEAR(out[(b * 4 + h) * 16 + d], ref[d], 2e-5 * 8 + 1e-5 * std::fabs(ref[d]));
        }
      }
    } else if (r < 76) {  // remove
      auto it = std::next(model.begin(), static_cast<long>(rng.next() % model.size()));
      cache.remove_sequence(it->first);
      model.erase(it);
    } else if (r < 82) {  // export and offload
      auto it = std::next(model.begin(), static_cast<long>(rng.next() % model.size()));
      offloaded[it->first] = {cache.export_sequence(it->first), it->second};
      cache.remove_sequence(it->first);
      model.erase(it);
    } else if (r < 88) {  // fork
      auto it = std::next(model.begin(), static_cast<long>(rng.next() % model.size()));
      try {
        cache.fork(it->first, next_id);
        model[next_id] = it->second;
        ++forks;
      } catch (const error& e) {
        ASSERT_NE(std::string(e.what()).find("memory budget"), std::string::npos) << e.what();
        ++budget_refusals;
      }
      ++next_id;
    } else if (r < 94) {  // truncate
      auto it = std::next(model.begin(), static_cast<long>(rng.next() % model.size()));
      const std::int64_t longest =
          static_cast<std::int64_t>(std::max(it->second.k[0].size(), it->second.k[1].size()) / row);
      const std::int64_t n = longest == 0 ? 0 : static_cast<std::int64_t>(rng.next() % (longest + 1));
      try {
        cache.truncate(it->first, n);
        ++truncations;
        for (int l = 0; l < 2; ++l) {
          Model& m = it->second;
          if (m.k[l].size() > static_cast<std::size_t>(n) * row) {
            m.k[l].resize(static_cast<std::size_t>(n) * row);
            m.v[l].resize(static_cast<std::size_t>(n) * row);
          }
          const std::size_t first = static_cast<std::size_t>(n / c.block_tokens * c.block_tokens) * row;
          if (m.k[l].size() <= first) continue;
          std::vector<float> k(m.k[l].size()), v(m.v[l].size());
          cache.read_back(it->first, l, k.data(), v.data());
          std::copy(k.begin() + static_cast<long>(first), k.end(), m.k[l].begin() + static_cast<long>(first));
          std::copy(v.begin() + static_cast<long>(first), v.end(), m.v[l].begin() + static_cast<long>(first));
        }
      } catch (const error& e) {
        ASSERT_NE(std::string(e.what()).find("memory budget"), std::string::npos) << e.what();
        ++budget_refusals;
      }
    } else if (!offloaded.empty()) {  // import back
      auto it = std::next(offloaded.begin(), static_cast<long>(rng.next() % offloaded.size()));
      try {
        cache.import_sequence(it->first, it->second.first);
        model[it->first] = std::move(it->second.second);
        check_sequence(it->first, model[it->first]);
        offloaded.erase(it);
      } catch (const error& e) {
        ASSERT_NE(std::string(e.what()).find("memory budget"), std::string::npos) << e.what();
        ++budget_refusals;
      }
    }
    ASSERT_LE(cache.memory_stats().resident_bytes, c.memory_budget_bytes);
  }
  for (auto& [id, m] : model) check_sequence(id, m);
  for (SeqId id : cache.sequence_ids()) cache.remove_sequence(id);
  cache.release_unused_memory();
  const MemoryStats m = cache.memory_stats();
  EXPECT_EQ(m.pool.live_blocks, 0u);
  EXPECT_EQ(m.pool.reserved_bytes, 0u);
  EXPECT_EQ(m.resident_bytes, 0u);
  RecordProperty("operations", ops);
  RecordProperty("attention_checks", attentions);
  RecordProperty("budget_refusals", budget_refusals);
  RecordProperty("sequences", static_cast<int>(next_id));
  EXPECT_GE(next_id, 2000u);
  EXPECT_GT(attentions, 300);
  EXPECT_GT(forks, 300);
  EXPECT_GT(truncations, 300);
  EXPECT_GT(budget_refusals, 0) << "the budget should have been reached at least once";
}

// ---- concurrency ----------------------------------------------------------------------------------

TEST(Concurrency, ReadersInParallelWithWriters) {
  CacheConfig c = config(1);
  c.num_threads = 1;
  PackedKVCache<float> cache(c);
  for (SeqId id = 0; id < 4; ++id) {
    cache.add_sequence(id);
    fill(cache, id, 0, 300, id);
  }
  const std::vector<float> q = random_values(4 * 16, 5);
  std::vector<std::vector<float>> expected(4, std::vector<float>(64));
  for (SeqId id = 0; id < 4; ++id) {
    const SeqId ids[] = {id};
    cache.attention(ids, 0, q.data(), expected[id].data(), 0.25f);
  }
  std::atomic<bool> stop{false};
  std::atomic<int> mismatches{0}, reads{0};
  std::vector<std::thread> readers;
  for (int t = 0; t < 4; ++t) {
    readers.emplace_back([&, t] {
      std::vector<float> out(64);
      while (!stop) {
        const SeqId ids[] = {static_cast<SeqId>(t)};
        cache.attention(ids, 0, q.data(), out.data(), 0.25f);
        if (out != expected[t]) ++mismatches;
        ++reads;
      }
    });
  }
  // Meanwhile, writers add, grow, export, import and remove other sequences.
  std::thread writer([&] {
    for (int i = 0; i < 200; ++i) {
      const SeqId id = 100 + i;
      cache.add_sequence(id);
      fill(cache, id, 0, 40 + i % 50, id);
      const auto image = cache.export_sequence(id);
      cache.remove_sequence(id);
      cache.import_sequence(id, image);
      cache.remove_sequence(id);
    }
  });
  writer.join();
  while (reads < 200) std::this_thread::yield();
  stop = true;
  for (auto& r : readers) r.join();
  EXPECT_EQ(mismatches, 0);
  EXPECT_EQ(cache.num_sequences(), 4u);
}

// An append to one sequence holds only that sequence: attention on another sequence keeps
// completing while a long prefill is being compressed. (With one lock for the whole cache no
// attention call could complete inside the prefill's interval.)
TEST(Concurrency, AttentionOnOneSequenceProceedsDuringAPrefillOfAnother) {
  CacheConfig c;
  c.num_kv_heads = 8;
  c.num_q_heads = 8;
  c.head_dim = 128;
  c.block_tokens = 64;
  c.num_threads = 1;
  PackedKVCache<fp16_t> cache(c);
  cache.add_sequence(1);
  cache.add_sequence(2);
  fill(cache, 2, 0, 300, 2);
  const int prompt = 1 << 15;  // about a second of encoding on one core
  synthetic::KVStream stream(8, 128, 3);
  std::vector<float> kf, vf;
  stream.next(prompt, kf, vf);
  const std::vector<fp16_t> k = convert<fp16_t>(kf), v = convert<fp16_t>(vf);
  using clock = std::chrono::steady_clock;
  std::atomic<bool> started{false}, done{false};
  clock::time_point begin, end;
  std::thread writer([&] {
    begin = clock::now();
    started = true;
    cache.append(1, 0, k.data(), v.data(), prompt);
    end = clock::now();
    done = true;
  });
  while (!started) std::this_thread::yield();
  const std::vector<fp16_t> q = convert<fp16_t>(random_values(8 * 128, 4));
  std::vector<fp16_t> out(8 * 128);
  std::vector<std::pair<clock::time_point, clock::time_point>> calls;
  const SeqId ids[] = {2};
  while (!done) {
    const clock::time_point t0 = clock::now();
    cache.attention(ids, 0, q.data(), out.data(), 0.088f);
    calls.emplace_back(t0, clock::now());
  }
  writer.join();
  int inside = 0;
  for (const auto& [t0, t1] : calls) inside += t0 > begin && t1 < end;
  RecordProperty("attention_calls_inside_the_prefill", inside);
  EXPECT_GE(inside, 5) << "the prefill took " << std::chrono::duration<double>(end - begin).count() << " s";
  EXPECT_EQ(cache.length(1, 0), prompt);
}

// ---- numerical edge cases --------------------------------------------------------------------------

template <class T>
class EdgeCases : public ::testing::Test {};
using StorageTypes = ::testing::Types<float, fp16_t, bf16_t>;
TYPED_TEST_SUITE(EdgeCases, StorageTypes);

TYPED_TEST(EdgeCases, ConstantTinyHugeAndSubnormalValues) {
  using T = TypeParam;
  CacheConfig c = config(1);
  c.residual_tokens = 0;
  const std::vector<float> patterns[] = {
      std::vector<float>(32 * 32, 0.0f),                                 // all zero
      std::vector<float>(32 * 32, 1.25f),                                // all equal
      std::vector<float>(32 * 32, -65280.0f),                            // near the fp16 limit (bf16-exact)
      random_values(32 * 32, 1, 30000.0 / 8),                            // huge magnitudes
      random_values(32 * 32, 2, 1e-6),                                   // tiny magnitudes
      random_values(32 * 32, 3, 1e-7),                                   // fp16 subnormals
  };
  for (std::size_t p = 0; p < std::size(patterns); ++p) {
    std::vector<float> x = patterns[p];
    for (float& f : x) f = std::clamp(f, -65280.0f, 65280.0f);  // 65280: largest bf16 below 65504
    const std::vector<T> xt = convert<T>(x);
    PackedKVCache<T> cache(c);
    cache.add_sequence(1);
    cache.append(1, 0, xt.data(), xt.data(), 32);
    std::vector<float> k(x.size()), v(x.size());
    cache.read_back(1, 0, k.data(), v.data());
    for (std::size_t t = 0; t < 64; ++t) {  // 32 tokens x 2 heads, 16 channels each
      float lo = INFINITY, hi = -INFINITY;
      for (int d = 0; d < 16; ++d) {
        lo = std::min(lo, to_float(xt[t * 16 + d]));
        hi = std::max(hi, to_float(xt[t * 16 + d]));
      }
      const double ulp_lo = std::ldexp(1.0, std::max(-24, static_cast<int>(std::floor(std::log2(std::max(std::fabs(lo), 1e-30f)))) - 10));
      for (int which = 0; which < 2; ++which) {
        const double rel = which ? c.v_rel : c.k_rel;
        const double bound = (rel * (hi - lo + ulp_lo) * (1 + 0x1p-10) + 0x1p-24) / 2 + 4 * 0x1p-24 * std::max(std::fabs(lo), std::fabs(hi));
        for (int d = 0; d < 16; ++d) {
          const float got = (which ? v : k)[t * 16 + d];
          ASSERT_LE(std::fabs(got - to_float(xt[t * 16 + d])), bound) << "pattern " << p << " token/head " << t;
        }
      }
    }
    const std::vector<T> q = convert<T>(random_values(4 * 16, 9));
    std::vector<T> out(4 * 16);
    const SeqId ids[] = {1};
    cache.attention(ids, 0, q.data(), out.data(), 0.25f);
    for (const T& o : out) ASSERT_TRUE(std::isfinite(to_float(o))) << "pattern " << p;
  }
}

TEST(EdgeCases, SingleTokenSequencesAndShapeLimits) {
  for (auto [dim, block] : {std::pair{8, 16}, std::pair{256, 16}, std::pair{8, 256}, std::pair{256, 256}}) {
    CacheConfig c;
    c.head_dim = dim;
    c.block_tokens = block;
    c.num_kv_heads = 1;
    c.num_q_heads = 2;
    PackedKVCache<fp16_t> cache(c);
    cache.add_sequence(1);
    const std::vector<float> one = random_values(dim, 4);
    cache.append(1, 0, convert<fp16_t>(one).data(), convert<fp16_t>(one).data(), 1);
    std::vector<fp16_t> out(2 * dim);
    const SeqId ids[] = {1};
    cache.attention(ids, 0, convert<fp16_t>(random_values(2 * dim, 5)).data(), out.data(), 1.0f);
    // One token: attention returns its V exactly (softmax of one score is 1; the tail is exact).
    for (int d = 0; d < dim; ++d) EXPECT_EQ(out[d].bits, fp16_from_float(one[d]).bits) << "dim " << dim;
    // A full block at the limits, then attention stays finite.
    const std::vector<float> many = random_values(static_cast<std::size_t>(block) * dim, 6);
    cache.append(1, 0, convert<fp16_t>(many).data(), convert<fp16_t>(many).data(), block);
    cache.attention(ids, 0, convert<fp16_t>(random_values(2 * dim, 7)).data(), out.data(), 1.0f);
    for (const auto& o : out) ASSERT_TRUE(std::isfinite(to_float(o)));
  }
}

TEST(EdgeCases, Bf16BeyondFp16RangeIsRefused) {
  PackedKVCache<bf16_t> cache(config(1));
  cache.add_sequence(1);
  std::vector<float> x(32, 1.0f);
  x[3] = 1e6f;  // representable in bf16, not in fp16 parameters
  expect_error([&] { cache.append(1, 0, convert<bf16_t>(x).data(), convert<bf16_t>(x).data(), 1); },
               "beyond +-65504");
  EXPECT_EQ(cache.length(1, 0), 0);
}

TEST(EdgeCases, OneBitCodesWithAWideTokenAreRefusedClearly) {
  CacheConfig c = config(1);
  c.k_rel = 1.0f;
  c.residual_tokens = 0;
  PackedKVCache<float> cache(c);
  cache.add_sequence(1);
  std::vector<float> x(16 * 32, 0.0f);
  x[0] = -60000.0f;
  x[1] = 60000.0f;  // range 120000 / 1 code step > 65504
  expect_error([&] { cache.append(1, 0, x.data(), x.data(), 16); }, "too wide");
  EXPECT_EQ(cache.length(1, 0), 0);
}

}  // namespace
}  // namespace packkv

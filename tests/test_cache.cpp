// PackedKVCache on the CPU backend: appends, attention against a float64 reference on the
// read-back data, the two primitives, statistics, the pool, and every error path.
#include <numeric>
#include <tuple>

#include "test_util.hpp"

namespace packkv {
namespace {

using test::convert;
using test::expect_error;
using test::random_values;
using test::snapshot;

CacheConfig small_config() {
  CacheConfig c;
  c.num_layers = 2;
  c.num_kv_heads = 2;
  c.num_q_heads = 8;
  c.head_dim = 32;
  c.block_tokens = 32;
  c.k_rel = 0.1f;
  c.v_rel = 0.2f;
  return c;
}

template <class T>
void append_stream(PackedKVCache<T>& cache, SeqId id, int layer, std::int64_t tokens, std::uint64_t seed,
                   int chunk = 0) {
  const CacheConfig& c = cache.config();
  synthetic::KVStream stream(c.num_kv_heads, c.head_dim, seed);
  std::vector<float> k, v;
  std::int64_t done = 0;
  while (done < tokens) {
    const int n = static_cast<int>(std::min<std::int64_t>(chunk ? chunk : tokens, tokens - done));
    stream.next(n, k, v);
    const auto kt = convert<T>(k), vt = convert<T>(v);
    cache.append(id, layer, kt.data(), vt.data(), n);
    done += n;
  }
}

// Worst |out - ref| relative to the tolerance, over the whole batch; fails on NaN/Inf.
template <class T>
void check_attention(const PackedKVCache<T>& cache, const std::vector<SeqId>& ids, int layer, std::uint64_t seed) {
  const CacheConfig& c = cache.config();
  const int group = c.num_q_heads / c.num_kv_heads;
  const std::size_t qsize = ids.size() * c.num_q_heads * c.head_dim;
  const std::vector<float> qf = random_values(qsize, seed);
  const std::vector<T> q = convert<T>(qf);
  std::vector<T> out(qsize, from_float<T>(NAN));  // poison: an unwritten element fails
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  cache.attention(ids, layer, q.data(), out.data(), scale);
  const std::size_t row = static_cast<std::size_t>(c.num_kv_heads) * c.head_dim;
  double worst = 0;
  for (std::size_t b = 0; b < ids.size(); ++b) {
    const std::int64_t len = cache.length(ids[b], layer);
    std::vector<float> k(len * row), v(len * row);
    cache.read_back(ids[b], layer, k.data(), v.data());
    double vmax = 0;
    for (float x : v) vmax = std::max(vmax, static_cast<double>(std::fabs(x)));
    for (int qh = 0; qh < c.num_q_heads; ++qh) {
      // The reference uses the query as the cache saw it (rounded to T).
      std::vector<float> qr(c.head_dim);
      for (int d = 0; d < c.head_dim; ++d) qr[d] = to_float(q[(b * c.num_q_heads + qh) * c.head_dim + d]);
      const auto ref = test::reference_attention(k.data(), v.data(), len, c.num_kv_heads, c.head_dim, qh / group,
                                                 qr.data(), scale);
      for (int d = 0; d < c.head_dim; ++d) {
        const double got = to_float(out[(b * c.num_q_heads + qh) * c.head_dim + d]);
        ASSERT_TRUE(std::isfinite(got)) << "batch " << b << " head " << qh << " dim " << d;
        // One rounding to T, plus fp32 accumulation and the vectorised exp.
        const double tol = 2 * test::unit_roundoff<T>() * std::fabs(ref[d]) + 2e-5 * vmax;
        worst = std::max(worst, std::fabs(got - ref[d]) / tol);
        ASSERT_LE(std::fabs(got - ref[d]), tol)
            << "batch " << b << " (len " << len << ") head " << qh << " dim " << d << " ref " << ref[d];
      }
    }
  }
  ::testing::Test::RecordProperty("worst_error_over_tolerance", std::to_string(worst));
}

template <class T>
class CacheTyped : public ::testing::Test {};
using StorageTypes = ::testing::Types<float, fp16_t, bf16_t>;
TYPED_TEST_SUITE(CacheTyped, StorageTypes);

TYPED_TEST(CacheTyped, AttentionMatchesFloat64ReferenceAcrossShapes) {
  using T = TypeParam;
  // (GQA ratio, head_dim, block, residual, k_mode)
  for (auto [ratio, dim, block, residual, mode] :
       {std::tuple{1, 64, 64, 0, QuantMode::per_token}, std::tuple{4, 128, 32, 16, QuantMode::per_token},
        std::tuple{8, 64, 16, 0, QuantMode::per_channel}, std::tuple{4, 96, 48, 0, QuantMode::per_token},
        std::tuple{12, 16, 32, 5, QuantMode::per_token}}) {
    CacheConfig c;
    c.num_layers = 1;
    c.num_kv_heads = 2;
    c.num_q_heads = 2 * ratio;
    c.head_dim = dim;
    c.block_tokens = block;
    c.residual_tokens = residual;
    c.k_mode = mode;
    PackedKVCache<T> cache(c);
    // Lengths around block boundaries, in one batch of different lengths.
    const std::vector<std::int64_t> lengths = {1, 15, 16, 17, block - 1, block, block + 1, 3 * block + 7, 700};
    std::vector<SeqId> ids;
    for (std::size_t i = 0; i < lengths.size(); ++i) {
      const SeqId id = 100 + i;
      cache.add_sequence(id);
      append_stream(cache, id, 0, lengths[i], 1000 + i, i % 2 ? 7 : 0);  // prefill or chunks of 7
      ASSERT_EQ(cache.length(id, 0), lengths[i]);
      ids.push_back(id);
    }
    check_attention(cache, ids, 0, 5);
    // Each sequence alone (exercises the long-context split across threads).
    check_attention(cache, {ids.back()}, 0, 6);
  }
}

TYPED_TEST(CacheTyped, TokenByTokenEqualsPrefill) {
  using T = TypeParam;
  CacheConfig c = small_config();
  c.residual_tokens = 8;
  PackedKVCache<T> a(c), b(c);
  a.add_sequence(1);
  b.add_sequence(1);
  append_stream(a, 1, 1, 150, 9);
  append_stream(b, 1, 1, 150, 9, 1);
  EXPECT_EQ(snapshot(a), snapshot(b));
  // Residual tokens stay uncompressed: 150 - 8 = 142 -> 4 blocks of 32, 22 tokens in the tail.
  const MemoryStats m = a.memory_stats();
  EXPECT_EQ(m.layers[1].compressed_tokens, 128u);
  EXPECT_EQ(m.layers[1].tail_tokens, 22u);
}

TYPED_TEST(CacheTyped, ReadBackIsOriginalOrderWithinTheBound) {
  using T = TypeParam;
  CacheConfig c = small_config();
  c.repack = RepackMethod::median;
  PackedKVCache<T> cache(c);
  cache.add_sequence(3);
  synthetic::KVStream stream(c.num_kv_heads, c.head_dim, 4);
  std::vector<float> k, v;
  stream.next(100, k, v);
  const auto kt = convert<T>(k), vt = convert<T>(v);
  cache.append(3, 0, kt.data(), vt.data(), 100);
  std::vector<float> k2(k.size()), v2(v.size());
  cache.read_back(3, 0, k2.data(), v2.data());
  const std::size_t row = 64;
  for (std::size_t t = 0; t < 100; ++t) {
    for (int h = 0; h < 2; ++h) {
      for (int which = 0; which < 2; ++which) {
        const T* src = (which ? vt.data() : kt.data()) + t * row + h * 32;
        const float* got = (which ? v2.data() : k2.data()) + t * row + h * 32;
        float lo = INFINITY, hi = -INFINITY;
        for (int d = 0; d < 32; ++d) {
          lo = std::min(lo, to_float(src[d]));
          hi = std::max(hi, to_float(src[d]));
        }
        const double rel = which ? c.v_rel : c.k_rel;
        const double bound = t < 96 ? rel * (hi - lo) * 0.5 * 1.002 + 1e-3 * rel * std::fabs(lo) + 1e-7 : 0.0;
        for (int d = 0; d < 32; ++d) {
          ASSERT_LE(std::fabs(got[d] - to_float(src[d])), bound) << "token " << t << " head " << h;
        }
      }
    }
  }
}

TEST(Cache, PrimitivesMatchReferenceInOriginalOrder) {
  CacheConfig c = small_config();
  c.repack = RepackMethod::greedy;
  PackedKVCache<float> cache(c);
  cache.add_sequence(5);
  append_stream(cache, 5, 0, 203, 21);
  const std::int64_t len = cache.length(5, 0);
  const std::size_t row = 64;
  std::vector<float> k(len * row), v(len * row);
  cache.read_back(5, 0, k.data(), v.data());
  const std::vector<float> q = random_values(8 * 32, 22);
  std::vector<float> scores(8 * len, NAN);
  cache.scores(5, 0, q.data(), scores.data());
  for (int h = 0; h < 8; ++h) {
    for (std::int64_t t = 0; t < len; ++t) {
      double ref = 0, mag = 0;
      for (int d = 0; d < 32; ++d) {
        ref += static_cast<double>(q[h * 32 + d]) * k[t * row + (h / 4) * 32 + d];
        mag += std::fabs(static_cast<double>(q[h * 32 + d]) * k[t * row + (h / 4) * 32 + d]);
      }
      ASSERT_NEAR(scores[h * len + t], ref, 1e-5 * mag + 1e-6) << "head " << h << " token " << t;
    }
  }
  const std::vector<float> w = random_values(8 * len, 23);
  std::vector<float> out(8 * 32, NAN);
  cache.attn_v(5, 0, w.data(), out.data());
  for (int h = 0; h < 8; ++h) {
    for (int d = 0; d < 32; ++d) {
      double ref = 0, mag = 0;
      for (std::int64_t t = 0; t < len; ++t) {
        ref += static_cast<double>(w[h * len + t]) * v[t * row + (h / 4) * 32 + d];
        mag += std::fabs(static_cast<double>(w[h * len + t]) * v[t * row + (h / 4) * 32 + d]);
      }
      ASSERT_NEAR(out[h * 32 + d], ref, 1e-5 * mag + 1e-6) << "head " << h << " dim " << d;
    }
  }
}

TEST(Cache, StatisticsCountEveryByte) {
  CacheConfig c = small_config();
  PackedKVCache<fp16_t> cache(c);
  for (SeqId id : {1, 2, 3}) {
    cache.add_sequence(id);
    for (int layer = 0; layer < 2; ++layer) append_stream(cache, id, layer, 100 + 50 * id, id * 10 + layer);
  }
  const MemoryStats m = cache.memory_stats();
  // Block bytes split into payload / params / descriptors / permutations / headers exactly.
  const MemoryBreakdown& t = m.total;
  EXPECT_EQ(t.payload + t.params + t.descriptors + t.permutations + t.headers, m.pool.live_bytes);
  // Tables: at least one entry per block, plus the per-layer bookkeeping.
  EXPECT_GE(t.block_tables, m.pool.live_blocks * sizeof(void*));
  EXPECT_LT(t.block_tables, m.pool.live_blocks * 64 + 3 * 2 * 512);
  // Everything resident is in total() but the pool's unused slots and the scratch memory.
  EXPECT_EQ(m.resident_bytes, t.total() + (m.pool.reserved_bytes - m.pool.live_bytes) + m.scratch_bytes);
  EXPECT_EQ(t.original_bytes, (150 + 200 + 250) * 2 * 64 * 2 * sizeof(fp16_t));
  EXPECT_EQ(t.original_fp16_bytes, t.original_bytes);
  EXPECT_EQ(t.compressed_tokens + t.tail_tokens, 1200u);
  // 4-bit K and 3-bit codes at most: the ratio vs fp16 must be well above 2 even with metadata.
  EXPECT_GT(t.ratio_vs_fp16(), 2.0);
  EXPECT_LT(t.ratio_vs_fp16(), 16.0 / 3.0);
  MemoryBreakdown sum;
  for (const auto& layer : m.layers) sum += layer;
  EXPECT_EQ(sum.total(), t.total());
  EXPECT_GE(m.resident_bytes, m.pool.reserved_bytes + t.tail);
  // The tail is counted as allocated: at least the tokens it holds.
  EXPECT_GE(t.tail, t.tail_tokens * 2 * 64 * sizeof(fp16_t));
  EXPECT_GT(m.pool.fragmentation(), 0.0);
  EXPECT_LT(m.pool.fragmentation(), 1.0);
  // The K/V split: outside the two sides' sections a block holds only its fixed prefix (header,
  // directory, permutations) and the trailing slack.
  const format::BlockGeometry g = make_codec_params(c).geometry;
  EXPECT_EQ(t.k_section_bytes + t.v_section_bytes + m.pool.live_blocks * (g.sections_offset() + format::kTrailingSlack),
            m.pool.live_bytes);
  EXPECT_DOUBLE_EQ(t.k_bytes() + t.v_bytes(), static_cast<double>(t.total()));
}

TEST(Cache, StatisticsSplitKAndV) {
  // Finer K than V: K's sections are larger; making V finer too moves only V's share (no
  // repacking, so V's codes cannot change K's token order).
  CacheConfig c = small_config();
  c.repack = RepackMethod::none;
  c.k_rel = 0.02f;
  c.v_rel = 0.3f;
  PackedKVCache<float> coarse_v(c);
  c.v_rel = 0.02f;
  PackedKVCache<float> fine_v(c);
  for (auto* cache : {&coarse_v, &fine_v}) {
    cache->add_sequence(1);
    append_stream(*cache, 1, 0, 256, 5);
  }
  const MemoryBreakdown a = coarse_v.memory_stats().total, b = fine_v.memory_stats().total;
  EXPECT_GT(a.k_section_bytes, a.v_section_bytes);
  EXPECT_EQ(a.k_section_bytes, b.k_section_bytes);
  EXPECT_GT(b.v_section_bytes, a.v_section_bytes);
  // Shared bytes are split evenly.
  EXPECT_DOUBLE_EQ(a.k_bytes() - a.v_bytes(), static_cast<double>(a.k_section_bytes) - a.v_section_bytes);
}

TEST(Cache, PoolMemoryIsReusedAfterRemoval) {
  CacheConfig c = small_config();
  c.num_layers = 1;
  PackedKVCache<float> cache(c);
  auto fill = [&](PackedKVCache<float>& target, SeqId first) {
    for (SeqId id = first; id < first + 40; ++id) {
      target.add_sequence(id);
      append_stream(target, id, 0, 64 + 32 * (id % 5), id);
    }
  };
  fill(cache, 0);
  ASSERT_GT(cache.memory_stats().pool.reserved_bytes, 0u);
  for (int round = 1; round <= 5; ++round) {
    for (SeqId id = (round - 1) * 40; id < round * 40; ++id) cache.remove_sequence(id);
    EXPECT_EQ(cache.memory_stats().pool.live_blocks, 0u);
    fill(cache, round * 40);
    // Freed pages serve the new blocks: no more memory than a new cache needs for the same data.
    PackedKVCache<float> fresh(c);
    fill(fresh, round * 40);
    EXPECT_EQ(cache.memory_stats().pool.live_bytes, fresh.memory_stats().pool.live_bytes);
    EXPECT_LE(cache.memory_stats().pool.reserved_bytes, fresh.memory_stats().pool.reserved_bytes)
        << "round " << round;
  }
}

TEST(Cache, AllThreeTypesAgreeOnFp16RepresentableData) {
  // The same values (exact in fp16 and bf16... and float) encode to the same blocks.
  CacheConfig c = small_config();
  c.num_layers = 1;
  std::vector<float> k(70 * 64), v(70 * 64);
  for (std::size_t i = 0; i < k.size(); ++i) {
    k[i] = static_cast<float>(static_cast<int>(i * 37 % 64) - 32) / 8.0f;  // multiples of 1/8: exact everywhere
    v[i] = static_cast<float>(static_cast<int>(i * 11 % 32) - 16) / 16.0f;
  }
  PackedKVCache<float> a(c);
  PackedKVCache<fp16_t> b(c);
  PackedKVCache<bf16_t> d(c);
  a.add_sequence(1);
  b.add_sequence(1);
  d.add_sequence(1);
  a.append(1, 0, k.data(), v.data(), 70);
  b.append(1, 0, convert<fp16_t>(k).data(), convert<fp16_t>(v).data(), 70);
  d.append(1, 0, convert<bf16_t>(k).data(), convert<bf16_t>(v).data(), 70);
  EXPECT_EQ(snapshot(a).contents, snapshot(b).contents);
  EXPECT_EQ(snapshot(a).contents, snapshot(d).contents);
}

// ---- errors: each leaves the cache exactly as it was -------------------------------------------

class CacheErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    cfg_ = small_config();
    cache_ = std::make_unique<PackedKVCache<float>>(cfg_);
    cache_->add_sequence(1);
    cache_->add_sequence(2);
    append_stream(*cache_, 1, 0, 77, 1);
    append_stream(*cache_, 2, 1, 40, 2);
    before_ = snapshot(*cache_);
  }
  void TearDown() override { EXPECT_EQ(snapshot(*cache_), before_) << "a failed call changed the cache"; }

  CacheConfig cfg_;
  std::unique_ptr<PackedKVCache<float>> cache_;
  test::Snapshot before_;
};

TEST_F(CacheErrors, UnknownAndRemovedSequences) {
  std::vector<float> kv(64, 0.5f), q(8 * 32, 0.1f), out(8 * 32);
  expect_error([&] { cache_->append(9, 0, kv.data(), kv.data(), 1); }, "unknown sequence id 9");
  expect_error([&] { cache_->length(9); }, "unknown sequence id 9");
  expect_error([&] { cache_->remove_sequence(9); }, "unknown sequence id 9");
  const SeqId ids[] = {1, 9};
  expect_error([&] { cache_->attention(ids, 0, q.data(), out.data(), 1.0f); }, "unknown sequence id 9");
  expect_error([&] { cache_->add_sequence(1); }, "already exists");
  // A removed id is unknown afterwards (added and removed inside the test: net no change).
  cache_->add_sequence(7);
  cache_->remove_sequence(7);
  expect_error([&] { cache_->append(7, 0, kv.data(), kv.data(), 1); }, "unknown sequence id 7");
}

TEST_F(CacheErrors, BadLayersShapesAndPointers) {
  std::vector<float> kv(64 * 4, 0.5f), q(8 * 32, 0.1f), out(8 * 32);
  expect_error([&] { cache_->append(1, 2, kv.data(), kv.data(), 1); }, "layer 2 is out of range");
  expect_error([&] { cache_->append(1, -1, kv.data(), kv.data(), 1); }, "layer -1 is out of range");
  expect_error([&] { cache_->append(1, 0, kv.data(), kv.data(), 0); }, "n_tokens must be in");
  expect_error([&] { cache_->append(1, 0, nullptr, kv.data(), 1); }, "must not be null");
  const SeqId one[] = {1};
  expect_error([&] { cache_->attention(one, 0, q.data(), out.data(), NAN); }, "softmax_scale");
  expect_error([&] { cache_->attention({}, 0, q.data(), out.data(), 1.0f); }, "empty");
  const SeqId two[] = {2};
  expect_error([&] { cache_->attention(two, 0, q.data(), out.data(), 1.0f); }, "has no tokens at layer 0");
  expect_error([&] { cache_->read_back(1, 5, kv.data(), kv.data()); }, "layer 5");
}

TEST_F(CacheErrors, NonFiniteAndOutOfRangeValuesAreRejectedWholesale) {
  // 40 tokens: one block would be compressed; the bad value sits in the part that stays in the tail
  // and, separately, in the part that would be compressed. Neither may leave anything behind.
  for (std::size_t bad_at : {std::size_t{5}, std::size_t{39 * 64 + 3}}) {
    for (float bad : {NAN, INFINITY, -INFINITY, 1e5f}) {
      std::vector<float> k = random_values(40 * 64, 3), v = random_values(40 * 64, 4);
      (bad_at % 2 ? k : v)[bad_at] = bad;
      expect_error([&] { cache_->append(1, 0, k.data(), v.data(), 40); }, "NaN, Inf or beyond");
    }
  }
}

TEST_F(CacheErrors, MemoryBudgetIsEnforcedWithoutSideEffects) {
  CacheConfig c = small_config();
  c.memory_budget_bytes = 400 * 1024;
  PackedKVCache<float> cache(c);
  cache.add_sequence(1);
  std::size_t appended = 0;
  std::vector<float> k, v;
  synthetic::KVStream stream(2, 32, 5);
  try {
    for (;; appended += 64) {
      stream.next(64, k, v);
      cache.append(1, 0, k.data(), v.data(), 64);
    }
  } catch (const error& e) {
    EXPECT_NE(std::string(e.what()).find("memory budget"), std::string::npos) << e.what();
  }
  ASSERT_GT(appended, 0u);
  EXPECT_EQ(cache.length(1, 0), static_cast<std::int64_t>(appended));
  EXPECT_LE(cache.memory_stats().resident_bytes, c.memory_budget_bytes);
  // Removing the sequence frees its blocks; a new sequence can then use the memory.
  const test::Snapshot full = snapshot(cache);
  expect_error([&] { cache.add_sequence(2), cache.append(2, 0, k.data(), v.data(), 64); }, "memory budget");
  cache.remove_sequence(2);
  EXPECT_EQ(snapshot(cache), full);
  cache.remove_sequence(1);
  cache.add_sequence(3);
  cache.append(3, 0, k.data(), v.data(), 64);
  EXPECT_EQ(cache.length(3, 0), 64);
}

TEST(CacheConfigErrors, InvalidConfigsNameTheField) {
  auto bad = [](auto mutate, const std::string& needle) {
    CacheConfig c = small_config();
    mutate(c);
    expect_error([&] { PackedKVCache<float> cache(c); }, needle);
  };
  bad([](CacheConfig& c) { c.num_layers = 0; }, "num_layers");
  bad([](CacheConfig& c) { c.num_kv_heads = 0; }, "num_kv_heads");
  bad([](CacheConfig& c) { c.num_q_heads = 7; }, "num_q_heads");
  bad([](CacheConfig& c) { c.head_dim = 100; }, "head_dim must be a multiple of 8");
  bad([](CacheConfig& c) { c.head_dim = 264; }, "head_dim");
  bad([](CacheConfig& c) { c.block_tokens = 40; }, "block_tokens");
  bad([](CacheConfig& c) { c.block_tokens = 512; }, "block_tokens");
  bad([](CacheConfig& c) { c.residual_tokens = -1; }, "residual_tokens");
  bad([](CacheConfig& c) { c.k_rel = 0.001f; }, "k_rel");
  bad([](CacheConfig& c) { c.v_rel = 2.0f; }, "v_rel");
  bad([](CacheConfig& c) { c.v_rel = NAN; }, "v_rel");
  bad([](CacheConfig& c) { c.repack = static_cast<RepackMethod>(9); }, "repack");
  bad([](CacheConfig& c) { c.num_threads = -2; }, "num_threads");
}

TEST(CacheConfigErrors, CudaWithoutCudaBuildIsAClearError) {
#if !defined(PACKKV_WITH_CUDA)
  CacheConfig c = small_config();
  c.device = Device::cuda;
  expect_error([&] { PackedKVCache<float> cache(c); }, "no CUDA backend");
#else
  GTEST_SKIP() << "this build has the CUDA backend; tests/cuda covers it";
#endif
}

}  // namespace
}  // namespace packkv

// Every refusal changes nothing: each test here reproduces a behaviour in which a refused (or
// wrongly accepted) call left the cache in a state the caller could not undo, and checks that the
// call is now refused cleanly, or now succeeds.
#include <sys/resource.h>

#include <climits>
#include <cstdio>
#include <cstring>
#include <new>

#include "core/image_io.hpp"
#include "test_util.hpp"

namespace packkv {
namespace {

using test::convert;
using test::expect_error;
using test::random_values;
using test::snapshot;

template <class T>
void fill(PackedKVCache<T>& cache, SeqId id, int layer, int tokens, std::uint64_t seed) {
  synthetic::KVStream stream(cache.config().num_kv_heads, cache.config().head_dim, seed);
  std::vector<float> k, v;
  stream.next(tokens, k, v);
  cache.append(id, layer, convert<T>(k).data(), convert<T>(v).data(), tokens);
}

/// Appends one block's worth (32 tokens) whose noise grows with the layer, so that the layers'
/// packed blocks grow in size from layer to layer: each lands in a larger size class of a pool.
void fill_growing(PackedKVCache<float>& cache, SeqId id, int layer, std::uint64_t seed) {
  const CacheConfig& c = cache.config();
  const std::size_t row = static_cast<std::size_t>(c.num_kv_heads) * c.head_dim;
  synthetic::Rng rng(seed);
  const double noise = std::exp2(-8.0 + layer);
  std::vector<float> k(32 * row), v(k.size());
  for (std::size_t i = 0; i < k.size(); ++i) {
    k[i] = static_cast<float>(std::sin(0.37 * static_cast<double>(i % row)) + noise * rng.normal());
    v[i] = static_cast<float>(std::cos(0.11 * static_cast<double>(i % row)) + noise * rng.normal());
  }
  cache.append(id, layer, k.data(), v.data(), 32);
}

/// Rewrites an image's checksums after a deliberate edit (what a hostile producer can do).
void reseal(std::vector<std::uint8_t>& image) { detail::seal_image(image); }

/// Offset of layer record `index`'s tail K rows in an image of float values.
std::size_t tail_k_offset(const std::vector<std::uint8_t>& image, int index) {
  return test::image_layers(image, sizeof(float)).at(static_cast<std::size_t>(index)).tail_k;
}

// ---- import is all-or-nothing under a memory budget -----------------------------------------------

CacheConfig import_config(int residual, std::size_t budget) {
  CacheConfig c;
  c.num_layers = 8;
  c.num_kv_heads = 4;
  c.num_q_heads = 8;
  c.head_dim = 64;
  c.block_tokens = 32;
  c.residual_tokens = residual;
  c.memory_budget_bytes = budget;
  return c;
}

/// Imports `image` as sequence `id` into caches with growing budgets, each prepared by
/// `prepare(cache)` (which may refuse a budget too small for it). Every budget must either admit
/// the whole image, or refuse it leaving the cache exactly as it was. Returns {admitted, refused}.
template <class Prepare>
std::pair<int, int> sweep_budgets(const std::vector<std::uint8_t>& image, SeqId id, Prepare&& prepare) {
  int admitted = 0, refused = 0;
  for (std::size_t budget = 64 << 10; budget <= (2 << 20); budget += 16 << 10) {
    PackedKVCache<float> target(import_config(0, budget));
    try {
      prepare(target);
    } catch (const error&) {
      continue;  // the budget is too small for what the target holds before the import
    }
    const test::Snapshot before = snapshot(target);
    try {
      target.import_sequence(id, image);
      ++admitted;
      for (int l = 1; l < 8; ++l) EXPECT_EQ(target.length(id, l), 32) << "budget " << budget;
    } catch (const error& e) {
      ++refused;
      EXPECT_NE(std::string(e.what()).find("memory budget"), std::string::npos) << e.what();
      EXPECT_EQ(snapshot(target), before) << "a refused import changed the cache (budget " << budget << ")";
    }
  }
  return {admitted, refused};
}

// The image's tails are longer than the target's residual window, so import compresses them into
// new blocks, one per layer, each in a larger size class than the last (a new page each).
TEST(Refusals, ImportUnderABudgetIsAllOrNothing) {
  PackedKVCache<float> source(import_config(400, 0));
  source.add_sequence(1);
  for (int l = 0; l < 8; ++l) fill_growing(source, 1, l, 10 + l);
  const auto [admitted, refused] = sweep_budgets(source.export_sequence(1), 1, [](PackedKVCache<float>& target) {
    target.add_sequence(2);
    fill(target, 2, 0, 100, 3);
  });
  EXPECT_GT(refused, 0);
  EXPECT_GT(admitted, 0);
}

TEST(Refusals, ImportIntoAnExistingSequenceUnderABudgetIsAllOrNothing) {
  PackedKVCache<float> source(import_config(400, 0));
  source.add_sequence(1);
  for (int l = 1; l < 8; ++l) fill_growing(source, 1, l, 20 + l);
  const int layers[] = {1, 2, 3, 4, 5, 6, 7};
  const auto [admitted, refused] =
      sweep_budgets(source.export_sequence(1, layers), 1, [](PackedKVCache<float>& target) {
        target.add_sequence(1);
        fill(target, 1, 0, 80, 3);  // layer 0 holds tokens; the image fills the others
      });
  EXPECT_GT(refused, 0);
  EXPECT_GT(admitted, 0);
}

// ---- what the encoder will need later is checked when the token arrives ----------------------------

CacheConfig one_bit_config(QuantMode mode) {
  CacheConfig c;
  c.num_layers = 2;
  c.num_kv_heads = 2;
  c.num_q_heads = 2;
  c.head_dim = 16;
  c.block_tokens = 16;
  c.residual_tokens = 32;
  c.k_rel = 1.0f;  // one-bit codes: a group's step is its whole range, which must fit fp16
  c.k_mode = mode;
  return c;
}

TEST(Refusals, AnUnrepresentableTokenIsRefusedWhenItArrivesNotWhenItsBlockCompletes) {
  PackedKVCache<float> cache(one_bit_config(QuantMode::per_token));
  cache.add_sequence(1);
  fill(cache, 1, 0, 5, 1);
  std::vector<float> k(32, 0.5f), v(32, 0.5f);
  k[3] = -60000.0f;
  k[4] = 60000.0f;  // one token of head 0 spans 120000: no fp16 step covers it with one code
  const test::Snapshot before = snapshot(cache);
  expect_error([&] { cache.append(1, 0, k.data(), v.data(), 1); }, "too wide");
  EXPECT_EQ(snapshot(cache), before);
  // The layer is not stuck: appends that complete blocks keep working.
  for (int i = 0; i < 4; ++i) fill(cache, 1, 0, 20, 2 + i);
  EXPECT_EQ(cache.length(1, 0), 85);
  EXPECT_GT(cache.memory_stats().total.compressed_tokens, 0u);
}

TEST(Refusals, APerChannelRangeTooWideForItsBlockIsRefusedWhenItArrives) {
  PackedKVCache<float> cache(one_bit_config(QuantMode::per_channel));
  cache.add_sequence(1);
  std::vector<float> k(32, 0.5f), v(32, 0.5f);
  k[0] = -60000.0f;
  cache.append(1, 0, k.data(), v.data(), 1);  // alone, channel 0's range is fine
  k[0] = 60000.0f;                            // with it, channel 0 of this block spans 120000
  const test::Snapshot before = snapshot(cache);
  expect_error([&] { cache.append(1, 0, k.data(), v.data(), 1); }, "too wide");
  EXPECT_EQ(snapshot(cache), before);
  // The same token in the next block is fine.
  fill(cache, 1, 0, 15, 3);
  cache.append(1, 0, k.data(), v.data(), 1);
  for (int i = 0; i < 4; ++i) fill(cache, 1, 0, 20, 4 + i);
  EXPECT_EQ(cache.length(1, 0), 97);
}

TEST(Refusals, AnImageWhoseTailCannotBeCompressedIsRefusedWhole) {
  PackedKVCache<float> source(one_bit_config(QuantMode::per_token));
  source.add_sequence(1);
  fill(source, 1, 0, 20, 1);
  fill(source, 1, 1, 20, 2);
  std::vector<std::uint8_t> image = source.export_sequence(1);
  // Layer 1's first tail token gets a K row that one-bit codes cannot cover.
  const std::size_t at = tail_k_offset(image, 1);
  const float wide[2] = {-60000.0f, 60000.0f};
  std::memcpy(image.data() + at, wide, sizeof wide);
  reseal(image);
  CacheConfig c = one_bit_config(QuantMode::per_token);
  c.residual_tokens = 0;  // the target compresses the imported tails
  PackedKVCache<float> target(c);
  target.add_sequence(5);
  fill(target, 5, 0, 40, 3);
  const test::Snapshot before = snapshot(target);
  expect_error([&] { target.import_sequence(1, image); }, "too wide");
  EXPECT_EQ(snapshot(target), before);
  EXPECT_FALSE(target.contains(1));
}

// ---- the storage type's range holds end to end -----------------------------------------------------

TEST(Refusals, Fp16AttentionAtTheDocumentedLimitIsFinite) {
  CacheConfig c;  // default accuracy settings
  c.num_kv_heads = 1;
  c.num_q_heads = 1;
  c.head_dim = 64;
  c.block_tokens = 64;
  PackedKVCache<fp16_t> cache(c);
  cache.add_sequence(1);
  std::vector<float> k = random_values(64 * 64, 1), v(64 * 64);
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = (i % 64 == 0) ? 65504.0f : (i % 64 == 1 ? -65504.0f : 0.0f);
  cache.append(1, 0, convert<fp16_t>(k).data(), convert<fp16_t>(v).data(), 64);
  ASSERT_EQ(cache.memory_stats().total.compressed_tokens, 64u);
  std::vector<float> kb(k.size()), vb(v.size());
  cache.read_back(1, 0, kb.data(), vb.data());
  for (float x : vb) ASSERT_LE(std::fabs(x), 65504.0f);
  const std::vector<fp16_t> q = convert<fp16_t>(random_values(64, 2));
  std::vector<fp16_t> out(64);
  const SeqId ids[] = {1};
  cache.attention(ids, 0, q.data(), out.data(), 0.125f);
  for (const fp16_t& o : out) ASSERT_TRUE(std::isfinite(to_float(o))) << to_float(o);
  EXPECT_GT(to_float(out[0]), 65000.0f);
}

TEST(Refusals, BlocksWhoseParametersDecodeOutsideTheStorageRangeAreInvalid) {
  CacheConfig c;
  c.num_kv_heads = 1;
  c.num_q_heads = 1;
  c.head_dim = 16;
  c.block_tokens = 16;
  c.repack = RepackMethod::none;
  const CodecParams params = make_codec_params(c);
  std::vector<std::uint8_t> block(params.geometry.max_block_bytes());
  EncodeScratch scratch;
  const std::vector<float> k = random_values(256, 1), v = random_values(256, 2);
  block.resize(encode_block(params, k.data(), v.data(), 16, block.data(), scratch));
  ASSERT_NO_THROW(validate_block(params, block));
  format::HeadEntry e;
  std::memcpy(&e, block.data() + params.geometry.directory_offset(), sizeof e);
  // V token 0: step = min = 65504, so its largest code decodes to 65504 * 6 = 393024.
  const std::uint16_t max_half = 0x7BFF;
  std::memcpy(block.data() + e.v_offset, &max_half, 2);
  std::memcpy(block.data() + e.v_offset + 2, &max_half, 2);
  expect_error([&] { validate_block(params, block); }, "outside");
}

TEST(Refusals, AnImageWhoseBlocksDecodeOutsideTheStorageRangeIsRefused) {
  CacheConfig c;
  c.num_kv_heads = 1;
  c.num_q_heads = 1;
  c.head_dim = 16;
  c.block_tokens = 16;
  c.repack = RepackMethod::none;
  PackedKVCache<fp16_t> source(c);
  source.add_sequence(1);
  fill(source, 1, 0, 16, 1);
  std::vector<std::uint8_t> image = source.export_sequence(1);
  const std::size_t block_at = sizeof(format::ImageHeader) + sizeof(format::LayerRecord) + 4;
  const format::BlockGeometry g = make_codec_params(c).geometry;
  format::HeadEntry e;
  std::memcpy(&e, image.data() + block_at + g.directory_offset(), sizeof e);
  const std::uint16_t max_half = 0x7BFF;
  std::memcpy(image.data() + block_at + e.v_offset, &max_half, 2);
  std::memcpy(image.data() + block_at + e.v_offset + 2, &max_half, 2);
  reseal(image);
  PackedKVCache<fp16_t> target(c);
  expect_error([&] { target.import_sequence(1, image); }, "outside");
  EXPECT_FALSE(target.contains(1));
}

// ---- memory ----------------------------------------------------------------------------------------

TEST(Refusals, ARefusedAppendLeavesTheMemoryStatisticsAsTheyWere) {
  CacheConfig c = import_config(0, 700 << 10);
  c.num_layers = 1;
  PackedKVCache<float> cache(c);
  cache.add_sequence(1);
  cache.add_sequence(2);
  fill(cache, 1, 0, 320, 1);
  fill(cache, 2, 0, 320, 2);
  cache.remove_sequence(2);  // its pages stay cached for reuse
  cache.add_sequence(3);
  const test::Snapshot before = snapshot(cache);
  // Far more than the budget: refused whatever the cache could reclaim.
  expect_error([&] { fill(cache, 3, 0, 3000, 3); }, "memory budget");
  EXPECT_EQ(snapshot(cache), before);
}

TEST(Refusals, EmptySequencesHoldAlmostNoMemory) {
  CacheConfig c;  // Llama-3-8B shapes
  c.num_layers = 32;
  c.num_kv_heads = 8;
  c.num_q_heads = 32;
  c.head_dim = 128;
  c.block_tokens = 64;
  c.residual_tokens = 64;
  c.memory_budget_bytes = 100 << 20;
  PackedKVCache<fp16_t> cache(c);
  for (SeqId id = 0; id < 200; ++id) cache.add_sequence(id);
  EXPECT_LT(cache.memory_stats().resident_bytes, std::size_t{2} << 20);
}

TEST(Refusals, StatisticsCountWhatTheCacheHolds) {
  CacheConfig c = import_config(64, 0);
  PackedKVCache<fp16_t> cache(c);
  cache.add_sequence(1);
  fill(cache, 1, 0, 100, 1);  // one block and a tail of 68 tokens
  const MemoryStats m = cache.memory_stats();
  // Everything resident but the pool's unused slots is in total(), tails included as allocated.
  EXPECT_EQ(m.resident_bytes - m.total.total(), m.pool.reserved_bytes - m.pool.live_bytes);
  EXPECT_GE(m.total.tail, 68u * 4 * 64 * 2 * sizeof(fp16_t));
}

TEST(Refusals, LayerCountsBeyondTheImageFormatAreRefusedOrRoundTrip) {
  CacheConfig c;
  c.num_layers = 70000;
  c.num_kv_heads = 1;
  c.num_q_heads = 1;
  c.head_dim = 8;
  c.block_tokens = 16;
  try {
    PackedKVCache<float> a(c), b(c);
    a.add_sequence(1);
    fill(a, 1, 69999, 3, 1);
    b.import_sequence(1, a.export_sequence(1));
    EXPECT_EQ(b.length(1, 69999), 3);
  } catch (const error& e) {
    EXPECT_NE(std::string(e.what()).find("num_layers"), std::string::npos) << e.what();
  }
}

TEST(Refusals, HugeShapesFailWithAPackkvErrorNotBadAlloc) {
  // Sizes whose products wrap around 2^64 unless they are computed with care: 2^30 layers x
  // 2^20 tokens x 2^11 values x 2 (K and V) x 4 bytes is exactly 2^64.
  CacheConfig c;
  c.num_layers = 1 << 30;
  c.num_kv_heads = 8;
  c.num_q_heads = 8;
  c.head_dim = 256;
  c.block_tokens = 64;
  c.residual_tokens = (1 << 20) - 64;
  c.memory_budget_bytes = std::size_t{1} << 40;
  EXPECT_THROW(
      {
        PackedKVCache<float> cache(c);
        cache.add_sequence(1);
        std::vector<float> kv(8 * 256, 0.5f);
        cache.append(1, 0, kv.data(), kv.data(), 1);
      },
      error);
}

#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
TEST(RefusalsDeathTest, RunningOutOfHostMemoryIsAPackkvError) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  // In a child process whose address space is capped, a prefill that needs more memory than the
  // cap must fail with packkv::error and leave the cache usable.
  EXPECT_EXIT(
      {
        CacheConfig c;
        c.num_kv_heads = 8;
        c.num_q_heads = 8;
        c.head_dim = 128;
        c.block_tokens = 64;
        c.num_threads = 1;
        PackedKVCache<float> cache(c);
        cache.add_sequence(1);
        const int tokens = 1 << 15;
        std::vector<float> kv(static_cast<std::size_t>(tokens) * 1024, 0.25f);  // 128 MiB, before the cap
        cache.append(1, 0, kv.data(), kv.data(), 64);
        // The cap leaves 24 MiB: far less than the prefill below needs.
        long pages = 0;
        std::FILE* statm = std::fopen("/proc/self/statm", "r");
        if (statm == nullptr || std::fscanf(statm, "%ld", &pages) != 1) std::_Exit(5);
        std::fclose(statm);
        rlimit cap{};
        getrlimit(RLIMIT_AS, &cap);
        cap.rlim_cur = static_cast<rlim_t>(pages) * 4096 + (24u << 20);
        setrlimit(RLIMIT_AS, &cap);
        int code = 3;
        try {
          cache.append(1, 0, kv.data(), kv.data(), tokens);
          code = 2;  // everything fitted: the cap is too generous for this test
        } catch (const error&) {
          code = cache.length(1, 0) == 64 ? 0 : 4;
        } catch (const std::bad_alloc&) {
          code = 1;
        }
        std::_Exit(code);
      },
      ::testing::ExitedWithCode(0), "");
}
#endif

// ---- images and queries ------------------------------------------------------------------------------

TEST(Refusals, EveryReservedImageHeaderBitIsChecked) {
  PackedKVCache<float> a(import_config(8, 0));
  a.add_sequence(1);
  fill(a, 1, 0, 40, 1);
  const std::vector<std::uint8_t> exported = a.export_sequence(1);
  PackedKVCache<float> b(import_config(8, 0));
  // The options byte: bits 0 and 1 say what is rotated, bit 2 that parameters are compact; the
  // others are reserved.
  for (std::uint8_t bad : {std::uint8_t{8}, std::uint8_t{0x80}}) {
    std::vector<std::uint8_t> image = exported;
    image[offsetof(format::ImageHeader, options)] = bad;
    reseal(image);
    expect_error([&] { b.import_sequence(1, image); }, "only bits 0 to 2");
  }
  std::vector<std::uint8_t> image = exported;
  image[offsetof(format::ImageHeader, options)] = 1;  // a K rotation this cache does not have
  reseal(image);
  expect_error([&] { b.import_sequence(1, image); }, "rotation (K 1, V 0) does not match");
  image[offsetof(format::ImageHeader, options)] = 4;  // compact parameters this cache does not have
  reseal(image);
  expect_error([&] { b.import_sequence(1, image); }, "store compact parameters, this cache fp16 ones");
  EXPECT_FALSE(b.contains(1));
}

TEST(Refusals, NonFiniteQueriesAndWeightsAreRefused) {
  PackedKVCache<float> cache(import_config(8, 0));
  cache.add_sequence(1);
  fill(cache, 1, 0, 70, 1);
  std::vector<float> q = random_values(8 * 64, 2), out(8 * 64);
  const SeqId ids[] = {1};
  for (float bad : {NAN, INFINITY}) {
    q[77] = bad;
    expect_error([&] { cache.attention(ids, 0, q.data(), out.data(), 0.125f); }, "query");
    std::vector<float> scores(8 * 70);
    expect_error([&] { cache.scores(1, 0, q.data(), scores.data()); }, "query");
    std::vector<float> w(8 * 70, 0.01f);
    w[5] = bad;
    expect_error([&] { cache.attn_v(1, 0, w.data(), out.data()); }, "weight");
  }
}

}  // namespace
}  // namespace packkv

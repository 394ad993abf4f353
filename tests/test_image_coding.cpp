// Entropy-coded sequence images (packkv/image_coding.hpp): the exact image back, smaller, accepted
// by import_sequence, and every corruption refused with the cache left as it was.
#include <cstring>

#include "core/image_io.hpp"
#include "packkv/image_coding.hpp"
#include "test_util.hpp"

namespace packkv {
namespace {

using test::convert;
using test::expect_error;
using test::snapshot;

CacheConfig config(int head_dim, int block, QuantMode k_mode, RepackMethod repack, float k_rel = 0.05f, float v_rel = 0.15f) {
  CacheConfig c;
  c.num_layers = 3;
  c.num_kv_heads = 2;
  c.num_q_heads = 4;
  c.head_dim = head_dim;
  c.block_tokens = block;
  c.residual_tokens = 8;
  c.k_rel = k_rel;
  c.v_rel = v_rel;
  c.k_mode = k_mode;
  c.repack = repack;
  c.num_threads = 1;
  return c;
}

template <class T>
std::vector<std::uint8_t> make_image(const CacheConfig& c, std::uint64_t seed, int tokens = 200) {
  PackedKVCache<T> cache(c);
  cache.add_sequence(1);
  for (int l = 0; l < c.num_layers; ++l) {
    synthetic::KVStream stream(c.num_kv_heads, c.head_dim, seed + static_cast<std::uint64_t>(l));
    std::vector<float> k, v;
    const int n = tokens - 37 * l;  // layers of different lengths, some with a tail
    stream.next(n, k, v);
    cache.append(1, l, convert<T>(k).data(), convert<T>(v).data(), n);
  }
  return cache.export_sequence(1);
}

template <class T>
class ImageCodingTyped : public ::testing::Test {};
using StorageTypes = ::testing::Types<float, fp16_t, bf16_t>;
TYPED_TEST_SUITE(ImageCodingTyped, StorageTypes);

// Decoding gives back the image byte for byte, over head dims, block sizes, K modes, repacking
// and code widths; on LLM-like data the coded form is smaller.
TYPED_TEST(ImageCodingTyped, DecodesToTheExactImageAndIsSmaller) {
  struct Case {
    int head_dim, block;
    QuantMode k_mode;
    RepackMethod repack;
    float k_rel, v_rel;
  };
  const Case cases[] = {{64, 64, QuantMode::per_token, RepackMethod::median, 0.05f, 0.15f},
                        {128, 16, QuantMode::per_token, RepackMethod::none, 0.1f, 0.25f},
                        {40, 32, QuantMode::per_channel, RepackMethod::median, 0.1f, 0.2f},
                        {64, 64, QuantMode::per_token, RepackMethod::median, kMinRel, 0.5f},
                        {16, 16, QuantMode::per_token, RepackMethod::none, 1.0f, 1.0f}};
  for (const Case& c : cases) {
    const CacheConfig cfg = config(c.head_dim, c.block, c.k_mode, c.repack, c.k_rel, c.v_rel);
    const std::vector<std::uint8_t> image = make_image<TypeParam>(cfg, 11);
    const std::vector<std::uint8_t> coded = encode_image_entropy(image);
    EXPECT_TRUE(is_entropy_coded_image(coded));
    EXPECT_FALSE(is_entropy_coded_image(image));
    EXPECT_EQ(decode_image_entropy(coded), image) << describe(cfg);
    if (c.k_rel > 0.01f && c.k_rel < 1.0f) EXPECT_LT(coded.size(), image.size()) << describe(cfg);
  }
}

TEST(ImageCoding, ImportTakesTheCodedFormAndRefusesCorruptionCleanly) {
  const CacheConfig cfg = config(64, 64, QuantMode::per_token, RepackMethod::median);
  const std::vector<std::uint8_t> image = make_image<fp16_t>(cfg, 5);
  const std::vector<std::uint8_t> coded = encode_image_entropy(image);

  PackedKVCache<fp16_t> plain(cfg), from_coded(cfg);
  plain.import_sequence(3, image);
  from_coded.import_sequence(3, coded);
  EXPECT_EQ(from_coded.export_sequence(3), image);
  EXPECT_EQ(from_coded.memory_stats().total.total(), plain.memory_stats().total.total());

  // Every corruption (a bit flipped every few bytes) and truncation is refused; nothing changes.
  PackedKVCache<fp16_t> target(cfg);
  target.add_sequence(9);
  const test::Snapshot before = snapshot(target);
  for (std::size_t i = 0; i < coded.size(); i += 13) {
    std::vector<std::uint8_t> bad = coded;
    bad[i] ^= static_cast<std::uint8_t>(1u << (i % 8));
    EXPECT_THROW(target.import_sequence(1, bad), error) << "flip at byte " << i;
    EXPECT_THROW(decode_image_entropy(bad), error) << "flip at byte " << i;
  }
  for (std::size_t n = 0; n < coded.size(); n += 97) {
    EXPECT_THROW(target.import_sequence(1, std::span(coded.data(), n)), error) << "truncated to " << n;
  }
  EXPECT_EQ(snapshot(target), before);
  EXPECT_FALSE(target.contains(1));
}

TEST(ImageCoding, RefusesWhatIsNotAnImageOrOfAnotherVersion) {
  expect_error([] { encode_image_entropy(std::vector<std::uint8_t>(10, 0)); }, "shorter than its 48-byte header");
  expect_error([] { encode_image_entropy(std::vector<std::uint8_t>(100, 0)); }, "bad magic");
  expect_error([] { decode_image_entropy(std::vector<std::uint8_t>(20, 0)); }, "shorter than its 56-byte header");
  const CacheConfig cfg = config(16, 16, QuantMode::per_token, RepackMethod::none);
  std::vector<std::uint8_t> coded = encode_image_entropy(make_image<float>(cfg, 2, 120));
  // A later version, correctly sealed: refused by version, not by checksum.
  std::uint32_t version = 2;
  std::memcpy(coded.data() + 8, &version, 4);
  const std::uint32_t crc = detail::crc32c(coded.data(), 48);
  std::memcpy(coded.data() + 48, &crc, 4);
  expect_error([&] { decode_image_entropy(coded); }, "version 2 is not supported");
}

}  // namespace
}  // namespace packkv

// Per-layer error bounds (CacheConfig::layer_k_rel / layer_v_rel): each layer stores exactly what a
// cache with that layer's bounds for every layer stores, images carry every layer's code ranges,
// and mismatches are refused whole.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "core/image_io.hpp"
#include "packkv/calibration.hpp"
#include "packkv/image_coding.hpp"
#include "packkv/packkv.hpp"
#include "test_util.hpp"

namespace packkv {
namespace {

using test::expect_error;

constexpr int kLayers = 3, kHeads = 2, kDim = 32, kBlock = 32;
constexpr int kTokens = 3 * kBlock + 5;  // three blocks and a tail
const std::vector<float> kLayerK = {0.02f, 0.1f, 0.4f};
const std::vector<float> kLayerV = {0.4f, 0.05f, 0.1f};

CacheConfig base_config() {
  CacheConfig c;
  c.num_layers = kLayers;
  c.num_kv_heads = kHeads;
  c.num_q_heads = 2 * kHeads;
  c.head_dim = kDim;
  c.block_tokens = kBlock;
  c.residual_tokens = 0;
  c.num_threads = 2;
  return c;
}

CacheConfig per_layer_config() {
  CacheConfig c = base_config();
  c.layer_k_rel = kLayerK;
  c.layer_v_rel = kLayerV;
  return c;
}

/// The same config with layer l's bounds on every layer.
CacheConfig uniform_config(int l) {
  CacheConfig c = base_config();
  c.k_rel = kLayerK[static_cast<std::size_t>(l)];
  c.v_rel = kLayerV[static_cast<std::size_t>(l)];
  return c;
}

constexpr std::size_t kRow = static_cast<std::size_t>(kHeads) * kDim;

std::vector<float> layer_values(int layer, int side) {
  return test::random_values(static_cast<std::size_t>(kTokens) * kRow, 100 + 2 * layer + side);
}

void fill(PackedKVCache<float>& cache, SeqId id) {
  cache.add_sequence(id);
  for (int l = 0; l < kLayers; ++l) {
    const std::vector<float> k = layer_values(l, 0), v = layer_values(l, 1);
    cache.append(id, l, k.data(), v.data(), kTokens);
  }
}

std::vector<detail::ParsedLayer> parse(const std::vector<std::uint8_t>& image, const CacheConfig& c) {
  return detail::parse_image(image, make_codec_params(c), {}, c.k_mode, 0, format::kDtypeFloat, sizeof(float),
                             c.num_layers, 1 << 20);
}

TEST(LayerRels, ConfigRefusesWrongCountsAndBounds) {
  CacheConfig c = per_layer_config();
  c.layer_k_rel.pop_back();
  expect_error([&] { validate(c); }, "layer_k_rel must be empty or hold one bound per layer (3), got 2");
  c = per_layer_config();
  c.layer_v_rel[1] = 1.5f;
  expect_error([&] { validate(c); }, "layer_v_rel[1] must be in [1/255, 1]");
  c.layer_v_rel[1] = std::nanf("");
  expect_error([&] { validate(c); }, "layer_v_rel[1]");
  expect_error([&] { PackedKVCache<float> cache(c); }, "layer_v_rel[1]");
  c = per_layer_config();
  EXPECT_NE(describe(c).find("k_rel=per-layer[0.02..0.4]"), std::string::npos) << describe(c);
  expect_error([&] { make_codec_params(c, 3); }, "layer 3 is out of range");
}

TEST(LayerRels, EachLayerUsesItsOwnCodeRange) {
  const CacheConfig c = per_layer_config();
  for (int l = 0; l < kLayers; ++l) {
    const CodecParams codec = make_codec_params(c, l);
    EXPECT_EQ(codec.k_max_code, max_code_for_rel(kLayerK[static_cast<std::size_t>(l)])) << l;
    EXPECT_EQ(codec.v_max_code, max_code_for_rel(kLayerV[static_cast<std::size_t>(l)])) << l;
    EXPECT_EQ(codec, make_codec_params(uniform_config(l), l)) << l;
  }
  // An empty list means the scalar bound on every layer.
  CacheConfig only_k = base_config();
  only_k.layer_k_rel = kLayerK;
  EXPECT_EQ(make_codec_params(only_k, 2).v_max_code, max_code_for_rel(only_k.v_rel));
}

// The point of the lever: layer l of a per-layer cache holds the very blocks, tail and answers of a
// cache whose every layer has layer l's bounds.
TEST(LayerRels, EachLayerStoresWhatAUniformCacheAtItsBoundsStores) {
  PackedKVCache<float> mixed(per_layer_config());
  fill(mixed, 7);
  const std::vector<std::uint8_t> mixed_image = mixed.export_sequence(7);  // the parsed layers view it
  const std::vector<detail::ParsedLayer> mixed_layers = parse(mixed_image, mixed.config());
  ASSERT_EQ(mixed_layers.size(), static_cast<std::size_t>(kLayers));
  std::vector<std::size_t> layer_bytes;
  for (int l = 0; l < kLayers; ++l) {
    PackedKVCache<float> uniform(uniform_config(l));
    fill(uniform, 7);
    const std::vector<std::uint8_t> uniform_image = uniform.export_sequence(7);
    const std::vector<detail::ParsedLayer> uniform_layers = parse(uniform_image, uniform.config());
    const auto& a = mixed_layers[static_cast<std::size_t>(l)].blocks;
    const auto& b = uniform_layers[static_cast<std::size_t>(l)].blocks;
    ASSERT_EQ(a.size(), 3u);
    ASSERT_EQ(a.size(), b.size());
    std::size_t bytes = 0;
    for (std::size_t i = 0; i < a.size(); ++i) {
      ASSERT_EQ(a[i].size(), b[i].size()) << "layer " << l << " block " << i;
      EXPECT_EQ(std::memcmp(a[i].data(), b[i].data(), a[i].size()), 0) << "layer " << l << " block " << i;
      bytes += a[i].size();
    }
    layer_bytes.push_back(bytes);

    std::vector<float> k1(kTokens * kRow), v1(k1.size()), k2(k1.size()), v2(k1.size());
    mixed.read_back(7, l, k1.data(), v1.data());
    uniform.read_back(7, l, k2.data(), v2.data());
    EXPECT_EQ(k1, k2) << l;
    EXPECT_EQ(v1, v2) << l;

    const std::vector<float> q = test::random_values(static_cast<std::size_t>(2 * kHeads) * kDim, 900 + l);
    std::vector<float> o1(q.size()), o2(q.size());
    const SeqId id = 7;
    mixed.attention({&id, 1}, l, q.data(), o1.data(), 0.125f);
    uniform.attention({&id, 1}, l, q.data(), o2.data(), 0.125f);
    EXPECT_EQ(o1, o2) << l;
  }
  // The bounds differ, so the layers' sizes do: K 0.02 with V 0.4 against K 0.1 with V 0.05.
  EXPECT_NE(layer_bytes[0], layer_bytes[1]);
  EXPECT_NE(layer_bytes[1], layer_bytes[2]);
}

TEST(LayerRels, ImagesCarryEveryLayersCodeRanges) {
  PackedKVCache<float> source(per_layer_config());
  fill(source, 3);
  const std::vector<std::uint8_t> image = source.export_sequence(3);
  format::ImageHeader h;
  std::memcpy(&h, image.data(), sizeof h);
  EXPECT_EQ(h.version, format::kImageVersion);
  EXPECT_EQ(h.k_max_code, 0);
  const std::vector<detail::ParsedLayer> layers = parse(image, source.config());
  for (int l = 0; l < kLayers; ++l) {
    EXPECT_EQ(layers[static_cast<std::size_t>(l)].codec, make_codec_params(source.config(), l)) << l;
  }

  // Into a cache of the same bounds: the same contents.
  PackedKVCache<float> same(per_layer_config());
  same.import_sequence(3, image);
  for (int l = 0; l < kLayers; ++l) {
    std::vector<float> k1(kTokens * kRow), v1(k1.size()), k2(k1.size()), v2(k1.size());
    source.read_back(3, l, k1.data(), v1.data());
    same.read_back(3, l, k2.data(), v2.data());
    EXPECT_EQ(k1, k2) << l;
    EXPECT_EQ(v1, v2) << l;
  }

  // Into a cache whose layer 1 has other bounds: refused whole, nothing changes.
  CacheConfig other = per_layer_config();
  other.layer_v_rel[1] = 0.2f;
  PackedKVCache<float> target(other);
  fill(target, 9);
  const test::Snapshot before = test::snapshot(target);
  expect_error([&] { target.import_sequence(3, image); },
               "layer 1 was stored with codes up to K 10 V 20; this cache's layer 1 stores codes up to K 10 V 5");
  EXPECT_EQ(test::snapshot(target), before);

  // Entropy-coded, the same image comes back byte for byte and imports.
  const std::vector<std::uint8_t> coded = encode_image_entropy(image);
  EXPECT_EQ(decode_image_entropy(coded), image);
  PackedKVCache<float> from_coded(per_layer_config());
  from_coded.import_sequence(3, coded);
  EXPECT_EQ(from_coded.export_sequence(3), image);
}

/// A version 1 image of a uniform cache's version 2 image: the ranges move to the header.
std::vector<std::uint8_t> as_version_1(std::vector<std::uint8_t> image, const CodecParams& codec) {
  format::ImageHeader h;
  std::memcpy(&h, image.data(), sizeof h);
  h.version = format::kImageVersionUniform;
  h.k_max_code = static_cast<std::uint8_t>(codec.k_max_code);
  h.v_max_code = static_cast<std::uint8_t>(codec.v_max_code);
  h.k_bits = static_cast<std::uint8_t>(codec.geometry.k_bits);
  h.v_bits = static_cast<std::uint8_t>(codec.geometry.v_bits);
  std::memcpy(image.data(), &h, sizeof h);
  const std::vector<test::ImageLayerAt> layers = test::image_layers(image, sizeof(float));
  EXPECT_EQ(layers.back().end, image.size());
  for (const test::ImageLayerAt& layer : layers) {
    format::LayerRecord r;
    std::memcpy(&r, image.data() + layer.record, sizeof r);
    r.k_max_code = r.v_max_code = 0;
    std::memcpy(image.data() + layer.record, &r, sizeof r);
  }
  detail::seal_image(image);
  return image;
}

TEST(LayerRels, VersionOneImagesStillImport) {
  const CacheConfig c = uniform_config(1);
  PackedKVCache<float> source(c);
  fill(source, 4);
  const std::vector<std::uint8_t> v2 = source.export_sequence(4);
  const std::vector<std::uint8_t> v1 = as_version_1(v2, make_codec_params(c));
  PackedKVCache<float> target(c);
  target.import_sequence(4, v1);
  EXPECT_EQ(target.export_sequence(4), v2);  // re-exported in the current version, same contents
  EXPECT_EQ(decode_image_entropy(encode_image_entropy(v1)), v1);

  // A version 1 image into a per-layer cache: its one range does not fit layer 0.
  PackedKVCache<float> mixed(per_layer_config());
  expect_error([&] { mixed.import_sequence(4, v1); }, "layer 0 was stored with codes up to K 10 V 20");
  EXPECT_TRUE(mixed.sequence_ids().empty());

  // Version 1 with a range in a record, version 2 with one in the header: both malformed.
  std::vector<std::uint8_t> bad = v1;
  bad[sizeof(format::ImageHeader) + offsetof(format::LayerRecord, k_max_code)] = 10;
  detail::seal_image(bad);
  expect_error([&] { target.import_sequence(5, bad); }, "version 1 layer record's code fields must be zero");
  bad = v2;
  bad[offsetof(format::ImageHeader, k_max_code)] = 10;
  detail::seal_image(bad);
  expect_error([&] { target.import_sequence(5, bad); }, "header's must be zero");
  bad = v2;
  bad[sizeof(format::ImageHeader) + offsetof(format::LayerRecord, v_max_code)] = 0;
  detail::seal_image(bad);
  expect_error([&] { target.import_sequence(5, bad); }, "both must be at least 1");
  EXPECT_EQ(target.sequence_ids(), std::vector<SeqId>{4});
}

// The choice against every plan of a small made-up menu: within budget, and no plan spends at
// most its loss with fewer bits (the Lagrangian answer is optimal for what it spends).
TEST(LayerBoundChoice, IsTheCheapestPlanForTheLossItSpends) {
  LayerBoundMenu menu;
  // Three layers; a choice = (rel, loss, bits). Layer 1's K is far more sensitive.
  menu.k = {{{kMinRel, 0, 8}, {0.05f, 0.0002, 4.5}, {0.1f, 0.0009, 3.5}},
            {{kMinRel, 0, 8}, {0.05f, 0.003, 4.4}, {0.1f, 0.02, 3.4}},
            {{kMinRel, 0, 8}, {0.05f, 0.0004, 4.6}, {0.1f, 0.0015, 3.6}}};
  menu.v = {{{kMinRel, 0, 8.7}, {0.1f, 0.0003, 4.4}, {0.25f, 0.002, 3.1}},
            {{kMinRel, 0, 8.7}, {0.1f, 0.0001, 4.3}, {0.25f, 0.0006, 3.0}},
            {{kMinRel, 0, 8.7}, {0.1f, 0.0005, 4.5}, {0.25f, 0.004, 3.2}}};
  double previous_bits = 1e9;
  for (double budget : {0.0, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.03}) {
    const LayerBounds plan = choose_layer_bounds(menu, budget);
    EXPECT_LE(plan.predicted_loss, budget + 1e-12);
    EXPECT_LE(plan.predicted_bits, previous_bits);  // more budget never costs bits
    previous_bits = plan.predicted_bits;
    // Every plan: 3^6 choices.
    for (int code = 0; code < 729; ++code) {
      double loss = 0.0, bits = 0.0;
      int c = code;
      for (std::size_t l = 0; l < 3; ++l) {
        const BoundChoice& kc = menu.k[l][static_cast<std::size_t>(c % 3)];
        c /= 3;
        const BoundChoice& vc = menu.v[l][static_cast<std::size_t>(c % 3)];
        c /= 3;
        loss += kc.loss + vc.loss;
        bits += kc.bits + vc.bits;
      }
      if (loss <= plan.predicted_loss + 1e-12) {
        EXPECT_GE(bits / 6.0, plan.predicted_bits - 1e-9) << "budget " << budget << ", plan " << code;
      }
    }
  }
  EXPECT_EQ(choose_layer_bounds(menu, 0.03).k_rel[1], 0.1f);     // everything fits: cheapest everywhere
  EXPECT_EQ(choose_layer_bounds(menu, 0.001).k_rel[1], kMinRel);  // layer 1's K stays near exact
  // Losses in other units (a budget in percent of perplexity, say) are found as well.
  LayerBoundMenu scaled = menu;
  for (auto* side : {&scaled.k, &scaled.v}) {
    for (auto& layer : *side) {
      for (BoundChoice& c : layer) c.loss *= 1e6;
    }
  }
  EXPECT_EQ(choose_layer_bounds(scaled, 1000.0).k_rel, choose_layer_bounds(menu, 0.001).k_rel);

  // The plan goes into a config and the cache stores by it.
  CacheConfig c = base_config();
  const LayerBounds plan = choose_layer_bounds(menu, 0.002);
  plan.apply_to(c);
  EXPECT_EQ(c.layer_k_rel, plan.k_rel);
  EXPECT_EQ(c.layer_v_rel, plan.v_rel);
  EXPECT_EQ(make_codec_params(c, 1).k_max_code, max_code_for_rel(plan.k_rel[1]));
  c.num_layers = 4;
  expect_error([&] { plan.apply_to(c); }, "do not fit a config of 4 layers");
}

TEST(LayerBoundChoice, RefusesMalformedMenus) {
  LayerBoundMenu menu;
  expect_error([&] { choose_layer_bounds(menu, 0.1); }, "K has 0 layers and V 0");
  menu.k = {{{0.1f, 0.0, 3.0}}};
  menu.v = {{}};
  expect_error([&] { choose_layer_bounds(menu, 0.1); }, "layer 0 V has no choices");
  menu.v = {{{2.0f, 0.0, 3.0}}};
  expect_error([&] { choose_layer_bounds(menu, 0.1); }, "layer 0 V offers rel 2");
  menu.v = {{{0.2f, -1.0, 3.0}}};
  expect_error([&] { choose_layer_bounds(menu, 0.1); }, "both must be finite and >= 0");
  menu.v = {{{0.2f, 0.0, std::nan("")}}};
  expect_error([&] { choose_layer_bounds(menu, 0.1); }, "both must be finite and >= 0");
  menu.v = {{{0.2f, 0.01, 3.0}}};
  expect_error([&] { choose_layer_bounds(menu, -1.0); }, "loss budget must be finite and >= 0");
  // Over budget even at the smallest losses: those, the closest it can get.
  const LayerBounds tight = choose_layer_bounds(menu, 0.001);
  EXPECT_EQ(tight.v_rel[0], 0.2f);
  EXPECT_GT(tight.predicted_loss, 0.001);
}

}  // namespace
}  // namespace packkv

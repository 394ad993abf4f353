// Writes the seed corpus of the fuzz targets (tests/fuzz/corpus/): a few valid sequence images and
// blocks in the geometries the targets use. Usage: make_seeds <corpus-dir>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "packkv/codec.hpp"
#include "packkv/packkv.hpp"
#include "packkv/synthetic.hpp"

namespace {

void write(const std::string& path, const std::vector<std::uint8_t>& bytes) {
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()),
                                              static_cast<std::streamsize>(bytes.size()));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <corpus-dir>\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  packkv::CacheConfig c;  // the configuration fuzz_import uses
  c.num_layers = 2;
  c.num_kv_heads = 2;
  c.num_q_heads = 4;
  c.head_dim = 16;
  c.block_tokens = 16;
  c.residual_tokens = 4;
  c.layer_k_rel = {0.1f, 0.05f};
  c.layer_v_rel = {0.2f, 0.3f};
  c.sink_tokens = 2;  // layers with blocks carry exact sink rows
  int seed = 0;
  auto images = [&](auto type_tag) {
    using T = decltype(type_tag);
    packkv::PackedKVCache<T> cache(c);
    for (int tokens : {3, 21, 40}) {
      cache.add_sequence(seed);
      packkv::synthetic::KVStream stream(2, 16, seed + 1);
      std::vector<float> kf, vf;
      stream.next(tokens, kf, vf);
      std::vector<T> k(kf.size()), v(vf.size());
      for (std::size_t i = 0; i < k.size(); ++i) {
        k[i] = packkv::from_float<T>(kf[i]);
        v[i] = packkv::from_float<T>(vf[i]);
      }
      cache.append(seed, 0, k.data(), v.data(), tokens);
      cache.append(seed, 1, k.data(), v.data(), tokens / 2 + 1);
      write(dir + "/import/seed" + std::to_string(seed) + ".bin", cache.export_sequence(seed));
      write(dir + "/image_coding/seed" + std::to_string(seed) + ".bin",
            packkv::encode_image_entropy(cache.export_sequence(seed)));
      ++seed;
    }
  };
  images(float{});
  images(packkv::fp16_t{});
  images(packkv::bf16_t{});
  // Blocks: first byte = geometry selector of fuzz_block, then one encoded block.
  for (int selector : {0, 3, 14, 27, 37, 67, 91}) {
    packkv::CacheConfig b;
    b.num_kv_heads = 1 + (selector & 1);
    b.num_q_heads = b.num_kv_heads;
    b.head_dim = (selector & 2) ? 16 : 8;
    b.block_tokens = (selector & 4) ? 32 : 16;
    b.k_rel = (selector & 8) ? 0.01f : 0.1f;
    b.k_mode = (selector & 16) ? packkv::QuantMode::per_channel : packkv::QuantMode::per_token;
    b.repack = (selector & 32) ? packkv::RepackMethod::none : packkv::RepackMethod::median;
    b.compact_params = (selector & 64) != 0;
    const packkv::CodecParams params = packkv::make_codec_params(b);
    const std::size_t row = static_cast<std::size_t>(b.num_kv_heads) * b.head_dim;
    packkv::synthetic::KVStream stream(b.num_kv_heads, b.head_dim, selector);
    std::vector<float> k, v;
    stream.next(b.block_tokens, k, v);
    std::vector<std::uint8_t> block(1 + params.geometry.max_block_bytes());
    block[0] = static_cast<std::uint8_t>(selector);
    packkv::EncodeScratch scratch;
    block.resize(1 + packkv::encode_block(params, k.data(), v.data(), row, block.data() + 1, scratch));
    write(dir + "/block/seed" + std::to_string(selector) + ".bin", block);
  }
  return 0;
}

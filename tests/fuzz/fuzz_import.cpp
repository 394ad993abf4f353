// libFuzzer target: sequence images are untrusted input. Import must either throw packkv::error
// and leave the cache unchanged, or succeed and leave a cache whose every result is finite, in
// the image's storage type (float, fp16 and bf16 caches are all fuzzed: fp16 outputs overflow to
// Inf where a float cache would not notice). Inputs whose first byte is odd get their checksums
// recomputed first, so the fuzzer explores the structural validation behind the checksums too.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "core/image_io.hpp"
#include "packkv/packkv.hpp"

namespace {

packkv::CacheConfig fuzz_config() {
  packkv::CacheConfig c;
  c.num_layers = 2;
  c.num_kv_heads = 2;
  c.num_q_heads = 4;
  c.head_dim = 16;
  c.block_tokens = 16;
  c.residual_tokens = 4;
  c.num_threads = 1;
  // Layers of different code widths: each image layer is checked against its own range.
  c.layer_k_rel = {0.1f, 0.05f};
  c.layer_v_rel = {0.2f, 0.3f};
  c.sink_tokens = 2;  // layers with blocks carry exact sink rows
  return c;
}

void require(bool ok) {
  if (!ok) std::abort();
}

template <class T>
void import_and_use(const std::vector<std::uint8_t>& image) {
  packkv::PackedKVCache<T> cache(fuzz_config());
  try {
    cache.import_sequence(1, image);
  } catch (const packkv::error&) {
    require(!cache.contains(1));
    require(cache.memory_stats().pool.live_blocks == 0);
    return;
  }
  // Accepted: everything that reads the blocks must give finite numbers.
  for (int layer = 0; layer < 2; ++layer) {
    const std::int64_t len = cache.length(1, layer);
    if (len == 0) continue;
    std::vector<float> k(len * 32), v(len * 32);
    cache.read_back(1, layer, k.data(), v.data());
    for (float x : k) require(std::isfinite(x) && std::fabs(x) <= 65504.0f);
    for (float x : v) require(std::isfinite(x) && std::fabs(x) <= 65504.0f);
    std::vector<T> q(4 * 16, packkv::from_float<T>(0.5f)), out(4 * 16);
    const packkv::SeqId ids[] = {1};
    cache.attention(ids, layer, q.data(), out.data(), 0.25f);
    for (const T& x : out) require(std::isfinite(packkv::to_float(x)));
  }
  // And it exports to an image that imports again.
  packkv::PackedKVCache<T> again(fuzz_config());
  again.import_sequence(2, cache.export_sequence(1));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::vector<std::uint8_t> image(data, data + size);
  if (size >= sizeof(packkv::format::ImageHeader) && (data[0] & 1)) {
    image[0] = 'P';  // keep the magic intact for resealed inputs
    packkv::detail::seal_image(image);
  }
  // The cache takes the storage type the image claims (offset 16), so every type is reached.
  const std::uint8_t dtype = size > offsetof(packkv::format::ImageHeader, dtype) ? image[offsetof(packkv::format::ImageHeader, dtype)] : 0;
  switch (dtype % 3) {
    case packkv::format::kDtypeFp16: import_and_use<packkv::fp16_t>(image); break;
    case packkv::format::kDtypeBf16: import_and_use<packkv::bf16_t>(image); break;
    default: import_and_use<float>(image); break;
  }
  return 0;
}

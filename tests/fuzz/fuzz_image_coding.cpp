// libFuzzer target: entropy-coded images are untrusted input too. Decoding must either throw
// packkv::error or return an image that imports (or is refused by import with packkv::error), and
// whatever imports codes and decodes back to itself. Inputs whose first byte is odd get both
// checksums of the coded header recomputed (offsets as docs/format.md gives them), so the fuzzer
// reaches the skeleton and the code stream behind them.
#include <cstdint>
#include <cstring>
#include <vector>

#include "core/image_io.hpp"
#include "packkv/image_coding.hpp"
#include "packkv/packkv.hpp"

namespace {

constexpr std::size_t kCodedHeaderBytes = 56, kBodyCrcAt = 44, kHeaderCrcAt = 48;

void require(bool ok) {
  if (!ok) std::abort();
}

template <class T>
void import_and_recode(const std::vector<std::uint8_t>& image) {
  packkv::CacheConfig c;  // the configuration of the seeds (tests/fuzz/make_seeds.cpp)
  c.num_layers = 2;
  c.num_kv_heads = 2;
  c.num_q_heads = 4;
  c.head_dim = 16;
  c.block_tokens = 16;
  c.residual_tokens = 4;
  c.num_threads = 1;
  packkv::PackedKVCache<T> cache(c);
  try {
    cache.import_sequence(1, image);
  } catch (const packkv::error&) {
    require(!cache.contains(1));
    return;
  }
  const std::vector<std::uint8_t> exported = cache.export_sequence(1);
  require(packkv::decode_image_entropy(packkv::encode_image_entropy(exported)) == exported);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::vector<std::uint8_t> coded(data, data + size);
  if (size >= kCodedHeaderBytes && (data[0] & 1)) {
    std::memcpy(coded.data(), "PACKKVEC", 8);  // keep the magic intact for resealed inputs
    const std::uint32_t body = packkv::detail::crc32c(coded.data() + kCodedHeaderBytes, size - kCodedHeaderBytes);
    std::memcpy(coded.data() + kBodyCrcAt, &body, 4);
    const std::uint32_t header = packkv::detail::crc32c(coded.data(), kHeaderCrcAt);
    std::memcpy(coded.data() + kHeaderCrcAt, &header, 4);
  }
  std::vector<std::uint8_t> image;
  try {
    image = packkv::decode_image_entropy(coded);
  } catch (const packkv::error&) {
    return 0;
  }
  // The storage type the image claims (offset 16 of the image header).
  switch (image.size() > 16 ? image[16] % 3 : 0) {
    case packkv::format::kDtypeFp16: import_and_recode<packkv::fp16_t>(image); break;
    case packkv::format::kDtypeBf16: import_and_recode<packkv::bf16_t>(image); break;
    default: import_and_recode<float>(image); break;
  }
  return 0;
}

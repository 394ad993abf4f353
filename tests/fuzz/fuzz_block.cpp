// libFuzzer target: the block validator and every decoder behind it. A block that passes
// validate_block must decode (reference decoder and SIMD kernels) without reading out of bounds
// and give finite values.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu_kernels.hpp"
#include "packkv/packkv.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1) return 0;
  // The first byte picks a geometry, so several layouts (descriptor sizes, per-channel K,
  // no permutation) are fuzzed by one target.
  packkv::CacheConfig c;
  c.num_kv_heads = 1 + (data[0] & 1);
  c.num_q_heads = c.num_kv_heads;
  c.head_dim = (data[0] & 2) ? 16 : 8;
  c.block_tokens = (data[0] & 4) ? 32 : 16;
  c.k_rel = (data[0] & 8) ? 0.01f : 0.1f;  // 7-bit (2-byte descriptors) or 4-bit codes
  c.k_mode = (data[0] & 16) ? packkv::QuantMode::per_channel : packkv::QuantMode::per_token;
  c.repack = (data[0] & 32) ? packkv::RepackMethod::none : packkv::RepackMethod::median;
  const packkv::CodecParams params = packkv::make_codec_params(c);
  // Copy into an exactly sized buffer so AddressSanitizer sees any read past the block.
  std::vector<std::uint8_t> block(data + 1, data + size);
  try {
    packkv::validate_block(params, block);
  } catch (const packkv::error&) {
    return 0;
  }
  const std::size_t row = static_cast<std::size_t>(c.num_kv_heads) * c.head_dim;
  std::vector<float> k(c.block_tokens * row), v(c.block_tokens * row);
  packkv::decode_block(params, block.data(), k.data(), v.data(), row);
  for (float x : k) if (!std::isfinite(x)) std::abort();
  for (float x : v) if (!std::isfinite(x)) std::abort();
  for (int h = 0; h < c.num_kv_heads; ++h) {
    packkv::format::HeadEntry e;
    std::memcpy(&e, block.data() + params.geometry.directory_offset() + h * sizeof e, sizeof e);
    std::vector<float> q(2 * c.head_dim, 0.25f), s(2 * c.block_tokens), w(2 * c.block_tokens, 0.5f);
    packkv::detail::cpu::section_scores(params.geometry.k_layout(), params.geometry.k_per_channel,
                                        block.data() + e.k_offset, q.data(), 2, s.data(), c.block_tokens);
    packkv::detail::cpu::AlignedFloats acc(2 * c.head_dim * 8, 0.0f);
    float min_term[2] = {0, 0};
    packkv::detail::cpu::section_accumulate_v(params.geometry.v_layout(), block.data() + e.v_offset, w.data(),
                                              c.block_tokens, 2, acc.data(), min_term);
    for (float x : s) if (!std::isfinite(x)) std::abort();
  }
  return 0;
}

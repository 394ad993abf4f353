// libFuzzer target: the block validator and every decoder behind it. A block that passes
// validate_block must decode, with the reference decoder and with every CPU kernel set this
// processor runs, without reading out of bounds; the kernel sets must agree bit for bit on the
// codes and the dequantized values, and everything must stay finite and inside the fp16 range.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu_kernels/kernels.hpp"
#include "packkv/codec.hpp"
#include "packkv/error.hpp"

namespace {

void require(bool ok) {
  if (!ok) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1) return 0;
  // The first byte picks a geometry, so several layouts (descriptor sizes, per-channel K,
  // no permutation) are fuzzed by one target.
  packkv::CacheConfig c;
  c.num_kv_heads = 1 + (data[0] & 1);
  c.num_q_heads = c.num_kv_heads;
  c.head_dim = (data[0] & 2) ? 16 : 8;
  c.block_tokens = (data[0] & 4) ? 32 : 16;
  c.k_rel = (data[0] & 8) ? 0.01f : 0.1f;  // 7-bit or 4-bit codes
  c.k_mode = (data[0] & 16) ? packkv::QuantMode::per_channel : packkv::QuantMode::per_token;
  c.repack = (data[0] & 32) ? packkv::RepackMethod::none : packkv::RepackMethod::median;
  c.compact_params = (data[0] & 64) != 0;  // version 3 blocks
  const packkv::CodecParams params = packkv::make_codec_params(c);
  const packkv::format::BlockGeometry& g = params.geometry;
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
  for (float x : k) require(std::isfinite(x) && std::fabs(x) <= 65504.0f);
  for (float x : v) require(std::isfinite(x) && std::fabs(x) <= 65504.0f);
  using packkv::detail::cpu::Isa;
  const std::size_t values = static_cast<std::size_t>(c.block_tokens) * c.head_dim;
  for (int h = 0; h < c.num_kv_heads; ++h) {
    for (packkv::format::Side side : {packkv::format::Side::k, packkv::format::Side::v}) {
      const std::uint8_t* section = packkv::format::section(block.data(), g, h, side);
      std::vector<std::uint8_t> ref_codes(values), codes(values);
      std::vector<float> ref_values(values), decoded(values);
      const auto& scalar = packkv::detail::cpu::kernels_for(Isa::scalar);
      scalar.unpack_section(g.layout(side), section, ref_codes.data());
      scalar.decode_section(g.layout(side), g.per_channel(side), section, ref_values.data());
      for (Isa isa : {Isa::scalar, Isa::avx2}) {
        if (!packkv::detail::cpu::supported(isa)) continue;
        const auto& kern = packkv::detail::cpu::kernels_for(isa);
        kern.unpack_section(g.layout(side), section, codes.data());
        kern.decode_section(g.layout(side), g.per_channel(side), section, decoded.data());
        require(codes == ref_codes);
        require(std::memcmp(decoded.data(), ref_values.data(), values * sizeof(float)) == 0);
        std::vector<float> q(2 * c.head_dim, 0.25f), s(2 * c.block_tokens), w(2 * c.block_tokens, 0.5f);
        if (side == packkv::format::Side::k) {
          kern.section_scores(g.k_layout(), g.k_per_channel, section, q.data(), 2, s.data(), c.block_tokens);
          for (float x : s) require(std::isfinite(x));
        } else {
          packkv::detail::cpu::AlignedFloats acc(2 * c.head_dim * 8, 0.0f);
          float min_term[2] = {0, 0};
          kern.section_accumulate_v(g.v_layout(), section, w.data(), c.block_tokens, 2, acc.data(), min_term);
          for (float x : acc) require(std::isfinite(x));
        }
      }
    }
  }
  return 0;
}

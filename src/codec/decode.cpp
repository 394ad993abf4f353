// The CPU block decoder and block measurement.
#include <cstring>
#include <vector>

#include "cpu_kernels/kernels.hpp"
#include "packkv/codec.hpp"

namespace packkv {

using format::SectionLayout;
using format::Side;

void unpack_section_codes(const SectionLayout& layout, const std::uint8_t* section, std::uint8_t* codes) {
  detail::cpu::kScalarKernels.unpack_section(layout, section, codes);  // the reference unpacker
}

void decode_block(const CodecParams& p, const std::uint8_t* block, float* k, float* v, std::size_t row_stride) {
  const format::BlockGeometry& g = p.geometry;
  const int tokens = g.block_tokens, dim = g.head_dim;
  thread_local std::vector<float> values;
  values.resize(static_cast<std::size_t>(tokens) * dim);
  for (int h = 0; h < g.num_heads; ++h) {
    const std::uint8_t* order = format::token_order(block, g, h);
    for (Side side : {Side::k, Side::v}) {
      detail::cpu::kernels().decode_section(g.layout(side), g.per_channel(side), format::section(block, g, h, side),
                                  values.data());
      float* dst = side == Side::k ? k : v;
      for (int i = 0; i < tokens; ++i) {
        const int t = order != nullptr ? order[i] : i;
        std::memcpy(dst + static_cast<std::size_t>(t) * row_stride + static_cast<std::size_t>(h) * dim,
                    values.data() + static_cast<std::size_t>(i) * dim, sizeof(float) * static_cast<std::size_t>(dim));
      }
    }
  }
}

BlockBytes block_bytes_breakdown(const CodecParams& p, const std::uint8_t* block) {
  const format::BlockGeometry& g = p.geometry;
  BlockBytes b;
  b.permutations = g.permutation_bytes();
  for (int h = 0; h < g.num_heads; ++h) {
    for (Side side : {Side::k, Side::v}) {
      const SectionLayout layout = g.layout(side);
      const std::uint8_t* section = format::section(block, g, h, side);
      std::size_t descriptors = 0;
      for (std::uint32_t r = 0; r < layout.rounds; ++r) {
        if (!format::round_view(section, layout, r).plain) descriptors += layout.descriptor_bytes;
      }
      const std::uint32_t rounds_bytes = format::rounds_bytes(section, layout);
      b.payload += rounds_bytes - descriptors;
      b.descriptors += descriptors;
      b.params += layout.round_end_offset;  // the parameter area (with the compact prefix)
      (side == Side::k ? b.k_sections : b.v_sections) += layout.section_bytes(rounds_bytes);
    }
  }
  b.headers = format::block_bytes(block) - b.payload - b.params - b.descriptors - b.permutations;
  return b;
}

}  // namespace packkv

// The encoder's last step on its own: a section's bytes from its codes and parameters. Shared by
// the block encoder and by the entropy-coded image form, which rebuilds sections from their codes.
#pragma once

#include <cstdint>

#include "packkv/codec.hpp"
#include "packkv/format/block.hpp"

namespace packkv::detail {

/// Writes one section (params, round ends, rounds, padding) at `out` and returns its size.
/// codes: [token][channel] in arrival order; params: a parameter area as the section stores it
/// (layout.round_end_offset bytes: the compact prefix, if any, then one group after the other) but
/// with per-token groups in arrival order; order[i]: the arrival index of the token stored at
/// position i. Adds its parts to `bytes`.
std::uint32_t write_section(const format::SectionLayout& layout, const std::uint8_t* codes, const std::uint8_t* params,
                            bool per_token_params, const std::uint8_t* order, std::uint8_t* out, BlockBytes& bytes);

}  // namespace packkv::detail

// Token repacking inside a block: the order in which a head's tokens are stored, chosen so that
// tokens with similar codes share packs (docs/format.md). K and V of a head share the order.
#pragma once

#include <cstdint>

namespace packkv::codec {

/// Stable sort of the tokens by the lower median of their V codes.
void order_by_median(const std::uint8_t* v_codes, int tokens, int dim, std::uint8_t* order);

/// Each pack starts with the earliest unused token and grows by the unused token that adds the
/// fewest bits to the pack's K and V widths (ties: the earliest token).
void order_greedy(const std::uint8_t* k_codes, const std::uint8_t* v_codes, int tokens, int dim, std::uint8_t* order);

}  // namespace packkv::codec

#include "codec/repack.hpp"

#include <algorithm>
#include <array>
#include <vector>

#include "packkv/format.hpp"

namespace packkv::codec {

void order_by_median(const std::uint8_t* v_codes, int tokens, int dim, std::uint8_t* order) {
  const int rank = (dim - 1) / 2;
  std::array<std::uint8_t, 256> keys{};
  for (int t = 0; t < tokens; ++t) {
    std::array<std::uint16_t, 256> histogram{};
    const std::uint8_t* row = v_codes + static_cast<std::size_t>(t) * dim;
    for (int c = 0; c < dim; ++c) ++histogram[row[c]];
    int seen = 0, code = 0;
    while (seen + histogram[code] <= rank) seen += histogram[code++];
    keys[t] = static_cast<std::uint8_t>(code);
  }
  // Counting sort by key: stable, O(tokens + 256).
  std::array<int, 257> start{};
  for (int t = 0; t < tokens; ++t) ++start[keys[t] + 1];
  for (int i = 0; i < 256; ++i) start[i + 1] += start[i];
  for (int t = 0; t < tokens; ++t) order[start[keys[t]]++] = static_cast<std::uint8_t>(t);
}

void order_greedy(const std::uint8_t* k_codes, const std::uint8_t* v_codes, int tokens, int dim,
                  std::uint8_t* order) {
  std::array<bool, 256> used{};
  std::vector<std::uint8_t> lo(2 * dim), hi(2 * dim);
  auto code_of = [&](int t, int c) { return c < dim ? k_codes[t * dim + c] : v_codes[t * dim + c - dim]; };
  int placed = 0;
  for (int pack = 0; pack < tokens / format::kPackTokens; ++pack) {
    int first = 0;
    while (used[first]) ++first;
    used[first] = true;
    order[placed++] = static_cast<std::uint8_t>(first);
    for (int c = 0; c < 2 * dim; ++c) lo[c] = hi[c] = code_of(first, c);
    for (int n = 1; n < format::kPackTokens; ++n) {
      int best = -1;
      std::uint32_t best_cost = ~0u;
      for (int t = 0; t < tokens; ++t) {
        if (used[t]) continue;
        std::uint32_t cost = 0;
        for (int c = 0; c < 2 * dim; ++c) {
          const std::uint8_t code = code_of(t, c);
          cost += format::width_for_range(static_cast<std::uint32_t>(std::max(hi[c], code) - std::min(lo[c], code)));
        }
        if (cost < best_cost) {
          best_cost = cost;
          best = t;
        }
      }
      used[best] = true;
      order[placed++] = static_cast<std::uint8_t>(best);
      for (int c = 0; c < 2 * dim; ++c) {
        lo[c] = std::min(lo[c], code_of(best, c));
        hi[c] = std::max(hi[c], code_of(best, c));
      }
    }
  }
}

}  // namespace packkv::codec

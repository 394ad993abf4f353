// The uncompressed tail of a (sequence, layer), and the one rule for which tokens are compressed.
// Both backends and the CUDA kernels use these definitions (host and device).
//
// The tail holds the sequence's newest tokens [begin, begin + len). `begin` is always a multiple
// of block_tokens: blocks are sealed from the start of the sequence. Rows live in a ring of
// `capacity` rows indexed by sequence position (position p is in row p % capacity), so a token
// never moves while it stays in the tail; the ring grows as the tail does (memory follows the
// data) up to the longest tail the config allows.
#pragma once

#include <algorithm>
#include <cstdint>

#include "packkv/format.hpp"
#include "packkv/types.hpp"

namespace packkv::detail {

struct TailRing {
  std::int64_t begin = 0;  ///< sequence position of the first tail token
  int len = 0;             ///< tokens in the tail
  int capacity = 0;        ///< rows allocated (0: no memory yet)

  PACKKV_HOST_DEVICE std::int64_t end() const { return begin + len; }
  PACKKV_HOST_DEVICE int row(std::int64_t position) const { return static_cast<int>(position % capacity); }
};

/// Rows a layer's next append reads: the current tail (in its ring) followed by the new tokens.
/// Indexed by sequence position; row(side, p) is [num_kv_heads][head_dim] values of T.
template <class T>
struct TokenRows {
  const T* ring_k = nullptr;
  const T* ring_v = nullptr;
  TailRing tail;               ///< where the ring's tokens are
  const T* in_k = nullptr;     ///< new tokens, positions [tail.end(), tail.end() + n)
  const T* in_v = nullptr;
  int row_elems = 0;           ///< num_kv_heads * head_dim

  PACKKV_HOST_DEVICE const T* row(format::Side side, std::int64_t position) const {
    if (position < tail.end()) {
      return (side == format::Side::k ? ring_k : ring_v) + static_cast<std::int64_t>(tail.row(position)) * row_elems;
    }
    return (side == format::Side::k ? in_k : in_v) + (position - tail.end()) * row_elems;
  }
};

/// What one append does to one layer, from the one rule: the oldest full blocks of (tail + new
/// tokens) are compressed while residual_tokens stay uncompressed.
struct AppendPlan {
  TailRing before;   ///< the tail before the append
  TailRing after;    ///< the tail after it (capacity included: the ring may grow, never shrinks)
  int n_tokens = 0;  ///< new tokens, positions [before.end(), before.end() + n_tokens)
  int seal_blocks = 0;  ///< blocks sealed, positions [before.begin, after.begin)

  std::int64_t first_new() const { return before.end(); }
  std::int64_t end() const { return before.end() + n_tokens; }
  bool ring_grows() const { return after.capacity > before.capacity; }
};

struct TailPolicy {
  int block_tokens;
  int residual_tokens;

  /// The longest tail after an append: residual + block - 1 tokens, rounded up to 16 rows.
  int max_capacity() const { return (residual_tokens + block_tokens - 1 + 15) / 16 * 16; }
  /// Ring rows for a tail of `tokens` starting at `begin`. Until the layer's first block is sealed
  /// the ring follows the tail (powers of two from 16); from then on the tail keeps cycling up to
  /// its longest, so the ring takes its full size. A function of the layer's length only (never
  /// of the appends that led there), and it never shrinks.
  int capacity_for(std::int64_t begin, int tokens, int current) const {
    if (begin > 0) return std::max(current, max_capacity());
    if (tokens <= current) return current;
    int capacity = std::max(current, 16);
    while (capacity < tokens) capacity *= 2;
    return std::min(capacity, max_capacity());
  }
  AppendPlan plan(const TailRing& tail, int n_tokens) const {
    AppendPlan p;
    p.before = tail;
    p.n_tokens = n_tokens;
    const std::int64_t pending = static_cast<std::int64_t>(tail.len) + n_tokens;
    const std::int64_t sealable = pending - residual_tokens;
    p.seal_blocks = sealable >= block_tokens ? static_cast<int>(sealable / block_tokens) : 0;
    p.after.begin = tail.begin + static_cast<std::int64_t>(p.seal_blocks) * block_tokens;
    p.after.len = static_cast<int>(pending - static_cast<std::int64_t>(p.seal_blocks) * block_tokens);
    p.after.capacity = capacity_for(p.after.begin, p.after.len, tail.capacity);
    return p;
  }
};

}  // namespace packkv::detail

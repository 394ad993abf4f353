// What the CPU backend keeps for one (sequence, layer): its block table (slots of the SlotPool),
// its tail ring (core/tail.hpp) and its exact sink rows, in host memory.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "core/backend.hpp"
#include "cpu/slot_pool.hpp"

namespace packkv::detail::cpu {

template <class T>
class CpuLayerStore final : public LayerStore {
 public:
  using Forget = void (*)(void* owner, CpuLayerStore* store);
  CpuLayerStore(void* owner, Forget forget) : owner_(owner), forget_(forget) {}
  ~CpuLayerStore() override { forget_(owner_, this); }
  CpuLayerStore(const CpuLayerStore&) = delete;
  CpuLayerStore& operator=(const CpuLayerStore&) = delete;

  std::vector<SlotRef> blocks;  ///< the block table, oldest first
  BlockBytes block_bytes;       ///< the blocks' parts, summed
  std::unique_ptr<T[]> ring_k, ring_v;  ///< [capacity][num_kv_heads][head_dim] each
  int ring_capacity = 0;
  /// Exact rows of the first CacheConfig::sink_tokens tokens, [sink_tokens][num_kv_heads][head_dim]
  /// each: held from the sealing of the layer's first block on (before it the tail holds them).
  std::unique_ptr<T[]> sink_k, sink_v;

 private:
  void* owner_;     ///< the backend, which keeps a registry of its stores
  Forget forget_;
};

template <class T>
const CpuLayerStore<T>& store_of(const LayerRead& layer) {
  return static_cast<const CpuLayerStore<T>&>(*layer.store);
}

/// Calls fn(first, row, count) for the runs of consecutive ring rows that hold the tail: tail
/// tokens [first, first + count) are ring rows [row, row + count).
template <class Fn>
void for_each_tail_run(const TailRing& tail, Fn&& fn) {
  int first = 0;
  while (first < tail.len) {
    const int row = tail.row(tail.begin + first);
    const int count = std::min(tail.len - first, tail.capacity - row);
    fn(first, row, count);
    first += count;
  }
}

}  // namespace packkv::detail::cpu

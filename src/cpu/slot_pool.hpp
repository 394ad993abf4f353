// The CPU backend's store for variable-size packed blocks in host memory.
//
// Memory is reserved in fixed-size pages. Each page serves one size class (slot sizes grow
// geometrically, 8 classes per doubling, so a slot wastes at most 1/8 of its size). A page whose
// last slot is released goes back to the system at once, so the pool never holds more than its
// live blocks need plus the partly used pages. When a block's class has no free slot, a free
// slot of a larger class (up to twice the size) is used before a new page is reserved.
// Fragmentation (reserved bytes that hold no block data) is reported, not hidden; compaction
// moves blocks so that each class keeps at most one partly used page. A slot may have several
// references (forked sequences share blocks): it is freed with the last.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <unordered_map>
#include <vector>

#include "packkv/stats.hpp"

namespace packkv::detail::cpu {

struct SlotRef {
  std::uint8_t* data = nullptr;
  std::uint32_t page = 0;
  std::uint32_t slot = 0;
  std::uint32_t bytes = 0;  ///< the block's size (<= the slot size)
};

class SlotPool {
 public:
  /// `max_block_bytes` is the largest block that will ever be asked for.
  explicit SlotPool(std::size_t max_block_bytes);
  ~SlotPool();
  SlotPool(const SlotPool&) = delete;
  SlotPool& operator=(const SlotPool&) = delete;

  std::size_t page_bytes() const { return page_bytes_; }
  std::size_t reserved_bytes() const { return live_pages_ * page_bytes_; }

  /// Bytes of new pages that allocating blocks of these sizes would reserve (no state change).
  std::size_t extra_bytes_needed(std::span<const std::uint32_t> sizes) const;
  /// An upper bound of extra_bytes_needed() for `blocks` blocks of any sizes in
  /// [min_bytes, max_bytes]: each size class they fall in may open pages of its own.
  std::size_t worst_case_extra_bytes(std::size_t blocks, std::uint32_t min_bytes, std::uint32_t max_bytes) const;
  /// reserved_bytes() + extra_bytes_needed(sizes) as they would be after compact().
  std::size_t reserved_after_compaction(std::span<const std::uint32_t> sizes) const;

  /// Allocates one slot per size; all-or-nothing: throws packkv::error (out of memory) and leaves
  /// the pool as it was.
  std::vector<SlotRef> allocate(std::span<const std::uint32_t> sizes);
  /// Drops one reference to the slot; the slot is freed with its last.
  void release(const SlotRef& ref);
  /// One more reference to each slot (a fork shares its parent's blocks); all-or-nothing: throws
  /// packkv::error (out of memory) with no reference added.
  void retain(std::span<const SlotRef> refs);
  /// Whether the slot has more than one reference.
  bool shared(const SlotRef& ref) const { return !extra_refs_.empty() && extra_refs_.count(key(ref.page, ref.slot)); }

  /// Moves blocks so that every class occupies as few pages as possible and frees the pages that
  /// empty. For each move the slot's bytes are copied, then `relocated(old_page, old_slot,
  /// new_ref)` lets the owner update its table.
  using RelocateFn = std::function<void(std::uint32_t, std::uint32_t, const SlotRef&)>;
  void compact(const RelocateFn& relocated);

  PoolStats stats() const;

 private:
  struct Page {
    std::uint8_t* data = nullptr;  ///< null while the page index is unused
    int size_class = -1;
    std::uint32_t used = 0;
    std::vector<std::uint32_t> free_slots;
  };
  struct Source {
    enum Kind { existing_slot, fresh_page } kind;
    int size_class;  ///< the class whose slot is used
  };
  std::vector<Source> plan(std::span<const std::uint32_t> sizes, std::vector<std::size_t> free_slots,
                           std::size_t* fresh_pages) const;
  std::vector<std::size_t> free_slots_per_class() const;
  int class_of(std::uint32_t bytes) const;
  std::uint32_t slots_per_page(int size_class) const;
  void assign(std::uint32_t page, int size_class, std::vector<std::uint32_t> free_slots);
  void free_page(std::uint32_t page);

  std::size_t page_bytes_;
  std::vector<std::uint32_t> class_bytes_;           ///< slot size of each class
  std::vector<Page> pages_;
  std::vector<std::uint32_t> holes_;                 ///< unused page indices, reused first
  std::vector<std::vector<std::uint32_t>> partial_;  ///< per class: pages with a free slot
  std::vector<std::size_t> used_slots_;              ///< per class
  std::vector<std::size_t> class_pages_;             ///< per class: pages assigned to it
  /// References beyond the first, per shared slot (key(page, slot)); most slots have none.
  std::unordered_map<std::uint64_t, std::uint32_t> extra_refs_;
  static std::uint64_t key(std::uint32_t page, std::uint32_t slot) { return (std::uint64_t{page} << 32) | slot; }
  std::size_t live_pages_ = 0, live_bytes_ = 0, slot_bytes_ = 0, live_blocks_ = 0;
};

}  // namespace packkv::detail::cpu

// A host-memory pool for variable-size packed blocks.
//
// Memory is reserved in fixed-size pages. Each page serves one size class (slot sizes grow
// geometrically, 8 classes per doubling, so a slot wastes at most 1/8 of its size). A page whose
// slots are all free goes back to a shared list of empty pages, where any size class can take it:
// removing sequences returns memory to every future block size, and the pool never holds more
// pages than its peak of live data needed. Fragmentation (reserved bytes that hold no block data)
// is reported, not hidden. When a block's class has no free slot and no empty page is cached, a
// free slot of a larger class (up to twice the size) is used before a new page is reserved.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "packkv/stats.hpp"

namespace packkv::detail {

struct SlotRef {
  std::uint8_t* data = nullptr;
  std::uint32_t page = 0;
  std::uint32_t slot = 0;
  std::uint32_t bytes = 0;  ///< the block's size (<= the slot size)
};

class PagePool {
 public:
  /// `max_block_bytes` is the largest block that will ever be asked for.
  explicit PagePool(std::size_t max_block_bytes);
  ~PagePool();
  PagePool(const PagePool&) = delete;
  PagePool& operator=(const PagePool&) = delete;

  std::size_t page_bytes() const { return page_bytes_; }
  std::size_t reserved_bytes() const { return (pages_.size() - holes_.size()) * page_bytes_; }

  /// Bytes of new pages that allocating blocks of these sizes would reserve (no state change).
  std::size_t extra_bytes_needed(std::span<const std::uint32_t> sizes) const;

  /// Allocates one slot per size; all-or-nothing (throws packkv::error or std::bad_alloc and
  /// leaves the pool as it was).
  std::vector<SlotRef> allocate(std::span<const std::uint32_t> sizes);
  void release(const SlotRef& ref);

  /// Returns cached empty pages to the system; the reserved size drops to what live blocks need.
  void trim();

  /// Bytes of free slots inside partly used pages: memory a block of another class cannot use.
  std::size_t stranded_bytes() const;

  /// Moves blocks so that every class occupies as few pages as possible; pages that empty join
  /// the shared empty list. For each move the slot's bytes are copied, then
  /// `relocated(old_page, old_slot, new_ref)` lets the owner update its table.
  using RelocateFn = std::function<void(std::uint32_t, std::uint32_t, const SlotRef&)>;
  void compact(const RelocateFn& relocated);

  PoolStats stats() const;

 private:
  struct Page {
    std::uint8_t* data = nullptr;
    int size_class = -1;                 ///< -1 while empty (not assigned to a class)
    std::uint32_t used = 0;
    std::vector<std::uint32_t> free_slots;
  };
  struct Source {
    enum Kind { own_class, empty_page, fresh_page } kind;
    int size_class;  ///< the class whose slot is used
  };
  std::vector<Source> plan(std::span<const std::uint32_t> sizes, std::size_t* fresh_pages) const;
  int class_of(std::uint32_t bytes) const;
  std::uint32_t slots_per_page(int size_class) const;
  void assign(std::uint32_t page, int size_class);

  std::size_t page_bytes_;
  std::vector<std::uint32_t> class_bytes_;           ///< slot size of each class
  std::vector<Page> pages_;
  std::vector<std::uint32_t> empty_pages_;           ///< reserved pages with no class
  std::vector<std::uint32_t> holes_;                 ///< page indices whose memory trim() returned
  std::vector<std::vector<std::uint32_t>> partial_;  ///< per class: pages with a free slot
  std::size_t live_bytes_ = 0, slot_bytes_ = 0, live_blocks_ = 0;
};

}  // namespace packkv::detail

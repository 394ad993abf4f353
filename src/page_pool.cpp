#include "page_pool.hpp"

#include <algorithm>
#include <cstdlib>
#include <new>

#include <fmt/format.h>

#include "packkv/error.hpp"

namespace packkv::detail {

namespace {
constexpr std::size_t kMinPageBytes = std::size_t{256} << 10;
constexpr std::uint32_t kSlotAlign = 16;
}  // namespace

PagePool::PagePool(std::size_t max_block_bytes) {
  // A page holds at least four of the largest blocks, so big classes still share pages.
  page_bytes_ = kMinPageBytes;
  while (page_bytes_ < 4 * max_block_bytes) page_bytes_ *= 2;
  // Classes: 16, 32, ..., 128, then 8 per doubling (each 1/8 of the doubling's base apart).
  for (std::uint32_t size = kSlotAlign; size <= 128; size += kSlotAlign) class_bytes_.push_back(size);
  for (std::uint32_t base = 128; class_bytes_.back() < max_block_bytes; base *= 2) {
    for (int i = 1; i <= 8; ++i) class_bytes_.push_back(base + base / 8 * i);
  }
  partial_.resize(class_bytes_.size());
}

PagePool::~PagePool() {
  for (Page& page : pages_) std::free(page.data);
}

int PagePool::class_of(std::uint32_t bytes) const {
  const auto it = std::lower_bound(class_bytes_.begin(), class_bytes_.end(), bytes);
  PACKKV_REQUIRE(it != class_bytes_.end(),
                 fmt::format("block of {} bytes is larger than the pool's largest slot {}", bytes,
                             class_bytes_.back()));
  return static_cast<int>(it - class_bytes_.begin());
}

std::uint32_t PagePool::slots_per_page(int size_class) const {
  return static_cast<std::uint32_t>(page_bytes_ / class_bytes_[static_cast<std::size_t>(size_class)]);
}

std::size_t PagePool::extra_bytes_needed(std::span<const std::uint32_t> sizes) const {
  // Per class: slots still free in partial pages, then whole pages (cached empty ones first).
  std::vector<std::size_t> wanted(class_bytes_.size(), 0);
  for (std::uint32_t size : sizes) ++wanted[static_cast<std::size_t>(class_of(size))];
  std::size_t pages_needed = 0;
  for (std::size_t c = 0; c < wanted.size(); ++c) {
    if (!wanted[c]) continue;
    std::size_t free_slots = 0;
    for (std::uint32_t p : partial_[c]) free_slots += pages_[p].free_slots.size();
    if (wanted[c] > free_slots) {
      const std::size_t per_page = slots_per_page(static_cast<int>(c));
      pages_needed += (wanted[c] - free_slots + per_page - 1) / per_page;
    }
  }
  const std::size_t fresh = pages_needed > empty_pages_.size() ? pages_needed - empty_pages_.size() : 0;
  return fresh * page_bytes_;
}

void PagePool::assign(std::uint32_t page_index, int size_class) {
  Page& page = pages_[page_index];
  page.size_class = size_class;
  page.used = 0;
  const std::uint32_t n = slots_per_page(size_class);
  page.free_slots.resize(n);
  // Highest slot first so that pop_back hands out slot 0, 1, 2, ... in address order.
  for (std::uint32_t i = 0; i < n; ++i) page.free_slots[i] = n - 1 - i;
  partial_[static_cast<std::size_t>(size_class)].push_back(page_index);
}

std::vector<SlotRef> PagePool::allocate(std::span<const std::uint32_t> sizes) {
  // Reserve every new page first, so a failure leaves nothing half-done.
  const std::size_t extra_pages = extra_bytes_needed(sizes) / page_bytes_;
  std::vector<std::uint8_t*> fresh;
  fresh.reserve(extra_pages);
  for (std::size_t i = 0; i < extra_pages; ++i) {
    void* p = std::aligned_alloc(64, page_bytes_);
    if (!p) {
      for (std::uint8_t* q : fresh) std::free(q);
      throw error(fmt::format("out of host memory reserving a {}-byte page for packed blocks", page_bytes_));
    }
    fresh.push_back(static_cast<std::uint8_t*>(p));
  }
  pages_.reserve(pages_.size() + fresh.size());
  empty_pages_.reserve(empty_pages_.size() + fresh.size());
  for (std::uint8_t* data : fresh) {
    // Reuse the index of a page that trim() gave back, so page indices stay dense.
    std::uint32_t index;
    if (!holes_.empty()) {
      index = holes_.back();
      holes_.pop_back();
    } else {
      index = static_cast<std::uint32_t>(pages_.size());
      pages_.emplace_back();
    }
    pages_[index].data = data;
    empty_pages_.push_back(index);
  }
  // From here on nothing can fail but vector growth of small bookkeeping arrays.
  std::vector<SlotRef> refs;
  refs.reserve(sizes.size());
  for (std::uint32_t size : sizes) {
    const int c = class_of(size);
    auto& partial = partial_[static_cast<std::size_t>(c)];
    if (partial.empty()) {
      const std::uint32_t page_index = empty_pages_.back();
      empty_pages_.pop_back();
      assign(page_index, c);
    }
    const std::uint32_t page_index = partial.back();
    Page& page = pages_[page_index];
    SlotRef ref;
    ref.page = page_index;
    ref.slot = page.free_slots.back();
    page.free_slots.pop_back();
    ++page.used;
    if (page.free_slots.empty()) partial.pop_back();
    ref.bytes = size;
    ref.data = page.data + static_cast<std::size_t>(ref.slot) * class_bytes_[static_cast<std::size_t>(c)];
    live_bytes_ += size;
    slot_bytes_ += class_bytes_[static_cast<std::size_t>(c)];
    ++live_blocks_;
    refs.push_back(ref);
  }
  return refs;
}

void PagePool::release(const SlotRef& ref) {
  Page& page = pages_[ref.page];
  const auto c = static_cast<std::size_t>(page.size_class);
  if (page.free_slots.empty()) partial_[c].push_back(ref.page);
  page.free_slots.push_back(ref.slot);
  --page.used;
  live_bytes_ -= ref.bytes;
  slot_bytes_ -= class_bytes_[c];
  --live_blocks_;
  if (page.used == 0) {
    // The page is empty: hand it back to the shared list so any class can reuse it.
    auto& partial = partial_[c];
    partial.erase(std::find(partial.begin(), partial.end(), ref.page));
    page.size_class = -1;
    page.free_slots.clear();
    page.free_slots.shrink_to_fit();
    empty_pages_.push_back(ref.page);
  }
}

void PagePool::trim() {
  for (std::uint32_t index : empty_pages_) {
    std::free(pages_[index].data);
    pages_[index].data = nullptr;
    holes_.push_back(index);
  }
  empty_pages_.clear();
}

PoolStats PagePool::stats() const {
  PoolStats s;
  s.page_bytes = page_bytes_;
  s.pages_reserved = pages_.size() - holes_.size();
  s.reserved_bytes = reserved_bytes();
  s.slot_bytes = slot_bytes_;
  s.live_bytes = live_bytes_;
  s.live_blocks = live_blocks_;
  return s;
}

}  // namespace packkv::detail

#include "page_pool.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>

#include <fmt/format.h>

#include "packkv/error.hpp"

namespace packkv::detail {

namespace {
constexpr std::size_t kMinPageBytes = std::size_t{64} << 10;
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

std::vector<PagePool::Source> PagePool::plan(std::span<const std::uint32_t> sizes, std::size_t* fresh_pages) const {
  // Simulates the free lists with counts. Order of preference: a free slot of the block's own
  // class; a free slot of a larger class up to twice the size (so freed memory of one class serves
  // blocks of another instead of opening a page); a cached empty page; a new page. Empty pages come
  // after larger slots so that a pool refilled after removals opens pages exactly where a new pool
  // would, and never holds more.
  std::vector<std::size_t> free_slots(class_bytes_.size(), 0);
  for (std::size_t c = 0; c < partial_.size(); ++c) {
    for (std::uint32_t p : partial_[c]) free_slots[c] += pages_[p].free_slots.size();
  }
  std::size_t empty = empty_pages_.size(), fresh = 0;
  std::vector<Source> sources;
  sources.reserve(sizes.size());
  for (std::uint32_t size : sizes) {
    const int c = class_of(size);
    const auto cu = static_cast<std::size_t>(c);
    if (free_slots[cu] > 0) {
      --free_slots[cu];
      sources.push_back({Source::own_class, c});
      continue;
    }
    int larger = -1;
    for (std::size_t c2 = cu + 1; c2 < class_bytes_.size() && class_bytes_[c2] <= 2 * class_bytes_[cu]; ++c2) {
      if (free_slots[c2] > 0) {
        larger = static_cast<int>(c2);
        break;
      }
    }
    if (larger >= 0) {
      --free_slots[static_cast<std::size_t>(larger)];
      sources.push_back({Source::own_class, larger});
      continue;
    }
    if (empty > 0) {
      --empty;
      free_slots[cu] += slots_per_page(c) - 1;
      sources.push_back({Source::empty_page, c});
      continue;
    }
    ++fresh;
    free_slots[cu] += slots_per_page(c) - 1;
    sources.push_back({Source::fresh_page, c});
  }
  if (fresh_pages) *fresh_pages = fresh;
  return sources;
}

std::size_t PagePool::extra_bytes_needed(std::span<const std::uint32_t> sizes) const {
  std::size_t fresh = 0;
  plan(sizes, &fresh);
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
  std::size_t fresh_count = 0;
  const std::vector<Source> sources = plan(sizes, &fresh_count);
  // Reserve every new page first, so a failure leaves nothing half-done.
  std::vector<std::uint8_t*> fresh;
  fresh.reserve(fresh_count);
  for (std::size_t i = 0; i < fresh_count; ++i) {
    void* p = std::aligned_alloc(64, page_bytes_);
    if (!p) {
      for (std::uint8_t* q : fresh) std::free(q);
      throw error(fmt::format("out of host memory reserving a {}-byte page for packed blocks", page_bytes_));
    }
    fresh.push_back(static_cast<std::uint8_t*>(p));
  }
  pages_.reserve(pages_.size() + fresh.size());
  std::vector<std::uint32_t> fresh_indices;
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
    fresh_indices.push_back(index);
  }
  // From here on the plan is carried out exactly; only small bookkeeping vectors can grow.
  std::vector<SlotRef> refs;
  refs.reserve(sizes.size());
  std::size_t next_fresh = 0;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    const int c = sources[i].size_class;
    auto& partial = partial_[static_cast<std::size_t>(c)];
    if (sources[i].kind == Source::empty_page) {
      const std::uint32_t page_index = empty_pages_.back();
      empty_pages_.pop_back();
      assign(page_index, c);
    } else if (sources[i].kind == Source::fresh_page) {
      assign(fresh_indices[next_fresh++], c);
    }
    const std::uint32_t page_index = partial.back();
    Page& page = pages_[page_index];
    SlotRef ref;
    ref.page = page_index;
    ref.slot = page.free_slots.back();
    page.free_slots.pop_back();
    ++page.used;
    if (page.free_slots.empty()) partial.pop_back();
    ref.bytes = sizes[i];
    ref.data = page.data + static_cast<std::size_t>(ref.slot) * class_bytes_[static_cast<std::size_t>(c)];
    live_bytes_ += sizes[i];
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

std::size_t PagePool::stranded_bytes() const {
  std::size_t bytes = 0;
  for (std::size_t c = 0; c < partial_.size(); ++c) {
    for (std::uint32_t p : partial_[c]) bytes += pages_[p].free_slots.size() * class_bytes_[c];
  }
  return bytes;
}

void PagePool::compact(const RelocateFn& relocated) {
  for (std::size_t c = 0; c < partial_.size(); ++c) {
    if (partial_[c].size() < 2) continue;  // at most one partly used page: nothing to gain
    const auto size_class = static_cast<int>(c);
    const std::uint32_t per_page = slots_per_page(size_class);
    // Fill the fullest partly used pages from the emptiest ones.
    std::vector<std::uint32_t> order = partial_[c];
    std::sort(order.begin(), order.end(),
              [&](std::uint32_t a, std::uint32_t b) { return pages_[a].used > pages_[b].used; });
    std::size_t dst = 0, src = order.size() - 1;
    while (dst < src) {
      Page& to = pages_[order[dst]];
      Page& from = pages_[order[src]];
      if (to.free_slots.empty()) {
        ++dst;
        continue;
      }
      if (from.used == 0) {
        --src;
        continue;
      }
      // Any live slot of `from` (free slots are listed; find one that is not).
      std::vector<bool> is_free(per_page, false);
      for (std::uint32_t f : from.free_slots) is_free[f] = true;
      std::uint32_t live = 0;
      while (is_free[live]) ++live;
      SlotRef ref;
      ref.page = order[dst];
      ref.slot = to.free_slots.back();
      ref.data = to.data + static_cast<std::size_t>(ref.slot) * class_bytes_[c];
      std::memcpy(ref.data, from.data + static_cast<std::size_t>(live) * class_bytes_[c], class_bytes_[c]);
      to.free_slots.pop_back();
      ++to.used;
      from.free_slots.push_back(live);
      --from.used;
      relocated(order[src], live, ref);
    }
    // Rebuild the class's lists: emptied pages become shared, the rest stay partial or full.
    partial_[c].clear();
    for (std::uint32_t p : order) {
      Page& page = pages_[p];
      if (page.used == 0) {
        page.size_class = -1;
        page.free_slots.clear();
        page.free_slots.shrink_to_fit();
        empty_pages_.push_back(p);
      } else if (!page.free_slots.empty()) {
        partial_[c].push_back(p);
      }
    }
  }
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

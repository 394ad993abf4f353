#include "cpu/slot_pool.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>

#include <fmt/format.h>

#include "packkv/error.hpp"

namespace packkv::detail::cpu {

namespace {
constexpr std::size_t kMinPageBytes = std::size_t{64} << 10;
constexpr std::uint32_t kSlotAlign = 16;
}  // namespace

SlotPool::SlotPool(std::size_t max_block_bytes) {
  // A page holds at least four of the largest blocks, so big classes still share pages.
  page_bytes_ = kMinPageBytes;
  while (page_bytes_ < 4 * max_block_bytes) page_bytes_ *= 2;
  // Classes: 16, 32, ..., 128, then 8 per doubling (each 1/8 of the doubling's base apart).
  for (std::uint32_t size = kSlotAlign; size <= 128; size += kSlotAlign) class_bytes_.push_back(size);
  for (std::uint32_t base = 128; class_bytes_.back() < max_block_bytes; base *= 2) {
    for (int i = 1; i <= 8; ++i) class_bytes_.push_back(base + base / 8 * i);
  }
  partial_.resize(class_bytes_.size());
  used_slots_.assign(class_bytes_.size(), 0);
  class_pages_.assign(class_bytes_.size(), 0);
}

SlotPool::~SlotPool() {
  for (Page& page : pages_) std::free(page.data);
}

int SlotPool::class_of(std::uint32_t bytes) const {
  const auto it = std::lower_bound(class_bytes_.begin(), class_bytes_.end(), bytes);
  PACKKV_REQUIRE(it != class_bytes_.end(),
                 fmt::format("block of {} bytes is larger than the pool's largest slot {}", bytes, class_bytes_.back()));
  return static_cast<int>(it - class_bytes_.begin());
}

std::uint32_t SlotPool::slots_per_page(int size_class) const {
  return static_cast<std::uint32_t>(page_bytes_ / class_bytes_[static_cast<std::size_t>(size_class)]);
}

std::vector<std::size_t> SlotPool::free_slots_per_class() const {
  std::vector<std::size_t> free_slots(class_bytes_.size(), 0);
  for (std::size_t c = 0; c < partial_.size(); ++c) {
    for (std::uint32_t p : partial_[c]) free_slots[c] += pages_[p].free_slots.size();
  }
  return free_slots;
}

std::vector<SlotPool::Source> SlotPool::plan(std::span<const std::uint32_t> sizes, std::vector<std::size_t> free_slots,
                                             std::size_t* fresh_pages) const {
  // Simulates the free lists with counts. Order of preference: a free slot of the block's own
  // class; a free slot of a larger class up to twice the size (so freed memory of one class serves
  // blocks of another instead of opening a page); a new page.
  std::size_t fresh = 0;
  std::vector<Source> sources;
  sources.reserve(sizes.size());
  for (std::uint32_t size : sizes) {
    const int c = class_of(size);
    const auto cu = static_cast<std::size_t>(c);
    if (free_slots[cu] > 0) {
      --free_slots[cu];
      sources.push_back({Source::existing_slot, c});
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
      sources.push_back({Source::existing_slot, larger});
      continue;
    }
    ++fresh;
    free_slots[cu] += slots_per_page(c) - 1;
    sources.push_back({Source::fresh_page, c});
  }
  if (fresh_pages) *fresh_pages = fresh;
  return sources;
}

std::size_t SlotPool::extra_bytes_needed(std::span<const std::uint32_t> sizes) const {
  std::size_t fresh = 0;
  plan(sizes, free_slots_per_class(), &fresh);
  return fresh * page_bytes_;
}

std::size_t SlotPool::worst_case_extra_bytes(std::size_t blocks, std::uint32_t min_bytes, std::uint32_t max_bytes) const {
  if (blocks == 0) return 0;
  // n_c blocks of class c open at most ceil(n_c / slots_per_page(c)) pages, and a class holds at
  // least as many slots per page as the largest: the sum is at most classes + blocks / that.
  const int lo = class_of(min_bytes), hi = class_of(max_bytes);
  const std::size_t classes = static_cast<std::size_t>(hi - lo + 1);
  return (std::min(blocks, classes) + blocks / slots_per_page(hi)) * page_bytes_;
}

std::size_t SlotPool::reserved_after_compaction(std::span<const std::uint32_t> sizes) const {
  // After compact() a class of u used slots fills ceil(u / slots per page) pages; only the last
  // has free slots.
  std::vector<std::size_t> free_slots(class_bytes_.size(), 0);
  std::size_t pages = 0;
  for (std::size_t c = 0; c < class_bytes_.size(); ++c) {
    const std::size_t per_page = slots_per_page(static_cast<int>(c)), used = used_slots_[c];
    const std::size_t class_pages = (used + per_page - 1) / per_page;
    pages += class_pages;
    free_slots[c] = class_pages * per_page - used;
  }
  std::size_t fresh = 0;
  plan(sizes, std::move(free_slots), &fresh);
  return (pages + fresh) * page_bytes_;
}

void SlotPool::assign(std::uint32_t page_index, int size_class, std::vector<std::uint32_t> free_slots) {
  Page& page = pages_[page_index];
  page.size_class = size_class;
  page.used = 0;
  page.free_slots = std::move(free_slots);
  partial_[static_cast<std::size_t>(size_class)].push_back(page_index);
}

std::vector<SlotRef> SlotPool::allocate(std::span<const std::uint32_t> sizes) {
  std::size_t fresh_count = 0;
  const std::vector<Source> sources = plan(sizes, free_slots_per_class(), &fresh_count);
  // Everything that can fail comes first: the new pages, their free lists, and room in every
  // bookkeeping vector; then the plan is carried out without a failure point.
  struct Fresh {
    std::uint8_t* data;
    std::vector<std::uint32_t> free_slots;
  };
  std::vector<Fresh> fresh;
  std::vector<SlotRef> refs;
  try {
    fresh.reserve(fresh_count);
    refs.reserve(sizes.size());
    for (const Source& source : sources) {
      if (source.kind != Source::fresh_page) continue;
      void* p = std::aligned_alloc(64, page_bytes_);
      if (!p) throw std::bad_alloc();
      fresh.push_back(Fresh{static_cast<std::uint8_t*>(p), {}});
      // Highest slot first so that pop_back hands out slot 0, 1, 2, ... in address order.
      const std::uint32_t n = slots_per_page(source.size_class);
      fresh.back().free_slots.resize(n);
      for (std::uint32_t i = 0; i < n; ++i) fresh.back().free_slots[i] = n - 1 - i;
    }
    pages_.reserve(pages_.size() + fresh_count);
    holes_.reserve(pages_.capacity());  // free_page() never allocates
    // A class's partial list can hold every page of the class, so release() never allocates.
    std::vector<std::size_t> class_pages = class_pages_;
    for (const Source& source : sources) class_pages[static_cast<std::size_t>(source.size_class)] += source.kind == Source::fresh_page;
    for (std::size_t c = 0; c < partial_.size(); ++c) partial_[c].reserve(class_pages[c]);
  } catch (const std::bad_alloc&) {
    for (Fresh& f : fresh) std::free(f.data);
    throw_out_of_memory(fmt::format("{} pages of {} bytes for packed blocks", fresh_count, page_bytes_));
  }
  std::size_t next_fresh = 0;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    const int c = sources[i].size_class;
    auto& partial = partial_[static_cast<std::size_t>(c)];
    if (sources[i].kind == Source::fresh_page) {
      std::uint32_t index;
      if (!holes_.empty()) {
        index = holes_.back();
        holes_.pop_back();
      } else {
        index = static_cast<std::uint32_t>(pages_.size());
        pages_.emplace_back();
      }
      pages_[index].data = fresh[next_fresh].data;
      assign(index, c, std::move(fresh[next_fresh].free_slots));
      ++next_fresh;
      ++live_pages_;
      ++class_pages_[static_cast<std::size_t>(c)];
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
    ++used_slots_[static_cast<std::size_t>(c)];
    refs.push_back(ref);
  }
  return refs;
}

void SlotPool::free_page(std::uint32_t index) {
  Page& page = pages_[index];
  --class_pages_[static_cast<std::size_t>(page.size_class)];
  std::free(page.data);
  page = Page{};
  holes_.push_back(index);
  --live_pages_;
}

void SlotPool::retain(std::span<const SlotRef> refs) {
  std::size_t done = 0;
  try {
    for (; done < refs.size(); ++done) ++extra_refs_[key(refs[done].page, refs[done].slot)];
  } catch (const std::bad_alloc&) {
    for (std::size_t i = 0; i < done; ++i) {
      const auto it = extra_refs_.find(key(refs[i].page, refs[i].slot));
      if (--it->second == 0) extra_refs_.erase(it);
    }
    throw_out_of_memory("the reference counts of shared blocks");
  }
}

void SlotPool::release(const SlotRef& ref) {
  if (!extra_refs_.empty()) {
    const auto it = extra_refs_.find(key(ref.page, ref.slot));
    if (it != extra_refs_.end()) {
      if (--it->second == 0) extra_refs_.erase(it);
      return;
    }
  }
  Page& page = pages_[ref.page];
  const auto c = static_cast<std::size_t>(page.size_class);
  auto& partial = partial_[c];
  if (page.free_slots.empty()) partial.push_back(ref.page);
  page.free_slots.push_back(ref.slot);
  --page.used;
  live_bytes_ -= ref.bytes;
  slot_bytes_ -= class_bytes_[c];
  --live_blocks_;
  --used_slots_[c];
  if (page.used == 0) {
    partial.erase(std::find(partial.begin(), partial.end(), ref.page));
    free_page(ref.page);
  }
}

void SlotPool::compact(const RelocateFn& relocated) {
  for (std::size_t c = 0; c < partial_.size(); ++c) {
    if (partial_[c].size() < 2) continue;  // at most one partly used page: nothing to gain
    const auto size_class = static_cast<int>(c);
    const std::uint32_t per_page = slots_per_page(size_class);
    // Fill the fullest partly used pages from the emptiest ones.
    std::vector<std::uint32_t> order = partial_[c];
    std::sort(order.begin(), order.end(),
              [&](std::uint32_t a, std::uint32_t b) { return pages_[a].used > pages_[b].used; });
    std::size_t dst = 0, src = order.size() - 1;
    std::vector<bool> is_free(per_page);
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
      std::fill(is_free.begin(), is_free.end(), false);
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
      if (!extra_refs_.empty()) {
        // The count moves with the slot; re-keying a node allocates nothing.
        auto node = extra_refs_.extract(key(order[src], live));
        if (!node.empty()) {
          node.key() = key(ref.page, ref.slot);
          extra_refs_.insert(std::move(node));
        }
      }
      relocated(order[src], live, ref);
    }
    // Rebuild the class's list: emptied pages go back to the system, the rest stay partial or full
    // (the list's capacity stays: it can hold every page of the class).
    partial_[c].clear();
    for (std::uint32_t p : order) {
      if (pages_[p].used == 0) {
        free_page(p);
      } else if (!pages_[p].free_slots.empty()) {
        partial_[c].push_back(p);
      }
    }
  }
}

PoolStats SlotPool::stats() const {
  PoolStats s;
  s.page_bytes = page_bytes_;
  s.pages_reserved = live_pages_;
  s.reserved_bytes = reserved_bytes();
  s.slot_bytes = slot_bytes_;
  s.live_bytes = live_bytes_;
  s.live_blocks = live_blocks_;
  return s;
}

}  // namespace packkv::detail::cpu

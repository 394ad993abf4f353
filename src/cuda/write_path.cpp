#include "cuda/write_path.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace packkv::detail::cuda {

namespace {

/// A write's plan for one layer: what it needs on the device, computed without changing anything.
struct LayerPlan {
  std::size_t pages_target = 0;     ///< pages the layer owns after the commit
  std::size_t table_capacity = 0;   ///< after the commit
  std::size_t page_list_capacity = 0;
  bool ring_grows = false;
  bool gains_sinks = false;  ///< the layer gets its first block, so its sink rows (CacheConfig::sink_tokens)
  std::vector<std::uint32_t> adopted_page, adopted_offset;  ///< imported blocks' places
  PlacementCursor adopted_cursor{};                         ///< after them (or after the shared pages)
  CudaLayerStore* share_from = nullptr;  ///< fork: the parent layer whose blocks and pages are shared
  std::size_t shared_pages = 0;          ///< the parent's pages its blocks lie in
  std::size_t upload_offset = 0;  ///< host tokens' place in the upload buffer (bytes)
};

template <class T>
class CudaPrepared final : public PreparedWrite {
 public:
  void* caller_stream = nullptr;  ///< the write's CUDA stream (LayerWrite::stream)
  std::size_t resident_after() const override { return ctx->resident_bytes() + layer_growth() + scratch_growth(); }
  /// Pages, tables, page lists and rings the write adds.
  std::size_t layer_growth() const {
    const std::size_t free_after = ctx->pool.free_pages() + pages_returned;
    const std::size_t fresh = pages_wanted > free_after ? pages_wanted - free_after : 0;
    return fresh * ctx->pool.page_bytes() + growth_bytes;
  }
  /// Staging, uploads and parameter arrays the write needs beyond what the context holds.
  std::size_t scratch_growth() const {
    const std::size_t staging_growth = staging_bytes > ctx->staging.bytes() ? staging_bytes - ctx->staging.bytes() : 0;
    const std::size_t params_growth = params_bytes > ctx->launch_params.bytes() ? params_bytes - ctx->launch_params.bytes() : 0;
    return staging_growth + upload_bytes + params_growth;
  }

  const DeviceContext* ctx = nullptr;
  std::vector<LayerWrite<T>> writes;
  std::vector<LayerPlan> plans;
  std::size_t pages_wanted = 0;    ///< new pages the layers take from the pool
  std::size_t pages_returned = 0;  ///< pages the layers give back to the pool
  std::size_t growth_bytes = 0;    ///< tables, page lists and rings that grow
  std::size_t staging_bytes = 0;   ///< staging the commit needs
  std::size_t upload_bytes = 0;    ///< host tokens travelling to the device
  /// Several writes whose new blocks fit one staging round: a fixed number of launches for all
  /// of them (parameter arrays of params_bytes uploaded once), not a few per write.
  bool batched = false;
  std::size_t params_bytes = 0;
};

/// The parameter arrays of a batched commit, back to back in one upload.
template <class T>
struct BatchParams {
  std::vector<PointerWrite> pointers;  ///< new page-list entries
  std::vector<TailWriteParams<T>> tails;
  std::vector<EncodeParams<T>> encodes;
  std::vector<PlaceParams> places;
  std::int64_t max_tail_elements = 0;
  int max_blocks = 0;

  static std::size_t bytes_for(std::size_t writes, std::size_t new_pages) {
    return align(new_pages * sizeof(PointerWrite)) + align(writes * sizeof(TailWriteParams<T>)) +
           align(writes * sizeof(EncodeParams<T>)) + align(writes * sizeof(PlaceParams));
  }
  static std::size_t align(std::size_t n) { return (n + 255) / 256 * 256; }
};

template <class T>
TokenRows<T> rows_of(const DeviceContext& ctx, const LayerWrite<T>& w, const T* k, const T* v) {
  const auto& store = store_of(w.store);
  TokenRows<T> rows;
  rows.ring_k = store.template ring_k<T>();
  rows.ring_v = store.template ring_v<T>(ctx.row_elems);
  rows.tail = w.plan.before;
  rows.in_k = k;
  rows.in_v = v;
  rows.row_elems = static_cast<int>(ctx.row_elems);
  return rows;
}


// The sink rows a write brings (it gives the layer its first block): the parent's (fork), the
// adopted blocks' (import, truncate: host rows), or the first rows of the tokens it seals, which
// lie in the ring (positions below before.end(), row = position: the ring has not wrapped before
// the first block) and in the new tokens `k`, `v` (device memory). Queued in stream order before
// the tail write.
template <class T>
void fill_sinks(DeviceContext& ctx, CudaLayerStore& store, const LayerWrite<T>& w, const LayerPlan& plan, const T* k,
                const T* v, DeviceBuffer& sinks) {
  const std::size_t row_bytes = ctx.row_elems * sizeof(T), side = static_cast<std::size_t>(ctx.sink_tokens) * row_bytes;
  auto* out = sinks.as<std::uint8_t>();
  if (plan.share_from != nullptr) {
    check_cuda(cudaMemcpyAsync(out, plan.share_from->sinks.data(), 2 * side, cudaMemcpyDeviceToDevice, ctx.stream),
               "fork (sink rows)");
  } else if (w.sink_k != nullptr) {
    check_cuda(cudaMemcpyAsync(out, w.sink_k, side, cudaMemcpyHostToDevice, ctx.stream), "import (sink rows)");
    check_cuda(cudaMemcpyAsync(out + side, w.sink_v, side, cudaMemcpyHostToDevice, ctx.stream), "import (sink rows)");
  } else {
    const std::int64_t in_ring = std::min<std::int64_t>(ctx.sink_tokens, w.plan.before.end());
    const std::size_t ring_side = static_cast<std::size_t>(store.ring_capacity) * row_bytes;
    const std::size_t from_ring = static_cast<std::size_t>(in_ring) * row_bytes;
    const std::size_t from_new = side - from_ring;
    const auto* ring = store.ring.as<const std::uint8_t>();
    for (int which = 0; which < 2; ++which) {  // K, then V
      std::uint8_t* to = out + which * side;
      if (from_ring != 0) {
        check_cuda(cudaMemcpyAsync(to, ring + which * ring_side, from_ring, cudaMemcpyDeviceToDevice, ctx.stream),
                   "sink rows");
      }
      if (from_new != 0) {
        const auto* fresh = reinterpret_cast<const std::uint8_t*>(which == 0 ? k : v);
        check_cuda(cudaMemcpyAsync(to + from_ring, fresh, from_new, cudaMemcpyDeviceToDevice, ctx.stream), "sink rows");
      }
    }
  }
  ctx.owned_bytes += sinks.bytes();
  store.sinks = std::move(sinks);
}

// Installs grown tables (old entries copied on the device) and the layer's new pages.
// New page pointers are written at once, or added to `deferred` (a batch writes them all in one launch).
void install_tables(DeviceContext& ctx, CudaLayerStore& store, const LayerPlan& plan, DeviceBuffer& table, DeviceBuffer& page_list,
                    int num_blocks, std::vector<PointerWrite>* deferred) {
  if (table.bytes() != 0) {
    if (num_blocks != 0) {
      check_cuda(cudaMemcpyAsync(table.data(), store.table.data(), ctx.table_bytes(static_cast<std::size_t>(num_blocks)),
                                 cudaMemcpyDeviceToDevice, ctx.stream),
                 "block table growth");
    }
    ctx.owned_bytes += table.bytes() - store.table.bytes();
    store.table = std::move(table);
    store.table_capacity = plan.table_capacity;
  }
  const std::size_t first_new = store.pages.size();
  if (page_list.bytes() != 0) {
    if (store.page_list.bytes() != 0) {
      check_cuda(cudaMemcpyAsync(page_list.data(), store.page_list.data(),
                                 sizeof(PlacementCursor) + first_new * sizeof(std::uint8_t*), cudaMemcpyDeviceToDevice,
                                 ctx.stream),
                 "page list growth");
    } else {
      check_cuda(cudaMemsetAsync(page_list.data(), 0, sizeof(PlacementCursor), ctx.stream), "cursor initialisation");
    }
    ctx.owned_bytes += page_list.bytes() - store.page_list.bytes();
    store.page_list = std::move(page_list);
    store.page_list_capacity = plan.page_list_capacity;
  }
  if (plan.share_from != nullptr) {  // the layer is empty: the parent's pages come first
    store.pages.assign(plan.share_from->pages.begin(),
                       plan.share_from->pages.begin() + static_cast<std::ptrdiff_t>(plan.shared_pages));
    store.shared_pages = plan.shared_pages;
  }
  while (store.pages.size() < plan.pages_target) store.pages.push_back(ctx.pool.take());
  if (deferred == nullptr) {
    ctx.publish_pointers(store.pages, first_new, store.page_pointers() + first_new);
    return;
  }
  for (std::size_t p = first_new; p < store.pages.size(); ++p) deferred->push_back({store.page_pointers() + p, store.pages[p]});
}

// Imported blocks: uploaded with one copy per page (they are back to back in the image and in a
// page), their table entries written and the device cursor set after them.
template <class T>
void adopt_blocks(DeviceContext& ctx, CudaLayerStore& store, const LayerWrite<T>& w, const LayerPlan& plan) {
  std::vector<std::uint8_t*> table;
  for (std::size_t b = 0; b < w.blocks.size();) {
    std::size_t end = b + 1;
    while (end < w.blocks.size() && plan.adopted_page[end] == plan.adopted_page[b]) ++end;
    const std::size_t bytes =
        static_cast<std::size_t>(w.blocks[end - 1].data() + w.blocks[end - 1].size() - w.blocks[b].data());
    check_cuda(cudaMemcpyAsync(store.pages[plan.adopted_page[b]] + plan.adopted_offset[b], w.blocks[b].data(), bytes,
                               cudaMemcpyHostToDevice, ctx.stream),
               "import (block upload)");
    b = end;
  }
  for (std::size_t b = 0; b < w.blocks.size(); ++b) {
    table.push_back(store.pages[plan.adopted_page[b]] + plan.adopted_offset[b]);
    store.live_bytes += w.blocks[b].size();
  }
  ctx.publish_pointers(table, 0, store.table.as<std::uint8_t*>());
  check_cuda(cudaMemcpyAsync(store.cursor(), &plan.adopted_cursor, sizeof(PlacementCursor), cudaMemcpyHostToDevice,
                             ctx.stream),
             "import (cursor upload)");
  store.seen_page = plan.adopted_cursor.page;
  store.seen_offset = plan.adopted_cursor.offset;
  store.unseen.clear();
  store.live_blocks += w.blocks.size();
}

// Fork: the parent's block table entries copied on the device (in stream order, after the
// parent's placements), the cursor set to a fresh page after the shared ones, so the child never
// writes into a page it shares.
void share_blocks(DeviceContext& ctx, CudaLayerStore& store, int shared_blocks, const LayerPlan& plan) {
  if (shared_blocks > 0) {
    check_cuda(cudaMemcpyAsync(store.table.data(), plan.share_from->table.data(),
                               ctx.table_bytes(static_cast<std::size_t>(shared_blocks)), cudaMemcpyDeviceToDevice,
                               ctx.stream),
               "fork (block table copy)");
  }
  check_cuda(cudaMemcpyAsync(store.cursor(), &plan.adopted_cursor, sizeof(PlacementCursor), cudaMemcpyHostToDevice,
                             ctx.stream),
             "fork (cursor upload)");
  store.seen_page = plan.adopted_cursor.page;
  store.seen_offset = plan.adopted_cursor.offset;
  store.unseen.clear();
  store.live_blocks += static_cast<std::size_t>(shared_blocks);
}

// The encoder's parameters for `count` blocks of a write from sequence position `first_position`,
// staged in slots of `out_base` (slot_bytes apart).
template <class T>
EncodeParams<T> encode_params(const DeviceContext& ctx, const LayerWrite<T>& w, const TokenRows<T>& rows,
                              std::int64_t first_position, std::uint8_t* out_base, int count) {
  EncodeParams<T> e{};
  const CodecParams& codec = ctx.codec_of(w.layer);
  e.geometry = codec.geometry;
  e.k_max_code = codec.k_max_code;
  e.v_max_code = codec.v_max_code;
  e.median_repack = ctx.median_repack ? 1 : 0;
  e.source = rows;
  e.first_position = first_position;
  e.out_base = out_base;
  e.out_stride = ctx.slot_bytes;
  e.errors = ctx.errors_for(w.id, w.layer);
  e.num_blocks = count;
  return e;
}

// The placement of `count` staged blocks from `staging` into the layer's pages, their addresses
// written from table entry `first_entry`; takes the context's next launch number.
template <class T>
PlaceParams place_params(DeviceContext& ctx, const CudaLayerStore& store, const LayerWrite<T>& w,
                         const std::uint8_t* staging, int count, int first_entry) {
  PlaceParams place{};
  place.geometry = ctx.geometry_of(w.layer);
  place.staging = staging;
  place.staging_stride = ctx.slot_bytes;
  place.num_blocks = count;
  place.pages = store.page_pointers();
  place.page_count = static_cast<std::uint32_t>(store.pages.size());
  place.page_bytes = static_cast<std::uint32_t>(ctx.pool.page_bytes());
  place.cursor = store.cursor();
  place.table = store.table.as<std::uint8_t*>() + first_entry;
  place.progress = ctx.progress.device(store.progress_word);
  place.launch = ctx.next_launch++ & 0xFFFFFFu;
  place.errors = ctx.errors_for(w.id, w.layer);
  return place;
}

// Stages the write's full blocks, then places them tightly in the layer's pages.
template <class T>
void seal_blocks(DeviceContext& ctx, CudaLayerStore& store, const LayerWrite<T>& w, const T* k, const T* v) {
  const int block = ctx.widest.block_tokens;
  const std::int64_t total = w.plan.seal_blocks, per_round = ctx.blocks_per_round();
  const detail::TokenRows<T> rows = rows_of(ctx, w, k, v);
  int placed = w.num_blocks + static_cast<int>(w.blocks.size());
  for (std::int64_t done = 0; done < total; done += per_round) {
    const int count = static_cast<int>(std::min(per_round, total - done));
    const EncodeParams<T> params =
        encode_params(ctx, w, rows, w.plan.before.begin + done * block, ctx.staging.as<std::uint8_t>(), count);
    check_cuda(launch_encode(params, count, ctx.stream), "encode kernel launch");
    const PlaceParams place = place_params(ctx, store, w, ctx.staging.as<const std::uint8_t>(), count, placed);
    check_cuda(launch_place_blocks(place, ctx.stream), "block placement kernel launch");
    store.unseen.push_back(UnseenPlacement{place.launch, count});
    placed += count;
  }
  store.live_blocks += static_cast<std::size_t>(total);
  // Block sizes are the device's: live_bytes is brought up to date by memory_stats (layer_bytes).
}

// The tail after the write, in its ring (a new, larger one when it grows: the tokens that stay
// are copied over with the new ones).
template <class T>
TailWriteParams<T> tail_params(DeviceContext& ctx, CudaLayerStore& store, const LayerWrite<T>& w, const T* k, const T* v,
                               const DeviceBuffer& grown_ring) {
  const AppendPlan& plan = w.plan;
  TailWriteParams<T> tail{};
  tail.source = rows_of(ctx, w, k, v);
  const bool grows = grown_ring.bytes() != 0;
  T* ring = grows ? grown_ring.as<T>() : store.ring.template as<T>();
  tail.ring_k = ring;
  tail.ring_v = ring + static_cast<std::size_t>(plan.after.capacity) * ctx.row_elems;
  tail.ring_capacity = plan.after.capacity;
  tail.first = grows ? plan.after.begin : std::max(plan.after.begin, plan.before.end());
  tail.end = plan.after.end();
  tail.head_dim = ctx.widest.head_dim;
  tail.value_limit = ctx.widest.compact_params ? format::kCompactMaxAbs : kFp16Max;
  tail.errors = ctx.errors_for(w.id, w.layer);
  return tail;
}

/// After the tail kernel is queued: a grown ring replaces the old one (freed in stream order,
/// after the kernels that read it).
void adopt_ring(DeviceContext& ctx, CudaLayerStore& store, int capacity, DeviceBuffer grown_ring) {
  if (grown_ring.bytes() == 0) return;
  ctx.owned_bytes += grown_ring.bytes() - store.ring.bytes();
  store.ring = std::move(grown_ring);
  store.ring_capacity = capacity;
}

template <class T>
void write_tail(DeviceContext& ctx, CudaLayerStore& store, const LayerWrite<T>& w, const T* k, const T* v, DeviceBuffer grown_ring) {
  check_cuda(launch_tail_write(tail_params(ctx, store, w, k, v, grown_ring), ctx.stream), "tail kernel launch");
  adopt_ring(ctx, store, w.plan.after.capacity, std::move(grown_ring));
}

// A batch's new blocks in one staging round: block j of write i in slot first_slot[i] + j.
template <class T>
void batch_seal_params(DeviceContext& ctx, CudaLayerStore& store, const LayerWrite<T>& w, const T* k, const T* v,
                       std::size_t first_slot, BatchParams<T>& batch) {
  const int count = w.plan.seal_blocks;
  if (count == 0) return;
  std::uint8_t* slots = ctx.staging.as<std::uint8_t>() + first_slot * ctx.slot_bytes;
  batch.encodes.push_back(encode_params(ctx, w, rows_of(ctx, w, k, v), w.plan.before.begin, slots, count));
  const PlaceParams place =
      place_params(ctx, store, w, slots, count, w.num_blocks + static_cast<int>(w.blocks.size()));
  batch.places.push_back(place);
  batch.max_blocks = std::max(batch.max_blocks, count);
  store.unseen.push_back(UnseenPlacement{place.launch, count});
  store.live_blocks += static_cast<std::size_t>(count);
}

// Uploads the batch's parameter arrays (one copy) and queues its launches: the encoder before the
// tail writes, which may overwrite ring rows the encoder reads.
template <class T>
void launch_batch(DeviceContext& ctx, BatchParams<T>& batch) {
  const std::size_t pointers = BatchParams<T>::align(batch.pointers.size() * sizeof(PointerWrite));
  const std::size_t tails = BatchParams<T>::align(batch.tails.size() * sizeof(TailWriteParams<T>));
  const std::size_t encodes = BatchParams<T>::align(batch.encodes.size() * sizeof(EncodeParams<T>));
  const std::size_t places = BatchParams<T>::align(batch.places.size() * sizeof(PlaceParams));
  std::vector<std::uint8_t> host(pointers + tails + encodes + places);
  // An empty vector's data() may be null, which memcpy does not accept even for zero bytes.
  auto put = [&](std::size_t offset, const auto& items) {
    if (!items.empty()) std::memcpy(host.data() + offset, items.data(), items.size() * sizeof(items[0]));
  };
  put(0, batch.pointers);
  put(pointers, batch.tails);
  put(pointers + tails, batch.encodes);
  put(pointers + tails + encodes, batch.places);
  std::uint8_t* base = ctx.launch_params.as<std::uint8_t>();
  // From pageable memory: the call returns once the driver has taken the bytes.
  check_cuda(cudaMemcpyAsync(base, host.data(), host.size(), cudaMemcpyHostToDevice, ctx.stream), "batch parameters upload");
  check_cuda(launch_write_pointers(reinterpret_cast<const PointerWrite*>(base), static_cast<int>(batch.pointers.size()),
                                   ctx.stream),
             "page list kernel launch");
  std::uint8_t* device = base + pointers;
  const int n_encodes = static_cast<int>(batch.encodes.size());
  check_cuda(launch_encode_batch(reinterpret_cast<const EncodeParams<T>*>(device + tails), n_encodes, batch.max_blocks,
                                 ctx.widest, ctx.stream),
             "encode kernel launch");
  check_cuda(launch_place_batch(reinterpret_cast<const PlaceParams*>(device + tails + encodes), n_encodes,
                                batch.max_blocks, ctx.widest, ctx.stream),
             "block placement kernel launch");
  check_cuda(launch_tail_write_batch(reinterpret_cast<const TailWriteParams<T>*>(device),
                                     static_cast<int>(batch.tails.size()), batch.max_tail_elements, ctx.stream),
             "tail kernel launch");
}



}  // namespace

template <class T>
void check_values(DeviceContext& ctx, std::span<const LayerWrite<T>> writes) {
  ctx.raise_device_error();
  if (!ctx.strict) return;  // the kernels check every value and a later call reports
  check_cuda(cudaStreamSynchronize(ctx.stream), "append (strict validation)");
  ctx.raise_device_error();  // an earlier kernel's report is not this append's
  for (const LayerWrite<T>& w : writes) {
    ValidateParams<T> params{};
    params.rows = rows_of(ctx, w, w.k, w.v);
    params.n_tokens = w.plan.n_tokens;
    const CodecParams& codec = ctx.codec_of(w.layer);
    params.geometry = codec.geometry;
    params.k_max_code = codec.k_max_code;
    params.v_max_code = codec.v_max_code;
    params.errors = ctx.errors_for(w.id, w.layer);
    check_cuda(launch_validate(params, ctx.stream), "validation kernel launch");
  }
  check_cuda(cudaStreamSynchronize(ctx.stream), "append (strict validation)");
  ctx.raise_device_error(ErrorOrigin::strict_append);
}



// What a write needs, without the device error check of prepare_write.
template <class T>
std::unique_ptr<PreparedWrite> plan_writes(DeviceContext& ctx, std::span<const LayerWrite<T>> writes);

template <class T>
std::unique_ptr<PreparedWrite> prepare_write(DeviceContext& ctx, std::span<const LayerWrite<T>> writes) {
  ctx.raise_device_error();
  std::unique_ptr<PreparedWrite> prepared = plan_writes<T>(ctx, writes);
  if (!writes.empty()) static_cast<CudaPrepared<T>&>(*prepared).caller_stream = writes.front().stream;
  return prepared;
}

template <class T>
RotatedInput<T> rotate_write_input(DeviceContext& ctx, const T* k, const T* v, std::size_t rows) {
  const std::size_t vectors = rows * static_cast<std::size_t>(ctx.widest.num_heads);
  const std::size_t side = vectors * ctx.widest.head_dim;
  auto copies = std::make_shared<DeviceBuffer>(((ctx.rotate_k ? side : 0) + (ctx.rotate_v ? side : 0)) * sizeof(T), ctx.stream);
  RotatedInput<T> in{k, v, copies};
  T* next = copies->as<T>();
  if (ctx.rotate_k) {
    check_cuda(launch_rotate(RotateParams<T, T>{k, next, vectors, ctx.widest.head_dim, 1}, ctx.stream),
               "K rotation kernel launch");
    in.k = next;
    next += side;
  }
  if (ctx.rotate_v) {
    check_cuda(launch_rotate(RotateParams<T, T>{v, next, vectors, ctx.widest.head_dim, 1}, ctx.stream),
               "V rotation kernel launch");
    in.v = next;
  }
  return in;
}

template <class T>
void* caller_stream(const PreparedWrite& prepared) {
  return static_cast<const CudaPrepared<T>&>(prepared).caller_stream;
}

template <class T>
std::size_t worst_case_growth(DeviceContext& ctx, std::span<const GrowthQuery> queries,
                              std::deque<CudaLayerStore>& fresh) {
  // The write path's own plan for appends of device tokens (it reads no values): the bound is
  // what the budget checks of those appends will count. Pages, tables and rings for all layers
  // together (they share the pool); scratch (staging, parameter arrays) for the largest one-layer
  // call, since an engine appends layer by layer and scratch is reused.
  std::vector<LayerWrite<T>> writes(queries.size());
  std::size_t next_fresh = 0;
  for (std::size_t i = 0; i < queries.size(); ++i) {
    LayerStore* store = const_cast<LayerStore*>(queries[i].store);
    if (store == nullptr) store = &fresh[next_fresh++];
    writes[i].store = store;
    writes[i].num_blocks = queries[i].num_blocks;
    writes[i].plan = queries[i].plan;
    writes[i].layer = queries[i].layer;
  }
  if (writes.empty()) return 0;
  const auto joint = plan_writes<T>(ctx, writes);
  std::size_t scratch = 0;
  std::vector<LayerWrite<T>> one_layer;
  for (std::size_t first = 0; first < writes.size();) {
    std::size_t end = first;
    while (end < writes.size() && writes[end].layer == writes[first].layer) ++end;
    one_layer.assign(writes.begin() + static_cast<std::ptrdiff_t>(first), writes.begin() + static_cast<std::ptrdiff_t>(end));
    const auto call = plan_writes<T>(ctx, one_layer);
    scratch = std::max(scratch, static_cast<const CudaPrepared<T>&>(*call).scratch_growth());
    first = end;
  }
  return static_cast<const CudaPrepared<T>&>(*joint).layer_growth() + scratch;
}

template <class T>
std::unique_ptr<PreparedWrite> plan_writes(DeviceContext& ctx, std::span<const LayerWrite<T>> writes) {
  auto prepared = std::make_unique<CudaPrepared<T>>();
  prepared->ctx = &ctx;
  prepared->writes.assign(writes.begin(), writes.end());
  const std::uint32_t page_bytes = static_cast<std::uint32_t>(ctx.pool.page_bytes());
  std::size_t sealed_max = 0;
  for (const LayerWrite<T>& w : writes) {
    auto& store = store_of(w.store);
    LayerPlan plan;
    ctx.refresh_placement(store);  // learns what completed; changes nothing the caller can see
    std::int64_t new_blocks = w.plan.seal_blocks;
    std::uint32_t seen_page = store.seen_page, seen_offset = store.seen_offset;
    std::int64_t unseen = 0;
    for (const UnseenPlacement& u : store.unseen) unseen += u.blocks;
    if (w.share_from != nullptr) {
      // Fork (the layer is empty): the parent's placements must be complete to know the pages
      // its blocks lie in.
      auto& parent = store_of(const_cast<LayerStore*>(w.share_from));
      check_cuda(cudaStreamSynchronize(ctx.stream), "fork");
      ctx.refresh_placement(parent);
      PACKKV_REQUIRE(parent.unseen.empty(), "fork: the parent's block placements did not complete (device state corrupt)");
      plan.share_from = &parent;
      plan.shared_pages = parent.seen_offset == 0 ? parent.seen_page : parent.seen_page + 1;
      plan.adopted_cursor = PlacementCursor{static_cast<std::uint32_t>(plan.shared_pages), 0};
      seen_page = plan.adopted_cursor.page;
      seen_offset = 0;
      unseen = 0;
    }
    if (!w.blocks.empty()) {
      // Imported blocks (the layer is empty): placed here with the device's rule.
      PlacementCursor cursor{};
      for (const auto& b : w.blocks) {
        const auto size = static_cast<std::uint32_t>(b.size());
        if (cursor.offset + size > page_bytes) {
          ++cursor.page;
          cursor.offset = 0;
        }
        plan.adopted_page.push_back(cursor.page);
        plan.adopted_offset.push_back(cursor.offset);
        cursor.offset += size;
      }
      plan.adopted_cursor = cursor;
      seen_page = cursor.page;
      seen_offset = cursor.offset;
      unseen = 0;
    }
    const std::size_t blocks_after = static_cast<std::size_t>(w.num_blocks) + static_cast<std::size_t>(w.shared_blocks) +
                                     w.blocks.size() + static_cast<std::size_t>(w.plan.seal_blocks);
    // A fork that seals nothing takes no page of its own until its first block.
    plan.pages_target = plan.share_from != nullptr && new_blocks == 0
                            ? plan.shared_pages
                            : ctx.pages_bound(blocks_after, seen_page, seen_offset, unseen + new_blocks);
    const std::size_t have = store.pages.size() + plan.shared_pages;
    if (plan.pages_target > have) {
      prepared->pages_wanted += plan.pages_target - have;
    } else {
      prepared->pages_returned += have - plan.pages_target;
    }
    plan.table_capacity = store.table_capacity;
    while (plan.table_capacity < blocks_after) {
      plan.table_capacity = std::max<std::size_t>(64, 2 * plan.table_capacity);
    }
    plan.page_list_capacity = store.page_list_capacity;
    while (plan.page_list_capacity < plan.pages_target) {
      plan.page_list_capacity = std::max<std::size_t>(16, 2 * plan.page_list_capacity);
    }
    plan.ring_grows = w.plan.after.capacity > store.ring_capacity;
    plan.gains_sinks = ctx.sink_tokens > 0 && store.sinks.bytes() == 0 && blocks_after > 0;
    prepared->growth_bytes += ctx.table_bytes(plan.table_capacity) - ctx.table_bytes(store.table_capacity) +
                              ctx.page_list_bytes(plan.page_list_capacity) - ctx.page_list_bytes(store.page_list_capacity) +
                              (plan.ring_grows ? ctx.ring_bytes(w.plan.after.capacity) - ctx.ring_bytes(store.ring_capacity) : 0) +
                              (plan.gains_sinks ? ctx.sink_bytes() : 0);
    if (w.tokens_on_host && w.plan.n_tokens > 0) {
      plan.upload_offset = prepared->upload_bytes;
      prepared->upload_bytes += format::align_up(
          static_cast<std::uint32_t>(2 * static_cast<std::size_t>(w.plan.n_tokens) * ctx.row_elems * sizeof(T)), 256);
    }
    sealed_max = std::max(sealed_max, static_cast<std::size_t>(w.plan.seal_blocks));
    prepared->plans.push_back(std::move(plan));
  }
  std::size_t sealed_total = 0, with_host_tokens = 0;
  for (const LayerWrite<T>& w : writes) {
    sealed_total += static_cast<std::size_t>(w.plan.seal_blocks);
    with_host_tokens += w.tokens_on_host || !w.blocks.empty() || w.share_from != nullptr ? 1 : 0;
  }
  // Batched: several device-token appends (a decode step, a batch of prefill chunks) whose new
  // blocks fit one staging round. Imports keep the per-layer path (they wait for their uploads).
  prepared->batched = writes.size() > 1 && with_host_tokens == 0 &&
                      sealed_total <= static_cast<std::size_t>(ctx.blocks_per_round());
  const std::size_t slots = prepared->batched ? sealed_total
                                              : static_cast<std::size_t>(std::min<std::int64_t>(
                                                    static_cast<std::int64_t>(sealed_max), ctx.blocks_per_round()));
  prepared->staging_bytes = slots * ctx.slot_bytes;
  if (prepared->batched) {
    std::size_t new_pages = 0;
    for (std::size_t i = 0; i < writes.size(); ++i) {
      const std::size_t have = store_of(writes[i].store).pages.size();
      new_pages += prepared->plans[i].pages_target > have ? prepared->plans[i].pages_target - have : 0;
    }
    prepared->params_bytes = BatchParams<T>::bytes_for(writes.size(), new_pages);
  }
  return prepared;
}



template <class T>
void commit_write(DeviceContext& ctx, PreparedWrite& base) {
  auto& prepared = static_cast<CudaPrepared<T>&>(base);
  // Acquire everything new first (locals: a failure frees them and changes nothing).
  const std::size_t pool_free_after = ctx.pool.free_pages() + prepared.pages_returned;
  const std::size_t fresh_pages = prepared.pages_wanted > pool_free_after ? prepared.pages_wanted - pool_free_after : 0;
  std::vector<DeviceBuffer> pages = ctx.pool.allocate(fresh_pages, ctx.stream);
  struct Grown {
    DeviceBuffer table, page_list, ring, sinks;
    std::size_t progress_word = kNoWord;
  };
  std::vector<Grown> grown(prepared.writes.size());
  DeviceBuffer staging, upload, params;
  try {
    for (std::size_t i = 0; i < prepared.writes.size(); ++i) {
      const LayerWrite<T>& w = prepared.writes[i];
      const LayerPlan& plan = prepared.plans[i];
      const auto& store = store_of(w.store);
      if (plan.table_capacity != store.table_capacity) grown[i].table = DeviceBuffer(ctx.table_bytes(plan.table_capacity), ctx.stream);
      if (plan.page_list_capacity != store.page_list_capacity) {
        grown[i].page_list = DeviceBuffer(ctx.page_list_bytes(plan.page_list_capacity), ctx.stream);
      }
      if (plan.ring_grows) grown[i].ring = DeviceBuffer(ctx.ring_bytes(w.plan.after.capacity), ctx.stream);
      if (plan.gains_sinks) grown[i].sinks = DeviceBuffer(ctx.sink_bytes(), ctx.stream);
      if (store.progress_word == kNoWord && plan.pages_target > 0) grown[i].progress_word = ctx.progress.take();
    }
    if (prepared.staging_bytes > ctx.staging.bytes()) staging = DeviceBuffer(prepared.staging_bytes, ctx.stream);
    if (prepared.upload_bytes > 0) upload = DeviceBuffer(prepared.upload_bytes, ctx.stream);
    if (prepared.params_bytes > ctx.launch_params.bytes()) params = DeviceBuffer(prepared.params_bytes, ctx.stream);
  } catch (...) {
    for (Grown& g : grown) {
      if (g.progress_word != kNoWord) ctx.progress.give(g.progress_word);
    }
    throw;
  }
  // A fork's references to the parent's pages: last, undone on failure.
  std::vector<std::uint8_t*> retained;
  try {
    std::size_t shared = 0;
    for (const LayerPlan& plan : prepared.plans) shared += plan.shared_pages;
    retained.reserve(shared);
    for (const LayerPlan& plan : prepared.plans) {
      for (std::size_t p = 0; p < plan.shared_pages; ++p) {
        ++ctx.page_extra_refs[plan.share_from->pages[p]];
        retained.push_back(plan.share_from->pages[p]);
      }
    }
  } catch (const std::bad_alloc&) {
    for (std::uint8_t* page : retained) ctx.release_page(page);
    for (Grown& g : grown) {
      if (g.progress_word != kNoWord) ctx.progress.give(g.progress_word);
    }
    throw_out_of_memory("the reference counts of shared pages");
  }
  // Apply.
  ctx.pool.add(std::move(pages));
  if (staging.bytes() != 0) ctx.staging = std::move(staging);
  if (params.bytes() != 0) ctx.launch_params = std::move(params);
  bool transfers = false;
  BatchParams<T> batch;
  for (std::size_t i = 0; i < prepared.writes.size(); ++i) {
    const LayerWrite<T>& w = prepared.writes[i];
    auto& store = store_of(w.store);
    if (grown[i].progress_word != kNoWord) store.progress_word = grown[i].progress_word;
    ctx.give_back_pages(store, prepared.plans[i].pages_target);
  }
  for (std::size_t i = 0; i < prepared.writes.size(); ++i) {
    const LayerWrite<T>& w = prepared.writes[i];
    const LayerPlan& plan = prepared.plans[i];
    auto& store = store_of(w.store);
    install_tables(ctx, store, plan, grown[i].table, grown[i].page_list, w.num_blocks,
                   prepared.batched ? &batch.pointers : nullptr);
    const T* k = w.k;
    const T* v = w.v;
    if (w.tokens_on_host && w.plan.n_tokens > 0) {
      const std::size_t n = static_cast<std::size_t>(w.plan.n_tokens) * ctx.row_elems;
      T* dk = reinterpret_cast<T*>(upload.as<std::uint8_t>() + plan.upload_offset);
      T* dv = dk + n;
      check_cuda(cudaMemcpyAsync(dk, w.k, n * sizeof(T), cudaMemcpyHostToDevice, ctx.stream), "token upload");
      check_cuda(cudaMemcpyAsync(dv, w.v, n * sizeof(T), cudaMemcpyHostToDevice, ctx.stream), "token upload");
      k = dk;
      v = dv;
      transfers = true;
    }
    if (!w.blocks.empty()) {
      adopt_blocks(ctx, store, w, plan);
      transfers = true;
    }
    if (plan.share_from != nullptr) share_blocks(ctx, store, w.shared_blocks, plan);
    if (plan.gains_sinks) {  // before the tail writes, which may reuse the ring rows of the sinks
      fill_sinks<T>(ctx, store, w, plan, k, v, grown[i].sinks);
      transfers = transfers || w.sink_k != nullptr;
    }
    if (prepared.batched) continue;  // queued below, for all writes at once
    seal_blocks<T>(ctx, store, w, k, v);
    write_tail<T>(ctx, store, w, k, v, std::move(grown[i].ring));
  }
  if (prepared.batched) {
    std::size_t slot = 0;
    for (std::size_t i = 0; i < prepared.writes.size(); ++i) {
      const LayerWrite<T>& w = prepared.writes[i];
      auto& store = store_of(w.store);
      batch_seal_params<T>(ctx, store, w, w.k, w.v, slot, batch);
      slot += static_cast<std::size_t>(w.plan.seal_blocks);
      const TailWriteParams<T> tail = tail_params(ctx, store, w, w.k, w.v, grown[i].ring);
      batch.max_tail_elements = std::max<std::int64_t>(batch.max_tail_elements, (tail.end - tail.first) * tail.source.row_elems);
      batch.tails.push_back(tail);
    }
    launch_batch(ctx, batch);
    for (std::size_t i = 0; i < prepared.writes.size(); ++i) {
      adopt_ring(ctx, store_of(prepared.writes[i].store), prepared.writes[i].plan.after.capacity, std::move(grown[i].ring));
    }
  }
  // Imports hand the device host memory that lives only as long as the call: wait for it.
  if (transfers) check_cuda(cudaStreamSynchronize(ctx.stream), "import (uploads)");
}



#define PACKKV_INSTANTIATE_WRITES(T)                                                                         \
  template void check_values<T>(DeviceContext&, std::span<const LayerWrite<T>>);                            \
  template std::unique_ptr<PreparedWrite> prepare_write<T>(DeviceContext&, std::span<const LayerWrite<T>>); \
  template std::size_t worst_case_growth<T>(DeviceContext&, std::span<const GrowthQuery>,                   \
                                            std::deque<CudaLayerStore>&);                                     \
  template void commit_write<T>(DeviceContext&, PreparedWrite&);                                            \
  template void* caller_stream<T>(const PreparedWrite&);                                                    \
  template RotatedInput<T> rotate_write_input<T>(DeviceContext&, const T*, const T*, std::size_t);
PACKKV_INSTANTIATE_WRITES(float)
PACKKV_INSTANTIATE_WRITES(fp16_t)
PACKKV_INSTANTIATE_WRITES(bf16_t)
#undef PACKKV_INSTANTIATE_WRITES

}  // namespace packkv::detail::cuda

// The CPU backend: packed blocks in a host SlotPool, tail rings in host memory, and the readers of
// attention.cpp. The host core (core/cache_core.hpp) drives it.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <unordered_map>
#include <unordered_set>

#include <fmt/format.h>

#include "core/backend.hpp"
#include "core/value_checks.hpp"
#include "cpu/attention.hpp"
#include "cpu_kernels/kernels.hpp"
#include "cpu/layer_store.hpp"

namespace packkv::detail::cpu {

namespace {

using format::Side;

template <class T>
class CpuBackend;

/// An encoded write: its blocks in staging (or in the image), ready to be copied into slots.
template <class T>
class CpuPrepared final : public PreparedWrite {
 public:
  struct Block {
    const std::uint8_t* bytes;  ///< staging or the imported image
    std::uint32_t size;
    BlockBytes parts;
  };
  struct Layer {
    LayerWrite<T> write;
    std::size_t first_block = 0;  ///< into blocks
    std::size_t block_count = 0;  ///< adopted + sealed
    std::size_t table_capacity = 0;  ///< the block table's capacity after the commit
    std::vector<SlotRef> shared;     ///< a parent's blocks the layer will share (fork)
    BlockBytes shared_parts;
  };

  std::size_t resident_after() const override;
  std::optional<std::size_t> resident_after_reclaim() const override;

  const CpuBackend<T>* backend = nullptr;
  std::vector<Layer> layers;
  std::vector<Block> blocks;
  std::vector<std::uint32_t> sizes;  ///< of blocks, for the pool
  std::vector<std::uint8_t> staging;  ///< encoded blocks, max_block_bytes apart
  std::size_t growth_bytes = 0;       ///< tail rings and block tables that grow
};

/// The smallest block of any layer (the narrowest codes bound it).
std::uint32_t smallest_block_bytes(std::span<const CodecParams> codecs) {
  std::uint32_t least = codecs.front().geometry.min_block_bytes();
  for (const CodecParams& c : codecs) least = std::min(least, c.geometry.min_block_bytes());
  return least;
}

template <class T>
class CpuBackend final : public Backend<T> {
 public:
  CpuBackend(const CacheConfig& config, std::span<const CodecParams> layer_codecs)
      : shape_(layer_codecs.front().geometry),
        max_block_bytes_(widest_geometry(layer_codecs).max_block_bytes()),
        min_block_bytes_(smallest_block_bytes(layer_codecs)),
        pool_(max_block_bytes_),
        row_(static_cast<std::size_t>(config.num_kv_heads) * config.head_dim),
        sinks_(config.sink_tokens),
        read_{{layer_codecs.begin(), layer_codecs.end()}, config.num_q_heads, config.num_threads > 0 ? config.num_threads : omp_get_max_threads(),
              config.rotate_k, config.rotate_v} {}

  std::unique_ptr<LayerStore> new_layer_store() override {
    auto store = std::make_unique<CpuLayerStore<T>>(this, [](void* owner, CpuLayerStore<T>* dying) {
      static_cast<CpuBackend*>(owner)->forget(dying);
    });
    stores_.insert(store.get());
    return store;
  }
  std::size_t layer_store_bytes() const override { return sizeof(CpuLayerStore<T>); }

  void clear(LayerStore& base) override {
    auto& store = static_cast<CpuLayerStore<T>&>(base);
    for (const SlotRef& ref : store.blocks) pool_.release(ref);
    table_bytes_ -= store.blocks.capacity() * sizeof(SlotRef);
    ring_bytes_ -= ring_bytes(store.ring_capacity);
    std::vector<SlotRef>().swap(store.blocks);  // releases the table's memory too
    store.block_bytes = {};
    store.ring_k.reset();
    store.ring_v.reset();
    store.ring_capacity = 0;
    if (store.sink_k) sink_bytes_ -= sink_bytes();
    store.sink_k.reset();
    store.sink_v.reset();
  }

  /// A store is being destroyed: its memory goes back and it leaves the registry.
  void forget(CpuLayerStore<T>* store) {
    clear(*store);
    stores_.erase(store);
  }

  // ---- writes ----

  RotatedInput<T> rotate_input(const T* k, const T* v, std::size_t rows, void*) override {
    const std::size_t vectors = rows * static_cast<std::size_t>(shape_.num_heads);
    const int dim = shape_.head_dim;
    auto copies = std::make_shared<std::vector<T>>();
    try {
      copies->resize((read_.rotate_k ? vectors * dim : 0) + (read_.rotate_v ? vectors * dim : 0));
    } catch (const std::bad_alloc&) {
      throw_out_of_memory(fmt::format("rotated copies of {} tokens", rows));
    }
    RotatedInput<T> in{k, v, copies};
    T* next = copies->data();
    if (read_.rotate_k) {
      rotate_rows(k, next, vectors, dim, true, read_.threads);
      in.k = next;
      next += vectors * dim;
    }
    if (read_.rotate_v) {
      rotate_rows(v, next, vectors, dim, true, read_.threads);
      in.v = next;
    }
    return in;
  }

  void check_values(std::span<const LayerWrite<T>> writes) override {
    for (const LayerWrite<T>& w : writes) {
      check_append_values(read_.codec(w.layer), rows_of(w), w.plan, fmt::format("append to sequence {} layer {}", w.id, w.layer));
    }
  }

  std::unique_ptr<PreparedWrite> prepare(std::span<const LayerWrite<T>> writes) override {
    auto prepared = std::make_unique<CpuPrepared<T>>();
    prepared->backend = this;
    const std::uint32_t max_bytes = max_block_bytes_;
    const int block = shape_.block_tokens;
    std::size_t sealed = 0;
    for (const LayerWrite<T>& w : writes) sealed += static_cast<std::size_t>(w.plan.seal_blocks);
    try {
      prepared->staging.resize(sealed * max_bytes);
    } catch (const std::bad_alloc&) {
      throw_out_of_memory(fmt::format("staging for {} new blocks", sealed));
    }
    // Lay out every block of the write: per layer, the adopted ones, then the sealed ones.
    struct Job {
      const LayerWrite<T>* write;
      int index;  ///< sealed block of the write
      std::size_t block;
      std::uint8_t* out;
    };
    std::vector<Job> jobs;
    jobs.reserve(sealed);
    std::size_t staged = 0;
    for (const LayerWrite<T>& w : writes) {
      const auto& store = static_cast<const CpuLayerStore<T>&>(*w.store);
      typename CpuPrepared<T>::Layer layer;
      layer.write = w;
      layer.first_block = prepared->blocks.size();
      for (const auto& bytes : w.blocks) {
        prepared->blocks.push_back({bytes.data(), static_cast<std::uint32_t>(bytes.size()),
                                    block_bytes_breakdown(read_.codec(w.layer), bytes.data())});
      }
      for (int b = 0; b < w.plan.seal_blocks; ++b) {
        std::uint8_t* out = prepared->staging.data() + staged++ * max_bytes;
        jobs.push_back({&w, b, prepared->blocks.size(), out});
        prepared->blocks.push_back({out, 0, {}});
      }
      layer.block_count = prepared->blocks.size() - layer.first_block;
      if (w.share_from != nullptr) {
        const auto& parent = static_cast<const CpuLayerStore<T>&>(*w.share_from);
        try {
          layer.shared = parent.blocks;
        } catch (const std::bad_alloc&) {
          throw_out_of_memory(fmt::format("fork into sequence {}: a block table", w.id));
        }
        layer.shared_parts = parent.block_bytes;
      }
      const std::size_t needed = store.blocks.size() + layer.shared.size() + layer.block_count;
      layer.table_capacity = store.blocks.capacity();
      if (needed > layer.table_capacity) {
        layer.table_capacity = std::max(needed, 2 * layer.table_capacity);
        prepared->growth_bytes += (layer.table_capacity - store.blocks.capacity()) * sizeof(SlotRef);
      }
      prepared->growth_bytes += ring_bytes(w.plan.after.capacity) - ring_bytes(w.plan.before.capacity);
      if (gains_sinks(w)) prepared->growth_bytes += sink_bytes();
      prepared->layers.push_back(std::move(layer));
    }

    // Encode every sealed block into staging, in parallel; nothing is committed yet.
    std::vector<std::string> failures(jobs.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(read_.threads) if (jobs.size() > 1)
    for (std::size_t j = 0; j < jobs.size(); ++j) {
      const Job& job = jobs[j];
      try {
        thread_local EncodeScratch scratch;
        thread_local std::vector<T> gathered_k, gathered_v;
        const TokenRows<T> rows = rows_of(*job.write);
        const std::int64_t first = job.write->plan.before.begin + static_cast<std::int64_t>(job.index) * block;
        const T* k_rows;
        const T* v_rows;
        if (first >= rows.tail.end()) {  // entirely in the new tokens: encode in place
          k_rows = rows.row(Side::k, first);
          v_rows = rows.row(Side::v, first);
        } else {  // reaches into the tail: gather the block's rows
          gathered_k.resize(static_cast<std::size_t>(block) * row_);
          gathered_v.resize(static_cast<std::size_t>(block) * row_);
          for (int t = 0; t < block; ++t) {
            std::memcpy(gathered_k.data() + t * row_, rows.row(Side::k, first + t), row_ * sizeof(T));
            std::memcpy(gathered_v.data() + t * row_, rows.row(Side::v, first + t), row_ * sizeof(T));
          }
          k_rows = gathered_k.data();
          v_rows = gathered_v.data();
        }
        auto& target = prepared->blocks[job.block];
        target.size = encode_block(read_.codec(job.write->layer), k_rows, v_rows, row_, job.out, scratch, &target.parts);
      } catch (const std::exception& e) {
        failures[j] = e.what();
      }
    }
    for (std::size_t j = 0; j < jobs.size(); ++j) {
      PACKKV_REQUIRE(failures[j].empty(), fmt::format("append to sequence {} layer {}: block {} of this call: {}",
                                                      jobs[j].write->id, jobs[j].write->layer, jobs[j].index,
                                                      failures[j]));
    }
    prepared->sizes.reserve(prepared->blocks.size());
    for (const auto& b : prepared->blocks) prepared->sizes.push_back(b.size);
    return prepared;
  }

  void commit(PreparedWrite& base) override {
    auto& prepared = static_cast<CpuPrepared<T>&>(base);
    // Acquire: new rings and tables (locals), then the slots (all or nothing).
    struct Grown {
      std::unique_ptr<T[]> ring_k, ring_v, sink_k, sink_v;
      std::vector<SlotRef> table;
    };
    std::vector<Grown> grown(prepared.layers.size());
    try {
      for (std::size_t i = 0; i < prepared.layers.size(); ++i) {
        const auto& layer = prepared.layers[i];
        const auto& store = static_cast<const CpuLayerStore<T>&>(*layer.write.store);
        if (layer.write.plan.ring_grows()) {
          const std::size_t n = static_cast<std::size_t>(layer.write.plan.after.capacity) * row_;
          grown[i].ring_k.reset(new T[n]);
          grown[i].ring_v.reset(new T[n]);
        }
        if (layer.table_capacity > store.blocks.capacity()) {
          grown[i].table.reserve(layer.table_capacity);
          grown[i].table = store.blocks;
        }
        if (gains_sinks(layer.write)) {
          grown[i].sink_k.reset(new T[static_cast<std::size_t>(sinks_) * row_]);
          grown[i].sink_v.reset(new T[static_cast<std::size_t>(sinks_) * row_]);
        }
      }
    } catch (const std::bad_alloc&) {
      throw_out_of_memory("tail rings, sink rows and block tables");
    }
    std::size_t retained = 0;  // layers whose shared blocks have their reference
    std::vector<SlotRef> slots;
    try {
      for (; retained < prepared.layers.size(); ++retained) pool_.retain(prepared.layers[retained].shared);
      slots = pool_.allocate(prepared.sizes);
    } catch (...) {
      for (std::size_t i = 0; i < retained; ++i) {
        for (const SlotRef& ref : prepared.layers[i].shared) pool_.release(ref);
      }
      throw;
    }

    // Apply: nothing below can fail.
    for (std::size_t i = 0; i < prepared.layers.size(); ++i) {
      const auto& layer = prepared.layers[i];
      auto& store = static_cast<CpuLayerStore<T>&>(*layer.write.store);
      if (layer.table_capacity > store.blocks.capacity()) {
        table_bytes_ += (layer.table_capacity - store.blocks.capacity()) * sizeof(SlotRef);
        grown[i].table.reserve(layer.table_capacity);  // no-op: already that large
        store.blocks.swap(grown[i].table);
      }
      store.blocks.insert(store.blocks.end(), layer.shared.begin(), layer.shared.end());
      store.block_bytes += layer.shared_parts;
      for (std::size_t b = layer.first_block; b < layer.first_block + layer.block_count; ++b) {
        const auto& block = prepared.blocks[b];
        std::memcpy(slots[b].data, block.bytes, block.size);
        store.blocks.push_back(slots[b]);
        store.block_bytes += block.parts;
      }
      if (grown[i].sink_k) {  // before write_tail: the sinks may still be in the ring
        fill_sinks(layer.write, grown[i].sink_k.get(), grown[i].sink_v.get());
        store.sink_k = std::move(grown[i].sink_k);
        store.sink_v = std::move(grown[i].sink_v);
        sink_bytes_ += sink_bytes();
      }
      write_tail(store, layer.write, std::move(grown[i].ring_k), std::move(grown[i].ring_v));
    }
  }

  // ---- memory ----

  std::size_t resident_bytes() const override {
    return pool_.reserved_bytes() + ring_bytes_ + sink_bytes_ + table_bytes_;
  }
  std::size_t resident_without_pool() const { return ring_bytes_ + sink_bytes_ + table_bytes_; }
  const SlotPool& pool() const { return pool_; }

  void reclaim() override {
    // Every table entry that names a slot (several when forks share the block).
    std::unordered_multimap<std::uint64_t, SlotRef*> owners;
    auto key = [](std::uint32_t page, std::uint32_t slot) { return (std::uint64_t{page} << 32) | slot; };
    try {
      for (CpuLayerStore<T>* store : stores_) {
        for (SlotRef& ref : store->blocks) owners.emplace(key(ref.page, ref.slot), &ref);
      }
    } catch (const std::bad_alloc&) {
      return;  // reclaiming is an optimisation: without memory for its bookkeeping it does nothing
    }
    // Once blocks move nothing may fail: the owners' nodes are re-keyed, never allocated.
    pool_.compact([&](std::uint32_t page, std::uint32_t slot, const SlotRef& to) {
      const std::uint64_t from = key(page, slot);
      while (true) {
        auto node = owners.extract(from);
        if (node.empty()) break;
        SlotRef* ref = node.mapped();
        ref->data = to.data;
        ref->page = to.page;
        ref->slot = to.slot;
        node.key() = key(to.page, to.slot);
        owners.insert(std::move(node));
      }
    });
  }

  PoolStats pool_stats() const override { return pool_.stats(); }
  std::size_t scratch_bytes() const override { return 0; }

  std::size_t worst_case_growth(std::span<const GrowthQuery> queries) const override {
    std::size_t blocks = 0, growth = 0;
    for (const GrowthQuery& q : queries) {
      blocks += static_cast<std::size_t>(q.plan.seal_blocks);
      const std::size_t capacity = q.store ? static_cast<const CpuLayerStore<T>&>(*q.store).blocks.capacity() : 0;
      const std::size_t needed = static_cast<std::size_t>(q.num_blocks + q.plan.seal_blocks);
      if (needed > capacity) growth += (std::max(needed, 2 * capacity) - capacity) * sizeof(SlotRef);
      if (q.plan.ring_grows()) growth += ring_bytes(q.plan.after.capacity) - ring_bytes(q.plan.before.capacity);
      const bool has_sinks = q.store && static_cast<const CpuLayerStore<T>&>(*q.store).sink_k;
      if (sinks_ > 0 && q.num_blocks == 0 && q.plan.seal_blocks > 0 && !has_sinks) growth += sink_bytes();
    }
    return growth + pool_.worst_case_extra_bytes(blocks, min_block_bytes_, max_block_bytes_);
  }
  std::size_t reclaimable_bytes() const override {
    const std::size_t after = pool_.reserved_after_compaction({});
    return after < pool_.reserved_bytes() ? pool_.reserved_bytes() - after : 0;
  }

  // ---- reads ----

  void attention(std::span<const LayerRead> batch, const T* q, T* out, float* lse, float scale, void*) const override {
    std::size_t queries = 0;
    for (const LayerRead& l : batch) queries += static_cast<std::size_t>(l.queries);
    check_finite(q, queries * static_cast<std::size_t>(read_.num_q_heads) * shape_.head_dim, "attention: query");
    causal_attention<T>(read_, batch, q, out, lse, scale);
  }
  void scores(std::span<const LayerRead> batch, const T* q, float* out, void*) const override {
    const std::size_t vector = static_cast<std::size_t>(read_.num_q_heads) * shape_.head_dim;
    check_finite(q, batch.size() * vector, "scores: query");
    for (const LayerRead& layer : batch) {
      cpu::scores<T>(read_, layer, q, out);
      q += vector;
      out += static_cast<std::size_t>(read_.num_q_heads) * static_cast<std::size_t>(layer.length);
    }
  }
  void attn_v(std::span<const LayerRead> batch, const float* weights, float* out, void*) const override {
    std::size_t values = 0;
    for (const LayerRead& layer : batch) values += static_cast<std::size_t>(read_.num_q_heads) * layer.length;
    check_finite(weights, values, "attn_v: weights");
    for (const LayerRead& layer : batch) {
      cpu::attn_v<T>(read_, layer, weights, out);
      weights += static_cast<std::size_t>(read_.num_q_heads) * static_cast<std::size_t>(layer.length);
      out += static_cast<std::size_t>(read_.num_q_heads) * shape_.head_dim;
    }
  }
  void read_back(const LayerRead& layer, float* k, float* v) const override { cpu::read_back<T>(read_, layer, k, v); }

  void layer_bytes(std::span<const LayerRead> layers, std::span<LayerBytes> out) const override {
    std::unordered_set<const std::uint8_t*> counted;  // shared blocks met so far
    for (std::size_t i = 0; i < layers.size(); ++i) {
      const CpuLayerStore<T>& store = store_of<T>(layers[i]);
      out[i].blocks = store.block_bytes;
      out[i].tables = store.blocks.capacity() * sizeof(SlotRef);
      out[i].tail = ring_bytes(store.ring_capacity);
      out[i].sinks = store.sink_k ? sink_bytes() : 0;
      out[i].shared = 0;
      for (const SlotRef& ref : store.blocks) {
        if (!pool_.shared(ref) || counted.insert(ref.data).second) continue;
        const BlockBytes parts = block_bytes_breakdown(read_.codec(layers[i].layer), ref.data);
        out[i].blocks -= parts;
        out[i].shared += parts.total();
      }
    }
  }

  void download(const LayerRead& layer, std::vector<std::uint32_t>& sizes, std::vector<std::uint8_t>& blocks, T* tail_k,
                T* tail_v, T* sink_k, T* sink_v) const override {
    const CpuLayerStore<T>& store = store_of<T>(layer);
    sizes.clear();
    blocks.clear();
    for (const SlotRef& ref : store.blocks) {
      sizes.push_back(ref.bytes);
      blocks.insert(blocks.end(), ref.data, ref.data + ref.bytes);
    }
    download_tail(layer, tail_k, tail_v);
    if (layer.sinks > 0) {
      const std::size_t n = static_cast<std::size_t>(layer.sinks) * row_;
      std::memcpy(sink_k, store.sink_k.get(), n * sizeof(T));
      std::memcpy(sink_v, store.sink_v.get(), n * sizeof(T));
    }
  }

  void download_tail(const LayerRead& layer, T* tail_k, T* tail_v) const override {
    const CpuLayerStore<T>& store = store_of<T>(layer);
    for_each_tail_run(layer.tail, [&](int first, int row, int count) {
      std::memcpy(tail_k + first * row_, store.ring_k.get() + row * row_, count * row_ * sizeof(T));
      std::memcpy(tail_v + first * row_, store.ring_v.get() + row * row_, count * row_ * sizeof(T));
    });
  }

  void set_stream(void*) override {}
  std::optional<std::string> poll_device_error() override { return std::nullopt; }

 private:
  std::size_t ring_bytes(int capacity) const { return static_cast<std::size_t>(capacity) * row_ * 2 * sizeof(T); }
  std::size_t sink_bytes() const { return static_cast<std::size_t>(sinks_) * row_ * 2 * sizeof(T); }

  /// Whether a write leaves the layer holding blocks but no sink rows yet: it brings them.
  bool gains_sinks(const LayerWrite<T>& w) const {
    const auto& store = static_cast<const CpuLayerStore<T>&>(*w.store);
    const std::size_t blocks = static_cast<std::size_t>(w.num_blocks + w.shared_blocks + w.plan.seal_blocks) + w.blocks.size();
    return sinks_ > 0 && !store.sink_k && blocks > 0;
  }

  /// The sink rows a write brings: the parent's (fork), the adopted blocks' (import, truncate),
  /// or the first tokens of the layer's first sealed block (in the ring or the new tokens).
  void fill_sinks(const LayerWrite<T>& w, T* sink_k, T* sink_v) const {
    const std::size_t n = static_cast<std::size_t>(sinks_) * row_;
    if (w.share_from != nullptr) {
      const auto& parent = static_cast<const CpuLayerStore<T>&>(*w.share_from);
      std::memcpy(sink_k, parent.sink_k.get(), n * sizeof(T));
      std::memcpy(sink_v, parent.sink_v.get(), n * sizeof(T));
    } else if (w.sink_k != nullptr) {
      std::memcpy(sink_k, w.sink_k, n * sizeof(T));
      std::memcpy(sink_v, w.sink_v, n * sizeof(T));
    } else {
      const TokenRows<T> rows = rows_of(w);
      for (int p = 0; p < sinks_; ++p) {
        std::memcpy(sink_k + p * row_, rows.row(Side::k, p), row_ * sizeof(T));
        std::memcpy(sink_v + p * row_, rows.row(Side::v, p), row_ * sizeof(T));
      }
    }
  }

  TokenRows<T> rows_of(const LayerWrite<T>& w) const {
    const auto& store = static_cast<const CpuLayerStore<T>&>(*w.store);
    TokenRows<T> rows;
    rows.ring_k = store.ring_k.get();
    rows.ring_v = store.ring_v.get();
    rows.tail = w.plan.before;
    rows.in_k = w.k;
    rows.in_v = w.v;
    rows.row_elems = static_cast<int>(row_);
    return rows;
  }

  // The tail after the write: the tokens that stay keep their rows (or move to the grown ring),
  // the new ones that are not compressed are copied in.
  void write_tail(CpuLayerStore<T>& store, const LayerWrite<T>& w, std::unique_ptr<T[]> grown_k,
                  std::unique_ptr<T[]> grown_v) {
    const AppendPlan& plan = w.plan;
    const TokenRows<T> rows = rows_of(w);
    const TailRing& after = plan.after;
    if (grown_k) {
      // Survivors of the old ring first (positions [after.begin, before.end())).
      for (std::int64_t p = after.begin; p < plan.before.end(); ++p) {
        std::memcpy(grown_k.get() + after.row(p) * row_, rows.row(Side::k, p), row_ * sizeof(T));
        std::memcpy(grown_v.get() + after.row(p) * row_, rows.row(Side::v, p), row_ * sizeof(T));
      }
      ring_bytes_ += ring_bytes(after.capacity) - ring_bytes(store.ring_capacity);
      store.ring_k = std::move(grown_k);
      store.ring_v = std::move(grown_v);
      store.ring_capacity = after.capacity;
    }
    for (std::int64_t p = std::max(after.begin, plan.before.end()); p < after.end(); ++p) {
      std::memcpy(store.ring_k.get() + after.row(p) * row_, rows.row(Side::k, p), row_ * sizeof(T));
      std::memcpy(store.ring_v.get() + after.row(p) * row_, rows.row(Side::v, p), row_ * sizeof(T));
    }
  }

  format::BlockGeometry shape_;  ///< what every layer shares (code widths aside)
  std::uint32_t max_block_bytes_;  ///< the largest block of any layer (the staging stride)
  std::uint32_t min_block_bytes_;  ///< the smallest of any layer
  SlotPool pool_;
  std::size_t row_;
  int sinks_;  ///< CacheConfig::sink_tokens
  ReadContext read_;
  std::unordered_set<CpuLayerStore<T>*> stores_;  // every live store, for compaction
  std::size_t ring_bytes_ = 0;
  std::size_t sink_bytes_ = 0;
  std::size_t table_bytes_ = 0;
};

template <class T>
std::size_t CpuPrepared<T>::resident_after() const {
  return backend->resident_bytes() + backend->pool().extra_bytes_needed(sizes) + growth_bytes;
}

template <class T>
std::optional<std::size_t> CpuPrepared<T>::resident_after_reclaim() const {
  const std::size_t after = backend->pool().reserved_after_compaction(sizes) + backend->resident_without_pool() + growth_bytes;
  if (after < resident_after()) return after;
  return std::nullopt;
}

}  // namespace

}  // namespace packkv::detail::cpu

namespace packkv::detail {

template <class T>
std::unique_ptr<Backend<T>> make_cpu_backend(const CacheConfig& config, std::span<const CodecParams> layer_codecs) {
  return std::make_unique<cpu::CpuBackend<T>>(config, layer_codecs);
}

template std::unique_ptr<Backend<float>> make_cpu_backend<float>(const CacheConfig&, std::span<const CodecParams>);
template std::unique_ptr<Backend<fp16_t>> make_cpu_backend<fp16_t>(const CacheConfig&, std::span<const CodecParams>);
template std::unique_ptr<Backend<bf16_t>> make_cpu_backend<bf16_t>(const CacheConfig&, std::span<const CodecParams>);

}  // namespace packkv::detail

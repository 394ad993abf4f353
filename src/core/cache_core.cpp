#include "core/cache_core.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <shared_mutex>

#include <fmt/format.h>

#include "core/image_io.hpp"
#include "packkv/image_coding.hpp"
#include "core/value_checks.hpp"

namespace packkv::detail {

namespace {

/// Locks on several sequences (shared for reads, exclusive for writes), taken in increasing id
/// order (each once), so that two batched calls never wait for each other in a cycle.
template <bool kExclusive>
class SequenceLocks {
 public:
  void add(SeqId id, const RwLock& lock) { entries_.push_back({id, const_cast<RwLock*>(&lock)}); }
  void lock() {
    std::sort(entries_.begin(), entries_.end(), [](const Entry& a, const Entry& b) { return a.id < b.id; });
    entries_.erase(std::unique(entries_.begin(), entries_.end(), [](const Entry& a, const Entry& b) { return a.id == b.id; }),
                   entries_.end());
    for (Entry& e : entries_) {
      if constexpr (kExclusive) e.lock->lock();
      else e.lock->lock_shared();
      ++held_;
    }
  }
  ~SequenceLocks() {
    for (std::size_t i = 0; i < held_; ++i) {
      if constexpr (kExclusive) entries_[i].lock->unlock();
      else entries_[i].lock->unlock_shared();
    }
  }

 private:
  struct Entry {
    SeqId id;
    RwLock* lock;
  };
  std::vector<Entry> entries_;
  std::size_t held_ = 0;
};
using SharedLocks = SequenceLocks<false>;
using ExclusiveLocks = SequenceLocks<true>;

}  // namespace

template <class T>
CacheCore<T>::CacheCore(const CacheConfig& config)
    : cfg_(config),
      codecs_(make_layer_codecs(config)),
      tails_{config.block_tokens, config.residual_tokens},
      row_(static_cast<std::size_t>(config.num_kv_heads) * config.head_dim) {
  backend_ = config.device == Device::cpu ? make_cpu_backend<T>(cfg_, codecs_) : make_cuda_backend<T>(cfg_, codecs_);
}

template <class T>
CacheCore<T>::~CacheCore() {
  for (auto& [id, seq] : sequences_) {
    for (Layer& layer : seq->layers) backend_->clear(*layer.store);
  }
}

// ---- sequences -----------------------------------------------------------------------------------

template <class T>
typename CacheCore<T>::Sequence& CacheCore<T>::sequence(SeqId id, const char* what) const {
  const auto it = sequences_.find(id);
  PACKKV_REQUIRE(it != sequences_.end(), fmt::format("{}: unknown sequence id {}", what, id));
  return *it->second;
}

template <class T>
void CacheCore<T>::check_layer(int layer, const char* what) const {
  PACKKV_REQUIRE(layer >= 0 && layer < cfg_.num_layers,
                 fmt::format("{}: layer {} is out of range [0, {})", what, layer, cfg_.num_layers));
}

template <class T>
LayerRead CacheCore<T>::read_view(const Layer& layer) const {
  LayerRead read{layer.store.get(), layer.length, layer.num_blocks, layer.tail};
  read.layer = layer.index;
  read.sinks = layer.num_blocks > 0 ? cfg_.sink_tokens : 0;
  return read;
}

template <class T>
std::size_t CacheCore<T>::sequence_bookkeeping_bytes() const {
  return sizeof(Sequence) + static_cast<std::size_t>(cfg_.num_layers) * (sizeof(Layer) + backend_->layer_store_bytes());
}

template <class T>
std::size_t CacheCore<T>::resident_bytes() const {
  return backend_->resident_bytes() + sequences_.size() * sequence_bookkeeping_bytes();
}

template <class T>
std::unique_ptr<typename CacheCore<T>::Sequence> CacheCore<T>::new_sequence() const {
  try {
    auto seq = std::make_unique<Sequence>();
    seq->layers.resize(static_cast<std::size_t>(cfg_.num_layers));
    for (std::size_t l = 0; l < seq->layers.size(); ++l) {
      seq->layers[l].index = static_cast<int>(l);
      seq->layers[l].store = backend_->new_layer_store();
    }
    return seq;
  } catch (const std::bad_alloc&) {
    throw_out_of_memory(fmt::format("the bookkeeping of a sequence of {} layers", cfg_.num_layers));
  }
}

template <class T>
void CacheCore<T>::add_sequence(SeqId id) {
  const std::unique_lock table(table_lock_);
  PACKKV_REQUIRE(!sequences_.count(id), fmt::format("add_sequence: sequence id {} already exists", id));
  if (cfg_.memory_budget_bytes != 0) {
    const std::size_t resident = resident_bytes(), extra = sequence_bookkeeping_bytes();
    PACKKV_REQUIRE(resident + extra <= cfg_.memory_budget_bytes,
                   fmt::format("add_sequence {}: memory budget of {} bytes exceeded ({} in use, {} more needed); "
                               "remove or export sequences to free memory",
                               id, cfg_.memory_budget_bytes, resident, extra));
  }
  std::unique_ptr<Sequence> seq = new_sequence();
  try {
    sequences_.emplace(id, std::move(seq));
  } catch (const std::bad_alloc&) {
    throw_out_of_memory("an entry of the sequence table");
  }
}

template <class T>
void CacheCore<T>::remove_sequence(SeqId id) {
  const std::unique_lock table(table_lock_);
  Sequence& seq = sequence(id, "remove_sequence");
  {
    const std::lock_guard memory(memory_mutex_);
    for (Layer& layer : seq.layers) backend_->clear(*layer.store);
  }
  sequences_.erase(id);
}

template <class T>
bool CacheCore<T>::contains(SeqId id) const {
  const std::shared_lock table(table_lock_);
  return sequences_.count(id) != 0;
}

template <class T>
std::size_t CacheCore<T>::num_sequences() const {
  const std::shared_lock table(table_lock_);
  return sequences_.size();
}

template <class T>
std::vector<SeqId> CacheCore<T>::sequence_ids() const {
  const std::shared_lock table(table_lock_);
  std::vector<SeqId> ids;
  ids.reserve(sequences_.size());
  for (const auto& entry : sequences_) ids.push_back(entry.first);
  std::sort(ids.begin(), ids.end());
  return ids;
}

template <class T>
std::int64_t CacheCore<T>::length(SeqId id, int layer) const {
  const std::shared_lock table(table_lock_);
  const Sequence& seq = sequence(id, "length");
  check_layer(layer, "length");
  const std::shared_lock lock(seq.lock);
  return seq.layers[static_cast<std::size_t>(layer)].length;
}

// ---- writes --------------------------------------------------------------------------------------

template <class T>
void CacheCore<T>::apply(Layer& layer, const LayerWrite<T>& write) {
  layer.num_blocks =
      write.num_blocks + write.shared_blocks + static_cast<int>(write.blocks.size()) + write.plan.seal_blocks;
  layer.tail = write.plan.after;
  layer.length = layer.tail.end();
}

template <class T>
typename CacheCore<T>::Attempt CacheCore<T>::write_under_budget(std::span<const LayerWrite<T>> writes,
                                                               std::size_t extra_bookkeeping, bool may_reclaim,
                                                               const std::string& what) {
  std::unique_ptr<PreparedWrite> prepared = backend_->prepare(writes);
  const std::lock_guard memory(memory_mutex_);
  if (cfg_.memory_budget_bytes != 0) {
    const std::size_t bookkeeping = sequences_.size() * sequence_bookkeeping_bytes() + extra_bookkeeping;
    const std::size_t after = prepared->resident_after() + bookkeeping;
    if (after > cfg_.memory_budget_bytes) {
      const std::optional<std::size_t> reclaimed = prepared->resident_after_reclaim();
      if (may_reclaim && reclaimed && *reclaimed + bookkeeping <= cfg_.memory_budget_bytes) return Attempt::reclaim_first;
      throw_error(fmt::format("{}: memory budget of {} bytes exceeded ({} in use, {} needed); remove or export "
                              "sequences to free memory",
                              what, cfg_.memory_budget_bytes, resident_bytes(), after));
    }
  }
  backend_->commit(*prepared);
  return Attempt::committed;
}

template <class T>
template <class Fn>
void CacheCore<T>::with_reclaim(Fn&& attempt) {
  if (attempt(true) == Attempt::committed) return;
  {
    const std::unique_lock table(table_lock_);  // reclaiming moves blocks: nothing else may run
    backend_->reclaim();
  }
  attempt(false);
}

template <class T>
RotatedInput<T> CacheCore<T>::rotated(const T* k, const T* v, std::size_t rows, void* stream) const {
  if (!cfg_.rotate_k && !cfg_.rotate_v) return RotatedInput<T>{k, v, {}};
  return backend_->rotate_input(k, v, rows, stream);
}

template <class T>
void CacheCore<T>::append(SeqId id, int layer_index, const T* k, const T* v, int n_tokens, void* stream) {
  PACKKV_REQUIRE(n_tokens >= 1 && n_tokens <= (1 << 24),
                 fmt::format("append: n_tokens must be in [1, 2^24], got {}", n_tokens));
  PACKKV_REQUIRE(k != nullptr && v != nullptr, "append: k and v must not be null");
  check_layer(layer_index, "append");
  const std::string where = fmt::format("append to sequence {} layer {}", id, layer_index);
  const RotatedInput<T> in = rotated(k, v, static_cast<std::size_t>(n_tokens), stream);
  with_reclaim([&](bool may_reclaim) {
    const std::shared_lock table(table_lock_);
    Sequence& seq = sequence(id, "append");
    const std::unique_lock lock(seq.lock);
    Layer& layer = seq.layers[static_cast<std::size_t>(layer_index)];
    PACKKV_REQUIRE(layer.length + n_tokens <= (std::int64_t{1} << 31),
                   fmt::format("append: sequence {} would exceed 2^31 tokens", id));
    LayerWrite<T> write;
    write.store = layer.store.get();
    write.num_blocks = layer.num_blocks;
    write.plan = tails_.plan(layer.tail, n_tokens);
    write.k = in.k;
    write.v = in.v;
    write.id = id;
    write.layer = layer_index;
    write.stream = stream;
    const std::span<const LayerWrite<T>> writes(&write, 1);
    backend_->check_values(writes);
    const Attempt result = write_under_budget(writes, 0, may_reclaim, where);
    if (result == Attempt::committed) apply(layer, write);
    return result;
  });
}

template <class T>
void CacheCore<T>::append_batch(std::span<const SeqId> ids, int layer_index, const T* k, const T* v,
                                std::span<const int> n_tokens, void* stream) {
  PACKKV_REQUIRE(!ids.empty(), "append_batch: the batch of sequence ids is empty");
  PACKKV_REQUIRE(n_tokens.size() == ids.size(),
                 fmt::format("append_batch: {} token counts for {} sequence ids", n_tokens.size(), ids.size()));
  PACKKV_REQUIRE(k != nullptr && v != nullptr, "append_batch: k and v must not be null");
  check_layer(layer_index, "append_batch");
  std::int64_t total = 0;
  for (std::size_t i = 0; i < ids.size(); ++i) {
    PACKKV_REQUIRE(n_tokens[i] >= 1 && n_tokens[i] <= (1 << 24),
                   fmt::format("append_batch: n_tokens[{}] (sequence {}) must be in [1, 2^24], got {}", i, ids[i],
                               n_tokens[i]));
    total += n_tokens[i];
  }
  PACKKV_REQUIRE(total <= (std::int64_t{1} << 31), fmt::format("append_batch: {} tokens in one call, at most 2^31", total));
  {
    std::vector<SeqId> sorted(ids.begin(), ids.end());
    std::sort(sorted.begin(), sorted.end());
    const auto twice = std::adjacent_find(sorted.begin(), sorted.end());
    PACKKV_REQUIRE(twice == sorted.end(), fmt::format("append_batch: sequence {} appears twice in the batch", *twice));
  }
  const std::string where = fmt::format("append_batch of {} sequences at layer {}", ids.size(), layer_index);
  const RotatedInput<T> in = rotated(k, v, static_cast<std::size_t>(total), stream);
  with_reclaim([&](bool may_reclaim) {
    const std::shared_lock table(table_lock_);
    ExclusiveLocks locks;
    std::vector<Sequence*> seqs;
    seqs.reserve(ids.size());
    for (SeqId id : ids) {
      seqs.push_back(&sequence(id, "append_batch"));
      locks.add(id, seqs.back()->lock);
    }
    locks.lock();
    std::vector<LayerWrite<T>> writes(ids.size());
    std::int64_t offset = 0;
    for (std::size_t i = 0; i < ids.size(); ++i) {
      Layer& layer = seqs[i]->layers[static_cast<std::size_t>(layer_index)];
      PACKKV_REQUIRE(layer.length + n_tokens[i] <= (std::int64_t{1} << 31),
                     fmt::format("append_batch: sequence {} would exceed 2^31 tokens", ids[i]));
      LayerWrite<T>& w = writes[i];
      w.store = layer.store.get();
      w.num_blocks = layer.num_blocks;
      w.plan = tails_.plan(layer.tail, n_tokens[i]);
      w.k = in.k + static_cast<std::size_t>(offset) * row_;
      w.v = in.v + static_cast<std::size_t>(offset) * row_;
      w.id = ids[i];
      w.layer = layer_index;
      w.stream = stream;
      offset += n_tokens[i];
    }
    backend_->check_values(writes);
    const Attempt result = write_under_budget(writes, 0, may_reclaim, where);
    if (result == Attempt::committed) {
      for (std::size_t i = 0; i < ids.size(); ++i) apply(seqs[i]->layers[static_cast<std::size_t>(layer_index)], writes[i]);
    }
    return result;
  });
}

// ---- fork ----------------------------------------------------------------------------------------

// The child shares every packed block of the parent (blocks never change once sealed; the
// backends count references and free a block with its last owner) and gets a copy of the tail,
// appended as host tokens: each layer's tail is at most residual + block - 1 tokens, so the copy
// seals nothing. Like an import it excludes every other call while it runs (it adds a sequence).
template <class T>
void CacheCore<T>::fork(SeqId parent_id, SeqId child_id) {
  PACKKV_REQUIRE(parent_id != child_id, fmt::format("fork: parent and child are the same sequence id {}", parent_id));
  const std::string what = fmt::format("fork of sequence {} into {}", parent_id, child_id);
  with_reclaim([&](bool may_reclaim) {
    const std::unique_lock table(table_lock_);
    const Sequence& parent = sequence(parent_id, "fork");
    PACKKV_REQUIRE(!sequences_.count(child_id), fmt::format("fork: sequence id {} already exists", child_id));
    std::unique_ptr<Sequence> child = new_sequence();
    const std::size_t layers = parent.layers.size();
    std::vector<std::vector<T>> tails(2 * layers);
    std::vector<LayerWrite<T>> writes(layers);
    try {
      for (std::size_t l = 0; l < layers; ++l) {
        const Layer& from = parent.layers[l];
        const std::size_t n = static_cast<std::size_t>(from.tail.len) * row_;
        tails[2 * l].resize(n);
        tails[2 * l + 1].resize(n);
        if (n != 0) backend_->download_tail(read_view(from), tails[2 * l].data(), tails[2 * l + 1].data());
        LayerWrite<T>& w = writes[l];
        w.store = child->layers[l].store.get();
        w.share_from = from.num_blocks > 0 ? from.store.get() : nullptr;
        w.shared_blocks = from.num_blocks;
        TailRing start;
        start.begin = from.tail.begin;
        w.plan = tails_.plan(start, from.tail.len);
        w.k = tails[2 * l].data();
        w.v = tails[2 * l + 1].data();
        w.tokens_on_host = true;
        w.id = child_id;
        w.layer = static_cast<int>(l);
      }
    } catch (const std::bad_alloc&) {
      throw_out_of_memory(fmt::format("{}: the host copy of the tails", what));
    }
    auto clear_child = [&] {
      const std::lock_guard memory(memory_mutex_);
      for (Layer& layer : child->layers) backend_->clear(*layer.store);
    };
    Attempt result;
    try {
      result = write_under_budget(writes, sequence_bookkeeping_bytes(), may_reclaim, what);
    } catch (...) {
      clear_child();
      throw;
    }
    if (result == Attempt::reclaim_first) {
      clear_child();
      return result;
    }
    for (std::size_t l = 0; l < layers; ++l) apply(child->layers[l], writes[l]);
    try {
      sequences_.emplace(child_id, std::move(child));
    } catch (const std::bad_alloc&) {
      clear_child();
      throw_out_of_memory("an entry of the sequence table");
    }
    return result;
  });
}

// ---- truncation ----------------------------------------------------------------------------------

// A cut at or after a layer's first tail token only shortens its tail: ring rows stay where they
// are (position p is row p % capacity), so nothing moves and no memory is needed. A cut inside the
// packed blocks rebuilds the layer in a new store, the way an import does: the blocks before the
// cut are copied as they are, the cut block's kept tokens are decoded on the host (decode_block:
// the same bits on every backend) and appended as host tokens; the old store is freed once the
// new one is committed. That costs a copy of the kept blocks, counted against the budget.
template <class T>
void CacheCore<T>::truncate(SeqId id, std::int64_t new_length) {
  PACKKV_REQUIRE(new_length >= 0, fmt::format("truncate: new_length must be >= 0, got {}", new_length));
  const std::string where = fmt::format("truncate of sequence {} to {} tokens", id, new_length);
  const int block_tokens = cfg_.block_tokens;
  with_reclaim([&](bool may_reclaim) {
    const std::shared_lock table(table_lock_);
    Sequence& seq = sequence(id, "truncate");
    const std::unique_lock lock(seq.lock);

    struct Rebuild {
      int layer = 0;
      std::unique_ptr<LayerStore> store;
      std::vector<std::uint32_t> sizes;
      std::vector<std::uint8_t> bytes;
      std::vector<std::span<const std::uint8_t>> blocks;
      std::vector<T> k, v;
      std::vector<T> sink_k, sink_v;  ///< the sink rows, which go with the kept blocks
    };
    std::vector<Rebuild> rebuilds;
    rebuilds.reserve(seq.layers.size());
    // New stores are cleared (under the memory mutex, like every clear) when this attempt does not
    // install them; installed ones are swapped for the old stores, which are cleared instead.
    struct ClearOnExit {
      Backend<T>& backend;
      std::mutex& memory;
      std::vector<Rebuild>& rebuilds;
      ~ClearOnExit() {
        const std::lock_guard guard(memory);
        for (Rebuild& r : rebuilds) {
          if (r.store) backend.clear(*r.store);
        }
      }
    } clear_on_exit{*backend_, memory_mutex_, rebuilds};

    std::vector<T> tail_k, tail_v;
    std::vector<float> block_k, block_v;
    try {
      for (std::size_t l = 0; l < seq.layers.size(); ++l) {
        const Layer& layer = seq.layers[l];
        if (layer.length <= new_length || new_length == 0 || new_length >= layer.tail.begin) continue;
        Rebuild& r = rebuilds.emplace_back();
        r.layer = static_cast<int>(l);
        const std::size_t tail_values = static_cast<std::size_t>(layer.tail.len) * row_;
        tail_k.resize(tail_values);
        tail_v.resize(tail_values);
        const LayerRead view = read_view(layer);
        r.sink_k.resize(static_cast<std::size_t>(view.sinks) * row_);
        r.sink_v.resize(r.sink_k.size());
        backend_->download(view, r.sizes, r.bytes, tail_k.data(), tail_v.data(), r.sink_k.data(), r.sink_v.data());
        const int keep = static_cast<int>(new_length / block_tokens);
        const int kept_tokens = static_cast<int>(new_length - static_cast<std::int64_t>(keep) * block_tokens);
        std::size_t offset = 0;
        for (int b = 0; b < keep; ++b) {
          r.blocks.emplace_back(r.bytes.data() + offset, r.sizes[static_cast<std::size_t>(b)]);
          offset += r.sizes[static_cast<std::size_t>(b)];
        }
        if (kept_tokens > 0) {
          block_k.resize(static_cast<std::size_t>(block_tokens) * row_);
          block_v.resize(block_k.size());
          decode_block(codecs_[static_cast<std::size_t>(r.layer)], r.bytes.data() + offset, block_k.data(), block_v.data(), row_);
          const std::size_t n = static_cast<std::size_t>(kept_tokens) * row_;
          r.k.resize(n);
          r.v.resize(n);
          for (std::size_t i = 0; i < n; ++i) {
            r.k[i] = from_float<T>(block_k[i]);
            r.v[i] = from_float<T>(block_v[i]);
          }
          if (keep == 0) {  // the first block goes: its sinks return to the tail exactly
            const std::size_t exact = std::min(n, r.sink_k.size());
            std::copy_n(r.sink_k.begin(), exact, r.k.begin());
            std::copy_n(r.sink_v.begin(), exact, r.v.begin());
          }
        }
        r.store = backend_->new_layer_store();
      }
    } catch (const std::bad_alloc&) {
      throw_out_of_memory(fmt::format("{}: the host copy of a layer", where));
    }

    std::vector<LayerWrite<T>> writes(rebuilds.size());
    for (std::size_t i = 0; i < rebuilds.size(); ++i) {
      Rebuild& r = rebuilds[i];
      LayerWrite<T>& w = writes[i];
      w.store = r.store.get();
      w.num_blocks = 0;
      w.blocks = r.blocks;
      TailRing empty;
      empty.begin = static_cast<std::int64_t>(r.blocks.size()) * block_tokens;
      w.plan = tails_.plan(empty, static_cast<int>(r.k.size() / row_));
      w.k = r.k.data();
      w.v = r.v.data();
      if (!r.blocks.empty() && !r.sink_k.empty()) {
        w.sink_k = r.sink_k.data();
        w.sink_v = r.sink_v.data();
      }
      w.tokens_on_host = true;
      w.id = id;
      w.layer = r.layer;
      if (w.plan.n_tokens > 0) {
        // Dequantized values fit their bounds; fp16 rounding can still carry one past 65504.
        TokenRows<T> rows;
        rows.tail = empty;
        rows.in_k = w.k;
        rows.in_v = w.v;
        rows.row_elems = static_cast<int>(row_);
        check_append_values(codecs_[static_cast<std::size_t>(r.layer)], rows, w.plan,
                            fmt::format("{}: layer {}", where, r.layer));
      }
    }
    if (!writes.empty()) {
      const Attempt result = write_under_budget(writes, 0, may_reclaim, where);
      if (result == Attempt::reclaim_first) return result;
    }

    // Committed: from here on nothing can fail.
    const std::lock_guard memory(memory_mutex_);
    std::size_t next = 0;
    for (std::size_t l = 0; l < seq.layers.size(); ++l) {
      Layer& layer = seq.layers[l];
      if (layer.length <= new_length) continue;
      if (new_length == 0) {
        backend_->clear(*layer.store);
        layer.length = 0;
        layer.num_blocks = 0;
        layer.tail = TailRing{};
      } else if (new_length >= layer.tail.begin) {
        layer.tail.len = static_cast<int>(new_length - layer.tail.begin);
        layer.length = new_length;
      } else {
        Rebuild& r = rebuilds[next];
        std::swap(layer.store, r.store);  // the old store is cleared on exit
        apply(layer, writes[next]);
        ++next;
      }
    }
    return Attempt::committed;
  });
}

// ---- reads ---------------------------------------------------------------------------------------

template <class T>
template <class Fn>
void CacheCore<T>::read_batch(std::span<const SeqId> ids, const char* what, Fn&& read) const {
  const std::shared_lock table(table_lock_);
  SharedLocks locks;
  std::vector<const Sequence*> seqs;
  seqs.reserve(ids.size());
  for (SeqId id : ids) {
    seqs.push_back(&sequence(id, what));
    locks.add(id, seqs.back()->lock);
  }
  locks.lock();
  read(seqs);
}

template <class T>
std::vector<LayerRead> CacheCore<T>::layer_views(const std::vector<const Sequence*>& seqs, int layer) const {
  std::vector<LayerRead> views;
  views.reserve(seqs.size());
  for (const Sequence* seq : seqs) views.push_back(read_view(seq->layers[static_cast<std::size_t>(layer)]));
  return views;
}

template <class T>
void CacheCore<T>::attention(std::span<const SeqId> ids, std::span<const int> n_queries, int layer, const T* q, T* out,
                             float softmax_scale, float* lse, void* stream, const char* what) const {
  check_layer(layer, what);
  PACKKV_REQUIRE(!ids.empty(), fmt::format("{}: the batch of sequence ids is empty", what));
  PACKKV_REQUIRE(n_queries.empty() || n_queries.size() == ids.size(),
                 fmt::format("{}: {} query counts for {} sequence ids", what, n_queries.size(), ids.size()));
  PACKKV_REQUIRE(q != nullptr && out != nullptr, fmt::format("{}: q and out must not be null", what));
  PACKKV_REQUIRE(std::isfinite(softmax_scale), fmt::format("{}: softmax_scale must be finite, got {}", what, softmax_scale));
  for (std::size_t b = 0; b < n_queries.size(); ++b) {
    PACKKV_REQUIRE(n_queries[b] >= 1, fmt::format("{}: n_queries[{}] (sequence {}) must be at least 1, got {}", what, b,
                                                  ids[b], n_queries[b]));
  }
  read_batch(ids, what, [&](const std::vector<const Sequence*>& seqs) {
    std::vector<LayerRead> batch;
    batch.reserve(ids.size());
    for (std::size_t b = 0; b < ids.size(); ++b) {
      const Layer& l = seqs[b]->layers[static_cast<std::size_t>(layer)];
      PACKKV_REQUIRE(l.length > 0, fmt::format("{}: sequence {} has no tokens at layer {}", what, ids[b], layer));
      LayerRead read = read_view(l);
      if (!n_queries.empty()) {
        PACKKV_REQUIRE(n_queries[b] <= l.length,
                       fmt::format("{}: n_queries[{}] = {} exceeds the {} tokens of sequence {} at layer {} (the "
                                   "queries' keys must be appended first)",
                                   what, b, n_queries[b], l.length, ids[b], layer));
        read.queries = n_queries[b];
      }
      batch.push_back(read);
    }
    backend_->attention(batch, q, out, lse, softmax_scale, stream);
  });
}

template <class T>
void CacheCore<T>::scores(std::span<const SeqId> ids, int layer, const T* q, float* scores, void* stream,
                          const char* what) const {
  check_layer(layer, what);
  PACKKV_REQUIRE(!ids.empty(), fmt::format("{}: the batch of sequence ids is empty", what));
  PACKKV_REQUIRE(q != nullptr && scores != nullptr, fmt::format("{}: q and scores must not be null", what));
  read_batch(ids, what, [&](const std::vector<const Sequence*>& seqs) {
    backend_->scores(layer_views(seqs, layer), q, scores, stream);
  });
}

template <class T>
void CacheCore<T>::attn_v(std::span<const SeqId> ids, int layer, const float* weights, float* out, void* stream,
                          const char* what) const {
  check_layer(layer, what);
  PACKKV_REQUIRE(!ids.empty(), fmt::format("{}: the batch of sequence ids is empty", what));
  PACKKV_REQUIRE(weights != nullptr && out != nullptr, fmt::format("{}: weights and out must not be null", what));
  read_batch(ids, what, [&](const std::vector<const Sequence*>& seqs) {
    backend_->attn_v(layer_views(seqs, layer), weights, out, stream);
  });
}

template <class T>
void CacheCore<T>::read_back(SeqId id, int layer, float* k, float* v) const {
  check_layer(layer, "read_back");
  PACKKV_REQUIRE(k != nullptr && v != nullptr, "read_back: k and v must not be null");
  const std::shared_lock table(table_lock_);
  const Sequence& seq = sequence(id, "read_back");
  const std::shared_lock lock(seq.lock);
  backend_->read_back(read_view(seq.layers[static_cast<std::size_t>(layer)]), k, v);
}

template <class T>
MemoryStats CacheCore<T>::memory_stats() const {
  const std::shared_lock table(table_lock_);
  SharedLocks locks;
  std::vector<const Sequence*> seqs;
  for (const auto& [id, seq] : sequences_) {
    seqs.push_back(seq.get());
    locks.add(id, seq->lock);
  }
  locks.lock();
  const std::size_t layers = static_cast<std::size_t>(cfg_.num_layers);
  std::vector<LayerRead> reads;
  reads.reserve(seqs.size() * layers);
  for (const Sequence* seq : seqs) {
    for (const Layer& layer : seq->layers) reads.push_back(read_view(layer));
  }
  std::vector<LayerBytes> bytes(reads.size());
  backend_->layer_bytes(reads, bytes);

  MemoryStats stats;
  stats.layers.resize(layers);
  const std::size_t token_bytes = row_ * 2 * sizeof(T);
  const std::size_t layer_bookkeeping = sizeof(Layer) + backend_->layer_store_bytes();
  for (std::size_t i = 0; i < reads.size(); ++i) {
    const LayerRead& r = reads[i];
    const LayerBytes& b = bytes[i];
    MemoryBreakdown& m = stats.layers[i % layers];
    m.payload += b.blocks.payload;
    m.params += b.blocks.params;
    m.descriptors += b.blocks.descriptors;
    m.permutations += b.blocks.permutations;
    m.headers += b.blocks.headers;
    m.k_section_bytes += b.blocks.k_sections;
    m.v_section_bytes += b.blocks.v_sections;
    m.block_tables += b.tables + layer_bookkeeping;
    m.tail += b.tail;
    m.sinks += b.sinks;
    stats.shared_block_bytes += b.shared;
    m.compressed_tokens += static_cast<std::size_t>(r.num_blocks) * static_cast<std::size_t>(cfg_.block_tokens);
    m.tail_tokens += static_cast<std::size_t>(r.tail.len);
    m.original_bytes += static_cast<std::size_t>(r.length) * token_bytes;
    m.original_fp16_bytes += static_cast<std::size_t>(r.length) * row_ * 2 * sizeof(fp16_t);
  }
  // The sequence records themselves (beyond their layers) are table bytes too.
  if (!stats.layers.empty()) stats.layers[0].block_tables += seqs.size() * (sizeof(Sequence));
  for (const MemoryBreakdown& m : stats.layers) stats.total += m;
  stats.pool = backend_->pool_stats();
  stats.scratch_bytes = backend_->scratch_bytes();
  stats.resident_bytes = resident_bytes();
  stats.budget_bytes = cfg_.memory_budget_bytes;
  if (cfg_.memory_budget_bytes != 0 && stats.resident_bytes < cfg_.memory_budget_bytes) {
    stats.free_budget_bytes = cfg_.memory_budget_bytes - stats.resident_bytes;
  }
  stats.reclaimable_bytes = backend_->reclaimable_bytes();
  return stats;
}

template <class T>
std::size_t CacheCore<T>::worst_case_bytes(std::span<const SeqId> ids, std::span<const int> n_tokens,
                                           std::span<const int> new_sequence_tokens) const {
  PACKKV_REQUIRE(n_tokens.size() == ids.size(),
                 fmt::format("worst_case_bytes: {} token counts for {} sequence ids", n_tokens.size(), ids.size()));
  for (std::size_t i = 0; i < ids.size(); ++i) {
    PACKKV_REQUIRE(n_tokens[i] >= 0 && n_tokens[i] <= (1 << 24),
                   fmt::format("worst_case_bytes: n_tokens[{}] (sequence {}) must be in [0, 2^24], got {}", i, ids[i],
                               n_tokens[i]));
  }
  for (std::size_t i = 0; i < new_sequence_tokens.size(); ++i) {
    PACKKV_REQUIRE(new_sequence_tokens[i] >= 0 && new_sequence_tokens[i] <= (1 << 24),
                   fmt::format("worst_case_bytes: new_sequence_tokens[{}] must be in [0, 2^24], got {}", i,
                               new_sequence_tokens[i]));
  }
  {
    std::vector<SeqId> sorted(ids.begin(), ids.end());
    std::sort(sorted.begin(), sorted.end());
    const auto twice = std::adjacent_find(sorted.begin(), sorted.end());
    PACKKV_REQUIRE(twice == sorted.end(), fmt::format("worst_case_bytes: sequence {} appears twice", *twice));
  }
  const std::shared_lock table(table_lock_);
  SharedLocks locks;
  std::vector<const Sequence*> seqs;
  seqs.reserve(ids.size());
  for (SeqId id : ids) {
    seqs.push_back(&sequence(id, "worst_case_bytes"));
    locks.add(id, seqs.back()->lock);
  }
  locks.lock();
  std::vector<GrowthQuery> queries;
  queries.reserve((ids.size() + new_sequence_tokens.size()) * static_cast<std::size_t>(cfg_.num_layers));
  for (int l = 0; l < cfg_.num_layers; ++l) {
    for (std::size_t i = 0; i < ids.size(); ++i) {
      if (n_tokens[i] == 0) continue;
      const Layer& layer = seqs[i]->layers[static_cast<std::size_t>(l)];
      queries.push_back({layer.store.get(), layer.num_blocks, tails_.plan(layer.tail, n_tokens[i]), l});
    }
    for (const int n : new_sequence_tokens) {
      if (n != 0) queries.push_back({nullptr, 0, tails_.plan(TailRing{}, n), l});
    }
  }
  return backend_->worst_case_growth(queries) + new_sequence_tokens.size() * sequence_bookkeeping_bytes();
}

// ---- images --------------------------------------------------------------------------------------

template <class T>
std::vector<std::uint8_t> CacheCore<T>::export_sequence(SeqId id, std::span<const int> layers) const {
  std::vector<bool> listed(static_cast<std::size_t>(cfg_.num_layers), false);
  for (int l : layers) {
    check_layer(l, "export_sequence");
    PACKKV_REQUIRE(!listed[static_cast<std::size_t>(l)], fmt::format("export_sequence: layer {} is listed twice", l));
    listed[static_cast<std::size_t>(l)] = true;
  }
  std::vector<int> chosen(layers.begin(), layers.end());
  if (chosen.empty()) {
    for (int l = 0; l < cfg_.num_layers; ++l) chosen.push_back(l);
  }
  const std::shared_lock table(table_lock_);
  const Sequence& seq = sequence(id, "export_sequence");
  const std::shared_lock lock(seq.lock);
  try {
    std::vector<std::uint8_t> image(sizeof(format::ImageHeader));
    format::ImageHeader header = make_image_header(codecs_[0], cfg_.k_mode, option_bits(cfg_), format::dtype_code<T>());
    header.layer_count = static_cast<std::uint16_t>(chosen.size());
    std::memcpy(image.data(), &header, sizeof header);
    auto put = [&image](const void* data, std::size_t n) {
      const auto* p = static_cast<const std::uint8_t*>(data);
      image.insert(image.end(), p, p + n);
    };
    std::vector<std::uint32_t> sizes;
    std::vector<std::uint8_t> blocks;
    std::vector<T> tail_k, tail_v, sink_k, sink_v;
    for (int l : chosen) {
      const Layer& layer = seq.layers[static_cast<std::size_t>(l)];
      const LayerRead view = read_view(layer);
      const std::size_t tail_values = static_cast<std::size_t>(layer.tail.len) * row_;
      const std::size_t sink_values = static_cast<std::size_t>(view.sinks) * row_;
      tail_k.resize(tail_values);
      tail_v.resize(tail_values);
      sink_k.resize(sink_values);
      sink_v.resize(sink_values);
      backend_->download(view, sizes, blocks, tail_k.data(), tail_v.data(), sink_k.data(), sink_v.data());
      const format::LayerRecord record = make_layer_record(codecs_[static_cast<std::size_t>(l)], l,
                                                           static_cast<int>(sizes.size()), layer.tail.len, layer.length,
                                                           view.sinks);
      put(&record, sizeof record);
      put(sizes.data(), sizes.size() * sizeof(std::uint32_t));
      put(blocks.data(), blocks.size());
      put(tail_k.data(), tail_values * sizeof(T));
      put(tail_v.data(), tail_values * sizeof(T));
      put(sink_k.data(), sink_values * sizeof(T));
      put(sink_v.data(), sink_values * sizeof(T));
    }
    seal_image(image);
    return image;
  } catch (const std::bad_alloc&) {
    throw_out_of_memory(fmt::format("the image of sequence {}", id));
  }
}

template <class T>
void CacheCore<T>::import_sequence(SeqId id, std::span<const std::uint8_t> image) {
  // Parsing and checking need no lock: they read only the image and the config. An entropy-coded
  // image is decoded back to the image it came from first (image_coding.hpp).
  std::vector<std::uint8_t> decoded;
  if (is_entropy_coded_image(image)) {
    decoded = decode_image_entropy(image);
    image = decoded;
  }
  const int max_tail = std::min(tails_.max_capacity() + (1 << 20), 1 << 21);
  const std::vector<ParsedLayer> parsed =
      parse_image(image, codecs_[0], codecs_, cfg_.k_mode, option_bits(cfg_), format::dtype_code<T>(), sizeof(T), cfg_.num_layers, max_tail);
  std::vector<std::vector<T>> tails(parsed.size() * 2), sinks(parsed.size() * 2);
  std::vector<LayerWrite<T>> writes(parsed.size());
  for (std::size_t i = 0; i < parsed.size(); ++i) {
    const ParsedLayer& p = parsed[i];
    // A layer with blocks brings its exact sink rows: as many as this cache keeps.
    if (!p.blocks.empty()) {
      PACKKV_REQUIRE(p.sink_tokens == cfg_.sink_tokens,
                     fmt::format("import: layer {} keeps {} exact sink rows; this cache keeps {} (sink_tokens differ)",
                                 p.layer, p.sink_tokens, cfg_.sink_tokens));
    }
    const std::size_t sink_values = static_cast<std::size_t>(p.sink_tokens) * row_;
    sinks[2 * i].resize(sink_values);
    sinks[2 * i + 1].resize(sink_values);
    if (sink_values != 0) {
      std::memcpy(sinks[2 * i].data(), p.sink_k, sink_values * sizeof(T));
      std::memcpy(sinks[2 * i + 1].data(), p.sink_v, sink_values * sizeof(T));
      for (const std::vector<T>* rows : {&sinks[2 * i], &sinks[2 * i + 1]}) {
        const std::size_t bad = first_unstorable(rows->data(), sink_values);
        PACKKV_REQUIRE(bad == sink_values, fmt::format("import: layer {} sink {} row {} holds a value that cannot be "
                                                       "stored (not finite, or |x| > 65504)",
                                                       p.layer, rows == &sinks[2 * i] ? "K" : "V", bad / row_));
      }
    }
    // The image's tail rows are unaligned: copy them out. They are re-appended after the blocks
    // (this cache's residual_tokens may compress some of them), so they get an append's checks.
    const std::size_t n = static_cast<std::size_t>(p.tail_tokens) * row_;
    tails[2 * i].resize(n);
    tails[2 * i + 1].resize(n);
    if (n != 0) {
      std::memcpy(tails[2 * i].data(), p.tail_k, n * sizeof(T));
      std::memcpy(tails[2 * i + 1].data(), p.tail_v, n * sizeof(T));
    }
    LayerWrite<T>& w = writes[i];
    w.blocks = p.blocks;
    if (sink_values != 0) {
      w.sink_k = sinks[2 * i].data();
      w.sink_v = sinks[2 * i + 1].data();
    }
    TailRing empty;
    empty.begin = static_cast<std::int64_t>(p.blocks.size()) * cfg_.block_tokens;
    w.plan = tails_.plan(empty, p.tail_tokens);
    w.k = tails[2 * i].data();
    w.v = tails[2 * i + 1].data();
    w.tokens_on_host = true;
    w.id = id;
    w.layer = p.layer;
    if (p.tail_tokens > 0) {
      TokenRows<T> rows;
      rows.tail = empty;
      rows.in_k = w.k;
      rows.in_v = w.v;
      rows.row_elems = static_cast<int>(row_);
      check_append_values(p.codec, rows, w.plan, fmt::format("import: layer {} tail", p.layer));
    }
  }
  const std::string what = fmt::format("import of sequence {}", id);

  with_reclaim([&](bool may_reclaim) {
    const std::unique_lock table(table_lock_);
    const auto it = sequences_.find(id);
    const bool creating = it == sequences_.end();
    std::unique_ptr<Sequence> created = creating ? new_sequence() : nullptr;
    Sequence& seq = creating ? *created : *it->second;
    const std::unique_lock lock(seq.lock);
    for (std::size_t i = 0; i < parsed.size(); ++i) {
      const Layer& layer = seq.layers[static_cast<std::size_t>(parsed[i].layer)];
      PACKKV_REQUIRE(layer.length == 0,
                     fmt::format("import: layer {} of sequence {} is not empty", parsed[i].layer, id));
      writes[i].store = layer.store.get();
      writes[i].num_blocks = 0;
    }
    const Attempt result =
        write_under_budget(writes, creating ? sequence_bookkeeping_bytes() : 0, may_reclaim, what);
    if (result == Attempt::reclaim_first) {
      if (creating) {
        for (Layer& layer : seq.layers) backend_->clear(*layer.store);
      }
      return result;
    }
    for (std::size_t i = 0; i < parsed.size(); ++i) {
      apply(seq.layers[static_cast<std::size_t>(parsed[i].layer)], writes[i]);
    }
    if (creating) {
      try {
        sequences_.emplace(id, std::move(created));
      } catch (const std::bad_alloc&) {
        for (Layer& layer : seq.layers) backend_->clear(*layer.store);
        throw_out_of_memory("an entry of the sequence table");
      }
    }
    return result;
  });
}

// ---- memory and streams ------------------------------------------------------------------------

template <class T>
void CacheCore<T>::release_unused_memory() {
  const std::unique_lock table(table_lock_);
  const std::lock_guard memory(memory_mutex_);
  backend_->reclaim();
}

template <class T>
void CacheCore<T>::set_stream(void* cuda_stream) {
  const std::unique_lock table(table_lock_);
  backend_->set_stream(cuda_stream);
}

template <class T>
std::optional<std::string> CacheCore<T>::poll_device_error() {
  const std::shared_lock table(table_lock_);
  return backend_->poll_device_error();
}

template class CacheCore<float>;
template class CacheCore<fp16_t>;
template class CacheCore<bf16_t>;

}  // namespace packkv::detail

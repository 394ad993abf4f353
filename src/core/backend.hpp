// The narrow interface between the host core (cache_core.hpp) and a backend (CPU or CUDA).
//
// The core owns everything the backends share: sequences and their locks, layer lengths, the
// tail rings' geometry, the compression plan, the memory budget, statistics, image framing and
// argument checks. A backend is a block store plus kernel launchers: it keeps, per (sequence,
// layer), a LayerStore with that layer's packed blocks and its tail ring's memory, and runs the
// kernels over them. Writes come in two phases so that a refused write changes nothing:
// prepare() does every fallible piece of work that needs no new memory (the CPU encodes its
// blocks into staging) and reports what the commit will hold; the core checks the budget; then
// commit() acquires memory (all or nothing) and applies the write.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "core/tail.hpp"
#include "packkv/cache.hpp"
#include "packkv/codec.hpp"
#include "packkv/stats.hpp"

namespace packkv::detail {

/// A backend's storage for one (sequence, layer): its packed blocks and its tail ring's memory.
class LayerStore {
 public:
  virtual ~LayerStore() = default;
};

/// One layer's change in a write: share every block of `share_from` (fork only), or adopt
/// `blocks` (import only); the layer is empty in both cases. Then append the tokens of `plan`.
template <class T>
struct LayerWrite {
  LayerStore* store = nullptr;
  int num_blocks = 0;           ///< blocks the layer holds before the write
  AppendPlan plan;
  const T* k = nullptr;         ///< plan.n_tokens new tokens [n][num_kv_heads][head_dim]
  const T* v = nullptr;
  bool tokens_on_host = false;  ///< k and v are host memory even on a device backend (import)
  std::span<const std::span<const std::uint8_t>> blocks;  ///< validated block bytes (host memory)
  const LayerStore* share_from = nullptr;  ///< a parent's store: its blocks become this layer's too
                                           ///< (and a copy of its sink rows)
  /// Sink rows that go with adopted `blocks` (import, truncate): [sink_tokens][num_kv_heads][head_dim]
  /// each, host memory; null when the config keeps no sinks or no block is adopted. A write that
  /// seals the layer's first block takes them from the tokens it encodes instead.
  const T* sink_k = nullptr;
  const T* sink_v = nullptr;
  int shared_blocks = 0;                   ///< how many it holds (the parent layer's num_blocks)
  SeqId id = 0;                 ///< for messages
  int layer = 0;
  void* stream = nullptr;       ///< the caller's CUDA stream (null: the cache's); one per call
};

/// What a layer looks like to the readers.
struct LayerRead {
  const LayerStore* store = nullptr;
  std::int64_t length = 0;
  int num_blocks = 0;
  TailRing tail;
  /// Attention only: queries for the last `queries` positions, causal among themselves (query j
  /// attends to positions < length - queries + j + 1).
  int queries = 1;
  int layer = 0;  ///< which layer of the model (its codec: CacheConfig::layer_k_rel / layer_v_rel)
  /// Exact sink rows the readers use for positions [0, sinks) instead of the first block's
  /// decoded values (masked out there): CacheConfig::sink_tokens once a block is sealed, else 0
  /// (the tail then holds those tokens exactly).
  int sinks = 0;
};

/// Work prepared by Backend::prepare, applied by Backend::commit or dropped.
class PreparedWrite {
 public:
  virtual ~PreparedWrite() = default;
  /// What Backend::resident_bytes() will be once this write is committed (as of now).
  virtual std::size_t resident_after() const = 0;
  /// The same after Backend::reclaim(), when reclaiming would lower it; nullopt otherwise.
  virtual std::optional<std::size_t> resident_after_reclaim() const { return std::nullopt; }
};

/// One layer of an admission query: `plan` appended to a layer of `num_blocks` blocks held by
/// `store` (null: a layer of a sequence not yet added).
struct GrowthQuery {
  const LayerStore* store = nullptr;
  int num_blocks = 0;
  AppendPlan plan;
  int layer = 0;  ///< queries come grouped by layer (an engine appends one layer per call)
};

/// Bytes of one layer as the statistics count them.
struct LayerBytes {
  BlockBytes blocks;         ///< the packed blocks, by part
  std::size_t tables = 0;    ///< block tables (the backend's memory)
  std::size_t tail = 0;      ///< the tail ring as allocated (K and V)
  std::size_t sinks = 0;     ///< the exact sink rows (K and V)
  std::size_t shared = 0;    ///< bytes of blocks this layer shares that an earlier layer counted
};

/// A write's K and V in the cache's rotated space (CacheConfig::rotate_k / rotate_v): copies in
/// the backend's memory, or the caller's pointer for a side that is not rotated.
template <class T>
struct RotatedInput {
  const T* k = nullptr;
  const T* v = nullptr;
  std::shared_ptr<void> storage;  ///< owns the copies until the write is done with them
};

template <class T>
class Backend {
 public:
  virtual ~Backend() = default;

  /// A new, empty layer store; it holds no memory until a write commits to it.
  virtual std::unique_ptr<LayerStore> new_layer_store() = 0;
  /// Host bytes of one empty layer store (the core counts them as bookkeeping).
  virtual std::size_t layer_store_bytes() const = 0;
  /// Frees everything a layer store holds (it is empty afterwards).
  virtual void clear(LayerStore& store) = 0;

  // ---- writes ----
  /// K and V of `rows` new tokens rotated as the config asks (rounded to T), ready for a write.
  virtual RotatedInput<T> rotate_input(const T* k, const T* v, std::size_t rows, void* stream) = 0;
  /// Checks the values of the writes (storable, ranges the encoder will need); throws packkv::error
  /// and changes nothing. A device backend may defer its checks to its kernels (docs/cuda.md).
  virtual void check_values(std::span<const LayerWrite<T>> writes) = 0;
  virtual std::unique_ptr<PreparedWrite> prepare(std::span<const LayerWrite<T>> writes) = 0;
  /// Applies a prepared write. Throws packkv::error (out of memory) only before changing anything.
  virtual void commit(PreparedWrite& prepared) = 0;

  // ---- memory ----
  /// Memory the cache holds in the backend's memory space: blocks (with the pool's slack), tails,
  /// tables, scratch. What the budget limits.
  virtual std::size_t resident_bytes() const = 0;
  /// Returns memory that no block needs (compaction, empty pages). Runs with no other call active.
  virtual void reclaim() = 0;
  virtual PoolStats pool_stats() const = 0;
  /// Scratch memory (staging, workspaces) included in resident_bytes().
  virtual std::size_t scratch_bytes() const = 0;
  /// An upper bound of what resident_bytes() grows by if the appends of `queries` are committed,
  /// whatever the values (every new block at its worst-case size).
  virtual std::size_t worst_case_growth(std::span<const GrowthQuery> queries) const = 0;
  /// What reclaim() would return now.
  virtual std::size_t reclaimable_bytes() const = 0;

  // ---- reads ----
  /// Causal attention of every sequence's queries (LayerRead::queries of them): q and out
  /// [sum of queries][num_q_heads][head_dim]; lse (may be null) [sum of queries][num_q_heads].
  /// `stream`: the caller's CUDA stream, null for the cache's (ignored by the CPU).
  virtual void attention(std::span<const LayerRead> batch, const T* q, T* out, float* lse, float scale,
                         void* stream) const = 0;
  /// scores and attn_v of a batch: sequence i's scores (weights) are [num_q_heads][length_i] floats
  /// after those of sequences 0 .. i-1; q and out [batch][num_q_heads][head_dim].
  virtual void scores(std::span<const LayerRead> batch, const T* q, float* scores, void* stream) const = 0;
  virtual void attn_v(std::span<const LayerRead> batch, const float* weights, float* out, void* stream) const = 0;
  virtual void read_back(const LayerRead& layer, float* k, float* v) const = 0;
  /// Bytes of each layer. A block that several layers share (fork) counts in `blocks` of the first
  /// of `layers` that holds it and in `shared` of the others.
  virtual void layer_bytes(std::span<const LayerRead> layers, std::span<LayerBytes> out) const = 0;
  /// The layer's blocks (bytes as stored, sizes), its tail rows in token order and its
  /// LayerRead::sinks sink rows (host memory).
  virtual void download(const LayerRead& layer, std::vector<std::uint32_t>& sizes, std::vector<std::uint8_t>& blocks,
                        T* tail_k, T* tail_v, T* sink_k, T* sink_v) const = 0;
  /// The layer's tail rows in token order (host memory).
  virtual void download_tail(const LayerRead& layer, T* tail_k, T* tail_v) const = 0;

  /// The CUDA stream (cudaStream_t) device work is queued on; ignored by the CPU.
  virtual void set_stream(void* stream) = 0;
  /// A value error a device kernel found after its call returned (CacheConfig::cuda_poll_errors),
  /// or nullopt; the CPU refuses bad values in the call itself.
  virtual std::optional<std::string> poll_device_error() = 0;
};

template <class T>
std::unique_ptr<Backend<T>> make_cpu_backend(const CacheConfig& config, std::span<const CodecParams> layer_codecs);

/// Defined by the CUDA backend when packkv is built with CUDA; otherwise throws packkv::error.
template <class T>
std::unique_ptr<Backend<T>> make_cuda_backend(const CacheConfig& config, std::span<const CodecParams> layer_codecs);

}  // namespace packkv::detail

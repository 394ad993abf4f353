// The host core of PackedKVCache<T>: what both backends share, written once.
//
// It owns the sequence table, each layer's length and tail geometry, the compression plan, the
// memory budget, the statistics, the image framing and every argument and value check, and it
// drives a Backend (backend.hpp) for storage and kernels.
//
// Locking (docs/architecture.md, "Thread safety"): a table lock guards the set of sequences
// (adding and removing take it exclusively, everything else shares it); each sequence has its own
// lock (appends take it exclusively, reads share it), so an append to one sequence never stalls
// attention on another; a memory mutex makes the budget check and the commit of a write atomic.
// Locks are taken in that order, several sequences' locks in increasing id order.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/backend.hpp"
#include "core/rw_lock.hpp"
#include "core/tail.hpp"
#include "packkv/cache.hpp"
#include "packkv/codec.hpp"

namespace packkv::detail {

template <class T>
class CacheCore {
 public:
  explicit CacheCore(const CacheConfig& config);
  ~CacheCore();

  const CacheConfig& config() const { return cfg_; }

  void add_sequence(SeqId id);
  void remove_sequence(SeqId id);
  bool contains(SeqId id) const;
  std::size_t num_sequences() const;
  std::vector<SeqId> sequence_ids() const;
  std::int64_t length(SeqId id, int layer) const;

  void append(SeqId id, int layer, const T* k, const T* v, int n_tokens, void* stream);
  void append_batch(std::span<const SeqId> ids, int layer, const T* k, const T* v, std::span<const int> n_tokens,
                    void* stream);
  void truncate(SeqId id, std::int64_t new_length);
  void fork(SeqId parent, SeqId child);

  /// n_queries empty: one query per sequence.
  void attention(std::span<const SeqId> ids, std::span<const int> n_queries, int layer, const T* q, T* out,
                 float softmax_scale, float* lse, void* stream, const char* what) const;
  /// scores and attn_v of a batch of sequences (one id: the single-sequence calls); `what` names
  /// the public call in refusals.
  void scores(std::span<const SeqId> ids, int layer, const T* q, float* scores, void* stream, const char* what) const;
  void attn_v(std::span<const SeqId> ids, int layer, const float* weights, float* out, void* stream,
              const char* what) const;
  void read_back(SeqId id, int layer, float* k, float* v) const;
  MemoryStats memory_stats() const;
  std::size_t worst_case_bytes(std::span<const SeqId> ids, std::span<const int> n_tokens,
                               std::span<const int> new_sequence_tokens) const;

  std::vector<std::uint8_t> export_sequence(SeqId id, std::span<const int> layers) const;
  void import_sequence(SeqId id, std::span<const std::uint8_t> image);

  void release_unused_memory();
  void set_stream(void* cuda_stream);
  std::optional<std::string> poll_device_error();

 private:
  struct Layer {
    int index = 0;  ///< which layer of the model
    std::int64_t length = 0;
    int num_blocks = 0;
    TailRing tail;
    std::unique_ptr<LayerStore> store;
  };
  struct Sequence {
    mutable RwLock lock;
    std::vector<Layer> layers;
  };
  /// Outcome of one attempt at a write under the budget.
  enum class Attempt { committed, reclaim_first };

  Sequence& sequence(SeqId id, const char* what) const;
  void check_layer(int layer, const char* what) const;
  LayerRead read_view(const Layer& layer) const;
  /// Takes the table and every sequence of `ids` shared, in id order, and calls read(seqs) while
  /// they are held: the reads of a batch (attention, scores, attn_v).
  template <class Fn>
  void read_batch(std::span<const SeqId> ids, const char* what, Fn&& read) const;
  /// The read views of one layer of each sequence.
  std::vector<LayerRead> layer_views(const std::vector<const Sequence*>& seqs, int layer) const;
  std::unique_ptr<Sequence> new_sequence() const;
  /// Host bookkeeping of one sequence, counted in the statistics and the budget.
  std::size_t sequence_bookkeeping_bytes() const;
  std::size_t resident_bytes() const;

  /// Prepares and commits `writes` under the budget; returns reclaim_first when only reclaiming
  /// memory (which needs every other call to be out of the way) would let them fit.
  Attempt write_under_budget(std::span<const LayerWrite<T>> writes, std::size_t extra_bookkeeping, bool may_reclaim,
                             const std::string& what);
  /// Runs `attempt` (a write under the budget); reclaims and retries once when it asks to.
  template <class Fn>
  void with_reclaim(Fn&& attempt);
  static void apply(Layer& layer, const LayerWrite<T>& write);
  /// A write's tokens in the rotated space (the inputs themselves when nothing is rotated).
  RotatedInput<T> rotated(const T* k, const T* v, std::size_t rows, void* stream) const;

  CacheConfig cfg_;
  std::vector<CodecParams> codecs_;  ///< per layer (CacheConfig::layer_k_rel / layer_v_rel)
  TailPolicy tails_;
  std::size_t row_;  // values per token: num_kv_heads * head_dim
  std::unique_ptr<Backend<T>> backend_;
  mutable RwLock table_lock_;
  std::unordered_map<SeqId, std::unique_ptr<Sequence>> sequences_;
  mutable std::mutex memory_mutex_;
};

extern template class CacheCore<float>;
extern template class CacheCore<fp16_t>;
extern template class CacheCore<bf16_t>;

}  // namespace packkv::detail

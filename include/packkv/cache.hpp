// PackedKVCache<T>: a paged KV cache whose blocks are PackKV-compressed as they fill, with
// attention computed directly on the packed blocks.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <shared_mutex>  // std::shared_lock
#include <span>
#include <vector>

#include "packkv/config.hpp"
#include "packkv/error.hpp"
#include "packkv/stats.hpp"
#include "packkv/types.hpp"

namespace packkv {

using SeqId = std::uint64_t;

namespace detail {
template <class T>
class CacheBackend;
class RwLock;
}

/// A compressed KV cache for one model.
///
/// Layouts (row-major, contiguous):
///   k, v     [n_tokens][num_kv_heads][head_dim]   (K after RoPE)
///   q, out   [batch][num_q_heads][head_dim]
///   scores   [num_q_heads][length]                 (original token order)
///   weights  [num_q_heads][length]
/// On Device::cuda every pointer is a device pointer and work is queued on the cache's stream.
///
/// Every method validates its arguments; on any error it throws packkv::error and leaves the cache
/// exactly as it was. Thread safety: every method may be called concurrently from any thread;
/// reading methods (const) run in parallel, changing methods are serialised. Query heads map to KV heads in groups: q head j reads KV head
/// j / (num_q_heads / num_kv_heads).
template <class T>
class PackedKVCache {
  static_assert(is_storage_type_v<T>, "PackedKVCache<T>: T must be float, fp16_t or bf16_t");

 public:
  using value_type = T;

  explicit PackedKVCache(const CacheConfig& config);
  ~PackedKVCache();
  PackedKVCache(PackedKVCache&&) noexcept;
  PackedKVCache& operator=(PackedKVCache&&) noexcept;
  PackedKVCache(const PackedKVCache&) = delete;
  PackedKVCache& operator=(const PackedKVCache&) = delete;

  const CacheConfig& config() const noexcept { return config_; }

  // ---- sequences ----
  void add_sequence(SeqId id);
  void remove_sequence(SeqId id);
  bool contains(SeqId id) const;
  std::size_t num_sequences() const;
  std::vector<SeqId> sequence_ids() const;
  /// Tokens appended to `layer` of sequence `id`.
  std::int64_t length(SeqId id, int layer = 0) const;

  // ---- writing ----
  /// Appends n_tokens (1 for decode, many for prefill) to one layer. Full blocks are compressed;
  /// the rest stays in the uncompressed tail. All-or-nothing: on error nothing is appended.
  /// Rejects NaN, Inf and |x| > 65504 (the per-token parameters are stored as fp16).
  void append(SeqId id, int layer, const T* k, const T* v, int n_tokens);

  // ---- attention ----
  /// Decode attention for one query per sequence: out[b] = softmax(scale * K q[b]) V.
  void attention(std::span<const SeqId> ids, int layer, const T* q, T* out, float softmax_scale) const;
  /// scores[h][t] = K_t . q[h] for every token of the sequence (no scale, no softmax).
  void scores(SeqId id, int layer, const T* q, float* scores) const;
  /// out[h][c] = sum_t weights[h][t] * V_t[c].
  void attn_v(SeqId id, int layer, const float* weights, float* out) const;

  // ---- inspection ----
  /// Dequantized K and V of a sequence, original token order: [length][num_kv_heads][head_dim].
  void read_back(SeqId id, int layer, float* k, float* v) const;
  MemoryStats memory_stats() const;

  // ---- moving sequences ----
  /// Serialises a sequence's packed blocks and tails (the listed layers; all when empty) into a
  /// self-describing, checksummed image (docs/format.md). Blocks are copied, not re-encoded.
  std::vector<std::uint8_t> export_sequence(SeqId id, std::span<const int> layers = {}) const;
  /// Loads an image made by export_sequence, into this or another cache whose config is
  /// compatible (same storage type, KV heads, head_dim, block size, code ranges, K mode and
  /// repacking on/off). Creates the sequence if it does not exist; otherwise every layer in the
  /// image must be empty in it. The image is untrusted: it is validated completely, and a corrupt,
  /// truncated or incompatible image throws packkv::error and changes nothing.
  void import_sequence(SeqId id, std::span<const std::uint8_t> image);

  // ---- memory ----
  /// Hands cached empty pages back to the system (removed sequences leave such pages behind).
  void release_unused_memory();

  /// CUDA stream (a cudaStream_t) that device work is queued on; ignored on the CPU.
  void set_stream(void* cuda_stream);

 private:
  std::shared_lock<detail::RwLock> read_lock(const char* what) const;
  std::unique_lock<detail::RwLock> write_lock(const char* what);
  void check_sequence(SeqId id, const char* what) const;
  void check_layer(int layer, const char* what) const;

  CacheConfig config_;
  std::unique_ptr<detail::RwLock> mutex_;  // readers share, writers exclude (see cache.cpp)
  std::unique_ptr<detail::CacheBackend<T>> backend_;
};

extern template class PackedKVCache<float>;
extern template class PackedKVCache<fp16_t>;
extern template class PackedKVCache<bf16_t>;

}  // namespace packkv

// PackedKVCache<T>: a paged KV cache whose blocks are PackKV-compressed as they fill, with
// attention computed directly on the packed blocks.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "packkv/config.hpp"
#include "packkv/error.hpp"
#include "packkv/stats.hpp"
#include "packkv/types.hpp"

namespace packkv {

using SeqId = std::uint64_t;

namespace detail {
template <class T>
class CacheCore;
}

/// A compressed KV cache for one model.
///
/// Layouts (row-major, contiguous):
///   k, v     [n_tokens][num_kv_heads][head_dim]   (K after RoPE)
///   q, out   [batch][num_q_heads][head_dim]
///   scores   [num_q_heads][length]                 (original token order)
///   weights  [num_q_heads][length]
///   (scores_batch, attn_v_batch: one such array per sequence, back to back; see there)
/// On Device::cuda every pointer is a device pointer and work is queued on the cache's stream.
/// Query heads map to KV heads in groups: q head j reads KV head j / (num_q_heads / num_kv_heads).
///
/// Errors: every method validates its arguments; on any error it throws packkv::error and leaves
/// the cache exactly as it was (on Device::cuda, values are checked by the device: see
/// docs/cuda.md for when those checks report).
///
/// Thread safety: every method may be called concurrently from any thread. Calls on different
/// sequences run in parallel (an append to one sequence does not wait for attention on another);
/// calls on one sequence read in parallel and write one at a time; adding, removing and importing
/// sequences briefly excludes every other call. docs/architecture.md has the full contract.
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
  void append(SeqId id, int layer, const T* k, const T* v, int n_tokens, void* cuda_stream = nullptr);
  /// Appends n_tokens[i] tokens to sequence ids[i] at one layer, for every i, in one call: a
  /// continuous-batching decode step (n_tokens[i] = 1) or a batch of prefill chunks. k and v hold
  /// the tokens of ids[0], then of ids[1], ...: [sum of n_tokens][num_kv_heads][head_dim]. The same
  /// bytes as the per-sequence calls, all-or-nothing for the whole batch (a refusal names the entry
  /// and changes no sequence); ids must be distinct. On CUDA the batch is one tail-write launch and
  /// one encoder launch whatever its size.
  void append_batch(std::span<const SeqId> ids, int layer, const T* k, const T* v, std::span<const int> n_tokens,
                    void* cuda_stream = nullptr);

  /// Makes sequence `child` (a new id) a copy of `parent` that shares its packed blocks: parallel
  /// sampling, beam search, a cached prompt prefix. Only the uncompressed tails are copied; blocks
  /// are immutable and reference-counted (freed with their last owner), so appends, truncation or
  /// removal of either never affect the other. memory_stats() counts shared blocks once and reports
  /// them in shared_block_bytes. All-or-nothing (the child's tails and tables count against the budget).
  void fork(SeqId parent, SeqId child);
  /// Drops the tokens at positions >= new_length from every layer of sequence `id` that is longer
  /// (shorter layers are left alone): speculative decoding, stop-sequence rollback, or evening out
  /// the layers after a step that failed part-way. Every kept token keeps the value it reads back
  /// now: bit for bit when the cut is at or after the layer's first uncompressed token (no work, no
  /// memory); when the cut falls inside a packed block, that block's kept tokens return to the tail
  /// as their dequantized values (rounded to T) and are quantized again when a later append seals
  /// them, moving by at most their bound once more (docs/architecture.md, "Truncation"). Blocks are never
  /// unsealed, so a truncated layer may hold more packed tokens than one built to that length.
  /// All-or-nothing; new_length 0 empties the layers and frees their memory.
  void truncate(SeqId id, std::int64_t new_length);

  // ---- attention ----
  // The calls that queue device work take an optional CUDA stream (a cudaStream_t; null: the
  // cache's stream, set_stream). The call's work is ordered after what was queued on that stream
  // before the call, and what is queued on it after the call sees the call's results; no call
  // waits for the device. Ignored on the CPU.

  /// Decode attention for one query per sequence: out[b] = softmax(scale * K q[b]) V.
  void attention(std::span<const SeqId> ids, int layer, const T* q, T* out, float softmax_scale,
                 void* cuda_stream = nullptr) const;
  /// Attention of several queries per sequence over the cache, causal among them: chunked prefill
  /// and the verification of draft tokens. Sequence ids[i] has n_queries[i] queries, for its last
  /// n_queries[i] positions at `layer` (their K and V already appended): query j sits at position
  /// length - n_queries[i] + j and attends to positions <= its own. Each packed block is read once
  /// per KV head for every query of a sequence.
  ///   q, out  [sum of n_queries][num_q_heads][head_dim] (the queries of ids[0] first, in order)
  ///   lse     optional: [sum of n_queries][num_q_heads], ln(sum_t e^(scale q.k_t)) of each
  ///           (query, head) over the keys it attends to.
  /// Merge rule (attention over two disjoint sets of keys, outputs o1, o2 and lse1, lse2):
  ///   lse = max(lse1, lse2) + ln(e^(lse1 - max) + e^(lse2 - max)),
  ///   o = e^(lse1 - lse) o1 + e^(lse2 - lse) o2.
  /// With every n_queries[i] = 1 this is attention(), plus the lse.
  void attention_causal(std::span<const SeqId> ids, std::span<const int> n_queries, int layer, const T* q, T* out,
                        float softmax_scale, float* lse = nullptr, void* cuda_stream = nullptr) const;
  /// scores[h][t] = K_t . q[h] for every token of the sequence (no scale, no softmax).
  void scores(SeqId id, int layer, const T* q, float* scores, void* cuda_stream = nullptr) const;
  /// out[h][c] = sum_t weights[h][t] * V_t[c].
  void attn_v(SeqId id, int layer, const float* weights, float* out, void* cuda_stream = nullptr) const;
  /// scores() and attn_v() for a batch of sequences in one call (on CUDA, one launch per 32
  /// sequences on the fast read path). Ragged layout, L_i = length(ids[i], layer), the sequences
  /// one after another in the order of ids:
  ///   q        [ids.size()][num_q_heads][head_dim]
  ///   scores   sequence i's [num_q_heads][L_i] (original token order) at offset
  ///   weights  num_q_heads * (L_0 + ... + L_{i-1}): num_q_heads * sum(L_i) floats in all
  ///   out      [ids.size()][num_q_heads][head_dim]
  /// The same values as the per-sequence calls (on CUDA up to rounding: a batch may split the work
  /// differently). Refused (packkv::error, nothing written) for an empty batch, an unknown id, a bad
  /// layer or a null pointer, and on the CPU for a NaN or Inf in q or the weights; an id may repeat.
  void scores_batch(std::span<const SeqId> ids, int layer, const T* q, float* scores,
                    void* cuda_stream = nullptr) const;
  void attn_v_batch(std::span<const SeqId> ids, int layer, const float* weights, float* out,
                    void* cuda_stream = nullptr) const;

  // ---- inspection ----
  /// Dequantized K and V of a sequence, original token order: [length][num_kv_heads][head_dim].
  /// The values are the same bits on every backend.
  void read_back(SeqId id, int layer, float* k, float* v) const;
  MemoryStats memory_stats() const;
  /// Admission control: an upper bound of the bytes that appending n_tokens[i] tokens to every
  /// layer of sequence ids[i] (for every i), and adding one new sequence per entry of
  /// new_sequence_tokens with that many tokens in every layer, would add to
  /// memory_stats().resident_bytes, whatever the values (every new block at its worst-case size).
  /// A step fits the budget if this is <= memory_stats().free_budget_bytes. Changes nothing.
  std::size_t worst_case_bytes(std::span<const SeqId> ids, std::span<const int> n_tokens,
                               std::span<const int> new_sequence_tokens = {}) const;

  // ---- moving sequences ----
  /// Serialises a sequence's packed blocks and tails (the listed layers; all when empty) into a
  /// self-describing, checksummed image (docs/format.md). Blocks are copied, not re-encoded.
  std::vector<std::uint8_t> export_sequence(SeqId id, std::span<const int> layers = {}) const;
  /// Loads an image made by export_sequence, into this or another cache whose config is
  /// compatible (same storage type, KV heads, head_dim, block size, code ranges, K mode and
  /// repacking on/off). Creates the sequence if it does not exist; otherwise every layer in the
  /// image must be empty in it. The image is untrusted: it is validated completely, and a corrupt,
  /// truncated, incompatible or unaffordable image throws packkv::error and changes nothing.
  /// The entropy-coded form of an image (encode_image_entropy, image_coding.hpp) is accepted too.
  void import_sequence(SeqId id, std::span<const std::uint8_t> image);

  // ---- memory ----
  /// Compacts the block pool and hands memory no block needs back to the system.
  void release_unused_memory();

  /// The cache's CUDA stream (a cudaStream_t): device work is queued on it, and the calls that
  /// take a stream of their own join it to this one (see attention); ignored on the CPU.
  void set_stream(void* cuda_stream);
  /// With CacheConfig::cuda_poll_errors: the first value error a CUDA kernel has found since the
  /// last poll (it names the call, sequence and layer), without waiting for the device; nullopt if
  /// none. An engine polls after its steps; no other call throws these errors then. CPU: nullopt.
  std::optional<std::string> poll_device_error();

 private:
  detail::CacheCore<T>& core(const char* what) const;

  CacheConfig config_;
  std::unique_ptr<detail::CacheCore<T>> core_;
};

extern template class PackedKVCache<float>;
extern template class PackedKVCache<fp16_t>;
extern template class PackedKVCache<bf16_t>;

}  // namespace packkv

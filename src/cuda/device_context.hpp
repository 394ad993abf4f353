// What every part of the CUDA backend shares: the layers' geometries, the stream, the device page pool,
// the mapped error record and placement words, scratch buffers, and each layer's device storage
// (CudaLayerStore). The write path (write_path.cpp), the read path (read_path.cpp) and the
// backend facade (cuda_backend.cpp) work on one DeviceContext, under its mutex.
//
// Memory: a layer's blocks are packed tightly into device pages it owns. Only the device knows a
// block's size once it is encoded, so the host reserves pages for the worst case of every
// placement it has not yet seen complete, the device places blocks with their real sizes, and
// each placement's resulting cursor comes back in a word of mapped memory that the host reads
// without a synchronisation (docs/cuda.md).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <deque>
#include <limits>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "core/backend.hpp"
#include "cuda/cuda_support.hpp"
#include "launch.hpp"

namespace packkv::detail::cuda {

inline constexpr std::size_t kNoWord = std::numeric_limits<std::size_t>::max();

struct UnseenPlacement {
  std::uint32_t launch;  ///< the placement's launch number (its progress word carries it)
  int blocks;
};

class DeviceContext;

/// One (sequence, layer) on the device: its blocks, where they are placed, and its tail ring.
class CudaLayerStore final : public LayerStore {
 public:
  explicit CudaLayerStore(DeviceContext& context) : context_(context) {}
  ~CudaLayerStore() override;
  CudaLayerStore(const CudaLayerStore&) = delete;
  CudaLayerStore& operator=(const CudaLayerStore&) = delete;

  DeviceBuffer table;  ///< std::uint8_t*[table_capacity]: each block's address
  std::size_t table_capacity = 0;
  std::vector<std::uint8_t*> pages;  ///< pages owned, in placement order
  DeviceBuffer page_list;            ///< PlacementCursor, then std::uint8_t*[page_list_capacity]
  std::size_t page_list_capacity = 0;
  std::size_t progress_word = kNoWord;  ///< index into the context's mapped words
  std::uint32_t seen_page = 0;          ///< cursor after the last placement seen complete
  std::uint32_t seen_offset = 0;
  std::deque<UnseenPlacement> unseen;   ///< placements queued but not yet seen complete
  DeviceBuffer ring;                    ///< tail ring: K rows, then V rows, ring_capacity each
  int ring_capacity = 0;
  /// Exact rows of the first CacheConfig::sink_tokens positions, K rows then V rows: held from
  /// the sealing of the layer's first block on (before it the tail holds them).
  DeviceBuffer sinks;
  std::size_t live_blocks = 0;          ///< blocks in the table
  std::size_t shared_pages = 0;         ///< leading pages shared with the layer it was forked from
  mutable std::size_t live_bytes = 0;   ///< their bytes, as the last memory_stats measured them
  mutable std::size_t repeated_blocks = 0;  ///< of them, shared blocks another layer counted (same)

  PlacementCursor* cursor() const { return page_list.as<PlacementCursor>(); }
  std::uint8_t** page_pointers() const {
    return reinterpret_cast<std::uint8_t**>(page_list.as<std::uint8_t>() + sizeof(PlacementCursor));
  }
  template <class T>
  const T* ring_k() const {
    return ring.as<const T>();
  }
  template <class T>
  const T* ring_v(std::size_t row_elems) const {
    return ring.data() != nullptr ? ring.as<const T>() + static_cast<std::size_t>(ring_capacity) * row_elems : nullptr;
  }

 private:
  DeviceContext& context_;
};

inline const CudaLayerStore& store_of(const LayerRead& layer) { return static_cast<const CudaLayerStore&>(*layer.store); }
inline CudaLayerStore& store_of(LayerStore* store) { return static_cast<CudaLayerStore&>(*store); }

class DeviceContext {
 public:
  DeviceContext(const CacheConfig& config, std::span<const CodecParams> layer_codecs, std::size_t value_bytes);
  ~DeviceContext();
  DeviceContext(const DeviceContext&) = delete;
  DeviceContext& operator=(const DeviceContext&) = delete;

  // ---- fixed by the config ----
  std::vector<CodecParams> layer_codecs;  ///< per layer (CacheConfig::layer_k_rel / layer_v_rel)
  /// Every layer's shape with the widest code bits of any layer: what sizes staging slots, shared
  /// memory and the fast path's plans, so that any layer's blocks fit. A kernel that reads or
  /// writes a layer's blocks takes that layer's geometry (geometry_of).
  format::BlockGeometry widest;
  std::size_t row_elems;      ///< values per token: num_kv_heads * head_dim
  std::size_t value_bytes;    ///< sizeof(T)
  int num_q_heads;
  int group;                  ///< query heads per KV head
  int heads_per_cta;          ///< min(group, kMaxHeadsPerCta)
  int subgroups;              ///< ceil(group / heads_per_cta)
  bool median_repack;
  bool strict;                ///< CacheConfig::cuda_strict
  bool poll_errors;           ///< CacheConfig::cuda_poll_errors
  bool rotate_k;              ///< CacheConfig::rotate_k
  bool rotate_v;              ///< CacheConfig::rotate_v
  int sink_tokens;            ///< CacheConfig::sink_tokens
  std::size_t slot_bytes;     ///< a worst-case block, 256-byte aligned (staging slots)
  int sm_count = 1;
  FastPlan fast{};            ///< the fast read path's plan for this geometry (usable or not)
  FastPlan fast_multi{};      ///< the same with the most rows per CTA (attention of several queries)
  FastPlan fast_scores{};     ///< the fast path's plans for scores (K staged) and attn_v (V staged)
  FastPlan fast_attn_v{};

  // ---- device state ----
  cudaStream_t stream = nullptr;
  DevicePagePool pool;
  std::size_t blocks_per_page_worst;
  MappedWords progress;
  std::uint32_t next_launch = 1;
  DeviceBuffer staging;    ///< worst-case slots of the blocks being encoded (staged, launch.hpp)
  DeviceBuffer workspace;  ///< split-attention partials
  DeviceBuffer rotated_queries;  ///< queries rotated into K's space (rotate_k)
  DeviceBuffer tickets;    ///< the fast path's merge counters, zero between launches
  DeviceBuffer launch_params;  ///< parameter arrays of batched launches (uploaded per write)
  std::unordered_set<CudaLayerStore*> stores;
  std::size_t owned_bytes = 0;  ///< tables, page lists, rings and sink rows of every layer
  /// References beyond the first to pages that forked layers share (a page returns to the pool
  /// with its last owner); most pages have none.
  std::unordered_map<std::uint8_t*, std::uint32_t> page_extra_refs;
  /// The host core runs calls on different sequences at once; the device state above is shared.
  std::mutex mutex;

  // ---- helpers ----
  const CodecParams& codec_of(int layer) const { return layer_codecs[static_cast<std::size_t>(layer)]; }
  const format::BlockGeometry& geometry_of(int layer) const { return codec_of(layer).geometry; }
  std::size_t table_bytes(std::size_t capacity) const { return capacity * sizeof(std::uint8_t*); }
  std::size_t page_list_bytes(std::size_t capacity) const {
    return capacity == 0 ? 0 : sizeof(PlacementCursor) + capacity * sizeof(std::uint8_t*);
  }
  std::size_t ring_bytes(int capacity) const { return 2 * static_cast<std::size_t>(capacity) * row_elems * value_bytes; }
  std::size_t sink_bytes() const { return 2 * static_cast<std::size_t>(sink_tokens) * row_elems * value_bytes; }
  /// Blocks encoded per launch round of one write.
  std::int64_t blocks_per_round() const;
  std::size_t resident_bytes() const;
  std::size_t scratch_bytes() const;

  /// Throws the first value error a kernel reported, if any (and re-arms reporting).
  /// (With poll_errors, later-call reports are left for take_device_error.)
  void raise_device_error(ErrorOrigin origin = ErrorOrigin::later_call);
  /// The first value error a kernel reported, if any, as a message (and re-arms reporting).
  std::optional<std::string> take_device_error(ErrorOrigin origin = ErrorOrigin::later_call);
  ErrorContext errors_for(SeqId sequence, int layer) const;
  /// Learns from the layer's progress word which placements completed (no synchronisation).
  void refresh_placement(CudaLayerStore& store);
  /// Pages a layer of `blocks` blocks may need: from the last cursor seen, what still fits in its
  /// page at worst-case size for the `pending` blocks not yet seen placed, then whole pages.
  std::size_t pages_bound(std::size_t blocks, std::uint32_t seen_page, std::uint32_t seen_offset,
                          std::int64_t pending) const;
  std::size_t pages_bound(const CudaLayerStore& store, std::int64_t new_blocks) const;
  void give_back_pages(CudaLayerStore& store, std::size_t keep);
  /// Drops a layer's reference to a page: back to the pool with the last one.
  void release_page(std::uint8_t* page);
  /// Writes pointer-table entries: a few as kernel parameters, a long list by a copy.
  void publish_pointers(const std::vector<std::uint8_t*>& host, std::size_t first, std::uint8_t** device);
  /// Frees everything a layer holds (in stream order).
  void clear(CudaLayerStore& store);
  float* workspace_floats(std::size_t floats);
  /// Scratch for `bytes` of rotated queries (grows, never shrinks).
  void* rotated_query_bytes(std::size_t bytes);
  /// At least `count` merge counters, all zero (new ones are cleared in stream order).
  unsigned* ticket_words(std::size_t count);
  void set_error_stream() { error_claim_.set_stream(stream); }
  /// Two events for joining a caller's stream to `stream` (CallerStream), made on first use.
  cudaEvent_t join_event(int which);

 private:
  cudaEvent_t join_events_[2] = {nullptr, nullptr};
  DeviceError* error_host_ = nullptr;
  DeviceError* error_device_ = nullptr;
  DeviceBuffer error_claim_;  ///< device memory: the claim word of the error record
};

/// A call made on the caller's stream (the calls that take a cudaStream_t). The cache keeps all
/// its work on its own stream (stream-ordered frees and page reuse rely on one order), so the
/// call's work goes there between two joins: the cache's stream waits for what the caller queued
/// before the call, and the caller's stream waits for the call's work. Events only, no host wait.
/// Construct and finish() under the context's mutex.
class CallerStream {
 public:
  CallerStream(DeviceContext& ctx, void* caller);
  ~CallerStream();  // joins back on the way out of a failed call too (best effort)
  CallerStream(const CallerStream&) = delete;
  CallerStream& operator=(const CallerStream&) = delete;
  /// The caller's stream waits for everything the call queued; throws on a CUDA error.
  void finish();

 private:
  DeviceContext& ctx_;
  cudaStream_t caller_ = nullptr;  ///< null when the call runs on the cache's stream anyway
};

}  // namespace packkv::detail::cuda

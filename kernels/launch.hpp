// The interface between the CUDA backend's host code (src/cuda, compiled by the host compiler,
// where fmt may be used) and its kernels (kernels/*.cu): plain parameter structs passed by value,
// and launchers that return cudaError_t after checking the launch.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "core/tail.hpp"
#include "packkv/format.hpp"
#include "packkv/types.hpp"

namespace packkv::detail::cuda {

using detail::TailRing;
using detail::TokenRows;

/// The first invalid value a kernel met. It lives in mapped, pinned host memory: the host reads it
/// without a synchronisation and raises packkv::error on its next call. Only plain stores reach it
/// (atomics on host memory are not portable over PCIe): which thread reports is decided by an
/// atomic on a claim word in device memory.
struct DeviceError {
  int ready;  ///< set once the fields below are written
  int reserved0;
  int kind;    ///< ErrorKind
  int tensor;  ///< 0: K, 1: V
  int layer;
  int head;
  int channel;  ///< -1 when the error concerns a whole token
  int reserved;
  std::uint64_t sequence;
  std::int64_t token;  ///< position in the sequence
  float value;
  float value2;
};
enum ErrorKind : int { kBadValue = 1, kRangeTooWide = 2, kPlacementOverflow = 3, kBadQuery = 4 };

struct ErrorContext {
  DeviceError* error;  ///< may be null (then invalid values are not reported)
  int* claim;          ///< device memory, 0 until a thread reports
  std::uint64_t sequence;
  int layer;
};

// ---- writing --------------------------------------------------------------------------------

/// The encoder writes each block *staged*, in a worst-case slot: one CTA per (block, KV head), and
/// a head's section offsets in the tight block depend on the sizes of the heads before it. Head h
/// writes its token order at its place, its K section at staged_head_offset(g, h), its V section
/// max K section bytes after it, and the two section sizes in its directory entry (k_offset: K
/// bytes, v_offset: V bytes); the header is not written. compact_block (encode.cu: the placement
/// copy, launch_compact_blocks) turns a staged block into the tight one, byte for byte the CPU
/// encoder's. The staged heads fill exactly max_block_bytes() less the trailing slack.
PACKKV_HOST_DEVICE constexpr std::uint32_t staged_head_offset(const format::BlockGeometry& g, int head) {
  return g.sections_offset() +
         static_cast<std::uint32_t>(head) * (g.k_layout().max_section_bytes() + g.v_layout().max_section_bytes());
}

template <class T>
struct EncodeParams {
  format::BlockGeometry geometry;
  int k_max_code;
  int v_max_code;
  int median_repack;                ///< 1: median order; 0: arrival order
  TokenRows<T> source;              ///< block b holds positions first_position + [b, b + 1) * block_tokens
  std::int64_t first_position;
  std::uint8_t* out_base;           ///< block b is staged at out_base + b * out_stride
  std::size_t out_stride;           ///< >= max_block_bytes(), a multiple of 16
  ErrorContext errors;
  int num_blocks;                   ///< blocks of this write (batched launches)
};

/// Shared memory the encoder needs; the launcher refuses geometries beyond the device's limit.
std::size_t encode_shared_bytes(const format::BlockGeometry& g);

/// Stages `num_blocks` blocks: one launch, one CTA per (block, KV head).
template <class T>
cudaError_t launch_encode(const EncodeParams<T>& params, int num_blocks, cudaStream_t stream);
/// One launch for the blocks of many writes: `batch` (device memory) holds each write's params,
/// `max_blocks` the most blocks of one write; one CTA per (write, block, KV head).
template <class T>
cudaError_t launch_encode_batch(const EncodeParams<T>* batch, int count, int max_blocks, const format::BlockGeometry& g,
                                cudaStream_t stream);

/// Turns `num_blocks` staged blocks (base + b * stride) into tight blocks in place, each one's size
/// to sizes[b] (may be null): packkv::cuda::encode_blocks, whose callers get tight blocks.
struct CompactParams {
  format::BlockGeometry geometry;
  std::uint8_t* base;
  std::size_t stride;
  std::uint32_t* sizes;
  int num_blocks;
};
cudaError_t launch_compact_blocks(const CompactParams& params, cudaStream_t stream);

/// Copies positions [first, end) of `source` into a tail ring of `ring_capacity` rows (position p
/// to row p % ring_capacity), checking every value.
template <class T>
struct TailWriteParams {
  TokenRows<T> source;
  T* ring_k;
  T* ring_v;
  int ring_capacity;
  std::int64_t first;
  std::int64_t end;
  int head_dim;
  float value_limit;  ///< values beyond +-value_limit are errors: 65504, or 16384 with compact parameters
  ErrorContext errors;
};

template <class T>
cudaError_t launch_tail_write(const TailWriteParams<T>& params, cudaStream_t stream);
/// One launch for many tails (`batch` in device memory; `max_elements`: the most values of one).
template <class T>
cudaError_t launch_tail_write_batch(const TailWriteParams<T>* batch, int count, std::int64_t max_elements,
                                    cudaStream_t stream);

/// Strict mode: checks the n new tokens of `rows` (positions [rows.tail.end(), + n)) as the host
/// checks do (core/value_checks.hpp) before anything is changed; the host synchronises and throws
/// on a report.
template <class T>
struct ValidateParams {
  TokenRows<T> rows;
  int n_tokens;
  format::BlockGeometry geometry;
  int k_max_code;
  int v_max_code;
  ErrorContext errors;
};
template <class T>
cudaError_t launch_validate(const ValidateParams<T>& params, cudaStream_t stream);

/// Where the next encoded block of a (sequence, layer) goes: page index and byte offset in it.
struct PlacementCursor {
  std::uint32_t page;
  std::uint32_t offset;
};

/// Packs what the host learns about a placement into one 64-bit word, written by the device into
/// mapped host memory (a single aligned store, so the host never sees it torn).
PACKKV_HOST_DEVICE constexpr unsigned long long pack_progress(std::uint32_t launch, std::uint32_t page,
                                                              std::uint32_t offset) {
  // An offset too large for 20 bits saturates: the host then treats the page as full.
  const std::uint32_t offset_units = offset / 16u < 0xFFFFFu ? offset / 16u : 0xFFFFFu;
  return (static_cast<unsigned long long>(launch & 0xFFFFFFu) << 40) |
         (static_cast<unsigned long long>(page & 0xFFFFFu) << 20) | offset_units;
}
PACKKV_HOST_DEVICE constexpr std::uint32_t progress_launch(unsigned long long w) { return static_cast<std::uint32_t>(w >> 40); }
PACKKV_HOST_DEVICE constexpr std::uint32_t progress_page(unsigned long long w) {
  return static_cast<std::uint32_t>((w >> 20) & 0xFFFFFu);
}
/// The cursor's offset, or 0xFFFFF * 16 when it did not fit.
PACKKV_HOST_DEVICE constexpr std::uint32_t progress_offset(unsigned long long w) {
  return static_cast<std::uint32_t>(w & 0xFFFFFu) * 16u;
}

/// Moves staged blocks from their worst-case slots to their tight place in the layer's pages:
/// one warp walks the blocks in order, their sizes summed from the staged directories (a block
/// that does not fit the current page starts the next one), and writes the block table; then one
/// CTA per block writes its header and directory and copies its sections into place
/// (compact_block). A block that would land beyond the page list (an accounting error) is not
/// written: it records an error instead.
struct PlaceParams {
  format::BlockGeometry geometry;
  const std::uint8_t* staging;  ///< staged block b at staging + b * staging_stride
  std::size_t staging_stride;
  int num_blocks;
  std::uint8_t* const* pages;   ///< the layer's page list
  std::uint32_t page_count;     ///< entries of `pages`
  std::uint32_t page_bytes;
  PlacementCursor* cursor;       ///< device memory, updated
  std::uint8_t** table;          ///< entries [0, num_blocks) are written
  unsigned long long* progress;  ///< mapped host memory: pack_progress(launch, cursor)
  std::uint32_t launch;
  ErrorContext errors;
};
cudaError_t launch_place_blocks(const PlaceParams& params, cudaStream_t stream);
/// Placement and copies for many writes in two launches (`batch` in device memory, every entry of
/// geometry `g`).
cudaError_t launch_place_batch(const PlaceParams* batch, int count, int max_blocks, const format::BlockGeometry& g,
                               cudaStream_t stream);
/// Shared memory of the copy and compaction kernels: the tight section offsets of one block.
std::size_t compact_shared_bytes(const format::BlockGeometry& g);

/// Up to kInlineTableEntries new pointer-table entries, written by one tiny kernel.
inline constexpr int kInlineTableEntries = 32;
struct TableEntries {
  std::uint8_t* blocks[kInlineTableEntries];
  int count;
};
cudaError_t launch_write_table(std::uint8_t** table, TableEntries entries, cudaStream_t stream);

/// One pointer to store in device memory (batched launches: new page-list entries of many layers).
struct PointerWrite {
  std::uint8_t** at;
  std::uint8_t* value;
};
cudaError_t launch_write_pointers(const PointerWrite* writes, int count, cudaStream_t stream);

// ---- reading packed sequences --------------------------------------------------------------

/// The exact (uncompressed) tokens among a CTA's units: tail tokens [tail_first, tail_end), then
/// the `sinks` sink rows when its units hold the sink unit. Index t runs over [tail_first, end()).
struct ExactTokens {
  int tail_first, tail_end, sinks;
  PACKKV_HOST_DEVICE int end() const { return tail_end + sinks; }
};

/// One exact token's K and V rows (every head) and its position.
template <class T>
struct ExactRow {
  const T* k;
  const T* v;
  std::int64_t position;
};

/// One (sequence, layer) as the kernels see it.
template <class T>
struct SeqView {
  const std::uint8_t* const* blocks;  ///< device block table
  const T* tail_k;                    ///< tail rings [capacity][num_kv_heads][head_dim]
  const T* tail_v;
  /// Exact rows of positions [0, sinks) (LayerRead::sinks; 0 before the first block exists): K
  /// rows, then V rows, [sinks][num_kv_heads][head_dim] each. Readers use them instead of the
  /// first block's copies of those positions, which they hide.
  const T* sink_rows;
  int sinks;
  int num_blocks;
  TailRing tail;

  /// Units of work: the packed blocks, then the tail in block-sized chunks, then (when there are
  /// sinks) one unit of the sink rows.
  PACKKV_HOST_DEVICE int num_units(int block_tokens) const {
    return num_blocks + tail_units(block_tokens) + (sinks > 0 ? 1 : 0);
  }
  PACKKV_HOST_DEVICE int tail_units(int block_tokens) const { return (tail.len + block_tokens - 1) / block_tokens; }
  PACKKV_HOST_DEVICE bool is_sink_unit(int unit, int block_tokens) const {
    return sinks > 0 && unit == num_blocks + tail_units(block_tokens);
  }
  /// Ring row of tail token i (0 = the first tail token).
  PACKKV_HOST_DEVICE int tail_row(int i) const { return tail.row(tail.begin + i); }
  PACKKV_HOST_DEVICE const T* sink_k() const { return sink_rows; }
  PACKKV_HOST_DEVICE const T* sink_v(std::size_t row_elems) const {
    return sink_rows + static_cast<std::size_t>(sinks) * row_elems;
  }
  /// Positions below this in packed block `b` are hidden (the sink rows replace them).
  PACKKV_HOST_DEVICE int hidden_below(int b) const { return b == 0 ? sinks : 0; }
  /// The exact tokens among units [unit_begin, unit_end).
  PACKKV_HOST_DEVICE ExactTokens exact_tokens(int unit_begin, int unit_end, int block_tokens) const {
    ExactTokens e{};
    const int tail_end = (unit_end - num_blocks) * block_tokens;
    e.tail_end = tail_end < 0 ? 0 : (tail_end < tail.len ? tail_end : tail.len);
    const int tail_first = (unit_begin > num_blocks ? unit_begin - num_blocks : 0) * block_tokens;
    e.tail_first = tail_first < e.tail_end ? tail_first : e.tail_end;
    const int sink_unit = num_blocks + tail_units(block_tokens);
    e.sinks = sinks > 0 && unit_begin <= sink_unit && sink_unit < unit_end ? sinks : 0;
    return e;
  }
  /// Exact token t of `e`: a tail token (its ring row) or, past tail_end, a sink row.
  PACKKV_HOST_DEVICE ExactRow<T> exact_row(const ExactTokens& e, int t, std::size_t row_elems) const {
    if (t >= e.tail_end) {
      const int j = t - e.tail_end;
      return ExactRow<T>{sink_k() + j * row_elems, sink_v(row_elems) + j * row_elems, j};
    }
    const std::size_t row = static_cast<std::size_t>(tail_row(t)) * row_elems;
    return ExactRow<T>{tail_k + row, tail_v + row, tail.begin + t};
  }
};

/// Query heads a CTA handles at once: a packed block is decoded once for all of them.
inline constexpr int kMaxHeadsPerCta = 8;
/// Sequences per attention launch (kernel parameters stay well under 4 KiB).
inline constexpr int kMaxBatchPerLaunch = 32;

struct ReadShape {
  format::BlockGeometry geometry;
  int num_q_heads;
  int group;          ///< query heads per KV head
  int heads_per_cta;  ///< min(group, kMaxHeadsPerCta)
  int subgroups;      ///< ceil(group / heads_per_cta)
};

/// Attention serves query rows: row r of a (sequence, KV head) is the sequence's query r / group
/// and query head kv_head * group + r % group; a CTA takes heads_per_cta consecutive rows (one
/// query's group in decode), `subgroups` CTAs per KV head cover the longest sequence's rows.
template <class T>
struct AttentionParams {
  ReadShape shape;
  SeqView<T> seqs[kMaxBatchPerLaunch];
  int query_first[kMaxBatchPerLaunch];  ///< sequence b's first query in q, out and lse
  int query_count[kMaxBatchPerLaunch];  ///< its queries: the last positions, causal among themselves
  int batch;
  int queries;  ///< all queries of the launch
  const T* q;   ///< [queries][num_q_heads][head_dim]
  T* out;
  float* lse;   ///< optional: [queries][num_q_heads], natural log
  float softmax_scale;
  int units_per_split;
  int num_splits;
  float* partials;  ///< [queries][num_q_heads][num_splits][head_dim + 2]: acc, max, sum

  /// Index of row r of (sequence b, KV head h) in [queries][num_q_heads].
  PACKKV_HOST_DEVICE std::size_t query_row(int b, int h, int r) const {
    return (static_cast<std::size_t>(query_first[b]) + static_cast<std::size_t>(r / shape.group)) * shape.num_q_heads +
           static_cast<std::size_t>(h * shape.group + r % shape.group);
  }
  /// Row r of sequence b sees the positions below this.
  PACKKV_HOST_DEVICE std::int64_t row_limit(int b, int r) const {
    return seqs[b].tail.end() - query_count[b] + r / shape.group + 1;
  }
  /// The rows of sequence b a CTA serves, from blockIdx.y: [first, first + count) of KV head kv_head.
  struct CtaRows {
    int kv_head, first, count;  ///< count <= 0: nothing to do
  };
  PACKKV_HOST_DEVICE CtaRows cta_rows(int b, int y) const {
    const int first = (y % shape.subgroups) * shape.heads_per_cta;
    const int left = query_count[b] * shape.group - first;
    return CtaRows{y / shape.subgroups, first, left < shape.heads_per_cta ? left : shape.heads_per_cta};
  }
  // The fast read path (decode_attention.cu) only:
  int stages;         ///< blocks staged at once (FastPlan::stages)
  unsigned* tickets;  ///< [batch][num_kv_heads * subgroups], zero between launches
  ErrorContext errors;  ///< where a NaN or Inf in q is reported (sequence: the batch index)
};

/// The kernels of attention.cu: any geometry, 256-thread CTAs, a separate merge launch.
template <class T>
cudaError_t launch_attention(const AttentionParams<T>& params, cudaStream_t stream);

// ---- the fast read path (decode_attention.cu) ------------------------------------------------

/// Packed blocks one CTA of the fast path may own (their spans are kept in shared memory).
inline constexpr int kFastMaxBlocksPerCta = 512;

/// Shared memory of one staged (K, V) span of a head: the worst case of the geometry, plus slack
/// for the 12-byte reads a decoder makes at a pack's start.
PACKKV_HOST_DEVICE std::size_t fast_stage_bytes(const format::BlockGeometry& g) {
  return format::align_up(g.k_layout().max_section_bytes() + g.v_layout().max_section_bytes() + 16u, format::kAlign);
}

/// Whether the fast path serves a geometry, and how: its query heads per CTA, stages, shared
/// memory and resident CTAs per SM (from shared memory; one-warp CTAs).
struct FastPlan {
  bool usable;
  int heads_per_cta;
  int subgroups;
  int stages;
  std::size_t shared_bytes;
  int ctas_per_sm;
};
FastPlan plan_fast_attention(const ReadShape& shape, int shared_limit);

/// One launch: split attention and, in the last CTA of each (sequence, KV head, subgroup), the
/// merge. `params.shape` carries the plan's heads_per_cta and subgroups.
template <class T>
cudaError_t launch_fast_attention(const AttentionParams<T>& params, std::size_t shared_bytes, cudaStream_t stream);

/// `scores` and `attn_v` on the fast read path (fast_primitives.cu), batched: sequence b's scores
/// and weights are [num_q_heads][length[b]] floats at offset first[b] of the call's array (original
/// token order), its queries and attn_v outputs row b of [batch][num_q_heads][head_dim].
template <class T>
struct PrimitiveParams {
  ReadShape shape;  ///< heads_per_cta and subgroups from the plan
  SeqView<T> seqs[kMaxBatchPerLaunch];
  std::int64_t first[kMaxBatchPerLaunch];
  std::int64_t length[kMaxBatchPerLaunch];
  int batch;
  const T* q;            ///< scores: [batch][num_q_heads][head_dim]
  float* scores;         ///< scores: the output
  const float* weights;  ///< attn_v: the input
  float* out;            ///< attn_v: [batch][num_q_heads][head_dim]
  int units_per_split;
  int num_splits;
  int stages;            ///< FastPlan::stages
  float* partials;       ///< attn_v: [batch][num_q_heads][num_splits][head_dim]
  unsigned* tickets;     ///< attn_v: [batch][num_kv_heads * subgroups], zero between launches
};
/// Whether the fast path serves `scores` (side k: only K sections are staged) or `attn_v` (side v)
/// for a geometry, and how.
FastPlan plan_fast_primitive(const ReadShape& shape, int shared_limit, format::Side side);
/// One launch for the scores of `params.batch` sequences.
template <class T>
cudaError_t launch_fast_scores(const PrimitiveParams<T>& params, std::size_t shared_bytes, cudaStream_t stream);
/// One launch for attn_v of `params.batch` sequences: partial sums and, in the last CTA of each
/// (sequence, KV head, subgroup), their sum.
template <class T>
cudaError_t launch_fast_attn_v(const PrimitiveParams<T>& params, std::size_t shared_bytes, cudaStream_t stream);

/// The first read path's scores and attn_v (attention.cu): one sequence, any geometry.
template <class T>
struct ScoresParams {
  ReadShape shape;
  SeqView<T> seq;
  const T* q;     ///< [num_q_heads][head_dim]
  float* scores;  ///< [num_q_heads][length]
  std::int64_t length;
};
template <class T>
cudaError_t launch_scores(const ScoresParams<T>& params, cudaStream_t stream);

template <class T>
struct AttnVParams {
  ReadShape shape;
  SeqView<T> seq;
  const float* weights;  ///< [num_q_heads][length]
  float* out;            ///< [num_q_heads][head_dim]
  std::int64_t length;
  int units_per_split;
  int num_splits;
  float* partials;  ///< [num_q_heads][num_splits][head_dim]
};
template <class T>
cudaError_t launch_attn_v(const AttnVParams<T>& params, cudaStream_t stream);

template <class T>
struct ReadBackParams {
  format::BlockGeometry geometry;
  SeqView<T> seq;
  float* k;  ///< [length][num_kv_heads][head_dim]
  float* v;
};
template <class T>
cudaError_t launch_read_back(const ReadBackParams<T>& params, cudaStream_t stream);

/// Adds the payload, descriptor, block, K section and V section bytes of `count` blocks (a block
/// table) to counters[0..4].
cudaError_t launch_block_stats(const format::BlockGeometry& g, const std::uint8_t* const* blocks, int count,
                               unsigned long long* counters, cudaStream_t stream);

// ---- the Hadamard rotation (rotate.cu) --------------------------------------------------------

/// Rotates `vectors` head vectors of head_dim values from `in` to `out` (may be the same): into
/// the rotated space when `forward`, back out of it otherwise (core/rotation.hpp, bit for bit).
template <class In, class Out>
struct RotateParams {
  const In* in;
  Out* out;
  std::size_t vectors;
  int head_dim;
  int forward;
};
template <class In, class Out>
cudaError_t launch_rotate(const RotateParams<In, Out>& params, cudaStream_t stream);

/// Shared memory of the reading kernels, and whether the device can give it.
std::size_t read_shared_bytes(const format::BlockGeometry& g);

}  // namespace packkv::detail::cuda

// Kernels that read packed sequences: fused decode attention (flash-decoding split + merge),
// the scores and attn_v primitives, read_back, and block statistics.
//
// A CTA owns one KV head, up to kMaxHeadsPerCta of its query heads (in attention: query rows,
// a (query, head) pair each, launch.hpp), and a range of "units": a unit is one packed block,
// one block-sized chunk of the uncompressed tail, or the exact sink rows (whose positions the
// first block's unit hides: CacheConfig::sink_tokens). A packed section is
// unpacked once into a channel-major code tile in shared memory, then every query head of the CTA
// reads it, so each block is decoded once per GQA group. Scale and min are applied per token:
//   q . k_t = step_t * (q . codes_t) + min_t * sum(q)
//   sum_t w_t v_t = sum_t (w_t step_t) codes_t + sum_t w_t min_t
// and for per-channel K the steps are folded into q once per block. Accumulation is fp32.
#include <cstdint>

#include "core/softmax_merge.hpp"
#include "detail/packed_block.cuh"
#include "launch.hpp"

namespace packkv::detail::cuda {

namespace {

using format::SectionLayout;

struct ReaderShared {
  std::uint8_t* codes;  // [head_dim][code_row_stride(block_tokens)]
  float* step;          // [max(block_tokens, head_dim)]
  float* min;
  float* q;            // [kMaxHeadsPerCta][head_dim]
  float* q_folded;     // q * per-channel K step
  float* probs;        // [kMaxHeadsPerCta][block_tokens]
  float* acc;          // [kMaxHeadsPerCta][head_dim]
  float* running_max;  // [kMaxHeadsPerCta] each
  float* running_sum;
  float* rescale;
  float* q_sum;
  float* k_offset;      // per-channel K: sum_c q_c min_c of the current block
  float* weighted_min;  // sum_t w_t min_t of the current block
  std::uint32_t* scan;
  std::uint8_t* order;  // [block_tokens]
};

__host__ __device__ std::size_t reader_shared_layout(const format::BlockGeometry& g, unsigned char* base,
                                                     ReaderShared* out) {
  const std::size_t tokens = static_cast<std::size_t>(g.block_tokens), dim = static_cast<std::size_t>(g.head_dim);
  const std::size_t params = tokens > dim ? tokens : dim;
  SharedCarver carve{base};
  ReaderShared s{};
  s.codes = carve.take(dim * static_cast<std::size_t>(code_row_stride(g.block_tokens)));
  s.step = carve.take_array<float>(params);
  s.min = carve.take_array<float>(params);
  s.q = carve.take_array<float>(kMaxHeadsPerCta * dim);
  s.q_folded = carve.take_array<float>(kMaxHeadsPerCta * dim);
  s.probs = carve.take_array<float>(kMaxHeadsPerCta * tokens);
  s.acc = carve.take_array<float>(kMaxHeadsPerCta * dim);
  s.running_max = carve.take_array<float>(kMaxHeadsPerCta);
  s.running_sum = carve.take_array<float>(kMaxHeadsPerCta);
  s.rescale = carve.take_array<float>(kMaxHeadsPerCta);
  s.q_sum = carve.take_array<float>(kMaxHeadsPerCta);
  s.k_offset = carve.take_array<float>(kMaxHeadsPerCta);
  s.weighted_min = carve.take_array<float>(kMaxHeadsPerCta);
  s.scan = carve.take_array<std::uint32_t>(kScanScratchWords);
  s.order = carve.take(tokens);
  if (out != nullptr) *out = s;
  return carve.used;
}

/// Which KV head and query heads a CTA serves, from blockIdx.y.
struct HeadGroup {
  int kv_head;
  int first_q_head;
  int count;
};
__device__ __forceinline__ HeadGroup head_group(const ReadShape& shape) {
  HeadGroup h;
  h.kv_head = blockIdx.y / shape.subgroups;
  const int sub = blockIdx.y % shape.subgroups;
  const int first_in_group = sub * shape.heads_per_cta;
  h.first_q_head = h.kv_head * shape.group + first_in_group;
  const int left = shape.group - first_in_group;
  h.count = left < shape.heads_per_cta ? left : shape.heads_per_cta;
  return h;
}

/// The sums of the CTA's queries (s.q, loaded).
__device__ void sum_queries(const HeadGroup& heads, int dim, ReaderShared& s) {
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int g = warp; g < heads.count; g += kWarps) {
    float sum = 0.0f;
    for (int c = lane; c < dim; c += 32) sum += s.q[g * dim + c];
    sum = warp_sum(sum);
    if (lane == 0) s.q_sum[g] = sum;
  }
  __syncthreads();
}

/// Loads the CTA's query heads (as float) and their sums.
template <class T>
__device__ void load_queries(const T* q, const HeadGroup& heads, int dim, ReaderShared& s) {
  for (int i = threadIdx.x; i < heads.count * dim; i += kThreads) {
    s.q[i] = load_as_float(q + static_cast<std::size_t>(heads.first_q_head) * dim + i);
  }
  sum_queries(heads, dim, s);
}

/// Attention: loads the CTA's query rows [first_row, first_row + heads.count) of a sequence whose
/// first query is `first_query` (AttentionParams::query_row's layout).
template <class T>
__device__ void load_query_rows(const T* q, int first_query, int num_q_heads, int group, const HeadGroup& heads,
                                int first_row, int dim, ReaderShared& s) {
  for (int i = threadIdx.x; i < heads.count * dim; i += kThreads) {
    const int row = first_row + i / dim;
    const std::size_t at = (static_cast<std::size_t>(first_query) + static_cast<std::size_t>(row / group)) * num_q_heads +
                           static_cast<std::size_t>(heads.kv_head * group + row % group);
    s.q[i] = load_as_float(q + at * dim + i % dim);
  }
  sum_queries(heads, dim, s);
}

/// Causal mask of one unit's scores (s.probs, `count` tokens): row h (query (first_row + h) /
/// group) sees the positions below first_limit + its query's offset from the first row's, and
/// none below `hidden_below` (the first block's copies of the sinks). A score of a position it
/// does not see becomes -inf. `order`: the block's stored order (null: arrival order).
__device__ PACKKV_NOINLINE void mask_unit(const HeadGroup& heads, int tokens, int group, int first_row,
                                          std::int64_t first_limit, std::int64_t first_position,
                                          const std::uint8_t* order, int count, int hidden_below, ReaderShared& s) {
  for (int i = threadIdx.x; i < heads.count * tokens; i += kThreads) {
    const int h = i / tokens, t = i % tokens;
    if (t >= count) continue;
    const std::int64_t position = first_position + (order != nullptr ? order[t] : t);
    const std::int64_t limit = first_limit + (first_row + h) / group - first_row / group;
    if (position >= limit || position < hidden_below) s.probs[i] = -INFINITY;
  }
  __syncthreads();
}

/// A unit past the packed blocks: a tail chunk or the sink rows (SeqView::exact_tokens). Its
/// token i is exact token tokens.tail_first + i, at position first_position + i.
template <class T>
struct ExactUnit {
  const SeqView<T>& seq;
  ExactTokens tokens;
  int count;
  std::int64_t first_position;
  __device__ ExactRow<T> row(int i, std::size_t row_elems) const {
    return seq.exact_row(tokens, tokens.tail_first + i, row_elems);
  }
};

template <class T>
__device__ ExactUnit<T> exact_unit(const SeqView<T>& seq, int unit, int block_tokens, std::size_t row_elems) {
  const ExactTokens e = seq.exact_tokens(unit, unit + 1, block_tokens);
  const int count = e.end() - e.tail_first;
  return ExactUnit<T>{seq, e, count, count > 0 ? seq.exact_row(e, e.tail_first, row_elems).position : 0};
}

/// Scores of a packed block's tokens, in packed order, into s.probs[g][i] (times `scale`).
__device__ void packed_block_scores(const std::uint8_t* block, const format::BlockGeometry& g, const HeadGroup& heads,
                                    float scale, ReaderShared& s) {
  const int dim = g.head_dim, tokens = g.block_tokens, stride = code_row_stride(tokens);
  const SectionLayout layout = g.k_layout();
  const std::uint8_t* section = block + format::head_entry(block, g, heads.kv_head).k_offset;
  load_section_params(section, layout, s.step, s.min);
  unpack_section_to_shared(section, layout, s.codes, stride, s.scan);
  __syncthreads();
  const float* q_rows = s.q;
  if (g.k_per_channel) {
    for (int i = threadIdx.x; i < heads.count * dim; i += kThreads) s.q_folded[i] = s.q[i] * s.step[i % dim];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int h = warp; h < heads.count; h += kWarps) {
      float sum = 0.0f;
      for (int c = lane; c < dim; c += 32) sum += s.q[h * dim + c] * s.min[c];
      sum = warp_sum(sum);
      if (lane == 0) s.k_offset[h] = sum;
    }
    __syncthreads();
    q_rows = s.q_folded;
  }
  // Four neighbouring threads share four tokens (one 32-bit word of codes per channel) and split
  // the channels between them: a quarter of the shared-memory loads of one thread per token, and
  // every thread busy. The loop bound is uniform so that all lanes reach the shuffles.
  const int words = tokens / 4, items = heads.count * words * 4;
  for (int base = 0; base < items; base += kThreads) {
    const int item = base + static_cast<int>(threadIdx.x);
    const bool active = item < items;
    const int quarter = item & 3, h = active ? (item >> 2) / words : 0, word = (item >> 2) % words;
    float dots[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (active) {
      const float* q = q_rows + h * dim;
      for (int c = quarter; c < dim; c += 4) {
        const std::uint32_t packed = *reinterpret_cast<const std::uint32_t*>(s.codes + c * stride + 4 * word);
        const float qc = q[c];
        dots[0] += qc * static_cast<float>(packed & 0xFFu);
        dots[1] += qc * static_cast<float>((packed >> 8) & 0xFFu);
        dots[2] += qc * static_cast<float>((packed >> 16) & 0xFFu);
        dots[3] += qc * static_cast<float>(packed >> 24);
      }
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      dots[k] += __shfl_xor_sync(kFullMask, dots[k], 1);
      dots[k] += __shfl_xor_sync(kFullMask, dots[k], 2);
    }
    if (active && quarter == 0) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int i = 4 * word + k;
        const float score =
            g.k_per_channel ? dots[k] + s.k_offset[h] : s.step[i] * dots[k] + s.min[i] * s.q_sum[h];
        s.probs[h * tokens + i] = score * scale;
      }
    }
  }
  __syncthreads();
}

/// Scores of a unit's `count` exact tokens: one warp per token, reading the row once.
template <class T>
__device__ void exact_scores(const ExactUnit<T>& unit, const format::BlockGeometry& g, const HeadGroup& heads,
                             float scale, ReaderShared& s) {
  const int dim = g.head_dim, tokens = g.block_tokens;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const std::size_t row_elems = static_cast<std::size_t>(g.num_heads) * dim;
  for (int i = warp; i < unit.count; i += kWarps) {
    const T* row = unit.row(i, row_elems).k + static_cast<std::size_t>(heads.kv_head) * dim;
    float dots[kMaxHeadsPerCta] = {};
    for (int c = lane; c < dim; c += 32) {
      const float x = load_as_float(row + c);
#pragma unroll
      for (int h = 0; h < kMaxHeadsPerCta; ++h) {
        if (h < heads.count) dots[h] += s.q[h * dim + c] * x;
      }
    }
#pragma unroll
    for (int h = 0; h < kMaxHeadsPerCta; ++h) {
      if (h < heads.count) {
        const float dot = warp_sum(dots[h]);
        if (lane == 0) s.probs[h * tokens + i] = dot * scale;
      }
    }
  }
  __syncthreads();
}

/// Unpacks a block's V section and turns s.probs (weights in packed order) into w_t * step_t,
/// with sum_t w_t min_t in s.weighted_min.
__device__ void prepare_packed_values(const std::uint8_t* block, const format::BlockGeometry& g, const HeadGroup& heads,
                                      ReaderShared& s) {
  const int tokens = g.block_tokens;
  const SectionLayout layout = g.v_layout();
  const std::uint8_t* section = block + format::head_entry(block, g, heads.kv_head).v_offset;
  load_section_params(section, layout, s.step, s.min);
  unpack_section_to_shared(section, layout, s.codes, code_row_stride(tokens), s.scan);
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int h = warp; h < heads.count; h += kWarps) {
    float weighted_min = 0.0f;
    for (int i = lane; i < tokens; i += 32) {
      const float w = s.probs[h * tokens + i];
      weighted_min += w * s.min[i];
      s.probs[h * tokens + i] = w * s.step[i];
    }
    weighted_min = warp_sum(weighted_min);
    if (lane == 0) s.weighted_min[h] = weighted_min;
  }
  __syncthreads();
}

/// acc[h][c] = acc[h][c] * rescale[h] + sum_t probs[h][t] codes[c][t] + weighted_min[h].
__device__ void accumulate_packed_values(const format::BlockGeometry& g, const HeadGroup& heads, ReaderShared& s) {
  const int dim = g.head_dim, tokens = g.block_tokens, stride = code_row_stride(tokens);
  for (int pair = threadIdx.x; pair < heads.count * dim; pair += kThreads) {
    const int h = pair / dim, c = pair % dim;
    const float* w = s.probs + h * tokens;
    const auto* row = reinterpret_cast<const std::uint32_t*>(s.codes + c * stride);
    float sum = 0.0f;
    for (int word = 0; word < tokens / 4; ++word) {
      const std::uint32_t packed = row[word];
      sum += w[4 * word + 0] * static_cast<float>(packed & 0xFFu);
      sum += w[4 * word + 1] * static_cast<float>((packed >> 8) & 0xFFu);
      sum += w[4 * word + 2] * static_cast<float>((packed >> 16) & 0xFFu);
      sum += w[4 * word + 3] * static_cast<float>(packed >> 24);
    }
    s.acc[pair] = s.acc[pair] * s.rescale[h] + sum + s.weighted_min[h];
  }
  __syncthreads();
}

template <class T>
__device__ void accumulate_exact_values(const ExactUnit<T>& unit, const format::BlockGeometry& g, const HeadGroup& heads,
                                        ReaderShared& s) {
  const int dim = g.head_dim, tokens = g.block_tokens;
  const std::size_t row_elems = static_cast<std::size_t>(g.num_heads) * dim;
  for (int pair = threadIdx.x; pair < heads.count * dim; pair += kThreads) {
    const int h = pair / dim, c = pair % dim;
    float sum = 0.0f;
    for (int i = 0; i < unit.count; ++i) {
      sum += s.probs[h * tokens + i] *
             load_as_float(unit.row(i, row_elems).v + static_cast<std::size_t>(heads.kv_head) * dim + c);
    }
    s.acc[pair] = s.acc[pair] * s.rescale[h] + sum;
  }
  __syncthreads();
}

/// Online softmax over the unit's `count` scores: probs become exp(score - new max).
__device__ void online_softmax_step(const HeadGroup& heads, int tokens, int count, ReaderShared& s) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int h = warp; h < heads.count; h += kWarps) {
    float* scores = s.probs + h * tokens;
    float unit_max = -INFINITY;
    for (int i = lane; i < count; i += 32) unit_max = fmaxf(unit_max, scores[i]);
    unit_max = warp_max(unit_max);
    const float old_max = s.running_max[h];
    const float new_max = fmaxf(old_max, unit_max);
    // A row that has seen only masked scores keeps max -inf and weights 0 (never -inf - -inf).
    const float reference = new_max == -INFINITY ? 0.0f : new_max;
    float sum = 0.0f;
    for (int i = lane; i < tokens; i += 32) {
      const float p = i < count ? expf(scores[i] - reference) : 0.0f;
      scores[i] = p;
      sum += p;
    }
    sum = warp_sum(sum);
    __syncwarp();  // every lane has read running_max[h] before lane 0 rewrites it
    if (lane == 0) {
      const float rescale = old_max == -INFINITY ? 0.0f : expf(old_max - new_max);
      s.rescale[h] = rescale;
      s.running_sum[h] = s.running_sum[h] * rescale + sum;
      s.running_max[h] = new_max;
    }
  }
  __syncthreads();
}

template <class T>
__global__ void __launch_bounds__(kThreads) attention_split_kernel(const AttentionParams<T> p) {
  PACKKV_DYNAMIC_SHARED(shared_bytes);
  ReaderShared s;
  const format::BlockGeometry& g = p.shape.geometry;
  reader_shared_layout(g, shared_bytes, &s);
  const int batch_index = blockIdx.z, split = blockIdx.x;
  const auto rows = p.cta_rows(batch_index, blockIdx.y);
  if (rows.count <= 0) return;  // this sequence has fewer rows than the longest
  const HeadGroup heads{rows.kv_head, 0, rows.count};
  const int first_row = rows.first;
  const SeqView<T>& seq = p.seqs[batch_index];
  const int dim = g.head_dim, tokens = g.block_tokens;

  load_query_rows(p.q, p.query_first[batch_index], p.shape.num_q_heads, p.shape.group, heads, first_row, dim, s);
  for (int i = threadIdx.x; i < heads.count * dim; i += kThreads) s.acc[i] = 0.0f;
  if (threadIdx.x < kMaxHeadsPerCta) {
    s.running_max[threadIdx.x] = -INFINITY;
    s.running_sum[threadIdx.x] = 0.0f;
  }
  __syncthreads();

  const int units = seq.num_units(tokens);
  const int unit_begin = split * p.units_per_split;
  const int unit_end = min(unit_begin + p.units_per_split, units);
  for (int unit = unit_begin; unit < unit_end; ++unit) {
    if (unit < seq.num_blocks) {
      const std::uint8_t* block = seq.blocks[unit];
      packed_block_scores(block, g, heads, p.softmax_scale, s);
      // The CTA's first row has the smallest limit: units before it are seen by every row.
      const std::int64_t first_position = static_cast<std::int64_t>(unit) * tokens;
      const std::int64_t min_limit = p.row_limit(batch_index, first_row);
      const int hidden = seq.hidden_below(unit);
      if (first_position + tokens > min_limit || hidden > 0) {
        mask_unit(heads, tokens, p.shape.group, first_row, min_limit, first_position,
                  format::token_order(block, g, heads.kv_head), tokens, hidden, s);
      }
      online_softmax_step(heads, tokens, tokens, s);
      prepare_packed_values(block, g, heads, s);
      accumulate_packed_values(g, heads, s);
    } else {
      const ExactUnit<T> exact = exact_unit(seq, unit, tokens, static_cast<std::size_t>(g.num_heads) * dim);
      exact_scores(exact, g, heads, p.softmax_scale, s);
      const std::int64_t min_limit = p.row_limit(batch_index, first_row);
      if (exact.first_position + exact.count > min_limit) {
        mask_unit(heads, tokens, p.shape.group, first_row, min_limit, exact.first_position, nullptr, exact.count, 0, s);
      }
      online_softmax_step(heads, tokens, exact.count, s);
      accumulate_exact_values(exact, g, heads, s);
    }
  }

  const int stride = dim + 2;
  for (int i = threadIdx.x; i < heads.count * stride; i += kThreads) {
    const int h = i / stride, c = i % stride;
    const std::size_t row = p.query_row(batch_index, heads.kv_head, first_row + h) * p.num_splits + split;
    const float value = c < dim ? s.acc[h * dim + c] : (c == dim ? s.running_max[h] : s.running_sum[h]);
    p.partials[row * stride + c] = value;
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) attention_merge_kernel(const AttentionParams<T> p) {
  const int dim = p.shape.geometry.head_dim, stride = dim + 2;
  const std::size_t head_row = blockIdx.x;  // query * num_q_heads + q_head
  const float* partials = p.partials + head_row * p.num_splits * stride;
  detail::SoftmaxMerge merge;
  for (int split = 0; split < p.num_splits; ++split) merge.observe(partials[split * stride + dim]);
  for (int split = 0; split < p.num_splits; ++split) merge.add(partials[split * stride + dim], partials[split * stride + dim + 1]);
  for (int c = threadIdx.x; c < dim; c += kThreads) {
    float sum = 0.0f;
    for (int split = 0; split < p.num_splits; ++split) {
      const float w = merge.weight(partials[split * stride + dim]);
      if (w != 0.0f) sum += partials[split * stride + c] * w;
    }
    p.out[head_row * dim + c] = from_float<T>(sum / merge.sum);
  }
  if (p.lse != nullptr && threadIdx.x == 0) p.lse[head_row] = merge.lse();
}

template <class T>
__global__ void __launch_bounds__(kThreads, 4) scores_kernel(const ScoresParams<T> p) {
  PACKKV_DYNAMIC_SHARED(shared_bytes);
  ReaderShared s;
  const format::BlockGeometry& g = p.shape.geometry;
  reader_shared_layout(g, shared_bytes, &s);
  const HeadGroup heads = head_group(p.shape);
  const int dim = g.head_dim, tokens = g.block_tokens, unit = blockIdx.x;
  load_queries(p.q, heads, dim, s);
  int count = tokens;
  const std::uint8_t* order = nullptr;
  std::int64_t unit_start = static_cast<std::int64_t>(unit) * tokens;
  if (unit < p.seq.num_blocks) {
    const std::uint8_t* block = p.seq.blocks[unit];
    packed_block_scores(block, g, heads, 1.0f, s);
    order = format::token_order(block, g, heads.kv_head);
  } else {
    const ExactUnit<T> exact = exact_unit(p.seq, unit, tokens, static_cast<std::size_t>(g.num_heads) * dim);
    exact_scores(exact, g, heads, 1.0f, s);
    count = exact.count;
    unit_start = exact.first_position;
  }
  // The sink unit writes the sinks' scores; the first block's unit leaves those positions alone.
  const int hidden = unit < p.seq.num_blocks ? p.seq.hidden_below(unit) : 0;
  for (int pair = threadIdx.x; pair < heads.count * count; pair += kThreads) {
    const int h = pair / count, i = pair % count;
    const int token = order != nullptr ? order[i] : i;
    if (token < hidden) continue;
    p.scores[static_cast<std::int64_t>(heads.first_q_head + h) * p.length + unit_start + token] =
        s.probs[h * tokens + i];
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) attn_v_kernel(const AttnVParams<T> p) {
  PACKKV_DYNAMIC_SHARED(shared_bytes);
  ReaderShared s;
  const format::BlockGeometry& g = p.shape.geometry;
  reader_shared_layout(g, shared_bytes, &s);
  const HeadGroup heads = head_group(p.shape);
  const int dim = g.head_dim, tokens = g.block_tokens, split = blockIdx.x;
  for (int i = threadIdx.x; i < heads.count * dim; i += kThreads) s.acc[i] = 0.0f;
  if (threadIdx.x < kMaxHeadsPerCta) s.rescale[threadIdx.x] = 1.0f;
  __syncthreads();
  const int units = p.seq.num_units(tokens);
  const int unit_begin = split * p.units_per_split;
  const int unit_end = min(unit_begin + p.units_per_split, units);
  for (int unit = unit_begin; unit < unit_end; ++unit) {
    const bool packed = unit < p.seq.num_blocks;
    const std::uint8_t* block = packed ? p.seq.blocks[unit] : nullptr;
    const std::uint8_t* order = packed ? format::token_order(block, g, heads.kv_head) : nullptr;
    // (Of a packed unit, exact_unit gives no exact tokens.)
    const ExactUnit<T> exact = exact_unit(p.seq, unit, tokens, static_cast<std::size_t>(g.num_heads) * dim);
    const int count = packed ? tokens : exact.count;
    const std::int64_t unit_start = packed ? static_cast<std::int64_t>(unit) * tokens : exact.first_position;
    // The first block's copies of the sinks weigh nothing: the sink unit's exact rows take them.
    const int hidden = packed ? p.seq.hidden_below(unit) : 0;
    for (int pair = threadIdx.x; pair < heads.count * tokens; pair += kThreads) {
      const int h = pair / tokens, i = pair % tokens;
      float w = 0.0f;
      if (i < count) {
        const int token = order != nullptr ? order[i] : i;
        if (token >= hidden) w = p.weights[static_cast<std::int64_t>(heads.first_q_head + h) * p.length + unit_start + token];
      }
      s.probs[pair] = w;
    }
    __syncthreads();
    if (packed) {
      prepare_packed_values(block, g, heads, s);
      accumulate_packed_values(g, heads, s);
    } else {
      accumulate_exact_values(exact, g, heads, s);
    }
  }
  for (int i = threadIdx.x; i < heads.count * dim; i += kThreads) {
    const int h = i / dim, c = i % dim;
    p.partials[(static_cast<std::size_t>(heads.first_q_head + h) * p.num_splits + split) * dim + c] = s.acc[i];
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) attn_v_sum_kernel(const AttnVParams<T> p) {
  const int dim = p.shape.geometry.head_dim;
  const std::size_t head = blockIdx.x;
  for (int c = threadIdx.x; c < dim; c += kThreads) {
    float sum = 0.0f;
    for (int split = 0; split < p.num_splits; ++split) sum += p.partials[(head * p.num_splits + split) * dim + c];
    p.out[head * dim + c] = sum;
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) read_back_kernel(const ReadBackParams<T> p) {
  PACKKV_DYNAMIC_SHARED(shared_bytes);
  ReaderShared s;
  const format::BlockGeometry& g = p.geometry;
  reader_shared_layout(g, shared_bytes, &s);
  const int dim = g.head_dim, tokens = g.block_tokens, stride = code_row_stride(tokens);
  const int unit = blockIdx.x, head = blockIdx.y;
  const std::size_t row_elems = static_cast<std::size_t>(g.num_heads) * dim;
  const std::int64_t unit_start = static_cast<std::int64_t>(unit) * tokens;
  if (unit >= p.seq.num_blocks) {
    const ExactUnit<T> exact = exact_unit(p.seq, unit, tokens, row_elems);
    for (int i = threadIdx.x; i < exact.count * dim; i += kThreads) {
      const int t = i / dim, c = i % dim;
      const ExactRow<T> row = exact.row(t, row_elems);
      const std::size_t from = static_cast<std::size_t>(head) * dim + c;
      const std::size_t to = (exact.first_position + t) * row_elems + static_cast<std::size_t>(head) * dim + c;
      p.k[to] = load_as_float(row.k + from);
      p.v[to] = load_as_float(row.v + from);
    }
    return;
  }
  const int hidden = p.seq.hidden_below(unit);  // the sink unit writes those rows
  const std::uint8_t* block = p.seq.blocks[unit];
  const format::HeadEntry entry = format::head_entry(block, g, head);
  const std::uint8_t* order = format::token_order(block, g, head);
  for (int which = 0; which < 2; ++which) {
    const SectionLayout layout = which == 0 ? g.k_layout() : g.v_layout();
    const bool per_channel = which == 0 && g.k_per_channel;
    const std::uint8_t* section = block + (which == 0 ? entry.k_offset : entry.v_offset);
    load_section_params(section, layout, s.step, s.min);
    unpack_section_to_shared(section, layout, s.codes, stride, s.scan);
    __syncthreads();
    float* out = which == 0 ? p.k : p.v;
    for (int i = threadIdx.x; i < tokens * dim; i += kThreads) {
      const int t = i / dim, c = i % dim;
      const int param = per_channel ? c : t;
      const int token = order != nullptr ? order[t] : t;
      if (token < hidden) continue;
      out[(unit_start + token) * row_elems + static_cast<std::size_t>(head) * dim + c] =
          format::dequantize(s.codes[c * stride + t], s.step[param], s.min[param]);
    }
    __syncthreads();
  }
}

// One CTA per block. Adds to counters[0..4]: payload, descriptor, block, K section and V section
// bytes. Each round's size is in its section's round table; its kind follows from the size.
__global__ void __launch_bounds__(kThreads)
    block_stats_kernel(format::BlockGeometry g, const std::uint8_t* const* blocks, unsigned long long* counters) {
  PACKKV_DYNAMIC_SHARED(shared_bytes);
  auto* warp_sums = reinterpret_cast<unsigned long long(*)[kWarps]>(shared_bytes);  // [4][kWarps]
  const std::uint8_t* block = blocks[blockIdx.x];
  const SectionLayout layouts[2] = {g.k_layout(), g.v_layout()};
  // 0: payload, 1: descriptors, 2: K sections, 3: V sections.
  unsigned long long sums[4] = {0, 0, 0, 0};
  const int rounds = static_cast<int>(layouts[0].rounds);
  for (int i = threadIdx.x; i < g.num_heads * 2 * rounds; i += kThreads) {
    const int head = i / (2 * rounds), which = i / rounds % 2, round = i % rounds;
    const std::uint8_t* section = format::section(block, g, head, which == 0 ? format::Side::k : format::Side::v);
    const SectionLayout& layout = layouts[which];
    const std::uint32_t end = format::round_end(section, layout, round);
    const std::uint32_t bytes = end - format::round_begin(section, layout, round);
    const std::uint32_t descriptor = bytes == layout.plain_round_bytes ? 0u : layout.descriptor_bytes;
    sums[0] += bytes - descriptor;
    sums[1] += descriptor;
    if (round == rounds - 1) sums[2 + which] += layout.section_bytes(end);
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    for (int offset = 16; offset > 0; offset >>= 1) sums[k] += __shfl_xor_sync(kFullMask, sums[k], offset);
    if ((threadIdx.x & 31) == 0) warp_sums[k][threadIdx.x >> 5] = sums[k];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long totals[4] = {0, 0, 0, 0};
    for (int w = 0; w < kWarps; ++w) {
      for (int k = 0; k < 4; ++k) totals[k] += warp_sums[k][w];
    }
    atomicAdd(counters, totals[0]);
    atomicAdd(counters + 1, totals[1]);
    atomicAdd(counters + 2, static_cast<unsigned long long>(format::block_bytes(block)));
    atomicAdd(counters + 3, totals[2]);
    atomicAdd(counters + 4, totals[3]);
  }
}


}  // namespace

std::size_t read_shared_bytes(const format::BlockGeometry& g) { return reader_shared_layout(g, nullptr, nullptr); }

template <class T>
cudaError_t launch_attention(const AttentionParams<T>& p, cudaStream_t stream) {
  const std::size_t shared = read_shared_bytes(p.shape.geometry);
  static const cudaError_t opt_in = opt_in_shared_memory(attention_split_kernel<T>);
  cudaError_t status = opt_in;
  if (status != cudaSuccess) return status;
  const dim3 grid(static_cast<unsigned>(p.num_splits),
                  static_cast<unsigned>(p.shape.geometry.num_heads * p.shape.subgroups),
                  static_cast<unsigned>(p.batch));
  PACKKV_LAUNCH(attention_split_kernel<T>, grid, kThreads, shared, stream, p);
  status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  const unsigned rows = static_cast<unsigned>(p.queries * p.shape.num_q_heads);
  PACKKV_LAUNCH(attention_merge_kernel<T>, rows, kThreads, 0, stream, p);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_scores(const ScoresParams<T>& p, cudaStream_t stream) {
  const int units = p.seq.num_units(p.shape.geometry.block_tokens);
  if (units == 0) return cudaSuccess;
  const std::size_t shared = read_shared_bytes(p.shape.geometry);
  static const cudaError_t opt_in = opt_in_shared_memory(scores_kernel<T>);
  cudaError_t status = opt_in;
  if (status != cudaSuccess) return status;
  const dim3 grid(static_cast<unsigned>(units), static_cast<unsigned>(p.shape.geometry.num_heads * p.shape.subgroups));
  PACKKV_LAUNCH(scores_kernel<T>, grid, kThreads, shared, stream, p);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_attn_v(const AttnVParams<T>& p, cudaStream_t stream) {
  const std::size_t shared = read_shared_bytes(p.shape.geometry);
  static const cudaError_t opt_in = opt_in_shared_memory(attn_v_kernel<T>);
  cudaError_t status = opt_in;
  if (status != cudaSuccess) return status;
  const dim3 grid(static_cast<unsigned>(p.num_splits),
                  static_cast<unsigned>(p.shape.geometry.num_heads * p.shape.subgroups));
  PACKKV_LAUNCH(attn_v_kernel<T>, grid, kThreads, shared, stream, p);
  status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  PACKKV_LAUNCH(attn_v_sum_kernel<T>, static_cast<unsigned>(p.shape.num_q_heads), kThreads, 0, stream, p);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_read_back(const ReadBackParams<T>& p, cudaStream_t stream) {
  const int units = p.seq.num_units(p.geometry.block_tokens);
  if (units == 0) return cudaSuccess;
  const std::size_t shared = read_shared_bytes(p.geometry);
  static const cudaError_t opt_in = opt_in_shared_memory(read_back_kernel<T>);
  cudaError_t status = opt_in;
  if (status != cudaSuccess) return status;
  const dim3 grid(static_cast<unsigned>(units), static_cast<unsigned>(p.geometry.num_heads));
  PACKKV_LAUNCH(read_back_kernel<T>, grid, kThreads, shared, stream, p);
  return cudaGetLastError();
}

cudaError_t launch_block_stats(const format::BlockGeometry& g, const std::uint8_t* const* blocks, int count,
                               unsigned long long* counters, cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  PACKKV_LAUNCH(block_stats_kernel, static_cast<unsigned>(count), kThreads, 4 * kWarps * sizeof(unsigned long long),
                stream, g, blocks, counters);
  return cudaGetLastError();
}

#define PACKKV_INSTANTIATE_READERS(T)                                                \
  template cudaError_t launch_attention<T>(const AttentionParams<T>&, cudaStream_t); \
  template cudaError_t launch_scores<T>(const ScoresParams<T>&, cudaStream_t);       \
  template cudaError_t launch_attn_v<T>(const AttnVParams<T>&, cudaStream_t);        \
  template cudaError_t launch_read_back<T>(const ReadBackParams<T>&, cudaStream_t);
PACKKV_INSTANTIATE_READERS(float)
PACKKV_INSTANTIATE_READERS(fp16_t)
PACKKV_INSTANTIATE_READERS(bf16_t)
#undef PACKKV_INSTANTIATE_READERS

}  // namespace packkv::detail::cuda

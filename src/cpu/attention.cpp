#include "cpu/attention.hpp"

#include <omp.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/rotation.hpp"
#include "core/softmax_merge.hpp"
#include "cpu_kernels/kernels.hpp"
#include "cpu/layer_store.hpp"

namespace packkv::detail::cpu {

namespace {

using format::Side;

// Tokens per attention task: long sequences are split so that one sequence can use every core.
constexpr int kMinChunkTokens = 1024;
// Query rows (query, head) of one task: its packed blocks are read from memory once for all of
// them (and decoded once per kMaxGroup rows, while they sit in the core's cache).
constexpr int kMaxTaskRows = 4 * kMaxGroup;

template <class T>
const T* ring_row(const T* ring, int row, std::size_t row_elems, int head, int dim) {
  return ring + static_cast<std::size_t>(row) * row_elems + static_cast<std::size_t>(head) * dim;
}

// Calls fn(i) for every token of a chunk's score row that a query row seen up to `limit` must not
// see, i being its index in the row: positions >= limit in the blocks [begin, end) (stored order),
// the tail (when with_tail) and the sink rows (the last `sinks` entries); and, when the chunk
// holds the sink rows, the first block's copies of the sinks (positions < sinks), which the exact
// rows replace. fn may see an index twice.
template <class Fn>
void for_each_hidden(const format::BlockGeometry& g, const LayerRead& layer, const std::uint8_t* const* blocks, int head,
                     int begin, int end, bool with_tail, int sinks, std::int64_t limit, Fn&& fn) {
  const int block = g.block_tokens;
  if (sinks > 0) {  // the chunk starts at block 0
    const std::uint8_t* order = format::token_order(blocks[0], g, head);
    for (int i = 0; i < block; ++i) {
      if ((order ? order[i] : i) < sinks) fn(i);
    }
  }
  const std::int64_t first_cut = std::max<std::int64_t>(begin, limit / block);
  for (std::int64_t b = first_cut; b < end; ++b) {
    const std::int64_t base = b * block;
    const std::uint8_t* order = format::token_order(blocks[b], g, head);
    const int at = static_cast<int>(b - begin) * block;
    for (int i = 0; i < block; ++i) {
      if (base + (order ? order[i] : i) >= limit) fn(at + i);
    }
  }
  int at = (end - begin) * block;
  if (with_tail) {
    for (std::int64_t t = std::max<std::int64_t>(0, limit - layer.tail.begin); t < layer.tail.len; ++t) {
      fn(at + static_cast<int>(t));
    }
    at += layer.tail.len;
  }
  for (std::int64_t t = std::max<std::int64_t>(0, limit); t < sinks; ++t) fn(at + static_cast<int>(t));
}

// Softmax-weighted attention of `rows` query rows (one KV head) over blocks [begin, end) (and the
// tail, and the exact sink rows when the chunk starts at block 0): row r sees the positions <
// limits[r]. Writes each row's max score, sum of exponentials (-inf and 0 when it sees none of the
// chunk) and unnormalised output.
template <class T>
void run_chunk(const ReadContext& ctx, const LayerRead& layer, int head, const float* qf, const std::int64_t* limits,
               int rows, int begin, int end, bool with_tail, float* row_max, float* row_sum, float* o) {
  const Kernels& kern = kernels();
  const format::BlockGeometry& g = ctx.codec(layer.layer).geometry;
  const CpuLayerStore<T>& store = store_of<T>(layer);
  const int dim = g.head_dim, block = g.block_tokens;
  const std::size_t row_elems = static_cast<std::size_t>(g.num_heads) * dim;
  const int tail = with_tail ? layer.tail.len : 0;
  const int sinks = begin == 0 && end > 0 ? layer.sinks : 0;
  const int tokens = (end - begin) * block + tail + sinks;
  std::fill(row_max, row_max + rows, -INFINITY);
  std::fill(row_sum, row_sum + rows, 0.0f);
  if (tokens == 0) {
    std::fill(o, o + static_cast<std::size_t>(rows) * dim, 0.0f);
    return;
  }
  thread_local std::vector<float> s;
  thread_local AlignedFloats acc;
  thread_local std::vector<const std::uint8_t*> blocks;
  const std::size_t stride = static_cast<std::size_t>(tokens);
  s.resize(static_cast<std::size_t>(rows) * stride);
  acc.assign(static_cast<std::size_t>(rows) * dim * 8, 0.0f);
  blocks.resize(static_cast<std::size_t>(end));
  for (int b = begin; b < end; ++b) blocks[static_cast<std::size_t>(b)] = store.blocks[static_cast<std::size_t>(b)].data;
  const format::SectionLayout k_layout = g.k_layout(), v_layout = g.v_layout();
  for (int b = begin; b < end; ++b) {
    const std::uint8_t* section = format::section(blocks[static_cast<std::size_t>(b)], g, head, Side::k);
    for (int r0 = 0; r0 < rows; r0 += kMaxGroup) {
      kern.section_scores(k_layout, g.k_per_channel, section, qf + static_cast<std::size_t>(r0) * dim,
                          std::min(kMaxGroup, rows - r0), s.data() + r0 * stride + static_cast<std::size_t>(b - begin) * block,
                          stride);
    }
  }
  const std::size_t tail_at = static_cast<std::size_t>(end - begin) * block;
  const DenseKernels<T>& dense = kern.dense<T>();
  if (tail > 0) {
    for_each_tail_run(layer.tail, [&](int first, int row, int count) {
      for (int r0 = 0; r0 < rows; r0 += kMaxGroup) {
        dense.scores(ring_row(store.ring_k.get(), row, row_elems, head, dim), row_elems, count, dim,
                     qf + static_cast<std::size_t>(r0) * dim, std::min(kMaxGroup, rows - r0),
                     s.data() + r0 * stride + tail_at + first, stride);
      }
    });
  }
  const std::size_t sinks_at = tail_at + static_cast<std::size_t>(tail);
  if (sinks > 0) {
    for (int r0 = 0; r0 < rows; r0 += kMaxGroup) {
      dense.scores(ring_row(store.sink_k.get(), 0, row_elems, head, dim), row_elems, sinks, dim,
                   qf + static_cast<std::size_t>(r0) * dim, std::min(kMaxGroup, rows - r0),
                   s.data() + r0 * stride + sinks_at, stride);
    }
  }
  // Causal mask (a row sees nothing from its limit on) and the first block's copies of the sinks:
  // hidden scores go to -inf for the softmax, and their weights to exactly 0 after it (the vector
  // exp clamps its argument).
  const std::int64_t chunk_first = static_cast<std::int64_t>(begin) * block;
  const std::int64_t chunk_end = with_tail ? layer.length : static_cast<std::int64_t>(end) * block;
  for (int r = 0; r < rows; ++r) {
    float* row = s.data() + r * stride;
    const std::int64_t limit = limits[r];
    if (limit <= chunk_first) {
      std::fill(row, row + tokens, 0.0f);  // sees none of the chunk: max -inf, sum 0
      continue;
    }
    const bool masked = limit < chunk_end || sinks > 0;
    if (masked) {
      for_each_hidden(g, layer, blocks.data(), head, begin, end, with_tail, sinks, limit,
                      [&](int i) { row[i] = -INFINITY; });
    }
    kern.softmax_rows(row, tokens, stride, 1, row_max + r, row_sum + r);
    if (masked) {
      for_each_hidden(g, layer, blocks.data(), head, begin, end, with_tail, sinks, limit,
                      [&](int i) { row[i] = 0.0f; });
    }
  }
  thread_local std::vector<float> min_term;
  min_term.assign(static_cast<std::size_t>(rows), 0.0f);
  for (int b = begin; b < end; ++b) {
    const std::uint8_t* section = format::section(blocks[static_cast<std::size_t>(b)], g, head, Side::v);
    for (int r0 = 0; r0 < rows; r0 += kMaxGroup) {
      kern.section_accumulate_v(v_layout, section, s.data() + r0 * stride + static_cast<std::size_t>(b - begin) * block,
                                stride, std::min(kMaxGroup, rows - r0), acc.data() + static_cast<std::size_t>(r0) * dim * 8,
                                min_term.data() + r0);
    }
  }
  if (tail > 0) {
    for_each_tail_run(layer.tail, [&](int first, int row, int count) {
      for (int r0 = 0; r0 < rows; r0 += kMaxGroup) {
        dense.accumulate_v(ring_row(store.ring_v.get(), row, row_elems, head, dim), row_elems, count, dim,
                           s.data() + r0 * stride + tail_at + first, stride, std::min(kMaxGroup, rows - r0),
                           acc.data() + static_cast<std::size_t>(r0) * dim * 8);
      }
    });
  }
  if (sinks > 0) {
    for (int r0 = 0; r0 < rows; r0 += kMaxGroup) {
      dense.accumulate_v(ring_row(store.sink_v.get(), 0, row_elems, head, dim), row_elems, sinks, dim,
                         s.data() + r0 * stride + sinks_at, stride, std::min(kMaxGroup, rows - r0),
                         acc.data() + static_cast<std::size_t>(r0) * dim * 8);
    }
  }
  finish_v(acc.data(), min_term.data(), rows, dim, o);
}

}  // namespace

namespace {

// The rotation of core/rotation.hpp with what the host can fix in advance: S as sign-bit masks
// (the SplitMix64 of rotation_flips costs as much as the transform), and the butterfly stages
// with a compile-time chunk, which the compiler vectorises. The same float operations in the same
// order as rotate_forward / rotate_back (a negation is a sign-bit flip), so the results are the
// same bits as the device's.
constexpr std::array<std::uint32_t, 256> kFlipMasks = [] {
  std::array<std::uint32_t, 256> m{};
  for (int c = 0; c < 256; ++c) m[static_cast<std::size_t>(c)] = rotation_flips(c) ? 0x80000000u : 0u;
  return m;
}();

void flip_signs(float* x, int head_dim) {
  for (int c = 0; c < head_dim; ++c) x[c] = std::bit_cast<float>(std::bit_cast<std::uint32_t>(x[c]) ^ kFlipMasks[c]);
}

template <int P>
void hadamard_chunks(float* x, int head_dim) {
  const float scale = rotation_scale(P);
  for (int c0 = 0; c0 < head_dim; c0 += P) {
    float* y = x + c0;
    for (int h = 1; h < P; h *= 2) {
      for (int i = 0; i < P; i += 2 * h) {
        for (int j = i; j < i + h; ++j) {
          const float a = y[j], b = y[j + h];
          y[j] = a + b;
          y[j + h] = a - b;
        }
      }
    }
    for (int c = 0; c < P; ++c) y[c] *= scale;
  }
}

void hadamard_host(float* x, int head_dim) {
  switch (rotation_chunk(head_dim)) {
    case 8: return hadamard_chunks<8>(x, head_dim);
    case 16: return hadamard_chunks<16>(x, head_dim);
    case 32: return hadamard_chunks<32>(x, head_dim);
    case 64: return hadamard_chunks<64>(x, head_dim);
    case 128: return hadamard_chunks<128>(x, head_dim);
    default: return hadamard_chunks<256>(x, head_dim);
  }
}

void rotate_host(float* x, int head_dim, bool forward) {
  if (forward) flip_signs(x, head_dim);
  hadamard_host(x, head_dim);
  if (!forward) flip_signs(x, head_dim);
}

}  // namespace

template <class T>
void rotate_rows(const T* in, T* out, std::size_t vectors, int head_dim, bool forward, int threads) {
  const DenseKernels<T>& convert = kernels().dense<T>();  // the storage type's conversions, vectorised
#pragma omp parallel for schedule(static) num_threads(threads) if (vectors > 256)
  for (std::size_t i = 0; i < vectors; ++i) {
    alignas(32) float x[256];
    convert.to_float(in + i * head_dim, x, static_cast<std::size_t>(head_dim));
    rotate_host(x, head_dim, forward);
    convert.from_float(x, out + i * head_dim, static_cast<std::size_t>(head_dim));
  }
}

void rotate_rows_back(float* x, std::size_t vectors, int head_dim, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (vectors > 256)
  for (std::size_t i = 0; i < vectors; ++i) rotate_host(x + i * head_dim, head_dim, false);
}

template <class T>
void causal_attention(const ReadContext& ctx, std::span<const LayerRead> batch, const T* q, T* out, float* lse,
                      float scale) {
  const format::BlockGeometry& g = ctx.codecs.front().geometry;  // the shape, which every layer shares
  const int kv_heads = g.num_heads, dim = g.head_dim, threads = ctx.threads;
  const int group = ctx.num_q_heads / kv_heads;

  // Tasks: (sequence, KV head, tile of query rows, range of blocks); the last range takes the tail.
  // Row r of a (sequence, KV head) is query r / group, head r % group of the group.
  struct Task {
    int batch, head, row_begin, rows, block_begin, block_end;
    bool tail;
    std::size_t out_at;  // first row of the task's partial outputs
  };
  std::vector<std::size_t> first_query(batch.size());
  std::size_t base_tasks = 0, queries = 0;
  for (std::size_t b = 0; b < batch.size(); ++b) {
    first_query[b] = queries;
    queries += static_cast<std::size_t>(batch[b].queries);
    const int rows = batch[b].queries * group;
    base_tasks += static_cast<std::size_t>(kv_heads) * static_cast<std::size_t>((rows + kMaxTaskRows - 1) / kMaxTaskRows);
  }
  std::vector<Task> tasks;
  std::size_t partial_rows = 0;
  for (std::size_t b = 0; b < batch.size(); ++b) {
    const int blocks = batch[b].num_blocks, rows = batch[b].queries * group;
    // Split only when the batch alone cannot keep every thread busy.
    int chunks = 1;
    if (base_tasks < static_cast<std::size_t>(2 * threads)) {
      const int wanted = static_cast<int>((2 * threads + base_tasks - 1) / base_tasks);
      const int by_size = std::max(1, blocks * g.block_tokens / kMinChunkTokens);
      chunks = std::min(wanted, by_size);
    }
    for (int h = 0; h < kv_heads; ++h) {
      for (int r0 = 0; r0 < rows; r0 += kMaxTaskRows) {
        const int n = std::min(kMaxTaskRows, rows - r0);
        for (int c = 0; c < chunks; ++c) {
          tasks.push_back(Task{static_cast<int>(b), h, r0, n, blocks * c / chunks, blocks * (c + 1) / chunks,
                               c == chunks - 1, partial_rows});
          partial_rows += static_cast<std::size_t>(n);
        }
      }
    }
  }

  // Where row r of (sequence b, KV head h) reads its query and writes its output and lse.
  auto query_row = [&](int b, int h, int r) {
    return (first_query[static_cast<std::size_t>(b)] + static_cast<std::size_t>(r / group)) * ctx.num_q_heads +
           static_cast<std::size_t>(h) * group + static_cast<std::size_t>(r % group);
  };
  // Queries in K's space (rotate_k), rounded to T as on every backend: once per call, not per task.
  std::vector<T> rotated;
  const T* q_rows = q;
  if (ctx.rotate_k) {
    const std::size_t vectors = queries * static_cast<std::size_t>(ctx.num_q_heads);
    rotated.resize(vectors * dim);
    rotate_rows(q, rotated.data(), vectors, dim, true, threads);
    q_rows = rotated.data();
  }
  std::vector<float> maxes(partial_rows), sums(partial_rows), outputs(partial_rows * static_cast<std::size_t>(dim));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (std::size_t ti = 0; ti < tasks.size(); ++ti) {
    const Task& task = tasks[ti];
    const LayerRead& layer = batch[static_cast<std::size_t>(task.batch)];
    thread_local std::vector<float> qf;
    thread_local std::vector<std::int64_t> limits;
    qf.resize(static_cast<std::size_t>(task.rows) * dim);
    limits.resize(static_cast<std::size_t>(task.rows));
    for (int i = 0; i < task.rows; ++i) {
      const int r = task.row_begin + i;
      const T* src = q_rows + query_row(task.batch, task.head, r) * dim;
      for (int c = 0; c < dim; ++c) qf[static_cast<std::size_t>(i) * dim + c] = to_float(src[c]) * scale;
      limits[static_cast<std::size_t>(i)] = layer.length - layer.queries + r / group + 1;
    }
    run_chunk<T>(ctx, layer, task.head, qf.data(), limits.data(), task.rows, task.block_begin, task.block_end, task.tail,
                 maxes.data() + task.out_at, sums.data() + task.out_at, outputs.data() + task.out_at * dim);
  }

  // Merge the chunks of each (sequence, KV head, row tile), in task order.
  std::vector<float> merged(static_cast<std::size_t>(dim));
  for (std::size_t ti = 0; ti < tasks.size();) {
    std::size_t end = ti;
    while (end < tasks.size() && tasks[end].batch == tasks[ti].batch && tasks[end].head == tasks[ti].head &&
           tasks[end].row_begin == tasks[ti].row_begin) {
      ++end;
    }
    const Task& task = tasks[ti];
    for (int i = 0; i < task.rows; ++i) {
      SoftmaxMerge m;
      for (std::size_t t = ti; t < end; ++t) m.observe(maxes[tasks[t].out_at + static_cast<std::size_t>(i)]);
      std::fill(merged.begin(), merged.end(), 0.0f);
      for (std::size_t t = ti; t < end; ++t) {
        const std::size_t at = tasks[t].out_at + static_cast<std::size_t>(i);
        m.add(maxes[at], sums[at]);
        const float w = m.weight(maxes[at]);
        if (w == 0.0f) continue;  // a chunk the row does not see
        const float* o = outputs.data() + at * dim;
        for (int c = 0; c < dim; ++c) merged[static_cast<std::size_t>(c)] += w * o[c];
      }
      const float inv = 1.0f / m.sum;
      const std::size_t row = query_row(task.batch, task.head, task.row_begin + i);
      T* dst = out + row * dim;
      for (int c = 0; c < dim; ++c) dst[c] = from_float<T>(merged[static_cast<std::size_t>(c)] * inv);
      if (ctx.rotate_v) rotate_rows(dst, dst, 1, dim, false, 1);  // out of V's space, as T
      if (lse != nullptr) lse[row] = m.lse();
    }
    ti = end;
  }
}

template <class T>
void scores(const ReadContext& ctx, const LayerRead& layer, const T* q, float* scores) {
  const format::BlockGeometry& g = ctx.codec(layer.layer).geometry;
  const CpuLayerStore<T>& store = store_of<T>(layer);
  const Kernels& kern = kernels();
  const int dim = g.head_dim, group = ctx.num_q_heads / g.num_heads, block = g.block_tokens;
  const std::size_t len = static_cast<std::size_t>(layer.length), row_elems = static_cast<std::size_t>(g.num_heads) * dim;
  const format::SectionLayout k_layout = g.k_layout();
#pragma omp parallel for schedule(dynamic, 1) num_threads(ctx.threads)
  for (int h = 0; h < g.num_heads; ++h) {
    std::vector<float> qf(static_cast<std::size_t>(kMaxGroup) * dim);
    std::vector<float> stored(static_cast<std::size_t>(kMaxGroup) * block);
    std::vector<T> rotated(static_cast<std::size_t>(kMaxGroup) * dim);
    for (int g0 = 0; g0 < group; g0 += kMaxGroup) {
      const int gs = std::min(kMaxGroup, group - g0);
      const std::size_t qh0 = static_cast<std::size_t>(h) * group + g0;
      const T* qs = q + qh0 * dim;
      if (ctx.rotate_k) {
        rotate_rows(qs, rotated.data(), static_cast<std::size_t>(gs), dim, true, 1);
        qs = rotated.data();
      }
      for (int i = 0; i < gs * dim; ++i) qf[static_cast<std::size_t>(i)] = to_float(qs[i]);
      for (int b = 0; b < layer.num_blocks; ++b) {
        const std::uint8_t* data = store.blocks[static_cast<std::size_t>(b)].data;
        kern.section_scores(k_layout, g.k_per_channel, format::section(data, g, h, Side::k), qf.data(), gs,
                            stored.data(), static_cast<std::size_t>(block));
        const std::uint8_t* order = format::token_order(data, g, h);
        for (int gi = 0; gi < gs; ++gi) {
          float* dst = scores + (qh0 + gi) * len + static_cast<std::size_t>(b) * block;
          for (int i = 0; i < block; ++i) dst[order ? order[i] : i] = stored[static_cast<std::size_t>(gi * block + i)];
        }
      }
      const std::size_t tail_at = static_cast<std::size_t>(layer.num_blocks) * block;
      for_each_tail_run(layer.tail, [&](int first, int row, int count) {
        kern.dense<T>().scores(ring_row(store.ring_k.get(), row, row_elems, h, dim), row_elems, count, dim, qf.data(),
                               gs, scores + qh0 * len + tail_at + first, len);
      });
      if (layer.sinks > 0) {  // the exact rows replace the first block's scores of the sinks
        kern.dense<T>().scores(ring_row(store.sink_k.get(), 0, row_elems, h, dim), row_elems, layer.sinks, dim,
                               qf.data(), gs, scores + qh0 * len, len);
      }
    }
  }
}

template <class T>
void attn_v(const ReadContext& ctx, const LayerRead& layer, const float* weights, float* out) {
  const format::BlockGeometry& g = ctx.codec(layer.layer).geometry;
  const CpuLayerStore<T>& store = store_of<T>(layer);
  const Kernels& kern = kernels();
  const int dim = g.head_dim, group = ctx.num_q_heads / g.num_heads, block = g.block_tokens;
  const std::size_t len = static_cast<std::size_t>(layer.length), row_elems = static_cast<std::size_t>(g.num_heads) * dim;
  const format::SectionLayout v_layout = g.v_layout();
#pragma omp parallel for schedule(dynamic, 1) num_threads(ctx.threads)
  for (int h = 0; h < g.num_heads; ++h) {
    std::vector<float> stored(static_cast<std::size_t>(kMaxGroup) * block);
    AlignedFloats acc(static_cast<std::size_t>(kMaxGroup) * dim * 8);
    float min_term[kMaxGroup];
    for (int g0 = 0; g0 < group; g0 += kMaxGroup) {
      const int gs = std::min(kMaxGroup, group - g0);
      const std::size_t qh0 = static_cast<std::size_t>(h) * group + g0;
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(min_term, min_term + kMaxGroup, 0.0f);
      for (int b = 0; b < layer.num_blocks; ++b) {
        const std::uint8_t* data = store.blocks[static_cast<std::size_t>(b)].data;
        const std::uint8_t* order = format::token_order(data, g, h);
        // The first block's copies of the sinks weigh nothing: their exact rows take the weights.
        const int hidden = b == 0 ? layer.sinks : 0;
        for (int gi = 0; gi < gs; ++gi) {
          const float* src = weights + (qh0 + gi) * len + static_cast<std::size_t>(b) * block;
          for (int i = 0; i < block; ++i) {
            const int position = order ? order[i] : i;
            stored[static_cast<std::size_t>(gi * block + i)] = position < hidden ? 0.0f : src[position];
          }
        }
        kern.section_accumulate_v(v_layout, format::section(data, g, h, Side::v), stored.data(),
                                  static_cast<std::size_t>(block), gs, acc.data(), min_term);
      }
      const std::size_t tail_at = static_cast<std::size_t>(layer.num_blocks) * block;
      for_each_tail_run(layer.tail, [&](int first, int row, int count) {
        kern.dense<T>().accumulate_v(ring_row(store.ring_v.get(), row, row_elems, h, dim), row_elems, count, dim,
                                     weights + qh0 * len + tail_at + first, len, gs, acc.data());
      });
      if (layer.sinks > 0) {
        kern.dense<T>().accumulate_v(ring_row(store.sink_v.get(), 0, row_elems, h, dim), row_elems, layer.sinks, dim,
                                     weights + qh0 * len, len, gs, acc.data());
      }
      finish_v(acc.data(), min_term, gs, dim, out + qh0 * dim);
      if (ctx.rotate_v) rotate_rows_back(out + qh0 * dim, static_cast<std::size_t>(gs), dim, 1);
    }
  }
}

template <class T>
void read_back(const ReadContext& ctx, const LayerRead& layer, float* k, float* v) {
  const format::BlockGeometry& g = ctx.codec(layer.layer).geometry;
  const CpuLayerStore<T>& store = store_of<T>(layer);
  const std::size_t row_elems = static_cast<std::size_t>(g.num_heads) * g.head_dim;
  const std::size_t block_elems = static_cast<std::size_t>(g.block_tokens) * row_elems;
#pragma omp parallel for schedule(dynamic, 1) num_threads(ctx.threads) if (layer.num_blocks > 1)
  for (int b = 0; b < layer.num_blocks; ++b) {
    decode_block(ctx.codec(layer.layer), store.blocks[static_cast<std::size_t>(b)].data, k + b * block_elems, v + b * block_elems,
                 row_elems);
  }
  const std::size_t tail_at = static_cast<std::size_t>(layer.num_blocks) * block_elems;
  for_each_tail_run(layer.tail, [&](int first, int row, int count) {
    const std::size_t n = static_cast<std::size_t>(count) * row_elems, at = tail_at + first * row_elems;
    convert_to_float(store.ring_k.get() + row * row_elems, k + at, n);
    convert_to_float(store.ring_v.get() + row * row_elems, v + at, n);
  });
  if (layer.sinks > 0) {  // the exact rows, not the first block's decoded copies
    const std::size_t n = static_cast<std::size_t>(layer.sinks) * row_elems;
    convert_to_float(store.sink_k.get(), k, n);
    convert_to_float(store.sink_v.get(), v, n);
  }
  const std::size_t vectors = static_cast<std::size_t>(layer.length) * g.num_heads;
  if (ctx.rotate_k) rotate_rows_back(k, vectors, g.head_dim, ctx.threads);
  if (ctx.rotate_v) rotate_rows_back(v, vectors, g.head_dim, ctx.threads);
}

#define PACKKV_INSTANTIATE_READERS(T)                                                                           \
  template void causal_attention<T>(const ReadContext&, std::span<const LayerRead>, const T*, T*, float*, float); \
  template void scores<T>(const ReadContext&, const LayerRead&, const T*, float*);                            \
  template void attn_v<T>(const ReadContext&, const LayerRead&, const float*, float*);                        \
  template void read_back<T>(const ReadContext&, const LayerRead&, float*, float*);
#define PACKKV_INSTANTIATE_ROTATION(T) \
  template void rotate_rows<T>(const T*, T*, std::size_t, int, bool, int);
PACKKV_INSTANTIATE_ROTATION(float)
PACKKV_INSTANTIATE_ROTATION(fp16_t)
PACKKV_INSTANTIATE_ROTATION(bf16_t)
#undef PACKKV_INSTANTIATE_ROTATION
PACKKV_INSTANTIATE_READERS(float)
PACKKV_INSTANTIATE_READERS(fp16_t)
PACKKV_INSTANTIATE_READERS(bf16_t)
#undef PACKKV_INSTANTIATE_READERS

}  // namespace packkv::detail::cpu

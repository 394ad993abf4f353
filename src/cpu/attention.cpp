#include "cpu/attention.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/softmax_merge.hpp"
#include "cpu_kernels/kernels.hpp"
#include "cpu/layer_store.hpp"

namespace packkv::detail::cpu {

namespace {

using format::Side;

// Tokens per attention task: long sequences are split so that one sequence can use every core.
constexpr int kMinChunkTokens = 1024;

/// One task's partial softmax state for up to kMaxGroup query heads.
struct Partial {
  float max[kMaxGroup];
  float sum[kMaxGroup];
};

template <class T>
const T* ring_row(const T* ring, int row, std::size_t row_elems, int head, int dim) {
  return ring + static_cast<std::size_t>(row) * row_elems + static_cast<std::size_t>(head) * dim;
}

// Softmax-weighted attention of gs query heads over blocks [begin, end) (and the tail): writes the
// chunk's max score, sum of exponentials and unnormalised output per head.
template <class T>
void run_chunk(const ReadContext& ctx, const LayerRead& layer, int head, const float* qf, int gs, int begin, int end,
               bool with_tail, Partial& partial, float* o) {
  const Kernels& kern = kernels();
  const format::BlockGeometry& g = ctx.codec.geometry;
  const CpuLayerStore<T>& store = store_of<T>(layer);
  const int dim = g.head_dim, block = g.block_tokens;
  const std::size_t row_elems = static_cast<std::size_t>(g.num_heads) * dim;
  const int tail = with_tail ? layer.tail.len : 0;
  const int tokens = (end - begin) * block + tail;
  for (int i = 0; i < kMaxGroup; ++i) {
    partial.max[i] = -INFINITY;
    partial.sum[i] = 0.0f;
  }
  if (tokens == 0) {
    std::fill(o, o + static_cast<std::size_t>(gs) * dim, 0.0f);
    return;
  }
  thread_local std::vector<float> s;
  thread_local AlignedFloats acc;
  const std::size_t stride = static_cast<std::size_t>(tokens);
  s.resize(static_cast<std::size_t>(gs) * stride);
  acc.assign(static_cast<std::size_t>(gs) * dim * 8, 0.0f);
  const format::SectionLayout k_layout = g.k_layout(), v_layout = g.v_layout();
  for (int b = begin; b < end; ++b) {
    const std::uint8_t* data = store.blocks[static_cast<std::size_t>(b)].data;
    kern.section_scores(k_layout, g.k_per_channel, format::section(data, g, head, Side::k), qf, gs,
                        s.data() + static_cast<std::size_t>(b - begin) * block, stride);
  }
  const std::size_t tail_at = static_cast<std::size_t>(end - begin) * block;
  const DenseKernels<T>& dense = kern.dense<T>();
  if (tail > 0) {
    for_each_tail_run(layer.tail, [&](int first, int row, int count) {
      dense.scores(ring_row(store.ring_k.get(), row, row_elems, head, dim), row_elems, count, dim, qf, gs,
                   s.data() + tail_at + first, stride);
    });
  }
  kern.softmax_rows(s.data(), tokens, stride, gs, partial.max, partial.sum);
  float min_term[kMaxGroup] = {};
  for (int b = begin; b < end; ++b) {
    const std::uint8_t* data = store.blocks[static_cast<std::size_t>(b)].data;
    kern.section_accumulate_v(v_layout, format::section(data, g, head, Side::v),
                              s.data() + static_cast<std::size_t>(b - begin) * block, stride, gs, acc.data(), min_term);
  }
  if (tail > 0) {
    for_each_tail_run(layer.tail, [&](int first, int row, int count) {
      dense.accumulate_v(ring_row(store.ring_v.get(), row, row_elems, head, dim), row_elems, count, dim,
                         s.data() + tail_at + first, stride, gs, acc.data());
    });
  }
  finish_v(acc.data(), min_term, gs, dim, o);
}

}  // namespace

template <class T>
void decode_attention(const ReadContext& ctx, std::span<const LayerRead> batch, const T* q, T* out, float scale) {
  const format::BlockGeometry& g = ctx.codec.geometry;
  const int kv_heads = g.num_heads, dim = g.head_dim, threads = ctx.threads;
  const int group = ctx.num_q_heads / kv_heads;
  const int subgroups = (group + kMaxGroup - 1) / kMaxGroup;

  // Tasks: (sequence, KV head, query subgroup, range of blocks); the last range takes the tail.
  struct Task {
    int batch, head, subgroup, block_begin, block_end;
    bool tail;
  };
  std::vector<Task> tasks;
  const std::size_t base_tasks = batch.size() * static_cast<std::size_t>(kv_heads * subgroups);
  for (std::size_t b = 0; b < batch.size(); ++b) {
    const int blocks = batch[b].num_blocks;
    // Split only when the batch alone cannot keep every thread busy.
    int chunks = 1;
    if (base_tasks < static_cast<std::size_t>(2 * threads)) {
      const int wanted = static_cast<int>((2 * threads + base_tasks - 1) / base_tasks);
      const int by_size = std::max(1, blocks * g.block_tokens / kMinChunkTokens);
      chunks = std::min(wanted, by_size);
    }
    for (int h = 0; h < kv_heads; ++h) {
      for (int sg = 0; sg < subgroups; ++sg) {
        for (int c = 0; c < chunks; ++c) {
          tasks.push_back(Task{static_cast<int>(b), h, sg, blocks * c / chunks, blocks * (c + 1) / chunks,
                               c == chunks - 1});
        }
      }
    }
  }

  std::vector<Partial> partials(tasks.size());
  std::vector<float> outputs(tasks.size() * static_cast<std::size_t>(kMaxGroup) * dim);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (std::size_t ti = 0; ti < tasks.size(); ++ti) {
    const Task& task = tasks[ti];
    const int g0 = task.subgroup * kMaxGroup;
    const int gs = std::min(kMaxGroup, group - g0);
    thread_local std::vector<float> qf;
    qf.resize(static_cast<std::size_t>(gs) * dim);
    const T* qb = q + (static_cast<std::size_t>(task.batch) * ctx.num_q_heads +
                       static_cast<std::size_t>(task.head) * group + g0) * dim;
    for (int i = 0; i < gs * dim; ++i) qf[static_cast<std::size_t>(i)] = to_float(qb[i]) * scale;
    run_chunk<T>(ctx, batch[static_cast<std::size_t>(task.batch)], task.head, qf.data(), gs, task.block_begin,
                 task.block_end, task.tail, partials[ti], outputs.data() + ti * kMaxGroup * dim);
  }

  // Merge the chunks of each (sequence, KV head, subgroup), in task order.
  std::vector<float> merged(static_cast<std::size_t>(dim));
  for (std::size_t ti = 0; ti < tasks.size();) {
    std::size_t end = ti;
    while (end < tasks.size() && tasks[end].batch == tasks[ti].batch && tasks[end].head == tasks[ti].head &&
           tasks[end].subgroup == tasks[ti].subgroup) {
      ++end;
    }
    const Task& task = tasks[ti];
    const int g0 = task.subgroup * kMaxGroup;
    const int gs = std::min(kMaxGroup, group - g0);
    for (int gi = 0; gi < gs; ++gi) {
      SoftmaxMerge m;
      for (std::size_t t = ti; t < end; ++t) m.observe(partials[t].max[gi]);
      std::fill(merged.begin(), merged.end(), 0.0f);
      for (std::size_t t = ti; t < end; ++t) {
        m.add(partials[t].max[gi], partials[t].sum[gi]);
        const float w = m.weight(partials[t].max[gi]);
        if (w == 0.0f) continue;  // an empty chunk
        const float* o = outputs.data() + (t * kMaxGroup + static_cast<std::size_t>(gi)) * dim;
        for (int c = 0; c < dim; ++c) merged[static_cast<std::size_t>(c)] += w * o[c];
      }
      const float inv = 1.0f / m.sum;
      T* dst = out + (static_cast<std::size_t>(task.batch) * ctx.num_q_heads +
                      static_cast<std::size_t>(task.head) * group + g0 + gi) * dim;
      for (int c = 0; c < dim; ++c) dst[c] = from_float<T>(merged[static_cast<std::size_t>(c)] * inv);
    }
    ti = end;
  }
}

template <class T>
void scores(const ReadContext& ctx, const LayerRead& layer, const T* q, float* scores) {
  const format::BlockGeometry& g = ctx.codec.geometry;
  const CpuLayerStore<T>& store = store_of<T>(layer);
  const Kernels& kern = kernels();
  const int dim = g.head_dim, group = ctx.num_q_heads / g.num_heads, block = g.block_tokens;
  const std::size_t len = static_cast<std::size_t>(layer.length), row_elems = static_cast<std::size_t>(g.num_heads) * dim;
  const format::SectionLayout k_layout = g.k_layout();
#pragma omp parallel for schedule(dynamic, 1) num_threads(ctx.threads)
  for (int h = 0; h < g.num_heads; ++h) {
    std::vector<float> qf(static_cast<std::size_t>(kMaxGroup) * dim);
    std::vector<float> stored(static_cast<std::size_t>(kMaxGroup) * block);
    for (int g0 = 0; g0 < group; g0 += kMaxGroup) {
      const int gs = std::min(kMaxGroup, group - g0);
      const std::size_t qh0 = static_cast<std::size_t>(h) * group + g0;
      for (int i = 0; i < gs * dim; ++i) qf[static_cast<std::size_t>(i)] = to_float(q[qh0 * dim + i]);
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
    }
  }
}

template <class T>
void attn_v(const ReadContext& ctx, const LayerRead& layer, const float* weights, float* out) {
  const format::BlockGeometry& g = ctx.codec.geometry;
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
        for (int gi = 0; gi < gs; ++gi) {
          const float* src = weights + (qh0 + gi) * len + static_cast<std::size_t>(b) * block;
          for (int i = 0; i < block; ++i) stored[static_cast<std::size_t>(gi * block + i)] = src[order ? order[i] : i];
        }
        kern.section_accumulate_v(v_layout, format::section(data, g, h, Side::v), stored.data(),
                                  static_cast<std::size_t>(block), gs, acc.data(), min_term);
      }
      const std::size_t tail_at = static_cast<std::size_t>(layer.num_blocks) * block;
      for_each_tail_run(layer.tail, [&](int first, int row, int count) {
        kern.dense<T>().accumulate_v(ring_row(store.ring_v.get(), row, row_elems, h, dim), row_elems, count, dim,
                                     weights + qh0 * len + tail_at + first, len, gs, acc.data());
      });
      finish_v(acc.data(), min_term, gs, dim, out + qh0 * dim);
    }
  }
}

template <class T>
void read_back(const ReadContext& ctx, const LayerRead& layer, float* k, float* v) {
  const format::BlockGeometry& g = ctx.codec.geometry;
  const CpuLayerStore<T>& store = store_of<T>(layer);
  const std::size_t row_elems = static_cast<std::size_t>(g.num_heads) * g.head_dim;
  const std::size_t block_elems = static_cast<std::size_t>(g.block_tokens) * row_elems;
#pragma omp parallel for schedule(dynamic, 1) num_threads(ctx.threads) if (layer.num_blocks > 1)
  for (int b = 0; b < layer.num_blocks; ++b) {
    decode_block(ctx.codec, store.blocks[static_cast<std::size_t>(b)].data, k + b * block_elems, v + b * block_elems,
                 row_elems);
  }
  const std::size_t tail_at = static_cast<std::size_t>(layer.num_blocks) * block_elems;
  for_each_tail_run(layer.tail, [&](int first, int row, int count) {
    const std::size_t n = static_cast<std::size_t>(count) * row_elems, at = tail_at + first * row_elems;
    convert_to_float(store.ring_k.get() + row * row_elems, k + at, n);
    convert_to_float(store.ring_v.get() + row * row_elems, v + at, n);
  });
}

#define PACKKV_INSTANTIATE_READERS(T)                                                                           \
  template void decode_attention<T>(const ReadContext&, std::span<const LayerRead>, const T*, T*, float);     \
  template void scores<T>(const ReadContext&, const LayerRead&, const T*, float*);                            \
  template void attn_v<T>(const ReadContext&, const LayerRead&, const float*, float*);                        \
  template void read_back<T>(const ReadContext&, const LayerRead&, float*, float*);
PACKKV_INSTANTIATE_READERS(float)
PACKKV_INSTANTIATE_READERS(fp16_t)
PACKKV_INSTANTIATE_READERS(bf16_t)
#undef PACKKV_INSTANTIATE_READERS

}  // namespace packkv::detail::cpu

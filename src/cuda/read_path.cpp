#include "cuda/read_path.hpp"

#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <unordered_set>
#include <vector>

namespace packkv::detail::cuda {

namespace {

struct Split {
  int splits;
  int units_per_split;
};

template <class T>
SeqView<T> view(const DeviceContext& ctx, const LayerRead& layer) {
  const CudaLayerStore& store = store_of(layer);
  SeqView<T> v{};
  v.blocks = store.table.as<const std::uint8_t* const>();
  v.tail_k = store.template ring_k<T>();
  v.tail_v = store.template ring_v<T>(ctx.row_elems);
  v.num_blocks = layer.num_blocks;
  v.tail = layer.tail;
  v.sinks = layer.sinks;
  v.sink_rows = layer.sinks > 0 ? store.sinks.as<const T>() : nullptr;
  return v;
}

/// The read shape of one layer (every sequence of a read batch is at the same layer).
ReadShape read_shape(const DeviceContext& ctx, int layer) {
  ReadShape s{};
  s.geometry = ctx.geometry_of(layer);
  s.num_q_heads = ctx.num_q_heads;
  s.group = ctx.group;
  s.heads_per_cta = ctx.heads_per_cta;
  s.subgroups = ctx.subgroups;
  return s;
}

// Flash-decoding split: enough CTAs for about two waves over the SMs, never an empty split
// range for the longest sequence.
Split choose_split(const DeviceContext& ctx, int max_units, int ctas_per_split) {
  max_units = std::max(max_units, 1);
  const int target = 2 * ctx.sm_count;
  int splits = std::clamp((target + ctas_per_split - 1) / ctas_per_split, 1, max_units);
  const int per_split = (max_units + splits - 1) / splits;
  splits = (max_units + per_split - 1) / per_split;
  return Split{splits, per_split};
}

// The fast path's split: enough one-warp CTAs to fill every SM with the resident CTAs its shared
// memory allows, and no more packed blocks per CTA than it keeps spans for.
Split choose_fast_split(const DeviceContext& ctx, const FastPlan& plan, int max_units, int ctas_per_split) {
  max_units = std::max(max_units, 1);
  const int target = ctx.sm_count * plan.ctas_per_sm;
  int splits = std::clamp((target + ctas_per_split - 1) / ctas_per_split, 1, max_units);
  splits = std::max(splits, (max_units + kFastMaxBlocksPerCta - 1) / kFastMaxBlocksPerCta);
  const int per_split = (max_units + splits - 1) / splits;
  splits = (max_units + per_split - 1) / per_split;
  return Split{splits, per_split};
}

}  // namespace

namespace {

// Queries rotated into K's space (rotate_k), in the context's scratch; or q itself.
template <class T>
const T* rotated_queries(DeviceContext& ctx, const T* q, std::size_t vectors) {
  if (!ctx.rotate_k) return q;
  T* out = static_cast<T*>(ctx.rotated_query_bytes(vectors * ctx.widest.head_dim * sizeof(T)));
  check_cuda(launch_rotate(RotateParams<T, T>{q, out, vectors, ctx.widest.head_dim, 1}, ctx.stream),
             "query rotation kernel launch");
  return out;
}

// V outputs back out of the rotated space (rotate_v), in place.
template <class U>
void rotate_back(DeviceContext& ctx, U* x, std::size_t vectors, bool rotated, const char* what) {
  if (!rotated) return;
  check_cuda(launch_rotate(RotateParams<U, U>{x, x, vectors, ctx.widest.head_dim, 0}, ctx.stream), what);
}

}  // namespace

template <class T>
void attention(DeviceContext& ctx, std::span<const LayerRead> batch, const T* q, T* out, float* lse, float scale) {
  ctx.raise_device_error();
  std::size_t all_queries = 0;
  for (const LayerRead& l : batch) all_queries += static_cast<std::size_t>(l.queries);
  const std::size_t vectors = all_queries * static_cast<std::size_t>(ctx.num_q_heads);
  q = rotated_queries(ctx, q, vectors);
  const std::size_t q_stride = static_cast<std::size_t>(ctx.num_q_heads) * ctx.widest.head_dim;
  const bool fast = ctx.fast.usable;
  // Several queries per sequence: a CTA takes as many rows as the kernel allows, so each packed
  // block is decoded once per 8 (query, head) rows instead of once per query.
  const bool multi = std::any_of(batch.begin(), batch.end(), [](const LayerRead& l) { return l.queries > 1; });
  const FastPlan& plan = multi ? ctx.fast_multi : ctx.fast;
  const int heads_per_cta = fast ? plan.heads_per_cta : (multi ? kMaxHeadsPerCta : ctx.heads_per_cta);
  std::size_t first_query = 0;  // of the launch, in q, out and lse
  for (std::size_t first = 0; first < batch.size(); first += kMaxBatchPerLaunch) {
    const int count = static_cast<int>(std::min<std::size_t>(kMaxBatchPerLaunch, batch.size() - first));
    AttentionParams<T> params{};
    params.shape = read_shape(ctx, batch[first].layer);
    params.batch = count;
    int max_units = 0, max_rows = 0, queries = 0;
    for (int b = 0; b < count; ++b) {
      const LayerRead& layer = batch[first + static_cast<std::size_t>(b)];
      params.seqs[b] = view<T>(ctx, layer);
      params.query_first[b] = queries;
      params.query_count[b] = layer.queries;
      queries += layer.queries;
      max_units = std::max(max_units, params.seqs[b].num_units(ctx.widest.block_tokens));
      max_rows = std::max(max_rows, layer.queries * ctx.group);
    }
    params.queries = queries;
    // CTAs per KV head cover the longest sequence's rows; a shorter one's extra CTAs return at once.
    params.shape.heads_per_cta = std::min(heads_per_cta, max_rows);
    params.shape.subgroups = (max_rows + params.shape.heads_per_cta - 1) / params.shape.heads_per_cta;
    const int ctas_per_split = count * ctx.widest.num_heads * params.shape.subgroups;
    const Split split =
        fast ? choose_fast_split(ctx, plan, max_units, ctas_per_split) : choose_split(ctx, max_units, ctas_per_split);
    params.units_per_split = split.units_per_split;
    params.num_splits = split.splits;
    params.q = q + first_query * q_stride;
    params.out = out + first_query * q_stride;
    params.lse = lse != nullptr ? lse + first_query * static_cast<std::size_t>(ctx.num_q_heads) : nullptr;
    params.softmax_scale = scale;
    params.partials = ctx.workspace_floats(static_cast<std::size_t>(queries) * ctx.num_q_heads * split.splits *
                                           (ctx.widest.head_dim + 2));
    if (fast) {
      params.stages = plan.stages;
      params.tickets = ctx.ticket_words(static_cast<std::size_t>(count) * ctx.widest.num_heads * params.shape.subgroups);
      params.errors = ctx.errors_for(first, 0);  // the kernel adds its batch index
      check_cuda(launch_fast_attention(params, plan.shared_bytes, ctx.stream), "attention kernel launch");
    } else {
      check_cuda(launch_attention(params, ctx.stream), "attention kernel launch");
    }
    first_query += static_cast<std::size_t>(queries);
  }
  rotate_back(ctx, out, vectors, ctx.rotate_v, "output rotation kernel launch");
}

// scores and attn_v over a batch: sequence i's scores (weights) are [num_q_heads][length_i] at
// num_q_heads * (length_0 + ... + length_{i-1}); its queries and outputs are row i of
// [batch][num_q_heads][head_dim]. The fast path takes up to kMaxBatchPerLaunch sequences per launch;
// the first path one sequence per launch.
template <class T>
PrimitiveParams<T> primitive_params(DeviceContext& ctx, std::span<const LayerRead> batch, std::size_t first,
                                    int count, std::int64_t first_value, const FastPlan& plan) {
  PrimitiveParams<T> params{};
  params.shape = read_shape(ctx, batch[first].layer);
  params.shape.heads_per_cta = plan.heads_per_cta;
  params.shape.subgroups = plan.subgroups;
  params.batch = count;
  params.stages = plan.stages;
  int max_units = 0;
  std::int64_t at = first_value;
  for (int b = 0; b < count; ++b) {
    const LayerRead& layer = batch[first + static_cast<std::size_t>(b)];
    params.seqs[b] = view<T>(ctx, layer);
    params.first[b] = at;
    params.length[b] = layer.length;
    at += static_cast<std::int64_t>(ctx.num_q_heads) * layer.length;
    max_units = std::max(max_units, params.seqs[b].num_units(ctx.widest.block_tokens));
  }
  const Split split = choose_fast_split(ctx, plan, max_units, count * ctx.widest.num_heads * plan.subgroups);
  params.units_per_split = split.units_per_split;
  params.num_splits = split.splits;
  return params;
}

template <class T>
void scores(DeviceContext& ctx, std::span<const LayerRead> batch, const T* q, float* scores) {
  ctx.raise_device_error();
  const std::size_t q_stride = static_cast<std::size_t>(ctx.num_q_heads) * ctx.widest.head_dim;
  q = rotated_queries(ctx, q, batch.size() * static_cast<std::size_t>(ctx.num_q_heads));
  std::int64_t first_value = 0;
  if (ctx.fast_scores.usable) {
    for (std::size_t first = 0; first < batch.size(); first += kMaxBatchPerLaunch) {
      const int count = static_cast<int>(std::min<std::size_t>(kMaxBatchPerLaunch, batch.size() - first));
      PrimitiveParams<T> params = primitive_params<T>(ctx, batch, first, count, 0, ctx.fast_scores);
      params.q = q + first * q_stride;
      params.scores = scores + first_value;
      check_cuda(launch_fast_scores(params, ctx.fast_scores.shared_bytes, ctx.stream), "scores kernel launch");
      for (int b = 0; b < count; ++b) first_value += static_cast<std::int64_t>(ctx.num_q_heads) * params.length[b];
    }
    return;
  }
  for (std::size_t i = 0; i < batch.size(); ++i) {
    ScoresParams<T> params{};
    params.shape = read_shape(ctx, batch[i].layer);
    params.seq = view<T>(ctx, batch[i]);
    params.q = q + i * q_stride;
    params.scores = scores + first_value;
    params.length = batch[i].length;
    check_cuda(launch_scores(params, ctx.stream), "scores kernel launch");
    first_value += static_cast<std::int64_t>(ctx.num_q_heads) * batch[i].length;
  }
}

template <class T>
void attn_v(DeviceContext& ctx, std::span<const LayerRead> batch, const float* weights, float* out) {
  ctx.raise_device_error();
  const std::size_t out_stride = static_cast<std::size_t>(ctx.num_q_heads) * ctx.widest.head_dim;
  std::int64_t first_value = 0;
  if (ctx.fast_attn_v.usable) {
    for (std::size_t first = 0; first < batch.size(); first += kMaxBatchPerLaunch) {
      const int count = static_cast<int>(std::min<std::size_t>(kMaxBatchPerLaunch, batch.size() - first));
      PrimitiveParams<T> params = primitive_params<T>(ctx, batch, first, count, 0, ctx.fast_attn_v);
      params.weights = weights + first_value;
      params.out = out + first * out_stride;
      params.partials = ctx.workspace_floats(static_cast<std::size_t>(count) * ctx.num_q_heads * params.num_splits *
                                             ctx.widest.head_dim);
      params.tickets = ctx.ticket_words(static_cast<std::size_t>(count) * ctx.widest.num_heads * params.shape.subgroups);
      check_cuda(launch_fast_attn_v(params, ctx.fast_attn_v.shared_bytes, ctx.stream), "attn_v kernel launch");
      for (int b = 0; b < count; ++b) first_value += static_cast<std::int64_t>(ctx.num_q_heads) * params.length[b];
    }
  } else {
    for (std::size_t i = 0; i < batch.size(); ++i) {
      AttnVParams<T> params{};
      params.shape = read_shape(ctx, batch[i].layer);
      params.seq = view<T>(ctx, batch[i]);
      params.weights = weights + first_value;
      params.out = out + i * out_stride;
      params.length = batch[i].length;
      const Split split =
          choose_split(ctx, params.seq.num_units(ctx.widest.block_tokens), ctx.widest.num_heads * ctx.subgroups);
      params.units_per_split = split.units_per_split;
      params.num_splits = split.splits;
      params.partials =
          ctx.workspace_floats(static_cast<std::size_t>(ctx.num_q_heads) * split.splits * ctx.widest.head_dim);
      check_cuda(launch_attn_v(params, ctx.stream), "attn_v kernel launch");
      first_value += static_cast<std::int64_t>(ctx.num_q_heads) * batch[i].length;
    }
  }
  rotate_back(ctx, out, batch.size() * static_cast<std::size_t>(ctx.num_q_heads), ctx.rotate_v,
              "output rotation kernel launch");
}

template <class T>
void read_back(DeviceContext& ctx, const LayerRead& layer, float* k, float* v) {
  ctx.raise_device_error();
  ReadBackParams<T> params{};
  params.geometry = ctx.geometry_of(layer.layer);
  params.seq = view<T>(ctx, layer);
  params.k = k;
  params.v = v;
  check_cuda(launch_read_back(params, ctx.stream), "read_back kernel launch");
  const std::size_t vectors = static_cast<std::size_t>(layer.length) * ctx.widest.num_heads;
  rotate_back(ctx, k, vectors, ctx.rotate_k, "read_back rotation kernel launch");
  rotate_back(ctx, v, vectors, ctx.rotate_v, "read_back rotation kernel launch");
  // An inspection call: it waits, so that device-reported errors surface here at the latest.
  check_cuda(cudaStreamSynchronize(ctx.stream), "read_back");
  ctx.raise_device_error();
}

void layer_bytes(DeviceContext& ctx, std::span<const LayerRead> layers, std::span<LayerBytes> out) {
  check_cuda(cudaStreamSynchronize(ctx.stream), "memory_stats");
  ctx.raise_device_error();
  // One statistics kernel per layer over its device block table, one download.
  constexpr std::size_t kCounters = 5;  // see launch_block_stats
  const std::size_t count = std::max<std::size_t>(1, layers.size() * kCounters);
  std::vector<unsigned long long> counters(count, 0);
  DeviceBuffer device_counters(count * sizeof(unsigned long long), ctx.stream);
  check_cuda(cudaMemsetAsync(device_counters.data(), 0, device_counters.bytes(), ctx.stream), "memory_stats memset");
  for (std::size_t i = 0; i < layers.size(); ++i) {
    const CudaLayerStore& store = store_of(layers[i]);
    check_cuda(launch_block_stats(ctx.geometry_of(layers[i].layer), store.table.as<const std::uint8_t* const>(),
                                  layers[i].num_blocks, device_counters.as<unsigned long long>() + kCounters * i,
                                  ctx.stream),
               "block statistics kernel launch");
  }
  check_cuda(cudaMemcpyAsync(counters.data(), device_counters.data(), device_counters.bytes(), cudaMemcpyDeviceToHost,
                             ctx.stream),
             "memory_stats download");
  check_cuda(cudaStreamSynchronize(ctx.stream), "memory_stats");
  // Blocks that forks share: counted in the first layer that holds them; in the others they are
  // measured again over a list of just those blocks and moved to `shared`.
  std::vector<unsigned long long> repeated(counters.size(), 0);
  std::vector<std::size_t> repeated_blocks(layers.size(), 0);
  if (!ctx.page_extra_refs.empty()) {
    std::unordered_set<const std::uint8_t*> counted;
    std::vector<std::vector<const std::uint8_t*>> lists(layers.size());
    std::vector<const std::uint8_t*> table;
    for (std::size_t i = 0; i < layers.size(); ++i) {
      const auto n = static_cast<std::size_t>(layers[i].num_blocks);
      if (n == 0) continue;
      table.resize(n);
      check_cuda(cudaMemcpy(table.data(), store_of(layers[i]).table.data(), n * sizeof(std::uint8_t*), cudaMemcpyDeviceToHost),
                 "memory_stats (block table download)");
      for (const std::uint8_t* block : table) {
        if (!counted.insert(block).second) lists[i].push_back(block);
      }
      repeated_blocks[i] = lists[i].size();
    }
    std::size_t total = 0;
    for (const auto& list : lists) total += list.size();
    if (total != 0) {
      std::vector<const std::uint8_t*> flat;
      flat.reserve(total);
      for (const auto& list : lists) flat.insert(flat.end(), list.begin(), list.end());
      DeviceBuffer device_list(total * sizeof(std::uint8_t*), ctx.stream);
      check_cuda(cudaMemcpyAsync(device_list.data(), flat.data(), device_list.bytes(), cudaMemcpyHostToDevice, ctx.stream),
                 "memory_stats (shared block list upload)");
      check_cuda(cudaMemsetAsync(device_counters.data(), 0, device_counters.bytes(), ctx.stream), "memory_stats memset");
      std::size_t at = 0;
      for (std::size_t i = 0; i < layers.size(); ++i) {
        if (lists[i].empty()) continue;
        check_cuda(launch_block_stats(ctx.geometry_of(layers[i].layer), device_list.as<const std::uint8_t* const>() + at,
                                      static_cast<int>(lists[i].size()),
                                      device_counters.as<unsigned long long>() + kCounters * i, ctx.stream),
                   "block statistics kernel launch");
        at += lists[i].size();
      }
      check_cuda(cudaMemcpyAsync(repeated.data(), device_counters.data(), device_counters.bytes(), cudaMemcpyDeviceToHost,
                                 ctx.stream),
                 "memory_stats download");
      check_cuda(cudaStreamSynchronize(ctx.stream), "memory_stats");
    }
  }
  // Parameters and token orders take the same bytes at every code width.
  const format::SectionLayout kl = ctx.widest.k_layout(), vl = ctx.widest.v_layout();
  const std::size_t params =
      static_cast<std::size_t>(ctx.widest.num_heads) * (kl.round_end_offset + vl.round_end_offset);
  for (std::size_t i = 0; i < layers.size(); ++i) {
    const CudaLayerStore& store = store_of(layers[i]);
    unsigned long long* c = counters.data() + kCounters * i;
    const unsigned long long* r = repeated.data() + kCounters * i;
    for (std::size_t j = 0; j < kCounters; ++j) c[j] -= r[j];
    out[i].shared = r[2];
    const std::size_t n = static_cast<std::size_t>(layers[i].num_blocks) - repeated_blocks[i];
    BlockBytes& b = out[i].blocks;
    b.payload = c[0];
    b.descriptors = c[1];
    b.params = n * params;
    b.permutations = n * ctx.widest.permutation_bytes();
    b.headers = c[2] - b.payload - b.params - b.descriptors - b.permutations;
    b.k_sections = c[3];
    b.v_sections = c[4];
    out[i].tables = store.table.bytes() + store.page_list.bytes();
    out[i].tail = store.ring.bytes();
    out[i].sinks = store.sinks.bytes();
    store.live_bytes = c[2];
    store.repeated_blocks = repeated_blocks[i];
  }
}

// Downloads what export needs: the block table, once each the pages the blocks lie in (a block's
// size is the first word of its header, checked against the page before it is read), and the
// tail ring unrolled to token order. A transfer call: it waits for the stream.
template <class T>
void download(DeviceContext& ctx, const LayerRead& layer, std::vector<std::uint32_t>& sizes,
              std::vector<std::uint8_t>& blocks, T* tail_k, T* tail_v, T* sink_k, T* sink_v) {
  check_cuda(cudaStreamSynchronize(ctx.stream), "export_sequence");
  ctx.raise_device_error();
  const CudaLayerStore& store = store_of(layer);
  const auto n = static_cast<std::size_t>(layer.num_blocks);
  const std::size_t page_bytes = ctx.pool.page_bytes();
  std::vector<std::uint8_t*> table(n);
  if (n != 0) {
    check_cuda(cudaMemcpy(table.data(), store.table.data(), n * sizeof(std::uint8_t*), cudaMemcpyDeviceToHost),
               "export_sequence (block table download)");
  }
  std::vector<std::pair<std::uint8_t*, std::size_t>> by_address;
  for (std::size_t i = 0; i < store.pages.size(); ++i) by_address.emplace_back(store.pages[i], i);
  std::sort(by_address.begin(), by_address.end());
  std::vector<std::vector<std::uint8_t>> copies(store.pages.size());
  sizes.clear();
  blocks.clear();
  for (std::size_t b = 0; b < n; ++b) {
    auto it = std::upper_bound(by_address.begin(), by_address.end(),
                               std::pair<std::uint8_t*, std::size_t>(table[b], SIZE_MAX));
    PACKKV_REQUIRE(it != by_address.begin() &&
                       static_cast<std::size_t>(table[b] - std::prev(it)->first) + sizeof(format::BlockHeader) <=
                           page_bytes,
                   fmt::format("export_sequence: block {} is not in the layer's pages (device state corrupt)", b));
    const std::size_t page = std::prev(it)->second;
    std::vector<std::uint8_t>& copy = copies[page];
    if (copy.empty()) {  // one download per page: blocks are packed back to back in it
      copy.resize(page_bytes);
      check_cuda(cudaMemcpy(copy.data(), store.pages[page], page_bytes, cudaMemcpyDeviceToHost),
                 "export_sequence (page download)");
    }
    const std::size_t offset = static_cast<std::size_t>(table[b] - store.pages[page]);
    const std::uint32_t size = format::block_bytes(copy.data() + offset);
    PACKKV_REQUIRE(size >= ctx.geometry_of(layer.layer).min_block_bytes() &&
                       size <= ctx.geometry_of(layer.layer).max_block_bytes() &&
                       offset + size <= page_bytes,
                   fmt::format("export_sequence: block {} has impossible size {} (device state corrupt)", b, size));
    sizes.push_back(size);
    blocks.insert(blocks.end(), copy.data() + offset, copy.data() + offset + size);
  }
  download_tail<T>(ctx, layer, tail_k, tail_v);
  if (layer.sinks > 0) {  // K rows, then V rows
    const std::size_t bytes = static_cast<std::size_t>(layer.sinks) * ctx.row_elems * sizeof(T);
    check_cuda(cudaMemcpy(sink_k, store.sinks.data(), bytes, cudaMemcpyDeviceToHost), "export_sequence (sink rows)");
    check_cuda(cudaMemcpy(sink_v, store.sinks.as<std::uint8_t>() + bytes, bytes, cudaMemcpyDeviceToHost),
               "export_sequence (sink rows)");
  }
}

template <class T>
void download_tail(DeviceContext& ctx, const LayerRead& layer, T* tail_k, T* tail_v) {
  if (layer.tail.len == 0) return;
  check_cuda(cudaStreamSynchronize(ctx.stream), "tail download");
  ctx.raise_device_error();
  const CudaLayerStore& store = store_of(layer);
  std::vector<T> ring(2 * static_cast<std::size_t>(store.ring_capacity) * ctx.row_elems);
  check_cuda(cudaMemcpy(ring.data(), store.ring.data(), ring.size() * sizeof(T), cudaMemcpyDeviceToHost),
             "tail download");
  const T* ring_v = ring.data() + static_cast<std::size_t>(store.ring_capacity) * ctx.row_elems;
  for (int j = 0; j < layer.tail.len; ++j) {
    const std::size_t row = static_cast<std::size_t>(layer.tail.row(layer.tail.begin + j)) * ctx.row_elems;
    std::memcpy(tail_k + j * ctx.row_elems, ring.data() + row, ctx.row_elems * sizeof(T));
    std::memcpy(tail_v + j * ctx.row_elems, ring_v + row, ctx.row_elems * sizeof(T));
  }
}


#define PACKKV_INSTANTIATE_READS(T)                                                                       \
  template void attention<T>(DeviceContext&, std::span<const LayerRead>, const T*, T*, float*, float);           \
  template void scores<T>(DeviceContext&, std::span<const LayerRead>, const T*, float*);                 \
  template void attn_v<T>(DeviceContext&, std::span<const LayerRead>, const float*, float*);             \
  template void read_back<T>(DeviceContext&, const LayerRead&, float*, float*);                          \
  template void download<T>(DeviceContext&, const LayerRead&, std::vector<std::uint32_t>&,              \
                            std::vector<std::uint8_t>&, T*, T*, T*, T*);                                  \
  template void download_tail<T>(DeviceContext&, const LayerRead&, T*, T*);
PACKKV_INSTANTIATE_READS(float)
PACKKV_INSTANTIATE_READS(fp16_t)
PACKKV_INSTANTIATE_READS(bf16_t)
#undef PACKKV_INSTANTIATE_READS

}  // namespace packkv::detail::cuda

// The CPU backend: packed blocks in a host page pool, uncompressed tails, attention on packed data.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <unordered_map>

#include <fmt/format.h>

#include "cpu_kernels.hpp"
#include "packkv/backend.hpp"
#include "packkv/codec.hpp"
#include "page_pool.hpp"
#include "sequence_image.hpp"
#include "value_checks.hpp"

namespace packkv::detail {

namespace {

// Tokens per attention task: long sequences are split so that one sequence can use every core.
constexpr int kMinChunkTokens = 1024;

}  // namespace

template <class T>
class CpuBackend final : public CacheBackend<T> {
 public:
  explicit CpuBackend(const CacheConfig& config)
      : cfg_(config),
        codec_(make_codec_params(config)),
        pool_(codec_.geometry.max_block_bytes()),
        row_(static_cast<std::size_t>(config.num_kv_heads) * config.head_dim),
        tail_capacity_(config.residual_tokens + config.block_tokens),
        threads_(config.num_threads > 0 ? config.num_threads : omp_get_max_threads()) {}

  void add_sequence(SeqId id) override {
    const std::size_t bytes = tail_bytes_per_sequence() + sequence_overhead();
    if (!fits(bytes)) reclaim();
    check_budget(bytes, fmt::format("add_sequence {}", id));
    create_sequence(id);
  }

  void remove_sequence(SeqId id) override {
    auto it = sequences_.find(id);
    for (auto& layer : it->second.layers) {
      for (const SlotRef& block : layer.blocks) pool_.release(block);
      table_bytes_ -= layer.blocks.size() * sizeof(SlotRef);
    }
    sequences_.erase(it);
    fixed_bytes_ -= tail_bytes_per_sequence() + sequence_overhead();
  }

  bool contains(SeqId id) const override { return sequences_.count(id) != 0; }

  std::vector<SeqId> sequence_ids() const override {
    std::vector<SeqId> ids;
    ids.reserve(sequences_.size());
    for (const auto& [id, seq] : sequences_) ids.push_back(id);
    std::sort(ids.begin(), ids.end());
    return ids;
  }

  std::int64_t length(SeqId id, int layer) const override { return layer_of(id, layer).length; }

  void append(SeqId id, int layer_index, const T* k, const T* v, int n_tokens) override {
    Layer& layer = sequences_.at(id).layers[static_cast<std::size_t>(layer_index)];
    check_values(k, v, n_tokens, id, layer_index);

    // Plan: the oldest full blocks of (tail + new) are compressed, keeping residual_tokens back.
    const int block = cfg_.block_tokens;
    const std::int64_t pending = static_cast<std::int64_t>(layer.tail_tokens) + n_tokens;
    const std::int64_t keep_min = cfg_.residual_tokens;
    const std::int64_t new_blocks = pending >= keep_min + block ? (pending - keep_min) / block : 0;

    // Encode every new block into staging memory first: nothing is committed until all succeed.
    const std::uint32_t max_bytes = codec_.geometry.max_block_bytes();
    std::vector<std::uint8_t> staging(static_cast<std::size_t>(new_blocks) * max_bytes);
    std::vector<std::uint32_t> sizes(static_cast<std::size_t>(new_blocks));
    std::vector<std::string> failures(static_cast<std::size_t>(new_blocks));
    auto row_of = [&](const std::vector<T>& tail, const T* fresh, std::int64_t token) -> const T* {
      return token < layer.tail_tokens ? tail.data() + token * row_
                                       : fresh + (token - layer.tail_tokens) * static_cast<std::int64_t>(row_);
    };
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_) if (new_blocks > 1)
    for (std::int64_t b = 0; b < new_blocks; ++b) {
      try {
        thread_local EncodeScratch scratch;
        thread_local std::vector<T> gathered_k, gathered_v;
        const std::int64_t first = b * block;
        const T* k_rows;
        const T* v_rows;
        if (first >= layer.tail_tokens) {  // entirely in the new tokens: encode in place
          k_rows = row_of(layer.k_tail, k, first);
          v_rows = row_of(layer.v_tail, v, first);
        } else {  // straddles the tail: gather the block's rows
          gathered_k.resize(static_cast<std::size_t>(block) * row_);
          gathered_v.resize(static_cast<std::size_t>(block) * row_);
          for (int t = 0; t < block; ++t) {
            std::memcpy(gathered_k.data() + t * row_, row_of(layer.k_tail, k, first + t), row_ * sizeof(T));
            std::memcpy(gathered_v.data() + t * row_, row_of(layer.v_tail, v, first + t), row_ * sizeof(T));
          }
          k_rows = gathered_k.data();
          v_rows = gathered_v.data();
        }
        sizes[static_cast<std::size_t>(b)] =
            encode_block(codec_, k_rows, v_rows, row_, staging.data() + b * max_bytes, scratch);
      } catch (const std::exception& e) {
        failures[static_cast<std::size_t>(b)] = e.what();
      }
    }
    for (std::int64_t b = 0; b < new_blocks; ++b) {
      PACKKV_REQUIRE(failures[static_cast<std::size_t>(b)].empty(),
                     fmt::format("append to sequence {} layer {}: block {} of this call: {}", id, layer_index, b,
                                 failures[static_cast<std::size_t>(b)]));
    }

    const std::size_t table_growth = static_cast<std::size_t>(new_blocks) * sizeof(SlotRef);
    reserve_for(sizes, table_growth, fmt::format("append of {} tokens to sequence {} layer {}", n_tokens, id,
                                                 layer_index));

    // Commit. Reserve the table first so the only fallible step left is the pool's (all-or-nothing).
    layer.blocks.reserve(layer.blocks.size() + static_cast<std::size_t>(new_blocks));
    std::vector<SlotRef> slots = pool_.allocate(sizes);
    for (std::int64_t b = 0; b < new_blocks; ++b) {
      SlotRef& slot = slots[static_cast<std::size_t>(b)];
      std::memcpy(slot.data, staging.data() + b * max_bytes, slot.bytes);
      layer.block_bytes += block_bytes_breakdown(codec_, slot.data);
      layer.blocks.push_back(slot);
    }
    table_bytes_ += table_growth;

    // The new tail is (tail + new)[new_blocks * block, pending).
    const std::int64_t consumed = new_blocks * block;
    const std::int64_t old_tail = layer.tail_tokens;
    std::int64_t kept = 0;
    if (consumed < old_tail) {
      kept = old_tail - consumed;
      std::memmove(layer.k_tail.data(), layer.k_tail.data() + consumed * row_, kept * row_ * sizeof(T));
      std::memmove(layer.v_tail.data(), layer.v_tail.data() + consumed * row_, kept * row_ * sizeof(T));
    }
    const std::int64_t first_new = std::max<std::int64_t>(consumed - old_tail, 0);
    const std::int64_t copy = n_tokens - first_new;
    std::memcpy(layer.k_tail.data() + kept * row_, k + first_new * row_, copy * row_ * sizeof(T));
    std::memcpy(layer.v_tail.data() + kept * row_, v + first_new * row_, copy * row_ * sizeof(T));
    layer.tail_tokens = static_cast<int>(kept + copy);
    layer.length += n_tokens;
  }

  void attention(std::span<const SeqId> ids, int layer_index, const T* q, T* out, float scale) const override {
    const int kv_heads = cfg_.num_kv_heads, dim = cfg_.head_dim;
    const int group = cfg_.num_q_heads / kv_heads;
    const int subgroups = (group + cpu::kMaxGroup - 1) / cpu::kMaxGroup;

    // Tasks: (sequence, KV head, query subgroup, range of blocks); the last range takes the tail.
    struct Task {
      int batch, head, subgroup, block_begin, block_end;
      bool tail;
    };
    std::vector<Task> tasks;
    const std::size_t base_tasks = ids.size() * static_cast<std::size_t>(kv_heads * subgroups);
    for (std::size_t b = 0; b < ids.size(); ++b) {
      const Layer& layer = layer_of(ids[b], layer_index);
      const int blocks = static_cast<int>(layer.blocks.size());
      // Split only when the batch alone cannot keep every thread busy.
      int chunks = 1;
      if (base_tasks < static_cast<std::size_t>(2 * threads_)) {
        const int wanted = static_cast<int>((2 * threads_ + base_tasks - 1) / base_tasks);
        const int by_size = std::max(1, blocks * cfg_.block_tokens / kMinChunkTokens);
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

    // Partial softmax state per task: running max, sum of exponentials, unnormalised output.
    const std::size_t per_task = static_cast<std::size_t>(cpu::kMaxGroup) * (2 + dim);
    std::vector<float> partial(tasks.size() * per_task);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_)
    for (std::size_t ti = 0; ti < tasks.size(); ++ti) {
      const Task& task = tasks[ti];
      const Layer& layer = layer_of(ids[static_cast<std::size_t>(task.batch)], layer_index);
      const int g0 = task.subgroup * cpu::kMaxGroup;
      const int gs = std::min(cpu::kMaxGroup, group - g0);
      thread_local std::vector<float> qf;
      qf.resize(static_cast<std::size_t>(gs) * dim);
      const T* qb = q + (static_cast<std::size_t>(task.batch) * cfg_.num_q_heads +
                         static_cast<std::size_t>(task.head) * group + g0) * dim;
      for (int i = 0; i < gs * dim; ++i) qf[static_cast<std::size_t>(i)] = to_float(qb[i]) * scale;
      float* m = partial.data() + ti * per_task;
      float* l = m + cpu::kMaxGroup;
      float* o = l + cpu::kMaxGroup;
      run_chunk(layer, task.head, qf.data(), gs, task.block_begin, task.block_end, task.tail, m, l, o);
    }

    // Merge the chunks of each (sequence, KV head, subgroup), in task order.
    std::size_t ti = 0;
    std::vector<float> merged(static_cast<std::size_t>(dim));
    while (ti < tasks.size()) {
      std::size_t end = ti;
      while (end < tasks.size() && tasks[end].batch == tasks[ti].batch && tasks[end].head == tasks[ti].head &&
             tasks[end].subgroup == tasks[ti].subgroup) {
        ++end;
      }
      const Task& task = tasks[ti];
      const int g0 = task.subgroup * cpu::kMaxGroup;
      const int gs = std::min(cpu::kMaxGroup, group - g0);
      for (int g = 0; g < gs; ++g) {
        float global_max = -INFINITY;
        for (std::size_t t = ti; t < end; ++t) global_max = std::max(global_max, partial[t * per_task + g]);
        double denom = 0.0;
        std::fill(merged.begin(), merged.end(), 0.0f);
        for (std::size_t t = ti; t < end; ++t) {
          const float* m = partial.data() + t * per_task;
          if (m[g] == -INFINITY) continue;  // empty chunk
          const float w = std::exp(m[g] - global_max);
          denom += static_cast<double>(w) * m[cpu::kMaxGroup + g];
          const float* o = m + 2 * cpu::kMaxGroup + static_cast<std::size_t>(g) * dim;
          for (int c = 0; c < dim; ++c) merged[static_cast<std::size_t>(c)] += w * o[c];
        }
        const float inv = static_cast<float>(1.0 / denom);
        T* dst = out + (static_cast<std::size_t>(task.batch) * cfg_.num_q_heads +
                        static_cast<std::size_t>(task.head) * group + g0 + g) * dim;
        for (int c = 0; c < dim; ++c) dst[c] = from_float<T>(merged[static_cast<std::size_t>(c)] * inv);
      }
      ti = end;
    }
  }

  void scores(SeqId id, int layer_index, const T* q, float* scores) const override {
    const Layer& layer = layer_of(id, layer_index);
    const int dim = cfg_.head_dim, group = cfg_.num_q_heads / cfg_.num_kv_heads, block = cfg_.block_tokens;
    const std::size_t len = static_cast<std::size_t>(layer.length);
    const format::SectionLayout k_layout = codec_.geometry.k_layout();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_)
    for (int h = 0; h < cfg_.num_kv_heads; ++h) {
      std::vector<float> qf(static_cast<std::size_t>(cpu::kMaxGroup) * dim);
      std::vector<float> packed(static_cast<std::size_t>(cpu::kMaxGroup) * block);
      for (int g0 = 0; g0 < group; g0 += cpu::kMaxGroup) {
        const int gs = std::min(cpu::kMaxGroup, group - g0);
        const std::size_t qh0 = static_cast<std::size_t>(h) * group + g0;
        for (int i = 0; i < gs * dim; ++i) qf[static_cast<std::size_t>(i)] = to_float(q[qh0 * dim + i]);
        for (std::size_t b = 0; b < layer.blocks.size(); ++b) {
          const std::uint8_t* data = layer.blocks[b].data;
          cpu::section_scores(k_layout, codec_.geometry.k_per_channel, data + head_entry(data, h).k_offset,
                              qf.data(), gs, packed.data(), static_cast<std::size_t>(block));
          const std::uint8_t* order = token_order(data, h);
          for (int g = 0; g < gs; ++g) {
            float* dst = scores + (qh0 + g) * len + b * block;
            for (int i = 0; i < block; ++i) dst[order ? order[i] : i] = packed[static_cast<std::size_t>(g * block + i)];
          }
        }
        const std::size_t tail_start = layer.blocks.size() * block;
        cpu::dense_scores(layer.k_tail.data() + static_cast<std::size_t>(h) * dim, row_, layer.tail_tokens, dim,
                          qf.data(), gs, scores + qh0 * len + tail_start, len);
      }
    }
  }

  void attn_v(SeqId id, int layer_index, const float* weights, float* out) const override {
    const Layer& layer = layer_of(id, layer_index);
    const int dim = cfg_.head_dim, group = cfg_.num_q_heads / cfg_.num_kv_heads, block = cfg_.block_tokens;
    const std::size_t len = static_cast<std::size_t>(layer.length);
    const format::SectionLayout v_layout = codec_.geometry.v_layout();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_)
    for (int h = 0; h < cfg_.num_kv_heads; ++h) {
      std::vector<float> packed(static_cast<std::size_t>(cpu::kMaxGroup) * block);
      cpu::AlignedFloats acc(static_cast<std::size_t>(cpu::kMaxGroup) * dim * 8);
      float min_term[cpu::kMaxGroup];
      for (int g0 = 0; g0 < group; g0 += cpu::kMaxGroup) {
        const int gs = std::min(cpu::kMaxGroup, group - g0);
        const std::size_t qh0 = static_cast<std::size_t>(h) * group + g0;
        std::fill(acc.begin(), acc.end(), 0.0f);
        std::fill(min_term, min_term + cpu::kMaxGroup, 0.0f);
        for (std::size_t b = 0; b < layer.blocks.size(); ++b) {
          const std::uint8_t* data = layer.blocks[b].data;
          const std::uint8_t* order = token_order(data, h);
          for (int g = 0; g < gs; ++g) {
            const float* src = weights + (qh0 + g) * len + b * block;
            for (int i = 0; i < block; ++i) packed[static_cast<std::size_t>(g * block + i)] = src[order ? order[i] : i];
          }
          cpu::section_accumulate_v(v_layout, data + head_entry(data, h).v_offset, packed.data(),
                                    static_cast<std::size_t>(block), gs, acc.data(), min_term);
        }
        const std::size_t tail_start = layer.blocks.size() * block;
        cpu::dense_accumulate_v(layer.v_tail.data() + static_cast<std::size_t>(h) * dim, row_, layer.tail_tokens, dim,
                                weights + qh0 * len + tail_start, len, gs, acc.data());
        cpu::finish_v(acc.data(), min_term, gs, dim, out + qh0 * dim);
      }
    }
  }

  void read_back(SeqId id, int layer_index, float* k, float* v) const override {
    const Layer& layer = layer_of(id, layer_index);
    const std::size_t block_elems = static_cast<std::size_t>(cfg_.block_tokens) * row_;
    for (std::size_t b = 0; b < layer.blocks.size(); ++b) {
      decode_block(codec_, layer.blocks[b].data, k + b * block_elems, v + b * block_elems, row_);
    }
    const std::size_t tail_start = layer.blocks.size() * block_elems;
    for (std::size_t i = 0; i < static_cast<std::size_t>(layer.tail_tokens) * row_; ++i) {
      k[tail_start + i] = to_float(layer.k_tail[i]);
      v[tail_start + i] = to_float(layer.v_tail[i]);
    }
  }

  MemoryStats memory_stats() const override {
    MemoryStats stats;
    stats.layers.resize(static_cast<std::size_t>(cfg_.num_layers));
    const std::size_t token_bytes = row_ * 2 * sizeof(T);
    for (const auto& [id, seq] : sequences_) {
      for (std::size_t li = 0; li < seq.layers.size(); ++li) {
        const Layer& layer = seq.layers[li];
        MemoryBreakdown& m = stats.layers[li];
        const BlockBytes& b = layer.block_bytes;
        m.payload += b.payload;
        m.params += b.params;
        m.descriptors += b.descriptors;
        m.permutations += b.permutations;
        m.headers += b.headers;
        m.k_section_bytes += b.k_sections;
        m.v_section_bytes += b.v_sections;
        m.block_tables += layer.blocks.size() * sizeof(SlotRef);
        m.tail += static_cast<std::size_t>(layer.tail_tokens) * token_bytes;
        m.compressed_tokens += layer.blocks.size() * static_cast<std::size_t>(cfg_.block_tokens);
        m.tail_tokens += static_cast<std::size_t>(layer.tail_tokens);
        m.original_bytes += static_cast<std::size_t>(layer.length) * token_bytes;
        m.original_fp16_bytes += static_cast<std::size_t>(layer.length) * row_ * 2 * 2;
      }
    }
    for (const MemoryBreakdown& m : stats.layers) stats.total += m;
    stats.pool = pool_.stats();
    stats.resident_bytes = resident_bytes();
    return stats;
  }

  void set_stream(void*) override {}

  std::vector<std::uint8_t> export_sequence(SeqId id, std::span<const int> layers) const override {
    std::vector<int> chosen(layers.begin(), layers.end());
    if (chosen.empty()) {
      for (int l = 0; l < cfg_.num_layers; ++l) chosen.push_back(l);
    }
    std::vector<std::uint8_t> image(sizeof(ImageHeader));
    ImageHeader header = make_image_header(codec_, cfg_.k_mode, dtype_code<T>());
    header.layer_count = static_cast<std::uint16_t>(chosen.size());
    std::memcpy(image.data(), &header, sizeof header);
    auto put = [&image](const void* data, std::size_t n) {
      const auto* p = static_cast<const std::uint8_t*>(data);
      image.insert(image.end(), p, p + n);
    };
    for (int l : chosen) {
      const Layer& layer = layer_of(id, l);
      LayerRecord record{};
      record.layer = static_cast<std::uint32_t>(l);
      record.block_count = static_cast<std::uint32_t>(layer.blocks.size());
      record.tail_tokens = static_cast<std::uint32_t>(layer.tail_tokens);
      record.length = static_cast<std::uint64_t>(layer.length);
      put(&record, sizeof record);
      for (const SlotRef& block : layer.blocks) put(&block.bytes, 4);
      for (const SlotRef& block : layer.blocks) put(block.data, block.bytes);
      put(layer.k_tail.data(), static_cast<std::size_t>(layer.tail_tokens) * row_ * sizeof(T));
      put(layer.v_tail.data(), static_cast<std::size_t>(layer.tail_tokens) * row_ * sizeof(T));
    }
    seal_image(image);
    return image;
  }

  void import_sequence(SeqId id, std::span<const std::uint8_t> image) override {
    const int max_tail = static_cast<int>(std::min<std::size_t>(tail_capacity_ + (1u << 20), 1u << 21));
    const std::vector<ParsedLayer> parsed =
        parse_image(image, codec_, cfg_.k_mode, dtype_code<T>(), sizeof(T), cfg_.num_layers, max_tail);

    const bool creating = !contains(id);
    std::vector<std::uint32_t> sizes;
    std::size_t tail_blocks = 0;
    std::vector<std::vector<T>> tails(parsed.size() * 2);
    for (std::size_t i = 0; i < parsed.size(); ++i) {
      const ParsedLayer& p = parsed[i];
      PACKKV_REQUIRE(creating || layer_of(id, p.layer).length == 0,
                     fmt::format("import: layer {} of sequence {} is not empty", p.layer, id));
      for (const auto& block : p.blocks) sizes.push_back(static_cast<std::uint32_t>(block.size()));
      // Tails are re-appended (a different residual_tokens may compress some of them): copy them
      // out of the unaligned image and check their values now, so that cannot fail later.
      const std::size_t n = static_cast<std::size_t>(p.tail_tokens) * row_;
      for (int which = 0; which < 2; ++which) {
        std::vector<T>& tail = tails[2 * i + which];
        tail.resize(n);
        if (n) std::memcpy(tail.data(), which == 0 ? p.tail_k : p.tail_v, n * sizeof(T));
        PACKKV_REQUIRE(first_unstorable(tail.data(), n) == n,
                       fmt::format("import: layer {} tail holds NaN, Inf or out-of-range values", p.layer));
      }
      tail_blocks += static_cast<std::size_t>(p.tail_tokens) / static_cast<std::size_t>(cfg_.block_tokens);
    }
    // Budget: the blocks, the worst case of the re-appended tails, the tables, a new sequence.
    std::vector<std::uint32_t> worst = sizes;
    worst.insert(worst.end(), tail_blocks, codec_.geometry.max_block_bytes());
    reserve_for(worst,
                (tail_blocks ? pool_.page_bytes() : 0) + (sizes.size() + tail_blocks) * sizeof(SlotRef) +
                    (creating ? tail_bytes_per_sequence() + sequence_overhead() : 0),
                fmt::format("import of sequence {}", id));

    // Commit: allocation is all-or-nothing; after it nothing can fail but allocation of memory.
    std::vector<SlotRef> slots = pool_.allocate(sizes);
    if (creating) {
      try {
        create_sequence(id);
      } catch (...) {
        for (const SlotRef& slot : slots) pool_.release(slot);
        throw;
      }
    }
    std::size_t next = 0;
    for (std::size_t i = 0; i < parsed.size(); ++i) {
      const ParsedLayer& p = parsed[i];
      Layer& layer = sequences_.at(id).layers[static_cast<std::size_t>(p.layer)];
      layer.blocks.reserve(p.blocks.size());
      for (const auto& block : p.blocks) {
        SlotRef slot = slots[next++];
        std::memcpy(slot.data, block.data(), block.size());
        layer.block_bytes += block_bytes_breakdown(codec_, slot.data);
        layer.blocks.push_back(slot);
      }
      table_bytes_ += p.blocks.size() * sizeof(SlotRef);
      layer.length = static_cast<std::int64_t>(p.blocks.size()) * cfg_.block_tokens;
      if (p.tail_tokens > 0) {
        append(id, p.layer, tails[2 * i].data(), tails[2 * i + 1].data(), p.tail_tokens);
      }
    }
  }

  void release_unused_memory() override { pool_.trim(); }

 private:
  struct Layer {
    std::vector<SlotRef> blocks;  // the block table, oldest first
    BlockBytes block_bytes;       // of all its blocks (blocks only leave with the whole sequence)
    std::vector<T> k_tail, v_tail;
    int tail_tokens = 0;
    std::int64_t length = 0;
  };
  struct Sequence {
    std::vector<Layer> layers;
  };
  void create_sequence(SeqId id) {
    Sequence seq;
    seq.layers.resize(static_cast<std::size_t>(cfg_.num_layers));
    for (auto& layer : seq.layers) {
      layer.k_tail.resize(tail_capacity_ * row_);
      layer.v_tail.resize(tail_capacity_ * row_);
    }
    sequences_.emplace(id, std::move(seq));
    fixed_bytes_ += tail_bytes_per_sequence() + sequence_overhead();
  }

  const Layer& layer_of(SeqId id, int layer) const {
    return sequences_.at(id).layers[static_cast<std::size_t>(layer)];
  }
  std::size_t tail_bytes_per_sequence() const {
    return static_cast<std::size_t>(cfg_.num_layers) * tail_capacity_ * row_ * 2 * sizeof(T);
  }
  std::size_t sequence_overhead() const { return static_cast<std::size_t>(cfg_.num_layers) * sizeof(Layer); }
  std::size_t resident_bytes() const { return pool_.reserved_bytes() + fixed_bytes_ + table_bytes_; }

  void check_budget(std::size_t extra, const std::string& what) const {
    if (cfg_.memory_budget_bytes == 0) return;
    const std::size_t resident = resident_bytes();
    PACKKV_REQUIRE(resident + extra <= cfg_.memory_budget_bytes,
                   fmt::format("{}: memory budget of {} bytes exceeded ({} in use, {} more needed); remove or "
                               "export sequences to free memory",
                               what, cfg_.memory_budget_bytes, resident, extra));
  }

  // Makes sure blocks of these sizes plus `other_bytes` fit the budget. Before the budget says no,
  // stranded memory is reclaimed: the pool is compacted (blocks move, tables follow) and pages that
  // empty are returned. Without budget pressure the pool is compacted when new pages would be
  // reserved while at least an eighth of it (and four pages) is stranded in partly used pages.
  void reserve_for(std::span<const std::uint32_t> sizes, std::size_t other_bytes, const std::string& what) {
    const std::size_t extra = pool_.extra_bytes_needed(sizes);
    if (!fits(extra + other_bytes)) {
      reclaim();
    } else if (extra > 0 && pool_.stranded_bytes() >= std::max(4 * pool_.page_bytes(), pool_.reserved_bytes() / 8)) {
      compact_pool();
    }
    check_budget(pool_.extra_bytes_needed(sizes) + other_bytes, what);
  }

  bool fits(std::size_t extra) const {
    return cfg_.memory_budget_bytes == 0 || resident_bytes() + extra <= cfg_.memory_budget_bytes;
  }

  // Under budget pressure: compact, then hand every empty page back (reserved memory shrinks).
  void reclaim() {
    if (pool_.stranded_bytes() >= pool_.page_bytes()) compact_pool();
    pool_.trim();
  }

  void compact_pool() {
    std::unordered_map<std::uint64_t, SlotRef*> owners;
    auto key = [](std::uint32_t page, std::uint32_t slot) { return (std::uint64_t{page} << 32) | slot; };
    for (auto& [id, seq] : sequences_) {
      for (Layer& layer : seq.layers) {
        for (SlotRef& ref : layer.blocks) owners.emplace(key(ref.page, ref.slot), &ref);
      }
    }
    pool_.compact([&](std::uint32_t page, std::uint32_t slot, const SlotRef& to) {
      const auto it = owners.find(key(page, slot));
      SlotRef* ref = it->second;
      owners.erase(it);
      ref->data = to.data;
      ref->page = to.page;
      ref->slot = to.slot;
      owners.emplace(key(to.page, to.slot), ref);
    });
  }

  void check_values(const T* k, const T* v, int n_tokens, SeqId id, int layer) const {
    const std::size_t count = static_cast<std::size_t>(n_tokens) * row_;
    for (int which = 0; which < 2; ++which) {
      const T* x = which == 0 ? k : v;
      const std::size_t i = first_unstorable(x, count);
      if (i == count) continue;
      const std::size_t token = i / row_, head = i % row_ / cfg_.head_dim, channel = i % cfg_.head_dim;
      throw_error(fmt::format("append to sequence {} layer {}: {} value {} at token {}, head {}, channel {} is "
                              "NaN, Inf or beyond +-65504 (packkv stores per-token parameters in fp16)",
                              id, layer, which == 0 ? "K" : "V", to_float(x[i]), token, head, channel));
    }
  }

  format::HeadEntry head_entry(const std::uint8_t* block, int head) const {
    format::HeadEntry e;
    std::memcpy(&e, block + codec_.geometry.directory_offset() + head * sizeof e, sizeof e);
    return e;
  }
  const std::uint8_t* token_order(const std::uint8_t* block, int head) const {
    return codec_.geometry.permuted ? block + codec_.geometry.permutation_offset() + head * cfg_.block_tokens : nullptr;
  }

  // Softmax-weighted attention of gs query heads over blocks [begin, end) (+ the tail): writes the
  // chunk's max score, sum of exponentials and unnormalised output per head.
  void run_chunk(const Layer& layer, int head, const float* qf, int gs, int begin, int end, bool with_tail, float* m,
                 float* l, float* o) const {
    const int dim = cfg_.head_dim, block = cfg_.block_tokens;
    const int tail = with_tail ? layer.tail_tokens : 0;
    const int tokens = (end - begin) * block + tail;
    for (int g = 0; g < cpu::kMaxGroup; ++g) {
      m[g] = -INFINITY;
      l[g] = 0.0f;
    }
    if (tokens == 0) {
      std::fill(o, o + static_cast<std::size_t>(gs) * dim, 0.0f);
      return;
    }
    thread_local std::vector<float> s;
    thread_local cpu::AlignedFloats acc;
    const std::size_t stride = static_cast<std::size_t>(tokens);
    s.resize(static_cast<std::size_t>(gs) * stride);
    acc.assign(static_cast<std::size_t>(gs) * dim * 8, 0.0f);
    const format::SectionLayout k_layout = codec_.geometry.k_layout(), v_layout = codec_.geometry.v_layout();
    for (int b = begin; b < end; ++b) {
      const std::uint8_t* data = layer.blocks[static_cast<std::size_t>(b)].data;
      cpu::section_scores(k_layout, codec_.geometry.k_per_channel, data + head_entry(data, head).k_offset, qf, gs,
                          s.data() + static_cast<std::size_t>(b - begin) * block, stride);
    }
    const std::size_t tail_at = static_cast<std::size_t>(end - begin) * block;
    cpu::dense_scores(layer.k_tail.data() + static_cast<std::size_t>(head) * dim, row_, tail, dim, qf, gs,
                      s.data() + tail_at, stride);
    cpu::softmax_rows(s.data(), tokens, stride, gs, m, l);
    float min_term[cpu::kMaxGroup] = {};
    for (int b = begin; b < end; ++b) {
      const std::uint8_t* data = layer.blocks[static_cast<std::size_t>(b)].data;
      cpu::section_accumulate_v(v_layout, data + head_entry(data, head).v_offset,
                                s.data() + static_cast<std::size_t>(b - begin) * block, stride, gs, acc.data(),
                                min_term);
    }
    cpu::dense_accumulate_v(layer.v_tail.data() + static_cast<std::size_t>(head) * dim, row_, tail, dim,
                            s.data() + tail_at, stride, gs, acc.data());
    cpu::finish_v(acc.data(), min_term, gs, dim, o);
  }

  CacheConfig cfg_;
  CodecParams codec_;
  PagePool pool_;
  std::size_t row_;            // elements per token: kv_heads * head_dim
  std::size_t tail_capacity_;  // tokens a tail can hold: residual + block - 1, rounded up
  int threads_;
  std::unordered_map<SeqId, Sequence> sequences_;
  std::size_t fixed_bytes_ = 0;  // tails and per-sequence bookkeeping
  std::size_t table_bytes_ = 0;  // block-table entries
};

template <class T>
std::unique_ptr<CacheBackend<T>> make_cpu_backend(const CacheConfig& config) {
  return std::make_unique<CpuBackend<T>>(config);
}

template std::unique_ptr<CacheBackend<float>> make_cpu_backend<float>(const CacheConfig&);
template std::unique_ptr<CacheBackend<fp16_t>> make_cpu_backend<fp16_t>(const CacheConfig&);
template std::unique_ptr<CacheBackend<bf16_t>> make_cpu_backend<bf16_t>(const CacheConfig&);

}  // namespace packkv::detail

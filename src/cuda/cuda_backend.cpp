// The CUDA backend: packed blocks stored tightly in per-(sequence, layer) device pages, device
// block tables and tail rings, kernels from kernels/launch.hpp. docs/cuda.md explains the design.
//
// Host code only (compiled by the host compiler, so fmt is fine here). The host knows every length
// and block count without asking the device; only block sizes are the device's to know. It
// therefore reserves pages for the worst case, lets the device place blocks with their real sizes,
// and learns where placement got to from a word in mapped memory. That is what lets append and
// attention run without a device-to-host synchronisation.
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <deque>
#include <limits>
#include <mutex>
#include <string>
#include <unordered_set>
#include <vector>

#include "core/backend.hpp"
#include "cuda/cuda_support.hpp"
#include "launch.hpp"

namespace packkv::cuda::detail {

namespace {

using ::packkv::detail::AppendPlan;
using ::packkv::detail::LayerBytes;
using ::packkv::detail::LayerRead;
using ::packkv::detail::LayerStore;
using ::packkv::detail::LayerWrite;
using ::packkv::detail::PreparedWrite;

constexpr std::size_t kSlotAlign = 256;
constexpr std::size_t kNoWord = std::numeric_limits<std::size_t>::max();
/// Blocks of one write encoded per launch round (staging is a worst-case slot per block). The CPU
/// emulator's runs are small: its tests set a small round through the config's block sizes.
constexpr std::size_t kMaxStagingBytes = std::size_t{256} << 20;

struct UnseenPlacement {
  std::uint32_t launch;
  int blocks;
};

/// A layer's blocks and tail on the device.
template <class T>
class CudaLayerStore final : public LayerStore {
 public:
  using Forget = void (*)(void* owner, CudaLayerStore* store);
  CudaLayerStore(void* owner, Forget forget) : owner_(owner), forget_(forget) {}
  ~CudaLayerStore() override { forget_(owner_, this); }
  CudaLayerStore(const CudaLayerStore&) = delete;
  CudaLayerStore& operator=(const CudaLayerStore&) = delete;

  DeviceBuffer table;  ///< std::uint8_t*[table_capacity]: each block's address
  std::size_t table_capacity = 0;
  std::vector<std::uint8_t*> pages;  ///< pages owned, in placement order
  DeviceBuffer page_list;            ///< PlacementCursor, then std::uint8_t*[page_list_capacity]
  std::size_t page_list_capacity = 0;
  std::size_t progress_word = kNoWord;  ///< index into the backend's mapped words
  std::uint32_t seen_page = 0;          ///< cursor after the last placement seen complete
  std::uint32_t seen_offset = 0;
  std::deque<UnseenPlacement> unseen;   ///< placements queued but not yet seen complete
  DeviceBuffer ring;                    ///< tail ring: K rows, then V rows, ring_capacity each
  int ring_capacity = 0;
  std::size_t live_blocks = 0;          ///< blocks in the table
  mutable std::size_t live_bytes = 0;   ///< their bytes, as the last memory_stats measured them

  PlacementCursor* cursor() const { return page_list.as<PlacementCursor>(); }
  std::uint8_t** page_pointers() const {
    return reinterpret_cast<std::uint8_t**>(page_list.as<std::uint8_t>() + sizeof(PlacementCursor));
  }

 private:
  void* owner_;
  Forget forget_;
};

template <class T>
const CudaLayerStore<T>& store_of(const LayerRead& layer) {
  return static_cast<const CudaLayerStore<T>&>(*layer.store);
}

/// A write's plan on the device: what it needs, computed without changing anything.
struct LayerPlan {
  std::size_t pages_target = 0;     ///< pages the layer owns after the commit
  std::size_t table_capacity = 0;   ///< after the commit
  std::size_t page_list_capacity = 0;
  bool ring_grows = false;
  std::vector<std::uint32_t> adopted_page, adopted_offset;  ///< imported blocks' places
  PlacementCursor adopted_cursor{};                         ///< after them
  std::size_t upload_offset = 0;  ///< host tokens' place in the upload buffer (bytes)
};

template <class T>
class CudaBackend;

template <class T>
class CudaPrepared final : public PreparedWrite {
 public:
  std::size_t resident_after() const override;

  const CudaBackend<T>* backend = nullptr;
  std::vector<LayerWrite<T>> writes;
  std::vector<LayerPlan> plans;
  std::size_t pages_wanted = 0;    ///< new pages the layers take from the pool
  std::size_t pages_returned = 0;  ///< pages the layers give back to the pool
  std::size_t growth_bytes = 0;    ///< tables, page lists and rings that grow
  std::size_t staging_bytes = 0;   ///< staging the commit needs
  std::size_t upload_bytes = 0;    ///< host tokens travelling to the device
};

template <class T>
class CudaBackend final : public ::packkv::detail::Backend<T> {
 public:
  CudaBackend(const CacheConfig& config, const CodecParams& codec)
      : codec_(codec),
        geometry_(codec.geometry),
        row_(static_cast<std::size_t>(config.num_kv_heads) * config.head_dim),
        num_q_heads_(config.num_q_heads),
        group_(config.num_q_heads / config.num_kv_heads),
        heads_per_cta_(std::min(group_, kMaxHeadsPerCta)),
        subgroups_((group_ + heads_per_cta_ - 1) / heads_per_cta_),
        median_repack_(config.repack == RepackMethod::median),
        strict_(config.cuda_strict),
        slot_bytes_((geometry_.max_block_bytes() + kSlotAlign - 1) / kSlotAlign * kSlotAlign),
        // Eight worst-case blocks per page: the block that does not fit at a page's end wastes
        // about half a block per page (~6%), and a layer's last page is on average half empty.
        pool_((8 * slot_bytes_ + 65535) / 65536 * 65536),
        blocks_per_page_worst_(pool_.page_bytes() / slot_bytes_) {
    std::string why;
    if (device_count(&why) == 0) ::packkv::detail::throw_error("Device::cuda requested but " + why);
    PACKKV_REQUIRE(config.repack != RepackMethod::greedy,
                   "the CUDA backend does not implement greedy repacking (its sequential pack-growing search "
                   "does not map to the GPU at an acceptable cost); use RepackMethod::median or none");
    int device = 0, shared_optin = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    check_cuda(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, device), "query SM count");
    check_cuda(cudaDeviceGetAttribute(&shared_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
               "query shared memory");
    const std::size_t needed = std::max(encode_shared_bytes(geometry_), read_shared_bytes(geometry_));
    PACKKV_REQUIRE(needed <= static_cast<std::size_t>(shared_optin),
                   fmt::format("block_tokens {} x head_dim {} needs {} bytes of shared memory per CUDA block, the "
                               "device allows {}: use smaller blocks",
                               config.block_tokens, config.head_dim, needed, shared_optin));
    void* host = nullptr;
    check_cuda(cudaHostAlloc(&host, sizeof(DeviceError), cudaHostAllocMapped), "the mapped error record");
    error_host_ = static_cast<DeviceError*>(host);
    std::memset(host, 0, sizeof(DeviceError));
    check_cuda(cudaHostGetDevicePointer(reinterpret_cast<void**>(&error_device_), host, 0), "cudaHostGetDevicePointer");
    error_claim_ = DeviceBuffer(sizeof(int), stream_);
    check_cuda(cudaMemsetAsync(error_claim_.data(), 0, sizeof(int), stream_), "error claim initialisation");
  }

  ~CudaBackend() override {
    cudaStreamSynchronize(stream_);  // kernels may still write the mapped words freed below
    workspace_ = DeviceBuffer();
    staging_ = DeviceBuffer();
    error_claim_ = DeviceBuffer();
    pool_ = DevicePagePool(pool_.page_bytes());
    cudaStreamSynchronize(stream_);
    if (error_host_ != nullptr) cudaFreeHost(error_host_);
  }

  std::unique_ptr<LayerStore> new_layer_store() override {
    auto store = std::make_unique<CudaLayerStore<T>>(this, [](void* owner, CudaLayerStore<T>* dying) {
      static_cast<CudaBackend*>(owner)->forget(dying);
    });
    const std::lock_guard lock(mutex_);
    stores_.insert(store.get());
    return store;
  }
  std::size_t layer_store_bytes() const override { return sizeof(CudaLayerStore<T>); }

  void clear(LayerStore& base) override {
    const std::lock_guard lock(mutex_);
    clear_locked(static_cast<CudaLayerStore<T>&>(base));
  }

  // ---- writes ----

  void check_values(std::span<const LayerWrite<T>> writes) override {
    const std::lock_guard lock(mutex_);
    raise_device_error();
    if (!strict_) return;  // the kernels check every value and a later call reports
    check_cuda(cudaStreamSynchronize(stream_), "append (strict validation)");
    raise_device_error();  // an earlier kernel's report is not this append's
    for (const LayerWrite<T>& w : writes) {
      ValidateParams<T> params{};
      params.rows = rows_of(w, w.k, w.v);
      params.n_tokens = w.plan.n_tokens;
      params.geometry = geometry_;
      params.k_max_code = codec_.k_max_code;
      params.v_max_code = codec_.v_max_code;
      params.errors = errors_for(w);
      check_cuda(launch_validate(params, stream_), "validation kernel launch");
    }
    check_cuda(cudaStreamSynchronize(stream_), "append (strict validation)");
    raise_device_error(ErrorOrigin::strict_append);
  }

  std::unique_ptr<PreparedWrite> prepare(std::span<const LayerWrite<T>> writes) override {
    const std::lock_guard lock(mutex_);
    raise_device_error();
    auto prepared = std::make_unique<CudaPrepared<T>>();
    prepared->backend = this;
    prepared->writes.assign(writes.begin(), writes.end());
    const std::uint32_t page_bytes = static_cast<std::uint32_t>(pool_.page_bytes());
    std::size_t sealed_max = 0;
    for (const LayerWrite<T>& w : writes) {
      auto& store = static_cast<CudaLayerStore<T>&>(*w.store);
      LayerPlan plan;
      refresh_placement(store);  // learns what completed; changes nothing the caller can see
      std::int64_t new_blocks = w.plan.seal_blocks;
      std::uint32_t seen_page = store.seen_page, seen_offset = store.seen_offset;
      std::int64_t unseen = 0;
      for (const UnseenPlacement& u : store.unseen) unseen += u.blocks;
      if (!w.blocks.empty()) {
        // Imported blocks (the layer is empty): placed here with the device's rule.
        PlacementCursor cursor{};
        for (const auto& b : w.blocks) {
          const auto size = static_cast<std::uint32_t>(b.size());
          if (cursor.offset + size > page_bytes) {
            ++cursor.page;
            cursor.offset = 0;
          }
          plan.adopted_page.push_back(cursor.page);
          plan.adopted_offset.push_back(cursor.offset);
          cursor.offset += size;
        }
        plan.adopted_cursor = cursor;
        seen_page = cursor.page;
        seen_offset = cursor.offset;
        unseen = 0;
      }
      const int blocks_after = w.num_blocks + static_cast<int>(w.blocks.size()) + w.plan.seal_blocks;
      plan.pages_target = pages_bound(blocks_after, seen_page, seen_offset, unseen + new_blocks);
      if (plan.pages_target > store.pages.size()) {
        prepared->pages_wanted += plan.pages_target - store.pages.size();
      } else {
        prepared->pages_returned += store.pages.size() - plan.pages_target;
      }
      plan.table_capacity = store.table_capacity;
      while (plan.table_capacity < static_cast<std::size_t>(blocks_after)) {
        plan.table_capacity = std::max<std::size_t>(64, 2 * plan.table_capacity);
      }
      plan.page_list_capacity = store.page_list_capacity;
      while (plan.page_list_capacity < plan.pages_target) {
        plan.page_list_capacity = std::max<std::size_t>(16, 2 * plan.page_list_capacity);
      }
      plan.ring_grows = w.plan.after.capacity > store.ring_capacity;
      prepared->growth_bytes += table_bytes(plan.table_capacity) - table_bytes(store.table_capacity) +
                                page_list_bytes(plan.page_list_capacity) - page_list_bytes(store.page_list_capacity) +
                                (plan.ring_grows ? ring_bytes(w.plan.after.capacity) - ring_bytes(store.ring_capacity) : 0);
      if (w.tokens_on_host && w.plan.n_tokens > 0) {
        plan.upload_offset = prepared->upload_bytes;
        prepared->upload_bytes += format::align_up(
            static_cast<std::uint32_t>(2 * static_cast<std::size_t>(w.plan.n_tokens) * row_ * sizeof(T)), 256);
      }
      sealed_max = std::max(sealed_max, static_cast<std::size_t>(w.plan.seal_blocks));
      prepared->plans.push_back(std::move(plan));
    }
    prepared->staging_bytes = static_cast<std::size_t>(std::min<std::int64_t>(
                                  static_cast<std::int64_t>(sealed_max), blocks_per_round())) *
                              (slot_bytes_ + 4);
    return prepared;
  }

  void commit(PreparedWrite& base) override {
    auto& prepared = static_cast<CudaPrepared<T>&>(base);
    const std::lock_guard lock(mutex_);
    // Acquire everything new first (locals: a failure frees them and changes nothing).
    const std::size_t pool_free_after = pool_.free_pages() + prepared.pages_returned;
    const std::size_t fresh_pages = prepared.pages_wanted > pool_free_after ? prepared.pages_wanted - pool_free_after : 0;
    std::vector<DeviceBuffer> pages = pool_.allocate(fresh_pages, stream_);
    struct Grown {
      DeviceBuffer table, page_list, ring;
      std::size_t progress_word = kNoWord;
    };
    std::vector<Grown> grown(prepared.writes.size());
    DeviceBuffer staging, upload;
    try {
      for (std::size_t i = 0; i < prepared.writes.size(); ++i) {
        const LayerWrite<T>& w = prepared.writes[i];
        const LayerPlan& plan = prepared.plans[i];
        const auto& store = static_cast<const CudaLayerStore<T>&>(*w.store);
        if (plan.table_capacity != store.table_capacity) grown[i].table = DeviceBuffer(table_bytes(plan.table_capacity), stream_);
        if (plan.page_list_capacity != store.page_list_capacity) {
          grown[i].page_list = DeviceBuffer(page_list_bytes(plan.page_list_capacity), stream_);
        }
        if (plan.ring_grows) grown[i].ring = DeviceBuffer(ring_bytes(w.plan.after.capacity), stream_);
        if (store.progress_word == kNoWord && plan.pages_target > 0) grown[i].progress_word = progress_.take();
      }
      if (prepared.staging_bytes > staging_.bytes()) staging = DeviceBuffer(prepared.staging_bytes, stream_);
      if (prepared.upload_bytes > 0) upload = DeviceBuffer(prepared.upload_bytes, stream_);
    } catch (...) {
      for (Grown& g : grown) {
        if (g.progress_word != kNoWord) progress_.give(g.progress_word);
      }
      throw;
    }
    // Apply.
    pool_.add(std::move(pages));
    if (staging.bytes() != 0) staging_ = std::move(staging);
    bool transfers = false;
    for (std::size_t i = 0; i < prepared.writes.size(); ++i) {
      const LayerWrite<T>& w = prepared.writes[i];
      auto& store = static_cast<CudaLayerStore<T>&>(*w.store);
      if (grown[i].progress_word != kNoWord) store.progress_word = grown[i].progress_word;
      give_back_pages(store, prepared.plans[i].pages_target);
    }
    for (std::size_t i = 0; i < prepared.writes.size(); ++i) {
      const LayerWrite<T>& w = prepared.writes[i];
      const LayerPlan& plan = prepared.plans[i];
      auto& store = static_cast<CudaLayerStore<T>&>(*w.store);
      install_tables(store, plan, grown[i].table, grown[i].page_list, w.num_blocks);
      const T* k = w.k;
      const T* v = w.v;
      if (w.tokens_on_host && w.plan.n_tokens > 0) {
        const std::size_t n = static_cast<std::size_t>(w.plan.n_tokens) * row_;
        T* dk = reinterpret_cast<T*>(upload.as<std::uint8_t>() + plan.upload_offset);
        T* dv = dk + n;
        check_cuda(cudaMemcpyAsync(dk, w.k, n * sizeof(T), cudaMemcpyHostToDevice, stream_), "token upload");
        check_cuda(cudaMemcpyAsync(dv, w.v, n * sizeof(T), cudaMemcpyHostToDevice, stream_), "token upload");
        k = dk;
        v = dv;
        transfers = true;
      }
      if (!w.blocks.empty()) {
        adopt_blocks(store, w, plan);
        transfers = true;
      }
      seal_blocks(store, w, k, v);
      write_tail(store, w, k, v, std::move(grown[i].ring));
    }
    // Imports hand the device host memory that lives only as long as the call: wait for it.
    if (transfers) check_cuda(cudaStreamSynchronize(stream_), "import (uploads)");
  }

  // ---- memory ----

  std::size_t resident_bytes() const override {
    return pool_.reserved_bytes() + owned_bytes_ + staging_.bytes() + workspace_.bytes() + error_claim_.bytes();
  }

  void reclaim() override {
    const std::lock_guard lock(mutex_);
    check_cuda(cudaStreamSynchronize(stream_), "reclaim");
    for (CudaLayerStore<T>* store : stores_) {
      refresh_placement(*store);
      give_back_pages(*store, pages_bound(*store, 0));
    }
    pool_.release_free();
  }

  PoolStats pool_stats() const override {
    const std::lock_guard lock(mutex_);
    PoolStats s;
    s.page_bytes = pool_.page_bytes();
    s.pages_reserved = pool_.pages();
    s.reserved_bytes = pool_.reserved_bytes();
    s.slot_bytes = pool_.pages_in_use() * pool_.page_bytes();  // pages handed to layers
    for (const CudaLayerStore<T>* store : stores_) {
      s.live_bytes += store->live_bytes;
      s.live_blocks += store->live_blocks;
    }
    return s;
  }
  std::size_t scratch_bytes() const override { return staging_.bytes() + workspace_.bytes() + error_claim_.bytes(); }

  // ---- reads ----

  void attention(std::span<const LayerRead> batch, const T* q, T* out, float scale) const override {
    const std::lock_guard lock(mutex_);
    raise_device_error();
    const std::size_t q_stride = static_cast<std::size_t>(num_q_heads_) * geometry_.head_dim;
    for (std::size_t first = 0; first < batch.size(); first += kMaxBatchPerLaunch) {
      const int count = static_cast<int>(std::min<std::size_t>(kMaxBatchPerLaunch, batch.size() - first));
      AttentionParams<T> params{};
      params.shape = read_shape();
      params.batch = count;
      int max_units = 0;
      for (int b = 0; b < count; ++b) {
        params.seqs[b] = view(batch[first + static_cast<std::size_t>(b)]);
        max_units = std::max(max_units, params.seqs[b].num_units(geometry_.block_tokens));
      }
      const Split split = choose_split(max_units, count * geometry_.num_heads * subgroups_);
      params.units_per_split = split.units_per_split;
      params.num_splits = split.splits;
      params.q = q + first * q_stride;
      params.out = out + first * q_stride;
      params.softmax_scale = scale;
      params.partials = workspace(static_cast<std::size_t>(count) * num_q_heads_ * split.splits * (geometry_.head_dim + 2));
      check_cuda(launch_attention(params, stream_), "attention kernel launch");
    }
  }

  void scores(const LayerRead& layer, const T* q, float* scores) const override {
    const std::lock_guard lock(mutex_);
    raise_device_error();
    ScoresParams<T> params{};
    params.shape = read_shape();
    params.seq = view(layer);
    params.q = q;
    params.scores = scores;
    params.length = layer.length;
    check_cuda(launch_scores(params, stream_), "scores kernel launch");
  }

  void attn_v(const LayerRead& layer, const float* weights, float* out) const override {
    const std::lock_guard lock(mutex_);
    raise_device_error();
    AttnVParams<T> params{};
    params.shape = read_shape();
    params.seq = view(layer);
    params.weights = weights;
    params.out = out;
    params.length = layer.length;
    const Split split = choose_split(params.seq.num_units(geometry_.block_tokens), geometry_.num_heads * subgroups_);
    params.units_per_split = split.units_per_split;
    params.num_splits = split.splits;
    params.partials = workspace(static_cast<std::size_t>(num_q_heads_) * split.splits * geometry_.head_dim);
    check_cuda(launch_attn_v(params, stream_), "attn_v kernel launch");
  }

  void read_back(const LayerRead& layer, float* k, float* v) const override {
    const std::lock_guard lock(mutex_);
    raise_device_error();
    ReadBackParams<T> params{};
    params.geometry = geometry_;
    params.seq = view(layer);
    params.k = k;
    params.v = v;
    check_cuda(launch_read_back(params, stream_), "read_back kernel launch");
    // An inspection call: it waits, so that device-reported errors surface here at the latest.
    check_cuda(cudaStreamSynchronize(stream_), "read_back");
    raise_device_error();
  }

  void layer_bytes(std::span<const LayerRead> layers, std::span<LayerBytes> out) const override {
    const std::lock_guard lock(mutex_);
    check_cuda(cudaStreamSynchronize(stream_), "memory_stats");
    raise_device_error();
    // One statistics kernel per layer over its device block table, one download.
    constexpr std::size_t kCounters = 5;  // see launch_block_stats
    const std::size_t count = std::max<std::size_t>(1, layers.size() * kCounters);
    std::vector<unsigned long long> counters(count, 0);
    DeviceBuffer device_counters(count * sizeof(unsigned long long), stream_);
    check_cuda(cudaMemsetAsync(device_counters.data(), 0, device_counters.bytes(), stream_), "memory_stats memset");
    for (std::size_t i = 0; i < layers.size(); ++i) {
      const CudaLayerStore<T>& store = store_of<T>(layers[i]);
      check_cuda(launch_block_stats(geometry_, store.table.template as<const std::uint8_t* const>(),
                                    layers[i].num_blocks, device_counters.as<unsigned long long>() + kCounters * i,
                                    stream_),
                 "block statistics kernel launch");
    }
    check_cuda(cudaMemcpyAsync(counters.data(), device_counters.data(), device_counters.bytes(), cudaMemcpyDeviceToHost,
                               stream_),
               "memory_stats download");
    check_cuda(cudaStreamSynchronize(stream_), "memory_stats");
    const format::SectionLayout kl = geometry_.k_layout(), vl = geometry_.v_layout();
    const std::size_t params =
        static_cast<std::size_t>(geometry_.num_heads) * (kl.param_count + vl.param_count) * sizeof(format::QuantParams);
    for (std::size_t i = 0; i < layers.size(); ++i) {
      const CudaLayerStore<T>& store = store_of<T>(layers[i]);
      const unsigned long long* c = counters.data() + kCounters * i;
      const std::size_t n = static_cast<std::size_t>(layers[i].num_blocks);
      BlockBytes& b = out[i].blocks;
      b.payload = c[0];
      b.descriptors = c[1];
      b.params = n * params;
      b.permutations = n * geometry_.permutation_bytes();
      b.headers = c[2] - b.payload - b.params - b.descriptors - b.permutations;
      b.k_sections = c[3];
      b.v_sections = c[4];
      out[i].tables = store.table.bytes() + store.page_list.bytes();
      out[i].tail = store.ring.bytes();
      store.live_bytes = c[2];
    }
  }

  // Downloads what export needs: the block table, once each the pages the blocks lie in (a block's
  // size is the first word of its header, checked against the page before it is read), and the
  // tail ring unrolled to token order. A transfer call: it waits for the stream.
  void download(const LayerRead& layer, std::vector<std::uint32_t>& sizes, std::vector<std::uint8_t>& blocks, T* tail_k,
                T* tail_v) const override {
    const std::lock_guard lock(mutex_);
    check_cuda(cudaStreamSynchronize(stream_), "export_sequence");
    raise_device_error();
    const CudaLayerStore<T>& store = store_of<T>(layer);
    const auto n = static_cast<std::size_t>(layer.num_blocks);
    const std::size_t page_bytes = pool_.page_bytes();
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
      PACKKV_REQUIRE(size >= geometry_.min_block_bytes() && size <= geometry_.max_block_bytes() &&
                         offset + size <= page_bytes,
                     fmt::format("export_sequence: block {} has impossible size {} (device state corrupt)", b, size));
      sizes.push_back(size);
      blocks.insert(blocks.end(), copy.data() + offset, copy.data() + offset + size);
    }
    if (layer.tail.len > 0) {
      std::vector<T> ring(2 * static_cast<std::size_t>(store.ring_capacity) * row_);
      check_cuda(cudaMemcpy(ring.data(), store.ring.data(), ring.size() * sizeof(T), cudaMemcpyDeviceToHost),
                 "export_sequence (tail download)");
      const T* ring_v = ring.data() + static_cast<std::size_t>(store.ring_capacity) * row_;
      for (int j = 0; j < layer.tail.len; ++j) {
        const std::size_t row = static_cast<std::size_t>(layer.tail.row(layer.tail.begin + j)) * row_;
        std::memcpy(tail_k + j * row_, ring.data() + row, row_ * sizeof(T));
        std::memcpy(tail_v + j * row_, ring_v + row, row_ * sizeof(T));
      }
    }
  }

  void set_stream(void* stream) override {
    const std::lock_guard lock(mutex_);
    // Stream-ordered frees and page reuse assume one stream: finish the old one's work first.
    check_cuda(cudaStreamSynchronize(stream_), "set_stream (draining the previous stream)");
    stream_ = static_cast<cudaStream_t>(stream);
    for (CudaLayerStore<T>* store : stores_) {
      store->table.set_stream(stream_);
      store->page_list.set_stream(stream_);
      store->ring.set_stream(stream_);
    }
    workspace_.set_stream(stream_);
    staging_.set_stream(stream_);
    error_claim_.set_stream(stream_);
    pool_.set_stream(stream_);
  }

  std::size_t pages_free() const { return pool_.free_pages(); }
  std::size_t staging_now() const { return staging_.bytes(); }
  std::size_t page_bytes() const { return pool_.page_bytes(); }

 private:
  struct Split {
    int splits;
    int units_per_split;
  };

  std::size_t table_bytes(std::size_t capacity) const { return capacity * sizeof(std::uint8_t*); }
  std::size_t page_list_bytes(std::size_t capacity) const {
    return capacity == 0 ? 0 : sizeof(PlacementCursor) + capacity * sizeof(std::uint8_t*);
  }
  std::size_t ring_bytes(int capacity) const { return 2 * static_cast<std::size_t>(capacity) * row_ * sizeof(T); }
  std::int64_t blocks_per_round() const {
    return std::max<std::int64_t>(1, static_cast<std::int64_t>(kMaxStagingBytes / (slot_bytes_ + 4)));
  }

  void forget(CudaLayerStore<T>* store) {
    const std::lock_guard lock(mutex_);
    clear_locked(*store);
    stores_.erase(store);
  }

  void clear_locked(CudaLayerStore<T>& store) {
    for (std::uint8_t* page : store.pages) pool_.give(page);
    store.pages.clear();
    // A kernel still queued may write the word; the next owner ignores launches it did not issue.
    if (store.progress_word != kNoWord) progress_.give(store.progress_word);
    store.progress_word = kNoWord;
    owned_bytes_ -= store.table.bytes() + store.page_list.bytes() + store.ring.bytes();
    store.table = DeviceBuffer();  // freed in stream order, after the kernels that use it
    store.table_capacity = 0;
    store.page_list = DeviceBuffer();
    store.page_list_capacity = 0;
    store.ring = DeviceBuffer();
    store.ring_capacity = 0;
    store.seen_page = store.seen_offset = 0;
    store.unseen.clear();
    store.live_bytes = 0;
    store.live_blocks = 0;
  }

  // The device reports each placement's resulting cursor in a mapped word; placements the host has
  // seen complete no longer count at their worst case. No synchronisation: a stale word only
  // keeps the bound conservative.
  void refresh_placement(CudaLayerStore<T>& store) const {
    if (store.progress_word == kNoWord) return;
    const unsigned long long word = progress_.read(store.progress_word);
    const std::uint32_t launch = progress_launch(word);
    for (std::size_t i = 0; i < store.unseen.size(); ++i) {
      if (store.unseen[i].launch != launch) continue;
      store.unseen.erase(store.unseen.begin(), store.unseen.begin() + static_cast<std::ptrdiff_t>(i) + 1);
      store.seen_page = progress_page(word);
      store.seen_offset = progress_offset(word);
      return;
    }
  }

  // Pages a layer of `blocks` blocks may need: from the last cursor seen, what still fits in its
  // page at worst-case size for the `pending` blocks not yet seen placed, then whole pages.
  std::size_t pages_bound(int blocks, std::uint32_t seen_page, std::uint32_t seen_offset, std::int64_t pending) const {
    if (blocks == 0) return 0;
    const std::int64_t per_page = static_cast<std::int64_t>(blocks_per_page_worst_);
    const std::size_t left = seen_offset < pool_.page_bytes() ? pool_.page_bytes() - seen_offset : 0;
    const std::int64_t rest = std::max<std::int64_t>(0, pending - static_cast<std::int64_t>(left / slot_bytes_));
    return static_cast<std::size_t>(seen_page) + 1 + static_cast<std::size_t>((rest + per_page - 1) / per_page);
  }
  std::size_t pages_bound(const CudaLayerStore<T>& store, std::int64_t new_blocks) const {
    std::int64_t pending = new_blocks;
    for (const UnseenPlacement& u : store.unseen) pending += u.blocks;
    return pages_bound(static_cast<int>(store.live_blocks) + static_cast<int>(new_blocks), store.seen_page,
                       store.seen_offset, pending);
  }

  void give_back_pages(CudaLayerStore<T>& store, std::size_t keep) {
    while (store.pages.size() > keep) {
      pool_.give(store.pages.back());
      store.pages.pop_back();
    }
  }

  // Installs grown tables (old entries copied on the device) and the layer's new pages.
  void install_tables(CudaLayerStore<T>& store, const LayerPlan& plan, DeviceBuffer& table, DeviceBuffer& page_list,
                      int num_blocks) {
    if (table.bytes() != 0) {
      if (num_blocks != 0) {
        check_cuda(cudaMemcpyAsync(table.data(), store.table.data(), table_bytes(static_cast<std::size_t>(num_blocks)),
                                   cudaMemcpyDeviceToDevice, stream_),
                   "block table growth");
      }
      owned_bytes_ += table.bytes() - store.table.bytes();
      store.table = std::move(table);
      store.table_capacity = plan.table_capacity;
    }
    const std::size_t first_new = store.pages.size();
    if (page_list.bytes() != 0) {
      if (store.page_list.bytes() != 0) {
        check_cuda(cudaMemcpyAsync(page_list.data(), store.page_list.data(),
                                   sizeof(PlacementCursor) + first_new * sizeof(std::uint8_t*), cudaMemcpyDeviceToDevice,
                                   stream_),
                   "page list growth");
      } else {
        check_cuda(cudaMemsetAsync(page_list.data(), 0, sizeof(PlacementCursor), stream_), "cursor initialisation");
      }
      owned_bytes_ += page_list.bytes() - store.page_list.bytes();
      store.page_list = std::move(page_list);
      store.page_list_capacity = plan.page_list_capacity;
    }
    while (store.pages.size() < plan.pages_target) store.pages.push_back(pool_.take());
    publish_pointers(store.pages, first_new, store.page_pointers() + first_new);
  }

  // Imported blocks: uploaded with one copy per page (they are back to back in the image and in a
  // page), their table entries written and the device cursor set after them.
  void adopt_blocks(CudaLayerStore<T>& store, const LayerWrite<T>& w, const LayerPlan& plan) {
    std::vector<std::uint8_t*> table;
    for (std::size_t b = 0; b < w.blocks.size();) {
      std::size_t end = b + 1;
      while (end < w.blocks.size() && plan.adopted_page[end] == plan.adopted_page[b]) ++end;
      const std::size_t bytes =
          static_cast<std::size_t>(w.blocks[end - 1].data() + w.blocks[end - 1].size() - w.blocks[b].data());
      check_cuda(cudaMemcpyAsync(store.pages[plan.adopted_page[b]] + plan.adopted_offset[b], w.blocks[b].data(), bytes,
                                 cudaMemcpyHostToDevice, stream_),
                 "import (block upload)");
      b = end;
    }
    for (std::size_t b = 0; b < w.blocks.size(); ++b) {
      table.push_back(store.pages[plan.adopted_page[b]] + plan.adopted_offset[b]);
      store.live_bytes += w.blocks[b].size();
    }
    publish_pointers(table, 0, store.table.template as<std::uint8_t*>());
    check_cuda(cudaMemcpyAsync(store.cursor(), &plan.adopted_cursor, sizeof(PlacementCursor), cudaMemcpyHostToDevice,
                               stream_),
               "import (cursor upload)");
    store.seen_page = plan.adopted_cursor.page;
    store.seen_offset = plan.adopted_cursor.offset;
    store.unseen.clear();
    store.live_blocks += w.blocks.size();
  }

  // Encodes the write's full blocks into staging, then places them tightly in the layer's pages.
  void seal_blocks(CudaLayerStore<T>& store, const LayerWrite<T>& w, const T* k, const T* v) {
    const int block = geometry_.block_tokens;
    const std::int64_t total = w.plan.seal_blocks, per_round = blocks_per_round();
    const ::packkv::detail::TokenRows<T> rows = rows_of(w, k, v);
    int placed = w.num_blocks + static_cast<int>(w.blocks.size());
    for (std::int64_t done = 0; done < total; done += per_round) {
      const int count = static_cast<int>(std::min(per_round, total - done));
      auto* sizes = reinterpret_cast<std::uint32_t*>(staging_.as<std::uint8_t>() +
                                                     static_cast<std::size_t>(std::min(per_round, total)) * slot_bytes_);
      EncodeParams<T> params{};
      params.geometry = geometry_;
      params.k_max_code = codec_.k_max_code;
      params.v_max_code = codec_.v_max_code;
      params.median_repack = median_repack_ ? 1 : 0;
      params.source = rows;
      params.first_position = w.plan.before.begin + done * block;
      params.out_base = staging_.as<std::uint8_t>();
      params.out_stride = slot_bytes_;
      params.block_sizes = sizes;
      params.errors = errors_for(w);
      check_cuda(launch_encode(params, count, stream_), "encode kernel launch");

      PlaceParams place{};
      place.staging = staging_.as<const std::uint8_t>();
      place.staging_stride = slot_bytes_;
      place.sizes = sizes;
      place.num_blocks = count;
      place.pages = store.page_pointers();
      place.page_count = static_cast<std::uint32_t>(store.pages.size());
      place.page_bytes = static_cast<std::uint32_t>(pool_.page_bytes());
      place.cursor = store.cursor();
      place.table = store.table.template as<std::uint8_t*>() + placed;
      place.progress = progress_.device(store.progress_word);
      place.launch = next_launch_++ & 0xFFFFFFu;
      place.errors = errors_for(w);
      check_cuda(launch_place_blocks(place, stream_), "block placement kernel launch");
      store.unseen.push_back(UnseenPlacement{place.launch, count});
      placed += count;
    }
    store.live_blocks += static_cast<std::size_t>(total);
    // Block sizes are the device's: live_bytes is brought up to date by memory_stats (layer_bytes).
  }

  // The tail after the write, in its ring (a new, larger one when it grows: the tokens that stay
  // are copied over with the new ones).
  void write_tail(CudaLayerStore<T>& store, const LayerWrite<T>& w, const T* k, const T* v, DeviceBuffer grown_ring) {
    const AppendPlan& plan = w.plan;
    TailWriteParams<T> tail{};
    tail.source = rows_of(w, k, v);
    const bool grows = grown_ring.bytes() != 0;
    T* ring = grows ? grown_ring.as<T>() : store.ring.template as<T>();
    tail.ring_k = ring;
    tail.ring_v = ring + static_cast<std::size_t>(plan.after.capacity) * row_;
    tail.ring_capacity = plan.after.capacity;
    tail.first = grows ? plan.after.begin : std::max(plan.after.begin, plan.before.end());
    tail.end = plan.after.end();
    tail.head_dim = geometry_.head_dim;
    tail.errors = errors_for(w);
    check_cuda(launch_tail_write(tail, stream_), "tail kernel launch");
    if (grows) {
      owned_bytes_ += grown_ring.bytes() - store.ring.bytes();
      store.ring = std::move(grown_ring);  // the old ring is freed after the kernels that read it
      store.ring_capacity = plan.after.capacity;
    }
  }

  ::packkv::detail::TokenRows<T> rows_of(const LayerWrite<T>& w, const T* k, const T* v) const {
    const auto& store = static_cast<const CudaLayerStore<T>&>(*w.store);
    ::packkv::detail::TokenRows<T> rows;
    rows.ring_k = store.ring.template as<const T>();
    rows.ring_v = rows.ring_k != nullptr ? rows.ring_k + static_cast<std::size_t>(store.ring_capacity) * row_ : nullptr;
    rows.tail = w.plan.before;
    rows.in_k = k;
    rows.in_v = v;
    rows.row_elems = static_cast<int>(row_);
    return rows;
  }

  ErrorContext errors_for(const LayerWrite<T>& w) const {
    return ErrorContext{error_device_, error_claim_.as<int>(), w.id, w.layer};
  }

  void raise_device_error(ErrorOrigin origin = ErrorOrigin::later_call) const {
    volatile DeviceError* record = error_host_;
    if (record->ready == 0) return;
    std::atomic_thread_fence(std::memory_order_acquire);
    DeviceError copy;
    std::memcpy(&copy, const_cast<DeviceError*>(record), sizeof copy);
    record->ready = 0;
    // Re-arms reporting in stream order: kernels queued before this point may not report again.
    check_cuda(cudaMemsetAsync(error_claim_.data(), 0, sizeof(int), stream_), "error claim reset");
    throw_device_error(copy, origin);
  }

  // A few pointers travel as kernel parameters, which keeps a decode step free of host memory;
  // long lists (large prefills, imports) are copied.
  void publish_pointers(const std::vector<std::uint8_t*>& host, std::size_t first, std::uint8_t** device) {
    const std::size_t count = host.size() - first;
    if (count == 0) return;
    if (count <= static_cast<std::size_t>(kInlineTableEntries)) {
      TableEntries entries{};
      entries.count = static_cast<int>(count);
      for (std::size_t i = 0; i < count; ++i) entries.blocks[i] = host[first + i];
      check_cuda(launch_write_table(device, entries, stream_), "pointer table kernel launch");
    } else {
      check_cuda(
          cudaMemcpyAsync(device, host.data() + first, count * sizeof(std::uint8_t*), cudaMemcpyHostToDevice, stream_),
          "pointer table upload");
      check_cuda(cudaStreamSynchronize(stream_), "pointer table upload");  // `host` is the caller's
    }
  }

  SeqView<T> view(const LayerRead& layer) const {
    const CudaLayerStore<T>& store = store_of<T>(layer);
    SeqView<T> v{};
    v.blocks = store.table.template as<const std::uint8_t* const>();
    v.tail_k = store.ring.template as<const T>();
    v.tail_v = v.tail_k != nullptr ? v.tail_k + static_cast<std::size_t>(store.ring_capacity) * row_ : nullptr;
    v.num_blocks = layer.num_blocks;
    v.tail = layer.tail;
    return v;
  }

  ReadShape read_shape() const {
    ReadShape s{};
    s.geometry = geometry_;
    s.num_q_heads = num_q_heads_;
    s.group = group_;
    s.heads_per_cta = heads_per_cta_;
    s.subgroups = subgroups_;
    return s;
  }

  // Flash-decoding split: enough CTAs for about two waves over the SMs, never an empty split
  // range for the longest sequence.
  Split choose_split(int max_units, int ctas_per_split) const {
    max_units = std::max(max_units, 1);
    const int target = 2 * sm_count_;
    int splits = std::clamp((target + ctas_per_split - 1) / ctas_per_split, 1, max_units);
    const int per_split = (max_units + splits - 1) / splits;
    splits = (max_units + per_split - 1) / per_split;
    return Split{splits, per_split};
  }

  float* workspace(std::size_t floats) const {
    if (workspace_.bytes() < floats * sizeof(float)) {
      workspace_ = DeviceBuffer(std::max(floats * sizeof(float), 2 * workspace_.bytes()), stream_);
    }
    return workspace_.as<float>();
  }

  CodecParams codec_;
  format::BlockGeometry geometry_;
  std::size_t row_;
  int num_q_heads_;
  int group_;
  int heads_per_cta_;
  int subgroups_;
  bool median_repack_;
  bool strict_;
  std::size_t slot_bytes_;
  DevicePagePool pool_;
  std::size_t blocks_per_page_worst_;
  int sm_count_ = 1;
  cudaStream_t stream_ = nullptr;
  DeviceError* error_host_ = nullptr;
  DeviceError* error_device_ = nullptr;
  DeviceBuffer error_claim_;  // device memory: the claim word of the error record
  mutable MappedWords progress_;
  std::uint32_t next_launch_ = 1;
  DeviceBuffer staging_;  // worst-case slots of the blocks being encoded, then their sizes
  mutable DeviceBuffer workspace_;
  std::unordered_set<CudaLayerStore<T>*> stores_;
  std::size_t owned_bytes_ = 0;  // tables, page lists and rings of every layer
  // The host core lets calls on different sequences run at once; the device state they share
  // (the pool, staging, workspace, the stream, the error record) is guarded by this.
  mutable std::mutex mutex_;
};

template <class T>
std::size_t CudaPrepared<T>::resident_after() const {
  const std::size_t free_after = backend->pages_free() + pages_returned;
  const std::size_t fresh = pages_wanted > free_after ? pages_wanted - free_after : 0;
  const std::size_t staging_growth =
      staging_bytes > backend->staging_now() ? staging_bytes - backend->staging_now() : 0;
  return backend->resident_bytes() + fresh * backend->page_bytes() + growth_bytes + staging_growth + upload_bytes;
}

}  // namespace

}  // namespace packkv::cuda::detail

namespace packkv::detail {

template <class T>
std::unique_ptr<Backend<T>> make_cuda_backend(const CacheConfig& config, const CodecParams& codec) {
  return std::make_unique<cuda::detail::CudaBackend<T>>(config, codec);
}

template std::unique_ptr<Backend<float>> make_cuda_backend<float>(const CacheConfig&, const CodecParams&);
template std::unique_ptr<Backend<fp16_t>> make_cuda_backend<fp16_t>(const CacheConfig&, const CodecParams&);
template std::unique_ptr<Backend<bf16_t>> make_cuda_backend<bf16_t>(const CacheConfig&, const CodecParams&);

}  // namespace packkv::detail

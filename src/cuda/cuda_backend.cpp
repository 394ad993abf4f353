// The CUDA backend: the Backend interface (core/backend.hpp) over one DeviceContext. Every call
// takes the context's mutex and hands the work to the write path (write_path.cpp) or the read
// path (read_path.cpp); docs/cuda.md explains the design.
#include <cuda_runtime.h>

#include <deque>
#include <memory>


#include "core/backend.hpp"
#include "cuda/device_context.hpp"
#include "cuda/read_path.hpp"
#include "cuda/write_path.hpp"

namespace packkv::detail::cuda {

namespace {

template <class T>
class CudaBackend final : public Backend<T> {
 public:
  CudaBackend(const CacheConfig& config, std::span<const CodecParams> layer_codecs)
      : ctx_(config, layer_codecs, sizeof(T)) {}

  std::unique_ptr<LayerStore> new_layer_store() override {
    auto store = std::make_unique<CudaLayerStore>(ctx_);
    const std::lock_guard lock(ctx_.mutex);
    ctx_.stores.insert(store.get());
    return store;
  }
  std::size_t layer_store_bytes() const override { return sizeof(CudaLayerStore); }

  void clear(LayerStore& store) override {
    const std::lock_guard lock(ctx_.mutex);
    ctx_.clear(static_cast<CudaLayerStore&>(store));
  }

  RotatedInput<T> rotate_input(const T* k, const T* v, std::size_t rows, void* stream) override {
    const std::lock_guard lock(ctx_.mutex);
    CallerStream caller(ctx_, stream);
    RotatedInput<T> in = rotate_write_input<T>(ctx_, k, v, rows);
    caller.finish();
    return in;
  }

  void check_values(std::span<const LayerWrite<T>> writes) override {
    const std::lock_guard lock(ctx_.mutex);
    // Only strict mode queues work here (its validation kernel).
    CallerStream caller(ctx_, ctx_.strict && !writes.empty() ? writes.front().stream : nullptr);
    cuda::check_values<T>(ctx_, writes);
    caller.finish();
  }
  std::unique_ptr<PreparedWrite> prepare(std::span<const LayerWrite<T>> writes) override {
    const std::lock_guard lock(ctx_.mutex);
    return prepare_write<T>(ctx_, writes);
  }
  void commit(PreparedWrite& prepared) override {
    const std::lock_guard lock(ctx_.mutex);
    CallerStream caller(ctx_, caller_stream<T>(prepared));
    commit_write<T>(ctx_, prepared);
    caller.finish();
  }

  std::size_t resident_bytes() const override { return ctx_.resident_bytes(); }

  // Waits for every placement, gives back the pages no placement can reach any more, and returns
  // the pool's free pages to the device.
  void reclaim() override {
    const std::lock_guard lock(ctx_.mutex);
    check_cuda(cudaStreamSynchronize(ctx_.stream), "reclaim");
    for (CudaLayerStore* store : ctx_.stores) {
      ctx_.refresh_placement(*store);
      ctx_.give_back_pages(*store, ctx_.pages_bound(*store, 0));
    }
    ctx_.pool.release_free();
  }

  PoolStats pool_stats() const override {
    const std::lock_guard lock(ctx_.mutex);
    PoolStats s;
    s.page_bytes = ctx_.pool.page_bytes();
    s.pages_reserved = ctx_.pool.pages();
    s.reserved_bytes = ctx_.pool.reserved_bytes();
    s.slot_bytes = ctx_.pool.pages_in_use() * ctx_.pool.page_bytes();  // pages handed to layers
    for (const CudaLayerStore* store : ctx_.stores) {
      s.live_bytes += store->live_bytes;
      s.live_blocks += store->live_blocks - store->repeated_blocks;  // a shared block once
    }
    return s;
  }
  std::size_t scratch_bytes() const override { return ctx_.scratch_bytes(); }
  std::size_t worst_case_growth(std::span<const GrowthQuery> queries) const override {
    std::size_t new_layers = 0;
    for (const GrowthQuery& q : queries) new_layers += q.store == nullptr;
    std::deque<CudaLayerStore> fresh;  // destroyed after the lock is released
    for (std::size_t i = 0; i < new_layers; ++i) fresh.emplace_back(ctx_);
    const std::lock_guard lock(ctx_.mutex);
    return cuda::worst_case_growth<T>(ctx_, queries, fresh);
  }
  // Cached free pages, and pages beyond what a layer's unseen placements could still reach (a
  // lower bound: reclaim() first waits for every placement).
  std::size_t reclaimable_bytes() const override {
    const std::lock_guard lock(ctx_.mutex);
    std::size_t pages = ctx_.pool.free_pages();
    for (const CudaLayerStore* store : ctx_.stores) {
      const std::size_t keep = std::max(ctx_.pages_bound(*store, 0), store->shared_pages);
      if (store->pages.size() > keep) pages += store->pages.size() - keep;
    }
    return pages * ctx_.pool.page_bytes();
  }

  void attention(std::span<const LayerRead> batch, const T* q, T* out, float* lse, float scale,
                 void* stream) const override {
    const std::lock_guard lock(ctx_.mutex);
    CallerStream caller(ctx_, stream);
    cuda::attention<T>(ctx_, batch, q, out, lse, scale);
    caller.finish();
  }
  void scores(std::span<const LayerRead> batch, const T* q, float* out, void* stream) const override {
    const std::lock_guard lock(ctx_.mutex);
    CallerStream caller(ctx_, stream);
    cuda::scores<T>(ctx_, batch, q, out);
    caller.finish();
  }
  void attn_v(std::span<const LayerRead> batch, const float* weights, float* out, void* stream) const override {
    const std::lock_guard lock(ctx_.mutex);
    CallerStream caller(ctx_, stream);
    cuda::attn_v<T>(ctx_, batch, weights, out);
    caller.finish();
  }
  void read_back(const LayerRead& layer, float* k, float* v) const override {
    const std::lock_guard lock(ctx_.mutex);
    cuda::read_back<T>(ctx_, layer, k, v);
  }
  void layer_bytes(std::span<const LayerRead> layers, std::span<LayerBytes> out) const override {
    const std::lock_guard lock(ctx_.mutex);
    cuda::layer_bytes(ctx_, layers, out);
  }
  void download(const LayerRead& layer, std::vector<std::uint32_t>& sizes, std::vector<std::uint8_t>& blocks, T* tail_k,
                T* tail_v, T* sink_k, T* sink_v) const override {
    const std::lock_guard lock(ctx_.mutex);
    cuda::download<T>(ctx_, layer, sizes, blocks, tail_k, tail_v, sink_k, sink_v);
  }
  void download_tail(const LayerRead& layer, T* tail_k, T* tail_v) const override {
    const std::lock_guard lock(ctx_.mutex);
    cuda::download_tail<T>(ctx_, layer, tail_k, tail_v);
  }

  std::optional<std::string> poll_device_error() override {
    const std::lock_guard lock(ctx_.mutex);
    return ctx_.take_device_error();
  }

  void set_stream(void* stream) override {
    const std::lock_guard lock(ctx_.mutex);
    // Stream-ordered frees and page reuse assume one stream: finish the old one's work first.
    check_cuda(cudaStreamSynchronize(ctx_.stream), "set_stream (draining the previous stream)");
    ctx_.stream = static_cast<cudaStream_t>(stream);
    for (CudaLayerStore* store : ctx_.stores) {
      store->table.set_stream(ctx_.stream);
      store->page_list.set_stream(ctx_.stream);
      store->ring.set_stream(ctx_.stream);
    }
    ctx_.workspace.set_stream(ctx_.stream);
    ctx_.rotated_queries.set_stream(ctx_.stream);
    ctx_.staging.set_stream(ctx_.stream);
    ctx_.set_error_stream();
    ctx_.pool.set_stream(ctx_.stream);
  }

 private:
  mutable DeviceContext ctx_;
};

}  // namespace

}  // namespace packkv::detail::cuda

namespace packkv::detail {

template <class T>
std::unique_ptr<Backend<T>> make_cuda_backend(const CacheConfig& config, std::span<const CodecParams> layer_codecs) {
  return std::make_unique<cuda::CudaBackend<T>>(config, layer_codecs);
}

template std::unique_ptr<Backend<float>> make_cuda_backend<float>(const CacheConfig&, std::span<const CodecParams>);
template std::unique_ptr<Backend<fp16_t>> make_cuda_backend<fp16_t>(const CacheConfig&, std::span<const CodecParams>);
template std::unique_ptr<Backend<bf16_t>> make_cuda_backend<bf16_t>(const CacheConfig&, std::span<const CodecParams>);

}  // namespace packkv::detail

// The KvCache that runs attention through packkv's PackedKVCache.
#include <cmath>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>

#include "kv_cache.hpp"

#if defined(PACKKV_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace llama {
namespace {

#if defined(PACKKV_WITH_CUDA)
void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

/// On Device::cuda PackedKVCache takes device pointers: one token's k and v, one query and its
/// output are staged through these buffers on the cache's own stream, so each copy is ordered
/// before the work that reads it and after the work that read the previous contents.
class DeviceStaging {
 public:
  DeviceStaging(std::size_t kv_floats, std::size_t q_floats) {
    check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    for (float** p : {&k_, &v_}) check_cuda(cudaMalloc(reinterpret_cast<void**>(p), kv_floats * sizeof(float)), "cudaMalloc");
    for (float** p : {&q_, &out_}) check_cuda(cudaMalloc(reinterpret_cast<void**>(p), q_floats * sizeof(float)), "cudaMalloc");
  }
  ~DeviceStaging() {
    for (float* p : {k_, v_, q_, out_}) cudaFree(p);
    cudaStreamDestroy(stream_);
  }
  DeviceStaging(const DeviceStaging&) = delete;
  DeviceStaging& operator=(const DeviceStaging&) = delete;

  cudaStream_t stream() const { return stream_; }
  float* put(float* device, const float* host, std::size_t n) {
    check_cuda(cudaMemcpyAsync(device, host, n * sizeof(float), cudaMemcpyHostToDevice, stream_), "copy to device");
    return device;
  }
  void get(float* host, const float* device, std::size_t n) {
    check_cuda(cudaMemcpyAsync(host, device, n * sizeof(float), cudaMemcpyDeviceToHost, stream_), "copy to host");
    check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  }
  float *k_ = nullptr, *v_ = nullptr, *q_ = nullptr, *out_ = nullptr;

 private:
  cudaStream_t stream_ = nullptr;
};
#endif

/// PackedKVCache<float> holding one sequence. It also keeps the appended K/V so that bytes() can
/// split the packed blocks into their K and V sections (memory_stats counts both together): it
/// re-encodes each compressed block with the same codec, which is deterministic, reads the block's
/// head directory, and checks that the block sizes add up to what memory_stats reports.
class PackkvCache final : public KvCache {
 public:
  PackkvCache(const KvShape& shape, const packkv::CacheConfig& config)
      : shape_(shape),
        cache_(config),
        codec_(packkv::make_codec_params(config)),
        k_history_(static_cast<std::size_t>(shape.num_layers)),
        v_history_(k_history_.size()) {
    if (config.device == packkv::Device::cuda) {
#if defined(PACKKV_WITH_CUDA)
      staging_ = std::make_unique<DeviceStaging>(static_cast<std::size_t>(shape.kv_dim()), q_floats());
      cache_.set_stream(staging_->stream());
#else
      throw std::invalid_argument("Device::cuda: this packkv was built without the CUDA backend");
#endif
    }
    cache_.add_sequence(kSeq);
  }

  void append(int layer, const float* k, const float* v) override {
    const auto kv_dim = static_cast<std::size_t>(shape_.kv_dim());
#if defined(PACKKV_WITH_CUDA)
    if (staging_) {
      cache_.append(kSeq, layer, staging_->put(staging_->k_, k, kv_dim), staging_->put(staging_->v_, v, kv_dim), 1);
    } else {
      cache_.append(kSeq, layer, k, v, 1);
    }
#else
    cache_.append(kSeq, layer, k, v, 1);
#endif
    k_history_[layer].insert(k_history_[layer].end(), k, k + kv_dim);
    v_history_[layer].insert(v_history_[layer].end(), v, v + kv_dim);
  }
  void attend(int layer, const float* q, float* out, float scale) override {
    const packkv::SeqId ids[1] = {kSeq};
#if defined(PACKKV_WITH_CUDA)
    if (staging_) {
      cache_.attention(ids, layer, staging_->put(staging_->q_, q, q_floats()), staging_->out_, scale);
      staging_->get(out, staging_->out_, q_floats());
      return;
    }
#endif
    cache_.attention(ids, layer, q, out, scale);
  }
  KvBytes bytes() const override;
  std::string describe() const override { return packkv::describe(cache_.config()); }
  const packkv::PackedKVCache<float>& cache() const { return cache_; }

 private:
  static constexpr packkv::SeqId kSeq = 0;
  KvShape shape_;
#if defined(PACKKV_WITH_CUDA)
  std::unique_ptr<DeviceStaging> staging_;  // before cache_: outlives it, as the cache works on its stream
#endif
  packkv::PackedKVCache<float> cache_;
  packkv::CodecParams codec_;
  std::vector<std::vector<float>> k_history_, v_history_;
  std::size_t q_floats() const { return static_cast<std::size_t>(shape_.num_q_heads) * shape_.head_dim; }
};

KvBytes PackkvCache::bytes() const {
  const packkv::MemoryStats stats = cache_.memory_stats();
  const auto kv_dim = static_cast<std::size_t>(shape_.kv_dim());
  const int block_tokens = codec_.geometry.block_tokens;
  std::vector<std::uint8_t> block(codec_.geometry.max_block_bytes());
  packkv::EncodeScratch scratch;
  double k_sections = 0, v_sections = 0, shared = 0, blocks_total = 0;
  for (int l = 0; l < shape_.num_layers; ++l) {
    const auto blocks = static_cast<int>(stats.layers[l].compressed_tokens / block_tokens);
    for (int b = 0; b < blocks; ++b) {
      const std::size_t offset = static_cast<std::size_t>(b) * block_tokens * kv_dim;
      const std::uint32_t size = packkv::encode_block<float>(codec_, k_history_[l].data() + offset,
                                                             v_history_[l].data() + offset, kv_dim, block.data(), scratch);
      packkv::format::BlockHeader header;
      std::memcpy(&header, block.data(), sizeof header);
      double sections = 0;
      for (int h = 0; h < shape_.num_kv_heads; ++h) {
        packkv::format::HeadEntry entry, next{};
        std::memcpy(&entry, block.data() + codec_.geometry.directory_offset() + h * sizeof entry, sizeof entry);
        const bool last = h + 1 == shape_.num_kv_heads;
        if (!last) std::memcpy(&next, block.data() + codec_.geometry.directory_offset() + (h + 1) * sizeof next, sizeof next);
        const std::uint32_t v_end = last ? size - packkv::format::kTrailingSlack : next.k_offset;
        k_sections += entry.v_offset - entry.k_offset;
        v_sections += v_end - entry.v_offset;
        sections += v_end - entry.k_offset;
      }
      shared += size - sections;  // header, directory, permutation, trailing slack
      blocks_total += size;
    }
  }
  const packkv::MemoryBreakdown& t = stats.total;
  const double reported_blocks = static_cast<double>(t.payload + t.params + t.descriptors + t.permutations + t.headers);
  if (std::fabs(reported_blocks - blocks_total) > 0.5) {
    // The split is only trustworthy if it accounts for exactly the bytes the cache holds.
    throw std::runtime_error("K/V byte split: re-encoded blocks hold " + std::to_string(blocks_total) +
                             " bytes but memory_stats reports " + std::to_string(reported_blocks));
  }
  KvBytes bytes;
  bytes.fp16_bytes_per_side = static_cast<double>(t.original_fp16_bytes) / 2.0;
  // What belongs to both (block headers, permutations, block tables, the uncompressed tail, which
  // holds K and V alike) is split evenly.
  const double common = shared + static_cast<double>(t.block_tables) + static_cast<double>(t.tail);
  bytes.k_bytes = k_sections + common / 2.0;
  bytes.v_bytes = v_sections + common / 2.0;
  return bytes;
}

}  // namespace

std::unique_ptr<KvCache> make_packkv_cache(const KvShape& shape, packkv::CacheConfig config) {
  config.num_layers = shape.num_layers;
  config.num_kv_heads = shape.num_kv_heads;
  config.num_q_heads = shape.num_q_heads;
  config.head_dim = shape.head_dim;
  return std::make_unique<PackkvCache>(shape, config);
}

}  // namespace llama

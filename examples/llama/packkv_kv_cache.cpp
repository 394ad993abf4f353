// The KvCache that runs attention through packkv's PackedKVCache.
#include <cmath>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "kv_cache.hpp"
#include "tensor_ops.hpp"

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

/// PackedKVCache<float> holding one sequence; bytes() is its memory_stats(), split into K and V.
class PackkvCache final : public KvCache {
 public:
  PackkvCache(const KvShape& shape, const packkv::CacheConfig& config)
      : shape_(shape),
        cache_(config) {
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
#if defined(PACKKV_WITH_CUDA)
    if (staging_) {
      const auto kv_dim = static_cast<std::size_t>(shape_.kv_dim());
      cache_.append(kSeq, layer, staging_->put(staging_->k_, k, kv_dim), staging_->put(staging_->v_, v, kv_dim), 1);
      return;
    }
#endif
    cache_.append(kSeq, layer, k, v, 1);
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
  std::vector<KvBytes> layer_bytes() const override;
  std::string describe() const override { return packkv::describe(cache_.config()); }
  const packkv::PackedKVCache<float>& cache() const { return cache_; }
  static constexpr packkv::SeqId kSeq = 0;  ///< the one sequence

 private:
  KvShape shape_;
#if defined(PACKKV_WITH_CUDA)
  std::unique_ptr<DeviceStaging> staging_;  // before cache_: outlives it, as the cache works on its stream
#endif
  packkv::PackedKVCache<float> cache_;
  std::size_t q_floats() const { return static_cast<std::size_t>(shape_.num_q_heads) * shape_.head_dim; }
  /// K and V bytes of all layers (memory_stats().total) or of one.
  KvBytes kv_bytes(const packkv::MemoryBreakdown& t) const;
};

KvBytes PackkvCache::bytes() const { return kv_bytes(cache_.memory_stats().total); }

std::vector<KvBytes> PackkvCache::layer_bytes() const {
  std::vector<KvBytes> out;
  for (const packkv::MemoryBreakdown& layer : cache_.memory_stats().layers) out.push_back(kv_bytes(layer));
  return out;
}

KvBytes PackkvCache::kv_bytes(const packkv::MemoryBreakdown& t) const {
  KvBytes bytes;
  bytes.fp16_bytes_per_side = static_cast<double>(t.original_fp16_bytes) / 2.0;
  // Each side's sections, plus half of what serves both (block headers, directories,
  // permutations, block tables, and the uncompressed tail, which holds K and V alike).
  bytes.k_bytes = t.k_bytes();
  bytes.v_bytes = t.v_bytes();
  // The compressed part: everything but the uncompressed tail and the exact sink rows, whose
  // share of the shared bytes is themselves (the eval counts them beside the window).
  const double exact = static_cast<double>(t.tail + t.sinks);
  bytes.k_compressed_bytes = bytes.k_bytes - exact / 2.0;
  bytes.v_compressed_bytes = bytes.v_bytes - exact / 2.0;
  bytes.compressed_elements_per_side = static_cast<double>(t.compressed_tokens) * shape_.kv_dim();
  return bytes;
}

/// packkv with levers the library does not have yet, measured with the library as it is
/// (make_packkv_cache_with_levers): K stored before RoPE, as KVQuant does (the cache quantizes each
/// key unrotated and attention rotates the decoded keys), K's channels scaled by powers of two
/// (divided on the way in, multiplied back on decoding), and exact sink tokens. Attention runs
/// densely over what a kernel would compute on the fly: each compressed token's decoded K (rotated
/// to its position) and V, the sinks' and the exact window's values as appended. Tokens leave the
/// window a block at a time (packkv's tail rule), so the decoded copy is refreshed once per block.
class DecodedCopyCache final : public KvCache {
 public:
  DecodedCopyCache(const KvShape& shape, const packkv::CacheConfig& config, PackkvLevers levers)
      : shape_(shape),
        inner_(shape, config),
        levers_(levers),
        residual_(config.residual_tokens),
        block_(config.block_tokens),
        k_(static_cast<std::size_t>(shape.num_layers)),
        v_(static_cast<std::size_t>(shape.num_layers)),
        compressed_(static_cast<std::size_t>(shape.num_layers), 0) {}

  void append(int layer, const float* k, const float* v) override {
    const auto l = static_cast<std::size_t>(layer);
    const std::size_t kvd = static_cast<std::size_t>(shape_.kv_dim());
    const auto pos = static_cast<std::int64_t>(k_[l].size() / kvd);
    k_[l].insert(k_[l].end(), k, k + kvd);
    v_[l].insert(v_[l].end(), v, v + kvd);
    std::vector<float> stored(k, k + kvd);
    if (levers_.keys_before_rope) {
      rope_adjacent_pairs(stored.data(), shape_.num_kv_heads, shape_.head_dim, static_cast<int>(-pos), levers_.rope_theta);
    }
    if (!levers_.k_channel_scale.empty()) {
      const std::vector<float>& s = levers_.k_channel_scale[l];
      for (std::size_t i = 0; i < kvd; ++i) stored[i] /= s[i];
    }
    inner_.append(layer, stored.data(), v);
    const std::int64_t n = pos + 1;
    const std::int64_t compressed = n > residual_ ? (n - residual_) / block_ * block_ : 0;
    if (compressed == compressed_[l]) return;
    if (static_cast<std::int64_t>(inner_.cache().memory_stats().layers[l].compressed_tokens) != compressed) {
      throw std::logic_error("packkv levers: the cache compressed a different number of tokens than the tail rule says");
    }
    std::vector<float> k_back(static_cast<std::size_t>(n) * kvd), v_back(k_back.size());
    inner_.cache().read_back(PackkvCache::kSeq, layer, k_back.data(), v_back.data());
    for (std::int64_t t = std::max<std::int64_t>(compressed_[l], levers_.sinks); t < compressed; ++t) {
      float* key = k_back.data() + static_cast<std::size_t>(t) * kvd;
      if (!levers_.k_channel_scale.empty()) {
        const std::vector<float>& s = levers_.k_channel_scale[l];
        for (std::size_t i = 0; i < kvd; ++i) key[i] *= s[i];
      }
      if (levers_.keys_before_rope) {
        rope_adjacent_pairs(key, shape_.num_kv_heads, shape_.head_dim, static_cast<int>(t), levers_.rope_theta);
      }
      std::memcpy(k_[l].data() + static_cast<std::size_t>(t) * kvd, key, kvd * sizeof(float));
      std::memcpy(v_[l].data() + static_cast<std::size_t>(t) * kvd, v_back.data() + static_cast<std::size_t>(t) * kvd,
                  kvd * sizeof(float));
    }
    compressed_[l] = compressed;
  }
  void attend(int layer, const float* q, float* out, float scale) override {
    const auto l = static_cast<std::size_t>(layer);
    const int n = static_cast<int>(k_[l].size() / static_cast<std::size_t>(shape_.kv_dim()));
    dense_attention(shape_, k_[l].data(), v_[l].data(), n, q, out, scale, scratch_);
  }
  KvBytes bytes() const override { return with_sinks(inner_.bytes(), shape_.num_layers); }
  std::vector<KvBytes> layer_bytes() const override {
    std::vector<KvBytes> out = inner_.layer_bytes();
    for (KvBytes& b : out) b = with_sinks(b, 1);
    return out;
  }
  std::string describe() const override {
    std::string levers = levers_.keys_before_rope ? "K before RoPE; " : "";
    if (levers_.sinks > 0) levers += std::to_string(levers_.sinks) + " exact sinks; ";
    if (!levers_.k_channel_scale.empty()) levers += "K channels scaled; ";
    return levers + inner_.describe();
  }

 private:
  /// The sinks' exact copies (fp16, K and V) on top of what the cache holds, per layer counted.
  KvBytes with_sinks(KvBytes b, int layers) const {
    const double sink_bytes = static_cast<double>(layers) * std::min<std::int64_t>(levers_.sinks, length()) *
                              shape_.kv_dim() * 2.0;
    b.k_bytes += sink_bytes;
    b.v_bytes += sink_bytes;
    return b;
  }
  std::int64_t length() const {
    return k_.empty() ? 0 : static_cast<std::int64_t>(k_.front().size() / static_cast<std::size_t>(shape_.kv_dim()));
  }

  KvShape shape_;
  PackkvCache inner_;
  PackkvLevers levers_;
  std::int64_t residual_, block_;
  std::vector<std::vector<float>> k_, v_;  ///< per layer: what attention sees
  std::vector<std::int64_t> compressed_;   ///< per layer: tokens whose decoded values are in k_, v_
  std::vector<float> scratch_;
};

}  // namespace

std::unique_ptr<KvCache> make_packkv_cache_with_levers(const KvShape& shape, packkv::CacheConfig config,
                                                       PackkvLevers levers) {
  if (config.device != packkv::Device::cpu) throw std::invalid_argument("packkv levers are measured on the CPU backend");
  if (levers.sinks < 0) throw std::invalid_argument("packkv levers: sinks must be >= 0");
  if (!levers.k_channel_scale.empty()) {
    if (levers.k_channel_scale.size() != static_cast<std::size_t>(shape.num_layers)) {
      throw std::invalid_argument("packkv levers: k_channel_scale needs one row per layer");
    }
    for (const std::vector<float>& row : levers.k_channel_scale) {
      if (row.size() != static_cast<std::size_t>(shape.kv_dim())) {
        throw std::invalid_argument("packkv levers: k_channel_scale rows hold num_kv_heads * head_dim scales");
      }
      for (float x : row) {
        int e = 0;
        if (!(x > 0.0f) || std::frexp(x, &e) != 0.5f) {
          throw std::invalid_argument("packkv levers: k_channel_scale entries must be powers of two, not " + std::to_string(x));
        }
      }
    }
  }
  config.num_layers = shape.num_layers;
  config.num_kv_heads = shape.num_kv_heads;
  config.num_q_heads = shape.num_q_heads;
  config.head_dim = shape.head_dim;
  return std::make_unique<DecodedCopyCache>(shape, config, levers);
}

std::unique_ptr<KvCache> make_packkv_cache(const KvShape& shape, packkv::CacheConfig config) {
  config.num_layers = shape.num_layers;
  config.num_kv_heads = shape.num_kv_heads;
  config.num_q_heads = shape.num_q_heads;
  config.head_dim = shape.head_dim;
  return std::make_unique<PackkvCache>(shape, config);
}

std::unique_ptr<KvCache> make_packkv_cache(const KvShape& shape, packkv::CacheConfig config, std::vector<float> k_rel,
                                           std::vector<float> v_rel) {
  config.layer_k_rel = std::move(k_rel);
  config.layer_v_rel = std::move(v_rel);
  return make_packkv_cache(shape, std::move(config));
}

}  // namespace llama

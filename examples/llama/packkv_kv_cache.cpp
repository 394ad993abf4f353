// The KvCache that runs attention through packkv's PackedKVCache.
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "kv_cache.hpp"

namespace llama {
namespace {

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
    if (config.device != packkv::Device::cpu) {
      // Hook for Device::cuda: PackedKVCache then takes device pointers, so append() and attend()
      // would stage k, v, q and out through device buffers (cudaMemcpyAsync on cache_'s stream).
      // The example builds without the CUDA toolkit, so it leaves that to an engine.
      throw std::invalid_argument("the Llama example drives PackedKVCache on the CPU backend only");
    }
    cache_.add_sequence(kSeq);
  }

  void append(int layer, const float* k, const float* v) override {
    cache_.append(kSeq, layer, k, v, 1);
    const auto kv_dim = static_cast<std::size_t>(shape_.kv_dim());
    k_history_[layer].insert(k_history_[layer].end(), k, k + kv_dim);
    v_history_[layer].insert(v_history_[layer].end(), v, v + kv_dim);
  }
  void attend(int layer, const float* q, float* out, float scale) override {
    const packkv::SeqId ids[1] = {kSeq};
    cache_.attention(ids, layer, q, out, scale);
  }
  KvBytes bytes() const override;
  std::string describe() const override { return packkv::describe(cache_.config()); }
  const packkv::PackedKVCache<float>& cache() const { return cache_; }

 private:
  static constexpr packkv::SeqId kSeq = 0;
  KvShape shape_;
  packkv::PackedKVCache<float> cache_;
  packkv::CodecParams codec_;
  std::vector<std::vector<float>> k_history_, v_history_;
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

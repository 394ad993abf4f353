// What the Llama example's attention talks to: one sequence's K/V for every layer.
//
// The model appends one token at a time and attends right after, exactly as in decoding, whatever
// implementation sits behind this interface: an exact fp32 cache, packkv's PackedKVCache, or one of
// the quantization baselines the accuracy harness compares against.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <packkv/packkv.hpp>
#include <packkv/codec.hpp>
#include <packkv/synthetic.hpp>

namespace llama {

struct KvShape {
  int num_layers = 0;
  int num_kv_heads = 0;
  int num_q_heads = 0;
  int head_dim = 0;
  int kv_dim() const { return num_kv_heads * head_dim; }
};

/// Bytes a cache holds for K and for V, every byte counted (codes, scales, zero points, descriptors,
/// permutations, headers, block tables, uncompressed recent tokens).
struct KvBytes {
  double k_bytes = 0.0;
  double v_bytes = 0.0;
  double fp16_bytes_per_side = 0.0;  ///< K (or V) of every held token-layer at 2 bytes per element
  /// The compressed part alone (the recent tokens still held exact left out), so that its bits per
  /// element can be told apart from the window's cost, which depends on the context length.
  double k_compressed_bytes = 0.0;
  double v_compressed_bytes = 0.0;
  double compressed_elements_per_side = 0.0;  ///< K (or V) elements held compressed
  double k_ratio() const { return k_bytes > 0 ? fp16_bytes_per_side / k_bytes : 0.0; }
  double v_ratio() const { return v_bytes > 0 ? fp16_bytes_per_side / v_bytes : 0.0; }
  double kv_ratio() const { return k_bytes + v_bytes > 0 ? 2.0 * fp16_bytes_per_side / (k_bytes + v_bytes) : 0.0; }
  double k_compressed_bits() const { return per_element_bits(k_compressed_bytes); }
  double v_compressed_bits() const { return per_element_bits(v_compressed_bytes); }
  double per_element_bits(double bytes) const {
    return compressed_elements_per_side > 0 ? 8.0 * bytes / compressed_elements_per_side : 0.0;
  }
};

class KvCache {
 public:
  virtual ~KvCache() = default;
  /// Appends one token of `layer`: k and v are [num_kv_heads][head_dim], K after RoPE.
  virtual void append(int layer, const float* k, const float* v) = 0;
  /// out[num_q_heads][head_dim] = softmax(scale * K q) V over every token appended to `layer`.
  virtual void attend(int layer, const float* q, float* out, float softmax_scale) = 0;
  virtual KvBytes bytes() const = 0;
  virtual std::string describe() const = 0;
  /// What each layer holds, for caches that can tell (empty otherwise).
  virtual std::vector<KvBytes> layer_bytes() const { return {}; }
};

/// Attention over dense fp32 K and V ([n][kv_heads][head_dim]): the reference every cache matches.
void dense_attention(const KvShape& shape, const float* k, const float* v, int n, const float* q, float* out,
                     float softmax_scale, std::vector<float>& scratch);

/// The exact cache: fp32, nothing lost. Its bytes are reported as stored (4 bytes per element).
std::unique_ptr<KvCache> make_exact_cache(const KvShape& shape);

/// packkv's PackedKVCache<float> on `config.device`. The model's shape overrides the config's.
std::unique_ptr<KvCache> make_packkv_cache(const KvShape& shape, packkv::CacheConfig config);
/// What packkv's attention would see with the library extended: K stored before RoPE (KVQuant's
/// pre-RoPE keys; RoPE on adjacent pairs with `rope_theta` applied to the decoded keys), K's
/// channels scaled by powers of two, and/or the first `sinks` tokens kept exact (attention sinks). Attention runs densely over decoded copies
/// (CPU only); the cache still holds the sink tokens compressed, so its compressed bytes include
/// them (a conservative count: sinks / compressed tokens more, 0.2% at 4 of 2048).
struct PackkvLevers {
  bool keys_before_rope = false;
  float rope_theta = 10000.0f;
  int sinks = 0;
  /// Per layer, [num_kv_heads][head_dim] powers of two: K is stored divided by them channel by
  /// channel (and decoded keys multiplied back), which attention would do by scaling q instead.
  std::vector<std::vector<float>> k_channel_scale;
};
std::unique_ptr<KvCache> make_packkv_cache_with_levers(const KvShape& shape, packkv::CacheConfig config,
                                                       PackkvLevers levers);
/// The same with a relative error bound of its own per layer and side (k_rel[l], v_rel[l]:
/// CacheConfig::layer_k_rel / layer_v_rel); layer_bytes() tells the layers apart.
std::unique_ptr<KvCache> make_packkv_cache(const KvShape& shape, packkv::CacheConfig config, std::vector<float> k_rel,
                                           std::vector<float> v_rel);

/// Quantize-dequantize baselines: attention sees exactly the values their stored codes decode to,
/// and bytes() counts the codes plus their fp16 scales and zero points (and fp16 recent tokens).
/// The llama.cpp types are its KV cache types as ggml defines them: blocks of 32 values along
/// head_dim, each with an fp16 scale (and an fp16 min for the _1 types).
enum class Baseline {
  int8_per_token,
  int4_per_token,
  fp8_e4m3_per_token,
  kivi2,
  kivi4,
  q8_0,
  q5_1,
  q5_0,
  q4_1,
  q4_0,
  iq4_nl,
};
/// When tokens leave the exact window, the same rule as packkv's tail: once `residual + block`
/// tokens are unquantized, the oldest `block` are quantized. With packkv's block and residual,
/// every cache quantizes the same tokens at the same step, so a comparison differs only in how.
struct BaselineOptions {
  int group = 32;     ///< KIVI: tokens per K group (per channel), channels per V group (per token)
  int residual = 0;   ///< recent tokens kept exact (counted at fp16)
  int block = 64;     ///< tokens quantized at a time: a multiple of group
  int sinks = 0;      ///< the first tokens of the sequence, kept exact (counted at fp16)
};
std::unique_ptr<KvCache> make_baseline_cache(const KvShape& shape, Baseline kind, BaselineOptions options = {});
/// Replaces one (token, head) vector of a per-token kind (int8, int4, fp8, the llama.cpp types) by
/// what its stored codes decode to, as the caches do; for tests.
void quantize_head_vector(Baseline kind, float* x, int head_dim);
/// Stored bits per element of a baseline's compressed part at `head_dim` (codes and their scales).
double baseline_bits_per_element(Baseline kind, int head_dim, bool k_side, int kivi_group = 32);
const char* to_string(Baseline kind);

}  // namespace llama

// Configuration of a PackedKVCache: model shape, block geometry, accuracy knobs, memory, device.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace packkv {

/// Where the cache's blocks live and where attention runs.
enum class Device : std::uint8_t { cpu, cuda };

/// How K is quantized. V is always quantized per token.
enum class QuantMode : std::uint8_t {
  per_token,    ///< PackKV: one (step, min) per (token, KV head).
  per_channel,  ///< KIVI-style: one (step, min) per (channel, KV head) over a block.
};

/// Token reordering inside a block before bit-packing (same permutation for K and V).
enum class RepackMethod : std::uint8_t {
  none,    ///< keep arrival order; no permutation is stored
  median,  ///< stable sort by the median V code of each token
  greedy,  ///< grow each 16-token pack by the token that adds the fewest bits
};

const char* to_string(Device d);
const char* to_string(QuantMode m);
const char* to_string(RepackMethod m);

/// Smallest and largest accepted relative error bound: codes of 8 bits down to 1 bit.
inline constexpr float kMinRel = 1.0f / 255.0f;
inline constexpr float kMaxRel = 1.0f;

struct CacheConfig {
  int num_layers = 1;         ///< in [1, 65535] (sequence images count layers in 16 bits)
  int num_kv_heads = 1;
  int num_q_heads = 1;        ///< a multiple of num_kv_heads (grouped-query attention)
  int head_dim = 128;         ///< a multiple of 8 in [8, 256]
  int block_tokens = 64;      ///< tokens per compressed block: a multiple of 16 in [16, 256]
  int residual_tokens = 0;    ///< most recent tokens always kept uncompressed (>= 0)
  /// The first sink_tokens tokens of every sequence, in [0, block_tokens], are also kept exact:
  /// most heads give them a large share of attention (attention sinks), so their quantization
  /// error reaches nearly every output. Once the first block is sealed, every read uses the exact
  /// rows for them (the block still holds them, masked out); 4 sinks cut V's KL by about 3x at
  /// the same bits (docs/results/levers.md). They cost sink_tokens rows of K and V per layer.
  int sink_tokens = 0;
  float k_rel = 0.1f;         ///< relative error bound for K, in [1/255, 1]
  float v_rel = 0.2f;         ///< relative error bound for V, in [1/255, 1]
  /// Per-layer bounds, replacing k_rel (v_rel) layer by layer: empty, or num_layers values in
  /// [1/255, 1]. Layers differ in sensitivity by more than an order of magnitude, so bounds
  /// calibrated per layer store fewer bits at the same accuracy (docs/results/levers.md). Each
  /// layer's blocks are ordinary blocks of that layer's code width; images record every layer's.
  std::vector<float> layer_k_rel;
  std::vector<float> layer_v_rel;
  QuantMode k_mode = QuantMode::per_token;
  RepackMethod repack = RepackMethod::median;
  /// Store K (rotate_k) or V (rotate_v) head vectors rotated by a fixed orthogonal matrix, a
  /// Walsh-Hadamard transform with pseudo-random signs (src/core/rotation.hpp). Outlier channels
  /// are spread over the vector, so a token's range, and with it the quantization error under the
  /// same rel, shrinks. Queries are rotated once per call (rounded to T) and V outputs rotated back
  /// once; read_back returns unrotated values. Changes no block format; images record it.
  bool rotate_k = false;
  bool rotate_v = false;
  /// Store each group's (step, min) in 2 bytes instead of two fp16 values (block format version 3,
  /// docs/format.md): a step on a grid of 5 significant bits relative to one exponent per section,
  /// and a min aligned to half steps. Saves 16 bits per token, head and side (0.25 bit per element
  /// at head_dim 64) for a step up to 1/16 coarser; on SmolLM2 0.11-0.16 fewer bits at the same
  /// KL (docs/results/levers.md). Values must then be within +-16384. On CUDA the first read path
  /// serves these blocks (the fast kernels read fp16 pairs).
  bool compact_params = false;
  std::size_t memory_budget_bytes = 0;  ///< cap on all memory the cache holds; 0 means none
  Device device = Device::cpu;
  int num_threads = 0;        ///< CPU worker threads for attention and encoding; 0: all cores
  /// CUDA: check every append's values on the device before anything changes (one host
  /// synchronisation per append), so that bad values are refused by the append itself. Off: the
  /// kernels check them and a later call reports (docs/cuda.md, "Errors").
  bool cuda_strict = false;
  /// CUDA: a value error the kernels find after a call returned is reported only by
  /// PackedKVCache::poll_device_error(), never thrown by a later, unrelated call.
  bool cuda_poll_errors = false;
};

/// The bound layer `layer` stores K (V) under: layer_k_rel[layer] when given, else k_rel.
float k_rel_of(const CacheConfig& config, int layer);
float v_rel_of(const CacheConfig& config, int layer);

/// Throws packkv::error naming the first invalid field.
void validate(const CacheConfig& config);

/// One-line description, for logs and error messages.
std::string describe(const CacheConfig& config);

/// Largest code a relative error bound produces: ceil(1/rel), in [1, 255].
int max_code_for_rel(float rel);

/// Bits needed to store codes in [0, max_code].
constexpr int bits_for_max_code(int max_code) {
  int bits = 0;
  while ((1 << bits) <= max_code) ++bits;
  return bits;
}

}  // namespace packkv

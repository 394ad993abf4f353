// A small Llama-architecture model on the CPU: RMSNorm, RoPE on adjacent pairs, grouped-query
// attention through a KvCache, SwiGLU feed-forward, fp32 throughout.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "kv_cache.hpp"

namespace llama {

struct LlamaConfig {
  int dim = 0;
  int hidden_dim = 0;
  int num_layers = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int vocab_size = 0;
  int max_seq_len = 0;
  int head_dim = 0;
  float rope_theta = 10000.0f;
  float norm_eps = 1e-5f;
  KvShape kv_shape() const { return {num_layers, num_kv_heads, num_heads, head_dim}; }
  int q_dim() const { return num_heads * head_dim; }
};

/// Pointers into fp32 buffers. The token embedding and the norms point into the checkpoint's
/// storage; the matrices into `packed`, in the panel layout of tensor_ops.hpp (see pack_weights),
/// so layer l's matrix starts packed_size(in, out) * l floats in, not in * out * l.
struct LlamaWeights {
  std::vector<float> storage;
  std::vector<float> packed;
  const float* token_embedding = nullptr;  // [vocab][dim]
  const float* rms_att = nullptr;          // [layers][dim]
  const float* wq = nullptr;               // [layers][q_dim][dim]
  const float* wk = nullptr;               // [layers][kv_dim][dim]
  const float* wv = nullptr;               // [layers][kv_dim][dim]
  const float* wo = nullptr;               // [layers][dim][q_dim]
  const float* rms_ffn = nullptr;          // [layers][dim]
  const float* w1 = nullptr;               // [layers][hidden][dim]  gate
  const float* w2 = nullptr;               // [layers][dim][hidden]  down
  const float* w3 = nullptr;               // [layers][hidden][dim]  up
  const float* rms_final = nullptr;        // [dim]
  const float* classifier = nullptr;       // [vocab][dim], often a copy of the embedding
};

/// Activations of one forward pass, [n][...]; one per thread when several passes share a model.
struct ForwardBuffers {
  std::vector<float> x, xb, q, k, v, att, hb, hb2;
};

class LlamaModel {
 public:
  /// A llama2.c legacy checkpoint (7-int32 header, fp32 weights; stories260K and friends).
  static LlamaModel load_llama2c(const std::string& path);
  /// The PKVLLAMA file written by scripts/convert_gguf.py (layout in docs/examples.md).
  static LlamaModel load_pkvllama(const std::string& path);
  /// Either of the above, chosen by the file's first bytes.
  static LlamaModel load(const std::string& path);

  const LlamaConfig& config() const { return config_; }

  /// Runs tokens[0..n) at positions start_pos.. through the model, appending each token's K/V to
  /// `cache` and attending right after it, token by token, as decoding does. Layers are processed
  /// one after the other for all n tokens: a token's K/V at a layer depend only on earlier layers
  /// of tokens up to it, so the result equals n single-token steps while the weight matrices are
  /// read once per layer instead of once per token. Returns the final normalised hidden states,
  /// [n][dim]; logits() turns rows of them into vocabulary scores.
  /// `on_layer` (optional) is called after each layer, for progress displays.
  const std::vector<float>& forward(const int* tokens, int n, int start_pos, KvCache& cache, ForwardBuffers& buffers,
                                    const std::function<void(int layer)>& on_layer = {}) const;
  /// The same with the model's own buffers (one caller at a time).
  const std::vector<float>& forward(const int* tokens, int n, int start_pos, KvCache& cache) {
    return forward(tokens, n, start_pos, cache, buffers_);
  }

  /// logits[r][vocab] for `rows` rows of hidden states.
  void logits(const float* hidden, int rows, float* out) const;

 private:
  void assign_pointers(std::size_t offset, bool shared_classifier);
  /// Packs the matrices for matmul and frees the row-major copies that are no longer needed.
  void pack_matrices(const float* classifier_rows);

  LlamaConfig config_;
  LlamaWeights w_;
  ForwardBuffers buffers_;
};

/// Index of the largest value (the first one on ties).
int argmax(const float* x, int n);

}  // namespace llama

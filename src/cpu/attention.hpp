// The CPU backend's readers: decode and causal multi-query attention over packed blocks and the tail (split across
// threads flash-decoding style), the scores and attn_v primitives, and read_back.
#pragma once

#include <span>
#include <vector>

#include "core/backend.hpp"
#include "packkv/codec.hpp"

namespace packkv::detail::cpu {

struct ReadContext {
  std::vector<CodecParams> codecs;  ///< per layer (LayerRead::layer)
  const CodecParams& codec(int layer) const { return codecs[static_cast<std::size_t>(layer)]; }
  int num_q_heads;
  int threads;
  bool rotate_k = false;  ///< CacheConfig::rotate_k: queries are rotated (rounded to T)
  bool rotate_v = false;  ///< CacheConfig::rotate_v: V outputs are rotated back
};

/// `vectors` head vectors of T into (forward) or out of the rotated space (core/rotation.hpp),
/// rounded to T; `out` may be `in`.
template <class T>
void rotate_rows(const T* in, T* out, std::size_t vectors, int head_dim, bool forward, int threads);
/// The same for float vectors (read_back, attn_v outputs), in place.
void rotate_rows_back(float* x, std::size_t vectors, int head_dim, int threads);

/// Attention of each sequence's LayerRead::queries queries (causal among themselves; one in
/// decode), split across threads flash-decoding style; lse may be null.
template <class T>
void causal_attention(const ReadContext& ctx, std::span<const LayerRead> batch, const T* q, T* out, float* lse,
                      float scale);
template <class T>
void scores(const ReadContext& ctx, const LayerRead& layer, const T* q, float* scores);
template <class T>
void attn_v(const ReadContext& ctx, const LayerRead& layer, const float* weights, float* out);
template <class T>
void read_back(const ReadContext& ctx, const LayerRead& layer, float* k, float* v);

}  // namespace packkv::detail::cpu

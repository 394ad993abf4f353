// The CUDA backend's reads: decode attention, the scores and attn_v primitives, read_back, the
// blocks' statistics and the download that export needs. Callers hold the context's mutex.
#pragma once

#include <span>
#include <vector>

#include "cuda/device_context.hpp"

namespace packkv::detail::cuda {

template <class T>
void attention(DeviceContext& ctx, std::span<const LayerRead> batch, const T* q, T* out, float* lse, float scale);
/// scores and attn_v of a batch of sequences: sequence i's scores (weights) are [num_q_heads][length_i]
/// floats after those of sequences 0 .. i-1; its queries and outputs row i of
/// [batch][num_q_heads][head_dim].
template <class T>
void scores(DeviceContext& ctx, std::span<const LayerRead> batch, const T* q, float* scores);
template <class T>
void attn_v(DeviceContext& ctx, std::span<const LayerRead> batch, const float* weights, float* out);
template <class T>
void read_back(DeviceContext& ctx, const LayerRead& layer, float* k, float* v);
/// Measures the layers' blocks on the device (one kernel per layer, one download); waits.
void layer_bytes(DeviceContext& ctx, std::span<const LayerRead> layers, std::span<LayerBytes> out);
/// The layer's blocks as stored and its tail rows in token order, in host memory; waits.
template <class T>
void download(DeviceContext& ctx, const LayerRead& layer, std::vector<std::uint32_t>& sizes,
              std::vector<std::uint8_t>& blocks, T* tail_k, T* tail_v, T* sink_k, T* sink_v);
/// The layer's tail rows in token order, in host memory; waits.
template <class T>
void download_tail(DeviceContext& ctx, const LayerRead& layer, T* tail_k, T* tail_v);

}  // namespace packkv::detail::cuda

// Baseline kernels of the CUDA benchmark (bench_kernels.cu): device-side data generation and a
// dense fp16 flash-decoding attention to compare packed attention against.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "packkv/types.hpp"

namespace packkv::bench {

/// Fills n values with a deterministic KV-like distribution (normal-ish, 2% outliers x8, scaled),
/// generated on the device so that 128K-token caches are built in milliseconds.
cudaError_t fill_random(fp16_t* out, std::size_t n, std::uint64_t seed, float scale, cudaStream_t stream);
cudaError_t fill_random(float* out, std::size_t n, std::uint64_t seed, float scale, cudaStream_t stream);

/// Converts [len][heads][dim] token-major rows into [heads][len][dim] head-major fp16 (the dense
/// baseline layout, one contiguous matrix per head).
cudaError_t token_major_to_head_major(const fp16_t* in, fp16_t* out, std::int64_t len, int heads, int dim,
                                      cudaStream_t stream);
cudaError_t float_to_half(const float* in, fp16_t* out, std::size_t n, cudaStream_t stream);

/// Dense fp16 decode attention (flash-decoding split + merge, fp32 accumulation) over a batch of
/// equal-length sequences stored head-major: k, v [batch][kv_heads][len][dim]; q, out
/// [batch][q_heads][dim]. `partials` holds batch * q_heads * splits * (dim + 2) floats.
struct DenseAttentionArgs {
  const fp16_t* k;
  const fp16_t* v;
  const fp16_t* q;
  fp16_t* out;
  float* partials;
  int batch;
  int kv_heads;
  int q_heads;
  int dim;
  std::int64_t len;
  int splits;
  float scale;
};
cudaError_t dense_attention(const DenseAttentionArgs& args, cudaStream_t stream);

}  // namespace packkv::bench

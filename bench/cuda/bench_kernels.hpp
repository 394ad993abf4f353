// Baseline kernels of the CUDA benchmark (bench_kernels.cu): device-side data generation, the
// dense fp16 decode attention that packed attention is measured against, and the small kernels
// the cuBLAS attention baseline and the dense decode step need.
//
// None of this has run on a GPU yet: it compiles for sm_90 and was checked by reading, and the
// benchmark compares every baseline's output with a float64 host reference before timing it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "packkv/types.hpp"

namespace packkv::bench {

/// Fills n values with a deterministic KV-like distribution (normal-ish, 2% outliers x8, scaled),
/// generated on the device so that large caches are built in milliseconds.
cudaError_t fill_random(fp16_t* out, std::size_t n, std::uint64_t seed, float scale, cudaStream_t stream);
cudaError_t fill_random(float* out, std::size_t n, std::uint64_t seed, float scale, cudaStream_t stream);

/// Copies [len][heads][dim] token-major rows into a head-major cache whose (head h, token t) row
/// starts at out + h * head_stride + t * dim (head_stride >= len * dim: room for appended rows).
cudaError_t token_major_to_head_major(const fp16_t* in, fp16_t* out, std::int64_t len, int heads, int dim,
                                      std::int64_t head_stride, cudaStream_t stream);

/// The dense decode step's append: for each of `batch` sequences, writes one new token
/// (src [batch][heads][dim], for K and for V) at row `position` of its head-major cache (sequence
/// b, head h at dst + (b * heads + h) * head_stride). One launch for the whole batch.
cudaError_t dense_append_token(const fp16_t* src_k, const fp16_t* src_v, fp16_t* dst_k, fp16_t* dst_v, int batch,
                               int heads, int dim, std::int64_t head_stride, std::int64_t position,
                               cudaStream_t stream);

/// Softmax of scale * scores, row by row: scores [rows][len] fp32 -> weights [rows][len] fp16.
/// With the two strided-batched GEMMs it makes the unfused cuBLAS attention baseline.
cudaError_t softmax_rows(const float* scores, fp16_t* weights, int rows, std::int64_t len, float scale,
                         cudaStream_t stream);

// ---- dense fp16 decode attention ----
//
// Split-K flash decoding for head_dim 128 and 4 query heads per KV head (Llama-3-8B and other
// GQA-4 models). A CTA of 4 warps owns one (sequence, KV head, token range); each warp streams
// 16-token chunks of K and V rows with 16-byte loads (16 lanes per 256-byte row, 8 rows per lane
// in flight, the next chunk's K requested before the current V is consumed), computes the 4 query
// heads' scores from each K load with an fp32 dot and a 5-shuffle reduce-scatter, keeps an
// online softmax per head, and accumulates V in fp32. The CTA's 4 warps merge through shared
// memory; the last CTA of each (sequence, KV head) to finish merges the splits (a ticket counter,
// no second launch).
inline constexpr int kDenseHeadDim = 128;
inline constexpr int kDenseGroup = 4;
inline constexpr int kDenseRowsPerCta = 64;  ///< a split's token count is a multiple of this
inline constexpr int kDenseMaxSplits = 512;

struct DenseDecodeArgs {
  const fp16_t* k = nullptr;  ///< sequence b, KV head h: rows at k + (b * kv_heads + h) * head_stride
  const fp16_t* v = nullptr;
  std::int64_t head_stride = 0;  ///< elements; a multiple of 8, >= len * 128
  const fp16_t* q = nullptr;     ///< [batch][q_heads][128]
  fp16_t* out = nullptr;         ///< [batch][q_heads][128]
  float* partial_acc = nullptr;  ///< dense_decode_workspace: batch * q_heads * splits * 128 floats
  float* partial_ml = nullptr;   ///< batch * q_heads * splits * 2 floats
  unsigned* counters = nullptr;  ///< batch * kv_heads words, zero before the first launch (kept zero)
  int batch = 0;
  int kv_heads = 0;
  int q_heads = 0;
  std::int64_t len = 0;  ///< tokens of every sequence of the batch
  int splits = 1;
  int tokens_per_split = kDenseRowsPerCta;
  float scale = 1.0f;
};

/// How a launch divides the tokens: splits * tokens_per_split >= len, every split non-empty.
struct DenseDecodePlan {
  int splits = 1;
  int tokens_per_split = kDenseRowsPerCta;
  int ctas_per_sm = 1;  ///< resident CTAs per SM the plan assumed
};

/// Resident CTAs per SM of the dense kernel on the current device (needs a GPU).
cudaError_t dense_decode_ctas_per_sm(int* ctas);

/// Chooses the split so that the grid fills the SMs in whole waves with as little per-CTA
/// overhead as possible (see the cost model in bench_kernels.cu). Host-only arithmetic.
DenseDecodePlan plan_dense_decode(int batch, int kv_heads, std::int64_t len, int sm_count, int ctas_per_sm);

/// Floats of partial_acc and partial_ml a plan needs.
std::size_t dense_decode_acc_floats(int batch, int q_heads, int splits);
std::size_t dense_decode_ml_floats(int batch, int q_heads, int splits);

/// Launches the dense decode attention; cudaErrorInvalidValue for a shape it does not support.
cudaError_t dense_decode_attention(const DenseDecodeArgs& args, cudaStream_t stream);

}  // namespace packkv::bench

// Baseline kernels of the CUDA benchmark: data generation and a dense fp16 decode attention.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "bench_kernels.hpp"

namespace packkv::bench {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxGroup = 8;
constexpr int kMaxDim = 256;
constexpr int kChunk = 64;  // tokens scored per step of the online softmax

__device__ __forceinline__ std::uint64_t mix(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Sum of four uniforms (Irwin-Hall) is close enough to normal for a bandwidth benchmark, and the
// occasional x8 outlier widens token ranges as real K does.
__device__ float kv_like_value(std::size_t i, std::uint64_t seed, float scale) {
  const std::uint64_t a = mix(seed * 0x9E3779B97F4A7C15ull + i), b = mix(a + 0x632BE59BD9B4E019ull);
  const float u = static_cast<float>(a & 0xFFFF) + static_cast<float>((a >> 16) & 0xFFFF) +
                  static_cast<float>((a >> 32) & 0xFFFF) + static_cast<float>((a >> 48) & 0xFFFF);
  float x = (u / 65535.0f - 2.0f) * 1.7320508f;
  if ((b & 0xFF) < 5) x *= 8.0f;
  return x * scale;
}

__global__ void fill_half_kernel(fp16_t* out, std::size_t n, std::uint64_t seed, float scale) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    out[i].bits = __half_as_ushort(__float2half_rn(kv_like_value(i, seed, scale)));
  }
}

__global__ void fill_float_kernel(float* out, std::size_t n, std::uint64_t seed, float scale) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    out[i] = kv_like_value(i, seed, scale);
  }
}

__global__ void head_major_kernel(const fp16_t* in, fp16_t* out, std::int64_t len, int heads, int dim) {
  const std::size_t n = static_cast<std::size_t>(len) * heads * dim;
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const std::size_t c = i % dim, h = i / dim % heads, t = i / (static_cast<std::size_t>(dim) * heads);
    out[(h * len + t) * dim + c] = in[i];
  }
}

__global__ void float_to_half_kernel(const float* in, fp16_t* out, std::size_t n) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    out[i].bits = __half_as_ushort(__float2half_rn(in[i]));
  }
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xFFFFFFFFu, x, o);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xFFFFFFFFu, x, o));
  return x;
}

// One CTA: one (sequence, KV head, token range) for every query head of the group. K rows are
// read as half2 by one warp per token; V columns by one thread per (query head, channel).
__global__ void __launch_bounds__(kThreads) dense_split_kernel(const DenseAttentionArgs a) {
  __shared__ float q_s[kMaxGroup][kMaxDim];
  __shared__ float p_s[kMaxGroup][kChunk];
  __shared__ float running_max[kMaxGroup], running_sum[kMaxGroup], rescale[kMaxGroup];
  const int split = blockIdx.x, kv_head = blockIdx.y, b = blockIdx.z;
  const int group = a.q_heads / a.kv_heads, dim = a.dim;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const std::size_t head_offset = (static_cast<std::size_t>(b) * a.kv_heads + kv_head) * a.len * dim;
  const __half* k = reinterpret_cast<const __half*>(a.k) + head_offset;
  const __half* v = reinterpret_cast<const __half*>(a.v) + head_offset;
  const __half* q =
      reinterpret_cast<const __half*>(a.q) + (static_cast<std::size_t>(b) * a.q_heads + kv_head * group) * dim;
  for (int i = threadIdx.x; i < group * dim; i += kThreads) q_s[i / dim][i % dim] = __half2float(q[i]);
  if (threadIdx.x < kMaxGroup) {
    running_max[threadIdx.x] = -INFINITY;
    running_sum[threadIdx.x] = 0.0f;
  }
  float acc[kMaxGroup * kMaxDim / kThreads] = {};
  __syncthreads();

  const std::int64_t per_split = (a.len + a.splits - 1) / a.splits;
  const std::int64_t begin = split * per_split, end = min(a.len, begin + per_split);
  for (std::int64_t chunk = begin; chunk < end; chunk += kChunk) {
    const int count = static_cast<int>(min(static_cast<std::int64_t>(kChunk), end - chunk));
    for (int t = warp; t < count; t += kWarps) {
      const __half2* row = reinterpret_cast<const __half2*>(k + (chunk + t) * dim);
      float dots[kMaxGroup] = {};
      for (int pair = lane; pair < dim / 2; pair += 32) {
        const float2 x = __half22float2(row[pair]);
#pragma unroll
        for (int g = 0; g < kMaxGroup; ++g) {
          if (g < group) dots[g] += q_s[g][2 * pair] * x.x + q_s[g][2 * pair + 1] * x.y;
        }
      }
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) {
        if (g < group) {
          const float dot = warp_sum(dots[g]);
          if (lane == 0) p_s[g][t] = dot * a.scale;
        }
      }
    }
    __syncthreads();
    for (int g = warp; g < group; g += kWarps) {
      float m = -INFINITY;
      for (int t = lane; t < count; t += 32) m = fmaxf(m, p_s[g][t]);
      m = warp_max(m);
      const float new_max = fmaxf(running_max[g], m);
      float sum = 0.0f;
      for (int t = lane; t < kChunk; t += 32) {
        const float p = t < count ? expf(p_s[g][t] - new_max) : 0.0f;
        p_s[g][t] = p;
        sum += p;
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        const float r = running_max[g] == -INFINITY ? 0.0f : expf(running_max[g] - new_max);
        rescale[g] = r;
        running_sum[g] = running_sum[g] * r + sum;
        running_max[g] = new_max;
      }
    }
    __syncthreads();
#pragma unroll
    for (int slot = 0; slot < kMaxGroup * kMaxDim / kThreads; ++slot) {
      const int pair = threadIdx.x + slot * kThreads;
      if (pair < group * dim) {
        const int g = pair / dim, c = pair % dim;
        float sum = 0.0f;
        for (int t = 0; t < count; ++t) sum += p_s[g][t] * __half2float(v[(chunk + t) * dim + c]);
        acc[slot] = acc[slot] * rescale[g] + sum;
      }
    }
    __syncthreads();
  }
  const int stride = dim + 2;
#pragma unroll
  for (int slot = 0; slot < kMaxGroup * kMaxDim / kThreads; ++slot) {
    const int pair = threadIdx.x + slot * kThreads;
    if (pair < group * dim) {
      const int g = pair / dim, c = pair % dim;
      const std::size_t row = (static_cast<std::size_t>(b) * a.q_heads + kv_head * group + g) * a.splits + split;
      a.partials[row * stride + c] = acc[slot];
      if (c == 0) {
        a.partials[row * stride + dim] = running_max[g];
        a.partials[row * stride + dim + 1] = running_sum[g];
      }
    }
  }
}

__global__ void dense_merge_kernel(const DenseAttentionArgs a) {
  const int dim = a.dim, stride = dim + 2;
  const float* partials = a.partials + static_cast<std::size_t>(blockIdx.x) * a.splits * stride;
  float global_max = -INFINITY;
  for (int s = 0; s < a.splits; ++s) global_max = fmaxf(global_max, partials[s * stride + dim]);
  float total = 0.0f;
  for (int s = 0; s < a.splits; ++s) {
    const float m = partials[s * stride + dim];
    if (m != -INFINITY) total += partials[s * stride + dim + 1] * expf(m - global_max);
  }
  for (int c = threadIdx.x; c < dim; c += blockDim.x) {
    float sum = 0.0f;
    for (int s = 0; s < a.splits; ++s) {
      const float m = partials[s * stride + dim];
      if (m != -INFINITY) sum += partials[s * stride + c] * expf(m - global_max);
    }
    a.out[static_cast<std::size_t>(blockIdx.x) * dim + c].bits = __half_as_ushort(__float2half_rn(sum / total));
  }
}

int grid_for(std::size_t n) {
  const std::size_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > 8192 ? 8192 : blocks));
}

}  // namespace

cudaError_t fill_random(fp16_t* out, std::size_t n, std::uint64_t seed, float scale, cudaStream_t stream) {
  fill_half_kernel<<<grid_for(n), kThreads, 0, stream>>>(out, n, seed, scale);
  return cudaGetLastError();
}

cudaError_t fill_random(float* out, std::size_t n, std::uint64_t seed, float scale, cudaStream_t stream) {
  fill_float_kernel<<<grid_for(n), kThreads, 0, stream>>>(out, n, seed, scale);
  return cudaGetLastError();
}

cudaError_t token_major_to_head_major(const fp16_t* in, fp16_t* out, std::int64_t len, int heads, int dim,
                                      cudaStream_t stream) {
  head_major_kernel<<<grid_for(static_cast<std::size_t>(len) * heads * dim), kThreads, 0, stream>>>(in, out, len, heads,
                                                                                                    dim);
  return cudaGetLastError();
}

cudaError_t float_to_half(const float* in, fp16_t* out, std::size_t n, cudaStream_t stream) {
  float_to_half_kernel<<<grid_for(n), kThreads, 0, stream>>>(in, out, n);
  return cudaGetLastError();
}

cudaError_t dense_attention(const DenseAttentionArgs& a, cudaStream_t stream) {
  if (a.q_heads / a.kv_heads > kMaxGroup || a.dim > kMaxDim || a.dim % 2 != 0) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(a.splits), static_cast<unsigned>(a.kv_heads), static_cast<unsigned>(a.batch));
  dense_split_kernel<<<grid, kThreads, 0, stream>>>(a);
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  dense_merge_kernel<<<static_cast<unsigned>(a.batch * a.q_heads), 128, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace packkv::bench

// The Hadamard rotation of head vectors on the device (CacheConfig::rotate_k / rotate_v): a
// write's K and V into the rotated space, queries likewise, V outputs and read_back back out.
//
// A CTA rotates a few vectors in shared memory: the sign flips, the butterfly stages of span
// 1, 2, ..., P/2 (one barrier each) and the scale, exactly the float operations of
// core/rotation.hpp, so the values equal the CPU backend's bit for bit and both backends encode
// the same blocks.
#include <algorithm>
#include <cstdint>

#include "core/rotation.hpp"
#include "detail/packed_block.cuh"
#include "launch.hpp"

namespace packkv::detail::cuda {

namespace {

constexpr int kRotateThreads = 128;
constexpr int kRotateFloats = 1024;  // shared floats per CTA: 4 vectors of 256, 16 of 64, ...

__device__ __forceinline__ void store_value(float* p, float x) { *p = x; }
__device__ __forceinline__ void store_value(fp16_t* p, float x) { *p = from_float<fp16_t>(x); }
__device__ __forceinline__ void store_value(bf16_t* p, float x) { *p = from_float<bf16_t>(x); }

template <class In, class Out>
__global__ void __launch_bounds__(kRotateThreads) rotate_kernel(const RotateParams<In, Out> p) {
  PACKKV_DYNAMIC_SHARED(shared_bytes);
  float* x = reinterpret_cast<float*>(shared_bytes);
  const int dim = p.head_dim, per_cta = kRotateFloats / dim;
  const std::size_t first = static_cast<std::size_t>(blockIdx.x) * per_cta;
  const std::size_t left = p.vectors - first;
  const int count = left < static_cast<std::size_t>(per_cta) ? static_cast<int>(left) : per_cta;
  const int values = count * dim;
  const In* in = p.in + first * dim;
  Out* out = p.out + first * dim;
  for (int i = threadIdx.x; i < values; i += kRotateThreads) {
    const float v = load_as_float(in + i);
    x[i] = p.forward && rotation_flips(i % dim) ? -v : v;
  }
  __syncthreads();
  const int chunk = rotation_chunk(dim), pairs = values / 2;
  for (int h = 1; h < chunk; h *= 2) {
    for (int k = threadIdx.x; k < pairs; k += kRotateThreads) {
      // Pair k of the stage: chunk k / (chunk / 2), then pair k % h of group (k % (chunk / 2)) / h.
      const int in_chunk = k % (chunk / 2);
      const int j = (k / (chunk / 2)) * chunk + (in_chunk / h) * 2 * h + in_chunk % h;
      const float a = x[j], b = x[j + h];
      x[j] = a + b;
      x[j + h] = a - b;
    }
    __syncthreads();
  }
  const float scale = rotation_scale(chunk);
  for (int i = threadIdx.x; i < values; i += kRotateThreads) {
    const float v = x[i] * scale;
    store_value(out + i, !p.forward && rotation_flips(i % dim) ? -v : v);
  }
}

}  // namespace

template <class In, class Out>
cudaError_t launch_rotate(const RotateParams<In, Out>& p, cudaStream_t stream) {
  if (p.vectors == 0) return cudaSuccess;
  const std::size_t per_cta = static_cast<std::size_t>(kRotateFloats / p.head_dim);
  const unsigned grid = static_cast<unsigned>((p.vectors + per_cta - 1) / per_cta);
  PACKKV_LAUNCH((rotate_kernel<In, Out>), grid, kRotateThreads, kRotateFloats * sizeof(float), stream, p);
  return cudaGetLastError();
}

template cudaError_t launch_rotate<float, float>(const RotateParams<float, float>&, cudaStream_t);
template cudaError_t launch_rotate<fp16_t, fp16_t>(const RotateParams<fp16_t, fp16_t>&, cudaStream_t);
template cudaError_t launch_rotate<bf16_t, bf16_t>(const RotateParams<bf16_t, bf16_t>&, cudaStream_t);

}  // namespace packkv::detail::cuda

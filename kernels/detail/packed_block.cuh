// Device-side helpers shared by packkv's CUDA kernels: storage-type loads, block-wide scans and
// the unpacking of one section of a packed block (format.hpp) into shared memory.
//
// Every kernel of the CUDA backend runs blocks of kThreads threads; the helpers assume it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "packkv/format.hpp"
#include "packkv/types.hpp"

#include "detail/launch_macros.cuh"

namespace packkv::detail::cuda {

inline constexpr int kThreads = 256;
inline constexpr int kWarps = kThreads / 32;
inline constexpr unsigned kFullMask = 0xFFFFFFFFu;
/// Rounds one pass of the section unpacker covers at most (one thread per pack, head_dim >= 8).
inline constexpr int kMaxRoundsPerPass = kThreads / 8;
/// Shared words the scan helpers below need: the warp totals, then one word per round of a pass.
inline constexpr int kScanScratchWords = kWarps + kMaxRoundsPerPass;

// The intrinsics give the same exact widening as types.hpp's integer code, in one instruction.
__device__ __forceinline__ float load_as_float(const float* p) { return *p; }
__device__ __forceinline__ float load_as_float(const fp16_t* p) { return __half2float(__ushort_as_half(p->bits)); }
__device__ __forceinline__ float load_as_float(const bf16_t* p) {
  return __bfloat162float(__ushort_as_bfloat16(p->bits));
}
__device__ __forceinline__ float fp16_bits_to_float(std::uint16_t bits) { return __half2float(__ushort_as_half(bits)); }

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}
__device__ __forceinline__ float warp_min(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) x = fminf(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}
__device__ __forceinline__ int warp_sum_int(int x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

/// Exclusive prefix sum of one value per thread over the whole block; `total` receives the sum.
/// `warp_totals` is kWarps words of shared memory. Every thread must call it (it synchronises).
__device__ __forceinline__ std::uint32_t block_exclusive_scan(std::uint32_t value, std::uint32_t* warp_totals,
                                                              std::uint32_t& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  std::uint32_t inclusive = value;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const std::uint32_t neighbour = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += neighbour;
  }
  if (lane == 31) warp_totals[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    std::uint32_t running = lane < kWarps ? warp_totals[lane] : 0u;
    for (int offset = 1; offset < kWarps; offset <<= 1) {
      const std::uint32_t neighbour = __shfl_up_sync(kFullMask, running, offset);
      if (lane >= offset) running += neighbour;
    }
    if (lane < kWarps) warp_totals[lane] = running;
  }
  __syncthreads();
  const std::uint32_t before_warp = warp > 0 ? warp_totals[warp - 1] : 0u;
  total = warp_totals[kWarps - 1];
  __syncthreads();  // the scratch words may be reused by the next call
  return before_warp + inclusive - value;
}

/// Bytes per row of the channel-major code tile: 4 spare bytes make the row stride an odd number
/// of words, so threads walking channels hit distinct shared-memory banks.
__host__ __device__ constexpr int code_row_stride(int block_tokens) { return block_tokens + 4; }

/// Unpacks every code of one section into `codes[c * row_stride + i]` (channel c, packed position
/// i), pack minimum included. One thread per pack, as many whole rounds per pass as the CTA holds;
/// a pack's offset in its round is a block-wide scan of the widths minus the scan at the round's
/// first channel. `scan_scratch` holds kScanScratchWords words.
__device__ inline void unpack_section_to_shared(const std::uint8_t* section, const format::SectionLayout& layout,
                                                std::uint8_t* codes, int row_stride, std::uint32_t* scan_scratch) {
  const std::uint32_t dim = layout.head_dim;
  const std::uint32_t rounds_per_pass = kThreads / dim;  // head_dim <= kThreads
  std::uint32_t* round_first = scan_scratch + kWarps;
  const std::uint32_t local = threadIdx.x / dim, channel = threadIdx.x % dim;
  for (std::uint32_t first_round = 0; first_round < layout.rounds; first_round += rounds_per_pass) {
    const std::uint32_t round = first_round + local;
    const bool active = local < rounds_per_pass && round < layout.rounds;
    format::RoundView view{};
    format::PackDescriptor pack{0u, 0u};
    if (active) {
      view = format::round_view(section, layout, round);
      pack = format::pack_descriptor(view, channel, layout.bits);
    }
    std::uint32_t total = 0;
    const std::uint32_t before = block_exclusive_scan(pack.width, scan_scratch, total);
    if (active && channel == 0) round_first[local] = before;
    __syncthreads();
    if (active) {
      std::uint8_t values[format::kPackTokens];
      format::unpack16(view.packs + 2 * (before - round_first[local]), pack.width, values);
      auto* row = reinterpret_cast<std::uint32_t*>(codes + channel * row_stride + round * format::kPackTokens);
#pragma unroll
      for (int word = 0; word < 4; ++word) {
        std::uint32_t packed = 0;
#pragma unroll
        for (int b = 0; b < 4; ++b) packed |= ((values[4 * word + b] + pack.min) & 0xFFu) << (8 * b);
        row[word] = packed;
      }
    }
    __syncthreads();  // round_first is rewritten by the next pass
  }
}

/// Loads a section's (step, min) pairs as floats: fp16 pairs, or compact ones (format version 3).
__device__ inline void load_section_params(const std::uint8_t* section, const format::SectionLayout& layout,
                                           float* step, float* min) {
  if (layout.compact != 0u) {
    for (std::uint32_t i = threadIdx.x; i < layout.param_count; i += kThreads) {
      const format::GroupParams p = format::group_params(section, layout, i);
      step[i] = p.step;
      min[i] = p.min;
    }
    return;
  }
  const format::QuantParams* params = format::section_params(section);
  for (std::uint32_t i = threadIdx.x; i < layout.param_count; i += kThreads) {
    step[i] = fp16_bits_to_float(params[i].step.bits);
    min[i] = fp16_bits_to_float(params[i].min.bits);
  }
}

/// Lets `kernel` use all the dynamic shared memory the device allows. Done once per kernel (the
/// attribute is the kernel's, not the launch's).
template <class Kernel>
cudaError_t opt_in_shared_memory(Kernel kernel) {
  int device = 0, optin = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status == cudaSuccess) status = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (status == cudaSuccess) status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
  return status;
}

/// Bump allocation of a kernel's dynamic shared memory: regions of 16-byte aligned sizes, in order.
/// The same code sizes the launch (base null) and carves the memory inside the kernel.
struct SharedCarver {
  unsigned char* base;
  std::size_t used = 0;
  __host__ __device__ unsigned char* take(std::size_t bytes) {
    unsigned char* p = base != nullptr ? base + used : nullptr;
    used += format::align_up(static_cast<std::uint32_t>(bytes), format::kAlign);
    return p;
  }
  template <class U>
  __host__ __device__ U* take_array(std::size_t count) {
    return reinterpret_cast<U*>(take(count * sizeof(U)));
  }
};

}  // namespace packkv::detail::cuda

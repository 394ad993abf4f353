// A small CPU emulator of the CUDA features packkv's kernels use, so that the kernels' logic is
// tested against the CPU backend on machines without a GPU (build machines, CI).
//
// Every CUDA thread of a block is a fiber (ucontext); __syncthreads and the warp collectives
// (shuffles, ballot) are barriers at which fibers switch. Blocks run one after another and a launch
// completes before it returns, so streams are trivially ordered. Device memory is host memory.
// What it cannot find: data races that need real concurrency, and performance problems.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>

using std::isfinite;  // device code calls the unqualified CUDA math functions

struct uint3 {
  unsigned x, y, z;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace packkv_emulator {

struct ThreadContext {
  uint3 thread_idx;
  int linear;
};
struct BlockContext {
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  unsigned char* shared;
  std::uint64_t* warp_slots;  // [warps][32]
};

ThreadContext& current_thread();
BlockContext& current_block();
void block_barrier();
void warp_barrier();
unsigned char* dynamic_shared();
void launch(dim3 grid, dim3 block, std::size_t shared_bytes, std::function<void()> body);
inline void launch(unsigned grid, unsigned block, std::size_t shared_bytes, std::function<void()> body) {
  launch(dim3(grid), dim3(block), shared_bytes, std::move(body));
}
inline void launch(int grid, int block, std::size_t shared_bytes, std::function<void()> body) {
  launch(dim3(static_cast<unsigned>(grid)), dim3(static_cast<unsigned>(block)), shared_bytes, std::move(body));
}
inline void launch(dim3 grid, int block, std::size_t shared_bytes, std::function<void()> body) {
  launch(grid, dim3(static_cast<unsigned>(block)), shared_bytes, std::move(body));
}
inline void launch(unsigned grid, int block, std::size_t shared_bytes, std::function<void()> body) {
  launch(dim3(grid), dim3(static_cast<unsigned>(block)), shared_bytes, std::move(body));
}

/// Every lane deposits a value; each gets the value of lane `source` (the caller's own when
/// `source` is out of the warp).
template <class T>
T exchange(T value, int source) {
  static_assert(sizeof(T) <= 8, "exchange: at most 8 bytes");
  std::uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof value);
  const int lane = current_thread().linear & 31, warp = current_thread().linear >> 5;
  std::uint64_t* slots = current_block().warp_slots + 32 * warp;
  slots[lane] = bits;
  warp_barrier();
  const std::uint64_t got = (source >= 0 && source < 32) ? slots[source] : bits;
  warp_barrier();
  T result;
  std::memcpy(&result, &got, sizeof result);
  return result;
}

}  // namespace packkv_emulator

#define threadIdx (::packkv_emulator::current_thread().thread_idx)
#define blockIdx (::packkv_emulator::current_block().block_idx)
#define blockDim (::packkv_emulator::current_block().block_dim)
#define gridDim (::packkv_emulator::current_block().grid_dim)

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static thread_local  // per host thread, like the scheduler
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

inline void __syncthreads() { packkv_emulator::block_barrier(); }
inline void __syncwarp(unsigned = 0xFFFFFFFFu) { packkv_emulator::warp_barrier(); }
inline void __threadfence_system() {}

template <class T>
T __shfl_xor_sync(unsigned, T value, int mask) {
  return packkv_emulator::exchange(value, (packkv_emulator::current_thread().linear & 31) ^ mask);
}
template <class T>
T __shfl_up_sync(unsigned, T value, unsigned delta) {
  const int lane = packkv_emulator::current_thread().linear & 31;
  return packkv_emulator::exchange(value, lane >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : -1);
}
template <class T>
T __shfl_sync(unsigned, T value, int source) {
  return packkv_emulator::exchange(value, source & 31);
}
inline unsigned __ballot_sync(unsigned, int predicate) {
  unsigned result = 0;
  // Thirty-two exchanges keep the collective uniform; speed does not matter here.
  for (int lane = 0; lane < 32; ++lane)
    result |= (packkv_emulator::exchange(predicate ? 1 : 0, lane) ? 1u : 0u) << lane;
  return result;
}
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }

inline int atomicCAS(int* address, int compare, int value) {
  const int old = *address;
  if (old == compare) *address = value;
  return old;
}
inline int atomicExch(int* address, int value) {
  const int old = *address;
  *address = value;
  return old;
}
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  const unsigned long long old = *address;
  *address += value;
  return old;
}

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline int min(int a, int b) { return a < b ? a : b; }

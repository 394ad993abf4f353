// The sm_80+ instructions the read path is built from, behind portable wrappers: inline PTX on a
// GPU, and under PACKKV_CUDA_EMULATION the CPU emulator's exact implementations
// (tests/support/cuda_emulator), which also check alignment, address spaces and waits.
//
//   cp_async_16 / cp_async_commit / cp_async_wait<N>   16-byte global -> shared copies (LDGSTS)
//   ldmatrix_x4 / ldmatrix_x4_trans / ldmatrix_x2_trans four or two 8x8 fp16 tiles (LDSM)
//   mma_16816                                          m16n8k16, fp16 in, fp32 accumulate (HMMA)
//   half2 bit helpers                                   fp16x2 arithmetic on raw 32-bit words
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace packkv::detail::cuda {

#if defined(PACKKV_CUDA_EMULATION)

__device__ __forceinline__ void cp_async_16(void* shared_dst, const void* global_src) {
  packkv_emulator::cp_async_16(shared_dst, global_src);
}
__device__ __forceinline__ void cp_async_commit() { packkv_emulator::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  packkv_emulator::cp_async_wait(N);
}
__device__ __forceinline__ void ldmatrix_x4(std::uint32_t (&r)[4], const void* row) {
  packkv_emulator::ldmatrix(r, 4, false, row);
}
__device__ __forceinline__ void ldmatrix_x4_trans(std::uint32_t (&r)[4], const void* row) {
  packkv_emulator::ldmatrix(r, 4, true, row);
}
__device__ __forceinline__ void ldmatrix_x2_trans(std::uint32_t (&r)[2], const void* row) {
  packkv_emulator::ldmatrix(r, 2, true, row);
}
__device__ __forceinline__ void mma_16816(float (&d)[4], const std::uint32_t (&a)[4], const std::uint32_t (&b)[2]) {
  packkv_emulator::mma_m16n8k16(d, a, b, d);
}

/// Two fp16 values as one word (lo in the low half).
__device__ __forceinline__ std::uint32_t half2_bits(float lo, float hi) {
  return static_cast<std::uint32_t>(__half_as_ushort(__float2half_rn(lo))) |
         static_cast<std::uint32_t>(__half_as_ushort(__float2half_rn(hi))) << 16;
}
/// a - b on both fp16 halves, rounded to nearest.
__device__ __forceinline__ std::uint32_t hsub2_bits(std::uint32_t a, std::uint32_t b) {
  auto lane = [](std::uint32_t x, int i) { return __half2float(__ushort_as_half(static_cast<unsigned short>(x >> (16 * i)))); };
  // The difference of two fp16 values is exact in double, so this rounds once.
  auto diff = [&](int i) {
    return __float2half_rn(static_cast<float>(static_cast<double>(lane(a, i)) - static_cast<double>(lane(b, i))));
  };
  return static_cast<std::uint32_t>(__half_as_ushort(diff(0))) | static_cast<std::uint32_t>(__half_as_ushort(diff(1))) << 16;
}

#else

__device__ __forceinline__ std::uint32_t shared_address(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}
/// .cg: cached in L2 only; the bytes are used once per CTA.
__device__ __forceinline__ void cp_async_16(void* shared_dst, const void* global_src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_address(shared_dst)), "l"(global_src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ void ldmatrix_x4(std::uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(std::uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(std::uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(shared_address(row)));
}
__device__ __forceinline__ void mma_16816(float (&d)[4], const std::uint32_t (&a)[4], const std::uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ std::uint32_t half2_bits(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const std::uint32_t*>(&h);
}
__device__ __forceinline__ std::uint32_t hsub2_bits(std::uint32_t a, std::uint32_t b) {
  std::uint32_t d;
  asm("sub.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

#endif

/// fp16 0x6400 is 1024 with a unit step: or-ing a code (< 1024) into its mantissa gives 1024 + code.
inline constexpr std::uint32_t kHalf2Magic = 0x64006400u;

}  // namespace packkv::detail::cuda

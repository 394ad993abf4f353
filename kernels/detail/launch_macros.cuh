// Kernel launches, dynamic shared memory and out-of-line device functions go through these macros so that the kernels can also
// be compiled as plain C++ and run by the CPU emulator of tests/support/cuda_emulator, which checks
// their logic against the CPU backend on machines without a GPU.
#pragma once

#if defined(PACKKV_CUDA_EMULATION)
#define PACKKV_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  ::packkv_emulator::launch(grid, block, shared_bytes, [=] { kernel(__VA_ARGS__); }, #kernel)
#define PACKKV_DYNAMIC_SHARED(name) unsigned char* name = ::packkv_emulator::dynamic_shared()
#define PACKKV_NOINLINE __attribute__((noinline))
#else
#define PACKKV_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  kernel<<<grid, block, shared_bytes, stream>>>(__VA_ARGS__)
#define PACKKV_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#define PACKKV_NOINLINE __noinline__
#endif

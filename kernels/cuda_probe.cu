// Proves the CUDA toolchain works inside the packkv build: one trivial kernel.
#include <cuda_runtime.h>

namespace packkv::detail {

__global__ void probe_kernel(int* out) { *out = 42; }

/// Returns true when a CUDA device is present and runs a kernel.
bool cuda_probe() {
  int* d = nullptr;
  if (cudaMalloc(&d, sizeof(int)) != cudaSuccess) return false;
  probe_kernel<<<1, 1>>>(d);
  int h = 0;
  const bool ok = cudaMemcpy(&h, d, sizeof(int), cudaMemcpyDeviceToHost) == cudaSuccess && h == 42;
  cudaFree(d);
  return ok;
}

}  // namespace packkv::detail

// Host-side helpers of the CUDA backend: error checking and stream-ordered device buffers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <string>
#include <utility>

namespace packkv::cuda::detail {

/// Throws packkv::error naming the failed step and CUDA's message.
void check_cuda(cudaError_t status, const char* what);

/// Where a device-reported value error is raised: by a call after the append that queued the
/// kernel (the append already returned), by a strict-mode append before it changes anything, or
/// by encode_blocks.
enum class ErrorOrigin { later_call, strict_append, encode_blocks };
struct DeviceError;
[[noreturn]] void throw_device_error(const DeviceError& error, ErrorOrigin origin);

/// Device memory allocated and freed in stream order (cudaMallocAsync / cudaFreeAsync), so that
/// growing a buffer neither synchronises nor races with kernels still reading the old one.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(std::size_t bytes, cudaStream_t stream);
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)), stream_(other.stream_) {}
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    if (this != &other) {
      release();
      data_ = std::exchange(other.data_, nullptr);
      bytes_ = std::exchange(other.bytes_, 0);
      stream_ = other.stream_;
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* data() const { return data_; }
  template <class U>
  U* as() const {
    return static_cast<U*>(data_);
  }
  std::size_t bytes() const { return bytes_; }
  /// Frees on `stream` (the stream of the last use) rather than the allocating stream.
  void set_stream(cudaStream_t stream) { stream_ = stream; }
  void release();

 private:
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
  cudaStream_t stream_ = nullptr;
};

}  // namespace packkv::cuda::detail

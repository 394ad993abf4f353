// Host-side helpers of the CUDA backend: error checking, stream-ordered device buffers, mapped
// host words, and the device page pool.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace packkv::detail::cuda {

/// Throws packkv::error naming the failed step and CUDA's message (out-of-memory included).
void check_cuda(cudaError_t status, const char* what);

/// Number of usable CUDA devices; 0 with the reason in `why` when there are none.
int device_count(std::string* why);

/// Where a device-reported value error is raised: by a call after the append that queued the
/// kernel (the append already returned), by a strict-mode append before it changes anything, or
/// by encode_blocks.
enum class ErrorOrigin { later_call, strict_append, encode_blocks };
struct DeviceError;
[[noreturn]] void throw_device_error(const DeviceError& error, ErrorOrigin origin);
std::string device_error_message(const DeviceError& error, ErrorOrigin origin);

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

/// 64-bit words of mapped, pinned host memory that kernels write and the host reads without a
/// synchronisation; allocated in chunks, handed out and taken back by index.
class MappedWords {
 public:
  MappedWords() = default;
  MappedWords(const MappedWords&) = delete;
  MappedWords& operator=(const MappedWords&) = delete;
  ~MappedWords();
  std::size_t take();
  void give(std::size_t index) { free_.push_back(index); }
  unsigned long long read(std::size_t index) const {
    return *static_cast<volatile unsigned long long*>(chunks_[index / kChunkWords].host + index % kChunkWords);
  }
  unsigned long long* device(std::size_t index) const {
    return chunks_[index / kChunkWords].device + index % kChunkWords;
  }

 private:
  static constexpr std::size_t kChunkWords = 1024;
  struct Chunk {
    unsigned long long* host;
    unsigned long long* device;
  };
  std::vector<Chunk> chunks_;
  std::vector<std::size_t> free_;
};

/// Fixed-size device pages with a host free list. Each (sequence, layer) owns whole pages and
/// packs its blocks into them tightly; pages it gives back are reused by any layer, and
/// release_free() returns them to the device.
class DevicePagePool {
 public:
  explicit DevicePagePool(std::size_t page_bytes) : page_bytes_(page_bytes) {}

  std::size_t page_bytes() const { return page_bytes_; }
  std::size_t pages() const { return pages_.size(); }
  std::size_t free_pages() const { return free_.size(); }
  std::size_t reserved_bytes() const { return pages_.size() * page_bytes_; }
  std::size_t pages_in_use() const { return pages_.size() - free_.size(); }
  std::size_t pages_to_allocate(std::size_t wanted) const { return wanted > free_.size() ? wanted - free_.size() : 0; }
  /// New pages, allocated but not yet in the pool (so that a failure changes nothing).
  std::vector<DeviceBuffer> allocate(std::size_t count, cudaStream_t stream) const;
  void add(std::vector<DeviceBuffer> pages);
  std::uint8_t* take() {
    std::uint8_t* page = free_.back();
    free_.pop_back();
    return page;
  }
  void give(std::uint8_t* page) { free_.push_back(page); }
  void release_free();
  void set_stream(cudaStream_t stream) {
    for (auto& page : pages_) page.set_stream(stream);
  }

 private:
  std::size_t page_bytes_;
  std::vector<DeviceBuffer> pages_;
  std::vector<std::uint8_t*> free_;
};

}  // namespace packkv::detail::cuda

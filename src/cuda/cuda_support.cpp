#include "cuda/cuda_support.hpp"

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "launch.hpp"
#include "packkv/error.hpp"

namespace packkv::detail::cuda {

void check_cuda(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return;
  if (status == cudaErrorMemoryAllocation) {
    cudaGetLastError();  // not sticky: clear it so that the next call starts clean
    detail::throw_out_of_memory(fmt::format("device memory for {}", what));
  }
  detail::throw_error(
      fmt::format("CUDA backend: {} failed: {} ({})", what, cudaGetErrorString(status), cudaGetErrorName(status)));
}

int device_count(std::string* why) {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    if (why != nullptr) *why = fmt::format("no usable CUDA device: {}", cudaGetErrorString(status));
    cudaGetLastError();  // clear the error so later calls start clean
    return 0;
  }
  if (count == 0 && why != nullptr) *why = "no CUDA device is present";
  return count;
}

void throw_device_error(const DeviceError& e, ErrorOrigin origin) {
  detail::throw_error(device_error_message(e, origin));
}

std::string device_error_message(const DeviceError& e, ErrorOrigin origin) {
  if (e.kind == kBadQuery) {
    return fmt::format(
        "attention: q value {} of batch entry {} (query head {}, channel {}) is NaN or Inf; the CUDA backend found "
        "it on the device after that call returned, and its output is undefined",
        e.value, e.sequence, e.head, e.channel);
  }
  const char* tensor = e.tensor == 0 ? "K" : "V";
  const std::string where = origin == ErrorOrigin::encode_blocks
                                ? std::string("encode_blocks")
                                : fmt::format("append to sequence {} layer {}", e.sequence, e.layer);
  const char* consequence = origin == ErrorOrigin::later_call
                                ? ". The CUDA backend found it on the device after append returned; that sequence's "
                                  "contents at this layer are undefined: remove it (or set cuda_strict to check "
                                  "values before an append returns)"
                                : "";
  switch (e.kind) {
    case kBadValue: {
      // value2: the limit the kernel checked (16384 with compact parameters).
      const bool compact = e.value2 == format::kCompactMaxAbs;
      return fmt::format("{}: {} value {} at token {}, head {}, channel {} is NaN, Inf or beyond +-{} ({}){}", where,
                         tensor, e.value, e.token, e.head, e.channel, compact ? 16384 : 65504,
                         compact ? "the limit of compact parameters, CacheConfig::compact_params"
                                 : "packkv stores per-token parameters in fp16",
                         consequence);
    }
    case kRangeTooWide:
      return fmt::format(
          "{}: {} {} {} of head {} spans [{}, {}], too wide for one fp16 step at this rel (use a smaller rel){}", where,
          tensor, e.channel < 0 ? "token" : "channel", e.channel < 0 ? e.token : e.channel, e.head, e.value, e.value2,
          consequence);
    default:
      return fmt::format(
          "{}: block placement needed page {} of a layer that owns {} (an internal accounting error; nothing was "
          "written out of bounds){}",
          where, e.value, e.value2, consequence);
  }
}

DeviceBuffer::DeviceBuffer(std::size_t bytes, cudaStream_t stream) : bytes_(bytes), stream_(stream) {
  if (bytes == 0) return;
  const cudaError_t status = cudaMallocAsync(&data_, bytes, stream);
  if (status != cudaSuccess) {
    data_ = nullptr;
    bytes_ = 0;
    check_cuda(status, "a device buffer");
  }
}

DeviceBuffer::~DeviceBuffer() { release(); }

void DeviceBuffer::release() {
  if (data_ != nullptr) cudaFreeAsync(data_, stream_);  // best effort: a destructor cannot throw
  data_ = nullptr;
  bytes_ = 0;
}

MappedWords::~MappedWords() {
  for (auto& chunk : chunks_) cudaFreeHost(chunk.host);
}

std::size_t MappedWords::take() {
  if (free_.empty()) {
    Chunk chunk{};
    check_cuda(cudaHostAlloc(reinterpret_cast<void**>(&chunk.host), kChunkWords * sizeof(unsigned long long),
                             cudaHostAllocMapped),
               "mapped host words (placement progress)");
    std::memset(chunk.host, 0, kChunkWords * sizeof(unsigned long long));
    const cudaError_t status = cudaHostGetDevicePointer(reinterpret_cast<void**>(&chunk.device), chunk.host, 0);
    if (status != cudaSuccess) {
      cudaFreeHost(chunk.host);
      check_cuda(status, "cudaHostGetDevicePointer");
    }
    free_.reserve(free_.size() + kChunkWords);
    chunks_.push_back(chunk);
    for (std::size_t i = kChunkWords; i > 0; --i) free_.push_back((chunks_.size() - 1) * kChunkWords + i - 1);
  }
  const std::size_t index = free_.back();
  free_.pop_back();
  return index;
}

std::vector<DeviceBuffer> DevicePagePool::allocate(std::size_t count, cudaStream_t stream) const {
  std::vector<DeviceBuffer> fresh;
  fresh.reserve(count);
  for (std::size_t i = 0; i < count; ++i) fresh.emplace_back(page_bytes_, stream);
  return fresh;
}

void DevicePagePool::add(std::vector<DeviceBuffer> fresh) {
  pages_.reserve(pages_.size() + fresh.size());
  free_.reserve(pages_.size() + fresh.size());
  for (DeviceBuffer& page : fresh) {
    free_.push_back(page.as<std::uint8_t>());
    pages_.push_back(std::move(page));
  }
}

void DevicePagePool::release_free() {
  std::vector<DeviceBuffer> kept;
  for (DeviceBuffer& page : pages_) {
    if (std::find(free_.begin(), free_.end(), page.as<std::uint8_t>()) == free_.end()) kept.push_back(std::move(page));
  }
  pages_ = std::move(kept);
  free_.clear();
}

}  // namespace packkv::detail::cuda

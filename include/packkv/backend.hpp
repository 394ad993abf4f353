// The interface between PackedKVCache and a storage/compute backend (CPU or CUDA).
//
// PackedKVCache validates every argument that does not need the backend's data (layer range,
// shapes, null pointers, sequence existence) before calling in; a backend validates data
// (NaN/Inf, range, memory budget) and must leave its state unchanged when it throws.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "packkv/cache.hpp"

namespace packkv::detail {

template <class T>
class CacheBackend {
 public:
  virtual ~CacheBackend() = default;

  virtual void add_sequence(SeqId id) = 0;
  virtual void remove_sequence(SeqId id) = 0;
  virtual bool contains(SeqId id) const = 0;
  virtual std::vector<SeqId> sequence_ids() const = 0;
  virtual std::int64_t length(SeqId id, int layer) const = 0;

  virtual void append(SeqId id, int layer, const T* k, const T* v, int n_tokens) = 0;
  virtual void attention(std::span<const SeqId> ids, int layer, const T* q, T* out, float scale) const = 0;
  virtual void scores(SeqId id, int layer, const T* q, float* scores) const = 0;
  virtual void attn_v(SeqId id, int layer, const float* weights, float* out) const = 0;
  virtual void read_back(SeqId id, int layer, float* k, float* v) const = 0;
  virtual MemoryStats memory_stats() const = 0;
  virtual void set_stream(void* stream) = 0;

  /// Transfer images (docs/format.md, "Sequence images"). A backend that cannot do this yet
  /// says so with a packkv::error.
  virtual std::vector<std::uint8_t> export_sequence(SeqId id, std::span<const int> layers) const;
  virtual void import_sequence(SeqId id, std::span<const std::uint8_t> image);
  /// Returns cached empty pages to the system.
  virtual void release_unused_memory() {}
};

template <class T>
std::vector<std::uint8_t> CacheBackend<T>::export_sequence(SeqId, std::span<const int>) const {
  throw_error("export_sequence is not supported by this backend yet");
}
template <class T>
void CacheBackend<T>::import_sequence(SeqId, std::span<const std::uint8_t>) {
  throw_error("import_sequence is not supported by this backend yet");
}

template <class T>
std::unique_ptr<CacheBackend<T>> make_cpu_backend(const CacheConfig& config);

/// Defined in kernels/ when packkv is built with CUDA; otherwise throws packkv::error.
template <class T>
std::unique_ptr<CacheBackend<T>> make_cuda_backend(const CacheConfig& config);

}  // namespace packkv::detail

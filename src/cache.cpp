// PackedKVCache<T>: argument validation shared by all backends, locking, then forwarding.
//
// Thread safety: every method may be called from any thread. Reading methods (attention, the
// primitives, read_back, length, statistics, export) share a reader lock and run concurrently;
// methods that change the cache take the lock exclusively, and a waiting writer holds back new
// readers (rw_lock.hpp). The lock is taken once per call: noise next to the work of any call.
#include "packkv/cache.hpp"

#include <cmath>
#include <shared_mutex>

#include "rw_lock.hpp"

#include <fmt/format.h>

#include "packkv/backend.hpp"

namespace packkv {

template <class T>
PackedKVCache<T>::PackedKVCache(const CacheConfig& config)
    : config_(config), mutex_(std::make_unique<detail::RwLock>()) {
  validate(config_);
  backend_ = config_.device == Device::cpu ? detail::make_cpu_backend<T>(config_)
                                           : detail::make_cuda_backend<T>(config_);
}

template <class T>
PackedKVCache<T>::~PackedKVCache() = default;
template <class T>
PackedKVCache<T>::PackedKVCache(PackedKVCache&&) noexcept = default;
template <class T>
PackedKVCache<T>& PackedKVCache<T>::operator=(PackedKVCache&&) noexcept = default;

template <class T>
std::shared_lock<detail::RwLock> PackedKVCache<T>::read_lock(const char* what) const {
  PACKKV_REQUIRE(backend_, fmt::format("{}: the cache was moved from", what));
  return std::shared_lock<detail::RwLock>(*mutex_);
}

template <class T>
std::unique_lock<detail::RwLock> PackedKVCache<T>::write_lock(const char* what) {
  PACKKV_REQUIRE(backend_, fmt::format("{}: the cache was moved from", what));
  return std::unique_lock<detail::RwLock>(*mutex_);
}

template <class T>
void PackedKVCache<T>::check_sequence(SeqId id, const char* what) const {
  PACKKV_REQUIRE(backend_->contains(id), fmt::format("{}: unknown sequence id {}", what, id));
}

template <class T>
void PackedKVCache<T>::check_layer(int layer, const char* what) const {
  PACKKV_REQUIRE(layer >= 0 && layer < config_.num_layers,
                 fmt::format("{}: layer {} is out of range [0, {})", what, layer, config_.num_layers));
}

template <class T>
void PackedKVCache<T>::add_sequence(SeqId id) {
  const auto lock = write_lock("add_sequence");
  PACKKV_REQUIRE(!backend_->contains(id), fmt::format("add_sequence: sequence id {} already exists", id));
  backend_->add_sequence(id);
}

template <class T>
void PackedKVCache<T>::remove_sequence(SeqId id) {
  const auto lock = write_lock("remove_sequence");
  check_sequence(id, "remove_sequence");
  backend_->remove_sequence(id);
}

template <class T>
bool PackedKVCache<T>::contains(SeqId id) const {
  if (!backend_) return false;
  const auto lock = read_lock("contains");
  return backend_->contains(id);
}

template <class T>
std::size_t PackedKVCache<T>::num_sequences() const {
  return sequence_ids().size();
}

template <class T>
std::vector<SeqId> PackedKVCache<T>::sequence_ids() const {
  if (!backend_) return {};
  const auto lock = read_lock("sequence_ids");
  return backend_->sequence_ids();
}

template <class T>
std::int64_t PackedKVCache<T>::length(SeqId id, int layer) const {
  const auto lock = read_lock("length");
  check_sequence(id, "length");
  check_layer(layer, "length");
  return backend_->length(id, layer);
}

template <class T>
void PackedKVCache<T>::append(SeqId id, int layer, const T* k, const T* v, int n_tokens) {
  const auto lock = write_lock("append");
  check_sequence(id, "append");
  check_layer(layer, "append");
  PACKKV_REQUIRE(n_tokens >= 1 && n_tokens <= (1 << 24),
                 fmt::format("append: n_tokens must be in [1, 2^24], got {}", n_tokens));
  PACKKV_REQUIRE(k != nullptr && v != nullptr, "append: k and v must not be null");
  PACKKV_REQUIRE(backend_->length(id, layer) + n_tokens <= (std::int64_t{1} << 31),
                 fmt::format("append: sequence {} would exceed 2^31 tokens", id));
  backend_->append(id, layer, k, v, n_tokens);
}

template <class T>
void PackedKVCache<T>::attention(std::span<const SeqId> ids, int layer, const T* q, T* out,
                                 float softmax_scale) const {
  const auto lock = read_lock("attention");
  check_layer(layer, "attention");
  PACKKV_REQUIRE(!ids.empty(), "attention: the batch of sequence ids is empty");
  PACKKV_REQUIRE(q != nullptr && out != nullptr, "attention: q and out must not be null");
  PACKKV_REQUIRE(std::isfinite(softmax_scale),
                 fmt::format("attention: softmax_scale must be finite, got {}", softmax_scale));
  for (SeqId id : ids) {
    check_sequence(id, "attention");
    PACKKV_REQUIRE(backend_->length(id, layer) > 0,
                   fmt::format("attention: sequence {} has no tokens at layer {}", id, layer));
  }
  backend_->attention(ids, layer, q, out, softmax_scale);
}

template <class T>
void PackedKVCache<T>::scores(SeqId id, int layer, const T* q, float* scores) const {
  const auto lock = read_lock("scores");
  check_sequence(id, "scores");
  check_layer(layer, "scores");
  PACKKV_REQUIRE(q != nullptr && scores != nullptr, "scores: q and scores must not be null");
  backend_->scores(id, layer, q, scores);
}

template <class T>
void PackedKVCache<T>::attn_v(SeqId id, int layer, const float* weights, float* out) const {
  const auto lock = read_lock("attn_v");
  check_sequence(id, "attn_v");
  check_layer(layer, "attn_v");
  PACKKV_REQUIRE(weights != nullptr && out != nullptr, "attn_v: weights and out must not be null");
  backend_->attn_v(id, layer, weights, out);
}

template <class T>
void PackedKVCache<T>::read_back(SeqId id, int layer, float* k, float* v) const {
  const auto lock = read_lock("read_back");
  check_sequence(id, "read_back");
  check_layer(layer, "read_back");
  PACKKV_REQUIRE(k != nullptr && v != nullptr, "read_back: k and v must not be null");
  backend_->read_back(id, layer, k, v);
}

template <class T>
MemoryStats PackedKVCache<T>::memory_stats() const {
  const auto lock = read_lock("memory_stats");
  return backend_->memory_stats();
}

template <class T>
std::vector<std::uint8_t> PackedKVCache<T>::export_sequence(SeqId id, std::span<const int> layers) const {
  const auto lock = read_lock("export_sequence");
  check_sequence(id, "export_sequence");
  for (std::size_t i = 0; i < layers.size(); ++i) {
    check_layer(layers[i], "export_sequence");
    for (std::size_t j = 0; j < i; ++j) {
      PACKKV_REQUIRE(layers[j] != layers[i], fmt::format("export_sequence: layer {} is listed twice", layers[i]));
    }
  }
  return backend_->export_sequence(id, layers);
}

template <class T>
void PackedKVCache<T>::import_sequence(SeqId id, std::span<const std::uint8_t> image) {
  const auto lock = write_lock("import_sequence");
  backend_->import_sequence(id, image);
}

template <class T>
void PackedKVCache<T>::release_unused_memory() {
  const auto lock = write_lock("release_unused_memory");
  backend_->release_unused_memory();
}

template <class T>
void PackedKVCache<T>::set_stream(void* cuda_stream) {
  const auto lock = write_lock("set_stream");
  backend_->set_stream(cuda_stream);
}

template class PackedKVCache<float>;
template class PackedKVCache<fp16_t>;
template class PackedKVCache<bf16_t>;

}  // namespace packkv

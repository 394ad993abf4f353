// PackedKVCache<T>: the public face of the host core (cache_core.hpp).
#include "packkv/cache.hpp"

#include <fmt/format.h>

#include "core/cache_core.hpp"

namespace packkv {

template <class T>
PackedKVCache<T>::PackedKVCache(const CacheConfig& config) : config_(config) {
  validate(config_);
  core_ = std::make_unique<detail::CacheCore<T>>(config_);
}

template <class T>
PackedKVCache<T>::~PackedKVCache() = default;
template <class T>
PackedKVCache<T>::PackedKVCache(PackedKVCache&&) noexcept = default;
template <class T>
PackedKVCache<T>& PackedKVCache<T>::operator=(PackedKVCache&&) noexcept = default;

template <class T>
detail::CacheCore<T>& PackedKVCache<T>::core(const char* what) const {
  PACKKV_REQUIRE(core_, fmt::format("{}: the cache was moved from", what));
  return *core_;
}

template <class T>
void PackedKVCache<T>::add_sequence(SeqId id) {
  core("add_sequence").add_sequence(id);
}
template <class T>
void PackedKVCache<T>::remove_sequence(SeqId id) {
  core("remove_sequence").remove_sequence(id);
}
template <class T>
bool PackedKVCache<T>::contains(SeqId id) const {
  return core_ && core_->contains(id);
}
template <class T>
std::size_t PackedKVCache<T>::num_sequences() const {
  return core_ ? core_->num_sequences() : 0;
}
template <class T>
std::vector<SeqId> PackedKVCache<T>::sequence_ids() const {
  return core_ ? core_->sequence_ids() : std::vector<SeqId>{};
}
template <class T>
std::int64_t PackedKVCache<T>::length(SeqId id, int layer) const {
  return core("length").length(id, layer);
}
template <class T>
void PackedKVCache<T>::append(SeqId id, int layer, const T* k, const T* v, int n_tokens, void* cuda_stream) {
  core("append").append(id, layer, k, v, n_tokens, cuda_stream);
}
template <class T>
void PackedKVCache<T>::append_batch(std::span<const SeqId> ids, int layer, const T* k, const T* v,
                                    std::span<const int> n_tokens, void* cuda_stream) {
  core("append_batch").append_batch(ids, layer, k, v, n_tokens, cuda_stream);
}
template <class T>
std::size_t PackedKVCache<T>::worst_case_bytes(std::span<const SeqId> ids, std::span<const int> n_tokens,
                                               std::span<const int> new_sequence_tokens) const {
  return core("worst_case_bytes").worst_case_bytes(ids, n_tokens, new_sequence_tokens);
}
template <class T>
std::optional<std::string> PackedKVCache<T>::poll_device_error() {
  return core("poll_device_error").poll_device_error();
}
template <class T>
void PackedKVCache<T>::fork(SeqId parent, SeqId child) {
  core("fork").fork(parent, child);
}
template <class T>
void PackedKVCache<T>::truncate(SeqId id, std::int64_t new_length) {
  core("truncate").truncate(id, new_length);
}
template <class T>
void PackedKVCache<T>::attention(std::span<const SeqId> ids, int layer, const T* q, T* out, float scale,
                                 void* cuda_stream) const {
  core("attention").attention(ids, {}, layer, q, out, scale, nullptr, cuda_stream, "attention");
}
template <class T>
void PackedKVCache<T>::attention_causal(std::span<const SeqId> ids, std::span<const int> n_queries, int layer,
                                        const T* q, T* out, float scale, float* lse, void* cuda_stream) const {
  core("attention_causal").attention(ids, n_queries, layer, q, out, scale, lse, cuda_stream, "attention_causal");
}
template <class T>
void PackedKVCache<T>::scores(SeqId id, int layer, const T* q, float* scores, void* cuda_stream) const {
  core("scores").scores(std::span<const SeqId>(&id, 1), layer, q, scores, cuda_stream, "scores");
}
template <class T>
void PackedKVCache<T>::attn_v(SeqId id, int layer, const float* weights, float* out, void* cuda_stream) const {
  core("attn_v").attn_v(std::span<const SeqId>(&id, 1), layer, weights, out, cuda_stream, "attn_v");
}
template <class T>
void PackedKVCache<T>::scores_batch(std::span<const SeqId> ids, int layer, const T* q, float* scores,
                                    void* cuda_stream) const {
  core("scores_batch").scores(ids, layer, q, scores, cuda_stream, "scores_batch");
}
template <class T>
void PackedKVCache<T>::attn_v_batch(std::span<const SeqId> ids, int layer, const float* weights, float* out,
                                    void* cuda_stream) const {
  core("attn_v_batch").attn_v(ids, layer, weights, out, cuda_stream, "attn_v_batch");
}
template <class T>
void PackedKVCache<T>::read_back(SeqId id, int layer, float* k, float* v) const {
  core("read_back").read_back(id, layer, k, v);
}
template <class T>
MemoryStats PackedKVCache<T>::memory_stats() const {
  return core("memory_stats").memory_stats();
}
template <class T>
std::vector<std::uint8_t> PackedKVCache<T>::export_sequence(SeqId id, std::span<const int> layers) const {
  return core("export_sequence").export_sequence(id, layers);
}
template <class T>
void PackedKVCache<T>::import_sequence(SeqId id, std::span<const std::uint8_t> image) {
  core("import_sequence").import_sequence(id, image);
}
template <class T>
void PackedKVCache<T>::release_unused_memory() {
  core("release_unused_memory").release_unused_memory();
}
template <class T>
void PackedKVCache<T>::set_stream(void* cuda_stream) {
  core("set_stream").set_stream(cuda_stream);
}

template class PackedKVCache<float>;
template class PackedKVCache<fp16_t>;
template class PackedKVCache<bf16_t>;

}  // namespace packkv

// Stand-in for the CUDA backend when packkv is built without CUDA.
#include "core/backend.hpp"

namespace packkv::detail {

template <class T>
std::unique_ptr<Backend<T>> make_cuda_backend(const CacheConfig&, std::span<const CodecParams>) {
  throw_error("this build of packkv has no CUDA backend (configure with -DPACKKV_CUDA=ON and nvcc)");
}

template std::unique_ptr<Backend<float>> make_cuda_backend<float>(const CacheConfig&, std::span<const CodecParams>);
template std::unique_ptr<Backend<fp16_t>> make_cuda_backend<fp16_t>(const CacheConfig&, std::span<const CodecParams>);
template std::unique_ptr<Backend<bf16_t>> make_cuda_backend<bf16_t>(const CacheConfig&, std::span<const CodecParams>);

}  // namespace packkv::detail

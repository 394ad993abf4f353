// Stand-in for the CUDA backend when packkv is built without CUDA.
#include "packkv/backend.hpp"

namespace packkv::detail {

template <class T>
std::unique_ptr<CacheBackend<T>> make_cuda_backend(const CacheConfig&) {
  throw_error("this build of packkv has no CUDA backend (configure with -DPACKKV_CUDA=ON and nvcc)");
}

template std::unique_ptr<CacheBackend<float>> make_cuda_backend<float>(const CacheConfig&);
template std::unique_ptr<CacheBackend<fp16_t>> make_cuda_backend<fp16_t>(const CacheConfig&);
template std::unique_ptr<CacheBackend<bf16_t>> make_cuda_backend<bf16_t>(const CacheConfig&);

}  // namespace packkv::detail

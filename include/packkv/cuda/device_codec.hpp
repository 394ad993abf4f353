// The GPU block encoder on its own, for tools and tests: the same kernel the CUDA backend runs on
// append (one CTA per block and KV head), then a compaction in place, writing blocks that are byte
// for byte those of packkv::encode_block.
//
// Host header: it needs no CUDA headers. Defined only when packkv is built with CUDA (the
// PACKKV_WITH_CUDA macro is then set for every target linking packkv).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "packkv/codec.hpp"

namespace packkv::cuda {

/// True when a CUDA device can run packkv's kernels; otherwise false, with the reason in `why`.
bool device_available(std::string* why = nullptr);

/// Encodes `num_blocks` consecutive blocks on the device. `k` and `v` are device pointers to
/// [num_blocks * block_tokens][num_kv_heads][head_dim] values; block b is written to
/// out + b * out_stride (device memory, out_stride >= geometry.max_block_bytes()) and its size to
/// block_sizes[b] (device memory, may be null). Runs on `cuda_stream` and synchronises with it;
/// throws packkv::error on invalid values (as encode_block does) or a CUDA failure.
/// Greedy repacking is not available on the GPU.
template <class T>
void encode_blocks(const CodecParams& params, const T* k, const T* v, int num_blocks, std::uint8_t* out,
                   std::size_t out_stride, std::uint32_t* block_sizes, void* cuda_stream = nullptr);

}  // namespace packkv::cuda

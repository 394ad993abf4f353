// packkv::cuda::encode_blocks: the append path's encoder kernel, callable on its own, then a
// compaction in place (the append path compacts while it copies blocks to their pages).
#include "packkv/cuda/device_codec.hpp"

#include <cuda_runtime.h>
#include <fmt/format.h>

#include <cstring>

#include "cuda/cuda_support.hpp"
#include "launch.hpp"
#include "packkv/error.hpp"

namespace packkv::cuda {

bool device_available(std::string* why) { return packkv::detail::cuda::device_count(why) > 0; }

template <class T>
void encode_blocks(const CodecParams& params, const T* k, const T* v, int num_blocks, std::uint8_t* out,
                   std::size_t out_stride, std::uint32_t* block_sizes, void* cuda_stream) {
  using namespace packkv::detail::cuda;
  PACKKV_REQUIRE(params.repack != RepackMethod::greedy, "encode_blocks: greedy repacking is not available on the GPU");
  PACKKV_REQUIRE(num_blocks >= 0, fmt::format("encode_blocks: num_blocks must be >= 0, got {}", num_blocks));
  PACKKV_REQUIRE(out_stride >= params.geometry.max_block_bytes(),
                 fmt::format("encode_blocks: out_stride {} is below the largest block size {}", out_stride,
                             params.geometry.max_block_bytes()));
  // The encoder stores 4- and 16-byte words: blocks must start 16-byte aligned.
  PACKKV_REQUIRE(out_stride % 16 == 0 && reinterpret_cast<std::uintptr_t>(out) % 16 == 0,
                 fmt::format("encode_blocks: out and out_stride ({}) must be multiples of 16 bytes", out_stride));
  if (num_blocks == 0) return;
  auto stream = static_cast<cudaStream_t>(cuda_stream);
  DeviceBuffer error_buffer(sizeof(DeviceError) + sizeof(int), stream);
  check_cuda(cudaMemsetAsync(error_buffer.data(), 0, error_buffer.bytes(), stream), "cudaMemsetAsync");
  auto* claim = reinterpret_cast<int*>(static_cast<std::uint8_t*>(error_buffer.data()) + sizeof(DeviceError));

  EncodeParams<T> p{};
  p.geometry = params.geometry;
  p.k_max_code = params.k_max_code;
  p.v_max_code = params.v_max_code;
  p.median_repack = params.repack == RepackMethod::median ? 1 : 0;
  p.source.in_k = k;
  p.source.in_v = v;
  p.source.row_elems = params.geometry.num_heads * params.geometry.head_dim;
  p.first_position = 0;
  p.out_base = out;
  p.out_stride = out_stride;
  p.errors = ErrorContext{error_buffer.as<DeviceError>(), claim, 0, 0};
  check_cuda(launch_encode(p, num_blocks, stream), "encode kernel launch");
  // The encoder stages each block in its worst-case slot (kernels/launch.hpp): tighten them in place.
  check_cuda(launch_compact_blocks(CompactParams{params.geometry, out, out_stride, block_sizes, num_blocks}, stream),
             "compaction kernel launch");

  DeviceError error{};
  check_cuda(cudaMemcpyAsync(&error, error_buffer.data(), sizeof error, cudaMemcpyDeviceToHost, stream),
             "error record download");
  check_cuda(cudaStreamSynchronize(stream), "encode_blocks");
  if (error.ready != 0) throw_device_error(error, ErrorOrigin::encode_blocks);
}

template void encode_blocks<float>(const CodecParams&, const float*, const float*, int, std::uint8_t*, std::size_t,
                                   std::uint32_t*, void*);
template void encode_blocks<fp16_t>(const CodecParams&, const fp16_t*, const fp16_t*, int, std::uint8_t*, std::size_t,
                                    std::uint32_t*, void*);
template void encode_blocks<bf16_t>(const CodecParams&, const bf16_t*, const bf16_t*, int, std::uint8_t*, std::size_t,
                                    std::uint32_t*, void*);

}  // namespace packkv::cuda

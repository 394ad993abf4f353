// GPU block encoder: quantize, repack (arrival order or median) and bit-pack, byte for byte as
// codec.cpp does. One CTA encodes one block: it walks the KV heads in order because a head's
// section offsets depend on the sizes of the heads before it, and that keeps the block's layout
// tight without a second pass. Prefill launches one CTA per full block, all in one grid.
#include <cstdint>

#include "launch.hpp"
#include "packkv/cuda/packed_block.cuh"

namespace packkv::cuda::detail {

namespace {

using format::Params;
using format::SectionLayout;

__device__ void record_error(const ErrorContext& ctx, int kind, int tensor, std::int64_t source_token, int head,
                             int channel, float value, float value2) {
  DeviceError* e = ctx.error;
  if (e == nullptr) return;
  if (atomicCAS(ctx.claim, 0, 1) != 0) return;
  e->kind = kind;
  e->tensor = tensor;
  e->layer = ctx.layer;
  e->head = head;
  e->channel = channel;
  e->sequence = ctx.sequence;
  e->token = ctx.first_token + source_token;
  e->value = value;
  e->value2 = value2;
  __threadfence_system();  // the fields must be visible to the host before the flag
  *static_cast<volatile int*>(&e->ready) = 1;
  __threadfence_system();
}

__device__ __forceinline__ bool storable(float x) { return isfinite(x) && fabsf(x) <= kFp16Max; }

struct EncoderShared {
  std::uint8_t* k_codes;  // [block_tokens][head_dim], arrival order
  std::uint8_t* v_codes;
  Params* k_params;  // per token, or per channel
  Params* v_params;
  std::uint8_t* keys;
  std::uint8_t* order;  // packed position -> arrival position
  std::uint32_t* scan;
  std::uint32_t* scalar;  // one broadcast word
  std::uint8_t* pack_min;    // [head_dim] of the round being written
  std::uint8_t* pack_width;  // [head_dim]
};

__host__ __device__ constexpr std::size_t align16(std::size_t n) { return (n + 15) / 16 * 16; }

__host__ __device__ std::size_t encoder_shared_layout(const format::BlockGeometry& g, unsigned char* base,
                                                      EncoderShared* out) {
  const std::size_t codes = align16(static_cast<std::size_t>(g.block_tokens) * g.head_dim);
  const std::size_t params =
      align16(sizeof(Params) * static_cast<std::size_t>(g.block_tokens > g.head_dim ? g.block_tokens : g.head_dim));
  const std::size_t tokens = align16(static_cast<std::size_t>(g.block_tokens));
  std::size_t at = 0;
  auto take = [&](std::size_t bytes) {
    unsigned char* p = base + at;
    at += bytes;
    return p;
  };
  unsigned char* k_codes = take(codes);
  unsigned char* v_codes = take(codes);
  unsigned char* k_params = take(params);
  unsigned char* v_params = take(params);
  unsigned char* keys = take(tokens);
  unsigned char* order = take(tokens);
  unsigned char* scan = take(align16(sizeof(std::uint32_t) * (kScanScratchWords + 1)));
  unsigned char* pack_min = take(align16(static_cast<std::size_t>(g.head_dim)));
  unsigned char* pack_width = take(align16(static_cast<std::size_t>(g.head_dim)));
  if (out != nullptr) {
    out->k_codes = k_codes;
    out->v_codes = v_codes;
    out->k_params = reinterpret_cast<Params*>(k_params);
    out->v_params = reinterpret_cast<Params*>(v_params);
    out->keys = keys;
    out->order = order;
    out->scan = reinterpret_cast<std::uint32_t*>(scan);
    out->scalar = reinterpret_cast<std::uint32_t*>(scan) + kScanScratchWords;
    out->pack_min = pack_min;
    out->pack_width = pack_width;
  }
  return at;
}

// The CPU keeps the first of equal extremes (std::min / std::max), which matters only for the sign
// of a zero: -0 and +0 give different fp16 bits for the stored min (and for the step of an
// all-zero token). Returns the value, in channel order, that compares equal to `extreme` first.
__device__ float first_equal_in_channel_order(const float (&values)[8], int dim, float extreme) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const unsigned hits = __ballot_sync(kFullMask, lane + 32 * k < dim && values[k] == extreme);
    if (hits != 0) return __shfl_sync(kFullMask, values[k], __ffs(hits) - 1);
  }
  return extreme;
}

// One warp per token: the token's values stay in registers (head_dim <= 256 = 8 per lane).
template <class T>
__device__ void quantize_per_token(const EncodeParams<T>& p, bool is_v, std::int64_t first_token, int head,
                                   int max_code, std::uint8_t* codes, Params* params) {
  const int dim = p.geometry.head_dim, tokens = p.geometry.block_tokens;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int t = warp; t < tokens; t += kWarps) {
    const T* row = p.source.row(is_v, first_token + t) + static_cast<std::size_t>(head) * dim;
    float values[8];
    float lo = INFINITY, hi = -INFINITY;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int c = lane + 32 * k;
      values[k] = 0.0f;
      if (c < dim) {
        const float x = load_as_float(row + c);
        values[k] = x;
        if (!storable(x)) record_error(p.errors, kBadValue, is_v ? 1 : 0, first_token + t, head, c, x, 0.0f);
        lo = fminf(lo, x);
        hi = fmaxf(hi, x);
      }
    }
    lo = first_equal_in_channel_order(values, dim, warp_min(lo));
    hi = first_equal_in_channel_order(values, dim, warp_max(hi));
    const format::Quantizer q = format::make_quantizer(lo, hi, max_code);
    if (!q.ok && lane == 0 && storable(lo) && storable(hi)) {
      record_error(p.errors, kRangeTooWide, is_v ? 1 : 0, first_token + t, head, -1, lo, hi);
    }
    if (lane == 0) params[t] = q.stored;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int c = lane + 32 * k;
      if (c < dim) codes[t * dim + c] = format::quantize(values[k], q, max_code);
    }
  }
}

// KIVI-style K: one thread per channel walks the block's tokens.
template <class T>
__device__ void quantize_k_per_channel(const EncodeParams<T>& p, std::int64_t first_token, int head,
                                       std::uint8_t* codes, Params* params) {
  const int dim = p.geometry.head_dim, tokens = p.geometry.block_tokens;
  for (int c = threadIdx.x; c < dim; c += kThreads) {
    // Compared as std::min / std::max do, so a zero extreme keeps the sign of its first occurrence.
    float lo = load_as_float(p.source.row(false, first_token) + static_cast<std::size_t>(head) * dim + c), hi = lo;
    for (int t = 0; t < tokens; ++t) {
      const float x = load_as_float(p.source.row(false, first_token + t) + static_cast<std::size_t>(head) * dim + c);
      if (!storable(x)) record_error(p.errors, kBadValue, 0, first_token + t, head, c, x, 0.0f);
      lo = x < lo ? x : lo;
      hi = hi < x ? x : hi;
    }
    const format::Quantizer q = format::make_quantizer(lo, hi, p.k_max_code);
    if (!q.ok && storable(lo) && storable(hi)) {
      record_error(p.errors, kRangeTooWide, 0, first_token, head, c, lo, hi);
    }
    params[c] = q.stored;
    for (int t = 0; t < tokens; ++t) {
      const float x = load_as_float(p.source.row(false, first_token + t) + static_cast<std::size_t>(head) * dim + c);
      codes[t * dim + c] = format::quantize(x, q, p.k_max_code);
    }
  }
}

// Median order: key = the lower median of a token's V codes (the smallest code whose cumulative
// count exceeds (dim - 1) / 2, found by bisection), then a stable counting placement.
__device__ void order_by_median(const std::uint8_t* v_codes, int tokens, int dim, int max_code, std::uint8_t* keys,
                                std::uint8_t* order) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int rank = (dim - 1) / 2;
  for (int t = warp; t < tokens; t += kWarps) {
    const std::uint8_t* row = v_codes + t * dim;
    int lo = 0, hi = max_code;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      int count = 0;
      for (int c = lane; c < dim; c += 32) count += row[c] <= mid ? 1 : 0;
      count = warp_sum_int(count);
      if (count > rank) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    if (lane == 0) keys[t] = static_cast<std::uint8_t>(lo);
  }
  __syncthreads();
  for (int t = threadIdx.x; t < tokens; t += kThreads) {
    const int key = keys[t];
    int position = 0;
    for (int u = 0; u < tokens; ++u) {
      const int other = keys[u];
      position += (other < key || (other == key && u < t)) ? 1 : 0;
    }
    order[position] = static_cast<std::uint8_t>(t);
  }
}

__device__ void zero_bytes(std::uint8_t* out, std::uint32_t begin, std::uint32_t end) {
  for (std::uint32_t i = begin + threadIdx.x; i < end; i += kThreads) out[i] = 0;
}

// Writes one section at `out`, round by round (one thread per channel); every thread returns its
// size. A round is stored plain unless frame of reference is strictly smaller, as codec.cpp does.
__device__ std::uint32_t write_section(const SectionLayout& layout, const std::uint8_t* codes, const Params* params,
                                       bool per_token_params, const std::uint8_t* order, const EncoderShared& s,
                                       std::uint8_t* out) {
  const std::uint32_t dim = layout.head_dim, bits = layout.bits;
  auto* out_params = reinterpret_cast<Params*>(out);
  for (std::uint32_t i = threadIdx.x; i < layout.param_count; i += kThreads) {
    out_params[i] = per_token_params ? params[order[i]] : params[i];
  }
  std::uint8_t* rounds = out + layout.rounds_offset;
  const std::uint32_t channel = threadIdx.x;
  const bool active = channel < dim;
  std::uint32_t offset = 0;  // the same in every thread
  for (std::uint32_t r = 0; r < layout.rounds; ++r) {
    std::uint8_t values[format::kPackTokens];
    std::uint32_t lo = 255, hi = 0, width = 0;
    if (active) {
      const std::uint8_t* tokens = order + r * format::kPackTokens;
#pragma unroll
      for (int i = 0; i < format::kPackTokens; ++i) {
        const std::uint32_t code = codes[tokens[i] * dim + channel];
        values[i] = static_cast<std::uint8_t>(code);
        lo = code < lo ? code : lo;
        hi = code > hi ? code : hi;
      }
      width = format::width_for_range(hi - lo);
    }
    std::uint32_t width_sum = 0;
    const std::uint32_t before = block_exclusive_scan(width, s.scan, width_sum);
    const bool plain = format::use_plain_round(layout, width_sum);
    std::uint8_t* round = rounds + offset;
    if (active) {
      if (plain) {
        format::pack16(values, bits, round + 2 * bits * channel);
      } else {
#pragma unroll
        for (int i = 0; i < format::kPackTokens; ++i) values[i] = static_cast<std::uint8_t>(values[i] - lo);
        format::pack16(values, width, round + layout.descriptor_bytes + 2 * before);
        s.pack_min[channel] = static_cast<std::uint8_t>(lo);
        s.pack_width[channel] = static_cast<std::uint8_t>(width);
      }
    }
    __syncthreads();
    if (!plain) {
      // Widths as nibbles; minimums as one bit stream, 8 channels filling exactly `bits` bytes.
      if (channel < dim / 2) {
        round[channel] = static_cast<std::uint8_t>(s.pack_width[2 * channel] | (s.pack_width[2 * channel + 1] << 4));
      }
      if (channel < dim / 8) {
        std::uint64_t stream = 0;
        for (int i = 0; i < 8; ++i) stream |= static_cast<std::uint64_t>(s.pack_min[8 * channel + i]) << (i * bits);
        for (std::uint32_t b = 0; b < bits; ++b) {
          round[layout.widths_bytes + channel * bits + b] = static_cast<std::uint8_t>(stream >> (8 * b));
        }
      }
    }
    offset += plain ? layout.plain_round_bytes : format::for_round_bytes(layout, width_sum);
    if (threadIdx.x == 0) format::store_u32(out + layout.round_end_offset + 4 * r, offset);
    __syncthreads();  // the staging arrays are rewritten by the next round
  }
  const std::uint32_t size = layout.section_bytes(offset);
  zero_bytes(out, layout.rounds_offset + offset, size);
  return size;
}

template <class T>
__global__ void __launch_bounds__(kThreads) encode_kernel(const EncodeParams<T> p) {
  PACKKV_DYNAMIC_SHARED(shared_bytes);
  EncoderShared s;
  encoder_shared_layout(p.geometry, shared_bytes, &s);

  const format::BlockGeometry& g = p.geometry;
  const int block = blockIdx.x;
  std::uint8_t* out = p.out_table != nullptr ? p.out_table[block] : p.out_base + block * p.out_stride;
  const std::int64_t first_token = static_cast<std::int64_t>(block) * g.block_tokens;
  const SectionLayout k_layout = g.k_layout(), v_layout = g.v_layout();

  zero_bytes(out, 0, g.sections_offset());
  __syncthreads();

  std::uint32_t offset = g.sections_offset();
  for (int head = 0; head < g.num_heads; ++head) {
    quantize_per_token(p, true, first_token, head, p.v_max_code, s.v_codes, s.v_params);
    if (g.k_per_channel) {
      quantize_k_per_channel(p, first_token, head, s.k_codes, s.k_params);
    } else {
      quantize_per_token(p, false, first_token, head, p.k_max_code, s.k_codes, s.k_params);
    }
    __syncthreads();
    if (p.median_repack) {
      order_by_median(s.v_codes, g.block_tokens, g.head_dim, p.v_max_code, s.keys, s.order);
    } else {
      for (int t = threadIdx.x; t < g.block_tokens; t += kThreads) s.order[t] = static_cast<std::uint8_t>(t);
    }
    __syncthreads();
    if (g.permuted) {
      for (int t = threadIdx.x; t < g.block_tokens; t += kThreads) {
        out[g.permutation_offset() + head * g.block_tokens + t] = s.order[t];
      }
    }
    format::HeadEntry entry{};
    entry.k_offset = offset;
    offset += write_section(k_layout, s.k_codes, s.k_params, !g.k_per_channel, s.order, s, out + offset);
    entry.v_offset = offset;
    offset += write_section(v_layout, s.v_codes, s.v_params, true, s.order, s, out + offset);
    if (threadIdx.x == 0) reinterpret_cast<format::HeadEntry*>(out + g.directory_offset())[head] = entry;
    __syncthreads();  // the code tiles are rewritten by the next head
  }
  zero_bytes(out, offset, offset + format::kTrailingSlack);
  if (threadIdx.x == 0) {
    format::BlockHeader header{};
    header.block_bytes = offset + format::kTrailingSlack;
    header.block_tokens = static_cast<std::uint16_t>(g.block_tokens);
    header.head_dim = static_cast<std::uint16_t>(g.head_dim);
    header.num_heads = static_cast<std::uint16_t>(g.num_heads);
    header.version = format::kVersion;
    header.flags = g.flags();
    header.k_bits = static_cast<std::uint8_t>(g.k_bits);
    header.v_bits = static_cast<std::uint8_t>(g.v_bits);
    *reinterpret_cast<format::BlockHeader*>(out) = header;
    if (p.block_sizes != nullptr) p.block_sizes[block] = header.block_bytes;
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) tail_write_kernel(const TailWriteParams<T> p) {
  const int row_elems = p.source.row_elems;
  const std::int64_t count = (p.end - p.first) * row_elems;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(kThreads) + threadIdx.x; i < count;
       i += static_cast<std::int64_t>(gridDim.x) * kThreads) {
    const std::int64_t token = p.first + i / row_elems;
    const int element = static_cast<int>(i % row_elems);
    const std::int64_t slot = (p.ring_origin + token) % p.source.tail_cap;
    const T k = p.source.row(false, token)[element];
    const T v = p.source.row(true, token)[element];
    const float kf = load_as_float(&k), vf = load_as_float(&v);
    if (!storable(kf)) {
      record_error(p.errors, kBadValue, 0, token, element / p.head_dim, element % p.head_dim, kf, 0.0f);
    }
    if (!storable(vf)) {
      record_error(p.errors, kBadValue, 1, token, element / p.head_dim, element % p.head_dim, vf, 0.0f);
    }
    p.ring_k[slot * row_elems + element] = k;
    p.ring_v[slot * row_elems + element] = v;
  }
}

// Strict mode: one warp per (token, head, tensor) row, the same checks the encoder makes.
template <class T>
__global__ void __launch_bounds__(kThreads)
    validate_kernel(const T* k, const T* v, int n_tokens, int num_heads, int head_dim, int k_max_code, int v_max_code,
                    int k_per_token, ErrorContext errors) {
  const int lane = threadIdx.x & 31;
  const std::int64_t rows = static_cast<std::int64_t>(n_tokens) * num_heads * 2;
  const std::int64_t warps = static_cast<std::int64_t>(gridDim.x) * kWarps;
  for (std::int64_t r = blockIdx.x * static_cast<std::int64_t>(kWarps) + (threadIdx.x >> 5); r < rows; r += warps) {
    const int is_v = static_cast<int>(r & 1);
    const std::int64_t token = r / 2 / num_heads;
    const int head = static_cast<int>(r / 2 % num_heads);
    const T* row = (is_v ? v : k) + (token * num_heads + head) * head_dim;
    float lo = INFINITY, hi = -INFINITY;
    for (int c = lane; c < head_dim; c += 32) {
      const float x = load_as_float(row + c);
      if (!storable(x)) record_error(errors, kBadValue, is_v, token, head, c, x, 0.0f);
      lo = fminf(lo, x);
      hi = fmaxf(hi, x);
    }
    lo = warp_min(lo);
    hi = warp_max(hi);
    if (lane == 0 && (is_v || k_per_token) && storable(lo) && storable(hi) &&
        !format::make_quantizer(lo, hi, is_v ? v_max_code : k_max_code).ok) {
      record_error(errors, kRangeTooWide, is_v, token, head, -1, lo, hi);
    }
  }
}

// Placement is a sequential walk (a block that does not fit starts the next page), but its inputs
// and outputs need not be: one warp loads 32 sizes at once, lane 0 walks them in shared memory,
// and every lane writes its block's table entry. A prefill of thousands of blocks then costs a
// few global round trips per 32 blocks instead of per block.
__global__ void place_kernel(const PlaceParams p) {
  __shared__ std::uint32_t sizes[32], pages[32], offsets[32];
  __shared__ PlacementCursor cursor;
  const int lane = threadIdx.x;
  if (lane == 0) cursor = *p.cursor;
  for (int first = 0; first < p.num_blocks; first += 32) {
    const int count = p.num_blocks - first < 32 ? p.num_blocks - first : 32;
    if (lane < count) sizes[lane] = p.sizes[first + lane];
    __syncwarp();
    if (lane == 0) {
      for (int i = 0; i < count; ++i) {
        if (cursor.offset + sizes[i] > p.page_bytes) {
          ++cursor.page;
          cursor.offset = 0;
        }
        pages[i] = cursor.page;
        offsets[i] = cursor.offset;
        cursor.offset += sizes[i];
      }
    }
    __syncwarp();
    if (lane < count) p.table[first + lane] = p.pages[pages[lane]] + offsets[lane];
    __syncwarp();
  }
  if (lane == 0) {
    *p.cursor = cursor;
    *reinterpret_cast<volatile unsigned long long*>(p.progress) = pack_progress(p.launch, cursor.page, cursor.offset);
    __threadfence_system();
  }
}

// Sizes and offsets are multiples of 16 and staging slots and pages 256-byte aligned: 16-byte copies.
__global__ void __launch_bounds__(kThreads) copy_placed_kernel(const PlaceParams p) {
  const int block = blockIdx.x;
  const auto* from = reinterpret_cast<const uint4*>(p.staging + block * p.staging_stride);
  auto* to = reinterpret_cast<uint4*>(p.table[block]);
  const std::uint32_t words = p.sizes[block] / 16u;
  for (std::uint32_t i = threadIdx.x; i < words; i += kThreads) to[i] = from[i];
}

__global__ void write_table_kernel(std::uint8_t** table, TableEntries entries) {
  if (static_cast<int>(threadIdx.x) < entries.count) table[threadIdx.x] = entries.blocks[threadIdx.x];
}

int grid_for(std::int64_t work_items) {
  const std::int64_t blocks = (work_items + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > 4096 ? 4096 : blocks));
}

}  // namespace

std::size_t encode_shared_bytes(const format::BlockGeometry& g) { return encoder_shared_layout(g, nullptr, nullptr); }

template <class T>
cudaError_t launch_encode(const EncodeParams<T>& params, int num_blocks, cudaStream_t stream) {
  if (num_blocks <= 0) return cudaSuccess;
  const std::size_t shared = encode_shared_bytes(params.geometry);
  cudaError_t status =
      cudaFuncSetAttribute(encode_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared));
  if (status != cudaSuccess) return status;
  PACKKV_LAUNCH(encode_kernel<T>, num_blocks, kThreads, shared, stream, params);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_tail_write(const TailWriteParams<T>& params, cudaStream_t stream) {
  if (params.end <= params.first) return cudaSuccess;
  const int grid = grid_for((params.end - params.first) * params.source.row_elems);
  PACKKV_LAUNCH(tail_write_kernel<T>, grid, kThreads, 0, stream, params);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_validate(const T* k, const T* v, int n_tokens, int num_heads, int head_dim, int k_max_code,
                            int v_max_code, bool k_per_token, ErrorContext errors, cudaStream_t stream) {
  const std::int64_t rows = static_cast<std::int64_t>(n_tokens) * num_heads * 2;
  PACKKV_LAUNCH(validate_kernel<T>, grid_for(rows * 32), kThreads, 0, stream, k, v, n_tokens, num_heads, head_dim,
                k_max_code, v_max_code, k_per_token ? 1 : 0, errors);
  return cudaGetLastError();
}

cudaError_t launch_place_blocks(const PlaceParams& params, cudaStream_t stream) {
  if (params.num_blocks <= 0) return cudaSuccess;
  PACKKV_LAUNCH(place_kernel, 1, 32, 0, stream, params);
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  PACKKV_LAUNCH(copy_placed_kernel, params.num_blocks, kThreads, 0, stream, params);
  return cudaGetLastError();
}

cudaError_t launch_write_table(std::uint8_t** table, TableEntries entries, cudaStream_t stream) {
  if (entries.count <= 0) return cudaSuccess;
  PACKKV_LAUNCH(write_table_kernel, 1, kInlineTableEntries, 0, stream, table, entries);
  return cudaGetLastError();
}

#define PACKKV_INSTANTIATE_ENCODE(T)                                                                       \
  template cudaError_t launch_encode<T>(const EncodeParams<T>&, int, cudaStream_t);                        \
  template cudaError_t launch_tail_write<T>(const TailWriteParams<T>&, cudaStream_t);                      \
  template cudaError_t launch_validate<T>(const T*, const T*, int, int, int, int, int, bool, ErrorContext, \
                                          cudaStream_t);
PACKKV_INSTANTIATE_ENCODE(float)
PACKKV_INSTANTIATE_ENCODE(fp16_t)
PACKKV_INSTANTIATE_ENCODE(bf16_t)
#undef PACKKV_INSTANTIATE_ENCODE

}  // namespace packkv::cuda::detail

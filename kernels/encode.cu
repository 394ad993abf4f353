// GPU block encoder: quantize, repack (arrival order or median) and bit-pack with the format's
// primitives (format/quant.hpp, format/rounds.hpp), producing the CPU encoder's bytes. One CTA
// encodes one (block, KV head), so a block's heads are encoded side by side on as many SMs. A
// head's place in the tight block depends on the sizes of the heads before it, which no CTA knows
// while it encodes: blocks are staged (kernels/launch.hpp, staged_head_offset), each head at its
// worst-case offset with its section sizes in its directory entry, and compacted by the copy that
// moves them to their place anyway (compact_block). A prefill launches one CTA per (full block,
// head), all in one grid.
#include <cstdint>

#include "detail/packed_block.cuh"
#include "launch.hpp"

namespace packkv::detail::cuda {

namespace {

using format::QuantParams;
using format::SectionLayout;
using format::Side;

__device__ void record_error(const ErrorContext& ctx, int kind, Side side, std::int64_t position, int head,
                             int channel, float value, float value2) {
  DeviceError* e = ctx.error;
  if (e == nullptr) return;
  if (atomicCAS(ctx.claim, 0, 1) != 0) return;
  e->kind = kind;
  e->tensor = side == Side::k ? 0 : 1;
  e->layer = ctx.layer;
  e->head = head;
  e->channel = channel;
  e->sequence = ctx.sequence;
  e->token = position;
  e->value = value;
  e->value2 = value2;
  __threadfence_system();  // the fields must be visible to the host before the flag
  *static_cast<volatile int*>(&e->ready) = 1;
  __threadfence_system();
}

struct EncoderShared {
  std::uint8_t* k_codes;  // [block_tokens][head_dim], arrival order
  std::uint8_t* v_codes;
  std::uint8_t* k_params;  // parameter areas (format/block.hpp), groups in arrival order
  std::uint8_t* v_params;
  float* lo;               // [groups]: the ranges of one side's groups (compact parameters)
  float* hi;
  double* need;            // [kWarps]: the warps' largest needs, then the section's step exponent
  std::uint8_t* keys;
  std::uint8_t* order;  // stored position -> arrival position
  std::uint32_t* scan;
  std::uint8_t* pack_min;    // [head_dim] of the round being written
  std::uint8_t* pack_width;  // [head_dim]
};

__host__ __device__ std::size_t encoder_shared_layout(const format::BlockGeometry& g, unsigned char* base,
                                                      EncoderShared* out) {
  const std::size_t codes = static_cast<std::size_t>(g.block_tokens) * g.head_dim;
  const std::size_t groups = static_cast<std::size_t>(g.block_tokens > g.head_dim ? g.block_tokens : g.head_dim);
  SharedCarver carve{base};
  EncoderShared s{};
  s.k_codes = carve.take(codes);
  s.v_codes = carve.take(codes);
  // 4 B per group, or a 4-B prefix and 2 B per group (4-byte aligned either way).
  s.k_params = reinterpret_cast<std::uint8_t*>(carve.take_array<std::uint32_t>(groups + 1));
  s.v_params = reinterpret_cast<std::uint8_t*>(carve.take_array<std::uint32_t>(groups + 1));
  if (g.compact_params) {
    s.lo = carve.take_array<float>(groups);
    s.hi = carve.take_array<float>(groups);
    s.need = carve.take_array<double>(kWarps);
  }
  s.keys = carve.take(static_cast<std::size_t>(g.block_tokens));
  s.order = carve.take(static_cast<std::size_t>(g.block_tokens));
  s.scan = carve.take_array<std::uint32_t>(kScanScratchWords);
  s.pack_min = carve.take(static_cast<std::size_t>(g.head_dim));
  s.pack_width = carve.take(static_cast<std::size_t>(g.head_dim));
  if (out != nullptr) *out = s;
  return carve.used;
}

/// The largest value a cache of this geometry stores: 65504, or 16384 with compact parameters.
__device__ __forceinline__ float value_limit(const format::BlockGeometry& g) {
  return g.compact_params ? format::kCompactMaxAbs : kFp16Max;
}
__device__ __forceinline__ bool storable_in(float x, float limit) { return x >= -limit && x <= limit; }

/// The step exponent of a section with compact parameters, from its groups' ranges in s.lo / s.hi
/// (every thread calls it): the largest need is a block-wide maximum, which no order of reduction
/// changes, so the exponent is the CPU encoder's. Writes the section's prefix and returns E.
__device__ int compact_section_exponent(const EncoderShared& s, int groups, int max_code, int code_limit,
                                        std::uint8_t* area) {
  double need = 0.0;
  for (int i = threadIdx.x; i < groups; i += kThreads) {
    const double n = format::compact_need(s.lo[i], s.hi[i], max_code, code_limit);
    need = n > need ? n : need;
  }
  for (int d = 16; d > 0; d >>= 1) {
    const double other = __shfl_xor_sync(kFullMask, need, d);
    need = other > need ? other : need;
  }
  if ((threadIdx.x & 31) == 0) s.need[threadIdx.x >> 5] = need;
  __syncthreads();
  if (threadIdx.x == 0) {
    double largest = 0.0;
    for (int w = 0; w < kWarps; ++w) largest = s.need[w] > largest ? s.need[w] : largest;
    const int exponent = format::compact_exponent(largest);
    area[0] = static_cast<std::uint8_t>(exponent + format::kCompactExponentBias);
    area[1] = area[2] = area[3] = 0;
  }
  __syncthreads();
  return static_cast<int>(area[0]) - format::kCompactExponentBias;
}

/// Group i's compact quantizer; lane 0 (or the calling thread) writes its two bytes.
__device__ format::Quantizer compact_group(const EncoderShared& s, int i, int max_code, int code_limit, int exponent,
                                           std::uint8_t* area, bool write) {
  const format::Quantizer q = format::make_compact_quantizer(s.lo[i], s.hi[i], max_code, code_limit, exponent);
  if (write) {
    area[4 + 2 * i] = q.compact.step_code;
    area[5 + 2 * i] = static_cast<std::uint8_t>(q.compact.zero);
  }
  return q;
}

// One warp per token: the token's values stay in registers (head_dim <= 256 = 8 per lane). The
// range is reduced over canonical values (format::canonical), so fminf/fmaxf give the CPU's bits.
// With compact parameters the section's exponent needs every token's range first: the ranges go
// to shared memory, and a second pass reads the values again and quantizes them.
template <class T>
__device__ void quantize_per_token(const EncodeParams<T>& p, Side side, std::int64_t first, int head, int max_code,
                                   std::uint8_t* codes, std::uint8_t* area, const EncoderShared& s) {
  const int dim = p.geometry.head_dim, tokens = p.geometry.block_tokens;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (p.geometry.compact_params) {
    const float limit = value_limit(p.geometry);
    const int code_limit = format::code_limit(p.geometry.layout(side), max_code);
    for (int t = warp; t < tokens; t += kWarps) {
      const T* row = p.source.row(side, first + t) + static_cast<std::size_t>(head) * dim;
      format::Range range;
      for (int c = lane; c < dim; c += 32) {
        const float x = load_as_float(row + c);
        if (!storable_in(x, limit)) record_error(p.errors, kBadValue, side, first + t, head, c, x, limit);
        range.extend(x);
      }
      range.lo = warp_min(range.lo);
      range.hi = warp_max(range.hi);
      if (lane == 0) {
        s.lo[t] = range.lo;
        s.hi[t] = range.hi;
      }
    }
    __syncthreads();
    const int exponent = compact_section_exponent(s, tokens, max_code, code_limit, area);
    for (int t = warp; t < tokens; t += kWarps) {
      const T* row = p.source.row(side, first + t) + static_cast<std::size_t>(head) * dim;
      const format::Quantizer q = compact_group(s, t, max_code, code_limit, exponent, area, lane == 0);
      for (int c = lane; c < dim; c += 32) codes[t * dim + c] = format::quantize(load_as_float(row + c), q, code_limit);
    }
    __syncthreads();  // the ranges are rewritten by the other side
    return;
  }
  auto* params = reinterpret_cast<QuantParams*>(area);
  for (int t = warp; t < tokens; t += kWarps) {
    const T* row = p.source.row(side, first + t) + static_cast<std::size_t>(head) * dim;
    float values[8];
    format::Range range;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int c = lane + 32 * k;
      values[k] = 0.0f;
      if (c < dim) {
        const float x = load_as_float(row + c);
        values[k] = x;
        if (!format::storable(x)) record_error(p.errors, kBadValue, side, first + t, head, c, x, kFp16Max);
        range.extend(x);
      }
    }
    range.lo = warp_min(range.lo);
    range.hi = warp_max(range.hi);
    const format::Quantizer q = format::make_quantizer(range.lo, range.hi, max_code);
    if (!q.ok && lane == 0 && format::storable(range.lo) && format::storable(range.hi)) {
      record_error(p.errors, kRangeTooWide, side, first + t, head, -1, range.lo, range.hi);
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
__device__ void quantize_k_per_channel(const EncodeParams<T>& p, std::int64_t first, int head, std::uint8_t* codes,
                                       std::uint8_t* area, const EncoderShared& s) {
  const int dim = p.geometry.head_dim, tokens = p.geometry.block_tokens;
  if (p.geometry.compact_params) {
    const float limit = value_limit(p.geometry);
    const int code_limit = format::code_limit(p.geometry.k_layout(), p.k_max_code);
    for (int c = threadIdx.x; c < dim; c += kThreads) {
      format::Range range;
      for (int t = 0; t < tokens; ++t) {
        const float x = load_as_float(p.source.row(Side::k, first + t) + static_cast<std::size_t>(head) * dim + c);
        if (!storable_in(x, limit)) record_error(p.errors, kBadValue, Side::k, first + t, head, c, x, limit);
        range.extend(x);
      }
      s.lo[c] = range.lo;
      s.hi[c] = range.hi;
    }
    __syncthreads();
    const int exponent = compact_section_exponent(s, dim, p.k_max_code, code_limit, area);
    for (int c = threadIdx.x; c < dim; c += kThreads) {
      const format::Quantizer q = compact_group(s, c, p.k_max_code, code_limit, exponent, area, true);
      for (int t = 0; t < tokens; ++t) {
        const float x = load_as_float(p.source.row(Side::k, first + t) + static_cast<std::size_t>(head) * dim + c);
        codes[t * dim + c] = format::quantize(x, q, code_limit);
      }
    }
    return;
  }
  auto* params = reinterpret_cast<QuantParams*>(area);
  for (int c = threadIdx.x; c < dim; c += kThreads) {
    format::Range range;
    for (int t = 0; t < tokens; ++t) {
      const float x = load_as_float(p.source.row(Side::k, first + t) + static_cast<std::size_t>(head) * dim + c);
      if (!format::storable(x)) record_error(p.errors, kBadValue, Side::k, first + t, head, c, x, kFp16Max);
      range.extend(x);
    }
    const format::Quantizer q = format::make_quantizer(range.lo, range.hi, p.k_max_code);
    if (!q.ok && format::storable(range.lo) && format::storable(range.hi)) {
      record_error(p.errors, kRangeTooWide, Side::k, first, head, c, range.lo, range.hi);
    }
    params[c] = q.stored;
    for (int t = 0; t < tokens; ++t) {
      const float x = load_as_float(p.source.row(Side::k, first + t) + static_cast<std::size_t>(head) * dim + c);
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
// size. A round is stored plain unless frame of reference is strictly smaller.
__device__ std::uint32_t write_section(const SectionLayout& layout, const std::uint8_t* codes, const std::uint8_t* area,
                                       bool per_token_params, const std::uint8_t* order, const EncoderShared& s,
                                       std::uint8_t* out) {
  const std::uint32_t dim = layout.head_dim, bits = layout.bits;
  if (layout.compact != 0u) {
    if (threadIdx.x < layout.params_offset) out[threadIdx.x] = area[threadIdx.x];  // the prefix
    auto* out_params = reinterpret_cast<std::uint16_t*>(out + layout.params_offset);
    const auto* params = reinterpret_cast<const std::uint16_t*>(area + layout.params_offset);
    for (std::uint32_t i = threadIdx.x; i < layout.param_count; i += kThreads) {
      out_params[i] = per_token_params ? params[order[i]] : params[i];
    }
  } else {
    auto* out_params = reinterpret_cast<QuantParams*>(out);
    const auto* params = reinterpret_cast<const QuantParams*>(area);
    for (std::uint32_t i = threadIdx.x; i < layout.param_count; i += kThreads) {
      out_params[i] = per_token_params ? params[order[i]] : params[i];
    }
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
    // Descriptors: one thread per group of 8 channels writes its widths and minimums (pack8).
    if (!plain && channel < dim / 8) {
      format::pack8(s.pack_width + 8 * channel, 4, round + 4 * channel);
      format::pack8(s.pack_min + 8 * channel, bits, round + layout.widths_bytes + channel * bits);
    }
    offset += format::round_bytes(layout, width_sum);
    if (threadIdx.x == 0) format::set_round_end(out, layout, r, offset);
    __syncthreads();  // the staging arrays are rewritten by the next round
  }
  const std::uint32_t size = layout.section_bytes(offset);
  zero_bytes(out, layout.rounds_offset + offset, size);
  return size;
}

// One (block, head): the token order at its place, the K and V sections at the head's staged
// offsets, their sizes in the head's directory entry.
template <class T>
__device__ void encode_head(const EncodeParams<T>& p, int block, int head, unsigned char* shared_bytes) {
  EncoderShared s;
  encoder_shared_layout(p.geometry, shared_bytes, &s);

  const format::BlockGeometry& g = p.geometry;
  std::uint8_t* out = p.out_base + block * p.out_stride;
  const std::int64_t first = p.first_position + static_cast<std::int64_t>(block) * g.block_tokens;

  quantize_per_token(p, Side::v, first, head, p.v_max_code, s.v_codes, s.v_params, s);
  if (g.k_per_channel) {
    quantize_k_per_channel(p, first, head, s.k_codes, s.k_params, s);
  } else {
    quantize_per_token(p, Side::k, first, head, p.k_max_code, s.k_codes, s.k_params, s);
  }
  __syncthreads();
  if (p.median_repack) {
    // The bisection covers every stored code (with compact parameters up to 2^bits - 1).
    order_by_median(s.v_codes, g.block_tokens, g.head_dim, format::code_limit(g.v_layout(), p.v_max_code), s.keys,
                    s.order);
  } else {
    for (int t = threadIdx.x; t < g.block_tokens; t += kThreads) s.order[t] = static_cast<std::uint8_t>(t);
  }
  __syncthreads();
  std::uint8_t* order = format::token_order(out, g, head);
  if (order != nullptr) {
    for (int t = threadIdx.x; t < g.block_tokens; t += kThreads) order[t] = s.order[t];
  }
  // The permutation's padding (none while block_tokens is a multiple of 16) is copied as staged.
  if (head == 0) zero_bytes(out, g.permutation_offset() + g.permutation_bytes(), g.sections_offset());
  const std::uint32_t k_at = staged_head_offset(g, head);
  format::HeadEntry sizes{};
  sizes.k_offset = write_section(g.k_layout(), s.k_codes, s.k_params, !g.k_per_channel, s.order, s, out + k_at);
  sizes.v_offset = write_section(g.v_layout(), s.v_codes, s.v_params, true, s.order, s,
                                 out + k_at + g.k_layout().max_section_bytes());
  if (threadIdx.x == 0) format::set_head_entry(out, g, head, sizes);
}

// blockIdx.x = block * num_heads + head: the heads of a block, which read the same token rows,
// are neighbours in the grid.
template <class T>
__global__ void __launch_bounds__(kThreads) encode_kernel(const EncodeParams<T> p) {
  PACKKV_DYNAMIC_SHARED(shared_bytes);
  const int heads = p.geometry.num_heads;
  encode_head(p, static_cast<int>(blockIdx.x) / heads, static_cast<int>(blockIdx.x) % heads, shared_bytes);
}

// A batch of writes: y selects the write, x its (block, head) (CTAs past its blocks have nothing to
// do). The write's parameters are read where they are used, not copied into registers: a copy
// held through the kernel made it spill.
template <class T>
__global__ void __launch_bounds__(kThreads, 3) encode_batch_kernel(const EncodeParams<T>* batch) {
  PACKKV_DYNAMIC_SHARED(shared_bytes);
  const EncodeParams<T>& p = batch[blockIdx.y];
  const int heads = p.geometry.num_heads, block = static_cast<int>(blockIdx.x) / heads;
  if (block >= p.num_blocks) return;
  encode_head(p, block, static_cast<int>(blockIdx.x) % heads, shared_bytes);
}

// A staged block's size once compacted: the fixed prefix, every head's sections, the slack.
__device__ std::uint32_t staged_block_bytes(const format::BlockGeometry& g, const std::uint8_t* staged) {
  std::uint32_t bytes = g.sections_offset() + format::kTrailingSlack;
  for (int h = 0; h < g.num_heads; ++h) {
    const format::HeadEntry sizes = format::head_entry(staged, g, h);
    bytes += sizes.k_offset + sizes.v_offset;
  }
  return bytes;
}

// The tight block from a staged one (`to` may be `from`: encode_blocks compacts in place). The
// heads' tight offsets are a block scan of their sizes; then header and directory are written and
// the tight block's 16-byte words are filled in order: the token orders where they are, each
// section from its staged offset, the trailing slack with zeros. A tight word never lies after its
// staged source, so in place a pass of kThreads words reads all its sources before it writes.
template <bool kInPlace>
__device__ void compact_block(const format::BlockGeometry& g, const std::uint8_t* from, std::uint8_t* to,
                              std::uint32_t* size_out, unsigned char* shared_bytes) {
  const int heads = g.num_heads;
  auto* starts = reinterpret_cast<std::uint32_t*>(shared_bytes);  // [2 * heads + 1]: K, V of each head, end
  std::uint32_t* scan = starts + 2 * heads + 1;                   // [kWarps]
  std::uint32_t running = g.sections_offset();                    // the same in every thread
  for (int first = 0; first < heads; first += kThreads) {
    const int h = first + static_cast<int>(threadIdx.x);
    format::HeadEntry sizes{};
    if (h < heads) sizes = format::head_entry(from, g, h);
    std::uint32_t total = 0;
    const std::uint32_t before = block_exclusive_scan(sizes.k_offset + sizes.v_offset, scan, total);
    if (h < heads) {
      starts[2 * h] = running + before;
      starts[2 * h + 1] = running + before + sizes.k_offset;
    }
    running += total;
  }
  if (threadIdx.x == 0) starts[2 * heads] = running;
  __syncthreads();  // every staged size is read: the directory may be rewritten
  const std::uint32_t size = running + format::kTrailingSlack;
  if (threadIdx.x == 0) {
    *reinterpret_cast<format::BlockHeader*>(to) = format::make_block_header(g, size);
    if (heads % 2 != 0) {  // the directory's padding
      *reinterpret_cast<unsigned long long*>(to + g.directory_offset() + sizeof(format::HeadEntry) * heads) = 0;
    }
    if (size_out != nullptr) *size_out = size;
  }
  for (int h = static_cast<int>(threadIdx.x); h < heads; h += kThreads) {
    format::set_head_entry(to, g, h, format::HeadEntry{starts[2 * h], starts[2 * h + 1]});
  }
  const std::uint32_t k_max = g.k_layout().max_section_bytes();
  const std::uint32_t sections = g.sections_offset() / 16u, words = size / 16u;
  const auto* source = reinterpret_cast<const uint4*>(from);
  auto* target = reinterpret_cast<uint4*>(to);
  int segment = -1;  // the last segment (2h: K of head h, 2h + 1: its V, 2 * heads: the slack) started
  for (std::uint32_t pass = kInPlace ? sections : g.permutation_offset() / 16u; pass < words; pass += kThreads) {
    const std::uint32_t w = pass + threadIdx.x;
    uint4 value{0u, 0u, 0u, 0u};
    if (w < words) {
      if (w < sections) {
        value = source[w];  // the token orders, in place in both
      } else {
        while (segment < 2 * heads && w * 16u >= starts[segment + 1]) ++segment;
        if (segment < 2 * heads) {
          const std::uint32_t staged = staged_head_offset(g, segment / 2) + (segment % 2 != 0 ? k_max : 0u);
          value = source[(staged + w * 16u - starts[segment]) / 16u];
        }
      }
    }
    if (kInPlace) __syncthreads();
    if (w < words) target[w] = value;
    if (kInPlace) __syncthreads();
  }
}

template <class T>
__device__ void write_tail_rows(const TailWriteParams<T>& p) {
  const int row_elems = p.source.row_elems;
  const std::int64_t count = (p.end - p.first) * row_elems;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(kThreads) + threadIdx.x; i < count;
       i += static_cast<std::int64_t>(gridDim.x) * kThreads) {
    const std::int64_t position = p.first + i / row_elems;
    const int element = static_cast<int>(i % row_elems);
    const std::int64_t row = position % p.ring_capacity;
    const T k = p.source.row(Side::k, position)[element];
    const T v = p.source.row(Side::v, position)[element];
    const float kf = load_as_float(&k), vf = load_as_float(&v);
    if (!storable_in(kf, p.value_limit)) {
      record_error(p.errors, kBadValue, Side::k, position, element / p.head_dim, element % p.head_dim, kf, p.value_limit);
    }
    if (!storable_in(vf, p.value_limit)) {
      record_error(p.errors, kBadValue, Side::v, position, element / p.head_dim, element % p.head_dim, vf, p.value_limit);
    }
    p.ring_k[row * row_elems + element] = k;
    p.ring_v[row * row_elems + element] = v;
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) tail_write_kernel(const TailWriteParams<T> p) {
  write_tail_rows(p);
}

template <class T>
__global__ void __launch_bounds__(kThreads) tail_write_batch_kernel(const TailWriteParams<T>* batch) {
  const TailWriteParams<T> p = batch[blockIdx.y];
  write_tail_rows(p);
}

// Strict mode, the host's checks (core/value_checks.hpp) on the device. Rows r < 2 * n * heads:
// one warp per (token, head, side) row checks every value and, with one-bit codes, the row's
// range; then, for per-channel K with one-bit codes, one thread per (block, head, channel)
// checks the channel's range over the tokens of each block the new tokens fall in.
template <class T>
__global__ void __launch_bounds__(kThreads) validate_kernel(const ValidateParams<T> p) {
  const format::BlockGeometry& g = p.geometry;
  const int lane = threadIdx.x & 31, heads = g.num_heads, dim = g.head_dim;
  const std::int64_t first = p.rows.tail.end(), end = first + p.n_tokens;
  const std::int64_t rows = static_cast<std::int64_t>(p.n_tokens) * heads * 2;
  const std::int64_t warps = static_cast<std::int64_t>(gridDim.x) * kWarps;
  for (std::int64_t r = blockIdx.x * static_cast<std::int64_t>(kWarps) + (threadIdx.x >> 5); r < rows; r += warps) {
    const Side side = (r & 1) ? Side::v : Side::k;
    const std::int64_t position = first + r / 2 / heads;
    const int head = static_cast<int>(r / 2 % heads);
    const T* row = p.rows.row(side, position) + static_cast<std::size_t>(head) * dim;
    format::Range range;
    const float limit = value_limit(g);
    for (int c = lane; c < dim; c += 32) {
      const float x = load_as_float(row + c);
      if (!storable_in(x, limit)) record_error(p.errors, kBadValue, side, position, head, c, x, limit);
      range.extend(x);
    }
    range.lo = warp_min(range.lo);
    range.hi = warp_max(range.hi);
    const int max_code = side == Side::k ? p.k_max_code : p.v_max_code;
    if (lane == 0 && max_code == 1 && !g.per_channel(side) && format::storable(range.lo) &&
        format::storable(range.hi) && !format::range_fits(range, max_code)) {
      record_error(p.errors, kRangeTooWide, side, position, head, -1, range.lo, range.hi);
    }
  }
  if (!g.k_per_channel || p.k_max_code != 1) return;
  const std::int64_t block = g.block_tokens, first_block = first / block * block;
  const std::int64_t groups = ((end - first_block + block - 1) / block) * heads * dim;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(kThreads) + threadIdx.x; i < groups;
       i += static_cast<std::int64_t>(gridDim.x) * kThreads) {
    const std::int64_t start = first_block + i / (heads * dim) * block;
    const int head = static_cast<int>(i / dim % heads), c = static_cast<int>(i % dim);
    const std::int64_t from = start > p.rows.tail.begin ? start : p.rows.tail.begin;
    const std::int64_t to = start + block < end ? start + block : end;
    format::Range range;
    for (std::int64_t t = from; t < to; ++t) range.extend(load_as_float(p.rows.row(Side::k, t) + head * dim + c));
    if (format::storable(range.lo) && format::storable(range.hi) && !format::range_fits(range, 1)) {
      record_error(p.errors, kRangeTooWide, Side::k, start, head, c, range.lo, range.hi);
    }
  }
}

// Placement is a sequential walk (a block that does not fit starts the next page), but its inputs
// and outputs need not be: one warp loads 32 sizes at once, lane 0 walks them in shared memory,
// and every lane writes its block's table entry. A prefill of thousands of blocks then costs a
// few global round trips per 32 blocks instead of per block.
__device__ void place_blocks(const PlaceParams& p, unsigned char* shared_bytes) {
  auto* sizes = reinterpret_cast<std::uint32_t*>(shared_bytes);  // [32] each
  std::uint32_t* pages = sizes + 32;
  std::uint32_t* offsets = sizes + 64;
  PlacementCursor& cursor = *reinterpret_cast<PlacementCursor*>(sizes + 96);
  const int lane = threadIdx.x;
  if (lane == 0) cursor = *p.cursor;
  for (int first = 0; first < p.num_blocks; first += 32) {
    const int count = p.num_blocks - first < 32 ? p.num_blocks - first : 32;
    if (lane < count) sizes[lane] = staged_block_bytes(p.geometry, p.staging + (first + lane) * p.staging_stride);
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
    if (lane < count) {
      if (pages[lane] < p.page_count) {
        p.table[first + lane] = p.pages[pages[lane]] + offsets[lane];
      } else {  // the host reserved too few pages: an accounting error, never a wild write
        p.table[first + lane] = nullptr;
        record_error(p.errors, kPlacementOverflow, Side::k, first + lane, -1, -1, static_cast<float>(pages[lane]),
                     static_cast<float>(p.page_count));
      }
    }
    __syncwarp();
  }
  if (lane == 0) {
    *p.cursor = cursor;
    *reinterpret_cast<volatile unsigned long long*>(p.progress) = pack_progress(p.launch, cursor.page, cursor.offset);
    __threadfence_system();
  }
}

__global__ void place_kernel(const PlaceParams p) {
  PACKKV_DYNAMIC_SHARED(shared_bytes);
  place_blocks(p, shared_bytes);
}
// One warp per write of a batch: the writes' layers have their own pages and cursors.
__global__ void place_batch_kernel(const PlaceParams* batch) {
  PACKKV_DYNAMIC_SHARED(shared_bytes);
  const PlaceParams p = batch[blockIdx.x];
  place_blocks(p, shared_bytes);
}

// Staging slots and pages are 256-byte aligned, sizes and offsets multiples of 16: 16-byte copies.
__device__ void copy_placed_block(const PlaceParams& p, int block, unsigned char* shared_bytes) {
  std::uint8_t* to = p.table[block];
  if (to == nullptr) return;
  compact_block<false>(p.geometry, p.staging + block * p.staging_stride, to, nullptr, shared_bytes);
}
__global__ void __launch_bounds__(kThreads) copy_placed_kernel(const PlaceParams p) {
  PACKKV_DYNAMIC_SHARED(shared_bytes);
  copy_placed_block(p, blockIdx.x, shared_bytes);
}
__global__ void __launch_bounds__(kThreads) copy_placed_batch_kernel(const PlaceParams* batch) {
  PACKKV_DYNAMIC_SHARED(shared_bytes);
  const PlaceParams p = batch[blockIdx.y];
  if (static_cast<int>(blockIdx.x) < p.num_blocks) copy_placed_block(p, blockIdx.x, shared_bytes);
}
__global__ void __launch_bounds__(kThreads) compact_kernel(const CompactParams p) {
  PACKKV_DYNAMIC_SHARED(shared_bytes);
  std::uint8_t* block = p.base + blockIdx.x * p.stride;
  compact_block<true>(p.geometry, block, block, p.sizes != nullptr ? p.sizes + blockIdx.x : nullptr, shared_bytes);
}

__global__ void __launch_bounds__(kThreads) write_pointers_kernel(const PointerWrite* writes, int count) {
  const int i = static_cast<int>(blockIdx.x * kThreads + threadIdx.x);
  if (i < count) *writes[i].at = writes[i].value;
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
std::size_t compact_shared_bytes(const format::BlockGeometry& g) {
  return (2 * static_cast<std::size_t>(g.num_heads) + 1 + kWarps) * sizeof(std::uint32_t);
}

template <class T>
cudaError_t launch_encode(const EncodeParams<T>& params, int num_blocks, cudaStream_t stream) {
  if (num_blocks <= 0) return cudaSuccess;
  const std::int64_t ctas = static_cast<std::int64_t>(num_blocks) * params.geometry.num_heads;
  if (ctas > 0x7FFFFFFF) return cudaErrorInvalidValue;  // past the grid's x limit
  const std::size_t shared = encode_shared_bytes(params.geometry);
  static const cudaError_t opt_in = opt_in_shared_memory(encode_kernel<T>);
  if (opt_in != cudaSuccess) return opt_in;
  PACKKV_LAUNCH(encode_kernel<T>, static_cast<unsigned>(ctas), kThreads, shared, stream, params);
  return cudaGetLastError();
}

cudaError_t launch_compact_blocks(const CompactParams& params, cudaStream_t stream) {
  if (params.num_blocks <= 0) return cudaSuccess;
  PACKKV_LAUNCH(compact_kernel, params.num_blocks, kThreads, compact_shared_bytes(params.geometry), stream, params);
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
cudaError_t launch_validate(const ValidateParams<T>& params, cudaStream_t stream) {
  const std::int64_t rows = static_cast<std::int64_t>(params.n_tokens) * params.geometry.num_heads * 2;
  PACKKV_LAUNCH(validate_kernel<T>, grid_for(rows * 32), kThreads, 0, stream, params);
  return cudaGetLastError();
}

cudaError_t launch_place_blocks(const PlaceParams& params, cudaStream_t stream) {
  if (params.num_blocks <= 0) return cudaSuccess;
  PACKKV_LAUNCH(place_kernel, 1, 32, 96 * sizeof(std::uint32_t) + sizeof(PlacementCursor), stream, params);
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  PACKKV_LAUNCH(copy_placed_kernel, params.num_blocks, kThreads, compact_shared_bytes(params.geometry), stream, params);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_encode_batch(const EncodeParams<T>* batch, int count, int max_blocks, const format::BlockGeometry& g,
                                cudaStream_t stream) {
  if (count <= 0 || max_blocks <= 0) return cudaSuccess;
  static const cudaError_t opt_in = opt_in_shared_memory(encode_batch_kernel<T>);
  if (opt_in != cudaSuccess) return opt_in;
  const std::int64_t ctas = static_cast<std::int64_t>(max_blocks) * g.num_heads;
  if (ctas > 0x7FFFFFFF) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(ctas), static_cast<unsigned>(count));
  PACKKV_LAUNCH(encode_batch_kernel<T>, grid, kThreads, encode_shared_bytes(g), stream, batch);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_tail_write_batch(const TailWriteParams<T>* batch, int count, std::int64_t max_elements,
                                    cudaStream_t stream) {
  if (count <= 0 || max_elements <= 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(grid_for(max_elements)), static_cast<unsigned>(count));
  PACKKV_LAUNCH(tail_write_batch_kernel<T>, grid, kThreads, 0, stream, batch);
  return cudaGetLastError();
}

cudaError_t launch_place_batch(const PlaceParams* batch, int count, int max_blocks, const format::BlockGeometry& g,
                               cudaStream_t stream) {
  if (count <= 0 || max_blocks <= 0) return cudaSuccess;
  PACKKV_LAUNCH(place_batch_kernel, count, 32, 96 * sizeof(std::uint32_t) + sizeof(PlacementCursor), stream, batch);
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  const dim3 grid(static_cast<unsigned>(max_blocks), static_cast<unsigned>(count));
  PACKKV_LAUNCH(copy_placed_batch_kernel, grid, kThreads, compact_shared_bytes(g), stream, batch);
  return cudaGetLastError();
}

cudaError_t launch_write_pointers(const PointerWrite* writes, int count, cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  PACKKV_LAUNCH(write_pointers_kernel, (count + kThreads - 1) / kThreads, kThreads, 0, stream, writes, count);
  return cudaGetLastError();
}

cudaError_t launch_write_table(std::uint8_t** table, TableEntries entries, cudaStream_t stream) {
  if (entries.count <= 0) return cudaSuccess;
  PACKKV_LAUNCH(write_table_kernel, 1, kInlineTableEntries, 0, stream, table, entries);
  return cudaGetLastError();
}

#define PACKKV_INSTANTIATE_ENCODE(T)                                                                           \
  template cudaError_t launch_encode<T>(const EncodeParams<T>&, int, cudaStream_t);                            \
  template cudaError_t launch_encode_batch<T>(const EncodeParams<T>*, int, int, const format::BlockGeometry&,  \
                                              cudaStream_t);                                                   \
  template cudaError_t launch_tail_write<T>(const TailWriteParams<T>&, cudaStream_t);                          \
  template cudaError_t launch_tail_write_batch<T>(const TailWriteParams<T>*, int, std::int64_t, cudaStream_t); \
  template cudaError_t launch_validate<T>(const ValidateParams<T>&, cudaStream_t);
PACKKV_INSTANTIATE_ENCODE(float)
PACKKV_INSTANTIATE_ENCODE(fp16_t)
PACKKV_INSTANTIATE_ENCODE(bf16_t)
#undef PACKKV_INSTANTIATE_ENCODE

}  // namespace packkv::detail::cuda

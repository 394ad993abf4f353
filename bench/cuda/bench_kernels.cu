// Baseline kernels of the CUDA benchmark: data generation, the dense fp16 decode attention, and
// the helpers of the cuBLAS attention and of the dense decode step. Not yet run on a GPU.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "bench_kernels.hpp"

namespace packkv::bench {

namespace {

constexpr int kFillThreads = 256;
constexpr unsigned kFullMask = 0xFFFFFFFFu;

// Two floats rounded to fp16, as one word (the first in the low half, as memory order wants).
__device__ __forceinline__ unsigned pack_half2_bits(float lo, float hi) {
  return static_cast<unsigned>(__half_as_ushort(__float2half_rn(lo))) |
         (static_cast<unsigned>(__half_as_ushort(__float2half_rn(hi))) << 16);
}

__device__ __forceinline__ std::uint64_t mix(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Sum of four uniforms (Irwin-Hall) is close enough to normal for a bandwidth benchmark, and the
// occasional x8 outlier widens token ranges as real K does.
__device__ float kv_like_value(std::size_t i, std::uint64_t seed, float scale) {
  const std::uint64_t a = mix(seed * 0x9E3779B97F4A7C15ull + i), b = mix(a + 0x632BE59BD9B4E019ull);
  const float u = static_cast<float>(a & 0xFFFF) + static_cast<float>((a >> 16) & 0xFFFF) +
                  static_cast<float>((a >> 32) & 0xFFFF) + static_cast<float>((a >> 48) & 0xFFFF);
  float x = (u / 65535.0f - 2.0f) * 1.7320508f;
  if ((b & 0xFF) < 5) x *= 8.0f;
  return x * scale;
}

__global__ void fill_half_kernel(fp16_t* out, std::size_t n, std::uint64_t seed, float scale) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    out[i].bits = __half_as_ushort(__float2half_rn(kv_like_value(i, seed, scale)));
  }
}

__global__ void fill_float_kernel(float* out, std::size_t n, std::uint64_t seed, float scale) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    out[i] = kv_like_value(i, seed, scale);
  }
}

__global__ void head_major_kernel(const fp16_t* in, fp16_t* out, std::int64_t len, int heads, int dim,
                                  std::int64_t head_stride) {
  const std::size_t n = static_cast<std::size_t>(len) * heads * dim;
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const std::size_t c = i % dim, h = i / dim % heads, t = i / (static_cast<std::size_t>(dim) * heads);
    out[h * head_stride + t * dim + c] = in[i];
  }
}

// One thread per 16-byte piece of the batch's new K and V rows.
__global__ void append_token_kernel(const uint4* src_k, const uint4* src_v, fp16_t* dst_k, fp16_t* dst_v,
                                    int rows, int pieces_per_row, std::int64_t head_stride, std::int64_t position,
                                    int dim) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int per_side = rows * pieces_per_row;
  if (i >= 2 * per_side) return;
  const bool is_v = i >= per_side;
  const int j = is_v ? i - per_side : i;
  const int row = j / pieces_per_row, piece = j % pieces_per_row;
  fp16_t* dst = (is_v ? dst_v : dst_k) + row * head_stride + position * dim;
  reinterpret_cast<uint4*>(dst)[piece] = (is_v ? src_v : src_k)[j];
}

// ---- softmax rows (cuBLAS attention baseline) ----

constexpr int kSoftmaxThreads = 1024;

__device__ __forceinline__ void online_add(float& m, float& s, float x) {
  if (x > m) {
    s = s * exp2f(m - x) + 1.0f;  // m = -inf: s = 0 * 0 + 1
    m = x;
  } else {
    s += exp2f(x - m);
  }
}

__device__ __forceinline__ void online_merge(float& m, float& s, float m2, float s2) {
  const float mm = fmaxf(m, m2);
  if (mm == -INFINITY) return;
  s = s * exp2f(m - mm) + s2 * exp2f(m2 - mm);
  m = mm;
}

// One CTA per row; scores are read twice (online max and sum, then the weights), 16 bytes at a
// time when the row allows it. Works in the log2 domain: x = scale * log2(e) * score.
__global__ void __launch_bounds__(kSoftmaxThreads) softmax_rows_kernel(const float* scores, fp16_t* weights,
                                                                       std::int64_t len, float scale_log2) {
  const float* in = scores + blockIdx.x * len;
  fp16_t* out = weights + blockIdx.x * len;
  const bool vector = len % 4 == 0;
  float m = -INFINITY, s = 0.0f;
  if (vector) {
    const float4* in4 = reinterpret_cast<const float4*>(in);
    for (std::int64_t i = threadIdx.x; i < len / 4; i += kSoftmaxThreads) {
      const float4 x = in4[i];
      online_add(m, s, x.x * scale_log2);
      online_add(m, s, x.y * scale_log2);
      online_add(m, s, x.z * scale_log2);
      online_add(m, s, x.w * scale_log2);
    }
  } else {
    for (std::int64_t i = threadIdx.x; i < len; i += kSoftmaxThreads) online_add(m, s, in[i] * scale_log2);
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(kFullMask, m, o), s2 = __shfl_xor_sync(kFullMask, s, o);
    online_merge(m, s, m2, s2);
  }
  __shared__ float warp_m[kSoftmaxThreads / 32], warp_s[kSoftmaxThreads / 32];
  __shared__ float row_m, row_inv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    warp_m[warp] = m;
    warp_s[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    m = warp_m[lane];
    s = warp_s[lane];
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(kFullMask, m, o), s2 = __shfl_xor_sync(kFullMask, s, o);
      online_merge(m, s, m2, s2);
    }
    if (lane == 0) {
      row_m = m;
      row_inv = 1.0f / s;
    }
  }
  __syncthreads();
  const float mx = row_m, inv = row_inv;
  if (vector) {
    const float4* in4 = reinterpret_cast<const float4*>(in);
    uint2* out4 = reinterpret_cast<uint2*>(out);
    for (std::int64_t i = threadIdx.x; i < len / 4; i += kSoftmaxThreads) {
      const float4 x = in4[i];
      uint2 w;
      w.x = pack_half2_bits(exp2f(x.x * scale_log2 - mx) * inv, exp2f(x.y * scale_log2 - mx) * inv);
      w.y = pack_half2_bits(exp2f(x.z * scale_log2 - mx) * inv, exp2f(x.w * scale_log2 - mx) * inv);
      out4[i] = w;
    }
  } else {
    for (std::int64_t i = threadIdx.x; i < len; i += kSoftmaxThreads)
      out[i].bits = __half_as_ushort(__float2half_rn(exp2f(in[i] * scale_log2 - mx) * inv));
  }
}

// ---- dense fp16 decode attention ----
//
// Lane layout inside a warp: lane = 16 * half + sub. A K or V row (128 fp16 = 256 bytes = 16
// vectors of 16 bytes) is read by the 16 lanes of one half, lane `sub` taking channels
// [8 sub, 8 sub + 8); one load instruction of the warp reads two consecutive rows (512 contiguous
// bytes). A warp's chunk is 16 rows: row0 + 2 i + half for i in [0, 8).
//
// After the reduce-scatter, lane `sub` holds the full score of its row for query head
// (sub >> 2) & 3 (four lanes hold each head's score, the same value). The online softmax state
// (running max m, running sum l) of a head lives in the lanes that hold its scores; m is the same
// in both halves (the chunk maximum is reduced across halves), l covers the half's own rows until
// the end. V accumulators: lane `sub` keeps acc[g][0..8) for every head g and its 8 channels,
// summed over its half's rows.
constexpr int kDim = kDenseHeadDim;
constexpr int kGroup = kDenseGroup;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kLanesPerRow = kDim / 8;            // 16
constexpr int kRowsPerLoad = 32 / kLanesPerRow;   // 2
constexpr int kLoads = 8;                         // vectors per lane per chunk, for K and for V
constexpr int kWarpRows = kRowsPerLoad * kLoads;  // 16
constexpr int kCtaRows = kWarps * kWarpRows;      // 64
constexpr int kMinCtasPerSm = 3;
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kCtaRows == kDenseRowsPerCta, "a split must hold whole CTA chunks");
static_assert(kGroup == 4 && kLanesPerRow == 16, "the reduce-scatter below is written for 4 heads over 16 lanes");
static_assert(kThreads == kDim, "the in-CTA merge gives each thread one channel");

// Streaming 16-byte load: read-only path, not kept in L1 (each byte is read once).
__device__ __forceinline__ uint4 load_streaming(const uint4* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}

// 2^x with flush to zero: -inf gives +0, which is all the softmax needs (no denormal handling).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// fp16 bit patterns to float through the intrinsics (no type punning of registers).
__device__ __forceinline__ float low_half_to_float(unsigned w) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xFFFFu)));
}
__device__ __forceinline__ float high_half_to_float(unsigned w) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
}

__device__ __forceinline__ void to_float8(const uint4& u, float (&f)[8]) {
  const unsigned words[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = low_half_to_float(words[i]);
    f[2 * i + 1] = high_half_to_float(words[i]);
  }
}

// Loads one chunk's vectors for this lane, whose rows are 2 apart: row i at p[i * 32]. Only the first `valid` rows of the warp's 16 exist; the others read
// as zeros (their scores are masked to -inf and their weights are 0). `valid` is warp-uniform, so
// full chunks take the branch without predicates or zeroing.
__device__ __forceinline__ void load_chunk(uint4 (&r)[kLoads], const uint4* p, int half, int valid) {
  constexpr int kRowStride = kRowsPerLoad * kLanesPerRow;  // vectors between a lane's rows
  if (valid >= kWarpRows) {
#pragma unroll
    for (int i = 0; i < kLoads; ++i) r[i] = load_streaming(p + i * kRowStride);
  } else {
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      r[i] = make_uint4(0, 0, 0, 0);
      if (half + kRowsPerLoad * i < valid) r[i] = load_streaming(p + i * kRowStride);
    }
  }
}

// d[g]: this lane's partial dot for head g. Returns the full dot over the 16 lanes of the half for
// head (sub >> 2) & 3: five shuffles instead of sixteen for four separate butterflies.
__device__ __forceinline__ float reduce_scatter4(const float (&d)[kGroup], int sub) {
  const bool hi8 = (sub & 8) != 0;
  float keep0 = hi8 ? d[2] : d[0], keep1 = hi8 ? d[3] : d[1];
  const float send0 = hi8 ? d[0] : d[2], send1 = hi8 ? d[1] : d[3];
  keep0 += __shfl_xor_sync(kFullMask, send0, 8);  // keep0: head 2 hi8, keep1: head 2 hi8 + 1
  keep1 += __shfl_xor_sync(kFullMask, send1, 8);
  const bool hi4 = (sub & 4) != 0;
  const float send = hi4 ? keep0 : keep1;
  float r = (hi4 ? keep1 : keep0) + __shfl_xor_sync(kFullMask, send, 4);
  r += __shfl_xor_sync(kFullMask, r, 2);
  r += __shfl_xor_sync(kFullMask, r, 1);
  return r;
}

__global__ void __launch_bounds__(kThreads, kMinCtasPerSm) dense_decode_kernel(const DenseDecodeArgs a) {
  const int split = blockIdx.x, kv_head = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int half = lane / kLanesPerRow, sub = lane % kLanesPerRow;
  const int own_head = (sub >> 2) & 3;
  const std::size_t seq_head = static_cast<std::size_t>(b) * a.kv_heads + kv_head;
  const uint4* k = reinterpret_cast<const uint4*>(a.k + seq_head * a.head_stride) + sub;
  const uint4* v = reinterpret_cast<const uint4*>(a.v + seq_head * a.head_stride) + sub;
  const std::size_t q_row0 = static_cast<std::size_t>(b) * a.q_heads + static_cast<std::size_t>(kv_head) * kGroup;

  // q in fp32, pre-multiplied by scale * log2(e): scores come out in the log2 domain.
  float q[kGroup][8];
  {
    const uint4* qv = reinterpret_cast<const uint4*>(a.q + q_row0 * kDim) + sub;
    const float qs = a.scale * kLog2e;
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      float f[8];
      to_float8(qv[g * kLanesPerRow], f);
#pragma unroll
      for (int c = 0; c < 8; ++c) q[g][c] = f[c] * qs;
    }
  }

  const std::int64_t begin = static_cast<std::int64_t>(split) * a.tokens_per_split;
  const std::int64_t end = min(a.len, begin + a.tokens_per_split);
  float acc[kGroup][8];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
#pragma unroll
    for (int c = 0; c < 8; ++c) acc[g][c] = 0.0f;
  }
  float m_run = -INFINITY, l_run = 0.0f;

  // kp, vp: this lane's first row of the warp's current chunk; loads use immediate offsets from them.
  constexpr int kChunkStep = kCtaRows * kLanesPerRow;  // vectors from one of the warp's chunks to the next
  uint4 kr[kLoads], vr[kLoads];
  std::int64_t row0 = begin + warp * kWarpRows;
  const uint4* kp = k + (row0 + half) * kLanesPerRow;
  const uint4* vp = v + (row0 + half) * kLanesPerRow;
  auto valid_rows = [&](std::int64_t first) {
    return static_cast<int>(min(static_cast<std::int64_t>(kWarpRows), end - first));
  };
  if (row0 < end) load_chunk(kr, kp, half, valid_rows(row0));
  for (; row0 < end; row0 += kCtaRows, kp += kChunkStep, vp += kChunkStep) {
    const int valid = valid_rows(row0);
    load_chunk(vr, vp, half, valid);

    float s[kLoads];
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      float f[8];
      to_float8(kr[i], f);
      float d[kGroup];
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        float x = 0.0f;
#pragma unroll
        for (int c = 0; c < 8; ++c) x = fmaf(q[g][c], f[c], x);
        d[g] = x;
      }
      s[i] = reduce_scatter4(d, sub);
      if (half + kRowsPerLoad * i >= valid) s[i] = -INFINITY;
    }

    // The K registers are free: request the next chunk's K before this chunk's V is consumed.
    const std::int64_t next = row0 + kCtaRows;
    if (next < end) load_chunk(kr, kp + kChunkStep, half, valid_rows(next));

    // Online softmax. Row row0 (half 0, i = 0) is always valid, so the chunk maximum is finite.
    float cmax = s[0];
#pragma unroll
    for (int i = 1; i < kLoads; ++i) cmax = fmaxf(cmax, s[i]);
    cmax = fmaxf(cmax, __shfl_xor_sync(kFullMask, cmax, 16));
    const float m_new = fmaxf(m_run, cmax);
    const float alpha = fast_exp2(m_run - m_new);  // 0 on the first chunk (m_run = -inf)
    float p[kLoads], psum = 0.0f;
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      p[i] = fast_exp2(s[i] - m_new);
      psum += p[i];
    }
    l_run = l_run * alpha + psum;
    m_run = m_new;

#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      const float ag = __shfl_sync(kFullMask, alpha, g << 2);
#pragma unroll
      for (int c = 0; c < 8; ++c) acc[g][c] *= ag;
    }
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      float f[8];
      to_float8(vr[i], f);
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        const float pg = __shfl_sync(kFullMask, p[i], (lane & 16) | (g << 2));
#pragma unroll
        for (int c = 0; c < 8; ++c) acc[g][c] = fmaf(pg, f[c], acc[g][c]);
      }
    }
  }

  // Both halves of the warp share m: add their sums and accumulators.
  l_run += __shfl_xor_sync(kFullMask, l_run, 16);
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
#pragma unroll
    for (int c = 0; c < 8; ++c) acc[g][c] += __shfl_xor_sync(kFullMask, acc[g][c], 16);
  }

  __shared__ float s_acc[kWarps][kGroup][kDim];
  __shared__ float s_m[kWarps][kGroup], s_l[kWarps][kGroup];
  __shared__ float s_weight[kGroup][kDenseMaxSplits];
  __shared__ unsigned s_ticket;
  if (half == 0) {
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
#pragma unroll
      for (int c = 0; c < 8; ++c) s_acc[warp][g][sub * 8 + c] = acc[g][c];
    }
    if ((sub & 3) == 0) {
      s_m[warp][own_head] = m_run;  // -inf for a warp that had no rows
      s_l[warp][own_head] = l_run;
    }
  }
  __syncthreads();

  // In-CTA merge: thread c owns channel c of every head.
  const int c = threadIdx.x;
  float merged_acc[kGroup], merged_m[kGroup], merged_l[kGroup];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, s_m[w][g]);
    float sum = 0.0f, l = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float mw = s_m[w][g];
      const float weight = mw == -INFINITY ? 0.0f : fast_exp2(mw - mx);
      sum = fmaf(weight, s_acc[w][g][c], sum);
      l = fmaf(weight, s_l[w][g], l);
    }
    merged_acc[g] = sum;
    merged_m[g] = mx;
    merged_l[g] = l;
  }

  if (a.splits == 1) {
#pragma unroll
    for (int g = 0; g < kGroup; ++g)
      a.out[(q_row0 + g) * kDim + c].bits = __half_as_ushort(__float2half_rn(merged_acc[g] / merged_l[g]));
    return;
  }

  // Partials of this split, then a ticket: the CTA that draws the last one merges all splits.
  const std::size_t first_slot = seq_head * a.splits;
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    const std::size_t slot = (first_slot + split) * kGroup + g;
    a.partial_acc[slot * kDim + c] = merged_acc[g];
    if (c == 0) {
      a.partial_ml[2 * slot] = merged_m[g];
      a.partial_ml[2 * slot + 1] = merged_l[g];
    }
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) s_ticket = atomicAdd(&a.counters[seq_head], 1u);
  __syncthreads();
  if (s_ticket != static_cast<unsigned>(a.splits - 1)) return;
  __threadfence();

  // Split merge: warp g merges head g; lane j reads splits j, j + 32, ...; then each lane sums 4
  // channels over the splits. Partials are read through L2 (__ldcg): other CTAs wrote them.
  const int g = warp;
  float mx = -INFINITY;
  for (int j = lane; j < a.splits; j += 32)
    mx = fmaxf(mx, __ldcg(&a.partial_ml[2 * ((first_slot + j) * kGroup + g)]));
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, o));
  float total = 0.0f;
  for (int j = lane; j < a.splits; j += 32) {
    const std::size_t slot = (first_slot + j) * kGroup + g;
    const float mj = __ldcg(&a.partial_ml[2 * slot]), lj = __ldcg(&a.partial_ml[2 * slot + 1]);
    const float weight = mj == -INFINITY ? 0.0f : fast_exp2(mj - mx);
    s_weight[g][j] = weight;
    total = fmaf(weight, lj, total);
  }
  for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(kFullMask, total, o);
  __syncwarp();
  float4 sum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  const float4* partial4 = reinterpret_cast<const float4*>(a.partial_acc);
#pragma unroll 8
  for (int j = 0; j < a.splits; ++j) {
    const float4 x = __ldcg(&partial4[((first_slot + j) * kGroup + g) * (kDim / 4) + lane]);
    const float weight = s_weight[g][j];
    sum.x = fmaf(weight, x.x, sum.x);
    sum.y = fmaf(weight, x.y, sum.y);
    sum.z = fmaf(weight, x.z, sum.z);
    sum.w = fmaf(weight, x.w, sum.w);
  }
  const float inv = 1.0f / total;
  uint2 packed;
  packed.x = pack_half2_bits(sum.x * inv, sum.y * inv);
  packed.y = pack_half2_bits(sum.z * inv, sum.w * inv);
  reinterpret_cast<uint2*>(a.out + (q_row0 + g) * kDim)[lane] = packed;
  if (threadIdx.x == 0) a.counters[seq_head] = 0;  // ready for the next launch
}

int grid_for(std::size_t n) {
  const std::size_t blocks = (n + kFillThreads - 1) / kFillThreads;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > 8192 ? 8192 : blocks));
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

}  // namespace

cudaError_t fill_random(fp16_t* out, std::size_t n, std::uint64_t seed, float scale, cudaStream_t stream) {
  fill_half_kernel<<<grid_for(n), kFillThreads, 0, stream>>>(out, n, seed, scale);
  return cudaGetLastError();
}

cudaError_t fill_random(float* out, std::size_t n, std::uint64_t seed, float scale, cudaStream_t stream) {
  fill_float_kernel<<<grid_for(n), kFillThreads, 0, stream>>>(out, n, seed, scale);
  return cudaGetLastError();
}

cudaError_t token_major_to_head_major(const fp16_t* in, fp16_t* out, std::int64_t len, int heads, int dim,
                                      std::int64_t head_stride, cudaStream_t stream) {
  if (head_stride < len * dim) return cudaErrorInvalidValue;
  head_major_kernel<<<grid_for(static_cast<std::size_t>(len) * heads * dim), kFillThreads, 0, stream>>>(
      in, out, len, heads, dim, head_stride);
  return cudaGetLastError();
}

cudaError_t dense_append_token(const fp16_t* src_k, const fp16_t* src_v, fp16_t* dst_k, fp16_t* dst_v, int batch,
                               int heads, int dim, std::int64_t head_stride, std::int64_t position,
                               cudaStream_t stream) {
  if (dim % 8 != 0 || head_stride % 8 != 0 || position < 0 || (position + 1) * dim > head_stride ||
      !aligned16(src_k) || !aligned16(src_v) || !aligned16(dst_k) || !aligned16(dst_v))
    return cudaErrorInvalidValue;
  const int rows = batch * heads, pieces = dim / 8, threads = 256;
  const int blocks = (2 * rows * pieces + threads - 1) / threads;
  append_token_kernel<<<blocks, threads, 0, stream>>>(reinterpret_cast<const uint4*>(src_k),
                                                      reinterpret_cast<const uint4*>(src_v), dst_k, dst_v, rows,
                                                      pieces, head_stride, position, dim);
  return cudaGetLastError();
}

cudaError_t softmax_rows(const float* scores, fp16_t* weights, int rows, std::int64_t len, float scale,
                         cudaStream_t stream) {
  if (rows <= 0 || len <= 0) return cudaErrorInvalidValue;
  softmax_rows_kernel<<<rows, kSoftmaxThreads, 0, stream>>>(scores, weights, len, scale * kLog2e);
  return cudaGetLastError();
}

cudaError_t dense_decode_ctas_per_sm(int* ctas) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(ctas, dense_decode_kernel, kThreads, 0);
}

// Cost model: CTAs run in waves of sm_count * ctas_per_sm; a wave lasts about as long as one CTA
// takes for its tokens plus a fixed cost (q load, the in-CTA merge, the partials and the ticket:
// about 64 rows' worth of streaming at one CTA's share of the bandwidth, a guess), and the last
// wave ends unevenly (SMs idle while the slowest CTAs finish: about 15% of a CTA's time, a guess).
// So time ~ (waves + 0.15) * (tokens_per_split + 64): whole waves of short CTAs win; ties go to
// fewer splits. Not yet checked against a GPU.
DenseDecodePlan plan_dense_decode(int batch, int kv_heads, std::int64_t len, int sm_count, int ctas_per_sm) {
  constexpr std::int64_t kFixedRows = 64;
  constexpr double kTailWaves = 0.15;
  const std::int64_t slots = static_cast<std::int64_t>(std::max(sm_count, 1)) * std::max(ctas_per_sm, 1);
  const std::int64_t base = static_cast<std::int64_t>(std::max(batch, 1)) * std::max(kv_heads, 1);
  const std::int64_t max_tokens = std::max<std::int64_t>(kCtaRows, (len + kCtaRows - 1) / kCtaRows * kCtaRows);
  DenseDecodePlan best;
  best.ctas_per_sm = ctas_per_sm;
  double best_cost = std::numeric_limits<double>::infinity();
  for (std::int64_t tokens = kCtaRows; tokens <= max_tokens; tokens += kCtaRows) {
    const std::int64_t splits = (len + tokens - 1) / tokens;
    if (splits > kDenseMaxSplits) continue;
    const std::int64_t waves = (base * splits + slots - 1) / slots;
    const double cost = (static_cast<double>(waves) + kTailWaves) * static_cast<double>(tokens + kFixedRows);
    if (cost < best_cost * (1.0 - 1e-9)) {
      best_cost = cost;
      best.splits = static_cast<int>(splits);
      best.tokens_per_split = static_cast<int>(tokens);
    }
  }
  return best;
}

std::size_t dense_decode_acc_floats(int batch, int q_heads, int splits) {
  return static_cast<std::size_t>(batch) * q_heads * splits * kDim;
}
std::size_t dense_decode_ml_floats(int batch, int q_heads, int splits) {
  return static_cast<std::size_t>(batch) * q_heads * splits * 2;
}

cudaError_t dense_decode_attention(const DenseDecodeArgs& a, cudaStream_t stream) {
  const bool shape_ok = a.kv_heads > 0 && a.q_heads == kGroup * a.kv_heads && a.batch > 0 && a.len > 0 &&
                        a.head_stride % 8 == 0 && a.head_stride >= a.len * kDim;
  const bool split_ok = a.splits >= 1 && a.splits <= kDenseMaxSplits && a.tokens_per_split > 0 &&
                        a.tokens_per_split % kCtaRows == 0 &&
                        static_cast<std::int64_t>(a.splits) * a.tokens_per_split >= a.len &&
                        static_cast<std::int64_t>(a.splits - 1) * a.tokens_per_split < a.len;
  const bool pointers_ok = aligned16(a.k) && aligned16(a.v) && aligned16(a.q) && aligned16(a.out) &&
                           (a.splits == 1 || (aligned16(a.partial_acc) && a.partial_ml && a.counters));
  if (!shape_ok || !split_ok || !pointers_ok) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(a.splits), static_cast<unsigned>(a.kv_heads), static_cast<unsigned>(a.batch));
  dense_decode_kernel<<<grid, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace packkv::bench

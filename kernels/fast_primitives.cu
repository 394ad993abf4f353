// `scores` and `attn_v` on the fast read path: the decode of decode_attention.cu (cp.async staging,
// one warp decoding a round into a byte tile, ldmatrix, mma.m16n8k16 on fp16 subnormal codes),
// for head_dim 64, 96, 128 or 256, K quantized per token or per channel; other head dims use
// attention.cu.
// Both kernels are batched: one launch serves up to kMaxBatchPerLaunch sequences.
//
// A CTA is one warp and owns one (sequence, KV head, query subgroup) and a range of units (packed
// blocks, then block-sized chunks of the tail), like fast attention. It stages only the section it
// reads (K for scores, V for attn_v), kStages - 1 blocks ahead.
//   scores: K.q by mma as in fast attention; each lane writes the scores of its two tokens of a
//           round to their original positions, read from the stored token order with one 32-bit
//           load per round (no byte-wide global load). Tail tokens are written densely.
//   attn_v: each lane loads the weights of its two tokens of a round (through the same order word)
//           for its heads, multiplies them by the tokens' V steps, and the warp takes a power of two
//           from the chunk's largest product so that their fp16 hi and lo halves stay normal; the
//           products are the B fragments of P.V, the V minimums enter as sum_t w_t min_t. Partial
//           sums over a CTA's range go to a workspace; the last CTA of a (sequence, KV head,
//           subgroup) to take a ticket adds them in split order (deterministic) and writes out.
#include <algorithm>
#include <cstdint>

#include "detail/fast_decode.cuh"
#include "detail/packed_block.cuh"
#include "detail/primitives.cuh"
#include "launch.hpp"

namespace packkv::detail::cuda {

namespace {

using format::SectionLayout;


/// Shared memory of one staged section: the geometry's worst case, plus slack for the 12-byte reads
/// a decoder makes at a pack's start.
__host__ __device__ std::size_t primitive_stage_bytes(const format::BlockGeometry& g, format::Side side) {
  const SectionLayout l = side == format::Side::k ? g.k_layout() : g.v_layout();
  return format::align_up(l.max_section_bytes() + 16u, format::kAlign);
}

struct PrimitiveShared {
  BlockSpan* spans;      // [kFastMaxBlocksPerCta]
  std::uint8_t* stages;  // [stages][stage_bytes]
  std::uint8_t* tiles;   // [2][D][16]
  float* q;              // scores: [heads][D]
};

__host__ __device__ std::size_t primitive_shared_layout(const format::BlockGeometry& g, format::Side side, int stages,
                                                        int heads, unsigned char* base, PrimitiveShared* out) {
  SharedCarver carve{base};
  PrimitiveShared s{};
  s.spans = carve.take_array<BlockSpan>(kFastMaxBlocksPerCta);
  s.stages = carve.take(static_cast<std::size_t>(stages) * primitive_stage_bytes(g, side));
  s.tiles = carve.take(2u * 16u * static_cast<std::size_t>(g.head_dim));
  s.q = carve.take_array<float>(side == format::Side::k ? static_cast<std::size_t>(heads) * g.head_dim : 0u);
  if (out != nullptr) *out = s;
  return carve.used;
}

/// What a CTA serves: its sequence, KV head, query heads and units.
struct CtaWork {
  int kv_head, first_head, head_count;  // query heads kv_head * group + first_head + [0, head_count)
  int block_begin, blocks;              // packed blocks [block_begin, block_begin + blocks)
  ExactTokens exact;                    // tail tokens, then the sink rows when the CTA has their unit
};
template <class T>
__device__ CtaWork cta_work(const PrimitiveParams<T>& p, const SeqView<T>& seq) {
  const format::BlockGeometry& g = p.shape.geometry;
  CtaWork w{};
  w.kv_head = static_cast<int>(blockIdx.y) / p.shape.subgroups;
  w.first_head = (static_cast<int>(blockIdx.y) % p.shape.subgroups) * p.shape.heads_per_cta;
  w.head_count = min(p.shape.heads_per_cta, p.shape.group - w.first_head);
  const int units = seq.num_units(g.block_tokens);
  const int unit_begin = static_cast<int>(blockIdx.x) * p.units_per_split;
  const int unit_end = min(unit_begin + p.units_per_split, units);
  w.block_begin = min(unit_begin, seq.num_blocks);
  w.blocks = max(min(unit_end, seq.num_blocks) - w.block_begin, 0);
  w.exact = seq.exact_tokens(unit_begin, unit_end, g.block_tokens);
  return w;
}

/// Loads the spans of one side of the CTA's blocks (two dependent loads per block, all at once).
template <class T>
__device__ void load_spans(const PrimitiveParams<T>& p, const SeqView<T>& seq, const CtaWork& w, format::Side side,
                           BlockSpan* spans) {
  const format::BlockGeometry& g = p.shape.geometry;
  const int lane = threadIdx.x & 31;
  for (int i = lane; i < w.blocks; i += 32) {
    const std::uint8_t* block = load_global(seq.blocks + w.block_begin + i);
    const auto* directory = reinterpret_cast<const std::uint32_t*>(block + g.directory_offset());
    const std::uint32_t k_offset = load_global(directory + 2 * w.kv_head);
    const std::uint32_t v_offset = load_global(directory + 2 * w.kv_head + 1);
    if (side == format::Side::k) {
      spans[i] = BlockSpan{block + k_offset, v_offset - k_offset, 0u};
    } else {
      // The next head's K section ends this V section, or the header's block size does.
      const std::uint32_t end = w.kv_head + 1 < g.num_heads
                                    ? load_global(directory + 2 * w.kv_head + 2)
                                    : load_global(reinterpret_cast<const std::uint32_t*>(block)) - format::kTrailingSlack;
      spans[i] = BlockSpan{block + v_offset, end - v_offset, 0u};
    }
  }
}

/// The stored order of tokens 16 r + 2 gq and + 1 of a block as their offsets in the block: one
/// 32-bit load (the read path makes no byte-wide global load); identity without a permutation.
struct TokenPair {
  int x, y;
};
__device__ __forceinline__ TokenPair token_pair(const std::uint8_t* order, int r, int gq) {
  const int idx = 16 * r + 2 * gq;
  if (order == nullptr) return TokenPair{idx, idx + 1};
  const std::uint32_t word = load_global(reinterpret_cast<const std::uint32_t*>(order) + idx / 4) >> (8 * (idx & 2));
  return TokenPair{static_cast<int>(word & 0xFFu), static_cast<int>((word >> 8) & 0xFFu)};
}

/// scores[h][t] = K_t . q[h]. NT n-tiles of 8 columns: 4 query heads (hi and lo halves) each;
/// kCompact: the blocks store compact parameters (format version 3); kChannelK: K's parameters are
/// per channel of a block.
template <class T, int D, int NT, bool kCompact, bool kChannelK>
__global__ void __launch_bounds__(32, 1) fast_scores_kernel(const PrimitiveParams<T> p) {
  constexpr int kSteps = D / 16;
  PACKKV_DYNAMIC_SHARED(shared_bytes);
  const format::BlockGeometry& g = p.shape.geometry;
  PrimitiveShared s;
  primitive_shared_layout(g, format::Side::k, p.stages, p.shape.heads_per_cta, shared_bytes, &s);
  const int lane = threadIdx.x & 31, gq = lane >> 2, t4 = lane & 3;
  const int b = blockIdx.z;
  const SeqView<T>& seq = p.seqs[b];
  const CtaWork w = cta_work(p, seq);
  if (w.blocks == 0 && w.exact.tail_first >= w.exact.end()) return;
  const SectionLayout kl = g.k_layout();
  const int rounds = g.block_tokens / format::kPackTokens;
  const std::size_t stage_bytes = primitive_stage_bytes(g, format::Side::k);
  const int q_head0 = w.kv_head * p.shape.group + w.first_head;  // the CTA's first query head
  float* scores = p.scores + p.first[b];
  const std::int64_t length = p.length[b];

  load_spans(p, seq, w, format::Side::k, s.spans);
  float q_abs = 0.0f;
  for (int i = lane; i < w.head_count * D; i += 32) {
    const float x = load_global_float(p.q + (static_cast<std::size_t>(b) * p.shape.num_q_heads + q_head0) * D + i);
    s.q[i] = x;
    q_abs = fmaxf(q_abs, fabsf(x));
  }
  q_abs = warp_max(q_abs);
  __syncwarp();
  const int q_exp = scale_exponent(q_abs);
  const float q_scale = exp2_int(q_exp), q_unscale = exp2_int(kSubnormalCodeExponent - q_exp);
  // B fragments of K.q and sum(q), as in fast attention.
  std::uint32_t qf[kSteps][NT][2];
  float sum_q[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int head = 4 * nt + gq / 2, part = gq & 1;
    const bool live = head < w.head_count;
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int c = 16 * ks + 2 * t4 + 8 * h;
        const float x0 = live ? s.q[head * D + c] * q_scale : 0.0f, x1 = live ? s.q[head * D + c + 1] * q_scale : 0.0f;
        const Split2 s0 = split_half(x0), s1 = split_half(x1);
        qf[ks][nt][h] = part == 0 ? half2_bits(s0.hi, s1.hi) : half2_bits(s0.lo, s1.lo);
      }
    }
    const int score_head = 4 * nt + t4;
    float sum = 0.0f;
    if (!kChannelK && score_head < w.head_count) {
      for (int c = 0; c < D; ++c) sum += s.q[score_head * D + c];
    }
    sum_q[nt] = sum;
  }

  start_staging(s.spans, w.blocks, s.stages, stage_bytes, p.stages);
  int stage = 0;
  for (int i = 0; i < w.blocks; ++i) {
    const std::uint8_t* k_sec = next_staged_block(s.spans, i, w.blocks, s.stages, stage_bytes, p.stages, stage);
    const StagedParams<kCompact> k_params(k_sec, kl);
    ChannelKq channel{};
    if constexpr (kChannelK) channel = channel_k_fragments<D, NT>(s.q, w.head_count, q_abs, k_params, qf);
    const std::uint8_t* order = format::token_order(load_global(seq.blocks + w.block_begin + i), g, w.kv_head);
    const std::int64_t block_position = static_cast<std::int64_t>(w.block_begin + i) * g.block_tokens;
    const int hidden = seq.hidden_below(w.block_begin + i);  // the sink rows write those scores
    for (int r = 0; r < rounds; ++r) {
      std::uint8_t* tile = s.tiles + (r & 1) * 16 * D;
      decode_round<D>(k_sec, kl, r, tile);
      __syncwarp();
      float c[NT][4];
      kq_round<D, NT>(tile, qf, c);
      // Per-token K: q . k_t = step_t * (q . codes_t) + min_t * sum(q), tokens 2 gq + j; per-channel
      // K: (q * steps) . codes_t + q . mins (channel_k_fragments).
      const std::uint64_t kp = kChannelK ? 0u : k_params.pair(16 * r + 2 * gq);
      const TokenPair token = token_pair(order, r, gq);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int head = 4 * nt + t4;
        if (head >= w.head_count) continue;
        float* row = scores + static_cast<std::int64_t>(q_head0 + head) * length + block_position;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int at = j == 0 ? token.x : token.y;
          if (at < hidden) continue;
          if constexpr (kChannelK) {
            row[at] = (c[nt][2 * j] + c[nt][2 * j + 1]) * channel.unscale + channel.k_const[nt];
          } else {
            const float dot = (c[nt][2 * j] + c[nt][2 * j + 1]) * q_unscale;
            const float step = k_params.step(kp, j);
            row[at] = step * dot + k_params.minimum(kp, j, step) * sum_q[nt];
          }
        }
      }
    }
    __syncwarp();  // the stage is refilled by the next iteration's copies
  }
  cp_async_wait<0>();

  // Exact tokens (the tail's, then the sink rows), in order: one warp dot product per (token, head).
  const std::size_t row_elems = static_cast<std::size_t>(g.num_heads) * D;
  for (int t = w.exact.tail_first; t < w.exact.end(); ++t) {
    const ExactRow<T> token = seq.exact_row(w.exact, t, row_elems);
    const T* k_row = token.k + static_cast<std::size_t>(w.kv_head) * D;
    float k[D / 32];
#pragma unroll
    for (int i = 0; i < D / 32; ++i) k[i] = load_global_float(k_row + lane + 32 * i);
    const std::int64_t position = token.position;
    for (int h = 0; h < w.head_count; ++h) {
      float dot = 0.0f;
#pragma unroll
      for (int i = 0; i < D / 32; ++i) dot += s.q[h * D + lane + 32 * i] * k[i];
      dot = warp_sum(dot);
      if (lane == 0) scores[static_cast<std::int64_t>(q_head0 + h) * length + position] = dot;
    }
  }
}

/// out[h][c] = sum_t weights[h][t] V_t[c]. NT n-tiles of 8 columns: 4 query heads (hi and lo);
/// kCompact: the blocks store compact parameters (format version 3).
template <class T, int D, int NT, bool kCompact>
__global__ void __launch_bounds__(32, 1) fast_attn_v_kernel(const PrimitiveParams<T> p) {
  constexpr int kSteps = D / 16;
  PACKKV_DYNAMIC_SHARED(shared_bytes);
  const format::BlockGeometry& g = p.shape.geometry;
  PrimitiveShared s;
  primitive_shared_layout(g, format::Side::v, p.stages, p.shape.heads_per_cta, shared_bytes, &s);
  const int lane = threadIdx.x & 31, gq = lane >> 2, t4 = lane & 3;
  const int b = blockIdx.z, split = blockIdx.x;
  const SeqView<T>& seq = p.seqs[b];
  const CtaWork w = cta_work(p, seq);
  if (w.head_count <= 0) return;
  const SectionLayout vl = g.v_layout();
  const int rounds = g.block_tokens / format::kPackTokens;
  const std::size_t stage_bytes = primitive_stage_bytes(g, format::Side::v);
  const int q_head0 = w.kv_head * p.shape.group + w.first_head;
  const float* weights = p.weights + p.first[b];
  const std::int64_t length = p.length[b];

  load_spans(p, seq, w, format::Side::v, s.spans);
  __syncwarp();

  // acc: (channel 16 mt + gq (+8), head t4 + 4 nt hi | lo) in units 2^-(w_exp + 24); w_min: this
  // lane's part of sum_t w_t min_t for head t4 + 4 nt. The weight scale 2^w_exp only goes down (a
  // chunk with larger products lowers it and rescales acc), so the factor is at most 1.
  float acc[NT][kSteps][4];
  float w_min[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    w_min[nt] = 0.0f;
#pragma unroll
    for (int mt = 0; mt < kSteps; ++mt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[nt][mt][e] = 0.0f;
  }
  int w_exp = 100;  // the largest scale_exponent gives

  start_staging(s.spans, w.blocks, s.stages, stage_bytes, p.stages);
  int stage = 0;
  for (int i = 0; i < w.blocks; ++i) {
    const std::uint8_t* v_sec = next_staged_block(s.spans, i, w.blocks, s.stages, stage_bytes, p.stages, stage);
    const StagedParams<kCompact> v_params(v_sec, vl);
    const std::uint8_t* order = format::token_order(load_global(seq.blocks + w.block_begin + i), g, w.kv_head);
    const std::int64_t block_position = static_cast<std::int64_t>(w.block_begin + i) * g.block_tokens;
    const int hidden = seq.hidden_below(w.block_begin + i);  // the sink rows take those weights
    for (int r0 = 0; r0 < rounds; r0 += 4) {
      const int chunk = min(4, rounds - r0);
      // The chunk's weights times V steps (tokens 2 gq + j of each round, head t4 + 4 nt).
      float ws[4][2][NT];
      float largest = 0.0f;
#pragma unroll
      for (int rr = 0; rr < 4; ++rr) {
        if (rr >= chunk) break;
        const int r = r0 + rr;
        const std::uint64_t vp = v_params.pair(16 * r + 2 * gq);
        const TokenPair token = token_pair(order, r, gq);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int head = 4 * nt + t4;
          const float* row = weights + static_cast<std::int64_t>(q_head0 + min(head, w.head_count - 1)) * length +
                             block_position;
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int at = j == 0 ? token.x : token.y;
            const float wt = head < w.head_count && at >= hidden ? load_global(row + at) : 0.0f;
            const float step = v_params.step(vp, j);
            w_min[nt] += wt * v_params.minimum(vp, j, step);
            ws[rr][j][nt] = wt * step;
            largest = fmaxf(largest, fabsf(ws[rr][j][nt]));
          }
        }
      }
      // A chunk of zero weights keeps the scale (scale_exponent gives 0 for 0).
      const float chunk_largest = warp_max(largest);
      const int chunk_exp = chunk_largest > 0.0f ? min(w_exp, scale_exponent(chunk_largest)) : w_exp;
      const float factor = exp2_int(max(chunk_exp - w_exp, -126)), weight_scale = exp2_int(chunk_exp);
      w_exp = chunk_exp;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int mt = 0; mt < kSteps; ++mt)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[nt][mt][e] *= factor;
#pragma unroll
      for (int rr = 0; rr < 4; ++rr) {
        if (rr >= chunk) break;
        const int r = r0 + rr;
        std::uint8_t* tile = s.tiles + (r & 1) * 16 * D;
        decode_round<D>(v_sec, vl, r, tile);
        __syncwarp();
        // The weights as mma B fragments.
        std::uint32_t bf[NT][2];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) weight_fragment(ws[rr][0][nt] * weight_scale, ws[rr][1][nt] * weight_scale, bf[nt]);
        pv_round<D, NT>(tile, bf, acc);
      }
    }
    __syncwarp();  // the stage is refilled by the next iteration's copies
  }
  cp_async_wait<0>();

  // The packed part in value units, then the tail tokens added as they are.
  const float unscale = exp2_int(kSubnormalCodeExponent - w_exp);
  float out[NT][kSteps][2];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int mt = 0; mt < kSteps; ++mt) {
      out[nt][mt][0] = (acc[nt][mt][0] + acc[nt][mt][1]) * unscale;
      out[nt][mt][1] = (acc[nt][mt][2] + acc[nt][mt][3]) * unscale;
    }
  const std::size_t row_elems = static_cast<std::size_t>(g.num_heads) * D;
  for (int t = w.exact.tail_first; t < w.exact.end(); ++t) {
    const ExactRow<T> token = seq.exact_row(w.exact, t, row_elems);
    const T* v_row = token.v + static_cast<std::size_t>(w.kv_head) * D;
    const std::int64_t position = token.position;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int head = 4 * nt + t4;
      if (head >= w.head_count) continue;
      const float wt = load_global(weights + static_cast<std::int64_t>(q_head0 + head) * length + position);
#pragma unroll
      for (int mt = 0; mt < kSteps; ++mt) {
        out[nt][mt][0] += wt * load_global_float(v_row + 16 * mt + gq);
        out[nt][mt][1] += wt * load_global_float(v_row + 16 * mt + gq + 8);
      }
    }
  }

  // ---- partial sums, then the sum by the last CTA --------------------------------------------
  const std::size_t head_base = static_cast<std::size_t>(b) * p.shape.num_q_heads + q_head0;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    float m = w_min[nt];
#pragma unroll
    for (int x = 4; x < 32; x <<= 1) m += __shfl_xor_sync(kFullMask, m, x);
    const int head = 4 * nt + t4;
    if (head < w.head_count) {
      float* part = p.partials + ((head_base + head) * p.num_splits + split) * D;
#pragma unroll
      for (int mt = 0; mt < kSteps; ++mt) {
        part[16 * mt + gq] = out[nt][mt][0] + m;
        part[16 * mt + gq + 8] = out[nt][mt][1] + m;
      }
    }
  }
  __threadfence();
  __syncwarp();
  unsigned ticket = 0;
  unsigned* counter = p.tickets + (static_cast<std::size_t>(b) * gridDim.y + blockIdx.y);
  if (lane == 0) ticket = atomicAdd(counter, 1u);
  ticket = __shfl_sync(kFullMask, ticket, 0);
  if (ticket != static_cast<unsigned>(p.num_splits) - 1u) return;
  __syncwarp();
  __threadfence();
  for (int h = 0; h < w.head_count; ++h) {
    const float* parts = p.partials + (head_base + h) * p.num_splits * D;
    float* dst = p.out + (head_base + h) * D;
    for (int c = lane; c < D; c += 32) {
      float sum = 0.0f;
      for (int sp = 0; sp < p.num_splits; ++sp) sum += load_coherent(parts + sp * D + c);
      dst[c] = sum;
    }
  }
  if (lane == 0) atomicExch(reinterpret_cast<int*>(counter), 0);  // ready for the next launch
}

template <class T, int D, int NT, bool kCompact, bool kChannelK>
cudaError_t launch_scores_kernel(const PrimitiveParams<T>& p, std::size_t shared, cudaStream_t stream) {
  static const cudaError_t attribute = opt_in_shared_memory(fast_scores_kernel<T, D, NT, kCompact, kChannelK>);
  if (attribute != cudaSuccess) return attribute;
  const dim3 grid(static_cast<unsigned>(p.num_splits), static_cast<unsigned>(p.shape.geometry.num_heads * p.shape.subgroups),
                  static_cast<unsigned>(p.batch));
  PACKKV_LAUNCH((fast_scores_kernel<T, D, NT, kCompact, kChannelK>), grid, 32, shared, stream, p);
  return cudaGetLastError();
}

template <class T, int D, int NT, bool kCompact>
cudaError_t launch_attn_v_kernel(const PrimitiveParams<T>& p, std::size_t shared, cudaStream_t stream) {
  static const cudaError_t attribute = opt_in_shared_memory(fast_attn_v_kernel<T, D, NT, kCompact>);
  if (attribute != cudaSuccess) return attribute;
  const dim3 grid(static_cast<unsigned>(p.num_splits), static_cast<unsigned>(p.shape.geometry.num_heads * p.shape.subgroups),
                  static_cast<unsigned>(p.batch));
  PACKKV_LAUNCH((fast_attn_v_kernel<T, D, NT, kCompact>), grid, 32, shared, stream, p);
  return cudaGetLastError();
}

}  // namespace

FastPlan plan_fast_primitive(const ReadShape& shape, int shared_limit, format::Side side) {
  return plan_fast_kernels(shape, shared_limit, [&](int stages, int heads) {
    return primitive_shared_layout(shape.geometry, side, stages, heads, nullptr, nullptr);
  });
}

template <class T>
cudaError_t launch_fast_scores(const PrimitiveParams<T>& p, std::size_t shared, cudaStream_t stream) {
  return launch_fast_instantiation<true>(p.shape, [&]<int D, int NT, bool kCompact, bool kChannelK>() {
    return launch_scores_kernel<T, D, NT, kCompact, kChannelK>(p, shared, stream);
  });
}

template <class T>
cudaError_t launch_fast_attn_v(const PrimitiveParams<T>& p, std::size_t shared, cudaStream_t stream) {
  return launch_fast_instantiation<false>(p.shape, [&]<int D, int NT, bool kCompact, bool>() {
    return launch_attn_v_kernel<T, D, NT, kCompact>(p, shared, stream);
  });
}

#define PACKKV_INSTANTIATE_PRIMITIVES(T)                                                                    \
  template cudaError_t launch_fast_scores<T>(const PrimitiveParams<T>&, std::size_t, cudaStream_t); \
  template cudaError_t launch_fast_attn_v<T>(const PrimitiveParams<T>&, std::size_t, cudaStream_t);
PACKKV_INSTANTIATE_PRIMITIVES(float)
PACKKV_INSTANTIATE_PRIMITIVES(fp16_t)
PACKKV_INSTANTIATE_PRIMITIVES(bf16_t)
#undef PACKKV_INSTANTIATE_PRIMITIVES

}  // namespace packkv::detail::cuda

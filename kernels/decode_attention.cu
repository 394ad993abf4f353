// The read path built for the bandwidth: fused decode attention straight from packed blocks, one
// warp per CTA, head_dim 64, 96, 128 or 256 (up to 8 query heads of a KV head per CTA; 4 at 256), K
// quantized per token or per channel. Other head dims use the kernels of attention.cu.
//
// Each CTA owns one (sequence, KV head, query subgroup) and a range of units (packed blocks, then
// block-sized chunks of the tail). Per packed block:
//   1. cp.async stages the head's K and V sections (one contiguous span) into shared memory,
//      kStages - 1 blocks ahead; block pointers and directory entries are loaded once per CTA.
//   2. A round (16 tokens) of a section is decoded by the whole warp: lane l owns channels
//      [l * D/32, (l + 1) * D/32) and finds its packs' offsets with one warp scan of the widths;
//      each 8-value group is spread from w-bit fields to bytes with shifts and byte permutes, the
//      pack minimum added bytewise, and a channel's 16 codes stored as one 16-byte row of a byte
//      tile (rows swizzled so that stores and ldmatrix reads are free of bank conflicts).
//   3. ldmatrix moves four 8x16-byte tiles into mma fragments; one byte permute per two codes makes
//      them the exact fp16 subnormals code * 2^-24 (no I2F, no subtraction; the 2^24 is folded into
//      the fp32 scales); mma.m16n8k16 multiplies
//      with q (K.q) or with the softmax weights (P.V). q and the weights are split into two fp16
//      halves (hi + lo: 22 significant bits) and accumulate in fp32. With per-channel K the q
//      fragments are rebuilt per block as q times the block's channel steps (channel_k_fragments).
//   4. The online softmax works per chunk of up to 4 rounds; the weights of a chunk are scaled by a
//      power of two chosen from the chunk's largest V step, so that their fp16 halves stay normal.
// The CTA's partial result goes to a workspace; the last CTA of a (sequence, KV head, subgroup) to
// finish merges the partials (a ticket counter, reset by the merger), so one launch does all.
//
// Where the result differs from the CPU backend: every product and sum is fp32 and exact up to
// rounding, q and the weights carry 22 significant bits instead of 24; the tests compare within
// the fp32 tolerance of the storage type.
#include <algorithm>
#include <cstdint>

#include "core/softmax_merge.hpp"
#include "detail/fast_decode.cuh"
#include "detail/packed_block.cuh"
#include "detail/primitives.cuh"
#include "launch.hpp"

namespace packkv::detail::cuda {

namespace {

using format::SectionLayout;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct FastShared {
  BlockSpan* spans;       // [kFastMaxBlocksPerCta]
  std::uint8_t* stages;   // [stages][stage_bytes]
  std::uint8_t* tiles;    // [2][D][16]
  float* q;               // [heads][D]
};

__host__ __device__ std::size_t fast_shared_layout(const format::BlockGeometry& g, int stages, int heads,
                                                   unsigned char* base, FastShared* out) {
  SharedCarver carve{base};
  FastShared s{};
  s.spans = carve.take_array<BlockSpan>(kFastMaxBlocksPerCta);
  s.stages = carve.take(static_cast<std::size_t>(stages) * fast_stage_bytes(g));
  s.tiles = carve.take(2u * 16u * static_cast<std::size_t>(g.head_dim));
  s.q = carve.take_array<float>(static_cast<std::size_t>(heads) * g.head_dim);
  if (out != nullptr) *out = s;
  return carve.used;
}

__device__ void report_bad_query(const ErrorContext& ctx, int batch_index, int head, int channel, float value) {
  DeviceError* e = ctx.error;
  if (e == nullptr) return;
  if (atomicCAS(ctx.claim, 0, 1) != 0) return;
  e->kind = kBadQuery;
  e->tensor = 2;
  e->layer = ctx.layer;
  e->head = head;
  e->channel = channel;
  e->sequence = ctx.sequence + static_cast<std::uint64_t>(batch_index);  // the call's batch entry
  e->token = -1;
  e->value = value;
  e->value2 = 0.0f;
  __threadfence_system();
  e->ready = 1;
  __threadfence_system();
}

/// Mask of one block for a lane: bit 2 r + j of bits[nt] says that the lane's token 2 gq + j of
/// round r lies at or past the limit of its row of n-tile nt (causal), or below `hidden_below`
/// (the first block's copies of the sinks, which the exact rows replace). Out of line: only the
/// blocks holding a CTA's newest positions (several queries per sequence) and the first block of
/// a layer with sinks need it.
struct MaskBits {
  std::uint32_t bits[2];
};
__device__ PACKKV_NOINLINE MaskBits block_mask_bits(const std::uint8_t* order, std::int64_t block_position, int rounds,
                                                 int gq, std::int64_t limit0, std::int64_t limit1, int hidden_below) {
  MaskBits m{{0u, 0u}};
  for (int r = 0; r < rounds; ++r) {
    for (int j = 0; j < 2; ++j) {
      const int idx = 16 * r + 2 * gq + j;
      // The stored order as 32-bit loads: the read path makes no byte-wide global load.
      const int stored =
          order == nullptr
              ? idx
              : static_cast<int>((load_global(reinterpret_cast<const std::uint32_t*>(order) + idx / 4) >> (8 * (idx & 3))) &
                                 0xFFu);
      const bool hidden = stored < hidden_below;
      if (hidden || block_position + stored >= limit0) m.bits[0] |= 1u << (2 * r + j);
      if (hidden || block_position + stored >= limit1) m.bits[1] |= 1u << (2 * r + j);
    }
  }
  return m;
}

/// The fused attention kernel. NT n-tiles of 8 columns: 4 query heads (hi and lo halves) each;
/// kCompact: the blocks store compact parameters (format version 3); kChannelK: K's parameters
/// are per channel of a block.
template <class T, int D, int NT, bool kCompact, bool kChannelK>
__global__ void __launch_bounds__(32, 1) fast_attention_kernel(const AttentionParams<T> p) {
  constexpr int kSteps = D / 16;    // k-steps of K.q and m-tiles of P.V
  PACKKV_DYNAMIC_SHARED(shared_bytes);
  const format::BlockGeometry& g = p.shape.geometry;
  FastShared s;
  fast_shared_layout(g, p.stages, p.shape.heads_per_cta, shared_bytes, &s);
  const int lane = threadIdx.x & 31, gq = lane >> 2, t4 = lane & 3;
  const int batch_index = blockIdx.z, split = blockIdx.x;
  const SeqView<T>& seq = p.seqs[batch_index];
  // The CTA's query rows (AttentionParams): "head" below is a row, a (query, query head) pair.
  const auto rows = p.cta_rows(batch_index, blockIdx.y);
  if (rows.count <= 0) return;  // this sequence has fewer rows than the longest
  const int kv_head = rows.kv_head, first_row = rows.first, head_count = rows.count;
  const SectionLayout kl = g.k_layout(), vl = g.v_layout();
  const int rounds = g.block_tokens / format::kPackTokens;
  const std::size_t stage_bytes = fast_stage_bytes(g);

  // ---- the CTA's units: packed blocks [block_begin, block_end), then exact tokens (tail, sinks) -
  const int units = seq.num_units(g.block_tokens);
  const int unit_begin = split * p.units_per_split;
  const int unit_end = min(unit_begin + p.units_per_split, units);
  const int block_begin = min(unit_begin, seq.num_blocks), block_end = min(unit_end, seq.num_blocks);
  const int blocks = block_end - block_begin;
  const ExactTokens exact = seq.exact_tokens(unit_begin, unit_end, g.block_tokens);

  // Block spans: two dependent loads per block, all blocks of the CTA at once.
  for (int i = lane; i < blocks; i += 32) {
    const std::uint8_t* block = load_global(seq.blocks + block_begin + i);
    // Entries h and h + 1 (the next K section ends this head's span), or the header's block size.
    const auto* directory = reinterpret_cast<const std::uint32_t*>(block + g.directory_offset());
    const std::uint32_t k_offset = load_global(directory + 2 * kv_head), v_offset = load_global(directory + 2 * kv_head + 1);
    const std::uint32_t end = kv_head + 1 < g.num_heads
                                  ? load_global(directory + 2 * kv_head + 2)
                                  : load_global(reinterpret_cast<const std::uint32_t*>(block)) - format::kTrailingSlack;
    s.spans[i] = BlockSpan{block + k_offset, end - k_offset, v_offset - k_offset};
  }

  // Queries: as float in shared memory (the tail path), and as mma fragments scaled by 2^qs.
  float q_abs = 0.0f;
  for (int i = lane; i < head_count * D; i += 32) {
    const int row = first_row + i / D;
    const float x = load_global_float(p.q + p.query_row(batch_index, kv_head, row) * D + i % D);
    if (!isfinite(x)) report_bad_query(p.errors, batch_index, kv_head * p.shape.group + row % p.shape.group, i % D, x);
    s.q[i] = x;
    q_abs = fmaxf(q_abs, fabsf(x));
  }
  q_abs = warp_max(q_abs);
  __syncwarp();
  const int q_exp = scale_exponent(q_abs);
  // The codes enter the mma as code * 2^-24 (codes_to_half2): 2^24 comes back with q's unscale.
  const float q_scale = exp2_int(q_exp), q_unscale = exp2_int(kSubnormalCodeExponent - q_exp);
  // B fragment of K.q: b0 = (channels 2t4, 2t4+1 of k-step ks; column gq), b1 = channels + 8.
  // Column n = 2 * head + part: part 0 holds the hi half of q * 2^qs, part 1 the lo half.
  std::uint32_t qf[kSteps][NT][2];
  float sum_q[NT];  // sum of q over channels, of this lane's score head (t4 + 4 nt)
  // Causal mask: the lane's score rows see positions below row_limit; every row of the CTA sees
  // those below min_limit (its first row's), so only the newest units need a look.
  std::int64_t row_limit[NT];
  const std::int64_t min_limit = p.row_limit(batch_index, first_row);
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int head = 4 * nt + gq / 2, part = gq & 1;
    const bool live = head < head_count;
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
#pragma unroll
      for (int b = 0; b < 2; ++b) {
        const int c = 16 * ks + 2 * t4 + 8 * b;
        float x0 = live ? s.q[head * D + c] * q_scale : 0.0f, x1 = live ? s.q[head * D + c + 1] * q_scale : 0.0f;
        const Split2 s0 = split_half(x0), s1 = split_half(x1);
        qf[ks][nt][b] = part == 0 ? half2_bits(s0.hi, s1.hi) : half2_bits(s0.lo, s1.lo);
      }
    }
    const int score_head = 4 * nt + t4;
    row_limit[nt] = p.row_limit(batch_index, first_row + min(score_head, head_count - 1));
    float sum = 0.0f;
    if (!kChannelK && score_head < head_count) {
      for (int c = 0; c < D; ++c) sum += s.q[score_head * D + c];
    }
    sum_q[nt] = sum;
  }

  // ---- running state ----------------------------------------------------------------------
  float acc[NT][kSteps][4];  // P.V: (channel 16 mt + gq (+8), head t4 + 4 nt hi | lo) in units 2^(-v_exp-24)
  float run_max[NT], run_sum[NT], run_min[NT];  // log2-domain max; per-lane partial sums
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    run_max[nt] = -INFINITY;
    run_sum[nt] = 0.0f;
    run_min[nt] = 0.0f;
#pragma unroll
    for (int mt = 0; mt < kSteps; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[nt][mt][i] = 0.0f;
  }
  int v_exp = 0;
  const float score_scale = p.softmax_scale * kLog2e;
  __syncwarp();  // spans

  // ---- packed blocks -------------------------------------------------------------------------
  start_staging(s.spans, blocks, s.stages, stage_bytes, p.stages);

  int stage = 0;
  for (int i = 0; i < blocks; ++i) {
    const std::uint8_t* k_sec = next_staged_block(s.spans, i, blocks, s.stages, stage_bytes, p.stages, stage);
    const std::uint8_t* v_sec = k_sec + s.spans[i].v_offset;
    const StagedParams<kCompact> k_params(k_sec, kl), v_params(v_sec, vl);
    ChannelKq channel{};
    if constexpr (kChannelK) channel = channel_k_fragments<D, NT>(s.q, head_count, q_abs, k_params, qf);
    // Mask (several queries, or sinks): bit 2 r + j of masked[nt] says that the lane's token
    // 2 gq + j of round r is at or past row t4 + 4 nt's limit, or a sink's copy. Worked out once
    // per block, and only for the blocks that hold a CTA's newest positions and a layer's first
    // block when it has sinks; the rounds below only test bits.
    MaskBits masked{};
    const std::int64_t block_position = static_cast<std::int64_t>(block_begin + i) * g.block_tokens;
    const int hidden = seq.hidden_below(block_begin + i);
    if (block_position + g.block_tokens > min_limit || hidden > 0) {
      masked = block_mask_bits(format::token_order(load_global(seq.blocks + block_begin + i), g, kv_head),
                               block_position, rounds, gq, row_limit[0], NT > 1 ? row_limit[NT - 1] : row_limit[0],
                               hidden);
    }

    for (int r0 = 0; r0 < rounds; r0 += 4) {
      const int chunk = min(4, rounds - r0);
      // K.q: scores of tokens 2 gq and 2 gq + 1 of each round, head t4 + 4 nt (log2 domain).
      float score[4][2][NT];
#pragma unroll
      for (int rr = 0; rr < 4; ++rr) {
        if (rr >= chunk) break;
        const int r = r0 + rr;
        std::uint8_t* tile = s.tiles + (r & 1) * 16 * D;
        decode_round<D>(k_sec, kl, r, tile);
        __syncwarp();
        float c[NT][4];
        kq_round<D, NT>(tile, qf, c);
        if constexpr (kChannelK) {
          // Per-channel K: q . k_t = (q * steps) . codes_t + q . mins (channel_k_fragments).
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int j = 0; j < 2; ++j)
              score[rr][j][nt] = ((c[nt][2 * j] + c[nt][2 * j + 1]) * channel.unscale + channel.k_const[nt]) * score_scale;
        } else {
          // Per-token K: q . k_t = step_t * (q . codes_t) + min_t * sum(q).
          const std::uint64_t kp = k_params.pair(16 * r + 2 * gq);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
            for (int j = 0; j < 2; ++j) {
              const float dot = (c[nt][2 * j] + c[nt][2 * j + 1]) * q_unscale;
              const float step = k_params.step(kp, j);
              const float sc = step * dot + k_params.minimum(kp, j, step) * sum_q[nt];
              score[rr][j][nt] = sc * score_scale;
            }
          }
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            if ((masked.bits[nt] >> (2 * r + j)) & 1u) score[rr][j][nt] = -INFINITY;
          }
        }
      }
      // Online softmax over the chunk; the V steps of the chunk's tokens choose the weight scale.
      std::uint64_t vp[4];
      float v_max = 0.0f;
#pragma unroll
      for (int rr = 0; rr < 4; ++rr) {
        if (rr >= chunk) break;
        vp[rr] = v_params.pair(16 * (r0 + rr) + 2 * gq);
#pragma unroll
        for (int j = 0; j < 2; ++j) v_max = fmaxf(v_max, v_params.step(vp[rr], j));
      }
      const int chunk_exp = scale_exponent(warp_max(v_max));
      const float weight_scale = exp2_int(chunk_exp);
      float factor[NT];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        float m = -INFINITY;
#pragma unroll
        for (int rr = 0; rr < 4; ++rr) {
          if (rr >= chunk) break;
          m = fmaxf(m, fmaxf(score[rr][0][nt], score[rr][1][nt]));
        }
        m = fmaxf(m, __shfl_xor_sync(kFullMask, m, 4));
        m = fmaxf(m, __shfl_xor_sync(kFullMask, m, 8));
        m = fmaxf(m, __shfl_xor_sync(kFullMask, m, 16));
        const float new_max = fmaxf(run_max[nt], m);
        // A row that has seen only masked keys keeps max -inf and weights 0 (never -inf - -inf).
        const float reference = new_max == -INFINITY ? 0.0f : new_max;
        const float rescale = exp2f(run_max[nt] - reference);  // 0 for the first keys (-inf)
        float sum = 0.0f, weighted_min = 0.0f;
#pragma unroll
        for (int rr = 0; rr < 4; ++rr) {
          if (rr >= chunk) break;
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const float w = exp2f(score[rr][j][nt] - reference);
            score[rr][j][nt] = w;
            sum += w;
            weighted_min += w * v_params.minimum(vp[rr], j, v_params.step(vp[rr], j));
          }
        }
        run_sum[nt] = run_sum[nt] * rescale + sum;
        run_min[nt] = run_min[nt] * rescale + weighted_min;
        run_max[nt] = new_max;
        factor[nt] = rescale * exp2_int(chunk_exp - v_exp);
      }
      v_exp = chunk_exp;
      // The accumulator holds head t4 + 4 nt: one factor per lane and n-tile.
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int mt = 0; mt < kSteps; ++mt)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[nt][mt][e] *= factor[nt];
      __syncwarp();  // with one round per chunk, V's decode reuses the tile K.q just read
      // P.V over the chunk's rounds.
#pragma unroll
      for (int rr = 0; rr < 4; ++rr) {
        if (rr >= chunk) break;
        const int r = r0 + rr;
        std::uint8_t* tile = s.tiles + (r & 1) * 16 * D;
        decode_round<D>(v_sec, vl, r, tile);
        __syncwarp();
        // Weights times the V steps of their tokens, as mma B fragments.
        std::uint32_t b[NT][2];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          float w[2];
#pragma unroll
          for (int j = 0; j < 2; ++j)
            w[j] = score[rr][j][nt] * v_params.step(vp[rr], j) * weight_scale;
          weight_fragment(w[0], w[1], b[nt]);
        }
        pv_round<D, NT>(tile, b, acc);
      }
    }
    __syncwarp();  // the stage is refilled by the next iteration's copies
  }
  cp_async_wait<0>();

  // ---- exact tokens: the tail's, then the sink rows ----------------------------------------
  // Exact values join the accumulators in their units: 2^(v_exp - 24), as the packed codes.
  const float v_scale = exp2_int(v_exp - kSubnormalCodeExponent);
  const std::size_t row_elems = static_cast<std::size_t>(g.num_heads) * D;
  for (int t = exact.tail_first; t < exact.end(); ++t) {
    const ExactRow<T> token = seq.exact_row(exact, t, row_elems);
    const T* k_row = token.k + static_cast<std::size_t>(kv_head) * D;
    const T* v_row = token.v + static_cast<std::size_t>(kv_head) * D;
    float k[D / 32];
#pragma unroll
    for (int i = 0; i < D / 32; ++i) k[i] = load_global_float(k_row + lane + 32 * i);
    float mine[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) mine[nt] = 0.0f;
    for (int h = 0; h < head_count; ++h) {
      float dot = 0.0f;
#pragma unroll
      for (int i = 0; i < D / 32; ++i) dot += s.q[h * D + lane + 32 * i] * k[i];
      dot = warp_sum(dot);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) mine[nt] = h == 4 * nt + t4 ? dot : mine[nt];
    }
    const std::int64_t position = token.position;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const float sc = position < row_limit[nt] ? mine[nt] * score_scale : -INFINITY;
      const float new_max = fmaxf(run_max[nt], sc);
      const float reference = new_max == -INFINITY ? 0.0f : new_max;
      const float rescale = exp2f(run_max[nt] - reference), w = exp2f(sc - reference);
      run_sum[nt] = run_sum[nt] * rescale + (gq == 0 ? w : 0.0f);
      run_min[nt] *= rescale;
      run_max[nt] = new_max;
      const float wv = w * v_scale;
#pragma unroll
      for (int mt = 0; mt < kSteps; ++mt) {
        const float v0 = load_global_float(v_row + 16 * mt + gq);
        const float v1 = load_global_float(v_row + 16 * mt + gq + 8);
        acc[nt][mt][0] = acc[nt][mt][0] * rescale + wv * v0;
        acc[nt][mt][1] *= rescale;
        acc[nt][mt][2] = acc[nt][mt][2] * rescale + wv * v1;
        acc[nt][mt][3] *= rescale;
      }
    }
  }

  // ---- partial result, then the merge by the last CTA -----------------------------------------
  const int stride = D + 2;
  const float v_unscale = exp2_int(kSubnormalCodeExponent - v_exp);
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    float l = run_sum[nt], wmin = run_min[nt];
#pragma unroll
    for (int x = 4; x < 32; x <<= 1) {
      l += __shfl_xor_sync(kFullMask, l, x);
      wmin += __shfl_xor_sync(kFullMask, wmin, x);
    }
    const int head = 4 * nt + t4;
    if (head < head_count) {
      const std::size_t base = (p.query_row(batch_index, kv_head, first_row + head) * p.num_splits + split) * stride;
#pragma unroll
      for (int mt = 0; mt < kSteps; ++mt) {
        p.partials[base + 16 * mt + gq] = (acc[nt][mt][0] + acc[nt][mt][1]) * v_unscale + wmin;
        p.partials[base + 16 * mt + gq + 8] = (acc[nt][mt][2] + acc[nt][mt][3]) * v_unscale + wmin;
      }
      if (gq == 0) {
        p.partials[base + D] = run_max[nt] * kLn2;  // natural-log units, as SoftmaxMerge expects
        p.partials[base + D + 1] = l;
      }
    }
  }
  __threadfence();
  __syncwarp();
  unsigned ticket = 0;
  unsigned* counter = p.tickets + (static_cast<std::size_t>(batch_index) * gridDim.y + blockIdx.y);
  if (lane == 0) ticket = atomicAdd(counter, 1u);
  ticket = __shfl_sync(kFullMask, ticket, 0);
  if (ticket != static_cast<unsigned>(p.num_splits) - 1u) return;
  // The shuffle only moves the ticket: lane 0's atomic ordered the other CTAs' partials before
  // lane 0, and this barrier orders them before every lane's reads.
  __syncwarp();
  __threadfence();
  for (int h = 0; h < head_count; ++h) {
    const std::size_t out_row = p.query_row(batch_index, kv_head, first_row + h);
    T* out = p.out + out_row * D;
    const float* parts = p.partials + out_row * p.num_splits * stride;
    SoftmaxMerge merge;
    for (int sp = 0; sp < p.num_splits; ++sp) merge.observe(load_coherent(parts + sp * stride + D));
    for (int sp = 0; sp < p.num_splits; ++sp)
      merge.add(load_coherent(parts + sp * stride + D), load_coherent(parts + sp * stride + D + 1));
    for (int c = lane; c < D; c += 32) {
      float sum = 0.0f;
      for (int sp = 0; sp < p.num_splits; ++sp) {
        const float w = merge.weight(load_coherent(parts + sp * stride + D));
        if (w != 0.0f) sum += load_coherent(parts + sp * stride + c) * w;
      }
      out[c] = from_float<T>(sum / merge.sum);
    }
    if (p.lse != nullptr && lane == 0) p.lse[out_row] = merge.lse();
  }
  if (lane == 0) atomicExch(reinterpret_cast<int*>(counter), 0);  // ready for the next launch
}

template <class T, int D, int NT, bool kCompact, bool kChannelK>
cudaError_t launch_fast_kernel(const AttentionParams<T>& p, std::size_t shared, cudaStream_t stream) {
  static const cudaError_t attribute = opt_in_shared_memory(fast_attention_kernel<T, D, NT, kCompact, kChannelK>);
  if (attribute != cudaSuccess) return attribute;
  const dim3 grid(static_cast<unsigned>(p.num_splits), static_cast<unsigned>(p.shape.geometry.num_heads * p.shape.subgroups),
                  static_cast<unsigned>(p.batch));
  PACKKV_LAUNCH((fast_attention_kernel<T, D, NT, kCompact, kChannelK>), grid, 32, shared, stream, p);
  return cudaGetLastError();
}

}  // namespace

FastPlan plan_fast_attention(const ReadShape& shape, int shared_limit) {
  return plan_fast_kernels(shape, shared_limit, [&](int stages, int heads) {
    return fast_shared_layout(shape.geometry, stages, heads, nullptr, nullptr);
  });
}

template <class T>
cudaError_t launch_fast_attention(const AttentionParams<T>& p, std::size_t shared, cudaStream_t stream) {
  return launch_fast_instantiation<true>(p.shape, [&]<int D, int NT, bool kCompact, bool kChannelK>() {
    return launch_fast_kernel<T, D, NT, kCompact, kChannelK>(p, shared, stream);
  });
}

template cudaError_t launch_fast_attention<float>(const AttentionParams<float>&, std::size_t, cudaStream_t);
template cudaError_t launch_fast_attention<fp16_t>(const AttentionParams<fp16_t>&, std::size_t, cudaStream_t);
template cudaError_t launch_fast_attention<bf16_t>(const AttentionParams<bf16_t>&, std::size_t, cudaStream_t);

}  // namespace packkv::detail::cuda

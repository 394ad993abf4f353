// The decode of the fast read path, shared by its kernels: staged sections (format.hpp) decoded a
// round (16 tokens) at a time by one warp into a byte tile whose rows ldmatrix reads, and the code
// bytes turned into fp16 mma operands. Everything here reads shared memory only, except the
// load_global helpers (the read-only path for what the kernels read and nobody writes meanwhile).
#pragma once

#include <cstdint>

#include "detail/packed_block.cuh"
#include "detail/primitives.cuh"
#include "launch.hpp"

namespace packkv::detail::cuda {

using format::SectionLayout;

/// Byte offset of the 16-byte row of channel c in a byte tile, such that 8 lanes storing rows, or
/// ldmatrix reading 8 consecutive rows, touch 8 different bank quads. A lane owns P = D / 32
/// consecutive channels: with P = 2, 4 or 8, rows move within their aligned group of 8 (xor with
/// the decoding lane's index, a bijection of each group for those P); with P odd (head_dim 96)
/// lanes l..l+7 store rows P l + j, already distinct modulo 8, and rows stay in place.
template <int D>
__device__ __forceinline__ int tile_row(int c) {
  static_assert(D % 32 == 0 && (8 % (D / 32) == 0 || (D / 32) % 2 == 1), "a tile needs a bijective swizzle");
  if constexpr ((D / 32) % 2 == 1) return 16 * c;
  else return 16 * (c ^ ((c / (D / 32)) & 7));
}

__device__ __forceinline__ std::uint32_t lds32(const std::uint8_t* p) { return *reinterpret_cast<const std::uint32_t*>(p); }
__device__ __forceinline__ std::uint64_t lds64(const std::uint8_t* p) { return *reinterpret_cast<const std::uint64_t*>(p); }

/// 32 bits of a byte stream starting at bit `bit`; `base` is 4-byte aligned.
__device__ __forceinline__ std::uint32_t bits32(const std::uint8_t* base, std::uint32_t bit) {
  const std::uint8_t* w = base + (bit >> 5) * 4;
  return __funnelshift_r(lds32(w), lds32(w + 4), bit & 31u);
}

/// Four values of w bits (w <= 8), value i at bit i * w of `t`, spread to bytes (unmasked): values
/// 2 and 3 (t >> 2w) move to the upper half, then the second value of each half (>> w) to its
/// second byte. Right shifts by w and 2w: no per-pack 8 - w and 16 - 2w to work out.
__device__ __forceinline__ std::uint32_t spread4(std::uint32_t t, std::uint32_t w, std::uint32_t two_w) {
  const std::uint32_t y = __byte_perm(t, t >> two_w, 0x5410);
  return __byte_perm(y, y >> w, 0x6240);
}

/// Decodes one pack (16 codes of width w at byte `offset` of the staged section) into a tile row:
/// byte i is code i (pack minimum added: codes and minimum sum to at most 255, so bytes never carry).
__device__ __forceinline__ void decode_pack(const std::uint8_t* section, std::uint32_t offset, std::uint32_t w,
                                            std::uint32_t pack_min, std::uint8_t* row) {
  const std::uint32_t mask = (0x01010101u << w) - 0x01010101u;  // (2^w - 1) in every byte
  const std::uint32_t add = pack_min * 0x01010101u;
  const std::uint32_t two_w = 2u * w;
  std::uint32_t out[4];
#pragma unroll
  for (int group = 0; group < 2; ++group) {
    const std::uint32_t p = offset + static_cast<std::uint32_t>(group) * w;
    const std::uint8_t* a = section + (p & ~3u);
    const std::uint32_t w0 = lds32(a), w1 = lds32(a + 4), w2 = lds32(a + 8);
    // The funnel shift takes its amount modulo 32: 8 * p shifts by the byte offset in the word.
    const std::uint32_t lo = __funnelshift_r(w0, w1, 8u * p), hi = __funnelshift_r(w1, w2, 8u * p);
    const std::uint32_t upper = __funnelshift_rc(lo, hi, 4u * w);
    out[2 * group] = (spread4(lo, w, two_w) & mask) + add;
    out[2 * group + 1] = (spread4(upper, w, two_w) & mask) + add;
  }
  *reinterpret_cast<uint4*>(row) = uint4{out[0], out[1], out[2], out[3]};
}

/// Decodes round r of a staged section into a byte tile (format/rounds.hpp: plain, or frame of
/// reference with 4-bit widths and `bits`-bit minimums per channel).
template <int D>
__device__ __forceinline__ void decode_round(const std::uint8_t* section, const SectionLayout& layout, int r,
                                             std::uint8_t* tile) {
  constexpr int P = D / 32;
  const int lane = threadIdx.x & 31, c0 = lane * P;
  const std::uint8_t* ends = section + layout.round_end_offset;
  const std::uint32_t begin = r == 0 ? 0u : lds32(ends + 4 * (r - 1));
  const std::uint32_t end = lds32(ends + 4 * r);
  const std::uint32_t start = layout.rounds_offset + begin;
  // One path for both kinds of round (no branch): a plain round reads as if every pack had width
  // `bits` and minimum 0 and no descriptors.
  const bool plain = end - begin == layout.plain_round_bytes;
  const std::uint32_t widths = bits32(section, 8u * start + 4u * static_cast<std::uint32_t>(c0));
  const std::uint32_t min_bit = 8u * (start + layout.widths_bytes) + layout.bits * static_cast<std::uint32_t>(c0);
  std::uint64_t mins = bits32(section, min_bit);
  if (P * 8 > 32) mins |= static_cast<std::uint64_t>(bits32(section, min_bit + 32)) << 32;
  const std::uint32_t min_mask = plain ? 0u : (1u << layout.bits) - 1u;
  std::uint32_t width[P], pack_min[P], offset[P], mine = 0;
#pragma unroll
  for (int j = 0; j < P; ++j) {
    width[j] = plain ? layout.bits : (widths >> (4 * j)) & 15u;
    pack_min[j] = static_cast<std::uint32_t>(mins >> (layout.bits * static_cast<std::uint32_t>(j))) & min_mask;
    offset[j] = mine;
    mine += 2u * width[j];
  }
  std::uint32_t inclusive = mine;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const std::uint32_t below = __shfl_up_sync(kFullMask, inclusive, d);
    if (lane >= d) inclusive += below;
  }
  const std::uint32_t base = start + (plain ? 0u : layout.descriptor_bytes) + inclusive - mine;
#pragma unroll
  for (int j = 0; j < P; ++j) offset[j] += base;
#pragma unroll
  for (int j = 0; j < P; ++j) decode_pack(section, offset[j], width[j], pack_min[j], tile + tile_row<D>(c0 + j));
}

/// The per-token (step, min) of a staged section, read two tokens at a time (tokens 2 i, 2 i + 1:
/// the pair a lane's mma rows hold), in the encoding the kernel was built for: fp16 pairs (format
/// version 2, one 64-bit load) or compact parameters (version 3, one 32-bit load). The raw pair is
/// kept as loaded and its floats are built where they are used, so that a kernel holds a chunk's
/// parameters in as few registers as the fp16 form needs.
template <bool kCompact>
struct StagedParams {
  const std::uint8_t* params;       // the section's first group's parameters
  std::uint32_t step_bits = 0;      // compact: (E + 127) << 23, a step's float bits less its code's
  std::uint32_t half_code_bits = 0;  // compact: float bits of 1.5 * 2^22 less the width's top code

  __device__ __forceinline__ StagedParams(const std::uint8_t* section, const SectionLayout& layout)
      : params(section + layout.params_offset) {
    if constexpr (kCompact) {
      const std::uint32_t biased = lds32(section) & 0xFFu;  // E + kCompactExponentBias
      step_bits = (biased + (127u - static_cast<std::uint32_t>(format::kCompactExponentBias))) << 23;
      half_code_bits = 0x4AC00000u - ((1u << layout.bits) - 1u);
    }
  }
  /// The stored parameters of tokens `token` and `token + 1` (token even).
  __device__ __forceinline__ std::uint64_t pair(int token) const {
    if constexpr (kCompact) return lds32(params + 2 * token);
    else return lds64(params + 4 * token);
  }
  /// Token j's step: with compact parameters, its code byte is the float's exponent and mantissa
  /// top bits (format::compact_step_from_bits: (16 + m) * 2^(E + e - 4)).
  __device__ __forceinline__ float step(std::uint64_t pair, int j) const {
    if constexpr (kCompact) {
      const std::uint32_t code = (static_cast<std::uint32_t>(pair) >> (16 * j)) & 0xFFu;
      return format::float_from_bits((code << 19) + step_bits);
    } else {
      return fp16_bits_to_float(static_cast<std::uint16_t>(pair >> (32 * j)));
    }
  }
  /// Token j's min (`step` its step): compact, (zero - top code) / 2 comes exactly from the bits of
  /// 1.5 * 2^22 + (zero - top code), whose unit in the last place is 1/2, less 1.5 * 2^22.
  __device__ __forceinline__ float minimum(std::uint64_t pair, int j, float step) const {
    if constexpr (kCompact) {
      const int zero = static_cast<int>(static_cast<std::uint32_t>(pair) << (16 - 16 * j)) >> 24;
      return (format::float_from_bits(half_code_bits + static_cast<std::uint32_t>(zero)) - 6291456.0f) * step;
    } else {
      return fp16_bits_to_float(static_cast<std::uint16_t>(pair >> (32 * j + 16)));
    }
  }
};

/// Two code bytes of `bytes` (picked by `selector`, whose other nibbles select zero bytes) as the
/// fp16 subnormals code * 2^-24: exact, one byte permute and no subtraction. Tensor cores take fp16
/// subnormal inputs at full precision (measured on V100, T4 and A100 by Fasi, Higham, Mikaitis and
/// Pranesh, "Numerical behavior of NVIDIA tensor cores", 2021); the kernels fold 2^24 into their
/// fp32 scale factors, so this costs nothing downstream.
__device__ __forceinline__ std::uint32_t codes_to_half2(std::uint32_t bytes, std::uint32_t selector) {
  return __byte_perm(bytes, 0u, selector);
}
/// The power of two the subnormal codes carry: code * 2^-24 (codes_to_half2).
inline constexpr int kSubnormalCodeExponent = 24;

/// fp16 hi and lo halves of x (hi + lo carries 22 significant bits).
struct Split2 {
  float hi, lo;
};
__device__ __forceinline__ Split2 split_half(float x) {
  const float hi = __half2float(__float2half_rn(x));
  return Split2{hi, __half2float(__float2half_rn(x - hi))};
}

/// 2^e as a float, for e in [-126, 127] (the format's exact power of two).
__device__ __forceinline__ float exp2_int(int e) { return format::exp2_exact(e); }
/// The power of two that scales x > 0 into [2^14, 2^15) (x = 0: 1).
__device__ __forceinline__ int scale_exponent(float x) {
  if (!(x > 0.0f)) return 0;
  const int e = static_cast<int>((__float_as_uint(x) >> 23) & 0xFFu) - 127;
  const int s = 14 - e;
  return s < -100 ? -100 : (s > 100 ? 100 : s);
}

/// K.q of a block whose K has per-channel parameters (one (step_c, min_c) per channel of the block):
/// q . k_t = sum_c (q_c step_c) code_tc + sum_c q_c min_c. Rebuilds the B fragments of K.q (as
/// the per-token kernels build them once from q) from q times the block's channel steps, scaled by
/// the power of two that puts |q|max * the largest step into [2^14, 2^15), and the constant
/// sum_c q_c min_c of this lane's score heads (t4 + 4 nt). `q` is [heads][D] in shared memory,
/// `q_abs` its largest magnitude. Returns the factor that takes the block's mma sums (codes as
/// code * 2^-24) back to q . (step_c code_tc). Straight-line code, once per block.
struct ChannelKq {
  float unscale;
  float k_const[2];
};
template <int D, int NT, bool kCompact>
__device__ __forceinline__ ChannelKq channel_k_fragments(const float* q, int head_count, float q_abs,
                                                         const StagedParams<kCompact>& params,
                                                         std::uint32_t (&qf)[D / 16][NT][2]) {
  static_assert(NT <= 2, "k_const holds two n-tiles");
  const int lane = threadIdx.x & 31, gq = lane >> 2, t4 = lane & 3;
  float step_max = 0.0f;
#pragma unroll
  for (int c = 2 * lane; c < D; c += 64) {
    const std::uint64_t pair = params.pair(c);
    step_max = fmaxf(step_max, fmaxf(params.step(pair, 0), params.step(pair, 1)));
  }
  const int exponent = scale_exponent(q_abs * warp_max(step_max));
  const float scale = exp2_int(exponent);
  ChannelKq out{exp2_int(kSubnormalCodeExponent - exponent), {0.0f, 0.0f}};
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int head = 4 * nt + gq / 2, part = gq & 1;
    const bool live = head < head_count;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
      for (int b = 0; b < 2; ++b) {
        const int c = 16 * ks + 2 * t4 + 8 * b;
        const std::uint64_t pair = params.pair(c);
        const float x0 = live ? q[head * D + c] * params.step(pair, 0) * scale : 0.0f;
        const float x1 = live ? q[head * D + c + 1] * params.step(pair, 1) * scale : 0.0f;
        const Split2 s0 = split_half(x0), s1 = split_half(x1);
        qf[ks][nt][b] = part == 0 ? half2_bits(s0.hi, s1.hi) : half2_bits(s0.lo, s1.lo);
      }
    }
    // sum_c q_c min_c of score head t4 + 4 nt: the 8 lanes of a t4 take every 8th channel pair.
    const int score_head = 4 * nt + t4;
    float sum = 0.0f;
    if (score_head < head_count) {
#pragma unroll
      for (int i = 0; i < D / 16; ++i) {
        const int c = 2 * gq + 16 * i;
        const std::uint64_t pair = params.pair(c);
        sum += q[score_head * D + c] * params.minimum(pair, 0, params.step(pair, 0));
        sum += q[score_head * D + c + 1] * params.minimum(pair, 1, params.step(pair, 1));
      }
    }
    sum += __shfl_xor_sync(kFullMask, sum, 4);
    sum += __shfl_xor_sync(kFullMask, sum, 8);
    sum += __shfl_xor_sync(kFullMask, sum, 16);
    out.k_const[nt] = sum;
  }
  return out;
}

/// What a CTA keeps about each block of its range: where its head's span starts, its length, and
/// where the V section starts in it.
struct BlockSpan {
  const std::uint8_t* k_section;
  std::uint32_t bytes;
  std::uint32_t v_offset;
};

/// Issues the cp.async copies of span i into stage `into`: lane l copies 16-byte chunks l, l + 32,
/// ... (one LDGSTS and immediate offsets per chunk). One commit group per call, empty past the
/// end, so that the wait counts stay uniform.
__device__ __forceinline__ void issue_span(const BlockSpan* spans, int i, int blocks, std::uint8_t* stages,
                                           std::size_t stage_bytes, int into) {
  const int lane = threadIdx.x & 31;
  if (i < blocks) {
    const BlockSpan span = spans[i];
    const int chunks = static_cast<int>(span.bytes / 16u), mine = (chunks - lane + 31) / 32;
    std::uint8_t* dst = stages + static_cast<std::size_t>(into) * stage_bytes + 16 * lane;
    const std::uint8_t* src = span.k_section + 16 * lane;
#pragma unroll 4
    for (int k = 0; k < mine; ++k) cp_async_16(dst + 512 * k, src + 512 * k);
  }
  cp_async_commit();
}

/// The staging pipeline of a CTA's blocks, `depth` (2 or 3) stages deep: start_staging issues the
/// first depth - 1 blocks; next_staged_block(i) issues block i + depth - 1 into the stage block
/// i - 1 used, waits until block i has landed and returns its stage. `stage` is i % depth, kept
/// without a division.
__device__ __forceinline__ void start_staging(const BlockSpan* spans, int blocks, std::uint8_t* stages,
                                              std::size_t stage_bytes, int depth) {
  for (int i = 0; i < depth - 1; ++i) issue_span(spans, i, blocks, stages, stage_bytes, i);
}
__device__ __forceinline__ const std::uint8_t* next_staged_block(const BlockSpan* spans, int i, int blocks,
                                                                 std::uint8_t* stages, std::size_t stage_bytes,
                                                                 int depth, int& stage) {
  issue_span(spans, i + depth - 1, blocks, stages, stage_bytes, stage == 0 ? depth - 1 : stage - 1);
  // Everything but the newest depth - 1 groups has landed: block i is here.
  if (depth == 3) cp_async_wait<2>();
  else cp_async_wait<1>();
  __syncwarp();
  const std::uint8_t* staged = stages + static_cast<std::size_t>(stage) * stage_bytes;
  stage = stage + 1 == depth ? 0 : stage + 1;
  return staged;
}

/// A read-only global load (the non-coherent path: what the read path reads is not written while
/// the kernel runs).
template <class U>
__device__ __forceinline__ U load_global(const U* p) {
#if defined(PACKKV_CUDA_EMULATION)
  return *p;
#else
  return __ldg(p);
#endif
}
template <class U>
__device__ __forceinline__ U* load_global(U* const* p) {
  return reinterpret_cast<U*>(load_global(reinterpret_cast<const unsigned long long*>(p)));
}
__device__ __forceinline__ float load_global_float(const float* p) { return load_global(p); }
__device__ __forceinline__ float load_global_float(const fp16_t* p) {
  return fp16_bits_to_float(load_global(reinterpret_cast<const unsigned short*>(p)));
}
__device__ __forceinline__ float load_global_float(const bf16_t* p) {
  return __bfloat162float(__ushort_as_bfloat16(load_global(reinterpret_cast<const unsigned short*>(p))));
}

__device__ __forceinline__ float load_coherent(const float* p) {
#if defined(PACKKV_CUDA_EMULATION)
  return *p;
#else
  return __ldcg(p);
#endif
}

// ---- the tensor-core steps of a decoded round (lane l: gq = l / 4, t4 = l % 4) -----------------

/// K.q of a decoded round (16 tokens x D codes in the tile): c[nt] holds this lane's accumulators
/// of n-tile nt (tokens 2 gq, 2 gq + 1, then + 8; columns: 4 query heads x hi, lo halves of q),
/// q given as B fragments qf[k-step][nt]. The codes enter as code * 2^-24 (codes_to_half2).
template <int D, int NT>
__device__ __forceinline__ void kq_round(const std::uint8_t* tile, const std::uint32_t (&qf)[D / 16][NT][2],
                                         float (&c)[NT][4]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) c[nt][e] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < D / 32; ++kk) {
    std::uint32_t m[4];
    ldmatrix_x4_trans(m, tile + tile_row<D>(32 * kk + lane));
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const std::uint32_t a[4] = {codes_to_half2(m[2 * h], 0x4240), codes_to_half2(m[2 * h], 0x4341),
                                  codes_to_half2(m[2 * h + 1], 0x4240), codes_to_half2(m[2 * h + 1], 0x4341)};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) mma_16816(c[nt], a, qf[2 * kk + h][nt]);
    }
  }
}

/// The P.V B fragment of one n-tile from this lane's weights w0, w1 (tokens 2 gq and 2 gq + 1 of
/// head t4 + 4 nt, already scaled): b[0] = weights of tokens 4 t4, 4 t4 + 1 for column gq (head
/// gq / 2, hi or lo half by gq's parity), b[1] = tokens + 2. The lane holding tokens 2 g', 2 g' + 1
/// of head t4' is lane 4 g' + t4'.
__device__ __forceinline__ void weight_fragment(float w0, float w1, std::uint32_t (&b)[2]) {
  const int lane = threadIdx.x & 31, gq = lane >> 2, t4 = lane & 3;
  const Split2 s0 = split_half(w0), s1 = split_half(w1);
  const std::uint32_t hi = half2_bits(s0.hi, s1.hi), lo = half2_bits(s0.lo, s1.lo);
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int source = 4 * (2 * t4 + e) + gq / 2;
    const std::uint32_t from_hi = __shfl_sync(kFullMask, hi, source);
    const std::uint32_t from_lo = __shfl_sync(kFullMask, lo, source);
    b[e] = (gq & 1) ? from_lo : from_hi;
  }
}

/// P.V of a decoded round: acc[nt][mt] (channels 16 mt + gq, + 8; heads t4 + 4 nt hi | lo) gains
/// the round's V codes times the weights in b[nt] (weight_fragment).
template <int D, int NT>
__device__ __forceinline__ void pv_round(const std::uint8_t* tile, const std::uint32_t (&b)[NT][2],
                                         float (&acc)[NT][D / 16][4]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int kk = 0; kk < D / 32; ++kk) {
    std::uint32_t m[4];
    ldmatrix_x4(m, tile + tile_row<D>(32 * kk + lane));
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const std::uint32_t a[4] = {codes_to_half2(m[2 * h], 0x4140), codes_to_half2(m[2 * h + 1], 0x4140),
                                  codes_to_half2(m[2 * h], 0x4342), codes_to_half2(m[2 * h + 1], 0x4342)};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) mma_16816(acc[nt][2 * kk + h], a, b[nt]);
    }
  }
}

// ---- planning (host) ----------------------------------------------------------------------------

/// Deepest staging the fast kernels use (two blocks ahead of the one being decoded).
inline constexpr int kFastStagesMax = 3;

/// The head dims the fast kernels are built for: multiples of 32 (a lane owns D / 32 channels of
/// a round), the common ones (96: Phi-3).
PACKKV_HOST_DEVICE constexpr bool fast_head_dim(int head_dim) {
  return head_dim == 64 || head_dim == 96 || head_dim == 128 || head_dim == 256;
}

/// Calls `launch.template operator()<D, NT, kCompact, kChannelK>()` with the fast kernels'
/// instantiation that serves `shape`: its head dim, its n-tiles (two for more than 4 query heads per
/// CTA, never at head_dim 256), its parameter encoding and, for the kernels that read K (kReadsK),
/// whether K has per-channel parameters (attn_v's kernels are built with kChannelK false only). The
/// one list of what is built, beside fast_head_dim.
template <bool kReadsK, class Launch>
cudaError_t launch_fast_instantiation(const ReadShape& shape, Launch&& launch) {
  const bool eight = shape.heads_per_cta > 4, compact = shape.geometry.compact_params;
  const bool channel_k = kReadsK && shape.geometry.k_per_channel;
  auto pick = [&]<int D, int NT>() {
    if constexpr (kReadsK) {
      if (channel_k) {
        return compact ? launch.template operator()<D, NT, true, true>() : launch.template operator()<D, NT, false, true>();
      }
    }
    return compact ? launch.template operator()<D, NT, true, false>() : launch.template operator()<D, NT, false, false>();
  };
  switch (shape.geometry.head_dim) {
    case 64: return eight ? pick.template operator()<64, 2>() : pick.template operator()<64, 1>();
    case 96: return eight ? pick.template operator()<96, 2>() : pick.template operator()<96, 1>();
    case 128: return eight ? pick.template operator()<128, 2>() : pick.template operator()<128, 1>();
    case 256: return eight ? cudaErrorInvalidValue : pick.template operator()<256, 1>();
    default: return cudaErrorInvalidValue;
  }
}

/// The fast path's plan for a geometry (fast_head_dim, either parameter encoding, K per token or
/// per channel; unusable otherwise):
/// query heads per CTA (8, or 4 at head_dim 256, where two n-tiles would not fit the registers),
/// and the deepest staging whose shared memory, `shared_bytes(stages, heads_per_cta)`, fits.
template <class SharedBytes>
inline FastPlan plan_fast_kernels(const ReadShape& shape, int shared_limit, SharedBytes&& shared_bytes) {
  FastPlan plan{};
  const format::BlockGeometry& g = shape.geometry;
  if (!fast_head_dim(g.head_dim)) return plan;
  plan.heads_per_cta = shape.group < (g.head_dim == 256 ? 4 : 8) ? shape.group : (g.head_dim == 256 ? 4 : 8);
  plan.subgroups = (shape.group + plan.heads_per_cta - 1) / plan.heads_per_cta;
  for (int stages = kFastStagesMax; stages >= 2; --stages) {
    const std::size_t bytes = shared_bytes(stages, plan.heads_per_cta);
    if (bytes <= static_cast<std::size_t>(shared_limit)) {
      plan.usable = true;
      plan.stages = stages;
      plan.shared_bytes = bytes;
      // Resident CTAs per SM from shared memory (228 KiB per SM, 1 KiB reserved per CTA), at most
      // 32; registers allow more than that for one-warp CTAs.
      plan.ctas_per_sm = static_cast<int>((228u * 1024u) / (bytes + 1024u) < 32u ? (228u * 1024u) / (bytes + 1024u) : 32u);
      return plan;
    }
  }
  return plan;
}

}  // namespace packkv::detail::cuda

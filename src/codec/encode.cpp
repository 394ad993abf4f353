// The CPU block encoder: quantize (format/quant.hpp), repack (repack.hpp), bit-pack
// (format/rounds.hpp). The CUDA encoder produces the same bytes.
#include <algorithm>
#include <cstring>
#include <numeric>
#include <stdexcept>

#include <fmt/format.h>

#include "codec/repack.hpp"
#include "codec/section_writer.hpp"
#include "cpu_kernels/kernels.hpp"
#include "packkv/codec.hpp"
#include "packkv/error.hpp"

namespace packkv {

using format::QuantParams;
using format::SectionLayout;
using format::Side;

namespace {
/// make_codec_params for a config already validated.
CodecParams layer_codec(const CacheConfig& config, int layer) {
  CodecParams p{};
  p.k_max_code = max_code_for_rel(k_rel_of(config, layer));
  p.v_max_code = max_code_for_rel(v_rel_of(config, layer));
  p.repack = config.repack;
  p.geometry.block_tokens = config.block_tokens;
  p.geometry.head_dim = config.head_dim;
  p.geometry.num_heads = config.num_kv_heads;
  p.geometry.k_bits = bits_for_max_code(p.k_max_code);
  p.geometry.v_bits = bits_for_max_code(p.v_max_code);
  p.geometry.permuted = config.repack != RepackMethod::none;
  p.geometry.k_per_channel = config.k_mode == QuantMode::per_channel;
  p.geometry.compact_params = config.compact_params;
  return p;
}
}  // namespace

CodecParams make_codec_params(const CacheConfig& config, int layer) {
  validate(config);
  PACKKV_REQUIRE(layer >= 0 && layer < config.num_layers,
                 fmt::format("layer {} is out of range (the config has {} layers)", layer, config.num_layers));
  return layer_codec(config, layer);
}

std::vector<CodecParams> make_layer_codecs(const CacheConfig& config) {
  validate(config);
  std::vector<CodecParams> codecs;
  codecs.reserve(static_cast<std::size_t>(config.num_layers));
  for (int l = 0; l < config.num_layers; ++l) codecs.push_back(layer_codec(config, l));
  return codecs;
}

format::BlockGeometry widest_geometry(std::span<const CodecParams> layer_codecs) {
  PACKKV_REQUIRE(!layer_codecs.empty(), "widest_geometry: no layer codecs");
  format::BlockGeometry g = layer_codecs.front().geometry;
  for (const CodecParams& c : layer_codecs) {
    g.k_bits = std::max(g.k_bits, c.geometry.k_bits);
    g.v_bits = std::max(g.v_bits, c.geometry.v_bits);
  }
  return g;
}

BlockBytes& BlockBytes::operator+=(const BlockBytes& o) {
  payload += o.payload;
  params += o.params;
  descriptors += o.descriptors;
  permutations += o.permutations;
  headers += o.headers;
  k_sections += o.k_sections;
  v_sections += o.v_sections;
  return *this;
}

BlockBytes& BlockBytes::operator-=(const BlockBytes& o) {
  payload -= o.payload;
  params -= o.params;
  descriptors -= o.descriptors;
  permutations -= o.permutations;
  headers -= o.headers;
  k_sections -= o.k_sections;
  v_sections -= o.v_sections;
  return *this;
}

namespace {

const char* side_name(Side side) { return side == Side::k ? "K" : "V"; }

[[noreturn]] void throw_bad_value(Side side, int token, int head, int channel, float value) {
  detail::throw_error(fmt::format(
      "{} value {} at block token {}, head {}, channel {} cannot be stored: packkv accepts finite values "
      "with |x| <= 65504 (its per-token parameters are fp16)",
      side_name(side), value, token, head, channel));
}

[[noreturn]] void throw_compact_range(Side side, const char* group, int index, int head, const format::Range& r) {
  detail::throw_error(fmt::format("{} {} {} of head {} spans [{}, {}]: compact parameters (CacheConfig::compact_params) "
                                  "store values within +-16384 only",
                                  side_name(side), group, index, head, r.lo, r.hi));
}

[[noreturn]] void throw_range(Side side, const char* group, int index, int head, const format::Range& r) {
  detail::throw_error(fmt::format("{} {} {} of head {} spans [{}, {}], too wide for one fp16 step at this rel (use a "
                                  "smaller rel)",
                                  side_name(side), group, index, head, r.lo, r.hi));
}

/// One head's values of the block as floats, [tokens][dim] (the storage type converted once).
template <class T>
void gather_head(const T* x, std::size_t row_stride, int head, int tokens, int dim, float* out) {
  for (int t = 0; t < tokens; ++t) {
    detail::cpu::convert_to_float(x + static_cast<std::size_t>(t) * row_stride + static_cast<std::size_t>(head) * dim,
                          out + static_cast<std::size_t>(t) * dim, static_cast<std::size_t>(dim));
  }
}

/// How one side's groups are quantized and where their parameters go: the section's parameter
/// area in arrival order (format/block.hpp: fp16 pairs, or the compact prefix and 2-byte pairs).
struct SideCodec {
  SectionLayout layout;
  int max_code;    ///< the error bound's largest code
  int code_limit;  ///< the largest code stored (format::code_limit)
  Side side;

  /// Every group's quantizer, from the groups' ranges; writes the parameter area.
  void quantizers(const float* lo, const float* hi, int groups, const char* group, int head, format::Quantizer* q,
                  std::uint8_t* area) const {
    if (layout.compact == 0u) {
      auto* params = reinterpret_cast<QuantParams*>(area);
      for (int i = 0; i < groups; ++i) {
        q[i] = format::make_quantizer(lo[i], hi[i], max_code);
        if (!q[i].ok) throw_range(side, group, i, head, format::Range{lo[i], hi[i]});
        params[i] = q[i].stored;
      }
      return;
    }
    double need = 0.0;
    for (int i = 0; i < groups; ++i) {
      if (!format::storable_compact(lo[i]) || !format::storable_compact(hi[i])) {
        throw_compact_range(side, group, i, head, format::Range{lo[i], hi[i]});
      }
      need = std::max(need, format::compact_need(lo[i], hi[i], max_code, code_limit));
    }
    const int exponent = format::compact_exponent(need);
    area[0] = static_cast<std::uint8_t>(exponent + format::kCompactExponentBias);
    area[1] = area[2] = area[3] = 0;
    for (int i = 0; i < groups; ++i) {
      q[i] = format::make_compact_quantizer(lo[i], hi[i], max_code, code_limit, exponent);
      // Every range of storable_compact values fits its section's exponent (tests/test_compact_params.cpp
      // searches for counterexamples); a failure here is a bug, not bad input.
      if (!q[i].ok) throw std::logic_error("packkv: compact parameters found no step for a storable range");
      std::memcpy(area + layout.params_offset + layout.param_bytes * static_cast<std::uint32_t>(i), &q[i].compact,
                  sizeof q[i].compact);
    }
  }
};

// Per-token quantization of one head: codes[t][c] (arrival order), the parameter area.
void quantize_per_token(const float* x, int head, int tokens, int dim, const SideCodec& sc, std::uint8_t* codes,
                        std::uint8_t* area) {
  const detail::cpu::Kernels& kern = detail::cpu::kernels();
  float lo[256], hi[256];
  for (int t = 0; t < tokens; ++t) {
    const float* row = x + static_cast<std::size_t>(t) * dim;
    format::Range range;
    if (!kern.row_range(row, static_cast<std::size_t>(dim), range)) {
      for (int c = 0; c < dim; ++c) {
        if (!format::storable(row[c])) throw_bad_value(sc.side, t, head, c, row[c]);
      }
    }
    lo[t] = range.lo;
    hi[t] = range.hi;
  }
  format::Quantizer q[256];
  sc.quantizers(lo, hi, tokens, "token", head, q, area);
  for (int t = 0; t < tokens; ++t) {
    kern.quantize_row(x + static_cast<std::size_t>(t) * dim, static_cast<std::size_t>(dim), q[t], sc.code_limit,
                      codes + static_cast<std::size_t>(t) * dim);
  }
}

// Per-channel quantization of one head over the block (KIVI-style K): one group per channel. Row
// by row, so every channel's range and codes come from vector operations over a token's values.
void quantize_per_channel(const float* x, int head, int tokens, int dim, const SideCodec& sc, std::uint8_t* codes,
                          std::uint8_t* area) {
  const detail::cpu::Kernels& kern = detail::cpu::kernels();
  float lo[256], hi[256], mins[256], inv_steps[256];
  std::fill(lo, lo + dim, INFINITY);
  std::fill(hi, hi + dim, -INFINITY);
  for (int t = 0; t < tokens; ++t) {
    const float* row = x + static_cast<std::size_t>(t) * dim;
    if (!kern.extend_ranges(row, static_cast<std::size_t>(dim), lo, hi)) {
      for (int c = 0; c < dim; ++c) {
        if (!format::storable(row[c])) throw_bad_value(Side::k, t, head, c, row[c]);
      }
    }
  }
  format::Quantizer q[256];
  sc.quantizers(lo, hi, dim, "channel", head, q, area);
  for (int c = 0; c < dim; ++c) {
    mins[c] = q[c].min;
    inv_steps[c] = q[c].inv_step;
  }
  for (int t = 0; t < tokens; ++t) {
    kern.quantize_row_per_channel(x + static_cast<std::size_t>(t) * dim, static_cast<std::size_t>(dim), mins, inv_steps,
                                  sc.code_limit, codes + static_cast<std::size_t>(t) * dim);
  }
}

}  // namespace

std::uint32_t detail::write_section(const SectionLayout& layout, const std::uint8_t* codes, const std::uint8_t* params,
                                    bool per_token_params, const std::uint8_t* order, std::uint8_t* out,
                                    BlockBytes& bytes) {
  const std::uint32_t dim = layout.head_dim;
  std::memcpy(out, params, layout.params_offset);  // the compact prefix (nothing with fp16 parameters)
  for (std::uint32_t i = 0; i < layout.param_count; ++i) {
    const std::uint32_t from = per_token_params ? order[i] : i;
    std::memcpy(out + layout.params_offset + i * layout.param_bytes,
                params + layout.params_offset + from * layout.param_bytes, layout.param_bytes);
  }
  std::uint8_t* rounds = out + layout.rounds_offset;
  std::uint32_t offset = 0, descriptors = 0;
  std::uint8_t lo[256], width[256], values[format::kPackTokens];
  for (std::uint32_t r = 0; r < layout.rounds; ++r) {
    const std::uint8_t* tokens = order + r * format::kPackTokens;
    std::uint32_t width_sum = 0;
    for (std::uint32_t c = 0; c < dim; ++c) {
      std::uint8_t mn = 255, mx = 0;
      for (int i = 0; i < format::kPackTokens; ++i) {
        const std::uint8_t code = codes[static_cast<std::size_t>(tokens[i]) * dim + c];
        mn = std::min(mn, code);
        mx = std::max(mx, code);
      }
      lo[c] = mn;
      width[c] = static_cast<std::uint8_t>(format::width_for_range(static_cast<std::uint32_t>(mx - mn)));
      width_sum += width[c];
    }
    const bool plain = format::use_plain_round(layout, width_sum);
    std::uint8_t* pack = plain ? rounds + offset : format::write_round_descriptors(layout, width, lo, rounds + offset);
    if (!plain) descriptors += layout.descriptor_bytes;
    for (std::uint32_t c = 0; c < dim; ++c) {
      const std::uint32_t w = plain ? layout.bits : width[c];
      const std::uint8_t base = plain ? 0 : lo[c];
      for (int i = 0; i < format::kPackTokens; ++i) {
        values[i] = static_cast<std::uint8_t>(codes[static_cast<std::size_t>(tokens[i]) * dim + c] - base);
      }
      format::pack16(values, w, pack);
      pack += 2 * w;
    }
    offset += format::round_bytes(layout, width_sum);
    format::set_round_end(out, layout, r, offset);
  }
  const std::uint32_t size = layout.section_bytes(offset);
  std::memset(rounds + offset, 0, size - layout.rounds_offset - offset);
  bytes.params += layout.round_end_offset;
  bytes.descriptors += descriptors;
  bytes.payload += offset - descriptors;
  return size;
}


template <class T>
std::uint32_t encode_block(const CodecParams& p, const T* k, const T* v, std::size_t row_stride, std::uint8_t* out,
                           EncodeScratch& s, BlockBytes* bytes_out) {
  const format::BlockGeometry& g = p.geometry;
  const int tokens = g.block_tokens, dim = g.head_dim;
  const std::size_t codes_size = static_cast<std::size_t>(tokens) * dim;
  s.k_codes.resize(codes_size);
  s.v_codes.resize(codes_size);
  s.k_params.resize(g.k_layout().round_end_offset);
  s.v_params.resize(g.v_layout().round_end_offset);
  s.order.resize(static_cast<std::size_t>(tokens));
  thread_local std::vector<float> values;
  values.resize(codes_size);

  const SideCodec k_codec{g.k_layout(), p.k_max_code, p.code_limit(Side::k), Side::k};
  const SideCodec v_codec{g.v_layout(), p.v_max_code, p.code_limit(Side::v), Side::v};
  std::memset(out, 0, g.sections_offset());
  BlockBytes bytes;
  std::uint32_t offset = g.sections_offset();
  for (int h = 0; h < g.num_heads; ++h) {
    gather_head(v, row_stride, h, tokens, dim, values.data());
    quantize_per_token(values.data(), h, tokens, dim, v_codec, s.v_codes.data(), s.v_params.data());
    gather_head(k, row_stride, h, tokens, dim, values.data());
    if (g.k_per_channel) {
      quantize_per_channel(values.data(), h, tokens, dim, k_codec, s.k_codes.data(), s.k_params.data());
    } else {
      quantize_per_token(values.data(), h, tokens, dim, k_codec, s.k_codes.data(), s.k_params.data());
    }
    switch (p.repack) {
      case RepackMethod::none: std::iota(s.order.begin(), s.order.end(), std::uint8_t{0}); break;
      case RepackMethod::median: codec::order_by_median(s.v_codes.data(), tokens, dim, s.order.data()); break;
      case RepackMethod::greedy:
        codec::order_greedy(s.k_codes.data(), s.v_codes.data(), tokens, dim, s.order.data());
        break;
    }
    if (g.permuted) std::memcpy(format::token_order(out, g, h), s.order.data(), static_cast<std::size_t>(tokens));

    format::HeadEntry entry{};
    entry.k_offset = offset;
    offset += detail::write_section(g.k_layout(), s.k_codes.data(), s.k_params.data(), !g.k_per_channel, s.order.data(),
                            out + offset, bytes);
    entry.v_offset = offset;
    offset += detail::write_section(g.v_layout(), s.v_codes.data(), s.v_params.data(), true, s.order.data(), out + offset,
                            bytes);
    format::set_head_entry(out, g, h, entry);
    bytes.k_sections += entry.v_offset - entry.k_offset;
    bytes.v_sections += offset - entry.v_offset;
  }
  std::memset(out + offset, 0, format::kTrailingSlack);
  offset += format::kTrailingSlack;
  const format::BlockHeader header = format::make_block_header(g, offset);
  std::memcpy(out, &header, sizeof header);
  if (bytes_out != nullptr) {
    bytes.permutations = g.permutation_bytes();
    bytes.headers = offset - bytes.payload - bytes.params - bytes.descriptors - bytes.permutations;
    *bytes_out = bytes;
  }
  return offset;
}

#define PACKKV_INSTANTIATE_ENCODE(T)                                                                           \
  template std::uint32_t encode_block<T>(const CodecParams&, const T*, const T*, std::size_t, std::uint8_t*, \
                                         EncodeScratch&, BlockBytes*);
PACKKV_INSTANTIATE_ENCODE(float)
PACKKV_INSTANTIATE_ENCODE(fp16_t)
PACKKV_INSTANTIATE_ENCODE(bf16_t)
#undef PACKKV_INSTANTIATE_ENCODE

}  // namespace packkv

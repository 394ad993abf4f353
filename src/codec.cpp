// CPU block codec: quantize, repack, bit-pack (format.hpp), and the inverse.
#include "packkv/codec.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <numeric>

#include <fmt/format.h>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "packkv/error.hpp"

namespace packkv {

using format::Params;
using format::SectionLayout;

CodecParams make_codec_params(const CacheConfig& config) {
  validate(config);
  CodecParams p{};
  p.k_max_code = max_code_for_rel(config.k_rel);
  p.v_max_code = max_code_for_rel(config.v_rel);
  p.repack = config.repack;
  p.geometry.block_tokens = config.block_tokens;
  p.geometry.head_dim = config.head_dim;
  p.geometry.num_heads = config.num_kv_heads;
  p.geometry.k_bits = bits_for_max_code(p.k_max_code);
  p.geometry.v_bits = bits_for_max_code(p.v_max_code);
  p.geometry.permuted = config.repack != RepackMethod::none;
  p.geometry.k_per_channel = config.k_mode == QuantMode::per_channel;
  return p;
}

namespace {

template <class T>
float load(const T* p, std::size_t i) {
#if defined(__F16C__)
  if constexpr (std::is_same_v<T, fp16_t>) return _cvtsh_ss(p[i].bits);  // one instruction, same value
#endif
  return to_float(p[i]);
}

[[noreturn]] void throw_bad_value(const char* tensor, int token, int head, int channel, float value) {
  detail::throw_error(fmt::format(
      "{} value {} at block token {}, head {}, channel {} cannot be stored: packkv accepts finite values "
      "with |x| <= 65504 (its per-token parameters are fp16)",
      tensor, value, token, head, channel));
}

// Per-token quantization of one head: codes[t][c] (original order), params[t].
template <class T>
void quantize_per_token(const T* x, std::size_t row_stride, int head, int tokens, int dim, int max_code,
                        const char* tensor, std::uint8_t* codes, Params* params) {
  for (int t = 0; t < tokens; ++t) {
    const T* row = x + static_cast<std::size_t>(t) * row_stride + static_cast<std::size_t>(head) * dim;
    float lo = load(row, 0), hi = lo;
    for (int c = 0; c < dim; ++c) {
      const float f = load(row, c);
      if (!std::isfinite(f) || std::fabs(f) > kFp16Max) throw_bad_value(tensor, t, head, c, f);
      lo = std::min(lo, f);
      hi = std::max(hi, f);
    }
    const format::Quantizer q = format::make_quantizer(lo, hi, max_code);
    if (!q.ok) {
      detail::throw_error(fmt::format("{} token {} of head {} spans [{}, {}], too wide for an fp16 step at "
                                      "rel 1 (use a smaller rel)",
                                      tensor, t, head, lo, hi));
    }
    params[t] = q.stored;
    std::uint8_t* out = codes + static_cast<std::size_t>(t) * dim;
    for (int c = 0; c < dim; ++c) out[c] = format::quantize(load(row, c), q, max_code);
  }
}

// Per-channel quantization of one head over the block (KIVI-style K): params[c].
template <class T>
void quantize_per_channel(const T* x, std::size_t row_stride, int head, int tokens, int dim, int max_code,
                          std::uint8_t* codes, Params* params) {
  const T* base = x + static_cast<std::size_t>(head) * dim;
  for (int c = 0; c < dim; ++c) {
    float lo = load(base, c), hi = lo;
    for (int t = 0; t < tokens; ++t) {
      const float f = load(base, static_cast<std::size_t>(t) * row_stride + c);
      if (!std::isfinite(f) || std::fabs(f) > kFp16Max) throw_bad_value("K", t, head, c, f);
      lo = std::min(lo, f);
      hi = std::max(hi, f);
    }
    const format::Quantizer q = format::make_quantizer(lo, hi, max_code);
    if (!q.ok) {
      detail::throw_error(fmt::format("K channel {} of head {} spans [{}, {}], too wide for an fp16 step at "
                                      "rel 1 (use a smaller rel)",
                                      c, head, lo, hi));
    }
    params[c] = q.stored;
    for (int t = 0; t < tokens; ++t) {
      codes[static_cast<std::size_t>(t) * dim + c] =
          format::quantize(load(base, static_cast<std::size_t>(t) * row_stride + c), q, max_code);
    }
  }
}

// "median": stable sort of tokens by the lower median of their V codes.
void order_by_median(const std::uint8_t* v_codes, int tokens, int dim, std::uint8_t* order, std::uint8_t* keys) {
  const int rank = (dim - 1) / 2;
  for (int t = 0; t < tokens; ++t) {
    std::array<std::uint16_t, 256> histogram{};
    const std::uint8_t* row = v_codes + static_cast<std::size_t>(t) * dim;
    for (int c = 0; c < dim; ++c) ++histogram[row[c]];
    int seen = 0, code = 0;
    while (seen + histogram[code] <= rank) seen += histogram[code++];
    keys[t] = static_cast<std::uint8_t>(code);
  }
  // Counting sort by key: stable, O(tokens + 256).
  std::array<int, 257> start{};
  for (int t = 0; t < tokens; ++t) ++start[keys[t] + 1];
  for (int i = 0; i < 256; ++i) start[i + 1] += start[i];
  for (int t = 0; t < tokens; ++t) order[start[keys[t]]++] = static_cast<std::uint8_t>(t);
}

// "greedy": each pack starts with the earliest unused token and grows by the unused token that
// adds the fewest bits to the pack's K and V widths (ties: earliest token).
void order_greedy(const std::uint8_t* k_codes, const std::uint8_t* v_codes, int tokens, int dim,
                  std::uint8_t* order) {
  std::array<bool, 256> used{};
  std::vector<std::uint8_t> lo(2 * dim), hi(2 * dim);
  int placed = 0;
  for (int pack = 0; pack < tokens / format::kPackTokens; ++pack) {
    int first = 0;
    while (used[first]) ++first;
    used[first] = true;
    order[placed++] = static_cast<std::uint8_t>(first);
    for (int c = 0; c < dim; ++c) {
      lo[c] = hi[c] = k_codes[first * dim + c];
      lo[dim + c] = hi[dim + c] = v_codes[first * dim + c];
    }
    for (int n = 1; n < format::kPackTokens; ++n) {
      int best = -1;
      std::uint32_t best_cost = ~0u;
      for (int t = 0; t < tokens; ++t) {
        if (used[t]) continue;
        std::uint32_t cost = 0;
        for (int c = 0; c < 2 * dim; ++c) {
          const std::uint8_t code = c < dim ? k_codes[t * dim + c] : v_codes[t * dim + c - dim];
          const std::uint32_t range = static_cast<std::uint32_t>(std::max(hi[c], code) - std::min(lo[c], code));
          cost += format::width_for_range(range);
        }
        if (cost < best_cost) {
          best_cost = cost;
          best = t;
        }
      }
      used[best] = true;
      order[placed++] = static_cast<std::uint8_t>(best);
      for (int c = 0; c < 2 * dim; ++c) {
        const std::uint8_t code = c < dim ? k_codes[best * dim + c] : v_codes[best * dim + c - dim];
        lo[c] = std::min(lo[c], code);
        hi[c] = std::max(hi[c], code);
      }
    }
  }
}

// Writes one section (params, round ends, rounds); returns its size.
std::uint32_t write_section(const SectionLayout& layout, const std::uint8_t* codes, const Params* params,
                            bool per_token_params, const std::uint8_t* order, int dim, std::uint8_t* out) {
  auto* out_params = reinterpret_cast<Params*>(out);
  for (std::uint32_t i = 0; i < layout.param_count; ++i) {
    out_params[i] = per_token_params ? params[order[i]] : params[i];
  }
  std::uint8_t* rounds = out + layout.rounds_offset;
  std::uint32_t offset = 0;
  std::array<std::uint8_t, 256> lo, width;
  std::uint8_t values[format::kPackTokens];
  for (std::uint32_t r = 0; r < layout.rounds; ++r) {
    const std::uint8_t* tokens = order + r * format::kPackTokens;
    std::uint32_t width_sum = 0;
    for (int c = 0; c < dim; ++c) {
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
    std::uint8_t* round = rounds + offset;
    std::uint8_t* pack = round;
    const bool plain = format::use_plain_round(layout, width_sum);
    if (!plain) {
      // Widths as nibbles, then the minimums as one bit stream of `bits`-bit values (groups of 8
      // channels fill exactly `bits` bytes, the same layout as one half of a pack).
      for (int c = 0; c < dim; c += 2) round[c / 2] = static_cast<std::uint8_t>(width[c] | (width[c + 1] << 4));
      for (int c = 0; c < dim; c += 8) {
        std::uint64_t stream = 0;
        for (int i = 0; i < 8; ++i) stream |= static_cast<std::uint64_t>(lo[c + i]) << (i * layout.bits);
        for (std::uint32_t b = 0; b < layout.bits; ++b) {
          round[layout.widths_bytes + c / 8 * layout.bits + b] = static_cast<std::uint8_t>(stream >> (8 * b));
        }
      }
      pack = round + layout.descriptor_bytes;
    }
    for (int c = 0; c < dim; ++c) {
      const std::uint32_t w = plain ? layout.bits : width[c];
      const std::uint8_t base = plain ? 0 : lo[c];
      for (int i = 0; i < format::kPackTokens; ++i) {
        values[i] = static_cast<std::uint8_t>(codes[static_cast<std::size_t>(tokens[i]) * dim + c] - base);
      }
      format::pack16(values, w, pack);
      pack += 2 * w;
    }
    offset = static_cast<std::uint32_t>(pack - rounds);
    format::store_u32(out + layout.round_end_offset + 4 * r, offset);
  }
  const std::uint32_t size = layout.section_bytes(offset);
  std::memset(rounds + offset, 0, size - layout.rounds_offset - offset);
  return size;
}

}  // namespace

template <class T>
std::uint32_t encode_block(const CodecParams& p, const T* k, const T* v, std::size_t row_stride, std::uint8_t* out,
                           EncodeScratch& s) {
  const format::BlockGeometry& g = p.geometry;
  const int tokens = g.block_tokens, dim = g.head_dim;
  const std::size_t codes_size = static_cast<std::size_t>(tokens) * dim;
  s.k_codes.resize(codes_size);
  s.v_codes.resize(codes_size);
  s.k_params.resize(static_cast<std::size_t>(std::max(tokens, dim)));
  s.v_params.resize(static_cast<std::size_t>(tokens));
  s.order.resize(static_cast<std::size_t>(tokens));
  s.sort_keys.resize(static_cast<std::size_t>(tokens));

  const SectionLayout k_layout = g.k_layout(), v_layout = g.v_layout();
  std::memset(out, 0, g.sections_offset());
  format::BlockHeader header{};
  header.block_tokens = static_cast<std::uint16_t>(tokens);
  header.head_dim = static_cast<std::uint16_t>(dim);
  header.num_heads = static_cast<std::uint16_t>(g.num_heads);
  header.version = format::kVersion;
  header.flags = g.flags();
  header.k_bits = static_cast<std::uint8_t>(g.k_bits);
  header.v_bits = static_cast<std::uint8_t>(g.v_bits);

  std::uint32_t offset = g.sections_offset();
  for (int h = 0; h < g.num_heads; ++h) {
    quantize_per_token(v, row_stride, h, tokens, dim, p.v_max_code, "V", s.v_codes.data(), s.v_params.data());
    if (g.k_per_channel) {
      quantize_per_channel(k, row_stride, h, tokens, dim, p.k_max_code, s.k_codes.data(), s.k_params.data());
    } else {
      quantize_per_token(k, row_stride, h, tokens, dim, p.k_max_code, "K", s.k_codes.data(), s.k_params.data());
    }
    switch (p.repack) {
      case RepackMethod::none: std::iota(s.order.begin(), s.order.end(), std::uint8_t{0}); break;
      case RepackMethod::median:
        order_by_median(s.v_codes.data(), tokens, dim, s.order.data(), s.sort_keys.data());
        break;
      case RepackMethod::greedy: order_greedy(s.k_codes.data(), s.v_codes.data(), tokens, dim, s.order.data()); break;
    }
    if (g.permuted) std::memcpy(out + g.permutation_offset() + h * tokens, s.order.data(), tokens);

    format::HeadEntry entry{};
    entry.k_offset = offset;
    offset += write_section(k_layout, s.k_codes.data(), s.k_params.data(), !g.k_per_channel, s.order.data(), dim,
                            out + offset);
    entry.v_offset = offset;
    offset += write_section(v_layout, s.v_codes.data(), s.v_params.data(), true, s.order.data(), dim, out + offset);
    std::memcpy(out + g.directory_offset() + h * sizeof(entry), &entry, sizeof(entry));
  }
  std::memset(out + offset, 0, format::kTrailingSlack);
  offset += format::kTrailingSlack;
  header.block_bytes = offset;
  std::memcpy(out, &header, sizeof header);
  return offset;
}

template std::uint32_t encode_block<float>(const CodecParams&, const float*, const float*, std::size_t,
                                           std::uint8_t*, EncodeScratch&);
template std::uint32_t encode_block<fp16_t>(const CodecParams&, const fp16_t*, const fp16_t*, std::size_t,
                                            std::uint8_t*, EncodeScratch&);
template std::uint32_t encode_block<bf16_t>(const CodecParams&, const bf16_t*, const bf16_t*, std::size_t,
                                            std::uint8_t*, EncodeScratch&);

void unpack_section_codes(const SectionLayout& layout, const std::uint8_t* section, std::uint8_t* codes) {
  const std::uint32_t dim = layout.head_dim;
  std::uint8_t values[format::kPackTokens];
  for (std::uint32_t r = 0; r < layout.rounds; ++r) {
    const format::RoundView round = format::round_view(section, layout, r);
    const std::uint8_t* pack = round.packs;
    for (std::uint32_t c = 0; c < dim; ++c) {
      const auto [width, lo] = format::pack_descriptor(round, c, layout.bits);
      format::unpack16(pack, width, values);
      pack += 2 * width;
      for (int i = 0; i < format::kPackTokens; ++i) {
        codes[(r * format::kPackTokens + i) * dim + c] = static_cast<std::uint8_t>(values[i] + lo);
      }
    }
  }
}

void decode_block(const CodecParams& p, const std::uint8_t* block, float* k, float* v, std::size_t row_stride) {
  const format::BlockGeometry& g = p.geometry;
  const int tokens = g.block_tokens, dim = g.head_dim;
  const SectionLayout k_layout = g.k_layout(), v_layout = g.v_layout();
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(tokens) * dim);
  for (int h = 0; h < g.num_heads; ++h) {
    format::HeadEntry entry;
    std::memcpy(&entry, block + g.directory_offset() + h * sizeof entry, sizeof entry);
    const std::uint8_t* order = g.permuted ? block + g.permutation_offset() + h * tokens : nullptr;
    for (int which = 0; which < 2; ++which) {
      const SectionLayout& layout = which == 0 ? k_layout : v_layout;
      const std::uint8_t* section = block + (which == 0 ? entry.k_offset : entry.v_offset);
      const bool per_channel = which == 0 && g.k_per_channel;
      float* dst = which == 0 ? k : v;
      unpack_section_codes(layout, section, codes.data());
      const auto* params = reinterpret_cast<const Params*>(section);
      for (int i = 0; i < tokens; ++i) {
        const int t = order ? order[i] : i;
        float* row = dst + static_cast<std::size_t>(t) * row_stride + static_cast<std::size_t>(h) * dim;
        for (int c = 0; c < dim; ++c) {
          const Params& pr = params[per_channel ? c : i];
          row[c] = format::dequantize(codes[static_cast<std::size_t>(i) * dim + c], to_float(pr.step),
                                      to_float(pr.min));
        }
      }
    }
  }
}

BlockBytes block_bytes_breakdown(const CodecParams& p, const std::uint8_t* block) {
  const format::BlockGeometry& g = p.geometry;
  format::BlockHeader header;
  std::memcpy(&header, block, sizeof header);
  BlockBytes b;
  b.permutations = g.permutation_bytes();
  const SectionLayout layouts[2] = {g.k_layout(), g.v_layout()};
  for (int h = 0; h < g.num_heads; ++h) {
    format::HeadEntry entry;
    std::memcpy(&entry, block + g.directory_offset() + h * sizeof entry, sizeof entry);
    for (int which = 0; which < 2; ++which) {
      const SectionLayout& layout = layouts[which];
      const std::uint8_t* section = block + (which == 0 ? entry.k_offset : entry.v_offset);
      std::size_t descriptors = 0;
      for (std::uint32_t r = 0; r < layout.rounds; ++r) {
        if (!format::round_view(section, layout, r).plain) descriptors += layout.descriptor_bytes;
      }
      const std::uint32_t rounds_bytes = format::round_end(section, layout, layout.rounds - 1);
      b.payload += rounds_bytes - descriptors;
      b.descriptors += descriptors;
      b.params += layout.param_count * sizeof(Params);
      (which == 0 ? b.k_sections : b.v_sections) += layout.section_bytes(rounds_bytes);
    }
  }
  b.headers = header.block_bytes - b.payload - b.params - b.descriptors - b.permutations;
  return b;
}

namespace {

// Checks one section's rounds (sizes, widths, minimums, codes) and returns the bytes they take.
std::uint32_t validate_rounds(const SectionLayout& layout, const std::uint8_t* section, std::uint32_t available,
                              int max_code, int head, const char* name) {
  std::uint32_t offset = 0;
  std::uint8_t values[format::kPackTokens];
  for (std::uint32_t r = 0; r < layout.rounds; ++r) {
    const std::uint32_t end = format::round_end(section, layout, r);
    PACKKV_REQUIRE(end > offset && end - offset <= layout.plain_round_bytes && end - offset >= layout.descriptor_bytes,
                   fmt::format("head {} {} round {} ends at {}: a round after {} takes between {} and {} bytes", head,
                               name, r, end, offset, layout.descriptor_bytes, layout.plain_round_bytes));
    PACKKV_REQUIRE(end <= available, fmt::format("head {} {} round {} ends at {}, past the block end ({} bytes left)",
                                                 head, name, r, end, available));
    const format::RoundView round = format::round_view(section, layout, r);
    const std::uint8_t* pack = round.packs;
    std::uint32_t bytes = round.plain ? 0 : layout.descriptor_bytes;  // of the round, so far
    for (std::uint32_t c = 0; c < layout.head_dim; ++c) {
      const auto [width, lo] = format::pack_descriptor(round, c, layout.bits);
      PACKKV_REQUIRE(width <= layout.bits,
                     fmt::format("head {} {} pack (round {}, channel {}) has width {} above the {} code bits", head,
                                 name, r, c, width, layout.bits));
      PACKKV_REQUIRE(lo <= static_cast<std::uint32_t>(max_code),
                     fmt::format("head {} {} pack (round {}, channel {}) min {} exceeds the largest code {}", head,
                                 name, r, c, lo, max_code));
      PACKKV_REQUIRE(offset + bytes + 2 * width <= end,
                     fmt::format("head {} {} pack (round {}, channel {}) runs past its round's end {}", head, name, r,
                                 c, end));
      format::unpack16(pack, width, values);
      for (std::uint8_t value : values) {
        PACKKV_REQUIRE(lo + value <= static_cast<std::uint32_t>(max_code),
                       fmt::format("head {} {} pack (round {}, channel {}) holds code {} above the largest code {}",
                                   head, name, r, c, lo + value, max_code));
      }
      pack += 2 * width;
      bytes += 2 * width;
    }
    PACKKV_REQUIRE(offset + bytes == end, fmt::format("head {} {} round {} holds {} bytes of packs but ends at {}",
                                                      head, name, r, bytes, end));
    offset = end;
  }
  return offset;
}

}  // namespace

void validate_block(const CodecParams& p, std::span<const std::uint8_t> bytes) {
  const format::BlockGeometry& g = p.geometry;
  PACKKV_REQUIRE(bytes.size() >= sizeof(format::BlockHeader),
                 fmt::format("block of {} bytes is shorter than its 16-byte header", bytes.size()));
  format::BlockHeader h;
  std::memcpy(&h, bytes.data(), sizeof h);
  PACKKV_REQUIRE(h.version == format::kVersion,
                 fmt::format("block format version {} is not supported (this build reads {})", h.version,
                             format::kVersion));
  PACKKV_REQUIRE(h.block_bytes == bytes.size(),
                 fmt::format("block header says {} bytes, but {} were given", h.block_bytes, bytes.size()));
  PACKKV_REQUIRE(h.block_tokens == g.block_tokens && h.head_dim == g.head_dim && h.num_heads == g.num_heads,
                 fmt::format("block shape (tokens {}, head_dim {}, heads {}) does not match the cache ({}, {}, {})",
                             h.block_tokens, h.head_dim, h.num_heads, g.block_tokens, g.head_dim, g.num_heads));
  PACKKV_REQUIRE(h.flags == g.flags() && h.k_bits == g.k_bits && h.v_bits == g.v_bits && h.reserved == 0,
                 fmt::format("block flags {} / code bits K {} V {} do not match the cache ({} / {} {})", h.flags,
                             h.k_bits, h.v_bits, g.flags(), g.k_bits, g.v_bits));
  PACKKV_REQUIRE(h.block_bytes >= g.min_block_bytes() && h.block_bytes <= g.max_block_bytes() &&
                     h.block_bytes % format::kAlign == 0,
                 fmt::format("block size {} is impossible for this geometry (must be a multiple of 16 in [{}, {}])",
                             h.block_bytes, g.min_block_bytes(), g.max_block_bytes()));
  if (g.permuted) {
    for (int head = 0; head < g.num_heads; ++head) {
      std::array<bool, 256> seen{};
      const std::uint8_t* order = bytes.data() + g.permutation_offset() + head * g.block_tokens;
      for (int i = 0; i < g.block_tokens; ++i) {
        PACKKV_REQUIRE(order[i] < g.block_tokens && !seen[order[i]],
                       fmt::format("head {}: stored token order is not a permutation (entry {} = {})", head, i,
                                   order[i]));
        seen[order[i]] = true;
      }
    }
  }
  std::uint32_t expected_offset = g.sections_offset();
  for (int head = 0; head < g.num_heads; ++head) {
    format::HeadEntry entry;
    std::memcpy(&entry, bytes.data() + g.directory_offset() + head * sizeof entry, sizeof entry);
    for (int which = 0; which < 2; ++which) {
      const SectionLayout layout = which == 0 ? g.k_layout() : g.v_layout();
      const int max_code = which == 0 ? p.k_max_code : p.v_max_code;
      const std::uint32_t section_offset = which == 0 ? entry.k_offset : entry.v_offset;
      const char* name = which == 0 ? "K" : "V";
      PACKKV_REQUIRE(section_offset == expected_offset,
                     fmt::format("head {} {} section offset {} should be {}", head, name, section_offset,
                                 expected_offset));
      PACKKV_REQUIRE(section_offset + layout.rounds_offset <= h.block_bytes - format::kTrailingSlack,
                     fmt::format("head {} {} section at {} runs past the block end", head, name, section_offset));
      const std::uint8_t* section = bytes.data() + section_offset;
      const auto* params = reinterpret_cast<const Params*>(section);
      for (std::uint32_t i = 0; i < layout.param_count; ++i) {
        const float step = to_float(params[i].step), min = to_float(params[i].min);
        PACKKV_REQUIRE(std::isfinite(step) && step >= 0.0f && std::isfinite(min),
                       fmt::format("head {} {} parameter {}: step {} / min {} are not valid", head, name, i, step,
                                   min));
      }
      const std::uint32_t rounds_bytes =
          validate_rounds(layout, section, h.block_bytes - format::kTrailingSlack - section_offset - layout.rounds_offset,
                          max_code, head, name);
      const std::uint32_t size = layout.section_bytes(rounds_bytes);
      PACKKV_REQUIRE(section_offset + size <= h.block_bytes - format::kTrailingSlack,
                     fmt::format("head {} {} section ({} bytes at {}) runs past the block end {}", head, name, size,
                                 section_offset, h.block_bytes));
      expected_offset = section_offset + size;
    }
  }
  PACKKV_REQUIRE(expected_offset + format::kTrailingSlack == h.block_bytes,
                 fmt::format("block is {} bytes but its sections end at {}", h.block_bytes, expected_offset));
}

}  // namespace packkv

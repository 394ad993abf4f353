// packkv_entropy: would an entropy-coded form of the sequence images pay? Measures it on a real
// model's K and V before anyone builds one.
//
// One window of a text runs through the model with the exact cache, which records every layer's
// K and V. Then, per side and rel:
//   - packkv: a one-layer PackedKVCache per layer takes the recorded K/V (no exact window), and its
//     memory_stats() give the bits per element, every byte counted;
//   - an entropy-coded image of the same codes: each (token, head) is quantized exactly as
//     packkv's encoder does (format/quant.hpp), its (step, min) kept as two fp16, and the codes cost
//     what an adaptive arithmetic coder would spend on them with one adaptive model per (layer,
//     head, channel) (Krichevsky-Trofimov estimator: -log2((count + 1/2) / (seen + levels / 2)) per
//     code, which an arithmetic coder meets within a few bytes per model), in arrival order: plain
//     codes, or the difference from the previous token's code in the channel. The permutation is
//     not stored (the encoder derives it from the codes on import), nor are pack descriptors.
//   - the static entropy of the same codes per (layer, head, channel), a floor for any coder
//     without context, tables not counted.
//
//
// With --widths it measures another format question on the same K and V instead: what a decoder
// built for the GPU (one code width per group of channels, so that a warp decodes a round with
// fixed shifts and no scan of the widths) would cost in bits. Each block is encoded as packkv
// does; then per round, every channel's pack width is taken as the largest of its group of G
// consecutive channels (one 4-bit width per group), the round stored plain when that is not
// smaller, and the rounds' bytes compared with the format's (G = 1, checked to match the blocks).
//
// With --radix it measures what codes packed in any radix would save instead of whole bits: a
// pack of range R (codes in [min, min + R]) takes 16 log2(R + 1) bits instead of 16 bit_width(R),
// a plain round D * 16 log2(max_code + 1) instead of D * 16 bits (the ideal of mixed-radix
// packing, no padding counted: an upper bound on its saving), and what narrower or joint pack
// descriptors would save. --compact encodes with compact parameters (CacheConfig::compact_params).
//
//   packkv_entropy --model smollm2-135m.pkvllama --tokens GPL-3.tokens [--context 2048]
//                  [--k-rel 0.03,0.05,0.1] [--v-rel 0.1,0.15,0.25] [--markdown FILE] [--widths | --radix] [--compact]
#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <packkv/codec.hpp>
#include <packkv/format.hpp>
#include <packkv/format/quant.hpp>
#include <packkv/image_coding.hpp>

#include "perplexity.hpp"

namespace {

/// The exact cache, recording every appended K and V: [layer][token][kv_dim].
class RecordingCache final : public llama::KvCache {
 public:
  explicit RecordingCache(const llama::KvShape& shape)
      : shape_(shape), exact_(llama::make_exact_cache(shape)), k_(static_cast<std::size_t>(shape.num_layers)), v_(k_.size()) {}
  void append(int layer, const float* k, const float* v) override {
    const auto d = static_cast<std::size_t>(shape_.kv_dim());
    k_[static_cast<std::size_t>(layer)].insert(k_[static_cast<std::size_t>(layer)].end(), k, k + d);
    v_[static_cast<std::size_t>(layer)].insert(v_[static_cast<std::size_t>(layer)].end(), v, v + d);
    exact_->append(layer, k, v);
  }
  void attend(int layer, const float* q, float* out, float scale) override { exact_->attend(layer, q, out, scale); }
  llama::KvBytes bytes() const override { return exact_->bytes(); }
  std::string describe() const override { return "recording exact cache"; }
  const std::vector<float>& k(int layer) const { return k_[static_cast<std::size_t>(layer)]; }
  const std::vector<float>& v(int layer) const { return v_[static_cast<std::size_t>(layer)]; }

 private:
  llama::KvShape shape_;
  std::unique_ptr<llama::KvCache> exact_;
  std::vector<std::vector<float>> k_, v_;
};

/// Code length in bits of a sequence under an adaptive Krichevsky-Trofimov model over `levels` symbols.
class AdaptiveModel {
 public:
  explicit AdaptiveModel(int levels) : counts_(static_cast<std::size_t>(levels), 0.0), levels_(levels) {}
  double code(int symbol) {
    const double p = (counts_[static_cast<std::size_t>(symbol)] + 0.5) / (seen_ + levels_ / 2.0);
    counts_[static_cast<std::size_t>(symbol)] += 1.0;
    seen_ += 1.0;
    return -std::log2(p);
  }

 private:
  std::vector<double> counts_;
  double seen_ = 0.0;
  int levels_;
};

struct SideResult {
  double packkv_bits = 0, adaptive_bits = 0, adaptive_delta_bits = 0, static_bits = 0, params_bits = 0;
};

std::vector<float> parse_list(const std::string& text) {
  std::vector<float> out;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');) out.push_back(std::stof(item));
  return out;
}

std::string f2(double x) {
  char b[32];
  std::snprintf(b, sizeof b, "%.2f", x);
  return b;
}

/// Group sizes of the --widths measurement: the format (1), a lane's channels at head_dim 128 (4),
/// a byte of descriptors' worth (8), a warp's quarter (16) and the whole round (head_dim).
std::vector<int> width_group_sizes(int dim) { return {1, 4, 8, 16, dim}; }

/// Adds, per group size, the bytes of one side's rounds (descriptors and packs) in `block` if
/// every group of G channels shared its largest pack width; returns the format's own bytes of
/// those rounds, read from the block (which the G = 1 figure must equal).
double add_width_group_bytes(const packkv::CodecParams& params, const std::uint8_t* block, packkv::format::Side side,
                             std::vector<double>& bytes) {
  namespace f = packkv::format;
  const f::BlockGeometry& g = params.geometry;
  const f::SectionLayout layout = side == f::Side::k ? g.k_layout() : g.v_layout();
  const int dim = g.head_dim, rounds = g.block_tokens / f::kPackTokens;
  const std::vector<int> groups = width_group_sizes(dim);
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(g.block_tokens) * dim);
  std::vector<std::uint32_t> width(static_cast<std::size_t>(dim));
  double actual = 0;
  for (int h = 0; h < g.num_heads; ++h) {
    const std::uint8_t* section = block + f::head_entry(block, g, h).offset(side);
    packkv::unpack_section_codes(layout, section, codes.data());
    actual += f::rounds_bytes(section, layout);
    for (int r = 0; r < rounds; ++r) {
      for (int c = 0; c < dim; ++c) {
        int lo = 255, hi = 0;
        for (int t = 16 * r; t < 16 * r + 16; ++t) {
          lo = std::min<int>(lo, codes[static_cast<std::size_t>(t) * dim + c]);
          hi = std::max<int>(hi, codes[static_cast<std::size_t>(t) * dim + c]);
        }
        width[static_cast<std::size_t>(c)] = static_cast<std::uint32_t>(std::bit_width(static_cast<unsigned>(hi - lo)));
      }
      for (std::size_t k = 0; k < groups.size(); ++k) {
        const int group = groups[k];
        std::uint32_t packs = 0;
        for (int c0 = 0; c0 < dim; c0 += group) {
          std::uint32_t w = 0;
          for (int c = c0; c < c0 + group; ++c) w = std::max(w, width[static_cast<std::size_t>(c)]);
          packs += 2u * w * static_cast<std::uint32_t>(group);
        }
        // Descriptors: a 4-bit width per group (whole bytes), the minimums as the format has them.
        const std::uint32_t descriptors = (static_cast<std::uint32_t>(dim / group) * 4u + 7u) / 8u + layout.descriptor_bytes - layout.widths_bytes;
        bytes[k] += std::min(descriptors + packs, layout.plain_round_bytes);
      }
    }
  }
  return actual;
}

/// The (width, minimum) pairs of a pack whose codes lie in [0, max_code]: width 0 with any minimum,
/// width w >= 1 with a range of at least 2^(w - 1), so a minimum of at most max_code - 2^(w - 1).
std::uint32_t joint_descriptor_pairs(std::uint32_t max_code) {
  std::uint32_t pairs = max_code + 1;
  for (std::uint32_t w = 1; (1u << (w - 1)) <= max_code; ++w) pairs += max_code - (1u << (w - 1)) + 1;
  return pairs;
}

/// One side's rounds in `block` (descriptors and packs), in bytes: as the format stores them (the
/// return value, recomputed from the codes and checked against the block), and in `radix` as an
/// ideal mixed-radix packing would: each pack at 16 log2(R + 1) bits for its range R, a plain round
/// at head_dim * 16 log2(max_code + 1); radix[0] keeps the format's descriptors (a lower bound:
/// a 4-bit width cannot say R), radix[1] stores R at the code bits in place of the width;
/// radix[2] is the format with each width in bit_width(code bits) bits instead of 4 (whole bits,
/// the decode unchanged but for the field size); radix[3] is the format with each pack's width and
/// minimum as one field of whole bits, just wide enough for the (width, minimum) pairs an encoder
/// can write (joint_descriptor_pairs; a table would map the field back); radix[4] is the ideal of
/// both: codes in any radix and the pair (minimum, R) at log2 of the number of such pairs, no
/// padding: an upper bound on what any packing of whole-pack ranges saves without entropy coding.
double add_radix_bytes(const packkv::CodecParams& params, const std::uint8_t* block, packkv::format::Side side,
                       double (&radix)[5]) {
  namespace f = packkv::format;
  const f::BlockGeometry& g = params.geometry;
  const f::SectionLayout layout = side == f::Side::k ? g.k_layout() : g.v_layout();
  const int dim = g.head_dim, rounds = g.block_tokens / f::kPackTokens;
  const double plain_radix = dim * 16.0 * std::log2(params.code_limit(side) + 1.0) / 8.0;
  const double minimums = layout.descriptor_bytes - layout.widths_bytes;
  const double range_descriptors = minimums + dim * layout.bits / 8.0;
  const double narrow_descriptors = minimums + dim * std::bit_width(layout.bits) / 8.0;
  const std::uint32_t max_code = params.code_limit(side);
  const double joint_descriptors = dim * std::bit_width(joint_descriptor_pairs(max_code) - 1) / 8.0;
  // Pairs (minimum m, range R) with m + R <= max code.
  const double range_pairs = (max_code + 1.0) * (max_code + 2.0) / 2.0;
  const double ideal_descriptors = dim * std::log2(range_pairs) / 8.0;
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(g.block_tokens) * dim);
  double format_bytes = 0;
  for (int h = 0; h < g.num_heads; ++h) {
    const std::uint8_t* section = block + f::head_entry(block, g, h).offset(side);
    packkv::unpack_section_codes(layout, section, codes.data());
    const double actual = f::rounds_bytes(section, layout);
    double recomputed = 0;
    for (int r = 0; r < rounds; ++r) {
      std::uint32_t packs = 0;
      double radix_packs = 0;
      for (int c = 0; c < dim; ++c) {
        int lo = 255, hi = 0;
        for (int t = 16 * r; t < 16 * r + 16; ++t) {
          lo = std::min<int>(lo, codes[static_cast<std::size_t>(t) * dim + c]);
          hi = std::max<int>(hi, codes[static_cast<std::size_t>(t) * dim + c]);
        }
        const int width = std::bit_width(static_cast<unsigned>(hi - lo));
        // Every pair the blocks hold must be one joint_descriptor_pairs counts.
        if (width > 0 && lo + (1 << (width - 1)) > static_cast<int>(max_code))
          throw std::runtime_error("a pack's (width, minimum) lies outside the counted pairs");
        packs += 2u * static_cast<std::uint32_t>(width);
        radix_packs += 16.0 * std::log2(hi - lo + 1.0) / 8.0;
      }
      recomputed += std::min(layout.descriptor_bytes + packs, layout.plain_round_bytes);
      radix[0] += std::min(layout.descriptor_bytes + radix_packs, plain_radix);
      radix[1] += std::min(range_descriptors + radix_packs, plain_radix);
      radix[2] += std::min<double>(narrow_descriptors + packs, layout.plain_round_bytes);
      radix[3] += std::min<double>(joint_descriptors + packs, layout.plain_round_bytes);
      radix[4] += std::min(ideal_descriptors + radix_packs, plain_radix);
    }
    if (recomputed != actual) throw std::runtime_error("the recomputed rounds differ from the format's");
    format_bytes += actual;
  }
  return format_bytes;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_path, tokens_path, markdown;
  int context = 2048, offset = 0;
  bool widths = false, radix = false, compact = false;
  std::vector<float> k_rels = {0.03f, 0.05f, 0.1f}, v_rels = {0.1f, 0.15f, 0.25f};
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw std::invalid_argument(arg + " needs a value");
        return argv[++i];
      };
      if (arg == "--model") model_path = value();
      else if (arg == "--tokens") tokens_path = value();
      else if (arg == "--context") context = std::stoi(value());
      else if (arg == "--offset") offset = std::stoi(value());
      else if (arg == "--k-rel") k_rels = parse_list(value());
      else if (arg == "--v-rel") v_rels = parse_list(value());
      else if (arg == "--markdown") markdown = value();
      else if (arg == "--widths") widths = true;
      else if (arg == "--radix") radix = true;
      else if (arg == "--compact") compact = true;
      else throw std::invalid_argument("unknown argument " + arg);
    }
    if (model_path.empty() || tokens_path.empty()) {
      std::fprintf(stderr, "usage: packkv_entropy --model FILE --tokens FILE [--context N] [--offset N] [--k-rel LIST] "
                           "[--v-rel LIST] [--markdown FILE] [--widths | --radix] [--compact]\n");
      return 2;
    }
    const llama::LlamaModel model = llama::LlamaModel::load(model_path);
    std::ifstream in(tokens_path, std::ios::binary | std::ios::ate);
    if (!in) throw std::runtime_error("cannot open " + tokens_path);
    std::vector<int> ids(static_cast<std::size_t>(in.tellg()) / sizeof(int));
    in.seekg(0);
    in.read(reinterpret_cast<char*>(ids.data()), static_cast<std::streamsize>(ids.size() * sizeof(int)));
    if (offset < 0 || offset + context > static_cast<int>(ids.size())) throw std::invalid_argument("window past the end of the tokens");
    const std::vector<int> tokens(ids.begin() + offset, ids.begin() + offset + context);

    const llama::KvShape shape = model.config().kv_shape();
    RecordingCache recording(shape);
    std::fprintf(stderr, "running %d tokens through the model...\n", context);
    llama::evaluate_teacher_forced(model, tokens.data(), context, recording);
    const int n = context, heads = shape.num_kv_heads, dim = shape.head_dim, layers = shape.num_layers;
    const double elements = static_cast<double>(n) * heads * dim * layers;

    // One layer of the model's shape with both sides at `rel` (one side's bytes are counted).
    auto one_layer_config = [&](float rel) {
      packkv::CacheConfig c;
      c.num_layers = 1;
      c.num_kv_heads = heads;
      c.num_q_heads = shape.num_q_heads;
      c.head_dim = dim;
      c.k_rel = rel;
      c.v_rel = rel;
      c.num_threads = 1;
      c.compact_params = compact;
      return c;
    };
    std::ostringstream md;
    // The command and the window, the start of each report's description.
    const char* parameters = compact ? "compact parameters" : "fp16 parameters";
    auto made_by = [&](std::string flags) {
      if (compact) flags += " --compact";
      md << "Made by `packkv_entropy --model " << std::filesystem::path(model_path).filename().string() << " --tokens "
         << std::filesystem::path(tokens_path).filename().string() << " --context " << context << " --offset " << offset
         << flags << "`: " << layers << " layers, " << heads << " KV heads, head_dim " << dim << ", " << n
         << " tokens of K and V recorded from the exact cache";
    };
    // Encodes one side's blocks at `rel`, every layer, calling visit(params, block, side) on each;
    // returns the side's bytes (its sections and half of what both sides share) and the elements
    // coded.
    struct SideTotals {
      double side_bytes = 0, elements = 0;
    };
    auto for_each_block = [&](int side, float rel, auto&& visit) {
      const packkv::CacheConfig c = one_layer_config(rel);
      const packkv::CodecParams params = packkv::make_codec_params(c);
      const packkv::format::Side which = side == 0 ? packkv::format::Side::k : packkv::format::Side::v;
      SideTotals totals;
      std::vector<std::uint8_t> block(params.geometry.max_block_bytes());
      packkv::EncodeScratch scratch;
      const std::size_t row = static_cast<std::size_t>(heads) * dim;
      for (int l = 0; l < layers; ++l) {
        for (int t0 = 0; t0 + c.block_tokens <= n; t0 += c.block_tokens) {
          packkv::BlockBytes parts{};
          packkv::encode_block(params, recording.k(l).data() + t0 * row, recording.v(l).data() + t0 * row, row,
                               block.data(), scratch, &parts);
          visit(params, block.data(), which);
          // The side's sections and half of what both sides share (headers, permutation).
          totals.side_bytes += static_cast<double>(side == 0 ? parts.k_sections : parts.v_sections) +
                               static_cast<double>(parts.headers + parts.permutations) / 2.0;
        }
      }
      totals.elements = static_cast<double>(layers) * (n / c.block_tokens) * c.block_tokens * heads * dim;
      return totals;
    };
    if (radix) {
      md << "# What codes packed in any radix would save\n\n";
      made_by(" --radix");
      md << ", encoded in blocks of 64 (median repacking, K per token, " << parameters << "). The format stores a pack "
            "of range R (its codes in [min, min + R]) at bit_width(R) bits per code and a plain round at the code "
            "bits; an ideal mixed-radix packing would take log2(R + 1) and log2(max code + 1), no padding counted, so "
            "the saving below is an upper bound. Each round stays the smaller of its two forms. Radix, format's "
            "descriptors: the 4-bit widths kept (they cannot say R: a lower bound on the bits); radix, range "
            "descriptors: R stored at the code bits in place of each width. Format, narrow widths: the format as it "
            "is with each pack's width in bit_width(code bits) bits instead of 4 (2 bits for codes of up to 3 bits, "
            "3 for up to 7). Format, joint descriptors: the format's codes, each pack's width and minimum as one "
            "field of whole bits, as narrow as the (width, minimum) pairs an encoder can write allow (40 pairs, "
            "6 bits, for codes of up to 10; a table maps the field back). Ideal: codes in any radix and each "
            "pack's (minimum, R) at log2 of the number of pairs with minimum + R <= max code, no padding: an upper "
            "bound on what packing whole-pack ranges can save without entropy coding. The side's total adds what "
            "the format stores besides its rounds (parameters, round table, half the permutation and headers), "
            "unchanged.\n\n";
      md << "| side | rel | max code | bits/element, format | radix, format's descriptors | radix, range descriptors | "
            "format, narrow widths | format, joint descriptors | ideal |\n|---|---|---|---|---|---|---|---|---|\n";
      for (int side = 0; side < 2; ++side) {
        for (float rel : side == 0 ? k_rels : v_rels) {
          double format_rounds = 0, radix_rounds[5] = {0, 0, 0, 0, 0};
          int max_code = 0;
          const SideTotals t = for_each_block(side, rel, [&](const packkv::CodecParams& params, const std::uint8_t* block,
                                                             packkv::format::Side which) {
            max_code = params.code_limit(which);
            format_rounds += add_radix_bytes(params, block, which, radix_rounds);
          });
          auto bits = [&](double rounds) { return 8.0 * (t.side_bytes - format_rounds + rounds) / t.elements; };
          auto saving = [&](double rounds) { return f2(100.0 * (format_rounds - rounds) / t.side_bytes); };
          md << "| " << (side == 0 ? "K" : "V") << " | " << rel << " | " << max_code << " | " << f2(bits(format_rounds))
             << " | " << f2(bits(radix_rounds[0])) << " (-" << saving(radix_rounds[0]) << "%) | " << f2(bits(radix_rounds[1]))
             << " (-" << saving(radix_rounds[1]) << "%) | " << f2(bits(radix_rounds[2])) << " (-" << saving(radix_rounds[2])
             << "%) | " << f2(bits(radix_rounds[3])) << " (-" << saving(radix_rounds[3]) << "%) | "
             << f2(bits(radix_rounds[4])) << " (-" << saving(radix_rounds[4]) << "%) |\n";
          std::fprintf(stderr, "%s rel %g: format %.3f bits, radix %.3f / %.3f\n", side == 0 ? "K" : "V", rel,
                       bits(format_rounds), bits(radix_rounds[0]), bits(radix_rounds[1]));
        }
      }
      std::fputs(md.str().c_str(), stdout);
      if (!markdown.empty()) std::ofstream(markdown) << md.str();
      return 0;
    }
    if (widths) {
      md << "# What one code width per group of channels would cost\n\n";
      made_by(" --widths");
      md << ", encoded in blocks of 64 (median repacking, K per "
            "token, " << parameters << "). Per round (16 tokens), each channel's pack width becomes the largest of its "
            "group of G consecutive channels, stored once per group (4 bits); the round is stored plain when that "
            "is not smaller. Rounds = descriptors and packs; the side's total adds what the format stores besides "
            "them (parameters, round table, half the permutation and headers), unchanged. G = 1 is the format (its "
            "bytes are checked against the blocks); in parentheses, how many more bits the side takes than with "
            "the format. G = head_dim is one width per round: what lets a warp decode with fixed shifts.\n\n";
      const std::vector<int> groups = width_group_sizes(dim);
      md << "| side | rel | bits/element, format |";
      for (std::size_t k = 1; k < groups.size(); ++k) md << " G = " << groups[k] << " |";
      md << "\n|---|---|---|";
      for (std::size_t k = 1; k < groups.size(); ++k) md << "---|";
      md << "\n";
      for (int side = 0; side < 2; ++side) {
        for (float rel : side == 0 ? k_rels : v_rels) {
          std::vector<double> bytes(groups.size(), 0.0);
          double actual = 0;
          const SideTotals t = for_each_block(side, rel, [&](const packkv::CodecParams& params, const std::uint8_t* block,
                                                             packkv::format::Side which) {
            actual += add_width_group_bytes(params, block, which, bytes);
          });
          const double side_bytes = t.side_bytes;
          if (bytes[0] != actual) throw std::runtime_error("the G = 1 rounds differ from the format's");
          auto bits = [&](double rounds) { return 8.0 * (side_bytes - actual + rounds) / t.elements; };
          md << "| " << (side == 0 ? "K" : "V") << " | " << rel << " | " << f2(bits(actual)) << " |";
          for (std::size_t k = 1; k < groups.size(); ++k)
            md << " " << f2(bits(bytes[k])) << " (+" << f2(100.0 * (bytes[k] - actual) / side_bytes) << "%) |";
          md << "\n";
          std::fprintf(stderr, "%s rel %g: format %.3f bits, round-wide width %.3f\n", side == 0 ? "K" : "V", rel,
                       bits(actual), bits(bytes.back()));
        }
      }
      std::fputs(md.str().c_str(), stdout);
      if (!markdown.empty()) std::ofstream(markdown) << md.str();
      return 0;
    }
    md << "# Would entropy-coded sequence images pay?\n\n";
    made_by("");
    md << ". Bits per element of the whole window, every layer, no "
          "exact window. packkv: block 64, median repacking, K per token, memory_stats() (sections, headers, "
          "permutations, block tables). Entropy-coded image: the same codes (packkv's quantizer), two fp16 per "
          "(token, head) for step and minimum, codes at the code length of an adaptive model per (layer, head, "
          "channel) (Krichevsky-Trofimov, what an adaptive arithmetic coder achieves within a few bytes per model), "
          "plain or as the difference from the previous token's code; static entropy per (layer, head, channel) "
          "without table costs is a floor for context-free coders.\n\n";
    md << "| side | rel | packkv bits | image bits, adaptive | saving | image bits, adaptive on differences | "
          "saving | static entropy + params (floor) | saving |\n|---|---|---|---|---|---|---|---|---|\n";

    for (int side = 0; side < 2; ++side) {
      for (float rel : side == 0 ? k_rels : v_rels) {
        SideResult r;
        const int max_code = packkv::max_code_for_rel(rel);
        const int levels = max_code + 1;
        double packkv_bytes = 0;
        for (int l = 0; l < layers; ++l) {
          const std::vector<float>& x = side == 0 ? recording.k(l) : recording.v(l);
          // packkv: this side at rel, the other at the same rel (its bytes are not counted).
          packkv::PackedKVCache<float> cache(one_layer_config(rel));
          cache.add_sequence(0);
          cache.append(0, 0, side == 0 ? x.data() : recording.k(l).data(), side == 0 ? recording.v(l).data() : x.data(), n);
          const packkv::MemoryBreakdown t = cache.memory_stats().total;
          // The tail ring is allocated even when empty; it is no part of the blocks (nor of an image's).
          packkv_bytes += (side == 0 ? t.k_bytes() : t.v_bytes()) - static_cast<double>(t.tail + t.sinks) / 2.0;
          // The image: codes per (head, channel), in arrival order.
          for (int h = 0; h < heads; ++h) {
            std::vector<AdaptiveModel> plain(static_cast<std::size_t>(dim), AdaptiveModel(levels));
            std::vector<AdaptiveModel> delta(static_cast<std::size_t>(dim), AdaptiveModel(levels));
            std::vector<std::map<int, int>> histogram(static_cast<std::size_t>(dim));
            std::vector<int> previous(static_cast<std::size_t>(dim), 0);
            for (int t = 0; t < n; ++t) {
              const float* row = x.data() + (static_cast<std::size_t>(t) * heads + h) * dim;
              packkv::format::Range range;
              for (int ch = 0; ch < dim; ++ch) range.extend(row[ch]);
              const packkv::format::Quantizer q = packkv::format::make_quantizer(range.lo, range.hi, max_code);
              r.params_bits += 32.0;
              for (int ch = 0; ch < dim; ++ch) {
                const int code = packkv::format::quantize(row[ch], q, max_code);
                const auto c_ = static_cast<std::size_t>(ch);
                r.adaptive_bits += plain[c_].code(code);
                r.adaptive_delta_bits += delta[c_].code((code - previous[c_] + levels) % levels);
                previous[c_] = code;
                ++histogram[c_][code];
              }
            }
            for (const auto& hist : histogram) {
              for (const auto& [code, count] : hist) r.static_bits -= count * std::log2(static_cast<double>(count) / n);
            }
          }
        }
        const double per = 1.0 / elements;
        const double pk = 8.0 * packkv_bytes * per, params = r.params_bits * per;
        const double adaptive = r.adaptive_bits * per + params, adaptive_delta = r.adaptive_delta_bits * per + params;
        const double floor = r.static_bits * per + params;
        auto saving = [&](double bits) { return f2(100.0 * (1.0 - bits / pk)) + "%"; };
        md << "| " << (side == 0 ? "K" : "V") << " | " << rel << " | " << f2(pk) << " | " << f2(adaptive) << " | "
           << saving(adaptive) << " | " << f2(adaptive_delta) << " | " << saving(adaptive_delta) << " | " << f2(floor)
           << " | " << saving(floor) << " |\n";
        std::fprintf(stderr, "%s rel %g: packkv %.2f, adaptive %.2f, delta %.2f, floor %.2f bits\n", side == 0 ? "K" : "V",
                     rel, pk, adaptive, adaptive_delta, floor);
      }
    }
    // The real thing: packkv images of the whole window (every layer, K and V at a pair of rels),
    // entropy coded and decoded back (median of 3 timings each, one core).
    md << "\n## Images, coded and decoded\n\nThe sequence image of the window (`export_sequence`, all " << layers
       << " layers, K and V at the rels below, no exact window) against its entropy-coded form "
          "(`encode_image_entropy`, include/packkv/image_coding.hpp), decoded back byte for byte. Times: median of 3, "
          "one core.\n\n";
    md << "| K rel | V rel | image bytes | coded bytes | coded / image | bits per element, image / coded | encode MB/s | "
          "decode MB/s (of image) |\n|---|---|---|---|---|---|---|---|\n";
    for (std::size_t i = 0; i < std::min(k_rels.size(), v_rels.size()); ++i) {
      packkv::CacheConfig c;
      c.num_layers = layers;
      c.num_kv_heads = heads;
      c.num_q_heads = shape.num_q_heads;
      c.head_dim = dim;
      c.k_rel = k_rels[i];
      c.v_rel = v_rels[i];
      c.num_threads = 1;
      packkv::PackedKVCache<float> cache(c);
      cache.add_sequence(0);
      for (int l = 0; l < layers; ++l) cache.append(0, l, recording.k(l).data(), recording.v(l).data(), n);
      const std::vector<std::uint8_t> image = cache.export_sequence(0);
      std::vector<std::uint8_t> coded, back;
      std::vector<double> encode_s, decode_s;
      for (int rep = 0; rep < 3; ++rep) {
        auto t0 = std::chrono::steady_clock::now();
        coded = packkv::encode_image_entropy(image);
        auto t1 = std::chrono::steady_clock::now();
        back = packkv::decode_image_entropy(coded);
        auto t2 = std::chrono::steady_clock::now();
        encode_s.push_back(std::chrono::duration<double>(t1 - t0).count());
        decode_s.push_back(std::chrono::duration<double>(t2 - t1).count());
      }
      if (back != image) throw std::runtime_error("the decoded image differs from the original");
      std::sort(encode_s.begin(), encode_s.end());
      std::sort(decode_s.begin(), decode_s.end());
      const double mb = static_cast<double>(image.size()) / 1e6;
      md << "| " << c.k_rel << " | " << c.v_rel << " | " << image.size() << " | " << coded.size() << " | "
         << f2(static_cast<double>(coded.size()) / static_cast<double>(image.size())) << " | "
         << f2(8.0 * static_cast<double>(image.size()) / (2 * elements)) << " / "
         << f2(8.0 * static_cast<double>(coded.size()) / (2 * elements)) << " | " << f2(mb / encode_s[1]) << " | "
         << f2(mb / decode_s[1]) << " |\n";
      std::fprintf(stderr, "image K %g / V %g: %zu -> %zu bytes (%.3f), encode %.2f s, decode %.2f s\n", c.k_rel, c.v_rel,
                   image.size(), coded.size(), static_cast<double>(coded.size()) / static_cast<double>(image.size()),
                   encode_s[1], decode_s[1]);
    }
    std::fputs(md.str().c_str(), stdout);
    if (!markdown.empty()) std::ofstream(markdown) << md.str();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "packkv_entropy: %s\n", e.what());
    return 1;
  }
  return 0;
}

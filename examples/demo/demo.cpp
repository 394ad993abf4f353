// packkv_demo: appends a stream of K/V to a PackedKVCache and shows what it saves and what it costs.
//
// With SmolLM2 set up (scripts/get_smollm2.sh) it uses that model's real K and V: it runs the GPL-3
// text through the model, records every layer's K, V and queries, and also reports the perplexity
// change when the model attends through packkv. Without it, it generates a K/V stream with the
// statistics of a real LLM's: a few large outlier channels in K, RoPE applied, smoother V.
//
//   packkv_demo                         # SmolLM2 if .cache/smollm2 holds it, else synthetic
//   packkv_demo --synthetic
//   packkv_demo --model-dir DIR --tokens 1024 --k-rel 0.03 --v-rel 0.1
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "perplexity.hpp"

namespace {

namespace fs = std::filesystem;

/// K, V and the queries of one sequence, per layer.
struct KvStream {
  std::string source;
  llama::KvShape shape;
  int tokens = 0;
  std::vector<std::vector<float>> k, v;  // [layer][token][kv_heads][head_dim], K after RoPE
  std::vector<std::vector<float>> q;     // [layer][query][q_heads][head_dim]
};

/// Records what a model appends and the queries it attends with; answers from an exact cache.
class RecordingCache final : public llama::KvCache {
 public:
  RecordingCache(const llama::KvShape& shape, KvStream& stream) : stream_(stream), exact_(llama::make_exact_cache(shape)) {
    stream_.shape = shape;
    stream_.k.assign(shape.num_layers, {});
    stream_.v.assign(shape.num_layers, {});
    stream_.q.assign(shape.num_layers, {});
  }
  void append(int layer, const float* k, const float* v) override {
    const int n = stream_.shape.kv_dim();
    stream_.k[layer].insert(stream_.k[layer].end(), k, k + n);
    stream_.v[layer].insert(stream_.v[layer].end(), v, v + n);
    exact_->append(layer, k, v);
  }
  void attend(int layer, const float* q, float* out, float scale) override {
    const int n = stream_.shape.num_q_heads * stream_.shape.head_dim;
    stream_.q[layer].insert(stream_.q[layer].end(), q, q + n);
    exact_->attend(layer, q, out, scale);
  }
  llama::KvBytes bytes() const override { return exact_->bytes(); }
  std::string describe() const override { return "recording"; }

 private:
  KvStream& stream_;
  std::unique_ptr<llama::KvCache> exact_;
};

/// A stream shaped like a Llama-class model's: 8 layers, 8 KV heads (GQA to 32 query heads),
/// head_dim 128. K: unit-variance channels plus a few outlier channels with a large offset and
/// spread (what makes K hard to quantize per token), then RoPE; V: smooth, AR(1)-correlated across
/// tokens. The last position's query leans towards an earlier key, so attention is peaked.
KvStream synthetic_stream(int tokens) {
  KvStream s;
  s.source = "synthetic K/V with LLM-like statistics (K outlier channels + RoPE, smoother V)";
  s.shape = {8, 8, 32, 128};
  s.tokens = tokens;
  const int hd = s.shape.head_dim, kv = s.shape.num_kv_heads, kv_dim = s.shape.kv_dim();
  const int group = s.shape.num_q_heads / kv;
  std::mt19937 rng(2024);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  s.k.resize(s.shape.num_layers);
  s.v.resize(s.shape.num_layers);
  s.q.resize(s.shape.num_layers);
  for (int l = 0; l < s.shape.num_layers; ++l) {
    std::vector<float>& k = s.k[l];
    std::vector<float>& v = s.v[l];
    k.resize(static_cast<std::size_t>(tokens) * kv_dim);
    v.resize(k.size());
    std::vector<float> outlier_mean(kv_dim, 0.0f), outlier_scale(kv_dim, 1.0f);
    for (int h = 0; h < kv; ++h) {
      for (int j = 0; j < 4; ++j) {  // four outlier channels per head
        const int c = h * hd + static_cast<int>(rng() % hd);
        outlier_mean[c] = 4.0f * normal(rng);  // a few times the other channels' spread
        outlier_scale[c] = 2.5f;
      }
    }
    std::vector<float> v_state(kv_dim, 0.0f);
    for (int t = 0; t < tokens; ++t) {
      float* kt = &k[static_cast<std::size_t>(t) * kv_dim];
      float* vt = &v[static_cast<std::size_t>(t) * kv_dim];
      for (int c = 0; c < kv_dim; ++c) {
        kt[c] = outlier_mean[c] + outlier_scale[c] * normal(rng);
        v_state[c] = 0.9f * v_state[c] + 0.436f * normal(rng);  // AR(1), unit stationary variance
        vt[c] = 0.5f * v_state[c];
      }
      for (int h = 0; h < kv; ++h) {
        for (int i = 0; i < hd; i += 2) {  // RoPE on adjacent pairs, theta 500000 as in Llama 3
          const double angle = t * std::pow(500000.0, -static_cast<double>(i) / hd);
          float* p = kt + h * hd + i;
          const float a = p[0], b = p[1];
          p[0] = static_cast<float>(a * std::cos(angle) - b * std::sin(angle));
          p[1] = static_cast<float>(a * std::sin(angle) + b * std::cos(angle));
        }
      }
    }
    // The query of the last position, leaning towards a few earlier keys.
    for (int h = 0; h < s.shape.num_q_heads; ++h) {
      const int target = static_cast<int>(rng() % tokens);
      const float* kt = &k[static_cast<std::size_t>(target) * kv_dim + (h / group) * hd];
      for (int i = 0; i < hd; ++i) s.q[l].push_back(0.15f * kt[i] + normal(rng));
    }
  }
  return s;
}

std::vector<int> read_tokens(const fs::path& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw std::runtime_error("cannot open " + path.string());
  std::vector<int> ids(static_cast<std::size_t>(in.tellg()) / sizeof(int));
  in.seekg(0);
  in.read(reinterpret_cast<char*>(ids.data()), static_cast<std::streamsize>(ids.size() * sizeof(int)));
  return ids;
}

double mib(double bytes) { return bytes / (1024.0 * 1024.0); }

/// Bits per element of K and of V: codes (packs), metadata, and the empirical entropy of the
/// codes per (layer, head, channel), which no lossless coding of those codes, metadata aside,
/// can beat. Computed on the blocks the codec makes of the stream's full blocks.
struct SideBits {
  double codes = 0, metadata = 0, entropy = 0;
};
void code_bits(const KvStream& stream, const packkv::CacheConfig& config, SideBits out[2]) {
  const packkv::CodecParams codec = packkv::make_codec_params(config);
  const packkv::format::BlockGeometry& g = codec.geometry;
  const int kv_dim = stream.shape.kv_dim(), tokens_per_block = g.block_tokens, dim = g.head_dim;
  const int blocks = stream.tokens / tokens_per_block;
  if (blocks == 0) return;
  std::vector<std::uint8_t> block(g.max_block_bytes()), codes(static_cast<std::size_t>(tokens_per_block) * dim);
  packkv::EncodeScratch scratch;
  double section_bytes[2] = {0, 0}, pack_bytes[2] = {0, 0}, entropy_bits[2] = {0, 0};
  for (int l = 0; l < stream.shape.num_layers; ++l) {
    // histogram[side][head][channel][code]
    std::vector<std::vector<double>> histogram(2 * g.num_heads * dim, std::vector<double>(256, 0.0));
    for (int b = 0; b < blocks; ++b) {
      const std::size_t at = static_cast<std::size_t>(b) * tokens_per_block * kv_dim;
      packkv::encode_block<float>(codec, stream.k[l].data() + at, stream.v[l].data() + at, kv_dim, block.data(), scratch);
      for (int h = 0; h < g.num_heads; ++h) {
        packkv::format::HeadEntry e;
        std::memcpy(&e, block.data() + g.directory_offset() + h * sizeof e, sizeof e);
        for (int side = 0; side < 2; ++side) {
          const packkv::format::SectionLayout layout = side == 0 ? g.k_layout() : g.v_layout();
          const std::uint8_t* section = block.data() + (side == 0 ? e.k_offset : e.v_offset);
          const std::uint32_t rounds_bytes = packkv::format::round_end(section, layout, layout.rounds - 1);
          section_bytes[side] += layout.section_bytes(rounds_bytes);
          for (std::uint32_t r = 0; r < layout.rounds; ++r) {
            const bool plain = packkv::format::round_view(section, layout, r).plain;
            pack_bytes[side] += packkv::format::round_end(section, layout, r) -
                                packkv::format::round_begin(section, layout, r) - (plain ? 0 : layout.descriptor_bytes);
          }
          packkv::unpack_section_codes(layout, section, codes.data());
          for (int t = 0; t < tokens_per_block; ++t) {
            for (int c = 0; c < dim; ++c) histogram[(side * g.num_heads + h) * dim + c][codes[t * dim + c]] += 1.0;
          }
        }
      }
    }
    for (std::size_t i = 0; i < histogram.size(); ++i) {
      for (double count : histogram[i]) {
        if (count > 0) entropy_bits[i / (histogram.size() / 2)] -= count * std::log2(count / blocks / tokens_per_block);
      }
    }
  }
  const double elements = static_cast<double>(blocks) * tokens_per_block * kv_dim * stream.shape.num_layers;
  // Per block, the shared prefix (header, directory, permutations) and slack go half to each side.
  const double shared = static_cast<double>(blocks) * stream.shape.num_layers *
                        (g.sections_offset() + packkv::format::kTrailingSlack) / 2.0;
  for (int side = 0; side < 2; ++side) {
    out[side].codes = 8.0 * pack_bytes[side] / elements;
    out[side].metadata = 8.0 * (section_bytes[side] - pack_bytes[side] + shared) / elements;
    out[side].entropy = entropy_bits[side] / elements;
  }
}

}  // namespace

int main(int argc, char** argv) {
  fs::path model_dir = std::getenv("PACKKV_MODEL_DIR") ? std::getenv("PACKKV_MODEL_DIR") : ".cache/smollm2";
  bool synthetic = false;
  int n_tokens = 1024;
  packkv::CacheConfig config;
  config.k_rel = 0.03f;  // SmolLM2's 1% turning points for per-token K and for V (docs/results)
  config.v_rel = 0.1f;
  config.block_tokens = 64;
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw std::invalid_argument(arg + " needs a value");
        return argv[++i];
      };
      if (arg == "--model-dir") model_dir = value();
      else if (arg == "--synthetic") synthetic = true;
      else if (arg == "--tokens") n_tokens = std::stoi(value());
      else if (arg == "--k-rel") config.k_rel = std::stof(value());
      else if (arg == "--v-rel") config.v_rel = std::stof(value());
      else if (arg == "--block") config.block_tokens = std::stoi(value());
      else if (arg == "--residual") config.residual_tokens = std::stoi(value());
      else if (arg == "--sinks") config.sink_tokens = std::stoi(value());
      else if (arg == "--k-per-channel") config.k_mode = packkv::QuantMode::per_channel;
      else if (arg == "--compact-params") config.compact_params = true;
      else if (arg == "--repack") {
        const std::string r = value();
        if (r == "none") config.repack = packkv::RepackMethod::none;
        else if (r == "median") config.repack = packkv::RepackMethod::median;
        else if (r == "greedy") config.repack = packkv::RepackMethod::greedy;
        else throw std::invalid_argument("unknown --repack " + r);
      }
      else if (arg == "--help" || arg == "-h") {
        std::printf(
            "usage: packkv_demo [--synthetic] [--model-dir DIR] [--tokens N] [--k-rel R] [--v-rel R] [--block N]\n"
            "                   [--residual N] [--sinks N] [--k-per-channel] [--compact-params]\n"
            "                   [--repack none|median|greedy]\n");
        return 0;
      } else throw std::invalid_argument("unknown argument " + arg);
    }

    const fs::path model_path = model_dir / "smollm2-135m.pkvllama";
    const fs::path tokens_path = model_dir / "GPL-3.tokens";
    const bool have_model = !synthetic && fs::exists(model_path) && fs::exists(tokens_path);
    KvStream stream;
    std::vector<int> tokens;
    std::unique_ptr<llama::LlamaModel> model;
    const auto start = std::chrono::steady_clock::now();
    if (have_model) {
      model = std::make_unique<llama::LlamaModel>(llama::LlamaModel::load(model_path.string()));
      tokens = read_tokens(tokens_path);
      tokens.resize(std::min<std::size_t>(tokens.size(), static_cast<std::size_t>(n_tokens)));
      stream.source = "SmolLM2-135M-Instruct, real K/V of " + std::to_string(tokens.size()) + " tokens of the GPL-3 text";
      RecordingCache recording(model->config().kv_shape(), stream);
      std::printf("running %zu tokens through SmolLM2 to record its K/V ...\n", tokens.size());
      std::fflush(stdout);
      llama::evaluate_teacher_forced(*model, tokens.data(), static_cast<int>(tokens.size()), recording);
      stream.tokens = static_cast<int>(tokens.size());
    } else {
      if (!synthetic) {
        std::printf("(SmolLM2 not found in %s: run scripts/get_smollm2.sh for real K/V; using a generated stream)\n",
                    model_dir.string().c_str());
      }
      stream = synthetic_stream(std::max(n_tokens, 256));
    }
    const llama::KvShape& shape = stream.shape;
    config.num_layers = shape.num_layers;
    config.num_kv_heads = shape.num_kv_heads;
    config.num_q_heads = shape.num_q_heads;
    config.head_dim = shape.head_dim;

    std::printf("\nsource : %s\n", stream.source.c_str());
    std::printf("shape  : %d layers x %d KV heads x head_dim %d, %d tokens (%d query heads)\n", shape.num_layers,
                shape.num_kv_heads, shape.head_dim, stream.tokens, shape.num_q_heads);
    std::printf("config : %s\n\n", packkv::describe(config).c_str());

    // Append the stream as a decoder would, one token at a time, and attend with the recorded
    // queries; compare against exact dense attention over the original K/V.
    packkv::PackedKVCache<float> cache(config);
    cache.add_sequence(0);
    const int kv_dim = shape.kv_dim();
    const int q_width = shape.num_q_heads * shape.head_dim;
    const float scale = 1.0f / std::sqrt(static_cast<float>(shape.head_dim));
    double worst_rel_err = 0.0, sum_rel_err = 0.0;
    int checks = 0;
    std::vector<float> out(q_width), ref(q_width), scratch;
    for (int l = 0; l < shape.num_layers; ++l) {
      for (int t = 0; t < stream.tokens; ++t) {
        cache.append(0, l, &stream.k[l][static_cast<std::size_t>(t) * kv_dim], &stream.v[l][static_cast<std::size_t>(t) * kv_dim], 1);
      }
      // The last position's query attends over every token, nearly all of them in packed blocks.
      const float* q = &stream.q[l][stream.q[l].size() - static_cast<std::size_t>(q_width)];
      llama::dense_attention(shape, stream.k[l].data(), stream.v[l].data(), stream.tokens, q, ref.data(), scale, scratch);
      const packkv::SeqId ids[1] = {0};
      cache.attention(ids, l, q, out.data(), scale);
      double num = 0, den = 0;
      for (int i = 0; i < q_width; ++i) {
        num += (out[i] - ref[i]) * static_cast<double>(out[i] - ref[i]);
        den += static_cast<double>(ref[i]) * ref[i];
      }
      const double rel = std::sqrt(num / std::max(den, 1e-30));
      worst_rel_err = std::max(worst_rel_err, rel);
      sum_rel_err += rel;
      ++checks;
    }

    const packkv::MemoryStats stats = cache.memory_stats();
    const packkv::MemoryBreakdown& m = stats.total;
    const double fp16 = static_cast<double>(m.original_fp16_bytes);
    std::printf("fp16 K/V cache        : %8.2f MiB\n", mib(fp16));
    std::printf("packkv cache          : %8.2f MiB  (codes %.2f, scales/mins %.2f, pack descriptors %.2f,\n"
                "                                   permutations %.2f, headers+tables %.2f, uncompressed tail %.2f,\n"
                "                                   exact sinks %.2f)\n",
                mib(static_cast<double>(m.total())), mib(m.payload), mib(m.params), mib(m.descriptors), mib(m.permutations),
                mib(static_cast<double>(m.headers + m.block_tables)), mib(m.tail), mib(m.sinks));
    std::printf("compression ratio     : %8.2fx vs fp16, every byte counted\n", m.ratio_vs_fp16());
    std::printf("memory saved          : %8.2f MiB (%.1f%% of the fp16 cache)\n", mib(fp16 - static_cast<double>(m.total())),
                100.0 * (1.0 - static_cast<double>(m.total()) / fp16));
    std::printf("attention error       : relative L2 %.2e mean, %.2e worst, over %d queries (vs exact attention)\n",
                checks ? sum_rel_err / checks : 0.0, worst_rel_err, checks);
    SideBits bits[2];
    code_bits(stream, config, bits);
    for (int side = 0; side < 2; ++side) {
      std::printf("%s bits per element    : %5.2f = codes %.2f + metadata %.2f (blocks only; entropy of the codes "
                  "per channel %.2f)\n",
                  side == 0 ? "K" : "V", bits[side].codes + bits[side].metadata, bits[side].codes, bits[side].metadata,
                  bits[side].entropy);
    }

    // The same K/V and queries through quantization baselines, for scale.
    std::printf("\nfor comparison, the same stream through quantize-dequantize baselines (bytes counted alike):\n");
    for (const llama::Baseline kind : {llama::Baseline::int8_per_token, llama::Baseline::kivi4, llama::Baseline::int4_per_token}) {
      std::unique_ptr<llama::KvCache> baseline = llama::make_baseline_cache(shape, kind);
      double worst = 0.0, sum = 0.0;
      for (int l = 0; l < shape.num_layers; ++l) {
        for (int t = 0; t < stream.tokens; ++t) {
          baseline->append(l, &stream.k[l][static_cast<std::size_t>(t) * kv_dim], &stream.v[l][static_cast<std::size_t>(t) * kv_dim]);
        }
        const float* q = &stream.q[l][stream.q[l].size() - static_cast<std::size_t>(q_width)];
        llama::dense_attention(shape, stream.k[l].data(), stream.v[l].data(), stream.tokens, q, ref.data(), scale, scratch);
        baseline->attend(l, q, out.data(), scale);
        double num = 0, den = 0;
        for (int i = 0; i < q_width; ++i) {
          num += (out[i] - ref[i]) * static_cast<double>(out[i] - ref[i]);
          den += static_cast<double>(ref[i]) * ref[i];
        }
        const double rel = std::sqrt(num / std::max(den, 1e-30));
        worst = std::max(worst, rel);
        sum += rel;
      }
      std::printf("  %-36s %5.2fx, attention error %.2e mean, %.2e worst\n", baseline->describe().c_str(),
                  baseline->bytes().kv_ratio(), sum / shape.num_layers, worst);
    }

    if (have_model) {
      // What it does to the model: perplexity with the model attending through packkv.
      const int ppl_tokens = std::min<int>(512, static_cast<int>(tokens.size()));
      auto exact_cache = llama::make_exact_cache(shape);
      auto packed_cache = llama::make_packkv_cache(shape, config);
      const auto exact = llama::evaluate_teacher_forced(*model, tokens.data(), ppl_tokens, *exact_cache);
      const auto packed = llama::evaluate_teacher_forced(*model, tokens.data(), ppl_tokens, *packed_cache);
      std::printf("perplexity (%d tokens): %.3f exact, %.3f through packkv (%+.2f%%), top-1 agreement %.1f%%\n",
                  ppl_tokens, exact.perplexity, packed.perplexity, (packed.perplexity / exact.perplexity - 1.0) * 100.0,
                  100.0 * llama::top1_agreement(packed.predictions, exact.predictions));
    }
    std::printf("(%.1f s)\n", std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "packkv_demo: %s\n", e.what());
    return 1;
  }
  return 0;
}

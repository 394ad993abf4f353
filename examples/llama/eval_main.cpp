// packkv_eval: the accuracy harness. Runs real texts through a model teacher-forced, in windows of
// --context tokens, the KV cache filled token by token as in decoding, once per cache setting and
// window. Against the exact cache's run on the same window it reports, per setting: perplexity and
// its change, the mean KL divergence KL(exact || setting) of the next-token distribution, top-1
// agreement, each with a bootstrap confidence interval, and the bits per element of the compressed
// part of K and V with every byte counted. Every cache keeps the same recent tokens exact (packkv's
// tail rule), so settings differ only in how they quantize. Writes a Markdown report and a CSV
// (scripts/plot_accuracy.py draws the CSV).
//
//   packkv_eval --model smollm2-135m.pkvllama --tokens GPL-3.tokens --tokens GFDL-1.3.tokens \
//               --context 2048 --markdown docs/results/accuracy.md --csv docs/results/accuracy.csv
#include <omp.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "layer_calibration.hpp"
#include "perplexity.hpp"
#include "tokenizer.hpp"

namespace {

using Clock = std::chrono::steady_clock;

enum class Family { exact, packkv_control, packkv_k, packkv_k_channel, packkv_k_scaled, packkv_v, packkv_pair, packkv_per_layer, baseline };

const char* family_name(Family f) {
  switch (f) {
    case Family::exact: return "exact";
    case Family::packkv_control: return "packkv-control";
    case Family::packkv_k: return "packkv-K";
    case Family::packkv_k_channel: return "packkv-K-channel";
    case Family::packkv_k_scaled: return "packkv-K-scaled";
    case Family::packkv_v: return "packkv-V";
    case Family::packkv_pair: return "packkv-KV";
    case Family::packkv_per_layer: return "packkv-per-layer";
    case Family::baseline: return "baseline";
  }
  return "?";
}

bool is_packkv(Family f) { return f != Family::exact && f != Family::baseline; }

struct Setting {
  std::string name;
  Family family;
  float k_rel = 0.0f;  // PackKV settings only
  float v_rel = 0.0f;
  packkv::QuantMode k_mode = packkv::QuantMode::per_token;
  std::optional<llama::Baseline> baseline;
  std::function<std::unique_ptr<llama::KvCache>()> make_cache;
};

/// A stretch of one text: the unit every setting runs on, and the exact cache's run on it.
struct Window {
  std::string source;
  int offset = 0;
  std::vector<int> tokens;
  llama::ExactReference reference;
  std::vector<float> exact_nll;  // per position
};

/// One setting on one window.
struct WindowRun {
  std::vector<float> nll, kl;  // per position
  std::vector<char> same_top1;
  llama::KvBytes bytes;
  double seconds = 0.0;
};

struct Interval {
  double value = 0.0, lo = 0.0, hi = 0.0;
};

struct Outcome {
  Setting setting;
  std::vector<WindowRun> runs;  // one per window
  llama::KvBytes bytes;         // summed over windows
  double perplexity = 0.0;
  Interval delta_pct;  // perplexity change against the exact cache, percent
  Interval kl;         // mean KL(exact || setting), nats per position
  Interval top1;       // share of positions whose argmax is the exact cache's
  double seconds = 0.0;
  double k_bits() const { return bytes.k_compressed_bits(); }
  double v_bits() const { return bytes.v_compressed_bits(); }
  double kv_bits() const { return (k_bits() + v_bits()) / 2.0; }
  /// Against fp16 at the end of the windows, the exact window counted at fp16 for every method
  /// (packkv holds its tail in the cache's storage type, fp32 here; engines hold it at fp16).
  double ratio(double compressed_bytes) const {
    const double window_bytes = bytes.fp16_bytes_per_side - 2.0 * bytes.compressed_elements_per_side;
    return bytes.fp16_bytes_per_side / (compressed_bytes + window_bytes);
  }
  double k_ratio() const { return ratio(bytes.k_compressed_bytes); }
  double v_ratio() const { return ratio(bytes.v_compressed_bytes); }
  double kv_ratio() const { return 2.0 / (1.0 / k_ratio() + 1.0 / v_ratio()); }
};

struct Options {
  std::string model, tokenizer, markdown, csv;
  std::vector<std::string> tokens, texts;
  int context = 2048;
  int max_windows = 0;  // per text; 0: every full window
  int threads = 0;
  int block = 64;
  int residual = 128;
  int bootstrap = 1000;
  int bootstrap_unit = 512;
  bool score_exact = false;
  bool rotate_k = false, rotate_v = false;  // PackKV settings store that side Hadamard-rotated
  bool keys_before_rope = false;            // PackKV settings store K before RoPE
  bool compact_params = false;              // PackKV settings store 2-byte (step, min) pairs
  int sinks = 0;                            // the first tokens of a window stay exact, for every method
  // K sweeps with K's channels scaled by calibrated powers of two (ChannelStatsCache): "kmax:A"
  // divides channel c by max|K_c|^A (QServe's SmoothAttention), "q:A" multiplies it by rms(q_c)^A.
  std::vector<std::string> k_channel_scales;
  std::string baselines = "all";  // or a comma list of short names (baseline_key), or "none"
  std::string sweeps = "k,k-channel,v,pairs";
  packkv::RepackMethod repack = packkv::RepackMethod::median;
  packkv::Device device = packkv::Device::cpu;
  std::string preset = "full";
  // Per-layer rels (layer_calibration.hpp): KL budgets on the calibration window, that window
  // (a stretch of the first text; offset -1: right after its evaluated windows), and the menus.
  std::vector<double> layer_budgets;
  int calibration_offset = -1;
  int calibration_tokens = 512;
  std::vector<float> layer_menu_k = {0.02f, 0.03f, 0.05f, 0.1f};
  std::vector<float> layer_menu_v = {0.05f, 0.1f, 0.15f, 0.25f};
};

template <class T>
std::vector<T> parse_list(const std::string& text) {
  std::vector<T> out;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');) {
    if (item.empty()) continue;
    if constexpr (std::is_same_v<T, std::string>) out.push_back(item);
    else out.push_back(static_cast<T>(std::stod(item)));
  }
  return out;
}

/// One item of --k-channel-scales: "kmax:A" or "q:A", A in (0, 4].
std::pair<std::string, double> parse_channel_scale(const std::string& spec) {
  const std::size_t colon = spec.find(':');
  const std::string kind = spec.substr(0, colon);
  if (colon == std::string::npos || (kind != "kmax" && kind != "q")) {
    throw std::invalid_argument("--k-channel-scales: '" + spec + "' is not kmax:ALPHA or q:ALPHA");
  }
  double alpha = 0.0;
  try {
    alpha = std::stod(spec.substr(colon + 1));
  } catch (const std::exception&) {
    throw std::invalid_argument("--k-channel-scales: '" + spec + "' has no number after the colon");
  }
  if (!(alpha > 0.0 && alpha <= 4.0)) {
    throw std::invalid_argument("--k-channel-scales: the power in '" + spec + "' must be in (0, 4]");
  }
  return {kind, alpha};
}

void usage() {
  std::fprintf(stderr,
               "usage: packkv_eval --model FILE (--tokens FILE... | --text FILE... --tokenizer FILE)\n"
               "                   [--context N] [--windows N] [--threads N] [--preset full|quick]\n"
               "                   [--block N] [--residual N] [--repack none|median|greedy] [--device cpu|cuda]\n"
               "                   [--bootstrap N] [--bootstrap-unit N] [--score-exact] [--markdown FILE] [--csv FILE]\n"
               "                   [--rotate-k] [--rotate-v] [--k-before-rope] [--compact-params] [--sinks N] [--sweeps k,k-channel,v,pairs]\n"
               "                   [--k-channel-scales kmax:A,q:A,...]\n"
               "                   [--baselines all|none|LIST]\n"
               "  --tokens     int32 token ids (scripts/prepare_smollm2.py writes them); repeat for more texts\n"
               "  --text       a text file, tokenized with --tokenizer (llama2.c models); repeatable\n"
               "  --context    tokens per window (default 2048); each text gives its full windows\n"
               "  --windows    at most N windows per text (default: all)\n"
               "  --residual   recent tokens every cache keeps exact (default 128)\n"
               "  --rotate-k, --rotate-v  PackKV settings rotate that side (CacheConfig::rotate_k / rotate_v)\n"
               "  --k-before-rope  PackKV settings store K before RoPE and rotate the decoded keys at attention\n"
               "  --compact-params  PackKV settings store 2-byte (step, min) pairs (CacheConfig::compact_params)\n"
               "  --sinks      the first N tokens of each window stay exact for every method (default 0)\n"
               "  --k-channel-scales LIST  also the K sweep with K's channels divided by calibrated powers of\n"
               "               two: kmax:A (max|K_c|^A, SmoothAttention) or q:A (rms(q_c)^-A), one sweep each\n"
               "  --sweeps     which PackKV sweeps to run (default all)\n"
               "  --baselines  which baselines: all (default), none, or a list of int8,fp8,int4,kivi4,kivi2,\n"
               "               q8_0,q5_1,q5_0,q4_1,q4_0,iq4_nl\n"
               "  --block      tokens quantized at a time, by every cache (packkv's block, default 64)\n"
               "  --bootstrap  resamples for the 95%% intervals (default 1000)\n"
               "  --bootstrap-unit  positions per resampled unit (default 512; the context: whole windows)\n"
               "  --score-exact  also score the exact cache against itself (KL 0, top-1 100%%: a check)\n"
               "  --threads    runs at once, one core each (default: all cores)\n"
               "  --calibrate-layers B1,B2,...  also per-layer rels (layer_calibration.hpp): calibrated on a window\n"
               "               of the first text outside the evaluated ones, one setting per KL budget (nats)\n"
               "  --calibration-offset N, --calibration-tokens N  that window (default: after the evaluated\n"
               "               windows, 512 tokens)\n"
               "  --layer-menu-k LIST, --layer-menu-v LIST  the rels each layer may take (besides 1/255)\n");
}

/// The exact cache, keeping per layer and (KV head, channel) K's largest magnitude and the sum of
/// squares of the queries that read it (the KV head's group of query heads): the mean square times
/// a count shared by every channel, which per-token quantization does not see.
class ChannelStatsCache final : public llama::KvCache {
 public:
  explicit ChannelStatsCache(const llama::KvShape& shape)
      : shape_(shape),
        exact_(llama::make_exact_cache(shape)),
        k_max_(static_cast<std::size_t>(shape.num_layers), std::vector<double>(static_cast<std::size_t>(shape.kv_dim()), 0.0)),
        q_square_(k_max_) {}
  void append(int layer, const float* k, const float* v) override {
    std::vector<double>& m = k_max_[static_cast<std::size_t>(layer)];
    for (std::size_t i = 0; i < m.size(); ++i) m[i] = std::max(m[i], static_cast<double>(std::fabs(k[i])));
    exact_->append(layer, k, v);
  }
  void attend(int layer, const float* q, float* out, float scale) override {
    std::vector<double>& sq = q_square_[static_cast<std::size_t>(layer)];
    const int group = shape_.num_q_heads / shape_.num_kv_heads;
    for (int h = 0; h < shape_.num_q_heads; ++h) {
      for (int c = 0; c < shape_.head_dim; ++c) {
        const double x = q[h * shape_.head_dim + c];
        sq[static_cast<std::size_t>((h / group) * shape_.head_dim + c)] += x * x;
      }
    }
    exact_->attend(layer, q, out, scale);
  }
  llama::KvBytes bytes() const override { return exact_->bytes(); }
  std::string describe() const override { return "exact cache recording K's and q's channel statistics"; }
  /// Divisors 2^round(alpha log2 max|K_c|): channels with large keys shrink (SmoothAttention).
  std::vector<std::vector<float>> k_max_scales(double alpha) const { return powers_of_two(k_max_, alpha, false); }
  /// Divisors 2^-round(alpha log2 sqrt(sum q_c^2)), rms(q_c)^-alpha up to a factor every channel
  /// shares: channels the queries weigh heavily grow.
  std::vector<std::vector<float>> q_rms_scales(double alpha) const { return powers_of_two(q_square_, alpha / 2.0, true); }

 private:
  /// Powers of two (exact to divide by and to multiply back) of stat^alpha, or of stat^-alpha.
  static std::vector<std::vector<float>> powers_of_two(const std::vector<std::vector<double>>& stat, double alpha, bool invert) {
    std::vector<std::vector<float>> out(stat.size());
    for (std::size_t l = 0; l < stat.size(); ++l) {
      for (double x : stat[l]) {
        const long e = std::lround(alpha * std::log2(std::max(x, 1e-30)));
        out[l].push_back(std::ldexp(1.0f, static_cast<int>(invert ? -e : e)));
      }
    }
    return out;
  }

  llama::KvShape shape_;
  std::unique_ptr<llama::KvCache> exact_;
  std::vector<std::vector<double>> k_max_, q_square_;
};

std::vector<int> read_tokens(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw std::runtime_error("cannot open " + path);
  const auto bytes = static_cast<std::size_t>(in.tellg());
  std::vector<int> ids(bytes / sizeof(int));
  in.seekg(0);
  in.read(reinterpret_cast<char*>(ids.data()), static_cast<std::streamsize>(ids.size() * sizeof(int)));
  return ids;
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

/// The short name of a baseline on the command line (--baselines).
std::string baseline_key(llama::Baseline b) {
  switch (b) {
    case llama::Baseline::int8_per_token: return "int8";
    case llama::Baseline::int4_per_token: return "int4";
    case llama::Baseline::fp8_e4m3_per_token: return "fp8";
    case llama::Baseline::kivi2: return "kivi2";
    case llama::Baseline::kivi4: return "kivi4";
    case llama::Baseline::q8_0: return "q8_0";
    case llama::Baseline::q5_1: return "q5_1";
    case llama::Baseline::q5_0: return "q5_0";
    case llama::Baseline::q4_1: return "q4_1";
    case llama::Baseline::q4_0: return "q4_0";
    case llama::Baseline::iq4_nl: return "iq4_nl";
  }
  return "?";
}

std::string rel_label(float rel) {
  char buf[32];
  if (rel <= packkv::kMinRel * 1.0001f) return "1/255";
  std::snprintf(buf, sizeof buf, "%g", rel);
  return buf;
}

std::string fmt(const char* f, double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, x);
  return buf;
}

/// One line of progress on stderr: rewritten in place on a terminal, every 10% otherwise.
class Progress {
 public:
  Progress(std::size_t total_steps, std::size_t total_runs, std::string phase)
      : total_(total_steps), total_runs_(total_runs), phase_(std::move(phase)), start_(Clock::now()) {}
  void run_done() { ++runs_done_; }
  void step() {
    const std::size_t done = ++done_;
    std::unique_lock lock(mutex_, std::try_to_lock);
    if (!lock.owns_lock()) return;
    const double elapsed = seconds_since(start_);
    const double fraction = static_cast<double>(done) / static_cast<double>(total_);
    const bool tty = isatty(fileno(stderr)) != 0;
    const int decile = static_cast<int>(fraction * 10);
    if (tty ? elapsed - last_print_ < 0.5 && done != total_ : decile == last_decile_) return;
    last_print_ = elapsed;
    last_decile_ = decile;
    const int width = 30;
    const int filled = static_cast<int>(fraction * width);
    const double eta = fraction > 0 ? elapsed / fraction - elapsed : 0.0;
    std::fprintf(stderr, "%s%s [%.*s%*s] %3.0f%%  %zu/%zu runs  %4.0fs elapsed, ~%.0fs left%s", tty ? "\r" : "",
                 phase_.c_str(), filled, "##############################", width - filled, "", fraction * 100.0,
                 runs_done_.load(), total_runs_, elapsed, eta, tty ? "   " : "\n");
    std::fflush(stderr);
  }
  void finish() {
    if (isatty(fileno(stderr))) std::fputc('\n', stderr);
  }
  static double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

 private:
  std::size_t total_, total_runs_;
  std::string phase_;
  Clock::time_point start_;
  std::atomic<std::size_t> done_{0}, runs_done_{0};
  std::mutex mutex_;
  double last_print_ = -1.0;
  int last_decile_ = -1;
};

/// The exact cache on every window: its hidden states and predictions become the references.
void run_exact(const llama::LlamaModel& model, std::vector<Window>& windows, int threads) {
  const int layers = model.config().num_layers;
  const llama::KvShape shape = model.config().kv_shape();
  Progress progress(windows.size() * static_cast<std::size_t>(layers), windows.size(), "exact cache");
  std::vector<std::string> errors(windows.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (std::size_t w = 0; w < windows.size(); ++w) {
    try {
      auto cache = llama::make_exact_cache(shape);
      Window& win = windows[w];
      llama::TeacherForcedResult r = llama::evaluate_teacher_forced(
          model, win.tokens.data(), static_cast<int>(win.tokens.size()), *cache, [&](int) { progress.step(); }, nullptr, true);
      win.exact_nll = r.position_nll;
      win.reference = llama::make_exact_reference(model, std::move(r), /*log_probs=*/false);
      progress.run_done();
    } catch (const std::exception& e) {
      errors[w] = e.what();
    }
  }
  progress.finish();
  for (const std::string& e : errors) {
    if (!e.empty()) throw std::runtime_error("exact cache: " + e);
  }
}

/// Every setting on every window, `threads` runs at a time, in window order with no barrier
/// between windows. A window's exact log-probabilities (400 MB at 2K tokens of a 49K vocabulary)
/// are computed by its first run and dropped after its last, so about `threads` windows hold them
/// at once.
std::vector<Outcome> run_settings(const llama::LlamaModel& model, std::vector<Window>& windows,
                                  const std::vector<Setting>& settings, int threads, const std::string& phase) {
  std::vector<Outcome> outcomes(settings.size());
  for (std::size_t i = 0; i < settings.size(); ++i) {
    outcomes[i].setting = settings[i];
    outcomes[i].runs.resize(windows.size());
  }
  const int layers = model.config().num_layers;
  const std::size_t runs = settings.size() * windows.size();
  Progress progress(runs * static_cast<std::size_t>(layers), runs, phase);
  std::vector<std::string> errors(runs);
  std::vector<std::mutex> window_locks(windows.size());
  std::vector<std::atomic<std::size_t>> runs_left(windows.size());
  for (auto& left : runs_left) left = settings.size();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (std::size_t task = 0; task < runs; ++task) {
    const std::size_t w = task / settings.size();
    const std::size_t i = task % settings.size();
    Window& win = windows[w];
    try {
      {
        std::lock_guard lock(window_locks[w]);
        if (win.reference.log_probs.empty()) llama::set_log_probs(model, win.reference, true);
      }
      const auto start = Clock::now();
      std::unique_ptr<llama::KvCache> cache = settings[i].make_cache();
      llama::TeacherForcedResult r = llama::evaluate_teacher_forced(
          model, win.tokens.data(), static_cast<int>(win.tokens.size()), *cache, [&](int) { progress.step(); },
          &win.reference);
      WindowRun& run = outcomes[i].runs[w];
      run.nll = std::move(r.position_nll);
      run.kl = std::move(r.position_kl);
      run.same_top1.resize(r.predictions.size());
      for (std::size_t p = 0; p < r.predictions.size(); ++p) run.same_top1[p] = r.predictions[p] == win.reference.predictions[p];
      run.bytes = r.bytes;
      run.seconds = Progress::seconds_since(start);
      progress.run_done();
    } catch (const std::exception& e) {
      errors[task] = settings[i].name + ": " + e.what();
    }
    if (--runs_left[w] == 0) {
      std::lock_guard lock(window_locks[w]);
      llama::set_log_probs(model, win.reference, false);
    }
  }
  progress.finish();
  for (const std::string& e : errors) {
    if (!e.empty()) throw std::runtime_error(e);
  }
  return outcomes;
}

/// Sums over one bootstrap unit (a stretch of positions of one window).
struct UnitSums {
  double exact_nll = 0, nll = 0, kl = 0, same = 0, positions = 0;
};

/// Perplexity change, mean KL and top-1 with bootstrap intervals: the units (stretches of
/// `unit` positions of each window; a whole window when unit >= context) are resampled with
/// replacement, the same draws for every setting, and the 2.5% and 97.5% quantiles taken.
class Bootstrap {
 public:
  Bootstrap(const std::vector<Window>& windows, int unit, int resamples) : unit_(unit) {
    for (std::size_t w = 0; w < windows.size(); ++w) {
      const int positions = static_cast<int>(windows[w].exact_nll.size());
      for (int p0 = 0; p0 < positions; p0 += unit_) units_.push_back({w, p0, std::min(positions, p0 + unit_)});
    }
    std::mt19937_64 rng(20240612);  // fixed: reruns give the same intervals
    std::uniform_int_distribution<std::size_t> pick(0, units_.size() - 1);
    draws_.resize(static_cast<std::size_t>(resamples));
    for (auto& d : draws_) {
      d.resize(units_.size());
      for (auto& u : d) u = pick(rng);
    }
  }
  std::size_t units() const { return units_.size(); }

  void score(Outcome& o, const std::vector<Window>& windows) const {
    std::vector<UnitSums> sums(units_.size());
    for (std::size_t u = 0; u < units_.size(); ++u) {
      const Unit& unit = units_[u];
      const WindowRun& run = o.runs[unit.window];
      for (int p = unit.begin; p < unit.end; ++p) {
        sums[u].exact_nll += windows[unit.window].exact_nll[p];
        sums[u].nll += run.nll[p];
        sums[u].kl += run.kl[p];
        sums[u].same += run.same_top1[p];
        sums[u].positions += 1;
      }
    }
    auto statistics = [&](const auto& indices) {
      UnitSums t;
      for (std::size_t u : indices) {
        t.exact_nll += sums[u].exact_nll;
        t.nll += sums[u].nll;
        t.kl += sums[u].kl;
        t.same += sums[u].same;
        t.positions += sums[u].positions;
      }
      return std::array<double, 3>{(std::exp((t.nll - t.exact_nll) / t.positions) - 1.0) * 100.0, t.kl / t.positions,
                                   t.same / t.positions};
    };
    std::vector<std::size_t> all(units_.size());
    for (std::size_t u = 0; u < all.size(); ++u) all[u] = u;
    const auto point = statistics(all);
    std::array<std::vector<double>, 3> samples;
    for (const auto& d : draws_) {
      const auto s = statistics(d);
      for (int k = 0; k < 3; ++k) samples[k].push_back(s[k]);
    }
    Interval* out[3] = {&o.delta_pct, &o.kl, &o.top1};
    for (int k = 0; k < 3; ++k) {
      out[k]->value = point[k];
      out[k]->lo = quantile(samples[k], 0.025);
      out[k]->hi = quantile(samples[k], 0.975);
    }
    double nll = 0, positions = 0;
    for (const UnitSums& s : sums) {
      nll += s.nll;
      positions += s.positions;
    }
    o.perplexity = std::exp(nll / positions);
    o.bytes = {};
    o.seconds = 0;
    for (const WindowRun& r : o.runs) {
      o.bytes.k_bytes += r.bytes.k_bytes;
      o.bytes.v_bytes += r.bytes.v_bytes;
      o.bytes.fp16_bytes_per_side += r.bytes.fp16_bytes_per_side;
      o.bytes.k_compressed_bytes += r.bytes.k_compressed_bytes;
      o.bytes.v_compressed_bytes += r.bytes.v_compressed_bytes;
      o.bytes.compressed_elements_per_side += r.bytes.compressed_elements_per_side;
      o.seconds += r.seconds;
    }
  }

 private:
  struct Unit {
    std::size_t window;
    int begin, end;
  };
  static double quantile(std::vector<double> v, double q) {
    if (v.empty()) return 0.0;
    std::sort(v.begin(), v.end());
    const double at = q * static_cast<double>(v.size() - 1);
    const auto i = static_cast<std::size_t>(at);
    const double frac = at - static_cast<double>(i);
    return i + 1 < v.size() ? v[i] * (1 - frac) + v[i + 1] * frac : v[i];
  }
  int unit_;
  std::vector<Unit> units_;
  std::vector<std::vector<std::size_t>> draws_;
};

/// What a turning point bounds: the perplexity change (|change| <= bound percent) or the mean KL
/// (<= a baseline's).
struct Criterion {
  std::string label;
  bool by_kl = false;
  double bound = 0.0;
  bool holds(const Outcome& o) const { return by_kl ? o.kl.value <= bound : std::fabs(o.delta_pct.value) <= bound; }
};

/// The largest swept rel such that it and every smaller rel of the sweep meet the criterion
/// (requiring the smaller ones too keeps a lucky outlier from counting).
std::optional<Outcome> turning_point(const std::vector<Outcome>& sweep, bool for_k, const Criterion& c) {
  std::vector<const Outcome*> sorted;
  for (const Outcome& o : sweep) sorted.push_back(&o);
  std::sort(sorted.begin(), sorted.end(), [&](const Outcome* a, const Outcome* b) {
    return for_k ? a->setting.k_rel < b->setting.k_rel : a->setting.v_rel < b->setting.v_rel;
  });
  std::optional<Outcome> at;
  for (const Outcome* o : sorted) {
    if (!c.holds(*o)) break;
    at = *o;
  }
  return at;
}

std::string interval(const Interval& i, const char* f) {
  return fmt(f, i.value) + " [" + fmt(f, i.lo) + ", " + fmt(f, i.hi) + "]";
}
std::string pct_interval(const Interval& i) { return interval(i, "%+.2f%%"); }
std::string kl_interval(const Interval& i) { return interval(i, i.value < 1e-3 ? "%.2g" : "%.4f"); }
std::string top1_interval(const Interval& i) {
  Interval p{i.value * 100, i.lo * 100, i.hi * 100};
  return interval(p, "%.1f%%");
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw std::invalid_argument(arg + " needs a value");
        return argv[++i];
      };
      if (arg == "--model") opt.model = value();
      else if (arg == "--tokens") opt.tokens.push_back(value());
      else if (arg == "--text") opt.texts.push_back(value());
      else if (arg == "--tokenizer") opt.tokenizer = value();
      else if (arg == "--context") opt.context = std::stoi(value());
      else if (arg == "--windows") opt.max_windows = std::stoi(value());
      else if (arg == "--threads") opt.threads = std::stoi(value());
      else if (arg == "--preset") opt.preset = value();
      else if (arg == "--block") opt.block = std::stoi(value());
      else if (arg == "--residual") opt.residual = std::stoi(value());
      else if (arg == "--bootstrap") opt.bootstrap = std::stoi(value());
      else if (arg == "--bootstrap-unit") opt.bootstrap_unit = std::stoi(value());
      else if (arg == "--score-exact") opt.score_exact = true;
      else if (arg == "--rotate-k") opt.rotate_k = true;
      else if (arg == "--rotate-v") opt.rotate_v = true;
      else if (arg == "--k-before-rope") opt.keys_before_rope = true;
      else if (arg == "--compact-params") opt.compact_params = true;
      else if (arg == "--sinks") opt.sinks = std::stoi(value());
      else if (arg == "--k-channel-scales") {
        opt.k_channel_scales = parse_list<std::string>(value());
        for (const std::string& spec : opt.k_channel_scales) parse_channel_scale(spec);  // refused before any run
      }
      else if (arg == "--baselines") opt.baselines = value();
      else if (arg == "--sweeps") opt.sweeps = value();
      else if (arg == "--calibrate-layers") opt.layer_budgets = parse_list<double>(value());
      else if (arg == "--calibration-offset") opt.calibration_offset = std::stoi(value());
      else if (arg == "--calibration-tokens") opt.calibration_tokens = std::stoi(value());
      else if (arg == "--layer-menu-k") opt.layer_menu_k = parse_list<float>(value());
      else if (arg == "--layer-menu-v") opt.layer_menu_v = parse_list<float>(value());
      else if (arg == "--repack") {
        const std::string r = value();
        opt.repack = r == "none" ? packkv::RepackMethod::none : r == "greedy" ? packkv::RepackMethod::greedy : packkv::RepackMethod::median;
      } else if (arg == "--device") opt.device = value() == "cuda" ? packkv::Device::cuda : packkv::Device::cpu;
      else if (arg == "--markdown") opt.markdown = value();
      else if (arg == "--csv") opt.csv = value();
      else if (arg == "--help" || arg == "-h") { usage(); return 0; }
      else throw std::invalid_argument("unknown argument " + arg);
    }
    if (opt.model.empty() || (opt.tokens.empty() && (opt.texts.empty() || opt.tokenizer.empty()))) {
      usage();
      return 2;
    }
    if (opt.context < 2 || opt.bootstrap < 1 || opt.bootstrap_unit < 1) throw std::invalid_argument("--context >= 2, --bootstrap and --bootstrap-unit >= 1");
    // The command as run, files by name only: the report quotes it without this machine's folders.
    std::string command_line = "packkv_eval";
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      command_line += " " + (arg.find('/') != std::string::npos ? std::filesystem::path(arg).filename().string() : arg);
    }
    const auto wall_start = Clock::now();
    const llama::LlamaModel model = llama::LlamaModel::load(opt.model);
    const llama::LlamaConfig& mc = model.config();

    // ---- windows: the full --context stretches of every text ----
    std::vector<std::pair<std::string, std::vector<int>>> texts;
    for (const std::string& path : opt.tokens) texts.emplace_back(std::filesystem::path(path).stem().string(), read_tokens(path));
    if (!opt.texts.empty()) {
      llama::Llama2cTokenizer tokenizer(opt.tokenizer, mc.vocab_size);
      for (const std::string& path : opt.texts) {
        texts.emplace_back(std::filesystem::path(path).filename().string(), tokenizer.encode(read_text(path), /*bos=*/true, /*eos=*/false));
      }
    }
    std::vector<Window> windows;
    std::ostringstream text_summary;
    for (const auto& [name, ids] : texts) {
      int count = static_cast<int>(ids.size()) / opt.context;
      if (opt.max_windows > 0) count = std::min(count, opt.max_windows);
      if (count == 0) throw std::invalid_argument(name + " has " + std::to_string(ids.size()) + " tokens, fewer than --context");
      for (int w = 0; w < count; ++w) {
        Window win;
        win.source = name;
        win.offset = w * opt.context;
        win.tokens.assign(ids.begin() + win.offset, ids.begin() + win.offset + opt.context);
        windows.push_back(std::move(win));
      }
      text_summary << (text_summary.tellp() > 0 ? ", " : "") << name << " (" << ids.size() << " tokens: " << count
                   << (count == 1 ? " window" : " windows") << ")";
    }
    const std::size_t scored = windows.size() * static_cast<std::size_t>(opt.context - 1);
    const int threads = opt.threads > 0 ? opt.threads : omp_get_num_procs();
    std::fprintf(stderr, "model: %d layers, %d query / %d KV heads, head_dim %d; %zu windows of %d tokens (%zu scored); %d at a time\n",
                 mc.num_layers, mc.num_heads, mc.num_kv_heads, mc.head_dim, windows.size(), opt.context, scored, threads);

    // ---- settings ----
    const llama::KvShape shape = mc.kv_shape();
    packkv::CacheConfig base;
    base.block_tokens = opt.block;
    base.residual_tokens = opt.residual;
    base.repack = opt.repack;
    base.device = opt.device;  // PackKV settings only; the model and the baselines run on the CPU
    base.num_threads = 1;  // settings run in parallel, one core each
    base.rotate_k = opt.rotate_k;
    base.rotate_v = opt.rotate_v;
    base.compact_params = opt.compact_params;
    llama::BaselineOptions baseline_options;
    baseline_options.residual = opt.residual;  // the same exact window and the same
    baseline_options.block = opt.block;        // quantization steps as packkv's tail rule
    baseline_options.sinks = opt.sinks;        // and the same exact sinks
    // A PackKV cache of this run: K after RoPE as the model appends it, or before (--k-before-rope,
    // measured through decoded copies, which then keep the sinks exact as well). Otherwise the
    // sinks are the cache's own (CacheConfig::sink_tokens).
    llama::PackkvLevers levers;
    levers.keys_before_rope = opt.keys_before_rope;
    levers.rope_theta = mc.rope_theta;
    levers.sinks = opt.keys_before_rope ? opt.sinks : 0;
    base.sink_tokens = opt.keys_before_rope ? 0 : opt.sinks;
    const bool keys_before_rope = levers.keys_before_rope;
    auto make_packkv = [shape, levers](const packkv::CacheConfig& c) {
      return levers.keys_before_rope ? llama::make_packkv_cache_with_levers(shape, c, levers) : llama::make_packkv_cache(shape, c);
    };
    const std::string k_note = keys_before_rope ? " before RoPE" : "";
    auto packkv_setting = [&](Family family, float k_rel, float v_rel,
                              packkv::QuantMode k_mode = packkv::QuantMode::per_token) {
      Setting s;
      s.family = family;
      s.k_rel = k_rel;
      s.v_rel = v_rel;
      s.k_mode = k_mode;
      s.name = std::string("PackKV K ") + (k_mode == packkv::QuantMode::per_channel ? "per-channel " : "") +
               rel_label(k_rel) + (base.rotate_k ? " rotated" : "") + k_note + " / V " + rel_label(v_rel) +
               (base.rotate_v ? " rotated" : "") + (base.compact_params ? ", compact params" : "");
      s.make_cache = [make_packkv, base, k_rel, v_rel, k_mode] {
        packkv::CacheConfig c = base;
        c.k_rel = k_rel;
        c.v_rel = v_rel;
        c.k_mode = k_mode;
        return make_packkv(c);
      };
      return s;
    };
    const float exact_rel = packkv::kMinRel;  // 8-bit codes: the "exact" side of a one-sided sweep
    // K per token is sensitive (its few outlier channels set every token's range), so its sweep is
    // dense at the fine end; K per channel (PackKV's KIVI-style mode) and V tolerate far more.
    std::vector<float> k_sweep, k_channel_sweep, v_sweep;
    if (opt.preset == "quick") {
      k_sweep = {0.02f, 0.1f};
      k_channel_sweep = {0.1f};
      v_sweep = {0.05f, 0.2f};
    } else {
      // Sized so that the whole run (4 windows of 2048 tokens) stays under 20 minutes on 2 cores.
      k_sweep = {0.02f, 0.03f, 0.05f, 0.1f};
      k_channel_sweep = {0.05f, 0.1f, 0.2f};
      v_sweep = {0.05f, 0.1f, 0.15f, 0.25f};
    }
    std::vector<llama::Baseline> baselines = {
        llama::Baseline::int8_per_token, llama::Baseline::fp8_e4m3_per_token, llama::Baseline::int4_per_token,
        llama::Baseline::kivi4,          llama::Baseline::kivi2,              llama::Baseline::q8_0,
        llama::Baseline::q5_1,           llama::Baseline::q5_0,               llama::Baseline::q4_1,
        llama::Baseline::q4_0,           llama::Baseline::iq4_nl};
    if (opt.preset == "quick") baselines = {llama::Baseline::int8_per_token, llama::Baseline::int4_per_token, llama::Baseline::kivi4, llama::Baseline::q4_0};
    if (opt.baselines != "all") {
      const std::string wanted = "," + opt.baselines + ",";
      std::erase_if(baselines, [&](llama::Baseline b) { return wanted.find("," + baseline_key(b) + ",") == std::string::npos; });
    }
    auto sweep_on = [&](const std::string& name) { return ("," + opt.sweeps + ",").find("," + name + ",") != std::string::npos; };
    if (!sweep_on("k")) k_sweep.clear();
    if (!sweep_on("k-channel")) k_channel_sweep.clear();
    if (!sweep_on("v")) v_sweep.clear();

    std::string skipped_note;
    if (mc.head_dim % 32 != 0) {  // llama.cpp's blocks of 32 run along head_dim
      std::erase_if(baselines, [](llama::Baseline b) { return b >= llama::Baseline::q8_0; });
      skipped_note = "llama.cpp's types skipped: head_dim " + std::to_string(mc.head_dim) + " is not a multiple of 32";
      std::fprintf(stderr, "%s\n", skipped_note.c_str());
    }

    std::vector<Setting> settings;
    if (opt.score_exact) {
      settings.push_back({"exact fp32 cache", Family::exact, 0, 0, packkv::QuantMode::per_token, std::nullopt,
                          [shape] { return llama::make_exact_cache(shape); }});
    }
    settings.push_back(packkv_setting(Family::packkv_control, exact_rel, exact_rel));
    for (float r : k_sweep) settings.push_back(packkv_setting(Family::packkv_k, r, exact_rel));
    for (float r : k_channel_sweep) {
      settings.push_back(packkv_setting(Family::packkv_k_channel, r, exact_rel, packkv::QuantMode::per_channel));
    }
    for (float r : v_sweep) settings.push_back(packkv_setting(Family::packkv_v, exact_rel, r));
    for (llama::Baseline b : baselines) {
      std::string name = llama::to_string(b);
      if (b == llama::Baseline::kivi2 || b == llama::Baseline::kivi4) name += " (group 32)";
      settings.push_back({name, Family::baseline, 0, 0, packkv::QuantMode::per_token, b,
                          [shape, b, baseline_options] { return llama::make_baseline_cache(shape, b, baseline_options); }});
    }

    // ---- the calibration window: a stretch of the first text that no evaluated window holds ----
    std::string calibration_summary;
    auto calibration_window = [&] {
      const auto& [text_name, ids] = texts.front();
      int used = static_cast<int>(ids.size()) / opt.context;
      if (opt.max_windows > 0) used = std::min(used, opt.max_windows);
      const int offset = opt.calibration_offset >= 0 ? opt.calibration_offset : used * opt.context;
      if (offset < used * opt.context) {
        throw std::invalid_argument("--calibration-offset " + std::to_string(offset) + " overlaps the evaluated windows of " + text_name);
      }
      if (opt.calibration_tokens < 2 || offset + opt.calibration_tokens > static_cast<int>(ids.size())) {
        throw std::invalid_argument(text_name + " has " + std::to_string(ids.size()) + " tokens: no calibration window of " +
                                    std::to_string(opt.calibration_tokens) + " at offset " + std::to_string(offset));
      }
      calibration_summary = text_name + " tokens [" + std::to_string(offset) + ", " + std::to_string(offset + opt.calibration_tokens) + ")";
      return std::vector<int>(ids.begin() + offset, ids.begin() + offset + opt.calibration_tokens);
    };

    // ---- K with its channels scaled by calibrated powers of two (a lever measured, not built) ----
    // Attention would scale q instead (q_c * s_c, once per step); measured through decoded copies,
    // which also keep the sinks exact.
    if (!opt.k_channel_scales.empty()) {
      ChannelStatsCache recorder(shape);
      const std::vector<int> calibration = calibration_window();
      llama::evaluate_teacher_forced(model, calibration.data(), static_cast<int>(calibration.size()), recorder);
      for (const std::string& spec : opt.k_channel_scales) {
        const auto [kind, alpha] = parse_channel_scale(spec);
        llama::PackkvLevers scaled = levers;
        scaled.sinks = opt.sinks;
        scaled.k_channel_scale = kind == "kmax" ? recorder.k_max_scales(alpha) : recorder.q_rms_scales(alpha);
        packkv::CacheConfig scaled_base = base;
        scaled_base.sink_tokens = 0;
        const std::string label = kind == "kmax" ? " channels / max|K|^" + fmt("%g", alpha) : " channels * rms(q)^" + fmt("%g", alpha);
        for (float r : k_sweep) {
          Setting setting = packkv_setting(Family::packkv_k_scaled, r, exact_rel);
          setting.name = "PackKV K " + rel_label(r) + label + k_note + " / V " + rel_label(exact_rel) +
                         (base.compact_params ? ", compact params" : "");
          setting.make_cache = [shape, scaled, scaled_base, r, exact_rel] {
            packkv::CacheConfig c = scaled_base;
            c.k_rel = r;
            c.v_rel = exact_rel;
            return llama::make_packkv_cache_with_levers(shape, c, scaled);
          };
          settings.push_back(std::move(setting));
        }
      }
    }

    // ---- per-layer rels: calibrated on a window the evaluation does not score ----
    struct LayerPlanRow {
      double budget;
      packkv::LayerBounds plan;
      std::string setting_name;
    };
    std::vector<LayerPlanRow> layer_plans;
    std::optional<llama::LayerSensitivity> sensitivity;
    if (!opt.layer_budgets.empty()) {
      const std::vector<int> calibration = calibration_window();
      const auto calibration_start = Clock::now();
      int last_decile = -1;
      sensitivity = llama::measure_layer_sensitivity(
          model, calibration, base, opt.layer_menu_k, opt.layer_menu_v, threads, [&](int done, int total) {
            const int decile = done * 10 / total;
            if (decile == last_decile && done != total) return;
            last_decile = decile;
            std::fprintf(stderr, "layer calibration: %d/%d runs, %.0fs elapsed\n", done, total, Progress::seconds_since(calibration_start));
          },
          make_packkv);
      for (double budget : opt.layer_budgets) {
        LayerPlanRow row{budget, packkv::choose_layer_bounds(sensitivity->menu, budget), ""};
        row.setting_name = "PackKV per-layer rels, KL budget " + fmt("%g", budget) + (base.rotate_k ? ", K rotated" : "") +
                           (keys_before_rope ? ", K before RoPE" : "") + (base.rotate_v ? ", V rotated" : "") +
                           (base.compact_params ? ", compact params" : "");
        Setting s;
        s.name = row.setting_name;
        s.family = Family::packkv_per_layer;
        s.make_cache = [make_packkv, base, plan = row.plan] {
          packkv::CacheConfig c = base;
          c.layer_k_rel = plan.k_rel;
          c.layer_v_rel = plan.v_rel;
          return make_packkv(c);
        };
        settings.push_back(s);
        layer_plans.push_back(std::move(row));
      }
    }

    run_exact(model, windows, threads);
    const Bootstrap bootstrap(windows, std::min(opt.bootstrap_unit, opt.context - 1), opt.bootstrap);
    std::vector<Outcome> outcomes = run_settings(model, windows, settings, threads, "sweeps and baselines");
    for (Outcome& o : outcomes) bootstrap.score(o, windows);

    // ---- turning points: by perplexity (1%, 5%) and by KL (int8's, KIVI-4's) ----
    auto find_baseline = [&](llama::Baseline b) -> const Outcome* {
      for (const Outcome& o : outcomes) {
        if (o.setting.baseline == b) return &o;
      }
      return nullptr;
    };
    std::vector<Criterion> criteria = {{"perplexity 1%", false, 1.0}, {"perplexity 5%", false, 5.0}};
    if (const Outcome* int8 = find_baseline(llama::Baseline::int8_per_token)) {
      criteria.push_back({"KL <= int8's (" + fmt("%.3g", int8->kl.value) + ")", true, int8->kl.value});
    }
    if (const Outcome* kivi4 = find_baseline(llama::Baseline::kivi4)) {
      criteria.push_back({"KL <= KIVI-4's (" + fmt("%.3g", kivi4->kl.value) + ")", true, kivi4->kl.value});
    }
    std::vector<Outcome> k_outcomes, kc_outcomes, v_outcomes;
    for (const Outcome& o : outcomes) {
      if (o.setting.family == Family::packkv_k) k_outcomes.push_back(o);
      if (o.setting.family == Family::packkv_k_channel) kc_outcomes.push_back(o);
      if (o.setting.family == Family::packkv_v) v_outcomes.push_back(o);
      // The control (both sides at 1/255) is the finest point of the per-token K and the V sweeps.
      if (o.setting.family == Family::packkv_control) {
        k_outcomes.push_back(o);
        v_outcomes.push_back(o);
      }
    }
    struct SidePoints {
      std::optional<Outcome> k, kc, v;
    };
    std::vector<SidePoints> points(criteria.size());
    std::vector<Setting> pairs;
    std::vector<std::string> pair_criterion;
    for (std::size_t c = 0; c < criteria.size(); ++c) {
      points[c].k = turning_point(k_outcomes, true, criteria[c]);
      points[c].kc = turning_point(kc_outcomes, true, criteria[c]);
      points[c].v = turning_point(v_outcomes, false, criteria[c]);
      // The pair for this criterion: one-sided errors add up (nearly: both include the control's),
      // so the K point (either mode) and the V point whose predicted sum meets the bound with the
      // fewest bits; the pair's run then measures it.
      const Outcome* control = nullptr;
      for (const Outcome& o : outcomes) {
        if (o.setting.family == Family::packkv_control) control = &o;
      }
      const Outcome* pair_k = nullptr;
      const Outcome* pair_v = nullptr;
      for (const std::vector<Outcome>* k_sweep_outcomes : {&k_outcomes, &kc_outcomes}) {
        for (const Outcome& k : *k_sweep_outcomes) {
          for (const Outcome& v : v_outcomes) {
            const double predicted = criteria[c].by_kl
                                         ? k.kl.value + v.kl.value - (control ? control->kl.value : 0.0)
                                         : std::fabs(k.delta_pct.value + v.delta_pct.value - (control ? control->delta_pct.value : 0.0));
            if (predicted > criteria[c].bound) continue;
            if (!pair_k || k.k_bits() + v.v_bits() < pair_k->k_bits() + pair_v->v_bits()) {
              pair_k = &k;
              pair_v = &v;
            }
          }
        }
      }
      if (!pair_k) continue;
      Setting s = packkv_setting(Family::packkv_pair, pair_k->setting.k_rel, pair_v->setting.v_rel, pair_k->setting.k_mode);
      // A pair with one side at 1/255 is a one-sided setting already measured.
      bool seen = false;
      for (const Outcome& o : outcomes) {
        seen |= o.setting.k_rel == s.k_rel && o.setting.v_rel == s.v_rel && o.setting.k_mode == s.k_mode &&
                is_packkv(o.setting.family);
      }
      for (std::size_t p = 0; p < pairs.size(); ++p) {
        if (pairs[p].name == s.name) {
          pair_criterion[p] += " & " + criteria[c].label;
          seen = true;
        }
      }
      if (!seen) {
        pairs.push_back(s);
        pair_criterion.push_back(criteria[c].label);
      }
    }
    for (std::size_t p = 0; p < pairs.size(); ++p) pairs[p].name += " (chosen for: " + pair_criterion[p] + ")";
    if (!sweep_on("pairs")) pairs.clear();
    if (!pairs.empty()) {
      std::vector<Outcome> pair_outcomes = run_settings(model, windows, pairs, threads, "pairs");
      for (Outcome& o : pair_outcomes) {
        bootstrap.score(o, windows);
        outcomes.push_back(o);
      }
    }
    const double wall = Progress::seconds_since(wall_start);
    // CPU time tells what the run costs without other work on the machine: wall time on idle cores
    // is about CPU time / threads (the runs are independent and one core each).
    rusage usage{};
    getrusage(RUSAGE_SELF, &usage);
    const double cpu_seconds = static_cast<double>(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
                               static_cast<double>(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) * 1e-6;

    // ---- report ----
    double exact_nll = 0;
    for (const Window& w : windows) {
      for (float x : w.exact_nll) exact_nll += x;
    }
    const double exact_perplexity = std::exp(exact_nll / static_cast<double>(scored));
    // The exact window: `residual` tokens plus the block being filled (0..block-1, on average
    // (block-1)/2), at 16 bits per element.
    const double window_tokens = opt.residual + (opt.block - 1) / 2.0;
    auto window_bits_at = [&](double context) { return 16.0 * std::min(1.0, window_tokens / context); };
    auto all_in_bits_at = [&](double compressed_bits, double context) {
      const double share = std::min(1.0, window_tokens / context);
      return compressed_bits * (1 - share) + 16.0 * share;
    };

    std::ostringstream md;
    md << "# Accuracy and compression of PackKV against quantization baselines\n\n";
    md << "Made by `" << command_line << "`; `scripts/run_accuracy.sh` regenerates this file (with `--lever NAME` for "
          "a lever's report, such as rotate-v.md).\n\n";
    md << "- Model: " << mc.num_layers << " layers, " << mc.num_heads << " query heads, " << mc.num_kv_heads
       << " KV heads, head_dim " << mc.head_dim << ", vocabulary " << mc.vocab_size << "\n";
    md << "- Texts: " << text_summary.str() << "; " << windows.size() << " windows of " << opt.context << " tokens, "
       << scored << " scored positions, teacher-forced; the cache is filled one token at a time and every position "
          "attends through it, as in decoding. Exact cache perplexity " << fmt("%.4f", exact_perplexity) << ".\n";
    md << "- Same window for every method: the most recent " << opt.residual << " tokens stay exact, and tokens leave "
       << "that window " << opt.block << " at a time (packkv's tail rule with residual " << opt.residual << ", block "
       << opt.block << "), so at every step every cache holds the same tokens exact and the same tokens quantized. "
       << (opt.sinks > 0 ? "The first " + std::to_string(opt.sinks) + " tokens of each window (attention sinks) stay exact for "
                               "every method, counted at fp16 beside the window (the baselines leave them out of their "
                               "groups; packkv keeps them with `CacheConfig::sink_tokens`, its first block still holding "
                               "them, a conservative count of its compressed bits, and every read using the exact rows"
                               "; with --k-before-rope its attention runs over decoded copies that keep them exact).\n"
                         : std::string("No sink tokens are kept exact (none of the methods).\n"));
    if (opt.compact_params) {
      md << "- PackKV settings store each group's (step, min) in 2 bytes (`CacheConfig::compact_params`, block format "
            "version 3) instead of two fp16 values.\n";
    }
    if (opt.keys_before_rope) {
      md << "- PackKV settings store K before RoPE and rotate the decoded keys at attention (KVQuant's pre-RoPE keys), "
            "attention running over decoded copies (llama::make_packkv_cache_with_levers).\n";
    }
    if (!opt.k_channel_scales.empty()) {
      md << "- packkv-K-scaled settings divide each K channel by a power of two before the cache quantizes it per token "
            "and multiply the decoded keys back (what scaling q would do at attention), attention running over "
            "decoded copies that keep the sinks exact (llama::make_packkv_cache_with_levers). The powers come from "
            "the exact cache's run on " << calibration_summary << ", per layer, KV head and channel: "
            "2^round(A log2 max|K_c|) for kmax:A (QServe's SmoothAttention), 2^-round(A log2 rms q_c) for q:A (q over "
            "the KV head's query heads).\n";
    }
    md << "- Bits per element: of the compressed part only, every byte counted (codes, fp16 scales and minimums, "
          "pack descriptors, permutations, block headers and tables; for packkv `memory_stats()` without its tail, "
          "each side's sections plus half of the bytes both share). The exact window costs 16 bits per element of "
          "its " << fmt("%g", window_tokens) << " tokens on average: " << fmt("%.2f", window_bits_at(opt.context))
       << " bits per element at this context, " << fmt("%.3f", window_bits_at(32768)) << " at 32K (all-in at 32K = "
          "compressed bits x " << fmt("%.4f", 1 - window_tokens / 32768) << " + " << fmt("%.3f", window_bits_at(32768)) << ").\n";
    md << "- KL: mean over positions of KL(exact || setting) of the next-token distribution, in nats. Top-1: share of "
          "positions whose argmax is the exact cache's. Intervals: 95% bootstrap (" << opt.bootstrap
       << " resamples with replacement of " << bootstrap.units() << " units of "
       << std::min(opt.bootstrap_unit, opt.context - 1) << " positions, parts of the windows; the same draws for every "
          "setting).\n";
    md << "- PackKV: block " << opt.block << ", repack " << packkv::to_string(opt.repack)
       << "; \"1/255\" is the smallest rel (8-bit codes), the near-exact side of the one-sided sweeps; K is swept "
          "per token (PackKV) and per channel (KIVI-style, one (step, min) per channel per block). Baselines are "
          "quantize-dequantize caches; llama.cpp's types as ggml defines them (blocks of 32 along head_dim with "
          "fp16 scales, and fp16 mins for the _1 types; iq4_nl with its fixed 16-value table).\n";
    md << "- Wall time: " << fmt("%.0f", wall) << " s for " << outcomes.size() << " settings x " << windows.size()
       << " windows (plus the exact cache), " << threads << " at a time; CPU time " << fmt("%.0f", cpu_seconds)
       << " s, so about " << fmt("%.0f", cpu_seconds / threads) << " s on " << threads << " idle cores. Seconds per "
          "setting below: wall time summed over its windows.\n\n";

    md << "## Turning points\n\n";
    md << "The largest swept rel whose perplexity change (or mean KL), and that of every smaller swept rel, stays "
          "within the bound. One side at a time: the other side at 1/255. int8's and KIVI-4's KL are with both "
          "of their sides quantized.\n\n";
    md << "| side | criterion | rel | bits/element (that side) | perplexity change | KL | top-1 |\n|---|---|---|---|---|---|---|\n";
    for (std::size_t c = 0; c < criteria.size(); ++c) {
      const struct {
        const char* label;
        const std::optional<Outcome>* at;
        bool k;
      } sides[3] = {{"K per token", &points[c].k, true}, {"K per channel", &points[c].kc, true}, {"V", &points[c].v, false}};
      for (const auto& side : sides) {
        md << "| " << side.label << " | " << criteria[c].label << " | ";
        if (*side.at) {
          const Outcome& o = **side.at;
          md << rel_label(side.k ? o.setting.k_rel : o.setting.v_rel) << " | "
             << fmt("%.2f", side.k ? o.k_bits() : o.v_bits()) << " | " << pct_interval(o.delta_pct) << " | "
             << kl_interval(o.kl) << " | " << top1_interval(o.top1) << " |\n";
        } else {
          md << "none in the sweep | | | | |\n";
        }
      }
    }
    md << "\nPairs, both sides at once: for each criterion, the K point (either mode) and V point of the sweeps whose "
          "one-sided changes, added (less the control's), meet the bound with the fewest bits, then measured:\n\n";
    md << "| pair | K bits | V bits | K+V bits | perplexity change | KL | top-1 |\n|---|---|---|---|---|---|---|\n";
    for (const Outcome& o : outcomes) {
      if (o.setting.family != Family::packkv_pair) continue;
      md << "| " << o.setting.name << " | " << fmt("%.2f", o.k_bits()) << " | " << fmt("%.2f", o.v_bits()) << " | "
         << fmt("%.2f", o.kv_bits()) << " | " << pct_interval(o.delta_pct) << " | " << kl_interval(o.kl) << " | "
         << top1_interval(o.top1) << " |\n";
    }

    if (sensitivity) {
      const int layers = static_cast<int>(sensitivity->menu.k.size());
      md << "\n## Per-layer rels\n\n";
      md << "Calibrated on " << calibration_summary << " (" << sensitivity->positions << " scored positions, not part of "
            "the evaluated windows): each layer's K, then V, at each rel of the menu alone (everything else at 1/255), its "
            "mean KL less the control's (" << fmt("%.2g", sensitivity->control_kl) << ") and its bits; then, per KL budget, "
            "the rels with the fewest bits whose increases add up to at most the budget (Lagrangian relaxation of the "
            "knapsack). Measured on the evaluated windows:\n\n";
      md << "| KL budget (calibration) | predicted KL increase | predicted K+V bits | measured K+V bits | measured KL | "
            "perplexity change | K rels by layer | V rels by layer |\n|---|---|---|---|---|---|---|---|\n";
      for (const LayerPlanRow& row : layer_plans) {
        const Outcome* o = nullptr;
        for (const Outcome& x : outcomes) {
          if (x.setting.name == row.setting_name) o = &x;
        }
        auto rels = [](const std::vector<float>& r) {
          std::string t;
          for (float x : r) t += (t.empty() ? "" : " ") + rel_label(x);
          return t;
        };
        md << "| " << fmt("%g", row.budget) << " | " << fmt("%.2g", row.plan.predicted_loss) << " | "
           << fmt("%.2f", row.plan.predicted_bits) << " | " << (o ? fmt("%.2f", o->kv_bits()) : "") << " | "
           << (o ? kl_interval(o->kl) : "") << " | " << (o ? pct_interval(o->delta_pct) : "") << " | " << rels(row.plan.k_rel)
           << " | " << rels(row.plan.v_rel) << " |\n";
      }
      md << "\nSensitivity (calibration window): KL increase over the control, and bits, per layer and menu rel.\n\n| layer |";
      for (const packkv::BoundChoice& p : sensitivity->menu.k.front()) md << " K " << rel_label(p.rel) << " |";
      for (const packkv::BoundChoice& p : sensitivity->menu.v.front()) md << " V " << rel_label(p.rel) << " |";
      md << "\n|---|";
      for (std::size_t i = 0; i < sensitivity->menu.k.front().size() + sensitivity->menu.v.front().size(); ++i) md << "---|";
      md << "\n";
      for (int l = 0; l < layers; ++l) {
        md << "| " << l << " |";
        for (const auto* side : {&sensitivity->menu.k[static_cast<std::size_t>(l)], &sensitivity->menu.v[static_cast<std::size_t>(l)]}) {
          for (const packkv::BoundChoice& p : *side) md << " " << fmt("%.2g", p.loss) << " (" << fmt("%.2f", p.bits) << ") |";
        }
        md << "\n";
      }
    }

    md << "\n## Baselines\n\n";
    if (!skipped_note.empty()) md << skipped_note << ".\n\n";
    md << "| baseline | K bits | V bits | perplexity change | KL | top-1 |\n|---|---|---|---|---|---|\n";
    for (const Outcome& o : outcomes) {
      if (o.setting.family != Family::baseline) continue;
      md << "| " << o.setting.name << " | " << fmt("%.2f", o.k_bits()) << " | " << fmt("%.2f", o.v_bits()) << " | "
         << pct_interval(o.delta_pct) << " | " << kl_interval(o.kl) << " | " << top1_interval(o.top1) << " |\n";
    }

    // Small KLs (int8's, q8_0's) keep two significant digits instead of printing as 0.0000.
    auto kl_text = [](double kl) { return kl < 1e-3 ? fmt("%.2g", kl) : fmt("%.4f", kl); };
    md << "\n## Where packkv stands\n\n";
    md << "For each baseline, the PackKV setting of this run with the fewest K+V bits per element (compressed part) "
          "whose mean KL is at most the baseline's, K and V quantized together (the pairs; the one-sided settings "
          "keep the other side at 1/255, 8-bit codes):\n\n";
    md << "| baseline | its K+V bits | its KL | cheapest packkv at <= that KL | K+V bits | KL | bits vs baseline |\n";
    md << "|---|---|---|---|---|---|---|\n";
    std::ostringstream standing;
    for (const Outcome& b : outcomes) {
      if (b.setting.family != Family::baseline) continue;
      const Outcome* best = nullptr;
      for (const Outcome& o : outcomes) {
        if (!is_packkv(o.setting.family) || o.kl.value > b.kl.value) continue;
        if (!best || o.kv_bits() < best->kv_bits()) best = &o;
      }
      md << "| " << b.setting.name << " | " << fmt("%.2f", b.kv_bits()) << " | " << kl_text(b.kl.value) << " | ";
      standing << "- " << b.setting.name << " (" << fmt("%.2f", b.kv_bits()) << " bits, KL " << kl_text(b.kl.value)
               << ", perplexity " << fmt("%+.2f%%", b.delta_pct.value) << "): ";
      if (best) {
        const double relative = best->kv_bits() / b.kv_bits();
        md << best->setting.name << " | " << fmt("%.2f", best->kv_bits()) << " | " << kl_text(best->kl.value)
           << " | " << fmt("%.2fx", relative) << " |\n";
        standing << "packkv is as close to exact with " << fmt("%.2f", best->kv_bits()) << " bits, "
                 << (relative < 0.995 ? fmt("%.0f%% fewer", (1 - relative) * 100)
                                      : relative > 1.005 ? fmt("%.0f%% more", (relative - 1) * 100) : std::string("as many"))
                 << " (" << best->setting.name << ", KL " << kl_text(best->kl.value) << ").\n";
      } else {
        md << "none measured | | | |\n";
        standing << "no packkv setting of this run is as close to exact (the closest is the control at 1/255, 8-bit "
                    "codes).\n";
      }
    }
    md << "\nIn words, K and V together, at equal KL:\n\n" << standing.str();

    md << "\n## All settings\n\n";
    md << "Bits: compressed part. Ratios: against fp16 at the end of the windows, every byte counted, the exact window "
          "included at fp16. K+V at 32K: "
          "the mean of K and V bits all-in, the window projected at a 32K context.\n\n";
    md << "| setting | family | perplexity | change | KL | top-1 | K bits | V bits | K+V bits at 32K | K ratio | V ratio | "
          "K+V ratio | seconds |\n";
    md << "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for (const Outcome& o : outcomes) {
      const bool exact_row = o.setting.family == Family::exact;
      md << "| " << o.setting.name << " | " << family_name(o.setting.family) << " | " << fmt("%.4f", o.perplexity)
         << " | " << pct_interval(o.delta_pct) << " | " << kl_interval(o.kl) << " | " << top1_interval(o.top1) << " | "
         << (exact_row ? "32 (fp32)" : fmt("%.2f", o.k_bits())) << " | " << (exact_row ? "32 (fp32)" : fmt("%.2f", o.v_bits()))
         << " | " << (exact_row ? "" : fmt("%.2f", all_in_bits_at(o.kv_bits(), 32768))) << " | "
         << (exact_row ? "0.50x" : fmt("%.2fx", o.k_ratio())) << " | " << (exact_row ? "0.50x" : fmt("%.2fx", o.v_ratio()))
         << " | " << (exact_row ? "0.50x" : fmt("%.2fx", o.kv_ratio())) << " | " << fmt("%.0f", o.seconds) << " |\n";
    }
    std::fputs(md.str().c_str(), stdout);
    if (!opt.markdown.empty()) {
      std::ofstream(opt.markdown) << md.str();
      std::fprintf(stderr, "wrote %s\n", opt.markdown.c_str());
    }
    if (!opt.csv.empty()) {
      std::ofstream csv(opt.csv);
      csv << "family,name,k_mode,k_rel,v_rel,perplexity,delta_pct,delta_lo,delta_hi,kl,kl_lo,kl_hi,top1,top1_lo,top1_hi,"
             "k_bits,v_bits,kv_bits,kv_bits_32k,k_ratio,v_ratio,kv_ratio,seconds\n";
      for (const Outcome& o : outcomes) {
        std::string name = o.setting.name;
        std::replace(name.begin(), name.end(), ',', ' ');  // keeps the CSV splittable by commas
        csv << family_name(o.setting.family) << ",\"" << name << "\"," << packkv::to_string(o.setting.k_mode) << ','
            << o.setting.k_rel << ',' << o.setting.v_rel << ',' << fmt("%.6f", o.perplexity);
        for (const Interval* i : {&o.delta_pct}) csv << ',' << fmt("%.4f", i->value) << ',' << fmt("%.4f", i->lo) << ',' << fmt("%.4f", i->hi);
        for (const Interval* i : {&o.kl, &o.top1}) csv << ',' << fmt("%.6f", i->value) << ',' << fmt("%.6f", i->lo) << ',' << fmt("%.6f", i->hi);
        csv << ',' << fmt("%.4f", o.k_bits()) << ',' << fmt("%.4f", o.v_bits()) << ',' << fmt("%.4f", o.kv_bits()) << ','
            << fmt("%.4f", o.setting.family == Family::exact ? 32.0 : all_in_bits_at(o.kv_bits(), 32768)) << ','
            << fmt("%.4f", o.k_ratio()) << ',' << fmt("%.4f", o.v_ratio()) << ',' << fmt("%.4f", o.kv_ratio())
            << ',' << fmt("%.1f", o.seconds) << '\n';
      }
      std::fprintf(stderr, "wrote %s\n", opt.csv.c_str());
    }
    std::fprintf(stderr, "total %.0f s (CPU %.0f s)\n", wall, cpu_seconds);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "packkv_eval: %s\n", e.what());
    return 1;
  }
  return 0;
}

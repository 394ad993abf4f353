// packkv_serve: a small continuous-batching decode loop, to show how an engine drives
// PackedKVCache. Requests of different lengths arrive; the scheduler admits one when the step
// fits the memory budget (worst_case_bytes), prefills it, forks it for parallel sampling, and
// then every step appends one token per running sequence with one append_batch per layer and
// attends with one attention call per layer. Now and then a step drafts four tokens, verifies
// them in one causal pass (attention_causal) and keeps only those the "verifier" accepts (truncate). The model is synthetic: K/V with an LLM's
// statistics (packkv/synthetic.hpp), so the loop runs anywhere in seconds.
//
//   packkv_serve [--requests 40] [--max-batch 16] [--layers 8] [--budget-mib 48] [--device cpu|cuda] [--levers]
//
// --levers turns on the settings that paid on a real model (docs/results/levers.md): exact
// attention sinks (sink_tokens = 4), 2-byte parameters (compact_params) and Hadamard-rotated V
// (rotate_v).
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <deque>
#include <stdexcept>
#include <map>
#include <string>
#include <vector>

#include "packkv/packkv.hpp"
#include "packkv/synthetic.hpp"

#if defined(PACKKV_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace {

using packkv::SeqId;
using fp16 = packkv::fp16_t;

std::vector<fp16> to_fp16(const std::vector<float>& x) {
  std::vector<fp16> y(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) y[i] = packkv::from_float<fp16>(x[i]);
  return y;
}

struct Options {
  int requests = 40, max_batch = 16, layers = 8;
  std::size_t budget_mib = 48;
  packkv::Device device = packkv::Device::cpu;
  bool levers = false;
};

struct Request {
  int prompt = 0, output = 0, samples = 1;
};

/// A running sequence: its K/V source and how many tokens it still has to generate.
struct Running {
  packkv::synthetic::KVStream stream;
  int remaining = 0;
};

double mib(std::size_t bytes) { return static_cast<double>(bytes) / (1 << 20); }

/// Where one step's K/V, queries and outputs live: host vectors, or on Device::cuda device
/// buffers filled with synchronous copies on the legacy default stream (the cache's stream
/// unless set_stream is called), so each copy is ordered before the kernels that read it.
class StepBuffers {
 public:
  explicit StepBuffers(packkv::Device device) : kind_(device) {}
  ~StepBuffers() {
#if defined(PACKKV_WITH_CUDA)
    for (fp16* p : device_) cudaFree(p);
#endif
  }
  StepBuffers(const StepBuffers&) = delete;
  StepBuffers& operator=(const StepBuffers&) = delete;

  /// A pointer the cache accepts for these values.
  const fp16* put(int slot, const std::vector<float>& values) {
    const std::vector<fp16> converted = to_fp16(values);
    return place(slot, converted.size(), converted.data());
  }
  fp16* out(int slot, std::size_t n) { return place(slot, n, nullptr); }

 private:
  fp16* place(int slot, std::size_t n, const fp16* values) {
    host_.resize(std::max<std::size_t>(host_.size(), slot + 1));
    std::vector<fp16>& h = host_[static_cast<std::size_t>(slot)];
    if (h.size() < n) h.resize(n);
    if (values != nullptr) std::copy(values, values + n, h.begin());
    if (on_host()) return h.data();
#if defined(PACKKV_WITH_CUDA)
    device_.resize(host_.size(), nullptr);
    capacity_.resize(host_.size(), 0);
    fp16*& d = device_[static_cast<std::size_t>(slot)];
    if (capacity_[static_cast<std::size_t>(slot)] < n) {
      cudaFree(d);
      check(cudaMalloc(reinterpret_cast<void**>(&d), n * sizeof(fp16)));
      capacity_[static_cast<std::size_t>(slot)] = n;
    }
    if (values != nullptr) check(cudaMemcpy(d, values, n * sizeof(fp16), cudaMemcpyHostToDevice));
    return d;
#else
    return h.data();
#endif
  }
  bool on_host() const { return kind_ == packkv::Device::cpu; }
#if defined(PACKKV_WITH_CUDA)
  static void check(cudaError_t status) {
    if (status != cudaSuccess) throw std::runtime_error(cudaGetErrorString(status));
  }
  std::vector<fp16*> device_;
  std::vector<std::size_t> capacity_;
#endif
  packkv::Device kind_;
  std::vector<std::vector<fp16>> host_;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "packkv_serve: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--requests") o.requests = std::atoi(value());
    else if (a == "--max-batch") o.max_batch = std::atoi(value());
    else if (a == "--layers") o.layers = std::atoi(value());
    else if (a == "--budget-mib") o.budget_mib = static_cast<std::size_t>(std::atoll(value()));
    else if (a == "--device") o.device = std::string(value()) == "cuda" ? packkv::Device::cuda : packkv::Device::cpu;
    else if (a == "--levers") o.levers = true;
    else {
      std::fprintf(stderr, "usage: packkv_serve [--requests N] [--max-batch N] [--layers N] [--budget-mib N] "
                           "[--device cpu|cuda] [--levers]\n");
      std::exit(2);
    }
  }
  return o;
}

}  // namespace

int main(int argc, char** argv) try {
  const Options opt = parse(argc, argv);
  packkv::CacheConfig cfg;  // Llama-3-8B heads
  cfg.num_layers = opt.layers;
  cfg.num_kv_heads = 8;
  cfg.num_q_heads = 32;
  cfg.head_dim = 128;
  cfg.block_tokens = 64;
  cfg.residual_tokens = 16;  // >= the draft length: rejecting drafts is an exact undo
  cfg.memory_budget_bytes = opt.budget_mib << 20;
  cfg.device = opt.device;
  if (opt.levers) {
    cfg.sink_tokens = 4;         // a sequence's first tokens stay exact
    cfg.compact_params = true;   // (step, min) in 2 bytes: values must stay within +-16384
    cfg.rotate_v = true;         // V stored Hadamard-rotated; outputs come back unrotated
  }
  packkv::PackedKVCache<fp16> cache(cfg);  // fp16 storage, as an engine would keep K/V
  const std::size_t q_row = static_cast<std::size_t>(cfg.num_q_heads) * cfg.head_dim;
  constexpr int kDraft = 4;

  // Requests: prompts of 64 to 1024 tokens, outputs of 32 to 160, one in four samples 3 ways.
  packkv::synthetic::Rng rng(7);
  std::deque<Request> waiting;
  for (int r = 0; r < opt.requests; ++r) {
    waiting.push_back({64 + static_cast<int>(rng.next() % 961), 32 + static_cast<int>(rng.next() % 129),
                       r % 4 == 0 ? 3 : 1});
  }
  std::map<SeqId, Running> running;
  SeqId next_id = 1;
  StepBuffers buffers(cfg.device);
  std::vector<float> k, v, q;
  std::size_t generated = 0, peak_resident = 0, peak_fp16 = 0, forks = 0, drafts_rejected = 0;
  int step = 0, done = 0, deferred = 0, preempted = 0;
  const auto start = std::chrono::steady_clock::now();

  while (!waiting.empty() || !running.empty()) {
    std::vector<SeqId> ids;
    for (const auto& entry : running) ids.push_back(entry.first);
    const std::vector<int> ones(ids.size(), 1), drafts(ids.size(), kDraft);

    const bool draft = step % 8 == 7;
    const std::vector<int>& counts = draft ? drafts : ones;
    // Admission: the next request joins if this step, its whole prompt and output, and its
    // samples' outputs (each bounded as a new sequence of its output plus a full tail) fit what is
    // left of the budget. The running sequences' later growth is not reserved: preemption below
    // handles the rare step that does not fit.
    if (!waiting.empty() && static_cast<int>(running.size()) + waiting.front().samples <= opt.max_batch) {
      const Request& r = waiting.front();
      std::vector<int> joining = {r.prompt + r.output + kDraft};
      for (int s = 1; s < r.samples; ++s) joining.push_back(r.output + kDraft + cfg.residual_tokens + cfg.block_tokens);
      const std::size_t need = cache.worst_case_bytes(ids, counts, joining);
      if (need <= cache.memory_stats().free_budget_bytes) {
        const SeqId id = next_id++;
        cache.add_sequence(id);
        Running seq{packkv::synthetic::KVStream(cfg.num_kv_heads, cfg.head_dim, id), r.output};
        seq.stream.next(r.prompt, k, v);
        const fp16* dk = buffers.put(0, k);
        const fp16* dv = buffers.put(1, v);
        for (int l = 0; l < cfg.num_layers; ++l) cache.append(id, l, dk, dv, r.prompt);
        running.emplace(id, std::move(seq));
        for (int s = 1; s < r.samples; ++s) {  // parallel sampling: the children share the prompt's blocks
          const SeqId child = next_id++;
          cache.fork(id, child);
          running.emplace(child, Running{packkv::synthetic::KVStream(cfg.num_kv_heads, cfg.head_dim, child), r.output});
          ++forks;
        }
        waiting.pop_front();
        continue;  // the batch changed: plan the step again
      }
      ++deferred;
    }
    if (running.empty()) {
      std::fprintf(stderr, "packkv_serve: the next request does not fit an empty cache; raise --budget-mib\n");
      return 1;
    }
    // Preemption: if this step might not fit, the newest sequence goes back to the queue (to be
    // prefilled again from its tokens so far) until it does.
    if (cache.worst_case_bytes(ids, counts) > cache.memory_stats().free_budget_bytes) {
      const SeqId newest = ids.back();
      const Running& seq = running.at(newest);
      waiting.push_front({static_cast<int>(cache.length(newest, 0)), seq.remaining, 1});
      cache.remove_sequence(newest);
      running.erase(newest);
      ++preempted;
      continue;
    }

    // One step: a token per sequence (or a draft of kDraft), one append_batch and one attention
    // call per layer.
    const int per_seq = draft ? kDraft : 1;
    k.clear();
    v.clear();
    std::vector<float> sk, sv;
    for (SeqId id : ids) {
      running.at(id).stream.next(per_seq, sk, sv);
      k.insert(k.end(), sk.begin(), sk.end());
      v.insert(v.end(), sv.begin(), sv.end());
    }
    // A query per new token: a draft is verified in one pass, each draft token attending to the
    // cache and to the draft tokens before it (attention_causal's causal mask).
    q.resize(ids.size() * static_cast<std::size_t>(per_seq) * q_row);
    for (float& x : q) x = static_cast<float>(0.1 * rng.normal());
    const fp16* dk = buffers.put(0, k);
    const fp16* dv = buffers.put(1, v);
    const fp16* dq = buffers.put(2, q);
    fp16* dout = buffers.out(3, q.size());
    for (int l = 0; l < cfg.num_layers; ++l) {
      cache.append_batch(ids, l, dk, dv, counts);
      cache.attention_causal(ids, counts, l, dq, dout, 0.0883883f);
    }
    // Verify the draft: keep an accepted prefix of 0..kDraft tokens, drop the rest.
    for (SeqId id : ids) {
      Running& seq = running.at(id);
      int kept = per_seq;
      if (draft) {
        kept = static_cast<int>(rng.next() % (kDraft + 1));
        const std::int64_t length = cache.length(id, 0);
        cache.truncate(id, length - (kDraft - kept));
        drafts_rejected += static_cast<std::size_t>(kDraft - kept);
      }
      seq.remaining -= kept;
      generated += static_cast<std::size_t>(kept);
      if (seq.remaining <= 0) {
        cache.remove_sequence(id);
        running.erase(id);
        ++done;
      }
    }
    const packkv::MemoryStats m = cache.memory_stats();
    peak_resident = std::max(peak_resident, m.resident_bytes);
    peak_fp16 = std::max(peak_fp16, m.total.original_fp16_bytes);
    if (++step % 50 == 0) {
      std::printf("step %4d  running %2zu  waiting %2zu  done %2d  tokens %6zu  memory %7.1f MiB  fp16 cache %7.1f MiB  "
                  "shared %6.1f MiB\n",
                  step, running.size(), waiting.size(), done, generated, mib(m.resident_bytes),
                  mib(m.total.original_fp16_bytes), mib(m.shared_block_bytes));
      std::fflush(stdout);
    }
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("\n%d requests as %d sequences (%zu forks for parallel sampling), %d steps, %zu tokens generated, %zu "
              "draft tokens rejected, %d admissions deferred for memory, %d preemptions\n",
              opt.requests, done, forks, step, generated, drafts_rejected, deferred, preempted);
  std::printf("throughput %.0f tokens/s, %.1f steps/s (%s, %d layers, Llama-3-8B heads%s)\n", generated / seconds,
              step / seconds, cfg.device == packkv::Device::cpu ? "CPU" : "CUDA", cfg.num_layers,
              opt.levers ? ", sinks + compact parameters + rotated V" : "");
  std::printf("peak memory %.1f MiB (everything the cache holds) vs a peak of %.1f MiB for an fp16 cache of the "
              "same tokens without sharing: %.1fx less; budget %zu MiB\n",
              mib(peak_resident), mib(peak_fp16), peak_resident ? static_cast<double>(peak_fp16) / peak_resident : 0.0,
              opt.budget_mib);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "packkv_serve: %s\n", e.what());
  return 1;
}

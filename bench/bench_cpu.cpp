// CPU benchmarks: encoding throughput, decode attention on packed blocks vs dense fp32 over the
// same data with the same threads (and with compact parameters, CacheConfig::compact_params), and
// a decode step beside a concurrent prefill. Shape: Llama-3-8B (32 query heads, 8 KV heads,
// head_dim 128), K rel 0.1, V rel 0.2, median repacking. Closing tables give the ratios measured
// in this run.
#include <benchmark/benchmark.h>
#include <omp.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <thread>
#include <map>
#include <set>
#include <memory>
#include <string>

#include "dense_attention.hpp"
#include "packkv/packkv.hpp"
#include "packkv/synthetic.hpp"

namespace {

using namespace packkv;

constexpr int kQHeads = 32, kKVHeads = 8, kHeadDim = 128;

CacheConfig llama3_config(bool compact = false) {
  CacheConfig c;
  c.compact_params = compact;
  c.num_layers = 1;
  c.num_kv_heads = kKVHeads;
  c.num_q_heads = kQHeads;
  c.head_dim = kHeadDim;
  c.block_tokens = 64;
  c.k_rel = 0.1f;
  c.v_rel = 0.2f;
  c.repack = RepackMethod::median;
  return c;
}

int threads() { return omp_get_max_threads(); }

// One synthetic context per length, shared by the packed and dense benchmarks.
struct Context {
  std::vector<float> k, v;                        // dense fp32 [len][8][128]
  std::unique_ptr<PackedKVCache<fp16_t>> cache;   // the same tokens, packed
  std::vector<float> q;
};

Context& context(std::int64_t len, bool compact = false) {
  static std::map<std::pair<std::int64_t, bool>, std::unique_ptr<Context>> contexts;
  auto& slot = contexts[{len, compact}];
  if (!slot) {
    slot = std::make_unique<Context>();
    synthetic::KVStream stream(kKVHeads, kHeadDim, 42);
    stream.next(static_cast<int>(len), slot->k, slot->v);
    slot->cache = std::make_unique<PackedKVCache<fp16_t>>(llama3_config(compact));
    slot->cache->add_sequence(0);
    std::vector<fp16_t> k16(slot->k.size()), v16(slot->v.size());
    for (std::size_t i = 0; i < k16.size(); ++i) {
      k16[i] = fp16_from_float(slot->k[i]);
      v16[i] = fp16_from_float(slot->v[i]);
      slot->k[i] = to_float(k16[i]);  // the dense baseline holds exactly the values the cache saw
      slot->v[i] = to_float(v16[i]);
    }
    slot->cache->append(0, 0, k16.data(), v16.data(), static_cast<int>(len));
    synthetic::Rng rng(7);
    slot->q.resize(kQHeads * kHeadDim);
    for (auto& x : slot->q) x = static_cast<float>(rng.normal());
  }
  return *slot;
}

void packed_attention(benchmark::State& state, bool compact) {
  Context& ctx = context(state.range(0), compact);
  std::vector<fp16_t> q(ctx.q.size()), out(ctx.q.size());
  for (std::size_t i = 0; i < q.size(); ++i) q[i] = fp16_from_float(ctx.q[i]);
  const SeqId ids[] = {0};
  for (auto _ : state) {
    ctx.cache->attention(ids, 0, q.data(), out.data(), 1.0f / std::sqrt(128.0f));
    benchmark::DoNotOptimize(out.data());
  }
  const MemoryStats m = ctx.cache->memory_stats();
  state.counters["ratio_vs_fp16"] = m.total.ratio_vs_fp16();
  state.counters["bytes_read"] = static_cast<double>(m.total.total());
  state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(m.total.total()));
}
void BM_PackedAttention(benchmark::State& state) { packed_attention(state, false); }
void BM_PackedAttentionCompact(benchmark::State& state) { packed_attention(state, true); }

void BM_DenseFp32Attention(benchmark::State& state) {
  Context& ctx = context(state.range(0));
  std::vector<float> out(ctx.q.size());
  const std::size_t len = static_cast<std::size_t>(state.range(0));
  for (auto _ : state) {
    bench::dense_decode_attention(ctx.k.data(), ctx.v.data(), len, kKVHeads, kQHeads, kHeadDim, ctx.q.data(),
                                  out.data(), 1.0f / std::sqrt(128.0f), threads());
    benchmark::DoNotOptimize(out.data());
  }
  state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>((ctx.k.size() + ctx.v.size()) * 4));
}

template <class T, bool kCompact = false>
void BM_Encode(benchmark::State& state) {
  const int tokens = static_cast<int>(state.range(0));
  synthetic::KVStream stream(kKVHeads, kHeadDim, 3);
  std::vector<float> kf, vf;
  stream.next(tokens, kf, vf);
  std::vector<T> k(kf.size()), v(vf.size());
  for (std::size_t i = 0; i < k.size(); ++i) {
    k[i] = from_float<T>(kf[i]);
    v[i] = from_float<T>(vf[i]);
  }
  for (auto _ : state) {
    PackedKVCache<T> cache(llama3_config(kCompact));
    cache.add_sequence(0);
    cache.append(0, 0, k.data(), v.data(), tokens);
    benchmark::DoNotOptimize(cache.length(0));
  }
  state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>((k.size() + v.size()) * sizeof(T)));
}

// A decode step of a small server: 8 sequences of 4K tokens, 4 layers; per layer, one token is
// appended to every sequence and attention runs over the batch. With range(0) = 1 another thread
// keeps prefilling 4K-token prompts into a sequence of its own meanwhile (what a server does when
// a request arrives): an append holds only its own sequence, so the step slows down by the share
// of the cores the prefill takes, not by waiting for it. The levers' variant runs the settings
// that paid on a real model (docs/results/levers.md): exact sinks, compact parameters and V
// rotated (each appended V row and each output head go through a Hadamard transform), with a
// 64-token exact window, so the tail's dense rows are read too.
void decode_step(benchmark::State& state, bool levers) {
  constexpr int kLayers = 4, kBatch = 8, kContext = 4096;
  CacheConfig c = llama3_config();
  c.num_layers = kLayers;
  if (levers) {
    c.sink_tokens = 4;
    c.compact_params = true;
    c.rotate_v = true;
    c.residual_tokens = 64;
  }
  PackedKVCache<fp16_t> cache(c);
  synthetic::KVStream stream(kKVHeads, kHeadDim, 5);
  std::vector<float> kf, vf;
  stream.next(kContext, kf, vf);
  std::vector<fp16_t> k(kf.size()), v(vf.size());
  for (std::size_t i = 0; i < k.size(); ++i) {
    k[i] = fp16_from_float(kf[i]);
    v[i] = fp16_from_float(vf[i]);
  }
  std::vector<SeqId> ids;
  for (int b = 0; b < kBatch; ++b) {
    cache.add_sequence(b);
    for (int l = 0; l < kLayers; ++l) cache.append(b, l, k.data(), v.data(), kContext);
    ids.push_back(b);
  }
  std::atomic<bool> stop{false};
  std::atomic<int> prefills{0};
  std::thread prefill;
  if (state.range(0) == 1) {
    prefill = std::thread([&] {
      for (SeqId id = 1000; !stop; ++id) {
        cache.add_sequence(id);
        for (int l = 0; l < kLayers && !stop; ++l) cache.append(id, l, k.data(), v.data(), kContext);
        cache.remove_sequence(id);
        ++prefills;
      }
    });
  }
  const std::size_t row = static_cast<std::size_t>(kKVHeads) * kHeadDim;
  std::vector<fp16_t> q(kBatch * kQHeads * kHeadDim, fp16_from_float(0.1f)), out(q.size());
  std::size_t token = 0;
  for (auto _ : state) {
    for (int l = 0; l < kLayers; ++l) {
      const std::size_t at = (token % kContext) * row;
      for (SeqId id : ids) cache.append(id, l, k.data() + at, v.data() + at, 1);
      cache.attention(ids, l, q.data(), out.data(), 1.0f / std::sqrt(128.0f));
    }
    ++token;
    benchmark::DoNotOptimize(out.data());
  }
  stop = true;
  if (prefill.joinable()) prefill.join();
  state.counters["prefills"] = prefills.load();
}
void BM_DecodeStep(benchmark::State& state) { decode_step(state, false); }
void BM_DecodeStepLevers(benchmark::State& state) { decode_step(state, true); }

void contexts(benchmark::internal::Benchmark* b) {
  for (std::int64_t len : {1024, 4096, 16384, 32768, 65536}) b->Arg(len);
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

BENCHMARK(BM_PackedAttention)->Apply(contexts);
BENCHMARK(BM_PackedAttentionCompact)->Apply(contexts);
BENCHMARK(BM_DenseFp32Attention)->Apply(contexts);
BENCHMARK(BM_Encode<fp16_t>)->Arg(8192)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_Encode<fp16_t, true>)->Arg(8192)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_Encode<float>)->Arg(8192)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_DecodeStep)->ArgName("concurrent_prefill")->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_DecodeStepLevers)->ArgName("concurrent_prefill")->Arg(0)->Unit(benchmark::kMillisecond)->UseRealTime();

// Records each run's time so the closing tables can give ratios from this very run: the median of
// the repetitions when --benchmark_repetitions is given (these machines are noisy), else the run.
class RatioReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& run : runs) {
      if (run.error_occurred) continue;
      const bool median = run.run_type == Run::RT_Aggregate && run.aggregate_name == "median";
      const std::string name = run.run_name.str();
      if (!median && (run.run_type != Run::RT_Iteration || medians.count(name))) continue;
      if (median) medians.insert(name);
      times[name] = run.GetAdjustedRealTime();
      if (run.counters.count("ratio_vs_fp16")) ratios[name] = run.counters.at("ratio_vs_fp16");
      if (run.counters.count("bytes_per_second")) rates[name] = run.counters.at("bytes_per_second");
    }
  }
  std::map<std::string, double> times, ratios, rates;
  std::set<std::string> medians;
};

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  RatioReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  std::printf("\npacked vs dense fp32 decode attention, %d threads, Llama-3-8B head shape (this run)\n", threads());
  std::printf("%10s %12s %12s %10s %14s %12s %14s\n", "context", "packed ms", "dense ms", "speed-up", "ratio vs fp16",
              "compact ms", "compact ratio");
  for (std::int64_t len : {1024, 4096, 16384, 32768, 65536}) {
    const std::string suffix = "/" + std::to_string(len) + "/real_time";
    const auto p = reporter.times.find("BM_PackedAttention" + suffix);
    const auto d = reporter.times.find("BM_DenseFp32Attention" + suffix);
    if (p == reporter.times.end() || d == reporter.times.end()) continue;
    const auto c = reporter.times.find("BM_PackedAttentionCompact" + suffix);
    const double compact_ms = c == reporter.times.end() ? NAN : c->second;
    std::printf("%10lld %12.3f %12.3f %9.2fx %14.2f %12.3f %14.2f\n", static_cast<long long>(len), p->second,
                d->second, d->second / p->second, reporter.ratios["BM_PackedAttention" + suffix], compact_ms,
                reporter.ratios["BM_PackedAttentionCompact" + suffix]);
  }
  for (const auto& [name, rate] : reporter.rates) {
    if (name.rfind("BM_Encode", 0) == 0) std::printf("%s: %.0f MB/s of input\n", name.c_str(), rate / 1e6);
  }
  const auto alone = reporter.times.find("BM_DecodeStep/concurrent_prefill:0/real_time");
  const auto beside = reporter.times.find("BM_DecodeStep/concurrent_prefill:1/real_time");
  if (alone != reporter.times.end() && beside != reporter.times.end()) {
    std::printf("\ndecode step (8 x 4K tokens, 4 layers): %.2f ms alone, %.2f ms beside a 4K prefill in another "
                "thread (%.2fx)\n",
                alone->second, beside->second, beside->second / alone->second);
  }
  benchmark::Shutdown();
  return 0;
}

// What an engine's decode loop costs on the CPU backend, side by side in one run: a decode step
// (one token per sequence, 32 layers, 4K context, Llama-3-8B heads) driven by one append_batch
// per layer, by one append per (sequence, layer), and over a dense fp16 cache by the same loop;
// and forking a 4K prefix into 8 children against 8 independent copies (export + import).
#include <benchmark/benchmark.h>
#include <omp.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu_kernels/kernels.hpp"  // the ISA check
#include "packkv/packkv.hpp"
#include "packkv/synthetic.hpp"

namespace {

using namespace packkv;

constexpr int kQHeads = 32, kKVHeads = 8, kHeadDim = 128, kLayers = 32, kContext = 4096;
constexpr std::size_t kRow = static_cast<std::size_t>(kKVHeads) * kHeadDim;
// Steps per benchmark: 4K tokens leave a 64-token tail (16 residual), which seals its next block
// after 16 more, so 12 steps seal nothing and the truncation back to 4K restores the exact state:
// every variant starts from the same cache. (A sequence seals a block every 64 steps.)
constexpr int kSteps = 12;

CacheConfig engine_config() {
  CacheConfig c;
  c.num_layers = kLayers;
  c.num_kv_heads = kKVHeads;
  c.num_q_heads = kQHeads;
  c.head_dim = kHeadDim;
  c.block_tokens = 64;
  c.residual_tokens = 16;
  return c;
}

/// The 4K-token context every sequence starts from, and tokens to decode, in fp16.
struct Tokens {
  std::vector<fp16_t> k, v;
};
const Tokens& tokens() {
  static const Tokens t = [] {
    synthetic::KVStream stream(kKVHeads, kHeadDim, 11);
    std::vector<float> k, v;
    stream.next(kContext + 1024, k, v);
    Tokens out{std::vector<fp16_t>(k.size()), std::vector<fp16_t>(v.size())};
    for (std::size_t i = 0; i < k.size(); ++i) {
      out.k[i] = fp16_from_float(k[i]);
      out.v[i] = fp16_from_float(v[i]);
    }
    return out;
  }();
  return t;
}

/// A packed cache of `batch` sequences of 4K tokens in every layer (built once per batch size).
PackedKVCache<fp16_t>& packed(int batch) {
  static std::map<int, std::unique_ptr<PackedKVCache<fp16_t>>> caches;
  auto& slot = caches[batch];
  if (!slot) {
    caches.clear();  // one at a time: batch 64 holds about 8 GB
    auto cache = std::make_unique<PackedKVCache<fp16_t>>(engine_config());
    const Tokens& t = tokens();
    for (int b = 0; b < batch; ++b) {
      cache->add_sequence(static_cast<SeqId>(b));
      for (int l = 0; l < kLayers; ++l) cache->append(static_cast<SeqId>(b), l, t.k.data(), t.v.data(), kContext);
    }
    caches[batch] = std::move(cache);
    return *caches[batch];
  }
  return *slot;
}

/// A dense fp16 KV cache: contiguous K and V per (sequence, layer); attention in fp32 over the
/// fp16 rows (F16C conversion and FMA when the CPU has them, the packed path's vectorised exp),
/// parallel over (sequence, KV head): the same effort as the packed path, on the plain format.
class DenseFp16Cache {
 public:
  DenseFp16Cache(int batch, int reserve_tokens) : batch_(batch), layers_(static_cast<std::size_t>(batch) * kLayers) {
    for (Layer& l : layers_) {
      l.k.reserve(static_cast<std::size_t>(reserve_tokens) * kRow);
      l.v.reserve(static_cast<std::size_t>(reserve_tokens) * kRow);
    }
  }
  void append(int seq, int layer, const fp16_t* k, const fp16_t* v, int n) {
    Layer& l = layers_[static_cast<std::size_t>(seq) * kLayers + layer];
    l.k.insert(l.k.end(), k, k + n * kRow);
    l.v.insert(l.v.end(), v, v + n * kRow);
  }
  std::size_t bytes() const {
    std::size_t b = 0;
    for (const Layer& l : layers_) b += (l.k.size() + l.v.size()) * sizeof(fp16_t);
    return b;
  }
  void attention(int layer, const float* q, float* out, float scale) const {
    constexpr int group = kQHeads / kKVHeads;
    const bool simd = fast();
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int s = 0; s < batch_; ++s) {
      for (int h = 0; h < kKVHeads; ++h) {
        const Layer& l = layers_[static_cast<std::size_t>(s) * kLayers + layer];
        const std::size_t len = l.k.size() / kRow;
        thread_local std::vector<float> scores;
        scores.resize(len * group);
        float qs[group][kHeadDim];
        for (int g = 0; g < group; ++g) {
          for (int c = 0; c < kHeadDim; ++c) qs[g][c] = q[(static_cast<std::size_t>(s) * kQHeads + h * group + g) * kHeadDim + c] * scale;
        }
        for (std::size_t t = 0; t < len; ++t) {
          const fp16_t* kr = l.k.data() + t * kRow + h * kHeadDim;
          for (int g = 0; g < group; ++g) scores[g * len + t] = simd ? dot_f16c(kr, qs[g]) : dot_scalar(kr, qs[g]);
        }
        float acc[group][kHeadDim] = {};
        float m[group], sum[group];
        for (int g = 0; g < group; ++g) {
          detail::cpu::kernels().softmax_rows(scores.data() + g * len, static_cast<int>(len), len, 1, &m[g], &sum[g]);
        }
        for (std::size_t t = 0; t < len; ++t) {
          const fp16_t* vr = l.v.data() + t * kRow + h * kHeadDim;
          for (int g = 0; g < group; ++g) {
            if (simd) axpy_f16c(scores[g * len + t], vr, acc[g]);
            else axpy_scalar(scores[g * len + t], vr, acc[g]);
          }
        }
        for (int g = 0; g < group; ++g) {
          float* o = out + (static_cast<std::size_t>(s) * kQHeads + h * group + g) * kHeadDim;
          for (int c = 0; c < kHeadDim; ++c) o[c] = acc[g][c] / sum[g];
        }
      }
    }
  }

 private:
  struct Layer {
    std::vector<fp16_t> k, v;
  };
  static bool fast() {
#if defined(__x86_64__)
    return detail::cpu::supported(detail::cpu::Isa::avx2) && __builtin_cpu_supports("f16c");
#else
    return false;
#endif
  }
  static float dot_scalar(const fp16_t* k, const float* q) {
    float d = 0;
    for (int c = 0; c < kHeadDim; ++c) d += to_float(k[c]) * q[c];
    return d;
  }
  static void axpy_scalar(float w, const fp16_t* v, float* acc) {
    for (int c = 0; c < kHeadDim; ++c) acc[c] += w * to_float(v[c]);
  }
#if defined(__x86_64__)
  __attribute__((target("avx2,fma,f16c"))) static float dot_f16c(const fp16_t* k, const float* q) {
    __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
    for (int c = 0; c < kHeadDim; c += 16) {
      a = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(k + c))), _mm256_loadu_ps(q + c), a);
      b = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(k + c + 8))),
                          _mm256_loadu_ps(q + c + 8), b);
    }
    a = _mm256_add_ps(a, b);
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
  }
  __attribute__((target("avx2,fma,f16c"))) static void axpy_f16c(float w, const fp16_t* v, float* acc) {
    const __m256 wv = _mm256_set1_ps(w);
    for (int c = 0; c < kHeadDim; c += 8) {
      const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + c)));
      _mm256_storeu_ps(acc + c, _mm256_fmadd_ps(wv, x, _mm256_loadu_ps(acc + c)));
    }
  }
#else
  static float dot_f16c(const fp16_t* k, const float* q) { return dot_scalar(k, q); }
  static void axpy_f16c(float w, const fp16_t* v, float* acc) { axpy_scalar(w, v, acc); }
#endif
  int batch_;
  std::vector<Layer> layers_;
};

/// What a step runs: appends and attention, driven three ways; or the appends alone, to see what
/// batching changes when attention dominates the step.
enum class Drive { batched = 0, per_sequence = 1, dense_fp16 = 2, batched_appends = 3, per_sequence_appends = 4 };

void BM_DecodeStep(benchmark::State& state) {
  const int batch = static_cast<int>(state.range(0));
  const auto drive = static_cast<Drive>(state.range(1));
  const Tokens& t = tokens();
  const float scale = 1.0f / std::sqrt(static_cast<float>(kHeadDim));
  std::vector<SeqId> ids(static_cast<std::size_t>(batch));
  for (int b = 0; b < batch; ++b) ids[static_cast<std::size_t>(b)] = static_cast<SeqId>(b);
  const std::vector<int> ones(ids.size(), 1);
  std::vector<fp16_t> step_k(ids.size() * kRow), step_v(step_k.size());
  std::vector<fp16_t> q16(ids.size() * kQHeads * kHeadDim, fp16_from_float(0.05f)), out16(q16.size());
  std::vector<float> q32(q16.size(), 0.05f), out32(q16.size());

  std::unique_ptr<DenseFp16Cache> dense;
  PackedKVCache<fp16_t>* cache = nullptr;
  if (drive == Drive::dense_fp16) {
    const std::size_t need = static_cast<std::size_t>(batch) * kLayers * (kContext + 1024) * kRow * 2 * sizeof(fp16_t);
    if (need > (std::size_t{16} << 30)) {
      state.SkipWithError(("a dense fp16 cache of this batch needs " + std::to_string(need >> 30) +
                           " GiB: more than this machine can hold beside the packed caches")
                              .c_str());
      return;
    }
    dense = std::make_unique<DenseFp16Cache>(batch, kContext + 1024);
    for (int b = 0; b < batch; ++b) {
      for (int l = 0; l < kLayers; ++l) dense->append(b, l, t.k.data(), t.v.data(), kContext);
    }
  } else {
    cache = &packed(batch);
  }
  int position = kContext;
  for (auto _ : state) {
    for (std::size_t b = 0; b < ids.size(); ++b) {  // the step's new token of every sequence
      std::memcpy(step_k.data() + b * kRow, t.k.data() + position * kRow, kRow * sizeof(fp16_t));
      std::memcpy(step_v.data() + b * kRow, t.v.data() + position * kRow, kRow * sizeof(fp16_t));
    }
    for (int l = 0; l < kLayers; ++l) {
      switch (drive) {
        case Drive::batched:
          cache->append_batch(ids, l, step_k.data(), step_v.data(), ones);
          cache->attention(ids, l, q16.data(), out16.data(), scale);
          break;
        case Drive::per_sequence:
          for (std::size_t b = 0; b < ids.size(); ++b) {
            cache->append(ids[b], l, step_k.data() + b * kRow, step_v.data() + b * kRow, 1);
          }
          cache->attention(ids, l, q16.data(), out16.data(), scale);
          break;
        case Drive::batched_appends:
          cache->append_batch(ids, l, step_k.data(), step_v.data(), ones);
          break;
        case Drive::per_sequence_appends:
          for (std::size_t b = 0; b < ids.size(); ++b) {
            cache->append(ids[b], l, step_k.data() + b * kRow, step_v.data() + b * kRow, 1);
          }
          break;
        case Drive::dense_fp16:
          for (int b = 0; b < batch; ++b) dense->append(b, l, step_k.data() + b * kRow, step_v.data() + b * kRow, 1);
          dense->attention(l, q32.data(), out32.data(), scale);
          break;
      }
    }
    if (++position == kContext + 1024) state.SkipWithError("ran past the prepared tokens");
    benchmark::DoNotOptimize(out16.data());
    benchmark::DoNotOptimize(out32.data());
  }
  if (cache != nullptr) {
    for (SeqId id : ids) cache->truncate(id, kContext);  // the next benchmark starts from 4K again
    const MemoryStats m = cache->memory_stats();
    state.counters["memory_GiB"] = static_cast<double>(m.resident_bytes) / (1 << 30);
    state.counters["fp16_GiB"] = static_cast<double>(m.total.original_fp16_bytes) / (1 << 30);
  } else {
    state.counters["memory_GiB"] = static_cast<double>(dense->bytes()) / (1 << 30);
    state.counters["fp16_GiB"] = state.counters["memory_GiB"];
  }
  state.counters["tokens_per_s"] = benchmark::Counter(static_cast<double>(batch) * state.iterations(),
                                                      benchmark::Counter::kIsRate);
}

// Fork of a 4K prefix into 8 children against 8 copies by export + import (the only way to copy
// a sequence before fork): wall time and the memory the children add.
void BM_Fork(benchmark::State& state) {
  const bool copies = state.range(0) == 1;
  PackedKVCache<fp16_t> cache(engine_config());
  const Tokens& t = tokens();
  cache.add_sequence(0);
  for (int l = 0; l < kLayers; ++l) cache.append(0, l, t.k.data(), t.v.data(), kContext);
  const std::size_t base = cache.memory_stats().resident_bytes;
  std::size_t added = 0;
  for (auto _ : state) {
    if (copies) {
      const std::vector<std::uint8_t> image = cache.export_sequence(0);
      for (SeqId child = 1; child <= 8; ++child) cache.import_sequence(child, image);
    } else {
      for (SeqId child = 1; child <= 8; ++child) cache.fork(0, child);
    }
    state.PauseTiming();
    added = cache.memory_stats().resident_bytes - base;
    for (SeqId child = 1; child <= 8; ++child) cache.remove_sequence(child);
    cache.release_unused_memory();
    state.ResumeTiming();
  }
  state.counters["children_MiB"] = static_cast<double>(added) / (1 << 20);
  state.counters["parent_MiB"] = static_cast<double>(base) / (1 << 20);
}

BENCHMARK(BM_DecodeStep)
    ->ArgNames({"batch", "drive"})
    ->Args({16, 0})
    ->Args({16, 1})
    ->Args({16, 2})
    ->Args({16, 3})
    ->Args({16, 4})
    ->Args({64, 0})
    ->Args({64, 1})
    ->Args({64, 2})
    ->Args({64, 3})
    ->Args({64, 4})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(kSteps);
BENCHMARK(BM_Fork)->ArgName("copies")->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(3);

class Table : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& run : runs) {
      if (run.error_occurred || run.run_type != Run::RT_Iteration) continue;
      times[run.run_name.str()] = run.GetAdjustedRealTime();
      for (const auto& [name, counter] : run.counters) counters[run.run_name.str()][name] = counter.value;
    }
  }
  std::map<std::string, double> times;
  std::map<std::string, std::map<std::string, double>> counters;
};

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  Table table;
  benchmark::RunSpecifiedBenchmarks(&table);
  auto name = [](int batch, int drive) {
    return "BM_DecodeStep/batch:" + std::to_string(batch) + "/drive:" + std::to_string(drive) +
           "/iterations:" + std::to_string(kSteps) + "/real_time";
  };
  std::printf("\ndecode step, %d layers, 4K context, Llama-3-8B heads, %d threads (this run)\n", kLayers,
              omp_get_max_threads());
  std::printf("%6s %11s %11s %14s %12s %12s %16s %16s %12s\n", "batch", "batched ms", "per-seq ms", "dense fp16 ms",
              "per-seq/bat", "dense/bat", "appends bat ms", "appends seq ms", "memory/fp16");
  auto time = [&](int batch, int drive) {
    const auto it = table.times.find(name(batch, drive));
    return it == table.times.end() ? NAN : it->second;
  };
  for (int batch : {16, 64}) {
    const double b = time(batch, 0), p = time(batch, 1), d = time(batch, 2);
    if (std::isnan(b)) continue;
    auto& c = table.counters[name(batch, 0)];
    std::printf("%6d %11.1f %11.1f %14.1f %11.2fx %11.2fx %16.2f %16.2f %12.3f\n", batch, b, p, d, p / b, d / b,
                time(batch, 3), time(batch, 4), c["memory_GiB"] / c["fp16_GiB"]);
  }
  const auto f = table.times.find("BM_Fork/copies:0/iterations:3/real_time");
  const auto x = table.times.find("BM_Fork/copies:1/iterations:3/real_time");
  if (f != table.times.end() && x != table.times.end()) {
    auto& fc = table.counters["BM_Fork/copies:0/iterations:3/real_time"];
    auto& xc = table.counters["BM_Fork/copies:1/iterations:3/real_time"];
    std::printf("\n4K prefix into 8 children: fork %.2f ms, %.1f MiB added; export + 8 imports %.1f ms, %.1f MiB added "
                "(%.0fx the time, %.1fx the memory); the parent holds %.1f MiB\n",
                f->second, fc["children_MiB"], x->second, xc["children_MiB"], x->second / f->second,
                xc["children_MiB"] / fc["children_MiB"], fc["parent_MiB"]);
  }
  benchmark::Shutdown();
  return 0;
}

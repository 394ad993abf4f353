// CUDA benchmark: packed K.q, attn.V and decode attention against dense fp16 baselines (cuBLAS
// and a dense flash-decoding kernel), the unfused decompress-then-cuBLAS path, GPU encoding, and a
// device-to-device copy as the bandwidth ceiling. Timing is by CUDA events; every case rotates
// over enough replicas of its data (>= 512 MiB) that the L2 cache does not flatter small shapes.
//
// Counters: fp16_GBps (bytes a dense fp16 cache would read / time), packed_GBps (compressed bytes
// read / time), pct_copy (packed_GBps against the measured copy bandwidth), speedup (dense time /
// this time). A summary table is printed after the Google Benchmark output.
#include <benchmark/benchmark.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "bench_kernels.hpp"
#include "packkv/cache.hpp"
#include "packkv/cuda/device_codec.hpp"

namespace {

using packkv::fp16_t;

constexpr std::size_t kRotationBytes = std::size_t{512} << 20;
constexpr int kBlockTokens = 64;

struct Model {
  const char* name;
  int q_heads, kv_heads, dim;
};
const Model kModels[] = {{"llama3-8b", 32, 8, 128}, {"llama3.2-1b", 32, 8, 64}};
const std::int64_t kContexts[] = {1024, 4096, 16384, 32768, 65536, 131072};
const int kBatches[] = {1, 8, 32};

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}
void check(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error(std::string(what) + ": cuBLAS status " + std::to_string(static_cast<int>(status)));
}

/// cudaMalloc'd memory, freed on destruction.
template <class T>
class Device {
 public:
  Device() = default;
  explicit Device(std::size_t n) : n_(n) {
    check(cudaMalloc(&p_, std::max<std::size_t>(n, 1) * sizeof(T)), "cudaMalloc");
  }
  ~Device() { cudaFree(p_); }
  Device(Device&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(o.n_) {}
  Device& operator=(Device&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  T* get() const { return static_cast<T*>(p_); }
  std::size_t size() const { return n_; }

 private:
  void* p_ = nullptr;
  std::size_t n_ = 0;
};

struct Shape {
  Model model;
  std::int64_t context;
  int batch;
  bool operator<(const Shape& o) const {
    return std::tie(model.dim, context, batch) < std::tie(o.model.dim, o.context, o.batch);
  }
  std::string label() const {
    return std::string(model.name) + "/ctx" + std::to_string(context / 1024) + "K/b" + std::to_string(batch);
  }
};

/// Everything one shape needs: packed and dense copies of the same caches, in `replicas` copies.
struct Fixture {
  Shape shape;
  int replicas = 1;
  std::unique_ptr<packkv::PackedKVCache<fp16_t>> cache;
  std::vector<std::vector<packkv::SeqId>> ids;  // [replica][batch]
  Device<fp16_t> dense_k, dense_v;              // [replica][batch][kv_heads][len][dim]
  Device<fp16_t> q, out;                        // [batch][q_heads][dim]
  Device<float> q32;                            // [q_heads][dim]
  Device<float> scores;                         // [batch][q_heads][len]
  Device<float> weights;                        // [q_heads][len]
  Device<fp16_t> weights16;                     // [batch * kv_heads][group][len]
  Device<float> av_out;                         // [batch][q_heads][dim]
  Device<float> partials;
  Device<float> unpacked_k, unpacked_v;  // one sequence, [len][kv_heads][dim]
  std::size_t packed_bytes_per_replica = 0;
  int dense_splits = 1;

  std::size_t dense_elems_per_replica() const {
    return static_cast<std::size_t>(shape.batch) * shape.model.kv_heads * shape.context * shape.model.dim;
  }
};

cudaStream_t g_stream = nullptr;
cublasHandle_t g_cublas = nullptr;
int g_sm_count = 1;
double g_copy_gbps = 0;
std::unique_ptr<Fixture> g_fixture;

struct Result {
  double microseconds = 0, fp16_gbps = 0, packed_gbps = 0;
};
std::map<std::pair<std::string, std::string>, Result> g_results;  // (shape label, op) -> result

Fixture& fixture_for(const Shape& shape) {
  if (g_fixture && !(g_fixture->shape < shape) && !(shape < g_fixture->shape)) return *g_fixture;
  g_fixture.reset();
  check(cudaDeviceSynchronize(), "fixture teardown");
  auto f = std::make_unique<Fixture>();
  f->shape = shape;
  const Model& m = shape.model;
  const std::int64_t len = shape.context;
  const std::size_t dense_bytes = f->dense_elems_per_replica() * 2 * sizeof(fp16_t);
  f->replicas = static_cast<int>(std::max<std::size_t>(1, (kRotationBytes + dense_bytes - 1) / dense_bytes));

  packkv::CacheConfig config;
  config.num_layers = 1;
  config.num_kv_heads = m.kv_heads;
  config.num_q_heads = m.q_heads;
  config.head_dim = m.dim;
  config.block_tokens = kBlockTokens;
  config.k_rel = 0.1f;
  config.v_rel = 0.2f;
  config.repack = packkv::RepackMethod::median;
  config.device = packkv::Device::cuda;
  f->cache = std::make_unique<packkv::PackedKVCache<fp16_t>>(config);
  f->cache->set_stream(g_stream);

  f->dense_k = Device<fp16_t>(f->dense_elems_per_replica() * f->replicas);
  f->dense_v = Device<fp16_t>(f->dense_elems_per_replica() * f->replicas);
  const std::size_t row = static_cast<std::size_t>(m.kv_heads) * m.dim;
  Device<fp16_t> token_k(len * row), token_v(len * row);
  f->ids.resize(f->replicas);
  for (int r = 0; r < f->replicas; ++r) {
    for (int b = 0; b < shape.batch; ++b) {
      const packkv::SeqId id = static_cast<packkv::SeqId>(r) * shape.batch + b;
      f->ids[r].push_back(id);
      f->cache->add_sequence(id);
      check(packkv::bench::fill_random(token_k.get(), len * row, 2 * id + 1, 2.0f, g_stream), "fill K");
      check(packkv::bench::fill_random(token_v.get(), len * row, 2 * id + 2, 0.7f, g_stream), "fill V");
      f->cache->append(id, 0, token_k.get(), token_v.get(), static_cast<int>(len));
      const std::size_t at = (static_cast<std::size_t>(r) * shape.batch + b) * row * len;
      check(packkv::bench::token_major_to_head_major(token_k.get(), f->dense_k.get() + at, len, m.kv_heads, m.dim,
                                                     g_stream),
            "head-major K");
      check(packkv::bench::token_major_to_head_major(token_v.get(), f->dense_v.get() + at, len, m.kv_heads, m.dim,
                                                     g_stream),
            "head-major V");
    }
  }
  const packkv::MemoryStats stats = f->cache->memory_stats();  // waits for the encoding to finish
  f->packed_bytes_per_replica = (stats.total.total() - stats.total.block_tables) / f->replicas;

  const int group = m.q_heads / m.kv_heads;
  f->q = Device<fp16_t>(static_cast<std::size_t>(shape.batch) * m.q_heads * m.dim);
  f->out = Device<fp16_t>(f->q.size());
  f->q32 = Device<float>(static_cast<std::size_t>(m.q_heads) * m.dim);
  f->scores = Device<float>(static_cast<std::size_t>(shape.batch) * m.q_heads * len);
  f->weights = Device<float>(static_cast<std::size_t>(m.q_heads) * len);
  f->weights16 = Device<fp16_t>(static_cast<std::size_t>(shape.batch) * m.kv_heads * group * len);
  f->av_out = Device<float>(static_cast<std::size_t>(shape.batch) * m.q_heads * m.dim);
  check(packkv::bench::fill_random(f->q.get(), f->q.size(), 99, 1.0f, g_stream), "fill q");
  check(packkv::bench::fill_random(f->q32.get(), f->q32.size(), 98, 1.0f, g_stream), "fill q32");
  check(packkv::bench::fill_random(f->weights.get(), f->weights.size(), 97, 1.0f / len, g_stream), "fill weights");
  check(packkv::bench::fill_random(f->weights16.get(), f->weights16.size(), 96, 1.0f / len, g_stream),
        "fill weights16");
  const int base_ctas = shape.batch * m.kv_heads;
  f->dense_splits = static_cast<int>(
      std::clamp<std::int64_t>((2 * g_sm_count + base_ctas - 1) / base_ctas, 1, std::max<std::int64_t>(1, len / 256)));
  f->partials = Device<float>(static_cast<std::size_t>(shape.batch) * m.q_heads * f->dense_splits * (m.dim + 2));
  check(cudaStreamSynchronize(g_stream), "fixture setup");
  g_fixture = std::move(f);
  return *g_fixture;
}

/// Times `op(replica)` with CUDA events, rotating replicas, and reports the counters.
template <class Op>
void run_timed(benchmark::State& state, const std::string& shape_label, const std::string& op_name, int replicas,
               double fp16_bytes, double packed_bytes, Op&& op) {
  cudaEvent_t start, stop;
  check(cudaEventCreate(&start), "cudaEventCreate");
  check(cudaEventCreate(&stop), "cudaEventCreate");
  int replica = 0;
  op(replica);  // warm-up: first-launch costs (module load, attribute setting) stay out
  double total_seconds = 0;
  std::int64_t iterations = 0;
  for (auto _ : state) {
    replica = (replica + 1) % replicas;
    check(cudaEventRecord(start, g_stream), "cudaEventRecord");
    op(replica);
    check(cudaEventRecord(stop, g_stream), "cudaEventRecord");
    check(cudaEventSynchronize(stop), "cudaEventSynchronize");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
    state.SetIterationTime(ms / 1e3);
    total_seconds += ms / 1e3;
    ++iterations;
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  const double seconds = total_seconds / std::max<std::int64_t>(iterations, 1);
  Result r;
  r.microseconds = seconds * 1e6;
  r.fp16_gbps = fp16_bytes / seconds / 1e9;
  r.packed_gbps = packed_bytes > 0 ? packed_bytes / seconds / 1e9 : 0;
  state.counters["fp16_GBps"] = r.fp16_gbps;
  if (packed_bytes > 0) {
    state.counters["packed_GBps"] = r.packed_gbps;
    if (g_copy_gbps > 0) state.counters["pct_copy"] = 100.0 * r.packed_gbps / g_copy_gbps;
  }
  g_results[{shape_label, op_name}] = r;
  for (const char* dense : {"kq_cublas", "av_cublas", "attention_dense"}) {
    const std::string family = op_name.substr(0, 2);
    if (std::string(dense).substr(0, 2) != family) continue;
    auto it = g_results.find({shape_label, dense});
    if (it != g_results.end() && op_name != dense) state.counters["speedup"] = it->second.microseconds / r.microseconds;
  }
}

void bench_copy(benchmark::State& state) {
  const std::size_t bytes = std::size_t{1} << 30;
  Device<std::uint8_t> a(bytes), b(bytes);
  check(cudaMemsetAsync(a.get(), 1, bytes, g_stream), "memset");
  run_timed(state, "copy", "copy", 1, 2.0 * bytes, 0,
            [&](int) { check(cudaMemcpyAsync(b.get(), a.get(), bytes, cudaMemcpyDeviceToDevice, g_stream), "copy"); });
  g_copy_gbps = g_results[{"copy", "copy"}].fp16_gbps;
  state.counters["copy_GBps"] = g_copy_gbps;
}

void bench_encode(benchmark::State& state, Model m, std::int64_t len) {
  packkv::CacheConfig config;
  config.num_kv_heads = m.kv_heads;
  config.num_q_heads = m.q_heads;
  config.head_dim = m.dim;
  config.block_tokens = kBlockTokens;
  config.device = packkv::Device::cuda;
  packkv::PackedKVCache<fp16_t> cache(config);
  cache.set_stream(g_stream);
  const std::size_t n = static_cast<std::size_t>(len) * m.kv_heads * m.dim;
  Device<fp16_t> k(n), v(n);
  check(packkv::bench::fill_random(k.get(), n, 5, 2.0f, g_stream), "fill");
  check(packkv::bench::fill_random(v.get(), n, 6, 0.7f, g_stream), "fill");
  packkv::SeqId next = 0;
  cache.add_sequence(next);
  const Shape shape{m, len, 1};
  run_timed(state, shape.label(), "encode", 1, 2.0 * n * sizeof(fp16_t), 0, [&](int) {
    cache.remove_sequence(next);
    cache.add_sequence(++next);
    cache.append(next, 0, k.get(), v.get(), static_cast<int>(len));
  });
}

enum class Op { kq_cublas, kq_packed, kq_unfused, av_cublas, av_packed, attention_dense, attention_packed };
const char* op_name(Op op) {
  switch (op) {
    case Op::kq_cublas:
      return "kq_cublas";
    case Op::kq_packed:
      return "kq_packed";
    case Op::kq_unfused:
      return "kq_unfused";
    case Op::av_cublas:
      return "av_cublas";
    case Op::av_packed:
      return "av_packed";
    case Op::attention_dense:
      return "attention_dense";
    case Op::attention_packed:
      return "attention_packed";
  }
  return "?";
}

void bench_op(benchmark::State& state, Shape shape, Op op) {
  try {
    Fixture& f = fixture_for(shape);
    const Model& m = shape.model;
    const std::int64_t len = shape.context;
    const int group = m.q_heads / m.kv_heads;
    const double half_dense = static_cast<double>(f.dense_elems_per_replica()) * sizeof(fp16_t);
    const double half_packed = 0.5 * static_cast<double>(f.packed_bytes_per_replica);
    const float one = 1.0f, zero = 0.0f;
    const std::string label = shape.label();
    switch (op) {
      case Op::kq_cublas:
        run_timed(state, label, op_name(op), f.replicas, half_dense, 0, [&](int r) {
          check(cublasGemmStridedBatchedEx(g_cublas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(len), group, m.dim,
                                           &one, f.dense_k.get() + r * f.dense_elems_per_replica(), CUDA_R_16F, m.dim,
                                           len * m.dim, f.q.get(), CUDA_R_16F, m.dim,
                                           static_cast<long long>(group) * m.dim, &zero, f.scores.get(), CUDA_R_32F,
                                           static_cast<int>(len), static_cast<long long>(group) * len,
                                           shape.batch * m.kv_heads, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                "cuBLAS K.q");
        });
        break;
      case Op::kq_packed:
        run_timed(state, label, op_name(op), f.replicas, half_dense, half_packed, [&](int r) {
          for (int b = 0; b < shape.batch; ++b) {
            f.cache->scores(f.ids[r][b], 0, f.q.get() + static_cast<std::size_t>(b) * m.q_heads * m.dim,
                            f.scores.get() + static_cast<std::size_t>(b) * m.q_heads * len);
          }
        });
        break;
      case Op::kq_unfused: {
        const std::size_t row = static_cast<std::size_t>(m.kv_heads) * m.dim;
        if (f.unpacked_k.size() < len * row) {
          f.unpacked_k = Device<float>(len * row);
          f.unpacked_v = Device<float>(len * row);
        }
        run_timed(state, label, op_name(op), f.replicas, half_dense, half_packed, [&](int r) {
          for (int b = 0; b < shape.batch; ++b) {
            f.cache->read_back(f.ids[r][b], 0, f.unpacked_k.get(), f.unpacked_v.get());
            check(cublasGemmStridedBatchedEx(g_cublas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(len), group, m.dim,
                                             &one, f.unpacked_k.get(), CUDA_R_32F, static_cast<int>(row), m.dim,
                                             f.q32.get(), CUDA_R_32F, m.dim, static_cast<long long>(group) * m.dim,
                                             &zero, f.scores.get() + static_cast<std::size_t>(b) * m.q_heads * len,
                                             CUDA_R_32F, static_cast<int>(len), static_cast<long long>(group) * len,
                                             m.kv_heads, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                  "cuBLAS K.q on read-back");
          }
        });
        break;
      }
      case Op::av_cublas:
        run_timed(state, label, op_name(op), f.replicas, half_dense, 0, [&](int r) {
          check(cublasGemmStridedBatchedEx(g_cublas, CUBLAS_OP_N, CUBLAS_OP_N, m.dim, group, static_cast<int>(len),
                                           &one, f.dense_v.get() + r * f.dense_elems_per_replica(), CUDA_R_16F, m.dim,
                                           len * m.dim, f.weights16.get(), CUDA_R_16F, static_cast<int>(len),
                                           static_cast<long long>(group) * len, &zero, f.av_out.get(), CUDA_R_32F,
                                           m.dim, static_cast<long long>(group) * m.dim, shape.batch * m.kv_heads,
                                           CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                "cuBLAS attn.V");
        });
        break;
      case Op::av_packed:
        run_timed(state, label, op_name(op), f.replicas, half_dense, half_packed, [&](int r) {
          for (int b = 0; b < shape.batch; ++b) {
            f.cache->attn_v(f.ids[r][b], 0, f.weights.get(),
                            f.av_out.get() + static_cast<std::size_t>(b) * m.q_heads * m.dim);
          }
        });
        break;
      case Op::attention_dense:
        run_timed(state, label, op_name(op), f.replicas, 2 * half_dense, 0, [&](int r) {
          packkv::bench::DenseAttentionArgs a{};
          a.k = f.dense_k.get() + r * f.dense_elems_per_replica();
          a.v = f.dense_v.get() + r * f.dense_elems_per_replica();
          a.q = f.q.get();
          a.out = f.out.get();
          a.partials = f.partials.get();
          a.batch = shape.batch;
          a.kv_heads = m.kv_heads;
          a.q_heads = m.q_heads;
          a.dim = m.dim;
          a.len = len;
          a.splits = f.dense_splits;
          a.scale = 1.0f / std::sqrt(static_cast<float>(m.dim));
          check(packkv::bench::dense_attention(a, g_stream), "dense attention");
        });
        break;
      case Op::attention_packed:
        run_timed(state, label, op_name(op), f.replicas, 2 * half_dense, 2 * half_packed, [&](int r) {
          f.cache->attention(f.ids[r], 0, f.q.get(), f.out.get(), 1.0f / std::sqrt(static_cast<float>(m.dim)));
        });
        break;
    }
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

void print_summary() {
  std::printf("\n== packkv CUDA results (copy %.0f GB/s) ==\n", g_copy_gbps);
  std::printf("%-24s %9s %9s %9s %9s %9s %9s %8s\n", "shape", "Kq_us", "Kq_x", "AV_us", "AV_x", "attn_us", "attn_x",
              "attn_%cp");
  for (const Model& m : kModels) {
    for (std::int64_t ctx : kContexts) {
      for (int batch : kBatches) {
        const std::string label = Shape{m, ctx, batch}.label();
        auto get = [&](const char* op) {
          auto it = g_results.find({label, op});
          return it == g_results.end() ? Result{} : it->second;
        };
        const Result kq = get("kq_packed"), kqd = get("kq_cublas"), av = get("av_packed"), avd = get("av_cublas"),
                     at = get("attention_packed"), atd = get("attention_dense");
        if (at.microseconds == 0) continue;
        auto ratio = [](const Result& dense, const Result& packed) {
          return packed.microseconds > 0 ? dense.microseconds / packed.microseconds : 0.0;
        };
        std::printf("%-24s %9.1f %9.2f %9.1f %9.2f %9.1f %9.2f %8.0f\n", label.c_str(), kq.microseconds, ratio(kqd, kq),
                    av.microseconds, ratio(avd, av), at.microseconds, ratio(atd, at),
                    g_copy_gbps > 0 ? 100.0 * at.packed_gbps / g_copy_gbps : 0.0);
      }
    }
  }
  for (const Model& m : kModels) {
    const std::string label = Shape{m, 32768, 1}.label();
    auto it = g_results.find({label, "encode"});
    if (it != g_results.end())
      std::printf("encode %-17s %9.1f us  %7.1f GB/s of fp16 input\n", label.c_str(), it->second.microseconds,
                  it->second.fp16_gbps);
  }
  std::printf("(x: dense time / packed time; Kq and AV vs cuBLAS fp16, attn vs dense fp16 flash-decoding)\n");
}

}  // namespace

int main(int argc, char** argv) {
  std::string why;
  if (!packkv::cuda::device_available(&why)) {
    std::printf("packkv CUDA benchmark: nothing measured (%s)\n", why.c_str());
    return 0;
  }
  check(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking), "cudaStreamCreate");
  check(cublasCreate(&g_cublas), "cublasCreate");
  check(cublasSetStream(g_cublas, g_stream), "cublasSetStream");
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&g_sm_count, cudaDevAttrMultiProcessorCount, device), "SM count");

  auto configure = [](benchmark::internal::Benchmark* b) {
    b->UseManualTime()->Unit(benchmark::kMicrosecond)->MinTime(0.05);
  };
  configure(benchmark::RegisterBenchmark("copy/1GiB", bench_copy));
  for (const Model& m : kModels) {
    configure(benchmark::RegisterBenchmark((std::string("encode/") + m.name + "/ctx32K").c_str(),
                                           [m](benchmark::State& s) { bench_encode(s, m, 32768); }));
  }
  // Dense ops first within a shape, so the packed ops can report their speed-up.
  const Op order[] = {Op::kq_cublas,  Op::av_cublas, Op::attention_dense, Op::kq_packed,
                      Op::kq_unfused, Op::av_packed, Op::attention_packed};
  for (const Model& m : kModels) {
    for (std::int64_t ctx : kContexts) {
      for (int batch : kBatches) {
        const Shape shape{m, ctx, batch};
        for (Op op : order) {
          if (op == Op::kq_unfused && batch > 8) continue;  // a read-back per sequence: slow and not the point
          configure(benchmark::RegisterBenchmark((std::string(op_name(op)) + "/" + shape.label()).c_str(),
                                                 [shape, op](benchmark::State& s) { bench_op(s, shape, op); }));
        }
      }
    }
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  g_fixture.reset();
  print_summary();
  benchmark::Shutdown();
  cublasDestroy(g_cublas);
  cudaStreamDestroy(g_stream);
  return 0;
}

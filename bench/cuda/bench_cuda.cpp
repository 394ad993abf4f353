// CUDA benchmark: packed K.q, attn.V, decode attention, block-fill encoding and a decode step with
// block fills, each against dense fp16 baselines measured in the same run: a split-K
// flash-decoding kernel (bench_kernels.cu), cuBLAS strided-batched GEMMs batched over sequences
// and KV heads, and an unfused cuBLAS attention (GEMM, softmax, GEMM). A device-to-device copy
// gives the bandwidth ceiling. (PyTorch's SDPA is the other dense peer: sdpa_peer.py beside this
// file, run separately with the same shapes and timing.)
//
// Not yet run on a GPU: this builds without one and was checked by reading. Everything it times is
// first compared with a float64 host reference (baselines that disagree are reported FAILED).
//
// Method (docs/performance.md, "CUDA benchmark"):
// - Each case enqueues N operations between two CUDA events (N chosen so that one sample lasts
//   >= 2 ms), takes up to 7 such samples and reports their median and minimum, per operation.
// - Operation i uses replica i % R of its data, where R is chosen from the bytes that operation
//   reads (packed bytes for packed cases) so that at least max(512 MiB, 8 x L2) is read between
//   two uses of one replica: the L2 cache never holds what the next use needs.
// - Bytes: "GB/s" counts the bytes an operation actually reads (packed blocks, tables and tail
//   for the packed cases; the fp16 K and/or V for dense ones); "fp16-eq GB/s" counts what a dense
//   fp16 cache of the same tokens would read, for every case.
// - An exception or CUDA error in one case is reported (SkipWithError and a FAILED row in the
//   summary) and the run goes on. The summary table follows the line "== packkv CUDA results".
#include <benchmark/benchmark.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "bench_kernels.hpp"
#include "packkv/cache.hpp"
#include "packkv/codec.hpp"
#include "packkv/cuda/device_codec.hpp"

namespace {

using packkv::fp16_t;
using packkv::SeqId;

// ---- run-wide settings ----
constexpr double kSampleSeconds = 2e-3;     // one event pair spans at least this
constexpr int kMaxSamples = 7;
constexpr int kMinSamples = 3;
constexpr double kCaseSeconds = 1.5;        // a case stops adding samples after this much measured time
constexpr int kMaxOpsPerSample = 100000;
constexpr std::size_t kMiB = std::size_t{1} << 20;
constexpr std::size_t kMinRotationBytes = 512 * kMiB;
constexpr double kMemoryCapBytes = 40e9;    // the whole run stays under this on the device
constexpr int kBlockTokens = 64;
constexpr int kStepLayers = 4;
constexpr int kStepSamples = 3;             // decode-step samples: each covers 64 steps per replica
constexpr double kBaselineTolerance = 1e-2; // relative error above which a baseline is FAILED

struct Model {
  const char* name;
  int q_heads, kv_heads, dim;
};
constexpr Model kLlama3_8b{"llama3-8b", 32, 8, 128};

struct Shape {
  Model model;
  std::int64_t context;
  int batch;
  std::string label() const {
    return std::string(model.name) + "/ctx" + std::to_string(context) + "/b" + std::to_string(batch);
  }
  bool operator==(const Shape& o) const {
    return model.dim == o.model.dim && model.q_heads == o.model.q_heads && model.kv_heads == o.model.kv_heads &&
           context == o.context && batch == o.batch;
  }
  int group() const { return model.q_heads / model.kv_heads; }
  std::size_t row_elems() const { return static_cast<std::size_t>(model.kv_heads) * model.dim; }
  /// Bytes of K (or of V) of the whole batch in fp16.
  double side_bytes() const {
    return static_cast<double>(batch) * static_cast<double>(context) * static_cast<double>(row_elems()) * 2.0;
  }
};

void check(cudaError_t status, const std::string& what) {
  if (status != cudaSuccess) throw std::runtime_error(what + ": " + cudaGetErrorString(status));
}
void check(cublasStatus_t status, const std::string& what) {
  if (status != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error(what + ": cuBLAS status " + std::to_string(static_cast<int>(status)));
}

std::string mib(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.0f MiB", bytes / static_cast<double>(kMiB));
  return buf;
}

/// cudaMalloc'd memory, freed on destruction.
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t n) : n_(n) {
    const std::size_t bytes = std::max<std::size_t>(n, 1) * sizeof(T);
    const cudaError_t status = cudaMalloc(&p_, bytes);
    if (status != cudaSuccess) {
      p_ = nullptr;
      cudaGetLastError();
      throw std::runtime_error("cudaMalloc of " + mib(static_cast<double>(bytes)) + ": " + cudaGetErrorString(status));
    }
  }
  ~DeviceBuffer() {
    if (p_) cudaFree(p_);
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  T* get() const { return static_cast<T*>(p_); }
  std::size_t size() const { return n_; }
  double bytes() const { return static_cast<double>(n_) * sizeof(T); }

 private:
  void* p_ = nullptr;
  std::size_t n_ = 0;
};

// ---- device-wide state ----
cudaStream_t g_stream = nullptr;
cublasHandle_t g_cublas = nullptr;
int g_sm_count = 1;
int g_dense_ctas_per_sm = 1;
double g_rotation_bytes = static_cast<double>(kMinRotationBytes);
double g_copy_gbps = 0;
std::string g_device_name = "?";

/// Refuses an allocation plan the memory cap or the free device memory cannot hold.
void ensure_fits(double bytes, const std::string& what) {
  if (bytes > kMemoryCapBytes)
    throw std::runtime_error(what + " needs " + mib(bytes) + ", above the run's cap of " + mib(kMemoryCapBytes));
  std::size_t free_bytes = 0, total_bytes = 0;
  check(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
  if (bytes + 1e9 > static_cast<double>(free_bytes))
    throw std::runtime_error("out of memory: " + what + " needs " + mib(bytes) + ", " +
                             mib(static_cast<double>(free_bytes)) + " free");
}

/// Replicas needed so that `bytes_per_replica` read per operation rotate past the L2.
int replicas_for(double bytes_per_replica, int available) {
  const double needed = std::ceil(g_rotation_bytes / std::max(bytes_per_replica, 1.0));
  return static_cast<int>(std::clamp(needed, 1.0, static_cast<double>(std::max(available, 1))));
}

// ---- results ----
struct Record {
  std::string name, op, impl, shape;
  bool failed = false;
  std::string message;
  double median_s = 0, min_s = 0;
  int per_sample = 0, samples = 0;
  double bytes_read = 0;   // per operation, actually read
  double dense_bytes = 0;  // per operation, what a dense fp16 cache of the same tokens reads
  double ratio = 0;        // compression ratio against fp16, every byte counted (packed cases)
  double error = -1;       // relative error against the float64 host reference (-1: not checked)
  double rotation = 0;     // bytes read in one cycle through the replicas (each is used once a cycle)
  std::string note;
};
std::vector<Record> g_records;

const Record* find_record(const std::string& op, const std::string& impl, const std::string& shape) {
  for (const Record& r : g_records)
    if (r.op == op && r.impl == impl && r.shape == shape && !r.failed) return &r;
  return nullptr;
}

// ---- timing ----
class Events {
 public:
  Events() {
    check(cudaEventCreate(&start_), "cudaEventCreate");
    const cudaError_t status = cudaEventCreate(&stop_);
    if (status != cudaSuccess) {
      cudaEventDestroy(start_);
      check(status, "cudaEventCreate");
    }
  }
  ~Events() {
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
  }
  Events(const Events&) = delete;
  Events& operator=(const Events&) = delete;
  /// Seconds of device time for enqueue(), bracketed by the two events on g_stream.
  template <class F>
  double measure(F&& enqueue) {
    check(cudaEventRecord(start_, g_stream), "cudaEventRecord");
    enqueue();
    check(cudaEventRecord(stop_, g_stream), "cudaEventRecord");
    check(cudaEventSynchronize(stop_), "cudaEventSynchronize (an operation failed on the device)");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, start_, stop_), "cudaEventElapsedTime");
    return ms * 1e-3;
  }

 private:
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

struct TimingPlan {
  int per_sample = 0;  // 0: calibrate to kSampleSeconds
  int max_samples = kMaxSamples;
  int min_samples = kMinSamples;
  double case_seconds = kCaseSeconds;
};

/// op(i) enqueues operation number i (it picks its replica from i). One warm-up operation first;
/// `after_warmup` (if set) runs once it has completed, e.g. to check the output.
void time_op(Record& rec, const std::function<void(std::int64_t)>& op, const TimingPlan& plan = {},
             const std::function<void()>& after_warmup = {}) {
  Events events;
  std::int64_t next = 0;
  op(next++);
  check(cudaStreamSynchronize(g_stream), "warm-up");
  if (after_warmup) after_warmup();
  auto run = [&](int n) {
    return events.measure([&] {
      for (int j = 0; j < n; ++j) op(next++);
    });
  };
  int n = plan.per_sample;
  if (n <= 0) {
    n = 1;
    for (int round = 0; round < 3; ++round) {
      const double t = run(n);
      if (t >= kSampleSeconds || n >= kMaxOpsPerSample) break;
      const double per_op = std::max(t / n, 1e-8);
      n = static_cast<int>(std::clamp(std::ceil(1.2 * kSampleSeconds / per_op), static_cast<double>(n + 1),
                                      static_cast<double>(kMaxOpsPerSample)));
    }
  }
  std::vector<double> per_op;
  double measured = 0;
  for (int s = 0; s < plan.max_samples; ++s) {
    const double t = run(n);
    per_op.push_back(t / n);
    measured += t;
    if (s + 1 >= plan.min_samples && measured > plan.case_seconds) break;
  }
  std::vector<double> sorted = per_op;
  std::sort(sorted.begin(), sorted.end());
  const std::size_t m = sorted.size();
  rec.median_s = m % 2 ? sorted[m / 2] : 0.5 * (sorted[m / 2 - 1] + sorted[m / 2]);
  rec.min_s = sorted.front();
  rec.per_sample = n;
  rec.samples = static_cast<int>(m);
}

/// Runs one case: `body` fills the record; any exception becomes a FAILED row and a skipped
/// benchmark, and the run goes on.
void run_case(benchmark::State& state, Record rec, const std::function<void(Record&)>& body,
              const std::function<void()>& on_failure) {
  try {
    body(rec);
  } catch (const std::exception& e) {
    rec.failed = true;
    rec.message = e.what();
  }
  if (rec.failed) {
    cudaGetLastError();  // clear a non-sticky error; a sticky one fails every later case too
    const cudaError_t sticky = cudaDeviceSynchronize();
    if (sticky != cudaSuccess) rec.message += std::string(" [device: ") + cudaGetErrorString(sticky) + "]";
    if (on_failure) on_failure();
    g_records.push_back(rec);
    state.SkipWithError(rec.message.c_str());
    return;
  }
  g_records.push_back(rec);
  const Record& r = g_records.back();
  for (auto _ : state) state.SetIterationTime(r.median_s);
  const double gbps = r.bytes_read / r.median_s / 1e9;
  state.counters["GBps"] = gbps;
  state.counters["fp16eq_GBps"] = r.dense_bytes / r.median_s / 1e9;
  if (g_copy_gbps > 0) state.counters["pct_copy"] = 100.0 * gbps / g_copy_gbps;
  state.counters["min_us"] = r.min_s * 1e6;
  state.counters["ops_per_sample"] = r.per_sample;
  if (r.ratio > 0) state.counters["ratio"] = r.ratio;
  if (r.error >= 0) state.counters["rel_err"] = r.error;
  if (const Record* d = find_record(r.op, "dense", r.shape); d && r.impl != "dense")
    state.counters["vs_dense"] = d->median_s / r.median_s;
  if (const Record* c = find_record(r.op, "cublas", r.shape); c && r.impl != "cublas")
    state.counters["vs_cublas"] = c->median_s / r.median_s;
  if (!r.note.empty()) state.SetLabel(r.note);
}

// ---- data ----
packkv::CacheConfig cache_config(const Model& m, int layers) {
  packkv::CacheConfig config;
  config.num_layers = layers;
  config.num_kv_heads = m.kv_heads;
  config.num_q_heads = m.q_heads;
  config.head_dim = m.dim;
  config.block_tokens = kBlockTokens;
  config.k_rel = 0.1f;
  config.v_rel = 0.2f;
  config.repack = packkv::RepackMethod::median;
  config.device = packkv::Device::cuda;
  return config;
}

/// The K and V of sequence `id` (token-major, [len][kv_heads][dim]), generated on the device.
void generate_sequence(fp16_t* k, fp16_t* v, std::size_t elems, std::uint64_t id) {
  check(packkv::bench::fill_random(k, elems, 2 * id + 1, 2.0f, g_stream), "fill K");
  check(packkv::bench::fill_random(v, elems, 2 * id + 2, 0.7f, g_stream), "fill V");
}

template <class T>
std::vector<T> download(const T* device, std::size_t n) {
  std::vector<T> host(n);
  check(cudaStreamSynchronize(g_stream), "synchronize before download");
  check(cudaMemcpy(host.data(), device, n * sizeof(T), cudaMemcpyDeviceToHost), "download");
  return host;
}

double to_double(fp16_t h) { return static_cast<double>(packkv::to_float(h)); }
double to_double(float f) { return static_cast<double>(f); }

template <class T>
double relative_error(const std::vector<T>& got, const std::vector<double>& ref) {
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double g = to_double(got[i]);
    if (!std::isfinite(g)) return std::numeric_limits<double>::infinity();
    diff += (g - ref[i]) * (g - ref[i]);
    norm += ref[i] * ref[i];
  }
  return std::sqrt(diff / std::max(norm, 1e-300));
}

/// Float64 results for one sequence, from its token-major K and V.
struct Reference {
  int batch_index = 0;
  std::vector<double> scores;     // [q_heads][len], K.q without scale
  std::vector<double> attention;  // [q_heads][dim]
  std::vector<double> attn_v;     // [q_heads][dim], with the benchmark's fp32 weights
};

Reference host_reference(const Shape& s, int batch_index, const std::vector<fp16_t>& k, const std::vector<fp16_t>& v,
                         const std::vector<fp16_t>& q_all, const std::vector<float>& weights, float scale) {
  const Model& m = s.model;
  const std::int64_t len = s.context;
  Reference r;
  r.batch_index = batch_index;
  r.scores.assign(static_cast<std::size_t>(m.q_heads) * len, 0.0);
  r.attention.assign(static_cast<std::size_t>(m.q_heads) * m.dim, 0.0);
  r.attn_v.assign(r.attention.size(), 0.0);
  std::vector<float> kf(k.size()), vf(v.size());
  for (std::size_t i = 0; i < k.size(); ++i) kf[i] = packkv::to_float(k[i]);
  for (std::size_t i = 0; i < v.size(); ++i) vf[i] = packkv::to_float(v[i]);
#pragma omp parallel for schedule(dynamic)
  for (int h = 0; h < m.q_heads; ++h) {
    const int kvh = h / s.group();
    const fp16_t* qh = q_all.data() + (static_cast<std::size_t>(batch_index) * m.q_heads + h) * m.dim;
    std::vector<double> qd(m.dim);
    for (int c = 0; c < m.dim; ++c) qd[c] = to_double(qh[c]);
    double* sc = r.scores.data() + static_cast<std::size_t>(h) * len;
    double mx = -INFINITY;
    for (std::int64_t t = 0; t < len; ++t) {
      const float* kt = kf.data() + (static_cast<std::size_t>(t) * m.kv_heads + kvh) * m.dim;
      double dot = 0;
      for (int c = 0; c < m.dim; ++c) dot += qd[c] * kt[c];
      sc[t] = dot;
      mx = std::max(mx, scale * dot);
    }
    double total = 0;
    std::vector<double> acc(m.dim, 0.0), av(m.dim, 0.0);
    const float* wh = weights.data() + static_cast<std::size_t>(h) * len;
    for (std::int64_t t = 0; t < len; ++t) {
      const double p = std::exp(scale * sc[t] - mx);
      total += p;
      const float* vt = vf.data() + (static_cast<std::size_t>(t) * m.kv_heads + kvh) * m.dim;
      for (int c = 0; c < m.dim; ++c) {
        acc[c] += p * vt[c];
        av[c] += static_cast<double>(wh[t]) * vt[c];
      }
    }
    for (int c = 0; c < m.dim; ++c) {
      r.attention[static_cast<std::size_t>(h) * m.dim + c] = acc[c] / total;
      r.attn_v[static_cast<std::size_t>(h) * m.dim + c] = av[c];
    }
  }
  return r;
}

// ---- the attention fixture: one shape, packed and dense copies of the same sequences ----
struct AttnFixture {
  Shape shape;
  std::unique_ptr<packkv::PackedKVCache<fp16_t>> cache;
  std::vector<std::vector<SeqId>> ids;  // [replica][batch]
  int packed_replicas = 1;
  double packed_total = 0, packed_k = 0, packed_v = 0;  // bytes per replica (memory_stats / replicas)
  double ratio = 0;
  bool rotation_capped = false;

  int dense_replicas = 1;
  std::size_t dense_elems = 0;       // per replica and side: [batch][kv_heads][len][dim]
  DeviceBuffer<fp16_t> dense_k, dense_v;

  DeviceBuffer<fp16_t> q, out;        // [batch][q_heads][dim]
  DeviceBuffer<float> scores;         // [batch][q_heads][len]
  DeviceBuffer<float> weights;        // [batch][q_heads][len], the packed attn_v's weights (equal rows)
  DeviceBuffer<fp16_t> weights16;     // [batch][q_heads][len], the same weights in fp16 for cuBLAS
  DeviceBuffer<fp16_t> attn_weights;  // [batch][q_heads][len], softmax output of the cuBLAS attention
  DeviceBuffer<float> av_out;         // [batch][q_heads][dim]

  packkv::bench::DenseDecodePlan plan;
  DeviceBuffer<float> partial_acc, partial_ml;
  DeviceBuffer<unsigned> counters;

  std::vector<Reference> refs;  // replica 0: the first and the last sequence of the batch
  float scale = 1.0f;
};

std::unique_ptr<AttnFixture> g_attn;
struct StepFixture;
std::unique_ptr<StepFixture> g_step;

std::unique_ptr<AttnFixture> build_attn_fixture(const Shape& s) {
  const Model& m = s.model;
  const std::int64_t len = s.context;
  const std::size_t seq_elems = static_cast<std::size_t>(len) * s.row_elems();
  auto f = std::make_unique<AttnFixture>();
  f->shape = s;
  f->scale = 1.0f / std::sqrt(static_cast<float>(m.dim));

  // Dense replicas: enough for the op that reads least (K.q reads K only).
  f->dense_elems = static_cast<std::size_t>(s.batch) * seq_elems;
  const int dense_wanted = replicas_for(s.side_bytes(), 1 << 20);
  const double io_bytes = static_cast<double>(s.batch) * m.q_heads * len * (4.0 + 2.0 + 2.0) +
                          static_cast<double>(m.q_heads) * len * 4.0 + 4.0 * seq_elems;
  f->dense_replicas = dense_wanted;
  const double dense_budget = 0.5 * kMemoryCapBytes;
  while (f->dense_replicas > 1 && f->dense_replicas * 2.0 * s.side_bytes() > dense_budget) --f->dense_replicas;
  if (f->dense_replicas < dense_wanted) f->rotation_capped = true;
  ensure_fits(f->dense_replicas * 2.0 * s.side_bytes() + io_bytes, "dense K/V replicas of " + s.label());
  f->dense_k = DeviceBuffer<fp16_t>(f->dense_elems * f->dense_replicas);
  f->dense_v = DeviceBuffer<fp16_t>(f->dense_elems * f->dense_replicas);

  f->cache = std::make_unique<packkv::PackedKVCache<fp16_t>>(cache_config(m, 1));
  f->cache->set_stream(g_stream);
  DeviceBuffer<fp16_t> tok_k(seq_elems), tok_v(seq_elems);
  auto add_replica = [&](int r) {
    std::vector<SeqId> row;
    for (int b = 0; b < s.batch; ++b) {
      const SeqId id = static_cast<SeqId>(r) * s.batch + b;
      generate_sequence(tok_k.get(), tok_v.get(), seq_elems, id);
      f->cache->add_sequence(id);
      f->cache->append(id, 0, tok_k.get(), tok_v.get(), static_cast<int>(len));
      if (r < f->dense_replicas) {
        const std::size_t at = (static_cast<std::size_t>(r) * s.batch + b) * seq_elems;
        const std::int64_t head_stride = len * m.dim;
        check(packkv::bench::token_major_to_head_major(tok_k.get(), f->dense_k.get() + at, len, m.kv_heads, m.dim,
                                                       head_stride, g_stream),
              "head-major K");
        check(packkv::bench::token_major_to_head_major(tok_v.get(), f->dense_v.get() + at, len, m.kv_heads, m.dim,
                                                       head_stride, g_stream),
              "head-major V");
      }
      row.push_back(id);
    }
    f->ids.push_back(std::move(row));
  };
  for (int r = 0; r < f->dense_replicas; ++r) add_replica(r);
  // Packed replicas: sized from the packed bytes, for the side that is smaller.
  packkv::MemoryStats stats = f->cache->memory_stats();
  const double per_total = static_cast<double>(stats.total.total()) / f->dense_replicas;
  const double per_side = std::min(stats.total.k_bytes(), stats.total.v_bytes()) / f->dense_replicas;
  const int packed_wanted = std::max(f->dense_replicas, replicas_for(per_side, 1 << 20));
  int packed = packed_wanted;
  const double used = f->dense_replicas * 2.0 * s.side_bytes() + io_bytes;
  while (packed > f->dense_replicas && used + packed * per_total * 1.25 > kMemoryCapBytes) --packed;
  if (packed < packed_wanted) f->rotation_capped = true;
  ensure_fits((packed - f->dense_replicas) * per_total * 1.25, "packed replicas of " + s.label());
  for (int r = f->dense_replicas; r < packed; ++r) add_replica(r);
  f->packed_replicas = packed;
  stats = f->cache->memory_stats();  // waits for every encode
  f->packed_total = static_cast<double>(stats.total.total()) / packed;
  f->packed_k = stats.total.k_bytes() / packed;
  f->packed_v = stats.total.v_bytes() / packed;
  f->ratio = stats.total.ratio_vs_fp16();

  // Inputs and outputs.
  const std::size_t q_elems = static_cast<std::size_t>(s.batch) * m.q_heads * m.dim;
  const std::size_t score_elems = static_cast<std::size_t>(s.batch) * m.q_heads * len;
  const std::size_t weight_elems = static_cast<std::size_t>(m.q_heads) * len;
  f->q = DeviceBuffer<fp16_t>(q_elems);
  f->out = DeviceBuffer<fp16_t>(q_elems);
  f->scores = DeviceBuffer<float>(score_elems);
  f->weights = DeviceBuffer<float>(score_elems);
  f->weights16 = DeviceBuffer<fp16_t>(score_elems);
  f->attn_weights = DeviceBuffer<fp16_t>(score_elems);
  f->av_out = DeviceBuffer<float>(q_elems);
  check(packkv::bench::fill_random(f->q.get(), q_elems, 99, 1.0f, g_stream), "fill q");
  check(packkv::bench::fill_random(f->weights.get(), weight_elems, 97, 2.0f / static_cast<float>(len), g_stream),
        "fill weights");
  {
    // Every sequence of the batch gets the first one's weights (attn_v_batch reads [batch][q_heads][len]);
    // the fp16 weights of cuBLAS are the fp32 ones rounded.
    const std::vector<float> w = download(f->weights.get(), weight_elems);
    std::vector<fp16_t> w16(weight_elems);
    for (std::size_t i = 0; i < weight_elems; ++i) w16[i] = packkv::fp16_from_float(w[i]);
    for (int b = 0; b < s.batch; ++b) {
      check(cudaMemcpy(f->weights.get() + b * weight_elems, w.data(), weight_elems * sizeof(float),
                       cudaMemcpyHostToDevice),
            "upload weights");
      check(cudaMemcpy(f->weights16.get() + b * weight_elems, w16.data(), weight_elems * sizeof(fp16_t),
                       cudaMemcpyHostToDevice),
            "upload fp16 weights");
    }
  }

  f->plan = packkv::bench::plan_dense_decode(s.batch, m.kv_heads, len, g_sm_count, g_dense_ctas_per_sm);
  f->partial_acc = DeviceBuffer<float>(packkv::bench::dense_decode_acc_floats(s.batch, m.q_heads, f->plan.splits));
  f->partial_ml = DeviceBuffer<float>(packkv::bench::dense_decode_ml_floats(s.batch, m.q_heads, f->plan.splits));
  f->counters = DeviceBuffer<unsigned>(static_cast<std::size_t>(s.batch) * m.kv_heads);
  check(cudaMemsetAsync(f->counters.get(), 0, f->counters.bytes(), g_stream), "zero counters");

  // Float64 references for the first and last sequence of replica 0 (regenerated: same seeds).
  const std::vector<fp16_t> q_host = download(f->q.get(), q_elems);
  const std::vector<float> w_host = download(f->weights.get(), weight_elems);
  std::vector<int> checked{0};
  if (s.batch > 1) checked.push_back(s.batch - 1);
  for (int b : checked) {
    generate_sequence(tok_k.get(), tok_v.get(), seq_elems, static_cast<SeqId>(b));
    const std::vector<fp16_t> k_host = download(tok_k.get(), seq_elems), v_host = download(tok_v.get(), seq_elems);
    f->refs.push_back(host_reference(s, b, k_host, v_host, q_host, w_host, f->scale));
  }
  check(cudaStreamSynchronize(g_stream), "fixture setup");
  return f;
}

/// Fixtures whose set-up failed, with the message: the other cases of that shape fail at once
/// instead of building it again.
std::map<std::string, std::string> g_setup_failures;

template <class Build>
auto build_once(const std::string& key, Build&& build) {
  if (const auto it = g_setup_failures.find(key); it != g_setup_failures.end())
    throw std::runtime_error("set-up failed in an earlier case: " + it->second);
  try {
    return build();
  } catch (const std::exception& e) {
    g_setup_failures[key] = e.what();
    throw;
  }
}

AttnFixture& attn_fixture(const Shape& s) {
  if (g_attn && g_attn->shape == s) return *g_attn;
  g_attn.reset();
  g_step.reset();
  check(cudaDeviceSynchronize(), "fixture teardown");
  g_attn = build_once("attention/" + s.label(), [&] { return build_attn_fixture(s); });
  return *g_attn;
}

/// Worst relative error over the checked sequences; `fetch(b)` downloads sequence b's output.
template <class T>
double check_against(const AttnFixture& f, const std::function<std::vector<T>(int)>& fetch,
                     std::vector<double> Reference::*field) {
  double worst = 0;
  for (const Reference& r : f.refs) worst = std::max(worst, relative_error(fetch(r.batch_index), r.*field));
  return worst;
}

enum class Op { kq, av, attention };

void bench_attn(benchmark::State& state, std::string name, Shape s, Op op, std::string impl) {
  Record rec;
  rec.name = name;
  rec.op = op == Op::kq ? "kq" : op == Op::av ? "av" : "attention";
  rec.impl = impl;
  rec.shape = s.label();
  run_case(
      state, rec,
      [&](Record& r) {
        AttnFixture& f = attn_fixture(s);
        const Model& m = s.model;
        const std::int64_t len = s.context;
        const int group = s.group();
        const int gemm_batch = s.batch * m.kv_heads;
        const float one = 1.0f, zero = 0.0f;
        const std::size_t q_stride = static_cast<std::size_t>(m.q_heads) * m.dim;
        const std::size_t score_stride = static_cast<std::size_t>(m.q_heads) * len;
        const bool packed = impl == "packed";
        r.ratio = packed ? f.ratio : 0;

        // Bytes per operation and the rotation they need.
        double dense = op == Op::attention ? 2 * s.side_bytes() : s.side_bytes();
        double read = dense;
        int replicas = 1;
        if (packed) {
          read = op == Op::kq ? f.packed_k : op == Op::av ? f.packed_v : f.packed_total;
          replicas = replicas_for(read, f.packed_replicas);
        } else {
          replicas = replicas_for(dense, f.dense_replicas);
        }
        r.bytes_read = read;
        r.dense_bytes = dense;
        r.rotation = read * replicas;
        auto add_note = [&](const std::string& text) { r.note += (r.note.empty() ? "" : "; ") + text; };
        if (f.rotation_capped && r.rotation < g_rotation_bytes) add_note("rotation capped by memory");
        auto dense_k = [&](int rep) { return f.dense_k.get() + rep * f.dense_elems; };
        auto dense_v = [&](int rep) { return f.dense_v.get() + rep * f.dense_elems; };

        auto kq_gemm = [&](int rep) {
          check(cublasGemmStridedBatchedEx(g_cublas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(len), group, m.dim, &one,
                                           dense_k(rep), CUDA_R_16F, m.dim, len * m.dim, f.q.get(), CUDA_R_16F, m.dim,
                                           static_cast<long long>(group) * m.dim, &zero, f.scores.get(), CUDA_R_32F,
                                           static_cast<int>(len), static_cast<long long>(group) * len, gemm_batch,
                                           CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                "cuBLAS K.q");
        };
        std::function<void(std::int64_t)> body;
        std::function<void()> verify;
        switch (op) {
          case Op::kq:
            if (impl == "cublas") {
              body = [&](std::int64_t i) { kq_gemm(static_cast<int>(i % replicas)); };
            } else {
              add_note("one scores_batch() call");
              body = [&](std::int64_t i) {
                f.cache->scores_batch(f.ids[static_cast<std::size_t>(i % replicas)], 0, f.q.get(), f.scores.get());
              };
            }
            verify = [&] {
              r.error = check_against<float>(
                  f, [&](int b) { return download(f.scores.get() + b * score_stride, score_stride); },
                  &Reference::scores);
            };
            break;
          case Op::av:
            if (impl == "cublas") {
              body = [&](std::int64_t i) {
                check(cublasGemmStridedBatchedEx(
                          g_cublas, CUBLAS_OP_N, CUBLAS_OP_N, m.dim, group, static_cast<int>(len), &one,
                          dense_v(static_cast<int>(i % replicas)), CUDA_R_16F, m.dim, len * m.dim, f.weights16.get(),
                          CUDA_R_16F, static_cast<int>(len), static_cast<long long>(group) * len, &zero, f.av_out.get(),
                          CUDA_R_32F, m.dim, static_cast<long long>(group) * m.dim, gemm_batch, CUBLAS_COMPUTE_32F,
                          CUBLAS_GEMM_DEFAULT),
                      "cuBLAS attn.V");
              };
            } else {
              add_note("one attn_v_batch() call");
              body = [&](std::int64_t i) {
                f.cache->attn_v_batch(f.ids[static_cast<std::size_t>(i % replicas)], 0, f.weights.get(), f.av_out.get());
              };
            }
            verify = [&] {
              r.error = check_against<float>(
                  f, [&](int b) { return download(f.av_out.get() + b * q_stride, q_stride); }, &Reference::attn_v);
            };
            break;
          case Op::attention:
            if (impl == "dense") {
              body = [&](std::int64_t i) {
                const int rep = static_cast<int>(i % replicas);
                packkv::bench::DenseDecodeArgs a;
                a.k = dense_k(rep);
                a.v = dense_v(rep);
                a.head_stride = len * m.dim;
                a.q = f.q.get();
                a.out = f.out.get();
                a.partial_acc = f.partial_acc.get();
                a.partial_ml = f.partial_ml.get();
                a.counters = f.counters.get();
                a.batch = s.batch;
                a.kv_heads = m.kv_heads;
                a.q_heads = m.q_heads;
                a.len = len;
                a.splits = f.plan.splits;
                a.tokens_per_split = f.plan.tokens_per_split;
                a.scale = f.scale;
                check(packkv::bench::dense_decode_attention(a, g_stream), "dense decode attention");
              };
              add_note(std::to_string(f.plan.splits) + " splits x " + std::to_string(f.plan.tokens_per_split) +
                       " tokens, " + std::to_string(f.plan.ctas_per_sm) + " CTAs/SM");
            } else if (impl == "cublas") {
              body = [&](std::int64_t i) {
                const int rep = static_cast<int>(i % replicas);
                kq_gemm(rep);
                check(packkv::bench::softmax_rows(f.scores.get(), f.attn_weights.get(), s.batch * m.q_heads, len,
                                                  f.scale, g_stream),
                      "softmax");
                check(cublasGemmStridedBatchedEx(g_cublas, CUBLAS_OP_N, CUBLAS_OP_N, m.dim, group, static_cast<int>(len),
                                                 &one, dense_v(rep), CUDA_R_16F, m.dim, len * m.dim,
                                                 f.attn_weights.get(), CUDA_R_16F, static_cast<int>(len),
                                                 static_cast<long long>(group) * len, &zero, f.out.get(), CUDA_R_16F,
                                                 m.dim, static_cast<long long>(group) * m.dim, gemm_batch,
                                                 CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                      "cuBLAS attn.V");
              };
              add_note("GEMM + softmax + GEMM");
            } else {
              body = [&](std::int64_t i) {
                f.cache->attention(f.ids[static_cast<std::size_t>(i % replicas)], 0, f.q.get(), f.out.get(), f.scale);
              };
            }
            verify = [&] {
              r.error = check_against<fp16_t>(
                  f, [&](int b) { return download(f.out.get() + b * q_stride, q_stride); }, &Reference::attention);
            };
            break;
        }
        // Poisoned outputs (NaN in fp16 and fp32): the check fails unless the warm-up wrote them.
        if (op == Op::kq) check(cudaMemsetAsync(f.scores.get(), 0xFF, f.scores.bytes(), g_stream), "poison");
        if (op == Op::av) check(cudaMemsetAsync(f.av_out.get(), 0xFF, f.av_out.bytes(), g_stream), "poison");
        if (op == Op::attention) check(cudaMemsetAsync(f.out.get(), 0xFF, f.out.bytes(), g_stream), "poison");
        time_op(r, body, {}, verify);
        if (!packed && !(r.error <= kBaselineTolerance))
          throw std::runtime_error("baseline disagrees with the float64 reference: relative error " +
                                   std::to_string(r.error));
      },
      [] { g_attn.reset(); });
}

// ---- encoding ----
void bench_encode_blocks(benchmark::State& state, std::string name, Model m, int num_blocks) {
  Record rec;
  rec.name = name;
  rec.op = "encode";
  rec.impl = "blocks";
  rec.shape = std::string(m.name) + "/blk" + std::to_string(kBlockTokens) + "/n" + std::to_string(num_blocks);
  run_case(
      state, rec,
      [&](Record& r) {
        g_attn.reset();
        g_step.reset();
        const packkv::CodecParams params = packkv::make_codec_params(cache_config(m, 1));
        const std::size_t elems = static_cast<std::size_t>(num_blocks) * kBlockTokens * m.kv_heads * m.dim;
        const std::size_t stride = (params.geometry.max_block_bytes() + 255) / 256 * 256;
        ensure_fits(2.0 * elems * 2 + static_cast<double>(stride) * num_blocks, "encode_blocks buffers");
        DeviceBuffer<fp16_t> k(elems), v(elems);
        DeviceBuffer<std::uint8_t> out(stride * num_blocks);
        DeviceBuffer<std::uint32_t> sizes(num_blocks);
        generate_sequence(k.get(), v.get(), elems, 1000);
        r.bytes_read = r.dense_bytes = 2.0 * elems * sizeof(fp16_t);
        r.rotation = r.bytes_read;
        r.note = "fp16 input; encode_blocks waits for its stream after each call";
        time_op(
            r,
            [&](std::int64_t) {
              packkv::cuda::encode_blocks<fp16_t>(params, k.get(), v.get(), num_blocks, out.get(), stride, sizes.get(),
                                                  g_stream);
            },
            {}, [&] {
              const std::vector<std::uint32_t> host = download(sizes.get(), static_cast<std::size_t>(num_blocks));
              double total = 0;
              for (std::uint32_t b : host) total += b;
              r.ratio = r.bytes_read / std::max(total, 1.0);  // block bytes only: no tables, no tail
            });
      },
      {});
}

void bench_encode_append(benchmark::State& state, std::string name, Model m, std::int64_t len) {
  Record rec;
  rec.name = name;
  rec.op = "encode";
  rec.impl = "append";
  rec.shape = std::string(m.name) + "/ctx" + std::to_string(len) + "/b1";
  run_case(
      state, rec,
      [&](Record& r) {
        g_attn.reset();
        g_step.reset();
        const std::size_t elems = static_cast<std::size_t>(len) * m.kv_heads * m.dim;
        const double input = 2.0 * elems * sizeof(fp16_t);
        const int sets = replicas_for(input, 64);
        ensure_fits(sets * input + 4 * input, "prefill inputs");
        std::vector<DeviceBuffer<fp16_t>> ks, vs;
        for (int i = 0; i < sets; ++i) {
          ks.emplace_back(elems);
          vs.emplace_back(elems);
          generate_sequence(ks.back().get(), vs.back().get(), elems, 2000 + i);
        }
        packkv::PackedKVCache<fp16_t> cache(cache_config(m, 1));
        cache.set_stream(g_stream);
        SeqId current = 0;
        cache.add_sequence(current);
        r.bytes_read = r.dense_bytes = input;
        r.rotation = input * sets;
        r.note = "remove + add + append of a whole prefill per operation";
        time_op(r, [&](std::int64_t i) {
          cache.remove_sequence(current);
          cache.add_sequence(++current);
          const int set = static_cast<int>(i % sets);
          cache.append(current, 0, ks[set].get(), vs[set].get(), static_cast<int>(len));
        });
        r.ratio = cache.memory_stats().total.ratio_vs_fp16();
      },
      {});
}

// ---- the decode step: append one token to every (sequence, layer), then attention ----
struct StepFixture {
  Shape shape;
  int layers = kStepLayers;
  int replicas = 1;
  std::int64_t capacity = 0;  // dense rows per (sequence, KV head)
  std::unique_ptr<packkv::PackedKVCache<fp16_t>> cache;
  std::vector<std::vector<SeqId>> ids;       // [replica][batch]
  std::vector<std::int64_t> dense_len;       // [replica], equal for the batch
  std::vector<DeviceBuffer<fp16_t>> dense_k, dense_v;  // [layer]: [replica][batch][kv_heads][capacity][dim]
  DeviceBuffer<fp16_t> pool_k, pool_v;       // new tokens, [pool_tokens][kv_heads][dim]
  std::int64_t pool_tokens = 0;
  DeviceBuffer<fp16_t> q, out;
  DeviceBuffer<float> partial_acc, partial_ml;
  DeviceBuffer<unsigned> counters;
  int max_splits = 1;
  float scale = 1.0f;
  double packed_per_replica = 0, ratio = 0;
  // Tokens attended, summed over the operations run (for the bytes per step).
  double dense_tokens = 0, packed_tokens = 0;
  std::int64_t dense_steps = 0, packed_steps = 0;
};

/// Offset of sequence (r, b) past the context, in [0, 64): spread over the batch and then over
/// the replicas, so that block fills spread evenly over the steps. Replica 0's offsets do not
/// depend on the replica count.
int stagger(int r, int b, int replicas, int batch) {
  return b * kBlockTokens / batch + r * kBlockTokens / (replicas * batch);
}

std::unique_ptr<StepFixture> build_step_fixture(const Shape& s, int layers) {
  const Model& m = s.model;
  auto f = std::make_unique<StepFixture>();
  f->shape = s;
  f->layers = layers;
  f->scale = 1.0f / std::sqrt(static_cast<float>(m.dim));
  // Every replica takes 1 + kStepSamples * 64 steps at most (warm-up, samples): room for them.
  f->capacity = s.context + kBlockTokens + (kStepSamples + 2) * kBlockTokens;
  const std::size_t row = s.row_elems();
  const std::int64_t max_len = s.context + kBlockTokens;
  DeviceBuffer<fp16_t> tok_k(static_cast<std::size_t>(max_len) * row), tok_v(static_cast<std::size_t>(max_len) * row);
  f->cache = std::make_unique<packkv::PackedKVCache<fp16_t>>(cache_config(m, layers));
  f->cache->set_stream(g_stream);

  // Replica 0 first, to learn its packed size; then as many as the rotation needs.
  auto add_packed_replica = [&](int r, int replicas) {
    std::vector<SeqId> row_ids;
    for (int b = 0; b < s.batch; ++b) {
      const SeqId id = static_cast<SeqId>(r) * s.batch + b;
      f->cache->add_sequence(id);
      const std::int64_t len = s.context + stagger(r, b, replicas, s.batch);
      for (int l = 0; l < layers; ++l) {
        generate_sequence(tok_k.get(), tok_v.get(), static_cast<std::size_t>(len) * row, 7919 * id + l);
        f->cache->append(id, l, tok_k.get(), tok_v.get(), static_cast<int>(len));
      }
      row_ids.push_back(id);
    }
    f->ids.push_back(std::move(row_ids));
  };
  const double dense_per_replica = 2.0 * layers * s.batch * static_cast<double>(f->capacity) * row * 2.0;
  add_packed_replica(0, 1);
  const double per_replica = static_cast<double>(f->cache->memory_stats().total.total());
  int replicas = replicas_for(per_replica, 64);
  while (replicas > 1 && replicas * (dense_per_replica + per_replica * 1.25) > kMemoryCapBytes) --replicas;
  ensure_fits(replicas * dense_per_replica + (replicas - 1) * per_replica * 1.25, "decode-step state of " + s.label());
  for (int r = 1; r < replicas; ++r) add_packed_replica(r, replicas);
  f->replicas = replicas;
  const packkv::MemoryStats stats = f->cache->memory_stats();
  f->packed_per_replica = static_cast<double>(stats.total.total()) / replicas;
  f->ratio = stats.total.ratio_vs_fp16();

  // Dense: the same tokens, head-major with room to grow; one length per replica (the mean of its
  // sequences' packed lengths, within 32 tokens of each of them).
  const std::size_t per_layer = static_cast<std::size_t>(replicas) * s.batch * m.kv_heads * f->capacity * m.dim;
  for (int l = 0; l < layers; ++l) {
    f->dense_k.emplace_back(per_layer);
    f->dense_v.emplace_back(per_layer);
  }
  for (int r = 0; r < replicas; ++r) {
    std::int64_t sum = 0;
    for (int b = 0; b < s.batch; ++b) sum += stagger(r, b, replicas, s.batch);
    const std::int64_t len = s.context + (sum + s.batch / 2) / s.batch;
    f->dense_len.push_back(len);
    for (int b = 0; b < s.batch; ++b) {
      const SeqId id = static_cast<SeqId>(r) * s.batch + b;
      for (int l = 0; l < layers; ++l) {
        generate_sequence(tok_k.get(), tok_v.get(), static_cast<std::size_t>(len) * row, 7919 * id + l);
        const std::size_t at = (static_cast<std::size_t>(r) * s.batch + b) * m.kv_heads * f->capacity * m.dim;
        check(packkv::bench::token_major_to_head_major(tok_k.get(), f->dense_k[l].get() + at, len, m.kv_heads, m.dim,
                                                       f->capacity * m.dim, g_stream),
              "head-major K");
        check(packkv::bench::token_major_to_head_major(tok_v.get(), f->dense_v[l].get() + at, len, m.kv_heads, m.dim,
                                                       f->capacity * m.dim, g_stream),
              "head-major V");
      }
    }
  }

  // New tokens: distinct for 64 consecutive appends to any (sequence, layer), twice over.
  f->pool_tokens = 2LL * kBlockTokens * replicas * layers * s.batch;
  f->pool_k = DeviceBuffer<fp16_t>(static_cast<std::size_t>(f->pool_tokens) * row);
  f->pool_v = DeviceBuffer<fp16_t>(static_cast<std::size_t>(f->pool_tokens) * row);
  generate_sequence(f->pool_k.get(), f->pool_v.get(), static_cast<std::size_t>(f->pool_tokens) * row, 3000);

  const std::size_t q_elems = static_cast<std::size_t>(s.batch) * m.q_heads * m.dim;
  f->q = DeviceBuffer<fp16_t>(q_elems);
  f->out = DeviceBuffer<fp16_t>(q_elems);
  check(packkv::bench::fill_random(f->q.get(), q_elems, 99, 1.0f, g_stream), "fill q");
  f->max_splits = packkv::bench::kDenseMaxSplits;  // lengths change every step: room for any plan
  f->partial_acc = DeviceBuffer<float>(packkv::bench::dense_decode_acc_floats(s.batch, m.q_heads, f->max_splits));
  f->partial_ml = DeviceBuffer<float>(packkv::bench::dense_decode_ml_floats(s.batch, m.q_heads, f->max_splits));
  f->counters = DeviceBuffer<unsigned>(static_cast<std::size_t>(s.batch) * m.kv_heads);
  check(cudaMemsetAsync(f->counters.get(), 0, f->counters.bytes(), g_stream), "zero counters");
  check(cudaStreamSynchronize(g_stream), "decode-step setup");
  return f;
}

StepFixture& step_fixture(const Shape& s, int layers) {
  if (g_step && g_step->shape == s && g_step->layers == layers) return *g_step;
  g_step.reset();
  g_attn.reset();
  check(cudaDeviceSynchronize(), "fixture teardown");
  g_step = build_once("decode_step/" + s.label() + "/layers" + std::to_string(layers),
                      [&] { return build_step_fixture(s, layers); });
  return *g_step;
}

void bench_step(benchmark::State& state, std::string name, Shape s, int layers, std::string impl) {
  Record rec;
  rec.name = name;
  rec.op = "decode_step";
  rec.impl = impl;
  rec.shape = s.label() + "/layers" + std::to_string(layers);
  run_case(
      state, rec,
      [&](Record& r) {
        StepFixture& f = step_fixture(s, layers);
        const Model& m = s.model;
        const std::size_t row = s.row_elems();
        const bool packed = impl == "packed";
        r.ratio = packed ? f.ratio : 0;
        const std::int64_t stride_tokens = static_cast<std::int64_t>(layers) * s.batch;
        std::int64_t step = 0;  // this case's own step counter (the pool index)
        std::function<void(std::int64_t)> body;
        if (packed) {
          body = [&](std::int64_t) {
            const int rep = static_cast<int>(step % f.replicas);
            for (int l = 0; l < layers; ++l) {
              const std::int64_t base = (step * stride_tokens + static_cast<std::int64_t>(l) * s.batch) % f.pool_tokens;
              for (int b = 0; b < s.batch; ++b) {
                const std::size_t at = static_cast<std::size_t>(base + b) * row;
                f.cache->append(f.ids[rep][b], l, f.pool_k.get() + at, f.pool_v.get() + at, 1);
              }
              f.cache->attention(f.ids[rep], l, f.q.get(), f.out.get(), f.scale);
            }
            for (int b = 0; b < s.batch; ++b) f.packed_tokens += static_cast<double>(f.cache->length(f.ids[rep][b], 0));
            ++f.packed_steps;
            ++step;
          };
        } else {
          body = [&](std::int64_t) {
            const int rep = static_cast<int>(step % f.replicas);
            const std::int64_t position = f.dense_len[rep];
            if (position + 1 > f.capacity) throw std::runtime_error("decode step: dense capacity exhausted");
            const packkv::bench::DenseDecodePlan plan =
                packkv::bench::plan_dense_decode(s.batch, m.kv_heads, position + 1, g_sm_count, g_dense_ctas_per_sm);
            const std::size_t replica_at = static_cast<std::size_t>(rep) * s.batch * m.kv_heads * f.capacity * m.dim;
            for (int l = 0; l < layers; ++l) {
              const std::int64_t base = (step * stride_tokens + static_cast<std::int64_t>(l) * s.batch) % f.pool_tokens;
              const std::size_t at = static_cast<std::size_t>(base) * row;
              check(packkv::bench::dense_append_token(f.pool_k.get() + at, f.pool_v.get() + at,
                                                      f.dense_k[l].get() + replica_at, f.dense_v[l].get() + replica_at,
                                                      s.batch, m.kv_heads, m.dim, f.capacity * m.dim, position, g_stream),
                    "dense append");
              packkv::bench::DenseDecodeArgs a;
              a.k = f.dense_k[l].get() + replica_at;
              a.v = f.dense_v[l].get() + replica_at;
              a.head_stride = f.capacity * m.dim;
              a.q = f.q.get();
              a.out = f.out.get();
              a.partial_acc = f.partial_acc.get();
              a.partial_ml = f.partial_ml.get();
              a.counters = f.counters.get();
              a.batch = s.batch;
              a.kv_heads = m.kv_heads;
              a.q_heads = m.q_heads;
              a.len = position + 1;
              a.splits = plan.splits;
              a.tokens_per_split = plan.tokens_per_split;
              a.scale = f.scale;
              if (plan.splits > f.max_splits) throw std::runtime_error("decode step: dense workspace too small");
              check(packkv::bench::dense_decode_attention(a, g_stream), "dense decode attention");
            }
            f.dense_len[rep] = position + 1;
            f.dense_tokens += static_cast<double>(s.batch) * static_cast<double>(position + 1);
            ++f.dense_steps;
            ++step;
          };
        }
        // 64 steps per replica per sample: every (sequence, layer) fills and encodes exactly one
        // block in each sample, whatever the phase.
        TimingPlan plan;
        plan.per_sample = kBlockTokens * f.replicas;
        plan.max_samples = kStepSamples;
        plan.min_samples = kStepSamples;
        time_op(r, body, plan);
        const double tokens_per_step = packed ? f.packed_tokens / std::max<std::int64_t>(f.packed_steps, 1)
                                              : f.dense_tokens / std::max<std::int64_t>(f.dense_steps, 1);
        r.dense_bytes = tokens_per_step * layers * 2.0 * row * sizeof(fp16_t);
        if (packed) {
          const packkv::MemoryStats stats = f.cache->memory_stats();
          r.bytes_read = static_cast<double>(stats.total.total()) / f.replicas;
          r.ratio = stats.total.ratio_vs_fp16();
        } else {
          r.bytes_read = r.dense_bytes;
        }
        r.rotation = r.bytes_read * f.replicas;
        char note[96];
        std::snprintf(note, sizeof note, "%.1f us per layer; replicas: %d", r.median_s * 1e6 / layers, f.replicas);
        r.note = note;
      },
      [] { g_step.reset(); });
}

// ---- the copy ceiling ----
void measure_copy() {
  Record rec;
  rec.name = "copy/d2d/1GiB";
  rec.op = "copy";
  rec.impl = "d2d";
  rec.shape = "1GiB";
  try {
    const std::size_t bytes = std::size_t{1} << 30;
    DeviceBuffer<std::uint8_t> a(bytes), b(bytes);
    check(cudaMemsetAsync(a.get(), 1, bytes, g_stream), "memset");
    time_op(rec, [&](std::int64_t) {
      check(cudaMemcpyAsync(b.get(), a.get(), bytes, cudaMemcpyDeviceToDevice, g_stream), "copy");
    });
    rec.bytes_read = rec.dense_bytes = 2.0 * bytes;  // read + write
    rec.note = "read + write counted";
    g_copy_gbps = rec.bytes_read / rec.median_s / 1e9;
  } catch (const std::exception& e) {
    rec.failed = true;
    rec.message = e.what();
    cudaGetLastError();
  }
  g_records.push_back(rec);
}

// ---- summary ----
void print_summary() {
  std::printf("\n== packkv CUDA results (%s, %d SMs, copy %.0f GB/s, rotation >= %s) ==\n", g_device_name.c_str(),
              g_sm_count, g_copy_gbps, mib(g_rotation_bytes).c_str());
  std::printf("%-46s %10s %10s %8s %6s %9s %8s %8s %6s %8s %9s  %s\n", "case", "median_us", "min_us", "GB/s", "%copy",
              "fp16eqGBs", "vsDense", "vsCublas", "ratio", "rot_MiB", "rel_err", "note");
  auto num = [](double v, const char* fmt) {
    char buf[32];
    std::snprintf(buf, sizeof buf, fmt, v);
    return std::string(buf);
  };
  for (const Record& r : g_records) {
    if (r.failed) {
      std::printf("%-46s FAILED: %s\n", r.name.c_str(), r.message.c_str());
      continue;
    }
    const double gbps = r.bytes_read / r.median_s / 1e9;
    const Record* d = r.impl == "dense" ? nullptr : find_record(r.op, "dense", r.shape);
    const Record* c = r.impl == "cublas" ? nullptr : find_record(r.op, "cublas", r.shape);
    std::printf("%-46s %10.1f %10.1f %8.0f %6s %9.0f %8s %8s %6s %8.0f %9s  %s\n", r.name.c_str(), r.median_s * 1e6,
                r.min_s * 1e6, gbps, g_copy_gbps > 0 ? num(100.0 * gbps / g_copy_gbps, "%.1f").c_str() : "-",
                r.dense_bytes / r.median_s / 1e9, d ? num(d->median_s / r.median_s, "%.2fx").c_str() : "-",
                c ? num(c->median_s / r.median_s, "%.2fx").c_str() : "-", r.ratio > 0 ? num(r.ratio, "%.2f").c_str() : "-",
                r.rotation / static_cast<double>(kMiB), r.error >= 0 ? num(r.error, "%.2e").c_str() : "-",
                r.note.c_str());
  }
  std::printf(
      "(GB/s: bytes the case reads / median time; %%copy: of the copy rate above; fp16eqGBs: bytes a dense fp16 cache "
      "of the same tokens reads / median time; vsDense, vsCublas: that baseline's median time / this one's, same op and "
      "shape; ratio: fp16 bytes / all bytes the cache holds; rot_MiB: bytes read in one cycle through the replicas of the data, each replica being used once a cycle; "
      "rel_err: against a float64 host reference)\n");
}

// ---- registration ----
void register_all(bool sweep) {
  auto add = [](const std::string& name, std::function<void(benchmark::State&, const std::string&)> fn) {
    benchmark::RegisterBenchmark(name.c_str(), [name, fn](benchmark::State& st) { fn(st, name); })
        ->UseManualTime()
        ->Iterations(1)
        ->Unit(benchmark::kMicrosecond);
  };
  auto attention_cases = [&](const std::string& prefix, const Shape& s) {
    const std::pair<Op, const char*> ops[] = {{Op::kq, "kq"}, {Op::av, "av"}, {Op::attention, "attention"}};
    for (const auto& [op, op_name] : ops) {
      std::vector<std::string> impls = {"cublas"};
      if (op == Op::attention) impls = {"dense", "cublas"};
      impls.push_back("packed");
      for (const std::string& impl : impls) {
        add(prefix + op_name + "/" + impl + "/" + s.label(),
            [s, op = op, impl](benchmark::State& st, const std::string& name) { bench_attn(st, name, s, op, impl); });
      }
    }
  };
  auto step_cases = [&](const std::string& prefix, const Shape& s) {
    for (const char* impl : {"dense", "packed"}) {
      add(prefix + "decode_step/" + impl + "/" + s.label() + "/layers" + std::to_string(kStepLayers),
          [s, impl = std::string(impl)](benchmark::State& st, const std::string& name) {
            bench_step(st, name, s, kStepLayers, impl);
          });
    }
  };
  const Model m = kLlama3_8b;
  for (std::int64_t ctx : {4096, 32768})
    for (int batch : {1, 32}) attention_cases("", Shape{m, ctx, batch});
  constexpr int kEncodeBlocks = 2048;        // 512 MiB of fp16 K and V per call
  constexpr std::int64_t kPrefillTokens = 32768;
  add(std::string("encode/blocks/") + m.name + "/blk" + std::to_string(kBlockTokens) + "/n" + std::to_string(kEncodeBlocks),
      [m](benchmark::State& st, const std::string& name) { bench_encode_blocks(st, name, m, kEncodeBlocks); });
  add(std::string("encode/append/") + m.name + "/ctx" + std::to_string(kPrefillTokens) + "/b1",
      [m](benchmark::State& st, const std::string& name) { bench_encode_append(st, name, m, kPrefillTokens); });
  for (int batch : {1, 32}) step_cases("", Shape{m, 32768, batch});
  if (!sweep) return;
  for (std::int64_t ctx : {1024, 4096, 16384, 32768, 65536, 131072}) {
    for (int batch : {1, 8, 32}) {
      if ((ctx == 4096 || ctx == 32768) && batch != 8) continue;  // in the default set
      attention_cases("sweep/", Shape{m, ctx, batch});
    }
  }
  step_cases("sweep/", Shape{m, 32768, 8});
}

bool has_flag(int argc, char** argv, const char* flag) {
  const std::size_t n = std::strlen(flag);
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], flag, n) != 0) continue;
    const char* rest = argv[i] + n;
    if (*rest == '\0' || std::strcmp(rest, "=true") == 0 || std::strcmp(rest, "=1") == 0) return true;
  }
  return false;
}

/// The sweep is registered when asked for (--packkv_sweep) or when the filter names it.
bool wants_sweep(int& argc, char** argv) {
  bool sweep = false;
  int out = 1;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--packkv_sweep") == 0) {
      sweep = true;
      continue;
    }
    if (std::strncmp(argv[i], "--benchmark_filter=", 19) == 0 && std::strstr(argv[i], "sweep")) sweep = true;
    argv[out++] = argv[i];
  }
  argc = out;
  return sweep;
}

}  // namespace

int main(int argc, char** argv) {
  const bool sweep = wants_sweep(argc, argv);
  const bool list_only = has_flag(argc, argv, "--benchmark_list_tests");
  register_all(sweep);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  if (list_only) {
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
  }
  std::string why;
  if (!packkv::cuda::device_available(&why)) {
    std::printf("packkv CUDA benchmark: nothing measured (%s)\n", why.c_str());
    benchmark::Shutdown();
    return 0;
  }
  try {
    check(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking), "cudaStreamCreate");
    check(cublasCreate(&g_cublas), "cublasCreate");
    check(cublasSetStream(g_cublas, g_stream), "cublasSetStream");
    int device = 0, l2 = 0;
    check(cudaGetDevice(&device), "cudaGetDevice");
    check(cudaDeviceGetAttribute(&g_sm_count, cudaDevAttrMultiProcessorCount, device), "SM count");
    check(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device), "L2 size");
    cudaDeviceProp prop{};
    check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
    g_device_name = prop.name;
    g_rotation_bytes = std::max(static_cast<double>(kMinRotationBytes), 8.0 * l2);
    check(packkv::bench::dense_decode_ctas_per_sm(&g_dense_ctas_per_sm), "dense kernel occupancy");
  } catch (const std::exception& e) {
    std::printf("packkv CUDA benchmark: set-up failed (%s); nothing measured\n", e.what());
    return 1;
  }
  measure_copy();
  std::printf("copy ceiling: %.0f GB/s (1 GiB device to device, read + write); dense kernel: %d CTAs/SM\n",
              g_copy_gbps, g_dense_ctas_per_sm);
  benchmark::RunSpecifiedBenchmarks();
  g_attn.reset();
  g_step.reset();
  print_summary();
  std::fflush(stdout);
  benchmark::Shutdown();
  cublasDestroy(g_cublas);
  cudaStreamDestroy(g_stream);
  return 0;
}

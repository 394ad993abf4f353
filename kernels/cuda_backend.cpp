// The CUDA backend: packed blocks in worst-case-sized slots of device pages, per-(sequence, layer)
// device block tables and tail rings, kernels from launch.hpp. docs/cuda.md explains the design.
//
// Host code only (compiled by the host compiler, so fmt is fine here). The host knows every length
// and block count without asking the device: a block's slot is max_block_bytes() large, so placing
// it never depends on its encoded size. That is what lets append and attention run without a
// device-to-host synchronisation.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "cuda_support.hpp"
#include "launch.hpp"
#include "packkv/backend.hpp"
#include "packkv/codec.hpp"
#include "packkv/cuda/device_codec.hpp"

namespace packkv {
namespace cuda::detail {

void check_cuda(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return;
  ::packkv::detail::throw_error(fmt::format("CUDA backend: {} failed: {} ({})", what, cudaGetErrorString(status),
                                            cudaGetErrorName(status)));
}

void throw_device_error(const DeviceError& e, ErrorOrigin origin) {
  const char* tensor = e.tensor == 0 ? "K" : "V";
  const std::string where = origin == ErrorOrigin::encode_blocks
                                ? std::string("encode_blocks")
                                : fmt::format("append to sequence {} layer {}", e.sequence, e.layer);
  const char* consequence = origin == ErrorOrigin::later_call
                                ? ". The CUDA backend found it on the device after append returned; that sequence's "
                                  "contents at this layer are undefined: remove it"
                                : "";
  if (e.kind == kBadValue) {
    ::packkv::detail::throw_error(fmt::format(
        "{}: {} value {} at token {}, head {}, channel {} is NaN, Inf or beyond +-65504 (packkv stores per-token "
        "parameters in fp16){}",
        where, tensor, e.value, e.token, e.head, e.channel, consequence));
  }
  ::packkv::detail::throw_error(fmt::format(
      "{}: {} {} {} of head {} spans [{}, {}], too wide for an fp16 step at this rel (use a smaller rel){}", where,
      tensor, e.channel < 0 ? "token" : "channel", e.channel < 0 ? e.token : e.channel, e.head, e.value, e.value2,
      consequence));
}

DeviceBuffer::DeviceBuffer(std::size_t bytes, cudaStream_t stream) : bytes_(bytes), stream_(stream) {
  if (bytes == 0) return;
  check_cuda(cudaMallocAsync(&data_, bytes, stream), "cudaMallocAsync");
}

DeviceBuffer::~DeviceBuffer() { release(); }

void DeviceBuffer::release() {
  if (data_ != nullptr) cudaFreeAsync(data_, stream_);  // best effort: a destructor cannot throw
  data_ = nullptr;
  bytes_ = 0;
}

namespace {

int device_count(std::string* why) {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    if (why != nullptr) *why = fmt::format("no usable CUDA device: {}", cudaGetErrorString(status));
    cudaGetLastError();  // clear the sticky error so later calls start clean
    return 0;
  }
  if (count == 0 && why != nullptr) *why = "no CUDA device is present";
  return count;
}

/// Fixed-size slots carved from device pages; the free list lives on the host.
class SlotPool {
 public:
  SlotPool(std::size_t slot_bytes, std::size_t page_bytes)
      : slot_bytes_(slot_bytes),
        slots_per_page_(std::max<std::size_t>(1, page_bytes / slot_bytes)),
        page_bytes_(slots_per_page_ * slot_bytes) {}

  std::size_t slot_bytes() const { return slot_bytes_; }
  std::size_t page_bytes() const { return page_bytes_; }
  std::size_t pages() const { return pages_.size(); }
  std::size_t reserved_bytes() const { return pages_.size() * page_bytes_; }
  std::size_t live_slots() const { return pages_.size() * slots_per_page_ - free_.size(); }

  std::size_t pages_needed(std::size_t slots) const {
    if (slots <= free_.size()) return 0;
    return (slots - free_.size() + slots_per_page_ - 1) / slots_per_page_;
  }
  void reserve(std::size_t slots, cudaStream_t stream) {
    for (std::size_t page = pages_needed(slots); page > 0; --page) {
      DeviceBuffer buffer(page_bytes_, stream);
      auto* base = buffer.as<std::uint8_t>();
      pages_.push_back(std::move(buffer));
      for (std::size_t i = slots_per_page_; i > 0; --i) free_.push_back(base + (i - 1) * slot_bytes_);
    }
  }
  std::uint8_t* take() {
    std::uint8_t* slot = free_.back();
    free_.pop_back();
    return slot;
  }
  void give(std::uint8_t* slot) { free_.push_back(slot); }
  void set_stream(cudaStream_t stream) {
    for (auto& page : pages_) page.set_stream(stream);
  }

 private:
  std::size_t slot_bytes_;
  std::size_t slots_per_page_;
  std::size_t page_bytes_;
  std::vector<DeviceBuffer> pages_;
  std::vector<std::uint8_t*> free_;
};

constexpr std::size_t kPageBytes = std::size_t{2} << 20;
constexpr std::size_t kSlotAlign = 256;

bool strict_mode_requested() {
  const char* value = std::getenv("PACKKV_CUDA_STRICT");
  return value != nullptr && value[0] != '\0' && value[0] != '0';
}

}  // namespace

template <class T>
class CudaBackend final : public ::packkv::detail::CacheBackend<T> {
 public:
  explicit CudaBackend(const CacheConfig& config)
      : cfg_(config),
        codec_(make_codec_params(config)),
        geometry_(codec_.geometry),
        row_(static_cast<std::size_t>(config.num_kv_heads) * config.head_dim),
        tail_cap_(config.residual_tokens + config.block_tokens),
        group_(config.num_q_heads / config.num_kv_heads),
        heads_per_cta_(std::min(group_, kMaxHeadsPerCta)),
        subgroups_((group_ + heads_per_cta_ - 1) / heads_per_cta_),
        pool_((geometry_.max_block_bytes() + kSlotAlign - 1) / kSlotAlign * kSlotAlign, kPageBytes),
        strict_(strict_mode_requested()) {
    std::string why;
    if (device_count(&why) == 0) ::packkv::detail::throw_error("Device::cuda requested but " + why);
    PACKKV_REQUIRE(config.repack != RepackMethod::greedy,
                   "the CUDA backend does not implement greedy repacking (its sequential pack-growing search "
                   "does not map to the GPU at an acceptable cost); use RepackMethod::median or none");
    int device = 0, shared_optin = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    check_cuda(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, device), "query SM count");
    check_cuda(cudaDeviceGetAttribute(&shared_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
               "query shared memory");
    const std::size_t needed = std::max(encode_shared_bytes(geometry_), read_shared_bytes(geometry_));
    PACKKV_REQUIRE(needed <= static_cast<std::size_t>(shared_optin),
                   fmt::format("block_tokens {} x head_dim {} needs {} bytes of shared memory per CUDA block, the "
                               "device allows {}: use smaller blocks",
                               config.block_tokens, config.head_dim, needed, shared_optin));
    void* host = nullptr;
    check_cuda(cudaHostAlloc(&host, sizeof(DeviceError), cudaHostAllocMapped), "cudaHostAlloc (error record)");
    error_host_ = static_cast<DeviceError*>(host);
    std::memset(host, 0, sizeof(DeviceError));
    check_cuda(cudaHostGetDevicePointer(reinterpret_cast<void**>(&error_device_), host, 0),
               "cudaHostGetDevicePointer");
  }

  ~CudaBackend() override {
    sequences_.clear();
    workspace_ = DeviceBuffer();
    pool_ = SlotPool(pool_.slot_bytes(), kPageBytes);
    cudaStreamSynchronize(stream_);
    if (error_host_ != nullptr) cudaFreeHost(error_host_);
  }

  void add_sequence(SeqId id) override {
    raise_device_error();
    const std::size_t bytes = ring_bytes_per_sequence();
    check_budget(bytes, fmt::format("add_sequence {}", id));
    Sequence seq;
    seq.rings = DeviceBuffer(bytes, stream_);
    seq.layers.resize(static_cast<std::size_t>(cfg_.num_layers));
    sequences_.emplace(id, std::move(seq));
  }

  void remove_sequence(SeqId id) override {
    raise_device_error();
    auto it = sequences_.find(id);
    for (Layer& layer : it->second.layers) {
      for (std::uint8_t* block : layer.blocks) pool_.give(block);
    }
    sequences_.erase(it);  // buffers are freed in stream order, after the kernels that used them
  }

  bool contains(SeqId id) const override { return sequences_.count(id) != 0; }

  std::vector<SeqId> sequence_ids() const override {
    std::vector<SeqId> ids;
    ids.reserve(sequences_.size());
    for (const auto& entry : sequences_) ids.push_back(entry.first);
    return ids;  // std::map: already sorted
  }

  std::int64_t length(SeqId id, int layer) const override { return layer_of(id, layer).length; }

  void append(SeqId id, int layer_index, const T* k, const T* v, int n_tokens) override {
    raise_device_error();
    Sequence& seq = sequences_.at(id);
    Layer& layer = seq.layers[static_cast<std::size_t>(layer_index)];
    if (strict_) validate_now(id, layer_index, layer, k, v, n_tokens);

    const int block = cfg_.block_tokens;
    const std::int64_t pending = static_cast<std::int64_t>(layer.tail_len) + n_tokens;
    const std::int64_t keep_min = cfg_.residual_tokens;
    const std::int64_t new_blocks = pending >= keep_min + block ? (pending - keep_min) / block : 0;
    const std::size_t old_blocks = layer.blocks.size();
    const std::size_t needed_table = old_blocks + static_cast<std::size_t>(new_blocks);

    // Everything that can fail for lack of memory is settled before the first change.
    std::size_t new_table_capacity = layer.table_capacity;
    while (new_table_capacity < needed_table) new_table_capacity = std::max<std::size_t>(64, 2 * new_table_capacity);
    const std::size_t extra = pool_.pages_needed(static_cast<std::size_t>(new_blocks)) * pool_.page_bytes() +
                              (new_table_capacity - layer.table_capacity) * sizeof(std::uint8_t*);
    check_budget(extra, fmt::format("append to sequence {} layer {}", id, layer_index));
    pool_.reserve(static_cast<std::size_t>(new_blocks), stream_);
    if (new_table_capacity != layer.table_capacity) grow_table(layer, new_table_capacity);

    const TokenSource<T> source = token_source(seq, layer_index, layer, k, v);
    const ErrorContext errors{error_device_, id, layer_index, layer.length - layer.tail_len};
    if (new_blocks > 0) {
      for (std::int64_t b = 0; b < new_blocks; ++b) layer.blocks.push_back(pool_.take());
      std::uint8_t** table_tail = static_cast<std::uint8_t**>(layer.table.data()) + old_blocks;
      publish_table_entries(layer, old_blocks, table_tail);
      EncodeParams<T> params{};
      params.geometry = geometry_;
      params.k_max_code = codec_.k_max_code;
      params.v_max_code = codec_.v_max_code;
      params.median_repack = cfg_.repack == RepackMethod::median ? 1 : 0;
      params.source = source;
      params.out_table = table_tail;
      params.errors = errors;
      check_cuda(launch_encode(params, static_cast<int>(new_blocks), stream_), "encode kernel launch");
    }
    const std::int64_t consumed = new_blocks * block;
    TailWriteParams<T> tail{};
    tail.source = source;
    tail.ring_k = ring_k(seq, layer_index);
    tail.ring_v = ring_v(seq, layer_index);
    tail.first = std::max<std::int64_t>(consumed, layer.tail_len);
    tail.end = pending;
    tail.ring_origin = layer.tail_start;
    tail.head_dim = cfg_.head_dim;
    tail.errors = errors;
    check_cuda(launch_tail_write(tail, stream_), "tail kernel launch");

    layer.tail_start = static_cast<int>((layer.tail_start + consumed) % tail_cap_);
    layer.tail_len = static_cast<int>(pending - consumed);
    layer.length += n_tokens;
  }

  void attention(std::span<const SeqId> ids, int layer, const T* q, T* out, float scale) const override {
    raise_device_error();
    const std::size_t q_stride = static_cast<std::size_t>(cfg_.num_q_heads) * cfg_.head_dim;
    for (std::size_t first = 0; first < ids.size(); first += kMaxBatchPerLaunch) {
      const int count = static_cast<int>(std::min<std::size_t>(kMaxBatchPerLaunch, ids.size() - first));
      AttentionParams<T> params{};
      params.shape = read_shape();
      params.batch = count;
      int max_units = 0;
      for (int b = 0; b < count; ++b) {
        params.seqs[b] = view(ids[first + b], layer);
        max_units = std::max(max_units, params.seqs[b].num_units(cfg_.block_tokens));
      }
      const Split split = choose_split(max_units, count * cfg_.num_kv_heads * subgroups_);
      params.units_per_split = split.units_per_split;
      params.num_splits = split.splits;
      params.q = q + first * q_stride;
      params.out = out + first * q_stride;
      params.softmax_scale = scale;
      params.partials = workspace(static_cast<std::size_t>(count) * cfg_.num_q_heads * split.splits *
                                  (cfg_.head_dim + 2));
      check_cuda(launch_attention(params, stream_), "attention kernel launch");
    }
  }

  void scores(SeqId id, int layer, const T* q, float* scores) const override {
    raise_device_error();
    ScoresParams<T> params{};
    params.shape = read_shape();
    params.seq = view(id, layer);
    params.q = q;
    params.scores = scores;
    params.length = layer_of(id, layer).length;
    check_cuda(launch_scores(params, stream_), "scores kernel launch");
  }

  void attn_v(SeqId id, int layer, const float* weights, float* out) const override {
    raise_device_error();
    AttnVParams<T> params{};
    params.shape = read_shape();
    params.seq = view(id, layer);
    params.weights = weights;
    params.out = out;
    params.length = layer_of(id, layer).length;
    const Split split = choose_split(params.seq.num_units(cfg_.block_tokens), cfg_.num_kv_heads * subgroups_);
    params.units_per_split = split.units_per_split;
    params.num_splits = split.splits;
    params.partials = workspace(static_cast<std::size_t>(cfg_.num_q_heads) * split.splits * cfg_.head_dim);
    check_cuda(launch_attn_v(params, stream_), "attn_v kernel launch");
  }

  void read_back(SeqId id, int layer, float* k, float* v) const override {
    raise_device_error();
    ReadBackParams<T> params{};
    params.geometry = geometry_;
    params.seq = view(id, layer);
    params.k = k;
    params.v = v;
    check_cuda(launch_read_back(params, stream_), "read_back kernel launch");
    // Inspection call: it waits, so that device-reported errors surface here at the latest.
    check_cuda(cudaStreamSynchronize(stream_), "read_back");
    raise_device_error();
  }

  MemoryStats memory_stats() const override {
    check_cuda(cudaStreamSynchronize(stream_), "memory_stats");
    raise_device_error();
    MemoryStats stats;
    stats.layers.resize(static_cast<std::size_t>(cfg_.num_layers));
    std::vector<const std::uint8_t*> blocks;
    std::vector<int> block_layers;
    for (const auto& [id, seq] : sequences_) {
      for (std::size_t li = 0; li < seq.layers.size(); ++li) {
        for (const std::uint8_t* block : seq.layers[li].blocks) {
          blocks.push_back(block);
          block_layers.push_back(static_cast<int>(li));
        }
      }
    }
    std::vector<unsigned long long> counters(2 * static_cast<std::size_t>(cfg_.num_layers), 0);
    if (!blocks.empty()) {
      // One upload, one kernel and one download: memory_stats is an inspection call and waits.
      const std::size_t list_bytes = blocks.size() * (sizeof(void*) + sizeof(int));
      DeviceBuffer scratch(list_bytes + counters.size() * sizeof(unsigned long long), stream_);
      auto* device_blocks = scratch.as<const std::uint8_t*>();
      auto* device_counters =
          reinterpret_cast<unsigned long long*>(scratch.as<std::uint8_t>() + blocks.size() * sizeof(void*));
      auto* device_layers = reinterpret_cast<int*>(device_counters + counters.size());
      check_cuda(cudaMemcpyAsync(device_blocks, blocks.data(), blocks.size() * sizeof(void*), cudaMemcpyHostToDevice,
                                 stream_),
                 "memory_stats upload");
      check_cuda(cudaMemcpyAsync(device_layers, block_layers.data(), block_layers.size() * sizeof(int),
                                 cudaMemcpyHostToDevice, stream_),
                 "memory_stats upload");
      check_cuda(cudaMemsetAsync(device_counters, 0, counters.size() * sizeof(unsigned long long), stream_),
                 "memory_stats memset");
      check_cuda(launch_block_stats(geometry_, device_blocks, device_layers, static_cast<int>(blocks.size()),
                                    device_counters, stream_),
                 "block statistics kernel launch");
      check_cuda(cudaMemcpyAsync(counters.data(), device_counters, counters.size() * sizeof(unsigned long long),
                                 cudaMemcpyDeviceToHost, stream_),
                 "memory_stats download");
      check_cuda(cudaStreamSynchronize(stream_), "memory_stats");
    }
    const format::SectionLayout kl = geometry_.k_layout(), vl = geometry_.v_layout();
    const std::size_t params = static_cast<std::size_t>(geometry_.num_heads) * (kl.param_count + vl.param_count) *
                               sizeof(format::Params);
    const std::size_t descs =
        static_cast<std::size_t>(geometry_.num_heads) * kl.rounds * kl.head_dim * (kl.desc_bytes + vl.desc_bytes);
    const std::size_t token_bytes = row_ * 2 * sizeof(T);
    std::size_t live_bytes = 0, live_blocks = 0;
    for (const auto& [id, seq] : sequences_) {
      for (std::size_t li = 0; li < seq.layers.size(); ++li) {
        const Layer& layer = seq.layers[li];
        MemoryBreakdown& m = stats.layers[li];
        const std::size_t n = layer.blocks.size();
        m.params += n * params;
        m.descriptors += n * descs;
        m.permutations += n * geometry_.permutation_bytes();
        m.block_tables += n * sizeof(std::uint8_t*);
        m.tail += static_cast<std::size_t>(layer.tail_len) * token_bytes;
        m.compressed_tokens += n * static_cast<std::size_t>(cfg_.block_tokens);
        m.tail_tokens += static_cast<std::size_t>(layer.tail_len);
        m.original_bytes += static_cast<std::size_t>(layer.length) * token_bytes;
        m.original_fp16_bytes += static_cast<std::size_t>(layer.length) * row_ * 2 * 2;
        live_blocks += n;
      }
    }
    for (std::size_t li = 0; li < stats.layers.size(); ++li) {
      MemoryBreakdown& m = stats.layers[li];
      const std::size_t payload = counters[2 * li], bytes = counters[2 * li + 1];
      m.payload = payload;
      m.headers = bytes - payload - m.params - m.descriptors - m.permutations;
      live_bytes += bytes;
      stats.total += m;
    }
    stats.pool.page_bytes = pool_.page_bytes();
    stats.pool.pages_reserved = pool_.pages();
    stats.pool.reserved_bytes = pool_.reserved_bytes();
    stats.pool.slot_bytes = pool_.live_slots() * pool_.slot_bytes();
    stats.pool.live_bytes = live_bytes;
    stats.pool.live_blocks = live_blocks;
    stats.resident_bytes = resident_bytes();
    return stats;
  }

  void set_stream(void* stream) override {
    // Stream-ordered frees and slot reuse assume one stream: finish the old one's work first.
    check_cuda(cudaStreamSynchronize(stream_), "set_stream (draining the previous stream)");
    stream_ = static_cast<cudaStream_t>(stream);
    for (auto& [id, seq] : sequences_) {
      seq.rings.set_stream(stream_);
      for (Layer& layer : seq.layers) layer.table.set_stream(stream_);
    }
    workspace_.set_stream(stream_);
    pool_.set_stream(stream_);
  }

 private:
  struct Layer {
    std::vector<std::uint8_t*> blocks;  // host mirror of the device block table
    DeviceBuffer table;                 // device: std::uint8_t*[table_capacity]
    std::size_t table_capacity = 0;
    int tail_start = 0;
    int tail_len = 0;
    std::int64_t length = 0;
  };
  struct Sequence {
    DeviceBuffer rings;  // per layer: K ring then V ring, [tail_cap][num_kv_heads][head_dim] each
    std::vector<Layer> layers;
  };
  struct Split {
    int splits;
    int units_per_split;
  };

  const Layer& layer_of(SeqId id, int layer) const {
    return sequences_.at(id).layers[static_cast<std::size_t>(layer)];
  }
  std::size_t ring_elems() const { return static_cast<std::size_t>(tail_cap_) * row_; }
  std::size_t ring_bytes_per_sequence() const {
    return static_cast<std::size_t>(cfg_.num_layers) * 2 * ring_elems() * sizeof(T);
  }
  T* ring_k(const Sequence& seq, int layer) const {
    return static_cast<T*>(seq.rings.data()) + static_cast<std::size_t>(layer) * 2 * ring_elems();
  }
  T* ring_v(const Sequence& seq, int layer) const { return ring_k(seq, layer) + ring_elems(); }

  std::size_t resident_bytes() const {
    std::size_t bytes = pool_.reserved_bytes() + workspace_.bytes();
    for (const auto& [id, seq] : sequences_) {
      bytes += seq.rings.bytes();
      for (const Layer& layer : seq.layers) bytes += layer.table.bytes();
    }
    return bytes;
  }

  void check_budget(std::size_t extra, const std::string& what) const {
    if (cfg_.memory_budget_bytes == 0) return;
    const std::size_t resident = resident_bytes();
    PACKKV_REQUIRE(resident + extra <= cfg_.memory_budget_bytes,
                   fmt::format("{}: memory budget of {} bytes exceeded ({} in use on the GPU, {} more needed); "
                               "remove sequences to free memory",
                               what, cfg_.memory_budget_bytes, resident, extra));
  }

  /// Raises the first value error a kernel reported (read from mapped memory: no synchronisation).
  void raise_device_error(ErrorOrigin origin = ErrorOrigin::later_call) const {
    volatile DeviceError* record = error_host_;
    if (record->ready == 0) return;
    std::atomic_thread_fence(std::memory_order_acquire);
    DeviceError copy;
    std::memcpy(&copy, const_cast<DeviceError*>(record), sizeof copy);
    record->ready = 0;
    record->claimed = 0;
    throw_device_error(copy, origin);
  }

  void validate_now(SeqId id, int layer_index, const Layer& layer, const T* k, const T* v, int n_tokens) {
    check_cuda(cudaStreamSynchronize(stream_), "append (strict validation)");
    raise_device_error();  // an earlier kernel's report is not this append's
    const ErrorContext errors{error_device_, id, layer_index, layer.length};
    check_cuda(launch_validate(k, v, n_tokens, cfg_.num_kv_heads, cfg_.head_dim, codec_.k_max_code,
                               codec_.v_max_code, cfg_.k_mode == QuantMode::per_token, errors, stream_),
               "validation kernel launch");
    check_cuda(cudaStreamSynchronize(stream_), "append (strict validation)");
    raise_device_error(ErrorOrigin::strict_append);
  }

  void grow_table(Layer& layer, std::size_t capacity) {
    DeviceBuffer table(capacity * sizeof(std::uint8_t*), stream_);
    if (!layer.blocks.empty()) {
      check_cuda(cudaMemcpyAsync(table.data(), layer.table.data(), layer.blocks.size() * sizeof(std::uint8_t*),
                                 cudaMemcpyDeviceToDevice, stream_),
                 "block table growth");
    }
    layer.table = std::move(table);
    layer.table_capacity = capacity;
  }

  // A decode step fills at most one block: its entry travels as a kernel parameter, which keeps
  // the step free of host memory and capturable in a CUDA graph. Large prefills copy the entries.
  void publish_table_entries(const Layer& layer, std::size_t first, std::uint8_t** device_entries) {
    const std::size_t count = layer.blocks.size() - first;
    if (count <= static_cast<std::size_t>(kInlineTableEntries)) {
      TableEntries entries{};
      entries.count = static_cast<int>(count);
      for (std::size_t i = 0; i < count; ++i) entries.blocks[i] = layer.blocks[first + i];
      check_cuda(launch_write_table(device_entries, entries, stream_), "block table kernel launch");
    } else {
      check_cuda(cudaMemcpyAsync(device_entries, layer.blocks.data() + first, count * sizeof(std::uint8_t*),
                                 cudaMemcpyHostToDevice, stream_),
                 "block table upload");
    }
  }

  TokenSource<T> token_source(const Sequence& seq, int layer_index, const Layer& layer, const T* k,
                              const T* v) const {
    TokenSource<T> s{};
    s.tail_k = ring_k(seq, layer_index);
    s.tail_v = ring_v(seq, layer_index);
    s.in_k = k;
    s.in_v = v;
    s.tail_start = layer.tail_start;
    s.tail_len = layer.tail_len;
    s.tail_cap = tail_cap_;
    s.row_elems = static_cast<int>(row_);
    return s;
  }

  SeqView<T> view(SeqId id, int layer_index) const {
    const Sequence& seq = sequences_.at(id);
    const Layer& layer = seq.layers[static_cast<std::size_t>(layer_index)];
    SeqView<T> v{};
    v.blocks = static_cast<const std::uint8_t* const*>(layer.table.data());
    v.tail_k = ring_k(seq, layer_index);
    v.tail_v = ring_v(seq, layer_index);
    v.num_blocks = static_cast<int>(layer.blocks.size());
    v.tail_start = layer.tail_start;
    v.tail_len = layer.tail_len;
    v.tail_cap = tail_cap_;
    return v;
  }

  ReadShape read_shape() const {
    ReadShape s{};
    s.geometry = geometry_;
    s.num_q_heads = cfg_.num_q_heads;
    s.group = group_;
    s.heads_per_cta = heads_per_cta_;
    s.subgroups = subgroups_;
    return s;
  }

  // Flash-decoding split: enough CTAs for about two waves over the SMs, never an empty split
  // range for the longest sequence.
  Split choose_split(int max_units, int ctas_per_split) const {
    max_units = std::max(max_units, 1);
    const int target = 2 * sm_count_;
    int splits = std::clamp((target + ctas_per_split - 1) / ctas_per_split, 1, max_units);
    const int per_split = (max_units + splits - 1) / splits;
    splits = (max_units + per_split - 1) / per_split;
    return Split{splits, per_split};
  }

  float* workspace(std::size_t floats) const {
    if (workspace_.bytes() < floats * sizeof(float)) {
      workspace_ = DeviceBuffer(std::max(floats * sizeof(float), 2 * workspace_.bytes()), stream_);
    }
    return workspace_.as<float>();
  }

  CacheConfig cfg_;
  CodecParams codec_;
  format::BlockGeometry geometry_;
  std::size_t row_;
  int tail_cap_;
  int group_;
  int heads_per_cta_;
  int subgroups_;
  SlotPool pool_;
  bool strict_;
  int sm_count_ = 1;
  cudaStream_t stream_ = nullptr;
  DeviceError* error_host_ = nullptr;
  DeviceError* error_device_ = nullptr;
  std::map<SeqId, Sequence> sequences_;
  mutable DeviceBuffer workspace_;
};

}  // namespace cuda::detail

namespace detail {

template <class T>
std::unique_ptr<CacheBackend<T>> make_cuda_backend(const CacheConfig& config) {
  return std::make_unique<cuda::detail::CudaBackend<T>>(config);
}

template std::unique_ptr<CacheBackend<float>> make_cuda_backend<float>(const CacheConfig&);
template std::unique_ptr<CacheBackend<fp16_t>> make_cuda_backend<fp16_t>(const CacheConfig&);
template std::unique_ptr<CacheBackend<bf16_t>> make_cuda_backend<bf16_t>(const CacheConfig&);

}  // namespace detail
}  // namespace packkv

// The CUDA backend: packed blocks stored tightly in per-(sequence, layer) device pages, device
// block tables and tail rings, kernels from launch.hpp. docs/cuda.md explains the design.
//
// Host code only (compiled by the host compiler, so fmt is fine here). The host knows every length
// and block count without asking the device; only block sizes are the device's to know. It
// therefore reserves pages for the worst case, lets the device place blocks with their real sizes,
// and learns where placement got to from a word in mapped memory. That is what lets append and
// attention run without a device-to-host synchronisation.
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_support.hpp"
#include "launch.hpp"
#include "packkv/backend.hpp"
#include "packkv/codec.hpp"
#include "packkv/cuda/device_codec.hpp"
#include "sequence_image.hpp"
#include "value_checks.hpp"

namespace packkv {
namespace cuda::detail {

void check_cuda(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return;
  ::packkv::detail::throw_error(
      fmt::format("CUDA backend: {} failed: {} ({})", what, cudaGetErrorString(status), cudaGetErrorName(status)));
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
  ::packkv::detail::throw_error(
      fmt::format("{}: {} {} {} of head {} spans [{}, {}], too wide for an fp16 step at this rel (use a smaller rel){}",
                  where, tensor, e.channel < 0 ? "token" : "channel", e.channel < 0 ? e.token : e.channel, e.head,
                  e.value, e.value2, consequence));
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

/// Fixed-size device pages; the free list lives on the host. Each (sequence, layer) owns whole
/// pages and packs its blocks into them tightly, so removing a sequence frees whole pages.
class PagePool {
 public:
  explicit PagePool(std::size_t page_bytes) : page_bytes_(page_bytes) {}

  std::size_t page_bytes() const { return page_bytes_; }
  std::size_t pages() const { return pages_.size(); }
  std::size_t reserved_bytes() const { return pages_.size() * page_bytes_; }
  std::size_t pages_in_use() const { return pages_.size() - free_.size(); }
  std::size_t pages_to_allocate(std::size_t wanted) const { return wanted > free_.size() ? wanted - free_.size() : 0; }
  void reserve(std::size_t wanted, cudaStream_t stream) {
    for (std::size_t n = pages_to_allocate(wanted); n > 0; --n) {
      DeviceBuffer page(page_bytes_, stream);
      free_.push_back(static_cast<std::uint8_t*>(page.data()));
      pages_.push_back(std::move(page));
    }
  }
  std::uint8_t* take() {
    std::uint8_t* page = free_.back();
    free_.pop_back();
    return page;
  }
  void give(std::uint8_t* page) { free_.push_back(page); }
  void set_stream(cudaStream_t stream) {
    for (auto& page : pages_) page.set_stream(stream);
  }

 private:
  std::size_t page_bytes_;
  std::vector<DeviceBuffer> pages_;
  std::vector<std::uint8_t*> free_;
};

/// 64-bit words of mapped, pinned host memory that kernels write and the host reads without a
/// synchronisation; allocated in chunks, handed out and taken back by index.
class MappedWords {
 public:
  MappedWords() = default;
  MappedWords(const MappedWords&) = delete;
  MappedWords& operator=(const MappedWords&) = delete;
  ~MappedWords() {
    for (auto& chunk : chunks_) cudaFreeHost(chunk.host);
  }
  std::size_t take() {
    if (free_.empty()) {
      Chunk chunk{};
      check_cuda(cudaHostAlloc(reinterpret_cast<void**>(&chunk.host), kChunkWords * sizeof(unsigned long long),
                               cudaHostAllocMapped),
                 "cudaHostAlloc (placement progress)");
      std::memset(chunk.host, 0, kChunkWords * sizeof(unsigned long long));
      check_cuda(cudaHostGetDevicePointer(reinterpret_cast<void**>(&chunk.device), chunk.host, 0),
                 "cudaHostGetDevicePointer");
      for (std::size_t i = kChunkWords; i > 0; --i) free_.push_back(chunks_.size() * kChunkWords + i - 1);
      chunks_.push_back(chunk);
    }
    const std::size_t index = free_.back();
    free_.pop_back();
    return index;
  }
  void give(std::size_t index) { free_.push_back(index); }
  unsigned long long read(std::size_t index) const {
    return *static_cast<volatile unsigned long long*>(chunks_[index / kChunkWords].host + index % kChunkWords);
  }
  unsigned long long* device(std::size_t index) const {
    return chunks_[index / kChunkWords].device + index % kChunkWords;
  }

 private:
  static constexpr std::size_t kChunkWords = 1024;
  struct Chunk {
    unsigned long long* host;
    unsigned long long* device;
  };
  std::vector<Chunk> chunks_;
  std::vector<std::size_t> free_;
};

constexpr std::size_t kSlotAlign = 256;
/// Blocks of one append encoded per round (staging is a worst-case slot per block). The CPU
/// emulator uses a small value so that the tests exercise appends of several rounds.
#if defined(PACKKV_CUDA_EMULATION)
constexpr std::size_t kMaxStagingBytes = std::size_t{1} << 20;
#else
constexpr std::size_t kMaxStagingBytes = std::size_t{256} << 20;
#endif

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
        slot_bytes_((geometry_.max_block_bytes() + kSlotAlign - 1) / kSlotAlign * kSlotAlign),
        // Eight worst-case blocks per page: the block that does not fit at a page's end wastes
        // about half a block per page (~6%), and a layer's last page is on average half empty.
        pool_((8 * slot_bytes_ + 65535) / 65536 * 65536),
        blocks_per_page_worst_(pool_.page_bytes() / slot_bytes_),
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
    check_cuda(cudaHostGetDevicePointer(reinterpret_cast<void**>(&error_device_), host, 0), "cudaHostGetDevicePointer");
    error_claim_ = DeviceBuffer(sizeof(int), stream_);
    check_cuda(cudaMemsetAsync(error_claim_.data(), 0, sizeof(int), stream_), "error claim initialisation");
  }

  ~CudaBackend() override {
    cudaStreamSynchronize(stream_);  // kernels may still write the mapped words freed below
    sequences_.clear();
    workspace_ = DeviceBuffer();
    staging_ = DeviceBuffer();
    error_claim_ = DeviceBuffer();
    pool_ = PagePool(pool_.page_bytes());
    cudaStreamSynchronize(stream_);
    if (error_host_ != nullptr) cudaFreeHost(error_host_);
  }

  void add_sequence(SeqId id) override {
    raise_device_error();
    const std::size_t bytes = ring_bytes_per_sequence();
    const std::size_t cursor_bytes = static_cast<std::size_t>(cfg_.num_layers) * sizeof(PlacementCursor);
    check_budget(bytes + cursor_bytes, fmt::format("add_sequence {}", id));
    Sequence seq;
    seq.rings = DeviceBuffer(bytes, stream_);
    seq.cursors = DeviceBuffer(cursor_bytes, stream_);
    check_cuda(cudaMemsetAsync(seq.cursors.data(), 0, cursor_bytes, stream_), "cursor initialisation");
    seq.layers.resize(static_cast<std::size_t>(cfg_.num_layers));
    for (Layer& layer : seq.layers) layer.progress_word = progress_.take();
    sequences_.emplace(id, std::move(seq));
  }

  void remove_sequence(SeqId id) override {
    raise_device_error();
    erase_sequence(id);
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
    const std::int64_t per_round = blocks_per_round();
    const std::int64_t round_blocks = std::min(new_blocks, per_round);

    // Everything that can fail for lack of memory is settled before the first change. Pages are
    // reserved for the worst case of every placement the host has not yet seen complete.
    settle_pages(layer);
    std::size_t table_capacity = layer.table_capacity;
    while (table_capacity < static_cast<std::size_t>(layer.num_blocks + new_blocks)) {
      table_capacity = std::max<std::size_t>(64, 2 * table_capacity);
    }
    const std::size_t pages_wanted = pages_bound(layer, new_blocks);
    const std::size_t new_pages = pages_wanted > layer.pages.size() ? pages_wanted - layer.pages.size() : 0;
    std::size_t page_list_capacity = layer.page_list_capacity;
    while (page_list_capacity < pages_wanted) page_list_capacity = std::max<std::size_t>(16, 2 * page_list_capacity);
    const std::size_t staging_bytes = static_cast<std::size_t>(round_blocks) * (slot_bytes_ + 4);
    const std::size_t extra =
        pool_.pages_to_allocate(new_pages) * pool_.page_bytes() +
        (table_capacity - layer.table_capacity + page_list_capacity - layer.page_list_capacity) * sizeof(void*) +
        (staging_bytes > staging_.bytes() ? staging_bytes - staging_.bytes() : 0);
    check_budget(extra, fmt::format("append to sequence {} layer {}", id, layer_index));
    pool_.reserve(new_pages, stream_);
    if (table_capacity != layer.table_capacity)
      grow(layer.table, layer.table_capacity, table_capacity, static_cast<std::size_t>(layer.num_blocks));
    if (page_list_capacity != layer.page_list_capacity)
      grow(layer.page_list, layer.page_list_capacity, page_list_capacity, layer.pages.size());
    if (staging_.bytes() < staging_bytes) staging_ = DeviceBuffer(staging_bytes, stream_);
    add_pages(layer, new_pages);

    const TokenSource<T> source = token_source(seq, layer_index, layer, k, v);
    const ErrorContext errors{error_device_, static_cast<int*>(error_claim_.data()), id, layer_index,
                              layer.length - layer.tail_len};
    for (std::int64_t done = 0; done < new_blocks; done += round_blocks) {
      const int count = static_cast<int>(std::min(round_blocks, new_blocks - done));
      auto* sizes = reinterpret_cast<std::uint32_t*>(static_cast<std::uint8_t*>(staging_.data()) +
                                                     static_cast<std::size_t>(round_blocks) * slot_bytes_);
      EncodeParams<T> params{};
      params.geometry = geometry_;
      params.k_max_code = codec_.k_max_code;
      params.v_max_code = codec_.v_max_code;
      params.median_repack = cfg_.repack == RepackMethod::median ? 1 : 0;
      params.source = source;
      params.source.tail_len = source.tail_len - static_cast<int>(done * block);  // may go negative: input only
      params.source.tail_start = static_cast<int>((source.tail_start + done * block) % tail_cap_);
      params.out_base = static_cast<std::uint8_t*>(staging_.data());
      params.out_stride = slot_bytes_;
      params.block_sizes = sizes;
      params.errors = errors;
      params.errors.first_token = errors.first_token + done * block;
      check_cuda(launch_encode(params, count, stream_), "encode kernel launch");

      PlaceParams place{};
      place.staging = static_cast<const std::uint8_t*>(staging_.data());
      place.staging_stride = slot_bytes_;
      place.sizes = sizes;
      place.num_blocks = count;
      place.pages = static_cast<std::uint8_t* const*>(layer.page_list.data());
      place.page_bytes = static_cast<std::uint32_t>(pool_.page_bytes());
      place.cursor = static_cast<PlacementCursor*>(seq.cursors.data()) + layer_index;
      place.table = static_cast<std::uint8_t**>(layer.table.data()) + layer.num_blocks;
      place.progress = progress_.device(layer.progress_word);
      place.launch = next_launch_++ & 0xFFFFFFu;
      check_cuda(launch_place_blocks(place, stream_), "block placement kernel launch");
      layer.unseen.push_back(UnseenPlacement{place.launch, count});
      layer.num_blocks += count;
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
    const std::lock_guard<std::mutex> lock(reader_mutex_);
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
      params.partials =
          workspace(static_cast<std::size_t>(count) * cfg_.num_q_heads * split.splits * (cfg_.head_dim + 2));
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
    const std::lock_guard<std::mutex> lock(reader_mutex_);
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
    const std::lock_guard<std::mutex> lock(reader_mutex_);
    // Every placement is complete now: pages reserved for worst cases that did not happen go back
    // to the pool. That changes no content, only which free pages the pool holds.
    auto* self = const_cast<CudaBackend*>(this);
    for (auto& [id, seq] : self->sequences_) {
      for (Layer& layer : seq.layers) self->settle_pages(layer);
    }
    MemoryStats stats;
    stats.layers.resize(static_cast<std::size_t>(cfg_.num_layers));
    // One statistics kernel per (sequence, layer) over its device block table, one download.
    constexpr std::size_t kStatsCounters = 5;  // see launch_block_stats
    const std::size_t counter_count = kStatsCounters * static_cast<std::size_t>(cfg_.num_layers);
    std::vector<unsigned long long> counters(counter_count, 0);
    DeviceBuffer device_counters(counter_count * sizeof(unsigned long long), stream_);
    check_cuda(cudaMemsetAsync(device_counters.data(), 0, device_counters.bytes(), stream_), "memory_stats memset");
    for (const auto& [id, seq] : sequences_) {
      for (std::size_t li = 0; li < seq.layers.size(); ++li) {
        const Layer& layer = seq.layers[li];
        check_cuda(
            launch_block_stats(geometry_, static_cast<const std::uint8_t* const*>(layer.table.data()), layer.num_blocks,
                               static_cast<unsigned long long*>(device_counters.data()) + kStatsCounters * li, stream_),
            "block statistics kernel launch");
      }
    }
    check_cuda(cudaMemcpyAsync(counters.data(), device_counters.data(), device_counters.bytes(), cudaMemcpyDeviceToHost,
                               stream_),
               "memory_stats download");
    check_cuda(cudaStreamSynchronize(stream_), "memory_stats");

    const format::SectionLayout kl = geometry_.k_layout(), vl = geometry_.v_layout();
    const std::size_t params =
        static_cast<std::size_t>(geometry_.num_heads) * (kl.param_count + vl.param_count) * sizeof(format::Params);
    const std::size_t token_bytes = row_ * 2 * sizeof(T);
    std::size_t live_bytes = 0, live_blocks = 0;
    for (const auto& [id, seq] : sequences_) {
      for (std::size_t li = 0; li < seq.layers.size(); ++li) {
        const Layer& layer = seq.layers[li];
        MemoryBreakdown& m = stats.layers[li];
        const std::size_t n = static_cast<std::size_t>(layer.num_blocks);
        m.params += n * params;
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
      const unsigned long long* c = counters.data() + kStatsCounters * li;
      const std::size_t payload = c[0], bytes = c[2];
      m.payload = payload;
      m.descriptors = c[1];
      m.k_section_bytes = c[3];
      m.v_section_bytes = c[4];
      m.headers = bytes - payload - m.params - m.descriptors - m.permutations;
      live_bytes += bytes;
      stats.total += m;
    }
    stats.pool.page_bytes = pool_.page_bytes();
    stats.pool.pages_reserved = pool_.pages();
    stats.pool.reserved_bytes = pool_.reserved_bytes();
    stats.pool.slot_bytes = pool_.pages_in_use() * pool_.page_bytes();  // pages handed to sequences
    stats.pool.live_bytes = live_bytes;
    stats.pool.live_blocks = live_blocks;
    stats.resident_bytes = resident_bytes();
    return stats;
  }

  // Same image as the CPU backend (docs/format.md): the blocks' bytes as stored, tails in T. The
  // device holds the block table and the blocks' sizes, so export downloads them: a transfer call
  // that waits for the stream (queued appends must be complete) and surfaces device errors.
  std::vector<std::uint8_t> export_sequence(SeqId id, std::span<const int> layers) const override {
    check_cuda(cudaStreamSynchronize(stream_), "export_sequence");
    raise_device_error();
    const std::lock_guard<std::mutex> lock(reader_mutex_);  // memory_stats may return pages meanwhile
    std::vector<int> chosen(layers.begin(), layers.end());
    if (chosen.empty()) {
      for (int l = 0; l < cfg_.num_layers; ++l) chosen.push_back(l);
    }
    std::vector<std::uint8_t> image(sizeof(::packkv::detail::ImageHeader));
    ::packkv::detail::ImageHeader header =
        ::packkv::detail::make_image_header(codec_, cfg_.k_mode, ::packkv::detail::dtype_code<T>());
    header.layer_count = static_cast<std::uint16_t>(chosen.size());
    std::memcpy(image.data(), &header, sizeof header);
    auto put = [&image](const void* data, std::size_t n) {
      const auto* p = static_cast<const std::uint8_t*>(data);
      image.insert(image.end(), p, p + n);
    };
    const Sequence& seq = sequences_.at(id);
    const std::size_t page_bytes = pool_.page_bytes();
    for (int l : chosen) {
      const Layer& layer = seq.layers[static_cast<std::size_t>(l)];
      const auto n = static_cast<std::size_t>(layer.num_blocks);
      // Where each block is: its table entry, then the page (owned by this layer) that holds it.
      std::vector<std::uint8_t*> table(n);
      if (n != 0) {
        check_cuda(cudaMemcpyAsync(table.data(), layer.table.data(), n * sizeof(std::uint8_t*), cudaMemcpyDeviceToHost,
                                   stream_),
                   "export_sequence (block table download)");
      }
      std::vector<std::pair<std::uint8_t*, std::size_t>> by_address;
      for (std::size_t i = 0; i < layer.pages.size(); ++i) by_address.emplace_back(layer.pages[i], i);
      std::sort(by_address.begin(), by_address.end());
      check_cuda(cudaStreamSynchronize(stream_), "export_sequence");
      std::vector<std::size_t> page_of(n);
      std::vector<std::vector<std::uint8_t>> copies(layer.pages.size());
      for (std::size_t b = 0; b < n; ++b) {
        auto it = std::upper_bound(by_address.begin(), by_address.end(),
                                   std::pair<std::uint8_t*, std::size_t>(table[b], SIZE_MAX));
        PACKKV_REQUIRE(it != by_address.begin() &&
                           static_cast<std::size_t>(table[b] - std::prev(it)->first) + sizeof(format::BlockHeader) <=
                               page_bytes,
                       fmt::format("export_sequence: block {} of sequence {} layer {} is not in the layer's pages "
                                   "(device state corrupt)",
                                   b, id, l));
        page_of[b] = std::prev(it)->second;
        std::vector<std::uint8_t>& copy = copies[page_of[b]];
        if (copy.empty()) {  // one download per page: blocks are packed back to back in it
          copy.resize(page_bytes);
          check_cuda(cudaMemcpyAsync(copy.data(), layer.pages[page_of[b]], page_bytes, cudaMemcpyDeviceToHost, stream_),
                     "export_sequence (page download)");
        }
      }
      // The tail rings of this layer: K ring then V ring, contiguous.
      std::vector<T> rings(2 * ring_elems());
      check_cuda(cudaMemcpyAsync(rings.data(), ring_k(seq, l), rings.size() * sizeof(T), cudaMemcpyDeviceToHost, stream_),
                 "export_sequence (tail download)");
      check_cuda(cudaStreamSynchronize(stream_), "export_sequence");

      ::packkv::detail::LayerRecord record{};
      record.layer = static_cast<std::uint32_t>(l);
      record.block_count = static_cast<std::uint32_t>(n);
      record.tail_tokens = static_cast<std::uint32_t>(layer.tail_len);
      record.length = static_cast<std::uint64_t>(layer.length);
      put(&record, sizeof record);
      std::vector<std::pair<const std::uint8_t*, std::uint32_t>> blocks(n);
      for (std::size_t b = 0; b < n; ++b) {
        const std::size_t offset = static_cast<std::size_t>(table[b] - layer.pages[page_of[b]]);
        const std::uint8_t* bytes = copies[page_of[b]].data() + offset;
        std::uint32_t size;
        std::memcpy(&size, bytes, sizeof size);  // BlockHeader::block_bytes
        // Checked so that a corrupt device state cannot make export read past its copy.
        PACKKV_REQUIRE(size >= geometry_.min_block_bytes() && size <= geometry_.max_block_bytes() &&
                           offset + size <= page_bytes,
                       fmt::format("export_sequence: block {} of sequence {} layer {} has impossible size {} "
                                   "(device state corrupt)",
                                   b, id, l, size));
        blocks[b] = {bytes, size};
        put(&size, 4);
      }
      for (const auto& [bytes, size] : blocks) put(bytes, size);
      // The ring in token order: source token j sits at slot (tail_start + j) mod capacity.
      for (int which = 0; which < 2; ++which) {
        const T* ring = rings.data() + static_cast<std::size_t>(which) * ring_elems();
        for (int j = 0; j < layer.tail_len; ++j) {
          put(ring + static_cast<std::size_t>((layer.tail_start + j) % tail_cap_) * row_, row_ * sizeof(T));
        }
      }
    }
    ::packkv::detail::seal_image(image);
    return image;
  }

  // Parses and validates on the host (the shared parser), checks every value and the budget for
  // everything the import and its re-appended tails can need, then places the blocks on the host
  // with the device's rule and uploads them. Nothing after the budget check can fail except a CUDA
  // call; then the sequence (or its layers) is put back as it was.
  void import_sequence(SeqId id, std::span<const std::uint8_t> image) override {
    using ::packkv::detail::ParsedLayer;
    // A kernel queued earlier must not report its error in the middle of this import.
    check_cuda(cudaStreamSynchronize(stream_), "import_sequence");
    raise_device_error();
    const int max_tail = static_cast<int>(std::min<std::size_t>(tail_cap_ + (std::size_t{1} << 20), 1u << 21));
    const std::vector<ParsedLayer> parsed =
        ::packkv::detail::parse_image(image, codec_, cfg_.k_mode, ::packkv::detail::dtype_code<T>(), sizeof(T),
                                      cfg_.num_layers, max_tail);

    struct Plan {
      std::vector<std::uint32_t> page, offset;  // each block's place, as place_kernel would choose
      PlacementCursor cursor{};                 // after the last block
      std::size_t pages = 0;                    // pages holding the blocks
      std::size_t pages_after = 0;              // and at worst once the tail is re-appended
      std::size_t table_capacity = 0, page_list_capacity = 0;
      std::vector<T> tail_k, tail_v;  // aligned copies of the image's tail rows
    };
    const bool creating = !contains(id);
    const int block = cfg_.block_tokens;
    const std::uint32_t page_bytes = static_cast<std::uint32_t>(pool_.page_bytes());
    std::vector<Plan> plans(parsed.size());
    std::size_t pages_total = 0, table_growth = 0, staging_bytes = 0, upload_bytes = 0;
    ::packkv::EncodeScratch scratch;
    std::vector<std::uint8_t> trial(geometry_.max_block_bytes());
    for (std::size_t i = 0; i < parsed.size(); ++i) {
      const ParsedLayer& p = parsed[i];
      Plan& plan = plans[i];
      const Layer* existing = creating ? nullptr : &layer_of(id, p.layer);
      PACKKV_REQUIRE(existing == nullptr || existing->length == 0,
                     fmt::format("import: layer {} of sequence {} is not empty", p.layer, id));

      for (const auto& b : p.blocks) {
        const auto size = static_cast<std::uint32_t>(b.size());
        if (plan.cursor.offset + size > page_bytes) {
          ++plan.cursor.page;
          plan.cursor.offset = 0;
        }
        plan.page.push_back(plan.cursor.page);
        plan.offset.push_back(plan.cursor.offset);
        plan.cursor.offset += size;
      }
      plan.pages = p.blocks.empty() ? 0 : plan.cursor.page + 1;

      // Tails are re-appended, and a smaller residual_tokens here compresses part of them. Their
      // values are checked, and the blocks they will form encoded once on the host, so that the
      // device cannot find a problem after this import has returned.
      const std::size_t n = static_cast<std::size_t>(p.tail_tokens) * row_;
      plan.tail_k.resize(n);
      plan.tail_v.resize(n);
      if (n != 0) {
        std::memcpy(plan.tail_k.data(), p.tail_k, n * sizeof(T));
        std::memcpy(plan.tail_v.data(), p.tail_v, n * sizeof(T));
      }
      PACKKV_REQUIRE(::packkv::detail::first_unstorable(plan.tail_k.data(), n) == n &&
                         ::packkv::detail::first_unstorable(plan.tail_v.data(), n) == n,
                     fmt::format("import: layer {} tail holds NaN, Inf or out-of-range values", p.layer));
      const std::int64_t tail_blocks = p.tail_tokens >= cfg_.residual_tokens + block
                                           ? (p.tail_tokens - cfg_.residual_tokens) / block
                                           : 0;
      for (std::int64_t b = 0; b < tail_blocks; ++b) {
        const std::size_t first = static_cast<std::size_t>(b * block) * row_;
        try {
          ::packkv::encode_block(codec_, plan.tail_k.data() + first, plan.tail_v.data() + first, row_, trial.data(),
                                 scratch);
        } catch (const ::packkv::error& e) {
          std::string what = e.what();
          if (what.rfind("packkv: ", 0) == 0) what.erase(0, 8);  // the prefix is added again below
          throw ::packkv::error(fmt::format("import: layer {} tail: {}", p.layer, what));
        }
      }

      // What append will want for those blocks, computed as append computes it, so that it finds
      // everything already reserved.
      Layer probe;
      probe.num_blocks = static_cast<int>(p.blocks.size());
      probe.seen_page = plan.cursor.page;
      probe.seen_offset = plan.cursor.offset;
      plan.pages_after = std::max(plan.pages, pages_bound(probe, tail_blocks));
      const std::size_t table_now = existing ? existing->table_capacity : 0;
      const std::size_t list_now = existing ? existing->page_list_capacity : 0;
      plan.table_capacity = table_now;
      while (plan.table_capacity < p.blocks.size() + static_cast<std::size_t>(tail_blocks)) {
        plan.table_capacity = std::max<std::size_t>(64, 2 * plan.table_capacity);
      }
      plan.page_list_capacity = list_now;
      while (plan.page_list_capacity < plan.pages_after) {
        plan.page_list_capacity = std::max<std::size_t>(16, 2 * plan.page_list_capacity);
      }
      table_growth += (plan.table_capacity - table_now + plan.page_list_capacity - list_now) * sizeof(void*);
      staging_bytes = std::max(staging_bytes, static_cast<std::size_t>(std::min(tail_blocks, blocks_per_round())) *
                                                  (slot_bytes_ + 4));
      upload_bytes = std::max(upload_bytes, 2 * n * sizeof(T));
      pages_total += plan.pages_after;
    }
    const std::size_t sequence_bytes =
        creating ? ring_bytes_per_sequence() + static_cast<std::size_t>(cfg_.num_layers) * sizeof(PlacementCursor) : 0;
    const std::size_t staging_growth = staging_bytes > staging_.bytes() ? staging_bytes - staging_.bytes() : 0;
    // The tails' upload buffer is short-lived but real device memory: it is counted too.
    check_budget(sequence_bytes + pool_.pages_to_allocate(pages_total) * pool_.page_bytes() + table_growth +
                     staging_growth + upload_bytes,
                 fmt::format("import of sequence {}", id));

    // Commit.
    std::vector<std::vector<std::uint8_t*>> tables(parsed.size());
    try {
      if (creating) add_sequence(id);
      pool_.reserve(pages_total, stream_);
      if (staging_.bytes() < staging_bytes) staging_ = DeviceBuffer(staging_bytes, stream_);
      Sequence& seq = sequences_.at(id);
      for (std::size_t i = 0; i < parsed.size(); ++i) {
        const ParsedLayer& p = parsed[i];
        Plan& plan = plans[i];
        Layer& layer = seq.layers[static_cast<std::size_t>(p.layer)];
        settle_pages(layer);  // an empty layer: gives back any page it might still hold
        if (plan.table_capacity != layer.table_capacity) grow(layer.table, layer.table_capacity, plan.table_capacity, 0);
        if (plan.page_list_capacity != layer.page_list_capacity) {
          grow(layer.page_list, layer.page_list_capacity, plan.page_list_capacity, 0);
        }
        add_pages(layer, plan.pages);
        // Blocks are back to back both in the image and in a page: one copy per page.
        for (std::size_t b = 0; b < p.blocks.size();) {
          std::size_t end = b + 1;
          while (end < p.blocks.size() && plan.page[end] == plan.page[b]) ++end;
          const std::size_t bytes = static_cast<std::size_t>(p.blocks[end - 1].data() + p.blocks[end - 1].size() -
                                                             p.blocks[b].data());
          check_cuda(cudaMemcpyAsync(layer.pages[plan.page[b]] + plan.offset[b], p.blocks[b].data(), bytes,
                                     cudaMemcpyHostToDevice, stream_),
                     "import_sequence (block upload)");
          b = end;
        }
        std::vector<std::uint8_t*>& table = tables[i];
        for (std::size_t b = 0; b < p.blocks.size(); ++b) table.push_back(layer.pages[plan.page[b]] + plan.offset[b]);
        publish_pointers(table, 0, static_cast<std::uint8_t**>(layer.table.data()));
        // The device cursor continues where the host placement ended (plan outlives the copy).
        check_cuda(cudaMemcpyAsync(static_cast<PlacementCursor*>(seq.cursors.data()) + p.layer, &plan.cursor,
                                   sizeof(PlacementCursor), cudaMemcpyHostToDevice, stream_),
                   "import_sequence (cursor upload)");
        layer.num_blocks = static_cast<int>(p.blocks.size());
        layer.seen_page = plan.cursor.page;
        layer.seen_offset = plan.cursor.offset;
        layer.unseen.clear();
        layer.tail_start = 0;
        layer.tail_len = 0;
        layer.length = static_cast<std::int64_t>(p.blocks.size()) * block;
      }
      // Tails through the normal append path, from one device buffer reused layer by layer.
      DeviceBuffer upload(upload_bytes, stream_);
      for (std::size_t i = 0; i < parsed.size(); ++i) {
        const int tokens = parsed[i].tail_tokens;
        if (tokens == 0) continue;
        const std::size_t n = static_cast<std::size_t>(tokens) * row_;
        T* dk = upload.as<T>();
        T* dv = dk + n;
        check_cuda(cudaMemcpyAsync(dk, plans[i].tail_k.data(), n * sizeof(T), cudaMemcpyHostToDevice, stream_),
                   "import_sequence (tail upload)");
        check_cuda(cudaMemcpyAsync(dv, plans[i].tail_v.data(), n * sizeof(T), cudaMemcpyHostToDevice, stream_),
                   "import_sequence (tail upload)");
        append(id, parsed[i].layer, dk, dv, tokens);
      }
      // The host buffers the copies read from (plans, tables, the image) are released on return.
      check_cuda(cudaStreamSynchronize(stream_), "import_sequence");
    } catch (...) {
      undo_import(id, creating, parsed);
      throw;
    }
  }

  void set_stream(void* stream) override {
    // Stream-ordered frees and page reuse assume one stream: finish the old one's work first.
    check_cuda(cudaStreamSynchronize(stream_), "set_stream (draining the previous stream)");
    stream_ = static_cast<cudaStream_t>(stream);
    for (auto& [id, seq] : sequences_) {
      seq.rings.set_stream(stream_);
      seq.cursors.set_stream(stream_);
      for (Layer& layer : seq.layers) {
        layer.table.set_stream(stream_);
        layer.page_list.set_stream(stream_);
      }
    }
    workspace_.set_stream(stream_);
    staging_.set_stream(stream_);
    error_claim_.set_stream(stream_);
    pool_.set_stream(stream_);
  }

 private:
  struct UnseenPlacement {
    std::uint32_t launch;
    int blocks;
  };
  struct Layer {
    int num_blocks = 0;
    DeviceBuffer table;  // device: std::uint8_t*[table_capacity]
    std::size_t table_capacity = 0;
    std::vector<std::uint8_t*> pages;  // pages owned, in placement order
    DeviceBuffer page_list;            // device copy of `pages`
    std::size_t page_list_capacity = 0;
    std::size_t progress_word = 0;  // index into progress_
    std::uint32_t seen_page = 0;    // cursor after the last placement seen complete
    std::uint32_t seen_offset = 0;
    std::deque<UnseenPlacement> unseen;  // placements queued but not yet seen complete
    int tail_start = 0;
    int tail_len = 0;
    std::int64_t length = 0;
  };
  struct Sequence {
    DeviceBuffer rings;    // per layer: K ring then V ring, [tail_cap][num_kv_heads][head_dim] each
    DeviceBuffer cursors;  // PlacementCursor per layer
    std::vector<Layer> layers;
  };
  struct Split {
    int splits;
    int units_per_split;
  };

  const Layer& layer_of(SeqId id, int layer) const { return sequences_.at(id).layers[static_cast<std::size_t>(layer)]; }

  std::int64_t blocks_per_round() const {
    return std::max<std::int64_t>(1, static_cast<std::int64_t>(kMaxStagingBytes / (slot_bytes_ + 4)));
  }

  // Best effort after a CUDA failure inside import: the sequence it created goes, layers it filled
  // are emptied again (their grown tables stay: capacity only).
  void undo_import(SeqId id, bool created, const std::vector<::packkv::detail::ParsedLayer>& parsed) noexcept {
    cudaStreamSynchronize(stream_);  // nothing queued by the import may still write what is undone
    auto it = sequences_.find(id);
    if (it == sequences_.end()) return;
    if (created) {
      erase_sequence(id);
      return;
    }
    for (const auto& p : parsed) {
      Layer& layer = it->second.layers[static_cast<std::size_t>(p.layer)];
      for (std::uint8_t* page : layer.pages) pool_.give(page);
      layer.pages.clear();
      layer.num_blocks = 0;
      layer.seen_page = layer.seen_offset = 0;
      layer.unseen.clear();
      layer.tail_start = layer.tail_len = 0;
      layer.length = 0;
      cudaMemsetAsync(static_cast<PlacementCursor*>(it->second.cursors.data()) + p.layer, 0, sizeof(PlacementCursor),
                      stream_);
    }
  }

  // No device-error check: import also uses it to undo a sequence it created.
  void erase_sequence(SeqId id) {
    auto it = sequences_.find(id);
    for (Layer& layer : it->second.layers) {
      for (std::uint8_t* page : layer.pages) pool_.give(page);
      // A kernel still queued may write the word; the next owner ignores launches it did not issue.
      progress_.give(layer.progress_word);
    }
    sequences_.erase(it);  // buffers are freed in stream order, after the kernels that used them
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
    std::size_t bytes = pool_.reserved_bytes() + workspace_.bytes() + staging_.bytes();
    for (const auto& [id, seq] : sequences_) {
      bytes += seq.rings.bytes() + seq.cursors.bytes();
      for (const Layer& layer : seq.layers) bytes += layer.table.bytes() + layer.page_list.bytes();
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

  // The device reports each placement's resulting cursor in a mapped word; placements the host has
  // seen complete no longer count at their worst case. No synchronisation: a stale word only
  // keeps the bound conservative.
  void refresh_placement(Layer& layer) const {
    const unsigned long long word = progress_.read(layer.progress_word);
    const std::uint32_t launch = progress_launch(word);
    for (std::size_t i = 0; i < layer.unseen.size(); ++i) {
      if (layer.unseen[i].launch != launch) continue;
      layer.unseen.erase(layer.unseen.begin(), layer.unseen.begin() + static_cast<std::ptrdiff_t>(i) + 1);
      layer.seen_page = progress_page(word);
      layer.seen_offset = progress_offset(word);
      return;
    }
  }

  // Learns what completed, then returns the pages no queued placement can reach any more.
  void settle_pages(Layer& layer) {
    refresh_placement(layer);
    const std::size_t needed = pages_bound(layer, 0);
    while (layer.pages.size() > needed) {
      pool_.give(layer.pages.back());
      layer.pages.pop_back();
    }
  }

  // Pages the layer may need once `new_blocks` more blocks are placed: from the last cursor seen,
  // what still fits in its page at worst-case size, then whole pages for the rest.
  std::size_t pages_bound(const Layer& layer, std::int64_t new_blocks) const {
    std::int64_t blocks = new_blocks;
    for (const UnseenPlacement& u : layer.unseen) blocks += u.blocks;
    if (layer.num_blocks + new_blocks == 0) return 0;
    const std::int64_t per_page = static_cast<std::int64_t>(blocks_per_page_worst_);
    const std::size_t left = layer.seen_offset < pool_.page_bytes() ? pool_.page_bytes() - layer.seen_offset : 0;
    const std::int64_t rest = std::max<std::int64_t>(0, blocks - static_cast<std::int64_t>(left / slot_bytes_));
    return static_cast<std::size_t>(layer.seen_page) + 1 + static_cast<std::size_t>((rest + per_page - 1) / per_page);
  }

  void add_pages(Layer& layer, std::size_t count) {
    if (count == 0) return;
    const std::size_t first = layer.pages.size();
    for (std::size_t i = 0; i < count; ++i) layer.pages.push_back(pool_.take());
    publish_pointers(layer.pages, first, static_cast<std::uint8_t**>(layer.page_list.data()) + first);
  }

  void raise_device_error(ErrorOrigin origin = ErrorOrigin::later_call) const {
    volatile DeviceError* record = error_host_;
    if (record->ready == 0) return;
    std::atomic_thread_fence(std::memory_order_acquire);
    DeviceError copy;
    std::memcpy(&copy, const_cast<DeviceError*>(record), sizeof copy);
    record->ready = 0;
    // Re-arms reporting in stream order: kernels queued before this point may not report again.
    check_cuda(cudaMemsetAsync(error_claim_.data(), 0, sizeof(int), stream_), "error claim reset");
    throw_device_error(copy, origin);
  }

  void validate_now(SeqId id, int layer_index, const Layer& layer, const T* k, const T* v, int n_tokens) {
    check_cuda(cudaStreamSynchronize(stream_), "append (strict validation)");
    raise_device_error();  // an earlier kernel's report is not this append's
    const ErrorContext errors{error_device_, static_cast<int*>(error_claim_.data()), id, layer_index, layer.length};
    check_cuda(launch_validate(k, v, n_tokens, cfg_.num_kv_heads, cfg_.head_dim, codec_.k_max_code, codec_.v_max_code,
                               cfg_.k_mode == QuantMode::per_token, errors, stream_),
               "validation kernel launch");
    check_cuda(cudaStreamSynchronize(stream_), "append (strict validation)");
    raise_device_error(ErrorOrigin::strict_append);
  }

  /// Replaces a device pointer array by a larger one, keeping its first `used` entries.
  void grow(DeviceBuffer& array, std::size_t& capacity, std::size_t new_capacity, std::size_t used) {
    DeviceBuffer bigger(new_capacity * sizeof(void*), stream_);
    if (used != 0) {
      check_cuda(cudaMemcpyAsync(bigger.data(), array.data(), used * sizeof(void*), cudaMemcpyDeviceToDevice, stream_),
                 "device table growth");
    }
    array = std::move(bigger);
    capacity = new_capacity;
  }

  // A few pointers travel as kernel parameters, which keeps a decode step free of host memory and
  // capturable in a CUDA graph; long lists (large prefills) are copied.
  void publish_pointers(const std::vector<std::uint8_t*>& host, std::size_t first, std::uint8_t** device) {
    const std::size_t count = host.size() - first;
    if (count <= static_cast<std::size_t>(kInlineTableEntries)) {
      TableEntries entries{};
      entries.count = static_cast<int>(count);
      for (std::size_t i = 0; i < count; ++i) entries.blocks[i] = host[first + i];
      check_cuda(launch_write_table(device, entries, stream_), "pointer table kernel launch");
    } else {
      check_cuda(
          cudaMemcpyAsync(device, host.data() + first, count * sizeof(std::uint8_t*), cudaMemcpyHostToDevice, stream_),
          "pointer table upload");
    }
  }

  TokenSource<T> token_source(const Sequence& seq, int layer_index, const Layer& layer, const T* k, const T* v) const {
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
    v.num_blocks = layer.num_blocks;
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
    return static_cast<float*>(workspace_.data());
  }

  CacheConfig cfg_;
  CodecParams codec_;
  format::BlockGeometry geometry_;
  std::size_t row_;
  int tail_cap_;
  int group_;
  int heads_per_cta_;
  int subgroups_;
  std::size_t slot_bytes_;
  PagePool pool_;
  std::size_t blocks_per_page_worst_;
  bool strict_;
  int sm_count_ = 1;
  cudaStream_t stream_ = nullptr;
  DeviceError* error_host_ = nullptr;
  DeviceError* error_device_ = nullptr;
  DeviceBuffer error_claim_;  // device memory: the claim word of the error record
  MappedWords progress_;
  std::uint32_t next_launch_ = 1;
  std::map<SeqId, Sequence> sequences_;
  DeviceBuffer staging_;  // worst-case slots of the blocks being encoded, then their sizes
  mutable DeviceBuffer workspace_;
  // PackedKVCache lets reading calls run concurrently. Those that share state serialise on this:
  // attention and attn_v launch a split pass and a merge through one workspace, which another
  // reader's launches between the two would overwrite; memory_stats hands pages back to the pool
  // and export reads the page lists.
  mutable std::mutex reader_mutex_;
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

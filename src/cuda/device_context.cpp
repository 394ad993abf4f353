#include "cuda/device_context.hpp"

#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cstring>

namespace packkv::detail::cuda {

namespace {
constexpr std::size_t kSlotAlign = 256;
/// Staging of one write's launch round (a worst-case slot per block).
constexpr std::size_t kMaxStagingBytes = std::size_t{256} << 20;
}  // namespace

CudaLayerStore::~CudaLayerStore() {
  const std::lock_guard lock(context_.mutex);
  context_.clear(*this);
  context_.stores.erase(this);
}

DeviceContext::DeviceContext(const CacheConfig& config, std::span<const CodecParams> layer_codecs_, std::size_t value_size)
    : layer_codecs(layer_codecs_.begin(), layer_codecs_.end()),
      widest(widest_geometry(layer_codecs_)),
      row_elems(static_cast<std::size_t>(config.num_kv_heads) * config.head_dim),
      value_bytes(value_size),
      num_q_heads(config.num_q_heads),
      group(config.num_q_heads / config.num_kv_heads),
      heads_per_cta(std::min(group, kMaxHeadsPerCta)),
      subgroups((group + heads_per_cta - 1) / heads_per_cta),
      median_repack(config.repack == RepackMethod::median),
      strict(config.cuda_strict),
      poll_errors(config.cuda_poll_errors),
      rotate_k(config.rotate_k),
      rotate_v(config.rotate_v),
      sink_tokens(config.sink_tokens),
      slot_bytes((widest.max_block_bytes() + kSlotAlign - 1) / kSlotAlign * kSlotAlign),
      // Eight worst-case blocks per page: the block that does not fit at a page's end wastes
      // about half a block per page (~6%), and a layer's last page is on average half empty.
      pool((8 * slot_bytes + 65535) / 65536 * 65536),
      blocks_per_page_worst(pool.page_bytes() / slot_bytes) {
  std::string why;
  if (device_count(&why) == 0) throw_error("Device::cuda requested but " + why);
  PACKKV_REQUIRE(config.repack != RepackMethod::greedy,
                 "the CUDA backend does not implement greedy repacking (its sequential pack-growing search "
                 "does not map to the GPU at an acceptable cost); use RepackMethod::median or none");
  int device = 0, shared_optin = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device), "query SM count");
  check_cuda(cudaDeviceGetAttribute(&shared_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "query shared memory");
  ReadShape shape{};
  shape.geometry = widest;
  shape.num_q_heads = num_q_heads;
  shape.group = group;
  shape.heads_per_cta = heads_per_cta;
  shape.subgroups = subgroups;
  fast = plan_fast_attention(shape, shared_optin);
  fast_scores = plan_fast_primitive(shape, shared_optin, format::Side::k);
  fast_attn_v = plan_fast_primitive(shape, shared_optin, format::Side::v);
  shape.group = kMaxHeadsPerCta;  // as many rows per CTA as the kernel takes (several queries)
  fast_multi = plan_fast_attention(shape, shared_optin);
  const std::size_t needed = std::max(encode_shared_bytes(widest), read_shared_bytes(widest));
  PACKKV_REQUIRE(needed <= static_cast<std::size_t>(shared_optin),
                 fmt::format("block_tokens {} x head_dim {} needs {} bytes of shared memory per CUDA block, the "
                             "device allows {}: use smaller blocks",
                             config.block_tokens, config.head_dim, needed, shared_optin));
  void* host = nullptr;
  check_cuda(cudaHostAlloc(&host, sizeof(DeviceError), cudaHostAllocMapped), "the mapped error record");
  error_host_ = static_cast<DeviceError*>(host);
  std::memset(host, 0, sizeof(DeviceError));
  check_cuda(cudaHostGetDevicePointer(reinterpret_cast<void**>(&error_device_), host, 0), "cudaHostGetDevicePointer");
  error_claim_ = DeviceBuffer(sizeof(int), stream);
  check_cuda(cudaMemsetAsync(error_claim_.data(), 0, sizeof(int), stream), "error claim initialisation");
}

DeviceContext::~DeviceContext() {
  cudaStreamSynchronize(stream);  // kernels may still write the mapped words freed below
  for (cudaEvent_t& e : join_events_) {
    if (e != nullptr) cudaEventDestroy(e);
  }
  workspace = DeviceBuffer();
  rotated_queries = DeviceBuffer();
  tickets = DeviceBuffer();
  launch_params = DeviceBuffer();
  staging = DeviceBuffer();
  error_claim_ = DeviceBuffer();
  pool = DevicePagePool(pool.page_bytes());
  cudaStreamSynchronize(stream);
  if (error_host_ != nullptr) cudaFreeHost(error_host_);
}

std::int64_t DeviceContext::blocks_per_round() const {
  return std::max<std::int64_t>(1, static_cast<std::int64_t>(kMaxStagingBytes / slot_bytes));
}

std::size_t DeviceContext::resident_bytes() const { return pool.reserved_bytes() + owned_bytes + scratch_bytes(); }

std::size_t DeviceContext::scratch_bytes() const {
  return staging.bytes() + workspace.bytes() + rotated_queries.bytes() + tickets.bytes() + launch_params.bytes() +
         error_claim_.bytes();
}

void DeviceContext::raise_device_error(ErrorOrigin origin) {
  if (poll_errors && origin == ErrorOrigin::later_call) return;  // left for poll_device_error()
  if (std::optional<std::string> message = take_device_error(origin)) detail::throw_error(*message);
}

std::optional<std::string> DeviceContext::take_device_error(ErrorOrigin origin) {
  volatile DeviceError* record = error_host_;
  if (record->ready == 0) return std::nullopt;
  std::atomic_thread_fence(std::memory_order_acquire);
  DeviceError copy;
  std::memcpy(&copy, const_cast<DeviceError*>(record), sizeof copy);
  record->ready = 0;
  // Re-arms reporting in stream order: kernels queued before this point may not report again.
  check_cuda(cudaMemsetAsync(error_claim_.data(), 0, sizeof(int), stream), "error claim reset");
  return device_error_message(copy, origin);
}

ErrorContext DeviceContext::errors_for(SeqId sequence, int layer) const {
  return ErrorContext{error_device_, error_claim_.as<int>(), sequence, layer};
}

void DeviceContext::refresh_placement(CudaLayerStore& store) {
  if (store.progress_word == kNoWord) return;
  const unsigned long long word = progress.read(store.progress_word);
  const std::uint32_t launch = progress_launch(word);
  for (std::size_t i = 0; i < store.unseen.size(); ++i) {
    if (store.unseen[i].launch != launch) continue;
    store.unseen.erase(store.unseen.begin(), store.unseen.begin() + static_cast<std::ptrdiff_t>(i) + 1);
    store.seen_page = progress_page(word);
    store.seen_offset = progress_offset(word);
    return;
  }
}

std::size_t DeviceContext::pages_bound(std::size_t blocks, std::uint32_t seen_page, std::uint32_t seen_offset,
                                       std::int64_t pending) const {
  if (blocks == 0) return 0;
  const auto per_page = static_cast<std::int64_t>(blocks_per_page_worst);
  const std::size_t left = seen_offset < pool.page_bytes() ? pool.page_bytes() - seen_offset : 0;
  const std::int64_t rest = std::max<std::int64_t>(0, pending - static_cast<std::int64_t>(left / slot_bytes));
  return static_cast<std::size_t>(seen_page) + 1 + static_cast<std::size_t>((rest + per_page - 1) / per_page);
}

std::size_t DeviceContext::pages_bound(const CudaLayerStore& store, std::int64_t new_blocks) const {
  std::int64_t pending = new_blocks;
  for (const UnseenPlacement& u : store.unseen) pending += u.blocks;
  return pages_bound(store.live_blocks + static_cast<std::size_t>(new_blocks), store.seen_page, store.seen_offset,
                     pending);
}

void DeviceContext::give_back_pages(CudaLayerStore& store, std::size_t keep) {
  while (store.pages.size() > std::max(keep, store.shared_pages)) {
    release_page(store.pages.back());
    store.pages.pop_back();
  }
}

void DeviceContext::release_page(std::uint8_t* page) {
  if (!page_extra_refs.empty()) {
    const auto it = page_extra_refs.find(page);
    if (it != page_extra_refs.end()) {
      if (--it->second == 0) page_extra_refs.erase(it);
      return;
    }
  }
  pool.give(page);
}

void DeviceContext::publish_pointers(const std::vector<std::uint8_t*>& host, std::size_t first,
                                     std::uint8_t** device) {
  const std::size_t count = host.size() - first;
  if (count == 0) return;
  if (count <= static_cast<std::size_t>(kInlineTableEntries)) {
    TableEntries entries{};
    entries.count = static_cast<int>(count);
    for (std::size_t i = 0; i < count; ++i) entries.blocks[i] = host[first + i];
    check_cuda(launch_write_table(device, entries, stream), "pointer table kernel launch");
  } else {
    // From pageable memory: the call returns once the driver has taken the bytes (docs/cuda.md).
    check_cuda(cudaMemcpyAsync(device, host.data() + first, count * sizeof(std::uint8_t*), cudaMemcpyHostToDevice, stream),
               "pointer table upload");
  }
}

void DeviceContext::clear(CudaLayerStore& store) {
  for (std::uint8_t* page : store.pages) release_page(page);
  store.pages.clear();
  store.shared_pages = 0;
  // A kernel still queued may write the word; the next owner ignores launches it did not issue.
  if (store.progress_word != kNoWord) progress.give(store.progress_word);
  store.progress_word = kNoWord;
  owned_bytes -= store.table.bytes() + store.page_list.bytes() + store.ring.bytes() + store.sinks.bytes();
  store.table = DeviceBuffer();  // freed in stream order, after the kernels that use it
  store.table_capacity = 0;
  store.page_list = DeviceBuffer();
  store.page_list_capacity = 0;
  store.ring = DeviceBuffer();
  store.ring_capacity = 0;
  store.sinks = DeviceBuffer();
  store.seen_page = store.seen_offset = 0;
  store.unseen.clear();
  store.live_bytes = 0;
  store.live_blocks = 0;
  store.repeated_blocks = 0;
}

unsigned* DeviceContext::ticket_words(std::size_t count) {
  if (tickets.bytes() < count * sizeof(unsigned)) {
    // The old counters are all zero (every launch's last CTA resets its own), so a new, larger
    // buffer only needs clearing once; the old one is freed in stream order.
    tickets = DeviceBuffer(count * sizeof(unsigned), stream);
    check_cuda(cudaMemsetAsync(tickets.data(), 0, tickets.bytes(), stream), "merge counters initialisation");
  }
  return tickets.as<unsigned>();
}

float* DeviceContext::workspace_floats(std::size_t floats) {
  if (workspace.bytes() < floats * sizeof(float)) {
    workspace = DeviceBuffer(std::max(floats * sizeof(float), 2 * workspace.bytes()), stream);
  }
  return workspace.as<float>();
}

void* DeviceContext::rotated_query_bytes(std::size_t bytes) {
  if (rotated_queries.bytes() < bytes) rotated_queries = DeviceBuffer(std::max(bytes, 2 * rotated_queries.bytes()), stream);
  return rotated_queries.data();
}

cudaEvent_t DeviceContext::join_event(int which) {
  cudaEvent_t& e = join_events_[which];
  if (e == nullptr) check_cuda(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "creating a stream-join event");
  return e;
}

CallerStream::CallerStream(DeviceContext& ctx, void* caller) : ctx_(ctx) {
  const auto stream = static_cast<cudaStream_t>(caller);
  if (stream == nullptr || stream == ctx.stream) return;
  cudaEvent_t before = ctx.join_event(0);
  ctx.join_event(1);  // made now, so that the destructor never has to
  check_cuda(cudaEventRecord(before, stream), "recording an event on the caller's stream");
  check_cuda(cudaStreamWaitEvent(ctx.stream, before, 0), "joining the caller's stream");
  caller_ = stream;
}

void CallerStream::finish() {
  if (caller_ == nullptr) return;
  const cudaStream_t caller = caller_;
  caller_ = nullptr;
  cudaEvent_t after = ctx_.join_event(1);
  check_cuda(cudaEventRecord(after, ctx_.stream), "recording an event on the cache's stream");
  check_cuda(cudaStreamWaitEvent(caller, after, 0), "joining back to the caller's stream");
}

CallerStream::~CallerStream() {
  if (caller_ == nullptr) return;
  cudaEvent_t after = ctx_.join_event(1);  // made by the constructor's call already
  if (cudaEventRecord(after, ctx_.stream) == cudaSuccess) cudaStreamWaitEvent(caller_, after, 0);
}

}  // namespace packkv::detail::cuda

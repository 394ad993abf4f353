// The CPU emulator's scheduler (one fiber per CUDA thread), its primitives and its CUDA runtime
// subset.
//
// Fibers switch with a few instructions on x86-64 (callee-saved registers and the stack pointer):
// the kernels meet a warp collective every few lines, and ucontext's signal-mask system calls
// would make the emulated tests minutes long. Other architectures use ucontext.
//
// Under ThreadSanitizer each fiber is a TSan fiber and fiber switches do not synchronise; what
// orders fibers is what orders CUDA threads (see sync_* below): a launch's start and end, each
// __syncthreads, each warp collective between the lanes of its mask, and atomics. The scheduler's
// own bookkeeping is hidden from TSan, and every block gets fresh shared memory so that one
// block's accesses are never compared with the next block's.
#include "emulator.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include <sys/mman.h>

#include "include/cuda_runtime_api.h"
#include "packkv/types.hpp"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif
#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
extern "C" {
void AnnotateIgnoreReadsBegin(const char* file, int line);
void AnnotateIgnoreReadsEnd(const char* file, int line);
void AnnotateIgnoreWritesBegin(const char* file, int line);
void AnnotateIgnoreWritesEnd(const char* file, int line);
}
#define PACKKV_EMULATOR_TSAN 1
#else
#define PACKKV_EMULATOR_TSAN 0
#endif

#if defined(__x86_64__)
extern "C" void packkv_emulator_switch(void** save_stack, void* load_stack);
asm(R"(
  .pushsection .text
  .globl packkv_emulator_switch
  .type packkv_emulator_switch, @function
packkv_emulator_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size packkv_emulator_switch, .-packkv_emulator_switch
  .popsection
)");
#else
#include <ucontext.h>
#endif

namespace packkv_emulator {

namespace {

constexpr std::size_t kStackBytes = 64 * 1024;
constexpr std::size_t kMaxSharedBytes = 227 * 1024;
constexpr unsigned char kPoison = 0xA5;  // fresh "device" memory: reading it unwritten shows up
constexpr unsigned kFullWarp = 0xFFFFFFFFu;
constexpr int kSyncRing = 64;  // TSan sync objects per lane, one per collective in flight

enum class FiberState { ready, at_block_barrier, at_warp_barrier, done };

struct PendingCopy {
  void* dst;
  const void* src;
  unsigned group;
};

struct Fiber {
#if defined(__x86_64__)
  void* stack_pointer;
#else
  ucontext_t context;
#endif
  char* stack;  ///< kStackBytes in the scheduler's stack region
  ThreadContext thread;
  FiberState state;
  unsigned mask;                     ///< of the collective it waits at
  std::vector<PendingCopy> copies;   ///< cp.async copies not yet waited for
  unsigned committed_groups;
  unsigned block_barriers;           ///< __syncthreads passed in this block
  unsigned collectives;              ///< warp collectives joined in this block
  int group_record;                  ///< the released collective it belongs to (TSan)
  void* tsan_fiber;
};

/// Which collective of each lane a released group was (TSan acquires the lanes' releases).
struct GroupRecord {
  unsigned mask;
  unsigned collective[32];
};

std::uint64_t seed_from_environment() {
  const char* text = std::getenv("PACKKV_EMULATOR_SEED");
  return text != nullptr ? std::strtoull(text, nullptr, 10) : 0;
}

/// The fibers' stacks, one mapping. Under ThreadSanitizer every block maps it afresh: unmapping
/// clears TSan's record of the previous block's stack accesses, which would otherwise look like
/// races between one block's thread and the next block's thread on the same stack.
struct StackRegion {
  char* base = nullptr;
  std::size_t bytes = 0;
  StackRegion() = default;
  StackRegion(const StackRegion&) = delete;
  StackRegion& operator=(const StackRegion&) = delete;
  ~StackRegion() {
    if (base != nullptr) munmap(base, bytes);
  }
  void map(std::size_t n) {
    if (base != nullptr) munmap(base, bytes);
    void* p = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) fail("cannot map the fiber stacks");
    base = static_cast<char*>(p);
    bytes = n;
  }
};

struct Scheduler {
#if defined(__x86_64__)
  void* main_stack_pointer;
#else
  ucontext_t main_context;
#endif
  void* main_tsan_fiber = nullptr;
  std::vector<Fiber> fibers;
  StackRegion stacks;
  Fiber* running = nullptr;
  BlockContext block{};
  std::unique_ptr<unsigned char[]> shared;
  std::size_t shared_bytes = 0;
  std::vector<unsigned char> slots;  // [threads][kSlotBytes]
  const std::function<void()>* body = nullptr;
  std::mt19937_64 rng;
  std::uint64_t seed = seed_from_environment();
  std::uint64_t launches = 0;
  // TSan sync objects: their addresses are what matters.
  char launch_start = 0, launch_end = 0;
  char block_sync[2] = {};
  std::vector<char> lane_sync;              // [threads][kSyncRing]
  std::vector<GroupRecord> group_records;   // [warps][kSyncRing]
  std::vector<unsigned> group_counts;       // [warps]
};

// One scheduler per host thread: a kernel runs to completion on the thread that launches it, so
// host threads (each with its own stream) launch concurrently as they do on a GPU.
Scheduler& scheduler() {
  static thread_local Scheduler s;
  return s;
}

// ---- ThreadSanitizer annotations (no-ops otherwise) --------------------------------------------

struct HiddenFromTsan {  // the scheduler's bookkeeping is not the kernel's memory traffic
#if PACKKV_EMULATOR_TSAN
  HiddenFromTsan() {
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
  }
  ~HiddenFromTsan() {
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
  }
#endif
};
void sync_release([[maybe_unused]] void* object) {
#if PACKKV_EMULATOR_TSAN
  __tsan_release(object);
#endif
}
void sync_acquire([[maybe_unused]] void* object) {
#if PACKKV_EMULATOR_TSAN
  __tsan_acquire(object);
#endif
}
void tsan_switch([[maybe_unused]] void* fiber) {
#if PACKKV_EMULATOR_TSAN
  __tsan_switch_to_fiber(fiber, __tsan_switch_to_fiber_no_sync);
#endif
}

// ---- fibers --------------------------------------------------------------------------------

void to_scheduler(Fiber* self) {
  Scheduler& s = scheduler();
  tsan_switch(s.main_tsan_fiber);
#if defined(__x86_64__)
  packkv_emulator_switch(&self->stack_pointer, s.main_stack_pointer);
#else
  swapcontext(&self->context, &s.main_context);
#endif
}

void to_fiber(Fiber* fiber) {
  Scheduler& s = scheduler();
  s.running = fiber;
  tsan_switch(fiber->tsan_fiber);
#if defined(__x86_64__)
  packkv_emulator_switch(&s.main_stack_pointer, fiber->stack_pointer);
#else
  swapcontext(&s.main_context, &fiber->context);
#endif
}

// A fiber's first frame: it runs the kernel body and hands control back for good.
void fiber_main() {
  Scheduler& s = scheduler();
  sync_acquire(&s.launch_start);
  (*s.body)();
  sync_release(&s.launch_end);
  Fiber* self;
  {
    HiddenFromTsan hidden;
    self = s.running;
    if (!self->copies.empty()) fail("a thread returned with cp.async copies it never waited for");
    self->state = FiberState::done;
  }
  to_scheduler(self);
  std::abort();  // a finished fiber is never resumed
}

void start_fiber(Fiber& f) {
#if defined(__SANITIZE_ADDRESS__)
  // A finished fiber's frames are abandoned, not unwound: clear their redzones before reuse.
  ASAN_UNPOISON_MEMORY_REGION(f.stack, kStackBytes);
#endif
#if defined(__x86_64__)
  // An initial frame that packkv_emulator_switch "returns" into: six zeroed callee-saved
  // registers, then fiber_main's address; the stack is 16-byte aligned at fiber_main's entry.
  auto top = reinterpret_cast<std::uintptr_t>(f.stack + kStackBytes) & ~std::uintptr_t{15};
  auto* frame = reinterpret_cast<void**>(top - 64);
  for (int i = 0; i < 6; ++i) frame[i] = nullptr;
  frame[6] = reinterpret_cast<void*>(&fiber_main);
  f.stack_pointer = frame;
#else
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack;
  f.context.uc_stack.ss_size = kStackBytes;
  f.context.uc_link = nullptr;
  makecontext(&f.context, fiber_main, 0);
#endif
  f.state = FiberState::ready;
  f.copies.clear();
  f.committed_groups = 0;
  f.block_barriers = 0;
  f.collectives = 0;
}

void wait_at(FiberState barrier) {
  Fiber* self = scheduler().running;
  {
    HiddenFromTsan hidden;
    self->state = barrier;
  }
  to_scheduler(self);
}

// ---- the block scheduler -------------------------------------------------------------------

/// Releases the warp collectives that every lane of their mask reached; a collective that cannot
/// complete is an error (when this runs, no fiber of the block can run).
bool release_collectives(std::size_t threads) {
  Scheduler& s = scheduler();
  bool released = false;
  for (std::size_t warp = 0; warp * 32 < threads; ++warp) {
    const std::size_t base = warp * 32, lanes = std::min<std::size_t>(32, threads - base);
    for (std::size_t lane = 0; lane < lanes; ++lane) {
      Fiber& f = s.fibers[base + lane];
      if (f.state != FiberState::at_warp_barrier) continue;
      const unsigned mask = f.mask;
      if (!(mask >> lane & 1u)) fail("a warp collective's mask does not hold the calling lane");
      if (lanes < 32 && (mask >> lanes) != 0) fail("a warp collective's mask names lanes the block does not have");
      for (std::size_t other = 0; other < lanes; ++other) {
        if (!(mask >> other & 1u)) continue;
        const Fiber& o = s.fibers[base + other];
        if (o.state == FiberState::done) fail("a lane of a warp collective's mask has returned (part of the warp)");
        if (o.state == FiberState::at_block_barrier)
          fail("a lane of a warp collective's mask waits at __syncthreads (part of the warp)");
        if (o.mask != mask) fail("the lanes of a warp collective passed different masks");
      }
      // Every lane of the mask is here: one group record per release (what TSan acquires).
      const unsigned record = s.group_counts[warp]++ % kSyncRing;
      GroupRecord& r = s.group_records[warp * kSyncRing + record];
      r.mask = mask;
      for (std::size_t other = 0; other < lanes; ++other) {
        if (!(mask >> other & 1u)) continue;
        Fiber& o = s.fibers[base + other];
        r.collective[other] = o.collectives - 1;
        o.group_record = static_cast<int>(warp * kSyncRing + record);
        o.state = FiberState::ready;
      }
      released = true;
    }
  }
  return released;
}

void run_block(std::size_t threads) {
  Scheduler& s = scheduler();
  for (std::size_t i = 0; i < threads; ++i) start_fiber(s.fibers[i]);
  std::vector<std::size_t> order(threads);
  std::iota(order.begin(), order.end(), std::size_t{0});
  for (;;) {
    if (s.seed != 0) std::shuffle(order.begin(), order.end(), s.rng);
    for (std::size_t i : order) {
      if (s.fibers[i].state == FiberState::ready) to_fiber(&s.fibers[i]);
    }
    std::size_t done = 0, at_barrier = 0;
    for (std::size_t i = 0; i < threads; ++i) {
      done += s.fibers[i].state == FiberState::done;
      at_barrier += s.fibers[i].state == FiberState::at_block_barrier;
    }
    if (done == threads) return;
    if (release_collectives(threads)) continue;
    if (at_barrier == threads - done) {
      if (done != 0) fail("__syncthreads after some threads of the block returned");
      for (std::size_t i = 0; i < threads; ++i) s.fibers[i].state = FiberState::ready;
      continue;
    }
    fail("no thread can make progress");
  }
}

}  // namespace

void fail(const char* why) {
  const Scheduler& s = scheduler();
  const int thread = s.running != nullptr ? s.running->thread.linear : -1;
  std::fprintf(stderr, "CUDA emulator: %s (block %u,%u,%u; thread %d)\n", why, s.block.block_idx.x,
               s.block.block_idx.y, s.block.block_idx.z, thread);
  std::abort();
}

ThreadContext& current_thread() { return scheduler().running->thread; }
BlockContext& current_block() { return scheduler().block; }

void block_barrier() {
  Scheduler& s = scheduler();
  void* object;
  {
    HiddenFromTsan hidden;
    object = &s.block_sync[s.running->block_barriers++ & 1u];
  }
  sync_release(object);
  wait_at(FiberState::at_block_barrier);
  sync_acquire(object);
}

void hide_from_race_detector([[maybe_unused]] bool hide) {
#if PACKKV_EMULATOR_TSAN
  if (hide) {
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
  } else {
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
  }
#endif
}

void warp_barrier(unsigned mask, bool orders_memory) {
  Scheduler& s = scheduler();
  Fiber* self;
  int warp;
  void* object;
  {
    HiddenFromTsan hidden;
    self = s.running;
    const int linear = self->thread.linear;
    warp = linear / 32;
    self->mask = mask;
    object = &s.lane_sync[static_cast<std::size_t>(linear) * kSyncRing + self->collectives++ % kSyncRing];
  }
  if (orders_memory) sync_release(object);
  wait_at(FiberState::at_warp_barrier);
#if PACKKV_EMULATOR_TSAN
  if (!orders_memory) return;
  GroupRecord record;
  {
    HiddenFromTsan hidden;
    record = s.group_records[static_cast<std::size_t>(self->group_record)];
  }
  for (int lane = 0; lane < 32; ++lane) {
    if (!(record.mask >> lane & 1u)) continue;
    sync_acquire(&s.lane_sync[static_cast<std::size_t>(warp * 32 + lane) * kSyncRing + record.collective[lane] % kSyncRing]);
  }
#else
  (void)warp;
#endif
}

unsigned char* dynamic_shared() { return scheduler().shared.get(); }

void require_shared(const void* p, std::size_t bytes, const char* what) {
  const Scheduler& s = scheduler();
  const auto* b = static_cast<const unsigned char*>(p);
  if (b < s.shared.get() || b + bytes > s.shared.get() + s.shared_bytes) fail(what);
}

void* warp_slot(int lane) {
  Scheduler& s = scheduler();
  const int warp = s.running->thread.linear / 32;
  return s.slots.data() + static_cast<std::size_t>(warp * 32 + lane) * kSlotBytes;
}

// ---- primitives ----------------------------------------------------------------------------

void cp_async_16(void* shared_dst, const void* global_src) {
  require_shared(shared_dst, 16, "cp.async destination outside shared memory");
  if ((reinterpret_cast<std::uintptr_t>(shared_dst) | reinterpret_cast<std::uintptr_t>(global_src)) % 16 != 0)
    fail("cp.async of 16 bytes from or to an address that is not 16-byte aligned");
  HiddenFromTsan hidden;
  Fiber* self = scheduler().running;
  self->copies.push_back(PendingCopy{shared_dst, global_src, self->committed_groups});
}

void cp_async_commit() {
  HiddenFromTsan hidden;
  ++scheduler().running->committed_groups;
}

void cp_async_wait(int newest_pending) {
  std::vector<PendingCopy> landing;
  {
    HiddenFromTsan hidden;
    Fiber* self = scheduler().running;
    const unsigned pending = static_cast<unsigned>(newest_pending);
    const unsigned complete_below = self->committed_groups > pending ? self->committed_groups - pending : 0u;
    auto& copies = self->copies;
    auto keep = std::stable_partition(copies.begin(), copies.end(),
                                      [&](const PendingCopy& c) { return c.group >= complete_below; });
    landing.assign(keep, copies.end());
    copies.erase(keep, copies.end());
  }
  // The copies are the thread's own accesses: TSan sees them here, where the data lands.
  for (const PendingCopy& c : landing) std::memcpy(c.dst, c.src, 16);
}

void ldmatrix(unsigned* out, int count, bool trans, const void* row_address) {
  const void* rows[32];
  warp_all_gather(kFullWarp, row_address, rows);
  const int lane = lane_id();
  for (int m = 0; m < count; ++m) {
    for (int r = 0; r < 8; ++r) {
      require_shared(rows[8 * m + r], 16, "ldmatrix row outside shared memory");
      if (reinterpret_cast<std::uintptr_t>(rows[8 * m + r]) % 16 != 0) fail("ldmatrix row not 16-byte aligned");
    }
    auto half_at = [&](int row, int col) {
      std::uint16_t h;
      std::memcpy(&h, static_cast<const unsigned char*>(rows[8 * m + row]) + 2 * col, 2);
      return static_cast<unsigned>(h);
    };
    const int g = lane / 4, t = lane % 4;
    out[m] = trans ? half_at(2 * t, g) | half_at(2 * t + 1, g) << 16 : half_at(g, 2 * t) | half_at(g, 2 * t + 1) << 16;
  }
}

void mma_m16n8k16(float* d, const unsigned* a, const unsigned* b, const float* c) {
  struct Fragments {
    unsigned a[4], b[2];
    float c[4];
  } mine{}, all[32];
  std::memcpy(mine.a, a, sizeof mine.a);
  std::memcpy(mine.b, b, sizeof mine.b);
  std::memcpy(mine.c, c, sizeof mine.c);
  warp_all_gather(kFullWarp, mine, all);
  auto half = [](unsigned word, int which) {
    return static_cast<double>(packkv::to_float(packkv::fp16_t::from_bits(static_cast<std::uint16_t>(word >> (16 * which)))));
  };
  double A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int i = 0; i < 2; ++i) {
      A[g][2 * t + i] = half(all[l].a[0], i);
      A[g + 8][2 * t + i] = half(all[l].a[1], i);
      A[g][2 * t + 8 + i] = half(all[l].a[2], i);
      A[g + 8][2 * t + 8 + i] = half(all[l].a[3], i);
      B[2 * t + i][g] = half(all[l].b[0], i);
      B[2 * t + 8 + i][g] = half(all[l].b[1], i);
    }
  }
  const int g = lane_id() / 4, t = lane_id() % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + (i % 2);
    double sum = c[i];
    for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
    d[i] = static_cast<float>(sum);
  }
}

void set_interleaving_seed(std::uint64_t seed) { scheduler().seed = seed; }
std::uint64_t launch_count() { return scheduler().launches; }
std::vector<LaunchRecord>& detail_launches() {
  thread_local std::vector<LaunchRecord> records;
  return records;
}
const std::vector<LaunchRecord>& launches() { return detail_launches(); }
std::vector<StreamWait>& detail_stream_waits() {
  thread_local std::vector<StreamWait> waits;
  return waits;
}
const std::vector<StreamWait>& stream_waits() { return detail_stream_waits(); }

void launch(dim3 grid, dim3 block, std::size_t shared_bytes, std::function<void()> body, const char* kernel) {
  Scheduler& s = scheduler();
  detail_launches().push_back({kernel != nullptr ? kernel : "", grid, block});
  if (shared_bytes > kMaxSharedBytes) fail("dynamic shared memory above the device limit");
  const std::size_t threads = static_cast<std::size_t>(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024) fail("a block of 0 or more than 1024 threads");
  sync_release(&s.launch_start);  // what the host wrote before the launch is visible to the kernel
  {
    HiddenFromTsan hidden;
    s.rng.seed(s.seed * 0x9E3779B97F4A7C15ull + s.launches++);
#if PACKKV_EMULATOR_TSAN
    if (s.main_tsan_fiber == nullptr) s.main_tsan_fiber = __tsan_get_current_fiber();
#endif
    if (s.fibers.size() < threads) s.fibers.resize(threads);
    auto assign_stacks = [&] {
      if (PACKKV_EMULATOR_TSAN || s.stacks.bytes < threads * kStackBytes) s.stacks.map(threads * kStackBytes);
      for (std::size_t i = 0; i < threads; ++i) s.fibers[i].stack = s.stacks.base + i * kStackBytes;
    };
    s.body = &body;
    s.shared_bytes = shared_bytes + 16;
    s.slots.assign((threads + 31) / 32 * 32 * kSlotBytes, 0);
    s.lane_sync.assign((threads + 31) / 32 * 32 * kSyncRing, 0);
    s.group_records.assign((threads + 31) / 32 * kSyncRing, GroupRecord{});
    s.group_counts.assign((threads + 31) / 32, 0);
    s.block.block_dim = block;
    s.block.grid_dim = grid;
    for (std::size_t i = 0; i < threads; ++i) {
      ThreadContext& t = s.fibers[i].thread;
      t.linear = static_cast<int>(i);
      t.thread_idx = uint3{static_cast<unsigned>(i % block.x), static_cast<unsigned>(i / block.x % block.y),
                           static_cast<unsigned>(i / (static_cast<std::size_t>(block.x) * block.y))};
    }
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          s.block.block_idx = uint3{x, y, z};
          // Fresh shared memory per block: to TSan, a new block's threads never touched it.
          s.shared.reset();
          s.shared = std::make_unique<unsigned char[]>(s.shared_bytes);
          std::memset(s.shared.get(), kPoison, s.shared_bytes);
          assign_stacks();
#if PACKKV_EMULATOR_TSAN
          // New TSan fibers per block: thread i of one block is not thread i of the next, so a
          // race between blocks (a missing atomic or fence) is reported too.
          for (std::size_t i = 0; i < threads; ++i) s.fibers[i].tsan_fiber = __tsan_create_fiber(0);
#endif
          run_block(threads);
#if PACKKV_EMULATOR_TSAN
          for (std::size_t i = 0; i < threads; ++i) __tsan_destroy_fiber(s.fibers[i].tsan_fiber);
#endif
        }
      }
    }
    s.body = nullptr;
    s.running = nullptr;
  }
  sync_acquire(&s.launch_end);  // and what the kernel wrote is visible to the host after it
}

}  // namespace packkv_emulator

// ---- the runtime subset ------------------------------------------------------------------------

const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error (CPU emulator)" : "error (CPU emulator)";
}
const char* cudaGetErrorName(cudaError_t error) { return error == cudaSuccess ? "cudaSuccess" : "cudaError"; }
cudaError_t cudaGetLastError() { return cudaSuccess; }
cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int) {
  // Sixteen SMs: enough for the split heuristic to cut single sequences into several CTAs.
  *value = attribute == cudaDevAttrMultiProcessorCount ? 16 : static_cast<int>(227 * 1024);
  return cudaSuccess;
}
cudaError_t cudaMalloc(void** pointer, std::size_t bytes) {
  // 256-byte aligned like cudaMalloc, and exactly `bytes` long so that ASan sees any overrun.
  if (posix_memalign(pointer, 256, bytes ? bytes : 1) != 0) return cudaErrorMemoryAllocation;
  std::memset(*pointer, 0xA5, bytes);
  return cudaSuccess;
}
cudaError_t cudaFree(void* pointer) {
  std::free(pointer);
  return cudaSuccess;
}
cudaError_t cudaMallocAsync(void** pointer, std::size_t bytes, cudaStream_t) { return cudaMalloc(pointer, bytes); }
cudaError_t cudaFreeAsync(void* pointer, cudaStream_t) { return cudaFree(pointer); }
cudaError_t cudaHostAlloc(void** pointer, std::size_t bytes, unsigned) { return cudaMalloc(pointer, bytes); }
cudaError_t cudaHostGetDevicePointer(void** device, void* host, unsigned) {
  *device = host;
  return cudaSuccess;
}
cudaError_t cudaFreeHost(void* pointer) { return cudaFree(pointer); }
cudaError_t cudaMemcpy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind) {
  if (bytes) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind, cudaStream_t) {
  return cudaMemcpy(dst, src, bytes, kind);
}
cudaError_t cudaMemset(void* dst, int value, std::size_t bytes) {
  if (bytes) std::memset(dst, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* dst, int value, std::size_t bytes, cudaStream_t) {
  return cudaMemset(dst, value, bytes);
}
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
// Kernels complete at launch, so a stream is only a distinct handle.
cudaError_t cudaStreamCreate(cudaStream_t* stream) {
  *stream = reinterpret_cast<cudaStream_t>(new char);
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  delete reinterpret_cast<char*>(stream);
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }

// Kernels complete at launch, so an event only remembers where it was recorded, for the log of
// stream waits that tests read.
struct CUevent_st {
  cudaStream_t stream = nullptr;
  std::uint64_t launches = 0;
  bool recorded = false;
};
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned) {
  *event = new CUevent_st;
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t event) {
  delete event;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  event->stream = stream;
  event->launches = packkv_emulator::launch_count();
  event->recorded = true;
  return cudaSuccess;
}
cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned) {
  if (!event->recorded) return cudaSuccess;  // an event never recorded is complete
  packkv_emulator::detail_stream_waits().push_back({stream, event->stream, event->launches});
  return cudaSuccess;
}

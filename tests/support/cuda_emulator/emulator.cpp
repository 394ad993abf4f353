// The CPU emulator's scheduler (one fiber per CUDA thread) and its CUDA runtime subset.
//
// Fibers switch with a few instructions on x86-64 (callee-saved registers and the stack pointer):
// the kernels meet a warp collective every few lines, and ucontext's signal-mask system calls
// would make the emulated tests minutes long. Other architectures use ucontext.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "include/cuda_runtime_api.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
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

enum class FiberState { ready, at_block_barrier, at_warp_barrier, done };

struct Fiber {
#if defined(__x86_64__)
  void* stack_pointer;
#else
  ucontext_t context;
#endif
  std::unique_ptr<char[]> stack;
  ThreadContext thread;
  FiberState state;
};

struct Scheduler {
#if defined(__x86_64__)
  void* main_stack_pointer;
#else
  ucontext_t main_context;
#endif
  std::vector<Fiber> fibers;
  Fiber* running = nullptr;
  BlockContext block{};
  std::vector<unsigned char> shared;
  std::vector<std::uint64_t> warp_slots;
  const std::function<void()>* body = nullptr;
};

// One scheduler per host thread: a kernel runs to completion on the thread that launches it, so
// host threads (each with its own stream) launch concurrently as they do on a GPU.
Scheduler& scheduler() {
  static thread_local Scheduler s;
  return s;
}

void to_scheduler(Fiber* self) {
  Scheduler& s = scheduler();
#if defined(__x86_64__)
  packkv_emulator_switch(&self->stack_pointer, s.main_stack_pointer);
#else
  swapcontext(&self->context, &s.main_context);
#endif
}

void to_fiber(Fiber* fiber) {
  Scheduler& s = scheduler();
  s.running = fiber;
#if defined(__x86_64__)
  packkv_emulator_switch(&s.main_stack_pointer, fiber->stack_pointer);
#else
  swapcontext(&s.main_context, &fiber->context);
#endif
}

// A fiber's first frame: it runs the kernel body and hands control back for good.
void fiber_main() {
  Scheduler& s = scheduler();
  (*s.body)();
  s.running->state = FiberState::done;
  to_scheduler(s.running);
  std::abort();  // a finished fiber is never resumed
}

void start_fiber(Fiber& f) {
#if defined(__SANITIZE_ADDRESS__)
  // A finished fiber's frames are abandoned, not unwound: clear their redzones before reuse.
  ASAN_UNPOISON_MEMORY_REGION(f.stack.get(), kStackBytes);
#endif
#if defined(__x86_64__)
  // An initial frame that packkv_emulator_switch "returns" into: six zeroed callee-saved
  // registers, then fiber_main's address; the stack is 16-byte aligned at fiber_main's entry.
  auto top = reinterpret_cast<std::uintptr_t>(f.stack.get() + kStackBytes) & ~std::uintptr_t{15};
  auto* frame = reinterpret_cast<void**>(top - 64);
  for (int i = 0; i < 6; ++i) frame[i] = nullptr;
  frame[6] = reinterpret_cast<void*>(&fiber_main);
  f.stack_pointer = frame;
#else
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack.get();
  f.context.uc_stack.ss_size = kStackBytes;
  f.context.uc_link = nullptr;
  makecontext(&f.context, fiber_main, 0);
#endif
  f.state = FiberState::ready;
}

void wait_at(FiberState barrier) {
  Fiber* self = scheduler().running;
  self->state = barrier;
  to_scheduler(self);
}

[[noreturn]] void deadlock(const char* why) {
  std::fprintf(stderr, "CUDA emulator: %s (block %u,%u,%u)\n", why, scheduler().block.block_idx.x,
               scheduler().block.block_idx.y, scheduler().block.block_idx.z);
  std::abort();
}

void run_block(std::size_t threads) {
  Scheduler& s = scheduler();
  for (std::size_t i = 0; i < threads; ++i) start_fiber(s.fibers[i]);
  for (;;) {
    for (std::size_t i = 0; i < threads; ++i) {
      Fiber& f = s.fibers[i];
      if (f.state != FiberState::ready) continue;
      to_fiber(&f);
    }
    // Release a warp whose live lanes all wait at a warp collective, else the block barrier.
    bool released = false;
    std::size_t done = 0;
    for (std::size_t warp = 0; warp * 32 < threads; ++warp) {
      std::size_t waiting = 0, live = 0;
      for (std::size_t i = warp * 32; i < std::min(threads, warp * 32 + 32); ++i) {
        if (s.fibers[i].state == FiberState::done) continue;
        ++live;
        if (s.fibers[i].state == FiberState::at_warp_barrier) ++waiting;
      }
      done += std::min(threads, warp * 32 + 32) - warp * 32 - live;
      if (live != 0 && waiting == live) {
        for (std::size_t i = warp * 32; i < std::min(threads, warp * 32 + 32); ++i) {
          if (s.fibers[i].state == FiberState::at_warp_barrier) s.fibers[i].state = FiberState::ready;
        }
        released = true;
      } else if (waiting != 0) {
        bool others_blocked = true;
        for (std::size_t i = warp * 32; i < std::min(threads, warp * 32 + 32); ++i) {
          if (s.fibers[i].state == FiberState::ready) others_blocked = false;
        }
        if (others_blocked) deadlock("a warp collective was reached by only part of the warp");
      }
    }
    if (done == threads) return;
    if (released) continue;
    std::size_t at_barrier = 0;
    for (std::size_t i = 0; i < threads; ++i) at_barrier += s.fibers[i].state == FiberState::at_block_barrier;
    if (at_barrier == threads - done) {
      if (done != 0) deadlock("__syncthreads after some threads of the block returned");
      for (std::size_t i = 0; i < threads; ++i) s.fibers[i].state = FiberState::ready;
      continue;
    }
    deadlock("no thread can make progress");
  }
}

}  // namespace

ThreadContext& current_thread() { return scheduler().running->thread; }
BlockContext& current_block() { return scheduler().block; }
void block_barrier() { wait_at(FiberState::at_block_barrier); }
void warp_barrier() { wait_at(FiberState::at_warp_barrier); }
unsigned char* dynamic_shared() { return scheduler().shared.data(); }

void launch(dim3 grid, dim3 block, std::size_t shared_bytes, std::function<void()> body) {
  Scheduler& s = scheduler();
  if (shared_bytes > kMaxSharedBytes) deadlock("dynamic shared memory above the device limit");
  const std::size_t threads = static_cast<std::size_t>(block.x) * block.y * block.z;
  while (s.fibers.size() < threads) {
    Fiber f{};
    f.stack = std::make_unique<char[]>(kStackBytes);
    s.fibers.push_back(std::move(f));
  }
  s.body = &body;
  s.shared.assign(shared_bytes + 16, kPoison);
  s.warp_slots.assign((threads + 31) / 32 * 32, 0);
  s.block.block_dim = block;
  s.block.grid_dim = grid;
  s.block.shared = s.shared.data();
  s.block.warp_slots = s.warp_slots.data();
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
        std::memset(s.shared.data(), kPoison, s.shared.size());
        run_block(threads);
      }
    }
  }
  s.body = nullptr;
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
  *pointer = std::malloc(bytes ? bytes : 1);
  if (*pointer == nullptr) return cudaErrorMemoryAllocation;
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

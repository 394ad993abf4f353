// A CPU emulator of the CUDA features packkv's kernels use, strict enough that the mistakes a GPU
// would punish fail here first: kernels' logic is tested against the CPU backend on machines
// without a GPU (build machines, CI).
//
// Every CUDA thread of a block is a fiber; __syncthreads and the warp collectives (shuffles,
// ballot, __syncwarp, ldmatrix, mma) are the points at which fibers switch. Blocks run one after
// another and a launch completes before it returns, so streams are trivially ordered. Device
// memory is host memory; fresh device and shared memory hold a poison pattern.
//
// What makes it strict (emulator.cpp has the details):
// - Interleaving: with PACKKV_EMULATOR_SEED set to a non-zero number, the threads of a block run
//   in a new random order between every two barriers, so that code relying on one order shows it.
// - Races: built with -fsanitize=thread, every fiber is a ThreadSanitizer fiber and only the CUDA
//   synchronisation (barriers, collectives, atomics, kernel boundaries) orders them, so any two
//   threads touching a location between barriers, one of them writing, are reported.
// - Collectives: every lane of a collective passes the same mask, the mask holds the calling lane,
//   every lane of the mask arrives (none has returned or waits at __syncthreads) and a shuffle reads
//   only lanes of the mask.
// - Asynchronous copies (cp.async) land only when the issuing thread waits for their group, so a
//   missing wait reads poison; ldmatrix and cp.async addresses must be aligned and in shared memory.
// What it cannot find: races that need the hardware's memory model (it runs one block at a time),
// and performance problems.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

using std::isfinite;  // device code calls the unqualified CUDA math functions

struct uint3 {
  unsigned x, y, z;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace packkv_emulator {

struct ThreadContext {
  uint3 thread_idx;
  int linear;
};
struct BlockContext {
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};

ThreadContext& current_thread();
BlockContext& current_block();
inline int lane_id() { return current_thread().linear & 31; }

void block_barrier();
/// A warp collective: waits until every lane of `mask` arrives with the same mask (see above).
/// Only __syncwarp orders memory (`orders_memory`); shuffles, ballots, ldmatrix and mma exchange
/// registers, and to ThreadSanitizer memory accesses around them stay unordered, as on a GPU.
void warp_barrier(unsigned mask, bool orders_memory);
/// Marks the emulator's own accesses (the exchange slots) as invisible to ThreadSanitizer.
void hide_from_race_detector(bool hide);
unsigned char* dynamic_shared();
/// Aborts with `what` unless [p, p + bytes) lies in the block's dynamic shared memory.
void require_shared(const void* p, std::size_t bytes, const char* what);
[[noreturn]] void fail(const char* why);

/// Bytes a lane may deposit in one collective.
inline constexpr std::size_t kSlotBytes = 64;
/// The calling lane's deposit slot and lane `lane`'s (same warp), valid between the two barriers
/// of one collective.
void* warp_slot(int lane);

/// Every lane of `mask` deposits `mine`; `all[l]` receives lane l's deposit for l in the mask.
template <class T>
void warp_all_gather(unsigned mask, const T& mine, T* all) {
  static_assert(sizeof(T) <= kSlotBytes, "warp_all_gather: deposit too large");
  if (!(mask >> lane_id() & 1u)) fail("a warp collective's mask does not hold the calling lane");
  hide_from_race_detector(true);
  std::memcpy(warp_slot(lane_id()), &mine, sizeof mine);
  hide_from_race_detector(false);
  warp_barrier(mask, false);
  hide_from_race_detector(true);
  for (int l = 0; l < 32; ++l) {
    if (mask >> l & 1u) std::memcpy(&all[l], warp_slot(l), sizeof(T));
  }
  hide_from_race_detector(false);
  warp_barrier(mask, false);  // slots are rewritten by the next collective
}

/// Every lane of `mask` deposits a value; each gets the value of lane `source`, which must be in
/// the mask; `source` < 0 returns the caller's own value (shfl_up/down past the warp's edge).
template <class T>
T exchange(unsigned mask, T value, int source) {
  static_assert(sizeof(T) <= 8, "exchange: at most 8 bytes");
  if (!(mask >> lane_id() & 1u)) fail("a warp collective's mask does not hold the calling lane");
  if (source >= 0 && !(mask >> source & 1u)) fail("a shuffle reads a lane outside its mask");
  hide_from_race_detector(true);
  std::memcpy(warp_slot(lane_id()), &value, sizeof value);
  hide_from_race_detector(false);
  warp_barrier(mask, false);
  T result = value;
  hide_from_race_detector(true);
  if (source >= 0) std::memcpy(&result, warp_slot(source), sizeof result);
  hide_from_race_detector(false);
  warp_barrier(mask, false);
  return result;
}

// ---- the primitives of kernels/detail/primitives.cuh, with the PTX semantics ----------------

/// cp.async.cg.shared.global, 16 bytes: queued until the thread waits for its group.
void cp_async_16(void* shared_dst, const void* global_src);
void cp_async_commit();
/// cp.async.wait_group n: completes every committed group but the newest n.
void cp_async_wait(int newest_pending);
/// ldmatrix.sync.aligned.m8n8.x{count}[.trans].shared.b16: lane l supplies the row address of
/// row l % 8 of matrix l / 8 (lanes beyond 8 * count are ignored); out[i] receives matrix i.
void ldmatrix(unsigned* out, int count, bool trans, const void* row_address);
/// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32: d = a * b + c with every lane's fragments
/// as the PTX ISA lays them out. Products are exact and each output is summed in double, then
/// rounded once to float: at least as accurate as the tensor cores (which truncate), so a test
/// tolerance that passes on the hardware passes here.
void mma_m16n8k16(float* d, const unsigned* a, const unsigned* b, const float* c);

/// Kernel launches made by this host thread so far (tests count what a call launches).
std::uint64_t launch_count();

/// One launch: the kernel as PACKKV_LAUNCH names it (say "encode_kernel<T>"; "" when launched
/// without a name), its grid and its block.
struct LaunchRecord {
  const char* kernel;
  dim3 grid;
  dim3 block;
};
/// The launches made by this host thread so far, in order (tests check how a call launches).
const std::vector<LaunchRecord>& launches();

/// One cudaStreamWaitEvent made by this host thread: `waiter` waits for the event last recorded
/// on `recorded_on` when launch_count() was `launches_before` (tests check how streams are joined).
struct StreamWait {
  const void* waiter;
  const void* recorded_on;
  std::uint64_t launches_before;
};
/// The waits made by this host thread so far.
const std::vector<StreamWait>& stream_waits();

/// The seed of the interleaving of later launches on this host thread (0: threads in index order).
/// It starts as PACKKV_EMULATOR_SEED.
void set_interleaving_seed(std::uint64_t seed);

/// `kernel` (a string literal, or null) names the launch in launches().
void launch(dim3 grid, dim3 block, std::size_t shared_bytes, std::function<void()> body, const char* kernel = nullptr);
inline void launch(unsigned grid, unsigned block, std::size_t shared_bytes, std::function<void()> body,
                   const char* kernel = nullptr) {
  launch(dim3(grid), dim3(block), shared_bytes, std::move(body), kernel);
}
inline void launch(int grid, int block, std::size_t shared_bytes, std::function<void()> body,
                   const char* kernel = nullptr) {
  launch(dim3(static_cast<unsigned>(grid)), dim3(static_cast<unsigned>(block)), shared_bytes, std::move(body), kernel);
}
inline void launch(dim3 grid, int block, std::size_t shared_bytes, std::function<void()> body,
                   const char* kernel = nullptr) {
  launch(grid, dim3(static_cast<unsigned>(block)), shared_bytes, std::move(body), kernel);
}
inline void launch(unsigned grid, int block, std::size_t shared_bytes, std::function<void()> body,
                   const char* kernel = nullptr) {
  launch(dim3(grid), dim3(static_cast<unsigned>(block)), shared_bytes, std::move(body), kernel);
}

/// Acquire-release atomics: ThreadSanitizer sees them as atomics, and the synchronisation they
/// give stands in for the __threadfence that must precede them on a GPU.
template <class T>
T atomic_fetch_add(T* address, T value) {
  return __atomic_fetch_add(address, value, __ATOMIC_ACQ_REL);
}
template <class T>
T atomic_exchange(T* address, T value) {
  return __atomic_exchange_n(address, value, __ATOMIC_ACQ_REL);
}
template <class T>
T atomic_compare_exchange(T* address, T compare, T value) {
  __atomic_compare_exchange_n(address, &compare, value, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
  return compare;  // the old value either way
}

}  // namespace packkv_emulator

#define threadIdx (::packkv_emulator::current_thread().thread_idx)
#define blockIdx (::packkv_emulator::current_block().block_idx)
#define blockDim (::packkv_emulator::current_block().block_dim)
#define gridDim (::packkv_emulator::current_block().grid_dim)

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// Static shared memory would outlive its block here (and look shared between blocks to the race
// detector): kernels carve dynamic shared memory instead (PACKKV_DYNAMIC_SHARED).
#define __shared__ static_shared_memory_is_not_emulated_use_dynamic_shared_memory
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

inline void __syncthreads() { packkv_emulator::block_barrier(); }
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) { packkv_emulator::warp_barrier(mask, true); }
inline void __threadfence() {}
inline void __threadfence_system() {}

template <class T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  return packkv_emulator::exchange(mask, value, (packkv_emulator::lane_id() ^ lane_mask) & 31);
}
template <class T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta) {
  const int lane = packkv_emulator::lane_id();
  return packkv_emulator::exchange(mask, value, lane >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : -1);
}
template <class T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta) {
  const int lane = packkv_emulator::lane_id();
  return packkv_emulator::exchange(mask, value, lane + static_cast<int>(delta) < 32 ? lane + static_cast<int>(delta) : -1);
}
template <class T>
T __shfl_sync(unsigned mask, T value, int source) {
  return packkv_emulator::exchange(mask, value, source & 31);
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  int all[32];
  packkv_emulator::warp_all_gather(mask, predicate ? 1 : 0, all);
  unsigned result = 0;
  for (int lane = 0; lane < 32; ++lane) result |= (mask >> lane & 1u) && all[lane] ? 1u << lane : 0u;
  return result;
}
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(unsigned x) { return x == 0 ? 32 : __builtin_clz(x); }

/// PRMT: byte i of the result is byte (selector >> 4i) & 7 of the 8 bytes {b, a}.
inline unsigned __byte_perm(unsigned a, unsigned b, unsigned selector) {
  const unsigned long long bytes = (static_cast<unsigned long long>(b) << 32) | a;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<unsigned>(bytes >> (8 * ((selector >> (4 * i)) & 7u)) & 0xFFu) << (8 * i);
  return r;
}
/// SHF.R with the shift clamped to 32: the low word of {hi, lo} >> min(shift, 32).
inline unsigned __funnelshift_rc(unsigned lo, unsigned hi, unsigned shift) {
  const unsigned long long both = (static_cast<unsigned long long>(hi) << 32) | lo;
  return static_cast<unsigned>(both >> (shift < 32 ? shift : 32));
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  const unsigned long long both = (static_cast<unsigned long long>(hi) << 32) | lo;
  return static_cast<unsigned>(both >> (shift & 31u));
}
inline float __uint_as_float(unsigned x) {
  float f;
  std::memcpy(&f, &x, sizeof f);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned x;
  std::memcpy(&x, &f, sizeof x);
  return x;
}
inline unsigned __funnelshift_lc(unsigned lo, unsigned hi, unsigned shift) {
  const unsigned long long both = (static_cast<unsigned long long>(hi) << 32) | lo;
  return static_cast<unsigned>((both << (shift < 32 ? shift : 32)) >> 32);
}

inline int atomicCAS(int* address, int compare, int value) {
  return packkv_emulator::atomic_compare_exchange(address, compare, value);
}
inline int atomicExch(int* address, int value) { return packkv_emulator::atomic_exchange(address, value); }
inline unsigned atomicAdd(unsigned* address, unsigned value) {
  return packkv_emulator::atomic_fetch_add(address, value);
}
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  return packkv_emulator::atomic_fetch_add(address, value);
}

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

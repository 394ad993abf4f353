// The CPU emulator of CUDA on its own: the collectives, barriers and memory it provides behave as
// the CUDA programming guide says, and the mistakes it exists to catch are caught.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <set>
#include <vector>

#include "cuda_fp16.h"
#include "cuda_runtime.h"
#include "detail/primitives.cuh"
#include "packkv/types.hpp"

namespace {

using namespace packkv::detail::cuda;

template <class Body>
void run(dim3 grid, int threads, std::size_t shared, Body body) {
  packkv_emulator::launch(grid, threads, shared, body);
}

#if defined(__SANITIZE_THREAD__)
constexpr bool kThreadSanitizer = true;
#else
constexpr bool kThreadSanitizer = false;
#endif

std::uint16_t half_bits(float x) { return packkv::fp16_from_float(x).bits; }
float half_value(std::uint16_t bits) { return packkv::to_float(packkv::fp16_t::from_bits(bits)); }

TEST(Emulator, IndicesCoverTheGridAndTheBlock) {
  std::vector<int> seen(4 * 3 * 64, 0);
  run(dim3(4, 3), 64, 0, [&] {
    const int block = static_cast<int>(blockIdx.y * gridDim.x + blockIdx.x);
    ++seen[static_cast<std::size_t>(block * blockDim.x + threadIdx.x)];
  });
  for (int count : seen) EXPECT_EQ(count, 1);
}

TEST(Emulator, ShufflesExchangeAsTheGuideSays) {
  std::vector<int> xor_out(64), up_out(64), idx_out(64);
  run(dim3(1), 64, 0, [&] {
    const int lane = static_cast<int>(threadIdx.x & 31), t = static_cast<int>(threadIdx.x);
    xor_out[static_cast<std::size_t>(t)] = __shfl_xor_sync(0xFFFFFFFFu, t, 5);
    up_out[static_cast<std::size_t>(t)] = __shfl_up_sync(0xFFFFFFFFu, t, 3u);
    idx_out[static_cast<std::size_t>(t)] = __shfl_sync(0xFFFFFFFFu, t, (lane * 7) & 31);
  });
  for (int t = 0; t < 64; ++t) {
    const int lane = t & 31, warp_base = t - lane;
    EXPECT_EQ(xor_out[static_cast<std::size_t>(t)], warp_base + (lane ^ 5));
    // __shfl_up: lanes below delta keep their own value.
    EXPECT_EQ(up_out[static_cast<std::size_t>(t)], lane >= 3 ? t - 3 : t);
    EXPECT_EQ(idx_out[static_cast<std::size_t>(t)], warp_base + ((lane * 7) & 31));
  }
}

TEST(Emulator, BallotCollectsEveryLanesPredicate) {
  std::vector<unsigned> out(32);
  run(dim3(1), 32, 0, [&] { out[threadIdx.x] = __ballot_sync(0xFFFFFFFFu, (threadIdx.x % 3) == 0); });
  unsigned expected = 0;
  for (unsigned lane = 0; lane < 32; lane += 3) expected |= 1u << lane;
  for (unsigned v : out) EXPECT_EQ(v, expected);
}

TEST(Emulator, SyncthreadsOrdersSharedMemory) {
  // Thread t writes slot t, then after the barrier reads its neighbour's: a missing barrier
  // would read poisoned or stale bytes.
  std::vector<int> out(256);
  run(dim3(2), 256, 256 * sizeof(int), [&] {
    int* slots = reinterpret_cast<int*>(packkv_emulator::dynamic_shared());
    slots[threadIdx.x] = static_cast<int>(blockIdx.x * 1000 + threadIdx.x);
    __syncthreads();
    if (blockIdx.x == 1) out[threadIdx.x] = slots[(threadIdx.x + 1) % 256];
  });
  for (int t = 0; t < 256; ++t) EXPECT_EQ(out[static_cast<std::size_t>(t)], 1000 + (t + 1) % 256);
}

TEST(Emulator, FreshSharedAndDeviceMemoryIsPoisoned) {
  std::vector<unsigned char> out(64);
  run(dim3(1), 64, 64, [&] { out[threadIdx.x] = packkv_emulator::dynamic_shared()[threadIdx.x]; });
  for (unsigned char b : out) EXPECT_EQ(b, 0xA5);
  void* p = nullptr;
  ASSERT_EQ(cudaMalloc(&p, 16), cudaSuccess);
  EXPECT_EQ(static_cast<unsigned char*>(p)[7], 0xA5);
  cudaFree(p);
}

TEST(EmulatorDeathTest, ACollectiveReachedByPartOfAWarpIsCaught) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(run(dim3(1), 32, 0,
                   [] {
                     if (threadIdx.x < 16) (void)__shfl_xor_sync(0xFFFFFFFFu, 1, 1);
                     __syncthreads();
                   }),
               "part of the warp");
}

TEST(EmulatorDeathTest, ABarrierAfterSomeThreadsReturnedIsCaught) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(run(dim3(1), 64, 0,
                   [] {
                     if (threadIdx.x >= 32) return;
                     __syncthreads();
                   }),
               "after some threads");
}


// ---- interleaving ------------------------------------------------------------------------

TEST(Emulator, SeedsInterleaveThreadsBetweenBarriers) {
  // Each thread writes its slot and, with no barrier, reads its neighbour's: what it sees depends
  // on the order threads run in. In index order every read but the last sees poison; other seeds
  // give other orders, so the planted order dependence shows up as differing results.
  if (kThreadSanitizer) GTEST_SKIP() << "a planted race: ThreadSanitizer stops it (PlantedRacesAreReported)";
  std::set<std::vector<int>> outcomes;
  for (std::uint64_t seed = 0; seed < 8; ++seed) {
    packkv_emulator::set_interleaving_seed(seed);
    std::vector<int> out(64);
    run(dim3(1), 64, 64 * sizeof(int), [&] {
      int* slots = reinterpret_cast<int*>(packkv_emulator::dynamic_shared());
      slots[threadIdx.x] = static_cast<int>(threadIdx.x);
      out[threadIdx.x] = slots[(threadIdx.x + 1) % 64];
    });
    if (seed == 0) {
      for (int t = 0; t < 63; ++t) EXPECT_EQ(out[static_cast<std::size_t>(t)], static_cast<int>(0xA5A5A5A5u));
    }
    outcomes.insert(out);
  }
  packkv_emulator::set_interleaving_seed(0);
  EXPECT_GE(outcomes.size(), 4u);
}

TEST(Emulator, BarriersMakeResultsIndependentOfTheSeed) {
  for (std::uint64_t seed = 1; seed < 5; ++seed) {
    packkv_emulator::set_interleaving_seed(seed);
    std::vector<int> out(128);
    run(dim3(1), 128, 128 * sizeof(int), [&] {
      int* slots = reinterpret_cast<int*>(packkv_emulator::dynamic_shared());
      slots[threadIdx.x] = static_cast<int>(threadIdx.x) * 3;
      __syncthreads();
      const int lane = static_cast<int>(threadIdx.x & 31);
      out[threadIdx.x] = slots[(threadIdx.x + 37) % 128] + __shfl_xor_sync(0xFFFFFFFFu, lane, 1);
    });
    for (int t = 0; t < 128; ++t) EXPECT_EQ(out[static_cast<std::size_t>(t)], (t + 37) % 128 * 3 + ((t & 31) ^ 1));
  }
  packkv_emulator::set_interleaving_seed(0);
}

// ---- masks ---------------------------------------------------------------------------------

TEST(Emulator, HalfWarpCollectivesWithTheirOwnMask) {
  std::vector<int> out(32, -1);
  run(dim3(1), 32, 0, [&] {
    const int lane = static_cast<int>(threadIdx.x);
    if (lane < 16) out[threadIdx.x] = __shfl_xor_sync(0x0000FFFFu, lane, 3);
    else out[threadIdx.x] = __shfl_down_sync(0xFFFF0000u, lane, 4);
  });
  for (int lane = 0; lane < 16; ++lane) EXPECT_EQ(out[static_cast<std::size_t>(lane)], lane ^ 3);
  for (int lane = 16; lane < 32; ++lane) EXPECT_EQ(out[static_cast<std::size_t>(lane)], lane + 4 < 32 ? lane + 4 : lane);
}

TEST(EmulatorDeathTest, AMaskWithoutTheCallingLaneIsCaught) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(run(dim3(1), 32, 0, [] { (void)__shfl_xor_sync(0xFFFFFFFEu, 1, 1); }),
               "mask does not hold the calling lane");
}

TEST(EmulatorDeathTest, AShuffleFromALaneOutsideTheMaskIsCaught) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  // Lanes 0-15 exchange with lane ^ 16: lanes that are not in their mask.
  EXPECT_DEATH(run(dim3(1), 32, 0,
                   [] {
                     if (threadIdx.x < 16) (void)__shfl_xor_sync(0x0000FFFFu, 1, 16);
                   }),
               "outside its mask");
}

TEST(EmulatorDeathTest, LanesPassingDifferentMasksAreCaught) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(run(dim3(1), 32, 0,
                   [] {
                     const unsigned mask = threadIdx.x == 5 ? 0x0000FFFFu : 0xFFFFFFFFu;
                     (void)__shfl_sync(mask, 1, 0);
                   }),
               "different masks");
}

TEST(EmulatorDeathTest, AFullMaskAfterALaneReturnedIsCaught) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(run(dim3(1), 32, 0,
                   [] {
                     if (threadIdx.x == 31) return;
                     (void)__ballot_sync(0xFFFFFFFFu, 1);
                   }),
               "has returned");
}

// ---- asynchronous copies -------------------------------------------------------------------

TEST(Emulator, AsyncCopiesLandWhenTheirGroupIsWaitedFor) {
  alignas(16) static unsigned char source[32];
  for (int i = 0; i < 32; ++i) source[i] = static_cast<unsigned char>(i + 1);
  std::vector<int> before(2), after_older(2), after_all(2);
  run(dim3(1), 32, 32, [&] {
    unsigned char* s = packkv_emulator::dynamic_shared();
    if (threadIdx.x == 0) {
      cp_async_16(s, source);
      cp_async_commit();
      cp_async_16(s + 16, source + 16);
      cp_async_commit();
      before = {s[0], s[16]};
      cp_async_wait<1>();  // the older group only
      after_older = {s[0], s[16]};
      cp_async_wait<0>();
      after_all = {s[0], s[16]};
    }
  });
  EXPECT_EQ(before, (std::vector<int>{0xA5, 0xA5}));  // a missing wait reads poison
  EXPECT_EQ(after_older, (std::vector<int>{1, 0xA5}));
  EXPECT_EQ(after_all, (std::vector<int>{1, 17}));
}

TEST(EmulatorDeathTest, MisusedAsyncCopiesAreCaught) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  alignas(16) static unsigned char source[64];
  EXPECT_DEATH(run(dim3(1), 32, 64,
                   [] {
                     if (threadIdx.x == 0) cp_async_16(packkv_emulator::dynamic_shared() + 8, source);
                     cp_async_wait<0>();
                   }),
               "not 16-byte aligned");
  EXPECT_DEATH(run(dim3(1), 32, 64,
                   [] {
                     alignas(16) unsigned char local[16];
                     if (threadIdx.x == 0) cp_async_16(local, source);
                     cp_async_wait<0>();
                   }),
               "outside shared memory");
  EXPECT_DEATH(run(dim3(1), 32, 64,
                   [] {
                     if (threadIdx.x == 0) {
                       cp_async_16(packkv_emulator::dynamic_shared(), source);
                       cp_async_commit();
                     }
                   }),
               "never waited for");
}

// ---- ldmatrix and mma ----------------------------------------------------------------------

// D = A * B through the fragments the way the read path loads them: A (16x16) row-major in
// shared memory with ldmatrix.x4, B (16x8) stored k-major ([k][n]) with ldmatrix.x2.trans, and
// A again from its transpose with ldmatrix.x4.trans. Any mistake in a fragment layout breaks the
// product.
TEST(Emulator, LdmatrixAndMmaComputeAMatrixProduct) {
  float a[16][16], b[16][8];
  for (int i = 0; i < 16; ++i)
    for (int k = 0; k < 16; ++k) a[i][k] = half_value(half_bits(static_cast<float>((i * 7 + k * 3) % 11) - 5.0f + 0.25f * k));
  for (int k = 0; k < 16; ++k)
    for (int j = 0; j < 8; ++j) b[k][j] = half_value(half_bits(static_cast<float>((k * 5 + j) % 9) * 0.5f - 2.0f));
  std::vector<float> d_direct(32 * 4), d_trans(32 * 4);
  constexpr int kRow = 16 + 8;  // halves per row: 16-byte aligned rows, shifted banks
  run(dim3(1), 32, 3 * 16 * kRow * 2, [&] {
    auto* s = reinterpret_cast<std::uint16_t*>(packkv_emulator::dynamic_shared());
    std::uint16_t* sa = s;                // [16][kRow]: A[i][k]
    std::uint16_t* sat = s + 16 * kRow;   // [16][kRow]: A[k][i] (transposed)
    std::uint16_t* sb = s + 32 * kRow;    // [16][kRow]: B[k][j]
    const int lane = static_cast<int>(threadIdx.x);
    if (lane == 0) {
      for (int i = 0; i < 16; ++i)
        for (int k = 0; k < 16; ++k) {
          sa[i * kRow + k] = half_bits(a[i][k]);
          sat[k * kRow + i] = half_bits(a[i][k]);
        }
      for (int k = 0; k < 16; ++k)
        for (int j = 0; j < 8; ++j) sb[k * kRow + j] = half_bits(b[k][j]);
    }
    __syncwarp();
    // x4: matrices (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7, cols 8-15), (8-15, 8-15).
    const int m = lane / 8, r = lane % 8;
    std::uint32_t fa[4], fat[4], fb[2];
    ldmatrix_x4(fa, sa + (r + 8 * (m % 2)) * kRow + 8 * (m / 2));
    // The transpose's matrices in the order that gives the same fragments: (k 0-7, i 0-7),
    // (k 0-7, i 8-15), (k 8-15, i 0-7), (k 8-15, i 8-15).
    ldmatrix_x4_trans(fat, sat + (r + 8 * (m / 2)) * kRow + 8 * (m % 2));
    ldmatrix_x2_trans(fb, sb + (r + 8 * (m % 2)) * kRow);
    float d1[4] = {0, 0, 0, 0}, d2[4] = {1, 1, 1, 1};
    mma_16816(d1, fa, fb);
    mma_16816(d2, fat, fb);
    for (int i = 0; i < 4; ++i) {
      d_direct[static_cast<std::size_t>(4 * lane + i)] = d1[i];
      d_trans[static_cast<std::size_t>(4 * lane + i)] = d2[i];
    }
  });
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 4; ++i) {
      const int row = lane / 4 + 8 * (i / 2), col = 2 * (lane % 4) + i % 2;
      double expected = 0;
      for (int k = 0; k < 16; ++k) expected += static_cast<double>(a[row][k]) * b[k][col];
      EXPECT_EQ(d_direct[static_cast<std::size_t>(4 * lane + i)], static_cast<float>(expected)) << lane << " " << i;
      EXPECT_EQ(d_trans[static_cast<std::size_t>(4 * lane + i)], static_cast<float>(expected + 1.0)) << lane << " " << i;
    }
  }
}

TEST(EmulatorDeathTest, MisalignedLdmatrixRowsAreCaught) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(run(dim3(1), 32, 1024,
                   [] {
                     std::uint32_t r[4];
                     ldmatrix_x4(r, packkv_emulator::dynamic_shared() + 16 * threadIdx.x + 4);
                   }),
               "not 16-byte aligned");
}

TEST(Emulator, BitPrimitivesFollowThePtxDefinitions) {
  // prmt: selector nibble i picks byte i of the result from bytes {b, a} (a = bytes 0-3).
  EXPECT_EQ(__byte_perm(0x33221100u, 0x77665544u, 0x5140u), 0x55114400u);
  EXPECT_EQ(__byte_perm(0x33221100u, 0x77665544u, 0x3210u), 0x33221100u);
  EXPECT_EQ(__byte_perm(0x33221100u, 0x77665544u, 0x7654u), 0x77665544u);
  // shf.r.clamp: the low word of {hi, lo} shifted right, shifts above 32 clamped.
  EXPECT_EQ(__funnelshift_rc(0x89ABCDEFu, 0x01234567u, 8), 0x6789ABCDu);
  EXPECT_EQ(__funnelshift_rc(0x89ABCDEFu, 0x01234567u, 32), 0x01234567u);
  EXPECT_EQ(__funnelshift_rc(0x89ABCDEFu, 0x01234567u, 40), 0x01234567u);
  // fp16 magic: 0x6400 | c is 1024 + c; subtracting (1024 - m) leaves c + m exactly.
  const std::uint32_t codes = kHalf2Magic | 37u | (200u << 16);
  const std::uint32_t bias = static_cast<std::uint32_t>(half_bits(1024.0f - 5.0f)) |
                             static_cast<std::uint32_t>(half_bits(1024.0f - 55.0f)) << 16;
  const std::uint32_t got = hsub2_bits(codes, bias);
  EXPECT_EQ(half_value(static_cast<std::uint16_t>(got)), 42.0f);
  EXPECT_EQ(half_value(static_cast<std::uint16_t>(got >> 16)), 255.0f);
}

// ---- the race detector (ThreadSanitizer builds) ----------------------------------------------

// The planted races run in a child process whose ThreadSanitizer stops it with exit code 66 on the
// first report (TSAN_OPTIONS from scripts/check_sanitizers.sh); the same kernels with the missing
// synchronisation added must run clean, or this whole binary fails.
void shared_memory_kernel(bool with_barrier) {
  std::vector<int> out(64);
  run(dim3(1), 64, 64 * sizeof(int), [&] {
    int* slots = reinterpret_cast<int*>(packkv_emulator::dynamic_shared());
    slots[threadIdx.x] = 1;
    if (with_barrier) __syncthreads();
    out[threadIdx.x] = slots[63 - threadIdx.x];
  });
}
enum class WarpOrder { syncwarp, shuffle_only, none };
void warp_kernel(WarpOrder order) {
  std::vector<int> out(32);
  run(dim3(1), 32, 32 * sizeof(int), [&] {
    int* slots = reinterpret_cast<int*>(packkv_emulator::dynamic_shared());
    slots[threadIdx.x] = 2;
    if (order == WarpOrder::syncwarp) __syncwarp();
    // A shuffle exchanges registers; it does not order the shared-memory accesses around it.
    if (order == WarpOrder::shuffle_only) (void)__shfl_xor_sync(0xFFFFFFFFu, 1, 1);
    out[threadIdx.x] = slots[threadIdx.x ^ 1];
  });
}
void cross_block_kernel(bool with_ticket) {
  // Each block writes its partial; the last block to take a ticket reads them all.
  std::vector<int> partial(4, 0);
  unsigned tickets = 0;
  int total = 0;
  run(dim3(4), 32, 0, [&] {
    if (threadIdx.x != 0) return;
    partial[blockIdx.x] = static_cast<int>(blockIdx.x) + 1;
    const bool last = with_ticket ? atomicAdd(&tickets, 1u) == 3u : blockIdx.x == 3;
    if (last) {
      for (int p : partial) total += p;
    }
  });
  EXPECT_EQ(total, 10);
}

TEST(EmulatorRaceTest, SynchronisedKernelsRunClean) {
  shared_memory_kernel(true);
  warp_kernel(WarpOrder::syncwarp);
  cross_block_kernel(true);
}

TEST(EmulatorRaceDeathTest, PlantedRacesAreReported) {
  if (!kThreadSanitizer) GTEST_SKIP() << "the race detector needs a -fsanitize=thread build (scripts/check_sanitizers.sh)";
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(shared_memory_kernel(false), testing::ExitedWithCode(66), "data race");
  EXPECT_EXIT(warp_kernel(WarpOrder::none), testing::ExitedWithCode(66), "data race");
  EXPECT_EXIT(warp_kernel(WarpOrder::shuffle_only), testing::ExitedWithCode(66), "data race");
  EXPECT_EXIT(cross_block_kernel(false), testing::ExitedWithCode(66), "data race");
}

}  // namespace

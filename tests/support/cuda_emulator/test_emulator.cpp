// The CPU emulator of CUDA on its own: the collectives, barriers and memory it provides behave as
// the CUDA programming guide says, and the mistakes it exists to catch are caught.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "cuda_runtime.h"

namespace {

template <class Body>
void run(dim3 grid, int threads, std::size_t shared, Body body) {
  packkv_emulator::launch(grid, threads, shared, body);
}

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

}  // namespace

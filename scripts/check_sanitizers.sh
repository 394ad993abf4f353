#!/usr/bin/env bash
# Runs packkv's test suite under AddressSanitizer + UndefinedBehaviorSanitizer (g++), the CUDA
# emulator's suites under ThreadSanitizer (with nvcc present), then builds the libFuzzer targets (clang, ASan + UBSan) and runs each for FUZZ_SECONDS (default 60) from the
# seed corpus in tests/fuzz/corpus. Any sanitizer report or fuzzer crash fails the script.
# Usage: scripts/check_sanitizers.sh [work-dir]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$root/build-sanitize}
fuzz_seconds=${FUZZ_SECONDS:-60}
jobs=$(nproc)
"$root/scripts/install_deps.sh" --sanitizers
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1

# With nvcc present the CUDA kernels also run here, under the CPU emulator of CUDA (tests/cuda).
# Every binary carries the scalar and the AVX2 CPU kernels: tests/test_kernels.cpp and the
# fuzzers below run both under ASan + UBSan.
echo "== test suite under ASan + UBSan"
cmake -S "$root" -B "$work/asan" -DPACKKV_BUILD_BENCH=OFF -DPACKKV_NATIVE=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  "-DCMAKE_CXX_FLAGS=-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
cmake --build "$work/asan" -j"$jobs"
# The consumer test builds its own uninstrumented project against the library: not meaningful here.
(cd "$work/asan" && ctest --output-on-failure -j"$jobs" -E '^consumers$')

# The CPU emulator of CUDA under ThreadSanitizer: every emulated CUDA thread is a TSan fiber and
# only CUDA's synchronisation orders them, so a race between threads of a kernel (shared or global
# memory, between barriers) is reported. test_emulator proves it catches planted races.
if command -v nvcc >/dev/null; then
  echo "== CUDA kernels on the emulator under ThreadSanitizer"
  cmake -S "$root" -B "$work/tsan" -DPACKKV_BUILD_BENCH=OFF -DPACKKV_BUILD_EXAMPLES=OFF -DPACKKV_NATIVE=OFF \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_FLAGS=-fsanitize=thread" -DCMAKE_EXE_LINKER_FLAGS=-fsanitize=thread
  cmake --build "$work/tsan" -j"$jobs" --target test_emulator test_cuda_emulated
  export TSAN_OPTIONS=halt_on_error=1:exitcode=66
  "$work/tsan/tests/support/cuda_emulator/test_emulator" --gtest_brief=1
  # One host thread: the CPU backend's OpenMP runtime is not instrumented. TSan fibers make the
  # emulator about a hundred times slower, so this runs the tests that reach every kernel family
  # (fast read path and its merge, legacy read path, encoder, batched commit, error reporting,
  # rotation, causal masks) in one storage type; the whole suite runs uninstrumented in
  # run_tests.sh.
  tsan_filter='CudaTyped/1.BatchOfUnevenLengthsMatchesCpu'
  tsan_filter+=':Cuda.PerChannelKAndNoRepackMatchCpu:Cuda.NonFiniteQueriesAreReportedByTheNextCall'
  tsan_filter+=':Cuda.ShortBatchedStepMatchesCpu:Cuda.StrictBatchedAppendRefusesABadLastEntryWholesale'
  tsan_filter+=':CudaTyped/1.RotatedCachesMatchCpu'  # the rotation kernel; causal attention on both read paths
  tsan_filter+=':Cuda.EncodeBlocksRejectsInvalidValues'  # encode_blocks: the compaction in place
  OMP_NUM_THREADS=1 PACKKV_EMULATOR_SEED=3 "$work/tsan/tests/cuda/test_cuda_emulated" --gtest_brief=1 \
    "--gtest_filter=$tsan_filter"
  unset TSAN_OPTIONS
fi

echo "== fuzzers, ${fuzz_seconds}s each"
CC=clang CXX=clang++ cmake -S "$root" -B "$work/fuzz" -DPACKKV_FUZZ=ON -DPACKKV_CUDA=OFF -DPACKKV_BUILD_TESTS=OFF \
  -DPACKKV_BUILD_BENCH=OFF -DPACKKV_BUILD_EXAMPLES=OFF -DPACKKV_INSTALL=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  "-DCMAKE_CXX_FLAGS=-fsanitize=address,undefined,fuzzer-no-link -fno-sanitize-recover=undefined"
cmake --build "$work/fuzz" -j"$jobs" --target fuzz_import fuzz_block fuzz_image_coding
for target in import block image_coding; do
  corpus="$work/corpus-$target"
  mkdir -p "$corpus"
  "$work/fuzz/tests/fuzz/fuzz_$target" -max_total_time="$fuzz_seconds" -rss_limit_mb=2048 -print_final_stats=1 \
    "$corpus" "$root/tests/fuzz/corpus/$target" 2>&1 | tail -n 12
done
echo "sanitizers and fuzzers: clean"

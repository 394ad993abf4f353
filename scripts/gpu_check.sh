#!/usr/bin/env bash
# The device check: verifies packkv's CUDA path on a machine with a GPU, in well under 10 minutes.
#
#   scripts/gpu_check.sh                  configure (gpu-native preset), build the CUDA test and
#                                         benchmark with all cores, run both, print the table last
#   scripts/gpu_check.sh --package DIR    on a build machine without a GPU: build for sm_80/sm_90
#                                         and put the two binaries and the non-CUDA shared
#                                         libraries they need into DIR
#   scripts/gpu_check.sh --prebuilt DIR   on the GPU machine: run binaries made by --package
#                                         (for machines that lack fmt, googletest or benchmark)
#
# Environment: PACKKV_BENCH_FILTER (a --benchmark_filter regex; default: everything),
# PACKKV_BENCH_TIMEOUT (seconds, default 420).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
mode=build
dir=""
case "${1:-}" in
  --package) mode=package; dir=${2:?"--package needs a directory"} ;;
  --prebuilt) mode=prebuilt; dir=${2:?"--prebuilt needs a directory"} ;;
  "") ;;
  *) echo "usage: $0 [--package DIR | --prebuilt DIR]" >&2; exit 2 ;;
esac
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
jobs=$(nproc)
log_dir=${TMPDIR:-/tmp}/packkv_gpu_check
mkdir -p "$log_dir"

have_header() { [ -e "/usr/include/$1" ] || [ -e "/usr/local/include/$1" ]; }

# The library itself needs cmake, nvcc and fmt; the test needs googletest and the benchmark Google
# Benchmark. Whatever is missing is skipped (and said), or the run stops if the library cannot build.
build_tests=ON
build_bench=ON
missing_for_library() {
  local missing=()
  command -v cmake >/dev/null || missing+=(cmake)
  command -v nvcc >/dev/null || missing+=(nvcc)
  have_header fmt/format.h || missing+=(libfmt-dev)
  echo "${missing[*]:-}"
}

if [ "$mode" = package ]; then
  build=$root/build-gpu-package
  cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DPACKKV_CUDA=ON -DPACKKV_NATIVE=OFF \
    -DPACKKV_BUILD_EXAMPLES=OFF -DCMAKE_CUDA_ARCHITECTURES="80-real;90-real"
  cmake --build "$build" -j"$jobs" --target test_cuda_backend bench_cuda
  mkdir -p "$dir"
  cp "$build/tests/cuda/test_cuda_backend" "$build/bench/cuda/bench_cuda" "$dir/"
  # Everything but the CUDA runtime and the C library, which the GPU machine has.
  for lib in $(ldd "$dir/test_cuda_backend" "$dir/bench_cuda" | awk '/=> \//{print $3}' | sort -u); do
    case "$(basename "$lib")" in
      libcuda*|libcublas*|libc.so*|libm.so*|libstdc++*|libgcc_s*|ld-linux*|libpthread*|libdl*|librt*) ;;
      *) cp -L "$lib" "$dir/" ;;
    esac
  done
  git -C "$root" rev-parse HEAD > "$dir/COMMIT" 2>/dev/null || true
  echo "packaged into $dir: $(ls "$dir" | tr '\n' ' ')"
  exit 0
fi

gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1 || true)
[ -n "$gpu" ] || gpu="(nvidia-smi unavailable)"
if [ "$mode" = prebuilt ] && [ -f "$dir/COMMIT" ]; then
  commit=$(cut -c1-12 "$dir/COMMIT")
else
  commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
fi

if [ "$mode" = prebuilt ]; then
  bin_test=$dir/test_cuda_backend
  bin_bench=$dir/bench_cuda
  export LD_LIBRARY_PATH=$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
else
  missing=$(missing_for_library)
  if [ -n "$missing" ]; then
    echo "gpu_check: cannot build here, missing: $missing" >&2
    echo "gpu_check: build elsewhere with '$0 --package DIR', bring DIR here and run '$0 --prebuilt DIR'" >&2
    exit 3
  fi
  have_header gtest/gtest.h || { build_tests=OFF; echo "gpu_check: googletest missing: GPU tests skipped" >&2; }
  have_header benchmark/benchmark.h || { build_bench=OFF; echo "gpu_check: Google Benchmark missing: bench skipped" >&2; }
  build=$root/build-gpu
  start=$(date +%s)
  (cd "$root" && cmake --preset gpu-native -DPACKKV_BUILD_TESTS=$build_tests -DPACKKV_BUILD_BENCH=$build_bench) \
    > "$log_dir/configure.log" 2>&1 || { cat "$log_dir/configure.log"; exit 1; }
  targets=()
  [ "$build_tests" = ON ] && targets+=(test_cuda_backend)
  [ "$build_bench" = ON ] && targets+=(bench_cuda)
  if ((${#targets[@]})); then
    cmake --build "$build" -j"$jobs" --target "${targets[@]}" > "$log_dir/build.log" 2>&1 ||
      { tail -50 "$log_dir/build.log"; exit 1; }
  fi
  echo "gpu_check: built in $(( $(date +%s) - start )) s"
  bin_test=$build/tests/cuda/test_cuda_backend
  bin_bench=$build/bench/cuda/bench_cuda
fi

test_status=127
tests_line="not run"
: > "$log_dir/tests.log"
if [ -x "$bin_test" ]; then
  test_status=0
  timeout 240 "$bin_test" --gtest_brief=1 > "$log_dir/tests.log" 2>&1 || test_status=$?
  cat "$log_dir/tests.log"
  tests_line=$(grep -E '^\[ +(PASSED|FAILED|SKIPPED) +\]' "$log_dir/tests.log" | tr '\n' ' ' || true)
  # On a GPU machine a skipped CUDA test means the device was not usable: that is a failure here.
  if [ "$gpu" != "(nvidia-smi unavailable)" ] && grep -q 'CUDA tests skipped' "$log_dir/tests.log"; then
    test_status=4
    tests_line="$tests_line -- tests SKIPPED although a GPU is listed"
  fi
fi

bench_status=0
: > "$log_dir/bench.log"
if [ -x "$bin_bench" ]; then
  timeout "${PACKKV_BENCH_TIMEOUT:-420}" "$bin_bench" --benchmark_filter="${PACKKV_BENCH_FILTER:-.}" \
    --benchmark_counters_tabular=true --benchmark_out="$log_dir/bench.json" --benchmark_out_format=json \
    > "$log_dir/bench.log" 2>&1 || bench_status=$?
  sed '/^== packkv CUDA results/,$d' "$log_dir/bench.log" | tail -40
else
  bench_status=127
fi

echo
echo "=================== packkv device check ==================="
echo "date:   $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "gpu:    $gpu"
echo "commit: $commit"
echo "tests:  exit $test_status; $tests_line (127: not built)"
echo "bench:  exit $bench_status (full output: $log_dir/bench.log, $log_dir/bench.json; 127: not built)"
sed -n '/^== packkv CUDA results/,$p' "$log_dir/bench.log"
[ "$test_status" -eq 0 ] && [ "$bench_status" -eq 0 ]

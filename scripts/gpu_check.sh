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

missing_dependencies() {
  local missing=()
  command -v cmake >/dev/null || missing+=(cmake)
  command -v nvcc >/dev/null || missing+=(nvcc)
  have_header fmt/format.h || missing+=(libfmt-dev)
  have_header gtest/gtest.h || missing+=(libgtest-dev)
  have_header benchmark/benchmark.h || missing+=(libbenchmark-dev)
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
commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || cat "$dir/COMMIT" 2>/dev/null || echo unknown)

if [ "$mode" = prebuilt ]; then
  bin_test=$dir/test_cuda_backend
  bin_bench=$dir/bench_cuda
  export LD_LIBRARY_PATH=$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
else
  missing=$(missing_dependencies)
  if [ -n "$missing" ]; then
    echo "gpu_check: missing on this machine: $missing" >&2
    echo "gpu_check: build elsewhere with '$0 --package DIR', bring DIR here and run '$0 --prebuilt DIR'" >&2
    exit 3
  fi
  build=$root/build-gpu
  start=$(date +%s)
  cmake --preset gpu-native -S "$root" > "$log_dir/configure.log" 2>&1 || { cat "$log_dir/configure.log"; exit 1; }
  cmake --build "$build" -j"$jobs" --target test_cuda_backend bench_cuda > "$log_dir/build.log" 2>&1 ||
    { tail -50 "$log_dir/build.log"; exit 1; }
  echo "gpu_check: built in $(( $(date +%s) - start )) s"
  bin_test=$build/tests/cuda/test_cuda_backend
  bin_bench=$build/bench/cuda/bench_cuda
fi

test_status=0
timeout 240 "$bin_test" --gtest_brief=1 > "$log_dir/tests.log" 2>&1 || test_status=$?
cat "$log_dir/tests.log"
tests_line=$(grep -E '^\[ +(PASSED|FAILED|SKIPPED) +\]' "$log_dir/tests.log" | tr '\n' ' ' || true)

bench_status=0
timeout "${PACKKV_BENCH_TIMEOUT:-420}" "$bin_bench" --benchmark_filter="${PACKKV_BENCH_FILTER:-.}" \
  --benchmark_counters_tabular=true --benchmark_out="$log_dir/bench.json" --benchmark_out_format=json \
  > "$log_dir/bench.log" 2>&1 || bench_status=$?
sed '/^== packkv CUDA results/,$d' "$log_dir/bench.log" | tail -40

echo
echo "=================== packkv device check ==================="
echo "date:   $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "gpu:    $gpu"
echo "commit: $commit"
echo "tests:  exit $test_status; $tests_line"
echo "bench:  exit $bench_status (full output: $log_dir/bench.log, $log_dir/bench.json)"
sed -n '/^== packkv CUDA results/,$p' "$log_dir/bench.log"
[ "$test_status" -eq 0 ] && [ "$bench_status" -eq 0 ]

#!/usr/bin/env bash
# The device check: packkv's CUDA tests, compute-sanitizer and benchmark on a GPU, in one run of
# well under 10 minutes, with a results table printed last (docs/cuda.md, "Device check").
#
#   scripts/gpu_check.sh [--out RESULTS]
#       on a GPU machine that has the build dependencies (fmt, googletest, Google Benchmark):
#       configure (gpu-native preset), build the CUDA test and benchmark, run the check
#   scripts/gpu_check.sh --package DIR [--build BUILD] [--dry-run [--out RESULTS]]
#       on a build machine, no GPU needed: build test_cuda_backend and bench_cuda for sm_90 (the
#       H100/H200 the check runs on) in BUILD (default build-gpu-package; an existing build folder
#       is reused as it is configured) and put into DIR the binaries, the runner (DIR/run.sh), the torch SDPA peer and
#       every shared library they need except the NVIDIA driver, cuBLAS/cuBLASLt (about 600 MB:
#       the GPU machine's own CUDA 13 copy is found at run time) and the C/C++ runtime.
#       --dry-run then runs DIR/run.sh --dry-run: what CI can check without a GPU
#   scripts/gpu_check.sh --prebuilt DIR [--out RESULTS]
#       on the GPU machine: run the package in DIR (the same as DIR/run.sh --out RESULTS)
#
# RESULTS defaults to gpu-check-<UTC date and time> under the current directory. The step
# timeouts and filters are environment variables of the runner (scripts/gpu_run.sh --help);
# PACKKV_JOBS sets the build's parallelism (default: all cores), PACKKV_PACKAGE_ARCHS the CUDA
# architectures of a new package build (default 90-real; the runner says when the package has no
# code for the GPU it finds, for example "80-real" for an A100), PACKKV_PACKAGE_LIMIT_MB the
# size above which the binaries are stripped, and then gzip-compressed (default 60).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
mode=build
dir=""
build=""
out=""
dry_run=0
while (($#)); do
  case "$1" in
    --package) mode=package; dir=${2:?"--package needs a directory"}; shift ;;
    --prebuilt) mode=prebuilt; dir=${2:?"--prebuilt needs a directory"}; shift ;;
    --build) build=${2:?"--build needs a directory"}; shift ;;
    --out) out=${2:?"--out needs a directory"}; shift ;;
    --dry-run) dry_run=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: $0 [--out RESULTS] | --package DIR [--build BUILD] [--dry-run [--out RESULTS]] |" \
         "--prebuilt DIR [--out RESULTS]" >&2; exit 2 ;;
  esac
  shift
done
if ((dry_run)) && [ "$mode" != package ]; then
  echo "gpu_check: --dry-run goes with --package" >&2
  exit 2
fi
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
jobs=${PACKKV_JOBS:-$(nproc)}
targets=(test_cuda_backend bench_cuda)

# ---- --prebuilt: the package's own runner ---------------------------------------------------------

if [ "$mode" = prebuilt ]; then
  [ -x "$dir/run.sh" ] || { echo "gpu_check: $dir/run.sh not found: make DIR with --package" >&2; exit 2; }
  exec "$dir/run.sh" ${out:+--out "$out"}
fi

# ---- --package ------------------------------------------------------------------------------------

# Libraries a package leaves to the machine: the driver, the C/C++ runtime every Linux has, and
# cuBLAS/cuBLASLt (54 + 540 MB in CUDA 13.0: far over what is worth carrying, and the GPU machine
# has CUDA 13 itself). The C++ runtime goes into lib/compat, for a machine whose own is older.
left_to_machine() {
  case "$1" in
    linux-vdso.so*|ld-linux*|libc.so*|libm.so*|libdl.so*|libpthread.so*|librt.so*|libresolv.so*|libutil.so*) return 0 ;;
    libcuda.so*|libnvidia-*) return 0 ;;
    libcublas.so*|libcublasLt.so*) return 0 ;;
    libstdc++.so*|libgcc_s.so*) return 0 ;;
    *) return 1 ;;
  esac
}

# ldd of the arguments -> "name path" per library, also for those named by path ("/lib64/ld-...").
libraries_of() {
  ldd "$@" 2>/dev/null | awk '
    $2 == "=>" && $3 ~ /^\// { print $1, $3; next }
    $2 == "=>" && $3 == "not" { print $1, "NOT-FOUND"; next }
    $1 ~ /^\// && $2 ~ /^\(0x/ { n = split($1, parts, "/"); print parts[n], $1 }' | sort -u
}

# Libraries named in the objects' strings (opened with dlopen) that this machine's loader knows,
# as "name path"; such names that it does not know are only listed in the manifest.
dlopened_by() {
  local name path
  strings -a "$@" 2>/dev/null | grep -oE '(^|/)lib[A-Za-z0-9_+.-]+\.so(\.[0-9]+)*$' | sed 's#^/##' | sort -u |
    while read -r name; do
      path=$(ldconfig -p 2>/dev/null | awk -v n="$name" '$1 == n && $NF ~ /^\// {print $NF; exit}')
      if [ -n "$path" ]; then echo "$name $path"; else echo "$name" >> "$named_not_found"; fi
    done
}

package() {
  local t0 pkg lib name path size limit_mb found cache
  t0=$(date +%s)
  command -v cmake >/dev/null || { echo "gpu_check: cmake not found" >&2; exit 3; }
  command -v nvcc >/dev/null || { echo "gpu_check: nvcc not found (CUDA toolkit)" >&2; exit 3; }
  [ -n "$build" ] || build=$root/build-gpu-package
  cache=$build/CMakeCache.txt
  if [ -f "$cache" ]; then
    # Reused as it is configured (CI reuses its test build: nothing to compile).
    grep -q '^CMAKE_CUDA_COMPILER:' "$cache" ||
      { echo "gpu_check: $build is configured without CUDA" >&2; exit 3; }
  else
    local generator=()
    command -v ninja >/dev/null && generator=(-G Ninja)
    cmake -S "$root" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DPACKKV_CUDA=ON \
      -DPACKKV_NATIVE=OFF -DPACKKV_BUILD_EXAMPLES=OFF \
      -DCMAKE_CUDA_ARCHITECTURES="${PACKKV_PACKAGE_ARCHS:-90-real}"
  fi
  cmake --build "$build" -j"$jobs" --target "${targets[@]}"
  local test_bin=$build/tests/cuda/test_cuda_backend bench_bin=$build/bench/cuda/bench_cuda
  # The targets nvcc compiles for, as the build files name them ("sm_80 sm_90 compute_90").
  local archs
  archs=$(cat "$build/build.ninja" "$build/kernels/CMakeFiles/packkv_cuda.dir/flags.make" 2>/dev/null |
    grep -oE -- '--generate-code=arch=compute_[0-9a-z]+,code=\[?[a-z]+_[0-9a-z]+' | sed 's/.*code=\[*//' |
    sort -u | tr '\n' ' ' || true)
  case " $archs" in
    *" sm_90 "*|*" sm_90a "*) ;;
    *) echo "gpu_check: warning: $build compiles no sm_90 code (${archs:-unknown targets}): H100/H200 would JIT" >&2 ;;
  esac
  for lib in "$test_bin" "$bench_bin"; do
    [ -x "$lib" ] || { echo "gpu_check: $lib was not built" >&2; exit 3; }
  done

  # A package folder is replaced whole; any other non-empty folder is left alone.
  if [ -e "$dir" ]; then
    if [ -f "$dir/MANIFEST" ] && head -1 "$dir/MANIFEST" | grep -q '^packkv device check package'; then
      rm -rf "$dir"
    elif [ -n "$(ls -A "$dir" 2>/dev/null)" ]; then
      echo "gpu_check: $dir exists and is not a package: choose another folder" >&2
      exit 2
    fi
  fi
  mkdir -p "$dir/bin" "$dir/lib/compat"
  pkg=$(cd "$dir" && pwd)
  cp "$test_bin" "$bench_bin" "$pkg/bin/"
  cp "$root/scripts/gpu_run.sh" "$pkg/run.sh"
  chmod +x "$pkg/run.sh"
  [ -f "$root/bench/cuda/sdpa_peer.py" ] && cp "$root/bench/cuda/sdpa_peer.py" "$pkg/"

  local manifest=$pkg/MANIFEST left=() unresolved=()
  named_not_found=$build/gpu-package-named.txt
  : > "$named_not_found"
  # Linked libraries, then the libraries those load by name, until nothing new turns up.
  local objects=("$pkg/bin/test_cuda_backend" "$pkg/bin/bench_cuda") pass
  for pass in 1 2 3; do
    found=0
    while read -r name path; do
      [ -n "$name" ] || continue
      if [ "$path" = NOT-FOUND ]; then
        left_to_machine "$name" || unresolved+=("$name")
        continue
      fi
      if left_to_machine "$name"; then
        case "$name" in
          libstdc++.so*|libgcc_s.so*) [ -e "$pkg/lib/compat/$name" ] || cp -L "$path" "$pkg/lib/compat/$name" ;;
        esac
        continue
      fi
      [ -e "$pkg/lib/$name" ] && continue
      cp -L "$path" "$pkg/lib/$name"
      chmod u+w "$pkg/lib/$name"
      found=1
    done < <(libraries_of "${objects[@]}"; dlopened_by "${objects[@]}")
    objects=("$pkg/bin/test_cuda_backend" "$pkg/bin/bench_cuda")
    for lib in "$pkg"/lib/*.so*; do [ -f "$lib" ] && objects+=("$lib"); done
    ((found)) || break
  done
  if ((${#unresolved[@]})); then
    echo "gpu_check: libraries not found on this machine: $(printf '%s\n' "${unresolved[@]}" | sort -u | tr '\n' ' ')" >&2
    exit 3
  fi
  for name in $(libraries_of "${objects[@]}" | awk '{print $1}'; dlopened_by "${objects[@]}" | awk '{print $1}'); do
    left_to_machine "$name" && left+=("$name")
  done

  git -C "$root" describe --always --dirty --abbrev=12 > "$pkg/COMMIT" 2>/dev/null || echo unknown > "$pkg/COMMIT"
  limit_mb=${PACKKV_PACKAGE_LIMIT_MB:-60}
  size=$(du -sb "$pkg" | awk '{print $1}')
  local stripped=no
  if ((size > limit_mb * 1024 * 1024)); then
    # Host symbols only: the device code (.nv_fatbin, with its line info) stays.
    strip --strip-unneeded "$pkg"/bin/* "$pkg"/lib/*.so* 2>/dev/null || true
    stripped=yes
    size=$(du -sb "$pkg" | awk '{print $1}')
  fi
  if ((size > limit_mb * 1024 * 1024)); then
    # The last resort (the kernels inside are compressed by nvcc already): gzip the binaries,
    # and run.sh unpacks them outside the package before it runs anything.
    gzip -6 -f "$pkg"/bin/test_cuda_backend "$pkg"/bin/bench_cuda
    stripped="$stripped, binaries gzip-compressed"
    size=$(du -sb "$pkg" | awk '{print $1}')
  fi
  {
    echo "packkv device check package"
    echo "commit: $(cat "$pkg/COMMIT")"
    echo "made: $(date -u '+%Y-%m-%d %H:%M UTC') on $(uname -m), $(ldd --version 2>&1 | head -1)"
    echo "cuda code: $archs"
    echo "nvcc: $(nvcc --version | grep -o 'release [0-9.]*')"
    echo "stripped: $stripped"
    echo "left to the machine: $(printf '%s\n' "${left[@]}" | sort -u | tr '\n' ' ')"
    echo "named in the binaries but not found here (not packaged): $(sort -u "$named_not_found" | tr '\n' ' ')"
    echo "files:"
    (cd "$pkg" && find . -type f -printf '%P %s\n' | sort)
  } > "$manifest"
  if ((size > limit_mb * 1024 * 1024)); then
    echo "gpu_check: the package is $((size / 1048576)) MiB, over ${limit_mb} MiB even stripped and compressed" >&2
    exit 4
  fi
  echo "gpu_check: packaged $(cat "$pkg/COMMIT") into $dir: $(du -sh "$pkg" | cut -f1)" \
    "($(ls "$pkg/lib" | grep -c '\.so') libraries; $(($(date +%s) - t0)) s)"
  echo "gpu_check: on the GPU machine: scripts/gpu_check.sh --prebuilt $dir --out RESULTS  (or $dir/run.sh --out RESULTS)"
}

if [ "$mode" = package ]; then
  package
  if ((dry_run)); then
    [ -n "$out" ] || out=$build/gpu-check-dry-run
    exec "$dir/run.sh" --dry-run --out "$out"
  fi
  exit 0
fi

# ---- build here, then run -------------------------------------------------------------------------

have_header() { [ -e "/usr/include/$1" ] || [ -e "/usr/local/include/$1" ]; }
missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v nvcc >/dev/null || missing+=(nvcc)
have_header fmt/format.h || missing+=(libfmt-dev)
if ((${#missing[@]})); then
  echo "gpu_check: cannot build here, missing: ${missing[*]}" >&2
  echo "gpu_check: build elsewhere with '$0 --package DIR', bring DIR here and run '$0 --prebuilt DIR'" >&2
  exit 3
fi
build_tests=ON
build_bench=ON
have_header gtest/gtest.h || { build_tests=OFF; echo "gpu_check: googletest missing: GPU tests not built" >&2; }
have_header benchmark/benchmark.h || { build_bench=OFF; echo "gpu_check: Google Benchmark missing: bench not built" >&2; }
[ -n "$out" ] || out=gpu-check-$(date -u +%Y%m%d-%H%M%S)
mkdir -p "$out"
build=$root/build-gpu
start=$(date +%s)
(cd "$root" && cmake --preset gpu-native -DPACKKV_BUILD_TESTS=$build_tests -DPACKKV_BUILD_BENCH=$build_bench) \
  > "$out/configure.log" 2>&1 || { tail -50 "$out/configure.log"; exit 1; }
built=()
[ "$build_tests" = ON ] && built+=(test_cuda_backend)
[ "$build_bench" = ON ] && built+=(bench_cuda)
if ((${#built[@]})); then
  cmake --build "$build" -j"$jobs" --target "${built[@]}" > "$out/build.log" 2>&1 ||
    { tail -50 "$out/build.log"; exit 1; }
fi
echo "gpu_check: built in $(($(date +%s) - start)) s"
exec "$root/scripts/gpu_run.sh" --out "$out" --test "$build/tests/cuda/test_cuda_backend" \
  --bench "$build/bench/cuda/bench_cuda" --peer "$root/bench/cuda/sdpa_peer.py"

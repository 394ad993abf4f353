#!/usr/bin/env bash
# Static cost report of the CUDA kernels on sm_90, without a GPU (docs/cuda.md, "Static cost report").
#
# Compiles every kernels/*.cu for sm_90 with the flags of the project's CUDA build plus
# `-Xptxas -v`, disassembles the cubins (cuobjdump, nvdisasm), builds scripts/cuda_kernel_facts.cpp
# against the same objects for the launch facts (benchmark geometry, dynamic shared memory), and
# hands everything to scripts/cuda_cost.py. Objects are reused while their sources, headers and
# flags are unchanged.
#
# Usage: scripts/cuda_cost.sh [--build-dir DIR] [--check] [--json FILE] [--loops] [--kernels REGEX] [-j N]
#   --build-dir DIR  where the objects and listings go (default: build-cuda-cost)
#   --check          exit 1 when a kernel spills, a read-path kernel has a byte-wide global load, or
#                    a kernel whose spec declares targets misses them (and run the parser's self-test)
#   --json FILE      also save the report as JSON
#   --loops          list every loop of every kernel
#   --kernels REGEX  report only the kernels whose short name matches
#   -j N             compile N units at once (default 2)
# Environment: NVCC, CXX (host compiler, default g++), PACKKV_CUDA_TOOLS_BIN (a folder holding
# cuobjdump and nvdisasm; default: scripts/setup_cuda_tools.sh installs them).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build="$root/build-cuda-cost"
jobs=2
report_args=()
while (($#)); do
  case "$1" in
    --build-dir) build=${2:?"--build-dir needs a directory"}; shift 2 ;;
    --json) report_args+=(--json "${2:?"--json needs a file"}"); shift 2 ;;
    --kernels) report_args+=(--kernels "${2:?"--kernels needs a regex"}"); shift 2 ;;
    --check | --loops) report_args+=("$1"); shift ;;
    -j) jobs=${2:?"-j needs a number"}; shift 2 ;;
    -j*) jobs=${1#-j}; shift ;;
    -h | --help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: $0 [--build-dir DIR] [--check] [--json FILE] [--loops] [--kernels REGEX] [-j N]" >&2; exit 2 ;;
  esac
done
mkdir -p "$build"
build=$(cd "$build" && pwd)
start=$SECONDS

if [ -z "${NVCC:-}" ]; then
  if command -v nvcc >/dev/null; then NVCC=nvcc
  elif [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc
  else echo "error: nvcc not found (set NVCC)" >&2; exit 1
  fi
fi
CXX=${CXX:-g++}
tools=${PACKKV_CUDA_TOOLS_BIN:-$("$root/scripts/setup_cuda_tools.sh" --quiet | tail -n 1)}
cuobjdump="$tools/cuobjdump"
nvdisasm="$tools/nvdisasm"

# The flags of the project's Release build of packkv_cuda (CMakeLists.txt, kernels/CMakeLists.txt:
# CUDA_STANDARD 20, --expt-relaxed-constexpr -lineinfo, include/, src/, kernels/), for sm_90 only,
# plus ptxas' resource report. -ffunction-sections lets the facts tool drop what it does not call.
cuda_flags=(-O3 -DNDEBUG -DFMT_SHARED -std=c++20 --expt-relaxed-constexpr -lineinfo
  "--generate-code=arch=compute_90,code=[sm_90]" -Xcompiler=-fPIC -Xcompiler=-ffunction-sections
  -I"$root/include" -I"$root/src" -I"$root/kernels" -Xptxas -v)
cxx_flags=(-O1 -std=c++20 -DFMT_SHARED -ffunction-sections -I"$root/include" -I"$root/src" -I"$root/kernels")
cuda_include="$(dirname "$(command -v "$NVCC")")/../include"
if [ -d "$cuda_include" ]; then cxx_flags+=(-isystem "$cuda_include"); fi

# up_to_date OUT DEPFILE FLAGSFILE FLAGS...: OUT exists, was built with FLAGS, and is newer than
# everything its dependency file lists (paths relative to the repository root, as compiled).
up_to_date() {
  local out=$1 dep=$2 flags_file=$3
  shift 3
  [ -f "$out" ] && [ -f "$dep" ] && [ -f "$flags_file" ] || return 1
  [ "$(cat "$flags_file")" = "$*" ] || return 1
  local f
  while read -r f; do
    [ -e "$root/$f" ] && f="$root/$f"
    if [ ! -e "$f" ] || [ "$f" -nt "$out" ]; then return 1; fi
  done < <(sed -e 's/^[^:]*://' -e 's/\\$//' "$dep" | tr ' ' '\n' | sed '/^$/d')
  return 0
}

# compile_unit SOURCE: object, ptxas log, SASS and ELF listings of one kernel unit.
compile_unit() {
  local src=$1 name
  name=$(basename "$src" .cu)
  local obj="$build/$name.o"
  if ! up_to_date "$obj" "$build/$name.d" "$build/$name.flags" "${cuda_flags[@]}"; then
    rm -f "$obj"
    (cd "$root" && nice -n 10 "$NVCC" "${cuda_flags[@]}" -MD -MF "$build/$name.d" -c "$src" -o "$obj") \
      2>"$build/$name.ptxas.txt" || { cat "$build/$name.ptxas.txt" >&2; return 1; }
    printf '%s' "${cuda_flags[*]}" >"$build/$name.flags"
    rm -rf "$build/$name.cubins" && mkdir -p "$build/$name.cubins"
    (cd "$build/$name.cubins" && "$cuobjdump" -xelf all "$obj" >/dev/null)
    local cubins=("$build/$name.cubins"/*sm_90*.cubin)
    "$nvdisasm" -c -gi "${cubins[0]}" >"$build/$name.sass"
    "$cuobjdump" -elf "${cubins[0]}" >"$build/$name.elf.txt"
    echo "compiled $src" >&2
  fi
}

units=()
for src in "$root"/kernels/*.cu; do
  [ -e "$src" ] && units+=("kernels/$(basename "$src")")
done
if ((${#units[@]} == 0)); then
  echo "error: no kernels/*.cu" >&2
  exit 1
fi
pids=()
for u in "${units[@]}"; do
  while (($(jobs -rp | wc -l) >= jobs)); do wait -n || true; done
  compile_unit "$u" &
  pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
((failed == 0)) || { echo "error: compiling the kernels failed" >&2; exit 1; }

# The launch facts tool: host code only, linked against the kernel objects for the sizing functions.
facts_srcs=(scripts/cuda_kernel_facts.cpp src/core/config.cpp src/core/error.cpp)
facts_objs=()
for src in "${facts_srcs[@]}"; do
  obj="$build/host_$(basename "$src" .cpp).o"
  if ! up_to_date "$obj" "${obj%.o}.d" "${obj%.o}.flags" "${cxx_flags[@]}"; then
    (cd "$root" && nice -n 10 "$CXX" "${cxx_flags[@]}" -MD -MF "${obj%.o}.d" -c "$src" -o "$obj")
    printf '%s' "${cxx_flags[*]}" >"${obj%.o}.flags"
  fi
  facts_objs+=("$obj")
done
kernel_objs=()
for u in "${units[@]}"; do kernel_objs+=("$build/$(basename "$u" .cu).o"); done
"$NVCC" -o "$build/cuda_kernel_facts" "${facts_objs[@]}" "${kernel_objs[@]}" -lfmt -Xlinker --gc-sections
"$build/cuda_kernel_facts" >"$build/facts.json"

unit_args=()
for u in "${units[@]}"; do
  n=$(basename "$u" .cu)
  unit_args+=(--unit "$root/$u:$build/$n.ptxas.txt:$build/$n.sass:$build/$n.elf.txt")
done
status=0
case " ${report_args[*]-} " in
  *" --check "*) python3 "$root/scripts/cuda_cost.py" --self-test || status=1 ;;
esac
python3 "$root/scripts/cuda_cost.py" --root "$root" --facts "$build/facts.json" "${unit_args[@]}" \
  ${report_args[@]+"${report_args[@]}"} || status=$?
echo "(cuda_cost: $((SECONDS - start)) s; $("$NVCC" --version | tail -n 1 | sed 's/^Build //'), cuobjdump $("$cuobjdump" --version | tail -n 1 | sed 's/^Build //'))" >&2
exit $status

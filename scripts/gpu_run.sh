#!/usr/bin/env bash
# Runs packkv's device check from built binaries and prints a results table last.
#
# `scripts/gpu_check.sh --package DIR` copies this script to DIR/run.sh, beside the binaries
# (DIR/bin) and the shared libraries they need (DIR/lib); it then needs nothing else:
#
#   DIR/run.sh [--out RESULTS_DIR]     on the GPU machine: libraries, GPU tests, compute-sanitizer
#                                      (memcheck, racecheck, synccheck) on a few tests, the
#                                      benchmark, the torch SDPA peer; the table last
#   DIR/run.sh --dry-run [--out ...]   on any machine, no GPU needed: every binary resolves its
#                                      libraries, the tests start and skip, the benchmark lists,
#                                      the sanitizer filter matches tests, the table prints
#
# The build mode of gpu_check.sh names its binaries instead: --test BIN --bench BIN [--peer PY].
# RESULTS_DIR (default: gpu-check-<UTC date and time> under the current directory) receives
# results.txt, results.json, tests.log, sanitizers.log, bench.log, bench.json, peer.log and
# peer.json. Each step runs under its own timeout and its exit status goes into the table; a step
# that fails, crashes or times out does not stop the run. Exit status: 0 when every step passed.
#
# Environment (seconds; the step timeouts together never exceed their sum, kill grace included):
#   PACKKV_TEST_TIMEOUT=120       all GPU tests
#   PACKKV_SANITIZER_TIMEOUT=150  the three compute-sanitizer tools together (time one leaves
#                                 unused goes to the next)
#   PACKKV_BENCH_TIMEOUT=240      the benchmark (a crash is resumed once, after the benchmark
#                                 that crashed)
#   PACKKV_PEER_TIMEOUT=30        the torch SDPA peer
#   PACKKV_SANITIZER_FILTER       gtest filter for the sanitizer runs (default: four fast tests)
#   PACKKV_BENCH_FILTER           --benchmark_filter regex (default: copy, encode, Llama-3-8B at
#                                 4K and 32K context, batches 1, 8, 32)
#   PACKKV_CUDA_LIB_DIR           where to look first for libcublas.so.13 and the other CUDA
#                                 libraries (else /usr/local/cuda, ldconfig, pip's nvidia wheels)
#   PACKKV_COMPUTE_SANITIZER      compute-sanitizer to use (else PATH, then /usr/local/cuda)
set -uo pipefail

ulimit -c 0 2>/dev/null  # a crashing step leaves no core file behind
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dry_run=0
out=""
test_bin=""
bench_bin=""
peer=""
pkg_lib=""
commit=""
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --out) out=${2:?"--out needs a directory"}; shift ;;
    --test) test_bin=${2:?}; shift ;;
    --bench) bench_bin=${2:?}; shift ;;
    --peer) peer=${2:?}; shift ;;
    --commit) commit=${2:?}; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_run: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
# Packaged layout unless the binaries were named.
if [ -z "$test_bin$bench_bin" ]; then
  test_bin=$here/bin/test_cuda_backend
  bench_bin=$here/bin/bench_cuda
  [ -n "$peer" ] || peer=$here/sdpa_peer.py
fi
[ -d "$here/lib" ] && pkg_lib=$here/lib
# A package over its size limit carries its binaries gzip-compressed (gpu_check.sh): unpack them
# into a temporary folder, outside the package, so that the package itself stays as it came.
unpacked=""
for var in test_bin bench_bin; do
  path=${!var}
  if [ -n "$path" ] && [ ! -e "$path" ] && [ -f "$path.gz" ]; then
    if [ -z "$unpacked" ]; then
      unpacked=$(mktemp -d "${TMPDIR:-/tmp}/packkv-gpu-bin.XXXXXX")
      trap 'rm -rf "$unpacked"' EXIT
    fi
    target=$unpacked/$(basename "$path")
    gzip -dc "$path.gz" > "$target" && chmod +x "$target"
    printf -v "$var" '%s' "$target"
  fi
done
if [ -z "$commit" ]; then
  if [ -f "$here/COMMIT" ]; then
    commit=$(head -1 "$here/COMMIT")
  else
    commit=$(git -C "$here" describe --always --dirty --abbrev=12 2>/dev/null || echo unknown)
  fi
fi

t_tests=${PACKKV_TEST_TIMEOUT:-120}
t_sanitizers=${PACKKV_SANITIZER_TIMEOUT:-150}
t_bench=${PACKKV_BENCH_TIMEOUT:-240}
t_peer=${PACKKV_PEER_TIMEOUT:-30}
sanitizer_filter=${PACKKV_SANITIZER_FILTER:-"CudaTyped/1.BatchOfUnevenLengthsMatchesCpu:CudaTyped/1.EncoderBytesEqualCpuForEveryCodeWidth:Cuda.PerChannelKAndNoRepackMatchCpu:Cuda.InvalidValuesAreReportedByTheNextCall"}
bench_filter=${PACKKV_BENCH_FILTER:-'^(copy|encode)/|/llama3-8b/ctx(4|32)K/b(1|8|32)/'}
grace=5  # seconds between a timeout's TERM and its KILL
for t in "$t_tests" "$t_sanitizers" "$t_bench" "$t_peer"; do
  [[ $t =~ ^[0-9]+$ ]] || { echo "gpu_run: timeouts are whole seconds, not '$t'" >&2; exit 2; }
done
if ((dry_run)); then
  # Nothing runs on a GPU: short limits that still catch a hang.
  t_tests=60 t_sanitizers=0 t_bench=60 t_peer=0
fi
budget=$((t_tests + t_sanitizers + t_bench + t_peer))
((budget <= 540)) || echo "gpu_run: warning: the budget, $budget s, is over 9 minutes" >&2

[ -n "$out" ] || out=gpu-check-$(date -u +%Y%m%d-%H%M%S)
mkdir -p "$out" || { echo "gpu_run: cannot create $out" >&2; exit 2; }
out=$(cd "$out" && pwd)
# Only the files this run writes are replaced: the folder may hold other things.
rm -f "$out"/{results.txt,results.json,tests.log,sanitizers.log,bench.log,bench.json,bench.resumed.json,peer.log,peer.json}

date_utc=$(date -u '+%Y-%m-%d %H:%M UTC')
gpu=$(timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
[ -n "$gpu" ] || gpu="(nvidia-smi unavailable)"
have_gpu=0
[ "$gpu" != "(nvidia-smi unavailable)" ] && have_gpu=1
# The package's code (MANIFEST) against the GPU's compute capability: machine code sm_XY runs on
# capability X.Y' with Y' >= Y, PTX compute_XY on anything from X.Y up; otherwise no kernel loads.
arch_note=""
if ((have_gpu)) && [ -f "$here/MANIFEST" ]; then
  cap=$(timeout 20 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
  code_list=$(sed -n 's/^cuda code: //p' "$here/MANIFEST")
  if [[ "$cap" =~ ^([0-9]+)\.([0-9])$ ]] && [ -n "$code_list" ]; then
    major=${BASH_REMATCH[1]} minor=${BASH_REMATCH[2]} runs=0
    for code in $code_list; do
      [[ "$code" =~ ^(sm|compute)_([0-9]+)([0-9])[a-z]?$ ]] || continue
      if [ "${BASH_REMATCH[1]}" = sm ]; then
        ((BASH_REMATCH[2] == major && BASH_REMATCH[3] <= minor)) && runs=1
      else
        ((BASH_REMATCH[2] * 10 + BASH_REMATCH[3] <= major * 10 + minor)) && runs=1
      fi
    done
    if ((!runs)); then
      arch_note="the package holds ${code_list% } and no code for this GPU (capability $cap):"
      arch_note+=" package it again with PACKKV_PACKAGE_ARCHS=${major}${minor}-real"
    fi
  fi
fi

# ---- steps and the table ------------------------------------------------------------------------

names=() statuses=() codes=() walls=() notes=()
record() {  # name status exit_code wall_seconds note
  names+=("$1") statuses+=("$2") codes+=("$3") walls+=("$4") notes+=("$5")
  printf 'gpu_run: %-10s %-8s %5s s  %s\n' "$1" "$2" "$4" "$5"
}
failed() {
  local s
  for s in "${statuses[@]}"; do
    case "$s" in ok|skipped|absent|dry-run) ;; *) return 0 ;; esac
  done
  return 1
}

start_time=$(date +%s)
deadline=$((start_time + budget))
child=""
interrupted=0
on_signal() {
  interrupted=1
  [ -n "$child" ] && kill -TERM "$child" 2>/dev/null
}
trap on_signal TERM INT HUP

# timed LIMIT LOG CMD...: runs CMD with stdout and stderr to LOG under `timeout`, never past the
# run's deadline. Sets rc (124: timed out, 125: no time left) and wall.
timed() {
  local limit=$1 log=$2
  shift 2
  local left=$((deadline - $(date +%s) - grace))
  ((limit > left)) && limit=$left
  wall=0
  if ((limit < 1 || interrupted)); then
    rc=125
    echo "(not run: no time left in the budget)" >> "$log"
    return
  fi
  local t0
  t0=$(date +%s)
  # In the background, so that a TERM to this script is handled at once (on_signal); the shell's
  # report of a crash ("Aborted") goes to the step's log.
  timeout -k "$grace" "$limit" "$@" >> "$log" 2>&1 &
  child=$!
  wait "$child" 2>> "$log"
  rc=$?
  # A signal to this script interrupts `wait`; wait again for the step to end.
  while kill -0 "$child" 2>/dev/null; do wait "$child" 2>> "$log"; rc=$?; done
  child=""
  wall=$(($(date +%s) - t0))
}

# status_of: ok, TIMEOUT, NO-TIME, or FAIL with the exit status (and signal).
status_of() {
  case "$1" in
    0) echo ok ;;
    124|137) echo TIMEOUT ;;
    125) echo NO-TIME ;;
    *) echo FAIL ;;
  esac
}
exit_note() {
  local r=$1
  if ((r > 128 && r < 160)); then
    echo "exit $r (signal $(kill -l $((r - 128)) 2>/dev/null || echo $((r - 128))))"
  else
    echo "exit $r"
  fi
}

json_str() {
  local s=$1
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\t'/\\t}
  s=${s//$'\r'/}
  s=${s//$'\n'/\\n}
  printf '"%s"' "$s"
}
section_of() {  # prints the lines of file $1 from the first line starting with $2 to the end
  [ -f "$1" ] && sed -n "/^$2/,\$p" "$1" | tr -d '\000-\010\013\014\016-\037'
}

print_table() {
  local i
  echo "=================== packkv device check$( ((dry_run)) && echo ' (dry run)') ==================="
  echo "date    $date_utc"
  echo "gpu     $gpu"
  echo "commit  $commit"
  echo "budget  tests $t_tests s, sanitizers $t_sanitizers s, bench $t_bench s, peer $t_peer s: $budget s in all"
  echo "cublas  ${lib_summary:-}"
  [ -n "$arch_note" ] && echo "arch    $arch_note"
  printf '%-10s %-8s %6s  %s\n' step status wall_s result
  for i in "${!names[@]}"; do
    printf '%-10s %-8s %6s  %s\n' "${names[$i]}" "${statuses[$i]}" "${walls[$i]}" "${notes[$i]}"
  done
  local bench_section peer_section
  bench_section=$(section_of "$out/bench.log" '== packkv CUDA results')
  [ -n "$bench_section" ] && echo "$bench_section"
  peer_section=$(section_of "$out/peer.log" '== torch sdpa peer')
  [ -n "$peer_section" ] && echo "$peer_section"
  echo "logs    $out"
  if failed; then echo "result  FAILED"; else echo "result  passed"; fi
}

write_json() {
  local i first=1 line
  {
    printf '{\n  "date": %s,\n  "gpu": %s,\n  "commit": %s,\n  "dry_run": %s,\n' \
      "$(json_str "$date_utc")" "$(json_str "$gpu")" "$(json_str "$commit")" "$( ((dry_run)) && echo true || echo false)"
    printf '  "budget_s": {"tests": %d, "sanitizers": %d, "bench": %d, "peer": %d, "total": %d, "grace": %d},\n' \
      "$t_tests" "$t_sanitizers" "$t_bench" "$t_peer" "$budget" "$grace"
    printf '  "cublas": %s,\n  "ld_library_path": %s,\n  "steps": [' "$(json_str "${lib_summary:-}")" \
      "$(json_str "${ld_path:-}")"
    for i in "${!names[@]}"; do
      ((first)) || printf ','
      first=0
      printf '\n    {"name": %s, "status": %s, "exit": %d, "wall_s": %d, "result": %s}' "$(json_str "${names[$i]}")" \
        "$(json_str "${statuses[$i]}")" "${codes[$i]}" "${walls[$i]}" "$(json_str "${notes[$i]}")"
    done
    printf '\n  ],\n'
    for part in "bench_summary:bench.log:== packkv CUDA results" "peer_summary:peer.log:== torch sdpa peer"; do
      IFS=: read -r key file marker <<< "$part"
      printf '  "%s": [' "$key"
      first=1
      while IFS= read -r line; do
        ((first)) || printf ', '
        first=0
        json_str "$line"
      done < <(section_of "$out/$file" "$marker")
      printf '],\n'
    done
    printf '  "passed": %s\n}\n' "$(failed && echo false || echo true)"
  } > "$out/results.json"
}

finish() {
  trap - TERM INT HUP
  ((interrupted)) && record interrupt FAIL 130 0 "the run was interrupted; later steps did not run"
  write_json
  echo
  print_table | tee "$out/results.txt"
  failed && exit 1
  exit 0
}

# ---- libraries ----------------------------------------------------------------------------------

# Directories that may hold a CUDA library the package leaves to the machine (cuBLAS, cuBLASLt).
cuda_lib_candidates() {
  local d site
  [ -n "${PACKKV_CUDA_LIB_DIR:-}" ] && echo "$PACKKV_CUDA_LIB_DIR"
  for d in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib \
    /usr/local/cuda-13*/lib64 /usr/local/cuda-13*/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu; do
    [ -d "$d" ] && echo "$d"
  done
  ldconfig -p 2>/dev/null | awk '/=> \//{print $NF}' | xargs -r -n1 dirname | sort -u
  # The CUDA wheels that PyTorch installs (nvidia/cu13/lib, nvidia/cublas/lib).
  for site in $(timeout 20 python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null); do
    for d in "$site"/nvidia/*/lib; do [ -d "$d" ] && echo "$d"; done
  done
}
find_library_dir() {  # name -> first directory holding it
  local d
  while IFS= read -r d; do
    [ -e "$d/$1" ] && { echo "$d"; return 0; }
  done < <(cuda_lib_candidates)
  d=$(timeout 30 find /usr /opt -maxdepth 7 -name "$1" -print -quit 2>/dev/null)
  [ -n "$d" ] && { dirname "$d"; return 0; }
  return 1
}
# Unresolved libraries of the binaries and packaged libraries, the driver's excepted (it is the
# machine's own and absent where there is no GPU).
unresolved() {
  ldd "$@" 2>&1 | awk '/not found/{print $1}' | grep -v '^libcuda\.so' | sort -u
}
version_errors() {
  ldd "$@" 2>&1 | grep -E "version .* not found" | sort -u
}

check_libraries() {
  local t0 objects=() missing name dir lib found=() errors cublas
  t0=$(date +%s)
  for lib in "$test_bin" "$bench_bin"; do
    [ -x "$lib" ] && objects+=("$lib")
  done
  if [ -n "$pkg_lib" ]; then
    for lib in "$pkg_lib"/*.so*; do [ -f "$lib" ] && objects+=("$lib"); done
    export LD_LIBRARY_PATH=$pkg_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  fi
  if ((${#objects[@]} == 0)); then
    lib_summary="no binaries"
    record libs FAIL 1 0 "no binaries: $test_bin, $bench_bin"
    return
  fi
  missing=$(unresolved "${objects[@]}")
  for name in $missing; do
    if dir=$(find_library_dir "$name"); then
      case ":${LD_LIBRARY_PATH:-}:" in
        *":$dir:"*) ;;
        *) export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$dir ;;
      esac
      found+=("$name from $dir")
    fi
  done
  # An older C++ runtime than the build machine's: use the one packaged for that case.
  errors=$(version_errors "${objects[@]}")
  if [ -n "$errors" ] && [ -d "$pkg_lib/compat" ]; then
    export LD_LIBRARY_PATH=$pkg_lib/compat${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    found+=("C++ runtime from the package")
    errors=$(version_errors "${objects[@]}")
  fi
  missing=$(unresolved "${objects[@]}")
  {
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
    for lib in "${objects[@]}"; do echo "== ldd $lib"; ldd "$lib" 2>&1; done
  } > "$out/libs.tmp"
  # Where cuBLAS comes from, for the table.
  cublas=$(awk '$1 == "libcublas.so.13" {print $3; exit}' "$out/libs.tmp")
  lib_summary="libcublas.so.13 => ${cublas:-not found}"
  ld_path=${LD_LIBRARY_PATH:-}
  if [ -n "$missing$errors" ]; then
    record libs FAIL 1 $(($(date +%s) - t0)) "unresolved: $(echo $missing $errors | tr '\n' ' ')"
  else
    record libs ok 0 $(($(date +%s) - t0)) "${#objects[@]} objects resolve${found:+; ${found[*]}}"
  fi
}

# ---- gtest and compute-sanitizer logs -----------------------------------------------------------

gtest_counts() {  # log -> "P passed, F failed, S skipped"; per-test lines, so it works after a kill
  local log=$1 p f s running
  p=$(grep -cE '^\[       OK \] .* \([0-9]+ ms\)$' "$log")
  f=$(grep -cE '^\[  FAILED  \] .* \([0-9]+ ms\)$' "$log")
  s=$(grep -cE '^\[  SKIPPED \] .* \([0-9]+ ms\)$' "$log")
  echo -n "$p passed, $f failed, $s skipped"
  # The test that was running when the step ended, if it did not finish.
  running=$(awk '/^\[ RUN      \]/{t=$4} /^\[ +(OK|FAILED|SKIPPED) +\] .* \([0-9]+ ms\)$/{t=""} END{print t}' "$log")
  [ -n "$running" ] && echo -n "; unfinished: $running"
  echo
}

run_tests() {
  local log=$out/tests.log note status
  if [ ! -x "$test_bin" ]; then
    record tests MISSING 127 0 "no test binary ($test_bin)"
    return
  fi
  timed "$t_tests" "$log" "$test_bin" --gtest_color=no
  status=$(status_of "$rc")
  note=$(gtest_counts "$log")
  if ((dry_run)); then
    # No GPU here: every GPU test must skip and say why.
    if ((rc == 0)) && ! grep -q 'CUDA tests skipped' "$log"; then
      status=FAIL note="$note; no 'CUDA tests skipped' message"
    fi
  elif ((have_gpu)) && grep -q 'CUDA tests skipped' "$log"; then
    status=FAIL note="$note; tests SKIPPED although nvidia-smi lists a GPU"
  fi
  ((rc == 0)) || note="$(exit_note "$rc"); $note"
  record tests "$status" "$rc" "$wall" "$note"
}

find_sanitizer() {
  local c
  for c in "${PACKKV_COMPUTE_SANITIZER:-}" "$(command -v compute-sanitizer 2>/dev/null)" \
    /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    [ -n "$c" ] && [ -x "$c" ] && { echo "$c"; return 0; }
  done
  return 1
}

run_sanitizers() {
  local log=$out/sanitizers.log part=$out/sanitizer.tmp tool tools=(memcheck racecheck synccheck) count
  local sanitizer left limit status note errors hazards i
  : > "$log"
  if [ ! -x "$test_bin" ]; then
    record sanitize skipped 127 0 "no test binary"
    return
  fi
  count=$("$test_bin" --gtest_list_tests --gtest_filter="$sanitizer_filter" 2>/dev/null | grep -c '^  ')
  if ((count == 0)); then
    record sanitize FAIL 1 0 "the filter matches no test: $sanitizer_filter"
    return
  fi
  if ((dry_run)); then
    record sanitize dry-run 0 0 "$count tests match the filter; memcheck, racecheck, synccheck run on a GPU"
    return
  fi
  if ! sanitizer=$(find_sanitizer); then
    record sanitize absent 127 0 "compute-sanitizer not found (PATH, /usr/local/cuda)"
    return
  fi
  left=$t_sanitizers
  for i in "${!tools[@]}"; do
    tool=${tools[$i]}
    limit=$((left / (${#tools[@]} - i)))
    : > "$part"
    timed "$limit" "$part" "$sanitizer" --tool "$tool" --print-limit 20 --error-exitcode 86 \
      "$test_bin" --gtest_color=no --gtest_filter="$sanitizer_filter"
    left=$((left - wall))
    status=$(status_of "$rc")
    errors=$(grep -oE 'ERROR SUMMARY: [0-9]+ error' "$part" | tail -1 | grep -oE '[0-9]+')
    note="${errors:-?} errors"
    if [ "$tool" = racecheck ]; then
      hazards=$(grep -oE 'RACECHECK SUMMARY: [0-9]+ hazard' "$part" | tail -1 | grep -oE '[0-9]+')
      [ -n "$hazards" ] && note="$note, $hazards hazards"
    fi
    note="$note; $count tests: $(gtest_counts "$part")"
    if grep -q 'CUDA tests skipped' "$part"; then status=FAIL note="$note; tests skipped under the sanitizer"; fi
    ((rc == 0)) || note="$(exit_note "$rc")$( ((rc == 86)) && echo ': sanitizer errors'); $note"
    record "$tool" "$status" "$rc" "$wall" "$note"
    { echo "===== compute-sanitizer --tool $tool: $(exit_note "$rc"), $wall s"; cat "$part"; echo; } >> "$log"
  done
  rm -f "$part"
}

# ---- benchmark ----------------------------------------------------------------------------------

bench_rows() {  # log -> names of the benchmarks that reported (or failed), in order
  grep -oE '^[a-z_0-9]+/[^ ]*(min_time|manual_time)[^ ]*' "$1"
}
bench_base_names() {  # drops the suffixes Google Benchmark adds for the time options
  sed -E 's#(/min_time:[^/ ]*)?(/manual_time|/real_time)?$##'
}

run_bench() {
  local log=$out/bench.log status note n errors copy crashed remaining regex runner=()
  if [ ! -x "$bench_bin" ]; then
    record bench MISSING 127 0 "no benchmark binary ($bench_bin)"
    return
  fi
  # Line-buffered, so that a killed run keeps every line it printed.
  command -v stdbuf >/dev/null && runner=(stdbuf -oL -eL)
  if ((dry_run)); then
    timed "$t_bench" "$log" "${runner[@]}" "$bench_bin" --benchmark_list_tests --benchmark_filter="$bench_filter"
    status=$(status_of "$rc")
    n=$(grep -cE '^[a-z_0-9]+/' "$log")
    if grep -q 'nothing measured' "$log"; then
      note="starts and reports no device: $(grep -m1 'nothing measured' "$log" | sed 's/.*(\(.*\)).*/\1/')"
    else
      note="$n benchmarks listed for the filter"
      ((rc == 0 && n == 0)) && status=FAIL
    fi
    ((rc == 0)) || note="$(exit_note "$rc"); $note"
    record bench "$status" "$rc" "$wall" "$note"
    return
  fi
  local args=(--benchmark_counters_tabular=true --benchmark_out_format=json)
  timed "$t_bench" "$log" "${runner[@]}" "$bench_bin" "${args[@]}" --benchmark_filter="$bench_filter" \
    --benchmark_out="$out/bench.json"
  local first_rc=$rc total_wall=$wall listed
  crashed=""
  # A crash rather than a timeout: resume once, after the benchmark that was running.
  if ((rc != 0 && rc != 124 && rc != 125 && rc != 137)) && ! grep -q '^== packkv CUDA results' "$log"; then
    listed=$("$bench_bin" --benchmark_list_tests --benchmark_filter="$bench_filter" 2>/dev/null |
      grep -E '^[a-z_0-9]+/' | bench_base_names)
    remaining=$(grep -vxF -f <(bench_rows "$log" | bench_base_names) <<< "$listed")
    crashed=$(head -1 <<< "$remaining")
    remaining=$(tail -n +2 <<< "$remaining")
    if [ -n "$remaining" ]; then
      regex="^($(sed 's/[][\.*^$+?(){}|]/\\&/g' <<< "$remaining" | paste -sd'|'))(/|\$)"
      echo "===== resumed after a crash in $crashed" >> "$log"
      timed "$t_bench" "$log" "${runner[@]}" "$bench_bin" "${args[@]}" --benchmark_filter="$regex" \
        --benchmark_out="$out/bench.resumed.json"
      total_wall=$((total_wall + wall))
    fi
  fi
  status=$(status_of "$first_rc")
  n=$(bench_rows "$log" | wc -l)
  errors=$(grep -c 'ERROR OCCURRED' "$log")
  copy=$(grep -m1 '^== packkv CUDA results' "$log" | grep -oE 'copy [0-9.]+ GB/s')
  note="$n benchmarks, $errors errors${copy:+, $copy}"
  grep -q 'nothing measured' "$log" && { status=FAIL note="no device: $(grep -m1 'nothing measured' "$log")"; }
  [ -n "$crashed" ] && note="$note; crashed in $crashed, resumed after it ($(exit_note "$rc"))"
  ((first_rc == 0)) || note="$(exit_note "$first_rc"); $note"
  grep -q '^== packkv CUDA results' "$log" || note="$note; no summary section"
  record bench "$status" "$first_rc" "$total_wall" "$note"
}

# ---- the torch SDPA peer ------------------------------------------------------------------------

run_peer() {
  local log=$out/peer.log status note
  if [ -z "$peer" ] || [ ! -f "$peer" ]; then
    record peer absent 0 0 "no sdpa_peer.py${peer:+ ($peer)}"
    return
  fi
  if ((dry_run)); then
    if python3 -c 'import ast, sys; ast.parse(open(sys.argv[1]).read())' "$peer" > "$log" 2>&1; then
      record peer dry-run 0 0 "sdpa_peer.py parses; it runs where python3 has torch"
    else
      record peer FAIL 1 0 "sdpa_peer.py does not parse (peer.log)"
    fi
    return
  fi
  if ! python3 -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)' 2>/dev/null; then
    record peer skipped 0 0 "python3 cannot import torch"
    return
  fi
  # With the loader path the caller had: the packaged CUDA runtime must not shadow torch's own.
  local peer_env=(env -u LD_LIBRARY_PATH)
  [ -n "$caller_ld_path" ] && peer_env=(env LD_LIBRARY_PATH="$caller_ld_path")
  timed "$t_peer" "$log" "${peer_env[@]}" PYTHONUNBUFFERED=1 python3 "$peer" --json "$out/peer.json"
  status=$(status_of "$rc")
  if grep -q '^== torch sdpa peer' "$log"; then
    note="$(section_of "$log" '== torch sdpa peer' | wc -l) lines of results"
  else
    note="no '== torch sdpa peer' section; last line: $(tail -1 "$log")"
  fi
  ((rc == 0)) || note="$(exit_note "$rc"); $note"
  record peer "$status" "$rc" "$wall" "$note"
}

# ---- the run ------------------------------------------------------------------------------------

caller_ld_path=${LD_LIBRARY_PATH:-}
echo "gpu_run: $( ((dry_run)) && echo 'dry run, ')results in $out; budget $budget s in all" \
  "(tests $t_tests, sanitizers $t_sanitizers, bench $t_bench, peer $t_peer; kill grace ${grace} s included)"
check_libraries
{ cat "$out/libs.tmp"; echo; } > "$out/tests.log" 2>/dev/null
rm -f "$out/libs.tmp"
run_tests
((interrupted)) || run_sanitizers
((interrupted)) || run_bench
((interrupted)) || run_peer
finish

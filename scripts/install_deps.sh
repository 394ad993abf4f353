#!/usr/bin/env bash
# Installs what packkv's build, tests and benchmarks need from Debian's packages (idempotent).
# The CUDA toolkit (nvcc) is optional: without it the CUDA backend is skipped.
# Usage: scripts/install_deps.sh [--sanitizers]
set -euo pipefail
packages=(cmake g++ make libgtest-dev libbenchmark-dev libfmt-dev python3 python3-venv)
if [ "${1:-}" = "--sanitizers" ]; then
  packages+=(clang libclang-rt-14-dev libomp-dev)  # libFuzzer and clang's sanitizer runtimes
fi
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}"
fi

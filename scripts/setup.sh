#!/usr/bin/env bash
# Create (or update) the project's virtual environment.  Usage: scripts/setup.sh VENV [EXTRAS]
# On a machine without an NVIDIA GPU the CPU build of torch is installed first, so that the
# unpinned `torch>=2.4` of pyproject is already satisfied and no multi-GB CUDA wheel is fetched.
set -euo pipefail
venv=${1:-.venv}
extras=${2:-serve,sim}
py=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$venv/bin/python" -c 'import torch' >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing the default (CUDA) torch build" >&2
  else
    echo "setup: no NVIDIA GPU, installing the CPU build of torch" >&2
    $pip install -q "torch==2.13.0" 2>/dev/null || $pip install -q "torch>=2.4"
  fi
fi
$pip install -q -e ".[${extras}]"

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
    # In this order: the pinned CPU wheel where pip has it locally (PyPI holds no '+cpu' builds, so
    # elsewhere this fails at once instead of fetching PyPI's torch, which on Linux is the CUDA
    # build), PyTorch's CPU index (its '+cpu' builds sort above PyPI's of the same version), and
    # last PyPI's default build.
    $pip install -q "torch==2.13.0+cpu" 2>/dev/null \
      || $pip install -q --index-url https://download.pytorch.org/whl/cpu \
           --extra-index-url https://pypi.org/simple "torch>=2.4" \
      || { echo "setup: no CPU build of torch found, installing PyPI's default one" >&2
           $pip install -q "torch>=2.4"; }
  fi
fi
$pip install -q -e ".[${extras}]"

#!/usr/bin/env bash
# FlexPipe GPU check: one command on a machine with one NVIDIA GPU, no network, under 8 minutes.
# Runs the GPU tests and prints the GPU figures (docs/gpu.md); writes them to
# benchmarks/results/gpu_check-<date>-<gpu>.json (or --out PATH). Installs nothing: it uses the project
# venv (.venv) or $PYTHON, which needs torch with CUDA; CuPy (cupy-cuda13x; -cuda12x for CUDA 12) for the CUDA IPC / NCCL
# parts; nvidia-ml-py for the NVML inventory; transformers for the HF baseline.
#
#   bash benchmarks/gpu_check.sh              # the real run
#   bash benchmarks/gpu_check.sh --dry-run    # the same control flow on CPU, tiny sizes (no GPU figure)
#
# Exit codes: 0 everything ran, passed and met its target; 1 a section failed or timed out, or a test or
# check failed; 2 no usable GPU / python; 3 all ran and passed but a performance target was not met;
# 4 nothing failed but a section was skipped (no CuPy, or no time left); 124 the 8-minute backstop fired.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "gpu_check: $PY cannot import torch; set PYTHON to an interpreter with torch (CUDA build) and this project" >&2
    exit 2
fi
"$PY" - <<'EOF'
import importlib.util, torch
cuda = torch.cuda.is_available()
print(f"python {__import__('sys').version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"GPU: {torch.cuda.get_device_name(0) if cuda else 'none visible'}")
for mod, what in (("cupy", "CUDA IPC and NCCL transports (pip install cupy-cuda13x, or cupy-cuda12x for a CUDA 12 torch)"),
                  ("pynvml", "the NVML inventory (pip install nvidia-ml-py)"),
                  ("transformers", "the HF decode baseline")):
    if importlib.util.find_spec(mod) is None:
        print(f"note: {mod} is missing: {what} will fail or be skipped; the torch-only parts still run")
EOF

BACKSTOP=()
if command -v timeout >/dev/null 2>&1; then
    BACKSTOP=(timeout --kill-after=15 480)   # the driver keeps its own budgets; this only catches a wedge
fi
"${BACKSTOP[@]}" "$PY" -m benchmarks.gpu_check "$@"
exit $?

"""mypy on the GPU data path ([tool.mypy] in pyproject.toml lists the modules): what no CPU test can
run end to end is at least type-checked on every CPU run. CuPy and pynvml have no stubs (Any)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)   # a cold mypy cache on a busy 2-core machine takes most of a minute
def test_gpu_modules_type_check():
    proc = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary"], cwd=ROOT, capture_output=True,
                          text=True, timeout=280)
    assert "No module named mypy" not in proc.stderr, "mypy is a test dependency: pip install -e '.[test]'"
    assert proc.returncode == 0, proc.stdout + proc.stderr

"""keep_freed_memory: step-sized tensors come back from the heap instead of fresh, page-faulting mmaps."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(120)

WORKLOAD = textwrap.dedent("""
    import random, resource, sys, torch
    from flexpipe.runtime.memory import keep_freed_memory
    if sys.argv[1] == "1":
        assert keep_freed_memory()
    torch.set_num_threads(1)
    rng = random.Random(0)
    def steps():   # tensors of 0.3-12 MB allocated, filled and freed, a few alive at once (like a stage step)
        alive = []
        for _ in range(150):
            t = torch.empty(rng.choice([70_000, 300_000, 1_500_000, 3_000_000]))
            t.fill_(1.0)
            alive.append(t)
            if len(alive) > 6:
                alive.pop(rng.randrange(len(alive)))
    steps()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        steps()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(tuned: bool) -> int:
    out = subprocess.run([sys.executable, "-c", WORKLOAD, "1" if tuned else "0"], capture_output=True, text=True,
                         timeout=100, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_freed_step_tensors_are_reused_without_page_faults():
    default, tuned = _faults(False), _faults(True)
    assert tuned * 10 < default, f"minor page faults: {tuned} tuned vs {default} with malloc's defaults"


"""keep_freed_memory: step-sized tensors come back from the heap instead of fresh, page-faulting mmaps;
release_freed_memory and idle stage processes give that heap back."""

from __future__ import annotations

import asyncio
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
    # Other activity on a shared machine only adds faults (a busy CI runner once counted 16k, against ~3k
    # alone): the best of three runs measures the allocator, not the neighbours.
    default, tuned = _faults(False), min(_faults(True) for _ in range(3))
    assert tuned * 10 < default, f"minor page faults: {tuned} tuned vs {default} with malloc's defaults"


RELEASE = textwrap.dedent("""
    import sys, torch
    from flexpipe.runtime.memory import keep_freed_memory, release_freed_memory
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    if sys.argv[1] == "0":
        print(release_freed_memory())   # malloc's defaults: nothing to release, nothing done
        sys.exit()
    assert keep_freed_memory()
    base = rss()
    alive = [torch.ones(2_000_000) for _ in range(25)]   # 25 x 8 MB, from the heap (under 32 MiB)
    del alive
    kept = rss()
    assert release_freed_memory()
    print(base, kept, rss())
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_release_gives_the_kept_heap_back():
    run = lambda arg: subprocess.run([sys.executable, "-c", RELEASE, arg], capture_output=True, text=True,
                                     timeout=100, check=True).stdout.split()
    assert run("0") == ["False"]
    base, kept, released = map(int, run("1"))
    assert kept - base > 150 << 20, "the freed 200 MB should stay mapped under keep_freed_memory"
    assert kept - released > 150 << 20, f"release_freed_memory() gave back only {(kept - released) >> 20} MiB"


async def test_an_idle_stage_process_returns_its_kept_heap():
    from flexpipe.api import FlexPipe

    async def trims_reach(fp, n: int) -> list[int]:
        for _ in range(100):   # each stage trims within 0.3-0.6 s of its last step; allow a loaded machine 10 s
            trims = [st["memory_trims"] for st in await fp.controller.stage_status()]
            if min(trims) >= n:
                return trims
            await asyncio.sleep(0.1)
        return trims

    async with FlexPipe.launch("tiny", stages=2, idle_trim_s=0.3) as fp:
        first = await fp.complete([5, 6, 7], max_tokens=8)
        assert await trims_reach(fp, 1) == [1, 1]
        await asyncio.sleep(1.0)   # still idle: nothing new to give back, no more trims
        assert [st["memory_trims"] for st in await fp.controller.stage_status()] == [1, 1]
        again = await fp.complete([5, 6, 7], max_tokens=8)   # serving after a trim is unchanged
        assert again.token_ids == first.token_ids
        assert await trims_reach(fp, 2) == [2, 2]

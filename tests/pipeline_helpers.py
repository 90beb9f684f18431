"""Shared pieces of the pipeline tests: a request mix and the oracle check."""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any, AsyncIterator, Callable

from flexpipe.model.reference import ReferenceModel
from flexpipe.model.sampling import SamplingParams


def request_mix(n: int, seed: int = 0, max_tokens: tuple[int, int] = (8, 40)) -> list[dict]:
    """n requests of different prompt lengths, output lengths, and sampling (greedy or seeded)."""
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        words = " ".join(rng.choice(["pipe", "stage", "token", "reshape", "cache", "GPU", "flex"])
                         for _ in range(rng.randint(1, 30)))
        temp = 0.0 if i % 2 == 0 else rng.choice([0.7, 1.0])
        reqs.append({"prompt": f"{i}: {words}", "max_tokens": rng.randint(*max_tokens), "temperature": temp,
                     "top_k": rng.choice([0, 20]) if temp else 0, "top_p": rng.choice([1.0, 0.9]) if temp else 1.0,
                     "seed": 1000 + i, "ignore_eos": True})
    return reqs


def oracle(fp, req: dict) -> list[int]:
    """The reference's tokens for one request, run alone."""
    return fp.reference_tokens(req["prompt"], **{k: v for k, v in req.items() if k != "prompt"})


def check_against_oracle(fp, reqs: list[dict], outs: list) -> None:
    """Every output equals the oracle; a difference is allowed only at a stated near-tie (checked)."""
    ref_model = ReferenceModel(fp.config, fp.spec.weights())
    for req, out in zip(reqs, outs):
        want = oracle(fp, req)
        got = out.token_ids
        if got == want:
            continue
        # the first divergence must be a numerical near-tie of the reference's logits
        k = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        ids = fp.encode(req["prompt"])
        logits = ref_model.logits_for(ids, want[:k])[-1]
        top2 = logits.topk(2).values
        margin = float(top2[0] - top2[1])
        assert req["temperature"] == 0 and margin < 1e-4, (
            f"request {req['prompt'][:20]!r} diverged from the oracle at token {k} "
            f"(got {got[k]}, want {want[k]}, top-2 margin {margin:.3g}): {got} != {want}")


async def run_all(fp, reqs: list[dict]) -> list:
    return await asyncio.gather(*(fp.complete(r["prompt"], **{k: v for k, v in r.items() if k != "prompt"})
                                  for r in reqs))


async def poll_until(condition: Callable[[], object], timeout: float = 10) -> None:
    """Wait until `condition()` holds, checking every millisecond, for at most `timeout` seconds: for
    state that an actor's handlers or an event loop's readers change in this process where no event
    reaches the test (a stage's counters, a socket monitor's view); `until` where the router's events do."""
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.001)
    await asyncio.wait_for(poll(), timeout)


async def until(router, cond, timeout: float = 120) -> None:
    """Wait until cond() holds: checked now and at each of the router's events (an arrival, a step's
    output, a finish), so a handshake with the data path rather than a sleep; bounded by `timeout`."""
    seen = asyncio.Event()

    def check(*_):
        if cond():
            seen.set()

    router.listeners.append(check)
    try:
        check()
        await asyncio.wait_for(seen.wait(), timeout)
    finally:
        router.listeners.remove(check)


@contextlib.asynccontextmanager
async def held(router, n: int = 1, want: Callable[[Any], bool] = lambda req: req.computed > 0,
               timeout: float = 120) -> AsyncIterator[list]:
    """Quiesce the router once `n` running requests hold KV (`want`: their scheduler records), and
    yield those records; resume it on the way out.

    Held, no step runs: no request finishes, is preempted or admitted until the router resumes (a
    reshape resumes it after its switch), however long what runs meanwhile takes.  A reshape that
    starts a stage process takes seconds on a loaded machine, where requests that were merely
    running when it began may all have ended before it copies anything.  The records are picked
    after the quiesce (the steps in flight return first, and may finish some): waited for again,
    within `timeout` in all, when fewer than `n` are left."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout

    def pick() -> list:
        reqs = (router.sched.requests.get(rid) for rid in router.sched.running)
        return [r for r in reqs if r is not None and r.finished is None and want(r)]

    while True:
        await until(router, lambda: len(pick()) >= n, max(0.0, deadline - loop.time()))
        await router.quiesce()
        got = pick()
        if len(got) >= n:
            break
        router.resume()
    try:
        yield got
    finally:
        router.resume()


__all__ = ["SamplingParams", "check_against_oracle", "held", "oracle", "request_mix", "run_all", "until"]


def rt_allowed() -> bool:
    """Whether this machine lets a process use SCHED_RR at priority 1 (root, CAP_SYS_NICE or ulimit -r),
    tried in a child interpreter so that this one never becomes real-time."""
    import subprocess
    import sys

    code = "import os; os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))"
    return sys.platform.startswith("linux") and subprocess.run([sys.executable, "-c", code],
                                                               capture_output=True, timeout=60).returncode == 0


def thread_policies(pid: int) -> set[tuple[int, int]]:
    """The (scheduling policy, priority) pairs of every thread of process `pid`."""
    import os

    out = set()
    for t in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):   # the thread ended meanwhile
            out.add((os.sched_getscheduler(int(t)), os.sched_getparam(int(t)).sched_priority))
    return out

"""The router daemon when every worker is lost at once and comes back: a router and two workers as real
processes (as tests/test_daemons.py starts them), driven through RemoteFlexPipe.

Every worker SIGKILLed (or the router paused past the workers' heartbeat timeout) leaves the recovery of
the stages no live device.  It used to fail at once (PlacementError "no live device ..."), ending every
running request with "error" and setting the pipeline down; only another death of a pipeline stage
could clear that, and none comes: once the workers were back, every request was still refused
(PipelineDown) until the router process was restarted, while status() said "serving" and Hello said
ready.  Now the recovery waits (bounded) for a worker to join, so the running requests are recomputed;
and when it fails all the same, the next worker to join runs it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import pytest

from flexpipe.errors import PipelineDown
from flexpipe.runtime.remote import RemoteFlexPipe, RouterUnavailable
from tests.pipeline_helpers import check_against_oracle, request_mix, run_all
from tests.test_daemons import Daemon, one_torch_thread, stop_daemons  # noqa: F401 - (a module fixture: autouse)

HB = ["--heartbeat-timeout", "2"]   # a worker that answers no heartbeat for 2 s is lost
# a recovery waits for a worker 2 x heartbeat timeout + JOIN_WAIT_S; each stage's death runs one
DOWN_S = 2 * (2 * 2 + 5.0) + 60.0


async def status_until(fp: RemoteFlexPipe, cond, timeout: float) -> dict:
    """The router's status once cond(status) holds: asked again and again, for at most `timeout` s."""
    async def poll() -> dict:
        while True:
            st = await fp.status()
            if cond(st):
                return st
            await asyncio.sleep(0.05)
    return await asyncio.wait_for(poll(), timeout)


def logged(d: Daemon, text: str, timeout: float) -> None:
    """Return once a line of `d`'s log holds `text`; fail after `timeout` seconds."""
    with d._cond:
        found = d._cond.wait_for(lambda: any(text in line for line in d.raw), timeout)
    assert found, f"{d.name}: no log line with {text!r} within {timeout:g}s"


class Cluster:
    """A router (2 stages, waits for 2 workers) on an ipc socket, and workers wa and wb, one CPU each."""

    def __init__(self, tmp) -> None:
        self.router = Daemon("router", ["router", "--bind", f"ipc://{tmp}/router", "--model", "tiny", "--stages",
                                        "2", "--num-blocks", "100", "--min-workers", "2", "--drain-timeout", "1.5",
                                        *HB])
        self.all = [self.router]
        self.url = ""
        self.workers: dict[str, Daemon] = {}

    def start_workers(self) -> None:
        for name in ("wa", "wb"):
            self.workers[name] = Daemon(name, ["worker", "--router", self.url, "--name", name, "--devices", "cpu:0",
                                               "--memory", "1GB", *HB])
            self.all.append(self.workers[name])

    async def kill_workers(self, fp: RemoteFlexPipe) -> None:
        """SIGKILL every worker and its stages (as a host that dies: no step runs on after this);
        return once the router has declared each worker lost."""
        stages = [s["pid"] for s in (await fp.status())["stages"]]
        mark = self.router.mark()
        for w in self.workers.values():
            w.proc.send_signal(signal.SIGKILL)
        for pid in stages:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for name in self.workers:
            await asyncio.to_thread(self.router.wait_for, "worker_lost", 30, mark, worker=name)


@pytest.mark.timeout(240)
@pytest.mark.slow   # (~50 s, two bounded waits for workers: `make test-slow`)
async def test_the_router_serves_again_once_its_lost_workers_come_back(tmp_path):
    c = Cluster(tmp_path)
    try:
        c.url = c.router.wait_for("listening")["endpoint"]
        c.start_workers()
        c.router.wait_for("ready")
        async with RemoteFlexPipe.connect(c.url, ready_timeout=30, heartbeat_timeout=30) as fp:
            probe = {"prompt": "probe", "max_tokens": 4}
            want = await asyncio.to_thread(fp.reference_tokens, "probe", max_tokens=4)

            # 1. Requests running when every worker dies, and the workers restarted at once: the
            # recovery waits for them, and the requests are recomputed (not failed).
            reqs = request_mix(3, seed=29, max_tokens=(150, 200))
            traffic = asyncio.ensure_future(run_all(fp, reqs))
            await status_until(fp, lambda st: st["router"]["running"] == len(reqs), 60)
            await c.kill_workers(fp)
            c.start_workers()
            outs = await asyncio.wait_for(traffic, 120)
            assert [o.finish_reason for o in outs] == ["length"] * len(reqs), outs
            await asyncio.to_thread(check_against_oracle, fp, reqs, outs)
            st = await fp.status()
            rec = st["reshapes"][-1]
            assert rec["kind"] == "recovery" and rec["ok"] and rec["requests_recomputed"] == len(reqs), rec
            assert st["state"] == "serving" and st["router"]["down"] is None, st["state"]

            # 2. Every worker dies and none comes back in time: the recovery of each stage fails (no
            # death is left to start another) and the pipeline is down, which the router says (not
            # "serving", not ready) ...
            stages = [s["actor"] for s in st["stages"]]
            await c.kill_workers(fp)
            for a in stages:
                await asyncio.to_thread(logged, c.router, f"recovery from the death of {a} failed", DOWN_S)
            st = await fp.status()
            assert st["router"]["down"] is not None, st["router"]
            assert st["state"].startswith("down: ") and "recovers when a worker joins" in st["state"], st["state"]
            with pytest.raises(PipelineDown, match="once a worker joins"):
                await fp.complete(**probe)
            with pytest.raises(RouterUnavailable, match="down: "):   # (Hello says not ready; WaitReady waits)
                async with RemoteFlexPipe.connect(c.url, ready_timeout=1, heartbeat_timeout=30):
                    pass
            # ... until its workers are back: then it recovers by itself and serves (the oracle's tokens)
            c.start_workers()
            st = await status_until(fp, lambda st: st["router"]["down"] is None, 90)
            out = await asyncio.wait_for(fp.complete(**probe), 60)
            assert out.finish_reason == "length" and out.token_ids == want, out
            st = await fp.status()
            assert st["state"] == "serving" and st["router"]["down"] is None, st["state"]
            assert st["reshapes"][-1]["kind"] == "recovery" and st["reshapes"][-1]["ok"], st["reshapes"][-1]
            async with RemoteFlexPipe.connect(c.url, ready_timeout=30, heartbeat_timeout=30) as again:
                assert (await again.complete(**probe)).token_ids == want
    finally:
        stop_daemons(c.all)

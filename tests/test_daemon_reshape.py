"""Reshapes under the router daemon whose stages die or whose worker goes meanwhile, and reshapes onto
devices the cluster does not have: a router and two workers as real processes (as tests/test_daemons.py
starts them), driven through RemoteFlexPipe.

A stage that died during a reshape used to stall every request for about a minute: the controller
asked it (ExpectPeers, then AbortPrepare) until each ask timed out, 30 s apiece, holding the lock its
recovery waited for.  The tests hold the reshape where it waits on the victim (that stage is stopped
with SIGSTOP before the reshape begins, so it answers nothing), then end it as each case does, and
check what the router logged: no ask of the reshape timed out before every request had finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from types import SimpleNamespace

import pytest

from flexpipe.errors import ConfigError, ReshapeError
from flexpipe.runtime.remote import RemoteFlexPipe
from tests.pipeline_helpers import check_against_oracle, request_mix, run_all
from tests.test_daemons import START_S, Daemon, one_torch_thread, stop_daemons  # noqa: F401 - (a module fixture: autouse)

pytestmark = pytest.mark.timeout(120)

HB = ["--heartbeat-timeout", "3"]   # a stage or worker that answers no heartbeat for 3 s is dead
# what the router logs when an ask times out (the controller's, the actor's)
ASK_TIMED_OUT = ("AskTimeout", "no reply from")


def worker(name: str, url: str) -> Daemon:
    return Daemon(name, ["worker", "--router", url, "--name", name, "--devices", "cpu:0", "--memory", "1GB", *HB])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A router (2 stages, waits for 2 workers) on an ipc socket, and workers wa and wb, one CPU each."""
    tmp = tmp_path_factory.mktemp("reshape-cluster")
    router = Daemon("router", ["router", "--bind", f"ipc://{tmp}/router", "--model", "tiny", "--stages", "2",
                               "--num-blocks", "100", "--min-workers", "2", "--drain-timeout", "1.5", *HB])
    c = SimpleNamespace(router=router, url="", workers={}, all=[router], joining={})
    try:
        c.url = router.wait_for("listening")["endpoint"]
        for name in ("wa", "wb"):
            c.workers[name] = worker(name, c.url)
            c.all.append(c.workers[name])
        router.wait_for("ready")
        yield c
    finally:
        stop_daemons(c.all)


def connect(cluster) -> RemoteFlexPipe:
    return RemoteFlexPipe.connect(cluster.url, ready_timeout=30, heartbeat_timeout=5)


async def spread(fp, cluster) -> dict:
    """Stage 0 on wa, stage 1 on wb (a recovery may have put both on one worker); returns the status."""
    for name, w in cluster.workers.items():   # (one that an earlier test failed to start again)
        if w.proc.poll() is not None and name not in cluster.joining:
            rejoin(cluster, name)
    for name, mark in list(cluster.joining.items()):   # (started again by an earlier test: `rejoin`)
        await asyncio.to_thread(cluster.router.wait_for, "worker_joined", START_S, mark, worker=name)
        del cluster.joining[name]
    st = await fp.status()
    if [s["device"] for s in st["stages"]] != ["wa/0", "wb/0"]:
        await fp.reshape(stages=2, devices=["wa/0", "wb/0"])
        st = await fp.status()
    assert [(s["worker"], s["device"]) for s in st["stages"]] == [("wa", "wa/0"), ("wb", "wb/0")], st["stages"]
    return st


def rejoin(cluster, name: str) -> None:
    """Start worker `name` again (it was killed or stopped); the next test's `spread` waits for its join."""
    cluster.joining[name] = cluster.router.mark()
    cluster.workers[name] = worker(name, cluster.url)
    cluster.all.append(cluster.workers[name])


def said(d: Daemon, since: int, *words: str) -> list[dict]:
    """The log events of `d` after `since` whose text holds any of `words`."""
    return [e for e in d.events[since:] if any(w in str(e.get("msg", "")) + str(e.get("error", ""))
                                                 for w in words)]


@contextlib.contextmanager
def stopped(pid: int):
    """SIGSTOP `pid` (it answers nothing: a reshape asking it waits); SIGCONT, or nothing if it is gone, after."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


async def reshape_held_by(fp, cluster):
    """With stage 1 (on wb: the victim) stopped: traffic, then a reshape to 3 stages that keeps that
    stage and starts the new one on wa (so it waits on the victim, and nothing of it runs on wb).
    Returns (traffic, reshape, requests, router log mark), once the router has begun the reshape."""
    reqs = request_mix(3, seed=61, max_tokens=(30, 60))
    mark = cluster.router.mark()
    traffic = asyncio.ensure_future(run_all(fp, reqs))
    reshape = asyncio.ensure_future(fp.reshape(stages=3, devices=["wa/0", "wb/0", "wa/0"]))
    await asyncio.to_thread(cluster.router.wait_for, "reshape_started", 30, mark)
    return traffic, reshape, reqs, mark


async def check_recovered(fp, cluster, traffic, reshape, reqs, mark, victim: int) -> dict:
    """The reshape failed saying a stage died, every request finished before any ask of the reshape had
    timed out (the router logged none by then), with the oracle's output; the old shape serves again."""
    outs = await traffic
    timed_out = said(cluster.router, mark, *ASK_TIMED_OUT)   # what the router had logged by then
    with pytest.raises(ReshapeError) as err:
        await reshape
    assert not timed_out, f"requests waited for the reshape's ask timeouts: {timed_out}"
    assert "died" in str(err.value) or "dead" in str(err.value), err.value
    assert not any(w in str(err.value) for w in ASK_TIMED_OUT), err.value
    await asyncio.to_thread(check_against_oracle, fp, reqs, outs)
    # the dead stage was not asked to drop what it prepared (each such ask waited 30 s, or failed)
    assert not said(cluster.router, mark, "did not drop its prepared units")
    st = await fp.status()
    rec = st["reshapes"][-1]
    assert rec["kind"] == "recovery" and rec["ok"] and rec["to_boundaries"] == [0, 9, 18], rec
    assert st["reshapes"][-2]["kind"] == "reshape" and not st["reshapes"][-2]["ok"]
    assert victim not in {s["pid"] for s in st["stages"]} and len(st["stages"]) == 2
    return rec


async def test_a_worker_sigkilled_during_a_reshape_fails_it_at_once_and_requests_finish(cluster):
    """The worker of a kept stage dies during a reshape, and that stage with it (SIGKILL to both, as when
    their host goes): nothing says goodbye.  The reshape used to ask the dead stage ExpectPeers, then
    AbortPrepare, each until its 30 s timeout, holding the lock its recovery waited for, while every
    request waited (about a minute).  Now the first to notice (the router's heartbeats of the stage, or
    of its worker: worker_lost) declares it dead to the whole process, and the reshape fails at once."""
    async with connect(cluster) as fp:
        st = await spread(fp, cluster)
        victim = st["stages"][1]["pid"]
        with stopped(victim):
            traffic, reshape, reqs, mark = await reshape_held_by(fp, cluster)
            # once the new stage runs, the reshape waits on the victim (ExpectPeers), which cannot answer
            await asyncio.to_thread(cluster.router.wait_for, "stage_started", START_S, mark, device="wa/0")
            cluster.workers["wb"].proc.kill()   # (first: a worker alive would report its stage's exit)
            cluster.workers["wb"].proc.wait(10)
            os.kill(victim, signal.SIGKILL)
        await check_recovered(fp, cluster, traffic, reshape, reqs, mark, victim)
        assert (await fp.complete("after the kill", max_tokens=4)).finish_reason == "length"
        rejoin(cluster, "wb")


async def test_a_stage_that_hangs_during_a_reshape_fails_it_once_the_router_declares_it_dead(cluster):
    """Only the router knows: its heartbeats declare the stopped stage dead (its worker is fine).  The
    reshape's waits and asks end then, not at their timeouts; the recovery kills it and starts another."""
    async with connect(cluster) as fp:
        st = await spread(fp, cluster)
        victim = st["stages"][1]["pid"]
        with stopped(victim):
            traffic, reshape, reqs, mark = await reshape_held_by(fp, cluster)
            rec = await check_recovered(fp, cluster, traffic, reshape, reqs, mark, victim)
        assert "heartbeat" in rec["error"], rec
        assert cluster.workers["wb"].proc.poll() is None
        assert {s["worker"] for s in (await fp.status())["stages"]} == {"wa", "wb"}   # started on wb again


async def test_a_worker_that_leaves_during_a_reshape_takes_its_stages_with_it_at_once(cluster):
    """A worker leaving (SIGTERM) while its stage hangs: the stage says nothing, and the router dropped
    it with its worker without declaring it dead, so nothing ended the reshape's waits on it before
    the stage's heartbeats ran out.  Declared dead as the worker leaves, it is recovered for that reason."""
    async with connect(cluster) as fp:
        st = await spread(fp, cluster)
        victim = st["stages"][1]["pid"]
        with stopped(victim):
            traffic, reshape, reqs, mark = await reshape_held_by(fp, cluster)
            cluster.workers["wb"].proc.send_signal(signal.SIGTERM)   # it leaves, then kills the victim
            await asyncio.to_thread(cluster.router.wait_for, "worker_lost", 30, mark, worker="wb")
            rec = await check_recovered(fp, cluster, traffic, reshape, reqs, mark, victim)
        assert "its worker wb is gone" in rec["error"], rec   # not its heartbeats, seconds later
        assert cluster.workers["wb"].proc.wait(30) == 0
        assert {s["worker"] for s in (await fp.status())["stages"]} == {"wa"}
        rejoin(cluster, "wb")


async def test_a_reshape_onto_devices_the_cluster_lacks_is_refused_and_the_old_shape_serves(cluster):
    """It used to succeed: each stage's device has no live worker, which the stage launcher takes for a
    worker lost since the placement, and moved every stage to wa/0, while the shape named nope/0."""
    async with connect(cluster) as fp:
        before = await spread(fp, cluster)
        for devices in (["nope/0", "nope/1"], ["wa/0"], ["wa/0", 7]):
            with pytest.raises(ConfigError, match="devices must be a list of 2 device ids") as err:
                await fp.reshape(stages=2, devices=devices)
            assert "wa/0" in str(err.value).split("have:")[1] and "wb/0" in str(err.value).split("have:")[1]
        st = await fp.status()
        assert st["shape"] == before["shape"] and [s["pid"] for s in st["stages"]] == \
            [s["pid"] for s in before["stages"]]
        assert st["reshapes_total"] == before["reshapes_total"]
        c = await fp.complete("still the old shape", max_tokens=5)
        assert c.token_ids == await asyncio.to_thread(fp.reference_tokens, "still the old shape", max_tokens=5)
        # devices it has, named explicitly, still go
        assert (await fp.reshape(stages=3, devices=["wb/0", "wa/0", "wb/0"])).ok
        assert [s["device"] for s in (await fp.status())["stages"]] == ["wb/0", "wa/0", "wb/0"]

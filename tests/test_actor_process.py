"""Actors in spawned subprocesses: the Started handshake, failures to start, clean stop, kill -9
noticed by heartbeats within the heartbeat timeout, and heartbeats answered during a 2-second torch
compute in a handler."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from flexpipe.errors import ActorError, PeerDeadError
from flexpipe.runtime import ActorSystem, Ping, Pong
from test_actor_helpers import FAST, Compute, Deaths, Echo, Pid, Say, Sleep, WatchIt

pytestmark = pytest.mark.timeout(60)


async def test_launch_handshake_ask_and_clean_stop():
    async with ActorSystem(FAST) as system:
        h = await system.launch("test_actor_helpers:Echo", {"tag": "sub"}, name="sub")
        assert h.alive and h.pid != os.getpid()
        assert await system.ask(h.ref, Pid()) == h.pid
        assert await system.ask(h.ref, Say("across")) == Say("across")
        await h.stop()
        assert not h.alive and h.exitcode == 0
        with pytest.raises(PeerDeadError, match="exited with code 0"):
            await system.ask(h.ref, Say("gone"))


async def test_failures_to_start_are_typed_and_leave_no_process():
    async with ActorSystem(FAST) as system:
        with pytest.raises(ActorError, match="RuntimeError: no GPU here"):
            await system.launch("test_actor_helpers:FailsToStart", name="nogpu")
        with pytest.raises(ActorError, match="cannot load behaviour"):
            await system.launch("test_actor_helpers:NoSuchClass", name="typo")
        with pytest.raises(ActorError, match="unexpected keyword"):
            await system.launch("test_actor_helpers:Echo", {"colour": "red"}, name="badargs")
        assert all(not h.alive for h in system.handles)
        # a child that exits before Started: its Process is closed by then, the error still names it
        with pytest.raises(PeerDeadError, match=r"exited with code 3 before it started"):
            await system.launch("test_actor_helpers:DiesBeforeStarted", name="dies")


async def test_kill_9_is_noticed_by_heartbeats_within_the_timeout():
    """The watcher runs in another process that did not launch the victim: only heartbeats tell
    it. The parent (which launched it) knows at once from the process sentinel."""
    async with ActorSystem(FAST) as system:
        victim, watcher = await asyncio.gather(
            system.launch("test_actor_helpers:Echo", name="victim"),
            system.launch("test_actor_helpers:Echo", name="watcher"))
        await system.ask(watcher.ref, WatchIt(victim.ref))
        pending = asyncio.ensure_future(system.ask(victim.ref, Sleep(30), timeout=30))
        await asyncio.sleep(0.3)
        assert await system.ask(watcher.ref, Deaths()) == []

        os.kill(victim.pid, signal.SIGKILL)
        t = time.perf_counter()
        with pytest.raises(PeerDeadError, match="exited with code -9"):
            await pending                       # the launcher's sentinel (its words), not a heartbeat
        while not (deaths := await system.ask(watcher.ref, Deaths())):
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - t
        assert deaths[0].ref == victim.ref and "heartbeat" in deaths[0].reason
        assert elapsed <= FAST.heartbeat_timeout + 0.25, elapsed


async def test_heartbeats_answered_during_a_two_second_compute():
    async with ActorSystem(FAST) as system:
        worker = await system.launch("test_actor_helpers:Echo", name="worker")
        watcher = await system.spawn(Echo(), "watcher")
        # the first compute imports torch, which holds the GIL for seconds: not part of the test
        await system.ask(worker.ref, Compute(0.01), timeout=20)
        await system.ask(watcher.ref, WatchIt(worker.ref))
        work = asyncio.ensure_future(system.ask(worker.ref, Compute(2.0), timeout=20))
        await asyncio.sleep(0.1)
        pings = []
        while not work.done():
            t = time.perf_counter()
            assert await system.ask(worker.ref, Ping(len(pings)), timeout=1) == Pong(len(pings))
            pings.append(time.perf_counter() - t)
            await asyncio.sleep(0.05)
        assert await work > 0
        assert len(pings) >= 10 and max(pings) < FAST.heartbeat_timeout / 2, pings
        assert await system.ask(watcher.ref, Deaths()) == []   # never missed a heartbeat


async def test_a_child_ignores_sigint_and_stops_on_sigterm_after_its_grace():
    """Ctrl-C reaches every process of the terminal's group: the parent stops its children in order
    (launcher's docstring). A SIGTERM sent to the child alone stops it, cleanly, after its grace."""
    import dataclasses

    async with ActorSystem(dataclasses.replace(FAST, term_grace=0.3)) as system:
        h = await system.launch("test_actor_helpers:Echo", name="child")
        os.kill(h.pid, signal.SIGINT)
        assert await system.ask(h.ref, Say("still here")) == Say("still here")
        os.kill(h.pid, signal.SIGTERM)
        assert await asyncio.wait_for(h.wait(), 10) == 0


async def test_a_sigterm_waits_for_the_parent_to_stop_its_child():
    async with ActorSystem(FAST) as system:   # term_grace 5 s by default
        h = await system.launch("test_actor_helpers:Echo", name="child")
        os.kill(h.pid, signal.SIGTERM)
        assert await system.ask(h.ref, Say("serving")) == Say("serving")   # within its grace
        await h.stop()
        assert h.exitcode == 0

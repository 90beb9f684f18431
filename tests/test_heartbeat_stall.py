"""Heartbeats judge the peer, not our own loop: a watcher whose event loop is blocked (user code on
the embedded runtime's loop) for twice the heartbeat timeout declares no live peer dead, whichever
phase of the monitor the stall hits; a kill -9 is still noticed within the timeout, and after a
stall within the stall plus the timeout."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from flexpipe.runtime import ActorSystem
from test_actor_helpers import FAST, Deaths, Echo, Say, WatchIt

pytestmark = pytest.mark.timeout(60)

TIMEOUT = FAST.heartbeat_timeout
INTERVAL = FAST.heartbeat_interval


async def _watching(system, launcher):
    """An in-process watcher (in `system`) of a live subprocess and of an in-process actor.

    The subprocess is launched by `launcher`, another system: only heartbeats tell `system` of it.
    """
    victim = await launcher.launch("test_actor_helpers:Echo", name="victim")
    local = await system.spawn(Echo(), "local")
    watcher = await system.spawn(Echo(), "watcher")
    await system.ask(watcher.ref, WatchIt(victim.ref))
    await system.ask(watcher.ref, WatchIt(local.ref))
    return victim, local, watcher


async def test_a_stall_of_our_own_loop_declares_no_live_peer_dead():
    async with ActorSystem(FAST, name="a") as launcher, ActorSystem(FAST, name="b") as system:
        victim, local, watcher = await _watching(system, launcher)
        # stall at several phases of the monitor's cycle (mid-sleep, mid-ask)
        for phase in (0.0, 0.03, 0.07, INTERVAL * 0.5, INTERVAL * 1.3):
            await asyncio.sleep(phase)
            time.sleep(2 * TIMEOUT)          # blocks the loop: Pongs pile up in the socket
            await asyncio.sleep(2 * INTERVAL)
            assert watcher.behaviour.deaths == [], watcher.behaviour.deaths
        assert watcher.stats["peers_dead"] == 0
        assert watcher.stats["loop_stalls"] >= 1
        assert await system.ask(victim.ref, Say("alive")) == Say("alive")
        assert not watcher.is_dead(victim.ref) and not watcher.is_dead(local.ref)


async def test_kill_9_is_still_noticed_within_the_timeout():
    async with ActorSystem(FAST, name="a") as launcher, ActorSystem(FAST, name="b") as system:
        victim, _, watcher = await _watching(system, launcher)
        await asyncio.sleep(3 * INTERVAL)
        t = time.perf_counter()
        os.kill(victim.pid, signal.SIGKILL)
        while not watcher.behaviour.deaths:
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - t
        assert watcher.behaviour.deaths[0].ref == victim.ref
        assert "heartbeat" in watcher.behaviour.deaths[0].reason
        assert elapsed <= TIMEOUT + 0.25, elapsed


async def test_kill_9_during_a_stall_is_noticed_after_it():
    async with ActorSystem(FAST, name="a") as launcher, ActorSystem(FAST, name="b") as system:
        victim, _, watcher = await _watching(system, launcher)
        await asyncio.sleep(3 * INTERVAL)
        t = time.perf_counter()
        os.kill(victim.pid, signal.SIGKILL)
        time.sleep(2 * TIMEOUT)
        while not watcher.behaviour.deaths:
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - t
        assert [d.ref for d in await system.ask(watcher.ref, Deaths())] == [victim.ref]
        assert elapsed <= 2 * TIMEOUT + TIMEOUT + INTERVAL + 0.25, elapsed

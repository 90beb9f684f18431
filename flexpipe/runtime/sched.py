"""Opt-in real-time CPU scheduling of FlexPipe's processes (the `rt_priority` setting).

Where stage processes outnumber the cores (four CPU stages, a router and their ZeroMQ I/O threads on
two vCPUs), the kernel's fair scheduler time-shares them: a woken stage waits behind a computing one
and a computing one is stretched by another's slices, and a pipeline step's hops pay for it.
`bench_pipeline.py --rt-priority 1` against the default shows what that costs at 8 and 32 streams
(README, FP-3).  SCHED_RR at one priority for every thread of every process of a pipeline makes them
run to completion in the order they woke, each on a free core when there is one.

It is opt-in because a real-time thread that computes keeps lower-priority work off its core (the
kernel keeps 5% of each second for normal threads by default), and because it needs CAP_SYS_NICE or
an RLIMIT_RTPRIO of at least the priority.  Threads inherit the policy of the thread that creates
them, and processes of the thread that spawns them, so setting it on a process's threads before its
ZeroMQ context and pools start covers them.  Launched processes also default OMP_WAIT_POLICY to
PASSIVE (with torch_threads > 1, an OpenMP worker that spins between ops at a real-time priority
would keep the other stages off its core); a process that imported torch before cannot change
that, so an embedding program that uses rt_priority with several torch threads should set it itself.
Linux only.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable

from flexpipe.errors import ConfigError

MAX_PRIORITY = 99


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:   # no procfs: the calling thread only
        return [0]


def _policy(tid: int) -> tuple[int, int] | None:
    try:
        return os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority
    except ProcessLookupError:   # the thread ended meanwhile
        return None


def _set(tid: int, policy: int, priority: int) -> None:
    with contextlib.suppress(ProcessLookupError):   # the thread ended meanwhile
        os.sched_setscheduler(tid, policy, os.sched_param(priority))


# Pipelines of this process that asked for real-time scheduling (their priorities), and what the
# threads had before the first of them: the last one to close puts that back.
_holders: list[int] = []
_saved: dict[int, tuple[int, int]] = {}
_caller: tuple[int, int] = (0, 0)   # the policy of the thread that asked first (set by use_realtime)


def _apply(priority: int) -> None:
    """SCHED_RR at `priority` for every thread (what each had first is kept in _saved while no
    pipeline holds it yet); on refusal no thread is left changed, and ConfigError."""
    done: list[tuple[int, tuple[int, int]]] = []
    try:
        for tid in _threads():
            old = _policy(tid)
            if old is None:
                continue
            _set(tid, os.SCHED_RR, priority)
            done.append((tid, old))
    except PermissionError:
        for tid, old in done:
            _set(tid, *old)
        raise ConfigError(
            f"rt_priority={priority}: this process may not use real-time scheduling; it needs CAP_SYS_NICE "
            f"(Docker: --cap-add SYS_NICE) or an RLIMIT_RTPRIO of at least {priority} (ulimit -r {priority}; "
            f"systemd: LimitRTPRIO={priority}); or set rt_priority=0 for the kernel's default scheduler") from None
    if not _holders:
        _saved.update(done)


def use_realtime(priority: int) -> Callable[[], None]:
    """Put every thread of this process under SCHED_RR at `priority` (1-99); returns a function that
    undoes it.  Pipelines of one process share it: while several hold it, every thread runs at the
    highest priority asked; when the last one undoes it, each thread gets back the policy it had
    before the first, and threads started meanwhile (which inherited SCHED_RR) the policy of the
    thread that asked first.  Raises ConfigError where real-time scheduling is not allowed."""
    if not hasattr(os, "SCHED_RR") or not hasattr(os, "sched_setscheduler"):
        raise ConfigError(f"rt_priority={priority}: real-time scheduling needs Linux; set rt_priority=0")
    if not isinstance(priority, int) or isinstance(priority, bool) or not 1 <= priority <= MAX_PRIORITY:
        raise ConfigError(f"rt_priority={priority!r}: give an integer from 1 to {MAX_PRIORITY} (0: the kernel's "
                          "default scheduler)")
    global _caller
    if not _holders:
        _caller = _policy(0) or (os.SCHED_OTHER, 0)
    _apply(max(_holders + [priority]))
    _holders.append(priority)
    undone = False

    def restore() -> None:
        nonlocal undone
        if undone:
            return
        undone = True
        _holders.remove(priority)
        if _holders:
            _apply(max(_holders))   # (lowering a priority is always allowed)
            return
        for tid in _threads():
            now = _policy(tid)
            if now is None:
                continue
            if tid in _saved:
                _set(tid, *_saved[tid])
            elif now[0] == os.SCHED_RR:   # started meanwhile, inherited it
                _set(tid, *_caller)
        _saved.clear()

    return restore

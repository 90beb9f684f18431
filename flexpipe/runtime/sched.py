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
    except (ProcessLookupError, PermissionError):   # the thread ended meanwhile
        return None


def _set(tid: int, policy: int, priority: int) -> None:
    try:
        os.sched_setscheduler(tid, policy, os.sched_param(priority))
    except ProcessLookupError:
        pass


def use_realtime(priority: int) -> Callable[[], None]:
    """Put every thread of this process under SCHED_RR at `priority` (1-99); returns a function that
    puts back the policy each had, and gives threads started meanwhile (which inherited SCHED_RR at
    `priority`) the policy the calling thread had.  Raises ConfigError where that is not allowed."""
    if not hasattr(os, "SCHED_RR") or not hasattr(os, "sched_setscheduler"):
        raise ConfigError(f"rt_priority={priority}: real-time scheduling needs Linux; set rt_priority=0")
    if not isinstance(priority, int) or isinstance(priority, bool) or not 1 <= priority <= MAX_PRIORITY:
        raise ConfigError(f"rt_priority={priority!r}: give an integer from 1 to {MAX_PRIORITY} (0: the kernel's "
                          "default scheduler)")
    caller = _policy(0) or (os.SCHED_OTHER, 0)
    before: dict[int, tuple[int, int]] = {}
    try:
        for tid in _threads():
            old = _policy(tid)
            if old is None:
                continue
            _set(tid, os.SCHED_RR, priority)
            before[tid] = old
    except PermissionError:
        for tid, (policy, prio) in before.items():
            _set(tid, policy, prio)
        raise ConfigError(
            f"rt_priority={priority}: this process may not use real-time scheduling; it needs CAP_SYS_NICE "
            f"(Docker: --cap-add SYS_NICE) or an RLIMIT_RTPRIO of at least {priority} (ulimit -r {priority}; "
            f"systemd: LimitRTPRIO={priority}); or set rt_priority=0 for the kernel's default scheduler") from None

    def restore() -> None:
        for tid in _threads():
            now = _policy(tid)
            if now is None:
                continue
            if tid in before:
                _set(tid, *before[tid])
            elif now == (os.SCHED_RR, priority):   # started meanwhile, inherited it
                _set(tid, *caller)

    return restore

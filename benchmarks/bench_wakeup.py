"""What a hop waits for when the receiver was idle: one-way ZeroMQ latency against the time it slept.

    .venv/bin/python benchmarks/bench_wakeup.py            # gaps of 0.1, 0.5, 1, 3, 10 ms, 200 messages each

Two processes, each pinned to a core: the sender busy-waits D ms (a clock loop that touches almost no
memory, so the receiver's caches are not disturbed), stamps the time and pushes 8 bytes over ipc; the
receiver, blocked in recv(), notes when the message arrives (both read the same monotonic clock).
The receiver sits first on another core, which idles while the sender computes, then on the
sender's own core, which stays awake.  Where the first latency grows with D and the second does not,
what costs is waking an idle core: on a VM whose idle vCPUs halt at once (no guest halt polling) the
host must schedule the halted vCPU again.  A stage of a pipeline sleeps while the stages before it
compute, so each of its hops pays that wake-up (see the README's FP-3 figures).  The script also prints
the guest's cpuidle driver and halt-polling window where Linux exposes them.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _receiver(addr: str, n: int, out: Any, core: int) -> None:
    os.sched_setaffinity(0, {core})
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.bind(addr)
    out.put("ready")
    lat = []
    for _ in range(n):
        sent = struct.unpack("d", sock.recv())[0]
        lat.append(time.perf_counter() - sent)
    out.put(lat)
    sock.close(0)
    ctx.term()


def one_gap(gap: float, n: int, workdir: str, core: int) -> list[float]:
    """One-way latencies of n messages sent `gap` seconds apart to a receiver pinned to `core`."""
    addr = f"ipc://{workdir}/wake-{gap:g}"
    spawn = mp.get_context("spawn")
    q = spawn.Queue()
    p = spawn.Process(target=_receiver, args=(addr, n, q, core))
    p.start()
    q.get(timeout=30)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(addr)
    try:
        _spin(0.2)   # let the connection settle
        for _ in range(n):
            _spin(gap)
            sock.send(struct.pack("d", time.perf_counter()))
        return q.get(timeout=60)
    finally:
        p.join(timeout=10)
        sock.close(0)
        ctx.term()


def idle_policy() -> str:
    root = Path("/sys/devices/system/cpu/cpuidle")
    parts = []
    for name in ("current_driver", "current_governor_ro", "current_governor"):
        f = root / name
        if f.exists():
            parts.append(f"{name} {f.read_text().strip()}")
            break
    poll = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
    if poll.exists():
        parts.append(f"guest_halt_poll_ns {poll.read_text().strip()}")
    return ", ".join(parts) or "not exposed here"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gaps-ms", default="0.1,0.5,1,3,10")
    ap.add_argument("--messages", type=int, default=200)
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[0]})   # the sender (and its ZeroMQ I/O thread, made later)
    print(f"{len(cores)} cores; cpuidle: {idle_policy()}")
    places = [("another core (idle while the sender computes)", cores[-1])] if len(cores) > 1 else []
    places.append(("the sender's core (awake)", cores[0]))
    with tempfile.TemporaryDirectory() as d:
        for where, core in places:
            print(f"receiver on {where}:")
            for g in (float(x) for x in args.gaps_ms.split(",")):
                lat = np.array(one_gap(g / 1e3, args.messages, d, core)) * 1e6
                print(f"  sender busy {g:5.1f} ms between messages: one-way latency median {np.median(lat):6.0f} us, "
                      f"p90 {np.percentile(lat, 90):6.0f} us")


if __name__ == "__main__":
    main()

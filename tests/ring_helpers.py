"""What the ring transports' tests share (shm, the CUDA IPC protocol on host memory, CUDA IPC on a GPU)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from typing import AsyncIterator

import pytest
import torch

PREFIX_ENV = "FLEXPIPE_SHM_PREFIX"   # the documented name (shm.PREFIX_ENV)
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the abstract socket namespace and /proc are Linux's")
needs_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                                reason="becoming another user takes root")


@contextlib.asynccontextmanager
async def child_process(script: str, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """A Python process running `script` with `args`, its stdin and stdout piped; killed at the end
    (SIGKILL) if it still runs."""
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", script, *args,
                                                 stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    try:
        yield child
    finally:
        await kill_child(child)


async def kill_child(child: asyncio.subprocess.Process) -> None:
    if child.returncode is None:
        child.kill()
        await child.wait()


# A process of another user: it starts as root (to import pyzmq from root's files), then becomes
# `nobody` and says what a sender says first (argv[2], hex) on a channel's control socket (argv[1]).
STRANGER = """
import os, sys, zmq
ctx = zmq.Context()
sock = ctx.socket(zmq.PAIR)
sock.setsockopt(zmq.LINGER, 1000)   # its hello goes through within 1 s, if it may connect at all
os.setgid(65534)
os.setuid(65534)
sock.connect(sys.argv[1])
sock.send(bytes.fromhex(sys.argv[2]))
sock.close()
ctx.term()
"""


async def fill_ring(tx, rx, a: torch.Tensor, n: int = 4, wait: float = 0.1):
    """Send a + 0 .. a + n-1 and keep the received views, so that they fill a ring sized for n of
    them; then a send of a + n and a receive are both started and must wait (the ring is full).

    Returns (views, blocked, later): the views, the waiting send and the waiting receive.  No ring
    tensor goes into an assert here: pytest would keep its operands, and so their ring space, alive.
    """
    views = []
    for i in range(n):
        send = asyncio.ensure_future(tx.send(a + i))
        views.append((await rx.recv())[0])
        await send
    blocked = asyncio.ensure_future(tx.send(a + n))
    later = asyncio.ensure_future(rx.recv())
    await asyncio.sleep(wait)
    waiting = not blocked.done() and not later.done()
    assert waiting, "a full ring let a send or a receive through"
    intact = all(torch.equal(v, a + i) for i, v in enumerate(views))
    assert intact, "a view was overwritten while held"
    return views, blocked, later

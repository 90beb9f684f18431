"""What the ring transports' tests share (shm, the CUDA IPC protocol on host memory, CUDA IPC on a GPU)."""

from __future__ import annotations

import asyncio

import torch


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

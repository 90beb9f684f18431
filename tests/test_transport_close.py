"""Closing one end of a channel: a ring (or local) sender learns that its receiver closed instead of
waiting for ever, a closed cuda_ipc receiver keeps its ring while its sender may still write there,
and a zmq send() returns only once ZeroMQ no longer reads the sent tensors."""

from __future__ import annotations

import asyncio
import sys
import weakref

import pytest
import torch
import zmq

from flexpipe.errors import ActorClosed
from flexpipe.transports import open_receiver, open_sender
from flexpipe.transports import cuda_ipc

RING_KINDS = {"shm": {}, "cuda_ipc": {"device": "cpu"}}   # cuda_ipc's host-memory channel: its protocol, no GPU


async def _ring_pair(kind: str, ring: int):
    rx = await open_receiver(kind, ring_bytes=ring, **RING_KINDS[kind])
    tx = await open_sender(rx.address)
    return tx, rx


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", list(RING_KINDS))
async def test_ring_sender_waiting_for_space_raises_when_the_receiver_closes(kind):
    """The ring is full (a received view holds all of it) and a send waits for space; the receiver
    closes: the send raises ActorClosed, and so does every later send (both waited for ever)."""
    ring = 64 << 10
    tx, rx = await _ring_pair(kind, ring)
    try:
        x = torch.arange(ring // 4, dtype=torch.int32)                 # exactly the ring
        send = asyncio.ensure_future(tx.send(x))
        (held,) = await asyncio.wait_for(rx.recv(), 10)                 # a view: the ring stays full
        await asyncio.wait_for(send, 10)
        blocked = asyncio.ensure_future(tx.send(x + 1))
        # handshake: the sender announces the send (its header) just before it waits for ring space
        await asyncio.wait_for(rx._ctrl.poll(zmq.POLLIN), 10)
        waiting = not blocked.done()
        await rx.aclose()
        with pytest.raises(ActorClosed, match="receiver .* closed"):
            await asyncio.wait_for(blocked, 10)
        with pytest.raises(ActorClosed):
            await asyncio.wait_for(tx.send(torch.ones(3)), 10)
        assert waiting
        del held
    finally:
        await tx.aclose()
        await rx.aclose()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", list(RING_KINDS))
async def test_ring_send_after_the_receiver_closed_with_a_full_ring_raises(kind):
    """The other order: the receiver is gone first, then a send finds the ring full."""
    ring = 64 << 10
    tx, rx = await _ring_pair(kind, ring)
    try:
        x = torch.arange(ring // 4, dtype=torch.int32)
        send = asyncio.ensure_future(tx.send(x))
        (held,) = await asyncio.wait_for(rx.recv(), 10)
        await asyncio.wait_for(send, 10)
        await rx.aclose()
        with pytest.raises(ActorClosed):
            await asyncio.wait_for(tx.send(x + 1), 10)
        del held
    finally:
        await tx.aclose()
        await rx.aclose()


@pytest.mark.timeout(30)
async def test_local_sender_waiting_for_room_raises_when_the_receiver_closes():
    """The same for the in-process queue: full, a send waits for room, the receiver closes."""
    rx = await open_receiver("local", depth=1)
    tx = await open_sender(rx.address)
    try:
        await asyncio.wait_for(tx.send(torch.ones(1)), 10)             # the queue is full
        blocked = asyncio.ensure_future(tx.send(torch.ones(2)))
        await asyncio.sleep(0)                      # one turn of the loop (no timing): it starts and waits
        waiting = not blocked.done()
        await rx.aclose()
        with pytest.raises(ActorClosed, match="closed"):
            await asyncio.wait_for(blocked, 10)
        assert waiting
    finally:
        await tx.aclose()
        await rx.aclose()


@pytest.mark.timeout(30)
async def test_cuda_ipc_closed_receiver_keeps_its_ring_until_the_sender_is_done():
    """A closed receiver's ring would go back to torch's allocator while a sender (on a GPU: another
    process, which maps it) may still copy into it; it is parked until the sender has closed, and a
    sender that connects after the close is refused. (On the host-memory channel the sender also
    holds the ring itself, so only the parking is observable here, not the overwrite it prevents.)"""
    assert cuda_ipc.sweep_parked() == 0
    tx, rx = await _ring_pair("cuda_ipc", 64 << 10)
    try:
        send = asyncio.ensure_future(tx.send(torch.arange(100)))
        got = await asyncio.wait_for(rx.recv(), 10)
        await asyncio.wait_for(send, 10)
        intact = torch.equal(got[0], torch.arange(100))
        del got
        await rx.aclose()
        parked_while_sender_open = cuda_ipc.sweep_parked()
        with pytest.raises(ActorClosed, match="has closed"):
            await open_sender(rx.address)
        await tx.aclose()
        assert intact and parked_while_sender_open == 1 and cuda_ipc.sweep_parked() == 0
        # no sender ever connected: given back at once
        rx2 = await open_receiver("cuda_ipc", device="cpu", ring_bytes=64 << 10)
        await rx2.aclose()
        assert cuda_ipc.sweep_parked() == 0
    finally:
        await tx.aclose()
        await rx.aclose()


_FOREIGN_SENDER = """
import sys
from flexpipe.transports.cuda_ipc import _hold_lock
fd = _hold_lock(sys.argv[1], "test")   # what connect() takes before its first write into the ring
print("locked", flush=True)
sys.stdin.read()                       # until the test lets go: the process ends, and the lock with it
"""


@pytest.mark.timeout(90)   # the child imports torch
async def test_cuda_ipc_ring_outlives_its_receiver_while_a_sender_process_holds_it():
    """A sender in another process (as on a GPU, where it maps the ring) holds the channel: the closed
    receiver's ring is not dropped until that process is done, then the next sweep gives it back."""
    rx = await open_receiver("cuda_ipc", device="cpu", ring_bytes=64 << 10)
    ring = weakref.ref(rx._ring)
    child = None
    try:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _FOREIGN_SENDER, rx.address["lock"],
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert child.stdin is not None and child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), 60)
        assert line == b"locked\n"
        await rx.aclose()
        kept = ring() is not None and cuda_ipc.sweep_parked() == 1
        child.stdin.close()
        await asyncio.wait_for(child.wait(), 30)
        assert kept and cuda_ipc.sweep_parked() == 0 and ring() is None
    finally:
        if child is not None and child.returncode is None:
            child.kill()
            await child.wait()
        await rx.aclose()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["ipc", "tcp"])
async def test_zmq_send_returns_once_the_tensor_may_be_reused(kind):
    """send() frames tensors without a copy; it returns when ZeroMQ is done with them, so a caller
    that overwrites a tensor right after send() returns does not change what the receiver gets."""
    rx = await open_receiver(kind)
    tx = await open_sender(rx.address)
    try:
        g = torch.Generator().manual_seed(5)
        for nbytes in (100, 1 << 20, 64 << 20):                     # copied by pyzmq, then zero-copy
            x = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
            want = x.clone()
            await asyncio.wait_for(tx.send(x), 30)
            x.fill_(0)                                               # the caller reuses its buffer
            (got,) = await asyncio.wait_for(rx.recv(), 30)
            equal = torch.equal(got, want)
            del got
            assert equal, f"{nbytes} bytes: the receiver got the overwritten buffer"
    finally:
        await tx.aclose()
        await rx.aclose()

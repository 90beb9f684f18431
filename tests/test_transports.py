"""Transports move exact bytes (sizes 0, small, 16 MiB), in order, into preallocated tensors or new
ones, within a process and to another process; and the choice of transport per pair."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
import torch
from hypothesis import given, settings, strategies as st

from flexpipe.errors import ActorClosed, ConfigError, ProtocolError
from flexpipe.runtime import ActorSystem, handles, message
from flexpipe.transports import Endpoint, choose_transport, open_receiver, open_sender
from flexpipe.transports.base import views_fit
from test_actor_helpers import FAST
from ring_helpers import fill_ring

pytestmark = pytest.mark.timeout(60)

KINDS = ["local", "shm", "ipc", "tcp"]
SIZES = [0, 100, 16 << 20]


def payload(nbytes: int, seed: int = 0) -> list[torch.Tensor]:
    """A uint8 blob of `nbytes` plus a small non-contiguous bf16 tensor and an empty one."""
    g = torch.Generator().manual_seed(seed)
    blob = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    return [blob, torch.randn(7, 5, generator=g).to(torch.bfloat16).t(), torch.empty(0, 3)]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


async def pair(kind: str, **opts):
    rx = await open_receiver(kind, **opts)
    tx = await open_sender(rx.address)
    return tx, rx


@pytest.mark.parametrize("kind", KINDS)
async def test_exact_bytes_in_order_new_and_into(kind):
    tx, rx = await pair(kind)
    try:
        for nbytes in SIZES:
            sent = payload(nbytes, seed=nbytes)
            send = asyncio.ensure_future(tx.send(*sent))
            got = await rx.recv()
            await send
            assert all(same(a, b) for a, b in zip(sent, got)) and len(got) == 3
            into = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in sent]
            into[1] = torch.empty(5, 7, dtype=torch.bfloat16)
            send = asyncio.ensure_future(tx.send(*sent))
            got = await rx.recv(into=into)
            await send
            assert all(g is i for g, i in zip(got, into))
            assert all(same(a, b) for a, b in zip(sent, got))
        sends = asyncio.ensure_future(asyncio.gather(*(tx.send(torch.tensor([i])) for i in range(20))))
        assert [int((await rx.recv())[0]) for _ in range(20)] == list(range(20))
        await sends
    finally:
        await tx.aclose()
        await rx.aclose()


@pytest.mark.parametrize("kind", KINDS)
async def test_into_must_match(kind):
    tx, rx = await pair(kind)
    try:
        send = asyncio.ensure_future(tx.send(torch.zeros(4), torch.ones(2)))
        with pytest.raises(ProtocolError, match="tensor 0"):
            await rx.recv(into=[torch.empty(5), torch.empty(2)])
        await send
        send = asyncio.ensure_future(tx.send(torch.arange(3)))   # the channel still works
        assert same((await rx.recv())[0], torch.arange(3))
        await send
    finally:
        await tx.aclose()
        await rx.aclose()
    with pytest.raises(ActorClosed):
        await tx.send(torch.zeros(1))


async def test_shm_streams_tensors_larger_than_its_ring():
    tx, rx = await pair("shm", ring_bytes=1 << 17)   # a 128 KiB ring
    try:
        sent = payload(3 << 20, seed=3)
        send = asyncio.ensure_future(tx.send(*sent))
        got = await rx.recv()
        await send
        assert all(same(a, b) for a, b in zip(sent, got))
    finally:
        await tx.aclose()
        await rx.aclose()


def test_views_fit_the_ring_at_once_with_room_for_a_wrap():
    assert views_fit([], 1024, 64) and views_fit([0, 0], 1024, 64)
    assert views_fit([1024], 1024, 64) and not views_fit([1025], 1024, 64)   # one tensor: up to the ring
    assert views_fit([300, 200], 1024, 64)          # 320 + 256, plus 320 for skipping the end: 896
    assert not views_fit([400, 400], 1024, 64)      # 448 + 448 + 448 > 1024, though 896 would fit unwrapped


RING_KINDS = {"shm": {}, "cuda_ipc": {"device": "cpu"}}   # cuda_ipc's host-memory channel: its protocol, no GPU


@pytest.mark.parametrize("kind", list(RING_KINDS))
async def test_ring_sends_whose_views_cannot_all_be_held_arrive_as_copies(kind):
    """A small tensor sent before one larger than the ring, or tensors that fill the ring together:
    were they handed out as views, held until recv() returns, the sender would wait for ring space
    that only the receiver's copy of a later region frees (both ring transports hung so, and on an
    H200 the cuda_ipc exact-bytes test never finished). They arrive as copies, which hold no ring
    space; a send whose views fit the ring at once still arrives as views, holding it."""
    ring = 64 << 10
    tx, rx = await pair(kind, ring_bytes=ring, **RING_KINDS[kind])
    g = torch.Generator().manual_seed(7)

    def blob(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)

    try:
        for sent in ([torch.arange(10), blob(200_000)],              # small, then streamed
                     [blob(30_000), blob(30_000), blob(30_000)],     # each fits, together they do not
                     [blob(40_000), torch.ones(3)]):                # their sum and the largest: over the ring
            send = asyncio.ensure_future(tx.send(*sent))
            got = await asyncio.wait_for(rx.recv(), 10)
            await asyncio.wait_for(send, 10)
            equal = len(got) == len(sent) and all(same(a, b) for a, b in zip(sent, got))
            assert equal
            full = blob(ring)                                        # `got` still held: the whole ring is free
            send = asyncio.ensure_future(tx.send(full))
            equal = same((await asyncio.wait_for(rx.recv(), 10))[0], full)
            assert equal
            await asyncio.wait_for(send, 10)
            del got
        fits = [blob(1000), blob(2000)]
        send = asyncio.ensure_future(tx.send(*fits))
        got = await asyncio.wait_for(rx.recv(), 10)
        await send
        full = blob(ring)
        blocked = asyncio.ensure_future(tx.send(full))
        await asyncio.sleep(0.05)
        held = not blocked.done()                                    # views: their regions are held
        equal = all(same(a, b) for a, b in zip(fits, got))
        del got
        equal = equal and same((await asyncio.wait_for(rx.recv(), 10))[0], full)
        await asyncio.wait_for(blocked, 10)
        assert held and equal
    finally:
        await tx.aclose()
        await rx.aclose()


async def _ring_sends(kind: str, ring: int, sends: list[list[int]], into: list[bool]) -> None:
    tx, rx = await pair(kind, ring_bytes=ring, **RING_KINDS[kind])
    try:
        for k, (sizes, use_into) in enumerate(zip(sends, into)):
            g = torch.Generator().manual_seed(k)
            sent = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for n in sizes]
            send = asyncio.ensure_future(tx.send(*sent))
            dst = [torch.empty(n, dtype=torch.uint8) for n in sizes] if use_into else None
            got = await asyncio.wait_for(rx.recv(into=dst), 10)
            await asyncio.wait_for(send, 10)
            equal = len(got) == len(sent) and all(torch.equal(a, b) for a, b in zip(sent, got))
            del got   # the caller drops what it received before the next recv, as a stage does
            assert equal, f"send {k} of sizes {sizes}"
    finally:
        await tx.aclose()
        await rx.aclose()


@pytest.mark.parametrize("kind", list(RING_KINDS))
@settings(max_examples=25, deadline=None)
@given(sends=st.lists(st.lists(st.integers(0, 40_000) | st.integers(40_000, 150_000), min_size=1, max_size=4),
                      min_size=1, max_size=5),
       into=st.lists(st.booleans(), min_size=5, max_size=5))
def test_ring_transports_carry_any_sequence_of_sends(kind, sends, into):
    """Sends of 1-4 tensors of 0 bytes to 2.3x a 64 KiB ring, as views, copies or into tensors:
    every byte arrives, in order, and nothing waits forever (each recv and send has 10 s)."""
    asyncio.run(_ring_sends(kind, 64 << 10, sends, into))


async def test_shm_received_views_hold_ring_space_until_dropped():
    # (no tensor of the ring may hide in an assert: pytest keeps its operands alive)
    tx, rx = await pair("shm", ring_bytes=64 << 10)
    a = torch.arange(4096, dtype=torch.int32)                    # 16 KiB
    try:
        views, blocked, later = await fill_ring(tx, rx, a)     # full: the sender waits
        del views[0]                                             # gives its region back
        await asyncio.wait_for(blocked, 2)
        fifth = torch.equal((await later)[0], a + 4)
        del later                                                # (its result holds a view)
        assert fifth
        blocked = asyncio.ensure_future(tx.send(a + 5))
        await asyncio.sleep(0.05)
        assert not blocked.done()
        await asyncio.to_thread(views.clear)                     # dropped in another thread
        await asyncio.wait_for(blocked, 2)
        sixth = torch.equal((await rx.recv())[0], a + 5)
        assert sixth
        g = torch.Generator().manual_seed(1)                     # sizes that wrap the ring
        for _ in range(40):
            x = torch.randint(0, 256, (int(torch.randint(1, 60000, (1,), generator=g)),),
                              dtype=torch.uint8, generator=g)
            send = asyncio.ensure_future(tx.send(x))
            ok = torch.equal((await rx.recv())[0], x)
            assert ok
            await send
    finally:
        await tx.aclose()
        await rx.aclose()


def test_choose_transport():
    here = Endpoint.here()
    assert choose_transport(here, here) == "local"
    other_proc = Endpoint(here.host, here.pid + 1)
    assert choose_transport(here, other_proc) == "shm"
    assert choose_transport(here, Endpoint("elsewhere", 1)) == "tcp"
    assert choose_transport(Endpoint(here.host, 1, "cuda:0"), Endpoint(here.host, 2, "cuda:1")) \
        == "cuda_ipc"
    assert choose_transport(Endpoint("a", 1, "cuda:0"), Endpoint("b", 1, "cuda:0")) == "nccl"


async def test_unknown_kind_and_bad_address():
    with pytest.raises(ConfigError, match="transport 'pigeon' is not available"):
        await open_receiver("pigeon")
    with pytest.raises(ProtocolError):
        await open_sender({"nokind": 1})
    with pytest.raises(ConfigError):
        await open_sender({"kind": "local", "channel": "nope", "pid": 0})


# --- to another process: a subprocess actor opens the receiving end -----------------------------

@message(60090)
class OpenRx:
    """Open a receiving end of `kind`; the reply is its address."""
    kind: str


@message(60091)
class Digest:
    """Receive one send and answer with (sha256 of every tensor's bytes, dtypes, shapes)."""


class Sink:
    """Receives tensors through a transport in another process."""

    rx = None

    @handles(OpenRx)
    async def open(self, ctx, msg: OpenRx):
        if self.rx is not None:
            await self.rx.aclose()
        self.rx = await open_receiver(msg.kind)
        return self.rx.address

    @handles(Digest)
    async def digest(self, ctx, msg: Digest):
        got = await self.rx.recv()
        return [[hashlib.sha256(t.contiguous().view(torch.uint8).numpy()).hexdigest(),
                 str(t.dtype), list(t.shape)] for t in got]

    async def on_stop(self, ctx):
        if self.rx is not None:
            await self.rx.aclose()


def digest(tensors):
    return [[hashlib.sha256(t.contiguous().view(torch.uint8).numpy()).hexdigest(), str(t.dtype),
             list(t.shape)] for t in tensors]


async def test_exact_bytes_to_another_process():
    async with ActorSystem(FAST) as system:
        sink = await system.launch("test_transports:Sink", name="sink")
        for kind in ("shm", "ipc"):
            tx = await open_sender(await system.ask(sink.ref, OpenRx(kind)))
            try:
                for nbytes in SIZES:
                    sent = [t.reshape(-1) for t in payload(nbytes, seed=nbytes)]
                    reply = asyncio.ensure_future(system.ask(sink.ref, Digest(), timeout=30))
                    await tx.send(*sent)
                    assert await reply == digest(sent), (kind, nbytes)
            finally:
                await tx.aclose()
        await sink.stop()

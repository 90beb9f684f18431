"""Closing one end of a channel: a ring (or local) sender learns that its receiver closed instead of
waiting for ever, a receiver of any kind learns that its sender closed or died (after receiving what
was completely sent) but does not take a zmq connection that died before saying anything for its
sender, a closed cuda_ipc receiver keeps its ring while its sender may still write there, and a zmq
send() returns only once ZeroMQ no longer reads the sent tensors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import weakref
from typing import AsyncIterator, Awaitable, Callable

import pytest
import torch
import zmq
import zmq.asyncio

from flexpipe.errors import ActorClosed, ProtocolError
from flexpipe.runtime.codec import tensor_header
from flexpipe.transports import Transport, open_receiver, open_sender
from flexpipe.transports import cuda_ipc
from ring_helpers import child_process, kill_child
from tests.pipeline_helpers import poll_until

# cuda_ipc: its host-memory channel (its protocol, no GPU)
ALL_KINDS = {"local": {}, "shm": {"ring_bytes": 1 << 20}, "cuda_ipc": {"device": "cpu", "ring_bytes": 1 << 20},
             "ipc": {}, "tcp": {}}
RING_KINDS = ["shm", "cuda_ipc"]


@contextlib.asynccontextmanager
async def _pair(kind: str, **options) -> AsyncIterator[tuple[Transport, Transport]]:
    """(sender, receiver) of a channel of `kind` (its ALL_KINDS options, overridden by `options`); both
    are closed at the end, the sender first. Closing twice is harmless: a test may close either itself."""
    async with await open_receiver(kind, **{**ALL_KINDS[kind], **options}) as rx, \
            await open_sender(rx.address) as tx:
        yield tx, rx


@contextlib.asynccontextmanager
async def _closing() -> AsyncIterator[Callable[[Transport], Transport]]:
    """`keep`, for the transports a test opens as it goes: keep(t) returns t, which is closed at the end
    (the last kept first)."""
    async with contextlib.AsyncExitStack() as stack:
        def keep(t: Transport) -> Transport:
            stack.push_async_callback(t.aclose)
            return t
        yield keep


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", RING_KINDS)
async def test_ring_sender_waiting_for_space_raises_when_the_receiver_closes(kind):
    """The ring is full (a received view holds all of it) and a send waits for space; the receiver
    closes: the send raises ActorClosed, and so does every later send (both waited for ever)."""
    ring = 64 << 10
    async with _pair(kind, ring_bytes=ring) as (tx, rx):
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


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", RING_KINDS)
async def test_ring_send_after_the_receiver_closed_with_a_full_ring_raises(kind):
    """The other order: the receiver is gone first, then a send finds the ring full."""
    ring = 64 << 10
    async with _pair(kind, ring_bytes=ring) as (tx, rx):
        x = torch.arange(ring // 4, dtype=torch.int32)
        send = asyncio.ensure_future(tx.send(x))
        (held,) = await asyncio.wait_for(rx.recv(), 10)
        await asyncio.wait_for(send, 10)
        await rx.aclose()
        with pytest.raises(ActorClosed):
            await asyncio.wait_for(tx.send(x + 1), 10)
        del held


@pytest.mark.timeout(30)
async def test_local_sender_waiting_for_room_raises_when_the_receiver_closes():
    """The same for the in-process queue: full, a send waits for room, the receiver closes."""
    async with _pair("local", depth=1) as (tx, rx):
        await asyncio.wait_for(tx.send(torch.ones(1)), 10)             # the queue is full
        blocked = asyncio.ensure_future(tx.send(torch.ones(2)))
        await asyncio.sleep(0)                      # one turn of the loop (no timing): it starts and waits
        waiting = not blocked.done()
        await rx.aclose()
        with pytest.raises(ActorClosed, match="closed"):
            await asyncio.wait_for(blocked, 10)
        assert waiting


@pytest.mark.timeout(30)
async def test_cuda_ipc_closed_receiver_keeps_its_ring_until_the_sender_is_done():
    """A closed receiver's ring would go back to torch's allocator while a sender (on a GPU: another
    process, which maps it) may still copy into it; it is parked until the sender has closed, and a
    sender that connects after the close is refused. (On the host-memory channel the sender also
    holds the ring itself, so only the parking is observable here, not the overwrite it prevents.)"""
    assert cuda_ipc.sweep_parked() == 0
    async with _pair("cuda_ipc", ring_bytes=64 << 10) as (tx, rx):
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
    async with await open_receiver("cuda_ipc", device="cpu", ring_bytes=64 << 10) as rx, \
            child_process(_FOREIGN_SENDER, rx.address["lock"]) as child:
        ring = weakref.ref(rx._ring)
        assert child.stdin is not None and child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), 60)
        assert line == b"locked\n"
        await rx.aclose()
        kept = ring() is not None and cuda_ipc.sweep_parked() == 1
        child.stdin.close()
        await asyncio.wait_for(child.wait(), 30)
        assert kept and cuda_ipc.sweep_parked() == 0 and ring() is None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["ipc", "tcp"])
async def test_zmq_send_returns_once_the_tensor_may_be_reused(kind):
    """send() frames tensors without a copy; it returns when ZeroMQ is done with them, so a caller
    that overwrites a tensor right after send() returns does not change what the receiver gets."""
    async with _pair(kind) as (tx, rx):
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


# --- the other direction: a receiver learns that its sender closed or died ---------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", list(ALL_KINDS))
async def test_recv_waiting_for_a_send_raises_when_the_sender_closes(kind):
    """A receiver waits for the next send and its sender closes instead: recv() raises ActorClosed,
    and so does every later recv() (both waited for ever)."""
    async with _pair(kind) as (tx, rx):
        await asyncio.wait_for(tx.send(torch.arange(10)), 10)
        (first,) = await asyncio.wait_for(rx.recv(), 10)           # the sender is connected
        intact = torch.equal(first, torch.arange(10))
        del first
        waiting = asyncio.ensure_future(rx.recv())
        await asyncio.sleep(0)                      # one turn of the loop (no timing): it starts and waits
        was_waiting = not waiting.done()
        await tx.aclose()
        with pytest.raises(ActorClosed, match="sender .* closed"):
            await asyncio.wait_for(waiting, 10)
        with pytest.raises(ActorClosed, match="sender .* closed"):
            await asyncio.wait_for(rx.recv(), 10)
        assert intact and was_waiting


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", list(ALL_KINDS))
async def test_sends_completed_before_the_sender_closed_are_received_then_recv_raises(kind):
    """Sends completed before the sender closed are all received, in order, after the close; only
    then does recv() raise ActorClosed (into= or not)."""
    async with _pair(kind) as (tx, rx):
        sent = [torch.arange(1000, dtype=torch.int32) * i for i in range(4)]
        for x in sent:
            await asyncio.wait_for(tx.send(x), 10)
        await tx.aclose()
        same = []
        for x in sent[:2]:
            (got,) = await asyncio.wait_for(rx.recv(), 10)
            same.append(torch.equal(got, x))
            del got
        for x in sent[2:]:
            into = torch.empty_like(x)
            await asyncio.wait_for(rx.recv(into=[into]), 10)
            same.append(torch.equal(into, x))
        with pytest.raises(ActorClosed, match="sender .* closed"):
            await asyncio.wait_for(rx.recv(), 10)
        assert same == [True] * len(sent)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", RING_KINDS)
async def test_ring_recv_raises_when_the_sender_closes_in_the_middle_of_a_send(kind):
    """The ring is full (a received view holds it), so a send has announced itself and waits for space;
    the sender gives up on it and closes: the receiver reads the announcement, then raises ActorClosed
    instead of waiting for data that will never come."""
    ring = 64 << 10
    async with _pair(kind, ring_bytes=ring) as (tx, rx):
        x = torch.arange(ring // 4, dtype=torch.int32)                 # exactly the ring
        send = asyncio.ensure_future(tx.send(x))
        (held,) = await asyncio.wait_for(rx.recv(), 10)
        await asyncio.wait_for(send, 10)
        blocked = asyncio.ensure_future(tx.send(x + 1))
        await asyncio.wait_for(rx._ctrl.poll(zmq.POLLIN), 10)         # its announcement is here
        was_waiting = not blocked.done()
        blocked.cancel()
        await tx.aclose()
        with pytest.raises(ActorClosed, match="sender .* closed"):
            await asyncio.wait_for(rx.recv(), 10)
        intact = torch.equal(held, x)
        del held
        assert was_waiting and intact


_SENDER_PROCESS = """
import asyncio, json, sys
import torch
from flexpipe.transports import open_sender

async def main():
    tx = await open_sender(json.loads(sys.argv[1]))
    *sends, last = (torch.arange(n, dtype=torch.int32) for n in json.loads(sys.argv[2]))
    for x in sends:
        await tx.send(x)
    send = asyncio.ensure_future(tx.send(last))   # the receiver makes it wait: killed meanwhile
    await asyncio.sleep(0)
    print("sending", flush=True)
    await send

asyncio.run(main())
"""


@pytest.mark.timeout(90)   # the child imports torch
async def test_shm_recv_raises_when_the_sender_process_is_killed_in_the_middle_of_a_send():
    """A sender in another process fills the ring (the receiver holds its first send as a view), has
    announced its second send and waits for space; it is killed (SIGKILL): recv() raises ActorClosed."""
    ring = 64 << 10
    async with await open_receiver("shm", ring_bytes=ring) as rx, \
            child_process(_SENDER_PROCESS, json.dumps(rx.address), json.dumps([ring // 4, 10])) as child:
        (held,) = await asyncio.wait_for(rx.recv(), 60)               # the whole ring, held
        await asyncio.wait_for(rx._ctrl.poll(zmq.POLLIN), 30)         # the second send's announcement
        await kill_child(child)
        with pytest.raises(ActorClosed, match="sender .* closed"):
            await asyncio.wait_for(rx.recv(), 10)
        intact = torch.equal(held, torch.arange(ring // 4, dtype=torch.int32))
        del held
        assert intact


@pytest.mark.timeout(90)   # the child imports torch
@pytest.mark.parametrize("kind", ["ipc", "tcp"])
async def test_zmq_recv_raises_when_the_sender_process_is_killed_in_the_middle_of_a_send(kind):
    """A sender in another process sends two messages, then a large one that cannot go through (the
    receiver has read the first; its queue holds one message, the second, unread), and is killed
    (SIGKILL) meanwhile: the second is still received, then recv() raises ActorClosed (the cut-short
    message is never seen)."""
    async with await open_receiver(kind, hwm=1) as rx, \
            child_process(_SENDER_PROCESS, json.dumps(rx.address), json.dumps([10, 11, 16 << 20])) as child:
        assert child.stdout is not None
        (first,) = await asyncio.wait_for(rx.recv(), 60)             # after the sender's hello
        assert await asyncio.wait_for(child.stdout.readline(), 60) == b"sending\n"
        while not await asyncio.wait_for(rx._sock.poll(zmq.POLLIN), 30):   # (it may wake with nothing)
            pass                                                     # until the second message is here
        await kill_child(child)
        (second,) = await asyncio.wait_for(rx.recv(), 10)
        with pytest.raises(ActorClosed, match="sender .* closed"):
            await asyncio.wait_for(rx.recv(), 10)
        assert torch.equal(first, torch.arange(10, dtype=torch.int32))
        assert torch.equal(second, torch.arange(11, dtype=torch.int32))


_CUDA_IPC_SENDER = """
import sys, zmq
ctrl = zmq.Context().socket(zmq.PAIR)
ctrl.connect(sys.argv[1])
for notice in sys.argv[2:]:     # what a sender sends: its hello, a send's header and first region
    ctrl.send(bytes.fromhex(notice))
ctrl.recv()                     # the receiver gives the region back: it has read the notices
print("waiting", flush=True)    # for the rest of the send, which never comes: the test kills us
sys.stdin.read()
"""


@pytest.mark.timeout(60)
async def test_cuda_ipc_recv_raises_when_the_sender_process_is_killed_in_the_middle_of_a_send():
    """A sender process (speaking the control protocol: the host-memory ring cannot be shared) has
    announced a send larger than the ring and its first chunk; the receiver copies that chunk out and
    waits for the next; the sender is killed (SIGKILL): recv() raises ActorClosed."""
    ring = 64 << 10
    chunk = ring // 4
    notices = [cuda_ipc._control(cuda_ipc.IpcHello(0, b"")),
               cuda_ipc._control(cuda_ipc.IpcRegions(tensor_header([torch.empty(2 * ring, dtype=torch.uint8)]),
                                                     [[0, chunk, chunk]]))]
    async with await open_receiver("cuda_ipc", device="cpu", ring_bytes=ring) as rx, \
            child_process(_CUDA_IPC_SENDER, rx.address["ctrl"], *(n.hex() for n in notices)) as child:
        receiving = asyncio.ensure_future(rx.recv())
        assert child.stdout is not None
        assert await asyncio.wait_for(child.stdout.readline(), 30) == b"waiting\n"
        was_waiting = not receiving.done()
        await kill_child(child)
        with pytest.raises(ActorClosed, match="sender .* closed"):
            await asyncio.wait_for(receiving, 10)
        assert was_waiting


# a ZMTP 3.0 greeting with a mechanism no ZeroMQ socket knows: the receiver drops the connection at once
_NOT_A_PEER = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"BOGUS".ljust(20, b"\x00") + bytes(32)


async def _serves_then_ends(rx: Transport, tx: Transport,
                            meanwhile: Callable[[], Awaitable[None]] | None = None) -> None:
    """tx's sends reach rx in order, the second one a recv() already waiting (while `meanwhile` runs
    first, if given); once tx closes, rx.recv() raises ActorClosed."""
    await asyncio.wait_for(tx.send(torch.arange(3)), 10)
    (first,) = await asyncio.wait_for(rx.recv(), 10)
    waiting = asyncio.ensure_future(rx.recv())
    if meanwhile is not None:
        await asyncio.wait_for(meanwhile(), 10)
    await asyncio.wait_for(tx.send(torch.arange(4)), 10)
    (second,) = await asyncio.wait_for(waiting, 10)
    await tx.aclose()
    with pytest.raises(ActorClosed, match="sender .* closed"):
        await asyncio.wait_for(rx.recv(), 10)
    assert torch.equal(first, torch.arange(3)) and torch.equal(second, torch.arange(4))


@pytest.mark.timeout(30)
async def test_tcp_receiver_does_not_take_a_stray_connection_for_its_sender():
    """Connections that are not ZeroMQ peers (a port scan, a health check) come and go on a tcp
    receiver's port, before its sender connects and while it is connected: the receiver does not take
    either for its sender going (recv() goes on), and still learns when the sender does close."""
    async with await open_receiver("tcp") as rx, _closing() as keep:
        host, port = rx.address["endpoint"][len("tcp://"):].rsplit(":", 1)

        async def stray() -> None:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(_NOT_A_PEER)
            await reader.read()           # until the receiver drops it: its monitor has reported that
            writer.close()
            await writer.wait_closed()

        await asyncio.wait_for(stray(), 10)
        await _serves_then_ends(rx, keep(await open_sender(rx.address)), meanwhile=stray)


# a ZeroMQ sender that connects and completes the handshake, then says nothing until it is killed: a
# FlexPipe sender killed between its handshake and its hello looks just like this to the receiver
_SILENT_PEER = """
import sys, zmq
sock = zmq.Context().socket(zmq.PUSH)
sock.setsockopt(zmq.METADATA, sys.argv[2].encode())
handshake = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
sock.connect(sys.argv[1])
handshake.recv_multipart()
print("connected", flush=True)
sys.stdin.read()
"""


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["ipc", "tcp"])
async def test_zmq_connection_killed_before_any_message_does_not_end_the_channel(kind):
    """A ZeroMQ peer connects to a waiting receiver with this channel's sender property, completes the
    handshake, and is killed (SIGKILL) before it sends anything: the receiver has seen a connection come
    and go without a message, which a sender killed before its hello reached it, a stale peer of
    another channel and a port scan all leave (ZeroMQ shows a connection's metadata only on its
    messages). Ending the channel on it would end it for good under a sender still to come, so the
    recv() goes on waiting; the sender that comes next is read, and its close is learnt."""
    async with await open_receiver(kind) as rx, _closing() as keep:
        watch = rx._watch
        waiting = asyncio.ensure_future(rx.recv())
        async with child_process(_SILENT_PEER, rx.address["endpoint"],
                          f"X-FlexPipe-Sender:{rx.address['token']}/killed") as child:
            assert child.stdout is not None
            assert await asyncio.wait_for(child.stdout.readline(), 30) == b"connected\n"
            await poll_until(lambda: watch._open)          # the receiver has taken in the connection
            await kill_child(child)
            await poll_until(lambda: not watch._open)      # and its going
        was_waiting = not waiting.done()
        tx = keep(await open_sender(rx.address))
        await asyncio.wait_for(tx.send(torch.arange(3)), 10)
        (got,) = await asyncio.wait_for(waiting, 10)
        await tx.aclose()
        with pytest.raises(ActorClosed, match="sender .* closed"):
            await asyncio.wait_for(rx.recv(), 10)
        assert was_waiting and torch.equal(got, torch.arange(3))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", list(ALL_KINDS))
async def test_recv_waiting_when_its_own_receiver_closes_raises_actor_closed(kind):
    """The receiver itself is closed (e.g. a stage replacing its inbound hop) while one of its recv()
    calls waits: that recv() raises ActorClosed, as Transport.aclose promises (it raised CancelledError,
    which a caller takes for its own task being cancelled); the task itself is not cancelled."""
    async with _pair(kind) as (tx, rx):
        await asyncio.wait_for(tx.send(torch.arange(4)), 10)
        await asyncio.wait_for(rx.recv(), 10)
        waiting = asyncio.ensure_future(rx.recv())
        await asyncio.sleep(0)                      # one turn of the loop (no timing): it starts and waits
        assert not waiting.done()
        await rx.aclose()
        with pytest.raises(ActorClosed):
            await asyncio.wait_for(waiting, 10)
        assert not waiting.cancelled()


# --- one sender per channel: after its sender has gone, a receiver reads no one else -----------------

_REFUSED_AT_CONNECT = ("local", "shm", "cuda_ipc")   # the others cannot tell; their receivers refuse the sends


@pytest.mark.timeout(30)
@pytest.mark.parametrize("gap", [False, True], ids=["no-recv-between", "recv-saw-the-gap"])
@pytest.mark.parametrize("kind", list(ALL_KINDS))
async def test_after_the_sender_closed_a_later_sender_is_never_read(kind, gap):
    """The sender closes and a sender connects again to the same address (reconnecting, or another):
    the receiver raises ActorClosed for good and never delivers the later sender's sends; local, shm and
    cuda_ipc refuse it at connect. The same whether or not a recv() ran between the two (ipc/tcp took
    both events in one batch and read on as if nothing happened; a recv that saw the gap raised, then
    the later sender's sends were delivered anyway; local raised, then delivered them)."""
    async with _pair(kind) as (tx, rx), _closing() as keep:
        await asyncio.wait_for(tx.send(torch.arange(3)), 10)
        (first,) = await asyncio.wait_for(rx.recv(), 10)
        intact = torch.equal(first, torch.arange(3))
        del first
        await tx.aclose()
        if gap:
            with pytest.raises(ActorClosed, match="sender .* closed"):
                await asyncio.wait_for(rx.recv(), 10)
        refused = tx2 = None
        try:
            tx2 = keep(await open_sender(rx.address))
        except ActorClosed as e:
            refused = e
        if tx2 is not None:
            await asyncio.wait_for(tx2.send(torch.arange(5)), 10)
            while not await asyncio.wait_for(rx._sock.poll(zmq.POLLIN), 10):   # (ipc, tcp) it has come
                pass
        for _ in range(2):
            with pytest.raises(ActorClosed, match="sender .* closed"):
                await asyncio.wait_for(rx.recv(), 10)
        assert intact and (refused is not None) == (kind in _REFUSED_AT_CONNECT)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", list(ALL_KINDS))
async def test_a_second_sender_while_the_first_is_open_is_refused(kind):
    """A channel carries one sender's sends: a second sender is refused at connect (local: ProtocolError;
    shm, cuda_ipc: ActorClosed, as it would write into the ring from its start, under sends not yet
    read), or (ipc, tcp, where connect cannot tell) its arrival ends the channel: the receiver raises
    ActorClosed rather than read it."""
    async with _pair(kind) as (tx, rx), _closing() as keep:
        await asyncio.wait_for(tx.send(torch.arange(3)), 10)
        (first,) = await asyncio.wait_for(rx.recv(), 10)
        intact = torch.equal(first, torch.arange(3))
        del first
        if kind in _REFUSED_AT_CONNECT:
            with pytest.raises(ProtocolError if kind == "local" else ActorClosed, match="sender"):
                await open_sender(rx.address)
            await asyncio.wait_for(tx.send(torch.arange(4)), 10)      # the first goes on
            (second,) = await asyncio.wait_for(rx.recv(), 10)
            assert intact and torch.equal(second, torch.arange(4))
            return
        tx2 = keep(await open_sender(rx.address))
        await asyncio.wait_for(tx2.send(torch.arange(5)), 10)
        with pytest.raises(ActorClosed, match="another sender connected"):
            await asyncio.wait_for(rx.recv(), 10)
        await asyncio.wait_for(tx.send(torch.arange(6)), 10)
        with pytest.raises(ActorClosed):
            await asyncio.wait_for(rx.recv(), 10)
        assert intact


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["ipc", "tcp"])
async def test_a_peer_of_another_channel_neither_ends_the_channel_nor_is_read(kind):
    """A ZeroMQ peer that completes the handshake but is not this channel's sender (a stale sender of an
    earlier channel, reconnecting to a reused tcp port) sends, and goes, before the real sender connects:
    the receiver does not read its send, does not take its leaving for its sender's (the channel was
    'gone' before its sender came), and still learns when its sender closes."""
    async with await open_receiver(kind) as rx, await open_receiver(kind) as other, _closing() as keep:
        stale = keep(await open_sender(dict(other.address, endpoint=rx.address["endpoint"])))
        await asyncio.wait_for(stale.send(torch.full((3,), -1)), 10)
        while not await asyncio.wait_for(rx._sock.poll(zmq.POLLIN), 10):   # its hello is here
            pass
        await stale.aclose()
        await _serves_then_ends(rx, keep(await open_sender(rx.address)))
        assert rx.stats["foreign"] >= 1   # the stale sender's hello (and its send, if read by now)


@pytest.mark.timeout(60)
async def test_many_connections_while_the_receivers_loop_is_busy_do_not_stall_zeromq():
    """Connections come and go on a tcp receiver's port (a port scanner) while its event loop is busy
    (no recv() runs): ZeroMQ's I/O thread blocked once the receiver's monitor queue was full (1000
    events), and no connection, the sender's included, got through any more. Now the queue is
    unbounded (and read by the loop as events come): the sender connects, sends, closes, and the
    receiver learns it."""
    async with await open_receiver("tcp") as rx, _closing() as keep:
        host, port = rx.address["endpoint"][len("tcp://"):].rsplit(":", 1)
        for _ in range(1500):   # blocking calls: the loop does not run meanwhile
            with socket.create_connection((host, int(port)), timeout=5):
                pass
        tx = keep(await open_sender(rx.address))
        await asyncio.wait_for(tx.send(torch.arange(3)), 10)
        (got,) = await asyncio.wait_for(rx.recv(), 10)
        await tx.aclose()
        with pytest.raises(ActorClosed, match="sender .* closed"):
            await asyncio.wait_for(rx.recv(), 10)
        assert torch.equal(got, torch.arange(3))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["shm", "cuda_ipc", "ipc", "tcp"])
async def test_a_waiting_recv_waits_on_its_socket_alone(kind, monkeypatch):
    """A recv() that waits for the next send waits in its socket's own recv(), as before the sender
    was watched: no zmq.asyncio.Poller per call (one over the socket and its monitor cost 50-90 us
    per waiting recv on the hot path between stages); the monitor is read by the loop as events come."""
    polls = 0
    real_poll = zmq.asyncio.Poller.poll

    def counting_poll(self, *args, **kwargs):
        nonlocal polls
        polls += 1
        return real_poll(self, *args, **kwargs)

    monkeypatch.setattr(zmq.asyncio.Poller, "poll", counting_poll)
    async with _pair(kind) as (tx, rx):
        for i in range(20):
            waiting = asyncio.ensure_future(rx.recv())
            await asyncio.sleep(0)                  # one turn of the loop (no timing): it starts and waits
            await asyncio.wait_for(tx.send(torch.arange(i + 1)), 10)
            (got,) = await asyncio.wait_for(waiting, 10)
            assert torch.equal(got, torch.arange(i + 1))
            del got
        assert polls == 0

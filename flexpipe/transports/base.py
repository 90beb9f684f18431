"""The tensor transport interface, the registry of transport kinds, and the choice per pair.

A transport is one direction of a tensor channel. The receiving side opens it first and gets a
msgpack-able `address`, which travels to the sending side in an ordinary actor message::

    rx = await open_receiver(choose_transport(sender_endpoint, Endpoint.here()))
    await ctx.tell(sender, UseChannel(rx.address))      # sender: tx = await open_sender(address)
    await tx.send(hidden)                               # [tokens, hidden]
    (hidden,) = await rx.recv()                         # or rx.recv(into=[preallocated])

Sends are delivered in order. Tensors handed to send() must not be modified until send() returns.
A channel carries one sender's sends: once that sender has closed (or its process ended), the
receiver raises ActorClosed after the last of its sends, for good, and a sender that connects again
(or a second one) is refused at connect (local, shm, cuda_ipc) or never read (ipc, tcp); a new
sender needs a new receiver.
"""

from __future__ import annotations

import abc
import asyncio
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Literal, Sequence, cast

import torch
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from flexpipe.errors import ActorClosed, ConfigError, ProtocolError

__all__ = ["Endpoint", "Transport", "choose_transport", "register_transport", "open_receiver",
           "open_sender", "check_into", "PeerWatch"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where one side of a tensor channel lives: host, process and device."""
    host: str
    pid: int
    device: str = "cpu"

    @classmethod
    def here(cls, device: str = "cpu") -> "Endpoint":
        """This process on this host."""
        return cls(socket.gethostname(), os.getpid(), device)


class Transport(abc.ABC):
    """One direction of a tensor channel; `send` on the sending side, `recv` on the receiving side."""

    kind: str = ""
    address: dict = {}   # receiving side: how a sender reaches it (msgpack-able)

    @abc.abstractmethod
    async def send(self, *tensors: torch.Tensor) -> None:
        """Send tensors to the peer, in order with earlier sends. Raises ActorClosed when this side is
        closed, and (local, shm, cuda_ipc) once the receiver has closed, also while waiting for room."""

    @abc.abstractmethod
    async def recv(self, into: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Receive the next send's tensors: new tensors, or copied into `into` (same dtypes and
        shapes, contiguous) which is then returned. Raises ProtocolError on a mismatch, and
        ActorClosed once the sender has closed or its process ended and every send it completed
        has been received (one it left unfinished included, and while waiting for the next), and
        from then on (another sender's sends are not read). A sender that ended before its hello
        reached this side is not seen (PeerWatch says why): a recv() then waits on."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release sockets and memory; a pending recv raises ActorClosed."""

    async def __aenter__(self) -> "Transport":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


def check_into(into: Sequence[torch.Tensor], specs: Sequence[Any]) -> None:
    """Raise ProtocolError unless `into` matches the incoming (dtype, shape) specs."""
    if len(into) != len(specs):
        raise ProtocolError(f"received {len(specs)} tensors, `into` has {len(into)}")
    for i, (t, spec) in enumerate(zip(into, specs)):
        if t.dtype != spec.dtype or list(t.shape) != list(spec.shape) or not t.is_contiguous():
            raise ProtocolError(f"tensor {i}: received {spec.dtype}{list(spec.shape)}, `into` "
                                f"holds {t.dtype}{list(t.shape)} (contiguous={t.is_contiguous()})")


def views_fit(nbytes: Sequence[int], ring_bytes: int, align: int) -> bool:
    """Whether a ring receiver may hand out every tensor of one send (of these byte sizes) as a view.

    A view holds its region until the caller drops it, after recv() returns, so all of a send's
    regions must fit in the ring at once: otherwise the sender waits for space that only a copy of
    a later region would free, while the receiver waits for that region (a deadlock both ring
    transports had for a small tensor sent before one larger than the ring, or for several that
    fill it together).  One tensor fits if it is at most the ring; several if their aligned sizes
    plus the largest (the most that skipping the ring's end at a wrap can cost) do.
    """
    sizes = [-(-n // align) * align for n in nbytes if n]
    if len(sizes) <= 1:
        return not sizes or sizes[0] <= ring_bytes
    return sum(sizes) + max(sizes) <= ring_bytes


def _readable(sock: zmq.Socket) -> bool:
    # Socket.get, not getsockopt: on a zmq.asyncio socket, get(EVENTS) also wakes a recv() future
    # waiting for what is there (reading EVENTS consumes the edge its loop reader waits for)
    return bool(cast(int, sock.get(zmq.EVENTS)) & zmq.POLLIN)


class PeerWatch:
    """Tells one end of a channel that the other end is gone (closed, or its process died).

    Neither end of a ZeroMQ connection hears from the socket itself that its peer went: a connecting
    socket reconnects quietly, a binding one waits for the next peer, and a ring sender waiting for
    space, or a receiver waiting for the next send, waited for ever. The socket's monitor reports it:

    - `peer="receiver"`, on the sender's connecting socket: DISCONNECTED, or CONNECT_RETRIED when the
      endpoint was gone before the first connection. A receiver binds before its address is handed
      out, so either means it closed.
    - `peer="sender"`, on the receiver's binding socket: the sender is gone at the first moment, in the
      order of the monitor's events, that no accepted connection is open once the receiver has read
      the sender's first message (the transport says so: `sender_seen`). Every sender says hello
      first, so a sender whose hello reached the socket is seen; a connection that never carries the
      sender's hello (a port scan, a stale peer of another channel on a reused port) does not make the
      channel gone by leaving. It does delay "gone" while it stays open. Nor does a sender that ended
      before its hello arrived (killed while connecting): the monitor names a connection by its file
      descriptor only, so its coming and going reads as a stray's, and taking it for the sender would
      end the channel for good under a sender still to come. A recv() waits on then, until the
      caller's own timeout, or aclose(), or the next sender.

    "Gone" is latched: the receiver reads on while its socket has messages, and once it finds none,
    ActorClosed follows for good (`finished`): a sender that reconnects after a gap in which sends
    may have been lost is not read (ZeroMQ reconnects after 100 ms; only a receiver still reading a
    backlog by then could see its later sends), and the transport refuses another sender's messages
    (`sender_replaced`). What the peer sent before it went is read first: a message reaches the
    socket before the monitor hears of the disconnect (ZeroMQ drops only a message that was not
    complete).

    The monitor's events are taken in as they come, one at a time, by a reader on the event loop
    (not per recv: a recv waits in the socket's own recv(), and is failed with ActorClosed when the
    peer goes while nothing is left to read). The monitor's queue is unbounded: a full one blocks
    ZeroMQ's I/O thread (every socket of the context) until it is read. Create the watch before
    binding or connecting the socket, in the event loop that uses it; close it before the socket.
    One recv() at a time (the transports hold a lock).
    """

    _EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
    _SENDER_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED

    def __init__(self, sock: zmq.asyncio.Socket, what: str,
                 peer: Literal["receiver", "sender"] = "receiver"):
        self._sock = sock
        self.what = what   # names the channel in the error
        self.peer = peer
        self._loop = asyncio.get_running_loop()
        addr = f"inproc://fp-peerwatch-{uuid.uuid4().hex}"
        sock.monitor(addr, self._EVENTS if peer == "receiver" else self._SENDER_EVENTS)
        self._mon: zmq.Socket[bytes] = zmq.Socket(sock.context, zmq.PAIR)   # read from the loop's reader
        self._mon.setsockopt(zmq.RCVHWM, 0)
        self._mon.setsockopt(zmq.LINGER, 0)
        self._mon.connect(addr)
        self._fd = cast(int, self._mon.getsockopt(zmq.FD))
        self._loop.add_reader(self._fd, self._take_events)
        self._watching = True
        self._open: set[int] = set()   # sender watch: accepted connections (their fds)
        self._seen = False             # sender watch: the receiver has read the sender's first message
        self._why = "has closed (or its process ended)"
        self._waiting: asyncio.Future | None = None   # the recv() waiting on the socket
        self.gone = False       # latched: the peer is gone (what it sent before may still be queued)
        self.finished = False   # latched: and nothing of it is left; recv() raises from now on
        self._take_events()     # arms the reader: ZMQ_FD signals only once a read has found nothing

    @property
    def seen(self) -> bool:
        """Whether the transport has read its sender's first message."""
        return self._seen

    def _take_events(self) -> None:
        """Take in the monitor's queued events, one at a time, in order (the reader callback; ZMQ_FD
        is edge-triggered: read until none is left). Called directly before a decision too."""
        if not self._watching:
            return
        mon = self._mon
        while not self.gone and cast(int, mon.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            event = parse_monitor_message(mon.recv_multipart(zmq.NOBLOCK))
            if self.peer == "receiver":   # only the events that mean "gone" are monitored
                self._latch()
            elif event["event"] == zmq.EVENT_ACCEPTED:
                self._open.add(int(event["value"]))
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self._open.discard(int(event["value"]))
                self._settle()

    def _settle(self) -> None:
        if self._seen and not self._open and not self.gone:
            self._latch()

    def _latch(self) -> None:
        """The peer is gone: stop watching, and fail a recv() waiting for a message that cannot come."""
        self.gone = True
        self._stop()
        if self._waiting is not None and not self._waiting.done() and not self._readable():
            self.finished = True
            self._waiting.set_exception(self._closed())

    def _readable(self) -> bool:
        try:
            return _readable(self._sock)
        except zmq.ZMQError:   # closed on this side
            return False

    def sender_seen(self) -> None:
        """The transport has read its sender's first message (its hello): from now on the sender is
        gone once no connection is open (perhaps already)."""
        if not self._seen:
            self._take_events()   # (before: these may be strays' comings and goings before the sender)
            self._seen = True     # its connection's ACCEPTED is taken in by now, perhaps its DISCONNECTED
            self._settle()

    def sender_replaced(self, *, now: bool) -> ActorClosed:
        """Another sender connected (a channel carries one sender's sends): the channel ends, at
        once (`now`: the transport reads its messages in order, so nothing of the first sender is
        left), or once what is queued is read. Returns the error for the transport to raise."""
        if not self.gone:
            self._why = "has closed, and another sender connected (a channel carries one sender's sends)"
            self._latch()
        self.finished = self.finished or now
        return self._closed()

    def check(self) -> None:
        """Raise ActorClosed if the peer is known to be gone (does not wait)."""
        self._take_events()
        if self.gone:
            raise self._closed()

    def _closed(self) -> ActorClosed:
        return ActorClosed(f"the {self.peer} of {self.what} {self._why}")

    async def recv(self, *, copy: bool = True, multipart: bool = False) -> Any:
        """The peer's next message (all its frames with `multipart`); ActorClosed once the peer is gone
        and nothing it sent is left, and from then on."""
        if self.gone and (self.finished or not self._readable()):
            self.finished = True
            raise self._closed()
        fut = cast(asyncio.Future, self._sock.recv_multipart(copy=copy) if multipart else
                   self._sock.recv(copy=copy))
        self._waiting = fut
        try:
            return await fut
        except zmq.ZMQError as e:   # this side was closed meanwhile
            raise ActorClosed(f"{self.what} closed: {e}") from None
        except asyncio.CancelledError:
            self._closed_here()
            raise
        finally:
            self._waiting = None

    def _closed_here(self) -> None:
        """On a CancelledError: pyzmq cancels the futures of a socket closed while they wait; when this
        side closed and the task itself is not being cancelled, raise ActorClosed as Transport.aclose
        promises (a CancelledError would read as the caller's own task being cancelled)."""
        task = asyncio.current_task()
        if self._sock.closed and (task is None or not task.cancelling()):
            raise ActorClosed(f"{self.what} closed on this side") from None

    def _stop(self) -> None:
        """Stop monitoring (nothing more to learn, or closing)."""
        if self._watching:
            self._watching = False
            self._loop.remove_reader(self._fd)
            if not self._sock.closed:
                self._sock.disable_monitor()

    def close(self) -> None:
        """Stop watching (before the socket closes: closing it is no news of the peer)."""
        self._stop()
        if not self._mon.closed:
            self._mon.close(linger=0)


def choose_transport(src: Endpoint, dst: Endpoint) -> str:
    """The transport kind for sending from `src` to `dst`: local, shm, tcp (or cuda_ipc, nccl)."""
    gpu = src.device.startswith("cuda"), dst.device.startswith("cuda")
    if all(gpu):  # FP-10: these carry CUDA tensors only
        return "cuda_ipc" if src.host == dst.host else "nccl"
    if any(gpu):  # a GPU and a host end: the host paths below, fed through a device-to-host copy
        return "tcp" if src.host != dst.host else ("local" if src.pid == dst.pid else "shm")
    if src.host != dst.host:
        return "tcp"
    if src.pid == dst.pid:
        return "local"
    return "shm"


_Listen = Callable[..., Awaitable[Transport]]
_Connect = Callable[..., Awaitable[Transport]]   # (address, **options)
_REGISTRY: dict[str, tuple[_Listen, _Connect]] = {}


def register_transport(kind: str, listen: _Listen, connect: _Connect) -> None:
    """Make a transport kind available (FP-10 registers cuda_ipc and nccl here)."""
    _REGISTRY[kind] = (listen, connect)


def _lookup(kind: str) -> tuple[_Listen, _Connect]:
    if kind not in _REGISTRY:
        import flexpipe.transports  # noqa: F401  (registers the built-in kinds)
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise ConfigError(f"transport {kind!r} is not available (known: "
                          f"{', '.join(sorted(_REGISTRY))})") from None


async def open_receiver(kind: str, **options: Any) -> Transport:
    """Open the receiving side of a channel of `kind`; give its `.address` to the sender."""
    listen, _ = _lookup(kind)
    return await listen(**options)


async def open_sender(address: dict, **options: Any) -> Transport:
    """Open the sending side of the channel a receiver published as `address`."""
    if not isinstance(address, dict) or not isinstance(address.get("kind"), str):
        raise ProtocolError(f"bad transport address {address!r:.120}")
    _, connect = _lookup(address["kind"])
    return await connect(address, **options)

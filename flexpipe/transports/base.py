"""The tensor transport interface, the registry of transport kinds, and the choice per pair.

A transport is one direction of a tensor channel. The receiving side opens it first and gets a
msgpack-able `address`, which travels to the sending side in an ordinary actor message::

    rx = await open_receiver(choose_transport(sender_endpoint, Endpoint.here()))
    await ctx.tell(sender, UseChannel(rx.address))      # sender: tx = await open_sender(address)
    await tx.send(hidden)                               # [tokens, hidden]
    (hidden,) = await rx.recv()                         # or rx.recv(into=[preallocated])

Sends are delivered in order. Tensors handed to send() must not be modified until send() returns.
"""

from __future__ import annotations

import abc
import asyncio
import os
import socket
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
        has been received (one it left unfinished included, and while waiting for the next)."""

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
    return bool(cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)


class PeerWatch:
    """Tells one end of a channel that the other end is gone (closed, or its process died).

    Neither end of a ZeroMQ connection hears from the socket itself that its peer went: a connecting
    socket reconnects quietly, a binding one waits for the next peer, and a ring sender waiting for
    space, or a receiver waiting for the next send, waited for ever. The socket's monitor reports it:

    - `peer="receiver"`, on the sender's connecting socket: DISCONNECTED, or CONNECT_RETRIED when the
      endpoint was gone before the first connection. A receiver binds before its address is handed
      out, so either means it closed.
    - `peer="sender"`, on the receiver's binding socket: the sender is gone once a connection has
      completed its ZeroMQ handshake (a stray one, such as a port scan, does not) and none of those
      accepted is left. This stays so if the sender reconnects: what was in flight when the
      connection dropped may have been lost, so the channel's in-order stream is broken.

    What the peer sent before it went is read first: a message reaches the socket before the monitor
    hears of the disconnect (ZeroMQ drops only a message that was not complete). Create the watch
    before binding or connecting the socket; close it before closing the socket.
    """

    _EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
    _SENDER_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED

    def __init__(self, sock: zmq.asyncio.Socket, what: str,
                 peer: Literal["receiver", "sender"] = "receiver"):
        self._sock = sock
        self.what = what   # names the channel in the error
        self.peer = peer
        self._mon = sock.get_monitor_socket(self._EVENTS if peer == "receiver" else self._SENDER_EVENTS)
        self._events: zmq.Socket[bytes] = zmq.Socket.shadow(self._mon.underlying)   # read without waiting
        self._open: set[int] = set()   # sender watch: accepted connections (their fds)
        self._greeted = False          # sender watch: a connection completed its handshake
        self._poller = zmq.asyncio.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._mon, zmq.POLLIN)
        self.gone = False

    def _update(self) -> bool:
        """Take in the monitor's events; whether the peer is gone."""
        if self.gone or not _readable(self._mon):
            return self.gone
        if self.peer == "receiver":
            self.gone = True   # only the events that mean "gone" are monitored
            return True
        while _readable(self._mon):
            event = parse_monitor_message(self._events.recv_multipart())
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._open.add(int(event["value"]))
            elif event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._greeted = True
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self._open.discard(int(event["value"]))
        self.gone = self._greeted and not self._open
        return self.gone

    def check(self) -> None:
        """Raise ActorClosed if the peer is known to be gone (does not wait)."""
        if self._update():
            raise self._closed()

    def _closed(self) -> ActorClosed:
        return ActorClosed(f"the {self.peer} of {self.what} has closed (or its process ended)")

    async def wait(self) -> None:
        """Until the socket has a message to read; ActorClosed once the peer is gone and none is left."""
        try:
            while True:
                gone = self._update()      # first: what the peer sent before going is there by now
                if _readable(self._sock):
                    return
                if gone:
                    raise self._closed()
                await self._poller.poll()
        except zmq.ZMQError as e:   # this side was closed meanwhile
            raise ActorClosed(f"{self.what} closed: {e}") from None
        except asyncio.CancelledError:
            self._closed_here()
            raise

    async def recv(self) -> bytes:
        """The peer's next message; ActorClosed once the peer is gone and none is left."""
        await self.wait()
        try:
            return await self._sock.recv()
        except zmq.ZMQError as e:
            raise ActorClosed(f"{self.what} closed: {e}") from None
        except asyncio.CancelledError:
            self._closed_here()
            raise

    def _closed_here(self) -> None:
        """On a CancelledError: pyzmq cancels the futures of a socket closed while they wait; when this
        side closed and the task itself is not being cancelled, raise ActorClosed as Transport.aclose
        promises (a CancelledError would read as the caller's own task being cancelled)."""
        task = asyncio.current_task()
        if self._sock.closed and (task is None or not task.cancelling()):
            raise ActorClosed(f"{self.what} closed on this side") from None

    def close(self) -> None:
        """Stop watching (before the socket closes: closing it is no news of the peer)."""
        if not self._mon.closed:
            self._sock.disable_monitor()
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

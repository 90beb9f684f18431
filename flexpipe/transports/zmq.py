"""Tensors as ZeroMQ frames (kinds "ipc" and "tcp"): a header frame, then each tensor's raw bytes.

The sender's frames share memory with its tensors (copy=False; pyzmq copies those under
`zmq.COPY_THRESHOLD`, 64 KiB): ZeroMQ's I/O thread reads them after send_multipart has returned, so
send() waits (polling the frames' MessageTrackers, as cuda_ipc waits for its events) until ZeroMQ is
done with them, and a caller may then reuse the tensors, as the Transport contract says. Without
`into`, received tensors are views of the received frames (no copy); with `into`, frames are
received straight into the given tensors (recv_into, no intermediate buffer).

A channel carries one sender's sends. The sender's connection carries a ZeroMQ metadata property
(`X-FlexPipe-Sender`: the receiver's channel token and a nonce of the sender) and says hello first
(an empty message); the receiver takes the first hello of its channel as its sender's, reads only
that sender's messages (a stale peer of another channel, on a reused tcp port, is ignored), and
takes another sender of its channel as the end of the channel (the first is gone, or the channel
is misused).

The receiver learns from its socket's monitor (`base.PeerWatch`) that its sender closed or its
process ended: recv() then raises ActorClosed once every message of the sender that reached it is
received (ZeroMQ delivers a message whole or not at all, so a send cut short is never seen), and from
then on.

What it cannot learn: that a sender ended before its hello reached the receiver. Such a sender leaves
nothing, or a connection that comes and goes without a message, as a port scan or a stale peer of
another channel does; ZeroMQ shows a connection's metadata (the sender property) only on its messages,
so a waiting recv() goes on waiting, until the caller's timeout or aclose() or the next sender (see
PeerWatch). Nor is a returned send() proof that its message left the process: send() returns once
ZeroMQ no longer reads the tensors (pyzmq copies frames under 64 KiB at once), and ZeroMQ may still
hold the message, behind the hello on a connection not yet made; a sender killed (SIGKILL) then loses
both, unseen. A sender that closes lingers (up to `linger_ms`) until both have gone out.
"""

from __future__ import annotations

import asyncio
import collections
import os
import tempfile
import uuid
from typing import Any, Sequence

import torch
import zmq
import zmq.asyncio

from flexpipe.errors import ActorClosed, ConfigError, ProtocolError
from flexpipe.runtime.codec import byte_view, parse_tensor_header, tensor_header
from flexpipe.transports.base import PeerWatch, Transport, check_into

__all__ = ["ZmqTransport"]

SENDER_PROPERTY = "X-FlexPipe-Sender"   # "<channel token>/<sender nonce>", in the sender's ZMTP handshake


class ZmqTransport(Transport):
    """One PUSH -> PULL ZeroMQ channel; the receiver binds, the sender connects."""

    def __init__(self, kind: str, sock: zmq.asyncio.Socket, zctx: zmq.asyncio.Context,
                 owns_ctx: bool, address: dict, path: str = "", watch: PeerWatch | None = None):
        self.kind = kind
        self.address = address
        self._sock = sock
        self._watch = watch   # receiver: learns that the sender closed
        self._zctx = zctx
        self._owns_ctx = owns_ctx
        self._path = path
        self._closed = False
        self._recv_lock = asyncio.Lock()
        self._channel = f"{address.get('token')}/"   # a message of this channel's senders says so
        self._sender: str | None = None               # receiver: the first sender's property
        self.stats: collections.Counter[str] = collections.Counter()

    @classmethod
    async def listen(cls, kind: str = "ipc", *, zctx: zmq.asyncio.Context | None = None,
                     host: str = "127.0.0.1", hwm: int = 16) -> "ZmqTransport":
        """Bind the receiving side on a fresh ipc path or tcp port."""
        owns = zctx is None
        zctx = zctx or zmq.asyncio.Context()
        sock = zctx.socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, hwm)
        path = ""
        if kind == "ipc":
            path = os.path.join(tempfile.gettempdir(), f"fp-tx-{uuid.uuid4().hex[:12]}")
            endpoint = f"ipc://{path}"
        elif kind == "tcp":
            endpoint = f"tcp://{host}:*"
        else:
            raise ConfigError(f"ZmqTransport kind must be 'ipc' or 'tcp', got {kind!r}")
        watch = PeerWatch(sock, f"{kind} channel", peer="sender")
        try:
            sock.bind(endpoint)
        except zmq.ZMQError:
            watch.close()
            sock.close(0)
            if owns:
                zctx.term()
            raise
        endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        watch.what = f"{kind} channel {endpoint}"
        address = {"kind": kind, "endpoint": endpoint, "token": uuid.uuid4().hex[:16]}
        return cls(kind, sock, zctx, owns, address, path, watch)

    @classmethod
    async def connect(cls, address: dict, *, zctx: zmq.asyncio.Context | None = None,
                      hwm: int = 16, linger_ms: int = 1000) -> "ZmqTransport":
        """Connect the sending side to a receiver's address."""
        endpoint, token = address.get("endpoint"), address.get("token")
        if not isinstance(endpoint, str) or not isinstance(token, str):
            raise ProtocolError(f"zmq transport address without endpoint or token: {address!r:.100}")
        owns = zctx is None
        zctx = zctx or zmq.asyncio.Context()
        sock = zctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, linger_ms)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.METADATA, f"{SENDER_PROPERTY}:{token}/{uuid.uuid4().hex[:16]}".encode())
        sock.connect(endpoint)
        await sock.send(b"")   # hello: the receiver learns that its sender connected (see PeerWatch)
        return cls(address["kind"], sock, zctx, owns, dict(address))

    async def send(self, *tensors: torch.Tensor) -> None:
        if self._closed:
            raise ActorClosed(f"{self.kind} transport is closed")
        tensors = tuple(t if t.is_contiguous() else t.contiguous() for t in tensors)
        # tracked frames (send_multipart's own tracker follows the last frame only); a Frame holds its
        # memory as ZeroMQ's copies do, so the tracker is done once both are gone: keep no Frame here
        frames: list[Any] = [zmq.Frame(byte_view(t), track=True, copy_threshold=self._sock.copy_threshold)
                             for t in tensors]
        tracker = zmq.MessageTracker(*frames)
        frames.insert(0, tensor_header(tensors))
        await self._sock.send_multipart(frames, copy=False)
        del frames
        spins = 0
        while not tracker.done:   # ZeroMQ still reads the tensors (until sent, or dropped by a close)
            spins += 1
            await asyncio.sleep(0 if spins < 50 else 1e-4)

    async def recv(self, into: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        if self._closed:
            raise ActorClosed(f"{self.kind} transport is closed")
        watch = self._watch
        if watch is None:
            raise ProtocolError(f"the sending side of a {self.kind} channel does not receive")
        async with self._recv_lock:   # recv(into=) reads one message in several calls
            while True:   # ActorClosed once the sender has gone and sent all
                if into is None:
                    frames = await watch.recv(copy=False, multipart=True)
                    if self._admit(frames[0]) and len(frames[0]):   # (an empty frame: a hello)
                        return self._tensors(frames)
                    continue
                head = await watch.recv(copy=False)
                if self._admit(head) and len(head):
                    return await self._recv_into(self._sock, head, into)
                while self._sock.getsockopt(zmq.RCVMORE):   # not the sender's: drop it
                    await self._sock.recv(copy=False)

    def _admit(self, frame: zmq.Frame) -> bool:
        """Whether a message (its first frame) is the sender's; takes in its first hello."""
        try:
            who = frame.get(SENDER_PROPERTY)
        except zmq.ZMQError:   # no such property: not a FlexPipe sender
            who = ""
        if who == self._sender:
            return True
        assert self._watch is not None
        if not who.startswith(self._channel):   # a peer of another channel (stale, on a reused port)
            self.stats["foreign"] += 1
            return False
        if self._sender is None:
            self._sender = who
            self._watch.sender_seen()
            return True
        self.stats["replaced"] += 1   # the first sender's messages still queued are read first
        self._watch.sender_replaced(now=False)
        return False

    @staticmethod
    def _tensors(frames: list) -> list[torch.Tensor]:
        specs = parse_tensor_header(frames[0])
        if len(frames) != len(specs) + 1:
            raise ProtocolError(f"header announces {len(specs)} tensors, got {len(frames) - 1} "
                                "frames")
        out = []
        for spec, frame in zip(specs, frames[1:]):
            if len(frame) != spec.nbytes:
                raise ProtocolError(f"tensor frame of {len(frame)} bytes, expected {spec.nbytes}")
            out.append(torch.frombuffer(frame.buffer, dtype=spec.dtype).view(spec.shape)
                       if spec.nbytes else torch.empty(spec.shape, dtype=spec.dtype))
        return out

    async def _recv_into(self, sock: zmq.asyncio.Socket, head: zmq.Frame,
                         into: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        try:
            specs = parse_tensor_header(head)
            check_into(into, specs)
            for dst, spec in zip(into, specs):
                if not sock.getsockopt(zmq.RCVMORE):
                    raise ProtocolError("message ended before all tensor frames arrived")
                n = await sock.recv_into(byte_view(dst)) if spec.nbytes else \
                    len(await sock.recv(copy=False))
                if n != spec.nbytes:
                    raise ProtocolError(f"tensor frame of {n} bytes, expected {spec.nbytes}")
            if sock.getsockopt(zmq.RCVMORE):
                raise ProtocolError("more tensor frames than the header announces")
        except ProtocolError:
            while sock.getsockopt(zmq.RCVMORE):   # drop the rest of this message
                await sock.recv(copy=False)
            raise
        return list(into)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._watch is not None:
            self._watch.close()
        self._sock.close()
        if self._owns_ctx:
            self._zctx.term()
        if self._path:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass

"""Same-process transport: the tensors themselves are handed over (no copy, no serialisation).

A channel carries one sender's sends, as every kind does: connect() raises ProtocolError while the
channel has a sender and ActorClosed once that sender has closed (recv() raises ActorClosed from then
on, after the sends it completed).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Sequence

import numpy as np
import torch

from flexpipe.errors import ActorClosed, ConfigError, ProtocolError
from flexpipe.runtime.codec import TensorSpec, byte_view
from flexpipe.transports.base import Transport, check_into

__all__ = ["LocalTransport"]

_CLOSED = object()           # in the queue: the receiver closed
_SENDERS_CLOSED = object()   # in the queue: the sender closed (it was empty)


class _Channel:
    """The queue of sends, whether its receiver closed (which wakes a sender waiting for room), and
    whether its sender did (which wakes a receiver waiting for a send, once the queue is empty)."""

    def __init__(self, depth: int):
        self.queue: asyncio.Queue = asyncio.Queue(depth)
        self.closed = asyncio.Event()
        self.has_sender = False                  # its one sender connected
        self.senders_closed = False              # and closed


_CHANNELS: dict[str, _Channel] = {}


class LocalTransport(Transport):
    """A bounded in-process queue of tensor tuples; `depth` sends may be in flight."""

    kind = "local"

    def __init__(self, channel: str, ch: _Channel, receiving: bool):
        self.channel = channel
        self._ch = ch
        self._queue = ch.queue
        self._receiving = receiving
        self._closed = False
        self.address = {"kind": "local", "channel": channel, "pid": os.getpid()}

    @classmethod
    async def listen(cls, depth: int = 8) -> "LocalTransport":
        """Create a channel and return its receiving side."""
        channel = uuid.uuid4().hex
        _CHANNELS[channel] = _Channel(depth)
        return cls(channel, _CHANNELS[channel], receiving=True)

    @classmethod
    async def connect(cls, address: dict) -> "LocalTransport":
        """The sending side of a channel of this process."""
        ch = _CHANNELS.get(address.get("channel", ""))
        if address.get("pid") != os.getpid() or ch is None:
            raise ConfigError(f"local channel {address!r:.100} is not open in this process")
        if ch.senders_closed:   # its receiver raises ActorClosed: it would never read these sends
            raise ActorClosed(f"the sender of local channel {address['channel']} has closed: a channel "
                              "carries one sender's sends (the receiver opens a new one)")
        if ch.has_sender:
            raise ProtocolError(f"local channel {address['channel']} already has a sender: a channel "
                                "carries one sender's sends (open another receiver)")
        ch.has_sender = True
        return cls(address["channel"], ch, receiving=False)

    async def send(self, *tensors: torch.Tensor) -> None:
        if self._closed or self._ch.closed.is_set():
            raise ActorClosed(f"local channel {self.channel} is closed")
        try:
            self._queue.put_nowait(tensors)
            return
        except asyncio.QueueFull:
            pass
        put = asyncio.ensure_future(self._queue.put(tensors))
        closed = asyncio.ensure_future(self._ch.closed.wait())
        try:   # a full queue that its receiver closed would never make room
            await asyncio.wait((put, closed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            if not put.done():
                put.cancel()
        if not put.done() or put.cancelled():
            raise ActorClosed(f"local channel {self.channel} was closed while a send waited for room")
        put.result()

    async def recv(self, into: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        if self._closed:
            raise ActorClosed(f"local channel {self.channel} is closed")
        if self._queue.empty() and self._ch.senders_closed:
            raise ActorClosed(f"the sender of local channel {self.channel} has closed")
        item = await self._queue.get()
        if item is _CLOSED:
            raise ActorClosed(f"local channel {self.channel} was closed")
        if item is _SENDERS_CLOSED:   # the queue stays empty: later calls raise above
            raise ActorClosed(f"the sender of local channel {self.channel} has closed")
        if into is None:
            return list(item)
        check_into(into, [TensorSpec(t.dtype, list(t.shape), 0) for t in item])
        for dst, src in zip(into, item):
            if src.is_contiguous() and src.numel():
                np.copyto(byte_view(dst), byte_view(src))   # a memcpy: torch's copy_ is slower
            else:
                dst.copy_(src)
        return list(into)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._receiving:
            self._ch.senders_closed = True
            if self._queue.empty():   # a recv may be waiting (with sends queued, none is)
                self._queue.put_nowait(_SENDERS_CLOSED)
        if self._receiving and _CHANNELS.pop(self.channel, None) is not None:
            self._ch.closed.set()
            try:
                self._queue.put_nowait(_CLOSED)   # wakes a pending recv
            except asyncio.QueueFull:
                pass

"""Same-process transport: the tensors themselves are handed over (no copy, no serialisation)."""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Sequence

import numpy as np
import torch

from flexpipe.errors import ActorClosed, ConfigError
from flexpipe.runtime.codec import TensorSpec, byte_view
from flexpipe.transports.base import Transport, check_into

__all__ = ["LocalTransport"]

_CHANNELS: dict[str, asyncio.Queue] = {}
_CLOSED = object()


class LocalTransport(Transport):
    """A bounded in-process queue of tensor tuples; `depth` sends may be in flight."""

    kind = "local"

    def __init__(self, channel: str, queue: asyncio.Queue, receiving: bool):
        self.channel = channel
        self._queue = queue
        self._receiving = receiving
        self._closed = False
        self.address = {"kind": "local", "channel": channel, "pid": os.getpid()}

    @classmethod
    async def listen(cls, depth: int = 8) -> "LocalTransport":
        """Create a channel and return its receiving side."""
        channel = uuid.uuid4().hex
        _CHANNELS[channel] = asyncio.Queue(depth)
        return cls(channel, _CHANNELS[channel], receiving=True)

    @classmethod
    async def connect(cls, address: dict) -> "LocalTransport":
        """The sending side of a channel of this process."""
        queue = _CHANNELS.get(address.get("channel", ""))
        if address.get("pid") != os.getpid() or queue is None:
            raise ConfigError(f"local channel {address!r:.100} is not open in this process")
        return cls(address["channel"], queue, receiving=False)

    async def send(self, *tensors: torch.Tensor) -> None:
        if self._closed or _CHANNELS.get(self.channel) is not self._queue:
            raise ActorClosed(f"local channel {self.channel} is closed")
        await self._queue.put(tensors)

    async def recv(self, into: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        if self._closed:
            raise ActorClosed(f"local channel {self.channel} is closed")
        item = await self._queue.get()
        if item is _CLOSED:
            raise ActorClosed(f"local channel {self.channel} was closed")
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
        if self._receiving and _CHANNELS.pop(self.channel, None) is not None:
            try:
                self._queue.put_nowait(_CLOSED)   # wakes a pending recv
            except asyncio.QueueFull:
                pass

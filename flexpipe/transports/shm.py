"""Same-host transport through one reusable shared-memory ring per channel.

The receiver creates a file in /dev/shm of `nslots` slots of `slot_bytes` each, maps it, and binds
a ZeroMQ PAIR socket for control. The sender maps the same file once; each send then streams the
tensors' bytes through the slots (so a tensor larger than the ring still fits), telling the receiver
"slot i holds n bytes" and getting "slot i is free" back. Copying in and copying out overlap across
slots. The file is unlinked as soon as the sender has mapped it, so a crash leaks nothing.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import struct
import tempfile
import uuid
from typing import Sequence

import numpy as np
import torch
import zmq
import zmq.asyncio

from flexpipe.errors import ActorClosed, ProtocolError
from flexpipe.runtime.codec import byte_view, parse_tensor_header, tensor_header
from flexpipe.transports.base import Transport, check_into

__all__ = ["ShmTransport"]

_HELLO, _HEAD, _CHUNK, _FREE = b"O", b"H", b"C", b"F"
_SLOT = struct.Struct("<II")   # slot index, bytes used
SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class ShmTransport(Transport):
    """One direction of a same-host channel: a shared ring of slots plus a control socket."""

    kind = "shm"

    def __init__(self, mm: mmap.mmap, path: str, slot_bytes: int, nslots: int,
                 ctrl: zmq.asyncio.Socket, zctx: zmq.asyncio.Context, owns_ctx: bool,
                 receiving: bool, address: dict):
        self.address = address
        self._mm = mm
        self._path = path
        self._ring = np.frombuffer(mm, dtype=np.uint8)
        self._slot_bytes = slot_bytes
        self._slots = [self._ring[i * slot_bytes:(i + 1) * slot_bytes] for i in range(nslots)]
        self._free = list(range(nslots))      # sender: slots it may fill now
        self._ctrl = ctrl
        self._zctx = zctx
        self._owns_ctx = owns_ctx
        self._receiving = receiving
        self._closed = False
        self._lock = asyncio.Lock()   # one send (or recv) at a time: their control messages interleave

    @classmethod
    async def listen(cls, *, slot_bytes: int = 8 << 20, nslots: int = 4,
                     zctx: zmq.asyncio.Context | None = None) -> "ShmTransport":
        """Create the ring and the control socket; the receiving side."""
        tag = uuid.uuid4().hex[:12]
        path = os.path.join(SHM_DIR, f"fp-shm-{tag}")
        size = slot_bytes * nslots
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        owns = zctx is None
        zctx = zctx or zmq.asyncio.Context()
        ctrl = zctx.socket(zmq.PAIR)
        ctrl.setsockopt(zmq.LINGER, 0)
        ctrl_path = os.path.join(tempfile.gettempdir(), f"fp-shm-{tag}.ctl")
        ctrl.bind(f"ipc://{ctrl_path}")
        address = {"kind": "shm", "path": path, "slot_bytes": slot_bytes, "nslots": nslots,
                   "ctrl": f"ipc://{ctrl_path}"}
        return cls(mm, path, slot_bytes, nslots, ctrl, zctx, owns, True, address)

    @classmethod
    async def connect(cls, address: dict, *,
                      zctx: zmq.asyncio.Context | None = None) -> "ShmTransport":
        """Map the receiver's ring and connect to its control socket; the sending side."""
        try:
            path, slot_bytes, nslots, ctrl_ep = (address["path"], int(address["slot_bytes"]),
                                                 int(address["nslots"]), address["ctrl"])
            fd = os.open(path, os.O_RDWR)
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise ProtocolError(f"cannot open shm channel {address!r:.120}: {e}") from e
        try:
            mm = mmap.mmap(fd, slot_bytes * nslots)
        finally:
            os.close(fd)
        owns = zctx is None
        zctx = zctx or zmq.asyncio.Context()
        ctrl = zctx.socket(zmq.PAIR)
        ctrl.setsockopt(zmq.LINGER, 1000)
        ctrl.connect(ctrl_ep)
        await ctrl.send(_HELLO)
        return cls(mm, path, slot_bytes, nslots, ctrl, zctx, owns, False, dict(address))

    # --- sending ---------------------------------------------------------------------------

    async def _take_slot(self) -> int:
        while not self._free:
            msg = await self._ctrl.recv()
            if msg[:1] != _FREE:
                raise ProtocolError(f"shm sender got control message {msg[:1]!r}")
            self._free.append(_SLOT.unpack_from(msg, 1)[0])
        return self._free.pop()

    async def send(self, *tensors: torch.Tensor) -> None:
        if self._closed:
            raise ActorClosed("shm transport is closed")
        tensors = tuple(t if t.is_contiguous() else t.contiguous() for t in tensors)
        header = _HEAD + tensor_header(tensors)
        async with self._lock:
            await self._send(header, tensors)

    async def _send(self, header: bytes, tensors: tuple) -> None:
        await self._ctrl.send(header)
        slot, used = -1, 0
        for t in tensors:
            src = byte_view(t)
            pos, n = 0, src.nbytes
            while pos < n:
                if slot < 0:
                    slot, used = await self._take_slot(), 0
                k = min(n - pos, self._slot_bytes - used)
                np.copyto(self._slots[slot][used:used + k], src[pos:pos + k])
                used += k
                pos += k
                if used == self._slot_bytes:
                    await self._ctrl.send(_CHUNK + _SLOT.pack(slot, used))
                    slot = -1
        if slot >= 0:
            await self._ctrl.send(_CHUNK + _SLOT.pack(slot, used))

    # --- receiving -------------------------------------------------------------------------

    async def _next(self) -> bytes:
        while True:
            msg = await self._ctrl.recv()
            if msg != _HELLO:
                return msg
            self._unlink()   # the sender has mapped the ring: the name is no longer needed

    async def recv(self, into: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        if self._closed:
            raise ActorClosed("shm transport is closed")
        async with self._lock:
            head = await self._next()
            if head[:1] != _HEAD:
                raise ProtocolError(f"shm receiver expected a header, got {head[:1]!r}")
            specs = parse_tensor_header(memoryview(head)[1:])
            if into is None:
                out = [torch.empty(s.shape, dtype=s.dtype) for s in specs]
            else:
                try:
                    check_into(into, specs)
                except ProtocolError:
                    await self._consume(specs, None)   # skip this send: the next one is intact
                    raise
                out = list(into)
            await self._consume(specs, out)
            return out

    async def _consume(self, specs: list, out: list[torch.Tensor] | None) -> None:
        # copy the announced bytes out of the ring chunk by chunk, freeing each slot when read
        slot, used, length = -1, 0, 0
        for i, spec in enumerate(specs):
            dst = byte_view(out[i]) if out is not None and spec.nbytes else None
            pos = 0
            while pos < spec.nbytes:
                if slot < 0:
                    msg = await self._next()
                    if msg[:1] != _CHUNK:
                        raise ProtocolError(f"shm receiver expected a chunk, got {msg[:1]!r}")
                    slot, length = _SLOT.unpack_from(msg, 1)
                    used = 0
                    if slot >= len(self._slots) or length > self._slot_bytes:
                        raise ProtocolError(f"chunk notice for slot {slot} of {length} bytes")
                k = min(spec.nbytes - pos, length - used)
                if dst is not None:
                    np.copyto(dst[pos:pos + k], self._slots[slot][used:used + k])
                used += k
                pos += k
                if used == length:
                    await self._ctrl.send(_FREE + _SLOT.pack(slot, 0))
                    slot = -1
        if slot >= 0:
            raise ProtocolError(f"chunk in slot {slot} holds {length - used} bytes more than "
                                "the tensors announced")

    def _unlink(self) -> None:
        if self._path:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass
            self._path = ""

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._receiving:
            self._unlink()
        self._slots = []
        self._ring = None  # the mmap cannot close while numpy views of it exist
        self._mm.close()
        self._ctrl.close()
        if self._owns_ctx:
            self._zctx.term()
        ctrl = self.address.get("ctrl", "")
        if self._receiving and ctrl.startswith("ipc://"):
            try:
                os.unlink(ctrl[len("ipc://"):])
            except FileNotFoundError:
                pass

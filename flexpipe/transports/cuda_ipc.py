"""Same-node GPU to GPU transport (kind "cuda_ipc") through CUDA IPC memory handles, and KV block copies.

The receiver allocates one device ring per channel and exports its IPC memory handle (CuPy's
`ipcGetMemHandle`) in its address; the sender opens it once (`ipcOpenMemHandle`, cached per
(pid, handle)) and copies each send straight into the receiver's ring on a dedicated stream: one
copy, no host staging, no allocation per message. Control notices (where a send landed, which ring
space is free again) travel as codec messages over a ZeroMQ PAIR socket, as in shm.py.

Completion is signalled with two IPC events (`sync="event"`, the default): the sender records its
"copied" event after its copies and the receiver's stream waits on it before reading; the receiver
records its "free" event when a region is given back and the sender's copy stream waits on it
before writing there again. Neither side's CPU waits for the GPU. `sync="host"` instead has each
side wait (asynchronously, polling a plain event) until the GPU work is done before it sends the
notice: slower, and the fallback if IPC events misbehave on a platform.

Received tensors without `into` are views of the ring (no copy), given back when the last view is
garbage-collected, as in shm.py: hold them briefly. The free event is recorded on the stream that
was current when recv() ran, so GPU work queued there on the views is finished before the sender
reuses the space. A tensor larger than the ring is streamed through it and arrives as a new tensor,
and so does every tensor of a send whose views could not all be held in the ring at once
(`base.views_fit`: held views would keep the sender from the space the rest of the send needs).

Closing: each side learns that the other closed or died from its control socket's monitor
(`base.PeerWatch`). A sender's sends raise ActorClosed, one waiting for ring space included; the
receiver's recv() raises ActorClosed once it has received every send completed before that, also in
the middle of a send that the sender did not finish, and while it waits for the next one, and from
then on (a second sender's hello ends the channel, as in shm.py). A closed
receiver's ring is parked, not given back to torch's allocator, while its sender may still write
into it: the sender holds the channel's lock until its copies are done, and the ring is given back
as soon as it lets go, or its process ends (see _PARKED).

Names. A channel is `<prefix>-cipc-<tag>`, with shm.py's prefix (`shm.name_prefix()`: the variable
FLEXPIPE_SHM_PREFIX, read at each listen() and inherited by child processes), so one run's channels
can be told from another's. On Linux nothing of a channel is on disk: the control socket is bound in
the abstract socket namespace (`ipc://@<prefix>-cipc-<tag>.ctl`), admitting only processes of the
receiver's user or root (ZeroMQ's IPC_FILTER_UID, as in shm.py), and the lock file has no name (a
memfd, shm.unnamed_file; senders open it through /proc, see _PARKED): a receiver that is killed
leaves no file behind. Elsewhere the control socket is the file `<prefix>-cipc-<tag>.ctl` in the temporary
directory and the lock `<prefix>-cipc-<tag>.lock` in shm.SHM_DIR, both removed when the receiver closes.

KV blocks move without the ring: the new owner exports its KV pools once (`export_tensor`), the old
owner opens them (`PeerPools`) and copies blocks directly, coalescing runs of consecutive block ids
(`coalesce_runs`, `copy_runs`); the completion signal is the reply to the ask, sent after the copy
stream has finished.

CuPy is imported lazily: without CUDA this module imports, registers the kind, and `listen`/`connect`
raise ConfigError saying why (`unavailable_reason()`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import fcntl
import os
import sys
import threading
import uuid
import weakref
from typing import Any, Callable, Sequence

import torch
import zmq
import zmq.asyncio

from flexpipe.errors import ActorClosed, ConfigError, ProtocolError
from flexpipe.runtime import codec
from flexpipe.runtime.codec import parse_tensor_header, tensor_header
from flexpipe.runtime.messages import message
from flexpipe.transports.base import PeerWatch, Transport, check_into, register_transport, views_fit
from flexpipe.transports.shm import (SHM_DIR, bind_control, claim_channel, mark_closing, name_prefix,
                                     open_peer_file, unnamed_file)

__all__ = ["CudaIpcTransport", "IpcBuffer", "IpcHello", "IpcRegions", "IpcFree", "KvPools", "HandleCache",
           "RingBooks", "InOrderReleases", "PeerPools", "HANDLES", "available", "unavailable_reason",
           "export_tensor", "coalesce_runs", "copy_runs", "wrap_device_memory", "sweep_parked"]

IPC_HANDLE_BYTES = 64        # sizeof(cudaIpcMemHandle_t) and of cudaIpcEventHandle_t
ALIGN = 256                  # ring regions start on this boundary (any dtype's alignment)
_BIG_RUN = 1 << 20           # runs of at least this many bytes are copied with cudaMemcpy, others batched
_INDEX_CHUNK = 64 << 20      # short runs are gathered and scattered this many bytes at a time
NAMELESS = sys.platform.startswith("linux")   # abstract control sockets and /proc: nothing left on disk


def unavailable_reason() -> str:
    """'' when CUDA IPC can run in this process, else why it cannot."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA device (a CPU build of torch, or no NVIDIA GPU/driver)"
    try:
        import cupy  # noqa: F401
    except ImportError:
        return ("CuPy is not installed (pip install cupy-cuda13x, or cupy-cuda12x for a CUDA 12 torch; "
                "or the flexpipe[gpu] extra)")
    except Exception as e:   # a CuPy built for another CUDA major raises at import
        return f"CuPy cannot be imported: {type(e).__name__}: {e}"
    return ""


def available() -> bool:
    """True when CUDA IPC channels can be opened here."""
    return not unavailable_reason()


def _require() -> Any:
    reason = unavailable_reason()
    if reason:
        raise ConfigError(f"transport 'cuda_ipc' is not available: {reason}")
    import cupy
    return cupy


def device_index(device: Any) -> int:
    """CUDA device index of "cuda", "cuda:N", N or a torch.device (ConfigError for a CPU label)."""
    if isinstance(device, int):
        return device
    d = torch.device(device)
    if d.type != "cuda":
        raise ConfigError(f"cuda_ipc needs a CUDA device, got {device!r}")
    return d.index if d.index is not None else torch.cuda.current_device()


# --- wire messages (kinds 400-409) ----------------------------------------------------------------

@message(400)
class IpcBuffer:
    """Device memory exported with CUDA IPC: open `handle` in another process, then add `offset`."""
    pid: int            # the exporting process (handles are cached per (pid, handle))
    device: int         # its CUDA device index (processes of a node share the numbering)
    handle: bytes       # cudaIpcMemHandle_t of the allocation's base, 64 bytes
    offset: int         # bytes from the allocation's base to the buffer
    nbytes: int

    def check(self) -> "IpcBuffer":
        """Raise ProtocolError unless every field is plausible; returns self."""
        if not (isinstance(self.handle, (bytes, bytearray)) and len(self.handle) == IPC_HANDLE_BYTES):
            raise ProtocolError(f"IPC memory handle must be {IPC_HANDLE_BYTES} bytes, got "
                                f"{type(self.handle).__name__} of {len(self.handle) if hasattr(self.handle, '__len__') else '?'}")
        for name in ("pid", "device", "offset", "nbytes"):
            v = getattr(self, name)
            if type(v) is not int or v < 0:
                raise ProtocolError(f"IpcBuffer.{name} must be an int >= 0, got {v!r}")
        return self

    def to_list(self) -> list:
        return [self.pid, self.device, bytes(self.handle), self.offset, self.nbytes]

    @classmethod
    def parse(cls, value: Any) -> "IpcBuffer":
        """An IpcBuffer from itself or its to_list() form (ProtocolError when malformed)."""
        if isinstance(value, cls):
            return value.check()
        if not (isinstance(value, (list, tuple)) and len(value) == 5):
            raise ProtocolError(f"bad IPC buffer description {value!r:.120}")
        return cls(*value).check()


@message(401)
class IpcHello:
    """Sender -> receiver, once: the sender's process and its "copied" event (b"" with sync="host")."""
    pid: int
    event: bytes


@message(402)
class IpcRegions:
    """Sender -> receiver: ring regions now holding data; `header` (tensor specs) starts a send."""
    header: bytes
    regions: list       # [[offset, nbytes, ring bytes used incl. padding], ...]


@message(403)
class IpcFree:
    """Receiver -> sender: every ring byte before `tail` (a running count) may be written again."""
    tail: int


@message(404)
class KvPools:
    """A stage's KV pools, exported for a peer to copy blocks into: unit -> [k, v] IpcBuffer lists."""
    dtype: str
    num_blocks: int
    block_shape: list   # [block_size, kv_heads, head_dim]
    pools: dict         # unit index -> [k.to_list(), v.to_list()]


def _read_control(frame: Any) -> Any:
    msg, _ = codec.decode([frame])
    return msg


def _control(msg: Any) -> bytes:
    return codec.encode(msg)[0]


# --- handles -------------------------------------------------------------------------------------

_libcuda: Any = None


def base_allocation(ptr: int) -> tuple[int, int]:
    """(base, size) of the cudaMalloc allocation holding device address `ptr` (cuMemGetAddressRange)."""
    global _libcuda
    if _libcuda is None:
        _libcuda = ctypes.CDLL("libcuda.so.1")
    base, size = ctypes.c_uint64(0), ctypes.c_size_t(0)
    rc = _libcuda.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr))
    if rc != 0:
        raise ConfigError(f"cuMemGetAddressRange failed with CUresult {rc} for device address {ptr:#x}")
    return int(base.value), int(size.value)


def export_tensor(t: torch.Tensor) -> IpcBuffer:
    """Export the memory of a contiguous CUDA tensor for other processes of this node."""
    cupy = _require()
    if not t.is_cuda or not t.is_contiguous():
        raise ConfigError(f"export_tensor needs a contiguous CUDA tensor, got {t.device} "
                          f"contiguous={t.is_contiguous()}")
    dev = t.device.index
    ptr = t.data_ptr()
    with cupy.cuda.Device(dev):
        cupy.cuda.runtime.setDevice(dev)   # makes the primary context current: the driver call below needs it
        base, size = base_allocation(ptr)
        try:
            handle = bytes(cupy.cuda.runtime.ipcGetMemHandle(base))
        except cupy.cuda.runtime.CUDARuntimeError as e:
            raise ConfigError(f"cannot export device memory with CUDA IPC ({e}); memory from "
                              "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True or cudaMallocAsync "
                              "pools cannot be exported: unset those") from e
    return IpcBuffer(os.getpid(), dev, handle, ptr - base, t.numel() * t.element_size())


def _cuda_open(device: int, handle: bytes) -> int:
    import cupy
    with cupy.cuda.Device(device):
        return int(cupy.cuda.runtime.ipcOpenMemHandle(handle, cupy.cuda.runtime.cudaIpcMemLazyEnablePeerAccess))


def _cuda_close(device: int, base: int) -> None:
    import cupy
    with cupy.cuda.Device(device):
        cupy.cuda.runtime.ipcCloseMemHandle(base)


class HandleCache:
    """IPC memory handles opened in this process, per (exporting pid, handle), reference counted.

    CUDA maps an exported allocation once per process (a second open of the same handle fails), and
    several buffers may share an allocation (torch's caching allocator carves tensors out of one
    segment), so every user goes through here: `acquire` opens on first use, `release` closes when
    the last user is gone. `open_fn(device, handle) -> base` and `close_fn(device, base)` default to
    CuPy's runtime calls; tests pass fakes.
    """

    def __init__(self, open_fn: Callable[[int, bytes], int] | None = None,
                 close_fn: Callable[[int, int], None] | None = None):
        self._open = open_fn or _cuda_open
        self._close = close_fn or _cuda_close
        self._entries: dict[tuple[int, bytes], list] = {}   # key -> [base, refs, device]
        self._lock = threading.Lock()
        self.opened = 0
        self.closed = 0

    def acquire(self, buf: IpcBuffer, device: int | None = None) -> int:
        """The address of `buf` in this process; opens its allocation on `device` on first use."""
        buf.check()
        key = (buf.pid, bytes(buf.handle))
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                dev = buf.device if device is None else device
                base = self._open(dev, key[1])   # raises: nothing is recorded
                entry = self._entries[key] = [base, 0, dev]
                self.opened += 1
            entry[1] += 1
            return entry[0] + buf.offset

    def release(self, buf: IpcBuffer) -> bool:
        """Drop one use of `buf`; closes the mapping when it was the last (returns True then)."""
        key = (buf.pid, bytes(buf.handle))
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                raise KeyError(f"IPC handle of pid {buf.pid} is not open in this process")
            entry[1] -= 1
            if entry[1] > 0:
                return False
            del self._entries[key]
            self.closed += 1
        self._close(entry[2], entry[0])
        return True

    def refs(self, buf: IpcBuffer) -> int:
        """How many users hold `buf`'s mapping (0: not open)."""
        entry = self._entries.get((buf.pid, bytes(buf.handle)))
        return 0 if entry is None else entry[1]

    def forget_pid(self, pid: int) -> int:
        """Close every mapping exported by `pid` (a peer that died); returns how many."""
        with self._lock:
            gone = [(k, e) for k, e in self._entries.items() if k[0] == pid]
            for k, _ in gone:
                del self._entries[k]
            self.closed += len(gone)
        for _, e in gone:
            self._close(e[2], e[0])
        return len(gone)

    def close_all(self) -> int:
        """Close every mapping (process exit, tests); returns how many were open."""
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
            self.closed += len(entries)
        for e in entries:
            self._close(e[2], e[0])
        return len(entries)

    def __len__(self) -> int:
        return len(self._entries)


HANDLES = HandleCache()   # this process's mappings (lazily CUDA: nothing happens until acquire)


class _DeviceMemory:
    """Raw device memory as __cuda_array_interface__, so torch.as_tensor wraps it without a copy.

    torch keeps this object alive as long as any tensor views the memory, so `keep` (what must
    outlive the views) and a weakref.finalize on this object give the memory back at the right time.
    """

    def __init__(self, ptr: int, nbytes: int, keep: Any = None):
        self.keep = keep
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 3, "strides": None}


def wrap_device_memory(ptr: int, nbytes: int, device: int | None, keep: Any = None) -> tuple[torch.Tensor, Any]:
    """A uint8 CUDA tensor over [ptr, ptr + nbytes) and its owner object (for weakref.finalize)."""
    owner = _DeviceMemory(ptr, nbytes, keep)
    t = torch.as_tensor(owner)   # no device argument: one that differed would make torch copy
    if not t.is_cuda or t.data_ptr() != ptr or (device is not None and t.device.index != device):
        raise ConfigError(f"wrapping device memory {ptr:#x} gave a tensor on {t.device} at "
                          f"{t.data_ptr():#x}, expected cuda:{device} at the same address")
    return t, owner


# --- ring bookkeeping (pure; tested on CPU) ---------------------------------------------------------

class RingBooks:
    """The sender's view of a ring of `size` bytes: aligned contiguous regions taken at the head and
    given back (by the receiver's running `tail`) in order."""

    def __init__(self, size: int, align: int = ALIGN):
        if size < align or size % align:
            raise ConfigError(f"ring of {size} bytes: must be a positive multiple of {align}")
        self.size, self.align = size, align
        self.head = 0   # bytes of ring ever taken
        self.tail = 0   # bytes of ring ever given back

    def alloc(self, nbytes: int) -> tuple[int, int] | None:
        """(offset, bytes used including a skipped end of ring), or None while the space is held."""
        n = -(-max(nbytes, 1) // self.align) * self.align
        if n > self.size:
            raise ValueError(f"a region of {nbytes} bytes does not fit a ring of {self.size}")
        pos = self.head % self.size
        used = n + (self.size - pos if pos + n > self.size else 0)
        # An empty ring takes any region: skipping its end may make `used` exceed the ring, but the
        # running positions it then shares with nothing hold no data (only the skipped end).
        if self.size - (self.head - self.tail) < used and not (self.head == self.tail and n <= self.size):
            return None
        offset = (self.head + used - n) % self.size
        self.head += used
        return offset, used

    def freed(self, tail: int) -> None:
        """The receiver gave back everything before `tail`."""
        if not self.tail <= tail <= self.head:
            raise ProtocolError(f"ring tail {tail} outside [{self.tail}, {self.head}]")
        self.tail = tail

    @property
    def in_use(self) -> int:
        return self.head - self.tail


class InOrderReleases:
    """The receiver's side: regions are released in any order, the tail only moves over a released prefix."""

    def __init__(self) -> None:
        self._regions: collections.deque[list] = collections.deque()   # [used, released]
        self.tail = 0
        self._lock = threading.Lock()   # finalizers release from whichever thread dropped a view

    def add(self, used: int) -> list:
        """Record the next region (in ring order); returns its token for release()."""
        token = [used, False]
        with self._lock:
            self._regions.append(token)
        return token

    def release(self, token: list) -> int | None:
        """Mark a region released; returns the new tail when it moved, else None."""
        with self._lock:
            if token[1]:
                return None
            token[1] = True
            tail = self.tail
            while self._regions and self._regions[0][1]:
                tail += self._regions.popleft()[0]
            if tail == self.tail:
                return None
            self.tail = tail
            return tail

    def __len__(self) -> int:
        return len(self._regions)


# --- the channel ----------------------------------------------------------------------------------

_LOCAL: dict[str, "CudaIpcTransport"] = {}   # receivers of this process, for same-process senders

# A closed receiver's ring goes back to torch's caching allocator, which hands it to the next
# allocation of this process; a sender in another process maps it and may still be writing there (a
# send under way, or copies its stream has not run yet). So a sender holds a shared flock on the
# channel's lock file from before its first write until its copies are done (aclose, after its stream
# has synchronized; or the end of its process, however it ends: the kernel lets go of a dead process's
# locks). The same file admits one sender per channel (a second one would write into the ring from its
# start, over sends not yet read): a sender that holds the lock appends its claim to the file and goes
# on only if the claim is the file's first byte, and a closing receiver appends its mark before it
# looks at the lock, so that no sender goes on after that (O_APPEND: each append lands at the end, at
# once, whatever the other processes do). The closing receiver then tries the lock exclusively: free,
# no sender holds it, nor will; held, the ring is parked until it is free. A thread waits for that in
# the kernel (one per parked ring; a sender that dies wakes it too) and gives the ring back at once;
# `sweep_parked`, run whenever a channel opens or closes, does the same without waiting.
#
# Why a file: a flock is let go of by the kernel when its process dies, and a sender takes it at
# once, before its first write (a connection to a socket would be seen by the receiver only when its
# event loop gets to it, perhaps after it has closed). But the file needs no name once the processes
# that use it have it open: on Linux it is a memfd (shm.unnamed_file), and a sender opens it as
# /proc/<receiver pid>/fd/<fd>, checked against the file's device and inode (the address's `lock_id`:
# once the receiver has closed it, that number may name another of its files; shm.open_peer_file,
# and shm.claim_channel / mark_closing for the claims, the same code as shm's ring). That takes a
# sender that sees the receiver's pid (as the address's pid already assumes) and may open its 0600
# file: its user, or root; /proc also refuses a receiver that is not dumpable (one that changed its user
# without exec). Elsewhere the file keeps its name, `<prefix>-cipc-<tag>.lock` in SHM_DIR, until the
# receiver closes.
_PARKED: list[tuple[int, tuple]] = []   # (lock fd, what a sender may still use: ring, "free" event)
_PARKED_LOCK = threading.Lock()


def _lock_free(fd: int) -> bool:
    """Whether no sender holds the channel's lock (`fd`, the receiver's); if so, the receiver now holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _park(fd: int, keep: tuple, tag: str) -> None:
    """Keep a closed receiver's ring (and "free" event) until no sender holds the lock `fd`."""
    with _PARKED_LOCK:
        _PARKED.append((fd, keep))
    # only the fd goes to the thread: what it holds while it waits would not be given back
    threading.Thread(target=_unpark_when_free, args=(fd,), name=f"cuda_ipc-parked-{tag}", daemon=True).start()


def _unpark_when_free(fd: int) -> None:
    """(A parked ring's thread) wait until no sender holds the lock `fd`, give the ring back, close `fd`.
    Only this closes a parked lock's fd: while it waits, the number must not come to name another file."""
    fcntl.flock(fd, fcntl.LOCK_EX)   # returns at once if a sweep took it first (the same open file)
    with _PARKED_LOCK:
        _PARKED[:] = [p for p in _PARKED if p[0] != fd]
    os.close(fd)


def _hold_lock(path: str, tag: str, ident: Sequence[int] | None = None) -> int:
    """The sender's side: take the channel's lock (the file `path`; `ident`: its [st_dev, st_ino]) and
    claim the channel; the sender keeps the returned fd open while it may write into the ring.
    ActorClosed once the receiver has closed, or when the channel has had a sender."""
    why = f"the receiver of cuda_ipc channel {tag} has closed"
    fd = open_peer_file(path, ident, f"the lock of cuda_ipc channel {tag}", why)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)   # only a closing receiver locks it exclusively
        claim_channel(fd, 0, f"cuda_ipc channel {tag}")
    except BlockingIOError:   # the receiver is closing
        os.close(fd)
        raise ActorClosed(why) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def sweep_parked() -> int:
    """Give closed receivers' rings back if their senders are done; returns how many still wait. (Each
    parked ring's thread does so as soon as its sender is done: this is for those that ask now.)"""
    with _PARKED_LOCK:
        _PARKED[:] = [p for p in _PARKED if not _lock_free(p[0])]
        return len(_PARKED)


async def _until_done(ev: torch.cuda.Event) -> None:
    """Wait (without blocking the loop) until the GPU has passed `ev`."""
    spins = 0
    while not ev.query():
        spins += 1
        await asyncio.sleep(0 if spins < 50 else 1e-4)


class CudaIpcTransport(Transport):
    """One direction of a same-node GPU channel: the receiver's device ring, written by the sender.

    `listen(device="cpu")` makes a channel on host memory that works within one process only: the
    same protocol with no CUDA call (no handle, stream or event), which is how the protocol is
    tested on machines without a GPU.
    """

    kind = "cuda_ipc"

    def __init__(self, *, receiving: bool, device: int | None, ring: torch.Tensor, size: int, ctrl: Any,
                 zctx: Any, owns_ctx: bool, address: dict, sync: str, path: str = "", lock_file: str = ""):
        self.address = address
        self._receiving = receiving
        self._dev = device                 # None: the host-memory channel
        self._cuda = device is not None
        self._ring = ring                  # uint8 [size] (ours, or the peer's mapped into this process)
        self._ring_ptr = ring.data_ptr()
        self._ring_dev = ring.device.index
        self._size = size
        self._ctrl = ctrl
        self._zctx = zctx
        self._owns_ctx = owns_ctx
        self._sync = sync
        self._path = path                  # receiver: its control socket's file, removed on close (not on Linux)
        self._lock_file = lock_file        # receiver: its lock file's name, removed on close (not on Linux)
        self._closed = False
        self._lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._peer_event: Any = None       # the other side's event (IPC-opened, or the object itself)
        self._event: Any = None            # ours: "copied" (sender) or "free" (receiver)
        self._buffer: IpcBuffer | None = None   # sender: the mapping it holds
        self._flock = -1                   # the channel's lock file: receiver's, or held by the sender
        self._watch: PeerWatch | None = None   # learns that the other side closed
        self._books_ = RingBooks(size) if not receiving else None
        self._releases_ = InOrderReleases() if receiving else None
        self._regions: collections.deque = collections.deque()   # receiver: announced, not yet taken
        self._stream: Any = None           # sender: its copy stream
        self._fence = True
        self.stats: collections.Counter[str] = collections.Counter()

    @property
    def capacity(self) -> int:
        """Bytes one send may hold without streaming through the ring (the ring's size)."""
        return self._size

    @property
    def _books(self) -> RingBooks:
        """The sending side's ring bookkeeping."""
        if self._books_ is None:
            raise ProtocolError("the receiving side of a cuda_ipc channel does not send")
        return self._books_

    @property
    def _releases(self) -> InOrderReleases:
        """The receiving side's release bookkeeping."""
        if self._releases_ is None:
            raise ProtocolError("the sending side of a cuda_ipc channel does not receive")
        return self._releases_

    # --- small device helpers (no-ops on the host-memory channel) ---------------------------------
    def _current(self) -> Any:
        return torch.cuda.current_stream(self._dev) if self._cuda else None

    @staticmethod
    def _on(stream: Any) -> Any:
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def _new_tensor(self, spec: Any) -> torch.Tensor:
        dev = torch.device("cuda", self._dev) if self._dev is not None else torch.device("cpu")
        return torch.empty(spec.shape, dtype=spec.dtype, device=dev)

    def _view(self, offset: int, nbytes: int) -> tuple[torch.Tensor, Any]:
        """A uint8 tensor over ring bytes [offset, offset + nbytes) and the object whose end frees them."""
        if self._cuda:
            return wrap_device_memory(self._ring_ptr + offset, nbytes, self._ring_dev, keep=self._ring)
        owner = self._ring.numpy()[offset:offset + nbytes]   # tensors made from it keep it alive
        return torch.from_numpy(owner), owner

    # --- opening ----------------------------------------------------------------------------------
    @classmethod
    async def listen(cls, *, device: Any = "cuda", ring_bytes: int = 64 << 20, sync: str = "event",
                     zctx: zmq.asyncio.Context | None = None) -> "CudaIpcTransport":
        """Allocate the ring on `device` and bind the control socket; the receiving side."""
        if sync not in ("event", "host"):
            raise ConfigError(f"cuda_ipc sync must be 'event' or 'host', got {sync!r}")
        tag = uuid.uuid4().hex[:12]
        name = f"{name_prefix()}-cipc-{tag}"   # (a bad prefix: ConfigError, before anything is made)
        host = str(device) == "cpu"
        size = max(ALIGN, ring_bytes // ALIGN * ALIGN)
        dev, event, event_handle, ring_desc = None, None, b"", None
        if host:
            ring = torch.empty(size, dtype=torch.uint8)
        else:
            _require()
            dev = index = device_index(device)
            with torch.cuda.device(index):
                ring = torch.empty(size, dtype=torch.uint8, device=torch.device("cuda", index))
                if sync == "event":
                    event = torch.cuda.Event(interprocess=True)
                    event_handle = bytes(event.ipc_handle())
            ring_desc = export_tensor(ring).to_list()
        sweep_parked()
        owns = zctx is None
        zctx = zctx or zmq.asyncio.Context()
        ctrl = zctx.socket(zmq.PAIR)
        ctrl.setsockopt(zmq.LINGER, 0)
        ctrl.setsockopt(zmq.SNDHWM, 0)   # free notices: at most one per ring region, never dropped
        watch = PeerWatch(ctrl, f"cuda_ipc channel {tag}", peer="sender")
        try:
            ctl_file, ctrl_ep = bind_control(ctrl, name)
            lock_file = "" if NAMELESS else os.path.join(SHM_DIR, f"{name}.lock")   # see _PARKED
            flock = (unnamed_file(f"{name}.lock") if NAMELESS else
                     os.open(lock_file, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600))
        except BaseException:
            watch.close()
            ctrl.close()
            if owns:
                zctx.term()
            raise
        lock_st = os.fstat(flock)
        lock = f"/proc/{os.getpid()}/fd/{flock}" if NAMELESS else lock_file   # senders open it by our fd
        address = {"kind": "cuda_ipc", "channel": tag, "pid": os.getpid(), "device": -1 if host else dev,
                   "ring": ring_desc, "event": event_handle, "ctrl": ctrl_ep, "sync": sync,
                   "lock": lock, "lock_id": [lock_st.st_dev, lock_st.st_ino]}
        self = cls(receiving=True, device=dev, ring=ring, size=size, ctrl=ctrl, zctx=zctx, owns_ctx=owns,
                   address=address, sync=sync, path=ctl_file, lock_file=lock_file)
        self._event = event
        self._flock = flock
        self._watch = watch
        _LOCAL[tag] = self
        return self

    @classmethod
    async def connect(cls, address: dict, *, device: Any = None, fence: bool = True,
                      zctx: zmq.asyncio.Context | None = None) -> "CudaIpcTransport":
        """Open the receiver's ring (cached mapping) and say hello; the sending side.

        `device`: where this side's tensors live (default: the receiver's device index). `fence`:
        later work on the producer's stream waits for the copies, so a sent tensor may be modified
        as soon as send() returns, as the Transport contract says.
        """
        try:
            tag, pid, rdev, ctrl_ep, sync = (address["channel"], int(address["pid"]), int(address["device"]),
                                             address["ctrl"], address["sync"])
            buf = None if address["ring"] is None else IpcBuffer.parse(address["ring"])
            event_handle = bytes(address["event"])
            lock, lock_id = str(address["lock"]), [int(x) for x in address["lock_id"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"bad cuda_ipc address {address!r:.160}: {e}") from e
        if buf is None and pid != os.getpid():
            raise ConfigError("a host-memory cuda_ipc channel (device='cpu') works within one process only")
        flock = _hold_lock(lock, tag, lock_id)   # before anything is written into the ring (see _PARKED)
        try:
            dev = None if buf is None else (rdev if device is None else device_index(device))
            held = None
            if pid == os.getpid():   # CUDA cannot open a handle in the process that exported it
                rx = _LOCAL.get(tag)
                if rx is None:
                    raise ConfigError(f"cuda_ipc channel {tag} is not open in this process")
                ring, size, peer_event = rx._ring, rx._size, rx._event
            else:
                _require()
                assert buf is not None   # a host-memory channel (no ring handle) was refused above
                ring_ptr = HANDLES.acquire(buf, dev)
                held, size = buf, buf.nbytes
                try:
                    ring, _ = wrap_device_memory(ring_ptr, buf.nbytes, rdev)
                    peer_event = torch.cuda.Event.from_ipc_handle(rdev, event_handle) if sync == "event" else None
                except BaseException:
                    HANDLES.release(buf)
                    raise
            stream = event = None
            handle = b""
            if dev is not None:
                with torch.cuda.device(dev):
                    stream = torch.cuda.Stream(dev)
                    event = torch.cuda.Event(interprocess=True) if sync == "event" else None
                    # here: torch creates the event lazily, on the device current when its handle is
                    # asked for; on another device than the stream's, every record() would fail
                    if event is not None and held is not None:
                        handle = bytes(event.ipc_handle())
            hello = IpcHello(os.getpid(), handle)
            owns = zctx is None
            zctx = zctx or zmq.asyncio.Context()
            ctrl = zctx.socket(zmq.PAIR)
            ctrl.setsockopt(zmq.LINGER, 1000)
            ctrl.setsockopt(zmq.RCVHWM, 0)
            watch = PeerWatch(ctrl, f"cuda_ipc channel {tag}")
            ctrl.connect(ctrl_ep)
            self = cls(receiving=False, device=dev, ring=ring, size=size, ctrl=ctrl, zctx=zctx, owns_ctx=owns,
                       address=dict(address), sync=sync)
        except BaseException:
            os.close(flock)
            raise
        self._flock, self._watch = flock, watch
        self._buffer, self._stream, self._event, self._peer_event = held, stream, event, peer_event
        self._fence = fence
        if held is None:   # same process: each side uses the other's event object directly
            _LOCAL[tag]._peer_event = event
        await ctrl.send(_control(hello))
        return self

    # --- sending ----------------------------------------------------------------------------------
    async def _flush(self, header: bytes, regions: list) -> None:
        """Signal "copied" for what is in the ring so far, then tell the receiver where it is."""
        if not header and not regions:
            return
        if self._event is not None:
            self._event.record(self._stream)
        elif self._stream is not None:   # sync="host": wait (off the loop's back) until the copies are done
            ev = torch.cuda.Event()
            ev.record(self._stream)
            await _until_done(ev)
        await self._ctrl.send(_control(IpcRegions(header, regions)))
        self.stats["notices"] += 1

    async def _poll_frees(self) -> None:
        """Take in the free notices already here, without waiting (keeps the control queue short)."""
        while self._ctrl.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._freed(_read_control(await self._ctrl.recv()))

    def _freed(self, msg: Any) -> None:
        if not isinstance(msg, IpcFree):
            raise ProtocolError(f"cuda_ipc sender got {type(msg).__name__}, expected IpcFree")
        self._books.freed(msg.tail)

    async def _alloc(self, nbytes: int) -> tuple[int, int]:
        while True:
            got = self._books.alloc(nbytes)
            if got is not None:
                return got
            assert self._watch is not None   # a sender's
            self._freed(_read_control(await self._watch.recv()))   # ActorClosed once the receiver closed
            self.stats["waits"] += 1

    def _check_tensor(self, t: torch.Tensor) -> None:
        ok = (t.is_cuda and t.device.index == self._dev) if self._cuda else t.device.type == "cpu"
        if not ok:
            where = f"cuda:{self._dev} (see connect's `device`)" if self._cuda else "the CPU"
            raise ProtocolError(f"this cuda_ipc sender carries tensors of {where}; got one on {t.device}")

    async def send(self, *tensors: torch.Tensor) -> None:
        if self._closed:
            raise ActorClosed("cuda_ipc transport is closed")
        if self._watch is not None:
            self._watch.check()
        ts = []
        for t in tensors:
            self._check_tensor(t)
            ts.append(t if t.is_contiguous() else t.contiguous())
        header = tensor_header(ts)
        chunk = max(ALIGN, self._size // 4 // ALIGN * ALIGN)
        async with self._lock:
            await self._poll_frees()
            producer = self._current()
            if self._stream is not None:
                self._stream.wait_stream(producer)   # the tensors' values are computed
            pending: list = []
            head = header
            for t in ts:
                if t.numel() == 0:
                    continue
                src = t.reshape(-1).view(torch.uint8)
                n = src.numel()
                step = n if n <= self._size else chunk   # larger than the ring: streamed through it
                for pos in range(0, n, step):
                    part = src[pos:pos + step]
                    got = self._books.alloc(part.numel())
                    if got is None:   # the ring is full: say what is there, then wait for space
                        await self._flush(head, pending)
                        head, pending = b"", []
                        got = await self._alloc(part.numel())
                    offset, used = got
                    if self._peer_event is not None:
                        self._stream.wait_event(self._peer_event)   # the receiver is done with that space
                    with self._on(self._stream):
                        self._ring[offset:offset + part.numel()].copy_(part, non_blocking=self._cuda)
                    pending.append([offset, part.numel(), used])
                    self.stats["bytes"] += part.numel()
                if self._stream is not None:
                    t.record_stream(self._stream)   # t may be freed once send() returns: the copy may still run
            await self._flush(head, pending)
            if self._fence and self._stream is not None:
                producer.wait_stream(self._stream)
            self.stats["sends"] += 1

    # --- receiving --------------------------------------------------------------------------------
    async def _next(self) -> IpcRegions:
        watch = self._watch
        assert watch is not None
        while True:
            msg = _read_control(await watch.recv())   # ActorClosed once the sender has gone and sent all
            if isinstance(msg, IpcHello):
                if watch.seen:   # a second sender (after all the first sent: PAIR), with new ring books
                    raise watch.sender_replaced(now=True)
                watch.sender_seen()
                if msg.event and msg.pid != os.getpid():
                    if len(msg.event) != IPC_HANDLE_BYTES:
                        raise ProtocolError(f"IPC event handle of {len(msg.event)} bytes")
                    self._peer_event = torch.cuda.Event.from_ipc_handle(self._dev, bytes(msg.event))
                continue
            if not isinstance(msg, IpcRegions):
                raise ProtocolError(f"cuda_ipc receiver got {type(msg).__name__}, expected IpcRegions")
            return msg

    def _arrived(self, msg: IpcRegions, stream: Any) -> None:
        if self._peer_event is not None:
            stream.wait_event(self._peer_event)   # what the notice names is copied before anything reads it
        for r in msg.regions:
            if not (isinstance(r, list) and len(r) == 3 and all(type(x) is int and x >= 0 for x in r)
                    and r[0] + r[1] <= self._size and r[2] < 2 * self._size):
                raise ProtocolError(f"bad cuda_ipc region {r!r:.80} (ring {self._size})")
            self._regions.append(r)

    async def _take(self, max_bytes: int, stream: Any) -> tuple[int, int, list]:
        while not self._regions:
            msg = await self._next()
            if msg.header:
                raise ProtocolError("cuda_ipc: a new send began before the last one's data arrived")
            self._arrived(msg, stream)
        offset, nbytes, used = self._regions.popleft()
        if nbytes > max_bytes:
            raise ProtocolError(f"cuda_ipc region of {nbytes} bytes, expected at most {max_bytes}")
        return offset, nbytes, self._releases.add(used)

    def _release(self, token: list, stream: Any) -> None:
        """Give a region back: mark "free" where its readers were queued, then tell the sender."""
        if self._closed:
            return
        if self._cuda and self._event is None:   # sync="host": notify once the readers are done
            ev = torch.cuda.Event()
            ev.record(stream)
            self._call_on_loop(self._host_release, token, ev)
            return
        if self._event is not None:
            self._event.record(stream)
        tail = self._releases.release(token)
        if tail is not None:
            self._call_on_loop(self._send_free, tail)

    def _host_release(self, token: list, ev: Any) -> None:
        async def later() -> None:
            await _until_done(ev)
            tail = self._releases.release(token)
            if tail is not None:
                self._send_free(tail)
        self._loop.create_task(later())

    def _send_free(self, tail: int) -> None:
        if not self._closed:
            self._ctrl.send(_control(IpcFree(tail)))
            self.stats["frees"] += 1

    def _call_on_loop(self, fn: Callable, *args: Any) -> None:
        if threading.get_ident() == self._thread:
            fn(*args)
        else:   # a view dropped in a worker thread
            try:
                self._loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:   # the loop is gone, and the channel with it
                pass

    async def recv(self, into: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        if self._closed:
            raise ActorClosed("cuda_ipc transport is closed")
        async with self._lock:
            stream = self._current()
            msg = await self._next()
            if not msg.header:
                raise ProtocolError("cuda_ipc receiver expected the start of a send")
            specs = parse_tensor_header(msg.header)
            self._arrived(msg, stream)
            bad = None
            if into is not None:
                try:
                    check_into(into, specs)
                    if any(t.is_cuda != self._cuda for t in into):
                        raise ProtocolError(f"cuda_ipc `into` tensors must be on {'CUDA' if self._cuda else 'the CPU'}")
                except ProtocolError as e:
                    bad = e   # read (and give back) this send so that the next one is intact
            out: list[torch.Tensor] = []
            views = views_fit([s.nbytes for s in specs], self._size, ALIGN)
            for i, spec in enumerate(specs):
                if spec.nbytes == 0:
                    if bad is None:
                        out.append(into[i] if into is not None else self._new_tensor(spec))
                    continue
                if bad is not None or into is not None or not views:
                    dst = None if bad is not None else (into[i] if into is not None else self._new_tensor(spec))
                    await self._copy_out(spec.nbytes, dst, stream)
                    if dst is not None:
                        out.append(dst)
                    continue
                offset, nbytes, token = await self._take(spec.nbytes, stream)
                if nbytes != spec.nbytes:
                    raise ProtocolError(f"cuda_ipc region of {nbytes} bytes for a tensor of {spec.nbytes}")
                view, owner = self._view(offset, nbytes)
                weakref.finalize(owner, self._release, token, stream).atexit = False
                out.append(view.view(spec.dtype).view(spec.shape))
            self.stats["recvs"] += 1
            if bad is not None:
                raise bad
            return out

    async def _copy_out(self, nbytes: int, dst: torch.Tensor | None, stream: Any) -> None:
        flat = dst.reshape(-1).view(torch.uint8) if dst is not None else None
        pos = 0
        while pos < nbytes:
            offset, n, token = await self._take(nbytes - pos, stream)
            if flat is not None:
                with self._on(stream):
                    flat[pos:pos + n].copy_(self._ring[offset:offset + n], non_blocking=self._cuda)
            self._release(token, stream)
            pos += n

    # --- closing ----------------------------------------------------------------------------------
    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._receiving:
            _LOCAL.pop(self.address["channel"], None)
            for name in (self._path, self._lock_file):   # (named only off Linux)
                if name:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name)
            mark_closing(self._flock)   # no sender goes on from here (see _PARKED)
            if _lock_free(self._flock):
                os.close(self._flock)
            else:   # a sender may still write into the ring
                _park(self._flock, (self._ring, self._event), self.address["channel"])
        else:
            if self._stream is not None:
                await asyncio.to_thread(self._stream.synchronize)   # no copy may still target the ring
            if self._buffer is not None:
                HANDLES.release(self._buffer)
                self._buffer = None
            os.close(self._flock)   # done with the ring: its receiver may give it back
        if self._watch is not None:
            self._watch.close()
        self._flock = -1
        sweep_parked()
        # received views keep the ring (and so the mapping's memory) alive until they are dropped
        self._ring = torch.empty(0, dtype=torch.uint8)   # drops our reference to the ring
        self._ctrl.close()
        if self._owns_ctx:
            self._zctx.term()


# --- KV blocks --------------------------------------------------------------------------------------

def coalesce_runs(src_blocks: Sequence[int], dst_blocks: Sequence[int]) -> list[tuple[int, int, int]]:
    """Pairs of block ids as runs (src_start, dst_start, length) where both sides are consecutive."""
    if len(src_blocks) != len(dst_blocks):
        raise ValueError(f"{len(src_blocks)} source blocks for {len(dst_blocks)} destination blocks")
    runs: list[list[int]] = []
    for s, d in zip(src_blocks, dst_blocks):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1][2] += 1
        else:
            runs.append([int(s), int(d), 1])
    return [(s, d, n) for s, d, n in runs]


def copy_runs(src: torch.Tensor, dst: torch.Tensor, runs: Sequence[tuple[int, int, int]],
              stream: Any = None) -> int:
    """Copy blocks src[s:s+n] -> dst[d:d+n] for each run (pools [num_blocks, ...]); returns bytes.

    Long runs are single memcpys. Short ones (block by block) are gathered and scattered by index:
    two kernels per _INDEX_CHUNK bytes, whatever the number of runs. (torch._foreach_copy_ was
    tried first: on an H200 it moved 23.5 GB/s for 128 KiB blocks, ~5 us per block, as if each
    were its own copy: an eightieth of a plain device copy; this gives 60.4 GB/s there;
    benchmarks/results/gpu_check-2026-11-28-nvidia-h200*.json.)
    """
    if src.dtype != dst.dtype or src.shape[1:] != dst.shape[1:]:
        raise ValueError(f"pools differ: {src.dtype}{list(src.shape)} vs {dst.dtype}{list(dst.shape)}")
    per_block = src[0].numel() * src.element_size() if src.shape[0] else 0
    small_s: list[int] = []
    small_d: list[int] = []
    total = 0
    ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
    with ctx:
        for s, d, n in runs:
            if s < 0 or d < 0 or n < 0 or s + n > src.shape[0] or d + n > dst.shape[0]:
                raise IndexError(f"run ({s}, {d}, {n}) outside pools of {src.shape[0]} / {dst.shape[0]} blocks")
            total += n * per_block
            if n * per_block >= _BIG_RUN:
                dst[d:d + n].copy_(src[s:s + n], non_blocking=True)
            else:
                small_s.extend(range(s, s + n))
                small_d.extend(range(d, d + n))
        step = max(1, _INDEX_CHUNK // max(per_block, 1))   # bounds the gathered temporary
        # blocks as rows of one dimension: the index kernels then move whole rows (3x faster than on
        # [blocks, block_size, heads, dim] on CPU; the pools are contiguous, as allocated or opened)
        s2 = src.view(src.shape[0], -1) if src.is_contiguous() else src
        d2 = dst.view(dst.shape[0], -1) if dst.is_contiguous() else dst
        cross = src.device != dst.device   # two GPUs of one host: index_copy_ wants all on dst's device
        for i in range(0, len(small_s), step):
            s_idx = torch.tensor(small_s[i:i + step], dtype=torch.int64).to(src.device, non_blocking=True)
            d_idx = torch.tensor(small_d[i:i + step], dtype=torch.int64).to(dst.device, non_blocking=True)
            rows = s2.index_select(0, s_idx)
            d2.index_copy_(0, d_idx, rows.to(dst.device, non_blocking=True) if cross else rows)
    if cross and small_s and dst.is_cuda:   # that scatter ran on dst's current stream, which the caller
        torch.cuda.current_stream(dst.device).synchronize()   # (syncing `stream`) does not wait for
    return total


def export_pools(kv: dict, num_blocks: int, block_size: int) -> KvPools:
    """KvPools of a stage's caches (unit -> PagedKVCache with .k/.v [num_blocks, block_size, heads, dim])."""
    pools, dtype, shape = {}, "", []
    for u, cache in kv.items():
        pools[int(u)] = [export_tensor(cache.k).to_list(), export_tensor(cache.v).to_list()]
        dtype = str(cache.k.dtype).removeprefix("torch.")
        shape = list(cache.k.shape[1:])
    return KvPools(dtype, num_blocks, shape or [block_size, 0, 0], pools)


class PeerPools:
    """Another process's KV pools opened here (through HANDLES), as tensors of their shape."""

    def __init__(self, cache: HandleCache | None = None):
        self._cache = cache or HANDLES
        self._held: dict[tuple[int, bytes, int], tuple[IpcBuffer, torch.Tensor]] = {}

    def open(self, pools: KvPools, device: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """unit -> (k, v) tensors [num_blocks, *block_shape] viewing the peer's pools."""
        dtype = getattr(torch, str(pools.dtype), None)
        if not isinstance(dtype, torch.dtype):
            raise ProtocolError(f"KvPools dtype {pools.dtype!r} is not a torch dtype")
        shape = [int(pools.num_blocks), *[int(x) for x in pools.block_shape]]
        out = {}
        for u, (kb, vb) in pools.pools.items():
            out[int(u)] = (self._tensor(IpcBuffer.parse(kb), dtype, shape, device),
                           self._tensor(IpcBuffer.parse(vb), dtype, shape, device))
        return out

    def _tensor(self, buf: IpcBuffer, dtype: torch.dtype, shape: list, device: int) -> torch.Tensor:
        key = (buf.pid, bytes(buf.handle), buf.offset)
        held = self._held.get(key)
        if held is None:
            if buf.pid == os.getpid():
                raise ConfigError("PeerPools opens another process's pools; in one process use the tensors")
            nbytes = 1
            for x in shape:
                nbytes *= x
            nbytes *= torch.empty(0, dtype=dtype).element_size()
            if nbytes != buf.nbytes:
                raise ProtocolError(f"pool of {buf.nbytes} bytes announced as {dtype}{shape}")
            ptr = self._cache.acquire(buf, device)
            t, _ = wrap_device_memory(ptr, buf.nbytes, buf.device)
            held = self._held[key] = (buf, t.view(dtype).view(shape))
        return held[1]

    def close(self) -> None:
        """Release every opened pool (call before the peer frees them)."""
        for buf, _ in self._held.values():
            self._cache.release(buf)
        self._held.clear()


register_transport("cuda_ipc", CudaIpcTransport.listen, CudaIpcTransport.connect)

"""Same-host transport through one reusable shared-memory ring per channel.

The receiver creates a file of `ring_bytes` with no name (see Names), maps it, and binds a ZeroMQ
PAIR socket for control; the sender opens the same file once, claims the channel (no second sender
may map the ring) and maps it. The file's memory goes when the last of them unmaps it, however they
end: a crash leaks nothing.
A send copies each tensor into a contiguous region of the ring and tells the receiver where it is;
the receiver either copies it out (`recv(into=...)`) or, without `into`, returns tensors that *are*
the ring regions (no copy): a region is given back to the sender when the last tensor viewing it is
garbage-collected. Hold such tensors only briefly (clone what you keep): they hold ring space, and a
sender that finds the ring full waits. A tensor larger than the ring is streamed through it in
chunks and arrives as a new tensor (or in `into`), and so does every tensor of a send whose views
could not all be held in the ring at once (`base.views_fit`).

Each side learns from its control socket's monitor (`base.PeerWatch`) that the other closed or
died: a sender's sends raise ActorClosed, one waiting for ring space included (the sender's mapping
keeps the ring's pages alive, so a closed receiver's ring is never reused under a sender); the
receiver's recv() raises ActorClosed once it has received every send completed before that, also
in the middle of a send that the sender did not finish, and while it waits for the next one, and from
then on. A channel carries one sender's sends: the control socket (PAIR) takes one connection at a
time, so another sender's hello comes after everything the first sent, and ends the channel (its
ring bookkeeping would start again from a ring that the receiver's views still hold).

Names. A channel is named `<prefix>-<tag>`, with the prefix from the environment variable
FLEXPIPE_SHM_PREFIX (default "fp-shm"; 1 to 32 letters, digits, '-' or '_'), read at each listen() and
inherited by child processes: one run's channels can be told from another's on the same machine (the
test suite sets its own per session). On Linux nothing of a channel is on disk, so a receiver that is
killed (SIGKILL), with or without a sender, leaves nothing behind. The ring is a memfd of that name
(`unnamed_file`: `ls -l /proc/<pid>/fd` shows it as /memfd:<prefix>-<tag>), and a sender opens it as
/proc/<receiver pid>/fd/<n>, checked against the file's device and inode (`open_peer_file`; once the
receiver has closed that fd, the number may name another of its files). That takes a sender of the
receiver's user (or root) that sees the receiver's pid (the same pid namespace) and a dumpable receiver
(one that changed its user did so with an exec); /proc refusing is a ConfigError that says so. The
sender appends its claim to the file, beyond the ring, and goes on only if it is the first (a closing
receiver appends its own mark first, so no sender goes on after the close: `claim_channel`); the
receiver closes its fd once its sender's hello has come. The control socket is bound in the abstract
socket namespace (`ipc://@<prefix>-<tag>.ctl`): the name goes with the socket; as such a name has no
file permissions, only processes of the receiver's user (or root, who could open the ring anyway) may
connect to it (ZeroMQ's IPC_FILTER_UID, by the kernel's peer credentials).

Elsewhere the ring is the file `<prefix>-<tag>` in /dev/shm (the temporary directory where there is
none), whose name the first sender unlinks once it has opened it (so that no second sender can), and
the control socket the file `<prefix>-<tag>.ctl` in the temporary directory; the receiver removes both
when it closes (a killed receiver that had no sender leaves them). A sender takes an address of either
form (`ring` and `ring_id` on Linux, `path` elsewhere, and from receivers of before the nameless ring).
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import glob
import mmap
import os
import re
import stat
import struct
import sys
import tempfile
import threading
import uuid
import weakref
from typing import Sequence

import numpy as np
import torch
import zmq
import zmq.asyncio

from flexpipe.errors import ActorClosed, ConfigError, ProtocolError
from flexpipe.runtime.codec import byte_view, parse_tensor_header, tensor_header
from flexpipe.transports.base import PeerWatch, Transport, check_into, views_fit

__all__ = ["ShmTransport"]

_HELLO, _HEAD, _REGION, _FREE = b"O", b"H", b"R", b"F"
_REGION_FMT = struct.Struct("<QQQ")   # offset, bytes of data, bytes of ring used (with padding)
_FREE_FMT = struct.Struct("<Q")       # the receiver's tail: every byte before it is free again
_ALIGN = 64
SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
PREFIX_ENV = "FLEXPIPE_SHM_PREFIX"
DEFAULT_PREFIX = "fp-shm"
_PREFIX = re.compile(r"[A-Za-z0-9_-]{1,32}")   # 32: a control file's path must fit a socket address
ABSTRACT_CTRL = sys.platform.startswith("linux")   # an abstract socket namespace: nothing left on disk
NAMELESS = sys.platform.startswith("linux")        # rings opened through /proc: nothing left on disk
_CLAIM, _CLOSING = b"S", b"C"   # what a sender, and a closing receiver, append to a channel's file


def name_prefix() -> str:
    """The prefix of the names of the shm channels this process opens (see the module's docstring)."""
    prefix = os.environ.get(PREFIX_ENV, DEFAULT_PREFIX)
    if not _PREFIX.fullmatch(prefix):
        raise ConfigError(f"{PREFIX_ENV}={prefix!r:.80} cannot prefix shm channel names: set it to 1 to "
                          f"32 letters, digits, '-' or '_', or unset it for {DEFAULT_PREFIX!r}")
    return prefix


def names_on_disk(prefix: str | None = None) -> set[str]:
    """Paths of the channels of this prefix (default: this process's) that are on disk: rings in
    SHM_DIR and control files in the temp dir (none on Linux: see Names).  What tests and the soak
    scripts check is left when every channel is closed."""
    prefix = prefix or name_prefix()
    return set(glob.glob(os.path.join(SHM_DIR, f"{prefix}-*"))) | set(
        glob.glob(os.path.join(tempfile.gettempdir(), f"{prefix}-*.ctl")))


def open_rings(pid: int | str = "self", prefix: str | None = None) -> set[str]:
    """The nameless rings of this prefix (memfds, `unnamed_file`) that process `pid` holds open, as
    "fd -> /memfd:<name>" (Linux; empty elsewhere): a receiver keeps its ring, a sender the ring it
    writes to.  What tests and the soak scripts check is left when every channel is closed."""
    want = f"/memfd:{prefix or name_prefix()}-"
    out = set()
    for fd in glob.glob(f"/proc/{pid}/fd/*"):
        try:
            target = os.readlink(fd)
        except OSError:   # (closed meanwhile, or the glob's own directory fd)
            continue
        if target.startswith(want):
            out.add(f"{os.path.basename(fd)} -> {target}")
    return out


def bind_control(ctrl: zmq.Socket, name: str) -> tuple[str, str]:
    """Bind a receiver's control socket for the channel `name`; returns (the file to remove when it
    closes, "" where there is none; the endpoint senders connect to). On Linux the socket is in the
    abstract namespace and admits only this user's processes and root's (module docstring); elsewhere
    it is a file in the temporary directory (shm.py and cuda_ipc.py both bind this way)."""
    if ABSTRACT_CTRL:
        # an abstract name has no permissions: only the users a 0600 file would let in may connect
        for uid in sorted({os.getuid(), 0}):
            ctrl.setsockopt(zmq.IPC_FILTER_UID, uid)
        ctl_file, endpoint = "", f"ipc://@{name}.ctl"
    else:
        ctl_file = os.path.join(tempfile.gettempdir(), f"{name}.ctl")
        endpoint = f"ipc://{ctl_file}"
    ctrl.bind(endpoint)
    return ctl_file, endpoint


def unnamed_file(name: str) -> int:
    """A new empty 0600 file of this process that no name leads to (Linux), open O_RDWR | O_APPEND:
    a memfd called `name`, or where memfd_create is refused (an old kernel, a seccomp filter) a file
    created as SHM_DIR/`name` and unlinked at once. Other processes open it through /proc
    (`open_peer_file`); it goes when the last fd and mapping of it go, however its processes end."""
    try:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
    except (AttributeError, OSError):   # (AttributeError: a C library without it)
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        os.unlink(path)
        return fd
    try:
        os.fchmod(fd, 0o600)   # a memfd is made 0777: only /proc's check on its owner would guard it
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_peer_file(path: str, ident: Sequence[int] | None, what: str, gone: str) -> int:
    """Open another process's channel file `path` (O_RDWR | O_APPEND): on Linux /proc/<pid>/fd/<n>, with
    `ident` its [st_dev, st_ino] (once the owner has closed that fd, the number may name another of its
    files: that one is not opened). Raises ActorClosed(`gone`) when the file is not there, ConfigError
    when the system refuses it (`what` names the file in the message)."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or (ident is not None and [st.st_dev, st.st_ino] != list(ident)):
            raise FileNotFoundError(path)   # the owner closed it, and the number names another file
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
    except FileNotFoundError:
        raise ActorClosed(gone) from None
    except PermissionError as e:
        raise ConfigError(f"cannot open {what} ({e}): run the sender as the receiver's user (or root), "
                          "where it sees the receiver's processes (the same pid namespace, /proc not "
                          "hidden), and keep the receiver dumpable (change its user only with an exec)") from None
    now = os.fstat(fd)
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):   # the number's file changed meanwhile
        os.close(fd)
        raise ActorClosed(gone)
    return fd


def claim_channel(fd: int, base: int, what: str) -> None:
    """(A sender) append this sender's claim to its channel's file (`fd`, from open_peer_file), whose
    claims begin at byte `base`; returns if it is the first, which makes this the channel's sender.
    Else raises ActorClosed: the receiver has closed (its mark came first; see mark_closing), or the
    channel has had its sender. (O_APPEND: each append lands at the end, at once, whatever the other
    processes do.) The caller closes `fd` on error."""
    os.write(fd, _CLAIM)
    if os.lseek(fd, 0, os.SEEK_CUR) == base + len(_CLAIM):
        return
    if _CLOSING in os.pread(fd, 4096, base):
        raise ActorClosed(f"the receiver of {what} has closed")
    raise ActorClosed(f"{what} has its sender (a channel carries one sender's sends)")


def mark_closing(fd: int) -> None:
    """(A closing receiver) append its mark to the channel's file (`fd`, O_APPEND): a sender whose claim
    comes after it does not go on (claim_channel)."""
    os.write(fd, _CLOSING)


def _open_ring(ring: str, ident: Sequence[int] | None, path: str, name: str, size: int) -> int:
    """(A sender) open the receiver's ring of `size` bytes and make this the channel's sender: through
    /proc, by the claim appended to the file (`ring`, `ident`: Linux), or by unlinking its name (`path`:
    elsewhere). The fd, to map; ActorClosed once the receiver has closed, or when the channel has had
    its sender."""
    what = f"shm channel {name}"
    if ring:
        fd = open_peer_file(ring, ident, f"the ring of {what}",
                            f"{what} is not open: its receiver has closed, or it has had its sender "
                            "(a channel carries one sender's sends)")
        try:
            has = os.fstat(fd).st_size
            if has < size:
                raise ProtocolError(f"{what}: its ring has {has} bytes, its address says {size}")
            claim_channel(fd, size, what)   # the claims go beyond the ring
        except BaseException:
            os.close(fd)
            raise
        return fd
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        raise ActorClosed(f"{what} is not open: its receiver has closed, or it has had its sender "
                          "(a channel carries one sender's sends)") from None
    except OSError as e:
        raise ProtocolError(f"cannot open {what} ({path}): {e}") from e
    try:
        # the ring's name goes with the first sender: a second one would write into the ring
        # from its start, over sends not yet read (the receiver would refuse it only later)
        os.unlink(path)
    except FileNotFoundError:
        os.close(fd)
        raise ActorClosed(f"{what} has another sender (a channel carries one sender's sends)") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Region:
    __slots__ = ("used", "released")

    def __init__(self, used: int):
        self.used = used
        self.released = False


class ShmTransport(Transport):
    """One direction of a same-host channel: a shared ring of bytes plus a control socket."""

    kind = "shm"

    def __init__(self, mm: mmap.mmap, name: str, ring_bytes: int, ctrl: zmq.asyncio.Socket,
                 zctx: zmq.asyncio.Context, owns_ctx: bool, receiving: bool, address: dict):
        self.address = address
        self._mm = mm
        self._name = name     # the channel's, for messages
        self._path = ""       # receiver: the ring's file, until its sender came or it closed (not on Linux)
        self._fd = -1         # receiver: the ring's fd, until its sender came or it closed (Linux)
        self._ring = np.frombuffer(mm, dtype=np.uint8)
        self._size = ring_bytes
        self._head = 0        # bytes of ring ever allocated (sender) / announced (receiver)
        self._tail = 0        # bytes of ring ever given back
        self._regions: collections.deque[_Region] = collections.deque()   # receiver, in order
        self._ctrl = ctrl
        self._zctx = zctx
        self._owns_ctx = owns_ctx
        self._receiving = receiving
        self._closed = False
        self._watch: PeerWatch | None = None   # learns that the other side closed
        self._ctl_file = ""   # a receiver's control socket file, to remove on close (not on Linux)
        self._lock = asyncio.Lock()   # one send (or recv) at a time: their messages interleave
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()

    @property
    def capacity(self) -> int:
        """Bytes one send may hold without streaming through the ring (the ring's size)."""
        return self._size

    @classmethod
    async def listen(cls, *, ring_bytes: int = 64 << 20,
                     zctx: zmq.asyncio.Context | None = None) -> "ShmTransport":
        """Create the ring and the control socket; the receiving side."""
        ring_bytes = max(_ALIGN, ring_bytes // _ALIGN * _ALIGN)
        name = f"{name_prefix()}-{uuid.uuid4().hex[:12]}"
        path = "" if NAMELESS else os.path.join(SHM_DIR, name)
        fd = unnamed_file(name) if NAMELESS else os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, ring_bytes)
            st = os.fstat(fd)
            mm = mmap.mmap(fd, ring_bytes)
        except BaseException:
            os.close(fd)
            if path:
                os.unlink(path)
            raise
        owns = zctx is None
        zctx = zctx or zmq.asyncio.Context()
        ctrl = zctx.socket(zmq.PAIR)
        ctrl.setsockopt(zmq.LINGER, 0)
        watch = PeerWatch(ctrl, f"shm channel {name}", peer="sender")
        try:
            ctl_file, ctrl_ep = bind_control(ctrl, name)
        except BaseException:
            watch.close()
            ctrl.close()
            if owns:
                zctx.term()
            os.close(fd)
            if path:
                os.unlink(path)
            raise
        address = {"kind": "shm", "channel": name, "ring_bytes": ring_bytes, "ctrl": ctrl_ep}
        if NAMELESS:   # senders open the ring by the receiver's fd, which is kept until the sender came
            address.update(ring=f"/proc/{os.getpid()}/fd/{fd}", ring_id=[st.st_dev, st.st_ino])
        else:          # by its name, which the first sender unlinks
            os.close(fd)
            address["path"] = path
        self = cls(mm, name, ring_bytes, ctrl, zctx, owns, True, address)
        if NAMELESS:
            self._fd = fd
        self._path = path
        self._watch = watch
        self._ctl_file = ctl_file
        return self

    @classmethod
    async def connect(cls, address: dict, *,
                      zctx: zmq.asyncio.Context | None = None) -> "ShmTransport":
        """Map the receiver's ring and connect to its control socket; the sending side."""
        try:
            size, ctrl_ep = int(address["ring_bytes"]), str(address["ctrl"])
            if "ring" in address:   # (Linux) the receiver's fd, through /proc
                ring, ident, path = str(address["ring"]), [int(x) for x in address["ring_id"]], ""
            else:                   # (elsewhere, and receivers of before the nameless ring) a name
                ring, ident, path = "", None, str(address["path"])
            name = str(address.get("channel") or os.path.basename(path))
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"cannot open shm channel {address!r:.160}: bad address ({e!r})") from e
        fd = _open_ring(ring, ident, path, name, size)
        try:
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        owns = zctx is None
        zctx = zctx or zmq.asyncio.Context()
        ctrl = zctx.socket(zmq.PAIR)
        ctrl.setsockopt(zmq.LINGER, 1000)
        watch = PeerWatch(ctrl, f"shm channel {name}")
        ctrl.connect(ctrl_ep)
        await ctrl.send(_HELLO)
        self = cls(mm, name, size, ctrl, zctx, owns, False, dict(address))
        self._watch = watch
        return self

    # --- sending ---------------------------------------------------------------------------

    async def _alloc(self, nbytes: int) -> tuple[int, int]:
        """A contiguous region of `nbytes`: (offset, ring bytes used including the skipped end)."""
        n = -(-nbytes // _ALIGN) * _ALIGN
        pos = self._head % self._size
        used = n + (self._size - pos if pos + n > self._size else 0)   # skip the end: wrap
        # free when nothing is held, or when what is held is at least one lap behind the region
        while self._tail != self._head and self._head + used - self._tail > self._size:
            assert self._watch is not None   # a sender's
            msg = await self._watch.recv()   # ActorClosed once the receiver has closed
            if msg[:1] != _FREE:
                raise ProtocolError(f"shm sender got control message {msg[:1]!r}")
            self._tail = max(self._tail, _FREE_FMT.unpack_from(msg, 1)[0])
        offset = (self._head + used - n) % self._size
        self._head += used
        return offset, used

    async def send(self, *tensors: torch.Tensor) -> None:
        if self._closed:
            raise ActorClosed("shm transport is closed")
        if self._watch is not None:
            self._watch.check()
        tensors = tuple(t if t.is_contiguous() else t.contiguous() for t in tensors)
        header = _HEAD + tensor_header(tensors)
        async with self._lock:
            await self._ctrl.send(header)
            chunk = max(_ALIGN, self._size // 4 // _ALIGN * _ALIGN)
            for t in tensors:
                src = byte_view(t)
                if not src.nbytes:
                    continue
                step = src.nbytes if src.nbytes <= self._size else chunk   # else: streamed
                for pos in range(0, src.nbytes, step):
                    part = src[pos:pos + step]
                    offset, used = await self._alloc(part.nbytes)
                    np.copyto(self._ring[offset:offset + part.nbytes], part)
                    await self._ctrl.send(_REGION + _REGION_FMT.pack(offset, part.nbytes, used))

    # --- receiving -------------------------------------------------------------------------

    async def _next(self) -> bytes:
        watch = self._watch
        assert watch is not None
        while True:
            msg = await watch.recv()   # ActorClosed once the sender has gone and sent all
            if msg != _HELLO:
                return msg
            if watch.seen:   # a second sender: the first is gone, all it sent has been read
                raise watch.sender_replaced(now=True)
            watch.sender_seen()
            self._let_go(closing=False)   # the sender has mapped the ring: no other may open it

    async def _region(self, max_bytes: int) -> tuple[int, int, _Region]:
        msg = await self._next()
        if msg[:1] != _REGION or len(msg) != 1 + _REGION_FMT.size:
            raise ProtocolError(f"shm receiver expected a region notice, got {msg[:1]!r}")
        offset, nbytes, used = _REGION_FMT.unpack_from(msg, 1)
        if offset + nbytes > self._size or nbytes > max_bytes or not \
                nbytes <= used < nbytes + self._size + _ALIGN:
            raise ProtocolError(f"bad shm region: {nbytes} bytes at {offset} (ring "
                                f"{self._size}, expected at most {max_bytes})")
        region = _Region(used)
        self._regions.append(region)
        return offset, nbytes, region

    def _release(self, region: _Region) -> None:
        if self._closed or region.released:
            return
        region.released = True
        tail = self._tail
        while self._regions and self._regions[0].released:
            tail += self._regions.popleft().used
        if tail != self._tail:
            self._tail = tail
            self._ctrl.send(_FREE + _FREE_FMT.pack(tail))

    def _release_soon(self, region: _Region) -> None:
        # a finalizer: runs in whichever thread dropped the last view of the region
        if self._closed:
            return
        if threading.get_ident() == self._thread:
            self._release(region)
        else:
            try:
                self._loop.call_soon_threadsafe(self._release, region)
            except RuntimeError:   # the loop is gone: so is the channel
                pass

    async def recv(self, into: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        if self._closed:
            raise ActorClosed("shm transport is closed")
        async with self._lock:
            head = await self._next()
            if head[:1] != _HEAD:
                raise ProtocolError(f"shm receiver expected a header, got {head[:1]!r}")
            specs = parse_tensor_header(memoryview(head)[1:])
            bad = None
            if into is not None:
                try:
                    check_into(into, specs)
                except ProtocolError as e:
                    bad = e   # read (and drop) this send, so that the next one is intact
            out = []
            views = views_fit([s.nbytes for s in specs], self._size, _ALIGN)
            for i, spec in enumerate(specs):
                if bad is not None:
                    await self._copy_out(spec, None)
                elif into is not None:
                    out.append(await self._copy_out(spec, into[i]))
                elif spec.nbytes == 0:
                    out.append(torch.empty(spec.shape, dtype=spec.dtype))
                elif not views:   # streamed through the ring, or the send's views would not fit it at once
                    out.append(await self._copy_out(spec, torch.empty(spec.shape,
                                                                      dtype=spec.dtype)))
                else:   # a view of the ring, given back when garbage-collected
                    offset, nbytes, region = await self._region(spec.nbytes)
                    if nbytes != spec.nbytes:
                        raise ProtocolError(f"region of {nbytes} bytes for a tensor of "
                                            f"{spec.nbytes}")
                    view = self._ring[offset:offset + nbytes]
                    weakref.finalize(view, self._release_soon, region)
                    out.append(torch.frombuffer(view, dtype=spec.dtype).view(spec.shape))
            if bad is not None:
                raise bad
            return out

    async def _copy_out(self, spec, dst: torch.Tensor | None) -> torch.Tensor | None:
        """Copy one tensor's regions into `dst` (None: read and drop them), freeing each."""
        flat = byte_view(dst) if dst is not None and spec.nbytes else None
        pos = 0
        while pos < spec.nbytes:
            offset, nbytes, region = await self._region(spec.nbytes - pos)
            if flat is not None:
                np.copyto(flat[pos:pos + nbytes], self._ring[offset:offset + nbytes])
            self._release(region)
            pos += nbytes
        return dst

    # --- closing ---------------------------------------------------------------------------

    def _let_go(self, *, closing: bool) -> None:
        """(The receiver) drop what a sender opens the ring by: its fd (marked closed when `closing`, for a
        sender that opened it already), or its name."""
        if self._fd >= 0:
            try:
                if closing:
                    mark_closing(self._fd)
            finally:
                os.close(self._fd)
                self._fd = -1
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
            self._let_go(closing=True)
        # received tensors may still view the ring: the mapping goes when the last of them does
        self._ring = None
        self._mm = None
        if self._watch is not None:
            self._watch.close()
        self._ctrl.close()
        if self._owns_ctx:
            self._zctx.term()
        if self._ctl_file:
            try:
                os.unlink(self._ctl_file)
            except FileNotFoundError:
                pass

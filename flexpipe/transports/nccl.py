"""Across-node GPU transport (kind "nccl"): NCCL send/recv over communicators kept in a per-pair pool.

Creating an NCCL communicator takes seconds, which is why the published system avoided NCCL for
reshapes. FlexPipe pays that once: communicators are created per pair of workers, ahead of need,
from a unique id exchanged in ordinary actor messages (`NcclBootstrap`), kept in a `CommPool`, and
reused by every channel of every reshape. A communicator carries one channel at a time (a lease), so
the order of sends and receives on it is that channel's order; the pool grows a second communicator
for a pair only while two channels between the pair are open at once.

Only the lower worker id of a pair starts a creation (it draws the unique id and is rank 0); the
other asks it to (`NcclPrepare`). Both sides count the communicators of the pair, which every
creation grows on both sides at once, so "make the pair have N" means the same on either side.

A channel: the receiver leases an idle communicator of the pair and publishes its id and a ZeroMQ
control endpoint in its address; the sender leases the same communicator by id. Each send puts the
tensors' dtypes and shapes on the control socket, then `ncclSend`s their bytes on a dedicated stream;
the receiver reads the header, `ncclRecv`s into new (caching-allocator) or given tensors on its
stream, and makes its current stream wait for them. NCCL needs the two ranks on different GPUs.

CuPy is imported lazily: this module imports and registers the kind without CUDA.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import zmq
import zmq.asyncio

from flexpipe.errors import ActorClosed, ConfigError, ProtocolError
from flexpipe.runtime.actor import ActorContext, handles
from flexpipe.runtime.codec import parse_tensor_header, tensor_header
from flexpipe.runtime.messages import ActorRef, message
from flexpipe.transports.base import Transport, check_into, register_transport

__all__ = ["NcclTransport", "CommPool", "Comm", "NcclBootstrap", "NcclJoin", "NcclPrepare", "NcclEnsure",
           "NcclPoolStatus", "available", "unavailable_reason", "pair_key", "uid_to_bytes", "UID_BYTES"]

log = logging.getLogger("flexpipe.nccl")

UID_BYTES = 128          # sizeof(ncclUniqueId)
_NCCL_UINT8 = 1          # ncclUint8: tensors travel as bytes, whatever their dtype


def unavailable_reason() -> str:
    """'' when NCCL communicators can be created in this process, else why not."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA device (a CPU build of torch, or no NVIDIA GPU/driver)"
    try:
        from cupy.cuda import nccl
    except ImportError:
        return ("CuPy (with NCCL) is not installed (pip install cupy-cuda13x, or cupy-cuda12x for a CUDA 12 "
                "torch; or the flexpipe[gpu] extra)")
    except Exception as e:
        return f"CuPy cannot be imported: {type(e).__name__}: {e}"
    if not getattr(nccl, "available", False):
        return "CuPy was built without NCCL support"
    return ""


def available() -> bool:
    """True when NCCL communicators can be created here."""
    return not unavailable_reason()


def pair_key(a: str, b: str) -> tuple[str, str]:
    """The pool key of two workers: sorted, so both sides use the same one; rank 0 is key[0]."""
    if a == b:
        raise ConfigError(f"an NCCL pair needs two different workers, got {a!r} twice")
    return (a, b) if a < b else (b, a)


def uid_to_bytes(uid: Any) -> bytes:
    """A unique id as CuPy returns it (bytes, or a tuple of signed chars in older CuPy) as bytes."""
    if isinstance(uid, (bytes, bytearray)):
        out = bytes(uid)
    else:
        out = bytes(int(x) & 0xFF for x in uid)
    if len(out) != UID_BYTES:
        raise ProtocolError(f"an NCCL unique id has {UID_BYTES} bytes, got {len(out)}")
    return out


def _signed(uid: bytes) -> tuple[int, ...]:
    return tuple(b - 256 if b > 127 else b for b in uid)


def _cupy_uid() -> bytes:
    from cupy.cuda import nccl
    return uid_to_bytes(nccl.get_unique_id())


def _cupy_comm(device: int, nranks: int, uid: bytes, rank: int) -> Any:
    """ncclCommInitRank on `device` (blocks until every rank has joined)."""
    import cupy
    from cupy.cuda import nccl
    with cupy.cuda.Device(device):
        try:
            return nccl.NcclCommunicator(nranks, uid, rank)          # CuPy >= 13: bytes
        except TypeError:
            return nccl.NcclCommunicator(nranks, _signed(uid), rank)  # older CuPy: a tuple


# --- the pool (bookkeeping only; tested on CPU with a fake factory) ---------------------------------

@dataclass(eq=False)
class Comm:
    """One communicator of a worker pair, as this side holds it."""

    key: tuple[str, str]
    uid: bytes
    rank: int
    comm: Any
    init_s: float = 0.0
    leased: str = ""          # what holds it now ("" = idle)
    leases: int = 0           # how many channels used it so far
    created_at: float = field(default_factory=time.time)

    @property
    def peer_rank(self) -> int:
        return 1 - self.rank


class CommPool:
    """This worker's communicators, per pair of workers; created once, leased to one channel at a time.

    `factory(device, nranks, uid, rank)` makes a communicator (ncclCommInitRank through CuPy by
    default; it blocks until the peer joins, so `create` runs it in a thread); `uid_fn()` draws a
    unique id. Tests pass fakes.
    """

    def __init__(self, worker: str, device: int = 0, factory: Callable[..., Any] | None = None,
                 uid_fn: Callable[[], bytes] | None = None):
        self.worker = worker
        self.device = device
        self._factory = factory or _cupy_comm
        self._uid_fn = uid_fn or _cupy_uid
        self._comms: dict[tuple[str, str], list[Comm]] = collections.defaultdict(list)
        self._lock = threading.Lock()
        self.stats: collections.Counter[str] = collections.Counter()
        self.closed = False

    def key(self, peer: str) -> tuple[str, str]:
        return pair_key(self.worker, peer)

    def rank_with(self, peer: str) -> int:
        """This worker's rank in communicators with `peer` (0 for the lower worker id)."""
        return 0 if self.key(peer)[0] == self.worker else 1

    def new_uid(self) -> bytes:
        return uid_to_bytes(self._uid_fn())

    async def create(self, peer: str, uid: bytes) -> Comm:
        """Join the communicator `uid` with `peer` (both sides must call this) and pool it."""
        if self.closed:
            raise ActorClosed(f"the NCCL pool of {self.worker} is closed")
        uid = uid_to_bytes(uid)
        key, rank = self.key(peer), self.rank_with(peer)
        if any(c.uid == uid for c in self._comms.get(key, ())):
            raise ConfigError(f"communicator {uid[:6].hex()}.. with {peer} exists already")
        t0 = time.perf_counter()
        comm = await asyncio.to_thread(self._factory, self.device, 2, uid, rank)
        c = Comm(key, uid, rank, comm, init_s=time.perf_counter() - t0)
        with self._lock:
            if self.closed:   # closed while we waited: do not leak it
                _destroy(comm)
                raise ActorClosed(f"the NCCL pool of {self.worker} closed during a creation")
            self._comms[key].append(c)
        self.stats["created"] += 1
        self.stats["init_ms"] += int(c.init_s * 1e3)
        return c

    def total(self, peer: str) -> int:
        """Communicators this worker holds with `peer`, leased or not."""
        return len(self._comms.get(self.key(peer), ()))

    def idle(self, peer: str) -> int:
        """Communicators with `peer` that no channel holds."""
        return sum(1 for c in self._comms.get(self.key(peer), ()) if not c.leased)

    def lease(self, peer: str, holder: str) -> Comm | None:
        """An idle communicator with `peer`, now held by `holder`; None when all are held."""
        with self._lock:
            for c in self._comms.get(self.key(peer), ()):
                if not c.leased:
                    return self._take(c, holder)
        return None

    def lease_uid(self, uid: bytes, holder: str) -> Comm:
        """The communicator `uid` (the other end of a channel chose it), now held by `holder`."""
        uid = uid_to_bytes(uid)
        with self._lock:
            for comms in self._comms.values():
                for c in comms:
                    if c.uid == uid:
                        if c.leased:
                            raise ConfigError(f"communicator {uid[:6].hex()}.. is held by {c.leased!r}; "
                                              f"close that channel first")
                        return self._take(c, holder)
        raise ConfigError(f"no communicator {uid[:6].hex()}.. in the pool of {self.worker}: "
                          "create it first (NcclBootstrap.ensure)")

    def _take(self, c: Comm, holder: str) -> Comm:
        c.leased = holder or "?"
        c.leases += 1
        self.stats["leases"] += 1
        if c.leases > 1:
            self.stats["reused"] += 1
        return c

    def give_back(self, c: Comm) -> None:
        """A channel is done with `c`: it stays in the pool for the next one."""
        with self._lock:
            if not c.leased:
                raise ConfigError(f"communicator {c.uid[:6].hex()}.. is not leased")
            c.leased = ""

    def discard(self, c: Comm) -> None:
        """Drop a communicator that failed (aborted, not pooled again)."""
        with self._lock:
            comms = self._comms.get(c.key, [])
            if c in comms:
                comms.remove(c)
        _destroy(c.comm, abort=True)
        self.stats["discarded"] += 1

    def close(self) -> int:
        """Destroy every communicator (worker shutdown); returns how many."""
        with self._lock:
            self.closed = True
            comms = [c for cs in self._comms.values() for c in cs]
            self._comms.clear()
        for c in comms:
            _destroy(c.comm)
        return len(comms)

    def status(self) -> dict:
        """Per peer: total, idle, leases so far; and the counters."""
        return {"worker": self.worker, "stats": dict(self.stats),
                "pairs": {k[1] if k[0] == self.worker else k[0]: {
                    "total": len(cs), "idle": sum(1 for c in cs if not c.leased),
                    "leases": sum(c.leases for c in cs), "uids": [c.uid.hex()[:12] for c in cs]}
                    for k, cs in self._comms.items()}}


def _destroy(comm: Any, abort: bool = False) -> None:
    fn = getattr(comm, "abort" if abort else "destroy", None) or getattr(comm, "destroy", None)
    if fn is not None:
        try:
            fn()
        except Exception as e:   # a broken communicator must not stop the others from closing
            log.warning("destroying an NCCL communicator failed: %s: %s", type(e).__name__, e)


# --- the unique-id exchange over actor messages (kinds 410-419) --------------------------------------

@message(410)
class NcclJoin:
    """Rank 0 -> rank 1: join communicator `uid` with `worker` (the reply comes once joined)."""
    worker: str
    uid: bytes


@message(411)
class NcclPrepare:
    """Higher worker id -> lower: have at least `total` communicators with `worker` (at `reply_to`)."""
    worker: str
    total: int
    reply_to: ActorRef


@message(412)
class NcclEnsure:
    """Ask a bootstrap actor to hold `idle` idle communicators with `worker` (at `ref`); reply: status."""
    worker: str
    ref: ActorRef
    idle: int = 1


@message(413)
class NcclPoolStatus:
    """Ask for the pool's status dict."""


class NcclBootstrap:
    """Behaviour (or part of one) that creates this worker's communicators with peer workers.

    Handlers run concurrently: a creation blocks both sides until both have joined, and each side's
    mailbox must stay free to answer the other meanwhile.
    """

    def __init__(self, worker: str, device: int = 0, factory: Callable[..., Any] | None = None,
                 uid_fn: Callable[[], bytes] | None = None, join_timeout: float = 120.0):
        self.pool = CommPool(worker, device, factory, uid_fn)
        self.join_timeout = join_timeout
        self._locks: dict[tuple[str, str], asyncio.Lock] = collections.defaultdict(asyncio.Lock)

    async def on_stop(self, ctx: ActorContext) -> None:
        self.pool.close()

    async def ensure(self, ctx: ActorContext, peer: ActorRef, worker: str, idle: int = 1) -> None:
        """Create communicators with `worker` (its bootstrap at `peer`) until `idle` are not leased."""
        missing = idle - self.pool.idle(worker)
        if missing <= 0:
            self.pool.stats["hits"] += 1
            return
        total = self.pool.total(worker) + missing
        if self.pool.rank_with(worker) == 0:
            await self._grow(ctx, peer, worker, total)
        else:
            await ctx.ask(peer, NcclPrepare(self.pool.worker, total, ctx.self_ref), timeout=self.join_timeout)

    async def _grow(self, ctx: ActorContext, peer: ActorRef, worker: str, total: int) -> None:
        """Rank 0's side: one creation at a time per pair, until the pair has `total`."""
        async with self._locks[self.pool.key(worker)]:
            while self.pool.total(worker) < total:
                uid = self.pool.new_uid()
                mine = asyncio.ensure_future(self.pool.create(worker, uid))
                try:
                    await ctx.ask(peer, NcclJoin(self.pool.worker, uid), timeout=self.join_timeout)
                except BaseException:
                    # the peer will not join: our side's init cannot be interrupted, only abandoned
                    mine.add_done_callback(_abandon(self.pool))
                    raise
                await mine

    @handles(NcclPrepare, concurrent=True)
    async def prepare(self, ctx: ActorContext, msg: NcclPrepare) -> int:
        if self.pool.rank_with(msg.worker) != 0:
            raise ConfigError(f"{self.pool.worker} is not rank 0 with {msg.worker}: it must start creations")
        await self._grow(ctx, msg.reply_to, msg.worker, int(msg.total))
        return self.pool.total(msg.worker)

    @handles(NcclJoin, concurrent=True)
    async def join(self, ctx: ActorContext, msg: NcclJoin) -> str:
        if self.pool.rank_with(msg.worker) != 1:
            raise ConfigError(f"{self.pool.worker} got a join from {msg.worker} but is rank 0 of the pair")
        c = await self.pool.create(msg.worker, msg.uid)
        return c.uid.hex()[:12]

    @handles(NcclEnsure, concurrent=True)
    async def ensure_msg(self, ctx: ActorContext, msg: NcclEnsure) -> dict:
        await self.ensure(ctx, msg.ref, msg.worker, int(msg.idle))
        return self.pool.status()

    @handles(NcclPoolStatus)
    def status(self, ctx: ActorContext, msg: NcclPoolStatus) -> dict:
        return self.pool.status()


def _abandon(pool: CommPool) -> Callable[[asyncio.Future], None]:
    def done(fut: asyncio.Future) -> None:
        if not fut.cancelled() and fut.exception() is None:
            pool.discard(fut.result())
    return done


# --- the channel --------------------------------------------------------------------------------------

_holders = itertools.count(1)


class NcclTransport(Transport):
    """One direction of a channel over a pooled communicator; the control socket carries headers."""

    kind = "nccl"

    def __init__(self, pool: CommPool, comm: Comm, sock: zmq.asyncio.Socket, zctx: zmq.asyncio.Context,
                 owns_ctx: bool, address: dict, device: int, fence: bool = True):
        self.address = address
        self._pool = pool
        self._comm = comm
        self._sock = sock
        self._zctx = zctx
        self._owns_ctx = owns_ctx
        self._dev = device
        self._fence = fence
        self._stream = torch.cuda.Stream(device)
        self._lock = asyncio.Lock()
        self._closed = False

    @classmethod
    async def listen(cls, *, pool: CommPool, peer: str, device: Any = None, host: str = "127.0.0.1",
                     zctx: zmq.asyncio.Context | None = None) -> "NcclTransport":
        """Lease an idle communicator with worker `peer` and bind the control socket; the receiving side."""
        _require()
        comm = pool.lease(peer, f"rx{next(_holders)}")
        if comm is None:
            raise ConfigError(f"no idle NCCL communicator between {pool.worker} and {peer}: "
                              "NcclBootstrap.ensure() it before opening a channel")
        owns = zctx is None
        zctx = zctx or zmq.asyncio.Context()
        sock = zctx.socket(zmq.PAIR)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(f"tcp://{host}:*")
        except zmq.ZMQError:
            sock.close(0)
            pool.give_back(comm)
            if owns:
                zctx.term()
            raise
        endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        dev = _device(device, pool.device)
        address = {"kind": "nccl", "ctrl": endpoint, "worker": pool.worker, "uid": comm.uid, "pid": os.getpid()}
        return cls(pool, comm, sock, zctx, owns, address, dev)

    @classmethod
    async def connect(cls, address: dict, *, pool: CommPool, device: Any = None, fence: bool = True,
                      zctx: zmq.asyncio.Context | None = None) -> "NcclTransport":
        """Lease the communicator the receiver chose and connect its control socket; the sending side."""
        _require()
        try:
            endpoint, uid = str(address["ctrl"]), uid_to_bytes(address["uid"])
        except (KeyError, TypeError) as e:
            raise ProtocolError(f"bad nccl address {address!r:.160}: {e}") from e
        comm = pool.lease_uid(uid, f"tx{next(_holders)}")
        owns = zctx is None
        zctx = zctx or zmq.asyncio.Context()
        sock = zctx.socket(zmq.PAIR)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.connect(endpoint)
        return cls(pool, comm, sock, zctx, owns, dict(address), _device(device, pool.device), fence)

    async def send(self, *tensors: torch.Tensor) -> None:
        if self._closed:
            raise ActorClosed("nccl transport is closed")
        ts = []
        for t in tensors:
            if not t.is_cuda or t.device.index != self._dev:
                raise ProtocolError(f"this nccl sender carries tensors of cuda:{self._dev}; got one on {t.device}")
            ts.append(t if t.is_contiguous() else t.contiguous())
        async with self._lock:
            await self._sock.send(tensor_header(ts))
            producer = torch.cuda.current_stream(self._dev)
            self._stream.wait_stream(producer)
            self._p2p("send", [t for t in ts if t.numel()])
            for t in ts:
                t.record_stream(self._stream)
            if self._fence:
                producer.wait_stream(self._stream)

    def _p2p(self, op: str, ts: Sequence[torch.Tensor]) -> None:
        if not ts:
            return
        from cupy.cuda import nccl
        comm, peer, stream = self._comm.comm, self._comm.peer_rank, self._stream.cuda_stream
        with torch.cuda.device(self._dev):   # the communicator's device, whichever thread calls
            nccl.groupStart()
            try:
                for t in ts:
                    getattr(comm, op)(t.data_ptr(), t.numel() * t.element_size(), _NCCL_UINT8, peer, stream)
            finally:
                nccl.groupEnd()

    async def recv(self, into: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        if self._closed:
            raise ActorClosed("nccl transport is closed")
        async with self._lock:
            try:
                specs = parse_tensor_header(await self._sock.recv())
            except zmq.ZMQError as e:
                raise ActorClosed(f"nccl transport closed: {e}") from None
            dev = torch.device("cuda", self._dev)
            bad = None
            if into is not None:
                try:
                    check_into(into, specs)
                    if any(not t.is_cuda for t in into):
                        raise ProtocolError("nccl `into` tensors must be CUDA tensors")
                except ProtocolError as e:
                    bad = e
            if bad is not None or into is None:   # a bad `into` still receives, so the channel stays in step
                out = [torch.empty(s.shape, dtype=s.dtype, device=dev) for s in specs]
            else:
                out = list(into)
            current = torch.cuda.current_stream(self._dev)
            self._stream.wait_stream(current)   # `into` (or the new tensors) are free to overwrite
            self._p2p("recv", [t for t in out if t.numel()])
            current.wait_stream(self._stream)
            if bad is not None:
                raise bad
            return out

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._stream.synchronize)
        self._pool.give_back(self._comm)   # the communicator stays for the next channel
        self._sock.close()
        if self._owns_ctx:
            self._zctx.term()


def _require() -> None:
    reason = unavailable_reason()
    if reason:
        raise ConfigError(f"transport 'nccl' is not available: {reason}")


def _device(device: Any, default: int) -> int:
    if device is None:
        return default
    if isinstance(device, int):
        return device
    d = torch.device(device)
    if d.type != "cuda":
        raise ConfigError(f"nccl needs a CUDA device, got {device!r}")
    return d.index or 0


register_transport("nccl", NcclTransport.listen, NcclTransport.connect)

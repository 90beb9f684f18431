"""Actors: a behaviour (a plain class with `@handles` methods) behind a ZeroMQ mailbox.

A behaviour holds no sockets::

    class Echo:
        async def on_start(self, ctx): ...              # optional
        @handles(EchoRequest)
        async def echo(self, ctx, msg, *tensors):       # the return value is the reply to an ask
            return EchoReply(msg.text)
        @handles(Terminated)
        def peer_gone(self, ctx, msg): ...              # after ctx.watch(ref)
        async def on_stop(self, ctx): ...               # optional
        def check_sender(self, sender, msg): ...        # optional: a reason to refuse msg, or None

`Actor` puts it behind one ROUTER socket (its mailbox, at `ref.endpoint`) and one DEALER per peer
it sends to, so messages between a pair keep their order. Replies travel on the replier's DEALER to
the asker's ROUTER, so replies and tells from one peer are ordered too. The asker's identity on the
wire is its own ref, which is how the replier knows where to answer. Tests and the simulator drive
a behaviour with `LocalContext` (runtime/behaviour.py, with `handles` and `ActorContext`) instead:
plain method calls, no sockets.

Handlers run one at a time, in mailbox order (unless `@handles(..., concurrent=True)`). An idle
actor runs a handler at once, inside the reader callback of its mailbox socket; an async one runs
there up to its first real suspension (most pipeline steps never suspend), and while it is suspended
the actor counts as busy, so later messages wait in the mailbox for the worker task.

`check_sender(sender, msg)` runs just before a handler would (in mailbox order, so it sees the state
earlier messages left): a string refuses the message with `SenderRefused` (counted, logged, an
ErrorReply to an ask) and no handler runs. The sender is the ref the peer's DEALER announces: it tells
a confused or foreign peer from the expected one, but a peer that can connect (inside the CURVE
boundary, runtime/keys.py) can announce any ref.

`watch(ref)` sends `Watch` and pings `ref` every heartbeat_interval.  A watcher's ping carries a
negative seq, and the watched actor answers it with `ErrorReply(WATCH_LOST)` when it holds no watch
from that sender: it restarted at the same endpoint (a new process knows no watcher), or it declared
the watcher dead (late heartbeats) and dropped it.  The watcher treats that answer as the peer's
death, so both sides agree again instead of one of them waiting for messages the other will never
send.  A plain `Ping` (seq >= 0) is always answered with `Pong`.

Size: no message above `max_message_bytes` goes out, and no frame above it comes in.  The sender checks
first: tell() and ask() raise `MessageTooLarge` (naming the size, the limit and the setting) and send
nothing, and a reply too large becomes an ErrorReply that the asker raises as `MessageTooLarge` at
once.  A reply is held to the asker's limit too: its DEALER announces it (the ZMTP property
X-FP-Max-Message-Bytes, read from the ask's first frame), so that actors of different settings still
refuse in words.  A tell or ask above a receiver's smaller limit is cut off (give every actor the
same one), unless the sender knows that limit: a peer's entry in `send_limits` (what it told, as a
router daemon does in its Hello reply) holds tell() and ask() to it as well.  Then each socket sets
ZeroMQ's MAXMSGSIZE to the limit, which ZeroMQ applies per frame, as it reads the frame's size and
before it allocates: a peer that sends the mailbox a larger frame is cut off (that message and what
it had written behind it are lost; its DEALER reconnects), and nothing of it reaches the actor,
which cannot tell it from a peer that went away and has nothing to answer.  A peer that sends
anything to one of our DEALERs breaks the protocol (replies come back through mailboxes): above the
limit, ZeroMQ cuts that connection for good (a connecting socket does not reconnect after a protocol
error).  A message of several frames, each within the limit, whose sum is above it is still received
whole and refused after (counted as "oversize", an ErrorReply to an ask): ZeroMQ limits frames, not
messages.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import itertools
import secrets
import logging
import os
import sys
from typing import Any, Callable, Collection, NamedTuple

import msgpack
import numpy as np
import zmq
import zmq.asyncio

from flexpipe.errors import (
    ActorClosed, AskTimeout, ConfigError, MessageTooLarge, PeerDeadError, ProtocolError, RemoteError,
)
from flexpipe.runtime import codec, keys
from flexpipe.runtime.behaviour import ActorContext, LocalContext, _call, _error_text, _Handler, handlers_of, handles
from flexpipe.runtime.codec import ASK, ERROR, REPLY
from flexpipe.runtime.messages import (
    ActorRef, ErrorReply, Ping, Pong, Started, Stop, Terminated, Unwatch, Watch, message,
)

__all__ = ["ActorSettings", "handles", "ActorContext", "LocalContext", "Actor", "handlers_of"]

log = logging.getLogger("flexpipe.actor")

# The smallest max_message_bytes: control messages (Watch, Terminated, an ErrorReply's text) must fit.
# No message at most this big is checked against a limit.
_MIN_MESSAGE_BYTES = 1024


@message(10)
class ActorSettings:
    """Runtime settings of the actors of one process (msgpack-able, so children inherit them)."""
    heartbeat_interval: float = 0.5    # seconds between pings to each watched actor
    heartbeat_timeout: float = 2.0     # a watched actor silent this long is declared dead
    ask_timeout: float = 30.0          # default timeout of ask()
    max_message_bytes: int = 1 << 30   # larger messages are not sent (MessageTooLarge) nor taken (module doc)
    inline_tensor_bytes: int = codec.INLINE_MAX
    linger_ms: int = 200               # how long close() lets queued outgoing messages drain
    bind: str = "ipc"                  # "ipc" (a temp dir) or "tcp"
    host: str = "127.0.0.1"            # tcp bind address
    endpoint_dir: str = ""             # ipc dir; "" = a fresh temp dir per ActorSystem
    compute_threads: int = 1           # worker threads per actor for run_compute
    torch_threads: int = 0             # torch intra-op threads in launched processes; 0 = default
    rt_priority: int = 0               # SCHED_RR priority of launched processes (runtime/sched.py); 0 = off
    start_timeout: float = 60.0        # how long launch() waits for Started
    term_grace: float = 5.0            # a launched process's SIGTERM waits this long for its parent to stop it
    # CURVE on tcp endpoints (see runtime/keys.py); all "" = plain tcp
    curve_server_secret: str = ""      # .key_secret file every tcp mailbox presents
    curve_server_public: str = ""      # .key file DEALERs expect ("" = from curve_server_secret)
    curve_client_secret: str = ""      # .key_secret file DEALERs present ("" = the server's)
    curve_authorized: str = ""         # .key file or directory of client public keys admitted
    max_peers: int = 1024              # connections (DEALERs) to peers past which those neither watched nor
    #                                    awaited are closed (a peer asking under ever new refs grew them)

    def __post_init__(self) -> None:
        # a Pong has heartbeat_timeout - heartbeat_interval to come back: none at all would declare every
        # watched peer dead at its first ping
        if not 0 < self.heartbeat_interval < self.heartbeat_timeout:
            raise ConfigError(f"heartbeat_interval={self.heartbeat_interval!r}, heartbeat_timeout="
                              f"{self.heartbeat_timeout!r}: give an interval above 0 and below the timeout")
        if not self.term_grace >= 0:
            raise ConfigError(f"term_grace={self.term_grace!r}: give seconds >= 0")
        if isinstance(self.max_peers, bool) or not isinstance(self.max_peers, int) or self.max_peers < 1:
            raise ConfigError(f"max_peers={self.max_peers!r}: give a whole number >= 1")
        # (ZeroMQ reads MAXMSGSIZE -1 as no limit, 0 as none but empty frames: neither is meant here)
        if isinstance(self.max_message_bytes, bool) or not isinstance(self.max_message_bytes, int) \
                or self.max_message_bytes < _MIN_MESSAGE_BYTES:
            raise ConfigError(f"max_message_bytes={self.max_message_bytes!r}: give a whole number of bytes "
                              f">= {_MIN_MESSAGE_BYTES}")


def _is_ref(x: Any) -> bool:
    return isinstance(x, ActorRef) and isinstance(x.name, str) and isinstance(x.endpoint, str)


def ident_of(ref: ActorRef) -> bytes:
    """The ZeroMQ routing id an actor's DEALERs announce: its own ref, msgpack-encoded."""
    return msgpack.packb([ref.name, ref.endpoint])


# Tensor frames smaller than this are copied into the message: a zero-copy frame costs pyzmq a
# registration and, once sent, a wakeup of its garbage-collector thread (which takes the GIL),
# dearer than copying ~100 KiB (measured: a 64 KiB activation ask is ~25us faster copied).
_COPY_BELOW = 128 << 10

_SYSTEM_MESSAGES = frozenset({Ping, Terminated, Watch, Unwatch, Started, Stop})

# ErrorReply kind of a watcher's ping that the watched actor holds no Watch from (module docstring)
WATCH_LOST = "WatchLost"

# ErrorReply kind sent in place of a reply above max_message_bytes; the asker raises MessageTooLarge
REPLY_TOO_LARGE = "ReplyTooLarge"

# ZMTP property by which an actor's DEALERs announce its max_message_bytes (the limit of its replies)
_LIMIT_PROPERTY = "X-FP-Max-Message-Bytes"

# A CURVE frame carries its payload in a MESSAGE command 33 bytes longer ("\x07MESSAGE", nonce, MAC,
# flags), and MAXMSGSIZE applies to that: without these bytes a frame near the limit would be cut.
_CURVE_FRAME_OVERHEAD = 33


def _limit_frames(sock: zmq.Socket, max_bytes: int) -> None:
    """Have ZeroMQ cut off a peer that sends `sock` a frame above `max_bytes`, before buffering it.
    Set after the CURVE options, before bind/connect (it applies to connections made later)."""
    if sock.getsockopt(zmq.MECHANISM) == zmq.CURVE:
        max_bytes += _CURVE_FRAME_OVERHEAD
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)


def _announced_limit(head: Any) -> int | None:
    """The max_message_bytes an asker's DEALER announced on the connection `head` (a frame) came by."""
    try:
        value = head.get(_LIMIT_PROPERTY)
    except (zmq.ZMQError, AttributeError, TypeError):   # not announced (a plain DEALER, an older actor)
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


_EAGER_TASKS = sys.version_info >= (3, 12)


class _Resumed:
    """Python 3.11 has no eager tasks: awaiting this finishes a coroutine that was started by hand
    (coro.send(None)) and suspended on `fut`.  The awaiting task waits for what the coroutine waits
    for, then drives it on, and throws in what the task is thrown (its cancellation)."""
    __slots__ = ("coro", "fut", "started")

    def __init__(self, coro: Any, fut: Any):
        self.coro, self.fut = coro, fut
        self.started = False   # a task cancelled before its first step never runs __await__

    def __await__(self) -> Any:
        self.started = True
        coro, fut = self.coro, self.fut
        while True:
            try:
                yield fut   # still marked blocking by the Future.__await__ that yielded it
            except BaseException as e:   # noqa: B036 - the awaiting task's cancellation goes in
                step = coro.throw
                arg: Any = e
            else:
                step, arg = coro.send, None
            try:
                fut = step(arg)
            except StopIteration as stop:
                return stop.value

    async def run(self) -> Any:
        return await self


class _Outbox:
    """One DEALER to a peer: a message goes out at once when the socket takes it, else it waits,
    in order, until the socket is writable again (ZeroMQ's high-water mark)."""
    __slots__ = ("sock", "loop", "backlog", "watching")

    def __init__(self, sock: zmq.Socket, loop: asyncio.AbstractEventLoop):
        self.sock = sock
        self.loop = loop
        self.backlog: collections.deque[tuple[list, asyncio.Future]] = collections.deque()
        self.watching = False

    def send(self, frames: list) -> asyncio.Future | None:
        """Send now (returns None) or queue (returns a future set once sent)."""
        if not self.backlog:
            try:
                self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
                return None
            except zmq.Again:
                pass
        fut = self.loop.create_future()
        self.backlog.append((frames, fut))
        if not self.watching:
            self.loop.add_reader(self.sock.FD, self.flush)
            self.watching = True
        self.loop.call_soon(self.flush)   # the fd is edge-triggered: the edge may have passed
        return fut

    def flush(self) -> None:
        while self.backlog and not self.sock.closed:
            frames, fut = self.backlog[0]
            if not fut.done():   # (a cancelled send is not sent)
                try:
                    self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    return
                except zmq.ZMQError as e:
                    fut.set_exception(e)
                else:
                    fut.set_result(None)
            self.backlog.popleft()
        if self.watching:
            self.loop.remove_reader(self.sock.FD)
            self.watching = False

    def close(self, linger: int, error: BaseException) -> None:
        """Close the socket; queued sends fail with `error`."""
        if self.watching:
            self.loop.remove_reader(self.sock.FD)
            self.watching = False
        for _, fut in self.backlog:
            if not fut.done():
                fut.set_exception(error)
        self.backlog.clear()
        self.sock.close(linger=linger)


class _Job(NamedTuple):
    handler: _Handler
    msg: Any
    tensors: list
    flags: int
    corr: int
    ident: bytes
    sender: ActorRef | None
    head: Any = None   # the message's first frame (a zmq.Frame): what its connection announced


class Actor(ActorContext):
    """A behaviour behind a ZeroMQ ROUTER mailbox; it is also the ActorContext its handlers get.

    Created by `ActorSystem.spawn` (or the launcher); `start()` binds and serves, `aclose()` stops.
    """

    def __init__(self, behaviour: Any, name: str, endpoint: str, *,
                 zctx: zmq.asyncio.Context, settings: ActorSettings | None = None):
        self.behaviour = behaviour
        self.name = name
        self.settings = settings or ActorSettings()
        self.stats: collections.Counter[str] = collections.Counter()
        self._endpoint = endpoint
        self._zctx = zctx
        self._handlers = handlers_of(type(behaviour)) if behaviour is not None else {}
        # (sender, msg) -> reason to refuse or None; the behaviour's check_sender by default
        self.check_sender: Callable[[ActorRef | None, Any], str | None] | None = \
            getattr(behaviour, "check_sender", None)
        # peer -> the max_message_bytes its mailbox takes, where it said so (module docstring)
        self.send_limits: dict[ActorRef, int] = {}
        self._router: zmq.Socket | None = None   # plain socket, read from a loop reader callback
        self._dealers: dict[ActorRef, _Outbox] = {}
        self._senders: dict[bytes, ActorRef | None] = {}
        self._pending: dict[int, tuple[asyncio.Future, ActorRef]] = {}
        # asks are told apart by corr alone: a random start keeps a late reply meant for an earlier
        # actor at this endpoint (restarted meanwhile) from completing one of this actor's asks
        self._corr = itertools.count(secrets.randbits(62) + 1)
        self._mailbox: collections.deque[_Job] = collections.deque()
        self._wakeup: asyncio.Future | None = None
        self._tasks: set[asyncio.Task] = set()
        self._monitors: dict[ActorRef, asyncio.Task] = {}
        self._watched: set[ActorRef] = set()
        self._watchers: set[ActorRef] = set()
        self._dropped_watchers: set[ActorRef] = set()   # watchers we declared dead (_declare_dead)
        self._aliases: dict[ActorRef, set[ActorRef]] = {}   # how a peer calls itself -> refs we ask it at
        self._watch_sent: dict[ActorRef, int] = {}   # ref -> stamp of the last Watch sent to it
        self._stamps = itertools.count(1)
        self._dead: dict[ActorRef, str] = {}
        self._started_waiters: dict[str, asyncio.Future] = {}
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._compute_jobs: list[concurrent.futures.Future] = []   # submitted to the executor
        self._ready = False              # on_start has finished: messages may be handled
        self._busy = False               # the worker is inside a handler
        self._closing = False
        self._closer: asyncio.Task | None = None
        self._closed = asyncio.Event()
        self.self_ref = ActorRef(name, endpoint)

    @property
    def ref(self) -> ActorRef:
        """This actor's address."""
        return self.self_ref

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> ActorRef:
        """Bind the mailbox, run on_start, and serve; returns the actor's ref."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        router = zmq.Socket(self._zctx, zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        router.setsockopt(zmq.RCVHWM, 0)
        self._router = router
        try:
            keys.secure_router(router, self._zctx, self.settings, self._endpoint)
            _limit_frames(router, self.settings.max_message_bytes)
            router.bind(self._endpoint)
            endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode()
            self.self_ref = ActorRef(self.name, endpoint)
            self._ident = ident_of(self.self_ref)
            loop.add_reader(router.FD, self._drain)
            if hasattr(self.behaviour, "on_start"):
                await self.behaviour.on_start(self)
        except BaseException:
            await self.aclose("failed to start", notify=False)
            raise
        self._spawn(self._worker())
        log.debug("%s serving at %s", self.name, self.self_ref.endpoint)
        return self.self_ref

    async def wait_closed(self) -> None:
        """Return once the actor has stopped."""
        await self._closed.wait()

    @property
    def closed(self) -> bool:
        """True once aclose() has finished."""
        return self._closed.is_set()

    def stop(self, reason: str = "stopped") -> None:
        if not self._closing and self._closer is None:
            self._closer = asyncio.get_running_loop().create_task(self.aclose(reason))

    async def aclose(self, reason: str = "stopped", *, notify: bool = True) -> None:
        """Stop serving: cancel tasks, run on_stop, tell watchers, close every socket."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        me = asyncio.current_task()
        tasks = [t for t in (*self._tasks, *self._monitors.values()) if t is not me]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._executor is not None:
            # a cancelled handler's run_compute job keeps running in its thread: on_stop must not tear
            # down what it uses (a GPU stage's peer KV pools) under it; queued jobs are dropped
            ex = self._executor
            wait = asyncio.get_running_loop().run_in_executor(
                None, functools.partial(ex.shutdown, wait=True, cancel_futures=True))
            try:
                await asyncio.wait_for(asyncio.shield(wait), self.settings.ask_timeout)
            except asyncio.TimeoutError:
                log.warning("%s: a compute job still runs after %.0f s; closing anyway", self.name,
                            self.settings.ask_timeout)
        if notify and self._router is not None and hasattr(self.behaviour, "on_stop"):
            try:
                await self.behaviour.on_stop(self)
            except Exception as e:
                log.warning("%s: on_stop raised %s", self.name, _error_text(e))
        for fut, ref in self._pending.values():
            if not fut.done():
                fut.set_exception(ActorClosed(f"{self.name} closed ({reason}) while asking {ref}"))
        if notify:
            for w in self._watchers:
                try:
                    fut = self._send_now(w, codec.encode(Terminated(self.self_ref, reason)))
                    if fut is not None:
                        fut.add_done_callback(self._log_send_error)
                except (zmq.ZMQError, PeerDeadError) as e:
                    log.warning("%s: cannot tell watcher %s: %s", self.name, w, e)
        for out in self._dealers.values():
            out.close(self.settings.linger_ms, ActorClosed(f"{self.name} closed ({reason})"))
        self._dealers.clear()
        self._close_router()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._closed.set()
        log.debug("%s closed: %s", self.name, reason)

    def abort(self) -> None:
        """Close every socket at once, without on_stop or telling watchers (simulates a crash)."""
        if self._closing:
            return
        self._closing = True
        for t in (*self._tasks, *self._monitors.values()):
            t.cancel()
        for out in self._dealers.values():
            out.close(0, ActorClosed(f"{self.name} aborted"))
        self._close_router()
        self._dealers.clear()
        for fut, ref in self._pending.values():
            if not fut.done():
                fut.set_exception(ActorClosed(f"{self.name} aborted while asking {ref}"))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._closed.set()

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: internal task failed: %s", self.name, _error_text(task.exception()))

    # --- sending ----------------------------------------------------------------------------

    def _dealer(self, ref: ActorRef) -> _Outbox:
        out = self._dealers.get(ref)
        if out is None:
            # a plain socket: a non-blocking send costs a quarter of zmq.asyncio's
            sock = zmq.Socket(self._zctx, zmq.DEALER)
            try:
                sock.setsockopt(zmq.ROUTING_ID, self._ident)
                sock.setsockopt(zmq.LINGER, self.settings.linger_ms)
                sock.setsockopt(zmq.RCVHWM, 1)   # nothing is ever read from it
                keys.secure_dealer(sock, self.settings, ref.endpoint)
                _limit_frames(sock, self.settings.max_message_bytes)   # (a peer has nothing to send it)
                self._announce_limit(sock)
                sock.connect(ref.endpoint)
            except zmq.ZMQError as e:
                sock.close(linger=0)
                raise PeerDeadError(f"cannot connect to {ref}: {e}") from e
            except BaseException:   # e.g. ConfigError from the CURVE keys
                sock.close(linger=0)
                raise
            if len(self._dealers) >= self.settings.max_peers:
                closed = self.prune_peers(())
                log.warning("%s: %d connections to peers reached max_peers=%d: closed the %d nobody watches or "
                            "awaits", self.name, len(self._dealers) + closed, self.settings.max_peers, closed)
            out = self._dealers[ref] = _Outbox(sock, self._loop)
        return out

    def _announce_limit(self, sock: zmq.Socket) -> None:
        # replies come back above nothing this actor's mailbox takes: the replier checks them against it
        try:
            sock.setsockopt(zmq.METADATA, f"{_LIMIT_PROPERTY}:{self.settings.max_message_bytes}".encode())
        except (zmq.ZMQError, AttributeError):   # libzmq < 4.3: replies are held to the replier's limit only
            pass

    def _send_now(self, ref: ActorRef, frames: list) -> asyncio.Future | None:
        """Send (None) or queue behind the high-water mark (a future set once sent)."""
        fut = self._dealer(ref).send(frames)
        self.stats["sent"] += 1
        return fut

    def _encode(self, msg: Any, tensors: Any, flags: int = 0, corr: int = 0) -> list:
        frames = codec.encode(msg, tensors, flags=flags, corr=corr,
                              inline_max=self.settings.inline_tensor_bytes)
        for i in range(1, len(frames)):
            f = frames[i]
            if isinstance(f, np.ndarray) and f.nbytes < _COPY_BELOW:
                frames[i] = zmq.Frame(f, copy=True)
        return frames

    def _oversize(self, frames: list, theirs: int | None = None, head: Any = None,
                  mine: str = "this actor's") -> str | None:
        """Why `frames` may not be sent: above max_message_bytes (this actor's, or the receiver's when
        smaller: `theirs`, or for a reply to an ask whose first frame is `head`, the asker's); None when
        they fit."""
        size = sum(map(len, frames))   # (each frame is bytes-like of 1-byte items: bytes, uint8 array, Frame)
        if size <= _MIN_MESSAGE_BYTES:
            return None
        limit, whose = self.settings.max_message_bytes, mine
        if head is not None:
            theirs = _announced_limit(head)
        if theirs is not None and theirs < limit:
            limit, whose = theirs, "the asker's" if head is not None else "the receiver's"
        if size <= limit:
            return None
        self.stats["oversize_out"] += 1
        return (f"message of {size} bytes exceeds max_message_bytes={limit} ({whose}): "
                f"{MessageTooLarge.HINT}, the same on every actor (a mailbox cuts off a peer that "
                f"sends a frame above its own), or send less per message")

    def _check_size(self, ref: ActorRef, msg: Any, frames: list) -> None:
        why = self._oversize(frames, self.send_limits.get(ref) if self.send_limits else None)
        if why is not None:
            raise MessageTooLarge(f"{type(msg).__name__} to {ref} not sent: {why}")

    def _check_peer(self, ref: ActorRef) -> None:
        if self._closing:
            raise ActorClosed(f"{self.name} is closed")
        reason = self._dead.get(ref)
        if reason is not None:
            raise PeerDeadError(f"{ref} is dead: {reason}")

    async def tell(self, ref: ActorRef, msg: Any, *tensors: Any) -> None:
        self._check_peer(ref)
        frames = self._encode(msg, tensors)
        self._check_size(ref, msg, frames)
        fut = self._send_now(ref, frames)
        if fut is not None:   # the peer's queue is full: wait (back-pressure)
            await fut

    async def ask(self, ref: ActorRef, msg: Any, *tensors: Any, timeout: float | None = None) -> Any:
        self._check_peer(ref)
        corr = next(self._corr)
        frames = self._encode(msg, tensors, ASK, corr)
        self._check_size(ref, msg, frames)
        fut = self._loop.create_future()
        self._pending[corr] = (fut, ref)
        timeout = self.settings.ask_timeout if timeout is None else timeout
        timer = self._loop.call_later(timeout, self._expire, corr, type(msg).__name__, timeout)
        sent = None
        try:
            sent = self._send_now(ref, frames)
            if sent is not None:
                sent.add_done_callback(functools.partial(self._send_failed, fut, ref))
            return await fut
        finally:
            timer.cancel()
            del self._pending[corr]
            if sent is not None and not sent.done():   # still queued (high-water mark): an ask that timed
                sent.cancel()                          # out or was cancelled is not sent after all

    def _send_failed(self, fut: asyncio.Future, ref: ActorRef, sent: asyncio.Future) -> None:
        if not fut.done() and not sent.cancelled() and sent.exception() is not None:
            fut.set_exception(sent.exception())

    def _expire(self, corr: int, what: str, timeout: float) -> None:
        entry = self._pending.get(corr)
        if entry is not None and not entry[0].done():
            self.stats["ask_timeouts"] += 1
            entry[0].set_exception(AskTimeout(
                f"{self.name}: no reply from {entry[1]} to {what} within {timeout:g}s"))

    def _reply(self, job_ident: bytes, sender: ActorRef | None, corr: int, value: Any,
               error: bool = False, head: Any = None) -> None:
        flags = REPLY | (ERROR if error else 0)
        try:
            frames = self._encode(value, (), flags, corr)
            why = self._oversize(frames, head=head, mine="the replier's")
            if why is not None:   # sent, it would be refused, or cut off with our connection: say so now
                log.warning("%s: reply of type %s to %s not sent: %s", self.name, type(value).__name__,
                            sender or job_ident[:16], why)
                frames = self._encode(ErrorReply(REPLY_TOO_LARGE, why), (), REPLY | ERROR, corr)
        except Exception as e:
            self.stats["reply_errors"] += 1
            log.warning("%s: reply of type %s cannot be encoded: %s", self.name,
                        type(value).__name__, _error_text(e))
            frames = self._encode(ErrorReply(type(e).__name__, f"reply not encodable: {e}"),
                                  (), REPLY | ERROR, corr)
        if self._closing:
            return
        if sender is not None:
            try:
                fut = self._send_now(sender, frames)
            except PeerDeadError as e:   # an identity naming an endpoint that cannot be
                self.stats["reply_errors"] += 1   # reached: nobody to answer
                log.warning("%s: %s", self.name, e)
                return
            if sender in self._dead:
                # Declared dead (its heartbeats were late) yet it asks: it is answered all the same
                # (its DEALER reads nothing, so an answer through the ROUTER was lost and the ask timed
                # out), and the socket opened for it goes again once the reply has left.
                self.stats["replies_to_dead"] += 1
                out = self._dealers.pop(sender, None)
                if out is not None:
                    out.close(self.settings.linger_ms, PeerDeadError(f"{sender} is dead: {self._dead[sender]}"))
                return
        else:  # an anonymous peer (a plain DEALER): answer through the ROUTER
            try:
                self._router.send_multipart([job_ident, *frames], zmq.NOBLOCK, copy=False)
            except zmq.ZMQError as e:
                log.warning("%s: reply to an anonymous peer failed: %s", self.name, e)
            self._loop.call_soon(self._drain)  # the send may have eaten the fd's wakeup
            return
        if fut is not None:
            fut.add_done_callback(self._log_send_error)

    def _log_send_error(self, fut: asyncio.Future) -> None:
        # for sends nobody awaits (replies, Watch, goodbyes): say why one was not delivered
        if not fut.cancelled() and fut.exception() is not None:
            log.info("%s: a message was not sent: %s", self.name, _error_text(fut.exception()))

    # --- receiving --------------------------------------------------------------------------

    def _drain(self, budget: int = 256) -> None:
        # Called by the loop when the mailbox fd is readable. The ZeroMQ fd is edge-triggered:
        # read until EAGAIN, else a message can sit there with no wakeup to come.
        sock = self._router
        if sock is None or sock.closed:
            return
        for _ in range(budget):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                self._dispatch(frames)
            except Exception as e:  # a bug, not bad input: say so loudly and keep serving
                self.stats["internal_errors"] += 1
                log.exception("%s: dispatch failed: %s", self.name, _error_text(e))
            if self._closing:
                return
        self._loop.call_soon(self._drain)  # more to read: let other callbacks run first

    def _close_router(self) -> None:
        if self._router is not None and not self._router.closed:
            self._loop.remove_reader(self._router.FD)
            self._router.close(linger=0)

    def _sender_of(self, ident: bytes) -> ActorRef | None:
        try:
            return self._senders[ident]
        except KeyError:
            pass
        try:
            name, endpoint = msgpack.unpackb(ident)
            ref = ActorRef(name, endpoint) if isinstance(name, str) and \
                isinstance(endpoint, str) else None
        except Exception:
            ref = None
        if len(self._senders) > 4096:
            self._senders.clear()
        self._senders[ident] = ref
        return ref

    def _refuse(self, ident: bytes, frames: list, reason: str, counter: str) -> None:
        """Count and log one bad message; answer with an ErrorReply when its sender asked."""
        self.stats[counter] += 1
        sender = self._sender_of(ident)
        log.warning("%s: refused message from %s: %s", self.name, sender or ident[:16], reason)
        try:
            head = codec.read_header(frames[0]) if frames else None
        except ProtocolError:
            return
        if head is not None and head.flags & REPLY:   # the asker learns now, not at its timeout
            entry = self._pending.get(head.corr)
            if entry is not None and not entry[0].done():
                error = MessageTooLarge if counter == "oversize" else ProtocolError
                entry[0].set_exception(error(f"the reply from {entry[1]} was refused: {reason}"))
            return
        if head is not None and head.flags & ASK:
            self._reply(ident, sender, head.corr, ErrorReply("ProtocolError", reason), error=True)

    def _dispatch(self, frames: list) -> None:
        ident = frames[0].bytes
        frames = frames[1:]
        self.stats["received"] += 1
        size = sum(map(len, frames))
        if size > self.settings.max_message_bytes:
            self._refuse(ident, frames, f"message of {size} bytes exceeds max_message_bytes="
                         f"{self.settings.max_message_bytes}", "oversize")
            return
        try:
            env = codec.decode_envelope(frames)
        except ProtocolError as e:
            self._refuse(ident, frames, str(e), "bad_frames")
            return
        if env.flags & REPLY:
            self._on_reply(env, ident)
            return
        if self._closing:   # on_stop may be running: no handler starts on a half torn-down behaviour
            self.stats["dropped_closing"] += 1
            return
        msg = env.msg
        cls = type(msg)
        if cls in _SYSTEM_MESSAGES:
            self._system_message(ident, env)
            return
        h = self._handlers.get(cls)
        if h is None:
            self._refuse(ident, frames, f"{type(self.behaviour).__name__} has no handler for "
                         f"{cls.__name__}", "unhandled")
            return
        job = _Job(h, msg, env.tensors, env.flags, env.corr, ident, self._sender_of(ident), frames[0])
        if h.concurrent:
            self._spawn(self._run(job))
        elif not self._busy and not self._mailbox and self._ready:
            # nothing to wait for: skip the hop through the worker task (a loop iteration with cold
            # caches, on every pipeline hop; README FP-3)
            if h.is_async:
                self._run_eager(job)
            else:
                self._run_sync(job)
        else:
            self._enqueue(job)

    def _system_message(self, ident: bytes, env: codec.Envelope) -> None:
        msg = env.msg
        cls = type(msg)
        asked = env.flags & ASK
        if cls is Ping:
            if asked:
                sender = self._sender_of(ident)
                if isinstance(msg.seq, int) and msg.seq < 0 and sender not in self._watchers:
                    self._reply(ident, sender, env.corr, ErrorReply(
                        WATCH_LOST, f"{self.self_ref} holds no watch from {sender}: it restarted, or it "
                        f"declared that actor dead"), error=True)
                else:
                    self._reply(ident, sender, env.corr, Pong(msg.seq))
        elif cls is Terminated:
            if self._sender_of(ident) == msg.ref:  # only an actor may announce its own end
                self._declare_dead(msg.ref, str(msg.reason))
                for ref in self._aliases.pop(msg.ref, ()):   # and under the address we reach it at
                    self._declare_dead(ref, str(msg.reason))
        elif cls is Watch:
            if self._sender_of(ident) == msg.watcher:  # and only watch for itself
                self._watchers.add(msg.watcher)
                # a peer declared dead that watches us (again) is alive: it gets a socket of its own
                # again, not one per reply (a reply whose socket is closed before it connected is lost)
                self._dead.pop(msg.watcher, None)
        elif cls is Unwatch:
            if self._sender_of(ident) == msg.watcher:
                self._watchers.discard(msg.watcher)
                self._dropped_watchers.discard(msg.watcher)
        elif cls is Started:
            waiter = self._started_waiters.get(msg.token) if isinstance(msg.token, str) else None
            if waiter is not None and not waiter.done() and _is_ref(msg.ref):
                del self._started_waiters[msg.token]
                waiter.set_result(msg)
        elif cls is Stop:
            if asked:
                self._reply(ident, self._sender_of(ident), env.corr, True)
            self.stop(msg.reason)

    def _on_reply(self, env: codec.Envelope, ident: bytes) -> None:
        entry = self._pending.get(env.corr)
        if entry is None or entry[0].done():
            self.stats["late_replies"] += 1
            return
        sender = self._sender_of(ident)
        if sender is not None and sender != entry[1] and entry[1] is not None:
            # it calls itself by another address than the one we reach it at (it bound a wildcard,
            # tcp://0.0.0.0:P, and we dialled tcp://host:P): its Terminated names that one
            self._aliases.setdefault(sender, set()).add(entry[1])
        if env.flags & ERROR and isinstance(env.msg, ErrorReply):
            if env.msg.kind == REPLY_TOO_LARGE:   # (the replier refused to send it on our behalf)
                entry[0].set_exception(MessageTooLarge(f"the reply from {entry[1]} was refused: {env.msg.message}"))
            else:
                entry[0].set_exception(RemoteError(env.msg.kind, env.msg.message))
        else:
            entry[0].set_result(env.msg)

    def _enqueue(self, job: _Job) -> None:
        self._mailbox.append(job)
        w = self._wakeup
        if w is not None and not w.done():
            w.set_result(None)

    def _run_eager(self, job: _Job) -> None:
        """Run an async handler here, up to its first real suspension; most steps never suspend
        (inline compute, a send the socket takes at once) and finish without a task's loop turn.  One
        that does is finished by a task, and the actor stays busy (later messages queue, in order)
        until then."""
        self._busy = True
        if _EAGER_TASKS:   # Python 3.12+: a real task, started at once (current_task() is set)
            task = asyncio.Task(self._run(job), loop=self._loop, eager_start=True)
            if task.done():
                self._busy = False
                task.result()   # (a BaseException that escaped _run, as below)
                return
            self._tasks.add(task)
            task.add_done_callback(self._eager_done)
            if self._closing:   # it stopped the actor and went on waiting: aclose() cancels no task it
                task.cancel()   # has not seen
            return
        coro = self._run(job)
        try:
            fut = coro.send(None)
        except StopIteration:
            self._busy = False
            return
        except BaseException:
            self._busy = False
            raise
        self._resume(_Resumed(coro, fut))

    def _resume(self, res: _Resumed) -> None:
        task = self._spawn(res.run())
        task.add_done_callback(functools.partial(self._resumed_done, res))
        if self._closing:   # (as above)
            task.cancel()

    def _resumed_done(self, res: _Resumed, task: asyncio.Task) -> None:
        self._eager_done(task)
        if res.started or not task.cancelled():
            return
        # Cancelled before its first step: the handler is still suspended where it was.  It gets its
        # CancelledError now (else garbage collection would close it with GeneratorExit, skipping
        # its async cleanup); cleanup that awaits goes on in a task of its own.
        try:
            fut = res.coro.throw(asyncio.CancelledError())
        except BaseException:   # noqa: B036 - it ended (re-raised the cancellation, or returned)
            return
        self._busy = True
        self._resume(_Resumed(res.coro, fut))

    def _eager_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._busy = False
        w = self._wakeup
        if self._mailbox and w is not None and not w.done():
            w.set_result(None)

    async def _worker(self) -> None:
        box = self._mailbox
        self._ready = True
        while True:
            if not box or self._busy:   # (busy: an eagerly started handler has not finished yet)
                self._wakeup = self._loop.create_future()
                await self._wakeup
                continue
            self._busy = True
            try:
                await self._run(box.popleft())
            finally:
                self._busy = False

    def _refused_sender(self, job: _Job) -> bool:
        """Apply check_sender to a message from the wire; True when it was refused (and answered)."""
        if self.check_sender is None or not job.ident:   # no ident: made here (Terminated)
            return False
        try:
            reason = self.check_sender(job.sender, job.msg)
        except Exception as e:  # a bug in the check: refuse rather than let an unchecked message in
            reason = f"sender check failed: {_error_text(e)}"
        if not reason:
            return False
        self.stats["senders_refused"] += 1
        log.warning("%s: refused %s from %s: %s", self.name, type(job.msg).__name__,
                    job.sender or job.ident[:16], reason)
        if job.flags & ASK:
            self._reply(job.ident, job.sender, job.corr, ErrorReply("SenderRefused", reason), error=True)
        return True

    def _run_sync(self, job: _Job) -> None:
        if self._refused_sender(job):
            return
        try:
            result = job.handler.fn(self.behaviour, self, job.msg, *job.tensors)
        except Exception as e:
            self._handler_failed(job, e)
            return
        self.stats["handled"] += 1
        if job.flags & ASK:
            self._reply(job.ident, job.sender, job.corr, result, head=job.head)

    async def _run(self, job: _Job) -> None:
        if self._refused_sender(job):
            return
        try:
            result = await _call(job.handler, self.behaviour, self, job.msg, job.tensors)
        except asyncio.CancelledError as e:
            task = asyncio.current_task()   # (None while eagerly started from the mailbox's reader)
            if task is not None and task.cancelling():
                raise
            self._handler_failed(job, e)  # something the handler awaited was cancelled
            return
        except Exception as e:
            self._handler_failed(job, e)
            return
        self.stats["handled"] += 1
        if job.flags & ASK:
            self._reply(job.ident, job.sender, job.corr, result, head=job.head)

    def _handler_failed(self, job: _Job, e: BaseException) -> None:
        self.stats["handler_errors"] += 1
        log.warning("%s: handler for %s raised %s", self.name, type(job.msg).__name__,
                    _error_text(e))
        if job.flags & ASK:
            self._reply(job.ident, job.sender, job.corr, ErrorReply(type(e).__name__, str(e)),
                        error=True)

    # --- monitors ---------------------------------------------------------------------------

    def watch(self, ref: ActorRef) -> None:
        if ref == self.self_ref or self._closing:
            return
        self._watched.add(ref)
        if self._dead.pop(ref, None) is not None:
            self._close_dealer(ref)
        if ref in self._dropped_watchers:
            # we declared it dead and dropped its watch of us; it never unwatched: with both sides
            # watching again, its next ping would find no watch, it would declare us dead, and so on
            self._dropped_watchers.discard(ref)
            self._watchers.add(ref)
        if ref not in self._monitors:
            self._monitors[ref] = self._loop.create_task(self._monitor(ref))
        # (again) when watching already: the peer may have dropped our watch (it declared us dead)
        self._watch_sent[ref] = next(self._stamps)
        try:
            fut = self._send_now(ref, self._encode(Watch(self.self_ref), ()))
        except (PeerDeadError, ConfigError):   # no socket to it (e.g. CURVE keys unreadable): the
            return                             # monitor's first ping gives the verdict
        if fut is not None:
            fut.add_done_callback(self._log_send_error)

    def unwatch(self, ref: ActorRef) -> None:
        self._watched.discard(ref)
        self._watch_sent.pop(ref, None)
        task = self._monitors.pop(ref, None)
        if task is not None:
            task.cancel()
            if ref not in self._dead and not self._closing:
                fut = self._send_now(ref, self._encode(Unwatch(self.self_ref), ()))
                if fut is not None:
                    fut.add_done_callback(self._log_send_error)

    async def _monitor(self, ref: ActorRef) -> None:
        interval = self.settings.heartbeat_interval
        timeout = self.settings.heartbeat_timeout
        # Silence is judged in time our own loop was running. When it was blocked (user code on
        # the embedded runtime's loop), Pongs sat unread in the socket while the clock ran: a wait
        # that overran its deadline by more than `slack` starts a fresh deadline instead of a
        # verdict. At most `max_forgiven` times in a row, so a dead peer is still found under a
        # loop that lags all the time.
        loop = self._loop
        slack = min(interval, timeout / 2)
        max_forgiven = 3
        forgiven = 0
        seq = 0
        last = loop.time()
        verdict = f"no heartbeat answer for {timeout:g}s"
        while True:
            remaining = last + timeout - loop.time()
            if remaining <= 0:
                break
            seq += 1
            due = loop.time() + remaining
            stamp = self._watch_sent.get(ref)
            try:
                await self.ask(ref, Ping(-seq), timeout=remaining)   # negative: a watcher's ping
            except AskTimeout:
                if loop.time() - due > slack and forgiven < max_forgiven:
                    forgiven += 1
                    self._loop_stalled(ref, loop.time() - due)
                    last = loop.time()
                    continue
                break
            except ActorClosed:
                return
            except PeerDeadError as e:
                if ref in self._dead or self._closing:   # judged meanwhile (this task is being cancelled)
                    return
                verdict = str(e)   # e.g. its endpoint cannot be connected to: it never will be
                break
            except (zmq.ZMQError, ConfigError) as e:   # a queued ping failed; its socket cannot be made
                verdict = f"cannot send to it: {_error_text(e)}"
                break
            except RemoteError as e:
                # a ping sent before our latest Watch may have found the watch missing: not a verdict
                if e.kind == WATCH_LOST and self._watch_sent.get(ref) == stamp:
                    verdict = f"it lost our watch: {e.message}"
                    break
                # else it answered: alive, if confused
            forgiven = 0
            last = loop.time()
            await asyncio.sleep(interval)
            late = loop.time() - (last + interval)
            if late > slack and forgiven < max_forgiven:
                forgiven += 1
                self._loop_stalled(ref, late)
                last = loop.time()
        self._monitors.pop(ref, None)
        self._declare_dead(ref, verdict)

    def _loop_stalled(self, ref: ActorRef, late: float) -> None:
        self.stats["loop_stalls"] += 1
        log.info("%s: event loop stalled %.2fs while watching %s: pinging again before judging",
                 self.name, late, ref)

    def _close_dealer(self, ref: ActorRef) -> None:
        out = self._dealers.pop(ref, None)
        if out is not None:
            reason = self._dead.get(ref, "closed")
            out.close(0, PeerDeadError(f"{ref} is dead: {reason}"))

    def peers(self) -> list[ActorRef]:
        """The actors this one holds a connection (DEALER) to."""
        return list(self._dealers)

    def prune_peers(self, keep: Collection[ActorRef]) -> int:
        # A DEALER to a peer that is gone (a stage a reshape retired) keeps its ZeroMQ socket, its
        # eventfd and its reconnect timer for as long as this actor lives: close the ones nobody needs.
        keep = {*keep, *self._watched, *self._monitors, *(ref for _, ref in self._pending.values())}
        gone = [ref for ref in self._dealers if ref not in keep]
        for ref in gone:
            self._dealers.pop(ref).close(self.settings.linger_ms, PeerDeadError(f"{ref}: disconnected"))
        self.stats["peers_pruned"] += len(gone)
        return len(gone)

    def _declare_dead(self, ref: ActorRef, reason: str) -> None:
        """Mark `ref` dead: fail asks to it, drop its socket, tell the behaviour if it watched."""
        if ref in self._dead or self._closing:
            return
        self._dead[ref] = reason
        self.stats["peers_dead"] += 1
        self._watch_sent.pop(ref, None)
        task = self._monitors.pop(ref, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        for fut, target in self._pending.values():
            if target == ref and not fut.done():
                fut.set_exception(PeerDeadError(f"{ref} is dead: {reason}"))
        self._close_dealer(ref)
        if ref in self._watchers:   # its watch of us goes, until we watch it again (watch())
            self._watchers.discard(ref)
            self._dropped_watchers.add(ref)
        if ref in self._watched:
            self._watched.discard(ref)
            log.info("%s: watched actor %s terminated: %s", self.name, ref, reason)
            h = self._handlers.get(Terminated)
            if h is not None:
                job = _Job(h, Terminated(ref, reason), [], 0, 0, b"", None)
                if h.concurrent:
                    self._spawn(self._run(job))
                else:
                    self._enqueue(job)

    def is_dead(self, ref: ActorRef) -> bool:
        """True once `ref` is known dead to this actor."""
        return ref in self._dead

    # --- compute ----------------------------------------------------------------------------

    async def run_compute(self, fn: Callable, *args: Any, inline: bool = False) -> Any:
        if self._compute_jobs:
            self._compute_jobs = [f for f in self._compute_jobs if not f.done()]
        if inline and not self._compute_jobs:   # the compute thread is idle: running here cannot race it
            return fn(*args)
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                self.settings.compute_threads, thread_name_prefix=f"fp-{self.name}")
        job = self._executor.submit(fn, *args)   # (done() is true only once it ran, even if we are cancelled)
        self._compute_jobs.append(job)
        return await asyncio.wrap_future(job)

    def expect_started(self, token: str) -> asyncio.Future:
        """A future resolved with the Started message carrying `token` (launcher handshake)."""
        fut = self._loop.create_future()
        self._started_waiters[token] = fut
        return fut

    def __repr__(self) -> str:
        return f"<Actor {self.self_ref} pid={os.getpid()}>"

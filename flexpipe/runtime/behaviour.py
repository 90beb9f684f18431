"""Behaviours and their contexts: `@handles`, the handler table, `ActorContext` (what a handler may
do: tell, ask, watch, run_compute, stop) and `LocalContext`, which drives a behaviour in-process with
plain method calls (tests, the simulator). `Actor` (runtime/actor.py) is the context with sockets."""

from __future__ import annotations

import abc
import asyncio
import functools
import inspect
from typing import Any, Callable, Collection, NamedTuple

from flexpipe.errors import PeerDeadError, ProtocolError
from flexpipe.runtime.messages import ActorRef

__all__ = ["handles", "handlers_of", "ActorContext", "LocalContext"]


class _Handler(NamedTuple):
    fn: Callable
    concurrent: bool
    is_async: bool


def handles(*types: type, concurrent: bool = False) -> Callable[[Callable], Callable]:
    """Mark a behaviour method `(self, ctx, msg, *tensors)` as the handler of these message classes.

    `concurrent=True` runs each message in its own task instead of one at a time in the mailbox.
    """
    if not types:
        raise TypeError("handles() needs at least one message class")

    def mark(fn: Callable) -> Callable:
        fn.__fp_handles__ = (types, concurrent)  # type: ignore[attr-defined]
        return fn

    return mark


@functools.cache
def handlers_of(cls: type) -> dict[type, _Handler]:
    """The handler table of a behaviour class: message class -> handler."""
    table: dict[type, _Handler] = {}
    for name in dir(cls):
        fn = getattr(cls, name, None)
        spec = getattr(fn, "__fp_handles__", None)
        if spec is None:
            continue
        types, concurrent = spec
        for t in types:
            if t in table:
                raise TypeError(f"{cls.__name__} has two handlers for {t.__name__}")
            table[t] = _Handler(fn, concurrent, inspect.iscoroutinefunction(fn))
    return table


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class ActorContext(abc.ABC):
    """What a behaviour can do: know its ref, tell/ask peers, watch them, run compute, stop."""

    self_ref: ActorRef

    @abc.abstractmethod
    async def tell(self, ref: ActorRef, msg: Any, *tensors: Any) -> None:
        """Send a message without waiting for a reply. Raises PeerDeadError, ActorClosed."""

    @abc.abstractmethod
    async def ask(self, ref: ActorRef, msg: Any, *tensors: Any, timeout: float | None = None) -> Any:
        """Send and await the handler's return value. Raises AskTimeout, PeerDeadError, RemoteError."""

    @abc.abstractmethod
    def watch(self, ref: ActorRef) -> None:
        """Receive Terminated(ref, reason) when `ref` stops, dies or misses heartbeats."""

    @abc.abstractmethod
    def unwatch(self, ref: ActorRef) -> None:
        """Stop watching `ref`."""

    @abc.abstractmethod
    async def run_compute(self, fn: Callable, *args: Any, inline: bool = False) -> Any:
        """Run blocking (torch) work off the event loop and return its result.

        inline=True runs `fn` on the loop's own thread when no other compute is pending (so the
        work stays serialised with the compute thread's): for short work only (a decode step of a
        few ms), where the two thread wake-ups of the hand-off cost more than they protect.
        """

    @abc.abstractmethod
    def stop(self, reason: str = "stopped") -> None:
        """Stop this actor after the current handler returns."""

    def prune_peers(self, keep: Collection[ActorRef]) -> int:
        """Close the sockets to peers outside `keep` (a later send reopens one); returns how many."""
        return 0

    def peers(self) -> list[ActorRef]:
        """The actors this one holds an open socket to (none where there are no sockets)."""
        return []


async def _call(h: _Handler, behaviour: Any, ctx: ActorContext, msg: Any, tensors: Any) -> Any:
    result = h.fn(behaviour, ctx, msg, *tensors)
    return await result if h.is_async else result


class LocalContext(ActorContext):
    """Drives one behaviour in-process with plain method calls: no sockets, errors propagate as-is.

    Tells to refs of `peers` (ref -> LocalContext) are delivered at once; other tells are recorded
    in `outbox`; asks to other refs go to `on_ask(ref, msg, tensors)` when given.
    """

    def __init__(self, behaviour: Any, name: str = "local", *,
                 peers: dict[ActorRef, "LocalContext"] | None = None,
                 on_ask: Callable[[ActorRef, Any, tuple], Any] | None = None,
                 threaded_compute: bool = False):
        self.behaviour = behaviour
        self.self_ref = ActorRef(name, f"local://{name}")
        self.peers = peers if peers is not None else {}
        self.on_ask = on_ask
        self.threaded_compute = threaded_compute
        self.outbox: list[tuple[ActorRef, Any, tuple]] = []
        self.watched: set[ActorRef] = set()
        self.stopped: str | None = None
        self._handlers = handlers_of(type(behaviour))

    async def start(self) -> "LocalContext":
        """Run the behaviour's on_start."""
        if hasattr(self.behaviour, "on_start"):
            await self.behaviour.on_start(self)
        return self

    async def close(self) -> None:
        """Run the behaviour's on_stop."""
        if hasattr(self.behaviour, "on_stop"):
            await self.behaviour.on_stop(self)

    async def deliver(self, msg: Any, *tensors: Any) -> Any:
        """Call the behaviour's handler for `msg` and return what it returns."""
        h = self._handlers.get(type(msg))
        if h is None:
            raise ProtocolError(f"{type(self.behaviour).__name__} has no handler for "
                                f"{type(msg).__name__}")
        return await _call(h, self.behaviour, self, msg, tensors)

    async def tell(self, ref: ActorRef, msg: Any, *tensors: Any) -> None:
        peer = self.peers.get(ref)
        if peer is None:
            self.outbox.append((ref, msg, tensors))
        else:
            await peer.deliver(msg, *tensors)

    async def ask(self, ref: ActorRef, msg: Any, *tensors: Any, timeout: float | None = None) -> Any:
        peer = self.peers.get(ref)
        if peer is not None:
            return await peer.deliver(msg, *tensors)
        if self.on_ask is None:
            raise PeerDeadError(f"{ref} is not a peer of this LocalContext and no on_ask is set")
        reply = self.on_ask(ref, msg, tensors)
        return await reply if inspect.isawaitable(reply) else reply

    def watch(self, ref: ActorRef) -> None:
        self.watched.add(ref)

    def unwatch(self, ref: ActorRef) -> None:
        self.watched.discard(ref)

    async def run_compute(self, fn: Callable, *args: Any, inline: bool = False) -> Any:
        if self.threaded_compute and not inline:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    def stop(self, reason: str = "stopped") -> None:
        self.stopped = reason

"""A client of a `flexpipe router` daemon with the embedded runtime's interface (FlexPipe).

    async with RemoteFlexPipe.connect("tcp://10.0.0.5:5555") as fp:
        async for ev in fp.generate("Hello", max_tokens=16, seed=1):
            print(ev.text, end="")
        await fp.reshape(stages=3)

The client is an actor of its own (bound on tcp, reachable from the router): it asks the router's
frontend actor to Submit a request and receives the request's tokens as Tokens messages, in order,
the last one carrying the finish reason.  The router watches the client, so a client that goes away
has its requests cancelled.  The client watches the frontend: when the router goes away, restarts
(a new process at the same address has none of its requests), or declared this client dead (its
event loop stalled past the router's heartbeat timeout, and the router cancelled its requests),
every open stream raises RouterLost.  The next call tries the router once more (a missed heartbeat
may have been a stalled loop) and raises RouterUnavailable when it does not answer.

This module holds the client protocol (kinds 330-349); the daemons are in runtime/daemon/.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Sequence
from urllib.parse import urlsplit

from flexpipe import errors
from flexpipe.api import EngineClient, check_reshape_targets
from flexpipe.errors import (
    ActorError, AskTimeout, ConfigError, PeerDeadError, RemoteError, RequestError,
)
from flexpipe.model.tokenizer import StopTextStream
from flexpipe.partition import check_shape_numbers
from flexpipe.runtime.actor import ActorSettings, handles
from flexpipe.runtime.messages import ActorRef, Terminated, message
from flexpipe.runtime.router import check_prompt_length

__all__ = ["RemoteFlexPipe", "RouterUnavailable", "RouterLost", "connect", "Hello", "ModelInfo", "WaitReady", "Submit",
           "Tokens", "Cancel", "StatusQuery", "Reshape", "PROTOCOL_VERSION", "CURVE_FIELDS",
           "client_settings", "curve_from_env", "frontend_ref",
           "local_address_towards", "no_answer_hint", "not_ready_hint", "parse_endpoint"]

PROTOCOL_VERSION = 1


class RouterUnavailable(PeerDeadError):
    """The router daemon is gone, not ready yet, or shutting down: it takes no requests now."""


class RouterLost(RouterUnavailable):
    """An open stream's router went away, restarted, or declared this client dead: the request is lost."""


# --- the client protocol (kinds 330-349) ----------------------------------------------------------
@message(330)
class Hello:
    """Ask the router what it serves (reply: ModelInfo)."""
    version: int = PROTOCOL_VERSION


@message(331)
class ModelInfo:
    """What a router serves: the model's name, config and weight source, its tokenizer files."""
    name: str
    config: dict
    source: dict
    tokenizer_files: dict  # file name -> text (tokenizer.json ...); empty: the byte-level tokenizer
    max_context: int
    ready: bool
    version: int = PROTOCOL_VERSION
    max_sequence: int = 0   # most tokens one request can hold (KV per stage may hold less); 0: max_context
    max_message_bytes: int = 0   # the largest message its mailbox takes (a larger one is cut off, unread);
    #                              0: not said (a router built before this field)


@message(332)
class WaitReady:
    """Reply True once the pipeline serves; RouterUnavailable after `timeout` seconds."""
    timeout: float


@message(333)
class Submit:
    """A validated request; tokens go to `client` as Tokens messages (reply: True)."""
    rid: str
    prompt: list
    params: dict  # SamplingParams fields
    client: ActorRef
    stop: list | None = None  # stop strings: the router ends the request at one, as the embedded runtime does


@message(334)
class Tokens:
    """Tokens of request `rid` at indices index, index+1, ...; finish_reason set on the last message."""
    rid: str
    index: int
    token_ids: list
    finish_reason: str | None = None


@message(335)
class Cancel:
    """End request `rid`: "cancelled", or "stop" when the client found a stop string in its text (a
    router that ignores Submit.stop, built before it, leaves that to the client)."""
    rid: str
    reason: str = "cancelled"


@message(336)
class StatusQuery:
    """Ask for the router's status dict (FlexPipe.status() plus workers and inventory)."""


@message(337)
class Reshape:
    """Reshape the pipeline (reply: ReshapeStats as a dict)."""
    stages: int | None = None
    boundaries: list | None = None
    devices: list | None = None
    weights_from: str = "auto"


# --- addresses ----------------------------------------------------------------------------------
def parse_endpoint(url: str, what: str = "router address") -> tuple[str, str, int]:
    """(kind, host, port) of tcp://HOST:PORT, or ("ipc", "", 0) of ipc:///PATH (one host only)."""
    if url.startswith("ipc://") and len(url) > len("ipc://"):
        return "ipc", "", 0
    parts = urlsplit(url)
    if parts.scheme != "tcp" or not parts.hostname or parts.port is None:
        raise ConfigError(f"{what} {url!r} is not of the form tcp://HOST:PORT or ipc:///PATH")
    return "tcp", parts.hostname, parts.port


def frontend_ref(url: str) -> ActorRef:
    """The ref of the router daemon's frontend actor at `url` (tcp://HOST:PORT or ipc:///PATH)."""
    kind, host, port = parse_endpoint(url)
    return ActorRef("frontend", url if kind == "ipc" else f"tcp://{host}:{port}")


CURVE_FIELDS = ("curve_server_secret", "curve_server_public", "curve_client_secret", "curve_authorized")


def curve_from_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """CURVE key files from FLEXPIPE_CURVE_SERVER_SECRET, ..._SERVER_PUBLIC, ..._CLIENT_SECRET, ..._AUTHORIZED."""
    environ = os.environ if environ is None else environ
    return {f: environ[f"FLEXPIPE_{f.upper()}"] for f in CURVE_FIELDS if environ.get(f"FLEXPIPE_{f.upper()}")}


def client_settings(url: str, host: str | None = None, curve: dict[str, str] | None = None,
                    **kw: Any) -> ActorSettings:
    """Settings for the actors of a process that talks to the router at `url`: the same transport,
    bound on `host` (default: this machine's address on the route to the router), with the CURVE
    key files in `curve` (ActorSettings.curve_* names; tcp only)."""
    kind, rhost, rport = parse_endpoint(url)
    if kind == "ipc":
        return ActorSettings(bind="ipc", **kw)
    unknown = set(curve or {}) - set(CURVE_FIELDS)
    if unknown:
        raise ConfigError(f"unknown CURVE settings {sorted(unknown)}; known: {', '.join(CURVE_FIELDS)}")
    return ActorSettings(bind="tcp", host=host or local_address_towards(rhost, rport), **(curve or {}), **kw)


def no_answer_hint(url: str, curve: Any = None) -> str:
    """What to check when the router at `url` does not answer, for errors and logs.  Over tcp a peer whose
    CURVE keys the router does not admit (or a router with CURVE, when this host has no keys) gets
    silence, as from a router that is not running: the hint names both.  `curve`: this host's key
    files (a dict of CURVE_FIELDS, or ActorSettings)."""
    if url.startswith("ipc://"):
        return f"is `flexpipe router --bind {url}` running?"
    if isinstance(curve, dict):
        keyed = any(curve.get(f) for f in CURVE_FIELDS)
    else:
        keyed = any(getattr(curve, f, "") for f in CURVE_FIELDS)
    if keyed:
        return (f"is `flexpipe router --bind {url}` running, and do its CURVE keys match this host's (the same "
                "server keypair; this host's client public key among its authorized keys)?")
    return (f"is `flexpipe router --bind {url}` running, and without CURVE keys? A router with keys answers "
            "only hosts that have them (FLEXPIPE_CURVE_*, or a daemon's --curve-* flags)")


def not_ready_hint(url: str) -> str:
    """What to check when the router at `url` answers but its pipeline does not serve in time, for errors."""
    return (f"are enough `flexpipe worker --router {url}` running and joined (the router waits for its "
            "--min-workers), and do the router's and workers' logs show its stages starting? Stages that load "
            "large weights may need a longer timeout")


async def _router_state(actor: Any, frontend: ActorRef, timeout: float) -> str:
    """What the router says it is doing (its status' state: "waiting for workers (1 of 2)", "starting
    stages"), for an error; "" when it does not say within `timeout` (at most 5 s)."""
    try:
        status = await actor.ask(frontend, StatusQuery(), timeout=min(timeout, 5.0))
    except (ActorError, asyncio.TimeoutError):
        return ""
    return str(status.get("state") or "") if isinstance(status, dict) else ""


def local_address_towards(host: str, port: int = 9) -> str:
    """This machine's address on the route to `host` (no packet is sent); 127.0.0.1 for loopback."""
    if host in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


# --- the client -------------------------------------------------------------------------------------
class _ClientBehaviour:
    """The client's mailbox: Tokens go to the queue of their request; the router's end ends them all.

    A request's id leaves `streams` when its last Tokens come (the router has freed the id then too),
    or when the client ends it (RemoteFlexPipe._release)."""

    def __init__(self, frontend: ActorRef):
        self.frontend = frontend
        self.streams: dict[str, asyncio.Queue] = {}
        self.lost: str | None = None
        self.orphans: set[str] = set()  # requests ended here when the router was lost: cancel them there

    @handles(Tokens)
    def tokens(self, ctx: Any, msg: Tokens) -> None:
        q = self.streams.get(msg.rid)
        if q is None:
            return  # cancelled or finished here: nothing reads it
        for i, t in enumerate(msg.token_ids):
            q.put_nowait((int(t), msg.index + i, None))
        if msg.finish_reason is not None:
            q.put_nowait((None, msg.index + len(msg.token_ids), str(msg.finish_reason)))
            del self.streams[msg.rid]

    @handles(Terminated)
    def router_gone(self, ctx: Any, msg: Terminated) -> None:
        if msg.ref != self.frontend:
            return
        self.lost = str(msg.reason)
        self.orphans.update(self.streams)
        for rid, q in self.streams.items():
            q.put_nowait((None, -1, RouterLost(
                f"request {rid!r} is lost: the router {msg.ref} went away, restarted, or declared this client "
                f"dead (its event loop stalled past the router's heartbeat timeout): {msg.reason}; retry it")))


def _hold_to_limit(actor: Any, frontend: ActorRef, info: ModelInfo) -> None:
    """Hold what `actor` sends the router to the largest message its mailbox takes (a larger one would
    be cut off there unread, and an ask would wait out its timeout): refused here (MessageTooLarge)."""
    limit = info.max_message_bytes
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        actor.send_limits[frontend] = limit
    else:   # not said: a router built before ModelInfo.max_message_bytes
        actor.send_limits.pop(frontend, None)


def _typed(e: RemoteError) -> Exception:
    """The FlexPipe error a router's ErrorReply names (RequestError, ReshapeError, ...), else `e`."""
    cls = RouterUnavailable if e.kind == "RouterUnavailable" else getattr(errors, e.kind, None)
    if isinstance(cls, type) and issubclass(cls, errors.FlexPipeError) and cls is not RemoteError:
        return cls(e.message)
    return e


class RemoteFlexPipe(EngineClient):
    """FlexPipe's interface over a router daemon.  Create with `RemoteFlexPipe.connect(url)`."""

    def __init__(self, url: str, info: ModelInfo, spec: Any, system: Any, actor: Any):
        self.url, self.info, self.spec = url, info, spec
        self.system, self.actor = system, actor
        self.frontend = frontend_ref(url)
        self._behaviour: _ClientBehaviour = actor.behaviour
        self._tasks: set[asyncio.Task] = set()
        self._ending: dict[str, asyncio.Task] = {}   # request id -> its Cancel, until the router answered it
        self._reconnect_timeout = max(1.0, actor.settings.heartbeat_timeout)

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, url: str, *, ready_timeout: float = 120.0, host: str | None = None,
                      curve: dict[str, str] | None = None, heartbeat_interval: float = 0.5,
                      heartbeat_timeout: float = 3.0, ask_timeout: float = 60.0,
                      answer_timeout: float | None = None,
                      max_message_bytes: int | None = None) -> AsyncIterator["RemoteFlexPipe"]:
        """Connect to the router at `url` and wait (up to `ready_timeout`) until its pipeline serves.

        `url`: tcp://HOST:PORT, or ipc:///PATH for a router on this host.  `host`: the address the
        router reaches this client at over tcp (default: this machine's address on the route to it).
        `curve`: the key files when the router's tcp endpoints use CURVE (ActorSettings.curve_*
        names; default: curve_from_env()); a client without authorized keys gets no answer.
        `answer_timeout`: how long to wait for the router's first answer (default: `ready_timeout`);
        nothing tells a router that is not there from one that is slow, but a router that answers and
        still waits for its workers (or for its stages to start) gets the rest of `ready_timeout`.
        `max_message_bytes`: the largest message this client sends or takes (default: ActorSettings');
        what it sends the router is held to the smaller of this and the router's own.
        Raises RouterUnavailable when the router does not answer or its pipeline is not ready in time
        (saying what the router was doing, and what to check).
        """
        from flexpipe.runtime.launcher import ActorSystem

        curve = curve_from_env() if curve is None else curve
        answer_timeout = ready_timeout if answer_timeout is None else answer_timeout
        limit = {} if max_message_bytes is None else {"max_message_bytes": max_message_bytes}
        settings = client_settings(url, host, curve, heartbeat_interval=heartbeat_interval,
                                   heartbeat_timeout=heartbeat_timeout, ask_timeout=ask_timeout, **limit)
        frontend = frontend_ref(url)
        async with ActorSystem(settings, name="flexpipe-client") as system:
            actor = await system.spawn(_ClientBehaviour(frontend), f"client-{uuid.uuid4().hex[:8]}")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + ready_timeout
            try:
                try:
                    info = await actor.ask(frontend, Hello(), timeout=answer_timeout)
                except AskTimeout as e:
                    raise RouterUnavailable(f"no answer from the router at {url} within {answer_timeout:g}s: "
                                            f"{no_answer_hint(url, curve)}") from e
                if not isinstance(info, ModelInfo) or info.version != PROTOCOL_VERSION:
                    raise ConfigError(f"the router at {url} speaks another protocol ({info!r}); "
                                      f"this client speaks version {PROTOCOL_VERSION}")
                _hold_to_limit(actor, frontend, info)
                actor.watch(frontend)
                if not info.ready:
                    left = max(0.1, deadline - loop.time())
                    try:
                        await actor.ask(frontend, WaitReady(left), timeout=left + 5.0)
                    except RemoteError as e:
                        if e.kind != "RouterUnavailable":
                            raise
                        state = await _router_state(actor, frontend, answer_timeout)
                        raise RouterUnavailable(
                            f"the router at {url} answers, but its pipeline did not start serving within "
                            f"{ready_timeout:g}s ({f'it is {state}' if state else e.message}): "
                            f"{not_ready_hint(url)}") from e
            except AskTimeout as e:
                raise RouterUnavailable(f"the router at {url} did not answer whether its pipeline serves within "
                                        f"{ready_timeout:g}s: {e}") from e
            except RemoteError as e:
                raise _typed(e) from e
            fp = cls(url, info, _model_spec(info), system, actor)
            try:
                yield fp
            finally:
                await fp._drain_tasks()

    @property
    def max_context(self) -> int:
        return int(self.info.max_context)

    @property
    def max_sequence_tokens(self) -> int:
        return min(self.max_context, int(self.info.max_sequence) or self.max_context)

    async def _reconnect(self) -> None:
        """After the router was declared dead: is it back (or was it only a stalled loop)?"""
        b = self._behaviour
        self.actor.watch(self.frontend)  # forgets the death, and watches again
        try:
            info = await self.actor.ask(self.frontend, Hello(), timeout=self._reconnect_timeout)
        except (ActorError, asyncio.TimeoutError) as e:
            raise RouterUnavailable(f"the router at {self.url} is gone ({b.lost}) and does not answer: "
                                    f"{e}") from e
        if not isinstance(info, ModelInfo) or info.name != self.info.name or info.config != self.info.config:
            raise RouterUnavailable(f"the router at {self.url} now serves another model")
        _hold_to_limit(self.actor, self.frontend, info)   # (a router restarted with another limit)
        self.info = info   # (... or other KV: its max_sequence)
        b.lost = None
        orphans, b.orphans = b.orphans, set()
        # answered before the message this reconnect is for goes out (a Submit that takes such an id)
        await asyncio.gather(*(self._cancel(rid) for rid in orphans))

    async def _ask(self, msg: Any, timeout: float | None = None) -> Any:
        if self._behaviour.lost is not None:
            await self._reconnect()
        try:
            return await self.actor.ask(self.frontend, msg, timeout=timeout)
        except RemoteError as e:
            raise _typed(e) from e
        except PeerDeadError as e:
            raise RouterUnavailable(f"the router at {self.url} is gone: {e}") from e

    async def generate(self, prompt: str | Sequence[int], *, max_tokens: int = 64, temperature: float = 0.0,
                       top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                       stop: Sequence[str] | None = None, stop_token_ids: Sequence[int] | None = None,
                       ignore_eos: bool = False, request_id: str | None = None) -> AsyncIterator[Any]:
        """Stream the new tokens of one request; closing the iterator early cancels the request.

        Raises RouterLost mid-stream when the router went away, restarted, or declared this client dead.
        """
        from flexpipe.api import GenerationEvent

        ids = self.encode(prompt)
        check_prompt_length(len(ids), self.max_context)   # (the router's words, before its message limit's)
        params = self._params(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos)
        # the router ends the request at a stop string (as FlexPipe.generate's router does); this text,
        # decoded the same way, gives the events their text and ends the stream at the same token
        text = StopTextStream(self.tokenizer.stream(), stop)
        rid = request_id or uuid.uuid4().hex
        while (ending := self._ending.get(rid)) is not None:
            # an earlier request of this id is being cancelled: once the router has answered that
            # Cancel, it ran before this Submit, and every Tokens of the earlier request is here
            await asyncio.wait({ending})
        streams = self._behaviour.streams
        if rid in streams:
            raise RequestError(f"request id {rid!r} is already in use")
        queue = streams[rid] = asyncio.Queue()
        end: str | None = "cancelled"   # what the router is told if this ends before the request (None: nothing)
        try:
            try:
                await self._ask(Submit(rid, ids, dataclasses.asdict(params), self.actor.ref, text.stops or None))
            except (asyncio.CancelledError, AskTimeout):   # while asking: the router may have admitted it
                raise   # (cancelled there; a Cancel of a request it never took is a no-op)
            except errors.MessageTooLarge as e:   # refused here, not sent
                end = None
                raise self._too_large(ids, text.stops) from e
            except BaseException:   # refused (a typed error) or the router is gone: never admitted
                end = None
                raise
            while True:
                token, index, reason = await queue.get()
                if isinstance(reason, RouterLost):
                    end = None   # (cancelled there when the router answers again: see _reconnect)
                    raise reason
                if reason is not None:
                    tail, hit = text.flush()
                    yield GenerationEvent(None, tail, index, "stop" if hit else reason)
                    return
                piece, hit = text.feed(token)
                if hit:   # the router ended it here too (a router built before Submit.stop: told now)
                    self._release(rid, queue, "stop")
                    yield GenerationEvent(token, piece, index, "stop")
                    return
                yield GenerationEvent(token, piece, index)
        finally:
            self._release(rid, queue, end)

    def _too_large(self, ids: list[int], stops: list[str]) -> RequestError:
        """The error of a request whose Submit is above the router's limit (or this client's)."""
        mine = self.actor.settings.max_message_bytes
        theirs = self.actor.send_limits.get(self.frontend, mine)
        limit = min(theirs, mine)
        stopped = f", stop strings of {sum(map(len, stops))} characters" if stops else ""
        router = "the router's --max-message-bytes (FLEXPIPE_MAX_MESSAGE_BYTES; its workers take the same)"
        client = "this client's max_message_bytes (`flexpipe serve --max-message-bytes`)"
        whose = router if theirs < mine else client if mine < theirs else f"{router} and {client}"
        return RequestError(
            f"the request (a prompt of {len(ids)} tokens{stopped}) does not fit in one message to the router "
            f"at {self.url} (max_message_bytes={limit}): send a shorter prompt{' or stop strings' if stops else ''}, "
            f"or raise {whose}")

    def _release(self, rid: str, queue: asyncio.Queue, reason: str | None) -> None:
        """This client is done with its request `rid` (the one `queue` reads): unless it ended already
        (its last Tokens came, and the id may name a newer request by now), free the id here and cancel
        it at the router with `reason` (None: do not)."""
        streams = self._behaviour.streams
        if streams.get(rid) is not queue:
            return
        del streams[rid]
        if reason is not None:
            task = self._ending[rid] = self._spawn(self._cancel(rid, reason))
            task.add_done_callback(functools.partial(self._cancelled, rid))

    def _cancelled(self, rid: str, task: asyncio.Task) -> None:
        if self._ending.get(rid) is task:
            del self._ending[rid]

    async def _cancel(self, rid: str, reason: str = "cancelled") -> None:
        """Cancel `rid` at the router and wait for its answer (bounded): the router sends nothing of a
        request after its Cancel, and its answer comes after what it sent before."""
        if self._behaviour.lost is None and not self.actor.closed:
            with contextlib.suppress(ActorError):
                await self.actor.ask(self.frontend, Cancel(rid, reason), timeout=self._reconnect_timeout)

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _drain_tasks(self) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5.0)

    # ---- pipeline -------------------------------------------------------------------------------
    async def status(self) -> dict:
        """The router's status: shape, router, stages (with their workers), reshapes, workers, inventory."""
        return await self._ask(StatusQuery())

    async def reshape(self, stages: int | None = None, boundaries: Sequence[int] | None = None, *,
                      devices: Sequence[str] | None = None, weights_from: str = "auto") -> Any:
        """Change the pipeline's shape while requests run; returns the ReshapeStats."""
        from flexpipe.runtime.controller import ReshapeStats

        if (stages is None) == (boundaries is None):
            raise ConfigError("give either stages=N or boundaries=[0, ..., num_units]")
        check_shape_numbers(stages, boundaries, self.config.num_units)   # (also what msgpack cannot carry)
        # (which ids a live worker has is the router's to say, naming them: here, what the message carries)
        devices = check_reshape_targets(devices, weights_from, is_device=_carried,
                                        names="device ids of the router's workers (as its status lists them)")
        d = await self._ask(Reshape(stages, list(boundaries) if boundaries is not None else None,
                                    devices, weights_from), timeout=900.0)
        known = {f.name for f in dataclasses.fields(ReshapeStats)}
        return ReshapeStats(**{k: v for k, v in d.items() if k in known})


def _carried(device: Any) -> bool:
    """A device id a Reshape message carries as given: a string, or a 64-bit int (which the router refuses,
    naming the ids its workers have, as it does a string that no live worker has)."""
    return isinstance(device, str) or type(device) is int and -(1 << 63) <= device < 1 << 63


def _model_spec(info: ModelInfo) -> Any:
    """A ModelSpec from what the router sent: config, weight source, tokenizer (files or byte-level)."""
    from flexpipe.api import ModelSpec
    from flexpipe.model.config import ModelConfig
    from flexpipe.model.tokenizer import load_tokenizer

    cfg = ModelConfig.from_dict(info.config)
    if info.tokenizer_files:
        with tempfile.TemporaryDirectory(prefix="fp-tok-") as d:
            for name, text in info.tokenizer_files.items():
                if Path(name).name != name:
                    raise ConfigError(f"the router sent a tokenizer file with a path in its name: {name!r}")
                (Path(d) / name).write_text(text)
            tok = load_tokenizer(cfg, d)
    else:
        tok = load_tokenizer(cfg, None)
    return ModelSpec(info.name, cfg, dict(info.source), tok)


def connect(url: str, **kw: Any) -> Any:
    """An async context manager yielding a RemoteFlexPipe on the router at `url` (for create_app)."""
    return RemoteFlexPipe.connect(url, **kw)

"""The router daemon: frontend, allocator and (once enough workers joined) controller and router."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import stat
from dataclasses import dataclass, replace
from typing import Any, Sequence

import zmq

from flexpipe.errors import (
    ActorError, AskTimeout, ConfigError, FlexPipeError, PlacementError, QueueFullError, RemoteError, RequestError,
)
from flexpipe.runtime.actor import ActorSettings, handles
from flexpipe.runtime.daemon.devices import assign_devices, parse_stage_overhead, stage_overhead, stage_request
from flexpipe.runtime.daemon.events import event
from flexpipe.runtime.daemon.messages import (
    DeviceUsage, JoinCluster, JoinReply, KillStage, LeaveCluster, StageExited, StartStage, StopStage,
)
from flexpipe.runtime.messages import ActorRef, Ping, Terminated
from flexpipe.runtime.remote import (
    Cancel, Hello, ModelInfo, Reshape, RouterUnavailable, StatusQuery, Submit, Tokens, WaitReady,
    local_address_towards, parse_endpoint,
)


# --- the router side ------------------------------------------------------------------------------------
JOIN_WAIT_S = 5.0   # a stage no live worker can take waits for a join this long, plus 2 x the heartbeat timeout


class _NoLiveDevice(PlacementError):
    """No live worker's device can take a stage now (its own worker is gone, and no other has room)."""


@dataclass(slots=True)
class WorkerInfo:
    """A worker that joined: its ref, host, and devices (global id -> torch device)."""
    name: str
    ref: ActorRef
    host: str
    pid: int
    devices: dict[str, str]
    usage_reports: int = 0   # DeviceUsage reports applied


class RemoteStage:
    """A stage process started by a worker: the handle the Controller holds (.ref .pid .stop() .kill())."""

    def __init__(self, daemon: "RouterDaemon", worker: str, name: str, ref: ActorRef, pid: int, device: str,
                 units: tuple[int, int], reservation: str | None, booked: int = 0):
        self.daemon, self.worker, self.name, self.ref, self.pid = daemon, worker, name, ref, pid
        self.device, self.units, self.reservation = device, units, reservation
        self.booked = booked   # bytes `reservation` holds on `device` (0: none; kept through a resize)
        self.stopped = False

    async def stop(self, timeout: float = 5.0) -> None:
        """Ask its worker to stop it (the worker kills it after `timeout`), then release its memory."""
        if self.stopped:
            return
        self.stopped = True
        d = self.daemon
        w = d.workers.get(self.worker)
        if w is not None:
            try:
                await d.frontend.ask(w.ref, StopStage(self.name, timeout), timeout=timeout + 10.0)
            except ActorError as e:
                event("stage_stop_failed", logging.WARNING, stage=self.name, worker=self.worker, error=str(e))
        d.stages.pop(self.name, None)
        await d.release(self.reservation)
        event("stage_stopped", stage=self.name, worker=self.worker, device=self.device)

    def kill(self) -> None:
        """Ask its worker to SIGKILL it, then release its memory (fire and forget).  The worker reports
        no StageExited for a stage it was asked to end, so the bookkeeping is done here: a hung stage
        killed by a recovery left its reservation booked, and the device it held counted twice."""
        if self.stopped:
            return
        self.stopped = True
        d = self.daemon
        d.stages.pop(self.name, None)
        d._spawn(self._kill_and_release())

    async def _kill_and_release(self) -> None:
        d = self.daemon
        w = d.workers.get(self.worker)
        killed = False
        if w is not None and not d.frontend.closed:
            try:
                await d.frontend.ask(w.ref, KillStage(self.name), timeout=10.0)
                killed = True
            except ActorError as e:
                event("stage_kill_failed", logging.WARNING, stage=self.name, worker=self.worker, error=str(e))
        await d.release(self.reservation)   # either way: its worker is gone, or kills it (or lists it at a join)
        if killed:   # (a stage_killed after a stage_kill_failed said both of one stage)
            event("stage_killed", stage=self.name, worker=self.worker, device=self.device)

    def __repr__(self) -> str:
        return f"<RemoteStage {self.name} on {self.worker} {self.device} pid={self.pid}>"


@dataclass(slots=True)
class _Submitted:
    """A request a client submitted: whose it is, where its events arrive, what of them went out."""
    client: ActorRef
    queue: asyncio.Queue
    sent: int = 0   # index of the first token not sent to the client yet


class RouterFrontend:
    """The router daemon's public mailbox: the client protocol and the worker protocol."""

    def __init__(self, daemon: "RouterDaemon"):
        self.d = daemon
        # by request id, while its client may cancel it: the task that sends its events, and the request.
        # An id names one request at a time; the forward of an older one may still be sending its last
        # events when a newer one takes the id.
        self.forwards: dict[str, asyncio.Task] = {}
        self.subs: dict[str, _Submitted] = {}
        self.clients: dict[ActorRef, set[str]] = {}

    def check_sender(self, sender: ActorRef | None, msg: Any) -> str | None:
        """A worker speaks for itself only; a client cancels only its own requests (docs/security.md)."""
        if isinstance(msg, (LeaveCluster, StageExited, DeviceUsage)):
            w = self.d.workers.get(msg.worker)
            if w is not None and sender != w.ref:
                return f"{type(msg).__name__} of worker {msg.worker} comes from {w.ref}, not {sender}"
        elif isinstance(msg, Cancel) and msg.rid in self.forwards:
            if sender is None or msg.rid not in self.clients.get(sender, ()):
                return f"request {msg.rid!r} is not one {sender} submitted"
        return None

    async def on_stop(self, ctx: Any) -> None:
        for t in list(self.forwards.values()):
            t.cancel()

    # ---- clients ------------------------------------------------------------------------------------
    @handles(Hello)
    def hello(self, ctx: Any, msg: Hello) -> ModelInfo:
        return self.d.model_info()

    @handles(WaitReady, concurrent=True)
    async def wait_ready(self, ctx: Any, msg: WaitReady) -> bool:
        try:
            await asyncio.wait_for(self.d.serving(), msg.timeout)
        except asyncio.TimeoutError:
            raise RouterUnavailable(f"the pipeline is not up after {msg.timeout:g}s: {self.d.state}") from None
        return True

    @handles(Submit)
    def submit(self, ctx: Any, msg: Submit) -> bool:
        from flexpipe.model.sampling import SamplingParams
        from flexpipe.model.tokenizer import StopTextStream

        d = self.d
        if not d.admitting:
            raise RouterUnavailable(f"the router takes no requests now ({d.state})")
        router = d.controller.router
        if router.sched.queued_new() >= d.settings.max_queued:
            raise QueueFullError(f"{d.settings.max_queued} requests are already queued: retry later")
        vocab = d.spec.config.vocab_size
        params = SamplingParams(**msg.params).validate(vocab).resolve_seed()
        ids = list(msg.prompt)
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})")
        # (StopTextStream refuses a stop that is not strings with a RequestError) the router ends the request at a stop string, as FlexPipe.generate's does (RouterActor.submit)
        text = StopTextStream(d.spec.tokenizer.stream(), msg.stop) if msg.stop else None
        rid, queue = router.submit(ids, params, msg.rid, text=text)
        self._forget(rid)   # (the forward of an earlier request of the id, ended there, sends its last events)
        if msg.client not in self.clients:
            self.clients[msg.client] = set()
            ctx.watch(msg.client)
        self.clients[msg.client].add(rid)
        sub = self.subs[rid] = _Submitted(msg.client, queue)
        self.forwards[rid] = asyncio.get_running_loop().create_task(self._forward(ctx, rid, sub))
        return True

    def _forget(self, rid: str) -> asyncio.Task | None:
        """Forget the forward of request `rid` (its client can no longer cancel it); returns its task."""
        task = self.forwards.pop(rid, None)
        sub = self.subs.pop(rid, None)
        if sub is not None:
            self.clients.get(sub.client, set()).discard(rid)
        return task

    def _end(self, rid: str, reason: str = "cancelled") -> _Submitted | None:
        """Its client ended request `rid` (or is gone): its forward stops (nothing more of it is sent),
        and the router frees the id at once.  Returns the request, if there was one."""
        sub = self.subs.get(rid)
        task = self._forget(rid)
        if task is not None:
            task.cancel()
        if sub is not None:
            self.d.cancel(rid, reason, sub.queue)
        return sub

    async def _forward(self, ctx: Any, rid: str, sub: _Submitted) -> None:
        """Send a request's events to its client, in order, as many per message as are ready."""
        try:
            while True:
                evs = [await sub.queue.get()]
                while not sub.queue.empty():
                    evs.append(sub.queue.get_nowait())
                last = evs[-1].finish_reason
                toks = [e.token_id for e in evs if e.token_id is not None]
                if last is not None and rid in self.d.shutdown_rids:
                    last = "shutdown"
                await ctx.tell(sub.client, Tokens(rid, evs[0].index, toks, last))
                sub.sent = evs[0].index + len(toks)
                if last is not None:
                    return
        except ActorError:  # the client is gone: nobody reads this request any more
            self.d.cancel(rid, queue=sub.queue)   # (this request only: the id may name a newer one)
        finally:
            if self.forwards.get(rid) is asyncio.current_task():
                self._forget(rid)

    @handles(Cancel)
    async def cancel(self, ctx: Any, msg: Cancel) -> None:
        """The client ends its request: its last Tokens (every request gets one) go out now, before
        this Cancel is answered, and nothing of it after.  A client that submits the id again only
        once its Cancel is answered (RemoteFlexPipe) never gets events of the old request on the new."""
        if msg.rid not in self.forwards:
            return
        reason = "stop" if msg.reason == "stop" else "cancelled"
        sub = self._end(msg.rid, reason)
        if sub is not None:
            with contextlib.suppress(ActorError):
                await ctx.tell(sub.client, Tokens(msg.rid, sub.sent, [], reason))

    @handles(StatusQuery, concurrent=True)
    async def status(self, ctx: Any, msg: StatusQuery) -> dict:
        return await self.d.status()

    @handles(Reshape, concurrent=True)
    async def reshape(self, ctx: Any, msg: Reshape) -> dict:
        st = await self.d.reshape(msg.stages, msg.boundaries, msg.devices, msg.weights_from)
        return st.to_dict()

    # ---- workers --------------------------------------------------------------------------------------
    @handles(JoinCluster, concurrent=True)
    async def join(self, ctx: Any, msg: JoinCluster) -> JoinReply:
        ids = await self.d.add_worker(msg)
        ctx.watch(msg.ref)
        return JoinReply(os.getpid(), self.d.spec.name, ids, ctx.ref, self.d.orphans(msg))

    @handles(DeviceUsage, concurrent=True)
    async def usage(self, ctx: Any, msg: DeviceUsage) -> None:
        await self.d.apply_usage(msg)

    @handles(LeaveCluster)
    def leave(self, ctx: Any, msg: LeaveCluster) -> None:
        w = self.d.workers.get(msg.worker)
        if w is not None:
            ctx.unwatch(w.ref)
            self.d.worker_lost(msg.worker, f"left: {msg.reason}")

    @handles(StageExited)
    def stage_exited(self, ctx: Any, msg: StageExited) -> None:
        h = self.d.stages.get(msg.name)
        if h is not None and h.ref == msg.ref and not h.stopped:
            event("stage_exited", logging.WARNING, stage=msg.name, worker=msg.worker, reason=msg.reason)
            self.d.stage_gone(h, msg.reason)  # the router recovers now, not at a heartbeat

    @handles(Terminated)
    def terminated(self, ctx: Any, msg: Terminated) -> None:
        for name, w in list(self.d.workers.items()):
            if w.ref == msg.ref:
                self.d.worker_lost(name, msg.reason)
        rids = self.clients.pop(msg.ref, None)
        if rids:
            event("client_lost", client=str(msg.ref), requests=len(rids), reason=msg.reason)
            for rid in list(rids):
                self._end(rid)


def _tokenizer_files(spec: Any) -> dict[str, str]:
    if spec.source.get("kind") != "checkpoint":
        return {}
    from pathlib import Path

    d = Path(spec.source["path"])
    names = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
    return {n: (d / n).read_text() for n in names if (d / n).is_file()} if (d / "tokenizer.json").is_file() else {}


def _check_hello_fits(info: ModelInfo) -> None:
    """ConfigError unless `info`, a client's answer to its Hello, fits in one message of the router's
    max_message_bytes: a larger one is refused, and no client could ever connect."""
    from flexpipe.runtime.codec import encode

    limit = info.max_message_bytes
    # (max_sequence at its largest: the answer once the pipeline is up is no larger)
    size = sum(map(len, encode(replace(info, max_sequence=info.max_context))))
    if size > limit:
        files = info.tokenizer_files
        tok = sum(len(t.encode()) for t in files.values())
        raise ConfigError(f"setting max_message_bytes={limit}: the router answers a client's Hello with the model's "
                          f"config and tokenizer files ({', '.join(files) or 'none'}: {tok} bytes) in one message "
                          f"of {size} bytes, so no client could connect; raise max_message_bytes "
                          f"(--max-message-bytes) to at least {size}")


class RouterDaemon:
    """`flexpipe router`: frontend + allocator + (once enough workers joined) controller and router."""

    def __init__(self, bind: str, model: str = "tiny", stages: int = 2, *, boundaries: Sequence[int] | None = None,
                 min_workers: int = 1, drain_timeout: float = 30.0, advertise: str | None = None,
                 settings: Any = None, curve: dict[str, str] | None = None, stage_overhead: str | int = "auto"):
        from flexpipe.api import Settings

        self.kind, host, port = parse_endpoint(bind, "--bind")
        self.bind = bind if self.kind == "ipc" else f"tcp://{host}:{port or '*'}"
        wildcard = host in ("0.0.0.0", "*", "::")
        self.host = advertise or (local_address_towards("8.8.8.8") if wildcard else host or "127.0.0.1")
        if min_workers < 1:
            raise ConfigError(f"--min-workers must be at least 1 (got {min_workers}): stages run on workers")
        self.model, self.num_stages, self.boundaries = model, stages, boundaries
        self.min_workers, self.drain_timeout = min_workers, drain_timeout
        self.settings = (settings or Settings()).check()
        self.stage_overhead = parse_stage_overhead(stage_overhead)   # None: auto (by device kind)
        self._request: Any = None   # the placer's ReplicaRequest (no overhead) whose stage_bytes the router books
        self.curve = dict(curve or {})  # CURVE key files of this host (ActorSettings.curve_* names)
        self.spec: Any = None
        self.system: Any = None
        self.frontend: Any = None
        self.allocator: Any = None
        self.controller: Any = None
        self.workers: dict[str, WorkerInfo] = {}
        self.stages: dict[str, RemoteStage] = {}
        self._starting: dict[str, tuple[str, str, int]] = {}   # stage asked to start -> (worker, device, bytes)
        self.ready = asyncio.Event()
        self.enough_workers = asyncio.Event()
        self.admitting = False
        self.state = "starting"
        self.shutdown_rids: set[str] = set()
        self._membership = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._joined = asyncio.Event()   # set, and replaced by a new one, at each worker join

    @property
    def down(self) -> str | None:
        """Why the pipeline serves no more (a recovery failed; it runs again when a worker joins), else None."""
        c = self.controller
        return c.router.down if c is not None and c.router is not None else None

    @property
    def state(self) -> str:
        """What the router does now (its status; what a refusal says)."""
        down = self.down
        if down is not None and self._state == "serving":
            return f"down: {down} (recovers when a worker joins)"
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        self._state = value

    def model_info(self) -> ModelInfo:
        """What a client's Hello gets: the model, its tokenizer files, what a request may hold, the limit."""
        spec, ctx_len = self.spec, self.spec.config.max_position_embeddings
        if getattr(self.controller, "router", None) is not None:
            kv = self.controller.router.cache.max_tokens()
        else:   # not up yet: what every stage's pool will hold
            kv = self.settings.num_blocks * self.settings.block_size
        return ModelInfo(spec.name, spec.config.to_dict(), dict(spec.source), _tokenizer_files(spec),
                         ctx_len, self.ready.is_set() and self.down is None, max_sequence=min(ctx_len, kv),
                         max_message_bytes=self.settings.max_message_bytes)

    async def serving(self) -> None:
        """Return once the pipeline is up and not down (WaitReady)."""
        await self.ready.wait()
        while self.down is not None:   # (down again meanwhile: wait again)
            await self.controller.router.wait_up()

    # ---- life cycle -------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> int:
        """Serve until `stop` is set, then shut down cleanly; returns the exit code."""
        from flexpipe.api import ModelSpec
        from flexpipe.runtime.allocator import AllocatorBehaviour
        from flexpipe.runtime.launcher import ActorSystem
        from flexpipe.runtime.sched import use_realtime

        s = self.settings
        self.spec = ModelSpec.resolve(self.model, s.seed)
        _check_hello_fits(self.model_info())   # (before binding: a router no client can connect to never serves)
        actor_settings = ActorSettings(bind=self.kind, host=self.host, heartbeat_interval=s.heartbeat_interval,
                                       heartbeat_timeout=s.heartbeat_timeout, start_timeout=s.start_timeout,
                                       torch_threads=s.torch_threads, rt_priority=s.rt_priority,
                                       max_message_bytes=s.max_message_bytes,
                                       **(self.curve if self.kind == "tcp" else {}))
        if s.rt_priority:   # this process's threads (ConfigError if refused); its stages apply it themselves
            use_realtime(s.rt_priority)
        ipc_path = self.bind[len("ipc://"):] if self.kind == "ipc" else ""
        if ipc_path:
            _claim_ipc(self.bind, ipc_path)
        socket_file: tuple[int, int] | None = None   # (device, inode) of the ipc socket file this router made
        code = 0
        try:
            async with await _started(ActorSystem(actor_settings, name="router"), self.host,
                                      "--bind / --advertise") as system:
                self.system = system
                try:
                    self.allocator = await system.spawn(AllocatorBehaviour(), "allocator")
                    self.frontend = await system.spawn(RouterFrontend(self), "frontend", endpoint=self.bind)
                except zmq.ZMQError as e:
                    raise ConfigError(f"cannot bind {self.bind} (or an endpoint on {self.host}): {e}") from None
                socket_file = _file_id(ipc_path)
                self.state = f"waiting for workers (0 of {self.min_workers})"
                event("listening", endpoint=self.frontend.ref.endpoint, model=self.spec.name,
                      stages=self.boundaries and len(self.boundaries) - 1 or self.num_stages,
                      min_workers=self.min_workers, max_message_bytes=system.settings.max_message_bytes)
                try:
                    if await _until(self.enough_workers.wait(), stop):
                        await self._build()
                        await stop.wait()
                except FlexPipeError as e:
                    event("failed", logging.ERROR, error=f"{type(e).__name__}: {e}")
                    code = 1
                finally:
                    await self._shutdown()
        finally:
            # ZeroMQ leaves an ipc socket file behind: remove ours (the same file, not one made since)
            if socket_file is not None and _file_id(ipc_path) == socket_file:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(ipc_path)
        event("stopped", code=code)
        return code

    async def _build(self) -> None:
        from flexpipe.api import plan_shape
        from flexpipe.partition import PipelineShape
        from flexpipe.runtime.controller import Controller

        cfg = self.spec.config
        shape = plan_shape(cfg, self.num_stages, self.boundaries, 0, device=self._device_kind())
        devices = await self._place(shape, [])
        shape = PipelineShape.from_boundaries(shape.boundaries, 0, devices)
        self.state = "starting stages"
        event("building", boundaries=shape.boundaries, devices=devices)
        self.controller = Controller(self.system, self.spec, self.settings, stage_launcher=self.launch_stage)
        await self.controller.start(shape)
        # (a recovery that failed runs again when a worker joins: add_worker)
        self.controller.router.down_hint = "it serves again once a worker joins the router"
        self.state = "serving"
        self.admitting = True
        self.ready.set()
        event("ready", epoch=shape.epoch, boundaries=shape.boundaries,
              stages=[f"{sl.handle.name}@{sl.handle.worker}" for sl in self.controller.slots])

    async def _shutdown(self) -> None:
        self.admitting = False
        self.state = "shutting down"
        fe: RouterFrontend | None = self.frontend.behaviour if self.frontend is not None else None
        running = list(fe.forwards.values()) if fe else []
        event("shutdown_started", in_flight=len(running), drain_timeout=self.drain_timeout)
        if running:
            await asyncio.wait(running, timeout=self.drain_timeout)
            left = [rid for rid, t in fe.forwards.items() if not t.done()]
            if left:
                self.shutdown_rids.update(left)
                for rid in left:
                    self.cancel(rid)
                if fe.forwards:  # cancelled requests end when their step returns
                    await asyncio.wait(list(fe.forwards.values()), timeout=10.0)
                event("requests_ended", requests=len(left), finish_reason="shutdown")
        if self.controller is not None:
            await self.controller.aclose()
        await asyncio.gather(*(h.stop() for h in list(self.stages.values())), return_exceptions=True)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5.0)

    # ---- workers ----------------------------------------------------------------------------------
    async def add_worker(self, msg: JoinCluster) -> list[str]:
        # Membership changes of the allocator go through self._membership, keyed by worker name: the
        # allocator is not told to watch workers, so that the late death of a worker's old process
        # cannot withdraw the devices its restarted process has announced under the same name.
        from flexpipe.runtime.allocator import AnnounceGpus, WithdrawWorker

        # What runs there as far as the router knows, taken before any await: a stage whose start the
        # router learns of later was started after the worker listed its stages (the reply follows).
        known = [h for h in self.stages.values() if h.worker == msg.worker]
        old = self.workers.get(msg.worker)
        if old is not None and old.ref == msg.ref and self.frontend.is_dead(old.ref):
            self.worker_lost(msg.worker, "joined again")   # (its Terminated has not been handled yet)
            old = None
        if old is not None and old.ref != msg.ref:
            if not self.frontend.is_dead(old.ref):  # a restarted worker is let in once its old self is dead
                raise ConfigError(f"a worker named {msg.worker!r} has joined already (host {old.host}, pid "
                                  f"{old.pid}): give each worker its own --name")
            self.worker_lost(msg.worker, "joined again")
            old = None
        # The same worker joins again (it lost the router for a while; or a new process at the same
        # endpoint, which runs none of the old one's stages): it keeps the reservations of what it runs.
        rejoined = old is not None
        async with self._membership:
            if not rejoined:   # what a past self held; a live worker's reservations are its stages'
                await self.frontend.ask(self.allocator.ref, WithdrawWorker(msg.worker))
            try:
                ids = await self.frontend.ask(self.allocator.ref, AnnounceGpus(msg.worker, msg.cluster))
                if rejoined and self.workers.get(msg.worker) is not old:
                    # declared lost during that ask: its stages were dropped with their reservations
                    # unreleased (the withdrawal waits on this lock, then sees the worker back): join afresh
                    rejoined = False
                    await self.frontend.ask(self.allocator.ref, WithdrawWorker(msg.worker))
                    ids = await self.frontend.ask(self.allocator.ref, AnnounceGpus(msg.worker, msg.cluster))
            except RemoteError as e:
                event("join_refused", logging.WARNING, worker=msg.worker, error=str(e))
                raise
            node = msg.cluster["nodes"][0]["name"]
            self.workers[msg.worker] = WorkerInfo(msg.worker, msg.ref, msg.host, msg.pid, {
                f"{node}/{i}": dev for i, dev in msg.torch_devices.items()})
        if rejoined:   # the stages it does not run (stopped when it lost the router) are gone: recover them
            running = set(msg.stages)
            for h in known:
                if h.name not in running and self.stages.get(h.name) is h and not h.stopped:
                    event("stage_exited", logging.WARNING, stage=h.name, worker=msg.worker,
                          reason="not running on its worker, which joined again")
                    self.stage_gone(h, f"not running on worker {msg.worker}, which joined again")
        event("worker_joined", worker=msg.worker, host=msg.host, worker_pid=msg.pid, devices=ids,
              workers=len(self.workers), rejoined=rejoined)
        if not self.ready.is_set():
            self.state = f"waiting for workers ({len(self.workers)} of {self.min_workers})"
        if len(self.workers) >= self.min_workers:
            self.enough_workers.set()
        self._joined.set()   # (a stage launch waiting for a worker tries again)
        self._joined = asyncio.Event()
        if self.controller is not None:   # a recovery that failed for want of a live worker runs again
            self._spawn(self.controller.recovery.recover_if_down(f"worker {msg.worker} joined"))
        return ids

    def orphans(self, msg: JoinCluster) -> list[str]:
        """The stages a worker joining (again) lists that the router does not know it runs: the router
        dropped them (it declared the worker lost, or restarted), or gave up on their start.  Nothing
        would ever stop them, and they hold their device's memory outside any reservation: the
        worker stops them (JoinReply.stop)."""
        def known(name: str) -> bool:
            h = self.stages.get(name)
            if h is not None and h.worker == msg.worker and not h.stopped:
                return True
            return name in self._starting and self._starting[name][0] == msg.worker   # its reply is on its way

        out = [n for n in msg.stages if isinstance(n, str) and not known(n)]
        for n in out:
            event("stage_orphaned", logging.WARNING, stage=n, worker=msg.worker,
                  reason="the router does not know it runs there: its worker stops it")
        return out

    async def apply_usage(self, msg: DeviceUsage) -> None:
        """Book what other tenants use on a worker's devices (a DeviceUsage report) in the allocator.

        Each stage of ours the report gives a figure for is held to its own reservation (others_use,
        per stage); what ours use beside them, to what is booked beside them (the starts in flight).
        A report of a worker the router does not know (any more) is dropped: its devices left the
        allocator with it, which would refuse them.  So are figures of devices that are not the
        worker's, and figures that are not byte counts; a stage figure of a stage the router does not
        know runs there is left in the rest of `ours`."""
        from flexpipe.runtime.allocator import ReportUsage
        from flexpipe.runtime.inventory import others_use

        w = self.workers.get(msg.worker)
        if w is None or self.allocator is None:
            event("usage_ignored", logging.DEBUG, worker=msg.worker, reason="not a worker of this router")
            return
        used, ours, withheld, by_stage = (x if isinstance(x, dict) else {}
                                          for x in (msg.used, msg.ours, msg.withheld, msg.stages))
        # what we booked on each device: what of `ours` is not other tenants' (others_use, the rule);
        # per stage where the report says what each of ours there uses
        reserved: collections.Counter[str] = collections.Counter()
        stages: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
        for h in self.stages.values():
            if h.worker == w.name:
                reserved[h.device] += h.booked
                seen = by_stage.get(h.device)
                if isinstance(seen, dict) and _bytes(seen.get(h.name)):
                    stages[h.device].append((seen[h.name], h.booked))
        for worker, device, need in self._starting.values():
            if worker == w.name:
                reserved[device] += need
        external = {g: max(others_use(b, ours.get(g) if _bytes(ours.get(g)) else None, reserved[g], stages[g]),
                           withheld.get(g, 0) if _bytes(withheld.get(g, 0)) else 0)
                    for g, b in used.items() if g in w.devices and _bytes(b)}
        if external:   # sent before any await: ahead of a withdrawal of this worker's devices
            try:
                await self.frontend.ask(self.allocator.ref, ReportUsage(external))
            except ActorError as e:
                event("usage_failed", logging.WARNING, worker=w.name, error=str(e))
                return
        w.usage_reports += 1
        event("usage_applied", logging.DEBUG, worker=w.name, external=external)

    def worker_lost(self, name: str, reason: str) -> None:
        w = self.workers.pop(name, None)
        if w is None:
            return
        on_it = [h for h in self.stages.values() if h.worker == name]
        event("worker_lost", logging.WARNING, worker=name, reason=reason, stages=[h.name for h in on_it],
              workers=len(self.workers))
        for h in on_it:  # gone with their worker; the router recovers them elsewhere
            self.stages.pop(h.name, None)
            h.stopped, h.reservation = True, None  # the withdrawal drops their reservations
        self._spawn(self._withdraw(name))
        # ... and dead to this whole process, as a stage that exited is (stage_gone): a reshape in
        # progress aborts at once instead of asking them until its asks time out (with the controller's
        # lock held, which the recovery needs: every request stalled), and the router recovers now
        for h in on_it:
            self.system.declare_dead(h.ref, f"its worker {name} is gone ({reason})")

    async def _withdraw(self, name: str) -> None:
        from flexpipe.runtime.allocator import WithdrawWorker

        async with self._membership:
            if name not in self.workers and not self.allocator.closed:  # unless it joined again meanwhile
                await self.frontend.ask(self.allocator.ref, WithdrawWorker(name))

    def stage_gone(self, h: RemoteStage, reason: str) -> None:
        """A stage process exited unasked: forget it, free its memory, and let the router recover now."""
        self.stages.pop(h.name, None)
        h.stopped = True
        self._spawn(self.release(h.reservation))
        self.system.declare_dead(h.ref, reason)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _device_kind(self) -> str:
        """The pipeline's operating point for where the cuts go (plan_shape): 'cuda' if every device is a
        GPU.  Not what a stage books: that follows its own device (`_overhead`)."""
        devs = [d for w in self.workers.values() for d in w.devices.values()]
        return "cuda" if devs and all(d.startswith("cuda") for d in devs) else "cpu"

    def _overhead(self, device: str) -> int:
        """What a stage's process books on `device` beside its weights and KV (--stage-overhead; auto: by
        the kind of that device, so a GPU stage books it however many CPU workers the cluster has)."""
        w = next((w for w in self.workers.values() if device in w.devices), None)
        kind = "cuda" if w is not None and w.devices[device].startswith("cuda") else "cpu"
        return stage_overhead(self.stage_overhead, kind)

    def _device_order(self) -> list[str]:
        """Live devices interleaved across workers (join order): w0d0, w1d0, w0d1, w1d1, ..."""
        per = [list(w.devices) for w in self.workers.values() if not self.frontend.is_dead(w.ref)]
        return [ds[i] for i in range(max(map(len, per), default=0)) for ds in per if i < len(ds)]

    async def _free(self) -> dict[str, int]:
        from flexpipe.placement.topology import Topology
        from flexpipe.runtime.allocator import InventoryQuery

        inv = await self.frontend.ask(self.allocator.ref, InventoryQuery(full=True))
        topo = Topology.from_dict(inv["cluster"])
        return {g.id: int(f) for g, f in zip(topo.gpus, topo.free)}

    def _units_bytes(self, start: int, end: int) -> int:
        """Parameters and KV pool of units [start, end), as the placer counts them (its stage_bytes)."""
        if end <= start:
            return 0
        if self._request is None:
            self._request = stage_request(self.spec.config, self.settings, 0)
        return int(self._request.stage_bytes(start, end))

    def _stage_bytes(self, start: int, end: int, device: str) -> int:
        """What a stage of units [start, end) on `device` books: parameters, KV pool, and its process's
        overhead there (`_overhead`): the placer's stage_bytes with that overhead."""
        return self._units_bytes(start, end) + self._overhead(device)

    async def _place(self, shape: Any, previous: list[tuple[int, int, str]]) -> list[str]:
        ranges = [(st.start, st.end) for st in shape.stages]
        order = self._device_order()
        return assign_devices(ranges, [self._units_bytes(a, b) for a, b in ranges], order, await self._free(),
                              previous, self._units_bytes, {d: self._overhead(d) for d in order})

    # ---- stages -------------------------------------------------------------------------------------
    async def launch_stage(self, target: str, kwargs: dict, name: str, device: str) -> RemoteStage:
        """The Controller's stage launcher: reserve the stage's memory, have the device's worker start it.

        When no live worker can take the stage now (every worker was lost: all restarted, or this router
        was paused past their heartbeat timeout; or the one asked lost this router and has not joined it
        again), it waits for the next worker to join and tries again, for up to twice the heartbeat
        timeout plus JOIN_WAIT_S: a recovery then recomputes the requests instead of failing them.  A
        stage that the live devices cannot hold fails at once (PlacementError)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2 * self.settings.heartbeat_timeout + JOIN_WAIT_S
        while True:
            joined = self._joined
            try:
                return await self._start_stage(target, kwargs, name, device)
            except (_NoLiveDevice, RemoteError) as e:
                if isinstance(e, RemoteError) and e.kind != "SenderRefused":
                    raise
                left = deadline - loop.time()
                if left > 0:
                    event("stage_waits_for_worker", logging.WARNING, stage=name, error=str(e), wait_s=round(left, 1))
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(joined.wait(), left)
                if not joined.is_set():   # no worker joined in time
                    if isinstance(e, _NoLiveDevice):   # (by its public type: a client or a log names it)
                        raise PlacementError(str(e)) from None
                    raise

    async def _start_stage(self, target: str, kwargs: dict, name: str, device: str) -> RemoteStage:
        """One try of launch_stage."""
        from flexpipe.runtime.allocator import ReserveMemory

        units = (kwargs["start"], kwargs["end"])
        w, silent = self._owner(device), set()
        while w is None or not await self._answers(w):  # its worker is gone: take another device
            if w is not None:
                silent.add(w.name)
            counts = collections.Counter(h.device for h in self.stages.values())
            free = await self._free()
            order = [d for d in self._device_order() if self._owner(d).name not in silent]
            fits = [d for d in order if free.get(d, 0) >= self._stage_bytes(*units, d)]
            if not fits:
                raise _NoLiveDevice(f"no live device has the {self._units_bytes(*units) / 2**20:.1f} MiB (and its "
                                    f"process's overhead there) free that stage {name} needs")
            new = min(fits, key=lambda d: (counts[d], order.index(d)))
            event("stage_moved", logging.WARNING, stage=name, from_device=device, to_device=new)
            device, w = new, self._owner(new)
        need = self._stage_bytes(*units, device)   # on the device it goes to (a move may change its kind)
        try:
            granted = await self.frontend.ask(self.allocator.ref, ReserveMemory({device: need}, name))
        except RemoteError as e:
            raise PlacementError(f"device {device} cannot hold stage {name} (units [{units[0]},{units[1]}), "
                                 f"{need / 2**20:.1f} MiB): {e.message}") from e
        stage_settings = ActorSettings(heartbeat_interval=self.settings.heartbeat_interval,  # bind: the worker's
                                       heartbeat_timeout=self.settings.heartbeat_timeout,
                                       start_timeout=self.settings.start_timeout,
                                       torch_threads=self.settings.torch_threads,
                                       rt_priority=self.settings.rt_priority,
                                       max_message_bytes=self.settings.max_message_bytes)
        kwargs = dict(kwargs, device=w.devices[device])
        timeout = self.settings.start_timeout
        self._starting[name] = (w.name, device, need)
        try:
            r = await self.frontend.ask(w.ref, StartStage(name, target, kwargs, stage_settings, timeout),
                                        timeout=timeout + 10.0)
        except BaseException as e:
            if isinstance(e, AskTimeout) or not isinstance(e, Exception):
                # No answer (the ask timed out, or this launch was cancelled): the worker may start the
                # stage yet, which would then run, holding its device's memory, owned by nobody
                # until the worker next joins.  It kills it, started or still starting.
                self._abandon_start(w, name, "cancelled" if not isinstance(e, Exception) else str(e))
            await self.release(granted.rid)
            raise
        finally:
            self._starting.pop(name, None)
        h = RemoteStage(self, w.name, name, r.ref, r.pid, device, units, granted.rid, need)
        self.stages[name] = h
        event("stage_started", stage=name, worker=w.name, device=device, units=list(units), stage_pid=r.pid,
              endpoint=r.ref.endpoint)
        return h

    def _abandon_start(self, w: WorkerInfo, name: str, reason: str) -> None:
        """Have `w` kill stage `name`, whose start this router gave up waiting for (fire and forget)."""
        event("stage_start_abandoned", logging.WARNING, stage=name, worker=w.name, reason=reason)
        self._spawn(self._kill_abandoned(w, name))

    async def _kill_abandoned(self, w: WorkerInfo, name: str) -> None:
        if self.frontend.closed:
            return
        try:
            await self.frontend.ask(w.ref, KillStage(name), timeout=10.0)
        except ActorError as e:   # (a worker that joins again lists it, and is told to stop it then)
            event("stage_kill_failed", logging.WARNING, stage=name, worker=w.name, error=str(e))
            return
        event("stage_killed", stage=name, worker=w.name, reason="its start was abandoned")

    async def _answers(self, w: WorkerInfo) -> bool:
        """Does `w` answer a ping within a second?  (A stage that died with its worker is replaced at
        once, not after the heartbeat timeout; a worker only slow to answer merely loses this stage.)"""
        try:
            await self.frontend.ask(w.ref, Ping(), timeout=min(1.0, self.settings.heartbeat_timeout))
            return True
        except ActorError:
            event("worker_silent", logging.WARNING, worker=w.name)
            return False

    def _owner(self, device: str) -> WorkerInfo | None:
        """The live worker that has `device` (one known dead but not yet removed does not count)."""
        return next((w for w in self.workers.values() if device in w.devices and not self.frontend.is_dead(w.ref)),
                    None)

    async def release(self, rid: str | None) -> None:
        from flexpipe.runtime.allocator import ReleaseReservation

        if rid is None or self.allocator is None or self.allocator.closed:
            return
        try:
            await self.frontend.ask(self.allocator.ref, ReleaseReservation(rid))
        except RemoteError:
            pass  # already dropped with a worker that left

    async def _resize_reservations(self) -> None:
        """After a reshape, book each kept stage for the range it now serves."""
        from flexpipe.runtime.allocator import ReserveMemory

        for sl in self.controller.slots:
            h = sl.handle
            if (sl.start, sl.end) == h.units:
                continue
            await self.release(h.reservation)
            # (h.booked stays until the new reservation is known: its process still holds that memory,
            # which a usage report meanwhile must not book as another tenant's)
            h.units, h.reservation = (sl.start, sl.end), None
            need = self._stage_bytes(sl.start, sl.end, h.device)
            try:
                h.reservation = (await self.frontend.ask(self.allocator.ref,
                                                         ReserveMemory({h.device: need}, h.name))).rid
                h.booked = need
            except RemoteError as e:
                h.booked = 0   # unbooked: what it uses shows in usage reports as not free
                event("reservation_short", logging.WARNING, stage=h.name, device=h.device, error=e.message)

    def cancel(self, rid: str, reason: str = "cancelled", queue: asyncio.Queue | None = None) -> None:
        """End request `rid` (RouterActor.cancel; `queue`: that request only, not a newer one of the id)."""
        if self.controller is not None and self.controller.router is not None:
            self.controller.router.cancel(rid, reason, queue)

    # ---- control --------------------------------------------------------------------------------------
    async def reshape(self, stages: int | None, boundaries: list | None, devices: list | None,
                      weights_from: str) -> Any:
        from flexpipe.api import plan_shape
        from flexpipe.partition import PipelineShape

        if not self.ready.is_set() or not self.admitting or self.down is not None:
            raise RouterUnavailable(f"cannot reshape now ({self.state})")
        if (stages is None) == (boundaries is None):
            raise ConfigError("give either stages=N or boundaries=[0, ..., num_units]")
        c = self.controller   # (its slots name the devices stages run on, a recovered one's too)
        shape = plan_shape(self.spec.config, stages, boundaries, c.shape.epoch + 1, self._device_kind())
        if devices is None:
            devices = await self._place(shape, [(sl.start, sl.end, sl.device) for sl in c.slots])
        elif not isinstance(devices, list) or len(devices) != shape.num_stages \
                or not all(isinstance(d, str) and self._owner(d) is not None for d in devices):
            # (launch_stage moves a stage whose device has no live worker elsewhere, for a worker lost
            # since the placement: a device named wrong was taken for one, and the reshape "succeeded"
            # on devices nobody asked for, with the shape naming ones that do not exist)
            raise ConfigError(f"devices must be a list of {shape.num_stages} device ids of this cluster's live "
                              f"workers, one per stage (got {devices!r:.80}); the workers have: "
                              f"{', '.join(self._device_order()) or 'none'}")
        shape = PipelineShape.from_boundaries(shape.boundaries, shape.epoch, devices)
        event("reshape_started", boundaries=shape.boundaries, devices=list(devices))
        try:
            st = await c.reshape(shape, weights_from=weights_from)
        except FlexPipeError as e:
            event("reshape_failed", logging.WARNING, error=str(e))
            raise
        await self._resize_reservations()
        event("reshaped", epoch=st.to_epoch, boundaries=st.to_boundaries, pause_ms=round(st.pause_s * 1e3, 2),
              kept=st.stages_kept, started=st.stages_started, retired=st.stages_retired)
        return st

    async def status(self) -> dict:
        from flexpipe.api import pause_histogram
        from flexpipe.runtime.allocator import InventoryQuery

        out: dict[str, Any] = {"model": self.spec.name, "state": self.state, "endpoint": self.frontend.ref.endpoint,
                               "workers": [{"name": w.name, "host": w.host, "pid": w.pid, "ref": str(w.ref),
                                            "devices": w.devices, "usage_reports": w.usage_reports}
                                           for w in self.workers.values()],
                               "allocator": await self.frontend.ask(self.allocator.ref, InventoryQuery()),
                               "stage_overhead": {k: stage_overhead(self.stage_overhead, k) for k in ("cpu", "cuda")}}
        c = self.controller
        if c is not None and c.shape is not None:
            stages = c.stage_info()
            for info, sl in zip(stages, c.slots):
                info.update(worker=sl.handle.worker, device=sl.handle.device, name=sl.handle.name)
            out.update(shape=c.shape_status(), router=c.router.status(), stages=stages,
                       reshapes=[r.to_dict() for r in c.history[-16:]], reshapes_total=len(c.history),
                       pauses=pause_histogram(c.history))
        return out


def _bytes(x: Any) -> bool:
    """Is `x` a byte count (an int >= 0; a report off the wire may carry anything)?"""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _claim_ipc(url: str, path: str) -> None:
    """Make ipc://PATH free for this router to bind, or refuse.  ZeroMQ's ipc bind replaces whatever file
    is at PATH: a second router at a path took the first one's address, silently (the first, still
    running, was reached by nobody from then on).  So: a socket something listens on is refused, one
    nobody listens on (left by a router that died) is removed, and any other file is refused."""
    if path.startswith("@"):   # Linux's abstract namespace: no file, and a second bind fails by itself
        return
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise ConfigError(f"cannot bind {url}: {e.strerror or e}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"cannot bind {url}: {path} exists and is not a socket; remove it, or give --bind "
                          "another path")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:   # nobody listens: a stale file
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        except OSError as e:
            raise ConfigError(f"cannot bind {url}: {e.strerror or e}") from None
    raise ConfigError(f"cannot bind {url}: another process listens there ({path}; another router?); stop it, "
                      "or give --bind another path")


def _file_id(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`; None when there is none (or no path)."""
    if not path or path.startswith("@"):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


async def _started(system: Any, host: str, flags: str) -> Any:
    """The system, started; ConfigError when it cannot bind on `host` (which came from `flags`)."""
    try:
        return await system.start()
    except zmq.ZMQError as e:
        raise ConfigError(f"cannot bind an endpoint on {host} ({flags}): {e}") from None


async def _until(aw: Any, stop: asyncio.Event) -> bool:
    """Wait for `aw` unless `stop` is set first; True when `aw` finished."""
    task = asyncio.ensure_future(aw)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, stopper):
            if not t.done():
                t.cancel()
    return task.done() and not task.cancelled()

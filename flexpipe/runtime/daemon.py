"""The router daemon and the worker daemon: `flexpipe router` and `flexpipe worker`.

    flexpipe router --bind tcp://10.0.0.5:5555 --model tiny --stages 2 --min-workers 2
    flexpipe worker --router tcp://10.0.0.5:5555 --devices cpu:0,cpu:1 --memory 2GB   # on each host

The router is one process: an ActorSystem bound on tcp; the *frontend* actor at --bind, which
clients (runtime/remote.py) and workers talk to; the allocator (AllocatorBehaviour), to which each
worker's devices are announced; and, once --min-workers have joined, the pipeline: Controller and
RouterActor unchanged, with a stage launcher that asks a worker to start each stage.  Stages are
placed round-robin over the workers' devices (a stage that overlaps a running one stays on its
device), and each holds an allocator reservation for its weights and KV while it runs.

A worker announces its devices (GPUs via pynvml, or CPU "devices" with a memory budget), starts
each stage as a process of its own (an ActorSystem.launch, so the stage's ref is a tcp endpoint
every peer can reach), stops or kills it when asked, and tells the router at once when one exits
unasked.  The router and each worker watch each other with heartbeats; a worker whose router goes
away stops its stages and joins again when the router is back.

Logs are one line per event, key=value (or JSON with --log-format json).  On SIGTERM the router
stops admitting, gives running requests --drain-timeout seconds to finish and ends the rest with
finish_reason "shutdown", stops the stages through their workers, closes every socket and exits 0.
Worker protocol: kinds 300-329 (the client protocol, 330-349, is in runtime/remote.py).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import json
import logging
import math
import os
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import zmq

from flexpipe.errors import (
    ActorClosed, ActorError, ConfigError, FlexPipeError, NoDriverError, PlacementError, QueueFullError, RemoteError,
    RequestError,
)
from flexpipe.runtime.actor import ActorSettings, handles
from flexpipe.runtime.messages import ActorRef, Ping, Terminated, message
from flexpipe.runtime.remote import (
    CURVE_FIELDS, Cancel, Hello, ModelInfo, Reshape, RouterUnavailable, StatusQuery, Submit, Tokens, WaitReady,
    curve_from_env, local_address_towards, parse_endpoint,
)

__all__ = ["RouterDaemon", "WorkerDaemon", "add_daemon_parsers", "assign_devices", "local_devices", "main"]

log = logging.getLogger("flexpipe.daemon")


# --- the worker protocol (kinds 300-329) -----------------------------------------------------------
@message(300)
class JoinCluster:
    """A worker joins: its devices (a cluster description) and the torch device of each local index."""
    worker: str
    ref: ActorRef
    host: str
    pid: int
    cluster: dict
    torch_devices: dict  # local device index (as str) -> "cpu" | "cuda:N"


@message(301)
class JoinReply:
    """The router accepted the worker; the device ids it knows them by."""
    router_pid: int
    model: str
    device_ids: list


@message(302)
class LeaveCluster:
    """A worker is leaving (its stages are stopped)."""
    worker: str
    reason: str = ""


@message(303)
class StartStage:
    """Start behaviour `target(**kwargs)` as a process named `name` (reply: StageStarted)."""
    name: str
    target: str
    kwargs: dict
    settings: ActorSettings
    timeout: float


@message(304)
class StageStarted:
    """A stage process is serving at `ref`."""
    name: str
    ref: ActorRef
    pid: int


@message(305)
class StopStage:
    """Stop stage `name` cleanly (killed after `timeout`); reply True."""
    name: str
    timeout: float = 5.0


@message(306)
class KillStage:
    """SIGKILL stage `name`."""
    name: str


@message(307)
class StageExited:
    """A stage process exited without being asked to (worker -> router)."""
    worker: str
    name: str
    ref: ActorRef
    reason: str


# --- structured logs ---------------------------------------------------------------------------------
def _kv(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, separators=(",", ":"), default=str)
    return s if s and not any(c in s for c in ' "=\n') else json.dumps(s)


class EventFormatter(logging.Formatter):
    """One line per record: ts=... level=... logger=... event=... key=value (or one JSON object)."""

    def __init__(self, fmt: str = "kv"):
        super().__init__()
        self.json = fmt == "json"

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        out: dict[str, Any] = {"ts": ts.isoformat(timespec="milliseconds"), "level": record.levelname.lower(),
                               "logger": record.name, "pid": record.process}
        event = getattr(record, "event", None)
        if event is not None:
            out["event"] = event
            out.update(getattr(record, "fields", {}))
        else:
            out["event"] = "log"
            out["msg"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if self.json:
            return json.dumps(out, default=str)
        return " ".join(f"{k}={_kv(v)}" for k, v in out.items())


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured event."""
    log.log(level, name, extra={"event": name, "fields": fields})


def configure_logging(fmt: str = "kv") -> None:
    """Every log record becomes one structured line on stderr; daemon events at INFO always show."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
        root.setLevel(logging.WARNING)
    for h in root.handlers:
        h.setFormatter(EventFormatter(fmt))
    log.setLevel(logging.INFO)


# --- devices ---------------------------------------------------------------------------------------------
CPU_MEMORY_DEFAULT = 2 * 2**30


def local_devices(devices: str = "auto", node: str = "", memory: int | None = None) -> tuple[Any, dict[int, str]]:
    """This worker's devices as a Topology of one node, and the torch device of each local index.

    devices: "auto" (GPUs via pynvml, else one CPU device), "cpu", "cpu:0,cpu:1", "cuda", "cuda:0,cuda:2".
    memory: the budget of each CPU device (default 2 GiB); for a GPU, a cap on what it offers.
    """
    from flexpipe.placement.topology import Node, Topology, discover_local, make_gpu

    node = node or socket.gethostname()
    items = [d.strip() for d in devices.split(",") if d.strip()] or ["auto"]
    kinds = {d.partition(":")[0] for d in items}
    if not kinds <= {"auto", "cpu", "cuda"} or len(kinds) > 1:
        raise ConfigError(f"--devices {devices!r}: give 'auto', or CPU devices (cpu, cpu:0,cpu:1), or GPUs "
                          f"(cuda, cuda:0,cuda:1), not a mix")
    kind = kinds.pop()
    if kind in ("auto", "cuda"):
        try:
            topo = discover_local(node)
        except NoDriverError:
            if kind == "cuda":
                raise
            topo = None
        if topo is not None and len(topo.gpus):
            want = {int(d.partition(":")[2]) for d in items if d.partition(":")[2]} or {g.index for g in topo.gpus}
            missing = want - {g.index for g in topo.gpus}
            if missing:
                raise ConfigError(f"--devices {devices!r}: this machine has no GPU {sorted(missing)}")
            keep = [i for i, g in enumerate(topo.gpus) if g.index in want]
            nd = topo.nodes[0]
            gpus = [topo.gpus[i] for i in keep]
            free = [min(int(topo.free[i]), memory) if memory else int(topo.free[i]) for i in keep]
            links = {k: v for k, v in nd.links.items() if k[0] in want and k[1] in want}
            t = Topology([Node(node, nd.rack, gpus, links)], name=node, free=free)
            return t, {g.index: f"cuda:{g.index}" for g in gpus}
        if kind == "cuda":
            raise NoDriverError("--devices cuda: no GPU found on this machine")
        items = ["cpu:0"]
    idx = sorted({int(d.partition(":")[2] or 0) for d in items})
    budget = memory or CPU_MEMORY_DEFAULT
    gpus = [make_gpu(node, i, "cpu", memory_bytes=budget, peak_flops=5e10, mem_bw=2e10, compute_class="cpu")
            for i in idx]
    return Topology([Node(node, "r0", gpus)], name=node), {i: "cpu" for i in idx}


def stage_bytes(cfg: Any, settings: Any, start: int, end: int) -> int:
    """Memory a stage of units [start, end) holds: its parameters and its KV pool."""
    from flexpipe.model.units import unit_costs

    dtype_bytes = {"float32": 4}.get(settings.dtype, 2)
    kv_tokens = settings.num_blocks * settings.block_size
    costs = unit_costs(cfg, dtype_bytes=dtype_bytes)[start:end]
    return sum(c.param_bytes + c.kv_bytes_per_token * kv_tokens for c in costs)


def assign_devices(ranges: Sequence[tuple[int, int]], needs: Sequence[int], order: Sequence[str],
                   free: dict[str, int], previous: Sequence[tuple[int, int, str]] = ()) -> list[str]:
    """The device of each stage of a new shape.

    A stage that overlaps a running stage stays on that stage's device (largest overlap first; a
    running stage keeps one new stage at most, a device at most its fair share) so that the
    controller keeps it in place; every other stage goes to the device with the fewest stages that
    has the memory, in `order` (devices interleaved across workers, so stages spread over them).
    """
    n = len(ranges)
    if not order:
        raise PlacementError("no devices: no worker has joined")
    free = dict(free)
    fair = math.ceil(n / len(order))
    count: collections.Counter[str] = collections.Counter()
    out: list[str | None] = [None] * n
    pairs = sorted(((min(e, pe) - max(s, ps), j, i) for j, (s, e) in enumerate(ranges)
                    for i, (ps, pe, pd) in enumerate(previous) if pd in free and min(e, pe) > max(s, ps)),
                   reverse=True)
    kept: set[int] = set()
    for _, j, i in pairs:
        d = previous[i][2]
        if out[j] is None and i not in kept and count[d] < fair:
            out[j], count[d] = d, count[d] + 1
            kept.add(i)
    for j in range(n):
        if out[j] is not None:
            continue
        fits = [d for d in order if free.get(d, 0) >= needs[j]]
        if not fits:
            best = max(free.values(), default=0)
            raise PlacementError(f"stage {j} (units [{ranges[j][0]},{ranges[j][1]})) needs {needs[j] / 2**20:.1f} "
                                 f"MiB; the most any device has free is {best / 2**20:.1f} MiB: add workers or "
                                 f"memory (--memory), or use fewer KV blocks")
        d = min(fits, key=lambda x: (count[x], order.index(x)))
        out[j] = d
        count[d] += 1
        free[d] -= needs[j]
    return out  # type: ignore[return-value]


# --- the router side ------------------------------------------------------------------------------------
@dataclass(slots=True)
class WorkerInfo:
    """A worker that joined: its ref, host, and devices (global id -> torch device)."""
    name: str
    ref: ActorRef
    host: str
    pid: int
    devices: dict[str, str]


class RemoteStage:
    """A stage process started by a worker: the handle the Controller holds (.ref .pid .stop() .kill())."""

    def __init__(self, daemon: "RouterDaemon", worker: str, name: str, ref: ActorRef, pid: int, device: str,
                 units: tuple[int, int], reservation: str | None):
        self.daemon, self.worker, self.name, self.ref, self.pid = daemon, worker, name, ref, pid
        self.device, self.units, self.reservation = device, units, reservation
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
        """Ask its worker to SIGKILL it (fire and forget)."""
        w = self.daemon.workers.get(self.worker)
        if w is not None and not self.daemon.frontend.closed:
            asyncio.get_running_loop().create_task(self.daemon.frontend.tell(w.ref, KillStage(self.name)))

    def __repr__(self) -> str:
        return f"<RemoteStage {self.name} on {self.worker} {self.device} pid={self.pid}>"


class RouterFrontend:
    """The router daemon's public mailbox: the client protocol and the worker protocol."""

    def __init__(self, daemon: "RouterDaemon"):
        self.d = daemon
        self.forwards: dict[str, asyncio.Task] = {}
        self.clients: dict[ActorRef, set[str]] = {}

    async def on_stop(self, ctx: Any) -> None:
        for t in list(self.forwards.values()):
            t.cancel()

    # ---- clients ------------------------------------------------------------------------------------
    @handles(Hello)
    def hello(self, ctx: Any, msg: Hello) -> ModelInfo:
        spec = self.d.spec
        return ModelInfo(spec.name, spec.config.to_dict(), dict(spec.source), _tokenizer_files(spec),
                         spec.config.max_position_embeddings, self.d.ready.is_set())

    @handles(WaitReady, concurrent=True)
    async def wait_ready(self, ctx: Any, msg: WaitReady) -> bool:
        try:
            await asyncio.wait_for(self.d.ready.wait(), msg.timeout)
        except asyncio.TimeoutError:
            raise RouterUnavailable(f"the pipeline is not up after {msg.timeout:g}s: {self.d.state}") from None
        return True

    @handles(Submit)
    def submit(self, ctx: Any, msg: Submit) -> bool:
        from flexpipe.model.sampling import SamplingParams

        d = self.d
        if not d.admitting:
            raise RouterUnavailable(f"the router takes no requests now ({d.state})")
        router = d.controller.router
        if len(router.sched.waiting) >= d.settings.max_queued:
            raise QueueFullError(f"{d.settings.max_queued} requests are already queued: retry later")
        vocab = d.spec.config.vocab_size
        params = SamplingParams(**msg.params).validate(vocab).resolve_seed()
        ids = list(msg.prompt)
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})")
        rid, queue = router.submit(ids, params, msg.rid)
        if msg.client not in self.clients:
            self.clients[msg.client] = set()
            ctx.watch(msg.client)
        self.clients[msg.client].add(rid)
        self.forwards[rid] = asyncio.get_running_loop().create_task(self._forward(ctx, rid, queue, msg.client))
        return True

    async def _forward(self, ctx: Any, rid: str, queue: asyncio.Queue, client: ActorRef) -> None:
        """Send a request's events to its client, in order, as many per message as are ready."""
        try:
            while True:
                evs = [await queue.get()]
                while not queue.empty():
                    evs.append(queue.get_nowait())
                last = evs[-1].finish_reason
                toks = [e.token_id for e in evs if e.token_id is not None]
                if last is not None and rid in self.d.shutdown_rids:
                    last = "shutdown"
                await ctx.tell(client, Tokens(rid, evs[0].index, toks, last))
                if last is not None:
                    return
        except ActorError:  # the client is gone: nobody reads this request any more
            self.d.cancel(rid)
        finally:
            self.forwards.pop(rid, None)
            self.clients.get(client, set()).discard(rid)

    @handles(Cancel)
    def cancel(self, ctx: Any, msg: Cancel) -> None:
        if msg.rid in self.forwards:
            self.d.cancel(msg.rid)

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
        return JoinReply(os.getpid(), self.d.spec.name, ids)

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
                self.d.cancel(rid)


def _tokenizer_files(spec: Any) -> dict[str, str]:
    if spec.source.get("kind") != "checkpoint":
        return {}
    from pathlib import Path

    d = Path(spec.source["path"])
    names = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
    return {n: (d / n).read_text() for n in names if (d / n).is_file()} if (d / "tokenizer.json").is_file() else {}


class RouterDaemon:
    """`flexpipe router`: frontend + allocator + (once enough workers joined) controller and router."""

    def __init__(self, bind: str, model: str = "tiny", stages: int = 2, *, boundaries: Sequence[int] | None = None,
                 min_workers: int = 1, drain_timeout: float = 30.0, advertise: str | None = None,
                 settings: Any = None, curve: dict[str, str] | None = None):
        from flexpipe.api import Settings

        self.kind, host, port = parse_endpoint(bind, "--bind")
        self.bind = bind if self.kind == "ipc" else f"tcp://{host}:{port or '*'}"
        wildcard = host in ("0.0.0.0", "*", "::")
        self.host = advertise or (local_address_towards("8.8.8.8") if wildcard else host or "127.0.0.1")
        if min_workers < 1:
            raise ConfigError(f"--min-workers must be at least 1 (got {min_workers}): stages run on workers")
        self.model, self.num_stages, self.boundaries = model, stages, boundaries
        self.min_workers, self.drain_timeout = min_workers, drain_timeout
        self.settings = settings or Settings()
        self.curve = dict(curve or {})  # CURVE key files of this host (ActorSettings.curve_* names)
        self.spec: Any = None
        self.system: Any = None
        self.frontend: Any = None
        self.allocator: Any = None
        self.controller: Any = None
        self.workers: dict[str, WorkerInfo] = {}
        self.stages: dict[str, RemoteStage] = {}
        self.ready = asyncio.Event()
        self.enough_workers = asyncio.Event()
        self.admitting = False
        self.state = "starting"
        self.shutdown_rids: set[str] = set()
        self._membership = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()

    # ---- life cycle -------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> int:
        """Serve until `stop` is set, then shut down cleanly; returns the exit code."""
        from flexpipe.api import ModelSpec
        from flexpipe.runtime.allocator import AllocatorBehaviour
        from flexpipe.runtime.launcher import ActorSystem

        s = self.settings
        self.spec = ModelSpec.resolve(self.model, s.seed)
        actor_settings = ActorSettings(bind=self.kind, host=self.host, heartbeat_interval=s.heartbeat_interval,
                                       heartbeat_timeout=s.heartbeat_timeout, start_timeout=s.start_timeout,
                                       torch_threads=s.torch_threads, **(self.curve if self.kind == "tcp" else {}))
        code = 0
        async with await _started(ActorSystem(actor_settings, name="router"), self.host) as system:
            self.system = system
            try:
                self.allocator = await system.spawn(AllocatorBehaviour(), "allocator")
                self.frontend = await system.spawn(RouterFrontend(self), "frontend", endpoint=self.bind)
            except zmq.ZMQError as e:
                raise ConfigError(f"cannot bind {self.bind} (or an endpoint on {self.host}): {e}") from None
            self.state = f"waiting for workers (0 of {self.min_workers})"
            event("listening", endpoint=self.frontend.ref.endpoint, model=self.spec.name,
                  stages=self.boundaries and len(self.boundaries) - 1 or self.num_stages, min_workers=self.min_workers)
            try:
                if await _until(self.enough_workers.wait(), stop):
                    await self._build()
                    await stop.wait()
            except FlexPipeError as e:
                event("failed", logging.ERROR, error=f"{type(e).__name__}: {e}")
                code = 1
            finally:
                await self._shutdown()
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

        old = self.workers.get(msg.worker)
        if old is not None and old.ref != msg.ref:
            if not self.frontend.is_dead(old.ref):  # a restarted worker is let in once its old self is dead
                raise ConfigError(f"a worker named {msg.worker!r} has joined already (host {old.host}, pid "
                                  f"{old.pid}): give each worker its own --name")
            self.worker_lost(msg.worker, "joined again")
        async with self._membership:
            await self.frontend.ask(self.allocator.ref, WithdrawWorker(msg.worker))  # what a past self held
            try:
                ids = await self.frontend.ask(self.allocator.ref, AnnounceGpus(msg.worker, msg.cluster))
            except RemoteError as e:
                event("join_refused", logging.WARNING, worker=msg.worker, error=str(e))
                raise
            node = msg.cluster["nodes"][0]["name"]
            self.workers[msg.worker] = WorkerInfo(msg.worker, msg.ref, msg.host, msg.pid, {
                f"{node}/{i}": dev for i, dev in msg.torch_devices.items()})
        event("worker_joined", worker=msg.worker, host=msg.host, worker_pid=msg.pid, devices=ids,
              workers=len(self.workers))
        if not self.ready.is_set():
            self.state = f"waiting for workers ({len(self.workers)} of {self.min_workers})"
        if len(self.workers) >= self.min_workers:
            self.enough_workers.set()
        return ids

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
        devs = [d for w in self.workers.values() for d in w.devices.values()]
        return "cuda" if devs and all(d.startswith("cuda") for d in devs) else "cpu"

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

    async def _place(self, shape: Any, previous: list[tuple[int, int, str]]) -> list[str]:
        ranges = [(st.start, st.end) for st in shape.stages]
        needs = [stage_bytes(self.spec.config, self.settings, a, b) for a, b in ranges]
        return assign_devices(ranges, needs, self._device_order(), await self._free(), previous)

    # ---- stages -------------------------------------------------------------------------------------
    async def launch_stage(self, target: str, kwargs: dict, name: str, device: str) -> RemoteStage:
        """The Controller's stage launcher: reserve the stage's memory, have the device's worker start it."""
        from flexpipe.runtime.allocator import ReserveMemory

        units = (kwargs["start"], kwargs["end"])
        need = stage_bytes(self.spec.config, self.settings, *units)
        w, silent = self._owner(device), set()
        while w is None or not await self._answers(w):  # its worker is gone: take another device
            if w is not None:
                silent.add(w.name)
            counts = collections.Counter(h.device for h in self.stages.values())
            free = await self._free()
            order = [d for d in self._device_order() if self._owner(d).name not in silent]
            fits = [d for d in order if free.get(d, 0) >= need]
            if not fits:
                raise PlacementError(f"no live device has {need / 2**20:.1f} MiB free for stage {name}")
            new = min(fits, key=lambda d: (counts[d], order.index(d)))
            event("stage_moved", logging.WARNING, stage=name, from_device=device, to_device=new)
            device, w = new, self._owner(new)
        try:
            granted = await self.frontend.ask(self.allocator.ref, ReserveMemory({device: need}, name))
        except RemoteError as e:
            raise PlacementError(f"device {device} cannot hold stage {name} (units [{units[0]},{units[1]}), "
                                 f"{need / 2**20:.1f} MiB): {e.message}") from e
        stage_settings = ActorSettings(heartbeat_interval=self.settings.heartbeat_interval,  # bind: the worker's
                                       heartbeat_timeout=self.settings.heartbeat_timeout,
                                       start_timeout=self.settings.start_timeout,
                                       torch_threads=self.settings.torch_threads)
        kwargs = dict(kwargs, device=w.devices[device])
        timeout = self.settings.start_timeout
        try:
            r = await self.frontend.ask(w.ref, StartStage(name, target, kwargs, stage_settings, timeout),
                                        timeout=timeout + 10.0)
        except BaseException:
            await self.release(granted.rid)
            raise
        h = RemoteStage(self, w.name, name, r.ref, r.pid, device, units, granted.rid)
        self.stages[name] = h
        event("stage_started", stage=name, worker=w.name, device=device, units=list(units), stage_pid=r.pid,
              endpoint=r.ref.endpoint)
        return h

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
            h.units, h.reservation = (sl.start, sl.end), None
            need = stage_bytes(self.spec.config, self.settings, sl.start, sl.end)
            try:
                h.reservation = (await self.frontend.ask(self.allocator.ref,
                                                         ReserveMemory({h.device: need}, h.name))).rid
            except RemoteError as e:
                event("reservation_short", logging.WARNING, stage=h.name, device=h.device, error=e.message)

    def cancel(self, rid: str) -> None:
        if self.controller is not None and self.controller.router is not None:
            self.controller.router.cancel(rid)

    # ---- control --------------------------------------------------------------------------------------
    async def reshape(self, stages: int | None, boundaries: list | None, devices: list | None,
                      weights_from: str) -> Any:
        from flexpipe.api import plan_shape
        from flexpipe.partition import PipelineShape

        if not self.ready.is_set() or not self.admitting:
            raise RouterUnavailable(f"cannot reshape now ({self.state})")
        if (stages is None) == (boundaries is None):
            raise ConfigError("give either stages=N or boundaries=[0, ..., num_units]")
        c = self.controller
        for sl in c.slots:  # a stage recovered on another worker runs elsewhere than the slot says:
            sl.device = sl.handle.device  # what the controller's matching must compare with
        shape = plan_shape(self.spec.config, stages, boundaries, c.shape.epoch + 1, self._device_kind())
        if devices is None:
            devices = await self._place(shape, [(sl.start, sl.end, sl.handle.device) for sl in c.slots])
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
        from flexpipe.runtime.allocator import InventoryQuery

        out: dict[str, Any] = {"model": self.spec.name, "state": self.state, "endpoint": self.frontend.ref.endpoint,
                               "workers": [{"name": w.name, "host": w.host, "pid": w.pid, "ref": str(w.ref),
                                            "devices": w.devices} for w in self.workers.values()],
                               "allocator": await self.frontend.ask(self.allocator.ref, InventoryQuery())}
        c = self.controller
        if c is not None and c.shape is not None:
            stages = c.stage_info()
            for info, sl in zip(stages, c.slots):
                info.update(worker=sl.handle.worker, device=sl.handle.device, name=sl.handle.name)
            out.update(shape=c.shape.to_dict(), router=c.router.status(), stages=stages,
                       reshapes=[r.to_dict() for r in c.history[-16:]], reshapes_total=len(c.history))
        return out


async def _started(system: Any, host: str) -> Any:
    """The system, started; ConfigError when it cannot bind on `host`."""
    try:
        return await system.start()
    except zmq.ZMQError as e:
        raise ConfigError(f"cannot bind an endpoint on {host} (--host / --advertise): {e}") from None


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


# --- the worker side ------------------------------------------------------------------------------------
class WorkerBehaviour:
    """A worker's mailbox: start, stop and kill stage processes; notice the router's end."""

    def __init__(self, daemon: "WorkerDaemon"):
        self.d = daemon

    @handles(StartStage, concurrent=True)
    async def start_stage(self, ctx: Any, msg: StartStage) -> StageStarted:
        return await self.d.start_stage(msg)

    @handles(StopStage, concurrent=True)
    async def stop_stage(self, ctx: Any, msg: StopStage) -> bool:
        await self.d.stop_stage(msg.name, msg.timeout)
        return True

    @handles(KillStage)
    def kill_stage(self, ctx: Any, msg: KillStage) -> None:
        h = self.d.stages.get(msg.name)
        if h is not None:
            self.d.stopping.add(msg.name)
            h.kill()

    @handles(Terminated, concurrent=True)
    async def terminated(self, ctx: Any, msg: Terminated) -> None:
        if msg.ref == self.d.router_ref:
            await self.d.router_lost(str(msg.reason))


class WorkerDaemon:
    """`flexpipe worker`: joins a router, starts stage processes on its devices, reports their ends."""

    def __init__(self, router: str, *, name: str | None = None, host: str | None = None, devices: str = "auto",
                 memory: int | None = None, heartbeat_interval: float = 0.5, heartbeat_timeout: float = 3.0,
                 join_timeout: float = 5.0, curve: dict[str, str] | None = None):
        from flexpipe.runtime.remote import client_settings, frontend_ref

        self.router_url = router
        self.router_ref = frontend_ref(router)
        self.settings = client_settings(router, host, curve, heartbeat_interval=heartbeat_interval,
                                        heartbeat_timeout=heartbeat_timeout)
        self.host = self.settings.host
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        if not self.name or "/" in self.name:
            raise ConfigError(f"--name {self.name!r}: a worker name is a node name, without '/'")
        self.devices, self.memory = devices, memory
        self.heartbeat_interval, self.heartbeat_timeout = heartbeat_interval, heartbeat_timeout
        self.join_timeout = join_timeout
        self.actor: Any = None
        self.stage_system: Any = None
        self.stages: dict[str, Any] = {}  # name -> ActorHandle
        self.stopping: set[str] = set()
        self.joined = False
        self.closing = False
        self._joiner: asyncio.Task | None = None
        self._watchers: set[asyncio.Task] = set()

    async def run(self, stop: asyncio.Event) -> int:
        """Serve until `stop` is set; then stop every stage and leave.  Returns the exit code."""
        from flexpipe.runtime.launcher import ActorSystem

        topo, torch_devices = local_devices(self.devices, self.name, self.memory)
        self.cluster = topo.to_dict()
        self.torch_devices = {str(i): d for i, d in torch_devices.items()}
        async with await _started(ActorSystem(self.settings, name=self.name), self.host) as system:
            self.actor = await system.spawn(WorkerBehaviour(self), self.name)
            event("started", worker=self.name, endpoint=self.actor.ref.endpoint, router=self.router_url,
                  devices={f"{self.name}/{i}": d for i, d in self.torch_devices.items()},
                  memory=[g.memory_bytes for g in topo.gpus])
            self._joiner = asyncio.get_running_loop().create_task(self._join_loop())
            await stop.wait()
            self.closing = True
            event("stopping", worker=self.name, stages=sorted(self.stages))
            self._joiner.cancel()
            await self._stop_all()
            if self.joined:
                try:
                    await self.actor.tell(self.router_ref, LeaveCluster(self.name, "worker stopped"))
                except ActorError:
                    pass  # the router is gone already
        event("stopped", worker=self.name)
        return 0

    async def _join_loop(self) -> None:
        delay, attempt = 0.2, 0
        while True:
            attempt += 1
            self.actor.watch(self.router_ref)  # (again) after a death: heartbeats say when it is gone
            try:
                reply = await self.actor.ask(self.router_ref, JoinCluster(
                    self.name, self.actor.ref, self.host, os.getpid(), self.cluster, self.torch_devices),
                    timeout=self.join_timeout)
            except RemoteError as e:  # refused (e.g. its name is taken): say so, and try again later
                event("join_refused", logging.ERROR, worker=self.name, router=self.router_url, error=e.message)
                delay = 5.0
            except ActorError as e:
                if attempt == 1 or attempt % 10 == 0:
                    event("join_retry", worker=self.name, router=self.router_url, attempt=attempt, error=str(e))
            else:
                self.joined = True
                event("joined", worker=self.name, router=self.router_url, router_pid=reply.router_pid,
                      model=reply.model, devices=reply.device_ids)
                return
            await asyncio.sleep(delay)  # back-off between attempts, not a readiness wait
            delay = min(delay * 2, 5.0)

    async def router_lost(self, reason: str) -> None:
        if not self.joined or self.closing:
            return
        self.joined = False
        event("router_lost", logging.WARNING, worker=self.name, reason=reason, stages=sorted(self.stages))
        await self._stop_all()
        if not self.closing:
            self._joiner = asyncio.get_running_loop().create_task(self._join_loop())

    async def start_stage(self, msg: StartStage) -> StageStarted:
        import dataclasses

        from flexpipe.runtime.launcher import ActorSystem

        if self.closing:
            raise ActorClosed(f"worker {self.name} is stopping")
        if msg.name in self.stages:
            raise ConfigError(f"worker {self.name} already runs a stage named {msg.name}")
        if self.stage_system is None:
            # the router's heartbeat and start settings; this worker's transport and key files
            settings = dataclasses.replace(msg.settings, bind=self.settings.bind, host=self.host,
                                           **{f: getattr(self.settings, f) for f in CURVE_FIELDS})
            self.stage_system = await ActorSystem(settings, name=f"{self.name}-stages").start()
        h = await self.stage_system.launch(msg.target, msg.kwargs, name=msg.name, timeout=msg.timeout)
        self.stages[msg.name] = h
        task = asyncio.get_running_loop().create_task(self._watch_stage(msg.name, h))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)
        event("stage_started", worker=self.name, stage=msg.name, stage_pid=h.pid, endpoint=h.ref.endpoint,
              device=msg.kwargs.get("device"), units=[msg.kwargs.get("start"), msg.kwargs.get("end")])
        return StageStarted(msg.name, h.ref, h.pid)

    async def _watch_stage(self, name: str, h: Any) -> None:
        code = await h.wait()
        if self.stages.get(name) is h:
            del self.stages[name]
        if name in self.stopping:
            self.stopping.discard(name)
            event("stage_stopped", worker=self.name, stage=name, exitcode=code)
            return
        reason = f"stage process {h.pid} exited with code {code}"
        event("stage_exited", logging.WARNING, worker=self.name, stage=name, exitcode=code)
        if self.joined:
            try:
                await self.actor.tell(self.router_ref, StageExited(self.name, name, h.ref, reason))
            except ActorError:
                pass  # the router is gone: it will not miss the stage

    async def stop_stage(self, name: str, timeout: float) -> None:
        h = self.stages.get(name)
        if h is None:
            return
        self.stopping.add(name)
        await h.stop(timeout)

    async def _stop_all(self) -> None:
        await asyncio.gather(*(self.stop_stage(n, 5.0) for n in list(self.stages)), return_exceptions=True)
        if self._watchers:
            await asyncio.wait(set(self._watchers), timeout=5.0)
        if self.stage_system is not None:
            system, self.stage_system = self.stage_system, None
            await system.aclose()


# --- command line ------------------------------------------------------------------------------------------
# flexpipe.api.Settings, listed here so that `flexpipe --help` imports no torch (a test keeps them in step)
_RUNTIME_FLAGS: list[tuple[str, type, str]] = [
    ("block_size", int, "tokens per KV block"),
    ("num_blocks", int, "KV blocks per stage"),
    ("max_batch_tokens", int, "token budget of one micro-batch"),
    ("max_batch_seqs", int, "sequences in one micro-batch at most"),
    ("max_inflight", int, "micro-batches in flight; 0: one per stage that can compute in parallel"),
    ("dtype", str, "float32, bfloat16 or float16"),
    ("transport", str, "stage hop: auto (cuda_ipc between CUDA stages of one node), message, cuda_ipc, shm"),
    ("seed", int, "weights seed of preset models"),
    ("torch_threads", int, "torch threads per stage process"),
    ("heartbeat_interval", float, "seconds between heartbeats"),
    ("heartbeat_timeout", float, "seconds without a heartbeat before a peer counts as dead"),
    ("start_timeout", float, "seconds a stage may take to start"),
    ("max_queued", int, "requests waiting at most; beyond, new ones are refused"),
]


def _env(name: str, default: Any) -> Any:
    return os.environ.get(name, default)


def add_daemon_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register `flexpipe router` and `flexpipe worker`."""
    fmt = {"choices": ["kv", "json"], "default": _env("FLEXPIPE_LOG_FORMAT", "kv"),
           "help": "log lines as key=value or JSON (env FLEXPIPE_LOG_FORMAT; default %(default)s)"}
    r = subparsers.add_parser(
        "router", help="the router daemon: serves a pipeline whose stages run on worker daemons",
        description="Run the router daemon: bind --bind for clients (flexpipe serve --router, RemoteFlexPipe) "
                    "and workers, wait for --min-workers workers, start the pipeline's stages on them, and "
                    "serve until SIGTERM (then drain, stop the stages, exit 0).")
    r.add_argument("--bind", default=_env("FLEXPIPE_ROUTER_BIND", "tcp://127.0.0.1:5555"),
                   help="tcp://HOST:PORT for clients and workers (PORT 0: a free port, logged in the "
                        "'listening' event), or ipc:///PATH when all run on this host "
                        "(env FLEXPIPE_ROUTER_BIND; default %(default)s)")
    r.add_argument("--advertise", default=None, metavar="HOST",
                   help="address peers reach this router at (default: the --bind host, or this machine's "
                        "address when it binds every interface)")
    r.add_argument("--model", default="tiny", help="preset name or HF checkpoint directory (default: tiny)")
    r.add_argument("--stages", type=int, default=2, help="pipeline stages to start with (default: 2)")
    r.add_argument("--boundaries", default=None, metavar="0,A,B,...,N",
                   help="explicit stage boundaries (unit indices) instead of --stages")
    r.add_argument("--min-workers", type=int, default=1,
                   help="workers that must join before the pipeline starts (default: 1)")
    r.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds running requests may take to finish before they end with "
                        "finish_reason 'shutdown' (default: 30)")
    r.add_argument("--log-format", **fmt)
    _add_curve_flags(r)
    g = r.add_argument_group("runtime settings (flexpipe.api.Settings; default: the runtime's own)")
    for name, typ, help_ in _RUNTIME_FLAGS:
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=help_)
    r.set_defaults(func=router_main)

    w = subparsers.add_parser(
        "worker", help="a worker daemon: offers this host's devices to a router and runs its stages",
        description="Run a worker daemon: announce this host's devices to the router, start and stop stage "
                    "processes when it asks, and report their health; on SIGTERM stop them and exit 0. "
                    "Several workers may run on one host (each with its own --name and --devices).")
    w.add_argument("--router", default=_env("FLEXPIPE_ROUTER", None), required="FLEXPIPE_ROUTER" not in os.environ,
                   help="the router's tcp://HOST:PORT or ipc:///PATH (env FLEXPIPE_ROUTER)")
    w.add_argument("--name", default=None, help="worker (and node) name, unique in the cluster "
                   "(default: HOSTNAME-PID)")
    w.add_argument("--host", default=None, help="address the router and other stages reach this worker's stages "
                   "at (default: this machine's address on the route to the router)")
    w.add_argument("--devices", default="auto", help="auto (GPUs via pynvml, else one CPU device), cpu, "
                   "cpu:0,cpu:1, cuda, or cuda:0,cuda:1 (default: auto)")
    w.add_argument("--memory", default=None, help="memory budget of each CPU device, e.g. 2GB (default: 2GiB); "
                   "for GPUs, a cap on what each offers")
    w.add_argument("--heartbeat-interval", type=float, default=0.5, help="seconds between heartbeats (default 0.5)")
    w.add_argument("--heartbeat-timeout", type=float, default=3.0,
                   help="seconds without a heartbeat before the router counts as gone (default 3)")
    w.add_argument("--log-format", **fmt)
    _add_curve_flags(w)
    w.set_defaults(func=worker_main)


def _add_curve_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("CURVE authentication of tcp endpoints (key files of `flexpipe keys`)")
    for f, help_ in zip(CURVE_FIELDS, ["server keypair (.key_secret) every tcp mailbox presents",
                                       "server public key (.key), when this host has no server secret",
                                       "this host's client keypair (.key_secret; default: the server's)",
                                       "authorized client public keys (.key file or directory)"]):
        g.add_argument("--" + f.replace("_", "-"), dest=f, default=None, metavar="FILE",
                       help=f"{help_} (env FLEXPIPE_{f.upper()})")


def _curve(args: argparse.Namespace) -> dict[str, str]:
    return {**curve_from_env(), **{f: getattr(args, f) for f in CURVE_FIELDS if getattr(args, f, None)}}


def _serve(daemon: Any) -> int:
    """Run a daemon until SIGTERM or SIGINT."""
    async def go() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            return await daemon.run(stop)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    return asyncio.run(go())


def router_main(args: argparse.Namespace) -> int:
    """`flexpipe router`."""
    from flexpipe.api import Settings

    configure_logging(args.log_format)
    settings = Settings(**{n: getattr(args, n) for n, _, _ in _RUNTIME_FLAGS if getattr(args, n) is not None})
    bounds = [int(b) for b in args.boundaries.split(",")] if args.boundaries else None
    return _serve(RouterDaemon(args.bind, args.model, args.stages, boundaries=bounds, min_workers=args.min_workers,
                               drain_timeout=args.drain_timeout, advertise=args.advertise, settings=settings,
                               curve=_curve(args)))


def worker_main(args: argparse.Namespace) -> int:
    """`flexpipe worker`."""
    from flexpipe.partition import parse_bytes

    configure_logging(args.log_format)
    memory = parse_bytes(args.memory) if args.memory else None
    return _serve(WorkerDaemon(args.router, name=args.name, host=args.host, devices=args.devices, memory=memory,
                               heartbeat_interval=args.heartbeat_interval, heartbeat_timeout=args.heartbeat_timeout,
                               curve=_curve(args)))


def main(argv: list[str] | None = None) -> int:
    """`python -m flexpipe.runtime.daemon router|worker ...` (the same as `flexpipe router|worker`)."""
    parser = argparse.ArgumentParser(prog="flexpipe-daemon")
    parser.add_argument("--log-level", default=os.environ.get("FLEXPIPE_LOG_LEVEL", "WARNING"))
    add_daemon_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    try:
        return int(args.func(args) or 0)
    except FlexPipeError as e:
        print(f"flexpipe: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

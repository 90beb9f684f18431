"""The worker daemon: offers this host's devices to a router and runs the stages it asks for."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
from typing import Any

from flexpipe.errors import ActorClosed, ActorError, ConfigError, RemoteError
from flexpipe.runtime.actor import handles
from flexpipe.runtime.daemon.devices import check_memory, local_devices, parse_devices
from flexpipe.runtime.daemon.events import event
from flexpipe.runtime.daemon.messages import (
    DeviceUsage, JoinCluster, KillStage, LeaveCluster, StageExited, StageStarted, StartStage, StopStage,
)
from flexpipe.runtime.daemon.router import _started
from flexpipe.runtime.messages import Terminated
from flexpipe.runtime.remote import CURVE_FIELDS, no_answer_hint
from flexpipe.settings import WORKER_SETTINGS

USAGE_INTERVAL_DEFAULT: float = next(s.default for s in WORKER_SETTINGS if s.name == "usage_interval")
MAX_MESSAGE_BYTES_DEFAULT: int = next(s.default for s in WORKER_SETTINGS if s.name == "max_message_bytes")


# --- the worker side ------------------------------------------------------------------------------------
class WorkerBehaviour:
    """A worker's mailbox: start, stop and kill stage processes; notice the router's end."""

    def __init__(self, daemon: "WorkerDaemon"):
        self.d = daemon

    def check_sender(self, sender: Any, msg: Any) -> str | None:
        """Stages are started, stopped and killed only by the router this worker joined (docs/security.md)."""
        if type(msg) in (StartStage, StopStage, KillStage):
            router = self.d.router_actual
            if router is None:
                return f"worker {self.d.name} has not joined a router: it takes {type(msg).__name__} from nobody"
            if sender != router:
                return f"{type(msg).__name__} comes from the router {router}, not {sender}"
            if type(msg) is StartStage and not self.d.joined:
                # it lost that router (and stopped its stages): a stage started now would be owned by
                # no router that knows of it; the router places it elsewhere, or again once joined
                return f"worker {self.d.name} lost its router ({router}) and has not joined it again"
        return None

    @handles(StartStage, concurrent=True)
    async def start_stage(self, ctx: Any, msg: StartStage) -> StageStarted:
        return await self.d.start_stage(msg)

    @handles(StopStage, concurrent=True)
    async def stop_stage(self, ctx: Any, msg: StopStage) -> bool:
        await self.d.stop_stage(msg.name, msg.timeout)
        return True

    @handles(KillStage)
    def kill_stage(self, ctx: Any, msg: KillStage) -> None:
        self.d.kill_stage(msg.name)

    @handles(Terminated, concurrent=True)
    async def terminated(self, ctx: Any, msg: Terminated) -> None:
        if msg.ref == self.d.router_ref:
            await self.d.router_lost(str(msg.reason))


class WorkerDaemon:
    """`flexpipe worker`: joins a router, starts stage processes on its devices, reports their ends."""

    def __init__(self, router: str, *, name: str | None = None, host: str | None = None, devices: str = "auto",
                 memory: int | None = None, heartbeat_interval: float = 0.5, heartbeat_timeout: float = 3.0,
                 join_timeout: float = 5.0, curve: dict[str, str] | None = None,
                 usage_interval: float = USAGE_INTERVAL_DEFAULT,
                 max_message_bytes: int = MAX_MESSAGE_BYTES_DEFAULT):
        from flexpipe.runtime.remote import client_settings, frontend_ref

        if isinstance(usage_interval, bool) or not isinstance(usage_interval, (int, float)) \
                or not math.isfinite(usage_interval) or usage_interval < 0:
            raise ConfigError(f"--usage-interval {usage_interval!r}: give a number of seconds >= 0 between usage "
                              "reports (0: never report)")
        self.usage_interval = float(usage_interval)
        self.router_url = router
        self.router_ref = frontend_ref(router)
        # (its own mailbox's limit: the stages it starts take the router's, with each StartStage)
        self.settings = client_settings(router, host, curve, heartbeat_interval=heartbeat_interval,
                                        heartbeat_timeout=heartbeat_timeout, max_message_bytes=max_message_bytes)
        self.host = self.settings.host
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        if not self.name or "/" in self.name:
            raise ConfigError(f"--name {self.name!r}: a worker name is a node name, without '/'")
        parse_devices(devices)   # a bad --devices is an error now, not once serving
        self.devices, self.memory = devices, check_memory(memory)
        self.heartbeat_interval, self.heartbeat_timeout = heartbeat_interval, heartbeat_timeout
        self.join_timeout = join_timeout
        self.actor: Any = None
        self.stage_system: Any = None
        # held while the stages' actor system is made (at a first start) and while it is closed: two
        # first starts at once each made one (the first made was never closed), and one made while the
        # worker stopped its stages outlived them (_stop_all closed none, none being made yet)
        self._stage_system_lock = asyncio.Lock()
        self.stages: dict[str, Any] = {}  # name -> ActorHandle
        self.stage_devices: dict[str, str] = {}   # name -> device id of a stage in `stages` (where known)
        self.stopping: set[str] = set()
        self.starting: dict[str, asyncio.Task | None] = {}   # name -> its launch (None: not begun yet)
        self._killed_starting: dict[str, str] = {}   # starting stages killed -> why (a KillStage came...)
        self.joined = False
        self.router_actual: Any = None   # the router's ref as it gave it when this worker joined
        self.closing = False
        self._joiner: asyncio.Task | None = None
        self._reporter: asyncio.Task | None = None
        self._watchers: set[asyncio.Task] = set()
        self.withheld: dict[str, int] = {}   # device id -> bytes of a GPU this worker does not offer (--memory)
        self._inventory: Any = None          # NVML, for this worker's GPUs (runtime/inventory.py)
        self._usage_error = ""

    async def run(self, stop: asyncio.Event) -> int:
        """Serve until `stop` is set; then stop every stage and leave.  Returns the exit code."""
        from flexpipe.runtime.launcher import ActorSystem

        topo, torch_devices = local_devices(self.devices, self.name, self.memory)
        self.cluster = topo.to_dict()
        self.torch_devices = {str(i): d for i, d in torch_devices.items()}
        self.withheld = {g.id: max(0, g.memory_bytes - self.memory) if self.memory is not None else 0
                         for g in topo.gpus}
        async with await _started(ActorSystem(self.settings, name=self.name), self.host,
                                  "--host / --advertise") as system:
            self.actor = await system.spawn(WorkerBehaviour(self), self.name)
            event("started", worker=self.name, endpoint=self.actor.ref.endpoint, router=self.router_url,
                  devices={f"{self.name}/{i}": d for i, d in self.torch_devices.items()},
                  memory=[g.memory_bytes for g in topo.gpus], max_message_bytes=self.settings.max_message_bytes)
            self._joiner = asyncio.get_running_loop().create_task(self._join_loop())
            if self.usage_interval > 0:
                self._reporter = asyncio.get_running_loop().create_task(self._report_loop())
            await stop.wait()
            self.closing = True
            event("stopping", worker=self.name, stages=sorted(self.stages), starting=sorted(self.starting))
            # A stage still starting is killed, as when the router is lost: started after the others
            # were stopped, it ran on (on a stage system made meanwhile, that nothing closed).
            for n in list(self.starting):
                self.kill_stage(n, f"its worker {self.name} is stopping")
            self._joiner.cancel()
            if self._reporter is not None:
                self._reporter.cancel()
            # Leave first: the router then places the stages it recovers on other workers.  Stopped
            # first, each stage's end made it restart that stage here, which this stopping worker
            # refused, three times at once: the recovery failed and the pipeline with it.
            if self.joined:
                try:
                    await self.actor.ask(self.router_ref, LeaveCluster(self.name, "worker stopped"), timeout=5.0)
                except ActorError:
                    pass  # the router is gone already (or silent: the stages' ends still tell it)
            await self._stop_all()
        if self._inventory is not None:
            self._inventory.close()
        event("stopped", worker=self.name)
        return 0

    async def _join_loop(self) -> None:
        delay, attempt = 0.2, 0
        while True:
            attempt += 1
            self.actor.watch(self.router_ref)  # (again) after a death: heartbeats say when it is gone
            try:
                # the stages it runs (a recovery may have started some here before this join again):
                # the router keeps their reservations and recovers the stages it thought ran here
                running = sorted(n for n in self.stages if n not in self.stopping)
                reply = await self.actor.ask(self.router_ref, JoinCluster(
                    self.name, self.actor.ref, self.host, os.getpid(), self.cluster, self.torch_devices,
                    running), timeout=self.join_timeout)
            except RemoteError as e:  # refused (e.g. its name is taken): say so, and try again later
                event("join_refused", logging.ERROR, worker=self.name, router=self.router_url, error=e.message)
                delay = 5.0
            except ActorError as e:   # no answer: not running yet, gone, or (tcp) keys it does not admit
                if attempt == 1 or attempt % 10 == 0:
                    event("join_retry", worker=self.name, router=self.router_url, attempt=attempt, error=str(e),
                          hint=no_answer_hint(self.router_url, self.settings))
            else:
                self.joined = True
                self.router_actual = reply.frontend if reply.frontend is not None else self.router_ref
                event("joined", worker=self.name, router=self.router_url, router_pid=reply.router_pid,
                      model=reply.model, devices=reply.device_ids)
                orphans = [n for n in reply.stop if n in self.stages]
                if orphans:   # the router does not know them: nothing else would ever stop them
                    event("stopping_orphans", logging.WARNING, worker=self.name, stages=orphans)
                    await asyncio.gather(*(self.stop_stage(n, 5.0) for n in orphans), return_exceptions=True)
                return
            await asyncio.sleep(delay)  # back-off between attempts, not a readiness wait
            delay = min(delay * 2, 5.0)

    async def _report_loop(self) -> None:
        """Every --usage-interval seconds, while joined, tell the router what uses its devices' memory
        (DeviceUsage): the router books other tenants' share, so that placement sees it change."""
        while True:
            await asyncio.sleep(self.usage_interval)   # the period of the reports, not a readiness wait
            if self.joined:
                await self.report_usage()

    async def report_usage(self) -> None:
        """One DeviceUsage report to the router (NVML is read in a worker thread, off the event loop)."""
        own = {os.getpid(), *(h.pid for h in self.stages.values())}   # read on the loop, not in the thread
        live: dict[str, dict[str, int]] = {}   # device id -> {name: pid} of the live stages there
        for n, h in self.stages.items():
            if n in self.stage_devices and h.alive:
                live.setdefault(self.stage_devices[n], {})[n] = h.pid
        try:
            used, ours, stages = await asyncio.to_thread(self.sample_usage, own, live)
        except Exception as e:   # NVML failing now (a driver reset...): say so once, and try again
            if str(e) != self._usage_error:
                event("usage_unavailable", logging.WARNING, worker=self.name, error=f"{type(e).__name__}: {e}")
            self._usage_error = str(e)
            return
        self._usage_error = ""
        try:
            await self.actor.tell(self.router_ref, DeviceUsage(self.name, used, ours, self.withheld, stages))
        except ActorError:
            pass   # the router is gone: the join loop finds it again, and the next report goes then

    def sample_usage(self, own: set[int], live: dict[str, dict[str, int]] | None = None
                     ) -> tuple[dict[str, int], dict[str, int | None], dict[str, dict[str, int]]]:
        """Per device id: bytes every process uses; bytes this worker's own processes (it and every
        process under it: its stages, one still starting too) use, None where NVML cannot tell: where it
        has no per-process figures, or where its process list lacks a live stage of ours on that device
        (`live`: device id -> {stage name: pid}; in a container without the host's PID namespace NVML
        lists host pids, none of ours, and 0 would book our stages as other tenants' on top of their
        reservations: the router counts those reservations instead, inventory.others_use); and, where
        ours is known, what each live stage there uses (its process and those under it), so that the
        router holds each stage to its own reservation: on a device's totals one stage under its
        booking hid another's overrun.  A CPU device is a budget set aside by --memory: no other tenant
        uses any of it."""
        from flexpipe.runtime.inventory import Inventory, process_tree

        used = {g: 0 for g in self.withheld}
        ours: dict[str, int | None] = {g: 0 for g in self.withheld}
        stages: dict[str, dict[str, int]] = {}
        live = live or {}
        if any(d.startswith("cuda") for d in self.torch_devices.values()):
            if self._inventory is None:
                self._inventory = Inventory(node=self.name, worker=self.name)
            expected = {int(g.rpartition("/")[2]): set(pids.values()) for g, pids in live.items() if g in used}
            for s in self._inventory.sample(own | process_tree(os.getpid()), expected):
                gid = f"{self.name}/{s.index}"
                if gid not in used:
                    continue
                used[gid], ours[gid] = s.used, s.used_by_us
                if s.used_by_us is not None and live.get(gid):
                    stages[gid] = {n: sum(s.processes.get(p) or 0 for p in process_tree(pid))
                                   for n, pid in live[gid].items()}
        return used, ours, stages

    async def router_lost(self, reason: str) -> None:
        if not self.joined or self.closing:
            return
        self.joined = False
        event("router_lost", logging.WARNING, worker=self.name, reason=reason, stages=sorted(self.stages),
              starting=sorted(self.starting))
        # A stage still starting is killed too: the router that asked for it is gone (or no longer
        # answers), and its reply could reach nobody.  Left to start, it ran, holding its device's
        # memory, owned by no router until this worker joined again and was told to stop it.
        for n in list(self.starting):
            self.kill_stage(n, f"its worker lost its router ({reason})")
        await self._stop_all()
        if not self.closing:
            self._joiner = asyncio.get_running_loop().create_task(self._join_loop())

    async def start_stage(self, msg: StartStage) -> StageStarted:
        import dataclasses

        from flexpipe.runtime.launcher import ActorSystem

        from flexpipe.runtime.gpu_stage import GPU_TARGET, PLAIN_TARGET

        if self.closing:
            raise ActorClosed(f"worker {self.name} is stopping")
        if msg.target not in (PLAIN_TARGET, GPU_TARGET):   # nothing else may run here from the network
            raise ConfigError(f"worker {self.name} starts stages ({PLAIN_TARGET} or {GPU_TARGET}), not {msg.target!r}")
        if msg.name in self.stages or msg.name in self.starting:
            raise ConfigError(f"worker {self.name} already runs a stage named {msg.name}")
        self.starting[msg.name] = None   # from here on a KillStage ends it, started or not
        h = None
        try:
            async with self._stage_system_lock:   # made once, however many first starts come at once
                if self.stage_system is None and msg.name not in self._killed_starting:
                    # the router's heartbeat and start settings; this worker's transport and key files
                    settings = dataclasses.replace(msg.settings, bind=self.settings.bind, host=self.host,
                                                   **{f: getattr(self.settings, f) for f in CURVE_FIELDS})
                    self.stage_system = await ActorSystem(settings, name=f"{self.name}-stages").start()
            if msg.name not in self._killed_starting:
                launch = asyncio.get_running_loop().create_task(
                    self.stage_system.launch(msg.target, msg.kwargs, name=msg.name, timeout=msg.timeout))
                self.starting[msg.name] = launch
                try:
                    h = await launch
                except asyncio.CancelledError:   # kill_stage's (unless this start itself is cancelled)
                    if msg.name not in self._killed_starting or asyncio.current_task().cancelling():
                        raise
        finally:
            del self.starting[msg.name]
            killed = self._killed_starting.pop(msg.name, None)
        if killed is not None:
            if h is not None:   # it started just before the kill came: it must not run on, unowned
                self.stopping.add(msg.name)
                self._track(msg.name, h)
                h.kill()
            event("stage_start_killed", logging.WARNING, worker=self.name, stage=msg.name,
                  stage_pid=h.pid if h is not None else None, reason=killed)
            raise ActorError(f"stage {msg.name} was killed while it started: {killed}")
        self._track(msg.name, h, self._device_id(msg.kwargs.get("device")))
        event("stage_started", worker=self.name, stage=msg.name, stage_pid=h.pid, endpoint=h.ref.endpoint,
              device=msg.kwargs.get("device"), units=[msg.kwargs.get("start"), msg.kwargs.get("end")],
              max_message_bytes=self.stage_system.settings.max_message_bytes)   # (the router's)
        return StageStarted(msg.name, h.ref, h.pid)

    def _device_id(self, torch_device: Any) -> str | None:
        """The id ("worker/index") of this worker's device that torch calls `torch_device` (None: none, or
        several: every CPU device is torch's "cpu")."""
        ids = [f"{self.name}/{i}" for i, d in self.torch_devices.items() if d == torch_device]
        return ids[0] if len(ids) == 1 else None

    def _track(self, name: str, h: Any, device: str | None = None) -> None:
        """Run stage `name` (an ActorHandle) here, on device id `device`: listed when joining, reported
        when it exits unasked, and expected in NVML's process list of its device (usage reports)."""
        self.stages[name] = h
        if device is not None:
            self.stage_devices[name] = device
        else:
            self.stage_devices.pop(name, None)
        task = asyncio.get_running_loop().create_task(self._watch_stage(name, h))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _watch_stage(self, name: str, h: Any) -> None:
        code = await h.wait()
        if self.stages.get(name) is h:
            del self.stages[name]
            self.stage_devices.pop(name, None)
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

    def kill_stage(self, name: str, why: str = "its router had given up waiting for it (a KillStage came)"
                   ) -> None:
        """SIGKILL stage `name`.  One still starting (its router gave up waiting for it: StartStage
        timed out there; or this worker lost its router, or is stopping) is killed too, and its start
        fails saying `why`: its launch is cancelled, which kills its process, or, where the launch has
        not begun (the stages' actor system is starting) or has just completed, the process is never
        started, or is killed as start_stage takes it."""
        h = self.stages.get(name)
        if h is not None:
            self.stopping.add(name)
            h.kill()
        elif name in self.starting:
            self._killed_starting.setdefault(name, why)
            launch = self.starting[name]
            if launch is not None:
                launch.cancel()

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
        # A system being made (a first start's) is closed too, once made.  Every start still under way
        # was killed before this (router_lost, run): none makes another, or launches on this one.
        async with self._stage_system_lock:
            if self.stage_system is not None:
                system, self.stage_system = self.stage_system, None
                await system.aclose()

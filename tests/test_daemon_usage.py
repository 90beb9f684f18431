"""The router daemon and worker daemons in this process, on real actors (no pipeline is built: the
router waits for more workers than join): workers' usage reports, orphan stages, the memory a stage
books, and the daemons' command line errors.

Every wait is a handshake on a daemon's structured log event (a logging handler collects them), or
on a process's exit, with a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

import pytest

from flexpipe.errors import ActorError, ConfigError, PlacementError, RemoteError
from flexpipe.runtime.actor import ActorSettings
from flexpipe.runtime.daemon.messages import DeviceUsage, JoinCluster
from flexpipe.runtime.daemon.router import RemoteStage, RouterDaemon
from flexpipe.runtime.daemon.worker import WorkerDaemon
from flexpipe.runtime.launcher import ActorSystem
from flexpipe.runtime.remote import frontend_ref

pytestmark = pytest.mark.timeout(60)

MiB = 2**20
WAIT_S = 20.0   # bound on each handshake (a loaded two-core machine)


class Events(logging.Handler):
    """The daemons' structured log events in this process, for `wait`."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[dict[str, Any]] = []
        self.loop = asyncio.get_running_loop()
        self.changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        name = getattr(record, "event", None)
        if name is not None:
            self.records.append({"event": name, **getattr(record, "fields", {})})
            self.loop.call_soon_threadsafe(self.changed.set)

    def hits(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        return [r for r in list(self.records) if r["event"] == name and all(r.get(k) == v for k, v in fields.items())]

    async def wait(self, name: str, n: int = 1, timeout: float = WAIT_S, **fields: Any) -> list[dict[str, Any]]:
        """The first `n` events named `name` (with these field values); fails after `timeout`."""
        async def until() -> list[dict[str, Any]]:
            while len(self.hits(name, **fields)) < n:
                self.changed.clear()
                if len(self.hits(name, **fields)) >= n:
                    break
                await self.changed.wait()
            return self.hits(name, **fields)[:n]

        try:
            return await asyncio.wait_for(until(), timeout)
        except asyncio.TimeoutError:
            pytest.fail(f"no {n} '{name}' events {fields} within {timeout:g}s; events: {self.records[-20:]}")


@contextlib.asynccontextmanager
async def events():
    log = logging.getLogger("flexpipe.daemon")
    h, level = Events(), log.level
    log.addHandler(h)
    log.setLevel(logging.DEBUG)
    try:
        yield h
    finally:
        log.removeHandler(h)
        log.setLevel(level)


@contextlib.asynccontextmanager
async def running(daemon: Any):
    """`daemon.run(stop)` as a task; stopped (and its exit code checked) on the way out."""
    stop = asyncio.Event()
    task = asyncio.ensure_future(daemon.run(stop))
    try:
        yield task
    finally:
        stop.set()
        code = await asyncio.wait_for(task, WAIT_S)
    assert code == 0


@contextlib.asynccontextmanager
async def router(tmp_path, ev: Events, **kw: Any):
    """A RouterDaemon serving at ipc://TMP/router that waits for more workers than will join."""
    url = f"ipc://{tmp_path}/router"
    d = RouterDaemon(url, min_workers=99, **kw)
    async with running(d):
        await ev.wait("listening")
        yield d, url


async def join(actor: Any, url: str, name: str, memory: list[int], torch_device: str = "cpu",
               stages: list[str] | None = None) -> Any:
    """`actor` joins the router at `url` as worker `name` with a device of each `memory` size."""
    from flexpipe.placement.topology import Node, Topology, make_gpu

    gpus = [make_gpu(name, i, "cpu", memory_bytes=m, peak_flops=5e10, mem_bw=2e10, compute_class="cpu")
            for i, m in enumerate(memory)]
    topo = Topology([Node(name, "r0", gpus)], name=name)
    return await actor.ask(frontend_ref(url), JoinCluster(name, actor.ref, "host", os.getpid(), topo.to_dict(),
                                                          {str(i): torch_device for i in range(len(memory))},
                                                          stages or []), timeout=WAIT_S)


async def free(d: RouterDaemon) -> dict[str, int]:
    return await d._free()


# --- usage reports ------------------------------------------------------------------------------------
def refused_before_serving(argv: list[str], monkeypatch: Any, capsys: Any) -> str:
    """Run `flexpipe ARGV` (a daemon command) with serving stubbed out: it must exit 1 without
    having served; returns what it wrote to stderr."""
    import flexpipe.runtime.daemon.cli as daemon_cli
    from flexpipe.cli import main

    served: list[Any] = []
    monkeypatch.setattr(daemon_cli, "_serve", lambda daemon: served.append(daemon) or 0)
    monkeypatch.setenv("FLEXPIPE_CHILD_LOG_FORMAT", "")   # (set by the daemon's logging; undone after)
    monkeypatch.setenv("FLEXPIPE_CHILD_LOG_LEVEL", "")
    assert main(argv) == 1
    assert not served
    return capsys.readouterr().err


async def test_a_worker_reports_its_devices_usage_every_interval_and_the_router_applies_it(tmp_path):
    async with events() as ev, router(tmp_path, ev) as (d, url):
        w = WorkerDaemon(url, name="wu", devices="cpu:0,cpu:1", memory=256 * MiB, usage_interval=0.05)
        async with running(w):
            await ev.wait("joined", worker="wu")
            applied = await ev.wait("usage_applied", 3, worker="wu")
            # a CPU device is a budget set aside for this worker: other tenants use none of it
            assert applied[-1]["external"] == {"wu/0": 0, "wu/1": 0}
            assert await free(d) == {"wu/0": 256 * MiB, "wu/1": 256 * MiB}
            st = await d.status()
            assert next(x for x in st["workers"] if x["name"] == "wu")["usage_reports"] >= 3


async def test_the_router_books_other_tenants_usage_and_drops_reports_it_cannot_place(tmp_path):
    async with events() as ev, router(tmp_path, ev) as (d, url), \
            ActorSystem(ActorSettings(endpoint_dir=str(tmp_path))) as system:
        wx = await system.spawn(None, "wx")
        await join(wx, url, "wx", [1024 * MiB, 1024 * MiB])

        async def report(sender: Any, worker: str, used: dict, ours: dict | None = None, withheld: dict | None = None):
            await sender.ask(d.frontend.ref, DeviceUsage(worker, used, ours or {g: 0 for g in used}, withheld or {}),
                             timeout=WAIT_S)   # (the worker tells; an ask returns once it is applied)

        # another tenant takes 900 MiB of wx/0: a 200 MiB stage no longer fits there
        await report(wx, "wx", {"wx/0": 900 * MiB, "wx/1": 0})
        assert await free(d) == {"wx/0": 124 * MiB, "wx/1": 1024 * MiB}
        assert d._device_order() == ["wx/0", "wx/1"]
        from flexpipe.runtime.daemon.devices import assign_devices
        assert assign_devices([(0, 1)], [200 * MiB], d._device_order(), await free(d)) == ["wx/1"]
        # it is gone again: live, not the snapshot of the join
        await report(wx, "wx", {"wx/0": 0, "wx/1": 0})
        assert await free(d) == {"wx/0": 1024 * MiB, "wx/1": 1024 * MiB}
        # where NVML cannot attribute memory to processes, what the router reserved there counts as ours
        from flexpipe.runtime.allocator import ReserveMemory
        g = await d.frontend.ask(d.allocator.ref, ReserveMemory({"wx/1": 300 * MiB}, "s0"))
        d.stages["s0"] = RemoteStage(d, "wx", "s0", wx.ref, 1, "wx/1", (0, 1), g.rid, 300 * MiB)
        await report(wx, "wx", {"wx/1": 500 * MiB}, {"wx/1": None})
        assert (await free(d))["wx/1"] == 1024 * MiB - 300 * MiB - 200 * MiB
        # memory a GPU worker does not offer (beyond --memory) stays unoffered whatever others use
        await report(wx, "wx", {"wx/0": 10 * MiB}, withheld={"wx/0": 512 * MiB})
        assert (await free(d))["wx/0"] == 512 * MiB
        # a device that is not the reporter's, and figures that are not byte counts, are left alone
        await report(wx, "wx", {"wz/0": 5, "wx/0": -1, "wx/1": "lots"})
        assert await free(d) == {"wx/0": 512 * MiB, "wx/1": 524 * MiB}
        # a worker speaks for itself only
        wy = await system.spawn(None, "wy")
        with pytest.raises(RemoteError, match="SenderRefused|comes from"):
            await report(wy, "wx", {"wx/0": 0})
        # a worker the router does not know (any more): its report is dropped, the router keeps serving
        await report(wy, "wy", {"wx/0": 0})
        d.worker_lost("wx", "a test")
        await report(wx, "wx", {"wx/0": 0, "wx/1": 0})
        assert len(ev.hits("usage_ignored", worker="wx")) == 1 and len(ev.hits("usage_ignored", worker="wy")) == 1
        assert not ev.hits("usage_failed")
        await join(wx, url, "wx", [1024 * MiB])   # its devices come back with what it announces
        assert await free(d) == {"wx/0": 1024 * MiB}


def test_usage_interval_and_stage_overhead_are_checked():
    for bad in (-1, float("nan"), float("inf"), "2", True):
        with pytest.raises(ConfigError, match="--usage-interval"):
            WorkerDaemon("ipc:///tmp/router", usage_interval=bad)
    assert WorkerDaemon("ipc:///tmp/router", usage_interval=0).usage_interval == 0   # 0: never
    for bad in ("lots", "-1MiB", -1, "nan"):
        with pytest.raises(ConfigError, match="--stage-overhead"):
            RouterDaemon("ipc:///tmp/router", stage_overhead=bad)
    assert RouterDaemon("ipc:///tmp/router", stage_overhead="1GiB").stage_overhead == 2**30
    assert RouterDaemon("ipc:///tmp/router").stage_overhead is None


# --- orphan stages -------------------------------------------------------------------------------------
async def test_a_worker_joining_is_told_to_stop_the_stages_the_router_does_not_know(tmp_path):
    """A worker lists the stages it runs when it joins (again): one the router dropped (it declared
    the worker lost meanwhile, or it restarted) would run, holding its memory, for ever."""
    async with events() as ev, router(tmp_path, ev) as (d, url), \
            ActorSystem(ActorSettings(endpoint_dir=str(tmp_path))) as system:
        procs = {n: await system.launch("tests.test_actor_helpers:Echo", name=n, timeout=WAIT_S)
                 for n in ("kept", "starting", "ghost")}
        d.stages["kept"] = RemoteStage(d, "wo", "kept", procs["kept"].ref, procs["kept"].pid, "wo/0", (0, 1), None)
        d._starting["starting"] = ("wo", "wo/0", 0)   # its StageStarted is on its way to the router
        w = WorkerDaemon(url, name="wo", devices="cpu:0", memory=256 * MiB, usage_interval=0)
        for n, h in procs.items():   # as its start_stage would have them
            w._track(n, h)
        async with running(w):
            (orphaned,) = await ev.wait("stage_orphaned", worker="wo")
            assert orphaned["stage"] == "ghost"
            assert await asyncio.wait_for(procs["ghost"].wait(), WAIT_S) is not None
            assert procs["kept"].alive and procs["starting"].alive
            assert set(w.stages) == {"kept", "starting"}
        assert not any(h.alive for h in procs.values())   # the worker stopped the rest as it stopped


# --- a start the router gave up on --------------------------------------------------------------------------
async def test_a_stage_whose_start_the_router_gave_up_on_is_killed_not_left_running(tmp_path, monkeypatch):
    """The router's StartStage ask timed out while its worker was still starting the stage: started
    later, the stage ran on, holding its device's memory, owned by no router until the worker next
    joined.  The router has the worker kill it, and the worker kills a stage that is still starting."""
    from flexpipe.errors import AskTimeout
    from flexpipe.runtime.allocator import InventoryQuery
    from flexpipe.runtime.daemon.messages import StartStage
    from flexpipe.runtime.gpu_stage import PLAIN_TARGET

    gate = asyncio.Event()
    launch = ActorSystem.launch

    async def slow_launch(self, *a, **kw):   # a worker's stage start that takes until the test says
        await gate.wait()
        return await launch(self, *a, **kw)

    monkeypatch.setattr(ActorSystem, "launch", slow_launch)
    async with events() as ev, router(tmp_path, ev) as (d, url):
        w = WorkerDaemon(url, name="wk", devices="cpu:0", memory=256 * MiB, usage_interval=0)
        async with running(w):
            await ev.wait("joined", worker="wk")
            ask = d.frontend.ask

            async def impatient(target, msg, *a, **kw):   # as after start_timeout + 10 s, sooner
                if isinstance(msg, StartStage):
                    kw["timeout"] = 1.0
                return await ask(target, msg, *a, **kw)

            d.frontend.ask = impatient
            cfg = d.spec.config
            kwargs = {"config": cfg.to_dict(), "source": d.spec.source, "start": 0, "end": cfg.num_units}
            with pytest.raises(AskTimeout):
                await d.launch_stage(PLAIN_TARGET, kwargs, "stage1", "wk/0")
            d.frontend.ask = ask
            await ev.wait("stage_killed", stage="stage1", worker="wk")   # the worker answered its KillStage
            gate.set()   # the start would complete now
            await ev.wait("stage_start_killed", stage="stage1", worker="wk")
            assert not w.stages and not w.starting and not ev.hits("stage_started", worker="wk")
            for h in w.stage_system.handles if w.stage_system is not None else []:   # no process runs on
                assert await asyncio.wait_for(h.wait(), WAIT_S) is not None
            # and the router holds nothing for it
            assert not d.stages and not d._starting
            assert (await d.frontend.ask(d.allocator.ref, InventoryQuery()))["reservations"] == 0


async def test_a_stage_killed_just_as_its_start_completes_does_not_run_on(tmp_path, monkeypatch):
    """The KillStage comes after the stage's process has started but before the worker took it: the
    worker kills it then, and the router hears that its start failed."""
    from flexpipe.runtime.allocator import InventoryQuery
    from flexpipe.runtime.gpu_stage import PLAIN_TARGET

    launch = ActorSystem.launch
    workers: list[WorkerDaemon] = []

    async def killed_as_it_starts(self, *a, **kw):
        h = await launch(self, *a, **kw)
        # handled before the worker's start_stage resumes (callbacks run in the order they are scheduled)
        asyncio.get_running_loop().call_soon(workers[0].kill_stage, kw["name"])
        return h

    monkeypatch.setattr(ActorSystem, "launch", killed_as_it_starts)
    async with events() as ev, router(tmp_path, ev) as (d, url):
        w = WorkerDaemon(url, name="wk", devices="cpu:0", memory=256 * MiB, usage_interval=0)
        workers.append(w)
        async with running(w):
            await ev.wait("joined", worker="wk")
            cfg = d.spec.config
            kwargs = {"config": cfg.to_dict(), "source": d.spec.source, "start": 0, "end": cfg.num_units}
            with pytest.raises(RemoteError, match="killed while it started"):
                await d.launch_stage(PLAIN_TARGET, kwargs, "stage1", "wk/0")
            (killed,) = await ev.wait("stage_start_killed", stage="stage1", worker="wk")
            assert killed["stage_pid"] is not None   # its process had started
            (h,) = w.stage_system.handles
            assert h.pid == killed["stage_pid"] and await asyncio.wait_for(h.wait(), WAIT_S) is not None
            await ev.wait("stage_stopped", stage="stage1", worker="wk")   # (not reported as exited unasked)
            assert not w.stages and not w.starting and not ev.hits("stage_exited")
            assert not d.stages and (await d.frontend.ask(d.allocator.ref, InventoryQuery()))["reservations"] == 0


async def test_a_stage_still_starting_when_its_worker_loses_the_router_is_not_started(tmp_path, monkeypatch):
    """The worker stops its stages when it loses its router; one still starting (here: its actor
    system is being made, the stage's first start on this worker) started after that, ran, holding
    its device's memory, owned by no router, until the worker joined again and was told to stop it.
    The worker kills it as it loses the router: its start fails, and no process is left."""
    from flexpipe.runtime.gpu_stage import PLAIN_TARGET

    echo_stages(monkeypatch)
    entered, gate = asyncio.Event(), asyncio.Event()
    start = ActorSystem.start

    async def slow_stage_system(self):   # the worker's stage system starts when the test says
        if self.name.endswith("-stages") and not gate.is_set():
            entered.set()
            await gate.wait()
        return await start(self)

    monkeypatch.setattr(ActorSystem, "start", slow_stage_system)
    url = f"ipc://{tmp_path}/router"
    async with events() as ev:
        d, stop_router = RouterDaemon(url, min_workers=99), asyncio.Event()
        router_run = asyncio.ensure_future(d.run(stop_router))
        try:
            await ev.wait("listening")
            w = WorkerDaemon(url, name="wk", devices="cpu:0", memory=256 * MiB, usage_interval=0)
            async with running(w):
                await ev.wait("joined", worker="wk")
                launch = asyncio.ensure_future(d.launch_stage(PLAIN_TARGET, whole_model(d), "s0", "wk/0"))
                await asyncio.wait_for(entered.wait(), WAIT_S)
                stop_router.set()   # the router goes while the worker starts s0
                assert await asyncio.wait_for(router_run, WAIT_S) == 0
                (lost,) = await ev.wait("router_lost", worker="wk")
                assert lost["starting"] == ["s0"]
                gate.set()
                (killed,) = await ev.wait("stage_start_killed", stage="s0", worker="wk")
                assert killed["stage_pid"] is None and "lost its router" in killed["reason"]
                assert not w.stages and not w.starting and not ev.hits("stage_started", worker="wk")
                assert w.stage_system is None or not w.stage_system.handles   # no stage process was started
                with pytest.raises(ActorError):   # (the router's ask ended with its frontend)
                    await asyncio.wait_for(launch, WAIT_S)
        finally:
            stop_router.set()
            await asyncio.wait_for(router_run, WAIT_S)


# --- what a stage books --------------------------------------------------------------------------------
async def test_placement_and_reservations_book_each_stage_s_process_overhead(tmp_path):
    from flexpipe.api import Settings, plan_shape
    from flexpipe.placement.placer import STAGE_OVERHEAD_BYTES
    from flexpipe.runtime.daemon.devices import stage_overhead, stage_request

    settings = Settings(num_blocks=100)
    async with events() as ev, router(tmp_path, ev, settings=settings, stage_overhead="64MiB") as (d, url), \
            ActorSystem(ActorSettings(endpoint_dir=str(tmp_path))) as system:
        cfg = d.spec.config
        shape = plan_shape(cfg, 1)
        weights_kv = stage_request(cfg, settings, 0).stage_bytes(0, cfg.num_units)
        # wa holds the stage's weights and KV but not its process; wb holds both (whole MiB: a join
        # describes its devices' memory in MiB)
        room = -(-weights_kv // MiB) * MiB
        wa, wb = await system.spawn(None, "wa"), await system.spawn(None, "wb")
        await join(wa, url, "wa", [room + 32 * MiB])
        await join(wb, url, "wb", [room + 64 * MiB])
        assert d._device_order() == ["wa/0", "wb/0"]
        assert await d._place(shape, []) == ["wb/0"]
        assert d._stage_bytes(0, cfg.num_units, "wb/0") == weights_kv + 64 * MiB   # what launch_stage reserves
        d.worker_lost("wb", "a test")
        with pytest.raises(PlacementError, match="needs"):
            await d._place(shape, [])
    # auto: the placer's estimate of a CUDA process's context and workspace on GPUs, nothing on CPUs
    assert stage_overhead(None, "cuda") == STAGE_OVERHEAD_BYTES > 0
    assert stage_overhead(None, "cpu") == 0 and stage_overhead(0, "cuda") == 0


# --- the command line ----------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [
    ["router", "--bind", "ipc:///tmp/flexpipe-never-bound"],
    ["worker", "--router", "ipc:///tmp/flexpipe-never-bound", "--devices", "cpu:0"],
])
def test_the_module_entry_point_reports_errors_as_flexpipe_does(command, monkeypatch, capsys):
    """`python -m flexpipe.runtime.daemon` and `flexpipe`: one 'flexpipe: error:' line for a file that is
    missing (here one the daemon opens as it starts serving), and for a bad setting."""
    import flexpipe.runtime.daemon.cli as daemon_cli
    from flexpipe.cli import main as flexpipe_main

    monkeypatch.setattr(daemon_cli, "_serve", lambda daemon: open("/nonexistent/flexpipe/ckpt/config.json"))
    monkeypatch.setenv("FLEXPIPE_CHILD_LOG_FORMAT", "")   # (set by the daemon's logging; undone after)
    monkeypatch.setenv("FLEXPIPE_CHILD_LOG_LEVEL", "")
    errors = []
    for main in (daemon_cli.main, flexpipe_main):
        assert main(command) == 1
        err = capsys.readouterr().err
        assert err.startswith("flexpipe: error: ") and "Traceback" not in err, err
        errors.append(err)
    assert errors[0] == errors[1] and "/nonexistent/flexpipe/ckpt/config.json" in errors[0]
    flag = ["--stage-overhead", "-1"] if command[0] == "router" else ["--usage-interval", "nan"]
    assert daemon_cli.main([*command, *flag]) == 1
    err = capsys.readouterr().err
    assert err.startswith("flexpipe: error: " + flag[0]) and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as e:   # a usage error, as flexpipe's, not a ValueError from logging
        daemon_cli.main(["--log-level", "loud", *command])
    assert e.value.code == 2


class NvmlOfTwoGpus:
    """The pynvml calls a worker's usage report makes (there is no GPU here): GPU 0's processes are
    known, GPU 1 cannot attribute memory to processes (as in some containers)."""

    def __init__(self, processes: dict[int, int]):
        self.processes = processes   # GPU 0: pid -> bytes

    def nvmlDeviceGetCount(self): return 2
    def nvmlDeviceGetHandleByIndex(self, i): return i
    def nvmlDeviceGetName(self, h): return "NVIDIA H200"
    def nvmlDeviceGetUUID(self, h): return f"GPU-{h}"
    def nvmlDeviceGetPciInfo(self, h): return type("Pci", (), {"busId": f"0000:{h:02x}:00.0"})

    def nvmlDeviceGetMemoryInfo(self, h):
        used = sum(self.processes.values()) if h == 0 else 2 * 2**30
        return type("Mem", (), {"total": 140 * 2**30, "used": used, "free": 140 * 2**30 - used})

    def nvmlDeviceGetUtilizationRates(self, h): return type("Util", (), {"gpu": 50, "memory": 10})

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        if h == 1:
            raise RuntimeError("Not Supported")
        return [type("Proc", (), {"pid": p, "usedGpuMemory": b}) for p, b in self.processes.items()]


def test_a_gpu_worker_counts_every_process_under_it_as_its_own():
    """A stage process still starting holds its CUDA context before the worker knows its pid: it is
    the worker's all the same (a child of it), not another tenant's."""
    import subprocess
    import sys

    from flexpipe.runtime.inventory import Inventory

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdin=subprocess.DEVNULL)
    try:
        other = os.getppid()   # a process that is not under this one
        nv = NvmlOfTwoGpus({child.pid: 3 * 2**30, other: 2**30})
        w = WorkerDaemon("ipc:///tmp/router", name="wg")
        w.torch_devices, w.withheld = {"0": "cuda:0", "1": "cuda:1"}, {"wg/0": 0, "wg/1": 0}   # as run() has them
        w._inventory = Inventory(nv, node="wg", worker="wg")
        used, ours, stages = w.sample_usage({os.getpid()})
        assert used == {"wg/0": 4 * 2**30, "wg/1": 2 * 2**30}
        assert ours == {"wg/0": 3 * 2**30, "wg/1": None}   # None: the router counts its reservations there
        assert stages == {}   # (no live stage)
    finally:
        child.kill()
        child.wait()


# --- what a GPU worker's reports book (a stand-in NVML; stage processes stand in for GPU stages) ------------
GiB = 2**30
HOST_PIDS = 2**22 + 1   # above any pid Linux hands out: how a container sees the pids NVML lists


def gpu_worker_devices(monkeypatch) -> None:
    """A worker given --devices cuda:0 has one 140 GiB GPU (there is none here); others are as they are."""
    import flexpipe.runtime.daemon.worker as worker_module
    from flexpipe.placement.topology import Node, Topology, make_gpu

    real = worker_module.local_devices

    def local_devices(devices: str = "auto", node: str = "", memory: int | None = None) -> Any:
        if devices != "cuda:0":
            return real(devices, node, memory)
        return Topology([Node(node, "r0", [make_gpu(node, 0, "H200", memory_bytes=140 * GiB)])], name=node), \
            {0: "cuda:0"}

    monkeypatch.setattr(worker_module, "local_devices", local_devices)


def echo_stages(monkeypatch) -> None:
    """A worker's stage processes run Echo (a real process, that needs no GPU) whatever the router asks for."""
    launch = ActorSystem.launch

    async def echo(self, target, kwargs=None, **kw):
        return await launch(self, "tests.test_actor_helpers:Echo", None, **kw)

    monkeypatch.setattr(ActorSystem, "launch", echo)


def in_mib(n: int) -> int:
    """`n` bytes as the allocator's inventory tells free memory: in whole MiB, rounded down."""
    return n // MiB * MiB


def whole_model(d: RouterDaemon) -> dict:
    cfg = d.spec.config
    return {"config": cfg.to_dict(), "source": d.spec.source, "start": 0, "end": cfg.num_units}


@contextlib.asynccontextmanager
async def gpu_worker_with_a_stage(tmp_path, monkeypatch):
    """A router and a joined worker "wg" on one stand-in GPU (reports only when asked: report_usage),
    running one stage of the whole model: yields (events, router daemon, worker, stand-in NVML, stage)."""
    from flexpipe.runtime.gpu_stage import PLAIN_TARGET
    from flexpipe.runtime.inventory import Inventory

    gpu_worker_devices(monkeypatch)
    echo_stages(monkeypatch)
    nv = NvmlOfTwoGpus({})
    async with events() as ev, router(tmp_path, ev) as (d, url):
        w = WorkerDaemon(url, name="wg", devices="cuda:0", usage_interval=0)
        w._inventory = Inventory(nv, node="wg", worker="wg")
        async with running(w):
            await ev.wait("joined", worker="wg")
            h = await d.launch_stage(PLAIN_TARGET, whole_model(d), "s0", "wg/0")
            yield ev, d, w, nv, h


async def test_in_a_container_our_stages_are_not_booked_as_other_tenants_memory(tmp_path, monkeypatch):
    """Without the host's PID namespace NVML lists every process under its host pid, none of them ours:
    what our stage used counted as other tenants' (ours 0), on top of its reservation, and free memory
    went below what is really free.  The worker says it cannot tell what ours use there (a live stage of
    its is missing from NVML's list), and the router counts its reservation instead."""
    async with gpu_worker_with_a_stage(tmp_path, monkeypatch) as (ev, d, w, nv, h):
        assert h.pid in {s.pid for s in w.stages.values()}
        nv.processes.update({HOST_PIDS: h.booked, HOST_PIDS + 1: 2 * GiB})   # our stage, another tenant
        await w.report_usage()
        (applied,) = await ev.wait("usage_applied", worker="wg")
        assert applied["external"] == {"wg/0": 2 * GiB}
        assert await free(d) == {"wg/0": in_mib(140 * GiB - h.booked - 2 * GiB)}


async def test_what_our_processes_use_beyond_what_we_booked_is_not_free(tmp_path, monkeypatch):
    """NVML names our processes: what ours use within what we booked is ours (counted once, in the
    reservation); what they use beyond it (a process of a start the router gave up on, booked for
    nothing; a stage over its estimate) is not free either, and is booked beside the other tenants'."""
    import subprocess
    import sys

    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdin=subprocess.DEVNULL)
    try:
        async with gpu_worker_with_a_stage(tmp_path, monkeypatch) as (ev, d, w, nv, h):

            async def booked_as_others(n: int, processes: dict[int, int]) -> int:
                nv.processes.clear()
                nv.processes.update({HOST_PIDS: 2 * GiB, **processes})   # another tenant's 2 GiB, and ours
                await w.report_usage()
                applied = await ev.wait("usage_applied", n, worker="wg")
                assert await free(d) == {"wg/0": in_mib(140 * GiB - h.booked - applied[-1]["external"]["wg/0"])}
                return applied[-1]["external"]["wg/0"]

            # within its booking: nothing of ours is counted twice
            assert await booked_as_others(1, {h.pid: h.booked - 256 * MiB}) == 2 * GiB
            # and an unbooked 10 GiB process of ours (a child of the worker) is not free
            assert await booked_as_others(2, {h.pid: h.booked, stray.pid: 10 * GiB}) == 12 * GiB
            # nor is what a stage uses beyond its booking
            assert await booked_as_others(3, {h.pid: h.booked + GiB}) == 3 * GiB
    finally:
        stray.kill()
        stray.wait()


async def test_one_stage_under_its_booking_does_not_hide_another_s_overrun(tmp_path, monkeypatch):
    """Two stages of ours on one GPU, one 256 MiB under its booking and one 256 MiB over: on the device's
    totals (ours == reserved) the overrun vanished, booked neither as ours nor as other tenants', and
    placement saw 256 MiB free that were not.  The worker says what each stage uses; the router holds each
    stage to its own reservation.  A report of a worker built before that (four fields) is still
    taken, by the device's totals."""
    from flexpipe.runtime.codec import build
    from flexpipe.runtime.gpu_stage import PLAIN_TARGET
    from flexpipe.runtime.inventory import others_use
    from flexpipe.runtime.messages import kind_of

    async with gpu_worker_with_a_stage(tmp_path, monkeypatch) as (ev, d, w, nv, h0):
        h1 = await d.launch_stage(PLAIN_TARGET, whole_model(d), "s1", "wg/0")
        assert h1.device == "wg/0" and {s.pid for s in w.stages.values()} == {h0.pid, h1.pid}
        nv.processes.update({HOST_PIDS: 2 * GiB, h0.pid: h0.booked - 256 * MiB, h1.pid: h1.booked + 256 * MiB})
        await w.report_usage()
        (applied,) = await ev.wait("usage_applied", worker="wg")
        assert applied["external"] == {"wg/0": 2 * GiB + 256 * MiB}   # another tenant's 2 GiB and s1's overrun
        assert await free(d) == {"wg/0": in_mib(140 * GiB - h0.booked - h1.booked - 2 * GiB - 256 * MiB)}
        # the same figures from a worker that sends no per-stage figures: the device's totals, as before
        used = sum(nv.processes.values())
        old = build(kind_of(DeviceUsage), ["wg", {"wg/0": used}, {"wg/0": used - 2 * GiB}, {"wg/0": 0}])
        assert old.stages == {}
        await w.actor.ask(d.frontend.ref, old, timeout=WAIT_S)   # (the worker tells; an ask returns once applied)
        (_, applied) = await ev.wait("usage_applied", 2, worker="wg")
        assert applied["external"] == {"wg/0": 2 * GiB}
    # the rule: stage by stage, and what ours use beside the stages against what is booked beside them
    assert others_use(10, 8, 8, [(3, 4), (5, 4)]) == 3
    assert others_use(10, 8, 8) == 2
    assert others_use(10, 9, 12, [(3, 4), (5, 4)]) == 10 - 3 - 4 - 1   # 1 of a start in flight (4 booked)
    assert others_use(10, None, 8, [(3, 4)]) == 2 and others_use(10, 8, None, [(3, 4)]) == 2


async def test_each_stage_books_the_process_overhead_of_its_own_device(tmp_path, monkeypatch):
    """With auto --stage-overhead a stage on a GPU books the placer's estimate of its process's
    overhead and one on a CPU device books none, whatever else the cluster has (the figure was the
    cluster's: 0 on GPUs too while any CPU worker was in it); a stage moved to another device (its
    worker gone) books what its new device asks."""
    from flexpipe.placement.placer import STAGE_OVERHEAD_BYTES
    from flexpipe.runtime.daemon.devices import assign_devices
    from flexpipe.runtime.gpu_stage import PLAIN_TARGET

    gpu_worker_devices(monkeypatch)
    echo_stages(monkeypatch)
    async with events() as ev, router(tmp_path, ev) as (d, url), \
            ActorSystem(ActorSettings(endpoint_dir=str(tmp_path))) as system:
        units = d._units_bytes(0, d.spec.config.num_units)
        wc = WorkerDaemon(url, name="wc", devices="cpu:0", memory=-(-units * 3 // 2 // MiB) * MiB, usage_interval=0)
        wg = WorkerDaemon(url, name="wg", devices="cuda:0", usage_interval=0)
        async with running(wc), running(wg):
            await ev.wait("joined", worker="wc")
            await ev.wait("joined", worker="wg")
            on_gpu = await d.launch_stage(PLAIN_TARGET, whole_model(d), "s0", "wg/0")
            on_cpu = await d.launch_stage(PLAIN_TARGET, whole_model(d), "s1", "wc/0")
            assert (on_gpu.booked, on_cpu.booked) == (units + STAGE_OVERHEAD_BYTES, units)
            # a stage for a CPU device whose worker is gone goes to the GPU (the CPU device is full)
            wz = await system.spawn(None, "wz")
            await join(wz, url, "wz", [1024 * MiB])
            d.worker_lost("wz", "a test")
            moved = await d.launch_stage(PLAIN_TARGET, whole_model(d), "s2", "wz/0")
            assert moved.device == "wg/0" and moved.booked == units + STAGE_OVERHEAD_BYTES
            assert (await free(d))["wg/0"] == in_mib(140 * GiB - 2 * (units + STAGE_OVERHEAD_BYTES))
            assert (await d.status())["stage_overhead"] == {"cpu": 0, "cuda": STAGE_OVERHEAD_BYTES}
    # placement counts each device's overhead as well: a stage that fits a GPU only without it goes elsewhere
    assert assign_devices([(0, 4)], [100], ["g", "c"], {"g": 150, "c": 150}, overhead={"g": 100}) == ["c"]
    with pytest.raises(PlacementError, match="needs 0.0 MiB .* with its process's overhead on a GPU"):
        assign_devices([(0, 4)], [100], ["g", "c"], {"g": 150, "c": 50}, overhead={"g": 100})


# --- the stages' actor system ------------------------------------------------------------------------------
async def test_two_first_starts_at_once_make_one_stage_system(tmp_path, monkeypatch):
    """A worker makes the actor system that runs its stage processes at its first start.  Two first
    starts at once each made one, and the first made was dropped, never closed: its ZeroMQ context and
    sockets leaked, and the stage launched on it was stopped by nothing but its own handle.  They share
    one system: both stages start on it, and stop with it as the worker stops."""
    from flexpipe.runtime.gpu_stage import PLAIN_TARGET

    echo_stages(monkeypatch)
    made: list[ActorSystem] = []
    gate, both = asyncio.Event(), asyncio.Event()
    start = ActorSystem.start

    async def stage_system(self):   # the worker's stage system is made when the test says
        if self.name.endswith("-stages"):
            await gate.wait()
            made.append(self)
        return await start(self)

    monkeypatch.setattr(ActorSystem, "start", stage_system)
    async with events() as ev, router(tmp_path, ev) as (d, url):
        w = WorkerDaemon(url, name="wk", devices="cpu:0,cpu:1", memory=256 * MiB, usage_interval=0)
        start_stage, arrived = w.start_stage, []

        async def arriving(msg):   # the worker's StartStage handler, as each request comes in
            arrived.append(msg.name)
            if len(arrived) == 2:
                both.set()
            return await start_stage(msg)

        monkeypatch.setattr(w, "start_stage", arriving)
        async with running(w):
            await ev.wait("joined", worker="wk")
            launches = asyncio.gather(d.launch_stage(PLAIN_TARGET, whole_model(d), "s0", "wk/0"),
                                      d.launch_stage(PLAIN_TARGET, whole_model(d), "s1", "wk/1"))
            await asyncio.wait_for(both.wait(), WAIT_S)   # both starts are in, before any system is made
            gate.set()
            hs = await asyncio.wait_for(launches, WAIT_S)
            assert len(made) == 1 and w.stage_system is made[0]
            assert {h.pid for h in made[0].handles} == {h.pid for h in w.stages.values()} == {h.pid for h in hs}
        # the worker stopped both stages, and closed their system
        assert sorted(e["stage"] for e in ev.hits("stage_stopped", worker="wk")) == ["s0", "s1"]
        assert not ev.hits("stage_exited") and w.stage_system is None and made[0].zctx is None
        assert not any(h.alive for h in made[0].handles)


async def test_a_start_setting_up_the_stage_system_as_its_worker_stops_leaves_nothing(tmp_path, monkeypatch):
    """The worker stops (its router still there) while a first start makes the stages' actor system:
    the worker stopped its stages and closed no system (none was made yet), the start then made one
    and launched its stage on it, and the system was never closed.  The worker kills the stages still
    starting as it stops, and closes the system they were making once it is made."""
    from flexpipe.runtime.gpu_stage import PLAIN_TARGET

    echo_stages(monkeypatch)
    entered, gate, made = asyncio.Event(), asyncio.Event(), asyncio.Event()
    systems: list[ActorSystem] = []
    start = ActorSystem.start

    async def slow_stage_system(self):   # the worker's stage system is made when the test says
        if not self.name.endswith("-stages"):
            return await start(self)
        systems.append(self)
        entered.set()
        await gate.wait()
        try:
            return await start(self)
        finally:
            made.set()

    monkeypatch.setattr(ActorSystem, "start", slow_stage_system)
    async with events() as ev, router(tmp_path, ev) as (d, url):
        w = WorkerDaemon(url, name="wk", devices="cpu:0", memory=256 * MiB, usage_interval=0)
        stop_all = w._stop_all

        async def stop_all_as_the_set_up_ends():   # the system is made only as the worker stops its stages
            gate.set()
            await stop_all()
            await asyncio.wait_for(made.wait(), WAIT_S)   # (made by now, or made now)

        monkeypatch.setattr(w, "_stop_all", stop_all_as_the_set_up_ends)
        async with running(w):
            await ev.wait("joined", worker="wk")
            launch = asyncio.ensure_future(d.launch_stage(PLAIN_TARGET, whole_model(d), "s0", "wk/0"))
            await asyncio.wait_for(entered.wait(), WAIT_S)
        # the worker has stopped, s0's system made while it stopped: closed, and no stage ran on it
        (system,) = systems
        assert w.stage_system is None and system.zctx is None and not system.handles
        (killed,) = ev.hits("stage_start_killed", stage="s0", worker="wk")
        assert killed["stage_pid"] is None and "is stopping" in killed["reason"]
        assert not ev.hits("stage_started", worker="wk") and not w.stages and not w.starting
        (stopping,) = ev.hits("stopping", worker="wk")
        assert stopping["starting"] == ["s0"]
        with pytest.raises(RemoteError, match="killed while it started"):
            await asyncio.wait_for(launch, WAIT_S)

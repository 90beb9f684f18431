"""The router daemon and two worker daemons as real processes on loopback, driven through RemoteFlexPipe.

Every wait is a handshake: a daemon's structured log line (read by a thread from its stderr) or a
reply from the router; each has a bound.  The oracle checks run in a thread, so that the client's
event loop keeps answering heartbeats while the reference model computes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import pytest

from flexpipe.errors import ConfigError, PlacementError, RequestError
from flexpipe.runtime.daemon import assign_devices
from flexpipe.runtime.remote import RemoteFlexPipe, RouterLost, RouterUnavailable
from flexpipe.transports.shm import open_rings
from tests.pipeline_helpers import check_against_oracle, request_mix, rt_allowed, run_all, thread_policies
from tests.test_daemon_usage import refused_before_serving

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
START_S = 90.0  # bound on each start-up handshake (two cores, several engineers: torch imports are slow)


def _entry() -> list[str]:
    """`python -m flexpipe.cli` once it lists router/worker, else the daemon module's own main."""
    from flexpipe.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return ["-m", "flexpipe.cli"] if "router" in sub.choices else ["-m", "flexpipe.runtime.daemon"]


class Daemon:
    """A daemon process with --log-format json; a thread collects its log lines for wait_for()."""

    started: list["Daemon"] = []

    def __init__(self, name: str, args: list[str]):
        self.name = name
        Daemon.started.append(self)
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, *_entry(), *args, "--log-format", "json"], cwd=ROOT, env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.events: list[dict] = []
        self.raw: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, name=f"log-{name}", daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._cond:
                self.raw.append(line.rstrip())
                try:
                    self.events.append(json.loads(line))
                except ValueError:
                    pass
                self._cond.notify_all()
        with self._cond:
            self.raw.append(f"<exit {self.proc.wait()}>")
            self._cond.notify_all()

    def mark(self) -> int:
        """A position in the log, for wait_for(since=...)."""
        with self._cond:
            return len(self.events)

    def wait_for(self, event: str, timeout: float = START_S, since: int = 0, **fields) -> dict:
        """The first log event named `event` (with these field values) after `since`; fails after `timeout`."""
        def found():
            return next((e for e in self.events[since:] if e.get("event") == event
                         and all(e.get(k) == v for k, v in fields.items())), None)
        with self._cond:
            self._cond.wait_for(lambda: found() is not None or self.proc.poll() is not None, timeout)
            hit = found()
        assert hit is not None, f"{self.name}: no '{event}' event within {timeout:g}s\n{logs()}"
        return hit

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, and the exit code (killed, and failed, if it does not exit in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            pytest.fail(f"{self.name} did not exit {timeout:g}s after SIGTERM\n{logs()}")


def logs(lines: int = 25) -> str:
    """The last log lines of every daemon (stage processes write to their worker's), for failures."""
    return "\n".join(f"--- {d.name} (pid {d.proc.pid}, exit {d.proc.poll()}):\n" + "\n".join(d.raw[-lines:])
                     for d in Daemon.started)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The oracle in this process on one thread: on a loaded two-core machine, two threads are ~7x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


KEYS: dict[str, str] = {}  # CURVE key files of the cluster (ActorSettings.curve_* names)


def _curve_flags() -> list[str]:
    return [a for f, path in KEYS.items() for a in ("--" + f.replace("_", "-"), path)]


def worker(name: str, url: str) -> Daemon:
    return Daemon(name, ["worker", "--router", url, "--name", name, "--devices", "cpu:0", "--memory", "1GB",
                         "--heartbeat-timeout", "5", *_curve_flags()])


def stop_daemons(daemons: list) -> None:
    """SIGTERM every daemon still running (the last started first), then wait for each (kill after 30 s)."""
    for d in reversed(daemons):
        if d.proc.poll() is None:
            d.proc.send_signal(signal.SIGTERM)
    for d in daemons:
        try:
            d.proc.wait(30)
        except subprocess.TimeoutExpired:
            d.proc.kill()
            d.proc.wait(10)


@contextlib.contextmanager
def router_and_worker(tmp: Path, *, devices: str = "cpu:0", memory: str = "1GB", stages: int = 2,
                      router_args: Sequence[str] = (), worker_args: Sequence[str] = ()):
    """A router (tiny model, `stages` stages, 100 KV blocks, ipc) and one worker `w` with `devices`; yields
    the router's URL once it serves, and stops both on the way out."""
    router = Daemon("router", ["router", "--bind", f"ipc://{tmp}/router", "--model", "tiny", "--stages", str(stages),
                               "--num-blocks", "100", "--min-workers", "1", "--heartbeat-timeout", "5", *router_args])
    daemons = [router]
    try:
        url = router.wait_for("listening")["endpoint"]
        daemons.append(Daemon("w", ["worker", "--router", url, "--name", "w", "--devices", devices,
                                    "--memory", memory, "--heartbeat-timeout", "5", *worker_args]))
        router.wait_for("ready")
        yield url
    finally:
        stop_daemons(daemons)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A router (2 stages, waits for 2 workers) and two workers with one CPU device each; every tcp
    endpoint is a CURVE server admitting one client key (the daemons' and the tests')."""
    from flexpipe.runtime.keys import create_keypair

    keys = tmp_path_factory.mktemp("keys")
    _, server = create_keypair(str(keys), "server")
    public, client = create_keypair(str(keys), "client")
    (keys / "authorized").mkdir()
    (keys / "authorized" / "client.key").write_bytes(Path(public).read_bytes())
    KEYS.update(curve_server_secret=server, curve_client_secret=client, curve_authorized=str(keys / "authorized"))
    # (100 KV blocks of 16 tokens per stage: a request holds at most 1,600 tokens, below tiny's context)
    router = Daemon("router", ["router", "--bind", "tcp://127.0.0.1:0", "--model", "tiny", "--stages", "2",
                               "--num-blocks", "100", "--min-workers", "2", "--drain-timeout", "1.5", "--heartbeat-timeout", "5",
                               *_curve_flags()])
    daemons = [router]
    try:
        url = router.wait_for("listening")["endpoint"]
        for w in ("wa", "wb"):
            daemons.append(worker(w, url))
        router.wait_for("ready")
        yield SimpleNamespace(url=url, router=router, workers=daemons[1:], all=daemons)
    finally:
        stop_daemons(daemons)   # (the list grows when a test starts a worker)


def connect(cluster) -> RemoteFlexPipe:
    return RemoteFlexPipe.connect(cluster.url, ready_timeout=30, heartbeat_timeout=5, curve=KEYS)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- placement (no processes) -------------------------------------------------------------------------
def test_assign_devices_spreads_and_keeps_running_stages():
    order = ["wa/0", "wb/0"]
    free = {"wa/0": 100, "wb/0": 100}
    assert assign_devices([(0, 9), (9, 18)], [10, 10], order, free) == ["wa/0", "wb/0"]
    # 2 -> 3 stages: the overlapping stages stay where they run, the new one goes to the emptier device
    prev = [(0, 9, "wa/0"), (9, 18, "wb/0")]
    out = assign_devices([(0, 6), (6, 12), (12, 18)], [5, 5, 5], order, free, prev)
    assert out[0] == "wa/0" and out[2] == "wb/0" and sorted(out).count("wa/0") in (1, 2)
    # 3 -> 2 stages: both workers stay in use even where the largest overlaps sit on one device
    prev3 = [(0, 6, "wa/0"), (6, 12, "wb/0"), (12, 18, "wa/0")]
    assert sorted(assign_devices([(0, 9), (9, 18)], [5, 5], order, free, prev3)) == order
    with pytest.raises(PlacementError, match="needs"):
        assign_devices([(0, 18)], [1000], order, free)


def test_a_stage_stays_on_its_device_only_if_the_device_holds_what_it_grows_by():
    # 2 -> 1: the merged stage would hold the other half's 4 GiB beside its own until the switch
    G = 1 << 30
    prev = [(0, 4, "d0"), (4, 8, "d1")]
    with pytest.raises(PlacementError, match="needs"):   # neither device has 4 GiB to spare
        assign_devices([(0, 8)], [8 * G], ["d0", "d1"], {"d0": G, "d1": G}, prev)
    assert assign_devices([(0, 8)], [8 * G], ["d0", "d1"], {"d0": 5 * G, "d1": G}, prev) == ["d0"]
    # with the stages' own sizes: units [0, 2) are small, so keeping [0, 4) -> [0, 6) on d0 needs 2
    size = lambda a, b: sum(1 if u < 2 else 10 for u in range(a, b))   # noqa: E731
    assert assign_devices([(0, 6), (6, 8)], [size(0, 6), size(6, 8)], ["d0", "d1"], {"d0": 20, "d1": 0},
                          prev, size) == ["d0", "d1"]
    # and what a kept stage grows by is no longer free for the next stage on that device
    with pytest.raises(PlacementError, match="stage 1"):
        assign_devices([(0, 6), (6, 8)], [size(0, 6), size(6, 8)], ["d0", "d1"], {"d0": 25, "d1": 0},
                       [(0, 4, "d0")], size)


def test_cuda_visible_devices_renumber_the_gpus_torch_sees():
    from flexpipe.runtime.daemon.devices import cuda_ordinals

    gpus = [0, 1, 2, 3]
    assert cuda_ordinals(gpus, None) == {0: 0, 1: 1, 2: 2, 3: 3}
    assert cuda_ordinals(gpus, "2,3") == {2: 0, 3: 1}   # NVML GPU 2 is torch's cuda:0
    assert cuda_ordinals(gpus, "3, 1") == {3: 0, 1: 1}
    assert cuda_ordinals(gpus, "1,7,2") == {1: 0}       # CUDA stops at an index it does not have
    assert cuda_ordinals(gpus, "") == {}
    with pytest.raises(ConfigError, match="write indices"):
        cuda_ordinals(gpus, "GPU-5b6a2c7e-0000")


def test_router_flags_are_runtime_settings():
    import dataclasses

    from flexpipe.api import Settings
    from flexpipe.runtime.daemon import add_daemon_parsers
    from flexpipe.settings import ROUTER_RUNTIME_SETTINGS

    fields = {f.name: f for f in dataclasses.fields(Settings)}
    for s in ROUTER_RUNTIME_SETTINGS:
        assert s.name in fields and type(fields[s.name].default) is s.type, s.name
    parser = argparse.ArgumentParser()
    add_daemon_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["router", "--num-blocks", "64", "--bind", "ipc:///tmp/x"])
    assert args.num_blocks == 64 and args.block_size is None and args.bind == "ipc:///tmp/x"
    args = parser.parse_args(["worker", "--router", "tcp://h:1", "--devices", "cpu:0,cpu:1", "--memory", "1GB"])
    assert args.devices == "cpu:0,cpu:1" and args.memory == "1GB"


@pytest.mark.parametrize("args, words", [
    (["--stages", "0"], "stages must be a whole number >= 1"),
    (["--stages", "99"], "99 stages asked but the model has only"),
    (["--boundaries", "0,a,18"], "--boundaries '0,a,18': give unit indices"),
    (["--boundaries", "0,4"], "stages end at unit 4"),
    (["--block-size", "0"], "block_size"),
])
def test_router_refuses_a_shape_it_cannot_start_before_binding(args, words, monkeypatch, capsys):
    # it used to bind, wait for workers and fail only when the first one joined
    err = refused_before_serving(["router", "--bind", "ipc:///tmp/flexpipe-never-bound", *args], monkeypatch, capsys)
    assert err.startswith("flexpipe: error: ") and words in err and "Traceback" not in err
    assert not os.path.exists("/tmp/flexpipe-never-bound")


def test_cpu_devices_each_have_their_memory_budget():
    from flexpipe.runtime.daemon import local_devices

    topo, torch_devices = local_devices("cpu:0,cpu:1", "node-x", 3 * 2**30)
    assert [g.id for g in topo.gpus] == ["node-x/0", "node-x/1"] and torch_devices == {0: "cpu", 1: "cpu"}
    assert list(topo.free) == [3 * 2**30] * 2
    with pytest.raises(ConfigError, match="not a mix"):
        local_devices("cpu:0,cuda:0", "node-x")


# --- the daemons ------------------------------------------------------------------------------------------
async def test_a_worker_joining_again_keeps_what_it_runs_and_loses_what_it_does_not(tmp_path):
    """The router's membership logic on its own actors (no worker processes): a join again from the
    worker's ref keeps the reservations of the stages it lists, and recovers the ones it does not list
    (it stopped them when it lost the router, or it is a new process at the same endpoint)."""
    from flexpipe.runtime.actor import ActorSettings
    from flexpipe.runtime.allocator import AllocatorBehaviour, InventoryQuery, ReserveMemory
    from flexpipe.runtime.daemon import local_devices
    from flexpipe.runtime.daemon.messages import JoinCluster
    from flexpipe.runtime.daemon.router import RemoteStage, RouterDaemon, RouterFrontend
    from flexpipe.runtime.launcher import ActorSystem
    from flexpipe.runtime.messages import ActorRef

    d = RouterDaemon(f"ipc://{tmp_path}/router", min_workers=9)
    async with ActorSystem(ActorSettings(endpoint_dir=str(tmp_path))) as system:
        d.system = system
        d.allocator = await system.spawn(AllocatorBehaviour(), "allocator")
        d.frontend = await system.spawn(RouterFrontend(d), "frontend")
        topo, _ = local_devices("cpu:0", "wx", 1 << 30)
        ref = ActorRef("wx", f"ipc://{tmp_path}/wx")

        async def join(*stages: str) -> None:
            await d.add_worker(JoinCluster("wx", ref, "host", 1, topo.to_dict(), {"0": "cpu"}, list(stages)))

        async def reservations() -> int:
            return (await d.frontend.ask(d.allocator.ref, InventoryQuery()))["reservations"]

        await join()
        for name in ("s0", "s1"):
            g = await d.frontend.ask(d.allocator.ref, ReserveMemory({"wx/0": 1 << 20}, name))
            d.stages[name] = RemoteStage(d, "wx", name, ActorRef(name, f"ipc://{tmp_path}/{name}"), 2, "wx/0",
                                         (0, 1), g.rid)
        await join("s0", "s1")
        assert await reservations() == 2 and set(d.stages) == {"s0", "s1"}
        await join("s1")   # s0 stopped there meanwhile: the router forgets it and gives its memory back
        await asyncio.wait(set(d._tasks), timeout=10)
        assert set(d.stages) == {"s1"} and await reservations() == 1
        assert d.frontend.is_dead(ActorRef("s0", f"ipc://{tmp_path}/s0"))   # its recovery starts now
        # declared lost while its join again waits on the allocator (the router's heartbeat verdict
        # racing the worker's JoinCluster): s1 was dropped with its reservation still booked; the
        # join then counts as a first one, so nothing stays booked for stages that no longer exist
        from flexpipe.runtime.allocator import AnnounceGpus

        ask = d.frontend.ask

        async def lost_during_the_announce(target, msg, *a, **kw):
            if isinstance(msg, AnnounceGpus):
                d.frontend.ask = ask
                d.worker_lost("wx", "no heartbeat answer (a test)")
            return await ask(target, msg, *a, **kw)

        d.frontend.ask = lost_during_the_announce
        await join("s1")
        await asyncio.wait(set(d._tasks), timeout=10)
        assert not d.stages and await reservations() == 0 and "wx" in d.workers


async def test_requests_through_the_router_equal_the_oracle(cluster):
    reqs = request_mix(8, seed=3, max_tokens=(8, 24))  # greedy and seeded, different lengths, all at once
    async with connect(cluster) as fp:
        assert fp.model_name == "tiny" and fp.max_context == fp.config.max_position_embeddings
        assert fp.max_sequence_tokens == 1600   # what the stages' KV holds, which the HTTP server offers
        outs = await run_all(fp, reqs)
        await asyncio.to_thread(check_against_oracle, fp, reqs, outs)
        assert all(o.finish_reason == "length" for o in outs)
        st = await fp.status()
        assert st["state"] == "serving"
        assert st["router"]["running"] == st["router"]["waiting"] == st["router"]["inflight"] == 0
        assert all(p["used"] == 0 for p in st["router"]["kv"])
        # streaming: indices in order, the last event carries the finish reason and no token
        events = [ev async for ev in fp.generate("stream", max_tokens=5, ignore_eos=True)]
        assert [e.index for e in events] == [0, 1, 2, 3, 4, 5]
        assert events[-1].finish_reason == "length" and events[-1].token_id is None


async def test_stages_run_on_both_workers_in_their_own_processes(cluster):
    async with connect(cluster) as fp:
        st = await fp.status()
    assert {w["name"] for w in st["workers"]} == {"wa", "wb"}
    assert {s["worker"] for s in st["stages"]} == {"wa", "wb"}
    worker_pids = {d.proc.pid for d in cluster.workers} | {cluster.router.proc.pid}
    pids = [s["pid"] for s in st["stages"]]
    assert len(set(pids)) == len(pids) and not set(pids) & worker_pids
    for s in st["stages"]:  # each worker started the stages the router placed on it
        w = next(d for d in cluster.workers if d.name == s["worker"])
        assert w.wait_for("stage_started", 5, stage=s["name"])["stage_pid"] == s["pid"]
    assert st["allocator"]["reservations"] == len(st["stages"])


async def test_reshape_through_the_client_while_requests_run(cluster):
    reqs = request_mix(6, seed=11, max_tokens=(20, 40))
    async with connect(cluster) as fp:
        before = await fp.status()
        epoch = before["shape"]["epoch"]
        traffic = asyncio.ensure_future(run_all(fp, reqs))
        up = await fp.reshape(stages=3)
        down = await fp.reshape(stages=2)
        outs = await traffic
        await asyncio.to_thread(check_against_oracle, fp, reqs, outs)
        assert up.ok and down.ok and len(up.to_boundaries) == 4 and len(down.to_boundaries) == 3
        st = await fp.status()
        assert st["shape"]["epoch"] == epoch + 2
        assert {s["worker"] for s in st["stages"]} == {"wa", "wb"}
        assert st["allocator"]["reservations"] == 2, "retired stages gave their memory back"
        # every successful reshape's pause since the router started (the server's pause histogram)
        assert st["pauses"]["count"] == before["pauses"]["count"] + 2
        assert st["pauses"]["sum"] == pytest.approx(before["pauses"]["sum"] + up.pause_s + down.pause_s)
        with pytest.raises(ConfigError):
            await fp.reshape()
    assert cluster.router.wait_for("reshaped", 5)["pause_ms"] >= 0


def test_http_server_serves_through_the_router(cluster):
    """What `flexpipe serve --router URL` runs: the OpenAI-compatible app over a RemoteFlexPipe."""
    openai = pytest.importorskip("openai", reason="the 'test' extra is not installed")
    httpx = pytest.importorskip("httpx")
    from prometheus_client.parser import text_string_to_metric_families

    from flexpipe.runtime.remote import connect as remote_connect
    from flexpipe.server import ServerThread, create_app

    app = create_app(lambda: remote_connect(cluster.url, ready_timeout=30, heartbeat_timeout=5, curve=KEYS))
    with ServerThread(app) as url:
        engine = app.state.server.engine
        with openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=60) as oai:
            c = oai.completions.create(model="tiny", prompt="over the wire", max_tokens=8, temperature=0)
            want = engine.reference_tokens("over the wire", max_tokens=8)
            assert c.choices[0].text == engine.tokenizer.decode(want)
            chunks = list(oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                      max_tokens=6, stream=True, seed=3, temperature=0.9))
            assert chunks[-1].choices[0].finish_reason == "length"
        with httpx.Client(timeout=30) as http:
            st = http.get(f"{url}/v1/flexpipe/status").json()
            metrics = {f.name: f.samples for f in text_string_to_metric_families(http.get(f"{url}/metrics").text)}
    assert {s["device"] for s in st["pipeline"]["stages"]} == {"wa/0", "wb/0"}  # each worker's device
    assert st["max_context"] == engine.max_sequence_tokens == 1600
    assert metrics["flexpipe_pipeline_stages"][0].value == 2
    # the router's pause histogram, as it counts it
    count = next(s.value for s in metrics["flexpipe_reshape_pause_seconds"] if s.name.endswith("_count"))
    assert count == st["pipeline"]["pauses"]["count"]


def test_serve_on_the_command_line_connects_to_the_router_and_serves_through_it(cluster):
    """`flexpipe serve --router URL --router-timeout S`: it asks the router before its HTTP server starts
    (so that one that does not answer is one error line, tests/test_server_cli.py), then serves; the
    key files come from FLEXPIPE_CURVE_*."""
    import queue
    import re

    httpx = pytest.importorskip("httpx")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1",
               **{f"FLEXPIPE_{f.upper()}": path for f, path in KEYS.items()})
    proc = subprocess.Popen([sys.executable, "-m", "flexpipe.cli", "serve", "--router", cluster.url,
                             "--router-timeout", "60", "--port", "0"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, name="log-serve", daemon=True).start()
    seen: list[str] = []
    try:
        url = None
        while url is None:
            line = lines.get(timeout=START_S)
            assert line is not None, f"flexpipe serve exited ({proc.wait()}):\n{''.join(seen)}"
            seen.append(line)
            m = re.search(r"chat page (http://\S+?)/\s", line)
            url = m.group(1) if m else None
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "over the wire", "max_tokens": 4,
                                                      "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        while (line := lines.get(timeout=30)) is not None:
            seen.append(line)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "waiting up to 60s for it to answer" in "".join(seen) and "Traceback" not in "".join(seen)


async def test_a_client_without_the_keys_gets_no_answer(cluster):
    with pytest.raises(RouterUnavailable, match="no answer"):
        async with RemoteFlexPipe.connect(cluster.url, ready_timeout=1.5, curve={}):
            pass
    assert cluster.router.proc.poll() is None


async def test_workers_start_stages_for_their_router_only(cluster, tmp_path):
    # any peer inside the CURVE boundary could ask a worker to run any module:attr with any kwargs
    from flexpipe.errors import RemoteError
    from flexpipe.runtime.actor import ActorSettings
    from flexpipe.runtime.daemon.messages import KillStage, StartStage
    from flexpipe.runtime.daemon.worker import WorkerDaemon
    from flexpipe.runtime.messages import ActorRef

    flag = tmp_path / "ran"
    evil = StartStage("evil", "subprocess:Popen", {"args": ["touch", str(flag)]}, ActorSettings(), 10.0)
    async with connect(cluster) as fp:
        w = (await fp.status())["workers"][0]
        ref = ActorRef(*w["ref"].split("@", 1))
        for msg in (evil, KillStage(f"{w['name']}-stage-0")):
            with pytest.raises(RemoteError, match="SenderRefused|comes from the router"):
                await fp.actor.ask(ref, msg, timeout=10)
        assert (await fp.complete("still serving", max_tokens=3)).finish_reason == "length"
    # and the router itself can start stage behaviours only
    with pytest.raises(ConfigError, match="starts stages"):
        await WorkerDaemon("tcp://127.0.0.1:1").start_stage(evil)
    assert not flag.exists()


def test_a_worker_that_lost_its_router_starts_no_stage_until_it_joins_again():
    from flexpipe.runtime.daemon.messages import StartStage, StopStage
    from flexpipe.runtime.actor import ActorSettings
    from flexpipe.runtime.daemon.worker import WorkerBehaviour, WorkerDaemon
    from flexpipe.runtime.gpu_stage import PLAIN_TARGET
    from flexpipe.runtime.messages import ActorRef

    w = WorkerDaemon("tcp://127.0.0.1:1", name="wz")
    router = ActorRef("frontend", "tcp://127.0.0.1:1")
    start = StartStage("wz-stage-0", PLAIN_TARGET, {}, ActorSettings(), 10.0)
    w.router_actual, w.joined = router, True
    assert WorkerBehaviour(w).check_sender(router, start) is None
    w.joined = False   # as router_lost leaves it, until the join loop gets a reply
    assert "lost its router" in WorkerBehaviour(w).check_sender(router, start)
    assert WorkerBehaviour(w).check_sender(router, StopStage("wz-stage-0", 1.0)) is None


async def test_a_request_cancelled_while_it_is_submitted_does_not_run_on(cluster):
    # the client gives up (an HTTP client gone) while its Submit is in flight: the router may have
    # admitted it, so it is cancelled there too, not generated to max_tokens for nobody
    async with connect(cluster) as fp:
        for delay in (0.0, 0.0005, 0.002):
            task = asyncio.ensure_future(fp.complete("abandoned", max_tokens=1500, ignore_eos=True))
            await asyncio.sleep(delay)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        for _ in range(200):
            st = (await fp.status())["router"]
            if st["running"] == st["waiting"] == 0:
                break
            await asyncio.sleep(0.05)
        assert st["running"] == st["waiting"] == 0, st


async def test_a_request_ended_by_a_stop_string_is_recorded_as_stopped_by_the_router(cluster):
    # the client finds the stop string in the text and ends the request: the router counted it as
    # cancelled (its stats, and the autoscaler, which learns only from "stop" and "length")
    async with connect(cluster) as fp:
        before = (await fp.status())["router"]
        ref = await asyncio.to_thread(fp.reference_tokens, "abc", max_tokens=20, ignore_eos=True)
        text = fp.tokenizer.decode(ref)
        stop = next(text[i:i + 2] for i in range(4, len(text) - 1) if text[i:i + 2] not in text[:i + 1])
        c = await fp.complete("abc", max_tokens=20, stop=[stop], ignore_eos=True)
        assert c.finish_reason == "stop" and c.text == text[:text.index(stop)]
        for _ in range(200):   # (the Cancel is told: polled, bounded)
            st = (await fp.status())["router"]
            if st["running"] == st["waiting"] == st["inflight"] == 0:
                break
            await asyncio.sleep(0.05)
        assert st.get("finish_stop", 0) == before.get("finish_stop", 0) + 1
        assert st.get("finish_cancelled", 0) == before.get("finish_cancelled", 0)


async def test_bad_requests_raise_typed_errors_and_the_router_keeps_serving(cluster):
    async with connect(cluster) as fp:
        with pytest.raises(RequestError, match="context"):
            await fp.complete(list(range(5)) * 500, max_tokens=4)
        with pytest.raises(RequestError):
            await fp.complete("x", max_tokens=0)
        with pytest.raises(RequestError, match="already in use"):
            agen = fp.generate("a", max_tokens=50, request_id="same")
            await agen.__anext__()
            try:
                await fp.complete("b", max_tokens=2, request_id="same")
            finally:
                await agen.aclose()
        c = await fp.complete("still serving", max_tokens=3)
        assert len(c.token_ids) == 3


async def _drain(agen) -> list:
    return [ev async for ev in agen]


async def test_a_client_whose_loop_stalls_past_the_heartbeat_timeout_hears_its_requests_were_cancelled(cluster):
    # the router declares the stalled client dead and cancels its requests; the client, its loop
    # running again, must hear of it (its streams raise RouterLost) rather than wait for ever
    async with connect(cluster) as fp:
        streams = [fp.generate(f"stalled {i}", max_tokens=1500, ignore_eos=True) for i in range(4)]
        for agen in streams:
            assert (await agen.__anext__()).token_id is not None
        mark = cluster.router.mark()
        # block this event loop (on purpose) until the router has given up on this client
        lost = cluster.router.wait_for("client_lost", 60, mark)
        assert lost["requests"] == len(streams), lost
        for agen in streams:
            with pytest.raises(RouterLost, match="declared this client dead"):
                await asyncio.wait_for(_drain(agen), 30)
        c = await fp.complete("after the stall", max_tokens=3)   # the next call finds the router again
        assert len(c.token_ids) == 3 and c.finish_reason == "length"
        st = (await fp.status())["router"]
        assert st["running"] == st["waiting"] == 0, st


async def test_a_worker_joining_again_keeps_the_reservations_of_the_stages_it_runs(cluster):
    # the same worker process joins again (as after a network blip), listing the stages it runs:
    # their memory stays booked, and they keep serving
    from flexpipe.partition import parse_bytes
    from flexpipe.runtime.daemon import local_devices
    from flexpipe.runtime.daemon.messages import JoinCluster, JoinReply
    from flexpipe.runtime.messages import ActorRef

    async with connect(cluster) as fp:
        st = await fp.status()
        assert st["allocator"]["reservations"] == len(st["stages"]) == 2
        w = next(w for w in st["workers"] if w["name"] == "wa")
        topo, torch_devices = local_devices("cpu:0", "wa", parse_bytes("1GB"))   # as `worker("wa", ...)` has it
        runs = [s["name"] for s in st["stages"] if s["worker"] == "wa"]
        assert runs
        join = JoinCluster("wa", ActorRef(*w["ref"].split("@", 1)), w["host"], w["pid"], topo.to_dict(),
                           {str(i): d for i, d in torch_devices.items()}, runs)
        mark = cluster.router.mark()
        assert isinstance(await fp.actor.ask(fp.frontend, join, timeout=30), JoinReply)
        joined = cluster.router.wait_for("worker_joined", 10, mark, worker="wa")
        after = await fp.status()
        assert after["allocator"]["reservations"] == 2, after["allocator"]
        assert joined.get("rejoined") is True, joined
        assert [s["pid"] for s in after["stages"]] == [s["pid"] for s in st["stages"]]
        assert (await fp.complete("after the join", max_tokens=4)).finish_reason == "length"


async def test_a_dead_workers_stages_restart_elsewhere_and_a_new_worker_is_used(cluster):
    wa = cluster.workers[0]
    async with connect(cluster) as fp:
        st = await fp.status()
        assert any(s["worker"] == "wa" for s in st["stages"])
        mark = cluster.router.mark()
        wa.proc.kill()  # SIGKILL: no goodbye; its stage processes notice their parent is gone and exit
        wa.proc.wait(10)
        moved = await asyncio.to_thread(cluster.router.wait_for, "stage_moved", 30, mark)
        assert moved["to_device"] == "wb/0"
        await asyncio.to_thread(cluster.router.wait_for, "stage_started", START_S, mark, stage=moved["stage"])
        reqs = request_mix(4, seed=21, max_tokens=(8, 20))
        outs = await run_all(fp, reqs)  # they finish only once the router resumed on the new stage
        await asyncio.to_thread(check_against_oracle, fp, reqs, outs)
        st = await fp.status()
        assert {s["worker"] for s in st["stages"]} == {"wb"} and st["reshapes"][-1]["kind"] == "recovery"
        # a worker under the same name joins again; the next reshape spreads the stages over both
        mark = cluster.router.mark()
        new = worker("wa", cluster.url)
        cluster.workers[0] = new
        cluster.all.append(new)
        await asyncio.to_thread(cluster.router.wait_for, "worker_joined", START_S, mark, worker="wa")
        await fp.reshape(stages=2)
        st = await fp.status()
        assert {s["worker"] for s in st["stages"]} == {"wa", "wb"}
        c = await fp.complete("after the move", max_tokens=6, seed=5, temperature=0.8)
        assert c.token_ids == await asyncio.to_thread(fp.reference_tokens, "after the move", max_tokens=6,
                                                      seed=5, temperature=0.8)
        # a worker stopped politely (SIGTERM) leaves first, then stops its stages: the router moves them
        # to the other worker, where a worker that stopped its stages first was asked to restart them
        # (and refused: it was stopping), which took the whole pipeline down
        reqs = request_mix(4, seed=23, max_tokens=(60, 90))
        tasks = asyncio.ensure_future(run_all(fp, reqs))
        mark = cluster.router.mark()
        new.proc.send_signal(signal.SIGTERM)
        assert new.proc.wait(30) == 0
        outs = await tasks
        await asyncio.to_thread(check_against_oracle, fp, reqs, outs)
        st = await fp.status()
        assert {s["worker"] for s in st["stages"]} == {"wb"} and st["reshapes"][-1]["kind"] == "recovery"
        assert cluster.router.wait_for("worker_lost", 1, mark, worker="wa")
        cluster.workers[0] = worker("wa", cluster.url)   # the next test wants both workers
        cluster.all.append(cluster.workers[0])
        await asyncio.to_thread(cluster.router.wait_for, "worker_joined", START_S, mark, worker="wa")


async def test_a_hung_stage_is_replaced_and_its_memory_released(cluster):
    # SIGSTOP: the stage answers no heartbeat; the recovery kills it through its worker, which reports
    # no exit for a stage it was asked to end: the router itself must give its reservation back
    async with connect(cluster) as fp:
        st = await fp.status()
        assert st["allocator"]["reservations"] == len(st["stages"]) == 2
        hung = st["stages"][1]["pid"]
        mark = cluster.router.mark()
        os.kill(hung, signal.SIGSTOP)
        try:
            await asyncio.to_thread(cluster.router.wait_for, "stage_killed", 30, mark)
            c = await fp.complete("after the hang", max_tokens=4)   # served once recovered
            assert len(c.token_ids) == 4
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(hung, signal.SIGCONT)
        st = await fp.status()
        assert hung not in {s["pid"] for s in st["stages"]} and st["reshapes"][-1]["kind"] == "recovery"
        assert st["allocator"]["reservations"] == len(st["stages"]) == 2, st["allocator"]


async def test_sigterm_drains_stops_stages_and_every_process_exits_0(cluster):
    async with connect(cluster) as fp:
        st = await fp.status()
        stage_pids = [s["pid"] for s in st["stages"]]
        agen = fp.generate("a long one", max_tokens=1500, ignore_eos=True)
        first = await agen.__anext__()
        assert first.token_id is not None
        cluster.router.proc.send_signal(signal.SIGTERM)
        cluster.router.wait_for("shutdown_started", 20)
        with pytest.raises(RouterUnavailable):  # no new request is admitted while draining
            await fp.complete("too late", max_tokens=2)
        events = [ev async for ev in agen]
        assert events[-1].finish_reason == "shutdown", "a cut request says why it ended"
    assert cluster.router.stop(30) == 0
    cluster.router.wait_for("requests_ended", 1, finish_reason="shutdown")
    for w in cluster.workers:  # the router stopped its stages through the workers, which stay up
        w.wait_for("router_lost", 20)
    assert not any(_alive(p) for p in stage_pids)
    assert all(w.proc.poll() is None for w in cluster.workers)
    t0 = time.monotonic()
    assert [w.stop(30) for w in cluster.workers] == [0, 0]
    assert time.monotonic() - t0 < 30


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts rings through /proc")
@pytest.mark.timeout(240)
@pytest.mark.slow   # (~30 s; shm hops through a reshape (test_gpu_cpu_parts.py) and a recovery (test_failure.py) run embedded in every `make test`)
async def test_a_router_with_shm_hops_reshapes_and_recovers_a_killed_stage(tmp_path):
    """`flexpipe router --transport shm`: the stages its workers start pass residuals through shared-memory
    rings (every receiving stage's process holds one), across a reshape under traffic and the SIGKILL of
    a stage mid-stream, whose replacement opens its own; every output equals the oracle."""
    hb = ["--heartbeat-timeout", "3"]
    router = Daemon("shm-router", ["router", "--bind", f"ipc://{tmp_path}/shm-router", "--model", "tiny", "--stages",
                                   "2", "--transport", "shm", "--min-workers", "2", *hb])
    daemons = [router]
    try:
        url = router.wait_for("listening")["endpoint"]
        for name in ("sa", "sb"):
            daemons.append(Daemon(name, ["worker", "--router", url, "--name", name, "--devices", "cpu:0",
                                         "--memory", "1GB", *hb]))
        router.wait_for("ready")
        async with RemoteFlexPipe.connect(url, ready_timeout=30, heartbeat_timeout=3) as fp:
            reqs = request_mix(6, seed=41, max_tokens=(40, 80))
            traffic = asyncio.ensure_future(run_all(fp, reqs))
            assert (await fp.reshape(stages=3)).ok
            await asyncio.to_thread(check_against_oracle, fp, reqs, await traffic)
            stages = (await fp.status())["stages"]
            assert all(open_rings(s["pid"]) for s in stages[1:]), stages

            reqs = request_mix(6, seed=43, max_tokens=(60, 120))
            traffic = asyncio.ensure_future(run_all(fp, reqs))
            stream = fp.generate("a stream across the kill", max_tokens=200, ignore_eos=True)
            first = await stream.__anext__()
            assert first.token_id is not None   # mid-stream
            victim = stages[1]["pid"]
            os.kill(victim, signal.SIGKILL)
            streamed = [ev async for ev in stream]
            await asyncio.to_thread(check_against_oracle, fp, reqs, await traffic)
            assert streamed[-1].finish_reason == "length"
            assert [first.token_id] + [ev.token_id for ev in streamed[:-1]] == await asyncio.to_thread(
                fp.reference_tokens, "a stream across the kill", max_tokens=200, ignore_eos=True)
            st = await fp.status()
            assert st["reshapes"][-1]["kind"] == "recovery" and st["reshapes"][-1]["ok"], st["reshapes"][-1]
            assert victim not in {s["pid"] for s in st["stages"]} and len(st["stages"]) == 3
            assert all(open_rings(s["pid"]) for s in st["stages"][1:]), st["stages"]
    finally:
        codes = [d.stop(30) for d in reversed(daemons)]
    assert codes == [0] * len(daemons)


@pytest.mark.skipif(not rt_allowed(), reason="this machine refuses SCHED_RR (no CAP_SYS_NICE, ulimit -r 0)")
async def test_rt_priority_reaches_the_router_and_the_stages_its_workers_start(tmp_path):
    """`flexpipe router --rt-priority 2`: the router daemon and the stage process a worker starts for
    it run SCHED_RR 2 (every thread); the worker, not asked, keeps the default; outputs equal the oracle."""
    router = Daemon("rt-router", ["router", "--bind", f"ipc://{tmp_path}/rt-router", "--model", "tiny", "--stages", "1",
                                  "--min-workers", "1", "--rt-priority", "2", "--heartbeat-timeout", "5"])
    daemons = [router]
    try:
        url = router.wait_for("listening")["endpoint"]
        daemons.append(Daemon("rt-worker", ["worker", "--router", url, "--name", "rtw", "--devices", "cpu:0",
                                            "--memory", "1GB", "--heartbeat-timeout", "5"]))
        router.wait_for("ready")
        reqs = request_mix(3, seed=5, max_tokens=(4, 10))
        async with RemoteFlexPipe.connect(url, ready_timeout=30, heartbeat_timeout=5) as fp:
            outs = await run_all(fp, reqs)
            await asyncio.to_thread(check_against_oracle, fp, reqs, outs)
            (stage,) = (await fp.status())["stages"]
        assert thread_policies(stage["pid"]) == {(os.SCHED_RR, 2)}
        assert thread_policies(router.proc.pid) == {(os.SCHED_RR, 2)}
        assert thread_policies(daemons[1].proc.pid) == {(os.SCHED_OTHER, 0)}
    finally:
        codes = [d.stop(30) for d in reversed(daemons)]
    assert codes == [0] * len(daemons)


@pytest.mark.timeout(300)
async def test_a_router_restarted_at_its_address_is_noticed_by_its_worker_and_client(tmp_path):
    """systemd restarts the router within the heartbeat timeout (600 s here, so that heartbeats cannot be
    what notices): the new process has none of the old one's state.  The worker must join it again,
    and the client's open stream must end (RouterLost), not wait for ever; then the client goes on."""
    url = f"ipc://{tmp_path}/router"
    args = ["router", "--bind", url, "--model", "tiny", "--stages", "1", "--min-workers", "1",
            "--heartbeat-timeout", "600"]
    first = Daemon("router-1", args)
    daemons = [first]
    try:
        first.wait_for("listening")
        w = Daemon("rw", ["worker", "--router", url, "--name", "rw", "--devices", "cpu:0", "--memory", "1GB",
                          "--heartbeat-timeout", "600"])
        daemons.append(w)
        first.wait_for("ready")
        async with RemoteFlexPipe.connect(url, ready_timeout=30, heartbeat_timeout=600) as fp:
            agen = fp.generate("across a restart", max_tokens=1500, ignore_eos=True)
            assert (await agen.__anext__()).token_id is not None
            mark = w.mark()
            first.proc.kill()
            first.proc.wait(10)
            second = Daemon("router-2", args)
            daemons.append(second)
            with pytest.raises(RouterLost):
                await asyncio.wait_for(_drain(agen), START_S)
            await asyncio.to_thread(w.wait_for, "router_lost", START_S, mark)
            await asyncio.to_thread(w.wait_for, "joined", START_S, mark)
            await asyncio.to_thread(second.wait_for, "ready", START_S)
            c = await fp.complete("after the restart", max_tokens=4)
            assert c.token_ids == await asyncio.to_thread(fp.reference_tokens, "after the restart", max_tokens=4)
    finally:
        for d in reversed(daemons):
            if d.proc.poll() is None:
                d.stop(30)

"""The daemons' mistakes of configuration and of reporting, each with one clear answer: bad --devices and
--memory, an ipc address another router listens on, a stage killed or not, the CURVE hint of a peer
that gets no answer, and the log format of the processes a daemon starts.  The daemons run in this
process (tests/test_daemon_usage.py's helpers), on real actors; a launched child is a real process.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from flexpipe.errors import ConfigError
from flexpipe.runtime.daemon.devices import CPU_MEMORY_DEFAULT, local_devices
from flexpipe.runtime.daemon.router import RemoteStage, RouterDaemon
from flexpipe.runtime.daemon.worker import WorkerDaemon
from flexpipe.runtime.launcher import ActorSystem
from flexpipe.runtime.remote import Hello, ModelInfo, RemoteFlexPipe, RouterUnavailable, frontend_ref
from tests.test_daemon_usage import MiB, WAIT_S, events, join, refused_before_serving, router, running

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]


# --- --devices and --memory ------------------------------------------------------------------------------
@pytest.mark.parametrize("devices", ["cpu:x", "cpu:-1", "cpu:0,cpu:one", "cpu:", "cuda:x", "cuda:-2"])
def test_a_device_index_that_is_no_number_is_a_config_error(devices):
    """cpu:x was a ValueError's traceback, and cpu:-1 a device; both are refused as the worker is made."""
    for make in (lambda: local_devices(devices, "n"), lambda: WorkerDaemon("ipc:///tmp/r", devices=devices)):
        with pytest.raises(ConfigError, match=r"^--devices .* is not (cpu|cuda):N with N a device index >= 0"):
            make()
    topo, torch_devices = local_devices("cpu:0,cpu:2", "n")
    assert sorted(torch_devices) == [0, 2]


def test_memory_zero_or_less_is_refused_and_only_none_means_the_default():
    """--memory 0 used to become 2 GiB per device (`memory or default`)."""
    for bad in (0, -1, 0.5, True):
        with pytest.raises(ConfigError, match="--memory .*give a positive size"):
            local_devices("cpu:0", "n", memory=bad)
        with pytest.raises(ConfigError, match="--memory"):
            WorkerDaemon("ipc:///tmp/r", devices="cpu:0", memory=bad)
    topo, _ = local_devices("cpu:0", "n", memory=None)
    assert [g.memory_bytes for g in topo.gpus] == [CPU_MEMORY_DEFAULT]
    topo, _ = local_devices("cpu:0", "n", memory=256 * MiB)
    assert [g.memory_bytes for g in topo.gpus] == [256 * MiB]


@pytest.mark.parametrize("flags, words", [
    (["--memory", "0"], "--memory '0': give a positive size"),
    (["--memory", "0.1B"], "--memory '0.1B': give a positive size"),
    (["--devices", "cpu:x"], "--devices 'cpu:x': 'cpu:x' is not cpu:N"),
])
def test_the_worker_command_refuses_them_in_one_line_before_serving(flags, words, monkeypatch, capsys):
    err = refused_before_serving(["worker", "--router", "ipc:///tmp/flexpipe-never-bound", *flags], monkeypatch,
                                 capsys)
    assert err.startswith(f"flexpipe: error: {words}") and err.count("\n") == 1, err


# --- an ipc address ---------------------------------------------------------------------------------------
async def _hello(url: str) -> object:
    async with ActorSystem() as system:
        return await system.ask(frontend_ref(url), Hello(), timeout=WAIT_S)


async def test_a_second_router_at_an_ipc_path_is_refused_and_the_first_keeps_its_address(tmp_path):
    """ZeroMQ's ipc bind replaces the socket file: a second router at the path took the first one's
    address, silently.  And the file a router made is gone once it stops."""
    async with events() as ev:
        async with router(tmp_path, ev) as (first, url):
            path = url[len("ipc://"):]
            stop = asyncio.Event()
            stop.set()   # (without the check, it would bind, serve nobody and stop at once: exit code 0)
            with pytest.raises(ConfigError, match=f"cannot bind {url}: another process listens there"):
                await asyncio.wait_for(RouterDaemon(url, min_workers=99).run(stop), WAIT_S)
            assert isinstance(await _hello(url), ModelInfo)   # the first router still answers there
            assert len(ev.hits("listening")) == 1
        assert not os.path.exists(path)


async def test_a_stale_ipc_socket_file_is_replaced_and_any_other_file_refused(tmp_path):
    path = tmp_path / "router"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:   # a router that died left its file
        s.bind(str(path))
    assert path.is_socket()
    async with events() as ev:
        async with router(tmp_path, ev) as (_, url):
            assert isinstance(await _hello(url), ModelInfo)
        assert not path.exists()
    path.write_text("not a socket")
    stop = asyncio.Event()
    stop.set()
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        await RouterDaemon(f"ipc://{path}", min_workers=99).run(stop)
    assert path.read_text() == "not a socket"


# --- a stage killed, or not ---------------------------------------------------------------------------------
async def test_a_stage_whose_kill_failed_is_not_also_logged_killed(tmp_path):
    """The router logged stage_killed right after stage_kill_failed for the same stage."""
    async with events() as ev, router(tmp_path, ev) as (d, url), ActorSystem() as elsewhere:
        fake = await elsewhere.spawn(None, "wk")   # a "worker" that joins but handles no KillStage
        await join(fake, url, "wk", [256 * MiB])
        RemoteStage(d, "wk", "wk-stage-0", fake.ref, os.getpid(), "wk/0", (0, 1), None).kill()
        (failed,) = await ev.wait("stage_kill_failed", stage="wk-stage-0")
        assert "no handler for KillStage" in failed["error"]
        if d._tasks:
            await asyncio.wait(set(d._tasks), timeout=WAIT_S)
        assert not ev.hits("stage_killed")


# --- CURVE keys that do not match -------------------------------------------------------------------------------
@pytest.fixture
def curve_keys(tmp_path):
    from flexpipe.runtime.keys import create_keypair

    keys = tmp_path / "keys"
    _, server = create_keypair(str(keys), "server")
    public, client = create_keypair(str(keys), "client")
    _, rogue = create_keypair(str(keys), "rogue")
    (keys / "authorized").mkdir()
    (keys / "authorized" / "client.key").write_bytes(Path(public).read_bytes())
    good = {"curve_server_secret": server, "curve_client_secret": client,
            "curve_authorized": str(keys / "authorized")}
    return good, dict(good, curve_client_secret=rogue)


async def test_a_peer_whose_keys_the_router_refuses_is_told_the_keys_may_not_match(curve_keys):
    """Refused keys and a router that is not running look the same (no answer): say both."""
    good, rogue = curve_keys
    async with events() as ev:
        d = RouterDaemon("tcp://127.0.0.1:0", min_workers=99, curve=good)
        async with running(d):
            (listening,) = await ev.wait("listening")
            url = listening["endpoint"]
            w = WorkerDaemon(url, name="rogue", devices="cpu:0", memory=256 * MiB, curve=rogue, join_timeout=1.0,
                             usage_interval=0)
            async with running(w):
                (retry,) = await ev.wait("join_retry", worker="rogue")
            assert "do its CURVE keys match this host's" in retry["hint"], retry
            with pytest.raises(RouterUnavailable, match=r"within 1s: .*do its CURVE keys match this host's"):
                async with RemoteFlexPipe.connect(url, curve=rogue, answer_timeout=1.0):
                    pass
            with pytest.raises(RouterUnavailable, match="without CURVE keys"):   # a host with none
                async with RemoteFlexPipe.connect(url, curve={}, answer_timeout=1.0):
                    pass
            assert not d.workers


def test_the_server_public_key_flag_does_not_claim_to_stand_in_for_the_server_secret():
    """Every daemon and client has a tcp mailbox, which needs --curve-server-secret: the public key
    alone never serves ("when this host has no server secret" was never true)."""
    import argparse

    from flexpipe.runtime.daemon.cli import add_daemon_parsers

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_daemon_parsers(sub)
    for command in ("router", "worker"):
        helps = {a.dest: a.help for a in sub.choices[command]._actions}
        assert "no server secret" not in helps["curve_server_public"]
        assert "--curve-server-secret" in helps["curve_server_public"]
        assert "every daemon and client" in helps["curve_server_secret"]


# --- logs of the processes a daemon starts ------------------------------------------------------------------
CHILD = """
import asyncio, sys
from flexpipe.runtime.daemon.events import configure_logging
from flexpipe.runtime.launcher import ActorSystem

configure_logging(sys.argv[1])

async def main():
    async with ActorSystem() as system:
        try:   # the child logs why it cannot start (an argument Echo does not take)
            await system.launch("tests.test_actor_helpers:Echo", {"no_such_argument": 1}, name="stage-x",
                                timeout=60)
        except Exception as e:
            print(type(e).__name__)

asyncio.run(main())
"""


@pytest.mark.parametrize("fmt", ["json", "kv"])
def test_the_processes_a_daemon_starts_log_in_its_format(fmt):
    """A worker's stages write into its stderr: with --log-format json they wrote plain text there."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("FLEXPIPE_CHILD_LOG_FORMAT", None)
    out = subprocess.run([sys.executable, "-c", CHILD, fmt], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "ActorError", out.stderr
    lines = out.stderr.splitlines()
    assert any("failed to start" in line for line in lines), out.stderr
    for line in lines:   # every line of the child's, as the daemon's own
        if fmt == "json":
            rec = json.loads(line)
        else:
            assert line.startswith("ts=") and " event=" in line, line
            rec = {k: v.strip('"') for k, _, v in (f.partition("=") for f in line.split(" ")[:6])}
        assert rec["level"] == "error" and rec["logger"] == "flexpipe.launcher" and rec["actor"] == "stage-x", line


def test_a_router_that_cannot_bind_names_its_own_flags(monkeypatch, capsys):
    # the message was the worker's: "(--host / --advertise)", and the router has no --host
    from flexpipe.cli import main

    monkeypatch.setenv("FLEXPIPE_CHILD_LOG_FORMAT", "")   # (set by the daemon's logging; undone after)
    monkeypatch.setenv("FLEXPIPE_CHILD_LOG_LEVEL", "")
    assert main(["router", "--bind", "tcp://10.255.255.1:0"]) == 1   # an address no interface here has
    err = capsys.readouterr().err
    assert "flexpipe: error: cannot bind" in err and "(--bind / --advertise)" in err and "--host" not in err, err


# --- `flexpipe serve --router` to a router that answers but never serves ---------------------------------------
@pytest.mark.timeout(120)
async def test_serve_gives_up_on_a_router_that_never_serves_after_its_ready_timeout(tmp_path):
    """The router answers, but waits for more workers than join: `flexpipe serve --router URL
    --router-ready-timeout 2` waited 120 s whatever the options said, then said only "the pipeline is not
    up after ..." (no router named, nothing to check).  Now one error line after that timeout."""
    pytest.importorskip("starlette", reason="the 'serve' extra is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEXPIPE_ROUTER", "FLEXPIPE_CURVE"))}
    async with events() as ev, router(tmp_path, ev) as (_, url):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "flexpipe.cli", "serve", "--router", url, "--router-ready-timeout", "2",
            "--port", "0",
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _, err_bytes = await asyncio.wait_for(proc.communicate(), 60)   # (a bound, not a measurement)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    err = err_bytes.decode()
    assert proc.returncode == 1, err
    assert "Traceback" not in err and err.count("flexpipe: error:") == 1, err
    line = next(x for x in err.splitlines() if x.startswith("flexpipe: error:"))
    assert line.startswith(f"flexpipe: error: the router at {url} answers, but its pipeline did not start serving "
                           "within 2s (it is waiting for workers (0 of 99))"), line
    assert f"`flexpipe worker --router {url}`" in line and "--min-workers" in line, line

"""Which command a setting reaches, and how far: the meaning of a config file's top-level keys, and
FlexPipe.launch's max_message_bytes.

1. One config file may serve every command, and a command without a table of its own reads its top
   level.  Some names are settings of several commands with different meanings: `host` is serve's HTTP
   listen address and the worker's stage address, `heartbeat_*` the stages' heartbeats (serve, generate,
   the router) and the worker's with its router, `model` and `seed` the model serve and the router serve
   (its weights seed) and the model name chat asks for (its sampling seed).  Every command read the top
   level's value as its own: `host = "0.0.0.0"`, meant for serve, made a worker bind its stages on every
   interface and tell the router 0.0.0.0 as their address; a weights `seed` fixed chat's sampling.  Now a
   top-level key means what its variable FLEXPIPE_<KEY> means, everywhere; a command to which that name
   means something else (FLEXPIPE_WORKER_HOST, FLEXPIPE_CHAT_MODEL) takes its own from its table only,
   and refuses the top-level key in one line that says so.

2. The embedded runtime had no max_message_bytes: its actors (the router's and every stage process's)
   held the 1 GiB default.  It is a runtime setting now (FlexPipe.launch, serve, generate), checked as the
   actors check it, and it reaches every actor system of the pipeline: a reshape's copies between stage
   processes go in pieces under it.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os

import pytest

from flexpipe.api import FlexPipe
from flexpipe.cli import build_parser, main
from flexpipe.errors import ConfigError
from flexpipe.settings import (CHAT_SETTINGS, GENERATE_SETTINGS, ROUTER_RUNTIME_SETTINGS, ROUTER_SETTINGS,
                               RUNTIME_SETTINGS, SERVE_SETTINGS, WORKER_SETTINGS, resolve_settings)
from tests.pipeline_helpers import check_against_oracle, held, request_mix, run_all
from tests.test_daemon_usage import refused_before_serving

# The settings each command resolves (server/cli.py, cli.py, runtime/daemon/cli.py call resolve_settings
# with these lists and their command's name).
RESOLVED = {"serve": SERVE_SETTINGS + RUNTIME_SETTINGS, "chat": CHAT_SETTINGS, "generate": GENERATE_SETTINGS,
            "router": ROUTER_SETTINGS + ROUTER_RUNTIME_SETTINGS, "worker": WORKER_SETTINGS}

# A file for a host that runs serve, a router and a worker, all at the top level: serve's listen address
# and the stages' heartbeat timeout beside keys of one meaning everywhere.
SHARED = """
model = "tiny"
seed = 7
stages = 1
host = "0.0.0.0"          # serve's: listen on every interface
heartbeat_timeout = 30.0  # the stages'
num_blocks = 64
port = 0
api_key = "k"
bind = "ipc:///tmp/flexpipe-never-bound"
min_workers = 2
log_format = "json"
url = "http://127.0.0.1:1"
max_tokens = 8
"""


@pytest.fixture(autouse=True)
def no_flexpipe_env(monkeypatch):
    """Only the variables a test sets: none of the shell's FLEXPIPE_* settings."""
    for name in [n for n in os.environ if n.startswith("FLEXPIPE_") and n != "FLEXPIPE_SHM_PREFIX"]:
        monkeypatch.delenv(name)


def resolved(command: str, path, *argv: str) -> dict:
    """The settings `flexpipe COMMAND --config PATH ARGV` resolves, parsed by the real command line."""
    args = build_parser().parse_args([command, "--config", str(path), *argv])
    return resolve_settings(RESOLVED[command], args, command, environ={})


def worker_daemon(argv: list[str], monkeypatch) -> object:
    """The WorkerDaemon `flexpipe worker ARGV` builds from its settings (serving stubbed out)."""
    import flexpipe.runtime.daemon.cli as daemon_cli

    built: list = []
    monkeypatch.setattr(daemon_cli, "_serve", lambda daemon: built.append(daemon) or 0)
    monkeypatch.setenv("FLEXPIPE_CHILD_LOG_FORMAT", "")   # (set by the daemon's logging; undone after)
    monkeypatch.setenv("FLEXPIPE_CHILD_LOG_LEVEL", "")
    assert main(["worker", *argv]) == 0
    return built[0]


# --- 1. the top level of a config file --------------------------------------------------------------------
def test_the_top_level_of_a_shared_file_is_serves_and_the_routers_as_before(tmp_path):
    f = tmp_path / "flexpipe.toml"
    f.write_text(SHARED)
    serve = resolved("serve", f)
    assert (serve["host"], serve["model"], serve["seed"], serve["heartbeat_timeout"]) == ("0.0.0.0", "tiny", 7, 30.0)
    assert (serve["num_blocks"], serve["api_key"], serve["port"]) == (64, "k", 0)
    router = resolved("router", f)
    assert (router["model"], router["seed"], router["heartbeat_timeout"], router["min_workers"]) == ("tiny", 7, 30.0, 2)
    assert resolved("generate", f)["heartbeat_timeout"] == 30.0


@pytest.mark.timeout(30)
def test_a_worker_leaves_top_level_keys_that_are_another_setting_of_the_same_name_to_serve(tmp_path,
                                                                                          monkeypatch):
    """It read serve's listen address as its stages' address (bound every interface, told the router
    0.0.0.0) and the stages' heartbeat timeout as its router's."""
    f = tmp_path / "flexpipe.toml"
    f.write_text('router = "ipc:///tmp/flexpipe-never-bound"\ndevices = "cpu:0"\nhost = "0.0.0.0"\n'
                 "heartbeat_timeout = 30.0\nheartbeat_interval = 1.0\n")
    defaults = {s.name: s.default for s in WORKER_SETTINGS}
    got = resolved("worker", f)
    assert got["devices"] == "cpu:0"   # (its own keys at the top level: taken)
    for name in ("host", "heartbeat_timeout", "heartbeat_interval"):
        assert got[name] == defaults[name], (name, got[name])
    assert worker_daemon(["--config", str(f)], monkeypatch).host != "0.0.0.0"


def test_chat_leaves_the_model_to_serve_and_its_weights_seed_to_serve_and_the_router(tmp_path):
    """It asked the server for a model named after the checkpoint's directory, and fixed its sampling
    seed to the weights'; with the shared file of docs/daemons.md it now starts, flag or no flag."""
    f = tmp_path / "flexpipe.toml"
    f.write_text('url = "http://127.0.0.1:1"\nmodel = "/models/llama"\nseed = 7\n')
    got = resolved("chat", f)
    assert got["model"] is None and got["seed"] is None and got["url"] == "http://127.0.0.1:1"
    assert resolved("chat", f, "--model", "tiny", "--seed", "1")["model"] == "tiny"


def test_in_its_own_table_each_command_has_its_own_meaning(tmp_path, monkeypatch):
    f = tmp_path / "flexpipe.toml"
    f.write_text(SHARED + 'router = "tcp://127.0.0.1:1"\n'   # (serve's too: serve through that router)
                 '[worker]\nrouter = "tcp://127.0.0.1:1"\nhost = "127.0.0.2"\nheartbeat_timeout = 9.0\n'
                 'devices = "cpu:0"\n[chat]\nmodel = "served-name"\nseed = 3\n')
    assert resolved("serve", f)["host"] == "0.0.0.0"
    worker = worker_daemon(["--config", str(f)], monkeypatch)
    assert (worker.host, worker.heartbeat_timeout, worker.heartbeat_interval) == ("127.0.0.2", 9.0, 0.5)
    chat = resolved("chat", f)
    assert (chat["model"], chat["seed"], chat["url"]) == ("served-name", 3, "http://127.0.0.1:8000")


def test_keys_of_one_meaning_stay_at_the_top_level_for_every_command(tmp_path, monkeypatch):
    """`router` (the router's URL, to serve and the worker), `api_key` (serve's and chat's), `log_format`
    (the router's and the worker's): what a worker-only or chat-only file holds."""
    f = tmp_path / "worker.toml"
    f.write_text('router = "tcp://127.0.0.1:1"\ndevices = "cpu:0"\nlog_format = "json"\nname = "w1"\n'
                 'api_key = "k"\nstages = 3\n')
    worker = worker_daemon(["--config", str(f)], monkeypatch)
    assert (worker.router_url, worker.name) == ("tcp://127.0.0.1:1", "w1")
    assert resolved("chat", f)["api_key"] == "k" and resolved("serve", f)["router"] == "tcp://127.0.0.1:1"


def test_help_says_which_keys_go_in_a_table_only(capsys):
    for command, table_only, anywhere in (("worker", ["host", "heartbeat_timeout"], ["router", "devices"]),
                                          ("router", [], ["model", "heartbeat_timeout"])):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")
        for key in table_only:
            assert f"config key '{key}' in [{command}] only" in text, (command, key)
        for key in anywhere:
            assert f"config key '{key}')" in text or f"config key '{key}';" in text, (command, key)


# --- 2. FlexPipe.launch's max_message_bytes ---------------------------------------------------------------
LIMIT = 64 << 10   # below the tiny preset's embedding (160 KB) and MLP matrices (180 KB): copies go in pieces


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bad", [0, 1023, "64KiB", 65536.0, True])
async def test_a_bad_max_message_bytes_is_refused_before_anything_starts(bad):
    with pytest.raises(ConfigError, match=r"setting max_message_bytes=.*: give a whole number of bytes >= 1024"):
        async with FlexPipe.launch("tiny", stages=2, max_message_bytes=bad):
            pass
    assert multiprocessing.active_children() == []


@pytest.mark.timeout(30)
async def test_a_limit_a_micro_batchs_activations_do_not_fit_in_is_refused_before_anything_starts():
    """The residual [256 tokens, 128] float32 (128 KiB) goes beside each StepInput between CPU stages: a
    step too large for a message was not delivered, and its requests waited."""
    with pytest.raises(ConfigError, match=r"setting max_message_bytes=65536: .*\(256 tokens x hidden size 128 x "
                                          r"float32: 131072 bytes\).* lower max_batch_tokens"):
        async with FlexPipe.launch("tiny", stages=2, max_message_bytes=LIMIT):
            pass
    assert multiprocessing.active_children() == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["flag", "env", "file"])
def test_generate_takes_max_message_bytes_as_every_runtime_setting(how, tmp_path, monkeypatch, capsys):
    argv = ["generate", "--in-process", "--max-tokens", "1"]
    if how == "flag":
        argv += ["--max-message-bytes", "100"]
    elif how == "env":
        monkeypatch.setenv("FLEXPIPE_MAX_MESSAGE_BYTES", "100")
    else:
        f = tmp_path / "f.toml"
        f.write_text("max_message_bytes = 100\n")
        argv += ["--config", str(f)]
    assert main(argv) == 1
    out = capsys.readouterr()
    assert out.err == "flexpipe: error: setting max_message_bytes=100: give a whole number of bytes >= 1024\n"
    assert out.out == ""


@pytest.mark.timeout(180)
async def test_a_small_limit_reaches_every_stage_process_and_a_reshape_copies_under_it():
    """Stage processes under a 64 KiB max_message_bytes: outputs equal the oracle, and a reshape that moves
    units 9-11 (peer weights, 180 KB matrices) and the KV of running requests from stage 1 to stage 0 sends
    that KV in messages under the limit - counted by the sending stage process, whose own actor system
    plans the pieces (it held the 1 GiB default: one message a copy)."""
    reqs = request_mix(4, seed=11, max_tokens=(60, 70))
    async with FlexPipe.launch("tiny", boundaries=[0, 9, 18], max_message_bytes=LIMIT,
                               max_batch_tokens=64) as fp:
        assert fp.system.settings.max_message_bytes == LIMIT
        pids = {st["pid"] for st in await fp.controller.stage_status()}
        assert len(pids) == 2 and os.getpid() not in pids   # (stage processes)
        task = asyncio.ensure_future(run_all(fp, reqs))
        async with held(fp.router, n=3, want=lambda r: r.computed >= 48):   # 48+ KiB of KV each in units 9, 11
            st = await fp.reshape(boundaries=[0, 12, 18], weights_from="peer")
        assert st.ok and st.weights_from == "peer" and st.weight_bytes > 2 * LIMIT, st.to_dict()
        assert st.kv_bytes > 2 * LIMIT, st.to_dict()
        status = await fp.controller.stage_status()
        assert {s["pid"] for s in status} == pids   # (both kept: the sender is stage 1, now units 12-18)
        sender = max(status, key=lambda s: s["kv_bytes_out"])
        assert sender["kv_bytes_out"] >= st.kv_bytes
        assert sender["kv_messages_out"] >= -(-sender["kv_bytes_out"] // LIMIT), sender
        check_against_oracle(fp, reqs, await task)

"""The daemons' max_message_bytes, and their exit code on SIGTERM.

1. `FlexPipe.launch`, `flexpipe serve` and `generate` took max_message_bytes; the router and worker daemons
   did not: their actors and every stage process a worker started held ActorSettings' 1 GiB.  Now
   `flexpipe router --max-message-bytes N` (FLEXPIPE_MAX_MESSAGE_BYTES, or the config key) is the router's
   own actors' limit and, passed on in each StartStage, that of every stage process on any worker; a
   worker's own mailbox takes the same setting (one variable or top-level key gives the whole cluster one
   limit).  Here a cluster runs the tiny preset under 64 KiB, below its embedding (160 KB) and MLP matrices
   (180 KB): a reshape's weight and KV copies between stage processes on two workers go in pieces.

2. A daemon exits 0 on SIGTERM once it has shut down cleanly, and a SIGTERM repeated meanwhile (a
   supervisor's, a second `kill`, a test's stop() after its send_signal) changes nothing.  One that came
   after the daemon had logged "stopped", while the process exited, killed it (exit -15): `_serve` gave the
   signal back its default action as it returned.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from types import SimpleNamespace

import pytest

from flexpipe.runtime.messages import ActorRef
from flexpipe.runtime.remote import RemoteFlexPipe
from flexpipe.runtime.stage import StageStatus
from flexpipe.settings import PRECOPY_MAX_ROUNDS
from tests.pipeline_helpers import check_against_oracle
from tests.test_daemon_usage import refused_before_serving
from tests.test_daemons import Daemon, logs, one_torch_thread, stop_daemons  # noqa: F401 (the oracle on one thread)

# a router and two workers (~30 s on 2 cores): under `make test-slow`; the embedded limit end to end
# (tests/test_settings_scopes.py) and the limit checks run in every `make test`
pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

LIMIT = 64 << 10
NEVER = "ipc:///tmp/flexpipe-never-bound"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A router of the tiny preset in stages [0, 9, 18] and two workers of one CPU device each, every one of
    them under LIMIT, taken each its own way: the router from a config file's top level, one worker from
    its flag, the other from FLEXPIPE_MAX_MESSAGE_BYTES.  (64 tokens a micro-batch: a step's activations,
    32 KiB, fit in a message.)"""
    d = tmp_path_factory.mktemp("limit")
    shared = d / "flexpipe.toml"
    shared.write_text(f"max_message_bytes = {LIMIT}\n")
    url = f"ipc://{d}/router"
    hb = ["--heartbeat-timeout", "5"]
    router = Daemon("limit-router", ["router", "--config", str(shared), "--bind", url, "--model", "tiny",
                                     "--boundaries", "0,9,18", "--max-batch-tokens", "64", "--min-workers", "2", *hb])
    daemons = [router]
    try:
        router.wait_for("listening")
        worker = ["worker", "--router", url, "--devices", "cpu:0", "--memory", "1GB", *hb]
        daemons.append(Daemon("limit-wa", [*worker, "--name", "wa", "--max-message-bytes", str(LIMIT)]))
        with pytest.MonkeyPatch.context() as env:
            env.setenv("FLEXPIPE_MAX_MESSAGE_BYTES", str(LIMIT))
            daemons.append(Daemon("limit-wb", [*worker, "--name", "wb"]))
        router.wait_for("ready")
        yield SimpleNamespace(url=url, router=router, workers=daemons[1:])
    finally:
        stop_daemons(daemons)


# --- 1. the limit ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, words", [
    (["router", "--bind", NEVER, "--max-message-bytes", "100"],
     "setting max_message_bytes=100: give a whole number of bytes >= 1024"),
    # the activations of a micro-batch of 256 tokens go between stage processes in one message
    (["router", "--bind", NEVER, "--max-message-bytes", str(LIMIT)],
     f"setting max_message_bytes={LIMIT}: a micro-batch's activations between stages (256 tokens x hidden size "
     "128 x float32: 131072 bytes) do not fit in one message; raise it or lower max_batch_tokens"),
    (["worker", "--router", NEVER, "--devices", "cpu:0", "--max-message-bytes", "1023"],
     "max_message_bytes=1023: give a whole number of bytes >= 1024"),
])
def test_a_limit_the_cluster_cannot_run_under_is_one_line_before_anything_starts(argv, words, monkeypatch, capsys):
    err = refused_before_serving(argv, monkeypatch, capsys)
    assert err.startswith("flexpipe: error: ") and err.count("\n") == 1 and words in err, err


@pytest.mark.parametrize("command", [["router", "--bind", NEVER], ["worker", "--router", NEVER]])
def test_each_daemon_takes_the_limit_from_the_environment_and_the_file_too(command, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLEXPIPE_MAX_MESSAGE_BYTES", "64KiB")
    err = refused_before_serving(command, monkeypatch, capsys)
    assert "environment variable FLEXPIPE_MAX_MESSAGE_BYTES: bad value '64KiB' for max_message_bytes" in err, err
    monkeypatch.delenv("FLEXPIPE_MAX_MESSAGE_BYTES")
    f = tmp_path / "f.toml"
    f.write_text("max_message_bytes = 512\n")   # (the top level: every command's)
    err = refused_before_serving([*command, "--config", str(f)], monkeypatch, capsys)
    assert "max_message_bytes=512: give a whole number of bytes >= 1024" in err, err


def test_every_daemon_and_every_stage_process_takes_the_limit(cluster):
    assert cluster.router.wait_for("listening")["max_message_bytes"] == LIMIT
    for w in cluster.workers:
        assert w.wait_for("started")["max_message_bytes"] == LIMIT
        # the stages' actor system, made from the router's StartStage
        assert w.wait_for("stage_started")["max_message_bytes"] == LIMIT


async def test_outputs_equal_the_oracle_and_a_reshape_copies_weights_and_kv_in_pieces_under_the_limit(cluster):
    """[0, 9, 18] -> [0, 12, 18] with peer weights while four requests of 100-token prompts run: units 9-11
    (180 KB matrices) go from the stage on one worker to the stage on the other, and so does the KV of
    attention units 9 and 11 (1 KiB a token).  The sending stage process cuts that KV into messages of at
    most LIMIT (counted in its status): more of them than the copy rounds, which under the 1 GiB default
    send one message each.  The requests ask for 1,500 tokens, so that they still run when the copy
    begins (the test cannot hold a router in another process); each is read until a few tokens past the
    steps the router had run once the reshape returned (so tokens of the new shape), then cancelled, and
    what it gave equals the oracle's as many tokens."""
    reqs = [{"prompt": f"{i}: " + "pipe stage token reshape " * 4, "max_tokens": 1500, "ignore_eos": True,
             "temperature": 0.0 if i % 2 == 0 else 0.8, "seed": 100 + i} for i in range(4)]
    async with RemoteFlexPipe.connect(cluster.url, ready_timeout=60, heartbeat_timeout=5) as fp:
        streams = [fp.generate(r["prompt"], **{k: v for k, v in r.items() if k != "prompt"}) for r in reqs]
        firsts = await asyncio.gather(*(s.__anext__() for s in streams))   # each running, its prompt's KV made
        st = await fp.reshape(boundaries=[0, 12, 18], weights_from="peer")
        assert st.ok and st.weights_from == "peer" and st.weight_bytes > 2 * LIMIT, st.to_dict()
        assert st.requests_running == 4 and st.kv_bytes > (PRECOPY_MAX_ROUNDS + 1) * LIMIT, st.to_dict()
        status = await fp.status()
        assert [(s["start"], s["end"]) for s in status["stages"]] == [(0, 12), (12, 18)]
        assert len({s["worker"] for s in status["stages"]}) == 2, status["stages"]   # (a copy between workers)
        stages = [await fp.actor.ask(ActorRef(*s["actor"].split("@", 1)), StageStatus()) for s in status["stages"]]
        sender = max(stages, key=lambda s: s["kv_bytes_out"])
        assert sender["kv_bytes_out"] >= st.kv_bytes
        assert sender["kv_messages_out"] >= -(-sender["kv_bytes_out"] // LIMIT), (sender, logs())

        past = status["router"]["steps"] + 8   # (a request's token i comes of its step i or a later one)
        outs = []
        for first, stream in zip(firsts, streams):
            ids = [first.token_id]
            while len(ids) < past:
                ids.append((await stream.__anext__()).token_id)
            await stream.aclose()   # (cancels it)
            outs.append(SimpleNamespace(token_ids=ids))
        check_against_oracle(fp, [dict(r, max_tokens=past) for r in reqs], outs)


# --- 2. SIGTERM -----------------------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_a_sigterm_repeated_while_a_daemon_shuts_down_and_exits_changes_nothing(cluster):
    """SIGTERM, then again every few milliseconds until the process is gone: the router drains, stops its
    stages and exits 0, and so does each worker.  (Last: it stops the module's cluster.)"""
    for d in (cluster.router, *cluster.workers):
        d.proc.send_signal(signal.SIGTERM)
        while True:
            try:
                code = d.proc.wait(0.005)
                break
            except subprocess.TimeoutExpired:
                d.proc.send_signal(signal.SIGTERM)
        assert code == 0, f"{d.name} exited {code}\n{logs()}"
        d.wait_for("stopped", 5)

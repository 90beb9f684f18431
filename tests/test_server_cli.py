"""`flexpipe serve` and `flexpipe chat` as processes: settings from a config file and the environment,
the printed URL, a streamed terminal chat, and a clean stop on SIGTERM (real engine, tiny model)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("starlette", reason="the 'serve' extra is not installed")

import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

KEY = "sk-cli-test"
READY = re.compile(r"chat page (http://\S+?)/\s")


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "flexpipe.cli", *args]


def _lines(stream, q: queue.Queue) -> None:
    for line in stream:
        q.put(line)
    q.put(None)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    cfg = tmp_path_factory.mktemp("serve") / "flexpipe.toml"
    cfg.write_text('[serve]\nmodel = "tiny"\nstages = 2\nport = 0\nnum_blocks = 512\n')
    env = {**os.environ, "FLEXPIPE_API_KEY": KEY, "FLEXPIPE_CONFIG": str(cfg), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_cmd("serve"), env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True)
    q: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stderr, q), daemon=True).start()
    seen: list[str] = []
    url = None
    try:
        while url is None:
            line = q.get(timeout=90)
            if line is None:
                raise AssertionError(f"flexpipe serve exited early ({proc.wait()}):\n{''.join(seen)}")
            seen.append(line)
            m = READY.search(line)
            url = m.group(1) if m else None
        yield proc, url, seen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_prints_its_url_and_takes_settings_from_file_and_env(served):
    _, url, seen = served
    assert "(API key required)" in "".join(seen)
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert httpx.get(f"{url}/v1/models").status_code == 401  # FLEXPIPE_API_KEY took effect
    r = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert r.json()["data"][0]["id"] == "tiny"
    st = httpx.get(f"{url}/v1/flexpipe/status", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert st["pipeline"]["kv_blocks_total"] == 512  # a runtime setting from the file reached the pipeline


def test_chat_one_message_streams_an_answer(served):
    _, url, _ = served
    out = subprocess.run(_cmd("chat", "--url", url, "--api-key", KEY, "--message", "Hello", "--max-tokens", "8",
                              "--temperature", "0"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.endswith("\n") and len(out.stdout) > 1


def test_chat_session_from_stdin(served):
    _, url, _ = served
    env = {**os.environ, "FLEXPIPE_URL": url, "FLEXPIPE_API_KEY": KEY, "FLEXPIPE_CHAT_MAX_TOKENS": "6"}
    out = subprocess.run(_cmd("chat"), input="/status\nHi there\n/reset\n/quit\n", capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert "epoch" in out.stdout and "2 stages" in out.stdout
    assert "tiny> " in out.stdout and "[conversation cleared]" in out.stdout


def test_chat_reports_a_wrong_key_and_a_missing_server(served):
    _, url, _ = served
    out = subprocess.run(_cmd("chat", "--url", url, "--api-key", "nope", "--message", "x"), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and "401" in out.stderr and "API key" in out.stderr
    out = subprocess.run(_cmd("chat", "--url", "http://127.0.0.1:9", "--message", "x"), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and "flexpipe serve" in out.stderr


def _metric(url: str, name: str, sample: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) if f.name == name
               for s in f.samples if s.name == sample)


def test_reshape_over_http_shows_in_status_and_metrics(served):
    # Here rather than in test_server.py: the server is its own process, so the stage processes a
    # reshape starts belong to it and not to this test.
    _, url, _ = served
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    body = {"model": "tiny", "prompt": "same answer", "max_tokens": 8, "temperature": 0}
    before_text = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    before = http.get("/v1/flexpipe/status").json()["pipeline"]
    assert len(before["stages"]) == 2 and before["reshapes_total"] == 0 and before["last_pause_s"] is None
    r = http.post("/v1/flexpipe/reshape", json={"stages": 3})
    assert r.status_code == 200, r.text
    assert r.json()["stats"]["pause_s"] >= 0
    after = http.get("/v1/flexpipe/status").json()["pipeline"]
    assert len(after["stages"]) == 3 and after["epoch"] == before["epoch"] + 1
    assert after["reshapes_total"] == 1 and after["last_pause_s"] is not None
    assert after["reshapes"][-1]["from_stages"] == 2 and after["reshapes"][-1]["to_stages"] == 3
    assert [s["start"] for s in after["stages"]][0] == 0
    assert all(a["end"] == b["start"] for a, b in zip(after["stages"], after["stages"][1:]))
    assert _metric(url, "flexpipe_pipeline_stages", "flexpipe_pipeline_stages") == 3
    assert _metric(url, "flexpipe_reshapes", "flexpipe_reshapes_total") == 1
    assert _metric(url, "flexpipe_reshape_pause_seconds", "flexpipe_reshape_pause_seconds_count") == 1
    # Greedy output does not depend on the pipeline's shape.
    assert http.post("/v1/completions", json=body).json()["choices"][0]["text"] == before_text
    bad = http.post("/v1/flexpipe/reshape", json={"stages": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "stages"
    bad = http.post("/v1/flexpipe/reshape", json={"stages": 2, "boundaries": [0, 18]})
    assert bad.status_code == 400
    bad = http.post("/v1/flexpipe/reshape", json={"boundaries": []})   # was "-1 stages but 0 devices given"
    assert bad.status_code == 400 and "name no stage" in bad.json()["error"]["message"], bad.text
    http.close()


def test_serve_stops_cleanly_on_sigterm(served):
    proc, url, _ = served
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=2)


def _live_in_group(pgid: int) -> list[str]:
    """Processes of group `pgid` that have not exited (zombies have: an exited child whose parent went
    first waits for init to reap it), as "pid command"."""
    live = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except (FileNotFoundError, ProcessLookupError, PermissionError):   # exited meanwhile
            continue
        rest = stat[stat.rindex(")") + 2:].split()   # state, ppid, pgrp, ... after "pid (comm)"
        if int(rest[2]) == pgid and rest[0] != "Z":
            live.append(f"{d} {stat[stat.index('(') + 1:stat.rindex(')')]}")
    return live


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process table from /proc")
# (SIGTERM of the whole group under `make test-slow`: the same shutdown as Ctrl-C's, ~15 s on 2 cores;
# test_serve_stops_cleanly_on_sigterm signals serve alone)
@pytest.mark.parametrize("sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_serve_stops_quietly_when_its_whole_process_group_is_signalled(sig, tmp_path):
    # A terminal's Ctrl-C sends SIGINT to every process of the foreground group, stage processes
    # included; `timeout`, systemd and init-less containers send SIGTERM to all of them.  The server
    # stops its pipeline in order: no stage "died", no traceback from a stage, exit status 0.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_cmd("serve", "--stages", "2", "--port", "0", "--num-blocks", "64"), env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True)
    q: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stderr, q), daemon=True).start()
    seen: list[str] = []
    try:
        while not any(READY.search(line) for line in seen):
            line = q.get(timeout=90)
            assert line is not None, f"flexpipe serve exited early ({proc.wait()}):\n{''.join(seen)}"
            seen.append(line)
        os.killpg(proc.pid, sig)
        assert proc.wait(timeout=60) == 0, "".join(seen)
        while (line := q.get(timeout=30)) is not None:
            seen.append(line)
        out = "".join(seen)
        assert "Traceback" not in out and "died" not in out and "KeyboardInterrupt" not in out, out
        # it waited for its stages; multiprocessing's resource tracker, the server's child too, ends only
        # once the server's end of its pipe closed, and may be on its way out for a moment (seen on a
        # loaded machine: "['17285 python']")
        deadline = time.monotonic() + 10
        while (left := _live_in_group(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert left == [], "processes of the server's group outlived it"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_serve_refuses_a_bad_setting_before_starting():
    out = subprocess.run(_cmd("serve", "--num-blocks", "0", "--port", "0"), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    assert "flexpipe: error: setting num_blocks=0: give an integer >= 1" in out.stderr
    assert "Traceback" not in out.stderr


def test_serve_with_a_router_that_does_not_answer_says_so_in_one_line(tmp_path):
    # It waited 120 s in silence, then printed uvicorn's startup traceback and exited 3: the router was
    # first asked in the app's startup, where no error reaches `flexpipe: error:`.
    url = f"ipc://{tmp_path}/no-router-here"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEXPIPE_ROUTER", "FLEXPIPE_CURVE"))}
    out = subprocess.run(_cmd("serve", "--router", url, "--router-timeout", "1", "--port", "0"), env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert f"flexpipe: error: no answer from the router at {url} within 1s: is `flexpipe router" in out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("flexpipe: error:") == 1, out.stderr
    out = subprocess.run(_cmd("serve", "--router", url, "--port", "0"), capture_output=True, text=True, timeout=120,
                         env={**env, "FLEXPIPE_ROUTER_TIMEOUT": "0"})
    assert out.returncode == 1 and "flexpipe: error: router_timeout must be a number of seconds > 0" in out.stderr

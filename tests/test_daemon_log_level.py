"""The processes a daemon starts (a worker's stages) log at the daemon's --log-level, as they log in its
--log-format: they logged at WARNING whatever the daemon's level, so `flexpipe --log-level DEBUG worker`
showed nothing of its stages but their warnings.  The daemon passes its level down in
FLEXPIPE_CHILD_LOG_LEVEL (runtime/launcher.py), beside FLEXPIPE_CHILD_LOG_FORMAT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_daemons import Daemon

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]


def test_a_workers_stages_log_at_the_workers_level(tmp_path, monkeypatch):
    """A real router and worker (one stage, tiny model): with `--log-level DEBUG` on the worker, its stage
    process's debug lines (the stage's mailbox serving at its endpoint) come out in the worker's log."""
    monkeypatch.delenv("FLEXPIPE_CHILD_LOG_LEVEL", raising=False)   # (the daemon's own to set)
    monkeypatch.delenv("FLEXPIPE_LOG_LEVEL", raising=False)
    router = Daemon("level-router", ["router", "--bind", f"ipc://{tmp_path}/router", "--model", "tiny", "--stages",
                                     "1", "--min-workers", "1", "--num-blocks", "16", "--heartbeat-timeout", "5"])
    daemons = [router]
    try:
        url = router.wait_for("listening")["endpoint"]
        worker = Daemon("level-worker", ["--log-level", "DEBUG", "worker", "--router", url, "--name", "lw",
                                         "--devices", "cpu:0", "--memory", "1GB", "--heartbeat-timeout", "5"])
        daemons.append(worker)
        router.wait_for("ready")
        started = worker.wait_for("stage_started", worker="lw")
        stage = started["stage"]
        worker.wait_for("log", actor=stage, level="debug", logger="flexpipe.actor",
                        msg=f"{stage} serving at {started['endpoint']}")
    finally:
        codes = [d.stop(30) for d in reversed(daemons)]
    assert codes == [0, 0]


CHILD = """
import asyncio
from flexpipe.runtime.launcher import ActorSystem

async def main():
    async with ActorSystem() as system:
        try:   # the child logs at ERROR why it cannot start (an argument Echo does not take)
            await system.launch("tests.test_actor_helpers:Echo", {"no_such_argument": 1}, name="stage-x",
                                timeout=60)
        except Exception as e:
            print(type(e).__name__)

asyncio.run(main())
"""


@pytest.mark.parametrize("level, shown", [("CRITICAL", False), ("loud", True)])
def test_a_launched_process_logs_at_the_level_it_is_given(level, shown):
    """Above the child's record (an ERROR) it is not shown; a value that is no level means WARNING (as
    when unset), where it is."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), FLEXPIPE_CHILD_LOG_FORMAT="json", FLEXPIPE_CHILD_LOG_LEVEL=level)
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=100)
    assert out.stdout.strip() == "ActorError", out.stderr
    lines = [json.loads(line) for line in out.stderr.splitlines()]
    assert any(rec["actor"] == "stage-x" and "failed to start" in rec["msg"] for rec in lines) is shown, out.stderr

"""Short runs of the soak scripts (scripts/chaos.py, scripts/chaos_daemons.py; docs/reshape.md, "Soak
tests (chaos)"): `make test-slow` only, a few minutes each. Each runs the script as its own process,
as a person would, so that its SIGKILLs and daemons stay out of the test process; the script's exit
status and last line are the verdict, and its last lines are the failure message."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TAIL_LINES = 60


def run_script(args: list[str], timeout: float) -> tuple[int, str]:
    """Run `python scripts/...` from the repository root; (exit status, stdout and stderr together).

    The script runs in a new session: past `timeout` it gets SIGTERM (it then stops what it started and
    prints its verdict; SIGINT may be ignored when this runs in the background), and whatever of its
    session is left at the end is killed."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                out, _ = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            out += f"\n(test: the script ran past {timeout:.0f} s and was stopped)"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:   # (the usual case: nothing of it is left)
            pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out


def tail(out: str) -> str:
    """The last TAIL_LINES lines of a script's output: its verdict and what led to it."""
    return "\n".join(out.splitlines()[-TAIL_LINES:])


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_chaos_embedded_shm_three_stages():
    """40 s of clients, reshapes and stage kills on the embedded runtime over shm hops."""
    seed = 101
    # the script's own bounds (requests 240 s, drain 300 s, everything 40 + 900 s) end it first
    code, out = run_script(["scripts/chaos.py", str(seed), "40", "--transport", "shm", "--stages", "3"],
                           timeout=1200)
    lines = out.strip().splitlines()
    ok = f"SEED {seed}: OK (0)"
    assert code == 0 and ok in lines[-3:], f"exit status {code}; the last {TAIL_LINES} lines:\n{tail(out)}"


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_chaos_daemons_shm():
    """40 s of clients, reshapes, stage kills and worker kills on a router and 3 worker daemons."""
    # the script's own bound (40 + 600 s, then up to a minute of shutdown) ends it first
    code, out = run_script(["scripts/chaos_daemons.py", "202", "40", "shm"], timeout=900)
    lines = out.strip().splitlines()
    assert code == 0 and "RESULT OK []" in lines[-3:], \
        f"exit status {code}; the last {TAIL_LINES} lines:\n{tail(out)}"

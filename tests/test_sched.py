"""rt_priority (runtime/sched.py): every thread of every pipeline process under SCHED_RR, put back on
close, outputs unchanged; refused with a ConfigError that says what to change.

Each case runs in its own interpreter, so the test process never becomes real-time."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flexpipe.api import Settings
from flexpipe.errors import ConfigError
from tests.pipeline_helpers import rt_allowed

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_RR of every thread: Linux")]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=100,
                          cwd=Path(__file__).resolve().parents[1])


needs_rt = pytest.mark.skipif(not rt_allowed(), reason="this machine refuses SCHED_RR (no CAP_SYS_NICE, ulimit -r 0)")


@pytest.mark.parametrize("value", [-1, 100, True, 1.5, "1"])
def test_out_of_range_rt_priority_is_a_config_error(value):
    with pytest.raises(ConfigError, match="rt_priority"):
        Settings(rt_priority=value).check()


@needs_rt
def test_every_thread_and_new_threads_then_put_back():
    out = _run("""
        import os, threading
        from flexpipe.runtime.sched import use_realtime
        def policies():
            return {int(t): (os.sched_getscheduler(int(t)), os.sched_getparam(int(t)).sched_priority)
                    for t in os.listdir("/proc/self/task")}
        done = threading.Event()
        old = threading.Thread(target=done.wait); old.start()
        before = policies()
        assert set(before.values()) == {(os.SCHED_OTHER, 0)}, before
        restore = use_realtime(3)
        new = threading.Thread(target=done.wait); new.start()   # inherits it from the thread that starts it
        during = policies()
        assert len(during) == len(before) + 1 and set(during.values()) == {(os.SCHED_RR, 3)}, during
        restore()
        after = policies()
        assert set(after.values()) == {(os.SCHED_OTHER, 0)}, after
        # two pipelines of one process: the highest priority while both hold it, the other's when
        # one lets go, the threads' own when both have
        first, second = use_realtime(2), use_realtime(5)
        assert set(policies().values()) == {(os.SCHED_RR, 5)}
        second(); second()   # (undoing twice is undoing once)
        assert set(policies().values()) == {(os.SCHED_RR, 2)}
        first()
        assert set(policies().values()) == {(os.SCHED_OTHER, 0)}
        done.set(); old.join(); new.join()
        print("ok")
    """)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_refused_with_what_to_change():
    """No CAP_SYS_NICE and RLIMIT_RTPRIO 0: a ConfigError naming both remedies, and nothing changed."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: give up what would allow it, then try
        os.close(r)
        try:
            import resource

            resource.setrlimit(resource.RLIMIT_RTPRIO, (0, 0))
            if os.geteuid() == 0:
                os.setuid(65534)   # nobody: a non-root uid has no effective capabilities
            from flexpipe.runtime.sched import use_realtime

            try:
                use_realtime(1)
                msg = "not refused"
            except ConfigError as e:
                msg = str(e) if os.sched_getscheduler(0) == os.SCHED_OTHER else "refused but changed"
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            msg = f"child failed: {type(e).__name__}: {e}"
        os.write(w, msg.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.read().decode()
    os.waitpid(pid, 0)
    assert "CAP_SYS_NICE" in msg and "ulimit -r 1" in msg and "rt_priority=0" in msg, msg


@needs_rt
def test_pipeline_processes_run_realtime_with_oracle_outputs():
    """Stage subprocesses (every thread: loop, ZeroMQ I/O, compute) and the launching process run
    SCHED_RR while the pipeline serves; outputs equal the oracle; the launching process's threads
    are put back when it closes."""
    out = _run("""
        import asyncio, os
        from flexpipe.api import FlexPipe
        from tests.pipeline_helpers import thread_policies as policies

        async def main():
            async with FlexPipe.launch("tiny", stages=2, rt_priority=2) as fp:
                pids = [s["pid"] for s in fp.controller.stage_info()]
                prompts = ["real-time stages", [5, 6, 7, 8, 9], "x" * 40]
                got = await asyncio.gather(*(fp.complete(p, max_tokens=12, temperature=0.8, seed=i)
                                             for i, p in enumerate(prompts)))
                for i, (p, c) in enumerate(zip(prompts, got)):
                    assert c.token_ids == fp.reference_tokens(p, max_tokens=12, temperature=0.8, seed=i), i
                for pid in pids + [os.getpid()]:
                    assert policies(pid) == {(os.SCHED_RR, 2)}, (pid, policies(pid))
            assert policies(os.getpid()) == {(os.SCHED_OTHER, 0)}, policies(os.getpid())
            print("ok")

        asyncio.run(main())
    """)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]

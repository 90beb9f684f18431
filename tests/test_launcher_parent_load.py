"""A stage whose parent dies while it loads its weights exits at once, not when the load is done.

Booting a stage builds its units from the checkpoint in the main thread, with the event loop blocked
(minutes for a large model): the "is my parent gone?" check of the serve loop ran only afterwards, so a
stage of a dead launcher, router or worker daemon held its CPU, GPU and memory for the whole load, for
nobody. Here the checkpoint's safetensors file is a FIFO that nobody writes: the load blocks in
safetensors' open() as on a stalled file system (holding the GIL: no Python thread runs meanwhile), and
would never finish.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from test_launcher_orphan import ROOT, _alive, assert_dies

pytestmark = pytest.mark.timeout(60)
reads_proc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

# Launches `target` (argv[1], kwargs argv[2]) with the real launcher, its mailbox at argv[4], writes the
# child's pid to argv[3], and SIGKILLs itself once the child has bound its mailbox (Actor.start binds it,
# then runs on_start, which loads the weights) and, with argv[5] set, answered Started.
LAUNCH_AND_DIE = textwrap.dedent("""
    import asyncio, json, os, signal, sys
    from flexpipe.runtime import ActorSystem
    from test_actor_helpers import FAST

    async def main():
        target, kwargs, pid_file, mailbox, started = sys.argv[1:6]
        async with ActorSystem(FAST) as system:
            launch = asyncio.ensure_future(system.launch(target, json.loads(kwargs), name="stage",
                                                         endpoint="ipc://" + mailbox))
            while not system.handles:   # launch() appends the handle right after the spawn
                await asyncio.sleep(0)
            with open(pid_file, "w") as f:
                f.write(str(system.handles[0].pid))
            while not os.path.exists(mailbox) and not launch.done():
                await asyncio.sleep(0.01)
            if started:
                await launch
            os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main())
""")


def _orphan(tmp_path, target: str, kwargs: dict, *, started: bool) -> str:
    """Run LAUNCH_AND_DIE, wait for the orphaned child to exit; returns the stderr of both."""
    pid_file, mailbox = tmp_path / "child.pid", tmp_path / "mailbox"
    env = dict(os.environ, TMPDIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    with open(tmp_path / "stderr", "w") as err:
        parent = subprocess.run([sys.executable, "-c", LAUNCH_AND_DIE, target, json.dumps(kwargs),
                                 str(pid_file), str(mailbox), "1" if started else ""],
                                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=err, timeout=45)
    child = int(pid_file.read_text())
    try:
        assert parent.returncode == -9, (tmp_path / "stderr").read_text()
        assert mailbox.exists(), "the child was not booting when its parent died"
    except AssertionError:
        if _alive(child):
            os.kill(child, 9)
        raise
    # at once; before the fix: when the load ends (never, here)
    assert_dies(child, 10, "the child of a dead parent is still loading", tmp_path / "stderr")
    return (tmp_path / "stderr").read_text()


@reads_proc
def test_a_stage_whose_parent_dies_while_it_loads_its_weights_exits(tmp_path):
    from flexpipe.model.config import ModelConfig

    cfg = ModelConfig(name="small", num_layers=2)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(cfg.to_hf()))
    os.mkfifo(ckpt / "model.safetensors")   # never written: the load never ends
    kwargs = {"config": cfg.to_dict(), "source": {"kind": "checkpoint", "path": str(ckpt)}, "start": 0, "end": 1}
    stderr = _orphan(tmp_path, "flexpipe.runtime.stage:StageActor", kwargs, started=False)
    # it was past the check at its start, and was not stopped by a failure of its own
    assert "exited before it started" not in stderr and "failed to start" not in stderr, stderr


@reads_proc
def test_a_serving_child_whose_parent_dies_still_stops_cleanly(tmp_path):
    """Once it serves, its loop watches the parent: it closes its actor and says why (not killed)."""
    stderr = _orphan(tmp_path, "test_actor_helpers:Echo", {}, started=True)
    assert "is gone; stopping" in stderr, stderr


# Where there is no prctl (not Linux), a thread watches the parent: the parent here is never `parent_pid`
# (this process's own pid), as for a child whose parent is gone.
WATCH_WITHOUT_PRCTL = textwrap.dedent("""
    import logging, os, sys, threading
    from flexpipe.runtime import launcher
    logging.basicConfig()
    launcher._parent_death_signal = lambda sig: False
    booted = launcher._exit_with_parent_while_booting("stage", os.getpid())
    if sys.argv[1] == "booted":   # the serve loop watches from here: the thread ends, and exits nothing
        booted()
        next(t for t in threading.enumerate() if t.name == "flexpipe-parent-watch").join()
        print("still running")
    else:
        threading.Event().wait(30)   # a load that would take this long
""")


@pytest.mark.parametrize("when", ["booting", "booted"])
def test_without_prctl_a_thread_watches_the_parent_while_booting(when):
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", WATCH_WITHOUT_PRCTL, when], cwd=ROOT, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=25)
    assert proc.returncode == 0, proc.stderr
    if when == "booting":
        assert "exited while it booted; exiting" in proc.stderr and not proc.stdout, proc.stdout + proc.stderr
    else:
        assert proc.stdout == "still running\n" and "exiting" not in proc.stderr, proc.stdout + proc.stderr

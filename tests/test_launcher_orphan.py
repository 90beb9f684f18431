"""A launched child whose parent dies while the child boots must not serve for ever.

The child used to read its parent's pid with os.getppid() once Python, spawn and its imports had
booted: when the parent (a worker daemon SIGKILLed during a reshape, or any launcher) was already
dead by then, it read init's pid (1), so its "is my parent gone?" check never fired, and the stage
kept its device memory for good. The launcher now names itself in the spec (ActorSpec.parent_pid).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Starts a stage with the real launcher, writes the child's pid, and SIGKILLs itself as soon as the
# child is spawned: the child is still booting (a spawned interpreter takes far longer to import the
# codec than this takes to die), so by the time it looks, its parent is already gone.
LAUNCH_AND_DIE = textwrap.dedent("""
    import asyncio, os, signal, sys
    from flexpipe.runtime import ActorSystem
    from test_actor_helpers import FAST

    async def main():
        async with ActorSystem(FAST) as system:
            asyncio.ensure_future(system.launch("test_actor_helpers:Echo", name="orphan"))
            while not system.handles:   # launch() appends the handle right after the spawn
                await asyncio.sleep(0)
            with open(sys.argv[1], "w") as f:
                f.write(str(system.handles[0].pid))
            os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main())
""")


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (an orphan is reaped by init, or a subreaper)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def assert_dies(pid: int, within: float, why: str, stderr) -> None:
    """Poll (under `within` seconds) until process `pid` is gone; assert it went, saying `why` with the
    child's stderr (a Path) otherwise, and kill it whatever happened."""
    try:
        deadline = time.monotonic() + within
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), f"{why}\n" + stderr.read_text()
    finally:
        if _alive(pid):
            os.kill(pid, 9)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_child_whose_parent_died_while_it_booted_exits(tmp_path):
    pid_file = tmp_path / "child.pid"
    env = dict(os.environ, TMPDIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    with open(tmp_path / "stderr", "w") as err:
        parent = subprocess.run([sys.executable, "-c", LAUNCH_AND_DIE, str(pid_file)], cwd=ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=err, stderr=err, timeout=30)
    assert parent.returncode == -9, (tmp_path / "stderr").read_text()
    child = int(pid_file.read_text())
    # booting, then at once; it served for ever before the fix
    assert_dies(child, 20, "the child of a dead parent is still running", tmp_path / "stderr")
    assert "exited before it started" in (tmp_path / "stderr").read_text()

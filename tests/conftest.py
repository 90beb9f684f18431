"""Fixtures for every test: nothing may leak out of a test (ZeroMQ sockets and contexts, actor
subprocesses, shared-memory segments). A leak fails the test that caused it, then is cleaned up so
that the next test starts clean."""

from __future__ import annotations

import multiprocessing
import os
import uuid

import pytest
import zmq
from zmq.sugar.context import Context as _Context
from zmq.sugar.socket import Socket as _Socket
from zmq.utils.garbage import gc as _zmq_gc   # pyzmq's own zero-copy helper: not ours to close

# This session's shm channel names (flexpipe/transports/shm.py reads FLEXPIPE_SHM_PREFIX at each listen,
# and every process the tests start inherits it): the leak check sees only this session's segments and
# control files, not those of another test run on the same machine. Not "fp-shm-...": a run that
# globs the default prefix does not see ours either. Set before any test starts a process.
_SHM_PREFIX = f"fp-test-{uuid.uuid4().hex[:10]}"
os.environ["FLEXPIPE_SHM_PREFIX"] = _SHM_PREFIX


def _shm_names() -> set[str]:
    """This session's channel files on disk (none on Linux while all goes well)."""
    from flexpipe.transports.shm import names_on_disk

    return names_on_disk(_SHM_PREFIX)


def _open_rings() -> set[str]:
    """This process's open fds to this session's nameless rings: a receiver a test left open keeps
    one; nothing of it is on disk for _shm_names to see."""
    from flexpipe.transports.shm import open_rings

    return open_rings("self", _SHM_PREFIX)


@pytest.fixture(autouse=True)
def no_leaked_resources():
    """Fail the test if it leaves a ZeroMQ socket or context open, a child process running, or a
    FlexPipe shared-memory segment behind."""
    sockets: list[_Socket] = []
    contexts: list[_Context] = []
    socket_init, context_init = _Socket.__init__, _Context.__init__

    def track_socket(self, *args, **kwargs):
        socket_init(self, *args, **kwargs)
        if not kwargs.get("shadow"):   # shadows (zmq.asyncio internals) close with their owner
            sockets.append(self)

    def track_context(self, *args, **kwargs):
        context_init(self, *args, **kwargs)
        if not kwargs.get("shadow"):
            contexts.append(self)

    shm_before, rings_before = _shm_names(), _open_rings()
    children_before = set(multiprocessing.active_children())
    _Socket.__init__, _Context.__init__ = track_socket, track_context
    try:
        yield
    finally:
        _Socket.__init__, _Context.__init__ = socket_init, context_init
    problems = []
    internal = _zmq_gc._context
    open_sockets = [s for s in sockets if not s.closed and s.context is not internal]
    if open_sockets:
        problems.append(f"{len(open_sockets)} ZeroMQ socket(s) left open: " + ", ".join(
            sorted({zmq.SocketType(s.type).name for s in open_sockets})))
        for s in open_sockets:
            s.close(linger=0)
    open_contexts = [c for c in contexts
                     if not c.closed and c is not zmq.Context._instance and c is not internal]
    if open_contexts:
        problems.append(f"{len(open_contexts)} ZeroMQ context(s) left open")
        for c in open_contexts:
            c.term()
    children = set(multiprocessing.active_children()) - children_before
    if children:
        problems.append(f"child processes left running: {sorted(p.name for p in children)}")
        for p in children:
            p.kill()
            p.join(5)
    leaked_rings = _open_rings() - rings_before
    if leaked_rings:
        problems.append(f"shm rings left open (a receiver not closed): {sorted(leaked_rings)}")
    leaked_shm = _shm_names() - shm_before
    if leaked_shm:
        problems.append(f"shared-memory segments or control files left behind: {sorted(leaked_shm)}")
        for path in leaked_shm:   # this session's own (its prefix): a mapping still open keeps its pages
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)

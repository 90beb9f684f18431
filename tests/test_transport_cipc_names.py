"""The cuda_ipc transport's names and lock (on its host-memory channel: its protocol, no GPU): a killed
receiver leaves no file behind (on Linux its control socket is in the abstract namespace and its lock
file has no name), a channel is named with shm.py's prefix (FLEXPIPE_SHM_PREFIX), where files remain
(off Linux) the test suite's leak check sees them, and a parked ring is given back as soon as its
sender's process is gone."""

from __future__ import annotations

import asyncio
import glob
import json
import os
import tempfile
import weakref

import pytest
import torch

from flexpipe.errors import ActorClosed, ConfigError
from flexpipe.transports import cuda_ipc, open_receiver, open_sender
from flexpipe.transports import shm
from flexpipe.transports.shm import SHM_DIR
from ring_helpers import PREFIX_ENV, STRANGER, child_process, kill_child, linux_only, needs_root

pytestmark = pytest.mark.timeout(60)

def _files_of(tag: str) -> list[str]:
    """What is on disk of a channel (its tag is in every name it gives a file, with any prefix)."""
    return sorted({p for d in (SHM_DIR, tempfile.gettempdir()) for p in glob.glob(os.path.join(d, f"*{tag}*"))})


_RECEIVER_PROCESS = """
import asyncio, json, sys
import torch
from flexpipe.transports import open_receiver, open_sender

async def main():
    rx = await open_receiver("cuda_ipc", device="cpu", ring_bytes=1 << 16)
    if sys.argv[1] == "with-sender":   # (the host-memory channel's sender is in the receiver's process)
        tx = await open_sender(rx.address)
        send = asyncio.ensure_future(tx.send(torch.arange(5)))
        (got,) = await rx.recv()
        await send
        assert torch.equal(got, torch.arange(5))
    print(json.dumps({k: rx.address[k] for k in ("channel", "ctrl", "lock")}), flush=True)
    sys.stdin.read()                    # until the test kills us
asyncio.run(main())
"""


@linux_only
@pytest.mark.timeout(90)   # the child imports torch
@pytest.mark.parametrize("sender", ["no-sender", "with-sender"])
async def test_a_killed_receiver_process_leaves_no_file(sender):
    """A receiver in another process opens a channel (and, with a sender, carries a send), and is killed
    (SIGKILL): neither a control socket file nor a lock file is left on disk (they were
    /tmp/fp-cipc-<tag>.ctl and .lock, the lock only until a sender came), and the channel is named
    with this session's prefix, which the child inherited."""
    async with child_process(_RECEIVER_PROCESS, sender) as child:
        assert child.stdout is not None
        address = json.loads(await asyncio.wait_for(child.stdout.readline(), 60))
    tag = address["channel"]   # killed: the leak check removes what a failing run leaves
    leftover = _files_of(tag)
    assert leftover == [], f"a killed receiver left {leftover}"
    assert address["ctrl"] == f"ipc://@{os.environ[PREFIX_ENV]}-cipc-{tag}.ctl"
    assert address["lock"].startswith("/proc/")


@pytest.mark.parametrize("prefix", ["", "a/b", "fp.cipc", "x" * 33])
async def test_a_bad_prefix_is_refused(prefix, monkeypatch):
    monkeypatch.setenv(PREFIX_ENV, prefix)
    with pytest.raises(ConfigError, match=f"{PREFIX_ENV}=.*letters, digits, '-' or '_'"):
        rx = await open_receiver("cuda_ipc", device="cpu", ring_bytes=1 << 16)
        await rx.aclose()   # (only where it is not refused)


async def _carries(rx, tx) -> bool:
    send = asyncio.ensure_future(tx.send(torch.arange(5)))
    (got,) = await asyncio.wait_for(rx.recv(), 10)
    await asyncio.wait_for(send, 10)
    return torch.equal(got, torch.arange(5))


@linux_only
async def test_on_linux_a_channel_has_nothing_on_disk(monkeypatch):
    """Named with the prefix in effect at listen; the lock is opened through the receiver's fd."""
    prefix = "My_prefix-2" + "x" * 21   # 32 characters, the most allowed
    monkeypatch.setenv(PREFIX_ENV, prefix)
    rx = await open_receiver("cuda_ipc", device="cpu", ring_bytes=1 << 16)
    tx = None
    try:
        tag = rx.address["channel"]
        assert rx.address["ctrl"] == f"ipc://@{prefix}-cipc-{tag}.ctl"
        assert _files_of(tag) == []
        tx = await open_sender(rx.address)
        assert await _carries(rx, tx)
    finally:
        if tx is not None:
            await tx.aclose()
        await rx.aclose()
    assert _files_of(tag) == []


async def test_off_linux_the_files_are_where_the_leak_check_looks(monkeypatch):
    """Off Linux (NAMELESS and shm.ABSTRACT_CTRL false, as they are there) the control socket and the lock are files: they match
    the patterns tests/conftest.py globs for this session's leftovers (<shm dir>/<prefix>-* and
    <temporary dir>/<prefix>-*.ctl), the channel works, and closing it removes them."""
    monkeypatch.setattr(cuda_ipc, "NAMELESS", False)
    monkeypatch.setattr(shm, "ABSTRACT_CTRL", False)   # (shm.bind_control binds both transports' sockets)
    prefix = os.environ[PREFIX_ENV]   # this session's (conftest.py's)
    leak_check = (os.path.join(SHM_DIR, f"{prefix}-*"), os.path.join(tempfile.gettempdir(), f"{prefix}-*.ctl"))
    rx = await open_receiver("cuda_ipc", device="cpu", ring_bytes=1 << 16)
    tx = None
    try:
        tag = rx.address["channel"]
        files = _files_of(tag)
        seen = {p for pattern in leak_check for p in glob.glob(pattern)}
        assert files == sorted([os.path.join(tempfile.gettempdir(), f"{prefix}-cipc-{tag}.ctl"),
                                os.path.join(SHM_DIR, f"{prefix}-cipc-{tag}.lock")])
        assert set(files) <= seen
        tx = await open_sender(rx.address)
        assert await _carries(rx, tx)
        with pytest.raises(ActorClosed, match="has its sender"):
            await open_sender(rx.address)
    finally:
        if tx is not None:
            await tx.aclose()
        await rx.aclose()
    assert _files_of(tag) == []


@linux_only
async def test_a_stale_lock_number_naming_another_file_is_not_taken(tmp_path):
    """Once a receiver has closed, the fd number in its address may name another of its files: a late
    sender is refused (ActorClosed) and neither locks nor writes that file."""
    other = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT, 0o600)
    rx = await open_receiver("cuda_ipc", device="cpu", ring_bytes=1 << 16)
    try:
        await rx.aclose()
        number = int(rx.address["lock"].rsplit("/", 1)[1])
        with pytest.raises(OSError):
            os.fstat(number)   # free: the receiver closed it
        os.dup2(other, number)
        try:
            with pytest.raises(ActorClosed, match="has closed"):
                await open_sender(rx.address)
        finally:
            os.close(number)
    finally:
        os.close(other)
        await rx.aclose()
    assert (tmp_path / "other").read_bytes() == b""


_SENDER_PROCESS = """
import sys
from flexpipe.transports.cuda_ipc import _hold_lock
fd = _hold_lock(sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3:]])   # what connect() takes first
print("locked", flush=True)
sys.stdin.read()                       # until the test kills us
"""


@pytest.mark.timeout(90)   # the child imports torch
async def test_a_parked_ring_is_given_back_when_its_sender_process_dies():
    """A closed receiver's ring is parked while a sender in another process holds the channel's lock;
    when that process is killed, the ring is given back without waiting for this process to open or
    close another channel (or to sweep)."""
    loop = asyncio.get_running_loop()
    freed = asyncio.Event()
    async with await open_receiver("cuda_ipc", device="cpu", ring_bytes=1 << 16) as rx:
        ring = weakref.ref(rx._ring, lambda _: loop.call_soon_threadsafe(freed.set))
        address = rx.address
        async with child_process(_SENDER_PROCESS, address["lock"], address["channel"],
                                 *map(str, address["lock_id"])) as child:
            assert child.stdout is not None
            assert await asyncio.wait_for(child.stdout.readline(), 60) == b"locked\n"
            await rx.aclose()
            parked = ring() is not None and not freed.is_set()
            await kill_child(child)
            await asyncio.wait_for(freed.wait(), 10)
            assert parked and ring() is None
    assert cuda_ipc.sweep_parked() == 0


@linux_only
@needs_root
async def test_a_process_of_another_user_cannot_speak_on_the_control_socket():
    """An abstract socket name has no file permissions: without the receiver's filter on its peers' user,
    another user's hello would take the channel, and the real sender's would end it."""
    async with await open_receiver("cuda_ipc", device="cpu", ring_bytes=1 << 16) as rx:
        hello = cuda_ipc._control(cuda_ipc.IpcHello(os.getpid(), b"")).hex()
        async with child_process(STRANGER, rx.address["ctrl"], hello) as stranger:
            await asyncio.wait_for(stranger.wait(), 30)   # its hello was delivered, or refused for 1 s
        async with await open_sender(rx.address) as tx:
            assert await _carries(rx, tx)

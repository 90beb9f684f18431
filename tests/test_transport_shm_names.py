"""The shm transport's names: on Linux a channel has nothing on disk, so a killed receiver leaves no file
behind, with or without a sender (its ring is opened through /proc, checked by inode; its control
socket is in the abstract namespace), a channel still has one sender, the FLEXPIPE_SHM_PREFIX that names
a channel is checked and inherited by child processes, a process of another user can neither open the
ring nor speak on the control socket, and the named ring (off Linux, and old receivers' addresses)
still works."""

from __future__ import annotations

import asyncio
import errno
import glob
import json
import os
import sys
import tempfile

import pytest
import torch

from flexpipe.errors import ActorClosed, ConfigError
from flexpipe.transports import open_receiver, open_sender, shm
from flexpipe.transports.shm import SHM_DIR
from ring_helpers import PREFIX_ENV, STRANGER, child_process, kill_child, linux_only, needs_root

pytestmark = pytest.mark.timeout(60)

def _files_named(name: str) -> list[str]:
    """What is on disk under a channel's name (`<prefix>-<tag>`): its ring, its control socket file."""
    return sorted({p for d in (SHM_DIR, tempfile.gettempdir()) for p in glob.glob(os.path.join(d, f"{name}*"))})


_RECEIVER_PROCESS = """
import asyncio, json, sys
from flexpipe.transports import open_receiver

async def main():
    rx = await open_receiver("shm", ring_bytes=int(sys.argv[1]))
    print(json.dumps(rx.address), flush=True)
    await rx.recv()                     # the view is dropped: the ring is given back
    print("received", flush=True)
    sys.stdin.read()                    # until the test kills us

asyncio.run(main())
"""


@linux_only
@pytest.mark.timeout(90)   # the child imports torch
async def test_a_killed_receiver_process_leaves_no_file_and_its_sender_learns_it():
    """A receiver in another process binds a channel, takes its sender (which opens the ring through
    /proc) and a send, and is killed (SIGKILL): neither the ring nor a control socket file is left on disk,
    the channel is named with this session's prefix (inherited), and the sender's sends raise
    ActorClosed once the ring is full."""
    ring = 64 << 10
    async with child_process(_RECEIVER_PROCESS, str(ring)) as child:
        assert child.stdout is not None
        address = json.loads(await asyncio.wait_for(child.stdout.readline(), 60))
        name = address["channel"]
        assert address["ring"].startswith(f"/proc/{child.pid}/fd/")
        async with await open_sender(address) as tx:
            x = torch.arange(ring // 4, dtype=torch.int32)                   # the whole ring
            await asyncio.wait_for(tx.send(x), 10)
            assert await asyncio.wait_for(child.stdout.readline(), 30) == b"received\n"
            await kill_child(child)
            leftover = _files_named(name)   # (the leak check removes what a failing run leaves)

            async def send_until_closed() -> None:
                while True:   # the second send waits for ring space: the receiver is gone, so it raises
                    await tx.send(x)

            with pytest.raises(ActorClosed, match="closed"):
                await asyncio.wait_for(send_until_closed(), 30)
    assert leftover == [], f"a killed receiver left {leftover}"
    assert name.startswith(os.environ[PREFIX_ENV] + "-")


@linux_only
@pytest.mark.timeout(90)   # the child imports torch
async def test_a_receiver_killed_before_any_sender_leaves_nothing():
    """A receiver in another process binds a channel that no sender ever opens and is killed (SIGKILL):
    nothing of the channel is on disk (the ring was a file in /dev/shm, whose name only a sender
    removed: 64 MiB and more left for good per channel), and a sender that comes late is refused."""
    prefix = os.environ[PREFIX_ENV]   # this session's: the child inherits it
    before = set(_files_named(prefix + "-"))
    async with child_process(_RECEIVER_PROCESS, str(1 << 20)) as child:
        assert child.stdout is not None
        address = json.loads(await asyncio.wait_for(child.stdout.readline(), 60))
        during = set(_files_named(prefix + "-")) - before   # the ring's memory while the receiver lives
        await kill_child(child)
    leftover = sorted(set(_files_named(prefix + "-")) - before)   # (the leak check removes those)
    assert leftover == [], f"a receiver killed before its sender came left {leftover}"
    assert during == set(), f"a live channel is on disk: {sorted(during)}"
    with pytest.raises(ActorClosed, match="not open: its receiver has closed"):
        await open_sender(address)


async def _carries(rx, tx, n: int = 5) -> bool:
    send = asyncio.ensure_future(tx.send(torch.arange(n)))
    (got,) = await asyncio.wait_for(rx.recv(), 10)
    await asyncio.wait_for(send, 10)
    return torch.equal(got, torch.arange(n))


@pytest.mark.parametrize("when", ["before-its-hello-is-read", "after-its-hello-was-read"])
async def test_a_second_sender_is_refused_and_writes_nothing(when):
    """One sender per channel: a second is refused at connect (ActorClosed) whether or not the receiver
    has read the first's hello yet (before: the ring is still open to it, and the first's claim refuses
    it; after: the receiver has let go of the ring), and the first's sends are intact."""
    async with await open_receiver("shm", ring_bytes=1 << 16) as rx, await open_sender(rx.address) as tx:
        if when == "after-its-hello-was-read":
            assert await _carries(rx, tx)
        with pytest.raises(ActorClosed, match="has its sender" if when.startswith("before") else "not open"):
            await open_sender(rx.address)
        assert await _carries(rx, tx, 7)
        assert await _carries(rx, tx, 9)


@linux_only
async def test_a_sender_that_opened_the_ring_before_the_receiver_closed_is_refused():
    """A sender opens the ring (through /proc) while the receiver is open, and the receiver closes before
    the sender claims it: the receiver's mark comes first, so the sender does not go on to map a ring
    whose receiver is gone (what connect does, step by step)."""
    rx = await open_receiver("shm", ring_bytes=1 << 16)
    try:
        address = rx.address
        fd = shm.open_peer_file(address["ring"], address["ring_id"], "the ring", "gone")
    finally:
        await rx.aclose()
    try:
        with pytest.raises(ActorClosed, match="receiver of .* has closed"):
            shm.claim_channel(fd, address["ring_bytes"], f"shm channel {address['channel']}")
    finally:
        os.close(fd)


@linux_only
@pytest.mark.parametrize("let_go", ["receiver-closed", "sender-came"])
async def test_a_ring_number_naming_another_file_is_not_opened(let_go, tmp_path):
    """Once the receiver has let go of the ring's fd (it closed, or its sender came), the number in its
    address may name another of its files: a late sender is refused (ActorClosed) and neither maps nor
    writes that file."""
    other = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(other, 1 << 16)   # as large as the ring: only its inode tells it apart
    try:
        async with await open_receiver("shm", ring_bytes=1 << 16) as rx:
            number = int(rx.address["ring"].rsplit("/", 1)[1])
            tx = None
            if let_go == "sender-came":
                tx = await open_sender(rx.address)
                assert await _carries(rx, tx)
            else:
                await rx.aclose()
            try:
                with pytest.raises(OSError):
                    os.fstat(number)   # free: the receiver closed it
                os.dup2(other, number)
                try:
                    with pytest.raises(ActorClosed, match="not open"):
                        await open_sender(rx.address)
                finally:
                    os.close(number)
            finally:
                if tx is not None:
                    await tx.aclose()
    finally:
        os.close(other)
    assert (tmp_path / "other").read_bytes() == bytes(1 << 16)


_STRANGER_SENDER = """
import asyncio, json, os, sys
from flexpipe.transports import open_sender
os.setgid(65534)
os.setuid(65534)
try:
    asyncio.run(open_sender(json.loads(sys.argv[1])))
    print("opened", flush=True)
except Exception as e:
    print(type(e).__name__, e, flush=True)
"""


@linux_only
@needs_root
@pytest.mark.timeout(90)   # the child imports torch
async def test_a_sender_of_another_user_cannot_open_the_ring():
    """The ring has no name: /proc lets only the receiver's user (or root) open it, and the refusal is a
    ConfigError that says what to change; the channel then takes its real sender."""
    async with await open_receiver("shm", ring_bytes=1 << 16) as rx:
        async with child_process(_STRANGER_SENDER, json.dumps(rx.address)) as stranger:
            assert stranger.stdout is not None
            said = (await asyncio.wait_for(stranger.stdout.readline(), 60)).decode()
        async with await open_sender(rx.address) as tx:
            assert await _carries(rx, tx)
    assert said.startswith("ConfigError cannot open the ring of shm channel"), said
    assert "receiver's user" in said


@linux_only
async def test_without_memfd_the_ring_is_a_file_unlinked_at_once(monkeypatch):
    """Where memfd_create is refused (a seccomp filter, an old kernel: here it is made to raise ENOSYS)
    the ring is a file in the shm directory, unlinked as soon as it is made: still nothing on disk."""
    def refused(*args):
        raise OSError(errno.ENOSYS, "memfd_create refused")
    monkeypatch.setattr(os, "memfd_create", refused)
    async with await open_receiver("shm", ring_bytes=1 << 16) as rx:
        name = rx.address["channel"]
        assert os.readlink(rx.address["ring"]) == os.path.join(SHM_DIR, name) + " (deleted)"
        assert _files_named(name) == []
        async with await open_sender(rx.address) as tx:
            assert await _carries(rx, tx)
            with pytest.raises(ActorClosed, match="not open"):
                await open_sender(rx.address)


@pytest.mark.parametrize("old", [False, True], ids=["off-linux", "old-receiver-address"])
async def test_a_named_ring_still_works(old, monkeypatch):
    """Off Linux (NAMELESS false, as there) the ring is the file <prefix>-<tag> in the shm directory, which
    the leak check sees, and its first sender unlinks its name; a new sender also takes such an address
    from a receiver of before the nameless ring (no "channel" in it). A second sender is refused, and
    closing leaves nothing."""
    monkeypatch.setattr(shm, "NAMELESS", False)
    if not old:
        monkeypatch.setattr(shm, "ABSTRACT_CTRL", False)
    async with await open_receiver("shm", ring_bytes=1 << 16) as rx:
        name = rx.address["channel"]
        address = {k: v for k, v in rx.address.items() if not (old and k == "channel")}
        assert "ring" not in address and address["path"] == os.path.join(SHM_DIR, name)
        assert os.path.join(SHM_DIR, name) in glob.glob(os.path.join(SHM_DIR, f"{os.environ[PREFIX_ENV]}-*"))
        async with await open_sender(address) as tx:
            assert await _carries(rx, tx)
            with pytest.raises(ActorClosed, match=f"shm channel {name} is not open"):
                await open_sender(address)
            assert await _carries(rx, tx, 7)
    assert _files_named(name) == []


@pytest.mark.parametrize("prefix", ["", "a/b", "../up", "fp shm", "fp.shm", "é", "x" * 33])
async def test_a_bad_prefix_is_refused_before_anything_is_created(prefix, monkeypatch):
    monkeypatch.setenv(PREFIX_ENV, prefix)
    before = _files_named(prefix + "-")
    with pytest.raises(ConfigError, match=f"{PREFIX_ENV}=.*letters, digits, '-' or '_'"):
        await open_receiver("shm", ring_bytes=1 << 16)
    assert _files_named(prefix + "-") == before


async def test_a_good_prefix_names_the_ring_and_the_control_socket(monkeypatch):
    prefix = "My_prefix-2" + "x" * 21   # 32 characters, the most allowed
    monkeypatch.setenv(PREFIX_ENV, prefix)
    rx = await open_receiver("shm", ring_bytes=1 << 16)
    tx = None
    try:
        name = rx.address["channel"]
        assert name.startswith(prefix + "-")
        if sys.platform.startswith("linux"):
            assert _files_named(name) == []   # nothing on disk, even while open
        assert rx.address["ctrl"] == (f"ipc://@{name}.ctl" if sys.platform.startswith("linux") else
                                      f"ipc://{os.path.join(tempfile.gettempdir(), name)}.ctl")
        tx = await open_sender(rx.address)
        send = asyncio.ensure_future(tx.send(torch.arange(5)))
        (got,) = await asyncio.wait_for(rx.recv(), 10)
        await send
        assert torch.equal(got, torch.arange(5))
    finally:
        if tx is not None:
            await tx.aclose()
        await rx.aclose()
    assert _files_named(name) == []


@linux_only
@needs_root
async def test_a_process_of_another_user_cannot_speak_on_the_control_socket():
    """An abstract socket name has no file permissions: without the receiver's filter on its peers' user,
    another user's hello would take the channel, and the real sender's would end it."""
    async with await open_receiver("shm", ring_bytes=1 << 16) as rx:
        async with child_process(STRANGER, rx.address["ctrl"], b"O".hex()) as stranger:   # shm's hello
            await asyncio.wait_for(stranger.wait(), 30)   # its hello was delivered, or refused for 1 s
        async with await open_sender(rx.address) as tx:
            send = asyncio.ensure_future(tx.send(torch.arange(5)))
            (got,) = await asyncio.wait_for(rx.recv(), 10)
            await send
            assert torch.equal(got, torch.arange(5))

"""The shm transport's names: a killed receiver leaves no file behind (its control socket is in Linux's
abstract namespace), the FLEXPIPE_SHM_PREFIX that names a channel is checked and inherited by child
processes, and a process of another user cannot speak on a channel's control socket."""

from __future__ import annotations

import asyncio
import glob
import json
import os
import sys
import tempfile

import pytest
import torch

from flexpipe.errors import ActorClosed, ConfigError
from flexpipe.transports import open_receiver, open_sender
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
    """A receiver in another process binds a channel, takes its sender (which unlinks the ring's name)
    and a send, and is killed (SIGKILL): neither the ring nor a control socket file is left on disk,
    the channel is named with this session's prefix (inherited), and the sender's sends raise
    ActorClosed once the ring is full."""
    ring = 64 << 10
    async with child_process(_RECEIVER_PROCESS, str(ring)) as child:
        assert child.stdout is not None
        address = json.loads(await asyncio.wait_for(child.stdout.readline(), 60))
        name = os.path.basename(address["path"])
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
        name = os.path.basename(rx.address["path"])
        assert name.startswith(prefix + "-")
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

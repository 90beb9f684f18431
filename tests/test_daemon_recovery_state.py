"""What the router daemon says and books after a recovery moved a stage to another device: a router and
two workers as real processes (as tests/test_daemons.py starts them), driven through RemoteFlexPipe.

A worker that leaves takes its stage with it; the recovery starts that stage again on the other
worker's device (the stage launcher moves it there).  The controller's shape used to go on naming the
device the stage had died on (status()["shape"], and the router's pipeline) until the next reshape,
while status()["stages"] named the device it runs on.
"""

from __future__ import annotations

import asyncio
import signal

import pytest

from flexpipe.runtime.remote import RemoteFlexPipe
from tests.pipeline_helpers import check_against_oracle, request_mix, run_all
from tests.test_daemons import START_S, one_torch_thread  # noqa: F401 - (a module fixture: autouse)
# the same cluster (a router, workers wa and wb on one CPU each), started anew for this module
from tests.test_daemon_reshape import cluster, connect, worker  # noqa: F401 - (cluster: a module fixture)


def devices_of(st: dict) -> tuple[list[str], list[str]]:
    """(the devices the shape names, the devices the stages run on), stage by stage."""
    return [s["device"] for s in st["shape"]["stages"]], [s["device"] for s in st["stages"]]


def booked(st: dict) -> int:
    """Bytes the allocator has reserved, checked against its free memory (the books balance)."""
    a = st["allocator"]
    assert a["memory_total_bytes"] - a["memory_free_bytes"] == a["reserved_bytes"], a
    return a["reserved_bytes"]


@pytest.mark.timeout(180)
@pytest.mark.slow   # (~25 s on 2 cores, with its own cluster: `make test-slow`)
async def test_a_stage_recovered_on_another_device_is_named_there_by_the_shape(cluster):
    async with connect(cluster) as fp:
        before = await fp.status()
        assert devices_of(before)[0] == devices_of(before)[1] and {s["worker"] for s in before["stages"]} == \
            {"wa", "wb"}, before["stages"]
        gone, stays = (before["stages"][0]["worker"], before["stages"][1]["worker"])   # (join order decides)
        per_stage = booked(before) // 2   # (both stages serve 9 units of tiny: they book the same)
        reqs = request_mix(3, seed=71, max_tokens=(20, 40))
        mark = cluster.router.mark()
        traffic = asyncio.ensure_future(run_all(fp, reqs))
        # the first stage's worker leaves (SIGTERM): the router drops it and recovers its stage at once,
        # on the other worker's device
        cluster.workers[gone].proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(cluster.router.wait_for, "stage_moved", 30, mark, from_device=f"{gone}/0",
                                to_device=f"{stays}/0")
        outs = await traffic
        assert cluster.workers[gone].proc.wait(30) == 0
        await asyncio.to_thread(check_against_oracle, fp, reqs, outs)

        st = await fp.status()
        rec = st["reshapes"][-1]
        assert rec["kind"] == "recovery" and rec["ok"], rec
        assert st["shape"]["epoch"] == before["shape"]["epoch"] + 1 == rec["to_epoch"]
        # the shape names where each stage runs now, as the stages do
        assert devices_of(st) == ([f"{stays}/0"] * 2, [f"{stays}/0"] * 2), st["shape"]
        # the allocator books both stages there, and nothing on the device that left with its worker
        assert st["allocator"]["workers"] == [stays] and st["allocator"]["reservations"] == 2
        assert booked(st) == 2 * per_stage

        # the worker comes back: a reshape spreads the stages over both again (from where they run)
        mark = cluster.router.mark()
        cluster.workers[gone] = worker(gone, cluster.url)
        cluster.all.append(cluster.workers[gone])
        await asyncio.to_thread(cluster.router.wait_for, "worker_joined", START_S, mark, worker=gone)
        rs = await fp.reshape(stages=2)
        assert rs.stages_kept == 1 and rs.stages_started == 1 and rs.stages_retired == 1, rs
        st = await fp.status()
        shape_devices, stage_devices = devices_of(st)
        assert shape_devices == stage_devices and sorted(stage_devices) == ["wa/0", "wb/0"], st["shape"]
        assert st["allocator"]["reservations"] == 2 and booked(st) == 2 * per_stage
        c = await fp.complete("after the move", max_tokens=6)
        assert c.token_ids == await asyncio.to_thread(fp.reference_tokens, "after the move", max_tokens=6)

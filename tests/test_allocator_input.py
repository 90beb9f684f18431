"""The allocator when workers leave or change mid-flight, and when what it is told is wrong: reshapes whose
new side leaves, workers announcing again with fewer GPUs, plans whose GPUs left, negative figures."""

from __future__ import annotations

import pytest

from flexpipe.errors import PlacementError, TopologyError
from flexpipe.placement.placer import FlexPlacer, ReplicaRequest, UnitDemand
from flexpipe.placement.topology import GiB
from flexpipe.runtime.actor import LocalContext
from flexpipe.runtime.allocator import (AbortReshape, AllocatorBehaviour, AllocatorCore, Conflict, Granted,
                                        PlaceReplica, SplitStage, WithdrawWorker)


def worker(name: str, n: int = 1, free_gib: float = 80) -> dict:
    return {"nodes": [{"name": name, "rack": "r0", "gpus": [
        {"index": i, "model": "A100-80", "free_mib": int(free_gib * 1024)} for i in range(n)]}]}


def eight_units(stages: int = 1, gib: float = 8) -> ReplicaRequest:
    return ReplicaRequest([UnitDemand(gib * GiB, 1e9, 8192, 0) for _ in range(8)], stages=stages, max_stages=stages)


def free_of(core: AllocatorCore, gid: str) -> int:
    return int(core.topo.free[core.topo.index[gid]])


def split_onto_b() -> tuple[AllocatorCore, str, dict[str, int]]:
    """A one-stage replica on A/0, split so that half of it goes to B/0 (the switch not yet done)."""
    core = AllocatorCore()
    core.announce("A", worker("A"))
    core.announce("B", worker("B"))
    req = eight_units()
    r = core.place(req, owner="m")
    assert r.placement.gpus == ["A/0"]
    before = dict(r.amounts)
    core.split(r.id, 0, req)
    assert sorted(r.placement.gpus) == ["A/0", "B/0"] and r.old_placement.gpus == ["A/0"]
    return core, r.id, before


# --- a worker leaves during a reshape ---------------------------------------------------------------------
def test_new_side_leaving_rolls_the_reshape_back_to_the_old_shape():
    core, rid, before = split_onto_b()
    old = core.reservations[rid].old_placement
    assert core.withdraw("B") == []          # not lost: the old shape, all on A, serves on
    r = core.reservations[rid]
    assert r.placement == old and r.old_placement is None and r.amounts == before
    assert rid in core.aborted and "B" in core.aborted[rid]
    assert free_of(core, "A/0") == 80 * GiB - before["A/0"]   # what the serving stage uses stays booked
    with pytest.raises(Conflict, match="A/0"):
        core.reserve({"A/0": 80 * GiB - before["A/0"] + 1}, owner="someone-else")
    core.check()
    with pytest.raises(PlacementError, match="aborted.*B"):   # the switch cannot happen any more
        core.commit_reshape(rid)
    assert core.abort_reshape(rid).placement == old    # the owner's abort acknowledges it
    assert rid not in core.aborted
    core.check()


def test_old_side_leaving_drops_the_reservation():
    core, rid, _ = split_onto_b()
    assert core.withdraw("A") == [rid]                 # the old shape cannot serve: the replica is gone
    assert rid not in core.reservations and core.reserved.get("B/0", 0) == 0
    assert free_of(core, "B/0") == 80 * GiB and "A" in core.lost[rid]
    with pytest.raises(PlacementError, match="left"):
        core.release(rid)
    core.check()


async def test_withdraw_message_during_a_split_keeps_the_old_shape():
    req = eight_units()
    alloc = AllocatorBehaviour()
    ctx = await LocalContext(alloc, "alloc").start()
    alloc.core.announce("A", worker("A"))
    alloc.core.announce("B", worker("B"))
    g = await ctx.deliver(PlaceReplica(req.to_dict(), "m"))
    g = await ctx.deliver(SplitStage(g.rid, 0, req.to_dict()))
    assert g.old_placement is not None
    assert await ctx.deliver(WithdrawWorker("B")) == []
    g = await ctx.deliver(AbortReshape(g.rid))
    assert isinstance(g, Granted) and g.to_placement().gpus == ["A/0"] and g.old_placement is None


# --- a worker announces again with fewer GPUs, or under another node name ---------------------------------
def test_announcing_again_without_a_gpu_drops_its_reservations():
    core = AllocatorCore()
    core.announce("w", worker("w", 2))
    on1 = core.reserve({"w/1": 30 * GiB}, owner="stage-b")
    on0 = core.reserve({"w/0": 10 * GiB}, owner="stage-a")
    assert core.announce("w", worker("w", 1)) == ["w/0"]     # still the GPU ids (the router's device list)
    assert on1.id not in core.reservations and on0.id in core.reservations
    assert "w/1" in core.lost[on1.id]
    assert core.reserved.get("w/1", 0) == 0 and "w/1" not in core.external
    assert core.status()["reserved_bytes"] == 10 * GiB
    core.check()


def test_a_renamed_node_takes_its_reservations_with_it():
    core = AllocatorCore()
    core.announce("w", worker("w", 1))
    r = core.reserve({"w/0": 30 * GiB}, owner="x")
    assert core.announce("w", worker("w-renamed", 1)) == ["w-renamed/0"]
    assert not core.reservations and not any(core.reserved.values()) and r.id in core.lost
    assert core.withdraw("w") == []
    assert [g.id for g in core.topo.gpus] == []
    core.check()


def test_announcing_again_without_the_new_side_of_a_split_rolls_it_back():
    core = AllocatorCore()
    core.announce("A", worker("A"))
    core.announce("B", worker("B", 2))
    core.reserve({"B/0": 80 * GiB}, owner="full")     # the split's new side must land on B/1
    req = eight_units()
    r = core.place(req, owner="m")
    before = dict(r.amounts)
    core.split(r.id, 0, req)
    assert "B/1" in r.placement.gpus
    core.announce("B", worker("B", 1))                 # B/1 is gone
    assert r.old_placement is None and r.amounts == before and r.id in core.aborted
    core.check()


# --- a worker leaves between plan and commit --------------------------------------------------------------
def test_commit_of_a_plan_whose_gpu_left_is_a_conflict():
    core = AllocatorCore()
    core.announce("wa", worker("wa"))
    core.announce("wb", worker("wb", free_gib=40))
    req = eight_units(gib=4)
    plan = core.plan(req)
    assert plan.placement.gpus == ["wa/0"]
    core.withdraw("wa")
    with pytest.raises(Conflict, match="wa/0"):
        core.commit(plan, "m")
    core.check()


class _WithdrawWhilePlanning(FlexPlacer):
    """A real placer; while it decides the first time, a WithdrawWorker lands (as one handled meanwhile)."""

    def __init__(self, core_of, worker_name: str):
        super().__init__()
        self.core_of, self.worker_name, self.calls = core_of, worker_name, 0

    def place(self, req, topo, exclude=()):
        p = super().place(req, topo, exclude)
        self.calls += 1
        if self.calls == 1:
            self.core_of().withdraw(self.worker_name)
        return p


async def test_place_replica_plans_again_when_a_worker_leaves_meanwhile():
    alloc = AllocatorBehaviour()
    alloc.core.placer = _WithdrawWhilePlanning(lambda: alloc.core, "wa")
    alloc.core.announce("wa", worker("wa"))
    alloc.core.announce("wb", worker("wb", free_gib=40))
    ctx = await LocalContext(alloc, "alloc").start()
    g = await ctx.deliver(PlaceReplica(eight_units(gib=4).to_dict(), "m"))
    assert g.to_placement().gpus == ["wb/0"] and alloc.core.placer.calls == 2
    alloc.core.check()


# --- wrong figures ------------------------------------------------------------------------------------
def test_report_refuses_negative_or_non_numeric_usage():
    core = AllocatorCore()
    core.announce("w", worker("w", 2))
    for bad in (-40 * GiB, float("nan"), "lots"):
        with pytest.raises(TopologyError, match="w/0.*bytes"):
            core.report({"w/1": GiB, "w/0": bad})
    assert free_of(core, "w/1") == 80 * GiB             # all or nothing: the good figure was not applied
    core.report({"w/0": 40 * GiB})
    assert free_of(core, "w/0") == 40 * GiB
    core.check()


def test_reserve_refuses_negative_bytes():
    core = AllocatorCore()
    core.announce("w", worker("w"))
    with pytest.raises(PlacementError, match="w/0.*-1"):
        core.reserve({"w/0": -GiB})
    assert not core.reservations and free_of(core, "w/0") == 80 * GiB


@pytest.mark.parametrize("stage", [5, -1, 2])
def test_split_of_a_stage_that_does_not_exist_says_which_exist(stage):
    core = AllocatorCore()
    core.announce("w", worker("w", 4))
    req = eight_units(stages=2)
    r = core.place(req, owner="m")
    amounts = dict(r.amounts)
    with pytest.raises(PlacementError, match=r"stage .*0\.\.1"):
        core.split(r.id, stage, req)
    assert r.old_placement is None and r.amounts == amounts
    core.check()

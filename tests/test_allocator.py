"""The allocator: inventory, reservations, placements, and no double booking under concurrent requests."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from flexpipe.errors import PlacementError, TopologyError
from flexpipe.placement.placer import ReplicaRequest, UnitDemand, check_placement
from flexpipe.placement.topology import GiB, MiB, fragment, load_cluster, paper_testbed
from flexpipe.runtime import codec
from flexpipe.runtime.actor import LocalContext
from flexpipe.runtime.allocator import (AbortReshape, AllocatorBehaviour, AllocatorCore, AnnounceGpus,
                                        CommitReshape, Conflict, Granted, InventoryQuery, MergeStages,
                                        PlaceReplica, ReleaseReservation, ReportUsage, ReserveMemory,
                                        SplitStage, WithdrawWorker)
from flexpipe.runtime.messages import ActorRef, Terminated


def request(n: int = 24, gib: float = 1.0, stages: int = 2, max_stages: int = 6) -> ReplicaRequest:
    return ReplicaRequest([UnitDemand(gib * GiB, 4e9, 16384, 1024) for _ in range(n)], stages=stages,
                          max_stages=max_stages, kv_tokens=4096, stage_overhead_bytes=256 * MiB, model=f"m{n}")


def one_node(name: str, free_gib: list[float]) -> dict:
    return {"name": name, "nodes": [{"name": name, "rack": "r0", "gpus": [
        {"index": i, "model": "A100-80", "nvlink_domain": 0, "free_mib": int(f * 1024)} for i, f in enumerate(free_gib)]}]}


# --- the core -----------------------------------------------------------------------------------------
def test_announce_place_release_withdraw():
    core = AllocatorCore()
    assert core.announce("w1", one_node("a", [40, 20])) == ["a/0", "a/1"]
    assert core.announce("w2", one_node("b", [80, 80, 10])) == ["b/0", "b/1", "b/2"]
    assert len(core.topo) == 5 and core.topo.free[core.topo.index["a/1"]] == 20 * GiB
    r = core.place(request(), owner="replica-1")
    check_placement(r.placement, request(), load_cluster_from(core, r))
    core.check()
    assert sum(core.reserved.values()) == sum(r.amounts.values())
    with pytest.raises(TopologyError, match="another worker"):
        core.announce("w3", one_node("a", [1]))
    core.announce("w1", one_node("a", [30, 30]))  # a worker announcing again replaces its GPUs
    assert core.topo.free[core.topo.index["a/0"]] == 30 * GiB - core.reserved.get("a/0", 0)
    freed = core.release(r.id)
    assert freed == r.amounts and sum(core.reserved.values()) == 0
    with pytest.raises(PlacementError, match="no reservation"):
        core.release(r.id)
    r2 = core.reserve({"a/0": GiB, "b/0": 2 * GiB}, owner="x")
    assert core.withdraw("w1") == [r2.id]  # its reservation used a GPU of w1
    assert [g.id for g in core.topo.gpus] == ["b/0", "b/1", "b/2"]
    assert core.topo.free[core.topo.index["b/0"]] == 80 * GiB
    core.check()


def load_cluster_from(core: AllocatorCore, r) -> object:
    """The state a reservation was decided on: the current one with the reservation given back."""
    t = core.topo.copy()
    t.release(r.amounts)
    return t


def test_reserve_is_all_or_nothing_and_report_shrinks_free():
    core = AllocatorCore(load_cluster("dgx-a100"))
    before = core.topo.free.copy()
    with pytest.raises(Conflict, match="dgx0/1"):
        core.reserve({"dgx0/0": GiB, "dgx0/1": 81 * GiB})
    assert np.array_equal(core.topo.free, before) and not core.reservations
    core.reserve({"dgx0/0": 10 * GiB})
    core.report({"dgx0/0": 60 * GiB, "dgx0/3": 79 * GiB})
    assert core.topo.free[0] == 10 * GiB and core.topo.free[3] == GiB
    core.report({"dgx0/0": 75 * GiB})  # others grew into our memory: nothing free, books still balance
    assert core.topo.free[0] == 0
    with pytest.raises(Conflict):
        core.reserve({"dgx0/0": 1})
    assert core.status()["reservations"] == 1


def test_plan_then_commit_detects_a_stale_plan():
    core = AllocatorCore(load_cluster("dgx-a100"))
    req = request(n=60, stages=8, max_stages=8)  # 8 stages: every GPU, a few GiB each
    plan = core.plan(req)
    core.reserve({g: core.topo.free[core.topo.index[g]] - b + 1 for g, b in list(plan.amounts.items())[:1]})
    with pytest.raises(Conflict):
        core.commit(plan)
    assert core.conflicts == 1
    core.check()


def test_split_and_merge_through_the_core():
    core = AllocatorCore(fragment(paper_testbed(), 3))
    req = request(n=40, stages=2, max_stages=2)
    r = core.place(req)
    total = sum(core.reserved.values())
    r = core.split(r.id, 0, req)
    r, freed = core.commit_reshape(r.id)
    assert r.placement.n_gpus == 3 and r.amounts == r.placement.reservations() and freed == []
    r, freed = core.merge(r.id, req)
    r, freed_now = core.commit_reshape(r.id)
    assert freed_now == freed
    assert r.placement.n_gpus == 2 and len(freed) == 1 and core.reserved.get(freed[0], 0) == 0
    assert sum(core.reserved.values()) == pytest.approx(total, rel=0.01)  # overheads may differ by one stage
    core.check()


def _free(core: AllocatorCore) -> dict[str, int]:
    return {g.id: int(f) for g, f in zip(core.topo.gpus, core.topo.free)}


def test_split_and_merge_hold_old_and_new_stages_until_the_commit():
    # The runtime keeps the old stages serving until the switch (a kept stage holds its old units
    # beside the ones it gains; a retiring one holds all of its memory): until commit_reshape, nobody
    # else may book that memory.
    core = AllocatorCore(fragment(paper_testbed(), 3))
    req = request(n=40, stages=2, max_stages=2)
    r = core.place(req)
    old = r.placement
    before, free0 = dict(core.reserved), _free(core)

    r = core.split(r.id, 0, req)
    new = r.placement
    g, (h,) = old.stages[0].gpu, set(new.gpus) - set(old.gpus)
    assert new.n_gpus == 3 and new.reservations()[g] < old.reservations()[g], "half of stage 0 stays on g"
    assert core.reserved[g] == before[g]  # the old stage 0 holds all its units until the switch
    assert core.reserved[h] == new.reservations()[h]
    assert _free(core)[g] == free0[g]
    with pytest.raises(Conflict, match=g):   # what the split gives up on g is not free before the switch
        core.reserve({g: free0[g] + 1})
    with pytest.raises(PlacementError, match="commit_reshape"):
        core.merge(r.id, req)
    core.check()
    r, freed = core.commit_reshape(r.id)
    assert freed == [] and r.amounts == new.reservations() and r.old_placement is None
    assert {k: v for k, v in core.reserved.items() if v} == new.reservations()
    core.check()

    r, freed = core.merge(r.id, req)
    merged = r.placement
    (f,) = freed
    unchanged = {(t.start, t.end, t.gpu) for t in new.stages}
    (keep,) = [s.gpu for s in merged.stages if (s.start, s.end, s.gpu) not in unchanged]
    assert core.reserved[f] == new.reservations()[f]  # the merged-away stage serves until the switch
    assert core.reserved[keep] == merged.reservations()[keep]  # the kept one grew by the units it took
    core.check()
    r, freed_now = core.commit_reshape(r.id)
    assert freed_now == [f] and core.reserved.get(f, 0) == 0 and r.amounts == merged.reservations()
    core.check()


def test_an_aborted_split_gives_back_the_new_side_only():
    core = AllocatorCore(fragment(paper_testbed(), 3))
    req = request(n=40, stages=2, max_stages=2)
    r = core.place(req)
    old, before, free0 = r.placement, dict(r.amounts), _free(core)
    r = core.split(r.id, 1, req)
    assert r.old_placement == old and sum(r.amounts.values()) > sum(before.values())
    r = core.abort_reshape(r.id)
    assert r.placement == old and r.old_placement is None and r.amounts == before
    assert _free(core) == free0
    with pytest.raises(PlacementError, match="no reshape"):
        core.commit_reshape(r.id)
    core.check()


# --- the behaviour and its messages ---------------------------------------------------------------------
async def test_behaviour_handles_its_messages():
    ctx = await LocalContext(AllocatorBehaviour(), "alloc").start()
    worker = ActorRef("worker-a", "local://worker-a")
    ids = await ctx.deliver(AnnounceGpus("wa", one_node("a", [60, 60, 30, 10]), worker))
    assert ids == ["a/0", "a/1", "a/2", "a/3"] and worker in ctx.watched
    req = request(max_stages=2)
    g = await ctx.deliver(PlaceReplica(req.to_dict(), "rep"))
    assert isinstance(g, Granted) and g.owner == "rep" and g.to_placement().reservations() == g.amounts
    g = await ctx.deliver(SplitStage(g.rid, 0, req.to_dict()))
    assert g.to_placement().n_gpus == 3 and g.old_placement is not None
    assert sum(g.amounts.values()) > sum(g.to_placement().reservations().values())  # old and new, until...
    g = await ctx.deliver(CommitReshape(g.rid))
    assert g.amounts == g.to_placement().reservations() and g.old_placement is None and g.freed == []
    g = await ctx.deliver(MergeStages(g.rid, req.to_dict()))
    assert g.to_placement().n_gpus == 2 and len(g.freed) == 1
    freed = g.freed
    g = await ctx.deliver(AbortReshape(g.rid))   # the merge did not happen: three stages serve on
    assert g.to_placement().n_gpus == 3 and freed[0] in g.amounts
    g = await ctx.deliver(MergeStages(g.rid, req.to_dict()))
    g = await ctx.deliver(CommitReshape(g.rid))
    assert g.to_placement().n_gpus == 2 and g.freed == freed and freed[0] not in g.amounts
    m = await ctx.deliver(ReserveMemory({"a/3": GiB}, "m"))
    await ctx.deliver(ReportUsage({"a/2": 50 * GiB}))
    status = await ctx.deliver(InventoryQuery(full=True))
    assert status["reservations"] == 2 and status["cluster"]["nodes"][0]["name"] == "a"
    assert await ctx.deliver(ReleaseReservation(m.rid)) == {"a/3": GiB}
    await ctx.deliver(Terminated(worker, "died"))  # the worker died: its GPUs and reservations go
    assert (await ctx.deliver(InventoryQuery()))["gpus"] == 0
    assert await ctx.deliver(WithdrawWorker("wa")) == []
    with pytest.raises(PlacementError):
        await ctx.deliver(PlaceReplica(req.to_dict()))


def test_messages_survive_the_codec():
    req = request()
    core = AllocatorCore(load_cluster("dgx-a100"))
    r = core.place(req, "o")
    granted = Granted(r.id, r.owner, r.amounts, r.placement.to_dict(), ["dgx0/7"], r.placement.to_dict())
    for msg in (PlaceReplica(req.to_dict(), "o"), granted, CommitReshape(r.id), AbortReshape(r.id),
                AnnounceGpus("w", load_cluster("mixed-lab").to_dict(), ActorRef("w", "ipc:///tmp/x"))):
        got, tensors = codec.decode(codec.encode(msg))
        assert got == msg and tensors == []


# --- concurrency -----------------------------------------------------------------------------------------
async def test_concurrent_requests_never_oversubscribe():
    """Many placements, reservations and releases at once; plans run in threads, so commits race."""
    beh = AllocatorBehaviour(cluster=fragment(paper_testbed(), 11).to_dict())
    ctx = await LocalContext(beh, "alloc", threaded_compute=True).start()
    core = beh.core
    capacity = {g.id: int(f) for g, f in zip(core.topo.gpus, core.topo.free)}
    rng = random.Random(5)
    reqs = [request(n=rng.randint(8, 40), gib=rng.uniform(0.5, 2.0), stages=rng.randint(1, 3), max_stages=6)
            for _ in range(8)]
    granted: list[str] = []
    refused = 0
    violations: list[str] = []

    def audit() -> None:
        held: dict[str, int] = {}
        for r in core.reservations.values():
            for g, b in r.amounts.items():
                held[g] = held.get(g, 0) + b
        for g, b in held.items():
            if b > capacity[g]:
                violations.append(f"{g}: {b} > {capacity[g]}")
        core.check()

    async def client(i: int) -> None:
        nonlocal refused
        await asyncio.sleep(rng.random() * 0.01)
        try:
            if i % 5 == 4:
                gid = rng.choice(list(capacity))
                g = await ctx.deliver(ReserveMemory({gid: rng.randint(1, 30) * GiB}, f"c{i}"))
            else:
                g = await ctx.deliver(PlaceReplica(reqs[i % len(reqs)].to_dict(), f"c{i}"))
            granted.append(g.rid)
        except PlacementError:  # Conflict is one: the cluster is full
            refused += 1
        audit()
        if granted and rng.random() < 0.3:
            await ctx.deliver(ReleaseReservation(granted.pop(rng.randrange(len(granted)))))
            audit()

    await asyncio.gather(*(client(i) for i in range(160)))
    assert not violations
    assert granted and refused > 0  # it did fill up, and it refused rather than double-booked
    assert len(granted) == len(core.reservations)
    audit()
    for rid in list(granted):
        await ctx.deliver(ReleaseReservation(rid))
    assert all(core.topo.free[core.topo.index[g]] == c for g, c in capacity.items())


async def test_allocator_actor_over_sockets():
    from flexpipe.runtime import ActorSettings, ActorSystem

    async with ActorSystem(ActorSettings()) as system:
        h = await system.launch(AllocatorBehaviour, {"cluster": "mixed-lab"}, name="allocator", in_process=True)
        req = request(n=16, stages=2, max_stages=4)
        got = await asyncio.gather(*(system.ask(h.ref, PlaceReplica(req.to_dict(), f"r{i}")) for i in range(6)))
        assert all(isinstance(g, Granted) for g in got)
        status = await system.ask(h.ref, InventoryQuery())
        assert status["reservations"] == 6 and status["workers"] == ["static"]
        for g in got:
            await system.ask(h.ref, ReleaseReservation(g.rid))
        assert (await system.ask(h.ref, InventoryQuery()))["reserved_bytes"] == 0

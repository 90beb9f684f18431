"""The placer: valid placements, known-best placements on crafted clusters, baselines, reshapes, speed."""

from __future__ import annotations

import itertools
import random
import time

import numpy as np
import pytest

from flexpipe.errors import PlacementError
from flexpipe.placement.fragmentation import WorkloadMix
from flexpipe.placement.placer import (PLACERS, BestFitPlacer, FirstFitPlacer, FlexPlacer, Placement, RandomPlacer,
                                       ReplicaRequest, UnitDemand, check_placement, evaluate, even_boundaries,
                                       ideal_time, make_placer, request_for_model, reservation_delta)
from flexpipe.placement.topology import (GPU_MODELS, GiB, MiB, LinkKind, Node, Topology, fragment, make_gpu,
                                         paper_testbed, synthetic_cluster)

A100 = GPU_MODELS["A100-80"]


def units(n: int, gib: float = 1.0, flops: float = 2e9, act: float = 8192) -> list[UnitDemand]:
    return [UnitDemand(gib * GiB, flops, act) for _ in range(n)]


def cluster(nodes: list[tuple[str, str, list[tuple[float, float]]]], nvlink: set[str] = frozenset()) -> Topology:
    """nodes: (name, rack, [(free GiB, busy), ...]); GPUs of nodes in `nvlink` share an NVLink domain."""
    out, free, busy = [], [], []
    for name, rack, gpus in nodes:
        out.append(Node(name, rack, [make_gpu(name, i, "A100-80", numa=i, nvlink_domain=0 if name in nvlink else None)
                                     for i in range(len(gpus))]))
        free += [int(f * GiB) for f, _ in gpus]
        busy += [b for _, b in gpus]
    return Topology(out, free=free, busy=busy)


@pytest.fixture(scope="module")
def llama() -> ReplicaRequest:
    r = request_for_model("llama2-7b", stages=1, max_stages=4, kv_tokens=8192)
    r.target_time = 1.5 * ideal_time(r, 1, A100.peak_flops, A100.mem_bw)
    return r


@pytest.fixture(scope="module")
def opt() -> ReplicaRequest:
    r = request_for_model("opt-66b", stages=4, max_stages=12, kv_tokens=16384)
    r.target_time = 1.5 * ideal_time(r, 4, A100.peak_flops, A100.mem_bw)
    return r


# --- validity ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PLACERS))
def test_placements_are_valid_on_fragmented_states(name, llama, opt):
    placer = make_placer(name)
    for seed in range(3):
        t = fragment(paper_testbed(), seed)
        for r in (opt, llama, opt, llama, llama):
            p = placer.place(r, t)
            check_placement(p, r, t)  # contiguous cover, one stage per GPU, memory incl. KV fits
            assert r.stages <= p.n_gpus <= r.max_stages
            assert all(s.mem_bytes == r.stage_bytes(s.start, s.end) for s in p.stages)
            assert p.bottleneck_s == max(s.time_s for s in p.stages) > 0
            t.reserve(p.reservations())
        assert np.all(t.free >= 0)


def test_check_placement_catches_invalid_ones(llama):
    t = fragment(paper_testbed(), 0)
    p = FlexPlacer().place(llama, t)
    bad = Placement(p.stages[:1] * 2, p.bottleneck_s) if p.n_gpus == 1 else Placement(p.stages[:-1], 1.0)
    with pytest.raises(PlacementError):
        check_placement(bad, llama, t)
    full = t.copy()
    full.free[:] = 0
    with pytest.raises(PlacementError, match="free"):
        check_placement(p, llama, full)


# --- known best ------------------------------------------------------------------------------------
def _brute_force(req: ReplicaRequest, topo: Topology, kmax: int) -> float:
    best = np.inf
    for k in range(req.stages, kmax + 1):
        for chain in itertools.permutations(range(len(topo)), k):
            for cuts in itertools.combinations(range(1, req.n), k - 1):
                b = [0, *cuts, req.n]
                if any(req.stage_bytes(x, y) > topo.free[g] for g, x, y in zip(chain, b, b[1:])):
                    continue
                best = min(best, evaluate(req, topo, b, chain).bottleneck_s)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_finds_the_best_placement_on_small_clusters(seed):
    rng = random.Random(seed)
    us = [UnitDemand(rng.uniform(0.5, 3) * GiB, rng.uniform(1e9, 8e9), 8192 * rng.choice([1, 64]))
          for _ in range(rng.randint(4, 7))]
    kmax = rng.randint(1, 3)
    req = ReplicaRequest(us, stages=1, max_stages=kmax, batch_tokens=rng.choice([64, 2048]),
                         stage_overhead_bytes=256 * MiB)
    topo = cluster([("a", "r0", [(rng.uniform(1, 12), rng.uniform(0, .6)) for _ in range(2)]),
                    ("b", "r0", [(rng.uniform(1, 12), rng.uniform(0, .6)) for _ in range(2)])], nvlink={"a"})
    best = _brute_force(req, topo, kmax)
    placer = FlexPlacer(time_tolerance=0.0)
    if best == np.inf:
        with pytest.raises(PlacementError):
            placer.place(req, topo)
        return
    p = placer.place(req, topo)
    check_placement(p, req, topo)
    assert p.bottleneck_s <= best * (1 + 2 * placer.rel_precision)


def test_prefers_the_nvlink_pair_over_the_network():
    # four one-GPU servers and one server with an NVLink pair, all alike otherwise
    nodes = [(f"s{i}", "r0", [(40, 0.0)]) for i in range(4)] + [("pair", "r0", [(40, 0.0), (40, 0.0)])]
    topo = cluster(nodes, nvlink={"pair"})
    req = ReplicaRequest(units(20, 1.0, 1e10, 16384), stages=2, batch_tokens=512)
    for placer in (FlexPlacer(), FlexPlacer(exhaustive=0)):  # exhaustive on 6 GPUs, and the heuristic path
        p = placer.place(req, topo)
        assert sorted(p.gpus) == ["pair/0", "pair/1"]
        assert topo.link_kind(topo.index[p.gpus[0]], topo.index[p.gpus[1]]) is LinkKind.NVLINK
    blind = FlexPlacer(topology_aware=False).place(req, topo)
    assert blind.bottleneck_s > p.bottleneck_s  # it cannot tell the pair from a network hop


def test_avoids_gpus_that_other_tenants_keep_busy():
    topo = cluster([("n", "r0", [(40, 0.6), (40, 0.0), (40, 0.05), (40, 0.0)])], nvlink={"n"})
    req = ReplicaRequest(units(16), stages=2)
    for placer in (FlexPlacer(), FlexPlacer(exhaustive=0)):
        assert sorted(placer.place(req, topo).gpus) == ["n/1", "n/3"]


def test_places_uneven_stages_in_holes_where_even_stages_do_not_fit():
    # 20 GiB of weights into holes of 12, 7 and 7 GiB: 2 even stages need two 10.25 GiB holes and 3 need
    # three 6.92 GiB ones... plus overhead 0.25 GiB each: 7.17 > 7, so only uneven stages fit.
    topo = cluster([("a", "r0", [(12, 0.0)]), ("b", "r0", [(7, 0.0)]), ("c", "r0", [(7, 0.0)])])
    req = ReplicaRequest(units(20), stages=2, max_stages=3, stage_overhead_bytes=256 * MiB)
    for baseline in (FirstFitPlacer(), BestFitPlacer(), RandomPlacer()):
        with pytest.raises(PlacementError):
            baseline.place(req, topo)
    for placer in (FlexPlacer(), FlexPlacer(exhaustive=0)):
        p = placer.place(req, topo)
        check_placement(p, req, topo)
        size = {s.gpu: s.end - s.start for s in p.stages}
        assert p.n_gpus == 3 and size["b/0"] <= 6 and size["c/0"] <= 6 and size["a/0"] >= 8


def test_fragmentation_breaks_ties_between_equal_gpus():
    need = 10 * GiB + 256 * MiB
    mix = WorkloadMix((need, 2 * need))
    topo = cluster([("n", "r0", [(30, 0.0), (14, 0.0), (need / GiB, 0.0), (60, 0.0), (45, 0.0)])], nvlink={"n"})
    req = ReplicaRequest(units(10), stages=1, stage_overhead_bytes=256 * MiB)
    for placer in (FlexPlacer(mix=mix), FlexPlacer(mix=mix, exhaustive=0)):
        p = placer.place(req, topo)
        assert p.gpus == ["n/2"] and p.frag_delta < 0  # the exact fit leaves no fragment behind


def test_target_time_bounds_the_stage_count(llama):
    t = fragment(paper_testbed(), 4)
    r = request_for_model("llama2-7b", stages=1, max_stages=4, kv_tokens=8192)
    assert FlexPlacer().place(r, t).n_gpus == 4  # without a target the fastest (most stages) wins
    r.target_time = 10.0
    assert FlexPlacer().place(r, t).n_gpus == 1  # every stage count meets it: the fewest
    r.target_time = 0.75 * FlexPlacer().place(request_for_model("llama2-7b", kv_tokens=8192), t).bottleneck_s
    assert FlexPlacer().place(r, t).n_gpus == 2  # one stage cannot be this fast, two can


def test_more_replicas_than_first_fit_and_best_fit(opt):
    counts = {}
    for placer in (FlexPlacer(), FirstFitPlacer(), BestFitPlacer()):
        per_state = []
        for seed in range(6):
            t, n = fragment(paper_testbed(), seed), 0
            while True:
                try:
                    p = placer.place(opt, t)
                except PlacementError:
                    break
                t.reserve(p.reservations())
                n += 1
            per_state.append(n)
        counts[placer.name] = per_state
    assert sum(counts["flexpipe"]) > sum(counts["first-fit"])
    assert sum(counts["flexpipe"]) > sum(counts["best-fit"])
    assert all(f >= max(a, b) for f, a, b in zip(counts["flexpipe"], counts["first-fit"], counts["best-fit"]))


def test_decision_under_5ms_at_1000_gpus(llama, opt):
    big = synthetic_cluster(125, 8)
    placer = FlexPlacer()
    for r in (llama, opt):
        placer.place(r, fragment(big, 0))  # warm-up
        t, times = fragment(big, 1), []
        for _ in range(15):
            c0 = time.process_time()  # CPU time: other processes on the machine do not count
            p = placer.place(r, t)
            times.append(time.process_time() - c0)
            t.reserve(p.reservations())
        assert np.median(times) < 5e-3, (r.model, times)


# --- reshapes -----------------------------------------------------------------------------------------
def test_split_and_merge_keep_placements_valid(opt):
    t = fragment(paper_testbed(), 2)
    placer = FlexPlacer()
    p = placer.place(opt, t)
    t.reserve(p.reservations())
    biggest = max(range(p.n_gpus), key=lambda i: p.stages[i].end - p.stages[i].start)
    q = placer.split(p, biggest, opt, t)
    assert q.n_gpus == p.n_gpus + 1 and len(set(q.gpus)) == q.n_gpus
    assert set(p.gpus) < set(q.gpus)  # the other stages stay where they are
    assert q.boundaries[:biggest + 1] == p.boundaries[:biggest + 1]
    before = t.copy()
    before.release(p.reservations())
    check_placement(q, opt, before)
    delta = reservation_delta(p, q)
    t.release({g: -b for g, b in delta.items() if b < 0})
    t.reserve({g: b for g, b in delta.items() if b > 0})
    m, freed = placer.merge(q, opt, t)
    assert m.n_gpus == q.n_gpus - 1 and len(freed) == 1 and freed[0] not in m.gpus
    before = t.copy()
    before.release(q.reservations())
    check_placement(m, opt, before)
    with pytest.raises(PlacementError, match="cannot merge"):
        placer.merge(q, opt, t, stages=0)


def test_split_of_a_one_unit_stage_is_refused():
    topo = cluster([("n", "r0", [(40, 0.0)] * 3)], nvlink={"n"})
    req = ReplicaRequest(units(2), stages=2)
    p = FlexPlacer().place(req, topo)
    with pytest.raises(PlacementError, match="one unit"):
        FlexPlacer().split(p, 0, req, topo)


# --- odds and ends --------------------------------------------------------------------------------------
def test_nothing_fits_is_a_placement_error_that_says_why(opt):
    t = fragment(paper_testbed(), 0)
    t.free[:] = 2 * GiB
    with pytest.raises(PlacementError, match="GiB free in all"):
        FlexPlacer().place(opt, t)


def test_exclude_keeps_gpus_out(llama):
    t = fragment(paper_testbed(), 5)
    first = FlexPlacer().place(llama, t)
    again = FlexPlacer().place(llama, t, exclude=first.gpus)
    assert not set(first.gpus) & set(again.gpus)


def test_wire_round_trips(opt):
    r = ReplicaRequest.from_dict(opt.to_dict())
    assert (r.n, r.stages, r.max_stages, r.target_time, r.model) == (opt.n, opt.stages, opt.max_stages,
                                                                     opt.target_time, opt.model)
    assert r.mem_prefix == opt.mem_prefix and r.cut_bytes_per_token == opt.cut_bytes_per_token
    p = FlexPlacer().place(opt, fragment(paper_testbed(), 1))
    assert Placement.from_dict(p.to_dict()) == p
    with pytest.raises(PlacementError):
        ReplicaRequest.from_dict({"units": [[1, 2]], "stages": "x"})
    with pytest.raises(PlacementError, match="unknown placer"):
        make_placer("worst-fit")


def test_even_boundaries_balance_memory(opt):
    b = even_boundaries(opt, 4)
    sizes = [opt.stage_bytes(x, y) for x, y in zip(b, b[1:])]
    assert b[0] == 0 and b[-1] == opt.n and max(sizes) < 1.1 * min(sizes)

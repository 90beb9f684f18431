"""Placement on odd inputs: cluster descriptions that are not one or carry impossible figures, requests
with impossible figures, GPU positions out of range; and pipelines that cross between servers no more
often than their GPUs require."""

from __future__ import annotations

import argparse
import itertools
import math

import numpy as np
import pytest

from flexpipe.errors import ConfigError, PlacementError, TopologyError
from flexpipe.placement.cli import add_topology_parser, topology_main
from flexpipe.placement.placer import (FlexPlacer, ReplicaRequest, UnitDemand, check_placement, evaluate,
                                       make_placer, request_for_model)
from flexpipe.placement.topology import GiB, Link, LinkKind, Node, Topology, load_cluster, make_gpu


def network_hops(topo: Topology, gpus: list[str]) -> int:
    idx = [topo.index[g] for g in gpus]
    return sum(topo.node_of[a] != topo.node_of[b] for a, b in zip(idx, idx[1:]))


def two_servers(free_a: int, free_b: int) -> Topology:
    """Two servers of two NVLinked A100-40s each, in one rack."""
    return Topology.from_dict({"nodes": [
        {"name": nm, "rack": "r0", "gpus": [{"index": i, "model": "A100-40", "nvlink_domain": 0, "free_mib": f}
                                           for i in range(2)]} for nm, f in (("a", free_a), ("b", free_b))]})


# --- consecutive stages share fast links -----------------------------------------------------------------
def test_a_pipeline_over_two_servers_crosses_between_them_once():
    # 7B in four stages on two 2-GPU servers: a -> b -> b -> a is within the time tolerance of
    # a -> a -> b -> b and fragments less, but every token pays a second network hop
    topo = two_servers(10240, 11264)
    req = request_for_model("llama2-7b", stages=1, max_stages=4, batch_tokens=4096)
    for placer in (FlexPlacer(), FlexPlacer(exhaustive=0)):   # every chain, and the large-cluster path
        p = placer.place(req, topo)
        check_placement(p, req, topo)
        assert p.n_gpus == 4 and network_hops(topo, p.gpus) == 1, p.gpus


@pytest.mark.parametrize("fa, fb", list(itertools.product([9216, 10240, 12288], [9216, 11264, 12288])))
def test_no_pipeline_crosses_between_servers_more_often_than_needed(fa, fb):
    topo = two_servers(fa, fb)
    for bt in (512, 2048, 4096):
        p = FlexPlacer().place(request_for_model("llama2-7b", stages=1, max_stages=4, batch_tokens=bt), topo)
        assert network_hops(topo, p.gpus) <= 1, (bt, p.gpus)


def test_gpus_are_chosen_for_speed_and_fragmentation_and_ordered_for_the_network():
    # two stages fit on server a's NVLink pair (14 + 24 GiB holes) or on a/0 and b/0 (16 GiB): the
    # network hop costs less than the tolerance and b/0 leaves a smaller fragment, so FP-5's objective
    # (slowest stage, then fragmentation) takes a/0 and b/0, on both search paths; the hop preference
    # only orders a set of GPUs (ranked before fragmentation across sets, it packed worse)
    topo = Topology.from_dict({"nodes": [
        {"name": "a", "rack": "r0", "gpus": [{"index": i, "model": "A100-80", "nvlink_domain": 0, "free_mib": f * 1024}
                                            for i, f in enumerate((14, 24))]},
        {"name": "b", "rack": "r0", "gpus": [{"index": 0, "model": "A100-80", "free_mib": 16 * 1024}]}]})
    req = ReplicaRequest([UnitDemand(GiB, 2e9, 8192) for _ in range(24)], stages=2, max_stages=2, batch_tokens=512)
    for placer in (FlexPlacer(), FlexPlacer(exhaustive=0)):
        p = placer.place(req, topo)
        assert sorted(p.gpus) == ["a/0", "b/0"], p.gpus
    blind = FlexPlacer(topology_aware=False).place(req, topo)   # the baseline stays blind to hops
    assert network_hops(topo, blind.gpus) == 1


def test_a_split_does_not_cross_back_to_the_server_it_left():
    # stage 0 of a two-stage replica on a/0 and a/1 splits onto b/0 (a tighter fit than a/2): the new
    # half goes before a/0 (b -> a -> a, one crossing), not between a/0 and a/1 (a -> b -> a, two)
    topo = Topology.from_dict({"nodes": [
        {"name": "a", "rack": "r0", "gpus": [{"index": i, "model": "A100-80", "nvlink_domain": 0, "free_mib": f * 1024}
                                            for i, f in enumerate((40, 40, 30))]},
        {"name": "b", "rack": "r0", "gpus": [{"index": 0, "model": "A100-80", "free_mib": 9 * 1024}]}]})
    req = ReplicaRequest([UnitDemand(GiB, 2e9, 8192) for _ in range(24)], stages=2, max_stages=2, batch_tokens=512)
    p = evaluate(req, topo, [0, 12, 24], ["a/0", "a/1"])
    t = topo.copy()
    t.reserve(p.reservations())
    q = FlexPlacer().split(p, 0, req, t)
    assert q.n_gpus == 3 and network_hops(topo, q.gpus) == 1, q.gpus


# --- cluster descriptions -------------------------------------------------------------------------------
@pytest.mark.parametrize("text, suffix, words", [
    ("[]", ".json", "mapping.*nodes.*list"),
    ("", ".yaml", "empty"),
    ("nodes: [ {name: a\n", ".yaml", "not valid YAML"),
    ("{nodes: 3}", ".json", "not JSON"),
    ("nodes: 3\n", ".yaml", "nodes"),
])
def test_a_file_that_is_not_a_description_names_itself(tmp_path, text, suffix, words):
    f = tmp_path / f"cluster{suffix}"
    f.write_text(text)
    with pytest.raises(TopologyError, match=words) as e:
        Topology.load(f)
    assert str(f) in str(e.value)


def gpu(**kw):
    return {"nodes": [{"name": "a", "gpus": [{"model": "mine", "memory_mib": 81920, "tflops": 300,
                                             "mem_bw_gbs": 2000, **kw}]}]}


@pytest.mark.parametrize("desc, words", [
    (gpu(tflops=0), r"a/0.*tflops.*> 0"),
    (gpu(mem_bw_gbs=0), r"a/0.*mem_bw_gbs.*> 0"),
    (gpu(tflops=float("nan")), "tflops"),
    (gpu(memory_mib=-1), r"a/0.*memory_mib.*>= 0"),
    (gpu(busy=float("nan")), r"a/0.*busy.*between 0 and 1"),
    (gpu(busy=1.5), "busy"),
    (gpu(free_mib=-5), r"a/0.*free_mib"),
    ({**gpu(), "links": {"pcie_host": {"bandwidth_gbs": 0, "latency_us": 100}}}, r"pcie_host.*bandwidth_gbs.*> 0"),
    ({**gpu(), "links": {"network": {"bandwidth_gbs": 12.5, "latency_us": -1}}}, r"network.*latency_us.*>= 0"),
    ({**gpu(), "links": {"network": {"bandwidth_gbs": "fast", "latency_us": 1}}}, "bandwidth_gbs"),
])
def test_impossible_figures_are_refused_when_the_description_loads(desc, words):
    with pytest.raises(TopologyError, match=words):
        Topology.from_dict(desc)


def test_description_of_a_zero_rate_gpu_built_in_code_is_refused():
    with pytest.raises(TopologyError, match="peak_flops"):
        Topology([Node("a", "r0", [make_gpu("a", 0, "x", memory_bytes=GiB, peak_flops=0.0, mem_bw=1e9)])])
    with pytest.raises(TopologyError, match="network"):
        Topology([], {LinkKind.NETWORK: Link(LinkKind.NETWORK, 0.0, 1e-3)})


def test_the_cli_says_what_is_wrong_with_a_file(tmp_path, capsys):
    ap = argparse.ArgumentParser()
    add_topology_parser(ap.add_subparsers(dest="cmd"))
    for name, text in (("list.json", "[]"), ("broken.yaml", "nodes: [ {name: a\n"), ("empty.yaml", ""),
                       ("nan.json", '{"nodes": [{"name": "a", "gpus": [{"model": "A100-80", "busy": NaN}]}]}')):
        (tmp_path / name).write_text(text)
        assert topology_main(ap.parse_args(["topology", "--from", str(tmp_path / name)])) == 1
        err = capsys.readouterr().err
        assert err.startswith("flexpipe topology: ") and name in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="--rows -1"):
        topology_main(ap.parse_args(["topology", "--from", "mixed-lab", "--rows", "-1"]))


# --- GPU positions and amounts ---------------------------------------------------------------------------
def test_reserve_and_release_refuse_negative_bytes_and_unknown_positions():
    t = load_cluster("dgx-a100")
    before = t.free.copy()
    with pytest.raises(TopologyError, match=r"reserve -1073741824 bytes on GPU dgx0/1"):
        t.reserve({"dgx0/0": GiB, "dgx0/1": -GiB})
    with pytest.raises(TopologyError, match="dgx0/0"):
        t.release({"dgx0/0": -GiB})
    for pos in (-1, 8, 999):
        with pytest.raises(TopologyError, match=f"{pos}.*0..7"):
            t.release({pos: GiB})
        with pytest.raises(TopologyError, match=f"{pos}"):
            t.reserve({pos: GiB})
    assert np.array_equal(t.free, before)


# --- requests -------------------------------------------------------------------------------------------
def small() -> Topology:
    return Topology.from_dict({"nodes": [{"name": "a", "gpus": [
        {"model": "A100-80", "index": i, "free_mib": 10240} for i in range(2)]},
        {"name": "b", "gpus": [{"model": "A100-80", "free_mib": 10240}]}]})


@pytest.mark.parametrize("kw, words", [
    ({"batch_tokens": 0}, "batch_tokens.*>= 1"),
    ({"batch_tokens": -256}, "batch_tokens"),
    ({"kv_tokens": -4000}, "kv_tokens.*>= 0"),
    ({"stage_overhead_bytes": -1}, "stage_overhead_bytes"),
    ({"target_time": float("nan")}, "target_time"),
    ({"target_time": -1.0}, "target_time"),
])
def test_impossible_request_figures_are_refused(kw, words):
    us = [UnitDemand(2 * GiB, 4e9, 8192, 1e6) for _ in range(8)]
    with pytest.raises(PlacementError, match=words):
        ReplicaRequest(us, stages=2, max_stages=3, **kw)
    row = [2 * GiB, 4e9, 8192, 1e6]
    with pytest.raises(PlacementError, match=words):   # the same on the wire
        ReplicaRequest.from_dict({"units": [row] * 8, "stages": 2, "max_stages": 3, **kw})


@pytest.mark.parametrize("field, value", [(0, -50 * GiB), (0, math.nan), (1, -1.0), (2, math.inf), (3, -1e6)])
def test_impossible_unit_figures_are_refused(field, value):
    row = [2 * GiB, 4e9, 8192, 0.0]
    row[field] = value
    name = ["param_bytes", "flops_per_token", "act_bytes_per_token", "kv_bytes_per_token"][field]
    with pytest.raises(PlacementError, match=f"unit 3.*{name}"):
        ReplicaRequest([UnitDemand(*r) for r in [[2 * GiB, 4e9, 8192, 0.0]] * 3 + [row]])
    with pytest.raises(PlacementError, match=f"unit 3.*{name}"):
        ReplicaRequest.from_dict({"units": [[2 * GiB, 4e9, 8192, 0.0]] * 3 + [row]})


def test_a_valid_request_still_places_and_books_its_parameters():
    us = [UnitDemand(4 * GiB, 1e9, 8192, 1e3) for _ in range(4)]
    r = ReplicaRequest(us, stages=1, max_stages=4, kv_tokens=1000, batch_tokens=1)
    p = FlexPlacer().place(r, small())
    assert sum(s.mem_bytes for s in p.stages) >= r.param_prefix[-1]


@pytest.mark.parametrize("stage", [-1, 2, "0", True])
def test_split_of_a_stage_that_does_not_exist(stage):
    topo = small()
    req = ReplicaRequest([UnitDemand(GiB, 1e9, 8192) for _ in range(8)], stages=2)
    p = FlexPlacer().place(req, topo)
    with pytest.raises(PlacementError, match=r"numbered 0\.\.1"):
        FlexPlacer().split(p, stage, req, topo)


@pytest.mark.parametrize("stages", [0, 3, "1", 1.5])
def test_merge_into_a_stage_count_that_cannot_be(stages):
    topo = small()
    req = ReplicaRequest([UnitDemand(GiB, 1e9, 8192) for _ in range(8)], stages=2)
    p = FlexPlacer().place(req, topo)
    with pytest.raises(PlacementError, match=r"1\.\.2"):
        FlexPlacer().merge(p, req, topo, stages)


def test_empty_clusters_are_a_placement_error_for_every_placer():
    for name in ("flexpipe", "first-fit", "best-fit", "random", "topology-blind"):
        with pytest.raises(PlacementError):
            make_placer(name).place(ReplicaRequest([UnitDemand(GiB, 1e9)]), Topology([]))

"""Cluster topology: links, descriptions, fragmented occupancy, discovery (fake pynvml), the CLI."""

from __future__ import annotations

import argparse
import sys
import types

import numpy as np
import pytest

from flexpipe.errors import NoDriverError, TopologyError
from flexpipe.placement.cli import add_topology_parser, topology_main
from flexpipe.placement.topology import (GiB, LinkKind, Node, OccupancyProfile, Topology, discover_local,
                                         format_table, fragment, load_cluster, make_gpu, paper_testbed,
                                         synthetic_cluster)


def test_paper_testbed_shape_and_links():
    t = load_cluster("paper-testbed-82")
    assert (len(t.nodes), len(t), len(t.racks)) == (42, 82, 3)
    i = t.index
    assert t.link_kind(i["s00/0"], i["s00/1"]) is LinkKind.NVLINK
    assert t.link_kind(i["s25/0"], i["s25/1"]) is LinkKind.PCIE_CROSS_SOCKET
    assert t.link_kind(i["s00/0"], i["s01/0"]) is LinkKind.NETWORK
    assert t.link_kind(i["s00/0"], i["s20/0"]) is LinkKind.NETWORK_CROSS_RACK
    assert t.link_kind(i["s00/0"], i["s00/0"]) is LinkKind.SAME
    assert t.link(i["s00/0"], i["s01/0"]).bandwidth == pytest.approx(12.5e9)  # 100 Gbps
    assert t.to_dict(state=False) == paper_testbed().to_dict(state=False)


def test_derived_and_explicit_link_kinds():
    gpus = [make_gpu("n", 0, "A100-80", numa=0, pcie_switch=0), make_gpu("n", 1, "A100-80", numa=0, pcie_switch=0),
            make_gpu("n", 2, "A100-80", numa=0, pcie_switch=1), make_gpu("n", 3, "A100-80", numa=1)]
    t = Topology([Node("n", "r", gpus, {(2, 3): LinkKind.NVLINK})])
    assert t.link_kind(0, 1) is LinkKind.PCIE_SWITCH
    assert t.link_kind(0, 2) is LinkKind.PCIE_HOST
    assert t.link_kind(0, 3) is LinkKind.PCIE_CROSS_SOCKET
    assert t.link_kind(3, 2) is LinkKind.NVLINK
    assert t.link(0, 1).transfer_time(24e9) == pytest.approx(1.0 + t.link(0, 1).latency)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_description_round_trip_with_state(tmp_path, suffix):
    t = fragment(load_cluster("mixed-lab"), seed=3)
    path = tmp_path / f"c{suffix}"
    t.save(path)
    u = Topology.load(path)
    assert u.to_dict() == t.to_dict()
    assert np.array_equal(u.free, t.free)  # occupancy is quantised to whole MiB, so it survives
    assert np.allclose(u.busy, t.busy, atol=1e-4)
    assert [[u.link_kind(a, b) for b in range(len(u))] for a in range(len(u))] == \
        [[t.link_kind(a, b) for b in range(len(t))] for a in range(len(t))]
    assert u.links == t.links  # the mixed-lab file overrides the cross-rack link


def test_shipped_descriptions_load():
    for name in ("paper-testbed-82", "dgx-a100", "mixed-lab"):
        t = load_cluster(name)
        assert len(t) > 0 and np.all(t.free <= t.total)
    dgx = load_cluster("dgx-a100")
    assert all(dgx.link_kind(0, j) is LinkKind.NVLINK for j in range(1, 8))


@pytest.mark.parametrize("bad, words", [
    ({"nodes": [{"name": "a", "gpus": [{"index": 0}]}]}, "model"),
    ({"nodes": [{"name": "a", "gpus": [{"model": "Z9000"}]}]}, "unknown GPU model"),
    ({"nodes": [{"name": "a", "gpus": [{"model": "A10", "free_mib": 10**7}]}]}, "free_mib"),
    ({"nodes": [{"name": "a", "gpus": [{"model": "A10"}], "links": [{"a": 0, "b": 5, "kind": "nvlink"}]}]},
     "names a GPU"),
    ({"nodes": [{"name": "a", "gpus": [{"model": "A10"}]}, {"name": "a", "gpus": []}]}, "unique"),
    ({"nodes": [{"name": "a", "gpus": [{"model": "A10"}], "links": [{"a": 0, "b": 0, "kind": "warp"}]}]}, "warp"),
])
def test_bad_descriptions_say_what_is_wrong(bad, words):
    with pytest.raises(TopologyError, match=words):
        Topology.from_dict(bad)


def test_unknown_model_with_figures_is_fine():
    t = Topology.from_dict({"nodes": [{"name": "a", "gpus": [
        {"model": "MI300X", "memory_mib": 196608, "tflops": 1307, "mem_bw_gbs": 5300, "compute_class": "cdna3"}]}]})
    assert t.gpus[0].memory_bytes == 192 * GiB and t.gpus[0].compute_class == "cdna3"
    assert Topology.from_dict(t.to_dict()).to_dict() == t.to_dict()


def test_load_cluster_unknown_name_lists_shipped():
    with pytest.raises(TopologyError, match="paper-testbed-82"):
        load_cluster("no-such-cluster")


def test_reserve_is_all_or_nothing():
    t = load_cluster("dgx-a100")
    t.reserve({"dgx0/0": 10 * GiB, 1: 70 * GiB})
    before = t.free.copy()
    with pytest.raises(TopologyError, match="dgx0/2"):
        t.reserve({"dgx0/1": GiB, "dgx0/2": 81 * GiB})
    assert np.array_equal(t.free, before)
    t.release({"dgx0/0": 10 * GiB, "dgx0/1": 99 * GiB})
    assert t.free[0] == t.total[0] and t.free[1] == t.total[1]


def test_fragment_is_seeded_and_matches_the_papers_statistics():
    base = paper_testbed()
    a, b = fragment(base, 7), fragment(base, 7)
    assert np.array_equal(a.free, b.free) and np.array_equal(a.busy, b.busy)
    assert not np.array_equal(a.free, fragment(base, 8).free)
    assert np.all(base.free == base.total)  # the input is not touched
    big = synthetic_cluster(125, 8)
    states = [fragment(big, s) for s in range(16)]
    frac = np.concatenate([s.free / s.total for s in states])
    assert 0.075 < (frac > 0.85).mean() < 0.10  # paper: 8.7%
    per_node = np.concatenate([np.bincount(s.node_of, weights=(s.free / s.total) > 0.85) for s in states])
    assert (per_node >= 4).mean() < 0.003  # paper: 0.02% (independent draws would give ~0.4%)
    assert ((frac > 0.05) & (frac <= 0.85)).mean() > 0.6  # most GPUs partly occupied
    busy = np.concatenate([s.busy for s in states])
    assert 0.15 < busy.mean() < 0.3  # paper: mean SM utilisation 17-24%
    assert np.all(states[0].free % OccupancyProfile().granularity_bytes == 0)


def test_format_table_lists_gpus_and_summary():
    text = format_table(fragment(load_cluster("paper-testbed-82"), 1), max_rows=5)
    assert "s00/0" in text and "1:NV" in text and "... 77 more GPUs" in text
    assert "42 nodes in 3 racks, 82 GPUs" in text and "GPUs >85% free" in text


# --- discovery ------------------------------------------------------------------------------------
def test_no_pynvml_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(NoDriverError, match="pynvml is not installed"):
        discover_local()


def test_no_driver_is_a_clear_error(monkeypatch):
    fake = types.SimpleNamespace()

    def init():
        raise RuntimeError("NVML Shared Library Not Found")

    fake.nvmlInit = init
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with pytest.raises(NoDriverError, match="no NVIDIA driver"):
        discover_local()


def _fake_nvml(n_gpus: int = 4) -> types.SimpleNamespace:
    """Four A100-80s: NVLink between 0-1, 0,1 / 2,3 on one PCIe switch each, sockets {0,1} and {2,3}."""
    ns = types.SimpleNamespace
    bus = [f"00000000:{0x10 * (i + 1):02X}:00.0" for i in range(n_gpus)]
    level = {(0, 1): 10, (2, 3): 20, (0, 2): 50, (0, 3): 50, (1, 2): 50, (1, 3): 50}
    f = ns(NVML_NVLINK_MAX_LINKS=2, shut=[])
    f.nvmlInit = lambda: None
    f.nvmlShutdown = lambda: f.shut.append(True)
    f.nvmlDeviceGetCount = lambda: n_gpus
    f.nvmlDeviceGetHandleByIndex = lambda i: i
    f.nvmlDeviceGetPciInfo = lambda h: ns(busId=bus[h].encode())
    f.nvmlDeviceGetName = lambda h: b"NVIDIA A100-SXM4-80GB"
    f.nvmlDeviceGetMemoryInfo = lambda h: ns(total=80 * GiB, free=(80 - 10 * h) * GiB, used=10 * h * GiB)
    f.nvmlDeviceGetUUID = lambda h: f"GPU-{h}"
    f.nvmlDeviceGetUtilizationRates = lambda h: ns(gpu=25 * h)
    f.nvmlDeviceGetTopologyCommonAncestor = lambda a, b: level[(min(a, b), max(a, b))]

    def state(h, link):
        if link >= 1:
            raise RuntimeError("NVML_ERROR_INVALID_ARGUMENT")
        return h in (0, 1)

    f.nvmlDeviceGetNvLinkState = state
    f.nvmlDeviceGetNvLinkRemotePciInfo = lambda h, link: ns(busId=bus[1 - h])
    return f


def test_discovery_with_fake_nvml(monkeypatch):
    fake = _fake_nvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    t = discover_local("box")
    assert [g.id for g in t.gpus] == ["box/0", "box/1", "box/2", "box/3"]
    assert all(g.model == "A100-80" and g.memory_bytes == 80 * GiB for g in t.gpus)
    assert list(t.free // GiB) == [80, 70, 60, 50]
    assert list(t.busy) == [0.0, 0.25, 0.5, 0.75]
    assert t.link_kind(0, 1) is LinkKind.NVLINK
    assert t.link_kind(2, 3) is LinkKind.PCIE_SWITCH
    assert t.link_kind(1, 2) is LinkKind.PCIE_CROSS_SOCKET
    assert fake.shut == [True]
    u = Topology.from_dict(t.to_dict())  # explicit links survive a description round trip
    assert u.link_kind(0, 1) is LinkKind.NVLINK and u.link_kind(1, 3) is LinkKind.PCIE_CROSS_SOCKET


# --- CLI --------------------------------------------------------------------------------------------
def _args(*argv: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    add_topology_parser(ap.add_subparsers(dest="cmd"))
    return ap.parse_args(["topology", *argv])


def test_cli_without_driver_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    args = _args()
    assert args.func is topology_main
    assert topology_main(args) == 1
    assert "pynvml is not installed" in capsys.readouterr().err


def test_cli_prints_and_writes_a_description(tmp_path, capsys):
    out = tmp_path / "frag.yaml"
    assert topology_main(_args("--from", "paper-testbed-82", "--fragment", "2", "--write", str(out), "--rows", "3")) == 0
    text = capsys.readouterr().out
    assert "s00/0" in text and "82 GPUs" in text
    assert np.array_equal(Topology.load(out).free, fragment(paper_testbed(), 2).free)
    assert topology_main(_args("--list")) == 0
    assert "paper-testbed-82" in capsys.readouterr().out
    assert topology_main(_args("--from", "nope")) == 1

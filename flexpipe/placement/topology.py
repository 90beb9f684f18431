"""Cluster topology: nodes, GPUs and the links between them; descriptions, discovery, occupancy.

The static part (which GPUs exist, where they sit, how they are wired) lives in `GPU` and `Node`;
the changing part (free memory, SM time taken by other tenants) lives in two numpy arrays on the
`Topology`, so that a copy of a cluster state is two array copies and the placer reads it vectorised.
A link between two GPUs is derived from where they sit (same NVLink domain, PCIe switch, NUMA node,
server, rack), unless a node lists the pair explicitly (what pynvml discovery does).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from flexpipe.errors import NoDriverError, TopologyError

MiB = 2**20
GiB = 2**30
GB = 1e9


class LinkKind(str, Enum):
    """How two GPUs are connected, fastest first."""

    SAME = "same"
    NVLINK = "nvlink"
    PCIE_SWITCH = "pcie_switch"  # behind one PCIe switch (nvidia-smi topo: PIX/PXB)
    PCIE_HOST = "pcie_host"  # through the host bridge of one NUMA node (PHB/NODE)
    PCIE_CROSS_SOCKET = "pcie_cross_socket"  # across the CPU interconnect (SYS)
    NETWORK = "network"  # another server in the same rack
    NETWORK_CROSS_RACK = "network_cross_rack"


@dataclass(frozen=True, slots=True)
class Link:
    """Bandwidth (bytes/s) and fixed per-hop cost (s) of a link kind, as a pipeline hop sees it."""

    kind: LinkKind
    bandwidth: float
    latency: float

    def transfer_time(self, nbytes: float) -> float:
        """Seconds to move `nbytes` across this link as one hop."""
        return 0.0 if self.kind is LinkKind.SAME else self.latency + nbytes / self.bandwidth


# Per-hop costs include software overhead (serialisation, IPC handles, synchronisation), not just the
# wire, and match flexpipe/sim/perf.py's LINKS: NVLink3 300 GB/s one way + ~50 us IPC handoff; PCIe 4.0
# x16 ~24 GB/s achieved + ~100 us; 100 Gbps between servers (the paper's testbed) with ~2 ms per hop,
# the paper's OPT-66B figure (6.3 ms for 3 hops, 65.1 ms for 31).  Through the host bridge and across
# sockets are assumptions (staging through host memory); cross-rack assumes 2:1 oversubscription.
DEFAULT_LINKS: dict[LinkKind, Link] = {
    LinkKind.SAME: Link(LinkKind.SAME, math.inf, 0.0),
    LinkKind.NVLINK: Link(LinkKind.NVLINK, 300 * GB, 52e-6),
    LinkKind.PCIE_SWITCH: Link(LinkKind.PCIE_SWITCH, 24 * GB, 105e-6),
    LinkKind.PCIE_HOST: Link(LinkKind.PCIE_HOST, 20 * GB, 120e-6),
    LinkKind.PCIE_CROSS_SOCKET: Link(LinkKind.PCIE_CROSS_SOCKET, 12 * GB, 150e-6),
    LinkKind.NETWORK: Link(LinkKind.NETWORK, 12.5 * GB, 2.01e-3),
    LinkKind.NETWORK_CROSS_RACK: Link(LinkKind.NETWORK_CROSS_RACK, 6.25 * GB, 2.05e-3),
}


@dataclass(frozen=True, slots=True)
class GpuModel:
    """A GPU product: memory, dense 16-bit peak FLOP/s, memory bandwidth, compute class."""

    name: str
    memory_bytes: int
    peak_flops: float
    mem_bw: float
    compute_class: str


# Vendor datasheet peaks (dense bf16/fp16 tensor, HBM/GDDR bandwidth).  Names follow sim/perf.py.
GPU_MODELS: dict[str, GpuModel] = {m.name: m for m in [
    GpuModel("A100-80", 80 * GiB, 312e12, 2039 * GB, "ampere"),
    GpuModel("A100-40", 40 * GiB, 312e12, 1555 * GB, "ampere"),
    GpuModel("H100", 80 * GiB, 989e12, 3350 * GB, "hopper"),
    GpuModel("H200", 141 * GiB, 989e12, 4800 * GB, "hopper"),
    GpuModel("A10", 24 * GiB, 125e12, 600 * GB, "ampere"),
    GpuModel("L4", 24 * GiB, 121e12, 300 * GB, "ada"),
    GpuModel("L40S", 48 * GiB, 362e12, 864 * GB, "ada"),
    GpuModel("V100-32", 32 * GiB, 125e12, 900 * GB, "volta"),
    GpuModel("T4", 16 * GiB, 65e12, 320 * GB, "turing"),
]}

# NVML product names -> model keys (substring match, first hit wins; order matters).
_NVML_NAMES = [("H200", "H200"), ("H100", "H100"), ("A100-SXM4-80GB", "A100-80"), ("A100 80GB", "A100-80"),
               ("A100-PCIE-80GB", "A100-80"), ("A100", "A100-40"), ("L40S", "L40S"), ("A10", "A10"),
               ("L4", "L4"), ("V100", "V100-32"), ("T4", "T4")]


@dataclass(slots=True)
class GPU:
    """One GPU: where it sits and what it can do (its changing state lives on the Topology)."""

    node: str
    index: int  # local index on its node
    model: str
    memory_bytes: int
    peak_flops: float
    mem_bw: float
    compute_class: str
    numa: int = 0
    pcie_switch: int | None = None  # None: a switch of its own
    nvlink_domain: int | None = None  # GPUs with one domain are all NVLink-connected (NVSwitch, bridge)
    uuid: str | None = None

    @property
    def id(self) -> str:
        return f"{self.node}/{self.index}"


@dataclass(slots=True)
class Node:
    """A server: its rack and GPUs, plus explicit link kinds for pairs of local GPU indices."""

    name: str
    rack: str
    gpus: list[GPU]
    links: dict[tuple[int, int], LinkKind] = field(default_factory=dict)


def make_gpu(node: str, index: int, model: str, **kw: Any) -> GPU:
    """A GPU of a known model (memory/peaks from GPU_MODELS unless given)."""
    spec = GPU_MODELS.get(model)
    if spec is None and not {"memory_bytes", "peak_flops", "mem_bw"} <= kw.keys():
        raise TopologyError(f"unknown GPU model {model!r}: give memory_mib, tflops and mem_bw_gbs, "
                            f"or use one of {', '.join(GPU_MODELS)}")
    base = dict(memory_bytes=spec.memory_bytes, peak_flops=spec.peak_flops, mem_bw=spec.mem_bw,
                compute_class=spec.compute_class) if spec else dict(compute_class="unknown")
    base.update(kw)
    return GPU(node=node, index=index, model=model, **base)


def _derived_kind(a: GPU, b: GPU) -> LinkKind:
    if a.nvlink_domain is not None and a.nvlink_domain == b.nvlink_domain:
        return LinkKind.NVLINK
    if a.pcie_switch is not None and a.pcie_switch == b.pcie_switch:
        return LinkKind.PCIE_SWITCH
    if a.numa == b.numa:
        return LinkKind.PCIE_HOST
    return LinkKind.PCIE_CROSS_SOCKET


class Topology:
    """A cluster: nodes, GPUs, link parameters, and the current free memory / busy share per GPU."""

    def __init__(self, nodes: Sequence[Node], links: Mapping[LinkKind, Link] | None = None,
                 name: str = "cluster", free: Sequence[int] | None = None, busy: Sequence[float] | None = None,
                 description: str = ""):
        self.name = name
        self.description = description
        self.nodes = list(nodes)
        self.links = dict(DEFAULT_LINKS)
        self.links.update(links or {})
        self._build()
        n = len(self.gpus)
        self.free = self.total.copy() if free is None else np.asarray(free, dtype=np.int64).copy()
        self.busy = np.zeros(n) if busy is None else np.asarray(busy, dtype=np.float64).copy()
        if self.free.shape != (n,) or self.busy.shape != (n,):
            raise TopologyError(f"state arrays must have one entry per GPU ({n})")
        self._check()

    def _check(self) -> None:
        """Refuse figures the placer cannot compute with (a zero rate divides by zero, a NaN busy share
        makes every time NaN): TopologyError names the GPU or link kind."""
        for key, arr in (("peak_flops", self.peak_flops), ("mem_bw", self.mem_bw)):
            bad = np.flatnonzero(~(np.isfinite(arr) & (arr > 0)))
            if len(bad):
                raise TopologyError(f"GPU {self.gpus[int(bad[0])].id}: {key} {arr[bad[0]]} must be a finite rate > 0")
        bad = np.flatnonzero(self.total < 0)
        if len(bad):
            raise TopologyError(f"GPU {self.gpus[int(bad[0])].id}: memory_bytes {self.total[bad[0]]} must be >= 0")
        for kind, l in self.links.items():
            if kind is not LinkKind.SAME and not (l.bandwidth > 0 and math.isfinite(l.latency) and l.latency >= 0):
                raise TopologyError(f"link {LinkKind(kind).value}: bandwidth {l.bandwidth} B/s must be > 0 and "
                                    f"latency {l.latency} s >= 0")
        bad = np.flatnonzero((self.free < 0) | (self.free > self.total))
        if len(bad):
            g = self.gpus[int(bad[0])]
            raise TopologyError(f"GPU {g.id}: free memory {int(self.free[bad[0]])} B must lie between 0 and its "
                                f"{g.memory_bytes} B")
        bad = np.flatnonzero(~((self.busy >= 0) & (self.busy <= 1)))  # (NaN too)
        if len(bad):
            raise TopologyError(f"GPU {self.gpus[int(bad[0])].id}: busy share {self.busy[bad[0]]} must lie "
                                f"between 0 and 1")

    def _build(self) -> None:
        names = [nd.name for nd in self.nodes]
        if len(set(names)) != len(names):
            raise TopologyError("node names must be unique")
        racks: dict[str, int] = {}
        self.gpus: list[GPU] = []
        node_of, rack_of, local = [], [], []
        self._node_kinds: list[list[list[LinkKind]]] = []
        self._node_first: list[int] = []
        for ni, nd in enumerate(self.nodes):
            r = racks.setdefault(nd.rack, len(racks))
            self._node_first.append(len(self.gpus))
            pos = {g.index: li for li, g in enumerate(nd.gpus)}
            if len(pos) != len(nd.gpus):
                raise TopologyError(f"node {nd.name}: GPU indices must be unique")
            kinds = [[LinkKind.SAME if a is b else _derived_kind(a, b) for b in nd.gpus] for a in nd.gpus]
            for (x, y), kind in nd.links.items():
                if x not in pos or y not in pos:
                    raise TopologyError(f"node {nd.name}: link ({x}, {y}) names a GPU it does not have")
                kinds[pos[x]][pos[y]] = kinds[pos[y]][pos[x]] = LinkKind(kind)
            self._node_kinds.append(kinds)
            for li, g in enumerate(nd.gpus):
                if g.node != nd.name:
                    raise TopologyError(f"GPU {g.id} listed under node {nd.name}")
                self.gpus.append(g)
                node_of.append(ni)
                rack_of.append(r)
                local.append(li)
        self.racks = list(racks)
        self.node_of = np.asarray(node_of, dtype=np.int32)
        self.rack_of = np.asarray(rack_of, dtype=np.int32)
        self._local = local
        self.total = np.asarray([g.memory_bytes for g in self.gpus], dtype=np.int64)
        self.peak_flops = np.asarray([g.peak_flops for g in self.gpus], dtype=np.float64)
        self.mem_bw = np.asarray([g.mem_bw for g in self.gpus], dtype=np.float64)
        self.index = {g.id: i for i, g in enumerate(self.gpus)}

    # --- queries ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.gpus)

    def gpu_index(self, gpu: int | str) -> int:
        """Position of a GPU given by position or id ("node/index")."""
        if isinstance(gpu, str):
            try:
                return self.index[gpu]
            except KeyError:
                raise TopologyError(f"no GPU {gpu!r} in cluster {self.name!r}") from None
        i = int(gpu)
        if not 0 <= i < len(self.gpus):  # a negative position would count from the end
            have = f"positions are 0..{len(self.gpus) - 1}" if self.gpus else "it has no GPU"
            raise TopologyError(f"no GPU at position {gpu} in cluster {self.name!r}: {have}")
        return i

    def link_kind(self, i: int, j: int) -> LinkKind:
        """Link kind between GPUs at positions i and j."""
        ni, nj = self.node_of[i], self.node_of[j]
        if ni != nj:
            return LinkKind.NETWORK if self.rack_of[i] == self.rack_of[j] else LinkKind.NETWORK_CROSS_RACK
        return self._node_kinds[ni][self._local[i]][self._local[j]]

    def link(self, i: int, j: int) -> Link:
        """Link (bandwidth, latency) between GPUs at positions i and j."""
        return self.links[self.link_kind(i, j)]

    def copy(self) -> "Topology":
        """Same cluster, independent state (free memory and busy shares)."""
        t = Topology.__new__(Topology)
        t.__dict__.update(self.__dict__)
        t.free = self.free.copy()
        t.busy = self.busy.copy()
        return t

    def stats(self) -> dict[str, Any]:
        """Summary figures of the current state."""
        frac = self.free / np.maximum(self.total, 1)
        per_node = np.bincount(self.node_of, weights=(frac > 0.85), minlength=len(self.nodes))
        return {"nodes": len(self.nodes), "racks": len(self.racks), "gpus": len(self.gpus),
                "memory_total_bytes": int(self.total.sum()), "memory_free_bytes": int(self.free.sum()),
                "free_share": float(self.free.sum() / max(int(self.total.sum()), 1)),
                "gpus_over_85pct_free": float((frac > 0.85).mean()) if len(frac) else 0.0,
                "nodes_with_4_over_85pct_free": float((per_node >= 4).mean()) if len(per_node) else 0.0,
                "mean_busy": float(self.busy.mean()) if len(frac) else 0.0}

    # --- state changes ---------------------------------------------------------------------------
    def reserve(self, amounts: Mapping[int | str, int]) -> None:
        """Take memory on several GPUs, all or nothing; TopologyError names the GPU that lacks it."""
        items = self._amounts(amounts, "reserve")
        need: dict[int, int] = {}
        for i, b in items:
            need[i] = need.get(i, 0) + b
        for i, b in need.items():
            if b > self.free[i]:
                raise TopologyError(f"GPU {self.gpus[i].id}: {b / GiB:.2f} GiB asked, "
                                    f"{self.free[i] / GiB:.2f} GiB free")
        for i, b in need.items():
            self.free[i] -= b

    def release(self, amounts: Mapping[int | str, int]) -> None:
        """Give memory back (never above a GPU's total), all or nothing."""
        for i, b in self._amounts(amounts, "release"):
            self.free[i] = min(int(self.total[i]), int(self.free[i]) + b)

    def _amounts(self, amounts: Mapping[int | str, int], what: str) -> list[tuple[int, int]]:
        """(position, bytes) pairs; TopologyError for an unknown GPU or bytes that are not >= 0."""
        out = []
        for g, b in amounts.items():
            i = self.gpu_index(g)
            if isinstance(b, (str, bytes)) or as_number(b, 0) is None:
                raise TopologyError(f"cannot {what} {b!r} bytes on GPU {self.gpus[i].id}: give a number >= 0")
            out.append((i, int(b)))
        return out

    # --- descriptions ----------------------------------------------------------------------------
    def to_dict(self, state: bool = True) -> dict[str, Any]:
        """Description as plain data (memory in MiB, bandwidth in GB/s, latency in us)."""
        out: dict[str, Any] = {"name": self.name, "description": self.description, "links": {
            k.value: {"bandwidth_gbs": l.bandwidth / GB, "latency_us": round(l.latency * 1e6, 3)}
            for k, l in self.links.items() if k is not LinkKind.SAME and l != DEFAULT_LINKS[k]}}
        nodes = []
        for ni, nd in enumerate(self.nodes):
            gl = []
            for li, g in enumerate(nd.gpus):
                d: dict[str, Any] = {"index": g.index, "model": g.model}
                spec = GPU_MODELS.get(g.model)
                if spec is None or spec.memory_bytes != g.memory_bytes:
                    d["memory_mib"] = g.memory_bytes // MiB
                if spec is None or spec.peak_flops != g.peak_flops:
                    d["tflops"] = g.peak_flops / 1e12
                if spec is None or spec.mem_bw != g.mem_bw:
                    d["mem_bw_gbs"] = g.mem_bw / GB
                if spec is None:
                    d["compute_class"] = g.compute_class
                d["numa"] = g.numa
                for key in ("pcie_switch", "nvlink_domain", "uuid"):
                    if getattr(g, key) is not None:
                        d[key] = getattr(g, key)
                if state:
                    i = self._node_first[ni] + li
                    d["free_mib"] = int(self.free[i]) // MiB
                    if self.busy[i]:
                        d["busy"] = round(float(self.busy[i]), 4)
                gl.append(d)
            nd_d: dict[str, Any] = {"name": nd.name, "rack": nd.rack, "gpus": gl}
            if nd.links:
                nd_d["links"] = [{"a": a, "b": b, "kind": LinkKind(k).value} for (a, b), k in nd.links.items()]
            nodes.append(nd_d)
        out["nodes"] = nodes
        for key in ("links", "description"):
            if not out[key]:
                del out[key]
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Topology":
        """Inverse of to_dict(); TopologyError says which entry is wrong and what it accepts."""
        if not isinstance(d, Mapping):
            got = "nothing (is the file empty?)" if d is None else f"a {type(d).__name__}"
            raise TopologyError(f"a cluster description is a mapping with a 'nodes' list (and optionally "
                                f"name, description, links); got {got}")
        if not isinstance(d.get("nodes"), list):
            raise TopologyError(f"a cluster description needs 'nodes': a list of nodes, each with a name and "
                                f"a list of gpus; got {d.get('nodes')!r}")
        try:
            links = {}
            for k, v in (d.get("links") or {}).items():
                kind = LinkKind(k)
                links[kind] = Link(kind, _num(v, "bandwidth_gbs", f"link {k}", 0.0, strict=True) * GB,
                                   _num(v, "latency_us", f"link {k}", 0.0) * 1e-6)
            nodes, free, busy = [], [], []
            for nd in d["nodes"]:
                gpus = []
                for li, g in enumerate(nd["gpus"]):
                    where = f"GPU {nd['name']}/{g.get('index', li)}"
                    kw: dict[str, Any] = {}
                    if "memory_mib" in g:
                        kw["memory_bytes"] = int(_num(g, "memory_mib", where, 0.0)) * MiB
                    if "tflops" in g:
                        kw["peak_flops"] = _num(g, "tflops", where, 0.0, strict=True) * 1e12
                    if "mem_bw_gbs" in g:
                        kw["mem_bw"] = _num(g, "mem_bw_gbs", where, 0.0, strict=True) * GB
                    for key in ("compute_class", "numa", "pcie_switch", "nvlink_domain", "uuid"):
                        if key in g:
                            kw[key] = g[key]
                    gpu = make_gpu(nd["name"], int(g.get("index", li)), str(g["model"]), **kw)
                    gpus.append(gpu)
                    f = int(_num(g, "free_mib", where, 0.0)) * MiB if "free_mib" in g else gpu.memory_bytes
                    if f > gpu.memory_bytes:
                        raise TopologyError(f"{where}: free_mib {g['free_mib']} must lie between 0 and the GPU's "
                                            f"memory ({gpu.memory_bytes // MiB} MiB)")
                    free.append(f)
                    busy.append(_num(g, "busy", where, 0.0, hi=1.0) if "busy" in g else 0.0)
                nlinks = {(int(x["a"]), int(x["b"])): LinkKind(x["kind"]) for x in nd.get("links", [])}
                nodes.append(Node(nd["name"], str(nd.get("rack", "r0")), gpus, nlinks))
        except TopologyError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise TopologyError(f"bad cluster description: {type(e).__name__}: {e}") from e
        return cls(nodes, links, name=str(d.get("name", "cluster")), free=free, busy=busy,
                   description=str(d.get("description", "")))

    def save(self, path: str | Path, state: bool = True) -> None:
        """Write the description as JSON or YAML (by suffix)."""
        path = Path(path)
        d = self.to_dict(state)
        if path.suffix in (".yaml", ".yml"):
            import yaml
            path.write_text(yaml.safe_dump(d, sort_keys=False, default_flow_style=None, width=120))
        else:
            path.write_text(_to_json(d))

    @classmethod
    def load(cls, path: str | Path) -> "Topology":
        """Read a JSON or YAML description; TopologyError names the file and what is wrong in it."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise TopologyError(f"cannot read cluster description {path}: {e}") from e
        if path.suffix in (".yaml", ".yml"):
            import yaml
            try:
                d = yaml.safe_load(text)
            except yaml.YAMLError as e:
                mark, context = getattr(e, "problem_mark", None), getattr(e, "context", None)
                where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
                raise TopologyError(f"{path}: not valid YAML: {context + ': ' if context else ''}"
                                    f"{getattr(e, 'problem', None) or e}{where}") from e
        else:
            try:
                d = json.loads(text)
            except json.JSONDecodeError as e:
                raise TopologyError(f"{path}: not JSON: {e}") from e
        try:
            return cls.from_dict(d)
        except TopologyError as e:
            raise TopologyError(f"{path}: {e}") from e


def as_number(x: Any, lo: float = -math.inf, hi: float = math.inf, strict: bool = False) -> float | None:
    """`x` as a float if it is a finite number in [lo, hi] (above lo if strict) -- a bool is none, a
    numeric string is read -- else None.  The one check of figures in descriptions, requests and
    bookings (placement and the allocator), each of which raises its own typed error."""
    if isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and lo <= v <= hi and not (strict and v == lo) else None


def _num(d: Mapping[str, Any], key: str, where: str, lo: float, strict: bool = False,
         hi: float = math.inf) -> float:
    """d[key] as a finite float in [lo, hi] (above lo if strict); TopologyError names where and the field."""
    x = d[key]
    v = as_number(x, lo, hi, strict)
    if v is None:
        if hi < math.inf:
            want = f"a number between {lo:g} and {hi:g}"
        else:
            want = f"a number {'>' if strict else '>='} {lo:g}"
        raise TopologyError(f"{where}: {key} is {x!r}; give {want}")
    return v


def _to_json(d: Mapping[str, Any]) -> str:
    """JSON with one line per GPU, so that a description of a hundred servers stays readable."""
    out = ["{"]
    for key, val in d.items():
        if key != "nodes":
            out.append(f" {json.dumps(key)}: {json.dumps(val)},")
    out.append(' "nodes": [')
    for ni, nd in enumerate(d["nodes"]):
        head = {k: v for k, v in nd.items() if k not in ("gpus", "links")}
        out.append("  " + json.dumps(head)[:-1] + ', "gpus": [')
        out.extend("    " + json.dumps(g) + ("," if gi + 1 < len(nd["gpus"]) else "") for gi, g in enumerate(nd["gpus"]))
        tail = f'], "links": {json.dumps(nd["links"])}}}' if nd.get("links") else "]}"
        out.append("  " + tail + ("," if ni + 1 < len(d["nodes"]) else ""))
    out.append(" ]")
    out.append("}")
    return "\n".join(out) + "\n"


CLUSTERS_DIR = Path(__file__).resolve().parent.parent / "data" / "clusters"


def load_cluster(name_or_path: str | Path) -> Topology:
    """A description file by path, or a shipped one by name ("paper-testbed-82", ...)."""
    p = Path(name_or_path)
    if p.exists():
        return Topology.load(p)
    for suffix in (".json", ".yaml", ".yml"):
        q = CLUSTERS_DIR / f"{name_or_path}{suffix}"
        if q.exists():
            return Topology.load(q)
    shipped = sorted(x.stem for x in CLUSTERS_DIR.glob("*.*")) if CLUSTERS_DIR.exists() else []
    raise TopologyError(f"no cluster description {str(name_or_path)!r}; shipped: {', '.join(shipped)}")


# --- generated clusters ----------------------------------------------------------------------------
def paper_testbed() -> Topology:
    """42 servers, 82 GPUs, 100 Gbps (the paper's testbed; GPU model and wiring are our assumptions).

    40 two-GPU servers and 2 one-GPU servers of A100-80GB in 3 racks of 14; half the two-GPU servers
    have an NVLink bridge, the other half hang their GPUs off different sockets.
    """
    nodes = []
    for s in range(42):
        n_gpu = 1 if s >= 40 else 2
        name = f"s{s:02d}"
        bridged = s < 20
        gpus = [make_gpu(name, i, "A100-80", numa=0 if bridged else i,
                         nvlink_domain=0 if bridged and n_gpu == 2 else None) for i in range(n_gpu)]
        nodes.append(Node(name, f"r{s // 14}", gpus))
    return Topology(nodes, name="paper-testbed-82", description=(
        "Shaped like the FlexPipe paper's testbed: 42 servers, 82 GPUs, 100 Gbps. GPU model (A100-80GB), "
        "racks and intra-server wiring are assumptions; flexpipe.placement.topology.fragment() adds a "
        "fragmented occupancy."))


def synthetic_cluster(nodes: int = 125, gpus_per_node: int = 8, nodes_per_rack: int = 16,
                      model: str = "A100-80", name: str | None = None) -> Topology:
    """A homogeneous cluster of 8-GPU servers: even servers NVSwitch, odd ones PCIe (switch pairs, 2 sockets)."""
    out = []
    for s in range(nodes):
        nm = f"n{s:04d}"
        nv = s % 2 == 0
        gpus = [make_gpu(nm, i, model, numa=(i * 2) // gpus_per_node, pcie_switch=i // 2,
                         nvlink_domain=0 if nv else None) for i in range(gpus_per_node)]
        out.append(Node(nm, f"r{s // nodes_per_rack}", gpus))
    return Topology(out, name=name or f"synthetic-{nodes * gpus_per_node}")


# --- fragmented occupancy -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class OccupancyProfile:
    """Statistics of a fragmented cluster (defaults: the paper's production figures, section 'Why').

    p_idle: share of GPUs with more than 85% free memory (8.7%); p_four_idle_8: share of 8-GPU
    servers with four or more such GPUs (0.02%), which needs idle GPUs to repel each other within a
    server; p_full: share of the other GPUs that are (almost) full; the rest are partly occupied with
    a free share drawn from Beta(partial_a, partial_b) over [0.05, 0.85].  busy_per_used: SM time
    taken by other tenants per unit of occupied memory, drawn uniformly (mean SM use 17-24%).
    """

    p_idle: float = 0.087
    p_four_idle_8: float = 0.0002
    p_full: float = 0.15
    partial_a: float = 1.4
    partial_b: float = 2.0
    busy_per_used: tuple[float, float] = (0.1, 0.6)
    granularity_bytes: int = 256 * MiB


@lru_cache(maxsize=None)
def _idle_count_weights(g: int, p_idle: float, damping: float) -> tuple[float, ...]:
    """P(k idle GPUs on a g-GPU server): binomial tilted by damping^(k(k-1)/2), mean k = p_idle * g."""

    def dist(p: float) -> list[float]:
        w = [math.comb(g, k) * p**k * (1 - p) ** (g - k) * damping ** (k * (k - 1) / 2) for k in range(g + 1)]
        s = sum(w)
        return [x / s for x in w]

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(k * x for k, x in enumerate(dist(mid))) < p_idle * g:
            lo = mid
        else:
            hi = mid
    return tuple(dist((lo + hi) / 2))


@lru_cache(maxsize=None)
def _damping_for(p_idle: float, p_four_idle_8: float) -> float:
    lo, hi = 1e-6, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(_idle_count_weights(8, p_idle, mid)[4:]) > p_four_idle_8:
            hi = mid
        else:
            lo = mid
    return (lo + hi) / 2


def fragment(topo: Topology, seed: int, profile: OccupancyProfile = OccupancyProfile()) -> Topology:
    """A copy of `topo` with a random fragmented occupancy (seeded, reproducible)."""
    rng = np.random.default_rng(seed)
    out = topo.copy()
    damping = _damping_for(profile.p_idle, profile.p_four_idle_8)
    free_frac = np.empty(len(topo))
    for ni in range(len(topo.nodes)):
        idx = np.flatnonzero(topo.node_of == ni)
        g = len(idx)
        k = rng.choice(g + 1, p=_idle_count_weights(g, profile.p_idle, damping))
        idle = np.zeros(g, dtype=bool)
        idle[rng.choice(g, size=k, replace=False)] = True
        full = ~idle & (rng.random(g) < profile.p_full)
        part = 0.05 + 0.80 * rng.beta(profile.partial_a, profile.partial_b, size=g)
        frac = np.where(idle, rng.uniform(0.86, 1.0, size=g), np.where(full, rng.uniform(0.0, 0.05, size=g), part))
        free_frac[idx] = frac
    q = profile.granularity_bytes
    out.free = (np.floor(topo.total * free_frac / q) * q).astype(np.int64)
    lo, hi = profile.busy_per_used
    out.busy = np.clip((1 - free_frac) * rng.uniform(lo, hi, size=len(topo)), 0.0, 0.95)
    return out


# --- discovery ---------------------------------------------------------------------------------------
# nvmlDeviceGetTopologyCommonAncestor levels -> link kinds
_NVML_LEVELS = {0: LinkKind.SAME, 10: LinkKind.PCIE_SWITCH, 20: LinkKind.PCIE_SWITCH, 30: LinkKind.PCIE_HOST,
                40: LinkKind.PCIE_HOST, 50: LinkKind.PCIE_CROSS_SOCKET}


def model_from_nvml_name(name: str) -> str:
    """Our model key for an NVML product name ("NVIDIA A100-SXM4-80GB" -> "A100-80")."""
    for needle, key in _NVML_NAMES:
        if needle in name:
            return key
    return name


def discover_local(node: str | None = None, rack: str = "r0") -> Topology:
    """This machine's GPUs via pynvml; NoDriverError when pynvml or the NVIDIA driver is missing."""
    import socket

    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError as e:
        raise NoDriverError("pynvml is not installed (pip install nvidia-ml-py, or flexpipe[gpu]); "
                            "describe the cluster in a file instead (flexpipe topology --from FILE)") from e
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound / DriverNotLoaded: both mean "no usable driver"
        raise NoDriverError(f"no NVIDIA driver found ({e}); describe the cluster in a file instead "
                            f"(flexpipe topology --from FILE)") from e
    node = node or socket.gethostname()
    try:
        n = pynvml.nvmlDeviceGetCount()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
        bus = [_s(pynvml.nvmlDeviceGetPciInfo(h).busId).lower() for h in handles]
        gpus, free, busy = [], [], []
        for i, h in enumerate(handles):
            name = _s(pynvml.nvmlDeviceGetName(h))
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            key = model_from_nvml_name(name)
            kw: dict[str, Any] = {"memory_bytes": int(mem.total), "uuid": _s(pynvml.nvmlDeviceGetUUID(h))}
            if key not in GPU_MODELS:  # unknown product: memory is known, peaks are not
                kw.update(peak_flops=100e12, mem_bw=1000 * GB, compute_class="unknown")
            gpus.append(make_gpu(node, i, key, **kw))
            free.append(int(mem.free))
            try:
                busy.append(float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu) / 100.0)
            except Exception:  # not supported on every product; utilisation is advisory
                busy.append(0.0)
        links: dict[tuple[int, int], LinkKind] = {}
        for i in range(n):
            for j in range(i + 1, n):
                level = int(pynvml.nvmlDeviceGetTopologyCommonAncestor(handles[i], handles[j]))
                links[(i, j)] = _NVML_LEVELS.get(level, LinkKind.PCIE_CROSS_SOCKET)
        for i, h in enumerate(handles):
            for lk in range(int(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18))):
                try:
                    if not pynvml.nvmlDeviceGetNvLinkState(h, lk):
                        continue
                    peer = _s(pynvml.nvmlDeviceGetNvLinkRemotePciInfo(h, lk).busId).lower()
                except Exception:  # link index not present on this product
                    break
                if peer in bus and bus.index(peer) != i:
                    j = bus.index(peer)
                    links[(min(i, j), max(i, j))] = LinkKind.NVLINK
                elif peer not in bus:  # an NVSwitch: every GPU with a link to a switch shares a domain
                    gpus[i].nvlink_domain = 0
        for (i, j), kind in list(links.items()):
            if gpus[i].nvlink_domain == 0 and gpus[j].nvlink_domain == 0:
                links[(i, j)] = LinkKind.NVLINK
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # shutting down a half-initialised NVML must not hide the real error
            pass
    return Topology([Node(node, rack, gpus, links)], name=node, free=free, busy=busy)


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


# --- printing ---------------------------------------------------------------------------------------
def format_table(topo: Topology, max_rows: int | None = None) -> str:
    """A readable table of GPUs (memory, load, links to the other GPUs of the node) and a summary."""
    head = f"{'gpu':<14} {'rack':<6} {'model':<9} {'total':>9} {'free':>9} {'free%':>6} {'busy':>5}  links"
    lines = [f"cluster {topo.name}", head, "-" * len(head)]
    shown = 0
    for i, g in enumerate(topo.gpus):
        if max_rows is not None and shown >= max_rows:
            lines.append(f"... {len(topo) - shown} more GPUs")
            break
        peers = [f"{topo.gpus[j].index}:{_short(topo.link_kind(i, j))}"
                 for j in np.flatnonzero(topo.node_of == topo.node_of[i]) if j != i]
        lines.append(f"{g.id:<14} {topo.racks[topo.rack_of[i]]:<6} {g.model:<9} "
                     f"{g.memory_bytes / GiB:>7.1f}Gi {topo.free[i] / GiB:>7.1f}Gi "
                     f"{100 * topo.free[i] / max(g.memory_bytes, 1):>5.0f}% {100 * topo.busy[i]:>4.0f}%  "
                     f"{' '.join(peers) or '-'}")
        shown += 1
    s = topo.stats()
    lines.append(f"{s['nodes']} nodes in {s['racks']} racks, {s['gpus']} GPUs; "
                 f"{s['memory_free_bytes'] / GiB:.1f} of {s['memory_total_bytes'] / GiB:.1f} GiB free "
                 f"({100 * s['free_share']:.1f}%); GPUs >85% free: {100 * s['gpus_over_85pct_free']:.1f}%; "
                 f"mean busy {100 * s['mean_busy']:.1f}%")
    lines.append("links: NV=nvlink SW=pcie switch HB=host bridge SYS=cross-socket")
    return "\n".join(lines)


def _short(kind: LinkKind) -> str:
    return {LinkKind.NVLINK: "NV", LinkKind.PCIE_SWITCH: "SW", LinkKind.PCIE_HOST: "HB",
            LinkKind.PCIE_CROSS_SOCKET: "SYS"}.get(kind, kind.value)


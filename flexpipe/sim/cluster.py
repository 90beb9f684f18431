"""The simulated cluster: GPUs with background occupancy, links, and stage placement.

The simulator's view of the fleet is deliberately flat: a GPU has a type, a server, total memory,
memory held by other tenants (`background`, fixed for a run) and memory held by the simulated
replicas.  Links follow from where two GPUs sit.  FP-5's `flexpipe.placement` supplies the cluster
descriptions `Cluster.from_topology` reads and the stage process's overhead every placed stage holds;
FlexPipe's policy places with its placer, the baselines with the fallback below (greedy,
server-packing, best-fit).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

# What a stage's process holds beside its parameters and KV: the placer's one estimate, which the
# router daemon books too (the simulator kept its own, 0.5 GB = 476.8 MiB, against the placer's 512 MiB)
from flexpipe.placement.placer import STAGE_OVERHEAD_BYTES
from flexpipe.sim.perf import GPUS, LINKS, GPUSpec, LinkSpec, ModelCosts, StageCost


@dataclass(slots=True)
class GPU:
    """One GPU of the cluster."""

    id: int
    server: int
    spec: GPUSpec
    background: float  # bytes held by other tenants
    used: float = 0.0  # bytes held by simulated replicas
    stages: int = 0  # simulated stages on it

    @property
    def total(self) -> float:
        return self.spec.mem_bytes

    @property
    def free(self) -> float:
        return self.spec.mem_bytes - self.background - self.used


@dataclass
class Cluster:
    """GPUs grouped by server, with the link kind inside a server."""

    gpus: list[GPU]
    intra: LinkSpec = LINKS["pcie"]
    inter: LinkSpec = LINKS["net"]
    name: str = "cluster"
    servers: list[list[int]] = field(default_factory=list)
    _links: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.servers:
            n = max(g.server for g in self.gpus) + 1 if self.gpus else 0
            self.servers = [[] for _ in range(n)]
            for g in self.gpus:
                self.servers[g.server].append(g.id)

    topo: Any = None  # an FP-5 Topology this cluster was read from, for its link table

    def link(self, a: int, b: int) -> LinkSpec:
        if a == b:
            return LINKS["local"]
        if self.topo is not None:
            kind = self.topo.link_kind(a, b)
            ls = self._links.get(kind)
            if ls is None:
                l = self.topo.links[kind]
                # FP-5's per-hop latency already holds the software overhead of a hop
                ls = self._links[kind] = LinkSpec(str(kind.value), float(l.bandwidth), 0.0, float(l.latency))
            return ls
        return self.intra if self.gpus[a].server == self.gpus[b].server else self.inter

    @property
    def capacity_eq(self) -> float:
        """GPU-equivalents of the whole cluster (one per GPU)."""
        return float(len(self.gpus))

    def background_free_share(self, threshold: float = 0.85) -> float:
        """Share of GPUs with more than `threshold` of memory free of other tenants."""
        return float(np.mean([(g.total - g.background) / g.total > threshold for g in self.gpus]))

    def snapshot_used(self) -> list[float]:
        return [g.used for g in self.gpus]

    # --- builders ---------------------------------------------------------------------------
    @classmethod
    def uniform(cls, servers: int, gpus_per_server: int, kind: str = "A100-80", occupancy: str = "none",
                seed: int = 0, intra: str = "nvlink") -> "Cluster":
        """`servers` x `gpus_per_server` GPUs of one kind, empty or with fragmented occupancy."""
        spec = GPUS[kind]
        gpus = [GPU(s * gpus_per_server + i, s, spec, 0.0) for s in range(servers) for i in range(gpus_per_server)]
        c = cls(gpus, LINKS[intra], LINKS["net"], f"{servers}x{gpus_per_server}x{kind}")
        if occupancy == "fragmented":
            fragment(c, seed)
        return c

    @classmethod
    def paper_82gpu(cls, seed: int = 0, occupancy: str = "fragmented") -> "Cluster":
        """42 servers / 82 GPUs / 100 Gbps like the paper's testbed (GPU mix is our assumption)."""
        topo = _fp5_paper_topology(seed) if occupancy == "fragmented" else None
        if topo is not None:
            return topo
        gpus: list[GPU] = []
        # 40 servers with 2x A100-80GB and 2 servers with 1x A100-40GB: 82 GPUs on 42 servers.
        for s in range(42):
            for _ in range(2 if s < 40 else 1):
                gpus.append(GPU(len(gpus), s, GPUS["A100-80" if s < 40 else "A100-40"], 0.0))
        c = cls(gpus, LINKS["pcie"], LINKS["net"], "paper-82gpu")
        if occupancy == "fragmented":
            fragment(c, seed)
        return c


def fragment(c: Cluster, seed: int, p_empty: float = 0.087) -> None:
    """Background tenants: a GPU is >85% free with probability `p_empty` (the paper's 8.7%).

    The rest hold 15-40% (one in four) or 40-95% of memory, which puts the mean occupancy near the
    ~55% of memory that the paper's 17-24% SM utilisation suggests is held but idle.
    """
    rng = np.random.default_rng(seed)
    for g in c.gpus:
        u = rng.random()
        if u < p_empty:
            frac = rng.uniform(0.0, 0.15)
        elif u < p_empty + 0.25:
            frac = rng.uniform(0.15, 0.40)
        else:
            frac = rng.uniform(0.40, 0.95)
        g.background = frac * g.total


def _fp5_paper_topology(seed: int) -> Cluster | None:
    """The paper-like testbed and occupancy generator of FP-5 (`flexpipe.placement.topology`)."""
    try:
        from flexpipe.placement import topology as topo
    except ImportError:
        return None
    return Cluster.from_topology(topo.fragment(topo.paper_testbed(), seed), "paper-82gpu")


def _spec_for(model: str, total: float, peak: float, bw: float) -> GPUSpec:
    base = GPUS.get(model)
    if base is None:  # a GPU FP-5 knows and perf.py does not: datasheet peaks, default efficiencies
        base = GPUSpec(model, peak, bw, total, 0.55, 0.75, 15e-6, source="FP-5 GPU_MODELS datasheet figures")
    return replace(base, mem_bytes=float(total))


def _from_topology(cls: type, t: Any, name: str | None = None) -> "Cluster":
    """A simulator cluster from an FP-5 `Topology`: its free memory becomes background occupancy,
    its per-GPU busy share (other tenants' SM time) slows this GPU's stages, and its link table is
    used for every pair of GPUs."""
    gpus = []
    for i, g in enumerate(t.gpus):
        total = float(t.total[i])
        spec = _spec_for(g.model, total, g.peak_flops, g.mem_bw)
        busy = float(t.busy[i]) if hasattr(t, "busy") else 0.0
        if busy > 0:
            spec = replace(spec, peak_flops=spec.peak_flops * (1 - busy), mem_bw=spec.mem_bw * (1 - busy))
        gpus.append(GPU(i, int(t.node_of[i]), spec, total - float(t.free[i])))
    c = cls(gpus, LINKS["pcie"], LINKS["net"], name or t.name)
    c.topo = t
    c._links = {}
    return c


Cluster.from_topology = classmethod(_from_topology)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# placement
@dataclass(frozen=True, slots=True)
class StagePlace:
    """One stage of a placed replica: its unit range, GPU(s) and bytes reserved on each GPU."""

    start: int
    end: int
    gpus: tuple[int, ...]  # more than one for a tensor-parallel stage
    bytes_per_gpu: float
    kv_tokens: int  # KV capacity of the stage, in tokens


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a replica's stages live."""

    stages: tuple[StagePlace, ...]

    @property
    def kv_tokens(self) -> int:
        return min(s.kv_tokens for s in self.stages)

    @property
    def gpu_ids(self) -> list[int]:
        return [g for s in self.stages for g in s.gpus]

    @property
    def num_stages(self) -> int:
        return len(self.stages)


def _kv_tokens(sc: StageCost, kv_bytes: float, tp: int = 1) -> int:
    if sc.kv_bytes_per_token <= 0:
        return 1 << 40
    return int(kv_bytes * tp / sc.kv_bytes_per_token)


def place_pipeline(c: Cluster, costs: ModelCosts, stages: int, kv_min: int, kv_want: int,
                   avoid: Sequence[int] = (), credit: dict[int, float] | None = None,
                   boundaries: Sequence[int] | None = None) -> Placement | None:
    """Fallback placer: contiguous stages on distinct GPUs, consecutive stages packed per server.

    Each stage takes `params + overhead + kv_want` tokens of KV where the GPU has room, and at least
    `kv_min` tokens.  `credit` adds memory a reshaping replica already holds on a GPU.  Servers are
    tried in order of free memory; within the plan, each stage takes the best-fitting GPU of the
    current server, moving to the next server when none fits.  Returns None when nothing fits.
    """
    b = list(boundaries) if boundaries is not None else costs.balanced_boundaries(stages)
    scs = [costs.stage(b[i], b[i + 1]) for i in range(len(b) - 1)]
    credit = credit or {}
    avoid_set = set(avoid)

    fr = [g.spec.mem_bytes - g.background - g.used for g in c.gpus]
    for gid, b in credit.items():
        fr[gid] += b
    need_min = [sc.param_bytes + STAGE_OVERHEAD_BYTES + kv_min * sc.kv_bytes_per_token for sc in scs]
    if max(need_min) > max(fr):
        return None
    smallest = min(need_min)
    srv_free = [sum(fr[g] for g in gs if fr[g] >= smallest) for gs in c.servers]
    order = sorted((s for s in range(len(c.servers)) if srv_free[s] > 0), key=lambda s: -srv_free[s])
    if not order:
        return None
    used: set[int] = set()
    chosen: list[int] = []
    si = 0
    for k, need in enumerate(need_min):
        pick = None
        for s_off in range(len(order)):
            srv = order[(si + s_off) % len(order)]
            best = None
            for g in c.servers[srv]:
                if fr[g] >= need and g not in used and g not in avoid_set and (best is None or fr[g] < fr[best]):
                    best = g  # best fit keeps big holes for big stages
            if best is not None:
                pick = best
                si = (si + s_off) % len(order)
                break
        if pick is None:
            return None
        used.add(pick)
        chosen.append(pick)
    out = []
    for sc, gid in zip(scs, chosen):
        want = sc.param_bytes + STAGE_OVERHEAD_BYTES + kv_want * sc.kv_bytes_per_token
        take = min(fr[gid], want)
        out.append(StagePlace(sc.start, sc.end, (gid,), take, _kv_tokens(sc, take - sc.param_bytes - STAGE_OVERHEAD_BYTES)))
    return Placement(tuple(out))


def place_server_tp(c: Cluster, costs: ModelCosts, kv_min: int, kv_want: int, max_tp: int = 8) -> Placement | None:
    """Whole model on one server, tensor-parallel over the fewest GPUs that fit (ServerlessLLM-like)."""
    sc = costs.stage(0, costs.num_units)
    best = None
    for srv, gids in enumerate(c.servers):
        for tp in range(1, min(max_tp, len(gids)) + 1):
            need = (sc.param_bytes + kv_min * sc.kv_bytes_per_token) / tp + STAGE_OVERHEAD_BYTES
            fits = sorted((g for g in gids if c.gpus[g].free >= need), key=lambda g: c.gpus[g].free)
            if len(fits) >= tp:
                pick = tuple(fits[:tp])
                per = min(min(c.gpus[g].free for g in pick),
                          (sc.param_bytes + kv_want * sc.kv_bytes_per_token) / tp + STAGE_OVERHEAD_BYTES)
                cand = (tp, -per, srv, pick, per)
                if best is None or cand[:3] < best[:3]:
                    best = cand
                break
    if best is None:
        return None
    tp, _, _, pick, per = best
    kv = _kv_tokens(sc, per - sc.param_bytes / tp - STAGE_OVERHEAD_BYTES, tp)
    return Placement((StagePlace(0, costs.num_units, pick, per, kv),))


def reserve(c: Cluster, p: Placement, sign: float = 1.0) -> None:
    """Take (sign=1) or give back (sign=-1) a placement's memory."""
    for s in p.stages:
        for g in s.gpus:
            c.gpus[g].used += sign * s.bytes_per_gpu
            c.gpus[g].stages += int(sign)
            if c.gpus[g].used < 1.0:
                c.gpus[g].used = 0.0

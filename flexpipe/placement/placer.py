"""Joint choice of stage boundaries and GPUs for a model replica, and the baselines it is compared with.

Objective, in order: the placement must fit (parameters, the KV reservation and a per-stage overhead,
on distinct GPUs); its slowest stage (compute on that GPU, slowed by other tenants, plus sending the
residual stream to the next stage over the chosen link) is as fast as possible, where times within
`time_tolerance` of the best count as equal; of the orders of one set of GPUs, only those that cross
between servers the fewest times (then between racks) count: the slowest stage sees one hop, but every
token pays every hop, some 2 ms each, so consecutive stages share fast links whenever the same GPUs
allow it; then the fragmentation it creates is smallest; then it reserves the fewest GPUs.  (Ranking
hops before fragmentation across different GPU sets as well packed worse and, in the simulator, served
fewer requests within their SLO at CV 4: a placement's GPUs are chosen for memory and speed, their
order for the network.)  The request bounds the stage count; with a
`target_time`, the fewest stages whose best placement meets the target are used (more stages would be
faster still, but cost GPUs and hops the target does not need).

Search (bounded so that a decision takes about a millisecond at 1,000 GPUs): for each stage count k
tried, a handful of candidate GPU sets are drawn from vectorised scores over all GPUs (the k holes a
stage of nominal size M/k fragments least, the fastest, the tightest, the largest, and compact sets
inside one node or one rack; on a small cluster, every ordered chain); each set is ordered along
the topology, and for that order the best contiguous boundaries come from a bisection on the
slowest-stage time whose feasibility test is a greedy sweep (furthest reach per GPU, by bisection
on prefix sums): O(k log n) per test.  Candidates that cannot come within the tolerance of the best
so far are dropped after one sweep, and stage counts whose lower bound is already too slow are
skipped.  With a target, the smallest meeting stage count is found by bisection over k.
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_right
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from flexpipe.errors import PlacementError
from flexpipe.placement.fragmentation import WorkloadMix, placement_delta
from flexpipe.placement.topology import GiB, MiB, Topology, as_number

INF = math.inf

# What a stage's process holds on a GPU beside its parameters and KV: CUDA context and kernels (some
# 300-500 MiB for a torch process with CUDA's lazy module loading), cuBLAS workspace, a micro-batch's
# activations.  An estimate, not a measurement of this code: a decode step's gather of long contexts
# can take more for a moment.  The router daemon books it for GPU stages too (--stage-overhead).
STAGE_OVERHEAD_BYTES = 512 * MiB


@dataclass(frozen=True, slots=True)
class UnitDemand:
    """One unit's costs as the placer sees them (FP-1's UnitCost carries the same fields)."""

    param_bytes: float
    flops_per_token: float
    act_bytes_per_token: float = 0.0
    kv_bytes_per_token: float = 0.0


class ReplicaRequest:
    """What to place: a model's units in order, how finely it may be cut, and its operating point.

    units: objects with param_bytes, flops_per_token, act_bytes_per_token, kv_bytes_per_token.
    stages..max_stages: the stage counts allowed (the policy's granularity, and how far the placer
    may split further to fit).  kv_tokens: tokens of KV cache reserved on every stage.
    batch_tokens: tokens per micro-batch (sets compute and transfer times).  target_time: a cycle
    time (seconds per micro-batch per stage) that is fast enough: the fewest stages meeting it win.
    Every figure must be finite and >= 0 (batch_tokens >= 1), or the placer would book less than the
    parameters (a negative KV reservation) or divide by zero: PlacementError says which to change.
    """

    def __init__(self, units: Sequence[Any], stages: int = 1, max_stages: int | None = None,
                 kv_tokens: int = 0, batch_tokens: int = 256, stage_overhead_bytes: int = STAGE_OVERHEAD_BYTES,
                 target_time: float | None = None, model: str = ""):
        self.units = list(units)
        self.n = len(self.units)
        if self.n == 0:
            raise PlacementError("a replica needs at least one unit")
        self.stages = max(1, int(stages))
        self.max_stages = min(self.n, max(self.stages, int(max_stages or stages)))
        if self.stages > self.n:
            raise PlacementError(f"{self.stages} stages asked for a model of {self.n} units")
        self.kv_tokens = int(_figure("kv_tokens", kv_tokens))
        self.batch_tokens = int(_figure("batch_tokens", batch_tokens, 1))
        self.stage_overhead_bytes = int(_figure("stage_overhead_bytes", stage_overhead_bytes))
        if target_time is not None:
            _figure("target_time", target_time, what="seconds (or None: no target)")
        self.target_time = target_time
        self.model = model
        for i, u in enumerate(self.units):
            for key in ("param_bytes", "flops_per_token", "act_bytes_per_token", "kv_bytes_per_token"):
                _figure(f"unit {i}: {key}", getattr(u, key))
        mem, flops, params = [0.0], [0.0], [0.0]
        for u in self.units:
            mem.append(mem[-1] + float(u.param_bytes) + float(u.kv_bytes_per_token) * self.kv_tokens)
            flops.append(flops[-1] + float(u.flops_per_token))
            params.append(params[-1] + float(u.param_bytes))
        self.mem_prefix, self.flops_prefix, self.param_prefix = mem, flops, params
        # every cut carries the residual stream; its size per token is the largest a non-final unit emits
        self.cut_bytes_per_token = max((float(u.act_bytes_per_token) for u in self.units[:-1]), default=0.0)
        self.min_unit_mem = min(mem[i + 1] - mem[i] for i in range(self.n))
        self.max_unit_mem = max(mem[i + 1] - mem[i] for i in range(self.n))
        self._mix: WorkloadMix | None = None

    @property
    def total_mem(self) -> float:
        return self.mem_prefix[-1]

    def stage_bytes(self, start: int, end: int) -> int:
        """Memory one stage [start, end) reserves: parameters, KV reservation, overhead."""
        return int(math.ceil(self.mem_prefix[end] - self.mem_prefix[start])) + self.stage_overhead_bytes

    def nominal_stage_bytes(self, k: int) -> float:
        """Mean stage size when cut into k stages."""
        return self.total_mem / k + self.stage_overhead_bytes

    def mix(self) -> WorkloadMix:
        """The stage sizes this request produces at the granularities it allows (equal weights)."""
        if self._mix is None:
            ks = range(self.stages, self.max_stages + 1)
            self._mix = WorkloadMix(tuple(int(self.nominal_stage_bytes(k)) for k in ks))
        return self._mix


    def to_dict(self) -> dict[str, Any]:
        """Plain data for the wire: units as [param_bytes, flops_per_token, act_bytes, kv_bytes] rows."""
        return {"units": [[float(u.param_bytes), float(u.flops_per_token), float(u.act_bytes_per_token),
                           float(u.kv_bytes_per_token)] for u in self.units],
                "stages": self.stages, "max_stages": self.max_stages, "kv_tokens": self.kv_tokens,
                "batch_tokens": self.batch_tokens, "stage_overhead_bytes": self.stage_overhead_bytes,
                "target_time": self.target_time, "model": self.model}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ReplicaRequest":
        try:
            units = [UnitDemand(*map(float, row)) for row in d["units"]]
            kw = {k: d[k] for k in ("stages", "max_stages", "kv_tokens", "batch_tokens", "stage_overhead_bytes",
                                    "target_time", "model") if k in d}
            return cls(units, **kw)
        except (KeyError, TypeError, ValueError) as e:
            raise PlacementError(f"bad replica request: {type(e).__name__}: {e}") from e


def _figure(name: str, x: Any, lo: float = 0, what: str = "") -> float:
    """`x` as a float, if it is a finite number >= lo; else PlacementError naming it."""
    v = as_number(x, lo)
    if v is None:
        raise PlacementError(f"{name} is {x!r}: give a finite number >= {lo:g}{' of ' + what if what else ''}")
    return v


def request_for_model(model: Any, dtype_bytes: int = 2, **kw: Any) -> ReplicaRequest:
    """A request for a preset name or ModelConfig, with FP-1's per-unit costs (kw as ReplicaRequest)."""
    from flexpipe.model.config import ModelConfig
    from flexpipe.model.units import unit_costs

    cfg = ModelConfig.preset(model) if isinstance(model, str) else model
    kw.setdefault("model", model if isinstance(model, str) else getattr(cfg, "name", ""))
    return ReplicaRequest(unit_costs(cfg, dtype_bytes=dtype_bytes), **kw)


def mix_for(requests: Iterable[tuple[ReplicaRequest, float]]) -> WorkloadMix:
    """A workload mix from the requests being served, weighted by popularity."""
    return WorkloadMix.merge((r.mix(), w) for r, w in requests)


@dataclass(frozen=True, slots=True)
class CostModel:
    """Effective GPU rates: peak x efficiency x the share of SM time other tenants leave us.

    Efficiencies and the per-unit overhead follow flexpipe/sim/perf.py (assumptions until calibrated).
    """

    compute_eff: float = 0.55
    mem_eff: float = 0.75
    unit_overhead_s: float = 15e-6

    def rates(self, topo: Topology) -> tuple[np.ndarray, np.ndarray]:
        """(FLOP/s, weight-streaming bytes/s) per GPU."""
        left = 1.0 - np.clip(topo.busy, 0.0, 0.95)
        return topo.peak_flops * self.compute_eff * left, topo.mem_bw * self.mem_eff * left


@dataclass(frozen=True, slots=True)
class StagePlacement:
    """One stage: unit range [start, end), its GPU, memory reserved and times per micro-batch."""

    start: int
    end: int
    gpu: str
    mem_bytes: int
    compute_s: float
    transfer_s: float  # to the next stage (0 for the last)

    @property
    def time_s(self) -> float:
        return self.compute_s + self.transfer_s


@dataclass(frozen=True)
class Placement:
    """A replica's stages in pipeline order, with its slowest-stage time and fragmentation change."""

    stages: tuple[StagePlacement, ...]
    bottleneck_s: float
    frag_delta: float = 0.0
    method: str = "flexpipe"
    model: str = ""

    @property
    def boundaries(self) -> list[int]:
        return [self.stages[0].start] + [s.end for s in self.stages]

    @property
    def gpus(self) -> list[str]:
        return [s.gpu for s in self.stages]

    @property
    def n_gpus(self) -> int:
        return len(self.stages)

    def reservations(self) -> dict[str, int]:
        """Bytes to reserve per GPU id."""
        return {s.gpu: s.mem_bytes for s in self.stages}

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [[s.start, s.end, s.gpu, s.mem_bytes, s.compute_s, s.transfer_s] for s in self.stages],
                "bottleneck_s": self.bottleneck_s, "frag_delta": self.frag_delta, "method": self.method,
                "model": self.model}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Placement":
        return cls(tuple(StagePlacement(int(a), int(b), str(g), int(m), float(c), float(t))
                         for a, b, g, m, c, t in d["stages"]),
                   float(d["bottleneck_s"]), float(d.get("frag_delta", 0.0)), str(d.get("method", "")),
                   str(d.get("model", "")))


def reservation_delta(old: Placement | None, new: Placement | None) -> dict[str, int]:
    """Per GPU id, bytes to take (positive) or give back (negative) to go from `old` to `new`."""
    out: dict[str, int] = {}
    for p, sign in ((old, -1), (new, 1)):
        for g, b in (p.reservations() if p else {}).items():
            out[g] = out.get(g, 0) + sign * b
    return {g: b for g, b in out.items() if b}


# --- evaluation -------------------------------------------------------------------------------------
def stage_compute_time(req: ReplicaRequest, a: int, b: int, flop_rate: float, byte_rate: float,
                       cost: CostModel) -> float:
    """Seconds for stage [a, b) to run one micro-batch on a GPU with these effective rates."""
    f = req.batch_tokens * (req.flops_prefix[b] - req.flops_prefix[a])
    p = req.param_prefix[b] - req.param_prefix[a]
    return max(f / flop_rate, p / byte_rate) + (b - a) * cost.unit_overhead_s


def ideal_time(req: ReplicaRequest, k: int, peak_flops: float, mem_bw: float, cost: CostModel = CostModel()) -> float:
    """Slowest stage of k memory-balanced stages on idle GPUs of one kind, links ignored (a target's base)."""
    b = even_boundaries(req, k)
    return max(stage_compute_time(req, x, y, peak_flops * cost.compute_eff, mem_bw * cost.mem_eff, cost)
               for x, y in zip(b, b[1:]))


def evaluate(req: ReplicaRequest, topo: Topology, boundaries: Sequence[int], gpus: Sequence[int | str],
             cost: CostModel = CostModel(), mix: WorkloadMix | None = None, method: str = "") -> Placement:
    """The Placement (times over the real links, fragmentation change) of given boundaries and GPUs."""
    idx = [topo.gpu_index(g) for g in gpus]
    fr, br = cost.rates(topo)
    stages = []
    for s, i in enumerate(idx):
        a, b = boundaries[s], boundaries[s + 1]
        comp = stage_compute_time(req, a, b, float(fr[i]), float(br[i]), cost)
        xfer = topo.link(i, idx[s + 1]).transfer_time(req.batch_tokens * req.cut_bytes_per_token) \
            if s + 1 < len(idx) else 0.0
        stages.append(StagePlacement(a, b, topo.gpus[i].id, req.stage_bytes(a, b), comp, xfer))
    mix = mix or req.mix()
    delta = placement_delta(topo, {i: st.mem_bytes for i, st in zip(idx, stages)}, mix)
    return Placement(tuple(stages), max(st.time_s for st in stages), delta, method, req.model)


def check_placement(p: Placement, req: ReplicaRequest, topo: Topology) -> None:
    """Raise PlacementError unless `p` is valid for `req` on state `topo` (taken before reserving)."""
    b = p.boundaries
    if b[0] != 0 or b[-1] != req.n or any(x >= y for x, y in zip(b, b[1:])):
        raise PlacementError(f"boundaries {b} are not a contiguous cover of {req.n} units")
    if len(set(p.gpus)) != len(p.gpus):
        raise PlacementError(f"two stages of one replica share a GPU: {p.gpus}")
    for s in p.stages:
        need = req.stage_bytes(s.start, s.end)
        i = topo.gpu_index(s.gpu)
        if s.mem_bytes < need:
            raise PlacementError(f"stage [{s.start},{s.end}) reserves {s.mem_bytes} B but needs {need} B")
        if s.mem_bytes > topo.free[i]:
            raise PlacementError(f"stage [{s.start},{s.end}) on {s.gpu}: {s.mem_bytes / GiB:.2f} GiB "
                                 f"needed, {topo.free[i] / GiB:.2f} GiB free")


# --- the placer ---------------------------------------------------------------------------------------
class _Sweep:
    """Boundary search for one ordered chain of GPUs (capacities, rates, outgoing transfer times)."""

    __slots__ = ("req", "caps", "fr", "br", "xs", "uo")

    def __init__(self, req: ReplicaRequest, caps: list[float], fr: list[float], br: list[float],
                 xs: list[float], uo: float):
        self.req, self.caps, self.fr, self.br, self.xs, self.uo = req, caps, fr, br, xs, uo

    def _reach(self, a: int, budget: float, i: int) -> int:
        if budget <= 0:
            return a
        req, fr, br = self.req, self.fr[i], self.br[i]
        flp, pp, B = req.flops_prefix, req.param_prefix, req.batch_tokens
        b = min(bisect_right(flp, flp[a] + budget * fr / B, a) - 1, bisect_right(pp, pp[a] + budget * br, a) - 1)
        uo = self.uo
        while b > a and (b - a) * uo + max(B * (flp[b] - flp[a]) / fr, (pp[b] - pp[a]) / br) > budget:
            b -= 1
        return b

    def cuts(self, T: float) -> list[int] | None:
        """Furthest-reach stage ends for cycle time T, or None when T is infeasible on this chain."""
        req, caps = self.req, self.caps
        memp, n = req.mem_prefix, req.n
        a, out = 0, []
        last_min = n - req.stages  # leave a unit for every stage the request asks for at least
        for i in range(len(caps)):
            b = min(bisect_right(memp, memp[a] + caps[i], a) - 1, last_min + i + 1)
            if T != INF:
                r = self._reach(a, T - self.xs[i], i)  # as a stage with a successor
                if r < b:
                    b = n if b == n and self._reach(a, T, i) == n else r  # ... unless it can be the last
            if b <= a:
                return None
            out.append(b)
            a = b
            if a == n:
                return out
        return None

    def bottleneck(self, cuts: list[int]) -> float:
        req, a, worst = self.req, 0, 0.0
        for i, b in enumerate(cuts):
            t = (b - a) * self.uo + max(req.batch_tokens * (req.flops_prefix[b] - req.flops_prefix[a]) / self.fr[i],
                                        (req.param_prefix[b] - req.param_prefix[a]) / self.br[i])
            worst = max(worst, t + (self.xs[i] if b < req.n else 0.0))
            a = b
        return worst

    def lower_bound(self) -> float:
        req = self.req
        return max(req.batch_tokens * req.flops_prefix[-1] / sum(self.fr), req.param_prefix[-1] / sum(self.br))


@dataclass(slots=True)
class _Cand:
    time: float
    frag: float
    chain: list[int]
    cuts: list[int]
    hops: tuple[int, int] = (0, 0)


def network_hops(topo: Topology, chain: Sequence[int]) -> tuple[int, int]:
    """(hops between servers, of which between racks) along a chain of GPU positions in pipeline order."""
    c = np.asarray(chain, dtype=np.int64)
    if len(c) < 2:
        return 0, 0
    return (int(np.count_nonzero(topo.node_of[c[1:]] != topo.node_of[c[:-1]])),
            int(np.count_nonzero(topo.rack_of[c[1:]] != topo.rack_of[c[:-1]])))


def _fewest_hops_per_set(sets: Sequence[frozenset], hops: Sequence[tuple[int, int]]) -> list[bool]:
    """Which candidates cross between servers (then racks) the fewest times among those on the same GPUs."""
    best: dict[frozenset, tuple[int, int]] = {}
    for g, h in zip(sets, hops):
        best[g] = min(best.get(g, h), h)
    return [h == best[g] for g, h in zip(sets, hops)]


class FlexPlacer:
    """Topology- and fragmentation-aware placer (topology_aware=False gives the topology-blind baseline)."""

    def __init__(self, cost: CostModel | None = None, mix: WorkloadMix | None = None,
                 topology_aware: bool = True, time_tolerance: float = 0.05, extra_stages: int = 0,
                 rel_precision: float = 0.003, exhaustive: int = 64):
        self.cost = cost or CostModel()
        self.mix = mix
        self.topology_aware = topology_aware
        self.time_tolerance = time_tolerance
        self.extra_stages = extra_stages  # stage counts tried beyond the first that meets the target
        self.rel_precision = rel_precision
        self.exhaustive = exhaustive  # try every ordered k-chain of GPUs when there are at most this many
        self.name = "flexpipe" if topology_aware else "topology-blind"

    # --- public ---------------------------------------------------------------------------------
    def place(self, req: ReplicaRequest, topo: Topology, exclude: Iterable[int | str] = ()) -> Placement:
        """Boundaries and GPUs for one replica (an extra replica: call again on the updated state)."""
        ex = [topo.gpu_index(g) for g in exclude]
        best = self._search(req, topo, ex)
        if best is None:
            best = self._fallback(req, topo, ex)
        if best is None:
            raise PlacementError(
                f"no placement of {req.model or 'the model'} ({req.total_mem / GiB:.1f} GiB + "
                f"{req.stage_overhead_bytes / MiB:.0f} MiB per stage) in {req.stages}..{req.max_stages} stages: "
                f"{int((topo.free >= req.min_unit_mem + req.stage_overhead_bytes).sum())} GPUs can hold a unit, "
                f"{topo.free.sum() / GiB:.1f} GiB free in all")
        chain, cuts = best
        return evaluate(req, topo, [0] + cuts, chain[:len(cuts)], self.cost, self.mix or req.mix(), self.name)

    def split(self, p: Placement, stage: int, req: ReplicaRequest, topo: Topology,
              max_candidates: int = 12) -> Placement:
        """Split one stage of a live replica in two; the new part goes to a GPU outside the replica.

        `topo` is the live state, with `p` already reserved.  Returns the whole new placement;
        reservation_delta(p, new) is what to reserve and release.
        """
        if isinstance(stage, bool) or not isinstance(stage, (int, np.integer)) or not 0 <= stage < p.n_gpus:
            raise PlacementError(f"stage {stage!r} does not exist: the replica has {p.n_gpus} stage(s), "
                                 f"numbered 0..{p.n_gpus - 1}")
        s = p.stages[stage]
        if s.end - s.start < 2:
            raise PlacementError(f"stage {stage} holds one unit and cannot be split")
        own = {topo.gpu_index(g) for g in p.gpus}
        g = topo.gpu_index(s.gpu)
        free = topo.free.copy()
        for st in p.stages:  # the replica's own reservations count as free for its new shape
            free[topo.gpu_index(st.gpu)] += st.mem_bytes
        half = req.stage_bytes(s.start, s.end) / 2
        ok = np.flatnonzero(free >= req.min_unit_mem + req.stage_overhead_bytes)
        ok = ok[~np.isin(ok, list(own))]
        if not len(ok):
            raise PlacementError("no GPU outside the replica can take a unit")
        mix = self.mix or req.mix()
        # nearby first (same node, same rack), then least fragmenting for a half-sized stage
        near = np.where(topo.node_of[ok] == topo.node_of[g], 0, np.where(topo.rack_of[ok] == topo.rack_of[g], 1, 2))
        d = mix.fragments(free[ok] - half) - mix.fragments(free[ok])
        order = np.lexsort((d, free[ok] < half, near if self.topology_aware else np.zeros_like(near)))
        base = [topo.gpu_index(x) for x in p.gpus]
        state = topo.copy()
        state.free = free
        fr, br = self.cost.rates(state)
        nbytes = req.batch_tokens * req.cut_bytes_per_token
        out_link = (lambda x: state.link(x, base[stage + 1]).transfer_time(nbytes)) if stage + 1 < len(base) \
            else (lambda x: 0.0)
        cands = []
        for h in map(int, ok[order[:max_candidates]]):
            for ga, gb in ((g, h), (h, g)):
                # the cut that balances the two halves (times including their outgoing hops)
                hop, tail = state.link(ga, gb).transfer_time(nbytes), out_link(gb)
                best_c, best_t = None, INF
                for c in range(s.start + 1, s.end):
                    if req.stage_bytes(s.start, c) > free[ga] or req.stage_bytes(c, s.end) > free[gb]:
                        continue
                    t = max(stage_compute_time(req, s.start, c, fr[ga], br[ga], self.cost) + hop,
                            stage_compute_time(req, c, s.end, fr[gb], br[gb], self.cost) + tail)
                    if t < best_t:
                        best_c, best_t = c, t
                if best_c is not None:
                    bounds = p.boundaries[:stage + 1] + [best_c] + p.boundaries[stage + 1:]
                    chain = base[:stage] + [ga, gb] + base[stage + 1:]
                    cands.append(evaluate(req, state, bounds, chain, self.cost, mix, self.name))
        if not cands:
            raise PlacementError(f"stage {stage} cannot be split: no GPU outside the replica fits either part")
        return self._select(cands, state)

    def _hops(self, topo: Topology, chain: Sequence[int]) -> tuple[int, int]:
        """What a chain's network hops cost in the objective (nothing to the topology-blind baseline)."""
        return network_hops(topo, chain) if self.topology_aware else (0, 0)

    def _select(self, cands: list[Placement], topo: Topology) -> Placement:
        """Fastest within the tolerance, of each GPU set's orders those of fewest network hops, then least
        fragmentation, then fewest GPUs."""
        thr = min(c.bottleneck_s for c in cands) * (1.0 + self.time_tolerance)
        fast = [c for c in cands if c.bottleneck_s <= thr]
        hops = [self._hops(topo, [topo.index[g] for g in c.gpus]) for c in fast]
        keep = _fewest_hops_per_set([frozenset(c.gpus) for c in fast], hops)
        return min((c for c, k in zip(fast, keep) if k), key=lambda c: (c.frag_delta, c.n_gpus, c.bottleneck_s))

    def merge(self, p: Placement, req: ReplicaRequest, topo: Topology,
              stages: int | None = None) -> tuple[Placement, list[str]]:
        """Merge adjacent stages down to `stages` (default one fewer); returns (placement, GPUs to free).

        Each step merges the pair whose result has the fastest slowest stage, then the least
        fragmentation; the merged stage stays on whichever of the two GPUs can hold it.
        """
        target = p.n_gpus - 1 if stages is None else stages
        if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or not 1 <= target <= p.n_gpus:
            raise PlacementError(f"cannot merge {p.n_gpus} stages into {target!r}: give a stage count in "
                                 f"1..{p.n_gpus}")
        free = topo.free.copy()
        for st in p.stages:
            free[topo.gpu_index(st.gpu)] += st.mem_bytes
        state = topo.copy()
        state.free = free
        mix = self.mix or req.mix()
        cur = p
        while cur.n_gpus > target:
            cands = []
            b, gl = cur.boundaries, [topo.gpu_index(x) for x in cur.gpus]
            for j in range(cur.n_gpus - 1):
                need = req.stage_bytes(b[j], b[j + 2])
                for keep in (gl[j], gl[j + 1]):
                    if need <= free[keep]:
                        cands.append(evaluate(req, state, b[:j + 1] + b[j + 2:], gl[:j] + [keep] + gl[j + 2:],
                                              self.cost, mix, self.name))
            if not cands:
                raise PlacementError(f"no two adjacent stages of {cur.n_gpus} fit on one of their GPUs")
            cur = self._select(cands, state)
        freed = [g for g in p.gpus if g not in set(cur.gpus)]
        return cur, freed

    # --- search ---------------------------------------------------------------------------------
    def _search(self, req: ReplicaRequest, topo: Topology, exclude: list[int]) -> tuple[list[int], list[int]] | None:
        free = topo.free
        ovh = req.stage_overhead_bytes
        elig = free >= req.min_unit_mem + ovh
        if exclude:
            elig[exclude] = False
        el = np.flatnonzero(elig)
        if not len(el):
            return None
        fr, br = self.cost.rates(topo)
        mix = self.mix or req.mix()
        f_el = free[el]
        by_free = el[np.argsort(-f_el, kind="stable")]
        cum_top = np.cumsum(free[by_free].astype(np.float64))
        target = req.target_time or 0.0
        tol = 1.0 + self.time_tolerance
        seen: set[tuple[int, ...]] = set()
        # lower bound of the slowest stage on any k GPUs: the work spread perfectly over the k fastest
        fr_top = np.cumsum(np.sort(fr[el])[::-1])
        br_top = np.cumsum(np.sort(br[el])[::-1])

        def run(k: int, floor: float) -> list[_Cand]:
            """Candidates with k stages that come within the tolerance of the best (or of `floor`)."""
            if cum_top[k - 1] < req.total_mem + k * ovh:
                return []  # even the k largest holes are too small together
            lb = max(req.batch_tokens * req.flops_prefix[-1] / fr_top[k - 1], req.param_prefix[-1] / br_top[k - 1])
            if lb > floor * tol:
                return []
            out: list[_Cand] = []
            best = floor
            for chain in self._candidates(req, topo, k, el, f_el, by_free, fr, br, mix):
                sig = tuple(chain)
                if sig in seen:
                    continue
                seen.add(sig)
                c = self._optimise(req, topo, chain, fr, br, best * tol)
                if c is None:
                    continue
                cuts, t = c
                used = chain[:len(cuts)]
                delta = placement_delta(free, {i: req.stage_bytes(a, b) for i, a, b in
                                               zip(used, [0] + cuts, cuts)}, mix)
                out.append(_Cand(t, delta, used, cuts, self._hops(topo, used)))
                best = min(best, t)
            return out

        kmin, kmax = req.stages, min(req.max_stages, len(el))
        if kmin > kmax:
            return None
        pool: list[_Cand] = []
        if target:
            # the fewest stages that meet the target (bisection: the slowest stage falls as k grows),
            # plus `extra_stages` more; if none meets it, the fastest found
            done: dict[int, list[_Cand]] = {}

            def met(k: int) -> bool:
                if k not in done:
                    done[k] = run(k, INF)
                return any(c.time <= target for c in done[k])

            if met(kmin):
                k_star: int | None = kmin
            elif kmax == kmin or not met(kmax):
                k_star = None
            else:
                lo, hi = kmin, kmax
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    lo, hi = (lo, mid) if met(mid) else (mid, hi)
                k_star = hi
            if k_star is None:
                pool = [c for cs in done.values() for c in cs]
            else:
                for k in range(k_star, min(k_star + self.extra_stages, kmax) + 1):
                    met(k)
                    pool.extend(done[k])
        else:
            # more stages first, so that the best time is known early and lower bounds prune the rest
            best_t = INF
            for k in range(kmax, kmin - 1, -1):
                got = run(k, best_t)
                pool.extend(got)
                best_t = min([best_t] + [c.time for c in got])
        if not pool:
            return None
        thr = min(c.time for c in pool) * tol
        fast = [c for c in pool if c.time <= thr]
        keep = _fewest_hops_per_set([frozenset(c.chain) for c in fast], [c.hops for c in fast])
        win = min((c for c, k in zip(fast, keep) if k), key=lambda c: (c.frag, len(c.cuts), c.time))
        return win.chain, win.cuts

    def _candidates(self, req: ReplicaRequest, topo: Topology, k: int, el: np.ndarray, f_el: np.ndarray,
                    by_free: np.ndarray, fr: np.ndarray, br: np.ndarray, mix: WorkloadMix) -> list[list[int]]:
        """A handful of k-GPU sets worth a boundary search."""
        if math.perm(len(el), k) <= self.exhaustive:  # a small cluster: every chain
            return [list(c) for c in itertools.permutations(map(int, el), k)]
        s = req.nominal_stage_bytes(k)
        out: list[np.ndarray] = [by_free[:k]]  # largest holes: most room for uneven stages
        fit = el[f_el >= s]
        if len(fit) >= k:
            ff = topo.free[fit].astype(np.float64)
            d = mix.fragments(ff - s) - mix.fragments(ff)
            t = np.maximum(req.batch_tokens * req.flops_prefix[-1] / k / fr[fit], req.param_prefix[-1] / k / br[fit])
            out.append(fit[np.lexsort((t, d))[:k]])  # least fragmenting
            out.append(fit[np.lexsort((d, t))[:k]])  # fastest
            out.append(fit[np.lexsort((d, ff))[:k]])  # tightest (best fit)
            if self.topology_aware:
                out.extend(self._local(topo, k, fit, d, t))
        if self.topology_aware:
            return [self._order(topo, c) for c in out]
        return [list(map(int, c)) for c in out]

    def _local(self, topo: Topology, k: int, fit: np.ndarray, d: np.ndarray, t: np.ndarray,
               per_level: int = 2) -> list[np.ndarray]:
        """Compact sets: inside one node, else inside one rack using the fewest nodes, else fewest racks."""
        node = topo.node_of[fit]
        rack = topo.rack_of[fit]
        node_n = np.bincount(node, minlength=len(topo.nodes))
        rack_n = np.bincount(rack, minlength=len(topo.racks))
        # score ties by stage time at 0.5% resolution, so fragmentation decides between equal GPUs
        score = d + np.round(t / max(float(t.min()), 1e-12), 2) * 1e-3 * max(float(np.abs(d).max()), 1.0)
        out: list[np.ndarray] = []
        if node_n.max() >= k:
            order = np.lexsort((score, node))
            starts = np.searchsorted(node[order], np.arange(len(topo.nodes)))
            good = np.flatnonzero(node_n >= k)
            if len(good) > 64:  # bounded: the nodes whose best GPU is best
                firsts = score[order[starts[good]]]
                good = good[np.argsort(firsts, kind="stable")[:64]]
            sums = [(float(score[order[starts[n]:starts[n] + k]].sum()), int(n)) for n in good]
            for _, n in sorted(sums)[:per_level]:
                out.append(fit[order[starts[n]:starts[n] + k]])
            return out
        order = np.lexsort((score, node, -node_n[node], rack, -rack_n[rack]))
        fo = fit[order]
        if rack_n.max() >= k:
            ranked = []
            racks, firsts = np.unique(rack[order], return_index=True)  # each rack's run is contiguous
            for r, lo in zip(racks, firsts):
                if rack_n[r] < k:
                    continue
                lo = int(lo)
                pick = order[lo:lo + k]
                ranked.append((len(np.unique(node[pick])), float(score[pick].sum()), lo))
            for _, _, lo in sorted(ranked)[:per_level]:
                out.append(fo[lo:lo + k])
            return out
        out.append(fo[:k])
        return out

    def _order(self, topo: Topology, chain: np.ndarray) -> list[int]:
        """Pipeline order along the topology: racks, then nodes, then GPU position."""
        c = np.asarray(chain)
        return list(map(int, c[np.lexsort((c, topo.node_of[c], topo.rack_of[c]))]))

    def _optimise(self, req: ReplicaRequest, topo: Topology, chain: list[int], fr: np.ndarray, br: np.ndarray,
                  thr: float) -> tuple[list[int], float] | None:
        """Best boundaries on this chain: (stage ends, slowest-stage time), or None if not competitive."""
        B = req.batch_tokens * req.cut_bytes_per_token
        if self.topology_aware:
            xs = [topo.link(chain[j], chain[j + 1]).transfer_time(B) for j in range(len(chain) - 1)] + [0.0]
        else:  # blind to links: every hop looks the same, so the search cannot prefer any
            xs = [0.0] * len(chain)
        ovh = req.stage_overhead_bytes
        sw = _Sweep(req, [float(topo.free[i]) - ovh for i in chain], [float(fr[i]) for i in chain],
                    [float(br[i]) for i in chain], xs, self.cost.unit_overhead_s)
        cuts = sw.cuts(INF)
        if cuts is None:
            return None
        hi = sw.bottleneck(cuts)
        if hi > thr:  # thr is inf until a first candidate is known
            cuts = sw.cuts(thr)
            if cuts is None:
                return None  # cannot come within the tolerance of the best so far
            hi = sw.bottleneck(cuts)
        lo = sw.lower_bound()
        for _ in range(40):
            if hi - lo <= self.rel_precision * hi:
                break
            mid = (lo + hi) / 2
            c = sw.cuts(mid)
            if c is None:
                lo = mid
            else:
                cuts, hi = c, sw.bottleneck(c)
        return cuts, hi

    def _fallback(self, req: ReplicaRequest, topo: Topology, exclude: list[int]) -> tuple[list[int], list[int]] | None:
        """Even boundaries on best-fit GPUs: whatever the baselines can place, this placer can too."""
        got = _greedy_fit(req, topo, exclude, "best", None)
        return None if got is None else (got[1], got[0][1:])


# --- baselines ----------------------------------------------------------------------------------------
def even_boundaries(req: ReplicaRequest, k: int) -> list[int]:
    """k contiguous stages of about equal memory (what a placement-unaware partitioner gives)."""
    memp, n = req.mem_prefix, req.n
    bounds = [0]
    for s in range(1, k):
        j = bisect_right(memp, req.total_mem * s / k)
        if j > 0 and abs(memp[j - 1] - req.total_mem * s / k) <= abs(memp[min(j, n)] - req.total_mem * s / k):
            j -= 1
        bounds.append(max(bounds[-1] + 1, min(j, n - (k - s))))
    bounds.append(n)
    return bounds


def _greedy_fit(req: ReplicaRequest, topo: Topology, exclude: Sequence[int], how: str,
                rng: np.random.Generator | None) -> tuple[list[int], list[int]] | None:
    free = topo.free
    for k in range(req.stages, req.max_stages + 1):
        bounds = even_boundaries(req, k)
        used = np.zeros(len(topo), dtype=bool)
        if len(exclude):
            used[list(exclude)] = True
        chain = []
        for a, b in zip(bounds, bounds[1:]):
            ok = np.flatnonzero((free >= req.stage_bytes(a, b)) & ~used)
            if not len(ok):
                break
            if how == "first":
                i = int(ok[0])
            elif how == "best":
                i = int(ok[np.argmin(free[ok])])
            else:
                i = int(rng.choice(ok))
            used[i] = True
            chain.append(i)
        else:
            return bounds, chain
    return None


class _FitPlacer:
    """Even boundaries, then each stage on a GPU picked by a simple rule; tries more stages if needed."""

    how = ""
    name = ""

    def __init__(self, cost: CostModel | None = None, mix: WorkloadMix | None = None, seed: int = 0):
        self.cost = cost or CostModel()
        self.mix = mix
        self.rng = np.random.default_rng(seed)

    def place(self, req: ReplicaRequest, topo: Topology, exclude: Iterable[int | str] = ()) -> Placement:
        got = _greedy_fit(req, topo, [topo.gpu_index(g) for g in exclude], self.how, self.rng)
        if got is None:
            raise PlacementError(f"{self.name}: no placement of {req.model or 'the model'} "
                                 f"in {req.stages}..{req.max_stages} even stages")
        return evaluate(req, topo, got[0], got[1], self.cost, self.mix or req.mix(), self.name)


class FirstFitPlacer(_FitPlacer):
    """Each stage on the first GPU (in cluster order) with room."""

    how, name = "first", "first-fit"


class BestFitPlacer(_FitPlacer):
    """Each stage on the GPU whose free memory exceeds the stage's need the least."""

    how, name = "best", "best-fit"


class RandomPlacer(_FitPlacer):
    """Each stage on a random GPU with room (seeded)."""

    how, name = "random", "random"


PLACERS = {"flexpipe": FlexPlacer, "first-fit": FirstFitPlacer, "best-fit": BestFitPlacer,
           "random": RandomPlacer, "topology-blind": lambda **kw: FlexPlacer(topology_aware=False, **kw)}


def make_placer(name: str, **kw: Any) -> Any:
    """A placer by name: flexpipe, first-fit, best-fit, random, topology-blind."""
    try:
        return PLACERS[name](**kw)
    except KeyError:
        raise PlacementError(f"unknown placer {name!r}; known: {', '.join(PLACERS)}") from None

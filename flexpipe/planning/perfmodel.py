"""What the granularity policy needs to know about speed: stage time, hop time, KV room per stage count.

`PerfModel` is the interface; `AnalyticPerfModel` is a roofline over per-unit costs that needs nothing
but `unit_costs(cfg)` and a GPU's datasheet figures.  The simulator passes its own, richer model
(flexpipe/sim/perf.py) through a small adapter that implements the same three methods.

Units: seconds, tokens, bytes.  One stage runs on one GPU (stages of a replica never share a GPU), and
a stage count S means the model's units cut into S contiguous, balanced ranges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from flexpipe.errors import ConfigError

GB = 1e9


@runtime_checkable
class PerfModel(Protocol):
    """Per-stage compute and transfer times of a replica cut into `stages` stages.

    The policy calls each method a few hundred times per decision, so an implementation should cost
    microseconds per call (precompute per stage count, memoise).  To adapt flexpipe/sim/perf.py:
    `stage_time_s` is the slowest stage's `stage_time(...)` for a micro-batch of `tokens` new tokens
    whose sequences attend over `kv_tokens` cached tokens in total; `transfer_time_s` is one
    `hop_time(...)`; `max_kv_tokens` is the KV room of the tightest stage.
    """

    @property
    def num_units(self) -> int:
        """Units of the model: the largest stage count there can be."""
        ...

    def stage_time_s(self, stages: int, tokens: int, kv_tokens: float = 0.0) -> float:
        """Seconds the slowest of `stages` stages takes for one micro-batch of `tokens` new tokens."""
        ...

    def transfer_time_s(self, stages: int, tokens: int) -> float:
        """Seconds to hand one micro-batch of `tokens` tokens to the next stage (0 when stages == 1)."""
        ...

    def max_kv_tokens(self, stages: int) -> int:
        """Tokens of KV cache one replica can hold with `stages` stages; 0 when the weights do not fit."""
        ...


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """A GPU's datasheet figures and achieved fractions (same field names as sim.perf.GPUSpec)."""

    name: str
    peak_flops: float  # dense 16-bit FLOP/s
    mem_bw: float  # bytes/s
    mem_bytes: float
    compute_eff: float = 0.55  # achieved / peak on large GEMMs
    mem_eff: float = 0.75  # achieved / peak when streaming weights
    unit_overhead_s: float = 15e-6  # per unit per micro-batch: kernel launches

    @staticmethod
    def preset(name: str) -> "GpuSpec":
        """A known GPU by name: A100-40, A100-80, H100, A10."""
        try:
            return _GPUS[name]
        except KeyError:
            raise ConfigError(f"unknown GPU {name!r}; known: {', '.join(_GPUS)}") from None


# Datasheet peaks; the efficiency factors are the same assumptions as flexpipe/sim/perf.py's table.
_GPUS = {
    "A100-40": GpuSpec("A100-40", 312e12, 1555 * GB, 40 * GB),
    "A100-80": GpuSpec("A100-80", 312e12, 2039 * GB, 80 * GB),
    "H100": GpuSpec("H100", 989e12, 3350 * GB, 80 * GB, 0.50, 0.75, 10e-6),
    "A10": GpuSpec("A10", 125e12, 600 * GB, 24 * GB),
}


@dataclass(frozen=True, slots=True)
class LinkSpec:
    """The link between consecutive stages (same field names as sim.perf.LinkSpec)."""

    name: str
    bandwidth: float  # bytes/s
    latency: float  # s
    overhead: float  # s per hop: serialisation, RPC


# 100 Gbps as in the paper's testbed; ~2 ms per hop from its OPT-66B figures (6.3 ms over 3 hops,
# 65.1 ms over 31 hops).
NET_100G = LinkSpec("net", 12.5 * GB, 10e-6, 2.0e-3)


class AnalyticPerfModel:
    """Roofline stage times over balanced contiguous cuts of a unit list.

    `units` is any sequence of objects with `param_bytes`, `flops_per_token`, `kv_bytes_per_token` and
    `act_bytes_per_token` (FP-1's `UnitCost`).  A stage's time for `tokens` new tokens attending over
    `kv_tokens` cached ones is `max(flops / (peak * compute_eff), bytes / (bw * mem_eff)) + units *
    unit_overhead`, where flops include attention over the context (4 * hidden per attention unit,
    hidden read from the unit's residual-stream bytes) and bytes are the stage's weights plus the KV it
    reads.  For each stage count the cut minimises the slowest stage at `ref_tokens` tokens (exact DP),
    computed once at construction: O(N^2) numpy work per stage count, ~10 ms for 66 units.
    """

    def __init__(self, units: Sequence[Any], gpu: Any = None, link: Any = NET_100G, *,
                 dtype_bytes: int = 2, kv_mem_fraction: float = 0.9, ref_tokens: int = 256):
        if not units:
            raise ConfigError("a performance model needs at least one unit")
        if not 0.0 < kv_mem_fraction <= 1.0:
            raise ConfigError(f"kv_mem_fraction must be in (0, 1], got {kv_mem_fraction}")
        self.gpu = gpu if gpu is not None else _GPUS["A100-80"]
        self.link = link
        self.kv_mem_fraction = kv_mem_fraction
        g = self.gpu
        flops_rate = g.peak_flops * g.compute_eff
        byte_rate = g.mem_bw * g.mem_eff
        p = np.array([float(u.param_bytes) for u in units])
        f = np.array([float(u.flops_per_token) for u in units])
        kv = np.array([float(u.kv_bytes_per_token) for u in units])
        act = np.array([float(u.act_bytes_per_token) for u in units])
        attn = np.where(kv > 0, 4.0 * act / dtype_bytes, 0.0)  # FLOPs per (token, context token)
        self._n = len(units)
        # per-unit coefficients, already divided by the device rates
        self._cf, self._ca = f / flops_rate, attn / flops_rate
        self._mp, self._mk = p / byte_rate, kv / byte_rate
        self._p, self._kv, self._act = p, kv, act
        w = self._mp + self._cf * ref_tokens + g.unit_overhead_s
        self._cuts = _balanced_cuts(w, self._n)
        self._stages: dict[int, tuple] = {}

    @property
    def num_units(self) -> int:
        return self._n

    def boundaries(self, stages: int) -> list[int]:
        """Cut points [0, ..., num_units] of the balanced partition into `stages` stages."""
        self._check(stages)
        return list(self._cuts[stages])

    def _check(self, stages: int) -> None:
        if not 1 <= stages <= self._n:
            raise ConfigError(f"stage count {stages} outside 1..{self._n} (one unit per stage at most)")

    def _agg(self, stages: int) -> tuple:
        hit = self._stages.get(stages)
        if hit is not None:
            return hit
        self._check(stages)
        b = self._cuts[stages]
        idx = np.array(b[:-1])

        def per_stage(a: np.ndarray) -> np.ndarray:
            return np.add.reduceat(a, idx)

        units = np.diff(np.array(b)).astype(float)
        cf, ca, mp, mk = per_stage(self._cf), per_stage(self._ca), per_stage(self._mp), per_stage(self._mk)
        ov = units * self.gpu.unit_overhead_s
        # each stage's time is the max of two planes in (tokens, kv_tokens): compute and memory; keep
        # only the planes not dominated coefficient-wise, usually a handful, so a call is a short loop
        planes = [(float(o), float(c), float(a)) for o, c, a in zip(ov, cf, ca)]
        planes += [(float(o + p), float(k), float(k)) for o, p, k in zip(ov, mp, mk)]
        planes = sorted(set(planes), reverse=True)
        hull = [q for i, q in enumerate(planes)
                if not any(r[0] >= q[0] and r[1] >= q[1] and r[2] >= q[2] for r in planes[:i])]
        cut_act = float(self._act[np.array(b[1:-1]) - 1].max()) if stages > 1 else 0.0
        free = self.gpu.mem_bytes * self.kv_mem_fraction - per_stage(self._p)
        kvb = per_stage(self._kv)
        if np.any(free <= 0):
            kv_room = 0
        else:
            with np.errstate(divide="ignore"):
                room = np.where(kvb > 0, free / np.where(kvb > 0, kvb, 1.0), np.inf)
            kv_room = int(min(room.min(), 2**62))
        hit = (tuple(hull), cut_act, kv_room)
        self._stages[stages] = hit
        return hit

    def stage_time_s(self, stages: int, tokens: int, kv_tokens: float = 0.0) -> float:
        """Seconds of the slowest stage for `tokens` new tokens attending over `kv_tokens` cached tokens."""
        return max(c + a * tokens + b * kv_tokens for c, a, b in self._agg(stages)[0])

    def transfer_time_s(self, stages: int, tokens: int) -> float:
        """Seconds for one hop of the residual stream of `tokens` tokens."""
        cut_act = self._agg(stages)[1]
        if stages == 1:
            return 0.0
        l = self.link
        return l.latency + l.overhead + tokens * cut_act / l.bandwidth

    def max_kv_tokens(self, stages: int) -> int:
        """KV tokens the tightest stage can hold next to its weights (0: the weights do not fit)."""
        return self._agg(stages)[2]


def _balanced_cuts(w: np.ndarray, n: int) -> dict[int, tuple[int, ...]]:
    """For every S in 1..n, cut points minimising the heaviest contiguous part of `w` (exact DP)."""
    pre = np.concatenate([[0.0], np.cumsum(w)])
    seg = pre[None, :] - pre[:, None]  # seg[i, j] = sum of w[i:j]
    seg[np.tril_indices(n + 1)] = np.inf  # i >= j: empty or reversed
    best = seg[0].copy()  # best[j]: units [0, j) in one stage
    args: list[np.ndarray] = []
    for _ in range(2, n + 1):
        cand = np.maximum(best[:, None], seg)  # split at i: best of [0, i) with k-1 stages, then [i, j)
        arg = np.argmin(cand, axis=0)
        best = cand[arg, np.arange(n + 1)]
        args.append(arg)
    cuts: dict[int, tuple[int, ...]] = {1: (0, n)}
    for s in range(2, n + 1):
        b = [n]
        for k in range(s, 1, -1):
            b.append(int(args[k - 2][b[-1]]))
        b.append(0)
        cuts[s] = tuple(reversed(b))
    return cuts

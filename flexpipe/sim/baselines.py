"""Baseline policies, each a simplified re-implementation of a published system's serving policy.

Every baseline runs on the same engine, cluster (with the same background occupancy), performance
model and trace as FlexPipe; what differs is only how it places and scales replicas.

static-peak
    Keeps: a fixed pipeline provisioned for the peak load, never changed (the usual production
    default).  Simplifies: the peak is read off the trace itself (1-minute peak rate, an oracle the
    real operator does not have), so it is a generous version of static provisioning.
serverlessllm (ServerlessLLM, OSDI'24)
    Keeps: whole-model replicas (tensor parallel within one server, never across servers), scale out
    on load and scale to zero after a keep-alive, fast checkpoint loading from local SSD with a host
    memory cache.  Simplifies: no live migration for locality, no startup-time-optimised scheduler;
    checkpoints are assumed staged on every server's SSD.
alpaserve (AlpaServe, OSDI'23)
    Keeps: a static model-parallel (pipeline) placement chosen for the expected load, with replicas
    sharing GPUs so that bursts are absorbed by statistical multiplexing.  Simplifies: the placement
    search (group partition x parallel config by simulation) is replaced by "fewest stages that fit
    the holes, replicas for the mean rate x 1.25"; no re-planning during the run.
muxserve (MuxServe, ICML'24)
    Keeps: static spatial-temporal multiplexing of several LLMs on shared GPUs, replicas intra-server
    tensor parallel, sized for each model's expected (mean) load.  Simplifies: no computation-
    resource (SM) partitioning or adaptive batch scheduling between co-located models; KV room is
    per replica, not a unified pool.
Tetris (tensor sharing among serverless instances) has no fair simplification here: its gain comes
from de-duplicating weights across instances of one function on a server, which this engine does not
model, so it is not included.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import numpy as np

from flexpipe.sim.cluster import Placement
from flexpipe.sim.engine import Simulator
from flexpipe.sim.policy import FlexPipePolicy, LoadShape, capacity, min_stages, typical_hole


def _shape(sim: Simulator, m: int) -> LoadShape:
    sel = sim.model_of == m
    if not sel.any():
        return LoadShape(1000.0, 100.0)
    return LoadShape(float(sim.prompt[sel].mean()), float(sim.out[sel].mean()))


def _rates(sim: Simulator, m: int, window_s: float) -> tuple[float, float]:
    """(mean rate, peak rate over `window_s` windows) of model m in the trace: an oracle."""
    t = sim.arr[sim.model_of == m]
    if len(t) == 0 or sim.duration <= 0:
        return 0.0, 0.0
    counts = np.bincount((t // window_s).astype(int))
    return len(t) / sim.duration, float(counts.max()) / window_s


def _cap(sim: Simulator, m: int, p: Placement) -> float:
    ms = sim.models[m]
    return capacity(sim.pipe_for(m, p), p.kv_tokens, _shape(sim, m), ms.spec.max_seqs, ms.spec.token_budget)


class _Static:
    """Place replicas at t=0 for a target rate and never change them."""

    name = "static"
    mode = "pipeline"
    headroom = 1.0

    def target_rate(self, sim: Simulator, m: int) -> float:
        raise NotImplementedError

    def attach(self, sim: Simulator) -> None:
        hole = typical_hole(sim)
        self.placed: list[int] = []
        for ms in sim.models:
            m = ms.idx
            rate = self.target_rate(sim, m) * self.headroom
            s = min_stages(ms.costs, hole, ms.spec.kv_min_tokens) if self.mode == "pipeline" else 1
            got, cap_sum = 0, 0.0
            while cap_sum < rate or got == 0:
                p = None
                for ss in range(s, min(s + 16, ms.costs.num_units) + 1):
                    p = sim.place(m, ss, mode=self.mode)
                    if p is not None:
                        break
                if p is None:
                    break
                sim.add_replica(m, p, instant=True)
                cap_sum += _cap(sim, m, p)
                got += 1
            self.placed.append(got)

    def on_arrival(self, now: float, m: int, rid: int) -> None:
        pass

    def on_finish(self, now: float, m: int, rid: int) -> None:
        pass

    def tick(self, now: float, sim: Simulator) -> None:
        pass


class StaticPeak(_Static):
    """A fixed pipeline provisioned for the trace's 1-minute peak rate."""

    name = "static-peak"

    def target_rate(self, sim: Simulator, m: int) -> float:
        return _rates(sim, m, 60.0)[1]


class AlpaServe(_Static):
    """Static model-parallel placement for the expected (mean) load x 1.25."""

    name = "alpaserve"
    headroom = 1.25

    def target_rate(self, sim: Simulator, m: int) -> float:
        return _rates(sim, m, 60.0)[0]


class MuxServe(_Static):
    """Static intra-server placement of co-located models for the mean load."""

    name = "muxserve"
    mode = "server-tp"

    def target_rate(self, sim: Simulator, m: int) -> float:
        return _rates(sim, m, 60.0)[0]


class ServerlessLLM:
    """Whole-model replicas on one server, scale on load, keep-alive then scale to zero, SSD loading."""

    name = "serverlessllm"

    def __init__(self, keep_alive_s: float = 60.0, window_s: float = 30.0):
        self.keep_alive_s, self.window_s = keep_alive_s, window_s

    def attach(self, sim: Simulator) -> None:
        self.arrivals = [deque() for _ in sim.models]
        self.last = [-math.inf for _ in sim.models]
        self.cap: list[float | None] = [None for _ in sim.models]
        self.idle_since: dict[int, float] = {}

    def on_arrival(self, now: float, m: int, rid: int) -> None:
        self.arrivals[m].append(now)
        self.last[m] = now

    def on_finish(self, now: float, m: int, rid: int) -> None:
        pass

    def tick(self, now: float, sim: Simulator) -> None:
        for ms in sim.models:
            m = ms.idx
            q = self.arrivals[m]
            while q and q[0] < now - self.window_s:
                q.popleft()
            rate = len(q) / self.window_s
            cur = [r for r in ms.replicas if r.state in ("active", "loading")]
            cap = self.cap[m] or 1.0
            want = math.ceil(rate / cap) if rate > 0 else 0
            if sim.queue_len(m) and sim.queue_wait(m) > 1.0:
                want = max(want, len(cur) + 1)  # requests wait: add a replica (ServerlessLLM scales on queue)
            if want > len(cur):
                for _ in range(want - len(cur)):
                    p = sim.place(m, 1, mode="server-tp")
                    if p is None:
                        break
                    if self.cap[m] is None:
                        self.cap[m] = _cap(sim, m, p)
                    sim.add_replica(m, p, cold_tier="ssd", host_cache=True)
            # keep-alive: a replica idle for keep_alive_s is released (down to zero)
            for r in cur:
                if r.state != "active":
                    continue
                if r.busy:
                    self.idle_since.pop(r.id, None)
                    continue
                t0 = self.idle_since.setdefault(r.id, now)
                if now - t0 >= self.keep_alive_s and len([x for x in cur if x.state == "active"]) > want:
                    sim.retire_replica(r)
                    self.idle_since.pop(r.id, None)


POLICIES = {
    "flexpipe": FlexPipePolicy,
    "static-peak": StaticPeak,
    "serverlessllm": ServerlessLLM,
    "alpaserve": AlpaServe,
    "muxserve": MuxServe,
}


def make_policy(name: str, **kw: Any) -> Any:
    """A fresh policy object by name (one per run: policies keep state)."""
    from flexpipe.errors import ConfigError

    try:
        return POLICIES[name](**kw)
    except KeyError:
        raise ConfigError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}") from None

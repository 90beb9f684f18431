"""Discrete-event core of the simulator.

Time advances by events on a heap.  A replica is a pipeline of stages; it runs *segments*: stretches
of identical iterations (each running sequence advances one token per iteration, chunked prefill
rides along) that end at the next event that changes the batch — a completion, the end of a prefill,
or an admission forced by an arrival (which cuts the segment at its next iteration boundary).  A run
costs O((arrivals + completions) log n) Python steps instead of one step per token.

A policy acts through `add_replica`, `retire_replica` and `reshape_replica`, which charge the costs
of each action: weight loading per tier, KV pre-copy over the links, and the pause of the switch.
Deterministic: no wall clock, no unordered iteration; ties on the heap break by insertion order.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from flexpipe.settings import PRECOPY_DELTA_TOKENS, PRECOPY_MAX_ROUNDS
from flexpipe.sim.cluster import (Cluster, Placement, place_pipeline, place_server_tp)
from flexpipe.sim.perf import INIT_S, LOAD_TIERS, FastPipe, ModelCosts, PipelineSpec
from flexpipe.sim.traces import Trace

SWITCH_OVERHEAD_S = 2e-3  # routing switch + epoch bump at the router: an assumption (paper gives none)
# The runtime's pre-copy rule (runtime/controller.py, `Controller.reshape`; the constants live in the
# torch-free flexpipe/settings.py): copy rounds while the old epoch serves, at most PRECOPY_MAX_ROUNDS
# of them, until at most PRECOPY_DELTA_TOKENS tokens are left to copy; then the quiesce and the delta.
HOST_CACHE_TTL_S = 1800.0  # host-memory parameter cache keeps a model this long after eviction


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A served model and its serving settings in the simulation."""

    name: str
    share: float = 1.0  # share of the trace's requests when the trace has one model column
    max_context: int = 4096
    slo_ttft_s: float = 2.0
    slo_tpot_s: float = 0.1
    kv_want_tokens: int = 32768  # KV a replica asks for when the GPU has room
    kv_min_tokens: int = 4096  # KV a replica needs at least
    max_seqs: int = 256
    # tokens per iteration (decode + prefill chunk), for every policy: the budget measured to hold the
    # SLO on this engine (docs/sim.md, item 5; 2048 collapsed into a queue at 16 req/s), so that no
    # baseline runs at one FlexPipe's planner would never pick (FlexPipePolicy may switch to 512)
    token_budget: int = 256


class Policy(Protocol):
    """What the engine calls; see baselines.py for implementations."""

    name: str

    def attach(self, sim: "Simulator") -> None: ...

    def on_arrival(self, now: float, m: int, rid: int) -> None: ...

    def on_finish(self, now: float, m: int, rid: int) -> None: ...

    def tick(self, now: float, sim: "Simulator") -> None: ...


class Replica:
    """One pipeline serving one model: its placement, its running requests and its clock."""

    __slots__ = ("id", "m", "placement", "pipe", "state", "created", "ready_at", "kv_cap", "kv_used",
                 "dec", "n_dec", "sum_p", "sum_first", "prefill", "prefill_tokens", "iters", "seg_t0",
                 "seg_i0", "seg_k", "seg_dt", "seg_comm", "seg_busy", "seg_chunk", "in_seg", "gen", "cut",
                 "pause_until", "cum_comm", "cum_busy", "token_budget", "max_seqs", "hold", "pending",
                 "switch_due", "tier", "mode", "rver", "room_pushed", "pmemo", "slots")

    def __init__(self, rid: int, m: int, placement: Placement, pipe: FastPipe, now: float, spec: ModelSpec):
        self.id, self.m, self.placement, self.pipe = rid, m, placement, pipe
        self.state = "loading"
        self.created = now
        self.ready_at = now
        self.kv_cap = placement.kv_tokens
        self.kv_used = 0
        self.dec: list[tuple[int, int, int]] = []  # heap of (last-token iteration, request id, first-token iteration)
        self.n_dec = 0
        self.sum_p = 0
        self.sum_first = 0
        self.prefill: deque[list[int]] = deque()  # [request id, prefill tokens left]
        self.prefill_tokens = 0
        self.iters = 0
        self.seg_t0 = self.seg_dt = self.seg_comm = self.seg_busy = 0.0
        self.seg_i0 = self.seg_k = self.seg_chunk = 0
        self.in_seg = False
        self.gen = 0
        self.cut = False
        self.pause_until = 0.0
        self.cum_comm = 0.0
        self.cum_busy = 0.0
        self.token_budget = spec.token_budget
        self.max_seqs = spec.max_seqs
        self.hold: dict[int, float] = {}
        self.pending: _Pending | None = None  # the reshape under way
        self.switch_due = False
        self.tier = ""
        self.mode = "pipeline"
        self.rver = 0  # version of this replica's entry in its model's room heap
        self.room_pushed = -1  # KV room that entry holds
        self.pmemo: dict = {}  # this replica's memo of rounds with prefill on its current pipeline
        self.slots = 0  # stage-GPU slots it reserves (a GPU per stage and TP rank; utilisation's denominator)

    @property
    def stages(self) -> int:
        return self.placement.num_stages

    @property
    def running(self) -> int:
        return self.n_dec + len(self.prefill)

    @property
    def busy(self) -> bool:
        return self.running > 0


@dataclass
class ModelState:
    """Per-model queue and replicas, and the two indexes `Simulator._kick` reads instead of scanning."""

    idx: int
    spec: ModelSpec
    costs: ModelCosts
    queue: deque = field(default_factory=deque)
    replicas: list[Replica] = field(default_factory=list)  # in id order (appended at creation)
    # replicas not inside a segment, or whose segment is cut: the ones a kick stops at
    flagged: dict[int, Replica] = field(default_factory=dict)
    # (-KV room, id, version, replica) of active replicas; an entry is current while its version is
    # the replica's `rver` (older ones are dropped when they reach the top, or by `_compact_rooms`)
    room_heap: list = field(default_factory=list)
    reshapes: int = 0
    scale_ups: int = 0
    scale_downs: int = 0


@dataclass
class Reshape:
    """One reshape: when, of what, from/to stage counts, its preparation, pause and bytes moved.

    `prep_s` (weight load + every KV pre-copy round) is complete once the last round ends; `pause_s`
    and the delta bytes at the switch, when `switched` becomes True (a replica released before its
    switch never pauses).  The pause is what the runtime measures (controller.py): from the quiesce
    (no step launched after it) through the end of the round in flight, the delta copy and the switch."""

    t: float
    model: str
    replica: int
    old_stages: int
    new_stages: int
    prep_s: float
    pause_s: float
    weight_bytes: float
    kv_bytes: float  # KV moved in all: the pre-copy and the delta
    precopy_bytes: float = 0.0  # every pre-copy round together
    delta_bytes: float = 0.0
    precopy_rounds: int = 0
    switched: bool = False
    switch_t: float = math.nan  # when the pause began (the quiesce)


@dataclass
class _Pending:
    """A reshape between its start and its switch."""

    new: Placement
    pipe: FastPipe
    rec: Reshape
    kv_tok: float  # KV bytes per token of the attention units that change GPU
    copied: dict[int, int] | None = None  # request -> KV tokens the pre-copy rounds took (None: not started)
    quiesce_t: float = math.nan  # when the switch fell due: no step launched since (nan: not yet)


_SEG, _READY, _TICK, _SAMPLE, _PRECOPY = 0, 1, 2, 3, 4
_KICK_NONE, _KICK_WAIT, _KICK_BOUNDARY, _KICK_CUT = 0, 1, 2, 3  # what a kick does (see _kick_choice)


class Simulator:
    """One run: a cluster, the models it serves, a trace, and a policy."""

    def __init__(self, cluster: Cluster, models: Sequence[ModelSpec], trace: Trace, policy: Policy, *,
                 tick_s: float = 1.0, sample_s: float = 10.0, queue_timeout_s: float = 120.0,
                 drain_s: float = 600.0, duration_s: float | None = None,
                 progress: Callable[[float], None] | None = None):
        self.cluster = cluster
        self.models = [ModelState(i, s, ModelCosts.for_model(s.name)) for i, s in enumerate(models)]
        self.policy = policy
        self.tick_s, self.sample_s = tick_s, sample_s
        self.queue_timeout_s = queue_timeout_s
        n = len(trace)
        self.n = n
        self.arr = trace.arrivals.astype(np.float64)
        self.model_of = np.minimum(trace.model.astype(np.int64), len(models) - 1)
        mc = np.array([s.max_context for s in models])[self.model_of]
        self.out = np.clip(trace.output.astype(np.int64), 1, mc - 1)
        self.prompt = np.clip(trace.prompt.astype(np.int64), 1, mc - self.out)
        self.duration = float(duration_s if duration_s is not None else (trace.duration if n else 0.0))
        self.horizon = self.duration + drain_s
        self.admit_t = np.full(n, np.nan)
        self.first_t = np.full(n, np.nan)
        self.finish_t = np.full(n, np.nan)
        self.comm_s = np.zeros(n)
        self.comm0 = [0.0] * n  # the replica's communication clock at admission (a list: written per request)
        self.dropped = np.zeros(n, dtype=bool)
        self.stall_s = np.zeros(n)  # pause time seen while running
        # plain-Python copies of the per-request inputs for the hot paths: indexing a list gives a
        # Python number at once, indexing an array builds a numpy scalar (several times slower)
        self._arr_l: list[float] = self.arr.tolist()
        self._model_l: list[int] = self.model_of.tolist()
        self._prompt_l: list[int] = self.prompt.tolist()
        self._out_l: list[int] = self.out.tolist()
        self._need_l: list[int] = (self.prompt + self.out).tolist()  # KV reserved at admission
        self._heap: list[tuple[float, int, int, Any, int]] = []
        self._seq = 0
        self.now = 0.0
        self._next_rep = 0
        self.replicas: dict[int, Replica] = {}
        self.res_eq = 0.0  # GPU-equivalents held (memory held / GPU memory)
        self.res_gpus = 0  # GPUs with any memory held
        self._res_t = 0.0
        self.res_eq_int = 0.0
        self.res_gpus_int = 0.0
        self.res_slots = 0  # stage-GPU slots reserved, summed over replicas (see Replica.slots)
        self.res_slots_int = 0.0
        self.res_eq_peak = 0.0
        self.res_gpus_peak = 0
        self.busy_gpu_s = 0.0
        self.samples: list[tuple[float, float, int, int, int, int]] = []  # t, eq, gpus, queued, running, replicas
        self.stage_samples: list[tuple[float, int, float]] = []  # t, model, mean stages of active replicas
        self.reshapes: list[Reshape] = []
        self.events: list[tuple[float, str, str]] = []  # (t, model, what) scale/retire/reshape log
        self.host_cache: dict[tuple[int, int], float] = {}  # (server, model) -> time params were left
        self._pipes: dict[PipelineSpec, FastPipe] = {}
        self.progress = progress
        self.finished = 0
        self.n_dropped = 0
        self.warmup_s = 0.0  # report.summarise measures only arrivals after this

    # ------------------------------------------------------------------------------------------
    # event plumbing
    def _push(self, t: float, kind: int, obj: Any = None, gen: int = 0) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, obj, gen))

    def run(self) -> "Simulator":
        """Run to the end of the trace plus the drain time; returns self (see report.summarise)."""
        self.policy.attach(self)
        self._push(0.0, _TICK)
        self._push(0.0, _SAMPLE)
        i, n, arr = 0, self.n, self._arr_l
        model_l, models, policy = self._model_l, self.models, self.policy
        heap = self._heap
        heappop = heapq.heappop
        inf = math.inf
        next_prog = 0.0
        while True:
            t_arr = arr[i] if i < n else inf
            t_ev = heap[0][0] if heap else inf
            if t_arr <= t_ev:
                if t_arr == inf:
                    break
                # an arrival: queue it, tell the policy, make a replica reach a boundary to admit it
                self.now = t_arr
                m = model_l[i]
                models[m].queue.append(i)
                policy.on_arrival(t_arr, m, i)
                self._kick(m)
                i += 1
                continue
            t, _, kind, obj, gen = heappop(heap)
            if t > self.horizon:
                break
            self.now = t
            if kind == _SEG:
                if obj.gen == gen and obj.state != "released":
                    self._seg_end(obj)
            elif kind == _TICK:
                self._tick()
                if i < n or t < self.duration or self._work_left() or self.res_eq > 0:
                    self._push(t + self.tick_s, _TICK)
            elif kind == _SAMPLE:
                self._sample()
                if self.progress is not None and t >= next_prog:
                    self.progress(t)
                    next_prog = t + 60.0
                if i < n or t < self.duration or self._work_left() or self.res_eq > 0:
                    self._push(t + self.sample_s, _SAMPLE)
            elif kind == _READY:
                if obj.state == "loading":
                    obj.state = "active"
                    self._push_room(obj)
                    self._kick(obj.m)
            elif kind == _PRECOPY:
                if obj.pending is not None and obj.state in ("active", "draining"):
                    self._precopy(obj)
        self.now = max(self.now, self.duration)
        self._account_res()
        # whatever did not finish by the horizon is counted as dropped
        left = np.isnan(self.finish_t) & ~self.dropped
        self.dropped |= left
        self.n_dropped = int(self.dropped.sum())
        return self

    def _work_left(self) -> bool:
        return any(ms.queue for ms in self.models) or any(r.busy for r in self.replicas.values())

    # ------------------------------------------------------------------------------------------
    # requests
    def _kick(self, m: int) -> None:
        """Make a replica that can admit the head of the queue reach an iteration boundary."""
        ms = self.models[m]
        if not ms.queue:
            return
        r, act = self._kick_choice(ms, self._need_l[ms.queue[0]])
        if act == _KICK_BOUNDARY:
            self._boundary(r)
        elif act == _KICK_CUT:
            self._cut(r)

    @staticmethod
    def _kick_choice(ms: ModelState, need: int) -> tuple[Replica | None, int]:
        """Which replica a kick for a request needing `need` tokens of KV acts on, and how.

        Among the active replicas with room for it (KV and a sequence slot), in id order: the first
        one that is idle gets a boundary now, and a cut one means a boundary is already coming
        (nothing to do); when there is neither, the one with the most KV room (lowest id on ties) is
        cut.  The first part reads `flagged` (idle or cut replicas), the second the room heap, so an
        arrival costs O(flagged + log replicas) instead of a scan of every replica.
        """
        first = None
        for r in ms.flagged.values():
            if r.state != "active" or r.pending is not None and r.switch_due:
                continue
            if r.kv_cap - r.kv_used < need or r.n_dec + len(r.prefill) >= r.max_seqs:
                continue
            if first is None or r.id < first.id:
                first = r
        if first is not None:
            return first, (_KICK_WAIT if first.in_seg else _KICK_BOUNDARY)
        heap = ms.room_heap
        skipped = []
        best = None
        while heap:
            neg, _, ver, r = heap[0]
            if ver != r.rver or r.state != "active":
                heapq.heappop(heap)  # outdated entry
                continue
            if -neg < need:
                break  # the most room any replica has is too little
            if r.pending is not None and r.switch_due or r.n_dec + len(r.prefill) >= r.max_seqs:
                skipped.append(heapq.heappop(heap))  # full or switching: look further, keep it
                continue
            best = r
            break
        for e in skipped:
            heapq.heappush(heap, e)
        return best, (_KICK_CUT if best is not None else _KICK_NONE)

    def _push_room(self, r: Replica) -> None:
        """Record an active replica's KV room in its model's room heap (when it changed)."""
        room = r.kv_cap - r.kv_used
        if room == r.room_pushed:
            return
        r.room_pushed = room
        r.rver += 1
        ms = self.models[r.m]
        heap = ms.room_heap
        heapq.heappush(heap, (-room, r.id, r.rver, r))
        if len(heap) > 4 * len(ms.replicas) + 64:
            self._compact_rooms(ms)

    @staticmethod
    def _compact_rooms(ms: ModelState) -> None:
        """Rebuild a room heap from its current entries only."""
        ms.room_heap = [e for e in ms.room_heap if e[2] == e[3].rver and e[3].state == "active"]
        heapq.heapify(ms.room_heap)

    def _cut(self, r: Replica) -> None:
        """End the running segment at its next iteration boundary."""
        j = math.ceil((self.now - r.seg_t0) / r.seg_dt - 1e-9) if r.seg_dt > 0 else 0
        j = max(1, j)
        if r.seg_k > 0 and j < r.seg_k:
            r.seg_k = j
            r.gen += 1
            self._push(r.seg_t0 + j * r.seg_dt, _SEG, r, r.gen)
        r.cut = True
        self.models[r.m].flagged[r.id] = r

    def _drop_stale(self, ms: ModelState) -> None:
        q = ms.queue
        lim = self.now - self.queue_timeout_s
        arr = self._arr_l
        while q and arr[q[0]] < lim:
            self.dropped[q.popleft()] = True

    def _admit(self, r: Replica) -> None:
        ms = self.models[r.m]
        q = ms.queue
        if not q:
            return
        self._drop_stale(ms)
        need_l, prompt_l = self._need_l, self._prompt_l
        admit_t, comm0 = self.admit_t, self.comm0
        now = self.now
        running = r.n_dec + len(r.prefill)
        max_seqs, kv_cap = r.max_seqs, r.kv_cap
        while q and running < max_seqs:
            rid = q[0]
            need = need_l[rid]
            if r.kv_used + need > kv_cap:
                break
            q.popleft()
            admit_t[rid] = now
            comm0[rid] = r.cum_comm
            r.kv_used += need
            p = prompt_l[rid]
            r.prefill.append([rid, p])
            r.prefill_tokens += p
            running += 1

    def _finish(self, r: Replica, rid: int, t: float) -> None:
        self.finish_t[rid] = t
        self.comm_s[rid] = r.cum_comm - self.comm0[rid]
        r.kv_used -= self._need_l[rid]
        self.finished += 1
        self.policy.on_finish(t, r.m, rid)

    # ------------------------------------------------------------------------------------------
    # segments
    def _seg_end(self, r: Replica) -> None:
        k, t0, i0, dt = r.seg_k, r.seg_t0, r.seg_i0, r.seg_dt
        r.in_seg = False
        r.cut = False
        if k > 0:
            iters = r.iters = i0 + k
            r.cum_comm += k * r.seg_comm
            r.cum_busy += k * r.seg_busy
            self.busy_gpu_s += k * r.seg_busy
            if r.seg_chunk > 0:
                self._prefill_progress(r, k)
            dec = r.dec
            if dec and dec[0][0] <= iters:
                # completions (what _finish does, inlined: this runs once per request)
                prompt_l, need_l, comm0 = self._prompt_l, self._need_l, self.comm0
                finish_t, comm_s = self.finish_t, self.comm_s
                on_finish, m = self.policy.on_finish, r.m
                heappop = heapq.heappop
                while dec and dec[0][0] <= iters:
                    target, rid, first_it = heappop(dec)
                    r.n_dec -= 1
                    r.sum_p -= prompt_l[rid]
                    r.sum_first -= first_it
                    t = t0 + (target - i0) * dt
                    finish_t[rid] = t
                    comm_s[rid] = r.cum_comm - comm0[rid]
                    r.kv_used -= need_l[rid]
                    self.finished += 1
                    on_finish(t, m, rid)
        self._boundary(r)

    def _prefill_progress(self, r: Replica, k: int) -> None:
        chunk, t0, i0, dt = r.seg_chunk, r.seg_t0, r.seg_i0, r.seg_dt
        done = k * chunk
        cum = 0
        pre, dec = r.prefill, r.dec
        out_l, prompt_l, first_t = self._out_l, self._prompt_l, self.first_t
        while pre and done > 0:
            ent = pre[0]
            left = ent[1]
            if left <= done - cum:
                cum += left
                r.prefill_tokens -= left
                pre.popleft()
                rid = ent[0]
                idx = max(1, math.ceil(cum / chunk))
                it = i0 + idx
                ft = t0 + idx * dt
                first_t[rid] = ft
                o = out_l[rid]
                if o <= 1:
                    self._finish(r, rid, ft)
                else:
                    # (iteration of the last token, request, iteration of the first token)
                    heapq.heappush(dec, (it + o - 1, rid, it))
                    r.n_dec += 1
                    r.sum_p += prompt_l[rid]
                    r.sum_first += it
            else:
                part = done - cum
                ent[1] = left - part
                r.prefill_tokens -= part
                break

    def _boundary(self, r: Replica) -> None:
        """At an iteration boundary: switch or release if due, admit, start the next segment."""
        now = self.now
        if r.switch_due and r.pending is not None:
            self._apply_switch(r)
        state = r.state
        if state == "draining" and not (r.n_dec or r.prefill):
            self._release(r)
            return
        if state == "active":
            if self.models[r.m].queue:
                self._admit(r)
            if r.kv_cap - r.kv_used != r.room_pushed:
                self._push_room(r)
        if now < r.pause_until:
            r.in_seg = True
            r.seg_k = 0
            r.seg_chunk = 0
            r.seg_t0 = now
            r.seg_dt = 0.0
            r.gen += 1
            self.models[r.m].flagged.pop(r.id, None)
            self._push(r.pause_until, _SEG, r, r.gen)
            return
        n_dec = r.n_dec
        pre = r.prefill
        if not pre and n_dec == 0:
            self.models[r.m].flagged[r.id] = r
            return  # idle
        iters = r.iters
        ctx = r.sum_p + n_dec * iters - r.sum_first
        dec = r.dec
        if pre:
            tb = r.token_budget
            chunk = min(max(tb - n_dec, tb // 4, 16), r.prefill_tokens)
            head = pre[0]
            k = math.ceil(head[1] / chunk)
            if dec:
                k = min(k, max(1, dec[0][0] - iters))
            pseqs, acc = 0, 0
            for ent in pre:
                pseqs += 1
                acc += ent[1]
                if acc >= chunk or pseqs >= 32:
                    break
            dt, comm, busy = r.pipe.round(n_dec, ctx + n_dec * k * 0.5, chunk,
                                          self._prompt_l[head[0]] * 0.5, pseqs, r.pmemo)
        else:
            chunk = 0
            k = max(1, dec[0][0] - iters)
            dt, comm, busy = r.pipe.round(n_dec, ctx + n_dec * k * 0.5)
        r.seg_t0, r.seg_i0, r.seg_k, r.seg_dt = now, iters, k, dt
        r.seg_comm, r.seg_busy, r.seg_chunk = comm, busy, chunk
        r.in_seg = True
        r.cut = False
        self.models[r.m].flagged.pop(r.id, None)
        r.gen = gen = r.gen + 1
        self._seq += 1
        heapq.heappush(self._heap, (now + k * dt, self._seq, _SEG, r, gen))

    # ------------------------------------------------------------------------------------------
    # reservation accounting
    def _account_res(self) -> None:
        dt = self.now - self._res_t
        if dt > 0:
            self.res_eq_int += self.res_eq * dt
            self.res_gpus_int += self.res_gpus * dt
            self.res_slots_int += self.res_slots * dt
            self._res_t = self.now

    def _set_hold(self, r: Replica, hold: dict[int, float], slots: int) -> None:
        self._account_res()
        self.res_slots += slots - r.slots
        r.slots = slots
        gpus = self.cluster.gpus
        for g in sorted(set(r.hold) | set(hold)):
            d = hold.get(g, 0.0) - r.hold.get(g, 0.0)
            if d == 0:
                continue
            before = gpus[g].used > 0
            gpus[g].used = max(0.0, gpus[g].used + d)
            if gpus[g].used < 1.0:
                gpus[g].used = 0.0
            after = gpus[g].used > 0
            self.res_gpus += int(after) - int(before)
            self.res_eq += d / gpus[g].total
        r.hold = {g: b for g, b in hold.items() if b > 0}
        self.res_eq = max(self.res_eq, 0.0)
        self.res_eq_peak = max(self.res_eq_peak, self.res_eq)
        self.res_gpus_peak = max(self.res_gpus_peak, self.res_gpus)

    @staticmethod
    def _hold_of(p: Placement) -> dict[int, float]:
        h: dict[int, float] = {}
        for s in p.stages:
            for g in s.gpus:
                h[g] = h.get(g, 0.0) + s.bytes_per_gpu
        return h

    @staticmethod
    def _slots_of(p: Placement) -> int:
        return sum(len(s.gpus) for s in p.stages)

    @staticmethod
    def _union_hold(old: Placement, new: Placement) -> tuple[dict[int, float], int]:
        """(bytes per GPU, stage-GPU slots) held between a reshape's start and its switch.

        The old stages serve until the switch while the new ones load weights and take KV, so a GPU
        holds both: old stage A and new stage B on one GPU need A + B.  Only a new stage with the same
        unit range on the same GPU(s) as an old one is the old stage kept in place (DESIGN.md,
        reconfiguration step 2): it holds the larger of its two sizes.
        """
        h: dict[int, float] = {}
        slots = 0
        kept = {(s.start, s.end, s.gpus): s.bytes_per_gpu for s in old.stages}
        for s in old.stages:
            slots += len(s.gpus)
            for g in s.gpus:
                h[g] = h.get(g, 0.0) + s.bytes_per_gpu
        for s in new.stages:
            have = kept.pop((s.start, s.end, s.gpus), None)
            extra = s.bytes_per_gpu if have is None else max(0.0, s.bytes_per_gpu - have)
            if have is None:
                slots += len(s.gpus)
            for g in s.gpus:
                h[g] = h.get(g, 0.0) + extra
        return h, slots

    # ------------------------------------------------------------------------------------------
    # actions (the policy's interface)
    def pipe_for(self, m: int, p: Placement) -> FastPipe:
        """The performance model of placement `p` of model `m`."""
        ms = self.models[m]
        c = self.cluster
        stages = tuple(ms.costs.stage(s.start, s.end) for s in p.stages)
        gpus = tuple(c.gpus[s.gpus[0]].spec for s in p.stages)
        links = tuple(c.link(a.gpus[-1], b.gpus[0]) for a, b in zip(p.stages, p.stages[1:]))
        tp = len(p.stages[0].gpus)
        spec = PipelineSpec(stages, gpus, links, ms.costs.hidden, tp, c.intra if tp > 1 else None)
        pipe = self._pipes.get(spec)
        if pipe is None:  # one per distinct pipeline: replicas placed on the same GPUs share its memo
            pipe = self._pipes[spec] = FastPipe(spec)
        return pipe

    def place(self, m: int, stages: int, mode: str = "pipeline", credit: dict[int, float] | None = None,
              kv_min: int | None = None, boundaries: Sequence[int] | None = None) -> Placement | None:
        """A placement for a replica of model `m` in the current free memory (nothing reserved)."""
        ms = self.models[m]
        kmin = ms.spec.kv_min_tokens if kv_min is None else kv_min
        if mode == "server-tp":
            return place_server_tp(self.cluster, ms.costs, kmin, ms.spec.kv_want_tokens)
        return place_pipeline(self.cluster, ms.costs, stages, kmin, ms.spec.kv_want_tokens, credit=credit,
                              boundaries=boundaries)

    def _load_time(self, m: int, p: Placement, cold_tier: str, host_cache: bool,
                   present: dict[int, set[int]] | None = None) -> tuple[float, float]:
        """(seconds, bytes) to bring a placement's weights up; stages load in parallel."""
        ms = self.models[m]
        worst, total = 0.0, 0.0
        for s in p.stages:
            have = present.get(s.gpus[0], set()) if present else set()
            units = [u for u in range(s.start, s.end) if u not in have]
            if not units:
                continue
            b = sum(ms.costs.units[u].param_bytes for u in units) / len(s.gpus)
            srv = self.cluster.gpus[s.gpus[0]].server
            cached = host_cache and self.now - self.host_cache.get((srv, m), -1e18) < HOST_CACHE_TTL_S
            bw = LOAD_TIERS["host" if cached else cold_tier]
            t = (0.0 if present and s.gpus[0] in present else INIT_S) + b / bw
            worst = max(worst, t)
            total += b * len(s.gpus)
        return worst, total

    def add_replica(self, m: int, placement: Placement, *, cold_tier: str = "remote", host_cache: bool = True,
                    instant: bool = False, token_budget: int | None = None) -> Replica:
        """Reserve `placement` and start loading a new replica (ready at once when `instant`)."""
        ms = self.models[m]
        r = Replica(self._next_rep, m, placement, self.pipe_for(m, placement), self.now, ms.spec)
        self._next_rep += 1
        if token_budget:
            r.token_budget = token_budget
        r.mode = "server-tp" if len(placement.stages[0].gpus) > 1 else "pipeline"
        self._set_hold(r, self._hold_of(placement), self._slots_of(placement))
        self.replicas[r.id] = r
        ms.replicas.append(r)
        ms.flagged[r.id] = r  # not inside a segment
        ms.scale_ups += 1
        if instant:
            r.state = "active"
            r.ready_at = self.now
            self._push_room(r)
        else:
            t, _ = self._load_time(m, placement, cold_tier, host_cache)
            r.ready_at = self.now + t
            self._push(r.ready_at, _READY, r)
        self.events.append((self.now, ms.spec.name, f"add r{r.id} stages={r.stages}"))
        return r

    def retire_replica(self, r: Replica) -> None:
        """Stop admitting to `r`; it is released when its running requests finish."""
        if r.state in ("released", "draining"):
            return
        ms = self.models[r.m]
        ms.scale_downs += 1
        self.events.append((self.now, ms.spec.name, f"retire r{r.id}"))
        if r.state == "loading" or not r.busy:
            self._release(r)
            return
        r.state = "draining"

    def _release(self, r: Replica) -> None:
        ms = self.models[r.m]
        for g in r.hold:
            self.host_cache[(self.cluster.gpus[g].server, r.m)] = self.now
        self._set_hold(r, {}, 0)
        r.state = "released"
        r.gen += 1
        ms.replicas.remove(r)
        ms.flagged.pop(r.id, None)
        del self.replicas[r.id]
        self._kick(r.m)

    def reshape_replica(self, r: Replica, new: Placement, token_budget: int | None = None) -> bool:
        """Start an in-flight reshape of `r` into placement `new`; old config serves until the switch.

        The protocol (DESIGN.md, reconfiguration): the new stages load their weights while the old
        ones serve; then the KV of every running request is pre-copied up to the position reached
        then, still serving, in rounds as the runtime does (`_precopy`); at the switch a pause
        quiesces, copies the delta (KV written since the last round began, including requests admitted
        meanwhile) and switches.  Both placements hold memory
        until the switch (`_union_hold`); False, and nothing changes, when that union does not fit.
        """
        if r.state != "active" or r.pending is not None or new.kv_tokens < r.kv_used:
            return False
        ms = self.models[r.m]
        old = r.placement
        hold, slots = self._union_hold(old, new)
        gpus = self.cluster.gpus
        if any(b - r.hold.get(g, 0.0) > gpus[g].free + 1.0 for g, b in hold.items()):
            return False
        if new.kv_tokens < r.kv_cap:   # from now on admit only what the new placement can hold: the
            r.kv_cap = new.kv_tokens   # switch keeps every sequence (the runtime moves all their KV)
            self._push_room(r)
        # units already on each GPU: kept in place, no load needed
        present: dict[int, set[int]] = {}
        for s in old.stages:
            for g in s.gpus:
                present.setdefault(g, set()).update(range(s.start, s.end))
        prep, wbytes = self._load_time(r.m, new, "remote", True, present)
        # peer copy over the links is an alternative to the host tier for units the old pipe holds
        owner = {u: s.gpus[0] for s in old.stages for u in range(s.start, s.end)}
        peer = 0.0
        for s in new.stages:
            have = present.get(s.gpus[0], set())
            miss = [u for u in range(s.start, s.end) if u not in have]
            if miss:
                b = sum(ms.costs.units[u].param_bytes for u in miss)
                link = self.cluster.link(owner[miss[0]], s.gpus[0])
                peer = max(peer, (0.0 if s.gpus[0] in present else INIT_S) + b / link.bandwidth)
        prep = min(prep, peer) if peer > 0 else prep
        # KV of attention units that change GPU moves: pre-copied while the old epoch serves, the rest
        # at the switch (sized then, from the state then: `_precopy`, `_apply_switch`)
        new_owner = {u: s.gpus[0] for s in new.stages for u in range(s.start, s.end)}
        moved = [u for u in owner if new_owner.get(u) != owner[u]]
        kv_tok = float(sum(ms.costs.units[u].kv_bytes_per_token for u in moved))
        self._set_hold(r, hold, slots)
        rec = Reshape(self.now, ms.spec.name, r.id, old.num_stages, new.num_stages, prep, 0.0, wbytes, 0.0)
        r.pending = _Pending(new, self.pipe_for(r.m, new), rec, kv_tok)
        if token_budget:
            r.token_budget = token_budget
        self.reshapes.append(rec)
        ms.reshapes += 1
        self.events.append((self.now, ms.spec.name, f"reshape r{r.id} {old.num_stages}->{new.num_stages}"))
        if prep > 0:
            self._push(self.now + prep, _PRECOPY, r)
        else:
            self._precopy(r)
        return True

    def _kv_held(self, r: Replica) -> dict[int, int]:
        """KV tokens each running request of `r` has written by now (a running segment included)."""
        it = r.iters
        if r.in_seg and r.seg_dt > 0 and r.seg_k > 0:
            it = r.seg_i0 + min(r.seg_k, int((self.now - r.seg_t0) / r.seg_dt + 1e-9))
        prompt_l = self._prompt_l
        held = {rid: prompt_l[rid] + max(0, it - first) for _, rid, first in r.dec}
        for rid, left in r.prefill:
            held[rid] = prompt_l[rid] - left
        return held

    def _precopy(self, r: Replica) -> None:
        """A pre-copy step: the new stages are loaded (first call) or a copy round has just ended.

        As the runtime does (controller.py): a round copies what each running request wrote beyond
        what earlier rounds took ([copied, held): all of it for a request admitted since), while the
        old epoch keeps serving; when it ends, the tokens written meanwhile are what is left.  Another
        round follows while more than PRECOPY_DELTA_TOKENS are left and fewer than PRECOPY_MAX_ROUNDS
        have run; otherwise the switch falls due (the quiesce) and the pause copies the rest.  One round
        alone left the delta of a long pre-copy (every token written while it ran) to the pause.
        """
        pend = r.pending
        assert pend is not None
        rec = pend.rec
        held = self._kv_held(r) if pend.kv_tok > 0 else {}
        if pend.copied is not None:   # a round ended: what was written since it began is left
            copied = pend.copied
            left = sum(tok - copied.get(rid, 0) for rid, tok in held.items() if tok > copied.get(rid, 0))
            if left <= PRECOPY_DELTA_TOKENS or rec.precopy_rounds >= PRECOPY_MAX_ROUNDS:
                self._quiesce(r)
                return
        else:
            pend.copied = {}
        copied = pend.copied
        tokens = 0
        for rid, tok in held.items():
            d = tok - copied.get(rid, 0)
            if d > 0:
                tokens += d
                copied[rid] = tok
        nbytes = pend.kv_tok * tokens
        t = nbytes / self.cluster.inter.bandwidth
        rec.precopy_bytes += nbytes
        rec.prep_s += t
        rec.precopy_rounds += 1
        self._push(self.now + t, _PRECOPY, r)

    def _quiesce(self, r: Replica) -> None:
        """The pre-copy is over: the router launches no more steps; the switch waits for the round in
        flight (the next iteration boundary), then copies the delta and switches (`_apply_switch`)."""
        assert r.pending is not None
        r.switch_due = True
        r.pending.quiesce_t = self.now
        if r.in_seg:
            self._cut(r)
        else:
            self._boundary(r)

    def _apply_switch(self, r: Replica) -> None:
        pend = r.pending
        assert pend is not None and pend.copied is not None
        # the delta: KV written since the last pre-copy round began by the requests running now (whole
        # KV of those admitted since; nothing of those finished since), copied while every request waits
        delta = 0
        if pend.kv_tok > 0:
            copied = pend.copied
            for rid, tok in self._kv_held(r).items():
                delta += max(0, tok - copied.get(rid, 0))
        delta_bytes = pend.kv_tok * delta
        # the quiesce began when the switch fell due and ended here, at the boundary where the round
        # then in flight returned (its tokens counted as served): only the delta copy and the switch
        # are left, during which nothing runs.  (Waiting another round here counted the quiesce twice.)
        t_q = self.now if math.isnan(pend.quiesce_t) else pend.quiesce_t
        rest = SWITCH_OVERHEAD_S + delta_bytes / self.cluster.inter.bandwidth
        pause = (self.now - t_q) + rest
        rec = pend.rec
        rec.pause_s, rec.delta_bytes, rec.switched, rec.switch_t = pause, delta_bytes, True, t_q
        rec.kv_bytes = rec.precopy_bytes + delta_bytes
        r.pending = None
        r.switch_due = False
        new = pend.new
        r.placement, r.pipe = new, pend.pipe
        r.pmemo = {}
        r.kv_cap = new.kv_tokens
        self._set_hold(r, self._hold_of(new), self._slots_of(new))
        r.pause_until = self.now + rest
        # every request in flight sees the pause (as the runtime measures it: from the quiesce)
        for ent in r.dec:
            self.stall_s[ent[1]] += pause
        for ent in r.prefill:
            self.stall_s[ent[0]] += pause

    # ------------------------------------------------------------------------------------------
    # periodic
    def _tick(self) -> None:
        for ms in self.models:
            self._drop_stale(ms)
        self.policy.tick(self.now, self)
        for ms in self.models:
            self._kick(ms.idx)

    def _sample(self) -> None:
        self._account_res()
        queued = sum(len(ms.queue) for ms in self.models)
        running = sum(r.running for r in self.replicas.values())
        self.samples.append((self.now, self.res_eq, self.res_gpus, queued, running, len(self.replicas)))
        for ms in self.models:
            act = [r.stages for r in ms.replicas if r.state == "active"]
            self.stage_samples.append((self.now, ms.idx, float(np.mean(act)) if act else 0.0))

    # ------------------------------------------------------------------------------------------
    # views for policies
    def active(self, m: int) -> list[Replica]:
        return [r for r in self.models[m].replicas if r.state in ("active", "loading")]

    def queue_len(self, m: int) -> int:
        return len(self.models[m].queue)

    def queue_wait(self, m: int) -> float:
        """How long the head of model m's queue has waited."""
        q = self.models[m].queue
        return self.now - self._arr_l[q[0]] if q else 0.0

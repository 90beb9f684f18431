"""Target granularity from load and SLO: stages per replica, token budget, replicas; with hysteresis.

`GranularityPolicy.decide(now, stats, current)` scores every allowed (stage count, token budget) with
the paper's utility, sizes each one's replica count to the demand, and compares the winner with the
running configuration.  It is a plain object: no clock, no I/O, no asyncio, deterministic for a given
sequence of calls, so the live control loop and the simulator (FP-7) drive the same code.

The model of one replica with S stages and token budget B (tokens per micro-batch, S micro-batches in
flight, one per stage), for mean prompt P and output O tokens:
- KV: the S*B*O/(P+O) decoding sequences hold ~P+O/2 tokens each; when that exceeds the replica's KV room
  the effective budget shrinks in proportion (finer stages leave more room per GPU, so batch more).
- round (= TPOT) = max(S*t + (S-1)*x, S*max(t, x)) with t the slowest stage's time and x one hop;
  throughput = S*B_eff / round tokens/s, i.e. S*B_eff / (round*(P+O)) requests/s per replica.
- TTFT (service) = ceil(P90 / B) rounds (prefill chunks of a request go one round apart);
  latency L = TTFT + O * TPOT.

Demand D (requests/s the deployment must serve) is the load -- max(long-window rate, forecast, rate
since an upward change point) plus the queue drained over `queue_drain_s` -- with a burst headroom,
never below `reserve_floor` * the observed peak rate, and held at its maximum over `reclaim_window_s`
so that capacity added for a burst is reclaimed only after the window (the paper's 5-minute windows).
The headroom is square-root staffing: arrivals of a renewal process with rate L and gap CV c count
L*W +- c*sqrt(L*W) in a window W, so capacity L*(1 + headroom) + burst_z * c * sqrt(L / burst_window_s)
absorbs all but the largest fluctuations over `burst_window_s` (by default the analyzer's 60 s window
that L is measured over: shorter ones wait in the queue, longer ones are the rate's own moves, which the
window max follows), capped at L * (1 + headroom_cap).  It
grows like c, not c^2, and shrinks relative to L as L grows (pooling).  The forecast counts only where it
exceeds the rate by more than burst_z standard errors of a short-window rate estimate
(c * sqrt(L / short_window)): at a high CV a Holt forecast swings with every clump of arrivals, and the
window max would otherwise hold the largest swing for the whole reclaim window.

Each candidate g gets R_g = ceil(D * (1 + scale_down_margin) / capacity of one replica) replicas (one
replica's capacity computed with the sizing lengths: the long-window mean lengths averaged over the
reclaim window, tick by tick) and the utility
    U_g = (T_g / T_max)^alpha * (L_min / L_g)^(1 - alpha) * exp(-|v_t - v_g| / sigma)
with T_g the goodput per GPU at demand D (D / (R_g * S): low load prefers few GPUs, high load efficient
shapes), L_g the latency above, v_t = max(cv, cv_knee) the observed burstiness and v_g = cv_knee *
(S / S_ref)^2 the burstiness a stage count suits: the best stage count grows ~ sqrt(CV) past the knee,
from S_ref, the stage count with the best per-GPU capacity / latency bracket (a soft argmax, so that it
moves smoothly; or `base_stages`).  The paper weighs the two ratios with an arithmetic mean; the
geometric mean used here has the same weights and ranks configs independently of D and of the
normalising T_max and L_min, which makes the choice monotone in load (more demand only removes configs).
Feasible: the weights and one request fit, TPOT and service TTFT meet the SLO, and R_g * S <= max_gpus.
When nothing is feasible: the shape with the most capacity within max_gpus among those that meet the
SLO, or else the one that misses it least.

Against the running config:
- Urgent, acted on at once: capacity below the demand of this tick, or a running shape that misses the
  SLO by more than `slo_tolerance` while a feasible shape exists.  The fix is more replicas of the same
  shape unless a reshape is worth it (or needed).
- A reshape needs a utility gain above `reshape_margin` plus the pause it costs amortised over
  `reshape_payback_s`, at every tick for `reshape_persist_s`, and waits `min_dwell_s` after the last
  change.
- Replicas of the running shape: the need (demand / one replica's capacity, the latter computed with
  the sizing lengths) is held at its max over `reclaim_window_s`; the shape keeps
  ceil(max * (1 + scale_down_margin)) replicas, and a new shape is sized the same way.  Scaling up goes
  straight there; scaling down waits `min_dwell_s` and must free at least `scale_down_min_step` of the
  replicas, so steady traffic settles on one count.
- Scale to zero after `scale_to_zero_idle_s` without arrivals (and an empty queue); it overrides the floor,
  and it is the only way below one replica (`min_replicas=0` acts as 1).  From zero, a cold start only
  when a request waits or arrived recently, never for a demand figure alone.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any, NamedTuple

from flexpipe.errors import ConfigError
from flexpipe.planning.analyzer import TrafficStats
from flexpipe.planning.perfmodel import PerfModel

INF = float("inf")


def whole(v: Any) -> bool:
    """An integer (numpy's too), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def finite(v: Any) -> bool:
    """A finite real number (numpy's too), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


class Action(str, Enum):
    """What the control loop should do to move from the current config to the target."""

    KEEP = "keep"
    RESHAPE = "reshape"  # stage count or token budget changes (replicas may change with it)
    SCALE_UP = "scale_up"  # same shape, more replicas (or a cold start from zero)
    SCALE_DOWN = "scale_down"  # same shape, fewer replicas
    SCALE_TO_ZERO = "scale_to_zero"


@dataclass(frozen=True, slots=True, order=True)
class PipelineConfig:
    """A deployment of one model: `replicas` pipelines of `stages` stages, `token_budget` per micro-batch."""

    stages: int
    token_budget: int
    replicas: int

    @property
    def gpus(self) -> int:
        """GPUs held (one per stage)."""
        return self.stages * self.replicas

    @property
    def shape(self) -> tuple[int, int]:
        return (self.stages, self.token_budget)

    def __str__(self) -> str:
        return f"{self.replicas}x{self.stages} stages, budget {self.token_budget}"


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Settings of the granularity policy (times in seconds, rates in requests/s)."""

    slo_ttft_s: float = 2.0
    slo_tpot_s: float = 0.2
    stage_counts: tuple[int, ...] = tuple(range(1, 33))  # capped by the model's unit count
    token_budgets: tuple[int, ...] = (256, 512, 1024, 2048, 4096)
    max_gpus: int = 1024  # GPUs this model may hold in all
    min_replicas: int = 1  # while serving; 0 acts as 1 (scale to zero is the only way below)
    headroom: float = 0.1  # spare capacity at any cv (on top of the burst term)
    headroom_cap: float = 1.0  # most burst headroom (demand <= load * (1 + cap))
    burst_z: float = 2.0  # standard deviations of arrival-count noise the capacity absorbs
    burst_window_s: float = 60.0  # over this window (the analyzer's long window, which the rate averages)
    queue_drain_s: float = 10.0  # a backlog is to be cleared within this time
    alpha: float = 0.5  # utility weight of throughput against latency
    sigma: float = 8.0  # utility width of the burstiness fit (CV units): a tilt, not a veto
    cv_knee: float = 3.0  # CV up to which the coarsest fitting shape suits best
    base_stages: int | None = None  # S_ref of the burstiness fit; None: what the bracket prefers
    sref_temperature: float = 0.05  # softness of that preference (in units of the bracket, 0..1)
    min_gaps_for_cv: int = 20  # fewer gaps: assume cv = 1
    reshape_margin: float = 0.10  # relative utility gain a reshape must bring
    reshape_cost_s: float = 1.0  # pause a stage-count change costs
    reshape_payback_s: float = 300.0  # horizon over which that pause is amortised
    min_dwell_s: float = 60.0  # between non-urgent changes
    reshape_persist_s: float = 30.0  # a non-urgent reshape's gain must hold this long, tick after tick
    scale_down_margin: float = 0.15  # replicas kept: the window's max need * (1 + margin)
    scale_down_min_step: float = 0.1  # a scale-down frees at least this share of the replicas (and 1)
    slo_tolerance: float = 0.1  # the running shape is urgent to leave only past SLO * (1 + this)
    reclaim_window_s: float = 300.0  # demand is held at its max over this window
    reserve_floor: float = 0.3  # always-on capacity as a share of the observed peak rate
    scale_to_zero_idle_s: float | None = 600.0  # None: never scale to zero
    default_prompt_tokens: float = 512.0  # until the analyzer has seen requests
    default_output_tokens: float = 128.0

    def __post_init__(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"PolicyConfig: {msg}")

        # types first: a NaN passed every comparison below (and the policy then only ever kept the
        # shape), a fraction of a stage was taken as a stage count
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None and f.name in ("base_stages", "scale_to_zero_idle_s"):
                continue
            if f.name in ("stage_counts", "token_budgets"):
                if not isinstance(v, (tuple, list)) or not all(whole(x) for x in v):
                    raise bad(f"{f.name} must be a list of whole numbers, got {v!r}")
            elif f.name in ("max_gpus", "min_replicas", "min_gaps_for_cv", "base_stages"):
                if not whole(v):
                    raise bad(f"{f.name} must be a whole number, got {v!r}")
            elif not finite(v):
                raise bad(f"{f.name} must be a finite number, got {v!r}")
        if self.slo_ttft_s <= 0 or self.slo_tpot_s <= 0:
            raise bad("SLO targets must be > 0")
        if not self.stage_counts or min(self.stage_counts) < 1:
            raise bad(f"stage_counts must be non-empty and >= 1, got {self.stage_counts}")
        if not self.token_budgets or min(self.token_budgets) < 1:
            raise bad(f"token_budgets must be non-empty and >= 1, got {self.token_budgets}")
        if self.max_gpus < 1 or self.min_replicas < 0:
            raise bad("max_gpus must be >= 1 and min_replicas >= 0")
        if not 0.0 <= self.alpha <= 1.0 or self.sigma <= 0 or self.cv_knee <= 0 or self.sref_temperature <= 0:
            raise bad("need 0 <= alpha <= 1, sigma > 0, cv_knee > 0, sref_temperature > 0")
        if not 0.0 <= self.reserve_floor <= 1.0:
            raise bad(f"reserve_floor is a share of the peak in [0, 1], got {self.reserve_floor}")
        if min(self.headroom, self.headroom_cap, self.reshape_margin, self.scale_down_margin,
               self.reshape_cost_s, self.min_dwell_s, self.reclaim_window_s, self.slo_tolerance,
               self.reshape_persist_s,
               self.scale_down_min_step) < 0:
            raise bad("margins, headrooms, costs and times must be >= 0")
        if self.queue_drain_s <= 0 or self.reshape_payback_s <= 0 or self.burst_window_s <= 0:
            raise bad("queue_drain_s, reshape_payback_s and burst_window_s must be > 0")
        if self.burst_z < 0:
            raise bad(f"burst_z must be >= 0, got {self.burst_z}")
        if self.scale_to_zero_idle_s is not None and self.scale_to_zero_idle_s <= 0:
            raise bad("scale_to_zero_idle_s must be > 0 or None")


class Candidate(NamedTuple):
    """One (stages, token_budget) scored at the decision's demand (a NamedTuple: 161 per decision).

    `replicas` is what it would run: demand * (1 + scale_down_margin) over one replica's capacity at the
    sizing lengths, capped by max_gpus.
    """

    stages: int
    token_budget: int
    replicas: int
    gpus: int
    batch_tokens: float  # effective tokens per micro-batch after the KV limit
    tpot_s: float  # one round of the pipeline
    ttft_s: float  # service part (prefill rounds), no queueing
    latency_s: float  # ttft + output tokens * tpot
    replica_rps: float  # requests/s one replica serves at the current lengths
    capacity_rps: float  # replicas * one replica's requests/s at the sizing lengths (reclaim-window mean)
    queue_s: float  # Kingman estimate of queueing at this capacity (for the record)
    goodput_per_gpu: float  # T_g
    fit: float  # burstiness fit exp(-|v_t - v_g| / sigma)
    utility: float
    feasible: bool
    why_not: str = ""  # empty when feasible

    @property
    def config(self) -> PipelineConfig:
        return PipelineConfig(self.stages, self.token_budget, self.replicas)


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's answer and why: every input, every candidate, and what held a change back."""

    now: float
    action: Action
    target: PipelineConfig
    current: PipelineConfig
    reason: str
    held_back: str | None = None  # a better config exists but was not chosen, and why
    urgent: bool = False
    load_rps: float = 0.0
    demand_rps: float = 0.0
    capacity_rps: float = 0.0  # what the target serves (requests/s), at the sizing lengths
    winner: Candidate | None = None
    current_score: Candidate | None = None
    candidates: tuple[Candidate, ...] = ()
    inputs: dict[str, Any] = field(default_factory=dict)  # derived inputs: lengths, cv, demand terms
    stats: TrafficStats | None = None  # the analyzer's snapshot the decision was made from

    def to_dict(self, candidates: bool = True) -> dict[str, Any]:
        """JSON-ready record (NaN stays NaN: use allow_nan or a lenient encoder)."""
        d = {"now": self.now, "action": self.action.value, "target": asdict(self.target),
             "current": asdict(self.current), "reason": self.reason, "held_back": self.held_back,
             "urgent": self.urgent, "load_rps": self.load_rps, "demand_rps": self.demand_rps,
             "capacity_rps": self.capacity_rps,
             "winner": self.winner._asdict() if self.winner else None,
             "current_score": self.current_score._asdict() if self.current_score else None,
             "inputs": self.inputs, "stats": self.stats.to_dict() if self.stats else None}
        if candidates:
            d["candidates"] = [c._asdict() for c in self.candidates]
        return d

    def explain(self, top: int = 5) -> str:
        """A few human-readable lines: the action, the reason, and the best candidates."""
        lines = [f"t={self.now:.1f}s {self.action.value}: {self.current} -> {self.target}",
                 f"  {self.reason}" + (f"; held back: {self.held_back}" if self.held_back else ""),
                 f"  load {self.load_rps:.2f} req/s, demand {self.demand_rps:.2f} req/s, "
                 f"cv {self.inputs.get('cv', float('nan')):.2f}"]
        best = sorted(self.candidates, key=_rank, reverse=True)[:top]
        for c in best:
            lines.append(f"  {'*' if c == self.winner else ' '} {c.replicas}x{c.stages}/{c.token_budget}: "
                         f"U={c.utility:.3f} T/gpu={c.goodput_per_gpu:.2f} L={c.latency_s:.2f}s "
                         f"TPOT={c.tpot_s * 1e3:.0f}ms fit={c.fit:.2f} gpus={c.gpus}"
                         + ("" if c.feasible else f" (infeasible: {c.why_not})"))
        return "\n".join(lines)


def _rank(c: Candidate) -> tuple:
    """Order of preference: feasible, utility, then fewer GPUs, fewer stages, smaller budget."""
    return (c.feasible, c.utility, -c.gpus, -c.stages, -c.token_budget)


class _Shape(NamedTuple):
    """Load-independent figures of one (stages, budget) for the current lengths."""

    stages: int
    budget: int
    batch: float
    tpot: float
    ttft: float
    latency: float
    replica_rps: float
    fits: bool
    slo_ok: bool  # meets the SLO
    slo_near: bool  # within slo_tolerance of it (good enough to stay on)
    why_not: str


class GranularityPolicy:
    """Chooses the target PipelineConfig from TrafficStats; keeps the little state hysteresis needs.

    Per decision tick (and when the analyzer flags a change point) call `decide(now, stats, current)`
    with the config that is running, and carry out `decision.target` when the action is not KEEP.
    While that change is in progress, skip decisions (or ignore them); then pass the config that runs.
    An issued change counts as a change for `min_dwell_s`, so one that was abandoned is proposed again
    after the dwell (at once if urgent).  State, O(1) per call: the demand and the running shape's
    need over the reclaim window, the time of the last change, and since when a reshape has paid.
    """

    def __init__(self, config: PolicyConfig, perf: PerfModel):
        self.config = config
        self.perf = perf
        n = perf.num_units
        self.stage_counts = tuple(sorted({s for s in config.stage_counts if s <= n}))
        if not self.stage_counts:
            raise ConfigError(f"no allowed stage count is <= the model's {n} units: {config.stage_counts}")
        self.token_budgets = tuple(sorted(set(config.token_budgets)))
        self._demand: deque[tuple[float, float]] = deque()  # (time, demand): window max
        self._need: deque[tuple[float, float]] = deque()  # (time, replicas the running shape needs)
        self._long: tuple[deque, deque, deque] = (deque(), deque(), deque())  # (time, length) over the window
        self._long_sum = [0.0, 0.0, 0.0]
        self._seen: PipelineConfig | None = None
        self._last_change = -INF
        self._better_since: float | None = None  # since when some shape beats the running one enough
        self._shapes: dict[tuple, _Shape] = {}
        self._srefs: dict[tuple, float] = {}

    def perf_changed(self) -> None:
        """Forget memoised figures: call when the PerfModel's answers changed (e.g. a measured KV room)."""
        self._shapes.clear()
        self._srefs.clear()

    # ---- the decision ------------------------------------------------------------------------
    def decide(self, now: float, stats: TrafficStats, current: PipelineConfig) -> Decision:
        """The target config for `stats` at time `now`, starting from the running `current`."""
        cfg = self.config
        self._observe(now, current)
        prompt, p90, output = self._lengths(stats)
        cv = stats.cv if stats.gaps >= cfg.min_gaps_for_cv and math.isfinite(stats.cv) else 1.0
        rate = max(stats.rate, 0.0)
        # a forecast above the rate by less than the noise of a short-window estimate is that noise
        noise = cfg.burst_z * cv * math.sqrt(rate / max(stats.short_window_s, 1e-9))
        load = max(rate, stats.rate_forecast - noise)
        if stats.last_change_dir > 0 and math.isfinite(stats.rate_since_change):
            load = max(load, stats.rate_since_change)
        load += stats.queue_len / cfg.queue_drain_s
        spare = min(cfg.headroom * load + cfg.burst_z * cv * math.sqrt(load / cfg.burst_window_s),
                    cfg.headroom_cap * load)
        burst = 1.0 + spare / load if load > 0 else 1.0
        floor = cfg.reserve_floor * stats.peak_rate
        demand_now = max(load + spare, floor)
        demand = self._hold(self._demand, now, demand_now)
        idle = (cfg.scale_to_zero_idle_s is not None and stats.idle_s >= cfg.scale_to_zero_idle_s
                and stats.queue_len == 0)
        inputs = {"prompt_tokens": prompt, "prompt_p90": p90, "output_tokens": output, "cv": cv,
                  "rate": stats.rate, "rate_forecast": stats.rate_forecast,
                  "rate_since_change": stats.rate_since_change, "queue_len": stats.queue_len,
                  "burst_factor": burst, "floor_rps": floor, "demand_now_rps": demand_now,
                  "peak_rate": stats.peak_rate, "idle_s": stats.idle_s, "idle_to_zero": idle}

        shapes = {(s, b): self._shape(s, b, prompt, p90, output)
                  for s in self.stage_counts for b in self.token_budgets}
        cur_shape = shapes.get(current.shape) or self._shape(current.stages, current.token_budget,
                                                            prompt, p90, output)
        # Replicas are sized with the mean lengths averaged over the reclaim window (snapped) and the
        # margin the running shape keeps: one replica's capacity moves steeply with the lengths (through
        # the KV room), and sizing on one tick's lengths would chase their noise.  An average, not the
        # window max: the max of noisy means is biased up (by ~40% for a model at 2 req/s with
        # heavy-tailed outputs) and sized every replica for the longest minute of the window.
        long = tuple(_snap(self._average(i, now, v)) for i, v in enumerate((prompt, p90, output)))
        inputs["sizing_lengths"] = long

        def sizing_rps(stages: int, budget: int) -> float:
            return self._shape(stages, budget, *long).replica_rps

        margin = 1.0 + cfg.scale_down_margin
        cands, cur_score, s_ref = self._score(list(shapes.values()), cur_shape, demand, margin, sizing_rps,
                                              load, cv, (prompt, p90, output))
        inputs["s_ref"] = s_ref
        winner = self._winner(cands)

        # replicas the running shape should keep: its need, held at the window max, plus the margin
        limit = max(1, cfg.max_gpus // cur_shape.stages)
        rps = sizing_rps(current.stages, current.token_budget)
        if not self._need and rps > 0:
            # a new shape inherits the held demand, so that it keeps what it was sized for
            self._hold(self._need, now, demand / rps)
        need = self._hold(self._need, now, demand_now / rps if rps > 0 else INF)
        # never below one replica while serving, whatever min_replicas says: scale to zero (idle for
        # scale_to_zero_idle_s) is the only way down to zero
        wanted = max(cfg.min_replicas, 1, _ceil(need * margin)) if need < INF else INF
        keep = min(limit, wanted) if wanted < INF else max(current.replicas, 1)

        def done(action: Action, target: PipelineConfig, reason: str, **kw: Any) -> Decision:
            if action is not Action.KEEP and target != current:
                self._last_change = max(self._last_change, now)
                self._better_since = None
            return Decision(now=now, action=action, target=target, current=current, reason=reason,
                            load_rps=load, demand_rps=demand,
                            capacity_rps=target.replicas * sizing_rps(target.stages, target.token_budget),
                            winner=winner, current_score=cur_score, candidates=cands, inputs=inputs,
                            stats=stats, **kw)

        if idle:
            target = replace(current, replicas=0)
            if current.replicas == 0:
                return done(Action.KEEP, target,
                            f"idle {stats.idle_s:.0f}s >= {cfg.scale_to_zero_idle_s:.0f}s: stay at zero")
            return done(Action.SCALE_TO_ZERO, target,
                        f"no arrivals for {stats.idle_s:.0f}s >= {cfg.scale_to_zero_idle_s:.0f}s")
        if current.replicas == 0:
            # wake for a request, not for a demand figure: only when one waits or arrived recently
            # (within the idle time that leads to zero, or the analyzer's window when that is off)
            arrived = stats.arrivals > 0 or stats.idle_s < stats.elapsed_s  # idle_s counts from the first event
            recent = stats.idle_s < (cfg.scale_to_zero_idle_s or stats.window_s)
            if stats.queue_len == 0 and not (arrived and recent):
                return done(Action.KEEP, current, "nothing running, nothing waiting and no recent arrival: "
                                                  "stay at zero")
            return done(Action.SCALE_UP, winner.config,
                        f"cold start: demand {demand:.2f} req/s with nothing running "
                        f"({stats.queue_len} waiting)", urgent=True)

        cap = current.replicas * rps
        short = cap < demand_now * (1.0 - 1e-9)
        cur_ok = cur_shape.slo_near and wanted * cur_shape.stages <= cfg.max_gpus
        differs = winner.config.shape != current.shape
        gain = (winner.utility / cur_score.utility - 1.0) if cur_score.utility > 0 else INF
        cost = cfg.reshape_cost_s if winner.stages != current.stages else 0.0
        required = cfg.reshape_margin + cost / cfg.reshape_payback_s
        why_gain = f"utility gain {_pct(gain)} vs required {_pct(required)}"

        if short or (not cur_shape.slo_near and winner.feasible):
            what = (f"capacity {cap:.2f} < demand {demand_now:.2f} req/s" if short
                    else f"current shape misses the SLO ({cur_shape.why_not})")
            grown = replace(current, replicas=max(current.replicas, keep))
            grown_cap = grown.replicas * rps
            if winner.feasible:
                go = not cur_ok or gain >= required
            else:  # nothing meets the demand: whichever gives more capacity
                go = winner.capacity_rps > grown_cap
                why_gain = f"most capacity within max_gpus: {winner.capacity_rps:.2f} vs {grown_cap:.2f} req/s"
            if differs and go:
                return done(Action.RESHAPE, winner.config, f"urgent: {what}; reshape ({why_gain})",
                            urgent=True)
            held = f"{winner.config} not worth a reshape: {why_gain}" if differs else None
            act = Action.SCALE_UP if grown.replicas > current.replicas else Action.KEEP
            return done(act, grown, f"urgent: {what}; {keep} replicas of the current shape", urgent=True,
                        held_back=held)

        dwell_left = self._last_change + cfg.min_dwell_s - now
        held = None
        if differs and gain >= required:
            # the gain must hold at every tick for reshape_persist_s, so that a noisy tick cannot reshape
            if self._better_since is None:
                self._better_since = now
            persist_left = self._better_since + cfg.reshape_persist_s - now
            wait = max(dwell_left, persist_left)
            if wait <= 0:
                return done(Action.RESHAPE, winner.config, f"better shape: {why_gain}, held "
                            f"{now - self._better_since:.0f}s")
            held = (f"{winner.config} ({why_gain}) waits {wait:.0f}s of "
                    + ("dwell" if dwell_left >= persist_left else "persistence"))
        else:
            self._better_since = None
            if differs and gain > 0:
                held = f"{winner.config}: {why_gain} (hysteresis)"
        step = max(1, math.ceil(cfg.scale_down_min_step * current.replicas))
        if keep <= current.replicas - step:
            target = replace(current, replicas=keep)
            why = (f"need over {cfg.reclaim_window_s:.0f}s peaks at {need:.2f} replicas "
                   f"(+{cfg.scale_down_margin:.0%}): {keep} of {current.replicas}")
            if dwell_left <= 0:
                return done(Action.SCALE_DOWN, target, why, held_back=held)
            held = (held + "; " if held else "") + f"scale down to {keep} waits {dwell_left:.0f}s of dwell"
        return done(Action.KEEP, current, "current config meets demand and SLO", held_back=held)

    # ---- pieces ------------------------------------------------------------------------------
    def _observe(self, now: float, current: PipelineConfig) -> None:
        """Note a change of the running config (it starts the dwell and the need history)."""
        if current != self._seen:
            if self._seen is not None:
                self._last_change = max(self._last_change, now)
                self._better_since = None
                if current.shape != self._seen.shape:
                    self._need.clear()  # another shape's need says nothing about this one
            self._seen = current

    def _lengths(self, stats: TrafficStats) -> tuple[float, float, float]:
        """Mean prompt, p90 prompt and mean output tokens, snapped to a 2% grid (see _snap)."""
        cfg = self.config
        pt, ot = stats.prompt_tokens, stats.output_tokens
        prompt = pt.mean if pt.n else cfg.default_prompt_tokens
        p90 = pt.p90 if pt.n else prompt
        output = ot.mean if ot.n else cfg.default_output_tokens
        return _snap(prompt), _snap(p90), _snap(output)

    def _hold(self, q: deque[tuple[float, float]], now: float, value: float) -> float:
        """Max of `value` over the reclaim window (monotone deque: O(1) amortised)."""
        while q and q[-1][1] <= value:
            q.pop()
        q.append((now, value))
        start = now - self.config.reclaim_window_s
        while q[0][0] < start:
            q.popleft()
        return q[0][1]

    def _average(self, i: int, now: float, value: float) -> float:
        """Mean of the values passed over the reclaim window (one per decision), O(1) amortised."""
        q = self._long[i]
        q.append((now, value))
        self._long_sum[i] += value
        start = now - self.config.reclaim_window_s
        while len(q) > 1 and q[0][0] < start:
            self._long_sum[i] -= q.popleft()[1]
        return self._long_sum[i] / len(q)

    def _shape(self, stages: int, budget: int, prompt: float, p90: float, output: float) -> _Shape:
        """Figures of one shape; memoised, which is why lengths are snapped to a grid first."""
        key = (stages, budget, prompt, p90, output)
        hit = self._shapes.get(key)
        if hit is None:
            if len(self._shapes) >= 8192:
                self._shapes.clear()
            hit = self._shapes[key] = self._compute_shape(stages, budget, prompt, p90, output)
        return hit

    def _compute_shape(self, stages: int, budget: int, prompt: float, p90: float, output: float) -> _Shape:
        cfg, perf = self.config, self.perf
        per_req = prompt + output
        held = prompt + output / 2.0  # KV a running sequence holds on average
        room = perf.max_kv_tokens(stages)
        fits = room >= per_req
        dec = budget * output / per_req  # decoding sequences per micro-batch
        need = stages * dec * held
        scale = min(1.0, room / need) if need > 0 else 1.0
        batch = max(1.0, budget * scale)
        tokens = max(1, int(batch))
        t = perf.stage_time_s(stages, tokens, dec * scale * held)
        x = perf.transfer_time_s(stages, tokens)
        tpot = max(stages * t + (stages - 1) * x, stages * max(t, x))
        ttft = math.ceil(p90 / budget) * tpot
        rps = stages * batch / tpot / per_req if fits else 0.0
        why = []
        if not fits:
            why.append(f"KV room {room} tokens < one request ({per_req:.0f})")
        if tpot > cfg.slo_tpot_s:
            why.append(f"TPOT {tpot * 1e3:.0f}ms > SLO {cfg.slo_tpot_s * 1e3:.0f}ms")
        if ttft > cfg.slo_ttft_s:
            why.append(f"TTFT {ttft:.2f}s > SLO {cfg.slo_ttft_s:.2f}s")
        tol = 1.0 + cfg.slo_tolerance
        return _Shape(stages, budget, batch, tpot, ttft, ttft + output * tpot, rps, fits,
                      fits and tpot <= cfg.slo_tpot_s and ttft <= cfg.slo_ttft_s,
                      fits and tpot <= cfg.slo_tpot_s * tol and ttft <= cfg.slo_ttft_s * tol, "; ".join(why))

    def _score(self, shapes: list[_Shape], cur: _Shape, demand: float, margin: float, sizing_rps: Any,
               load: float, cv: float, lengths: tuple) -> tuple[tuple[Candidate, ...], Candidate, float]:
        """Candidates for every shape (and the running one), and the S_ref of the burstiness fit."""
        cfg = self.config
        rows = []  # (shape, replicas, capacity, T_g: goodput per GPU at the demand, why not)
        target = demand * margin
        max_gpus, min_r = cfg.max_gpus, max(cfg.min_replicas, 1)
        for sh in shapes + [cur]:
            rps = sizing_rps(sh.stages, sh.budget)
            limit = max(1, max_gpus // sh.stages)
            r = min(max(min_r, _ceil(target / rps)), limit) if rps > 0 else min_r
            why = sh.why_not
            if sh.fits and (r * rps < target * (1.0 - 1e-9) or r * sh.stages > max_gpus):
                why = (why + "; " if why else "") + f"demand needs more than max_gpus={max_gpus}"
            rows.append((sh, r, r * rps, min(max(demand, 1e-9), r * rps) / (r * sh.stages), why))
        # The bracket is the paper's two ratios with weight alpha, combined as a weighted geometric
        # mean: T_g / T_max and L_min / L_g.  With T_g = D / GPUs for every config that meets the
        # demand, the ranking of (shape, replicas) configs then depends on neither D nor the normalising
        # best values, so more demand only removes configs from the feasible set: the winner stays, or
        # is replaced by one with more capacity (see tests: more load never chooses less capacity).
        a = cfg.alpha
        fitting = [row for row in rows[:-1] if row[0].fits] or rows[:-1]
        t_max = max(row[3] for row in fitting) or 1.0
        l_min = min(row[0].latency for row in fitting)
        base = [(t / t_max) ** a * (l_min / sh.latency) ** (1.0 - a) if t > 0 else 0.0
                for sh, _, _, t, _ in rows]
        s_ref = float(cfg.base_stages or 0) or self._s_ref(shapes, lengths)
        v_t = max(cv, cfg.cv_knee)
        out = []
        for (sh, r, cap, t, why), b in zip(rows, base):
            fit = math.exp(-abs(v_t - cfg.cv_knee * (sh.stages / s_ref) ** 2) / cfg.sigma)
            rho = load / cap if cap > 0 else INF
            queue = (rho / (1.0 - rho) * (1.0 + cv * cv) / 2.0 / (cap / r)) if rho < 1.0 else INF
            out.append(Candidate(sh.stages, sh.budget, r, r * sh.stages, sh.batch, sh.tpot, sh.ttft, sh.latency,
                                 sh.replica_rps, cap, queue, t, fit, b * fit, not why, why))
        return tuple(out[:-1]), out[-1], s_ref

    def _s_ref(self, shapes: list[_Shape], key: tuple) -> float:
        """The stage count the bracket prefers at full load, as a soft argmax; memoised per lengths.

        Per-GPU capacity stands in for the goodput so that S_ref does not move with the demand; soft,
        because a hard argmax jumps between near-equal shapes, and the fit, steep in S / S_ref, would
        turn that jump into a flip of the winner.
        """
        hit = self._srefs.get(key)
        if hit is not None:
            return hit
        cfg, a = self.config, self.config.alpha
        ok = [sh for sh in shapes if sh.slo_ok] or [sh for sh in shapes if sh.fits] or shapes
        e_max = max(sh.replica_rps / sh.stages for sh in ok) or 1.0
        l_ok = min(sh.latency for sh in ok)
        logs = [a * math.log(max(sh.replica_rps / sh.stages / e_max, 1e-300))
                + (1.0 - a) * math.log(l_ok / sh.latency) for sh in ok]
        top = max(logs)
        w = [math.exp((x - top) / cfg.sref_temperature) for x in logs]
        s_ref = math.exp(sum(wi * math.log(sh.stages) for wi, sh in zip(w, ok)) / sum(w))
        if len(self._srefs) >= 1024:
            self._srefs.clear()
        self._srefs[key] = s_ref
        return s_ref

    def _winner(self, cands: tuple[Candidate, ...]) -> Candidate:
        """The best feasible candidate; without one, a choice that does not depend on the demand."""
        feasible = [c for c in cands if c.feasible]
        if feasible:
            return max(feasible, key=_rank)
        limit = self.config.max_gpus
        usable = [c for c in cands if c.replica_rps > 0 and c.stages <= limit]
        slo = [c for c in usable if "SLO" not in c.why_not]
        if slo:  # the SLO can be met but not the demand within max_gpus: the most capacity there is
            return max(slo, key=lambda c: ((limit // c.stages) * c.capacity_rps / c.replicas, c.utility, -c.stages))
        # nothing meets the SLO: the shape that misses it least
        cfg = self.config
        return min(usable or cands, key=lambda c: (max(c.tpot_s / cfg.slo_tpot_s, c.ttft_s / cfg.slo_ttft_s),
                                                   -c.utility, c.stages, c.token_budget))


def _ceil(x: float) -> int:
    """ceil that ignores float noise just above an integer."""
    r = round(x)
    return int(r) if abs(x - r) < 1e-9 else math.ceil(x)


_SNAP = math.log(1.02)


def _snap(x: float) -> float:
    """x (>= 1) rounded to a grid of 2% steps: lengths that close give the same (memoised) figures.

    The window means move by a percent or so from tick to tick; 2% is well inside the perf model's own
    error and halves the ticks that recompute every shape (~0.8 ms for 160 candidates).
    """
    return math.exp(_SNAP * round(math.log(max(1.0, x)) / _SNAP))


def _pct(x: float) -> str:
    return "inf" if x == INF else f"{x:+.1%}"


__all__ = ["Action", "Candidate", "Decision", "GranularityPolicy", "PipelineConfig", "PolicyConfig"]

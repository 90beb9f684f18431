"""The live control loop: the runtime reshapes and scales itself from the traffic it sees.

    async with FlexPipe.launch("tiny", stages=1, autoscale=True) as fp:   # or a PolicyConfig / AutoscaleConfig
        ...
        fp.status()["decisions"]     # what it changed and why, newest last

`Autoscaler` listens to the router (arrivals, finishes with TTFT and TPOT, the waiting queue after every
step), feeds FP-6's `TrafficAnalyzer` with those events, and runs `GranularityPolicy.decide` every
`tick_s` and at once when the analyzer flags a change point (or a request arrives while scaled to
zero).  The analyzer and the policy are the same objects the simulator drives; this module only
maps a `Decision` onto what this runtime can do:

- stages x replicas -> one pipeline.  The embedded runtime runs a single pipeline, so a target of
  R replicas of S stages is served by one pipeline of R*S stages (at most `max_stages`).  Both hold
  R*S devices and keep R*S micro-batches in flight, so capacity is about the same; a deeper pipeline
  pays (R*S - 1) more hops per token, which the policy's figures for the R x S config leave out.
  The policy is told the config it chose (not the folded one), so it does not keep "correcting" it.
- token budget -> the scheduler's `max_batch_tokens`, changed between two micro-batches.
- scale to zero -> `Controller.suspend()`: every stage retires, its units go to the host-memory
  weight cache, and the router holds new requests; the next arrival wakes the loop, the policy
  answers "cold start", and `Controller.wake()` starts the pipeline with weights from RAM.  Only
  when the router holds no request at all; otherwise the decision is deferred to a later tick.
- every other change -> `Controller.reshape()` to the solver's balanced cut for the stage count.

While an action runs, the loop's own or another's (a reshape by hand, a recovery), the loop does not
decide (events keep feeding the analyzer); a failed action, whatever the error, is logged with it and
the loop waits `retry_s` before acting again.  A pipeline that a failed restart or recovery left down
(router.down; with no stage, it is not scaled to zero) is not decided for: the loop runs its recovery
again (`Recovery.recover_if_down`: the dead stages replaced, or with no stage the shape it meant to
run started), waiting `retry_s` after a failed try, doubling up to RECOVER_BACKOFF_MAX_S.  Every decision that is
not KEEP goes into the decision log (`status()["decisions"]`): a summary line, the policy's reason
and what held a better config back, load/demand/capacity, what was done and what it cost, and the
policy's own explanation of the best candidates.

Performance model.  The policy needs stage and hop times for *this* machine: unless one is given,
`calibrate()` times the model's own units (a StageCore running prefill chunks of 8 and 64 tokens with
the stages' torch threads, fastest of 9) and fits a fixed cost per unit and a cost per token; `AnalyticPerfModel`
carries those as a CPU "GpuSpec" (FLOP/s = the model's FLOPs per token / seconds per token, memory
plane off because the timing already includes reading the weights), the hop is half the median
round trip of a ZeroMQ ask to stage 0, and the KV room of a replica is one stage's block pool.
What it leaves out: the router's own per-token work (streaming, detokenising), which no stage
count changes; docs/autoscale.md gives the figures and how the test's thresholds follow from them.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

from flexpipe.errors import ActorError, ConfigError, ReshapeError
from flexpipe.planning import (Action, AnalyticPerfModel, Decision, GpuSpec, GranularityPolicy, LinkSpec,
                               PipelineConfig, PolicyConfig, TrafficAnalyzer, TrafficStats)
from flexpipe.planning.policy import finite, whole
from flexpipe.runtime.router import cpu_stage_slots
from flexpipe.runtime.weight_cache import WeightCache

log = logging.getLogger("flexpipe.autoscale")

TARGET_DECISION_MS = 5.0  # the paper's decision latency
RECOVER_BACKOFF_MAX_S = 60.0  # longest wait between two tries to recover a pipeline that is down


@dataclass
class AutoscaleConfig:
    """Settings of the live control loop (times in seconds)."""

    policy: PolicyConfig | None = None  # None: default_policy() for this runtime
    tick_s: float = 1.0  # decide at least this often
    analyzer: dict[str, Any] = field(default_factory=dict)  # TrafficAnalyzer keyword arguments
    perf: Any = None  # a PerfModel; None: calibrate() on this machine when the loop starts
    max_stages: int | None = None  # pipeline stages at most; None: CPU cores (stages on the CPU), else 1
    weight_cache_bytes: int = 2 << 30  # host-memory cache of retired stages' parameters
    retry_s: float = 5.0  # after a failed action, wait this long before acting again
    log_size: int = 64  # decisions kept in the log
    close_timeout_s: float = 120.0  # closing waits this long for an action in progress
    act: bool = True  # False: decide and log as if each decision were carried out, change nothing

    def __post_init__(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"AutoscaleConfig: {msg}")

        # (a NaN tick passed `tick_s <= 0` and put a NaN deadline on the loop: the control loop never ran)
        if not (finite(self.tick_s) and self.tick_s > 0):
            raise bad(f"tick_s must be a finite number of seconds > 0, got {self.tick_s!r}")
        for name in ("retry_s", "close_timeout_s"):
            v = getattr(self, name)
            if not (finite(v) and v >= 0):
                raise bad(f"{name} must be a finite number of seconds >= 0, got {v!r}")
        if not (whole(self.weight_cache_bytes) and self.weight_cache_bytes >= 0):
            raise bad(f"weight_cache_bytes must be a whole number >= 0, got {self.weight_cache_bytes!r}")
        if not (whole(self.log_size) and self.log_size >= 1):
            raise bad(f"log_size must be a whole number >= 1, got {self.log_size!r}")
        if self.max_stages is not None and not (whole(self.max_stages) and self.max_stages >= 1):
            raise bad(f"max_stages must be a whole number >= 1 or None, got {self.max_stages!r}")
        if self.policy is not None and not isinstance(self.policy, PolicyConfig):
            raise bad(f"policy must be a PolicyConfig or None, not {type(self.policy).__name__}")
        if not isinstance(self.analyzer, dict):
            raise bad(f"analyzer must be a dict of TrafficAnalyzer keyword arguments, not {type(self.analyzer).__name__}")
        known = set(inspect.signature(TrafficAnalyzer).parameters)
        unknown = sorted(set(self.analyzer) - known)
        if unknown:
            raise bad(f"analyzer has unknown keyword(s) {unknown}; TrafficAnalyzer takes {sorted(known)}")

    @classmethod
    def of(cls, value: Any) -> "AutoscaleConfig | None":
        """From launch(autoscale=...): None/False (off), True (defaults), a PolicyConfig or an AutoscaleConfig."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, PolicyConfig):
            return cls(policy=value)
        if isinstance(value, cls):
            return value
        raise ConfigError(f"autoscale= takes True, a PolicyConfig or an AutoscaleConfig, not {type(value).__name__}")


def default_max_stages(settings: Any) -> int:
    """Devices the pipeline may use: the cores this process may use over the stages' torch threads
    when stages run on the CPU.

    Any other device label puts every stage on that one device (plan_shape), where more stages
    buy nothing, so 1: the loop then only scales to zero and back.
    """
    if str(settings.device).startswith("cpu"):
        return cpu_stage_slots(int(settings.torch_threads or 1))
    return 1


def default_policy(settings: Any, max_stages: int) -> PolicyConfig:
    """PolicyConfig for this runtime: stage counts 1..max_stages, the configured token budget."""
    return PolicyConfig(stage_counts=tuple(range(1, max_stages + 1)), token_budgets=(settings.max_batch_tokens,),
                        max_gpus=max_stages)


# ---- performance model of this machine ---------------------------------------------------------------
class MeasuredPerfModel:
    """PerfModel from timings on this machine: a fitted AnalyticPerfModel, KV room = one stage's pool."""

    def __init__(self, units: Any, fixed_s: float, per_token_s: float, hop_s: float, kv_tokens: int, *,
                 dtype_bytes: int = 4, link_bandwidth: float = 2e9):
        flops = sum(float(u.flops_per_token) for u in units)
        self.figures = {"fixed_s": fixed_s, "per_token_s": per_token_s, "hop_s": hop_s, "kv_tokens": kv_tokens,
                        "flops_per_s": flops / per_token_s, "unit_overhead_s": fixed_s / len(units)}
        gpu = GpuSpec("cpu (measured)", peak_flops=flops / per_token_s, mem_bw=1e18, mem_bytes=1e18,
                      compute_eff=1.0, mem_eff=1.0, unit_overhead_s=fixed_s / len(units))
        self.model = AnalyticPerfModel(units, gpu, LinkSpec("zeromq", link_bandwidth, hop_s, 0.0),
                                       dtype_bytes=dtype_bytes, ref_tokens=64)
        self.kv_tokens = int(kv_tokens)

    @property
    def num_units(self) -> int:
        return self.model.num_units

    def stage_time_s(self, stages: int, tokens: int, kv_tokens: float = 0.0) -> float:
        return self.model.stage_time_s(stages, tokens, kv_tokens)

    def transfer_time_s(self, stages: int, tokens: int) -> float:
        return self.model.transfer_time_s(stages, tokens)

    def max_kv_tokens(self, stages: int) -> int:
        """Every stage has its own pool of num_blocks blocks, so a replica holds one pool's tokens."""
        return self.kv_tokens


def time_stage(cfg: Any, source: Any, settings: Any, token_counts: tuple[int, ...] = (8, 64),
               reps: int = 9) -> dict[int, float]:
    """Seconds of one prefill chunk of each token count through all units (blocking: run in a thread).

    The fastest of `reps` runs: what the work costs, not how busy the machine was meanwhile (other
    processes on a shared host inflate the median several times over).
    """
    import torch

    from flexpipe.runtime.stage_core import StageCore, StepMeta

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[settings.dtype]
    threads = torch.get_num_threads()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)  # as a stage process runs
    try:
        blocks = -(-max(token_counts) // settings.block_size)
        core = StageCore(cfg, source, 0, cfg.num_units, num_blocks=blocks, block_size=settings.block_size,
                         dtype=dtype, device=settings.device)
        out: dict[int, float] = {}
        for n in token_counts:
            meta = StepMeta(["calib"], [0], [n], [True], [0], [[0.0, 0, 1.0, 0]])
            x = torch.arange(n, dtype=torch.int64) % cfg.vocab_size
            times = []
            for _ in range(reps + 1):
                t0 = time.perf_counter()
                core.forward(meta, x)
                times.append(time.perf_counter() - t0)
                core.free(["calib"])
            out[n] = min(times[1:])
        return out
    finally:
        torch.set_num_threads(threads)


async def calibrate(controller: Any) -> MeasuredPerfModel:
    """Fit a MeasuredPerfModel for the controller's model on this machine (~0.1-0.5 s for tiny)."""
    from flexpipe.model.units import unit_costs
    from flexpipe.runtime.stage import StageStatus

    spec, settings = controller.spec, controller.settings
    cfg = spec.config
    t = await asyncio.to_thread(time_stage, cfg, spec.weights(), settings)
    (a, ta), (b, tb) = sorted(t.items())
    per_token = max((tb - ta) / (b - a), 1e-9)
    fixed = max(ta - a * per_token, 1e-6)
    rtts = []
    if controller.slots:
        ref = controller.slots[0].ref
        for _ in range(21):
            t0 = time.perf_counter()
            await controller.system.ask(ref, StageStatus(), timeout=30)
            rtts.append(time.perf_counter() - t0)
    hop = statistics.median(rtts) / 2 if rtts else 5e-4
    dtype_bytes = {"float32": 4}.get(settings.dtype, 2)
    model = MeasuredPerfModel(unit_costs(cfg, dtype_bytes=dtype_bytes), fixed, per_token, hop,
                              settings.num_blocks * settings.block_size, dtype_bytes=dtype_bytes)
    model.figures["timed_tokens"] = {str(k): v for k, v in t.items()}
    return model


# ---- the loop ----------------------------------------------------------------------------------------
# the policy's inputs that go into each log entry (the whole Decision.to_dict() is ~30 kB with candidates)
_LOGGED_INPUTS = ("rate", "rate_forecast", "rate_since_change", "queue_len", "cv", "burst_factor", "floor_rps",
                  "demand_now_rps", "peak_rate", "idle_s", "prompt_tokens", "output_tokens")


def pipeline_stages(target: PipelineConfig, max_stages: int) -> int:
    """Stages of the one pipeline that serves `target` here: replicas fold into stages (0: scaled to zero)."""
    if target.replicas <= 0:
        return 0
    return max(1, min(target.stages * target.replicas, max_stages))


class Autoscaler:
    """Runs the policy on the router's traffic and reshapes, scales down to zero and back up."""

    def __init__(self, controller: Any, config: AutoscaleConfig | None = None, *,
                 plan: Callable[[int], Any] | None = None, clock: Callable[[], float] = time.monotonic):
        self.controller = controller
        self.router = controller.router
        self.config = config or AutoscaleConfig()
        self.clock = clock
        self._plan = plan
        self.perf: Any = None
        self.policy: GranularityPolicy | None = None
        self.analyzer: TrafficAnalyzer | None = None
        self.max_stages = 1
        self.decisions: collections.deque[dict] = collections.deque(maxlen=self.config.log_size)
        self.last: Decision | None = None
        self.ticks = 0
        self.actions: collections.Counter = collections.Counter()
        self.errors = 0
        self._lat_ms: collections.deque[float] = collections.deque(maxlen=4096)
        self._urgent = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        self._busy = False  # an action is running
        self._backoff_until = -math.inf
        self._recover_fails = 0  # failed tries in a row to recover a pipeline that is down
        self._logical = PipelineConfig(1, 1, 1)
        self._applied = 0  # stages of the pipeline as last set by this loop
        self._seq = 0
        self.started_at = 0.0

    # ---- life cycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Calibrate (unless given a perf model), build the analyzer and the policy, start the loop."""
        ctl, cfg = self.controller, self.config
        self.max_stages = min(cfg.max_stages or default_max_stages(ctl.settings), ctl.spec.config.num_units)
        pc = cfg.policy or default_policy(ctl.settings, self.max_stages)
        self.max_stages = min(self.max_stages, pc.max_gpus)
        # The policy plans only what this runtime can run: one pipeline of at most max_stages stages
        # (replicas fold into stages, pipeline_stages).  A policy told of more (a PolicyConfig given
        # with its defaults: 32 stages, 1024 GPUs) would count capacity that never runs.
        pc = replace(pc, max_gpus=min(pc.max_gpus, self.max_stages),
                     stage_counts=tuple(n for n in pc.stage_counts if n <= self.max_stages) or (1,))
        self.perf = cfg.perf if cfg.perf is not None else await calibrate(ctl)
        self.policy = GranularityPolicy(pc, self.perf)
        self.analyzer = TrafficAnalyzer(**{"slo_ttft_s": pc.slo_ttft_s, "slo_tpot_s": pc.slo_tpot_s, **cfg.analyzer})
        self.started_at = self.clock()
        self.analyzer.advance(self.started_at)  # idle time counts from now, even if no request ever comes
        self._applied = len(ctl.slots)
        self._logical = PipelineConfig(max(1, self._applied), self.router.sched.max_batch_tokens,
                                       1 if self._applied else 0)
        self.router.listeners.append(self._on_event)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="flexpipe-autoscale")

    async def aclose(self) -> None:
        """Stop deciding; an action in progress is allowed to finish (up to close_timeout_s)."""
        self._closing = True
        self._urgent.set()
        if self._on_event in self.router.listeners:
            self.router.listeners.remove(self._on_event)
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), self.config.close_timeout_s)
            except asyncio.TimeoutError:
                log.error("autoscaler: an action did not finish within %.0f s; cancelled",
                          self.config.close_timeout_s)
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while not self._closing:
            try:
                await asyncio.wait_for(self._urgent.wait(), self.config.tick_s)
            except asyncio.TimeoutError:
                pass
            if self._closing:
                return
            self._urgent.clear()
            try:
                await self.tick()
            except Exception as e:  # a bug here must not stop serving: logged, counted, shown in status
                self.errors += 1
                log.exception("autoscaler: tick failed")
                self._record({"action": "error", "summary": f"autoscaler error: {type(e).__name__}: {e}",
                              "reason": "the control loop caught an exception; it keeps running", "ok": False})

    # ---- events from the router (inline on its data path: O(1)) -------------------------------------
    def _on_event(self, event: str, now: float, req: Any) -> None:
        an = self.analyzer
        if event == "arrival":
            flag = an.on_arrival(now, len(req.prompt))
            flag = self._queue(now) or flag
            if self.controller.suspended:
                flag = True  # a request waits for a cold start: decide now
        elif event == "finish":
            flag = False
            if req.finished in ("stop", "length") and req.first_token_at is not None:
                n = len(req.output)
                tpot = (now - req.first_token_at) / (n - 1) if n > 1 else 0.0
                flag = an.on_finish(now, n, req.first_token_at - req.arrival, tpot)
        else:
            flag = self._queue(now)
        if flag:
            self._urgent.set()

    def _queue(self, now: float) -> bool:
        s = self.router.sched
        head = s.requests[s.waiting[0]] if s.waiting else None   # (a preempted one waits since its preemption)
        oldest = now - (head.queued_at if head.queued_at is not None else head.arrival) if head is not None else 0.0
        return self.analyzer.on_queue(now, len(s.waiting), max(0.0, oldest))

    # ---- one decision ------------------------------------------------------------------------------
    def current(self) -> PipelineConfig:
        """The config the policy is told is running (its own last choice, reconciled with the runtime)."""
        if not self.config.act:  # observing: decisions play out as if carried out, whatever runs
            return self._logical
        running = len(self.controller.slots)
        budget = self.router.sched.max_batch_tokens
        if running == 0:
            return replace(self._logical, replicas=0, token_budget=budget)
        if running != self._applied:  # reshaped (or woken) by hand
            self._logical = PipelineConfig(running, budget, 1)
            self._applied = running
        if self._logical.token_budget != budget:
            self._logical = replace(self._logical, token_budget=budget)
        return self._logical

    def decide(self, now: float | None = None) -> tuple[Decision, float]:
        """Snapshot the analyzer and run the policy; returns the decision and its latency in ms."""
        now = self.clock() if now is None else now
        t0 = time.perf_counter()
        self._queue(now)
        stats = self.analyzer.snapshot(now)
        d = self.policy.decide(now, stats, self.current())
        ms = (time.perf_counter() - t0) * 1e3
        self._lat_ms.append(ms)
        self.ticks += 1
        self.actions[d.action.value] += 1
        self.last = d
        return d, ms

    async def tick(self) -> dict | None:
        """One decision, and the action it calls for; returns the log entry (None for KEEP)."""
        now = self.clock()
        if now < self._backoff_until:
            return None
        if self.config.act and self.controller.busy:
            # a reshape, wake or recovery not started by this loop holds the controller: the shape is
            # in flux, and an action planned from the one running now would queue behind it and undo it
            return None
        if self.config.act and self._down() is not None:   # (a policy's reshape of it would fail too)
            return await self._recover()
        d, ms = self.decide(now)
        if d.action is Action.KEEP or d.target == d.current:
            return None
        return await self._apply(d, ms)

    def _down(self) -> str | None:
        """Why the router refuses requests (a failed restart or recovery), None while it serves."""
        return getattr(self.router, "down", None)

    async def _recover(self) -> dict:
        """Recover a pipeline that is down (with no stage: start it again); after a failed try, wait."""
        why = self._down()
        self._busy = True
        # (set first: a try that raised, a bug, must not be repeated every tick either)
        retry_s = self.config.retry_s
        wait = min(retry_s * 2 ** self._recover_fails, max(retry_s, RECOVER_BACKOFF_MAX_S))
        self._backoff_until = self.clock() + wait
        try:
            await self.controller.recovery.recover_if_down("the autoscaler tries again")
        finally:
            self._busy = False
        ok = self._down() is None and bool(self.controller.slots)
        if ok:
            self._recover_fails, self._backoff_until = 0, -math.inf
            applied = f"serving again: {len(self.controller.slots)} stages"
        else:
            self._recover_fails += 1
            applied = f"still down ({self._down()}); next try in {wait:.0f} s"
        entry = {"action": "recover", "summary": f"recover: the pipeline is down; {applied}",
                 "reason": f"down: {why}", "from_stages": 0, "to_stages": len(self.controller.slots), "ok": ok,
                 "applied": applied}
        self._record(entry)
        return entry

    async def _apply(self, d: Decision, ms: float) -> dict:
        ctl, router = self.controller, self.router
        n = pipeline_stages(d.target, self.max_stages)
        running = len(ctl.slots)
        entry = self._entry(d, ms, running, n)
        if not self.config.act:
            entry["applied"] = "not applied (act=False)"
            self._logical = d.target
            self._record(entry)
            return entry
        self._busy = True
        try:
            if n == 0:
                if router.sched.requests:
                    entry["applied"] = f"deferred: {len(router.sched.requests)} requests still in the router"
                    entry["ok"] = False
                    last = self.decisions[-1] if self.decisions else {}
                    if last.get("action") == d.action.value and not last.get("ok", True):
                        return entry  # already logged as deferred
                else:
                    st = await ctl.suspend()
                    if st is None:
                        entry["applied"], entry["ok"] = "deferred: a request arrived meanwhile", False
                    else:
                        entry["applied"] = (f"retired {st.stages_retired} stages in {st.total_s:.2f} s; their "
                                            f"weights stay in host memory ({st.weights_from}); "
                                            "the next request starts them again")
                        entry["reshape"] = st.to_dict()
                        self._applied, self._logical = 0, d.target
                        if router.sched.requests:  # one arrived while the stages stopped: wake now
                            self._urgent.set()
            else:
                budget_note = ""
                if d.target.token_budget != router.sched.max_batch_tokens:
                    budget_note = f"; token budget {router.sched.max_batch_tokens} -> {d.target.token_budget}"
                if n != running:
                    st = await (ctl.wake(self.plan(n)) if running == 0 else ctl.reshape(self.plan(n)))
                    verb = "cold start of" if running == 0 else f"reshaped {running} ->"
                    entry["applied"] = (f"{verb} {n} stage{'s' if n > 1 else ''} in {st.total_s:.2f} s "
                                        f"(pause {st.pause_s * 1e3:.0f} ms, "
                                        f"weights from {st.weights_from} {st.weights_s * 1e3:.0f} ms){budget_note}")
                    entry["reshape"] = st.to_dict()
                else:
                    entry["applied"] = f"pipeline already has {n} stages{budget_note or '; nothing to change'}"
                # the budget goes with the shape it was chosen for: only once that runs
                router.sched.max_batch_tokens = d.target.token_budget
                # (what runs: the target, unless pipeline_stages had to fold it into fewer stages)
                folded = n != d.target.stages * d.target.replicas
                self._applied, self._logical = n, (replace(d.target, stages=n, replicas=1) if folded else d.target)
        except Exception as e:  # any failed action waits retry_s (an ActorError too: not again every tick)
            if isinstance(e, ReshapeError) and running == 0 and n > 0 and ctl.slots:
                # another caller started the pipeline while this wake waited for the controller: what
                # it was for is done, and current() takes the shape that runs
                entry["applied"] = f"nothing to do: the pipeline was started meanwhile ({len(ctl.slots)} stages)"
            else:
                what = str(e) if isinstance(e, ReshapeError) else f"{type(e).__name__}: {e}"
                entry["applied"], entry["ok"] = f"failed: {what}", False
                self._backoff_until = self.clock() + self.config.retry_s
                if isinstance(e, (ReshapeError, ActorError)):
                    log.warning("autoscaler: %s failed: %s", d.action.value, e)
                else:  # not an expected failure of an action: a bug, counted in status()["errors"]
                    self.errors += 1
                    log.exception("autoscaler: %s failed", d.action.value)
        finally:
            self._busy = False
        self._record(entry)
        return entry

    def plan(self, stages: int) -> Any:
        """The pipeline shape for a stage count (the solver's balanced cut)."""
        if self._plan is not None:
            return self._plan(stages)
        from flexpipe.api import plan_shape

        ctl = self.controller
        return plan_shape(ctl.spec.config, stages, device=ctl.settings.device)

    def _entry(self, d: Decision, ms: float, running: int, n: int) -> dict:
        now = d.now
        fold = (f" ({d.target.replicas} replicas x {d.target.stages} stages fold into one pipeline)"
                if d.target.replicas > 1 else "")
        where = "zero" if n == 0 else f"{n} stage" + ("s" if n > 1 else "")
        return {"seq": self._next_seq(), "at": time.time(), "t": now - self.started_at, "action": d.action.value,
                "summary": f"{d.action.value.replace('_', ' ')}: {running} -> {where}{fold}; "
                           f"load {d.load_rps:.1f} req/s, demand {d.demand_rps:.1f}, capacity {d.capacity_rps:.1f}",
                "reason": d.reason, "held_back": d.held_back, "urgent": d.urgent,
                "from_stages": running, "to_stages": n, "current": asdict(d.current), "target": asdict(d.target),
                "load_rps": d.load_rps, "demand_rps": d.demand_rps, "capacity_rps": d.capacity_rps,
                "inputs": {k: d.inputs.get(k) for k in _LOGGED_INPUTS},
                "decision_ms": ms, "explain": d.explain(top=3), "ok": True, "applied": ""}

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _record(self, entry: dict) -> None:
        entry.setdefault("seq", self._next_seq())
        entry.setdefault("at", time.time())
        self.decisions.append(entry)
        log.info("autoscale: %s | %s | %s", entry.get("summary"), entry.get("reason"), entry.get("applied", ""))

    # ---- status ------------------------------------------------------------------------------------
    def decision_log(self) -> list[dict]:
        """Recent decisions that changed (or tried to change) something, oldest first."""
        return list(self.decisions)

    def latency_ms(self) -> dict:
        """p50/p99/max of snapshot + decide over the recent ticks, against the 5 ms target."""
        xs = sorted(self._lat_ms)
        if not xs:
            return {"n": 0, "target_ms": TARGET_DECISION_MS}
        q = lambda p: xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]  # noqa: E731
        return {"n": len(xs), "p50": q(0.5), "p99": q(0.99), "max": xs[-1], "target_ms": TARGET_DECISION_MS}

    def reloads(self) -> dict:
        """Weight delivery + build time of the reshapes so far, per tier (cache, peer, source)."""
        out: dict[str, dict] = {}
        for st in self.controller.history:
            if st.kind not in ("reshape", "cold_start") or not st.ok or not st.weight_bytes:
                continue
            r = out.setdefault(st.weights_from, {"n": 0, "total_s": 0.0, "bytes": 0, "last_s": 0.0})
            r["n"] += 1
            r["total_s"] += st.weights_s
            r["bytes"] += st.weight_bytes
            r["last_s"] = st.weights_s
        return out

    def status(self) -> dict:
        """The loop's state for FlexPipe.status()["autoscale"]."""
        d = self.last
        cache = self.controller.weight_cache
        return {"enabled": True, "tick_s": self.config.tick_s, "max_stages": self.max_stages,
                "current": asdict(self._logical), "pipeline_stages": len(self.controller.slots),
                "scaled_to_zero": self.controller.suspended, "down": self._down(),   # (the router's reason)
                "busy": self._busy, "ticks": self.ticks,
                "actions": dict(self.actions), "errors": self.errors, "decision_ms": self.latency_ms(),
                "last": None if d is None else {"action": d.action.value, "reason": d.reason,
                                                "held_back": d.held_back, "load_rps": d.load_rps,
                                                "demand_rps": d.demand_rps, "capacity_rps": d.capacity_rps},
                "policy": asdict(self.policy.config) if self.policy else None,
                "perf": getattr(self.perf, "figures", None), "reloads": self.reloads(),
                "weight_cache": cache.stats().to_dict() if cache is not None else None}

    def model_capacity_rps(self, stages: int, prompt_tokens: float, output_tokens: float,
                           token_budget: int | None = None) -> float:
        """Requests/s one replica of `stages` stages serves at these lengths, by the policy's model."""
        budget = token_budget or self.router.sched.max_batch_tokens
        probe = GranularityPolicy(replace(self.policy.config, stage_counts=(stages,), token_budgets=(budget,)),
                                  self.perf)
        stats = TrafficStats.synthetic(0.0, 1.0, prompt_tokens=prompt_tokens, output_tokens=output_tokens)
        d = probe.decide(0.0, stats, PipelineConfig(stages, budget, 1))
        return d.candidates[0].replica_rps


def make_weight_cache(config: AutoscaleConfig | None) -> WeightCache | None:
    """The host-memory cache the controller uses with this config (None: autoscaling off)."""
    return WeightCache(config.weight_cache_bytes) if config is not None else None


__all__ = ["AutoscaleConfig", "Autoscaler", "MeasuredPerfModel", "calibrate", "default_max_stages",
           "default_policy", "make_weight_cache", "pipeline_stages", "time_stage"]

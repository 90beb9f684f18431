"""Simulator engine internals: the scalar round, shared pipes, the kick's indexes; reshape accounting, utilisation."""

from __future__ import annotations

import inspect
import math
from dataclasses import replace

import numpy as np
import pytest

from flexpipe.sim import report
from flexpipe.sim.baselines import make_policy
from flexpipe.sim.cluster import Cluster, Placement, StagePlace
from flexpipe.sim.engine import (_KICK_BOUNDARY, _KICK_CUT, _KICK_NONE, _KICK_WAIT, PRECOPY_DELTA_TOKENS,
                                 PRECOPY_MAX_ROUNDS, SWITCH_OVERHEAD_S, Simulator)
from flexpipe.sim.perf import (INIT_S, LINKS, LOAD_TIERS, GPUS, Batch, FastPipe, ModelCosts, PipelineSpec, _np_sum,
                               round_time)
from flexpipe.sim.scenarios import MODELS
from flexpipe.sim.traces import Trace, default_lengths, synthetic


def _pipe(model: str, stages: int, tp: int = 1) -> PipelineSpec:
    c = ModelCosts.for_model(model)
    b = c.balanced_boundaries(stages)
    st = tuple(c.stage(b[i], b[i + 1]) for i in range(stages))
    g = GPUS["A100-80"]
    gpus = tuple(replace(g, peak_flops=g.peak_flops * (1 - 0.03 * (i % 8))) for i in range(stages))
    return PipelineSpec(st, gpus, (LINKS["net"],) * (stages - 1), c.hidden, tp, LINKS["nvlink"] if tp > 1 else None)


def test_np_sum_adds_in_numpys_order():
    rng = np.random.default_rng(0)
    for n in [1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 127, 128, 129, 300]:
        for _ in range(50):
            a = rng.random(n) * 10.0 ** rng.integers(-8, 2, n)
            assert _np_sum(a.tolist()) == float(a.sum())


@pytest.mark.parametrize("model,stages,tp", [("llama2-7b", 1, 1), ("llama2-7b", 1, 2), ("llama2-13b", 3, 1),
                                             ("llama2-70b", 8, 1), ("llama2-70b", 32, 1)])
def test_fast_pipe_round_is_round_time_on_its_grid(model, stages, tp):
    spec = _pipe(model, stages, tp)
    fp = FastPipe(spec)
    rng = np.random.default_rng(stages)
    for _ in range(200):
        dec = int(rng.integers(0, 300))
        ctx = float(rng.integers(1, 2000)) * max(dec, 1)
        pre = int(rng.integers(0, 3)) * int(rng.integers(1, 64)) * 32  # multiples of 32: on the memo's grid
        pctx = float(rng.integers(0, 2000))
        if dec == 0 and pre == 0:
            continue
        got = fp.round(dec, ctx, pre, pctx, 1)
        kc = int(math.log(ctx) * 32)
        want = round_time(spec, Batch(dec, math.exp((kc + 0.5) / 32), pre, pctx))
        assert got == pytest.approx(want, rel=1e-12)


def _small():
    cluster = Cluster.uniform(4, 4, "A100-80", "fragmented", 0)
    trace = synthetic(300.0, 12.0, 4.0, default_lengths(), 3, max_total=4096)
    return cluster, trace


def test_replicas_with_the_same_pipeline_share_one_fast_pipe():
    cluster, trace = _small()
    sim = Simulator(cluster, [MODELS["llama2-7b"]], trace, make_policy("static-peak"), duration_s=300.0)
    p = sim.place(0, 2)
    assert p is not None
    assert sim.pipe_for(0, p) is sim.pipe_for(0, p)


class _CheckedKicks(Simulator):
    """Checks every kick's choice against a scan of every replica in id order (the definition)."""

    seen: dict[int, int]

    def _kick_choice(self, ms, need):  # type: ignore[override]
        want, want_act = None, _KICK_NONE
        best_room = 0
        for r in ms.replicas:
            if r.state != "active" or r.pending is not None and r.switch_due:
                continue
            room = r.kv_cap - r.kv_used
            if room < need or r.running >= r.max_seqs:
                continue
            if not r.in_seg:
                want, want_act = r, _KICK_BOUNDARY
                break
            if r.cut:
                want, want_act = r, _KICK_WAIT
                break
            if want is None or room > best_room:
                want, want_act, best_room = r, _KICK_CUT, room
        got, act = Simulator._kick_choice(ms, need)
        assert (got, act) == (want, want_act)
        self.seen[act] = self.seen.get(act, 0) + 1
        return got, act


@pytest.mark.parametrize("policy", ["flexpipe", "serverlessllm", "alpaserve"])
def test_kick_indexes_choose_what_a_scan_of_every_replica_chooses(policy):
    cluster, trace = _small()
    model = [replace(MODELS["llama2-7b"], kv_want_tokens=8192)]
    sim = _CheckedKicks(cluster, model, trace, make_policy(policy), duration_s=300.0)
    sim.seen = {}
    sim.run()
    assert sim.seen.get(_KICK_CUT, 0) > 0 and sim.seen.get(_KICK_WAIT, 0) + sim.seen.get(_KICK_BOUNDARY, 0) > 0
    # and the run is the same as one without the checks
    plain = Simulator(Cluster.uniform(4, 4, "A100-80", "fragmented", 0), model, trace, make_policy(policy),
                      duration_s=300.0).run()
    assert np.array_equal(sim.finish_t, plain.finish_t, equal_nan=True)
    assert report.summarise(sim)["goodput_rps"] == report.summarise(plain)["goodput_rps"]


# ---------------------------------------------------------------------------------------------
# reshape accounting and utilisation, on scripted replicas
class _Scripted:
    """A policy that runs `script(now, sim)` at every tick and nothing else."""

    name = "scripted"

    def __init__(self, script):
        self.script = script

    def attach(self, sim):
        pass

    def on_arrival(self, now, m, rid):
        pass

    def on_finish(self, now, m, rid):
        pass

    def tick(self, now, sim):
        self.script(now, sim)


def _stage(start, end, gpu, gb, kv=20000):
    return StagePlace(start, end, (gpu,), gb * 1e9, kv)


def _reshape_run(old, new, trace=None, duration=20.0):
    """One replica on `old` from t=0, reshaped to `new` at t=1; GPU memory used at every tick."""
    seen = []

    def script(now, sim):
        if now == 0.0:
            sim.add_replica(0, old, instant=True)
        r = next(iter(sim.replicas.values()))
        if now == 1.0:
            assert sim.reshape_replica(r, new)
        seen.append((now, r.pending is not None, [g.used for g in sim.cluster.gpus], sim.res_eq))

    sim = Simulator(Cluster.uniform(1, 4, "A100-80", "none"), [MODELS["llama2-7b"]],
                    trace if trace is not None else Trace.empty(), _Scripted(script), duration_s=duration,
                    drain_s=0.0)
    return sim.run(), seen


@pytest.mark.parametrize("kept", [False, True])
def test_reshape_holds_the_union_of_old_and_new_placements_until_the_switch(kept):
    n = ModelCosts.for_model("llama2-7b").num_units
    h = n // 2
    old = Placement((_stage(0, h, 0, 25), _stage(h, n, 2, 25)))
    # new stage 0 on GPU 0 beside old stage 0 (a different unit range: a new stage), or the same range
    # there (the old stage kept in place, growing to 28 GB); new stage 1 on GPU 1; GPU 2 only in the old
    first = _stage(0, h, 0, 28) if kept else _stage(0, h - 3, 0, 20)
    new = Placement((first, _stage(first.end, n, 1, 30)))
    sim, seen = _reshape_run(old, new)
    during = [u for t, pend, u, _ in seen if pend]
    after = [u for t, pend, u, _ in seen if t > 1.0 and not pend]
    assert during and after, "the switch happened inside the run"
    gpu0 = 28e9 if kept else 25e9 + 20e9
    for u in during:
        assert u[:3] == [gpu0, 30e9, 25e9]
    for u in after:
        assert u[:3] == [first.bytes_per_gpu, 30e9, 0.0]
    for _, _, u, eq in seen:
        assert eq == pytest.approx(sum(u) / 80e9)
    assert len(sim.reshapes) == 1 and sim.reshapes[0].switched


def test_reshape_refused_when_the_union_does_not_fit():
    n = ModelCosts.for_model("llama2-7b").num_units
    old = Placement((_stage(0, n, 0, 60),))
    new = Placement((_stage(0, 10, 0, 30), _stage(10, n, 1, 30)))  # GPU 0 would need 90 of its 80 GB
    got = []

    def script(now, sim):
        if now == 0.0:
            r = sim.add_replica(0, old, instant=True)
            got.append(sim.reshape_replica(r, new))
            got.append((dict(r.hold), r.pending, r.kv_cap, [g.used for g in sim.cluster.gpus]))

    Simulator(Cluster.uniform(1, 4, "A100-80", "none"), [MODELS["llama2-7b"]], Trace.empty(), _Scripted(script),
              duration_s=2.0, drain_s=0.0).run()
    assert got[0] is False
    assert got[1] == ({0: 60e9}, None, 20000, [60e9, 0.0, 0.0, 0.0])


def test_reshape_copies_the_kv_of_requests_that_arrive_or_grow_after_it_started():
    # the replica is idle when the reshape starts at t=1; requests arrive every 50 ms from then on, so
    # the pre-copy (after the new stages load, ~1 s) and the delta at the switch must move their KV
    costs = ModelCosts.for_model("llama2-7b")
    n = costs.num_units
    arr = 1.05 + 0.05 * np.arange(140)
    k = len(arr)
    trace = Trace(arr, np.full(k, 300), np.full(k, 400), np.zeros(k, dtype=np.int64))
    old = Placement((_stage(0, n, 0, 40, kv=32768),))
    new = Placement((_stage(0, n // 2, 1, 30, kv=32768), _stage(n // 2, n, 2, 30, kv=32768)))  # every unit moves
    sim, _ = _reshape_run(old, new, trace)
    rec = sim.reshapes[0]
    assert rec.kv_bytes > 0, "KV of the requests admitted after the reshape began is moved"
    assert rec.switched
    kv_tok, bw = costs.kv_bytes_per_token, sim.cluster.inter.bandwidth
    T = rec.switch_t
    P = rec.t + rec.prep_s - rec.precopy_bytes / bw  # when the pre-copy began
    assert rec.t == 1.0 and 1.0 < P < T
    # requests prefilled by a moment and finishing after it hold at least their prompt's KV then
    def held_at(t, since=-np.inf):
        sel = (sim.admit_t > since) & (sim.first_t < t) & (sim.finish_t > t)
        return int(sel.sum()), float(sim.prompt[sel].sum())
    n_pre, tok_pre = held_at(P)
    n_sw, tok_sw = held_at(T)
    # admitted during the pre-copy: all of their KV moves, in a later pre-copy round or in the delta
    n_new, tok_new = held_at(T, since=P)
    assert n_pre > 0 and n_sw > 0 and n_new > 0
    assert rec.precopy_bytes >= kv_tok * tok_pre
    assert rec.kv_bytes >= kv_tok * tok_sw
    assert rec.kv_bytes >= kv_tok * (tok_pre + tok_new)
    assert rec.delta_bytes > 0
    assert rec.kv_bytes == pytest.approx(rec.precopy_bytes + rec.delta_bytes)
    assert rec.pause_s >= SWITCH_OVERHEAD_S + rec.delta_bytes / bw
    # every request running at the switch saw the pause
    running = (sim.admit_t < T) & (sim.finish_t > T)
    assert np.all(sim.stall_s[running] == rec.pause_s)


def test_utilisation_is_a_fraction_when_replicas_share_a_gpu():
    # two busy replicas on one GPU: per-replica busy time over GPUs touched counted that GPU twice
    n = ModelCosts.for_model("llama2-7b").num_units

    def script(now, sim):
        if now == 0.0:
            for _ in range(2):
                sim.add_replica(0, Placement((_stage(0, n, 0, 30, kv=16384),)), instant=True)

    trace = synthetic(60.0, 8.0, 1.0, default_lengths(), 0, max_total=2048)
    sim = Simulator(Cluster.uniform(1, 1, "A100-80", "none"), [MODELS["llama2-7b"]], trace, _Scripted(script),
                    duration_s=60.0, drain_s=0.0).run()
    s = report.summarise(sim)
    assert 0.5 < s["utilisation"] <= 1.0
    assert sim.res_slots_int == pytest.approx(2 * sim.now)


@pytest.mark.parametrize("policy", ["flexpipe", "alpaserve", "muxserve"])
def test_utilisation_within_0_and_1_on_a_busy_run(policy):
    cluster = Cluster.uniform(2, 4, "A100-80", "fragmented", 0)
    trace = synthetic(240.0, 10.0, 4.0, default_lengths(), 3, max_total=4096)
    sim = Simulator(cluster, [replace(MODELS["llama2-7b"], kv_want_tokens=8192)], trace, make_policy(policy),
                    duration_s=240.0).run()
    u = report.summarise(sim)["utilisation"]
    assert 0.0 < u <= 1.0


def test_reshape_pause_is_quiesce_then_switch_without_a_second_round():
    # One request decoding on one stage; at t=1 a reshape that moves nothing (the same units on the same
    # GPU, more memory): no weights to load and no KV to copy, so the switch is due at once.  The router
    # stops launching steps at t=1 (quiesce); the round in flight ends at the next iteration boundary b;
    # the switch then takes SWITCH_OVERHEAD_S and the replica steps again.  The pause is 1 -> b + overhead,
    # and the round in flight is not waited for a second time after b.
    n = ModelCosts.for_model("llama2-7b").num_units
    old, new = Placement((_stage(0, n, 0, 30),)), Placement((_stage(0, n, 0, 35),))
    trace = Trace(np.array([0.5]), np.array([100]), np.array([4000]), np.zeros(1, dtype=np.int64))
    seen = {}

    def script(now, sim):
        if now == 0.0:
            sim.add_replica(0, old, instant=True)
        r = next(iter(sim.replicas.values()))
        if now in (1.0, 2.0):
            seen[now] = (r.in_seg, r.seg_k, r.seg_t0, r.seg_dt)
        if now == 1.0:
            assert sim.reshape_replica(r, new)

    sim = Simulator(Cluster.uniform(1, 4, "A100-80", "none"), [MODELS["llama2-7b"]], trace, _Scripted(script),
                    duration_s=3.0, drain_s=0.0).run()
    in_seg, k, t0, dt = seen[1.0]
    assert in_seg and k > 1000 and dt > 0, "decoding in one long segment at t=1"
    b = t0 + math.ceil((1.0 - t0) / dt) * dt  # the boundary that ends the round in flight at t=1
    assert b > 1.0
    rec = sim.reshapes[0]
    assert rec.switched and rec.kv_bytes == 0
    assert rec.pause_s == pytest.approx(b - 1.0 + SWITCH_OVERHEAD_S, rel=1e-9)
    assert rec.switch_t == 1.0  # the pause begins when the quiesce does
    assert sim.stall_s[0] == pytest.approx(rec.pause_s, rel=1e-9)
    in_seg, k, t0, _ = seen[2.0]
    assert in_seg and k > 0
    assert t0 == pytest.approx(b + SWITCH_OVERHEAD_S, rel=1e-9)  # stepping again right after the switch


def test_precopy_rule_is_the_runtimes():
    # one rule, in flexpipe/settings.py: the live controller's defaults are the simulator's constants
    from flexpipe.runtime.controller import Controller

    params = inspect.signature(Controller.__init__).parameters
    assert PRECOPY_MAX_ROUNDS == params["max_precopy_rounds"].default
    assert PRECOPY_DELTA_TOKENS == params["delta_tokens_target"].default


@pytest.mark.parametrize("n_req,reshape_at,rounds,converged", [(32, 1.0, 2, True), (128, 3.0, 3, False)])
def test_precopy_repeats_rounds_until_little_is_left_as_the_runtime_does(n_req, reshape_at, rounds, converged):
    # n_req requests (prompt 100, output 600) decode together in one long segment; at `reshape_at` the
    # replica moves whole from GPU 0 to GPU 1, so every attention unit's KV moves.  Worked by hand from
    # the segment seen then (start t0, first iteration i0, iteration time dt, each request's first
    # iteration f): a request's KV at time t is its prompt plus one token per iteration since f,
    # it(t) = i0 + floor((t - t0) / dt).  The new stage loads its weights from the old one over the
    # GPUs' link; then pre-copy rounds run while the old stage serves: each copies what was written
    # since the previous one began, and another follows while more than PRECOPY_DELTA_TOKENS tokens
    # were written during it, at most PRECOPY_MAX_ROUNDS rounds (the runtime's rule).  Then the quiesce:
    # the round in flight ends at the next iteration boundary b, and the pause copies what was written
    # since the last round began, up to b.  With 32 requests the second round leaves <= 64 tokens; with
    # 128 more than 64 are still left after the third, which ends the pre-copy all the same.  (One round
    # alone left everything written while it ran to the pause.)
    costs = ModelCosts.for_model("llama2-7b")
    n = costs.num_units
    prompt, out = 100, 600
    old, new = Placement((_stage(0, n, 0, 30, kv=100_000),)), Placement((_stage(0, n, 1, 30, kv=100_000),))
    trace = Trace(np.full(n_req, 0.1), np.full(n_req, prompt), np.full(n_req, out), np.zeros(n_req, dtype=np.int64))
    seen = {}

    def script(now, sim):
        if now == 0.0:
            sim.add_replica(0, old, instant=True, token_budget=8192)  # prefill everyone at once
        r = next(iter(sim.replicas.values()))
        if now == reshape_at:
            seen["seg"] = (r.in_seg, r.prefill, r.n_dec, r.seg_t0, r.seg_i0, r.seg_k, r.seg_dt,
                           [first for _, _, first in r.dec])
            assert sim.reshape_replica(r, new)

    sim = Simulator(Cluster.uniform(1, 4, "A100-80", "none"), [MODELS["llama2-7b"]], trace, _Scripted(script),
                    duration_s=reshape_at + 4.0, drain_s=0.0).run()
    in_seg, prefill, n_dec, t0, i0, k, dt, firsts = seen["seg"]
    assert in_seg and not prefill and n_dec == n_req and dt > 0

    def it(t):
        return i0 + int((t - t0) / dt + 1e-9)

    def held(i):  # tokens of KV all the requests hold after iteration i
        return sum(prompt + i - f for f in firsts)

    bw, kv_tok = sim.cluster.inter.bandwidth, costs.kv_bytes_per_token
    params = sum(u.param_bytes for u in costs.units)
    t = reshape_at + INIT_S + params / max(LOAD_TIERS["remote"], sim.cluster.link(0, 1).bandwidth)
    copied, n_rounds, precopy_bytes = 0, 0, 0.0
    while True:
        tokens = held(it(t)) - copied
        copied += tokens
        n_rounds += 1
        precopy_bytes += kv_tok * tokens
        t += kv_tok * tokens / bw
        left = held(it(t)) - copied
        if left <= PRECOPY_DELTA_TOKENS or n_rounds == PRECOPY_MAX_ROUNDS:
            break
    assert (n_rounds, left <= PRECOPY_DELTA_TOKENS) == (rounds, converged)
    quiesce = t
    j = math.ceil((quiesce - t0) / dt - 1e-9)
    assert 0 < j < k, "the segment seen runs through the switch"
    b = t0 + j * dt
    delta = held(i0 + j) - copied
    pause = (b - quiesce) + SWITCH_OVERHEAD_S + kv_tok * delta / bw

    rec = sim.reshapes[0]
    assert rec.switched
    assert rec.delta_bytes == pytest.approx(kv_tok * delta, rel=1e-12)
    assert rec.pause_s == pytest.approx(pause, rel=1e-9)
    assert rec.switch_t == pytest.approx(quiesce, rel=1e-12)
    assert rec.precopy_rounds == n_rounds
    assert rec.precopy_bytes == pytest.approx(precopy_bytes, rel=1e-12)
    assert rec.kv_bytes == pytest.approx(kv_tok * held(i0 + j), rel=1e-12)  # every token once
    assert np.all(sim.stall_s == rec.pause_s)  # every request was running at the switch

"""Simulator engine internals that make it fast: the scalar round, shared pipes, the kick's indexes."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from flexpipe.sim import report
from flexpipe.sim.baselines import make_policy
from flexpipe.sim.cluster import Cluster
from flexpipe.sim.engine import _KICK_BOUNDARY, _KICK_CUT, _KICK_NONE, _KICK_WAIT, Simulator
from flexpipe.sim.perf import LINKS, GPUS, Batch, FastPipe, ModelCosts, PipelineSpec, _np_sum, round_time
from flexpipe.sim.scenarios import MODELS
from flexpipe.sim.traces import default_lengths, synthetic


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

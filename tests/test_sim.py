"""Simulator: determinism, conservation, scale to zero, static reservation, calibration, CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from flexpipe.sim import report
from flexpipe.sim.baselines import POLICIES, make_policy
from flexpipe.sim.cluster import Cluster
from flexpipe.sim.engine import Simulator
from flexpipe.sim.perf import GPUS, Measurement, ModelCosts, calibrate, stage_time, Batch
from flexpipe.sim.scenarios import MODELS
from flexpipe.sim.traces import Trace, default_lengths, synthetic

MODEL = [replace(MODELS["llama2-7b"], kv_want_tokens=16384)]


def small_cluster(seed: int = 0) -> Cluster:
    return Cluster.uniform(3, 4, "A100-80", "fragmented", seed)


def small_trace(cv: float = 2.0, rate: float = 3.0, duration: float = 240.0, seed: int = 1) -> Trace:
    return synthetic(duration, rate, cv, default_lengths(), seed, max_total=4096)


def run(policy: str, trace: Trace, seed: int = 0, **kw) -> Simulator:
    return Simulator(small_cluster(seed), MODEL, trace, make_policy(policy), duration_s=trace.duration,
                     **kw).run()


@pytest.mark.parametrize("policy", ["flexpipe", "serverlessllm"])
def test_deterministic_for_a_seed(policy):
    tr = small_trace()
    a, b = run(policy, tr), run(policy, tr)
    assert np.array_equal(a.finish_t, b.finish_t, equal_nan=True)
    assert np.array_equal(a.dropped, b.dropped)
    sa, sb = report.summarise(a), report.summarise(b)
    assert json.dumps(sa, sort_keys=True, default=str) == json.dumps(sb, sort_keys=True, default=str)
    # and a different trace seed gives a different run
    c = run(policy, small_trace(seed=2))
    assert c.n != a.n or not np.array_equal(c.finish_t, a.finish_t, equal_nan=True)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_every_request_finishes_or_is_dropped(policy):
    tr = small_trace(cv=4.0, rate=6.0)  # overload some of the policies
    sim = run(policy, tr)
    fin = ~np.isnan(sim.finish_t)
    assert np.all(fin ^ sim.dropped), "each request is exactly one of finished / dropped"
    assert fin.sum() + sim.dropped.sum() == len(tr)
    done = fin
    # causality: arrival <= admission <= first token <= finish
    assert np.all(sim.admit_t[done] >= sim.arr[done] - 1e-9)
    assert np.all(sim.first_t[done] >= sim.admit_t[done] - 1e-9)
    assert np.all(sim.finish_t[done] >= sim.first_t[done] - 1e-9)
    s = report.summarise(sim)
    assert s["finished"] + s["dropped"] == s["requests"]
    # all memory is given back by the end of static-free runs, never more than the GPU holds
    for g in sim.cluster.gpus:
        assert g.used <= g.total - g.background + 1.0


@pytest.mark.parametrize("policy", ["flexpipe", "serverlessllm"])
def test_zero_load_means_zero_reservation(policy):
    sim = Simulator(small_cluster(), MODEL, Trace.empty(), make_policy(policy), duration_s=600.0).run()
    assert sim.res_eq_peak == 0.0
    assert sim.res_eq_int == 0.0


def test_scale_to_zero_after_idle():
    # a short burst, then silence: the dynamic policies give everything back
    tr = small_trace(duration=60.0, rate=3.0)
    pol = make_policy("flexpipe", scale_to_zero_idle_s=120.0, reclaim_window_s=60.0, min_dwell_s=10.0)
    sim = Simulator(small_cluster(), MODEL, tr, pol, duration_s=900.0, drain_s=0.0).run()
    assert sim.res_eq_peak > 0
    assert sim.samples[-1][1] == 0.0, "reservation back to zero after the idle time"
    sim2 = Simulator(small_cluster(), MODEL, tr, make_policy("serverlessllm"), duration_s=900.0, drain_s=0.0).run()
    assert sim2.samples[-1][1] == 0.0


def test_static_peak_reserves_its_whole_provision_all_the_time():
    sim = run("static-peak", small_trace())
    s = report.summarise(sim)
    assert s["reservation_share_of_peak"] == pytest.approx(1.0, abs=1e-9)
    provision = sum(sum(r.hold.values()) / sim.cluster.gpus[0].total for r in sim.replicas.values())
    assert s["reserved_gpu_eq_mean"] == pytest.approx(provision, rel=1e-9)
    assert all(x[1] == pytest.approx(provision) for x in sim.samples)


def test_flexpipe_uses_real_planning_and_reshapes_or_scales():
    pytest.importorskip("flexpipe.planning.policy", reason="FP-6's policy module is not in this tree")
    sim = run("flexpipe", small_trace(cv=4.0, rate=5.0, duration=400.0))
    assert sim.policy.impl == "flexpipe.planning"
    assert sum(sim.policy.decisions.values()) > 0
    assert sim.models[0].scale_ups > 0


def _synthetic_measurements(costs: ModelCosts, gpu, rng) -> list[Measurement]:
    ms = []
    n = costs.num_units
    for _ in range(60):
        a = int(rng.integers(0, n - 1))
        b = int(rng.integers(a + 1, n + 1))
        if rng.random() < 0.5:
            tok, ctx, phase = int(rng.integers(1, 64)), float(rng.integers(16, 4096)), "decode"
            batch = Batch(tok, ctx)
        else:
            tok, ctx, phase = int(rng.integers(16, 512)), float(rng.integers(8, 256)), "prefill"
            batch = Batch(prefill=tok, prefill_ctx=ctx)
        t = stage_time(costs.stage(a, b), gpu, batch, costs.hidden) * (1 + 0.02 * rng.standard_normal())
        ms.append(Measurement(a, b, tok, t, ctx, phase))
    return ms


def test_calibration_recovers_factors_from_synthetic_measurements():
    """Stated error: factors within 10%, mean relative time error below 3% (2% noise added)."""
    costs = ModelCosts.for_model("tiny", dtype_bytes=4)
    truth = replace(GPUS["CPU"], compute_eff=0.31, mem_eff=0.42, unit_overhead_s=80e-6)
    ms = _synthetic_measurements(costs, truth, np.random.default_rng(0))
    cal = calibrate(costs, GPUS["CPU"], ms)
    assert cal.gpu.compute_eff == pytest.approx(0.31, rel=0.10)
    assert cal.gpu.mem_eff == pytest.approx(0.42, rel=0.10)
    assert cal.gpu.unit_overhead_s == pytest.approx(80e-6, rel=0.10)
    assert cal.mean_abs_rel_err < 0.03
    assert cal.mean_abs_rel_err < cal.before_mean_abs_rel_err


def test_calibrate_cli(tmp_path, capsys):
    from flexpipe.sim.cli import main

    costs = ModelCosts.for_model("tiny", dtype_bytes=4)
    truth = replace(GPUS["CPU"], compute_eff=0.2, mem_eff=0.5, unit_overhead_s=50e-6)
    ms = _synthetic_measurements(costs, truth, np.random.default_rng(1))
    doc = {"model": "tiny", "gpu": "CPU", "dtype_bytes": 4,
           "measurements": [{"start": m.start, "end": m.end, "tokens": m.tokens, "seconds": m.seconds,
                             "context": m.context, "phase": m.phase} for m in ms]}
    f = tmp_path / "m.json"
    f.write_text(json.dumps(doc))
    assert main(["simulate", "calibrate", "--measurements", str(f)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mean_abs_rel_err"] < 0.05
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"measurements": [{"start": 0}]}))
    assert main(["simulate", "calibrate", "--measurements", str(bad)]) == 2


def test_simulate_cli_writes_json_and_pngs(tmp_path):
    from flexpipe.sim.cli import main

    out = tmp_path / "o"
    rc = main(["simulate", "--preset", "small", "--cv", "1,4", "--duration", "120",
               "--policies", "flexpipe,static-peak", "--out", str(out), "--quiet"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["runs"]) == 4
    for name in ["table.md", "summary.png", "latency_breakdown.png", "reservation_cv1.png", "latency_cdf_cv4.png"]:
        assert (out / name).stat().st_size > 0


def test_perf_model_sanity():
    c = ModelCosts.for_model("llama2-7b")
    g = GPUS["A100-80"]
    whole = c.stage(0, c.num_units)
    # decode of one token streams the weights: ~13.5 GB / (2039 GB/s * 0.75) ~ 8.8 ms (+ overheads)
    t = stage_time(whole, g, Batch(1, 0.0), c.hidden)
    assert 0.008 < t < 0.012
    # prefill of 2048 tokens is compute bound: 2048 * 13.2 GFLOP / (312 TFLOP/s * 0.55) ~ 0.16 s
    t = stage_time(whole, g, Batch(prefill=2048, prefill_ctx=1024), c.hidden)
    assert 0.14 < t < 0.2
    assert c.balanced_boundaries(4)[0] == 0 and c.balanced_boundaries(4)[-1] == c.num_units


def test_a_simulated_stage_books_the_placers_process_overhead():
    """The simulator kept its own overhead per stage (0.5 GB = 476.8 MiB) beside the placer's 512 MiB,
    which the router daemon books on a GPU: its placements held 35.2 MiB a stage less than the runtime's."""
    from flexpipe.placement import placer
    from flexpipe.sim import cluster as sim_cluster
    from flexpipe.sim.cluster import place_pipeline, place_server_tp

    assert sim_cluster.STAGE_OVERHEAD_BYTES == placer.STAGE_OVERHEAD_BYTES
    costs = ModelCosts.for_model("llama2-7b")
    c = Cluster.uniform(1, 4, "A100-80")
    p = place_pipeline(c, costs, 2, kv_min=1024, kv_want=4096)
    assert p is not None
    for s in p.stages:   # an empty GPU gives each stage what it wants: params, overhead and KV
        sc = costs.stage(s.start, s.end)
        assert s.bytes_per_gpu - sc.param_bytes - 4096 * sc.kv_bytes_per_token == pytest.approx(
            placer.STAGE_OVERHEAD_BYTES)
        assert s.kv_tokens == 4096
    (whole,) = place_server_tp(c, costs, kv_min=1024, kv_want=4096).stages
    sc = costs.stage(0, costs.num_units)
    assert whole.bytes_per_gpu - (sc.param_bytes + 4096 * sc.kv_bytes_per_token) / len(whole.gpus) == pytest.approx(
        placer.STAGE_OVERHEAD_BYTES)


def test_a_scenario_that_ends_within_its_warm_up_is_refused_before_any_work():
    # paper-82gpu measures from 300 s on: run for 200 s, it reported goodput 0.00 and SLO 0.0% as results
    from flexpipe.errors import ConfigError
    from flexpipe.sim import scenarios
    from flexpipe.sim.cli import run_evaluation

    with pytest.raises(ConfigError, match=r"duration 200 s ends within paper-82gpu's warm-up of 300 s.*"
                                          r"give a duration above 300 s"):
        run_evaluation("paper-82gpu", [1.0], ["static-peak"], duration=200.0, progress=False)
    sc = replace(scenarios.get("1000gpu-24h"), duration_s=600.0)
    with pytest.raises(ConfigError, match="warm-up of 600 s"):
        scenarios.run_one(sc, make_policy("static-peak"), Trace.empty(), 0)
    for bad in (float("nan"), float("inf"), -5.0, 0.0):
        with pytest.raises(ConfigError, match="give a finite number of seconds > 0"):
            run_evaluation("small", [1.0], ["static-peak"], duration=bad, progress=False)
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ConfigError, match="give a finite number of requests/s >= 0"):
            run_evaluation("small", [1.0], ["static-peak"], rate=bad, progress=False)


def test_a_rate_of_zero_runs_an_idle_cluster():
    """Kept on purpose: no traffic measures what each policy holds with nothing to serve."""
    from flexpipe.sim.cli import run_evaluation

    res = run_evaluation("small", [1.0], ["static-peak", "flexpipe"], duration=60.0, rate=0.0, progress=False)
    by = {r["policy"]: r for r in res["runs"]}
    assert by["static-peak"]["requests"] == by["flexpipe"]["requests"] == 0
    assert by["static-peak"]["summary"]["reserved_gpu_eq_mean"] > 0
    assert by["flexpipe"]["summary"]["reserved_gpu_eq_mean"] == 0.0

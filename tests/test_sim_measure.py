"""The perf model's CPU entry against the real runtime's measured stage times (FP-7, docs/sim.md).

Times FP-3's StageCore (the `tiny` preset, one torch thread) for 12 stage steps, fits the CPU entry on
9 and checks the relative error on the 3 held out.  An accuracy bound, not a timing assertion: every
figure is the fastest of several calls, and a loaded machine gets one more round with more calls.
"""

from __future__ import annotations

import json

from flexpipe.sim.measure import calibrate_cpu, costs_for_doc, to_json

# The roofline (max(FLOPs, bytes) + per-unit overhead) has no per-sequence term and no cache effects,
# both visible on a CPU: held-out errors of 12-33% were measured on this project's 2-core machine
# under a load average of ~8 (docs/sim.md); the bound leaves room for that noise.
HELD_OUT_MEAN_BOUND = 0.40


def test_cpu_entry_fits_measured_stage_times_within_the_stated_error():
    res = calibrate_cpu(("tiny",), repeats=5, quick=True)
    if res.test_mean_rel_err >= HELD_OUT_MEAN_BOUND:  # other processes took the cores: measure again
        res = calibrate_cpu(("tiny",), repeats=12, quick=True)
    assert res.n_train == 9 and res.n_test == 3
    assert res.test_mean_rel_err < HELD_OUT_MEAN_BOUND, res
    g = res.fit.gpu
    assert g.name == "CPU" and 0 < g.compute_eff <= 1 and 0 < g.mem_eff <= 1 and g.unit_overhead_s >= 0
    # the measurements round-trip through the documented file format
    (name, ms), = res.measurements.items()
    doc = json.loads(json.dumps(to_json(name, ms)))
    assert doc["model"] == "tiny" and doc["gpu"] == "CPU" and len(doc["measurements"]) == 12
    assert {m["phase"] for m in doc["measurements"]} == {"prefill", "decode"}
    assert costs_for_doc(doc).num_units == 18

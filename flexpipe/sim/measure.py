"""Measured stage times of the real runtime on this CPU, for calibrating the perf model (perf.py).

`measure_cpu()` builds FP-3's `StageCore` (the compute a stage process runs: units of a contiguous
range, paged KV, sampling on the last stage) for several unit ranges and times `forward()` on one torch
thread, as a stage process runs, for prefill chunks (tokens x starting position) and decode steps
(sequences x context), and returns them as `perf.Measurement`s: the format `flexpipe simulate calibrate
--measurements FILE.json` reads (docs/sim.md).  `calibrate_cpu()` measures, fits the "CPU" entry on
a training share of the points and reports the relative error on the held-out rest.

Each figure is the fastest of `repeats` timed calls after one warm-up call: what the work costs, not
how busy the machine was meanwhile (on this shared 2-core machine, with a load average of ~8, other
processes inflate single calls several-fold; the median of 5 moved by up to 2x between identical
points, the minimum by a few percent).  This is `runtime.autoscale.time_stage`'s choice too.  Decode
steps repeat on the same sequences (the context grows by one token per call; the mean is recorded).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any, Sequence

from flexpipe.sim.perf import GPUS, Calibration, GPUSpec, Measurement, ModelCosts, calibrate

# A small Llama (hidden 512) for `calibrate_cpu(models=("tiny", CAL_SMALL))`.  Not in the default set:
# its stages stream 10-50 MB of weights, partly from cache, which one `mem_bw` cannot describe beside
# tiny's cache-resident ones (held-out error 30-70% when fitted together on this machine, vs 9-33% for
# tiny alone).
CAL_SMALL = dict(arch="llama", vocab_size=259, hidden_size=512, intermediate_size=1376, num_layers=4,
                 num_heads=8, num_kv_heads=4, max_position_embeddings=4096, norm_eps=1e-5,
                 bos_token_id=256, eos_token_ids=(257,), pad_token_id=258)


@dataclass(frozen=True, slots=True)
class Point:
    """One stage step to measure: units [start, end), phase, tokens, context (see Measurement)."""

    start: int
    end: int
    phase: str  # "prefill": one sequence, `tokens` new tokens from position `pos`; "decode": `tokens` sequences
    tokens: int
    pos: int  # prefill: first position of the chunk; decode: context length of every sequence


def model_config(model: str | dict[str, Any]) -> Any:
    """A ModelConfig from a preset name or a config dict (`name` defaults to "custom")."""
    from flexpipe.model.config import ModelConfig

    if isinstance(model, str):
        return ModelConfig.preset(model)
    return ModelConfig.from_dict({"name": "custom", **model})


def costs_of(cfg: Any, dtype_bytes: int = 4) -> ModelCosts:
    """perf.py's ModelCosts of a ModelConfig (FP-1's unit_costs)."""
    from flexpipe.model.units import unit_costs

    return ModelCosts(cfg.name, unit_costs(cfg, dtype_bytes=dtype_bytes), int(cfg.hidden_size), dtype_bytes)


def default_points(num_units: int, quick: bool = False) -> list[Point]:
    """Unit ranges (whole model, halves, a middle slice) x prefill chunks and decode batches."""
    n = num_units
    ranges = [(0, n // 2), (n // 2, n)] if quick else [(0, n), (0, n // 2), (n // 2, n), (n // 4, 3 * n // 4)]
    pre = ((32, 0), (128, 0), (64, 256)) if quick else ((16, 0), (128, 0), (512, 0), (128, 512), (64, 1024))
    dec = ((4, 128), (16, 128), (32, 256)) if quick else ((1, 64), (8, 256), (32, 128), (32, 512), (64, 256))
    pts = []
    for s, e in ranges:
        pts += [Point(s, e, "prefill", t, p) for t, p in pre]
        pts += [Point(s, e, "decode", b, c) for b, c in dec]
    return pts


def measure_cpu(model: str | dict[str, Any] = "tiny", points: Sequence[Point] | None = None, *,
                repeats: int = 5, threads: int = 1, block_size: int = 16, seed: int = 0) -> list[Measurement]:
    """Time `StageCore.forward` for every point on `threads` torch threads (fp32, CPU)."""
    import torch

    from flexpipe.model.checkpoint import PresetWeights
    from flexpipe.runtime.stage_core import StageCore, StepMeta

    cfg = model_config(model)
    pts = list(points) if points is not None else default_points(cfg.num_units)
    src = PresetWeights(cfg, seed=seed)
    greedy = [0.0, 0, 1.0, 0]
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    cores: dict[tuple[int, int], Any] = {}
    out = []
    try:
        for p in pts:
            need = p.tokens * (p.pos + repeats + 2) if p.phase == "decode" else p.pos + p.tokens
            blocks = -(-need // block_size) + 4 * max(p.tokens, 1)
            core = cores.get((p.start, p.end))
            if core is None or core.num_blocks < blocks:
                core = cores[(p.start, p.end)] = StageCore(cfg, src, p.start, p.end, num_blocks=max(blocks, 512),
                                                           block_size=block_size)
                warm = True
            else:
                warm = False
            first = p.start == 0

            def inp(n: int) -> torch.Tensor:
                if first:
                    return torch.arange(n, dtype=torch.int64) % 256
                return torch.randn(n, cfg.hidden_size)

            if warm:  # a new stage's first calls pay for lazy allocations and kernel selection
                for n in (64, 8):
                    x = torch.arange(n, dtype=torch.int64) % 256 if first else torch.randn(n, cfg.hidden_size)
                    core.forward(StepMeta(["w"], [0], [n], [True], [0], [greedy]), x)
                    core.reset()
            if p.phase == "prefill":
                def step() -> float:
                    core.reset()
                    if p.pos:  # the context before the chunk, untimed
                        core.forward(StepMeta(["s"], [0], [p.pos], [False], [0], [greedy]), inp(p.pos))
                    x = inp(p.tokens)
                    t0 = time.perf_counter()
                    core.forward(StepMeta(["s"], [p.pos], [p.tokens], [True], [0], [greedy]), x)
                    return time.perf_counter() - t0

                times = [step() for _ in range(repeats + 1)][1:]
                context = p.pos + p.tokens / 2.0
            else:
                ids = [f"s{j}" for j in range(p.tokens)]
                core.reset()
                n = p.tokens
                core.forward(StepMeta(ids, [0] * n, [p.pos] * n, [False] * n, [0] * n, [greedy] * n),
                             inp(n * p.pos))  # every sequence's context in one untimed call
                times, ctxs = [], []
                for k in range(repeats + 1):
                    ctx = p.pos + k
                    x = inp(p.tokens)
                    meta = StepMeta(ids, [ctx] * p.tokens, [1] * p.tokens, [True] * p.tokens, [k + 1] * p.tokens,
                                    [greedy] * p.tokens)
                    t0 = time.perf_counter()
                    core.forward(meta, x)
                    times.append(time.perf_counter() - t0)
                    ctxs.append(p.tokens * (ctx + 1))
                times, context = times[1:], float(statistics.mean(ctxs[1:]))
            core.reset()
            out.append(Measurement(p.start, p.end, p.tokens, float(min(times)), context, p.phase))
    finally:
        torch.set_num_threads(old_threads)
    return out


def to_json(model: str | dict[str, Any], ms: Sequence[Measurement], gpu: str = "CPU", dtype_bytes: int = 4) -> dict:
    """The measurements document (docs/sim.md); a config dict goes in as "config"."""
    doc: dict[str, Any] = {"gpu": gpu, "dtype_bytes": dtype_bytes,
                           "measurements": [{"start": m.start, "end": m.end, "tokens": m.tokens, "context": m.context,
                                             "phase": m.phase, "seconds": m.seconds} for m in ms]}
    if isinstance(model, str):
        doc["model"] = model
    else:
        doc["model"], doc["config"] = model.get("name", "custom"), dict(model)
    return doc


def costs_for_doc(doc: dict[str, Any]) -> ModelCosts:
    """ModelCosts of a measurements document: its "config" when present, else its "model" preset."""
    dtype_bytes = int(doc.get("dtype_bytes", 4))
    if "config" in doc:
        return costs_of(model_config(doc["config"]), dtype_bytes)
    return ModelCosts.for_model(str(doc.get("model", "tiny")), dtype_bytes)


@dataclass(frozen=True, slots=True)
class CpuCalibration:
    """The fit on the training points and its error on the held-out ones."""

    fit: Calibration
    n_train: int
    n_test: int
    test_mean_rel_err: float
    test_max_rel_err: float
    measurements: dict[str, list[Measurement]]  # per model


def relative_errors(costs: ModelCosts, gpu: GPUSpec, ms: Sequence[Measurement]) -> list[float]:
    """|predicted - measured| / measured per measurement."""
    from flexpipe.sim.perf import _predict

    pred = _predict(costs, gpu, ms)
    return [abs(float(p) - m.seconds) / m.seconds for p, m in zip(pred, ms)]


def calibrate_cpu(models: Sequence[str | dict[str, Any]] = ("tiny",), *, repeats: int = 5,
                  holdout_every: int = 4, quick: bool = False) -> CpuCalibration:
    """Measure every model, fit the CPU entry on all but every `holdout_every`-th point (from the
    second on, which spreads the held-out points over ranges, phases and sizes), test on those.

    One fit serves all models (the CPU entry is per machine, not per model): the fit runs on the
    points of every model together, each scored against its own model's costs.
    """
    data = {}
    for i, mdl in enumerate(models):
        cfg = model_config(mdl)
        data[cfg.name] = (costs_of(cfg), measure_cpu(mdl, default_points(cfg.num_units, quick), repeats=repeats))
    base = replace(GPUS["CPU"], dtype_bytes=4)
    train = [(c, m) for c, ms in data.values() for k, m in enumerate(ms) if k % holdout_every != 1]
    test = [(c, m) for c, ms in data.values() for k, m in enumerate(ms) if k % holdout_every == 1]
    fit = calibrate_multi(base, train)
    errs = [e for c, m in test for e in relative_errors(c, fit.gpu, [m])]
    return CpuCalibration(fit, len(train), len(test), float(statistics.mean(errs)), float(max(errs)),
                          {k: v[1] for k, v in data.items()})


class _Stacked:
    """Several models' costs behind one unit index space, so that perf.calibrate fits them together.

    perf.stage_time takes the hidden size (attention FLOPs per context token) from the costs object;
    each stage's attention-layer count is scaled by its model's hidden / the smallest hidden instead,
    which gives the same FLOPs and, as stage_time divides KV bytes by that count and multiplies back,
    the same bytes.
    """

    def __init__(self, parts: Sequence[ModelCosts]):
        self.parts = list(parts)
        self.hidden = min(p.hidden for p in self.parts)
        self.offsets = []
        off = 0
        for p in self.parts:
            self.offsets.append(off)
            off += p.num_units
        self.num_units = off

    def stage(self, start: int, end: int) -> Any:
        for p, off in zip(self.parts, self.offsets):
            if off <= start < off + p.num_units:
                sc = p.stage(start - off, end - off)
                return replace(sc, attn_layers=sc.attn_layers * p.hidden / self.hidden)
        raise IndexError(start)


def calibrate_multi(gpu: GPUSpec, pairs: Sequence[tuple[ModelCosts, Measurement]]) -> Calibration:
    """perf.calibrate over measurements of several models (each with its own costs and hidden size)."""
    parts: list[ModelCosts] = []
    for c, _ in pairs:
        if all(c is not p for p in parts):
            parts.append(c)
    if len(parts) == 1:
        return calibrate(parts[0], gpu, [m for _, m in pairs])
    stacked = _Stacked(parts)
    offs = {id(p): off for p, off in zip(stacked.parts, stacked.offsets)}
    ms = [replace(m, start=m.start + offs[id(c)], end=m.end + offs[id(c)]) for c, m in pairs]
    return calibrate(stacked, gpu, ms)  # type: ignore[arg-type]


def main_measure(out_path: str | None, repeats: int = 5, quick: bool = False) -> int:
    """`flexpipe simulate calibrate --measure-cpu`: measure, fit, report; write the file if asked."""
    import sys

    res = calibrate_cpu(repeats=repeats, quick=quick)
    g = res.fit.gpu
    if out_path:
        ((name, ms),) = res.measurements.items()
        with open(out_path, "w") as f:
            json.dump(to_json(name, ms), f, indent=1)
    print(json.dumps({"gpu": g.name, "peak_flops": g.peak_flops, "mem_bw": g.mem_bw, "compute_eff": g.compute_eff,
                      "mem_eff": g.mem_eff, "unit_overhead_s": g.unit_overhead_s, "fitted_on": res.n_train,
                      "held_out": res.n_test, "fit_mean_rel_err": res.fit.mean_abs_rel_err,
                      "held_out_mean_rel_err": res.test_mean_rel_err, "held_out_max_rel_err": res.test_max_rel_err,
                      "before_mean_rel_err": res.fit.before_mean_abs_rel_err}, indent=1))
    print(f"CPU: compute_eff {g.compute_eff:.3f}, mem_eff {g.mem_eff:.3f}, unit overhead "
          f"{g.unit_overhead_s * 1e6:.1f} us; held-out mean |error| {res.test_mean_rel_err:.1%} "
          f"(max {res.test_max_rel_err:.1%}) on {res.n_test} points; fitted on {res.n_train} "
          f"(mean {res.fit.mean_abs_rel_err:.1%}; the current CPU entry: {res.fit.before_mean_abs_rel_err:.1%})",
          file=sys.stderr)
    return 0

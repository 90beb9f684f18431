"""`flexpipe simulate`: run the cluster-scale evaluation, or calibrate the performance model.

    flexpipe simulate --preset paper-82gpu --cv 1,2,4,8 --out DIR
    flexpipe simulate calibrate --measurements FILE.json
    flexpipe simulate calibrate --measure-cpu [--measurements FILE.json]   # time the runtime's stages here

Hooked into flexpipe/cli.py with `add_simulate_parser(subparsers)`; the handler is `simulate_main`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from flexpipe.errors import ConfigError


def add_simulate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `simulate` subcommand to an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser("simulate", help="cluster-scale simulation of FlexPipe and baselines",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="run", choices=["run", "calibrate"],
                   help="run an evaluation (default) or calibrate the performance model")
    p.add_argument("--preset", default="paper-82gpu", help="scenario: paper-82gpu, 1000gpu-24h, small")
    p.add_argument("--cv", default="1,2,4,8", help="comma-separated CVs of inter-arrival times")
    p.add_argument("--policies", default="all",
                   help="comma-separated: flexpipe, static-peak, serverlessllm, alpaserve, muxserve (or all)")
    p.add_argument("--out", default=None, help="directory for results.json, table.md and PNG plots")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--duration", type=float, default=None, help="seconds of traffic (default: the preset's)")
    p.add_argument("--rate", type=float, default=None, help="mean requests/s (default: the preset's)")
    p.add_argument("--lengths", nargs="*", default=None,
                   help="Azure LLM trace CSVs to draw lengths from (default: the shipped slice)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--measurements", default=None, help="calibrate: measured stage times (JSON, see docs/sim.md)")
    p.add_argument("--gpu", default=None, help="calibrate: GPU entry to fit (default: the file's)")
    p.add_argument("--measure-cpu", action="store_true",
                   help="calibrate: time the real runtime's StageCore on this CPU (one torch thread), fit the "
                        "CPU entry on 3/4 of the points and report the error on the rest; with --measurements, "
                        "write the measurements there")
    p.add_argument("--repeats", type=int, default=5, help="calibrate --measure-cpu: timed calls per point (fastest)")
    p.add_argument("--quick", action="store_true", help="calibrate --measure-cpu: 12 points instead of 40")
    p.set_defaults(func=simulate_main)
    return p


def _calibrate(args: argparse.Namespace) -> int:
    from flexpipe.sim.perf import GPUS, ModelCosts, calibrate, load_measurements

    if args.measure_cpu:
        from flexpipe.sim.measure import main_measure

        return main_measure(args.measurements, repeats=args.repeats, quick=args.quick)
    if not args.measurements:
        raise ConfigError("calibrate needs --measurements FILE.json (or --measure-cpu)")
    try:
        model, gpu, dtype_bytes, ms = load_measurements(args.measurements)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--measurements {args.measurements}: not a JSON file ({e}); see docs/sim.md "
                          "for the format") from None
    gpu = args.gpu or gpu
    if gpu not in GPUS:
        raise ConfigError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)}")
    from dataclasses import replace

    spec = replace(GPUS[gpu], dtype_bytes=dtype_bytes)
    with open(args.measurements) as f:
        doc = json.load(f)
    if "config" in doc:  # a model that is no preset: its ModelConfig travels in the file
        from flexpipe.sim.measure import costs_for_doc

        costs = costs_for_doc(doc)
    else:
        costs = ModelCosts.for_model(model, dtype_bytes)
    cal = calibrate(costs, spec, ms)
    d = cal.to_dict()
    d["model"] = model
    print(json.dumps(d, indent=1))
    print(f"{gpu}: compute_eff {d['compute_eff']:.3f}, mem_eff {d['mem_eff']:.3f}, unit overhead "
          f"{d['unit_overhead_s'] * 1e6:.1f} us; mean |error| {d['mean_abs_rel_err']:.1%} "
          f"(max {d['max_abs_rel_err']:.1%}, before fitting {d['before_mean_abs_rel_err']:.1%}) over {cal.n} "
          f"measurements", file=sys.stderr)
    return 0


def run_evaluation(preset: str, cvs: list[float], policies: list[str], seed: int = 0,
                   duration: float | None = None, rate: float | None = None, lengths: list[str] | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Run every (CV, policy) pair of a preset; returns the results document (JSON-able)."""
    from dataclasses import replace

    from flexpipe.sim import report, scenarios
    from flexpipe.sim.baselines import make_policy
    from flexpipe.sim.traces import default_lengths

    sc = scenarios.get(preset)
    if duration is not None:
        sc = replace(sc, duration_s=duration)
    if rate is not None:
        sc = replace(sc, rate=rate)
    sc.check()   # before any trace is drawn or file read
    lens = default_lengths(lengths)
    runs = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(cvs) * len(policies) * sc.duration_s, unit="sim-s", unit_scale=True,
                   dynamic_ncols=True, file=sys.stderr)
    for cv in cvs:
        trace = sc.trace(cv, seed, lens)
        for name in policies:
            done = [0.0]

            def prog(t: float, done: list[float] = done) -> None:
                if bar is not None:
                    step = min(t, sc.duration_s) - done[0]
                    if step > 0:
                        bar.update(step)
                        done[0] += step

            if bar is not None:
                bar.set_description(f"CV={cv:g} {name}")
            sim, wall = scenarios.run_one(sc, make_policy(name), trace, seed, prog)
            if bar is not None and done[0] < sc.duration_s:
                bar.update(sc.duration_s - done[0])
            runs.append({"cv": cv, "policy": name, "wall_s": wall, "summary": report.summarise(sim, name),
                         "series": report.series(sim), "latencies": report.latencies(sim),
                         "reshape_log": [vars(r) for r in sim.reshapes[:200]],
                         "trace_cv": trace.cv(), "requests": len(trace)})
    if bar is not None:
        bar.close()
    return {"preset": preset, "seed": seed, "duration_s": sc.duration_s, "rate": sc.rate,
            "models": sc.models, "cvs": cvs, "policies": policies, "runs": runs}


def simulate_main(args: argparse.Namespace) -> int:
    """Handler of `flexpipe simulate`; returns the exit status."""
    if args.what == "calibrate":
        return _calibrate(args)
    from flexpipe.sim import report
    from flexpipe.sim.baselines import POLICIES

    cvs = _cvs(args.cv)
    pols = list(POLICIES) if args.policies == "all" else [x.strip() for x in args.policies.split(",") if x.strip()]
    if not pols:
        raise ConfigError(f"--policies {args.policies!r} names no policy; known: {', '.join(POLICIES)} (or all)")
    for p in pols:
        if p not in POLICIES:
            raise ConfigError(f"unknown policy {p!r}; known: {', '.join(POLICIES)}")
    res = run_evaluation(args.preset, cvs, pols, args.seed, args.duration, args.rate, args.lengths,
                         progress=not args.quiet)
    rows = [dict(r["summary"], cv=r["cv"]) for r in res["runs"]]
    print(report.markdown_table(rows))
    for r in res["runs"]:
        print(f"CV={r['cv']:g} {r['policy']}: {r['wall_s']:.1f} s wall, {r['requests']} requests", file=sys.stderr)
    if args.out:
        paths = report.write(res, args.out, plots=not args.no_plots)
        print(f"wrote {len(paths)} files into {args.out}", file=sys.stderr)
    return 0


def _cvs(text: str) -> list[float]:
    """The CVs of --cv: numbers >= 0 (0: evenly spaced arrivals, 1: Poisson), at least one."""
    out = []
    for x in str(text).split(","):
        if not x.strip():
            continue
        try:
            cv = float(x)
        except ValueError:
            raise ConfigError(f"--cv {text!r}: {x.strip()!r} is not a number") from None
        if not math.isfinite(cv) or cv < 0:
            raise ConfigError(f"--cv {text!r}: a CV is a number >= 0 (0: evenly spaced arrivals, 1: Poisson), "
                              f"not {x.strip()}")
        out.append(cv)
    if not out:
        raise ConfigError(f"--cv {text!r} names no CV; give e.g. 1,2,4,8")
    return out


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m flexpipe.sim.cli ...`) until flexpipe/cli.py hooks it in."""
    ap = argparse.ArgumentParser(prog="flexpipe")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_simulate_parser(sub)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

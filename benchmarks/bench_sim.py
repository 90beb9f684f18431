"""Simulator speed: the paper-82gpu run (2 h, 20 QPS base) per policy, and 1,000 GPUs x 24 h.

    .venv/bin/python benchmarks/bench_sim.py [--cv 4] [--skip-1000 | --skip-82] [--hours-1000 24]

Targets (FP-7): under 60 s per policy for 82 GPUs x 2 h; under 10 minutes for 1,000 GPUs x 24 h.
Prints wall time (and the process's CPU time, which other jobs on the machine disturb less), simulated
requests, requests simulated per second and the ratio to the target.  The 1,000-GPU run shows a
progress bar on stderr (simulated time; `--no-progress` turns it off).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexpipe.sim import report, scenarios  # noqa: E402
from flexpipe.sim.baselines import POLICIES, make_policy  # noqa: E402


def bench(preset: str, cv: float, policies: list[str], hours: float | None, target_s: float,
          progress: bool = False) -> None:
    sc = scenarios.get(preset)
    if hours is not None:
        sc = replace(sc, duration_s=hours * 3600.0)
    t0 = time.perf_counter()
    trace = sc.trace(cv, 0)
    gen = time.perf_counter() - t0
    print(f"{preset}: {len(trace):,} requests over {sc.duration_s / 3600:.1f} h at CV={cv:g} "
          f"(trace generated in {gen:.1f} s)", flush=True)
    for name in policies:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sc.duration_s, unit="sim-s", unit_scale=True, desc=f"{preset} {name}",
                       dynamic_ncols=True, file=sys.stderr, mininterval=2.0)

        def prog(t: float) -> None:
            if bar is not None:
                bar.update(min(t, sc.duration_s) - bar.n)

        c0 = time.process_time()
        sim, wall = scenarios.run_one(sc, make_policy(name), trace, 0, prog if bar is not None else None)
        cpu = time.process_time() - c0
        if bar is not None:
            bar.update(sc.duration_s - bar.n)
            bar.close()
        t1 = time.perf_counter()
        s = report.summarise(sim, name)
        summ = time.perf_counter() - t1
        ok = "OK" if wall < target_s else "OVER"
        print(f"  {name:14s} {wall:7.1f} s wall ({cpu:.1f} s CPU)  {len(trace) / wall:9,.0f} req/s simulated  "
              f"{wall / target_s:5.2f}x of the {target_s:.0f} s target [{ok}]  goodput {s['goodput_rps']:.1f} req/s, "
              f"{s['reserved_gpu_eq_mean']:.1f} GPU-eq (summary in {summ:.1f} s)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cv", type=float, default=4.0)
    ap.add_argument("--skip-1000", action="store_true")
    ap.add_argument("--hours-1000", type=float, default=24.0)
    ap.add_argument("--policies-1000", default="flexpipe")
    ap.add_argument("--skip-82", action="store_true", help="only the 1,000-GPU run")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar for the 1,000-GPU run")
    args = ap.parse_args()
    if not args.skip_82:
        bench("paper-82gpu", args.cv, list(POLICIES), None, 60.0)
    if not args.skip_1000:
        bench("1000gpu-24h", args.cv, args.policies_1000.split(","), args.hours_1000, 600.0,
              progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())

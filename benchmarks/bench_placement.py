"""Placement benchmark: FlexPipe's placer against first-fit, best-fit, random and topology-blind.

One run, on random fragmented states of the paper's 82-GPU testbed (42 servers, 100 Gbps):
  A. fixed demand: the same 14 replicas (70% Llama2-7B, 30% OPT-66B) placed by every method on every
     state; slowest-stage time per replica, GPUs reserved, fragmentation of the free memory after.
  B. fill: replicas of one model placed until the first failure; share = replicas placed / the
     number the free memory could hold if it were one pool.
  C. mixed overflow: 60 mixed requests (more than fits), share placed by count and by bytes.
Decision time is measured at 82 GPUs and on a 1,000-GPU cluster (125 servers x 8).
Every figure is printed with its ratio to the placer's; nothing here is hard-coded.

    .venv/bin/python benchmarks/bench_placement.py            # 200 states (about 3 minutes)
    .venv/bin/python benchmarks/bench_placement.py --states 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from flexpipe.errors import PlacementError
from flexpipe.placement.fragmentation import fragmentation_ratio
from flexpipe.placement.placer import (BestFitPlacer, FirstFitPlacer, FlexPlacer, RandomPlacer, ReplicaRequest,
                                       check_placement, ideal_time, mix_for, request_for_model)
from flexpipe.placement.topology import GPU_MODELS, fragment, load_cluster, synthetic_cluster


def requests(slack: float) -> tuple[ReplicaRequest, ReplicaRequest]:
    """Llama2-7B: 1 stage, up to 4; OPT-66B: 4 stages, up to 12; target = slack x ideal time on an A100."""
    a100 = GPU_MODELS["A100-80"]
    out = []
    for name, k, kmax, kv in (("llama2-7b", 1, 4, 8192), ("opt-66b", 4, 12, 16384)):
        r = request_for_model(name, stages=k, max_stages=kmax, kv_tokens=kv, batch_tokens=256)
        r.target_time = slack * ideal_time(r, k, a100.peak_flops, a100.mem_bw)
        out.append(r)
    return out[0], out[1]


def place_seq(placer, topo, seq):
    """Place requests in order on `topo` (mutated); per request a Placement or None, and decision times.

    Decision time is the thread's CPU time (time.thread_time): the machines this runs on are shared,
    and wall time there measures the neighbours as much as the placer.
    """
    got, times = [], []
    for r in seq:
        t0 = time.thread_time()
        try:
            p = placer.place(r, topo)
        except PlacementError:
            p = None
        times.append(time.thread_time() - t0)
        if p is not None:
            check_placement(p, r, topo)
            topo.reserve(p.reservations())
        got.append(p)
    return got, times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--states", type=int, default=200)
    ap.add_argument("--cluster", default="paper-testbed-82")
    ap.add_argument("--slack", type=float, default=1.5, help="target time = slack x ideal (default 1.5)")
    ap.add_argument("--demand", type=int, default=14, help="replicas in the fixed-demand phase")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)

    llama, opt = requests(args.slack)
    mix = mix_for([(llama, 0.7), (opt, 0.3)])
    methods = [FlexPlacer(mix=mix), FlexPlacer(mix=mix, topology_aware=False), FirstFitPlacer(mix=mix),
               BestFitPlacer(mix=mix), RandomPlacer(mix=mix, seed=7)]
    names = [m.name for m in methods]
    base = load_cluster(args.cluster)
    for m in methods:  # warm-up: first calls pay for lazy imports and caches
        for r in (llama, opt):
            m.place(r, base.copy())

    A = {n: {"bn": {"llama2-7b": [], "opt-66b": []}, "gpus": [], "frag": [], "fails": 0, "dt": []} for n in names}
    B = {n: {"llama2-7b": [], "opt-66b": []} for n in names}
    C = {n: {"count": [], "bytes": []} for n in names}
    bound = {"llama2-7b": [], "opt-66b": []}
    paired_states = 0
    t_start = time.perf_counter()
    for s in range(args.states):
        st = fragment(base, seed=s)
        rng = np.random.default_rng(10_000 + s)
        seq = [llama if rng.random() < 0.7 else opt for _ in range(args.demand)]
        res = {}
        for m in methods:
            t = st.copy()
            got, dts = place_seq(m, t, seq)
            res[m.name] = (got, t)
            A[m.name]["dt"].extend(dts)
            A[m.name]["fails"] += sum(p is None for p in got)
        if all(p is not None for got, _ in res.values() for p in got):
            paired_states += 1
            for n, (got, t) in res.items():
                for r, p in zip(seq, got):
                    A[n]["bn"][r.model].append(p.bottleneck_s)
                A[n]["gpus"].append(sum(p.n_gpus for p in got))
                A[n]["frag"].append(fragmentation_ratio(t, mix))
        for r in (llama, opt):
            bound[r.model].append(int(st.free.sum() // (r.total_mem + r.stages * r.stage_overhead_bytes)))
            for m in methods:
                t, n = st.copy(), 0
                while True:
                    try:
                        p = m.place(r, t)
                    except PlacementError:
                        break
                    t.reserve(p.reservations())
                    n += 1
                B[m.name][r.model].append(n)
        seq = [llama if rng.random() < 0.7 else opt for _ in range(60)]
        want = sum(r.total_mem for r in seq)
        for m in methods:
            got, _ = place_seq(m, st.copy(), seq)
            C[m.name]["count"].append(sum(p is not None for p in got) / len(seq))
            C[m.name]["bytes"].append(sum(r.total_mem for r, p in zip(seq, got) if p is not None) / want)
    wall = time.perf_counter() - t_start

    # decision time at 1,000 GPUs (and the 82-GPU figure from phase A)
    big = synthetic_cluster(125, 8)
    dt_big = {n: [] for n in names}
    for s in range(5):
        st = fragment(big, seed=s)
        rng = np.random.default_rng(20_000 + s)
        seq = [llama if rng.random() < 0.7 else opt for _ in range(200)]
        for m in methods:
            dt_big[m.name].extend(place_seq(m, st.copy(), seq)[1])

    # the widest search: OPT-66B with no target time, so every stage count from 4 to 12 is a candidate
    wide = request_for_model("opt-66b", stages=4, max_stages=12, kv_tokens=16384, batch_tokens=256)
    dt_wide = place_seq(methods[0], fragment(big, seed=99), [wide] * 30)[1]

    ref = names[0]
    out: dict = {"states": args.states, "paired_states": paired_states, "cluster": base.name,
                 "gpus": len(base), "demand": args.demand, "slack": args.slack, "wall_s": wall, "methods": {}}
    print(f"# {base.name}: {len(base)} GPUs, {args.states} fragmented states "
          f"(mean free {100 * statistics.mean(fragment(base, s).free.sum() / base.total.sum() for s in range(10)):.0f}%), "
          f"targets: llama2-7b {1e3 * llama.target_time:.1f} ms, opt-66b {1e3 * opt.target_time:.1f} ms")
    print(f"\nA. fixed demand of {args.demand} replicas; {paired_states} states where every method placed all")
    print(f"{'method':<15} {'llama ms':>9} {'opt ms':>8} {'GPUs':>6} {'frag%':>6} {'fails':>6}   ratios to {ref}")
    rA = {}
    for n in names:
        a = A[n]
        rA[n] = (statistics.mean(a["bn"]["llama2-7b"] or [0]), statistics.mean(a["bn"]["opt-66b"] or [0]),
                 statistics.mean(a["gpus"] or [0]), statistics.mean(a["frag"] or [0]))
    for n in names:
        l, o, g, f = rA[n]
        rl, ro_, rg, rf = (x / max(y, 1e-12) for x, y in zip(rA[n], rA[ref]))
        print(f"{n:<15} {1e3 * l:>9.2f} {1e3 * o:>8.2f} {g:>6.1f} {100 * f:>6.1f} {A[n]['fails']:>6}   "
              f"llama x{rl:.3f} opt x{ro_:.3f} GPUs x{rg:.3f} frag x{rf:.3f}")
    print("\nB. fill until the first failure: replicas placed per state (share of the one-pool bound)")
    print(f"{'method':<15} {'llama2-7b':>16} {'opt-66b':>16} {'total':>8}   ratio to {ref}")
    tot_ref = sum(sum(B[ref][k]) for k in B[ref])
    for n in names:
        lt, ot = sum(B[n]["llama2-7b"]), sum(B[n]["opt-66b"])
        ls, os_ = lt / sum(bound["llama2-7b"]), ot / sum(bound["opt-66b"])
        wins = sum(x + a > y + b for x, a, y, b in zip(B[ref]["opt-66b"], B[ref]["llama2-7b"],
                                                         B[n]["opt-66b"], B[n]["llama2-7b"]))
        loss = sum(x + a < y + b for x, a, y, b in zip(B[ref]["opt-66b"], B[ref]["llama2-7b"],
                                                         B[n]["opt-66b"], B[n]["llama2-7b"]))
        vs = f"  ({ref} more on {wins} states, fewer on {loss})" if n != ref else ""
        print(f"{n:<15} {lt / args.states:>7.2f} ({100 * ls:>5.1f}%) {ot / args.states:>7.2f} ({100 * os_:>5.1f}%) "
              f"{lt + ot:>8}   x{(lt + ot) / tot_ref:.3f}{vs}")
    print("\nC. mixed overflow: 60 requests (70/30), share placed")
    print(f"{'method':<15} {'by count':>9} {'by bytes':>9}")
    for n in names:
        print(f"{n:<15} {100 * statistics.mean(C[n]['count']):>8.1f}% {100 * statistics.mean(C[n]['bytes']):>8.1f}%")
    print("\nDecision time (ms of CPU): median / p99 / max")
    print(f"{'method':<15} {'82 GPUs':>22} {'1000 GPUs':>22}")
    for n in names:
        a, b = np.array(A[n]["dt"]) * 1e3, np.array(dt_big[n]) * 1e3
        fmt = lambda x: f"{np.median(x):.2f} / {np.percentile(x, 99):.2f} / {x.max():.2f}"  # noqa: E731
        print(f"{n:<15} {fmt(a):>22} {fmt(b):>22}")
        out["methods"][n] = {
            "A_llama_bottleneck_ms": 1e3 * rA[n][0], "A_opt_bottleneck_ms": 1e3 * rA[n][1],
            "A_gpus_reserved": rA[n][2], "A_frag_ratio": rA[n][3], "A_fails": A[n]["fails"],
            "B_llama_per_state": sum(B[n]["llama2-7b"]) / args.states,
            "B_opt_per_state": sum(B[n]["opt-66b"]) / args.states,
            "B_llama_share": sum(B[n]["llama2-7b"]) / sum(bound["llama2-7b"]),
            "B_opt_share": sum(B[n]["opt-66b"]) / sum(bound["opt-66b"]),
            "C_count_share": statistics.mean(C[n]["count"]), "C_bytes_share": statistics.mean(C[n]["bytes"]),
            "dt82_median_ms": float(np.median(a)), "dt82_p99_ms": float(np.percentile(a, 99)),
            "dt82_max_ms": float(a.max()), "dt1000_median_ms": float(np.median(b)),
            "dt1000_p99_ms": float(np.percentile(b, 99)), "dt1000_max_ms": float(b.max())}
    w = np.array(dt_wide) * 1e3
    print(f"{ref} at 1000 GPUs, opt-66b without a target (stage counts 4..12 all searched): "
          f"{np.median(w):.2f} / {np.percentile(w, 99):.2f} / {w.max():.2f}")
    out["dt1000_wide_median_ms"] = float(np.median(w))
    out["dt1000_wide_max_ms"] = float(w.max())
    print(f"\n# {wall:.0f} s for the {args.states} states")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

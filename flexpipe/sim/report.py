"""Metrics of a simulated run, the paper's definitions written down, and the JSON/PNG report.

Definitions (per run; a request "finishes" when its last token is produced):
- latency: finish - arrival, split into queue (admission - arrival), communication (inter-stage
  hops while the request ran, from the pipeline's per-iteration hop time) and compute (the rest,
  including any reshape pause, which is also reported alone as `pause`).
- TTFT: first token - arrival.  TPOT: (finish - first token) / (output tokens - 1).
- SLO: TTFT <= slo_ttft_s and TPOT <= slo_tpot_s of the request's model.  goodput: requests that
  finished within SLO per second of the trace's duration.  Dropped requests (queued longer than the
  queue timeout, or unfinished at the horizon) count against goodput and are reported.
- GPU reservation: GPU-equivalents held by the policy over time, where a GPU-equivalent is one GPU's
  memory (a stage that holds 20 GB of an 80 GB GPU holds 0.25).  `reservation_share_of_peak` is the
  time average divided by the run's own peak (the paper's "reservation as a share of peak"); a static
  policy scores 100%.  `gpus_touched` counts GPUs with any memory held.
- utilisation: busy GPU-seconds / reserved GPU-seconds, both counted per stage slot (a stage's GPU, each
  GPU of a tensor-parallel stage): busy is each stage's compute per the performance model (M
  micro-batches per round, never longer than the round), reserved is every slot of every replica while
  the replica holds it (loading, serving, both placements during a reshape).  A fraction by
  construction: a slot is busy only while reserved.  Co-located stages each count their own slot,
  because the engine runs each stage as if alone on its GPU (no compute sharing is modelled), so a
  per-GPU figure would count one GPU busy twice at once.
  resource efficiency: goodput per reserved GPU-equivalent (req/s/GPU).
- stall: a request whose TTFT exceeds 1.5x the run's P25 TTFT; a stall episode starts at the arrival of
  the first such request and recovers at the arrival of the next request whose TTFT is back within
  1.2x P25; recovery time is the episode's length.
- warm-up: requests arriving in the first `warmup_s` seconds are simulated but not measured (every
  policy starts cold or pre-provisioned there); reservation figures then come from the periodic
  samples inside the measured span.
- reshapes: count, preparation time (loading + KV pre-copy, requests keep running) and pause (the
  quiesce-delta-switch window every running request of the replica sees).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from flexpipe.sim.engine import Simulator


def _pct(x: np.ndarray, q: float) -> float:
    return float(np.percentile(x, q)) if len(x) else float("nan")


def _stalls(arr: np.ndarray, ttft: np.ndarray) -> dict[str, float]:
    if len(ttft) < 4:
        return {"stall_episodes": 0, "recovery_mean_s": 0.0, "recovery_p50_s": 0.0, "recovery_p99_s": 0.0,
                "stalled_share": 0.0}
    base = float(np.percentile(ttft, 25))
    hi, lo = 1.5 * base, 1.2 * base
    # an episode starts at the first request above hi and ends at the next one at or below lo;
    # one searchsorted per boundary instead of a Python step per request
    up = np.flatnonzero(ttft > hi)
    down = np.flatnonzero(ttft <= lo)
    eps = []
    pos = 0
    while True:
        k = int(np.searchsorted(up, pos))
        if k == len(up):
            break
        s = up[k]
        j = int(np.searchsorted(down, s + 1))
        if j == len(down):
            eps.append(arr[-1] - arr[s])
            break
        eps.append(arr[down[j]] - arr[s])
        pos = down[j] + 1
    e = np.array(eps)
    return {"stall_episodes": int(len(e)), "recovery_mean_s": float(e.mean()) if len(e) else 0.0,
            "recovery_p50_s": _pct(e, 50) if len(e) else 0.0, "recovery_p99_s": _pct(e, 99) if len(e) else 0.0,
            "stalled_share": float(np.mean(ttft > hi)), "p25_ttft_s": base}


def summarise(sim: Simulator, policy_name: str | None = None) -> dict[str, Any]:
    """All metrics of one finished run, as plain JSON-able values."""
    w = float(getattr(sim, "warmup_s", 0.0))
    dur = max(sim.duration - w, 1e-9)
    measured = sim.arr >= w
    fin = ~np.isnan(sim.finish_t) & ~sim.dropped & measured
    arr = sim.arr[fin]
    lat = sim.finish_t[fin] - arr
    queue = sim.admit_t[fin] - arr
    comm = np.minimum(sim.comm_s[fin], lat - queue)
    compute = lat - queue - comm
    ttft = sim.first_t[fin] - arr
    out = sim.out[fin]
    tpot = np.where(out > 1, (sim.finish_t[fin] - sim.first_t[fin]) / np.maximum(out - 1, 1), 0.0)
    m = sim.model_of[fin]
    slo_t = np.array([ms.spec.slo_ttft_s for ms in sim.models])[m]
    slo_p = np.array([ms.spec.slo_tpot_s for ms in sim.models])[m]
    ok = (ttft <= slo_t) & (tpot <= slo_p)
    res_mean = sim.res_eq_int / max(sim.now, 1e-9)
    gpus_mean = sim.res_gpus_int / max(sim.now, 1e-9)
    res_peak, gpus_peak = sim.res_eq_peak, sim.res_gpus_peak
    samp = np.array([x for x in sim.samples if w <= x[0] <= sim.duration])
    if len(samp):  # from the periodic samples (every sample_s) inside the span goodput is measured over
        # (not the whole run: the drain after the trace would count for a policy that scales down there)
        res_mean, gpus_mean = float(samp[:, 1].mean()), float(samp[:, 2].mean())
        res_peak, gpus_peak = float(samp[:, 1].max()), int(samp[:, 2].max())
    goodput = float(ok.sum()) / dur
    pauses = np.array([r.pause_s for r in sim.reshapes if r.switched])  # a replica released first never paused
    preps = np.array([r.prep_s for r in sim.reshapes])
    per_model = {}
    for ms in sim.models:
        sel = m == ms.idx
        requests = int(((sim.model_of == ms.idx) & measured).sum())
        per_model[ms.spec.name] = {
            "requests": requests, "finished": int(sel.sum()),
            # over every request, as the global figure: a dropped one did not meet its SLO
            "slo_attainment": float(ok[sel].sum()) / max(requests, 1),
            "latency_p50_s": _pct(lat[sel], 50), "latency_p99_s": _pct(lat[sel], 99),
            "ttft_p50_s": _pct(ttft[sel], 50), "ttft_p99_s": _pct(ttft[sel], 99),
            "tpot_p50_s": _pct(tpot[sel & (out > 1)], 50), "reshapes": ms.reshapes,
            "scale_ups": ms.scale_ups, "scale_downs": ms.scale_downs}
    order = np.argsort(arr, kind="stable")
    s = {
        "policy": policy_name or getattr(sim.policy, "name", "?"),
        "policy_impl": getattr(sim.policy, "impl", "baseline"),
        "placer": getattr(sim.policy, "placer_impl", "sim fallback"),
        "requests": int(measured.sum()), "finished": int(fin.sum()), "dropped": int((sim.dropped & measured).sum()),
        "warmup_s": w,
        "duration_s": sim.duration,
        "goodput_rps": goodput, "throughput_rps": float(fin.sum()) / dur,
        "slo_attainment": float(ok.sum()) / max(int(measured.sum()), 1),
        "latency_mean_s": float(lat.mean()) if len(lat) else float("nan"),
        "latency_p50_s": _pct(lat, 50), "latency_p99_s": _pct(lat, 99),
        "queue_mean_s": float(queue.mean()) if len(lat) else float("nan"),
        "comm_mean_s": float(comm.mean()) if len(lat) else float("nan"),
        "compute_mean_s": float(compute.mean()) if len(lat) else float("nan"),
        "queue_p50_s": _pct(queue, 50), "queue_p99_s": _pct(queue, 99),
        "comm_p50_s": _pct(comm, 50), "comm_p99_s": _pct(comm, 99),
        "compute_p50_s": _pct(compute, 50), "compute_p99_s": _pct(compute, 99),
        "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
        "tpot_p50_s": _pct(tpot[out > 1], 50), "tpot_p99_s": _pct(tpot[out > 1], 99),
        "reserved_gpu_eq_mean": res_mean, "reserved_gpu_eq_peak": res_peak,
        "reservation_share_of_peak": res_mean / res_peak if res_peak > 0 else 0.0,
        "reservation_share_of_cluster": res_mean / sim.cluster.capacity_eq,
        "gpus_touched_mean": gpus_mean, "gpus_touched_peak": gpus_peak,
        "utilisation": sim.busy_gpu_s / sim.res_slots_int if sim.res_slots_int > 0 else 0.0,
        "efficiency_rps_per_gpu": goodput / res_mean if res_mean > 0 else 0.0,
        "reshapes": len(sim.reshapes),
        "reshape_pause_p50_s": _pct(pauses, 50) if len(pauses) else 0.0,
        "reshape_pause_p99_s": _pct(pauses, 99) if len(pauses) else 0.0,
        "reshape_prep_mean_s": float(preps.mean()) if len(preps) else 0.0,
        "pause_seen_mean_s": float(sim.stall_s[fin].mean()) if fin.any() else 0.0,
        "scale_ups": sum(ms.scale_ups for ms in sim.models),
        "scale_downs": sum(ms.scale_downs for ms in sim.models),
        "per_model": per_model,
    }
    s.update(_stalls(arr[order], ttft[order]))
    return s


def series(sim: Simulator) -> dict[str, list[float]]:
    """Time series for plots: reservation and load per sample interval."""
    if not sim.samples:
        return {"t": [], "reserved_gpu_eq": [], "gpus_touched": [], "queued": [], "arrival_rps": []}
    a = np.array(sim.samples)
    t = a[:, 0]
    edges = np.concatenate([t, [t[-1] + sim.sample_s]])
    counts, _ = np.histogram(sim.arr, bins=edges)
    return {"t": t.tolist(), "reserved_gpu_eq": a[:, 1].tolist(), "gpus_touched": a[:, 2].tolist(),
            "queued": a[:, 3].tolist(), "arrival_rps": (counts / sim.sample_s).tolist()}


def latencies(sim: Simulator, cap: int = 2000) -> list[float]:
    """A sorted sample of end-to-end latencies (evenly spaced quantiles) for CDF plots."""
    fin = ~np.isnan(sim.finish_t) & ~sim.dropped
    lat = np.sort(sim.finish_t[fin] - sim.arr[fin])
    if len(lat) > cap:
        lat = lat[np.linspace(0, len(lat) - 1, cap).astype(int)]
    return lat.tolist()


# ---------------------------------------------------------------------------------------------
# table and plots
TABLE_COLS = [("goodput_rps", "goodput req/s", "{:.2f}"), ("slo_attainment", "SLO %", "{:.1%}"),
              ("latency_p50_s", "lat p50 s", "{:.2f}"), ("latency_p99_s", "lat p99 s", "{:.1f}"),
              ("queue_mean_s", "queue s", "{:.2f}"), ("comm_mean_s", "comm s", "{:.2f}"),
              ("compute_mean_s", "compute s", "{:.2f}"), ("ttft_p99_s", "TTFT p99 s", "{:.2f}"),
              ("tpot_p50_s", "TPOT p50 ms", "{:.0f}ms"), ("reserved_gpu_eq_mean", "GPU-eq mean", "{:.1f}"),
              ("reservation_share_of_peak", "resv/peak", "{:.0%}"), ("utilisation", "util", "{:.0%}"),
              ("efficiency_rps_per_gpu", "req/s/GPU", "{:.2f}"), ("recovery_p50_s", "recov p50 s", "{:.2f}"),
              ("reshapes", "reshapes", "{}"), ("dropped", "dropped", "{}")]


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """One row per (CV, policy)."""
    head = "| CV | policy | " + " | ".join(c[1] for c in TABLE_COLS) + " |"
    sep = "|" + "---|" * (len(TABLE_COLS) + 2)
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _, fmt in TABLE_COLS:
            v = r.get(key, float("nan"))
            if key == "tpot_p50_s":
                cells.append(fmt.format(v * 1e3) if v == v else "-")
            else:
                cells.append(fmt.format(v) if not (isinstance(v, float) and math.isnan(v)) else "-")
        lines.append(f"| {r.get('cv', '')} | {r['policy']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_all(results: dict[str, Any], out: str | Path) -> list[str]:
    """PNG plots of a `results` document (see cli.simulate_main) into `out`; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    paths = []
    runs = results["runs"]
    cvs = sorted({r["cv"] for r in runs})
    pols = list(dict.fromkeys(r["policy"] for r in runs))
    for cv in cvs:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        ax2 = ax.twinx()
        load_drawn = False
        for r in runs:
            if r["cv"] != cv:
                continue
            s = r["series"]
            t = np.array(s["t"]) / 60
            ax.plot(t, s["reserved_gpu_eq"], label=r["policy"], lw=1.2)
            if not load_drawn:
                rps = np.convolve(s["arrival_rps"], np.ones(6) / 6, mode="same")
                ax2.plot(t, rps, color="0.6", lw=0.8, ls=":", label="load (req/s, 1-min avg)")
                load_drawn = True
        ax.set_xlabel("time (min)")
        ax.set_ylabel("GPU-equivalents reserved")
        ax2.set_ylabel("arrivals (req/s)")
        ax.set_title(f"GPU reservation vs load, CV={cv}")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
        fig.tight_layout()
        p = out / f"reservation_cv{cv:g}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(str(p))

        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for r in runs:
            if r["cv"] != cv or not r["latencies"]:
                continue
            lat = np.array(r["latencies"])
            ax.plot(lat, np.linspace(0, 1, len(lat)), label=r["policy"])
        ax.set_xscale("log")
        ax.set_xlabel("end-to-end latency (s)")
        ax.set_ylabel("CDF")
        ax.set_title(f"latency CDF, CV={cv}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        p = out / f"latency_cdf_cv{cv:g}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(str(p))

    # summary across CV: goodput, p99 latency, reservation share, efficiency
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    for key, ax, title in [("goodput_rps", axes[0], "goodput (req/s)"), ("latency_p50_s", axes[1], "latency p50 (s)"),
                           ("reserved_gpu_eq_mean", axes[2], "GPU-eq reserved (mean)"),
                           ("efficiency_rps_per_gpu", axes[3], "goodput per GPU-eq")]:
        w = 0.8 / max(len(pols), 1)
        for i, pol in enumerate(pols):
            ys = [next((r["summary"][key] for r in runs if r["cv"] == cv and r["policy"] == pol), 0.0) for cv in cvs]
            ax.bar(np.arange(len(cvs)) + i * w, ys, w, label=pol)
        ax.set_xticks(np.arange(len(cvs)) + w * (len(pols) - 1) / 2)
        ax.set_xticklabels([f"CV={c:g}" for c in cvs])
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    p = out / "summary.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(str(p))

    # latency breakdown (queue / comm / compute means)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    labels, q, c, k = [], [], [], []
    for r in runs:
        s = r["summary"]
        labels.append(f"{r['policy']}\nCV={r['cv']:g}")
        q.append(s["queue_mean_s"])
        c.append(s["comm_mean_s"])
        k.append(s["compute_mean_s"])
    x = np.arange(len(labels))
    ax.bar(x, q, label="queue")
    ax.bar(x, c, bottom=q, label="communication")
    ax.bar(x, k, bottom=np.array(q) + np.array(c), label="compute")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=6, rotation=90)
    ax.set_ylabel("mean latency (s)")
    ax.set_yscale("symlog", linthresh=1)
    ax.legend()
    fig.tight_layout()
    p = out / "latency_breakdown.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(str(p))
    return paths


def write(results: dict[str, Any], out: str | Path, plots: bool = True) -> list[str]:
    """results.json, table.md and the PNGs into `out`."""
    out = Path(out)
    os.makedirs(out, exist_ok=True)
    rows = [dict(r["summary"], cv=r["cv"]) for r in results["runs"]]
    (out / "table.md").write_text(markdown_table(rows) + "\n")
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=1, default=float)
    paths = [str(out / "results.json"), str(out / "table.md")]
    if plots:
        paths += plot_all(results, out)
    return paths

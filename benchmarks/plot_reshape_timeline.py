"""Draw the timeline of one measured reshape (docs/reshape_timeline.png) from bench_reshape.py's JSON.

    .venv/bin/python benchmarks/bench_reshape.py --out results.json
    .venv/bin/python benchmarks/plot_reshape_timeline.py results.json docs/reshape_timeline.png

The JSON's "timeline" is the first split with peer weights: every ask the controller made (stage
launches, SendUnits/PrepareUnits, ExportKV rounds, Activate), the router's quiesce/switch/resume,
and the token arrival times of every request around it.  Top: the whole call (process start-up
dominates); bottom: the last few hundred milliseconds, where the copies and the pause are.
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

COLORS = {"launch": "#b0b0b0", "SendUnits": "#4c72b0", "PrepareUnits": "#8fb3e0", "precopy": "#55a868",
          "delta": "#dd8452", "Activate": "#8172b2", "quiesce": "#c44e52"}


def lanes_of(op: dict) -> tuple[list[str], dict[str, str]]:
    """Lane order (router, then stages in the new shape's order, retired ones last) and their labels."""
    before = {name: (s, e) for _, s, e, name in op["before"]}
    after = {name: (s, e) for _, s, e, name in op["after"]}
    names = [n for _, _, _, n in op["after"]] + [n for n in before if n not in after]
    labels = {"router": "router\n(controller)"}
    for n in names:
        old = f"[{before[n][0]},{before[n][1]})" if n in before else "new"
        new = f"[{after[n][0]},{after[n][1]})" if n in after else "retired"
        labels[n] = f"{n}\nunits {old} -> {new}"
    return ["router"] + names, labels


def draw(ax, data: dict, t0: float, unit: float, window: tuple[float, float], detail: bool) -> None:
    tl = data["timeline"]
    op = tl["op"]
    lanes, labels = lanes_of(op)
    y = {n: 1.3 * i for i, n in enumerate(lanes)}
    q0 = next(e["t0"] for e in tl["events"] if e["what"] == "quiesce")
    resume = next(e["t0"] for e in tl["events"] if e["what"] == "resume")

    def x(t: float) -> float:
        return (t - t0) / unit

    def bar(lane: str, a: float, b: float, color: str, text: str = "", hatch: str | None = None) -> None:
        w = max(x(b) - x(a), (window[1] - window[0]) / unit * 0.002)
        ax.barh(y[lane], w, left=x(a), height=0.55, color=color, edgecolor="black", linewidth=0.4, hatch=hatch)
        if text and detail:
            ax.text(x(a) + w / 2, y[lane] + 0.36, text, ha="center", va="bottom", fontsize=6.5)

    for e in tl["events"]:
        what = e["what"]
        if what == "launch":
            bar(e["to"], e["t0"], e["t1"], COLORS["launch"], "process start")
        elif what == "SendUnits":
            mb = e.get("bytes", 0) / 2**20
            bar(e["to"], e["t0"], e["t1"], COLORS["SendUnits"], f"send weights {mb:.1f} MB")
            bar(e["dest"], e["t0"], e["t1"], COLORS["SendUnits"], hatch="///")
            ax.annotate("", xy=(x(e["t1"]), y[e["dest"]]), xytext=(x(e["t0"]), y[e["to"]]),
                        arrowprops=dict(arrowstyle="->", color=COLORS["SendUnits"], lw=0.8))
        elif what == "PrepareUnits":
            bar(e["to"], e["t0"], e["t1"], COLORS["PrepareUnits"], "build units")
        elif what == "ExportKV":
            kind = "precopy" if e["t0"] < q0 else "delta"
            kb = e.get("bytes", 0) / 1024
            size = f"{kb / 1024:.1f} MB" if kb >= 1024 else f"{kb:.0f} KB"
            text = f"KV {'pre-copy' if kind == 'precopy' else 'delta'} {size}"
            bar(e["to"], e["t0"], e["t1"], COLORS[kind], text)
            bar(e["dest"], e["t0"], e["t1"], COLORS[kind], hatch="///")
            ax.annotate("", xy=(x(e["t1"]), y[e["dest"]]), xytext=(x(e["t0"]), y[e["to"]]),
                        arrowprops=dict(arrowstyle="->", color=COLORS[kind], lw=0.8))
        elif what == "Activate":
            bar(e["to"], e["t0"], e["t1"], COLORS["Activate"])
        elif what == "quiesce":
            bar("router", e["t0"], e["t1"], COLORS["quiesce"])
            if detail:
                ax.text(x(e["t0"]) - 1, y["router"], "quiesce: wait for the steps in flight ", ha="right",
                        va="center", fontsize=6.5)
        elif what in ("switch", "resume"):
            ax.plot([x(e["t0"])] * 2, [y["router"] - 0.35, y["router"] + 0.35], color="black", lw=1.2)
            if detail:
                dy = -0.4 if what == "switch" else 0.4
                ax.text(x(e["t0"]) + 0.8, y["router"] + dy, what, ha="left", va="center", fontsize=6.5)
    ax.axvspan(x(q0), x(resume), color=COLORS["quiesce"], alpha=0.12, lw=0)

    # requests: one row each, a tick per token
    reqs = sorted((r for r in tl["tokens"] if any(window[0] <= t <= window[1] for t in r)), key=lambda r: r[0])
    base, step = 1.3 * len(lanes) + 0.2, 0.3 if detail else 0.12
    for k, r in enumerate(reqs):
        ts = [x(t) for t in r if window[0] <= t <= window[1]]
        ax.plot(ts, [base + k * step] * len(ts), "|", color="#333333", ms=3.5 if detail else 2.5, mew=0.6)
    ax.set_yticks([y[n] for n in lanes] + [base + (len(reqs) - 1) * step / 2])
    ax.set_yticklabels([labels[n] for n in lanes] + [f"{len(reqs)} requests\n(a tick per token)"], fontsize=7)
    ax.set_ylim(base + len(reqs) * step + 0.2, -0.9)
    ax.set_xlim(x(window[0]), x(window[1]))
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", color="#dddddd", lw=0.5)
    ax.set_axisbelow(True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="JSON written by bench_reshape.py --out")
    ap.add_argument("png", help="picture to write")
    args = ap.parse_args()
    data = json.load(open(args.results))
    tl = data["timeline"]
    op = tl["op"]
    a, b = op["t_call"], op["t_return"]
    q0 = next(e["t0"] for e in tl["events"] if e["what"] == "quiesce")
    resume = next(e["t0"] for e in tl["events"] if e["what"] == "resume")
    first_copy = min(e["t0"] for e in tl["events"] if e["what"] in ("SendUnits", "PrepareUnits", "ExportKV"))

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 11), gridspec_kw={"height_ratios": [1, 1.4]})
    draw(top, data, a, 1.0, (a - 0.3, b + 0.3), detail=False)
    top.set_xlabel("seconds since fp.reshape(stages=4) was called", fontsize=8)
    top.set_title(f"Split {op['from']} -> {op['to']} under {data['streams']} streams (peer weights): "
                  f"total {op['total_s']:.2f} s, of which prepare (process start, weights) {op['prepare_s']:.2f} s "
                  f"(zoomed below: shaded)", fontsize=9)
    zoom = (first_copy - 0.03, resume + 0.12)
    top.axvspan(zoom[0] - a, zoom[1] - a, color="#ffe9a8", alpha=0.5, lw=0)
    draw(bottom, data, q0, 1e-3, zoom, detail=True)
    bottom.set_xlabel("milliseconds from the quiesce (the pause is shaded red)", fontsize=8)
    kv, delta = op["kv_bytes"] / 2**20, op["kv_bytes_delta"] / 2**10
    bottom.set_title(f"Pause (quiesce -> resume) {op['pause_s'] * 1e3:.0f} ms; longest gap a request saw across it "
                     f"{op['seen_pause_s'] * 1e3:.0f} ms (steady-state time per token "
                     f"{tl['steady_tpot_p50_s'] * 1e3:.0f} ms); KV moved {kv:.1f} MB, {delta:.0f} KB of it in the "
                     f"pause", fontsize=9)
    legend = [Patch(color=COLORS[k], label=t) for k, t in [
        ("launch", "stage process start"), ("SendUnits", "peer weight copy (SendUnits)"),
        ("PrepareUnits", "build units (PrepareUnits)"), ("precopy", "KV pre-copy (ExportKV->ImportKV)"),
        ("delta", "KV delta after quiesce"), ("Activate", "Activate (new epoch)"), ("quiesce", "quiesce / pause")]]
    fig.legend(handles=legend, loc="lower center", ncol=4, fontsize=7.5, frameon=False)
    fig.subplots_adjust(left=0.13, right=0.98, top=0.95, bottom=0.09, hspace=0.22)
    fig.savefig(args.png, dpi=130)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()

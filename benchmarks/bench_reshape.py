"""FP-4 reshape benchmark: in-flight split/merge vs drain-and-restart and restart-and-recompute, same load.

    .venv/bin/python benchmarks/bench_reshape.py [--out results.json]   # 3 repetitions (about 3-4 minutes)
    .venv/bin/python benchmarks/bench_reshape.py --quick                 # 1 repetition, 16 streams
    .venv/bin/python benchmarks/plot_reshape_timeline.py results.json docs/reshape_timeline.png

One pipeline (stage subprocesses) of the Llama hidden 256 x 8 layers of bench_pipeline.py, loaded
from an exported checkpoint so that weights can come from the checkpoint ("source") or from the
stage that holds them ("peer").  --streams clients (default 20) each run requests back to back, greedy,
prompt j and max_tokens 64..160, so that about 20 requests are always generating.  On that load,
each repetition applies, with a quiet second before each:
    split 2->4 and merge 4->2 with fp.reshape(weights_from="peer"), then the same with "source";
    Controller.restart 2->4 and 4->2 with drain=False (restart-and-recompute: stop, rebuild,
    re-prefill every running request) and with drain=True (drain-and-restart: stop admitting, let
    running requests finish, rebuild).
Reported per kind, p50/p99 over repetitions:
  pause      the controller's pause (quiesce -> resume for a reshape; the whole rebuild for a restart);
  seen       what requests saw: the longest gap between consecutive events of any request (its
             submission, then each token) that overlaps the operation, vs the same in quiet windows;
  total      call to return, including process start-up and retiring old stages;
  KV         bytes copied (pre-copy + delta) vs the KV of the moved layers of the requests running at
             the quiesce (ideal 1x); weights: bytes and seconds to load them, peer copy vs source.
Every request's output is checked against model/reference.py (a request cut short at the end of the
run: its prefix).  The figure in docs/reshape.md is drawn from the first split's trace in --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import tempfile
import time
from typing import Any

import torch

from bench_pipeline import Oracle, make_prompts, model_config, pct  # same model, prompts and oracle rule
from flexpipe.api import FlexPipe, plan_shape
from flexpipe.model import PresetWeights, save_checkpoint

now = time.perf_counter


# ---- load --------------------------------------------------------------------------------------------
class Load:
    """Clients that each run requests back to back and note when every event arrives."""

    def __init__(self, fp: FlexPipe, prompts: list[list[int]], max_tokens: list[int]):
        self.fp, self.prompts, self.max_tokens = fp, prompts, max_tokens
        self.records: list[dict] = []  # per request: client, submit, token times, ids, done
        self.current: dict[int, dict] = {}
        self.tasks: list[asyncio.Task] = []
        self.stopping = False

    async def _client(self, j: int) -> None:
        while not self.stopping:
            rec = {"client": j, "submit": now(), "times": [], "ids": [], "done": False}
            self.records.append(rec)
            self.current[j] = rec
            async for ev in self.fp.generate(self.prompts[j], max_tokens=self.max_tokens[j], ignore_eos=True):
                if ev.token_id is not None:
                    rec["times"].append(now())
                    rec["ids"].append(ev.token_id)
            rec["done"] = True

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._client(j)) for j in range(len(self.prompts))]

    async def all_decoding(self, timeout: float = 120.0) -> None:
        """Wait until every client's current request has streamed a few tokens."""
        t_end = now() + timeout
        while now() < t_end:
            if len(self.current) == len(self.prompts) and all(len(r["times"]) >= 2 or r["done"]
                                                             for r in self.current.values()):
                return
            await asyncio.sleep(0.02)
        raise TimeoutError("the load did not come back to steady state")

    async def stop(self) -> None:
        self.stopping = True
        for t in self.tasks:
            t.cancel()
        res = await asyncio.gather(*self.tasks, return_exceptions=True)
        errors = [r for r in res if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
        if errors:
            raise errors[0]

    def gaps(self, a: float, b: float) -> list[float]:
        """Per request alive in [a, b]: its longest gap (submission, then tokens) that overlaps [a, b]."""
        out = []
        for r in self.records:
            ev = [r["submit"]] + r["times"]
            g = [y - x for x, y in zip(ev, ev[1:]) if y > a and x < b]
            if g:
                out.append(max(g))
        return out

    def inside(self, a: float, b: float) -> list[float]:
        """Every gap between consecutive tokens of a request that lies inside [a, b]."""
        return [y - x for r in self.records for x, y in zip(r["times"], r["times"][1:]) if a <= x and y <= b]


# ---- instrumentation of the public control surface ----------------------------------------------------
class Tracer:
    """Notes every ask/launch the controller makes and the router's quiesce/switch/resume, with times.

    It wraps the instance's methods (system.ask, system.launch, router.quiesce/switch/resume);
    nothing in flexpipe changes.
    """

    def __init__(self, fp: FlexPipe):
        self.fp, self.events, self.on = fp, [], False
        self.computed_at_quiesce: dict[str, int] | None = None
        system, router = fp.controller.system, fp.router
        ask, launch = system.ask, system.launch
        quiesce, switch, resume = router.quiesce, router.switch, router.resume

        async def traced_ask(ref: Any, msg: Any, *tensors: Any, timeout: float | None = None) -> Any:
            t0 = now()
            reply = await ask(ref, msg, *tensors, timeout=timeout)
            if self.on:
                ev = {"what": type(msg).__name__, "to": ref.name, "t0": t0, "t1": now()}
                if hasattr(msg, "dest"):
                    ev["dest"] = msg.dest.name
                if isinstance(reply, (int, float)) and not isinstance(reply, bool):
                    ev["bytes"] = reply
                elif isinstance(reply, dict) and "seconds" in reply:
                    ev["seconds"] = reply["seconds"]
                if type(msg).__name__ == "ExportKV":
                    ev["items"] = len(msg.items)
                    ev["tokens"] = sum(t1 - t0_ for _, _, t0_, t1 in msg.items)
                self.events.append(ev)
            return reply

        async def traced_launch(*a: Any, **kw: Any) -> Any:
            t0 = now()
            handle = await launch(*a, **kw)
            if self.on:
                self.events.append({"what": "launch", "to": kw.get("name", "?"), "t0": t0, "t1": now()})
            return handle

        async def traced_quiesce() -> None:
            t0 = now()
            await quiesce()
            if self.on:
                self.events.append({"what": "quiesce", "to": "router", "t0": t0, "t1": now()})
                if self.computed_at_quiesce is None:
                    self.computed_at_quiesce = {rid: r.computed for rid, r in router.sched.requests.items()}

        def mark(name: str, fn: Any) -> Any:
            def wrapped(*a: Any, **kw: Any) -> Any:
                if self.on:
                    self.events.append({"what": name, "to": "router", "t0": now(), "t1": now()})
                return fn(*a, **kw)
            return wrapped

        system.ask, system.launch = traced_ask, traced_launch
        router.quiesce, router.switch, router.resume = traced_quiesce, mark("switch", switch), mark("resume", resume)

    def start(self) -> None:
        self.events, self.computed_at_quiesce, self.on = [], None, True

    def stop(self) -> list[dict]:
        self.on = False
        return self.events


def owners(fp: FlexPipe) -> list[tuple[int, int, int, str]]:
    """(slot identity, start, end, actor name) of each running stage, in order."""
    return [(id(sl), sl.start, sl.end, sl.ref.name) for sl in fp.controller.slots]


# ---- one operation ---------------------------------------------------------------------------------------
async def operate(fp: FlexPipe, load: Load, tracer: Tracer, kind: str, stages: int, weights_from: str,
                  quiet: float, steady: list) -> dict:
    """Wait for steady state, note a quiet window, run one reshape/restart, and measure it."""
    cfg = fp.config
    await load.all_decoding()
    q0 = now()
    await asyncio.sleep(quiet)
    steady.append((q0, now()))
    before = owners(fp)
    tracer.start()
    a = now()
    if kind in ("split", "merge"):
        st = await fp.reshape(stages=stages, weights_from=weights_from)
    else:
        st = await fp.controller.restart(plan_shape(cfg, stages), drain=kind == "drain-restart")
    b = now()
    events = tracer.stop()
    after = owners(fp)
    # attention units whose KV changes owner, and what the running requests hold of them
    attn = [u for u in range(cfg.num_units) if cfg.unit_kind(u) == "attention"]

    def owner(table: list, u: int) -> int:
        return next(i for i, s, e, _ in table if s <= u < e)

    moved = [u for u in attn if owner(before, u) != owner(after, u)]
    per_token = 2 * cfg.num_kv_heads * cfg.head_dim * 4  # K and V, fp32, one attention unit
    held = tracer.computed_at_quiesce or {}
    ideal = sum(held.values()) * len(moved) * per_token
    kept = {i for i, _, _, _ in before}
    load_s = sum(e["seconds"] for e in events if e["what"] == "PrepareUnits" and "seconds" in e)
    load_s += sum(e["t1"] - e["t0"] for e in events if e["what"] == "SendUnits")
    statuses = await fp.controller.stage_status()  # new stages: what their start-up load took (empty: ~0)
    load_s += sum(statuses[k]["load_s"] for k, (i, _, _, _) in enumerate(after) if i not in kept)
    pause_win = [next((e["t0"] for e in events if e["what"] == "quiesce"), a),
                 next((e["t1"] for e in events if e["what"] == "resume"), b)]
    return {"kind": kind, "weights_from": weights_from if kind in ("split", "merge") else "source",
            "from": st.from_boundaries, "to": st.to_boundaries, "ok": st.ok, "pause_s": st.pause_s,
            "total_s": st.total_s, "prepare_s": st.prepare_s, "call_s": b - a, "kv_bytes": st.kv_bytes,
            "kv_bytes_delta": st.kv_bytes_delta,
            "kv_ideal_bytes": ideal, "moved_attention_units": len(moved), "precopy_rounds": st.precopy_rounds,
            "weight_bytes": st.weight_bytes, "weight_load_s": load_s, "requests_running": len(held),
            "requests_recomputed": st.requests_recomputed,
            "recompute_tokens": sum(held.values()) if "restart" in kind else 0,
            "t_call": a, "t_return": b, "pause_window": pause_win, "events": events, "before": before, "after": after}


# ---- report ----------------------------------------------------------------------------------------------
def op_name(o: dict) -> str:
    if o["kind"] in ("split", "merge"):
        return f"{o['kind']} ({o['weights_from']} weights)"
    return f"{o['kind']} " + ("2->4" if len(o["to"]) > len(o["from"]) else "4->2")


def measure_seen(ops: list[dict], load: Load) -> None:
    """What requests saw, once every request has moved on (a gap ends only when its next token comes)."""
    for o in ops:
        at_pause = load.gaps(*o["pause_window"])
        o["seen_pause_s"] = max(at_pause, default=float("nan"))
        o["seen_pause_median_s"] = pct(at_pause, 50)
        o["requests_at_pause"] = len(at_pause)
        o["seen_op_s"] = max(load.gaps(o["t_call"], o["t_return"]), default=float("nan"))
        copies = [e["t0"] for e in o["events"] if e["what"] in ("SendUnits", "PrepareUnits", "ExportKV")]
        o["copy_window"] = [min(copies), o["pause_window"][0]] if copies else None
        o["seen_copy_s"] = max(load.gaps(*o["copy_window"]), default=float("nan")) if copies else float("nan")


def summarize(ops: list[dict], load: Load, steady: list) -> tuple[list[str], dict]:
    def ms(xs: list[float]) -> str:
        xs = [x for x in xs if x == x]
        return f"{pct(xs, 50) * 1e3:>8.1f} /{pct(xs, 99) * 1e3:>8.1f}" if xs else f"{'-':>18}"

    rows, summary = [], {}
    groups: dict[str, list[dict]] = {}
    for o in ops:
        groups.setdefault(op_name(o), []).append(o)
    head = (f"{'operation':<28}{'n':>3}{'pause p50/p99 ms':>19}{'seen p50/p99 ms':>19}{'copies p50/p99 ms':>19}"
            f"{'whole p50/p99 ms':>19}{'total p50/p99 s':>17}")
    rows += [head, "-" * len(head)]
    for name, os_ in groups.items():
        p, sp, sc, so, t = ([o[k] for o in os_] for k in ("pause_s", "seen_pause_s", "seen_copy_s", "seen_op_s",
                                                           "total_s"))
        rows.append(f"{name:<28}{len(os_):>3}{ms(p):>19}{ms(sp):>19}{ms(sc):>19}{ms(so):>19}"
                    f"{pct(t, 50):>8.2f} /{pct(t, 99):>7.2f}")
        summary[name] = {"n": len(os_), "pause_p50_s": pct(p, 50), "pause_p99_s": pct(p, 99),
                         "seen_pause_p50_s": pct(sp, 50), "seen_pause_p99_s": pct(sp, 99),
                         "seen_copy_p50_s": pct(sc, 50), "seen_copy_p99_s": pct(sc, 99),
                         "whole_gap_p50_s": pct(so, 50), "whole_gap_p99_s": pct(so, 99),
                         "total_p50_s": pct(t, 50), "total_p99_s": pct(t, 99)}
    itl = [g for a, b in steady for g in load.inside(a, b)]
    worst = [max(g) for a, b in steady if (g := load.inside(a, b))]
    rows.append(f"{'steady state (quiet windows)':<28}{len(steady):>3}{'-':>19}{ms(worst):>19}   <- longest gap in "
                f"each {steady[0][1] - steady[0][0]:.1f} s window; time per token p50 {pct(itl, 50) * 1e3:.1f} ms, "
                f"p99 {pct(itl, 99) * 1e3:.1f} ms")
    summary["steady"] = {"windows": len(steady), "worst_gap_p50_s": pct(worst, 50),
                         "worst_gap_p99_s": pct(worst, 99), "tpot_p50_s": pct(itl, 50), "tpot_p99_s": pct(itl, 99)}
    head = (f"{'operation':<28}{'KV MB':>8}{'ideal MB':>10}{'ratio':>7}{'delta KB':>10}{'rounds':>8}"
            f"{'weights MB':>12}{'load s':>8}{'prepare s':>11}")
    rows += ["", head, "-" * len(head)]
    for name, os_ in groups.items():
        n = len(os_)
        kv, ideal = (sum(o[k] for o in os_) / n for k in ("kv_bytes", "kv_ideal_bytes"))
        rows.append(f"{name:<28}{kv / 2**20:>8.2f}{ideal / 2**20:>10.2f}"
                    f"{f'{kv / ideal:.2f}x' if ideal and kv else '-':>7}"
                    f"{sum(o['kv_bytes_delta'] for o in os_) / n / 1024:>10.0f}"
                    f"{max(o['precopy_rounds'] for o in os_):>8}"
                    f"{sum(o['weight_bytes'] for o in os_) / n / 2**20:>12.1f}"
                    f"{pct([o['weight_load_s'] for o in os_], 50):>8.2f}"
                    f"{pct([o['prepare_s'] for o in os_], 50):>11.2f}")
        summary[name].update({"kv_mb": kv / 2**20, "kv_ideal_mb": ideal / 2**20,
                              "weight_mb": sum(o["weight_bytes"] for o in os_) / n / 2**20,
                              "weight_load_p50_s": pct([o["weight_load_s"] for o in os_], 50)})
    return rows, summary


async def bench(args: argparse.Namespace) -> None:
    cfg = model_config(args)
    prompts = make_prompts(args.streams)
    max_tokens = [64 + (37 * j) % 97 for j in range(args.streams)]  # 64..160
    t_start = now()
    with tempfile.TemporaryDirectory(prefix="fp-bench-") as path:
        save_checkpoint(cfg, PresetWeights(cfg, seed=0), path)
        oracle = Oracle(cfg, path, prompts, max_tokens)
        plan = []
        for _ in range(args.reps):
            plan += [("split", 4, "peer"), ("merge", 2, "peer"), ("split", 4, "source"), ("merge", 2, "source"),
                     ("restart-recompute", 4, ""), ("restart-recompute", 2, ""),
                     ("drain-restart", 4, ""), ("drain-restart", 2, "")]
        ops: list[dict] = []
        steady: list[tuple[float, float]] = []
        async with FlexPipe.launch(path, stages=2) as fp:
            tracer = Tracer(fp)
            load = Load(fp, prompts, max_tokens)
            load.start()
            try:
                for kind, stages, wf in plan:
                    o = await operate(fp, load, tracer, kind, stages, wf, args.quiet, steady)
                    ops.append(o)
                    if args.verbose:
                        print(f"  {op_name(o):<28} {o['from']} -> {o['to']}: pause {o['pause_s'] * 1e3:.1f} ms, "
                              f"total {o['total_s']:.2f} s", flush=True)
                await load.all_decoding()  # every gap of the last operation has closed
                q0 = now()
                await asyncio.sleep(args.quiet)
                steady.append((q0, now()))
            finally:
                await load.stop()
            router_stats = fp.router.status()
        for r in load.records:  # a mismatch names the operations its request lived through
            end = r["times"][-1] if r["times"] else r["submit"]
            during = [op_name(o) for o in ops if o["t_call"] <= end and r["submit"] <= o["t_return"]]
            oracle.check(r["client"], r["ids"], f"request of client {r['client']} (during: {', '.join(during) or '-'})",
                         complete=r["done"])
    elapsed = now() - t_start

    measure_seen(ops, load)
    rows, summary = summarize(ops, load, steady)
    flex = [o for o in ops if o["kind"] in ("split", "merge")]
    rr = [o for o in ops if o["kind"] == "restart-recompute"]
    ratio = pct([o["pause_s"] for o in rr], 99) / pct([o["pause_s"] for o in flex], 99)
    ratio_seen = pct([o["seen_pause_s"] for o in rr], 99) / pct([o["seen_pause_s"] for o in flex], 99)
    running = [o["requests_running"] for o in flex]
    print(f"model {cfg.name} (checkpoint), fp32, CPU ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} "
          f"at the end); {args.streams} streams back to back (max_tokens 64..160, greedy), {args.reps} repetition(s) "
          f"of 8 operations; {min(running, default=0)}-{max(running, default=0)} requests running at each quiesce")
    print("pause: the controller's, quiesce -> resume (restart: the whole rebuild).  What requests saw, as the\n"
          "longest gap between consecutive events of any request: seen = across the pause; copies = across weight\n"
          "copy, prepare and KV pre-copy (the old epoch serving); whole = across the whole call.  KV: copied vs the\n"
          "KV of the moved layers of the requests running at the quiesce (restart-recompute: the KV it throws away);\n"
          "load s = weight copy/build (process start excluded); prepare s = up to the pre-copy.")
    print()
    print("\n".join(rows))
    print()
    met = "met" if min(ratio, ratio_seen) >= 10 else "NOT met"
    print(f"p99 pause restart-and-recompute / p99 pause FlexPipe reshape: {ratio:.1f}x (controller), "
          f"{ratio_seen:.1f}x (seen by requests)  target >= 10x: {met}")
    dr = [o for o in ops if o["kind"] == "drain-restart"]
    print(f"p99 pause drain-and-restart / p99 pause FlexPipe reshape: "
          f"{pct([o['pause_s'] for o in dr], 99) / pct([o['pause_s'] for o in flex], 99):.1f}x (controller), "
          f"{pct([o['seen_pause_s'] for o in dr], 99) / pct([o['seen_pause_s'] for o in flex], 99):.1f}x (seen)")
    kv_all = sum(o["kv_bytes"] for o in flex)
    ideal_all = sum(o["kv_ideal_bytes"] for o in flex)
    print(f"KV copied by reshapes: {kv_all / 2**20:.1f} MB for {ideal_all / 2**20:.1f} MB of KV of the moved layers "
          f"of the requests running at the quiesce = {kv_all / max(ideal_all, 1):.2f}x (ideal ~1x); in the pauses "
          f"(delta): {sum(o['kv_bytes_delta'] for o in flex) / 2**20:.2f} MB; pre-copy rounds "
          f"{sorted({o['precopy_rounds'] for o in flex})}")
    print(f"router: {router_stats.get('stale_outputs', 0)} stale-epoch outputs dropped, "
          f"{router_stats.get('preemptions', 0)} preemptions, {len(load.records)} requests")
    print(oracle.line())
    print(f"elapsed {elapsed:.0f} s")
    if args.out:
        first = next((o for o in ops if o["kind"] == "split" and o["weights_from"] == "peer"), None)
        timeline = None
        if first is not None:
            a, b = first["t_call"], first["t_return"]
            timeline = {"op": {k: v for k, v in first.items() if k != "events"}, "events": first["events"],
                        "tokens": [[t for t in r["times"] if a - 1.0 <= t <= b + 1.0] for r in load.records
                                   if r["times"] and r["times"][-1] >= a - 1.0 and r["submit"] <= b + 1.0],
                        "steady_tpot_p50_s": summary["steady"]["tpot_p50_s"]}
        data = {"model": cfg.to_dict(), "streams": args.streams, "reps": args.reps, "summary": summary,
                "pause_ratio_restart_recompute_vs_flexpipe": ratio, "seen_ratio": ratio_seen,
                "kv_vs_ideal": kv_all / max(ideal_all, 1), "oracle": oracle.line(), "elapsed_s": elapsed,
                "ops": [{k: v for k, v in o.items() if k != "events"} for o in ops], "timeline": timeline}
        with open(args.out, "w") as f:
            json.dump(data, f, indent=1)
        print(f"wrote {args.out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=None, help="model preset (default: the --hidden/--layers Llama)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--streams", type=int, default=None, help="concurrent clients (default 20, quick 16)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions of the 8 operations (default 3, quick 1)")
    ap.add_argument("--quiet", type=float, default=None, help="seconds of steady state before each operation")
    ap.add_argument("--out", default=None, help="write results (and the first split's timeline) as JSON here")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true", help="a line per operation as it happens")
    args = ap.parse_args()
    args.streams = args.streams or (16 if args.quick else 20)
    args.reps = args.reps or (1 if args.quick else 3)
    args.quiet = args.quiet if args.quiet is not None else (0.5 if args.quick else 1.0)
    torch.set_num_threads(1)  # this process runs the router and the oracle; see bench_pipeline.py
    # Controller.restart stops stages the router still watches: each stop is logged as a stage death.
    logging.getLogger("flexpipe.router").setLevel(logging.ERROR)
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()

"""FP-6 control loop benchmark: decision latency in the live loop, and weight reload time per tier.

    .venv/bin/python benchmarks/bench_autoscale.py [--json out.json]     # about a minute on 2 cores
    .venv/bin/python benchmarks/bench_autoscale.py --quick               # tiny model only, shorter ramp

1. Decision latency in the live loop.  The tiny model on stage processes with autoscale on, driven by
   the ramp of tests/test_autoscale.py (low -> burst -> low, rates as multiples of what one stage serves
   by the calibrated model), decisions every 0.1 s and at every change point.  Two loops watch the
   same traffic: the acting one (stage counts 1-2, one token budget: what reshapes this pipeline) and
   a second Autoscaler in observe mode (act=False) with a large candidate set (stage counts 1..18 x 5
   token budgets = 90 candidates) fed by the same router events.  Reported per loop: p50/p99/max of
   analyzer snapshot + policy decision (wall time, on the router's event loop, among the router's own
   work) against the paper's 5 ms, and the cost per router event of feeding the analyzer.
2. Reload time per tier.  For each model (tiny; "small": Llama hidden 768 x 6 layers, 32k vocabulary,
   365 MB in float32), an empty stage process builds the second half of the model's units from:
     cache        tensors held in this process's RAM (runtime/weight_cache.py), sent over the actor
                  transport, then built (what a scale-up after a merge or a scale to zero does)
     peer         a running stage that holds them sends them (SendUnits), then built
     checkpoint   safetensors read from disk: "cold" after posix_fadvise(DONTNEED) on the file (the
                  kernel may still keep it; no root to drop caches), and "warm" (page cache)
     preset       the preset's seeded generator (the source of the test models)
   "ready" is the time until the stage has served a first step with them: safetensors loads are
   lazy (mmap), so a checkpoint's bytes are read when a step first touches them, and only a step
   makes the tiers comparable; a second step's time is shown beside it (the compute in "ready").
   Median of --reps (fresh units each time: the stage drops them between runs); MB/s is bytes over
   ready minus that step; each tier against checkpoint-cold.  Plus, on the live runtime, a 1 -> 2 stage reshape of the tiny model per tier
   (new stage process included), as ReshapeStats report it.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexpipe.api import FlexPipe  # noqa: E402
from flexpipe.model.config import ModelConfig  # noqa: E402
from flexpipe.planning import PolicyConfig  # noqa: E402
from flexpipe.runtime.actor import handles  # noqa: E402
from flexpipe.runtime.autoscale import TARGET_DECISION_MS, AutoscaleConfig, Autoscaler  # noqa: E402
from flexpipe.runtime.stage import StepFailed, StepOutput  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _pcts(xs: list[float]) -> dict:
    s = sorted(xs)
    if not s:
        return {"n": 0}
    q = lambda p: s[min(len(s) - 1, int(round(p * (len(s) - 1))))]  # noqa: E731
    return {"n": len(s), "p50": q(0.5), "p99": q(0.99), "max": s[-1]}


# ---- 1. decision latency in the live loop ------------------------------------------------------
async def live_latency(quick: bool) -> dict:
    from test_autoscale import _complete, _fast_analyzer, _req

    acting = AutoscaleConfig(policy=PolicyConfig(stage_counts=(1, 2), token_budgets=(32,), max_gpus=2, min_dwell_s=2.0,
                                                 reshape_persist_s=1.0, reclaim_window_s=3.0, queue_drain_s=5.0,
                                                 scale_to_zero_idle_s=None),
                             tick_s=0.1, analyzer=_fast_analyzer(), max_stages=2)
    big = PolicyConfig(stage_counts=tuple(range(1, 19)), token_budgets=(16, 32, 64, 128, 256), max_gpus=64,
                       min_dwell_s=2.0, reshape_persist_s=1.0, reclaim_window_s=3.0, scale_to_zero_idle_s=None)
    async with FlexPipe.launch("tiny", stages=1, max_batch_tokens=32, autoscale=acting) as fp:
        a = fp.autoscaler
        shadow = Autoscaler(fp.controller, AutoscaleConfig(policy=big, tick_s=0.1, analyzer=_fast_analyzer(),
                                                           perf=a.perf, max_stages=64, act=False))
        await shadow.start()
        # time the analyzer feed on the router's data path (both listeners)
        feed: dict[str, list[float]] = {"acting": [], "observe": []}
        for name, obj in (("acting", a), ("observe", shadow)):
            inner = obj._on_event

            def timed(ev: str, now: float, req: Any, inner=inner, out=feed[name]) -> None:
                t0 = time.perf_counter()
                inner(ev, now, req)
                out.append(time.perf_counter() - t0)
            fp.router.listeners[fp.router.listeners.index(inner)] = timed
            obj._on_event = timed  # so that aclose() removes the wrapper
        one = a.model_capacity_rps(1, 1201, 8)
        sent: list = []

        async def phase(rate: float, seconds: float, until=None) -> None:
            t_end = time.monotonic() + seconds
            nxt = time.monotonic()
            while time.monotonic() < t_end and not (until and until()):
                nxt += 1.0 / rate
                await asyncio.sleep(max(0.0, nxt - time.monotonic()))
                r = _req(len(sent), 1200 - (len(sent) * 37) % 100, 8)
                sent.append(asyncio.ensure_future(_complete(fp, r)))

        t0 = time.monotonic()
        await phase(0.1 * one, 3.0)
        await phase(1.6 * one, 2.0)
        await phase(0.1 * one, 8.0 if quick else 20.0, until=(lambda: any(
            h.kind == "reshape" and h.ok and len(h.to_boundaries) == 2 for h in fp.controller.history))
            if quick else None)
        await asyncio.gather(*sent)
        ramp_s = time.monotonic() - t0
        res = {"requests": len(sent), "ramp_s": ramp_s, "one_stage_rps": one, "perf": a.perf.figures,
               "reshapes": [(len(h.from_boundaries) - 1, len(h.to_boundaries) - 1, h.weights_from)
                            for h in fp.controller.history if h.ok]}
        for name, obj, n_cands in (("acting", a, len(a.policy.stage_counts) * len(a.policy.token_budgets)),
                                   ("observe", shadow, len(shadow.policy.stage_counts) * len(shadow.policy.token_budgets))):
            res[name] = {"candidates": n_cands, "decision_ms": _pcts(list(obj._lat_ms)),
                         "actions": dict(obj.actions), "event_us": _pcts([x * 1e6 for x in feed[name]])}
        res["log"] = [{k: d.get(k) for k in ("t", "summary", "reason", "applied")} for d in a.decision_log()]
        await shadow.aclose()
    return res


# ---- 2. reload time per tier --------------------------------------------------------------------
def small_config() -> ModelConfig:
    return ModelConfig(name="llama-h768-l6", vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=6,
                       num_heads=12, num_kv_heads=12, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0)


def _drop_page_cache(path: Path) -> None:
    for f in path.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class _Sink:
    """Stands in for the router: receives the stage's StepOutput."""

    def __init__(self) -> None:
        self.fut: asyncio.Future | None = None

    def expect(self) -> asyncio.Future:
        self.fut = asyncio.get_running_loop().create_future()
        return self.fut

    @handles(StepOutput)
    def out(self, ctx: Any, msg: Any) -> None:
        if self.fut is not None and not self.fut.done():
            self.fut.set_result(msg)

    @handles(StepFailed)
    def failed(self, ctx: Any, msg: Any) -> None:
        if self.fut is not None and not self.fut.done():
            self.fut.set_exception(RuntimeError(msg.error))


async def tier_times(cfg: ModelConfig, reps: int) -> dict:
    from flexpipe.model.checkpoint import PresetWeights, save_checkpoint
    from flexpipe.model.units import unit_costs
    from flexpipe.runtime.actor import ActorSettings
    from flexpipe.runtime.launcher import ActorSystem
    import torch

    from flexpipe.runtime.chunks import limit_of
    from flexpipe.runtime.stage import Activate, PrepareUnits, SendUnits, StepInput, send_unit_tensors
    from flexpipe.runtime.weight_cache import WeightCache, WeightCacheActor

    n = cfg.num_units
    a, b = n // 2, n
    nbytes = sum(c.param_bytes for c in unit_costs(cfg, dtype_bytes=4)[a:b])
    preset = {"kind": "preset", "seed": 0}
    with tempfile.TemporaryDirectory(prefix="fp-bench-ckpt-") as tmp:
        ckpt = save_checkpoint(cfg, PresetWeights(cfg, 0), Path(tmp) / cfg.name)
        ck = {"kind": "checkpoint", "path": str(ckpt)}
        async with ActorSystem(ActorSettings(start_timeout=300, torch_threads=1), name="bench") as system:
            def stage(source: dict, start: int, end: int, load: bool, name: str):
                kw = {"config": cfg.to_dict(), "source": source, "start": start, "end": end, "num_blocks": 16,
                      "block_size": 16, "dtype": "float32", "device": "cpu", "load": load, "torch_threads": 1}
                return system.launch("flexpipe.runtime.stage:StageActor", kw, name=name)

            holder = await stage(preset, a, b, True, "holder")
            empty_ck = await stage(ck, a, a, False, "empty-ckpt")
            empty = await stage(preset, a, a, False, "empty")
            cache = WeightCache(4 << 30)
            cache_actor = await system.spawn(WeightCacheActor(cache, "m", cfg), "weights")
            sink = _Sink()
            sink_actor = await system.spawn(sink, "sink")
            epoch = [0]

            async def step(dest) -> None:
                fut = sink.expect()
                x = torch.zeros(1, cfg.hidden_size)
                await system.tell(dest.ref, StepInput(epoch[0], 0, ["s"], [0], [1], [True], [0], [[0.0, 0, 1.0, 0]],
                                                      []), x)
                await asyncio.wait_for(fut, 600)

            async def ready(dest, fn) -> tuple[float, float, float]:
                """Seconds to prepare, to serve a first step (weights touched), and a second step."""
                epoch[0] += 1
                t0 = time.perf_counter()
                await fn(dest)
                t1 = time.perf_counter()
                await system.ask(dest.ref, Activate(epoch[0], 0, a, b, None, sink_actor.ref, system.client.ref))
                await step(dest)
                t2 = time.perf_counter()
                await step(dest)
                t3 = time.perf_counter()
                await system.ask(dest.ref, Activate(epoch[0], 0, a, a, None, sink_actor.ref, system.client.ref))  # empty again
                return t1 - t0, t2 - t0, t3 - t2
            await system.ask(holder.ref, SendUnits(list(range(a, b)), cache_actor.ref), timeout=600)
            assert cache.holds("m", range(a, b))

            async def from_cache(dest) -> None:
                t = cache.take("m", list(range(a, b)))   # (as the controller sends cache hits)
                await send_unit_tensors(functools.partial(system.ask, timeout=600), dest.ref, t,
                                        limit_of(getattr(system, "settings", None)))
                await system.ask(dest.ref, PrepareUnits(a, b, from_peer=True), timeout=600)

            async def from_peer(dest) -> None:
                await system.ask(holder.ref, SendUnits(list(range(a, b)), dest.ref), timeout=600)
                await system.ask(dest.ref, PrepareUnits(a, b, from_peer=True), timeout=600)

            async def from_source(dest) -> None:
                await system.ask(dest.ref, PrepareUnits(a, b, from_peer=False), timeout=600)

            async def cold(dest) -> None:
                _drop_page_cache(ckpt)
                await from_source(dest)

            tiers = [("cache", empty, from_cache), ("peer", empty, from_peer), ("checkpoint-cold", empty_ck, cold),
                     ("checkpoint-warm", empty_ck, from_source), ("preset", empty, from_source)]
            out: dict[str, Any] = {"units": [a, b], "bytes": nbytes}
            for name, dest, fn in tiers:
                runs = [await ready(dest, fn) for _ in range(reps)]
                prep, rdy, warm = (statistics.median(r[k] for r in runs) for k in range(3))
                out[name] = {"prepare_s": prep, "ready_s": rdy, "warm_step_s": warm, "runs": runs,
                             "MB_per_s": nbytes / max(rdy - warm, 1e-9) / 1e6}
            ref = out["checkpoint-cold"]["ready_s"]
            for name, *_ in tiers:
                out[name]["vs_checkpoint_cold"] = out[name]["ready_s"] / ref
            await cache_actor.aclose("done")
            await sink_actor.aclose("done")
            await asyncio.gather(holder.stop(), empty.stop(), empty_ck.stop())
    return out


async def live_reshape_tiers() -> dict:
    """1 -> 2 stages on the live runtime per tier (a new stage process each time), then back to 1."""
    out = {}
    auto = AutoscaleConfig(act=False, perf=None)  # the loop only watches; it brings the host-memory cache
    async with FlexPipe.launch("tiny", stages=1, autoscale=auto) as fp:
        await fp.reshape(stages=2, weights_from="source")  # fills the cache with the units that left stage 0
        await fp.reshape(stages=1)
        for tier in ("source", "peer", "cache"):
            st = await fp.reshape(stages=2, weights_from=tier)
            out[tier] = {"total_s": st.total_s, "prepare_s": st.prepare_s, "weights_s": st.weights_s,
                         "weight_bytes": st.weight_bytes, "weights_from": st.weights_from, "pause_s": st.pause_s}
            await fp.reshape(stages=1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model only, shorter ramp, 3 repetitions")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    reps = 3 if args.quick else args.reps

    lat = asyncio.run(live_latency(args.quick))
    print(f"1. live loop: {lat['requests']} requests over {lat['ramp_s']:.1f} s; one stage serves "
          f"{lat['one_stage_rps']:.1f} req/s by the calibrated model; reshapes {lat['reshapes']}")
    for name in ("acting", "observe"):
        r = lat[name]
        d, e = r["decision_ms"], r["event_us"]
        print(f"   {name:8s} {r['candidates']:3d} candidates: decision p50 {d['p50']:.2f} ms  p99 {d['p99']:.2f} ms  "
              f"max {d['max']:.2f} ms over {d['n']} decisions (p99 = {d['p99'] / TARGET_DECISION_MS:.2f}x the "
              f"{TARGET_DECISION_MS:.0f} ms target); analyzer feed p50 {e['p50']:.1f} us p99 {e['p99']:.1f} us "
              f"per router event; actions {r['actions']}")
    for d in lat["log"]:
        print(f"     t={d['t']:5.1f}s {d['summary']}\n              why: {d['reason']}\n              did: {d['applied']}")

    results: dict[str, Any] = {"live": lat, "tiers": {}}
    models = [ModelConfig.preset("tiny")] + ([] if args.quick else [small_config()])
    print("2. reload time per tier (second half of the units into an empty stage process; median of "
          f"{reps}):")
    for cfg in models:
        t = asyncio.run(tier_times(cfg, reps))
        results["tiers"][cfg.name] = t
        print(f"   {cfg.name}: units [{t['units'][0]}, {t['units'][1]}), {t['bytes'] / 1e6:.1f} MB")
        for name in ("cache", "peer", "checkpoint-cold", "checkpoint-warm", "preset"):
            r = t[name]
            print(f"     {name:16s} ready {r['ready_s'] * 1e3:8.1f} ms ({r['vs_checkpoint_cold']:.2f}x checkpoint-cold; "
                  f"prepare {r['prepare_s'] * 1e3:7.1f} ms, then a first step; a warm step takes "
                  f"{r['warm_step_s'] * 1e3:.1f} ms)  {r['MB_per_s']:7.0f} MB/s")
    live = asyncio.run(live_reshape_tiers())
    results["live_reshape"] = live
    print("   live 1 -> 2 stage reshape of tiny (new stage process included):")
    for tier, r in live.items():
        print(f"     {tier:8s} total {r['total_s']:.2f} s  prepare {r['prepare_s']:.2f} s  weights "
              f"{r['weights_s'] * 1e3:.0f} ms ({r['weight_bytes'] / 1e6:.1f} MB, from {r['weights_from']})  "
              f"pause {r['pause_s'] * 1e3:.0f} ms")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()

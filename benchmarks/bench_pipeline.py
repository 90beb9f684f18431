"""FP-3 serving benchmark: FlexPipe (1 stage, 4 stages) vs HF transformers `generate`, same weights, one run.

    .venv/bin/python benchmarks/bench_pipeline.py            # 64 new tokens, best of 3 (about 1 minute)
    .venv/bin/python benchmarks/bench_pipeline.py --quick    # 32 new tokens, one repeat, 1 and 32 streams
    .venv/bin/python benchmarks/bench_pipeline.py --rt-priority 1   # every process under SCHED_RR (rt_priority)
    .venv/bin/python benchmarks/bench_pipeline.py --preset tiny
    .venv/bin/python benchmarks/bench_pipeline.py --profile  # a stage's decode step alone: 1 vs 4 stages, where it goes

Model: by default a Llama of hidden 256 x 8 layers (6.1M params, the config of bench_reference.py),
exported with save_checkpoint; FlexPipe loads that directory and HF loads it with from_pretrained,
so both run the very same fp32 weights.  `tiny` (hidden 128, 1.6M params) is so small that a decode
step is almost only Python and messaging overhead; hidden 256 puts real matmul work in each step.

Load: N = 1, 8, 32 concurrent streams, greedy, ignore EOS, prompts of 16..64 tokens, the same
max_new_tokens M.  FlexPipe gets N concurrent `fp.generate` streams (stage subprocesses, default
settings: one torch thread per stage).  HF gets what a user would write: one left-padded batch of
the same N prompts, `generate(max_new_tokens=M, min_new_tokens=M, do_sample=False)`, with as many
torch threads as one FlexPipe stage (--hf-threads; see the README for why).

Token times: FlexPipe's streamed events; HF's a streamer that notes when each step's tokens come
out (a batch decodes in lockstep).  Decode throughput is tokens/s while all N streams decode at
once, prefill excluded: tokens that arrive between the moment the last stream got its first token
and the moment the first stream got its last one, over that window (for HF: N (M - 1) over first to
last step).  TTFT and time per output token (the gap between consecutive tokens of a stream, TPOT)
come from the same times, pooled over repeats; throughputs are the best of --repeats, systems
interleaved.  CPU ms/token: CPU time of every process involved
(router or HF process, stage processes) per generated token of the M run, which the other load on a
shared machine disturbs far less than wall time.  Every FlexPipe output is checked against
model/reference.py.
Targets (FP-3): FlexPipe 1 stage >= 2x HF decode throughput at 32 streams; 4 stages <= 1.25x the
1-stage time per output token.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import os
import tempfile
import time
from typing import Any

import numpy as np

import torch

from flexpipe.api import FlexPipe
from flexpipe.model import ModelConfig, PresetWeights, ReferenceModel, SamplingParams, preset, save_checkpoint


def model_config(args: argparse.Namespace) -> ModelConfig:
    if args.preset:
        return preset(args.preset)
    h = args.hidden
    return ModelConfig(name=f"llama-h{h}-l{args.layers}", hidden_size=h, intermediate_size=h * 11 // 4,
                       num_layers=args.layers, num_heads=h // 64, num_kv_heads=max(1, h // 128),
                       bos_token_id=256, eos_token_ids=(257,), pad_token_id=258)


def make_prompts(n: int) -> list[list[int]]:
    """n byte-token prompts of 16..64 tokens (deterministic)."""
    return [[(37 * i + 11 * j + 5) % 256 for i in range(16 + (7 * j) % 49)] for j in range(n)]


def pct(xs: list[float], q: float) -> float:
    """q-th percentile (numpy's linear interpolation), NaN for no samples."""
    return float(np.percentile(xs, q)) if xs else float("nan")


# ---- FlexPipe -------------------------------------------------------------------------------------
async def _stream(fp: FlexPipe, prompt: list[int], m: int) -> tuple[float, list[float], list[int]]:
    t0, times, ids = time.perf_counter(), [], []
    async for ev in fp.generate(prompt, max_tokens=m, ignore_eos=True):
        if ev.token_id is not None:
            times.append(time.perf_counter())
            ids.append(ev.token_id)
    return t0, times, ids


async def run_flexpipe(fp: FlexPipe, prompts: list[list[int]], m: int) -> tuple[float, list]:
    """Wall time of N concurrent streams of m tokens, and each stream's (submit, token times, ids)."""
    t = time.perf_counter()
    res = await asyncio.gather(*(_stream(fp, p, m) for p in prompts))
    return time.perf_counter() - t, res


def mixed_lengths(n: int, scale: int = 4, cap: int = 256, seed: int = 0) -> list[int]:
    """n output lengths drawn from the Azure LLM conversation trace's GeneratedTokens (the slice
    shipped in flexpipe/data/traces), divided by `scale` (same shape, 1/scale the tokens: the run
    stays short) and capped: median ~32, mean ~50, max 250 with the defaults."""
    import csv
    from importlib import resources

    path = resources.files("flexpipe") / "data" / "traces" / "azure_llm_conv_slice.csv"
    with path.open() as f:
        gen = [int(r["GeneratedTokens"]) for r in csv.DictReader(f)]
    rng = np.random.default_rng(seed)
    return [int(min(cap, max(1, round(g / scale)))) for g in rng.choice(gen, size=n)]


async def run_flexpipe_closed(fp: FlexPipe, prompts: list[list[int]], ms: list[int], n: int) -> tuple[float, list]:
    """A closed loop of n concurrent clients working through the requests (prompt j, ms[j] tokens):
    each client sends its next request when its last one finished.  Wall time and per-request results."""
    queue = list(range(len(prompts)))[::-1]
    res: list = [None] * len(prompts)

    async def client() -> None:
        while queue:
            j = queue.pop()
            res[j] = await _stream(fp, prompts[j], ms[j])

    t = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(n)))
    return time.perf_counter() - t, res


# ---- HF transformers -----------------------------------------------------------------------------
class _Clock:
    """An HF streamer that only notes when each generation step's tokens come out."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class HFRunner:
    """HF generate on a left-padded batch, run in its own thread so the pipelines' loop stays live."""

    def __init__(self, path: str, threads: int):
        import transformers

        self.transformers_version = transformers.__version__
        self.threads = threads
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hf")
        self.model = self.pool.submit(self._load, path).result()

    def _load(self, path: str):
        import transformers

        torch.set_num_threads(self.threads)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None  # ignore EOS, as the FlexPipe requests do
        model.generation_config.pad_token_id = 0
        return model

    def _generate(self, prompts: list[list[int]], m: int) -> tuple[float, list[float], list[list[int]]]:
        torch.set_num_threads(self.threads)
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        clock = _Clock()
        t = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=m, min_new_tokens=m,
                                      do_sample=False, streamer=clock)
        # the streamer's first put is the prompt; then one put per step with the batch's new tokens
        return t, clock.times[1:], out[:, width:].tolist()

    async def run(self, prompts: list[list[int]], m: int) -> tuple[float, list]:
        """Like run_flexpipe: wall time and, per prompt, (start, token times, ids) from one batch."""
        t, times, outs = await asyncio.get_running_loop().run_in_executor(self.pool, self._generate, prompts, m)
        return times[-1] - t, [(t, times, o) for o in outs]

    async def run_batches(self, prompts: list[list[int]], ms: list[int], n: int) -> tuple[float, list]:
        """The same requests as run_flexpipe_closed, the way a user of `generate` serves them: n at a
        time, each batch generating its longest request's length, outputs cut to each request's own."""
        t0, res = time.perf_counter(), []
        for i in range(0, len(prompts), n):
            m = max(ms[i:i + n])
            _, part = await self.run(prompts[i:i + n], m)
            res += [(t, times[:k], ids[:k]) for (t, times, ids), k in zip(part, ms[i:i + n])]
        return time.perf_counter() - t0, res

    def close(self) -> None:
        self.pool.shutdown()


# ---- oracle check ----------------------------------------------------------------------------------
class Oracle:
    """Reference tokens per prompt (computed once, compared as prefixes) and the near-tie rule of the tests."""

    TIE = 1e-4  # a greedy token may differ only where the reference's top-2 logits are closer than this

    def __init__(self, cfg: ModelConfig, path: str, prompts: list[list[int]], m: int | list[int]):
        from flexpipe.model import CheckpointReader

        self.model = ReferenceModel(cfg, CheckpointReader(path))
        ms = m if isinstance(m, list) else [m] * len(prompts)
        self.want = [self.model.generate(p, SamplingParams(max_tokens=k, ignore_eos=True))
                     for p, k in zip(prompts, ms)]
        self.prompts = prompts
        self.checked = self.equal = self.ties = 0
        self.bad: list[str] = []

    def check(self, j: int, got: list[int], label: str, complete: bool = True) -> None:
        """`got` must equal the reference (its prefix when the request was cut short: complete=False)."""
        want = self.want[j] if complete else self.want[j][:len(got)]
        self.checked += 1
        if got == want and (len(got) > 0 or not complete):
            self.equal += 1
            return
        k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        if k < len(got) and k < len(want):  # a different token: allowed only at a near-tie
            top2 = self.model.logits_for(self.prompts[j], want[:k])[-1].topk(2).values
            if float(top2[0] - top2[1]) < self.TIE:
                self.ties += 1
                return
        self.bad.append(f"{label} prompt {j}: first difference at token {k}: {got[k:k + 4]} != {want[k:k + 4]}")

    def line(self) -> str:
        ok = self.equal + self.ties == self.checked and not self.bad
        s = (f"oracle check: {self.equal}/{self.checked} FlexPipe outputs equal model/reference.py token for token"
             f"{f', {self.ties} differ only at a near-tie (top-2 margin < {self.TIE})' if self.ties else ''}"
             f" -> {'OK' if ok else 'MISMATCH'}")
        return s + "".join(f"\n  {b}" for b in self.bad[:10])


# ---- measures -------------------------------------------------------------------------------------
def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) of this process and of `pids` so far (Linux /proc)."""
    total = time.process_time()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def step_split(fp: FlexPipe) -> tuple[tuple[int, list[float]], list[tuple[int, float]]]:
    """(steps so far, the router's last step round trips: launch to output), and each stage's
    (steps, compute seconds)."""
    stages = await fp.controller.stage_status()
    return (fp.router.sched.stats.steps, list(fp.router.step_times)), [(st["steps"], st["compute_s"]) for st in stages]


async def timeline(fp: FlexPipe, t0: float, t1: float) -> tuple[list[list[float]], list[list[float]]]:
    """Where the steps launched in [t0, t1] spent their time, from the router's and the stages' step
    logs (one perf_counter clock for all processes): per hop (router -> stage 0, ..., last stage ->
    router) the wait from one side's result to the next side's handler start (sending, ZeroMQ,
    receiving, waiting for a core or behind the other micro-batch), and per stage the handler's run."""
    logs = [{s: (a, b) for s, a, b in log} for log in await fp.controller.step_logs()]
    waits: list[list[float]] = [[] for _ in range(len(logs) + 1)]
    runs: list[list[float]] = [[] for _ in logs]
    for step, sent, done in list(fp.router.step_log):
        if not t0 <= sent <= t1 or not all(step in log for log in logs):
            continue
        prev = sent
        for i, log in enumerate(logs):
            a, b = log[step]
            waits[i].append(a - prev)
            runs[i].append(b - a)
            prev = b
        waits[-1].append(done - prev)
    return waits, runs


def busy_rate(res: list) -> float:
    """Tokens/s of a closed loop while every client is busy: from the first request's start to the
    last request's start (after it the queue is empty and clients drop out one by one: the tail of
    a finite run, which a serving system under steady load does not have)."""
    start = min(t0 for t0, _, _ in res)
    end = max(t0 for t0, _, _ in res)
    if end <= start:
        return float("nan")
    return sum(1 for _, times, _ in res for t in times if t <= end) / (end - start)


def window_rate(res: list) -> float:
    """Tokens/s while every stream decodes: from the last first token to the first last token."""
    start = max(times[0] for _, times, _ in res)
    end = min(times[-1] for _, times, _ in res)
    if end <= start:
        return float("nan")
    return sum(1 for _, times, _ in res for t in times if start < t <= end) / (end - start)


# ---- the run -------------------------------------------------------------------------------------
LABELS = {"hf": "HF generate", "fp1": "FlexPipe 1 stage", "fp4": "FlexPipe 4 stages"}


async def bench(args: argparse.Namespace) -> None:
    cfg = model_config(args)
    streams = [1, 32] if args.quick else [1, 8, 32]
    m = args.tokens
    prompts = make_prompts(max(streams))
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fp-bench-") as path:
        save_checkpoint(cfg, PresetWeights(cfg, seed=0), path)
        oracle = Oracle(cfg, path, prompts, m)
        hf = HFRunner(path, args.hf_threads)
        nparams = sum(p.numel() for p in hf.model.parameters())
        async with contextlib.AsyncExitStack() as stack:
            fps = {f"fp{s}": await stack.enter_async_context(
                FlexPipe.launch(path, stages=s, max_inflight=args.max_inflight if s > 1 else 0,
                                rt_priority=args.rt_priority)) for s in (1, 4)}
            pids = {k: [st["pid"] for st in fp.controller.stage_info()] for k, fp in fps.items()}
            pids["hf"] = []
            for fp in fps.values():  # warm-up: first steps pay for lazy initialisation
                await run_flexpipe(fp, prompts[:2], 4)
            await hf.run(prompts[:2], 4)
            best: dict[tuple[str, int, str], float] = {}
            lat: dict[tuple[str, int], dict[str, list[float]]] = {}
            hf_same: dict[int, int] = {}
            split: dict[tuple[str, int], list[tuple[float, float]]] = {}
            timelines: dict[tuple[str, int], tuple[list[list[float]], list[list[float]]]] = {}

            def keep(key: tuple, v: float, most: bool = False) -> None:
                old = best.get(key, float("-inf") if most else float("inf"))
                best[key] = max(old, v) if most else min(old, v)

            systems = ["hf", "fp1", "fp4"]
            for rep in range(args.repeats):
                for n in streams:
                    for name in systems[rep % 3:] + systems[:rep % 3]:  # no system always goes first
                        c0 = cpu_seconds(pids[name])
                        if name == "hf":
                            dt, res = await hf.run(prompts[:n], m)
                        else:
                            before = await step_split(fps[name])
                            t_run = time.perf_counter()
                            dt, res = await run_flexpipe(fps[name], prompts[:n], m)
                            after = await step_split(fps[name])
                            w, r = await timeline(fps[name], t_run, time.perf_counter())
                            tl = timelines.setdefault((name, n), ([[] for _ in w], [[] for _ in r]))
                            for pooled, new in zip(tl[0] + tl[1], w + r):
                                pooled += new
                            split.setdefault((name, n), []).append(
                                (float(np.mean(after[0][1][-(after[0][0] - before[0][0]):])),   # this run's round trips
                                 sum((c1 - c0_) / max(1, s1 - s0) for (s0, c0_), (s1, c1) in zip(before[1], after[1]))))
                        keep((name, n, "cpu"), (cpu_seconds(pids[name]) - c0) / (n * m))
                        keep((name, n, "tm"), dt)
                        keep((name, n, "rate"), window_rate(res), most=True)
                        d = lat.setdefault((name, n), {"ttft": [], "tpot": []})
                        for j, (t0, times, ids) in enumerate(res):
                            d["ttft"].append(times[0] - t0)
                            d["tpot"] += [b - a for a, b in zip(times, times[1:])]
                            if name != "hf":
                                oracle.check(j, ids, f"{LABELS[name]}, {n} streams")
                        if name == "hf":
                            hf_same[n] = sum(ids == oracle.want[j] for j, (_, _, ids) in enumerate(res))
            mixed: dict[str, dict] = {}
            if args.mixed:
                n_mix = max(streams)
                mprompts = make_prompts(args.mixed)
                mlens = mixed_lengths(args.mixed)
                moracle = Oracle(cfg, path, mprompts, mlens)
                for rep in range(args.repeats):
                    for name in systems[rep % 3:] + systems[:rep % 3]:
                        c0 = cpu_seconds(pids[name])
                        if name == "hf":
                            dt, res = await hf.run_batches(mprompts, mlens, n_mix)
                        else:
                            dt, res = await run_flexpipe_closed(fps[name], mprompts, mlens, n_mix)
                        cpu = cpu_seconds(pids[name]) - c0
                        if name != "hf":
                            for j, (_, _, ids) in enumerate(res):
                                moracle.check(j, ids, f"{LABELS[name]}, mixed lengths")
                        if dt < mixed.get(name, {}).get("wall", float("inf")):
                            ttft = [times[0] - t0 for t0, times, _ in res if times]
                            mixed[name] = {"wall": dt, "cpu": cpu, "ttft": ttft, "busy": busy_rate(res)}
                mixed_info = (n_mix, len(mlens), sum(mlens), float(np.median(mlens)), max(mlens))
                rows_fp = sum(len(p) + k - 1 for p, k in zip(mprompts, mlens))
                rows_hf = sum(len(mprompts[i:i + n_mix]) * (max(map(len, mprompts[i:i + n_mix])) + max(mlens[i:i + n_mix]) - 1)
                              for i in range(0, len(mprompts), n_mix))
            bounds = {k: fp.controller.shape.boundaries for k, fp in fps.items()}
            inflight = {k: fp.router.sched.max_inflight for k, fp in fps.items()}
        hf.close()
    elapsed = time.perf_counter() - t_start

    load = os.getloadavg()
    print(f"model {cfg.name}: {nparams / 1e6:.1f}M params, fp32, CPU ({os.cpu_count()} cores, load average "
          f"{load[0]:.1f} at the end); prompts 16..64 tokens, M = {m} new tokens, greedy; best of {args.repeats}")
    print(f"FlexPipe: stage subprocesses, 1 torch thread each; unit boundaries 1 stage {bounds['fp1']}, "
          f"4 stages {bounds['fp4']} ({inflight['fp4']} micro-batches in flight).  HF transformers {hf.transformers_version} generate, left-padded batch, "
          f"{args.hf_threads} torch thread(s)")
    print("CPU scheduling: " + (f"SCHED_RR priority {args.rt_priority} for every thread of every process (--rt-priority)"
                                if args.rt_priority else "the kernel's default (no --rt-priority)"))
    print()
    head = (f"{'system':<18}{'streams':>8}{'decode tok/s':>14}{'e2e tok/s':>11}{'TTFT p50/p99 ms':>19}"
            f"{'TPOT p50/p99 ms':>19}{'CPU ms/tok':>12}")
    print(head)
    print("-" * len(head))
    for n in streams:
        for name in systems:
            tm, d = best[(name, n, "tm")], lat[(name, n)]
            ttft = f"{pct(d['ttft'], 50) * 1e3:.0f} / {pct(d['ttft'], 99) * 1e3:.0f}"
            tpot = f"{pct(d['tpot'], 50) * 1e3:.1f} / {pct(d['tpot'], 99) * 1e3:.1f}"
            print(f"{LABELS[name]:<18}{n:>8}{best[(name, n, 'rate')]:>14.1f}{n * m / tm:>11.1f}{ttft:>19}"
                  f"{tpot:>19}{best[(name, n, 'cpu')] * 1e3:>12.2f}")
    print()
    n_max = max(streams)
    r_hf = best[("fp1", n_max, "rate")] / best[("hf", n_max, "rate")]
    r_e2e = best[("hf", n_max, "tm")] / best[("fp1", n_max, "tm")]
    r_tpot = pct(lat[("hf", n_max)]["tpot"], 50) / pct(lat[("fp1", n_max)]["tpot"], 50)
    print(f"FlexPipe 1 stage / HF decode throughput at {n_max} streams: {r_hf:.2f}x (end to end {r_e2e:.2f}x, "
          f"p50 TPOT HF / FlexPipe {r_tpot:.2f}x)  "
          f"target >= 2x: {'met' if r_hf >= 2 else 'NOT met'}")
    for n in streams:
        r = pct(lat[("fp4", n)]["tpot"], 50) / pct(lat[("fp1", n)]["tpot"], 50)
        r_tp = best[("fp1", n, "rate")] / best[("fp4", n, "rate")]
        r_cpu = best[("fp4", n, "cpu")] / best[("fp1", n, "cpu")]
        print(f"4 stages / 1 stage time per output token at {n:>2} streams: p50 TPOT {r:.2f}x  target <= 1.25x: "
              f"{'met' if r <= 1.25 else 'NOT met'}  (1/decode throughput {r_tp:.2f}x, CPU per token {r_cpu:.2f}x)")
    print("Where a FlexPipe step's time goes (mean over the steps of the equal-length runs): the router's round trip "
          "(launch to output) = the stages' compute (handler start to result) + the rest (messaging, event loops; with "
          "2 micro-batches in flight also waiting behind the other one)")
    for n in streams:
        for name in ("fp1", "fp4"):
            rt, comp = (float(np.mean(v)) for v in zip(*split[(name, n)]))
            hops = 2 if name == "fp1" else 5
            print(f"  {LABELS[name]:<18} {n:>2} streams: round trip {rt * 1e3:6.2f} ms = compute {comp * 1e3:6.2f} ms "
                  f"+ rest {(rt - comp) * 1e3:5.2f} ms ({(rt - comp) / hops * 1e3:.2f} ms per hop, {hops} hops)")
    print("Step timelines (the router's and each stage's step logs, pooled over repeats): per hop, router -> stage 0 "
          "... last stage -> router, the wait from one side's result to the other's handler start, median / mean / "
          "p99 ms; a mean far above the median is steps kept waiting (for a core, or behind the other micro-batch)")
    for n in streams:
        for name in ("fp1", "fp4"):
            waits, runs = timelines[(name, n)]
            hops_txt = "  ".join(f"{pct(w, 50) * 1e3:.2f}/{float(np.mean(w)) * 1e3:.2f}/{pct(w, 99) * 1e3:.1f}"
                                 for w in waits)
            runs_txt = " ".join(f"{pct(r, 50) * 1e3:.2f}" for r in runs)
            print(f"  {LABELS[name]:<18} {n:>2} streams, {len(waits[0])} steps: hops {hops_txt};  stage runs (median) "
                  f"{runs_txt} ms")
    print("HF generate outputs equal to the reference (not a target): "
          + ", ".join(f"{hf_same[n]}/{n} at {n} streams" for n in streams))
    print(oracle.line())
    if args.mixed:
        n_mix, nreq, ntok, med, mx = mixed_info
        print()
        print(f"Mixed lengths: {nreq} requests, output lengths from the Azure LLM conversation trace / 4 "
              f"(median {med:.0f}, max {mx}, {ntok} tokens in all), {n_mix} concurrent clients in a closed loop "
              f"(FlexPipe: continuous batching; HF: batches of {n_mix}, each generating its longest request); "
              f"best of {args.repeats}")
        head = (f"{'system':<18}{'wall s':>8}{'tok/s':>9}{'busy tok/s':>12}{'TTFT p50/p99 ms':>19}"
                f"{'CPU ms/tok':>12}")
        print(head)
        print("-" * len(head))
        for name in systems:
            d = mixed[name]
            ttft = f"{pct(d['ttft'], 50) * 1e3:.0f} / {pct(d['ttft'], 99) * 1e3:.0f}"
            busy = f"{d['busy']:>12.1f}" if name != "hf" else f"{'-':>12}"
            print(f"{LABELS[name]:<18}{d['wall']:>8.2f}{ntok / d['wall']:>9.1f}{busy}{ttft:>19}"
                  f"{d['cpu'] / ntok * 1e3:>12.2f}")
        r1 = mixed["hf"]["wall"] / mixed["fp1"]["wall"]
        r4 = mixed["fp4"]["wall"] / mixed["fp1"]["wall"]
        rb = mixed["fp1"]["busy"] / (ntok / mixed["hf"]["wall"])
        print(f"token rows computed (prompt + output - 1 per request): FlexPipe {rows_fp}, HF {rows_hf} "
              f"(left padding and rows of finished requests: {rows_hf / rows_fp:.2f}x FlexPipe's)")
        print(f"FlexPipe 1 stage / HF throughput, mixed lengths at {n_mix} streams: {r1:.2f}x whole run, "
              f"{rb:.2f}x while all {n_mix} clients are busy (HF: its whole-run rate, every batch alike)  "
              f"target >= 2x: {'met' if r1 >= 2 else 'NOT met'} (whole run);  "
              f"4 stages / 1 stage wall time: {r4:.2f}x")
        print(moracle.line())
    print(f"elapsed {elapsed:.0f} s")


GREEDY = [0.0, 0, 1.0, 0]   # per-sequence sampling of StepMeta: temperature, top_k, top_p, seed


def _prefilled_core(cfg: ModelConfig, start: int, end: int, n: int, num_blocks: int = 1024):
    """A StageCore of units [start, end) holding n prefilled sequences "s0".."s{n-1}" (make_prompts(n)),
    and the input it takes for given token ids (the ids on the first stage, a random residual elsewhere)."""
    from flexpipe.runtime.stage_core import StageCore, StepMeta

    core = StageCore(cfg, PresetWeights(cfg, seed=0), start, end, num_blocks=num_blocks, block_size=16)

    def x_of(tokens: list[int]) -> torch.Tensor:
        return torch.tensor(tokens) if start == 0 else torch.randn(len(tokens), cfg.hidden_size)

    for j, p in enumerate(make_prompts(n)):
        core.forward(StepMeta([f"s{j}"], [0], [len(p)], [True], [0], [GREEDY]), x_of(p))
    return core, x_of


def _decoding_core(cfg: ModelConfig, start: int, end: int, n: int):
    """A function running the k-th decode step of n prefilled sequences on units [start, end)."""
    from flexpipe.runtime.stage_core import StepMeta

    core, x_of = _prefilled_core(cfg, start, end, n)
    prompts, ids = make_prompts(n), [f"s{j}" for j in range(n)]

    def step(k: int) -> None:
        core.forward(StepMeta(ids, [len(p) + k for p in prompts], [1] * n, [True] * n, [k + 1] * n, [GREEDY] * n),
                     x_of([5] * n))
    return step


def mean_time(fn: Any, reps: int, warm: int = 1) -> float:
    """Seconds per call of fn, the mean of `reps` calls after `warm` untimed ones."""
    for _ in range(warm):
        fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def mixed_step(cfg: ModelConfig, n: int = 31, chunk: int = 40, reps: int = 30) -> None:
    """Time a step of n decodes plus one new prompt's `chunk`-token prefill, against the two apart."""
    from flexpipe.runtime.stage_core import StepMeta

    core, _ = _prefilled_core(cfg, 0, cfg.num_units, n, num_blocks=2048)
    ids, pos = [f"s{j}" for j in range(n)], [len(p) for p in make_prompts(n)]
    new = [(7 * i) % 256 for i in range(chunk)]

    def decode(with_chunk: bool) -> None:
        sids, starts, lens, x = list(ids), list(pos), [1] * n, [5] * n
        if with_chunk:
            sids, starts, lens, x = sids + ["new"], starts + [0], lens + [chunk], x + new
        k = len(sids)
        core.forward(StepMeta(sids, starts, lens, [True] * k, [1] * k, [GREEDY] * k), torch.tensor(x))
        core.free(["new"])
        for j in range(n):
            pos[j] += 1

    def prefill() -> None:
        core.forward(StepMeta(["new"], [0], [chunk], [True], [0], [GREEDY]), torch.tensor(new))
        core.free(["new"])

    times = {}
    for name, fn in (("mixed", lambda: decode(True)), ("decodes", lambda: decode(False)), ("chunk", prefill)):
        times[name] = mean_time(fn, reps) * 1e3
    apart = times["decodes"] + times["chunk"]
    print(f"  a step of {n} decodes + a {chunk}-token prefill chunk: {times['mixed']:.2f} ms; the decodes alone "
          f"{times['decodes']:.2f} ms + the chunk alone {times['chunk']:.2f} ms = {apart:.2f} ms")


class _Ring:
    """One process's two ends of process_split's ring: a pipe (multiprocessing.Connection) or ZeroMQ
    PUSH -> PULL over ipc (ZeroMQ's I/O threads, no event loop, no codec: what a hop costs below the actors)."""

    def __init__(self, kind: str, rx: Any, tx: Any):
        self.kind = kind
        if kind == "pipe":
            self.rx, self.tx = rx, tx
        else:   # rx, tx: ipc endpoints
            import zmq

            self.ctx = zmq.Context()
            self.rx = self.ctx.socket(zmq.PULL)
            self.rx.bind(rx)
            self.tx = self.ctx.socket(zmq.PUSH)
            self.tx.connect(tx)

    def recv(self) -> bytes:
        return self.rx.recv_bytes() if self.kind == "pipe" else self.rx.recv(copy=True)

    def send(self, data: bytes) -> None:
        if self.kind == "pipe":
            self.tx.send_bytes(data)
        else:
            self.tx.send(data, copy=False)

    def close(self) -> None:
        if self.kind != "pipe":
            self.rx.close(linger=0)
            self.tx.close(linger=1000)
            self.ctx.term()


def _ring_stage(i: int, config: dict, cuts: list[int], rows: int, kind: str, rx, tx, steps: int, q) -> None:
    """One process of process_split's ring: a StageCore of units [cuts[i], cuts[i+1]) that runs a decode
    step each time the residual's bytes arrive from the previous process, then passes them on; the first
    process also times each round."""
    from flexpipe.runtime.memory import keep_freed_memory

    torch.set_num_threads(1)
    keep_freed_memory()   # as a stage process does
    cfg = ModelConfig.from_dict(config)
    step = _decoding_core(cfg, cuts[i], cuts[i + 1], rows)
    ring = _Ring(kind, rx, tx)
    q.put(None)
    payload = torch.randn(rows, cfg.hidden_size).numpy().tobytes()   # what a hop carries
    times, rounds, last = [], [], 0.0
    for k in range(steps):
        if i or k:
            ring.recv()
        t = time.perf_counter()
        if i == 0 and k:
            rounds.append(t - last)
        last = t
        step(k)
        times.append(time.perf_counter() - t)
        ring.send(payload)
    if i == 0:
        ring.recv()   # the last round's bytes
    q.put((i, float(np.median(times[10:])), float(np.median(rounds[10:])) if rounds else 0.0))
    ring.close()


def process_split(cfg: ModelConfig, cuts: list[int], rows: int, steps: int = 100) -> None:
    """What being in separate processes costs a stage's compute, and what a bare hop costs: the 4 stages'
    StageCores stepped in turn in one process, then in 4 processes that pass the residual's bytes round
    a ring (one step in flight, as with one stream), over pipes and over ZeroMQ; each process times its
    own forward(), the first one each round."""
    import multiprocessing as mp

    stages = [_decoding_core(cfg, a, b, rows) for a, b in zip(cuts, cuts[1:])]
    one: list[list[float]] = [[] for _ in stages]
    for k in range(steps):
        for i, step in enumerate(stages):
            t = time.perf_counter()
            step(k)
            one[i].append(time.perf_counter() - t)
    del stages
    same = sum(float(np.median(t[10:])) for t in one) * 1e3
    n = len(cuts) - 1
    ctx = mp.get_context("spawn")
    line = f"  {rows:>2} rows, 4 stages' compute per step: in one process {same:6.2f} ms"
    with tempfile.TemporaryDirectory(prefix="fp-ring-") as tmp:
        for kind in ("pipe", "zmq"):
            if kind == "pipe":
                pipes = [ctx.Pipe(duplex=False) for _ in range(n)]   # (receiving end, sending end)
                ends = [(pipes[i - 1][0], pipes[i][1]) for i in range(n)]
            else:
                ep = [f"ipc://{tmp}/ring{i}" for i in range(n)]
                ends = [(ep[i], ep[(i + 1) % n]) for i in range(n)]
            q = ctx.Queue()
            procs = [ctx.Process(target=_ring_stage, args=(i, cfg.to_dict(), cuts, rows, kind, *ends[i], steps, q))
                     for i in range(n)]
            for p in procs:
                p.start()
            for _ in procs:   # every process built and prefilled its core
                q.get()
            got = [q.get() for _ in procs]
            for p in procs:
                p.join()
            apart = sum(m for _, m, _ in got) * 1e3
            rnd = next(r for i, _, r in got if i == 0) * 1e3   # (the first process times the rounds)
            line += (f"; in 4 processes over {'pipes' if kind == 'pipe' else 'ZeroMQ'} {apart:6.2f} ms "
                     f"({apart / same:.2f}x), a round {rnd:.2f} ms = {(rnd - apart) / n * 1e3:.0f} us per hop")
    print(line + f" (medians of {steps - 10} steps)")


def weight_layouts(cfg: ModelConfig, reps: int = 400) -> None:
    """Each matrix shape of a layer (and the head) multiplied as HF holds it (F.linear from [out, in])
    and as CPU units hold it (x @ W from [in, out], model/units.py), at 1 and 32 rows."""
    import torch.nn.functional as F

    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shapes = {"q/o": (H, H), "k/v": (cfg.num_kv_heads * cfg.head_dim, H), "gate/up": (I, H), "down": (H, I),
              "head": (V, H)}
    cells = []
    for rows in (1, 32):
        for name, (out, inp) in shapes.items():
            w = torch.randn(out, inp)
            wt, x = w.t().contiguous(), torch.randn(rows, inp)
            times = [mean_time(fn, reps, warm=20) * 1e6 for fn in (lambda: F.linear(x, w), lambda: x @ wt)]
            cells.append(f"{name} {rows}x{inp}->{out} {times[0]:.1f}/{times[1]:.1f} us ({times[0] / times[1]:.2f}x)")
    print("matmul, F.linear from [out, in] / x @ W from [in, out]: " + "; ".join(cells))
    kv = cfg.num_kv_heads * cfg.head_dim
    cells = []
    for rows in (1, 32):
        x = torch.randn(rows, H)
        for name, outs in (("q,k,v", (H, kv, kv)), ("gate,up", (I, I))):
            ws = [torch.randn(H, n) for n in outs]
            fused = torch.cat(ws, 1)
            apart = mean_time(lambda: [x @ w for w in ws], reps, warm=20) * 1e6
            one = mean_time(lambda: (x @ fused).split(list(outs), 1), reps, warm=20) * 1e6
            cells.append(f"{name} {rows} rows {apart:.1f} / {one:.1f} us")
    print("matmuls of one input apart / fused into one (x @ [W1 | W2 ..], then split): " + "; ".join(cells))


def cold_codec(cfg: ModelConfig, cuts: list[int], steps: int = 300) -> None:
    """What a stage's compute does to the Python work around it: encoding and decoding a 1-row step
    message hot (in a loop) and right after a forward() of a middle stage (whose weights have just
    streamed through the core's caches), as a stage does on every hop."""
    from flexpipe.runtime import codec
    from flexpipe.runtime.stage import StepInput

    step = _decoding_core(cfg, cuts[1], cuts[2], 1)
    x = torch.randn(1, cfg.hidden_size)
    msg = StepInput(1, 5, ["s0"], [70], [1], [True], [3], [GREEDY], [])
    frames = codec.encode(msg, [x])
    frames = [frames[0], *(bytes(f) for f in frames[1:])]

    def enc() -> None:
        codec.encode(msg, [x])

    def dec() -> None:
        codec.decode_envelope(frames)

    line = []
    for name, fn in (("encode", enc), ("decode", dec)):
        hot, cold = [], []
        for k in range(steps):
            step(k % 60)
            t = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            fn()
            cold.append(t1 - t)
            hot.append(time.perf_counter() - t1)
        line.append(f"{name} {np.median(cold) * 1e6:.0f} us right after a forward, {np.median(hot) * 1e6:.0f} us "
                    f"again at once")
    print(f"a 1-row step message through the codec, stage [{cuts[1]}, {cuts[2]}): " + "; ".join(line))


def decode_layouts(reps: int = 3000) -> None:
    """The attention layout of a decode group, built by the general path and by the decode one."""
    from flexpipe.model.attention import _any_layout, _decode_layout

    cpu = torch.device("cpu")
    parts = []
    for b in (1, 4, 16):
        ctx = [60 + j for j in range(b)]
        tables = [list(range(8 * j, 8 * j + 5)) for j in range(b)]
        general = mean_time(lambda: _any_layout([1] * b, ctx, tables, 16, None, cpu), reps, warm=100)
        decode = mean_time(lambda: _decode_layout(ctx, tables, 16, cpu), reps, warm=100)
        parts.append(f"{b} sequences {general * 1e6:.1f} / {decode * 1e6:.1f} us")
    print("attention layout of a decode group (contexts of 60.. tokens), general / decode path: " + "; ".join(parts))


def compiled_step(cfg: ModelConfig, n: int = 32, keys_step: int = 32) -> None:
    """A decode step of n rows on StaticDecode's fixed-shape buffers, eager and under torch.compile
    (inductor's CPU code: fused elementwise kernels, one graph per (rows, keys) bucket): whether
    compiling the step would close the gap to 2x HF at equal lengths (README, FP-3)."""
    import flexpipe.model.static_decode as sd
    from flexpipe.runtime.stage_core import StageCore, StepMeta

    bucket = sd.bucket_keys
    sd.bucket_keys = lambda m, step=keys_step: bucket(m, step)   # CUDA's 256-key buckets pad ~2.5x here
    try:
        prompts, ids = make_prompts(n), [f"s{j}" for j in range(n)]
        res = {}
        for label in ("eager", "compiled"):
            core = StageCore(cfg, PresetWeights(cfg, seed=0), 0, cfg.num_units, num_blocks=1024, block_size=16,
                             decode="static")
            for j, p in enumerate(prompts):
                core.forward(StepMeta([f"s{j}"], [0], [len(p)], [True], [0], [GREEDY]), torch.tensor(p))

            def step(k: int) -> torch.Tensor:
                return core.forward(StepMeta(ids, [len(p) + k for p in prompts], [1] * n, [True] * n,
                                             [k + 1] * n, [GREEDY] * n), torch.tensor([5] * n))
            step(0)
            t0 = time.perf_counter()
            if label == "compiled":
                core._static._forward = torch.compile(core._static._forward, dynamic=False, fullgraph=True)
            outs, times = [], []
            for k in range(1, 64):
                t = time.perf_counter()
                outs.append(step(k))
                times.append(time.perf_counter() - t)
            res[label] = (outs, pct(times[-24:], 50) * 1e3, time.perf_counter() - t0)
        same = all(torch.equal(a, b) for a, b in zip(res["eager"][0], res["compiled"][0]))
        print(f"decode step of {n} rows on static buffers (keys in steps of {keys_step}), p50 of the last 24 of "
              f"63 steps: eager {res['eager'][1]:.2f} ms, torch.compile {res['compiled'][1]:.2f} ms "
              f"({res['eager'][1] / res['compiled'][1]:.2f}x; the 63 steps with their compiles took "
              f"{res['compiled'][2]:.1f} s); sampled tokens {'identical' if same else 'DIFFER'}")
    finally:
        sd.bucket_keys = bucket


def profile_decode(args: argparse.Namespace, n: int = 32, steps: int = 20) -> None:
    """A stage's decode step alone (in-process StageCore, no messages): its time for the whole model
    and for the 4-stage split at 1, 16 and 32 rows, then where one step of n rows goes (cProfile)."""
    import cProfile
    import pstats

    cfg = model_config(args)
    cuts = [0, 5, 9, 13, 18] if cfg.num_units == 18 else [round(cfg.num_units * i / 4) for i in range(5)]
    print(f"decode step of StageCore alone, {cfg.name}, {torch.get_num_threads()} torch thread, mean of 60 "
          f"steps after prompts of 16..64 tokens):")
    for rows in (1, 16, 32):
        whole, parts = 0.0, []
        for a, b in [(0, cfg.num_units)] + list(zip(cuts, cuts[1:])):
            step = _decoding_core(cfg, a, b, rows)
            for k in range(4):
                step(k)
            t = time.perf_counter()
            for k in range(4, 64):
                step(k)
            ms = (time.perf_counter() - t) / 60 * 1e3
            if b - a == cfg.num_units:
                whole = ms
            else:
                parts.append(ms)
        print(f"  {rows:>2} rows: 1 stage {whole:6.2f} ms; 4 stages {' + '.join(f'{p:.2f}' for p in parts)} "
              f"= {sum(parts):6.2f} ms ({sum(parts) / whole:.2f}x)")
    mixed_step(cfg)
    weight_layouts(cfg)
    print("the 4-stage split in one process vs in 4 processes passing the residual round a ring (no actors, no event loop):")
    for rows in (1, 32):
        process_split(cfg, cuts, rows)
    cold_codec(cfg, cuts)
    decode_layouts()
    compiled_step(cfg)
    step = _decoding_core(cfg, 0, cfg.num_units, n)
    for k in range(3):
        step(k)
    prof = cProfile.Profile()
    prof.enable()
    for k in range(3, 3 + steps):
        step(k)
    prof.disable()
    st = pstats.Stats(prof).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)
    total = sum(v[2] for v in st.values()) / steps
    print(f"decode step of {n} sequences, all {cfg.num_units} units of {cfg.name} in one StageCore, "
          f"{torch.get_num_threads()} thread: {total * 1e3:.1f} ms (cProfile, mean of {steps})")
    top = sorted(st.items(), key=lambda kv: -kv[1][2])[:8]
    for (file, line, name), v in top:
        where = name if file == "~" else f"{file.rsplit('/', 1)[-1]}:{line} {name}"
        print(f"  {v[2] / steps * 1e3:7.2f} ms  {where}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=None, help="model preset, e.g. tiny (default: --hidden/--layers Llama)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per stream (default 64, quick 32)")
    ap.add_argument("--repeats", type=int, default=None, help="best of (default 3, quick 1)")
    ap.add_argument("--hf-threads", type=int, default=1, help="torch threads of HF (default 1 = one stage's)")
    ap.add_argument("--quick", action="store_true", help="32 tokens, one repeat, 1 and 32 streams")
    ap.add_argument("--mixed", type=int, default=None,
                    help="requests of the mixed-length closed-loop run (default 96, quick 64; 0 skips it)")
    ap.add_argument("--max-inflight", type=int, default=0,
                    help="micro-batches in flight of the 4-stage pipeline (default 0: one per parallel slot)")
    ap.add_argument("--rt-priority", type=int, default=0,
                    help="SCHED_RR priority of every process, HF's thread too (the rt_priority setting; default 0: "
                         "the kernel's default scheduler)")
    ap.add_argument("--profile", action="store_true", help="only profile one stage's decode step (32 sequences)")
    args = ap.parse_args()
    args.tokens = args.tokens or (32 if args.quick else 64)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.mixed = (64 if args.quick else 96) if args.mixed is None else args.mixed
    # One torch thread in this process too (router, oracle, HF's thread sets its own): on a 2-core
    # machine shared with other work, an OpenMP team of 2 spins against the stages and other jobs.
    torch.set_num_threads(1)
    if args.profile:
        profile_decode(args)
        return
    if args.rt_priority:   # this process first: HF's thread and the routers' loop inherit it
        from flexpipe.runtime.sched import use_realtime

        use_realtime(args.rt_priority)
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()

"""FP-10 GPU check: the GPU tests and the GPU figures in one run, written to a JSON file (docs/gpu.md).

    bash benchmarks/gpu_check.sh                      # on a machine with one NVIDIA GPU, < 8 minutes
    .venv/bin/python -m benchmarks.gpu_check --dry-run   # the same control flow on CPU, tiny sizes

Sections, each in its own process with its own time budget (one that fails or hangs loses nothing
else): env (devices, versions, NVML inventory), tests (pytest tests/test_gpu.py), kv_bandwidth
(KV block migration through CUDA IPC vs a plain device-to-device copy), hop_latency (a stage hop
through CUDA IPC vs staging through host memory), decode (Llama-7B-shaped fp16 model, random weights
drawn on the GPU, 1/16/64 streams, FlexPipe vs HF transformers), reshape (1->2->1 stages on one GPU,
two stage processes with CUDA IPC between them, pause p50/p99).

The GPU stages here are FlexPipe's own (`FlexPipe`'s Controller launching
`flexpipe.runtime.gpu_stage:GpuStageActor` for CUDA stages): the hop between two CUDA stage processes
is a cuda_ipc channel and KV moves block to block through CUDA IPC. Weights are preset weights drawn
on the device (`flexpipe.model.device_weights`).

Exit code: 0 all sections ran, every check passed and every target was met; 1 a section failed, timed
out, or a test or check failed; 2 no usable GPU (and not --dry-run); 3 all ran and passed, but a
performance target was not met; 4 nothing failed, but a section was skipped (no CuPy: no CUDA IPC;
or no time left).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

import torch

from flexpipe.runtime.actor import ActorContext, ActorSettings, handles
from flexpipe.runtime.messages import message
from flexpipe.transports import open_receiver, open_sender
from flexpipe.transports import cuda_ipc

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "flexpipe.gpu_check/1"
KV_TARGET = 0.70          # KV migration through CUDA IPC >= 70% of a plain device-to-device copy
TIE = 1e-3                # oracle: a greedy token may differ only where the reference's top-2 logits are closer


# ---- a pipeline of the production runtime with device-drawn weights and a channel hop ------------------------------------------
def make_config(name: str, layers: int | None = None):
    from flexpipe.model.config import ModelConfig, preset

    cfg = preset(name)
    if layers is not None and layers != cfg.num_layers:
        d = cfg.to_dict()
        d.update(num_layers=layers, name=f"{name}-{layers}l")
        cfg = ModelConfig.from_dict(d)
    return cfg


@contextlib.asynccontextmanager
async def ipc_pipeline(cfg: Any, *, stages: int = 1, device: str = "cuda:0", dtype: str = "float16",
                       start_timeout: float = 180.0, transport: str = "", **settings: Any):
    """FlexPipe's own runtime (Controller, GpuStageActor stages) with weights drawn on `device`.

    `transport` defaults to cuda_ipc on a GPU (a stage pair that cannot have it fails the launch instead
    of quietly taking the host path) and to shm on the CPU (the same channel machinery, no GPU).
    """
    from flexpipe.api import FlexPipe, ModelSpec, Settings, plan_shape
    from flexpipe.model.tokenizer import load_tokenizer
    from flexpipe.runtime.controller import Controller
    from flexpipe.runtime.launcher import ActorSystem

    transport = transport or ("cuda_ipc" if device.startswith("cuda") else "shm")
    s = Settings(device=device, dtype=dtype, start_timeout=start_timeout, heartbeat_timeout=30.0,
                 transport=transport, **settings)
    spec = ModelSpec(cfg.name, cfg, {"kind": "preset", "seed": 0, "on_device": True}, load_tokenizer(cfg, None))
    shape = plan_shape(cfg, stages, device=device)
    actor_settings = ActorSettings(heartbeat_interval=1.0, heartbeat_timeout=30.0, ask_timeout=120.0,
                                   start_timeout=start_timeout, torch_threads=s.torch_threads)
    async with ActorSystem(actor_settings, name="gpu-check") as system:
        controller = Controller(system, spec, s)
        try:
            router = await controller.start(shape)
            yield FlexPipe(spec, s, system, router, controller)
        finally:
            await controller.aclose()


# ---- helper actors of the kv_bandwidth and hop_latency sections (messages 422-429) -----------------
def _rx_options(kind: str, device: str) -> dict:
    return {"device": device, "ring_bytes": 32 << 20} if kind == "cuda_ipc" else {}


def _tx_options(kind: str, device: str) -> dict:
    return {"device": device} if kind == "cuda_ipc" else {}


@message(422)
class MakePools:
    """Allocate `units` zeroed K/V pools [num_blocks, *block_shape] and export them (reply: KvPools)."""
    units: int
    num_blocks: int
    block_shape: list
    dtype: str
    device: str


@message(423)
class PoolDigest:
    """sha256 of blocks `ids` of unit `unit`'s K and V (to check what a copy wrote)."""
    unit: int
    ids: list


@message(424)
class EchoOpen:
    """Open a receiver of `kind`, connect a sender to `back`, and echo every receive (reply: address)."""
    kind: str
    back: dict
    device: str
    staged: bool = False


class Peer:
    """The other process of the kv_bandwidth and hop_latency measurements."""

    def __init__(self) -> None:
        self.pools: dict = {}
        self.rx = self.tx = None
        self.task: asyncio.Task | None = None

    @handles(MakePools)
    def make_pools(self, ctx: ActorContext, msg: MakePools) -> Any:
        from types import SimpleNamespace

        shape = [msg.num_blocks, *msg.block_shape]
        dtype = getattr(torch, msg.dtype)
        self.pools = {u: SimpleNamespace(k=torch.zeros(shape, dtype=dtype, device=msg.device),
                                         v=torch.zeros(shape, dtype=dtype, device=msg.device))
                      for u in range(msg.units)}
        return cuda_ipc.export_pools(self.pools, msg.num_blocks, msg.block_shape[0])

    @handles(PoolDigest)
    def digest(self, ctx: ActorContext, msg: PoolDigest) -> str:
        return blocks_digest(self.pools[msg.unit].k, self.pools[msg.unit].v, msg.ids)

    @handles(EchoOpen)
    async def echo_open(self, ctx: ActorContext, msg: EchoOpen) -> dict:
        dev = "cpu" if msg.staged else msg.device
        self.rx = await open_receiver(msg.kind, **_rx_options(msg.kind, dev))
        self.tx = await open_sender(msg.back, **_tx_options(msg.kind, dev))
        self.task = asyncio.create_task(self._echo(msg.staged, msg.device))
        return self.rx.address

    async def _echo(self, staged: bool, device: str) -> None:
        while True:
            (x,) = await self.rx.recv()
            if staged:   # what a hop through host memory costs: H2D here, D2H back
                x = x.to(device, non_blocking=True).to("cpu")
            await self.tx.send(x)
            del x

    async def on_stop(self, ctx: ActorContext) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        for ch in (self.rx, self.tx):
            if ch is not None:
                await ch.aclose()


def blocks_digest(k: torch.Tensor, v: torch.Tensor, ids: list) -> str:
    idx = torch.as_tensor(ids, dtype=torch.int64, device=k.device)
    h = hashlib.sha256()
    for t in (k, v):
        h.update(t.index_select(0, idx).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def pct(xs: list[float], q: float) -> float:
    """q-th percentile (numpy's linear interpolation), NaN for no samples."""
    return float(np.percentile(xs, q)) if xs else float("nan")


def _ipc_missing(args: argparse.Namespace) -> dict | None:
    """A section result saying why a CUDA IPC section cannot run here (None when it can)."""
    reason = "" if args.dry_run else cuda_ipc.unavailable_reason()
    return {"skip_reason": f"needs CUDA IPC: {reason}"} if reason else None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


# ---- sections (each runs in its own process: python -m benchmarks.gpu_check --section NAME) ---------
def section_env(args: argparse.Namespace) -> dict:
    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "torch_cuda": torch.version.cuda, "host": socket.gethostname(),
                           "cuda_available": torch.cuda.is_available(), "cupy": None,
                           "cuda_ipc": cuda_ipc.unavailable_reason() or "available"}
    from flexpipe.transports import nccl
    out["nccl"] = nccl.unavailable_reason() or "available"
    try:
        import cupy
        out["cupy"] = cupy.__version__
        out["nccl_version"] = nccl_version()
    except Exception as e:
        out["cupy_missing"] = f"{type(e).__name__}: {e}"
    if torch.cuda.is_available():
        out["gpus"] = [{"index": i, "name": torch.cuda.get_device_name(i),
                        "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
                        "capability": list(torch.cuda.get_device_capability(i))}
                       for i in range(torch.cuda.device_count())]
    try:
        from flexpipe.runtime.inventory import Inventory
        inv = Inventory(own_pids=[os.getpid()])
        try:
            out["nvml"] = [{"index": s.index, "name": s.name, "total_gib": round(s.total / 2**30, 1),
                            "free_gib": round(s.free / 2**30, 1), "util": s.util} for s in inv.sample()]
            out["nvml_cluster"] = inv.cluster()
        finally:
            inv.close()
    except Exception as e:   # no pynvml / driver: the allocator then needs a cluster file
        out["nvml"] = f"{type(e).__name__}: {e}"
    return out


def nccl_version() -> int | None:
    try:
        from cupy.cuda import nccl
        return int(nccl.get_version())
    except Exception:
        return None


TEST_TIMEOUT = 90   # seconds per GPU test (tests/test_gpu.py's marker, which wins): a hang is dumped and ends pytest


def section_tests(args: argparse.Namespace) -> dict:
    """pytest -m gpu tests/test_gpu.py, its output shown as it runs and its verdicts read from it.

    pytest-timeout's thread method: a stuck test, even one inside a C call (which a signal could
    not interrupt), has every thread's stack dumped, after which pytest exits: the tests after it
    are reported as not run. The verdicts come from the -v lines, so they
    survive that exit (and the section's own budget) where a JUnit report would not.
    """
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-m", "gpu", "-rfEs", "--tb=short",
           f"--timeout={TEST_TIMEOUT}", "--timeout-method=thread", "tests/test_gpu.py"]
    print("  $ " + " ".join(cmd[2:]), flush=True)
    log: list[str] = []
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc, \
            open(args.section_out + ".log", "w") as kept:   # read by the driver if the budget kills us
        assert proc.stdout is not None
        for line in proc.stdout:
            print("  " + line, end="", flush=True)
            log.append(line.rstrip("\n"))
            kept.write(line)
            kept.flush()
        rc = proc.wait()
    return {**read_verdicts(log), "rc": rc}


_SUMMARY = re.compile(r"^(?:FAILED|ERROR) (tests/\S+::(\S+)) - (.*)")
_VERDICT = re.compile(r"^(tests/\S+::(\S+)) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")


def read_verdicts(log: list[str]) -> dict:
    """Per-test states from pytest -v output; tests it collected but never finished are "not run"."""
    cases: dict[str, dict] = {}
    collected = None
    for line in log:
        if (m := re.search(r"collected (\d+) items?", line)) and collected is None:
            collected = int(m.group(1))
        if m := _VERDICT.match(line):
            state = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped",
                     "XFAIL": "skipped", "XPASS": "failed"}[m.group(3)]
            why = re.sub(r"\s*\[\s*\d+%\]$", "", line[m.end():]).strip(" ()")
            cases[m.group(2)] = {"name": m.group(2), "state": state, "why": why[:300]}
        elif (m := _SUMMARY.match(line)) and m.group(2) in cases:   # -r summary: a failure's message
            cases[m.group(2)]["why"] = m.group(3)[:300]
    skips = [m.group(1) for line in log if (m := re.match(r"^SKIPPED \[\d+\] (.*)", line))]
    hung = next((line for line in log if "Timeout" in line and "+++" in line), "")
    counts = {st: sum(c["state"] == st for c in cases.values()) for st in ("passed", "failed", "error", "skipped")}
    not_run = max(0, (collected or 0) - len(cases))
    ok = not counts["failed"] and not counts["error"] and not not_run and collected is not None
    return {"ok": ok, **counts, "not_run": not_run, "collected": collected, "cases": list(cases.values()),
            "skip_reasons": skips,
            "timeout": hung, "log_tail": log[-120:] if not ok else []}


async def _peer(system: Any) -> Any:
    return await system.launch("benchmarks.gpu_check:Peer", name="peer")


def _time_it(fn: Any, device: str, reps: int) -> list[float]:
    fn()   # warm-up: first touches of memory, lazy initialisation
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


async def section_kv_bandwidth(args: argparse.Namespace) -> dict:
    if (skip := _ipc_missing(args)) is not None:
        return skip
    from flexpipe.runtime.launcher import ActorSystem

    dry = args.dry_run
    device = "cpu" if dry else "cuda:0"
    units, num_blocks, move = (2, 64, 32) if dry else (4, 1024, 512)
    block_shape = [16, 2, 8] if dry else [16, 32, 128]              # llama2-7b: 32 KV heads x 128
    dtype = torch.float32 if dry else torch.float16
    g = torch.Generator(device=device).manual_seed(0)
    src = {u: (torch.randn(num_blocks, *block_shape, generator=g, dtype=dtype, device=device),
               torch.randn(num_blocks, *block_shape, generator=g, dtype=dtype, device=device)) for u in range(units)}
    block_bytes = src[0][0][0].numel() * src[0][0].element_size() * 2
    nbytes = units * move * block_bytes
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(1)).tolist()
    patterns = {"coalesced": (list(range(move)), list(range(num_blocks - move, num_blocks))),
                "block_by_block": (perm[:move], perm[move:2 * move])}
    reps = 3 if dry else 7
    out: dict[str, Any] = {"units": units, "num_blocks": num_blocks, "blocks_moved_per_unit": move,
                           "block_shape": block_shape, "dtype": str(dtype).removeprefix("torch."),
                           "bytes_per_move": nbytes, "reps": reps}
    # baseline: one plain copy of the same bytes on the same device
    flat_src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    flat_dst = torch.zeros_like(flat_src)
    t = _time_it(lambda: flat_dst.copy_(flat_src), device, reps)
    out["d2d_gbs"] = nbytes / pct(t, 50) / 1e9
    async with ActorSystem(ActorSettings(ask_timeout=120.0, start_timeout=120.0)) as system:
        if dry:   # no second process can map CPU memory this way: copy between local pools instead
            dst = {u: (torch.zeros_like(k), torch.zeros_like(v)) for u, (k, v) in src.items()}
            digest = lambda u, ids: blocks_digest(*dst[u], ids)  # noqa: E731
            peer = None
        else:
            peer = await _peer(system)
            pools = await system.ask(peer.ref, MakePools(units, num_blocks, block_shape, out["dtype"], device))
            opened = cuda_ipc.PeerPools()
            dst = opened.open(pools, 0)
        local = {u: (torch.zeros_like(k), torch.zeros_like(v)) for u, (k, v) in src.items()}
        stream = torch.cuda.Stream(device) if not dry else None
        try:
            for name, (s_ids, d_ids) in patterns.items():
                runs = cuda_ipc.coalesce_runs(s_ids, d_ids)

                def move_all() -> None:
                    for u in range(units):
                        cuda_ipc.copy_runs(src[u][0], dst[u][0], runs, stream)
                        cuda_ipc.copy_runs(src[u][1], dst[u][1], runs, stream)
                    if stream is not None:
                        stream.synchronize()

                t = _time_it(move_all, device, reps)
                gbs = nbytes / pct(t, 50) / 1e9

                def move_local() -> None:   # the same calls between pools of this process: no IPC mapping
                    for u in range(units):
                        cuda_ipc.copy_runs(src[u][0], local[u][0], runs, stream)
                        cuda_ipc.copy_runs(src[u][1], local[u][1], runs, stream)
                    if stream is not None:
                        stream.synchronize()

                local_gbs = nbytes / pct(_time_it(move_local, device, reps), 50) / 1e9
                want = blocks_digest(*src[units - 1], s_ids)
                got = (digest(units - 1, d_ids) if dry else
                       await system.ask(peer.ref, PoolDigest(units - 1, d_ids)))
                out[name] = {"runs_per_unit": len(runs), "gbs": gbs, "ratio_vs_d2d": gbs / out["d2d_gbs"],
                             "p50_ms": pct(t, 50) * 1e3, "bytes_equal": want == got,
                             "local_gbs": local_gbs, "ratio_vs_local": gbs / local_gbs}
        finally:
            if not dry:
                opened.close()
                await peer.stop()
    out["ok"] = all(out[p]["bytes_equal"] for p in patterns)
    ratio = out["coalesced"]["ratio_vs_d2d"]
    out["target"] = {"name": "kv_ipc_coalesced_vs_d2d", "min": KV_TARGET, "value": ratio,
                     "met": None if dry else ratio >= KV_TARGET}   # a CPU copy says nothing about the target
    return out


async def section_hop_latency(args: argparse.Namespace) -> dict:
    if (skip := _ipc_missing(args)) is not None:
        return skip
    from flexpipe.runtime.launcher import ActorSystem

    dry = args.dry_run
    device = "cpu" if dry else "cuda:0"
    hidden, dtype = (128, torch.float32) if dry else (4096, torch.float16)
    tokens = [1, 64] if dry else [1, 64, 256]
    iters, warm = (30, 5) if dry else (300, 30)
    # on a GPU: the channel, and the residual staged through host memory over a shared-memory ring
    # or a ZeroMQ socket (what the message path of a plain StageActor does)
    kinds = [("shm", False), ("ipc", False)] if dry else [("cuda_ipc", False), ("shm", True), ("ipc", True)]
    out: dict[str, Any] = {"hidden": hidden, "dtype": str(dtype).removeprefix("torch."), "iters": iters, "rows": []}
    async with ActorSystem(ActorSettings(ask_timeout=120.0, start_timeout=120.0)) as system:
        for kind, staged in kinds:
            peer = await _peer(system)
            here = "cpu" if staged else device
            rx = await open_receiver(kind, **_rx_options(kind, here))
            try:
                address = await system.ask(peer.ref, EchoOpen(kind, rx.address, device, staged))
                tx = await open_sender(address, **_tx_options(kind, here))
                try:
                    for n in tokens:
                        x = torch.randn(n, hidden, dtype=dtype, device=device)
                        times = []
                        for i in range(iters + warm):
                            sync(device)
                            t0 = time.perf_counter()
                            await tx.send(x.to("cpu") if staged else x)
                            (y,) = await rx.recv()
                            y = y.to(device) if staged else y
                            sync(device)
                            if i >= warm:
                                times.append((time.perf_counter() - t0) / 2)
                            del y
                        label = f"host-staged (D2H + {kind} + H2D)" if staged else kind
                        out["rows"].append({"transport": label, "tokens": n, "bytes": x.numel() * x.element_size(),
                                            "p50_us": pct(times, 50) * 1e6, "p99_us": pct(times, 99) * 1e6})
                finally:
                    await tx.aclose()
            finally:
                await peer.stop()
                await rx.aclose()
    out["ok"] = True
    return out


def _prompts(n: int, vocab: int) -> list[list[int]]:
    """n prompts of 32..64 token ids (byte ids for byte-level vocabularies), deterministic."""
    lo, span = (0, 256) if vocab < 1024 else (260, vocab - 300)
    return [[(37 * i + 11 * j + 5) % span + lo for i in range(32 + (7 * j) % 33)] for j in range(n)]


def _window_rate(res: list) -> float:
    """Tokens/s while every stream decodes: from the last first token to the first last token."""
    start = max(times[0] for _, times in res)
    end = min(times[-1] for _, times in res)
    if end <= start:
        return float("nan")
    return sum(1 for _, times in res for t in times if start < t <= end) / (end - start)


async def _fp_run(fp: Any, prompts: list[list[int]], m: int) -> list:
    async def one(p: list[int]) -> tuple[float, list[float]]:
        t0, times = time.perf_counter(), []
        async for ev in fp.generate(p, max_tokens=m, ignore_eos=True):
            if ev.token_id is not None:
                times.append(time.perf_counter())
        return t0, times
    return list(await asyncio.gather(*(one(p) for p in prompts)))


def _hf_model(cfg: Any, device: str, dtype: torch.dtype) -> Any:
    import transformers

    config = getattr(transformers, "LlamaConfig")(**cfg.to_hf())
    config._attn_implementation = "sdpa"
    with torch.device(device):
        try:
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        except TypeError:   # transformers < 4.56 names it torch_dtype
            model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    model = model.to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _hf_run(model: Any, prompts: list[list[int]], m: int, device: str) -> list:
    class Clock:
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: Any) -> None:
            sync(device)
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    clock = Clock()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=m, min_new_tokens=m, do_sample=False, streamer=clock)
    times = clock.times[1:]   # the first put is the prompt
    return [(t0, times) for _ in prompts]


def _rates(res: list, n: int, m: int) -> dict:
    tpot = [b - a for _, times in res for a, b in zip(times, times[1:])]
    wall = max(times[-1] for _, times in res) - min(t0 for t0, _ in res)
    return {"decode_tok_s": _window_rate(res), "e2e_tok_s": n * m / wall, "tpot_p50_ms": pct(tpot, 50) * 1e3,
            "ttft_p50_ms": pct([times[0] - t0 for t0, times in res], 50) * 1e3}


async def section_decode(args: argparse.Namespace) -> dict:
    dry = args.dry_run
    device = "cpu" if dry else "cuda:0"
    cfg = make_config("tiny" if dry else "llama2-7b")
    dtype = "float32" if dry else "float16"
    streams = [1, 4] if dry else [1, 16, 64]
    m = 8 if dry else 64
    prompts = _prompts(max(streams), cfg.vocab_size)
    out: dict[str, Any] = {"model": cfg.name, "dtype": dtype, "new_tokens": m, "prompt_tokens": [32, 64],
                           "streams": streams, "flexpipe": {}, "hf": {}}
    graphs = "static" if dry else "graph"   # CUDA graphs of decode steps (model/static_decode.py)

    async def pipeline(key: str, stages: int, decode: str, budget: float) -> None:
        """FlexPipe with `stages` stage processes on the device, decode steps `decode`, into out[key];
        at most `budget` seconds (a configuration that hangs leaves the others their time)."""
        try:
            await asyncio.wait_for(run_pipeline(key, stages, decode), budget)
        except asyncio.TimeoutError:
            out[key + "_error"] = f"ran past its {budget:.0f} s"
            print(f"  {key}: ran past its {budget:.0f} s and was stopped", flush=True)

    async def run_pipeline(key: str, stages: int, decode: str) -> None:
        label = f"FlexPipe {stages} stage{'s' if stages > 1 else ''}{', ' + decode if decode != 'off' else ''}"
        out[key] = {}
        t0 = time.perf_counter()
        try:
            async with ipc_pipeline(cfg, stages=stages, device=device, dtype=dtype, num_blocks=1024,
                                    max_batch_tokens=1024, decode_graphs=decode) as fp:
                out[key + "_start_s"] = time.perf_counter() - t0
                await _fp_run(fp, prompts[:2], 4)   # warm-up: first steps pay for lazy initialisation
                for n in streams:
                    r = out[key][str(n)] = _rates(await _fp_run(fp, prompts[:n], m), n, m)
                    print(f"  {label} {n:>3} streams: {r['decode_tok_s']:.1f} tok/s, TPOT p50 "
                          f"{r['tpot_p50_ms']:.1f} ms", flush=True)
        except Exception as e:   # one configuration failing leaves the others' figures
            out[key + "_error"] = f"{type(e).__name__}: {e}"[:500]
            print(f"  {label}: failed: {out[key + '_error']}", flush=True)

    await pipeline("flexpipe", 1, "off", 60)
    await pipeline("flexpipe_graph", 1, graphs, 45)
    # FP-3's second target on a GPU: 4 stage processes on the same device, hops through CUDA IPC,
    # against 1 stage with the same decode steps
    await pipeline("flexpipe_4", 4, graphs, 55)
    base = out["flexpipe_graph"] if out["flexpipe_graph"] else out["flexpipe"]
    out["tpot_4_over_1"] = {str(n): out["flexpipe_4"][str(n)]["tpot_p50_ms"] / base[str(n)]["tpot_p50_ms"]
                            for n in streams if str(n) in out["flexpipe_4"] and str(n) in base}
    if not dry:
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    import transformers
    out["transformers"] = transformers.__version__
    model = _hf_model(cfg, device, getattr(torch, dtype))
    out["hf_load_s"] = time.perf_counter() - t0
    await asyncio.to_thread(_hf_run, model, prompts[:2], 4, device)
    for n in streams:
        res = await asyncio.to_thread(_hf_run, model, prompts[:n], m, device)
        out["hf"][str(n)] = _rates(res, n, m)
        print(f"  HF       {n:>3} streams: {out['hf'][str(n)]['decode_tok_s']:.1f} tok/s", flush=True)
    out["ratio"] = {str(n): out["flexpipe"][str(n)]["decode_tok_s"] / out["hf"][str(n)]["decode_tok_s"]
                    for n in streams if str(n) in out["flexpipe"]}
    out["ratio_graph"] = {str(n): out["flexpipe_graph"][str(n)]["decode_tok_s"] / out["hf"][str(n)]["decode_tok_s"]
                          for n in streams if str(n) in out["flexpipe_graph"]}
    out["ok"] = not any(k.endswith("_error") for k in out)
    return out


async def section_reshape(args: argparse.Namespace) -> dict:
    if (skip := _ipc_missing(args)) is not None:
        return skip
    dry = args.dry_run
    device = "cpu" if dry else "cuda:0"
    cfg = make_config("tiny") if dry else make_config("llama2-7b", layers=8)
    dtype = "float32" if dry else "float16"
    cycles, streams, m = (1, 4, 24) if dry else (5, 16, 48)
    prompts = _prompts(streams, cfg.vocab_size)
    stats: list[Any] = []
    out: dict[str, Any] = {"model": cfg.name, "dtype": dtype, "streams": streams, "cycles": cycles}
    async with ipc_pipeline(cfg, stages=1, device=device, dtype=dtype, num_blocks=512) as fp:
        stop = asyncio.Event()
        done = [0]

        async def load(p: list[int]) -> None:   # a stream that keeps generating until the reshapes are over
            while not stop.is_set():
                async for _ in fp.generate(p, max_tokens=m, ignore_eos=True):
                    pass
                done[0] += 1

        tasks = [asyncio.create_task(load(p)) for p in prompts]
        try:
            await asyncio.sleep(1.0 if not dry else 0.5)
            for _ in range(cycles):
                for stages in (2, 1):
                    st = await fp.reshape(stages=stages)
                    stats.append(st)
                    print(f"  -> {stages} stage(s): pause {st.pause_s * 1e3:.1f} ms, KV {st.kv_bytes / 2**20:.1f} MiB, "
                          f"{st.requests_running} requests running", flush=True)
                    if stages == 2:
                        status = await fp.controller.stage_status()
                        out.setdefault("hops", []).append(status[0].get("hop", ""))
                    await asyncio.sleep(0.3)
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        out["requests_completed"] = done[0]
    pauses = [s.pause_s * 1e3 for s in stats]
    out.update(reshapes=len(stats), pause_p50_ms=pct(pauses, 50), pause_p99_ms=pct(pauses, 99),
               pause_max_ms=max(pauses), kv_mib_per_reshape=pct([s.kv_bytes / 2**20 for s in stats], 50),
               kv_delta_mib_p50=pct([s.kv_bytes_delta / 2**20 for s in stats], 50),
               total_s_p50=pct([s.total_s for s in stats], 50), all_ok=all(s.ok for s in stats))
    want_hop = "shm" if dry else "cuda_ipc"
    out["ok"] = out["all_ok"] and out["requests_completed"] > 0 and all(h == want_hop for h in out.get("hops", []))
    return out


def _profile_calls(fn: Any, calls: int, device: str) -> dict:
    """Wall time per call of `fn`, and where it goes (torch.profiler): the GPU's kernel time, the
    host's launches, copies and synchronisations, and the host ops that take the most time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    out: dict[str, Any] = {"calls": calls, "wall_ms": (time.perf_counter() - t0) / calls * 1e3}
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    ev = prof.key_averages()

    def self_dev(e: Any) -> float:
        return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0)

    out["gpu_kernel_ms"] = sum(self_dev(e) for e in ev if e.device_type == DeviceType.CUDA) / calls / 1e3
    out["host_per_call"] = {k: sum(e.count for e in ev if e.key == k) / calls for k in (
        "cudaLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch", "cudaMemcpyAsync", "cudaStreamSynchronize",
        "cudaDeviceSynchronize", "aten::_local_scalar_dense", "aten::copy_", "aten::to")}
    host = sorted((e for e in ev if e.device_type == DeviceType.CPU), key=lambda e: -e.self_cpu_time_total)
    out["top_host_ops"] = [[e.key, round(e.self_cpu_time_total / calls / 1e3, 3), e.count / calls] for e in host[:12]]
    return out


def _calibrate(device: str) -> dict:
    """How fast this machine's host is at what a decode step is made of (compare with another host)."""
    from benchmarks.bench_pipeline import mean_time

    t0 = time.perf_counter()
    acc = 0
    for i in range(2_000_000):
        acc += i
    out = {"python_loop_ns_per_iter": (time.perf_counter() - t0) / 2e6 * 1e9}
    a = torch.ones(8)
    out["torch_cpu_add_us"] = mean_time(lambda: a.add_(1), 20000) * 1e6
    if device.startswith("cuda"):
        b = torch.ones(8, device=device)
        sync(device)
        out["cuda_launch_us"] = mean_time(lambda: b.add_(1), 20000) * 1e6   # queued, not waited for
        sync(device)
        out["cuda_sync_roundtrip_us"] = mean_time(lambda: (b.add_(1), sync(device)), 2000) * 1e6
    return out


def print_top(r: dict, n: int = 6) -> None:
    for name, ms, count in r["top_host_ops"][:n]:
        print(f"    {ms:8.3f} ms host  {count:7.1f} calls  {name}", flush=True)


def _profile_stage_core(cfg: Any, decode: str, dtype: torch.dtype, device: str, calls: int) -> tuple[dict, dict]:
    """Decode steps of the whole model in one in-process StageCore at 1 and 32 rows: {rows: profile},
    and the core's decode stats."""
    from flexpipe.model.device_weights import DevicePresetWeights
    from flexpipe.runtime.stage_core import StageCore, StepMeta

    core = StageCore(cfg, DevicePresetWeights(cfg, seed=0), 0, cfg.num_units, num_blocks=512, block_size=16,
                     dtype=dtype, device=device, decode=decode)
    greedy, res = [0.0, 0, 1.0, 0], {}
    for rows in (1, 32):
        prompts = _prompts(rows, cfg.vocab_size)
        ids = [f"p{rows}-{j}" for j in range(rows)]
        for j, p in enumerate(prompts):
            core.forward(StepMeta([ids[j]], [0], [len(p)], [True], [0], [greedy]), torch.tensor(p))
        k = [0]

        def step(prompts: list = prompts, ids: list = ids, rows: int = rows) -> None:
            k[0] += 1
            core.forward(StepMeta(ids, [len(p) + k[0] for p in prompts], [1] * rows, [True] * rows,
                                  [k[0]] * rows, [greedy] * rows), torch.tensor([5] * rows))
        sync(device)
        t0 = time.perf_counter()
        step()   # the bucket's first step: with graphs, its warm-up and capture
        sync(device)
        first_ms = (time.perf_counter() - t0) * 1e3
        r = res[str(rows)] = {"first_step_ms": first_ms, **_profile_calls(step, calls, device)}
        print(f"  FlexPipe StageCore decode ({decode}), {rows:>2} rows: {r['wall_ms']:.1f} ms/step (first "
              f"{first_ms:.0f} ms), GPU kernels {r['gpu_kernel_ms']:.1f} ms, per step {r['host_per_call']}", flush=True)
        print_top(r)
        core.free(ids)
    return res, core.status()["decode_stats"]


def section_profile(args: argparse.Namespace) -> dict:
    """Where a decode step's time goes, FlexPipe's StageCore (the whole model, in-process) and HF."""
    dry = args.dry_run
    device = "cpu" if dry else "cuda:0"
    cfg = make_config("tiny" if dry else "llama2-7b")
    dtype = torch.float32 if dry else torch.float16
    calls = 5 if dry else 20
    out: dict[str, Any] = {"model": cfg.name, "dtype": str(dtype).removeprefix("torch."), "host": _calibrate(device),
                           "flexpipe": {}, "hf": {}}
    print(f"  host: {out['host']}", flush=True)
    for decode in ("off", "static" if dry else "graph"):   # eager, then CUDA graphs (model/static_decode.py)
        key = "flexpipe" if decode == "off" else "flexpipe_graph"
        try:
            out[key], out[key + "_stats"] = _profile_stage_core(cfg, decode, dtype, device, calls)
        except Exception as e:   # graphs failing leave the eager figures and HF's
            out[key + "_error"] = f"{type(e).__name__}: {e}"[:500]
            print(f"  FlexPipe StageCore decode ({decode}) failed: {out[key + '_error']}", flush=True)
        if not dry:
            torch.cuda.empty_cache()
    model = _hf_model(cfg, device, dtype)
    for rows in (1, 8):   # generate under the profiler is slow: 32 rows ran past 90 s on an H200
        prompts = _prompts(rows, cfg.vocab_size)
        width = max(map(len, prompts))
        ids_t = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        new = 8

        def gen() -> None:
            with torch.no_grad():
                model.generate(ids_t, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        r = _profile_calls(gen, 2 if dry else 3, device)
        r["per_token_ms"] = r["wall_ms"] / new
        r["gpu_kernel_ms_per_token"] = r["gpu_kernel_ms"] / new
        out["hf"][str(rows)] = r
        print(f"  HF generate, {rows:>2} rows: {r['per_token_ms']:.1f} ms/token (prefill included), GPU kernels "
              f"{r['gpu_kernel_ms_per_token']:.1f} ms/token, per call {r['host_per_call']}", flush=True)
        print_top(r)
    out["ok"] = "flexpipe_error" not in out and "flexpipe_graph_error" not in out
    return out


SECTIONS: dict[str, tuple[Any, float]] = {   # name -> (function, budget in seconds)
    "env": (section_env, 45),
    "tests": (section_tests, 200),
    "kv_bandwidth": (section_kv_bandwidth, 60),
    "hop_latency": (section_hop_latency, 60),
    "decode": (section_decode, 200),
    "reshape": (section_reshape, 120),
    "profile": (section_profile, 150),
}
TOTAL_BUDGET = 465.0   # seconds for the whole run: under 8 minutes with the interpreter's start


def run_section(name: str, args: argparse.Namespace) -> None:
    """The child side: run one section and write its result (or its error) as JSON."""
    fn, _ = SECTIONS[name]
    t0 = time.perf_counter()
    try:
        res = asyncio.run(fn(args)) if asyncio.iscoroutinefunction(fn) else fn(args)
        status = "skipped" if "skip_reason" in res else ("ok" if res.pop("ok", True) else "failed")
        res = {"status": status, **res}
    except BaseException as e:
        traceback.print_exc()
        res = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000]}
    res["seconds"] = round(time.perf_counter() - t0, 2)
    Path(args.section_out).write_text(json.dumps(res, default=str))


# ---- the driver --------------------------------------------------------------------------------------
def _spawn(name: str, args: argparse.Namespace, budget: float, out: Path) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--section", name, "--section-out", str(out)]
    if args.dry_run:
        cmd.append("--dry-run")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)   # its own group: a timeout kills it all
    try:
        rc = proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        res = {"status": "timeout", "seconds": round(time.perf_counter() - t0, 1), "budget_s": budget,
               "error": f"section ran past its budget of {budget:.0f} s and was killed"}
        partial = Path(str(out) + ".log")
        if partial.exists():   # what the section had written of its own log (the tests: pytest's output)
            lines = partial.read_text().splitlines()
            res.update({k: v for k, v in read_verdicts(lines).items() if k not in ("ok", "log_tail")},
                       log_tail=lines[-120:])
        return res
    with contextlib.suppress(ProcessLookupError):   # stage processes it left behind
        os.killpg(proc.pid, signal.SIGKILL)
    if not out.exists():
        return {"status": "failed", "seconds": round(time.perf_counter() - t0, 1), "budget_s": budget,
                "error": f"section process exited with code {rc} and wrote no result"}
    res = json.loads(out.read_text())
    res["budget_s"] = budget
    return res


def _gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def _fmt(x: Any, spec: str = ".1f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and x != x) else format(x, spec)


def report_lines(res: dict) -> list[str]:
    """The human-readable summary of a results dict (docs/gpu.md describes it)."""
    s = res["sections"]
    lines = []
    kv = s.get("kv_bandwidth", {})
    if kv.get("status") == "ok" or "coalesced" in kv:
        how, base = ("CPU copies (dry run)", "plain copy") if res["dry_run"] else ("CUDA IPC", "plain D2D copy")
        lines.append(f"KV migration via {how} ({kv['units']} units x {kv['blocks_moved_per_unit']} blocks "
                     f"{kv['block_shape']} {kv['dtype']}, {kv['bytes_per_move'] / 2**20:.1f} MiB per move), "
                     f"{base} {kv['d2d_gbs']:.1f} GB/s:")
        for p in ("coalesced", "block_by_block"):
            if p in kv:
                lines.append(f"  {p:<15} {kv[p]['gbs']:8.1f} GB/s  {kv[p]['ratio_vs_d2d']:.2f}x of D2D  "
                             f"({kv[p]['runs_per_unit']} runs/unit, bytes equal: {kv[p]['bytes_equal']}; the same "
                             f"copies between pools of one process {_fmt(kv[p].get('local_gbs'))} GB/s)")
        t = kv.get("target", {})
        if t:
            verdict = {True: "met", False: "NOT met", None: "not evaluated (dry run)"}[t["met"]]
            lines.append(f"  target coalesced >= {t['min']:.2f}x of D2D: {verdict}")
    hop = s.get("hop_latency", {})
    for r in hop.get("rows", []):
        lines.append(f"stage hop {r['tokens']:>3} x {hop['hidden']} {hop['dtype']} via {r['transport']}: "
                     f"p50 {r['p50_us']:.1f} us, p99 {r['p99_us']:.1f} us (one way, half a round trip)")
    dec = s.get("decode", {})
    if dec.get("flexpipe"):
        lines.append(f"decode {dec['model']} {dec['dtype']}, random weights, {dec['new_tokens']} new tokens, greedy "
                     f"(HF transformers {dec.get('transformers', '?')}):")
        lines.append(f"  {'streams':>7} {'FlexPipe tok/s':>15} {'HF tok/s':>10} {'ratio':>6} "
                     f"{'FP TPOT p50 ms':>15} {'HF TPOT p50 ms':>15}")
        for n in dec["streams"]:
            f, h = dec["flexpipe"].get(str(n), {}), dec["hf"].get(str(n), {})
            r = dec.get("ratio", {}).get(str(n))
            lines.append(f"  {n:>7} {_fmt(f.get('decode_tok_s')):>15} {_fmt(h.get('decode_tok_s')):>10} "
                         f"{_fmt(r, '.2f'):>6} {_fmt(f.get('tpot_p50_ms')):>15} {_fmt(h.get('tpot_p50_ms')):>15}")
        if dec.get("flexpipe_graph"):
            lines.append("  FlexPipe 1 stage, decode steps in CUDA graphs (static buffers in a dry run):")
            for n in dec["streams"]:
                fg = dec["flexpipe_graph"].get(str(n), {})
                lines.append(f"  {n:>7} {_fmt(fg.get('decode_tok_s')):>15} {'':>10} "
                             f"{_fmt(dec.get('ratio_graph', {}).get(str(n)), '.2f'):>6} {_fmt(fg.get('tpot_p50_ms')):>15}")
        if dec.get("flexpipe_4"):
            lines.append("  FlexPipe 4 stage processes on the same device, decode steps as above "
                         "(FP-3: TPOT p50 <= 1.25x of 1 stage):")
            for n in dec["streams"]:
                f4 = dec["flexpipe_4"].get(str(n), {})
                lines.append(f"  {n:>7} {_fmt(f4.get('decode_tok_s')):>15} tok/s, TPOT p50 {_fmt(f4.get('tpot_p50_ms'))} ms"
                             f" = {_fmt(dec.get('tpot_4_over_1', {}).get(str(n)), '.2f')}x of 1 stage")
        for key in ("flexpipe", "flexpipe_graph", "flexpipe_4"):
            if dec.get(key + "_error"):
                lines.append(f"  {key} failed: {dec[key + '_error'][:200]}")
    rs = s.get("reshape", {})
    if "pause_p50_ms" in rs:
        lines.append(f"reshape 1->2->1 ({rs['model']} {rs['dtype']}, {rs['streams']} streams, {rs['reshapes']} "
                     f"reshapes, hop {','.join(sorted(set(rs.get('hops', []))))}): pause p50 {rs['pause_p50_ms']:.1f} ms, "
                     f"p99 {rs['pause_p99_ms']:.1f} ms, KV {rs['kv_mib_per_reshape']:.1f} MiB per reshape")
    return lines


def drive(args: argparse.Namespace) -> int:
    names = args.sections.split(",") if args.sections else list(SECTIONS)
    bad = [n for n in names if n not in SECTIONS]
    if bad:
        print(f"unknown section(s) {bad}; sections: {', '.join(SECTIONS)}", file=sys.stderr)
        return 1
    started = time.perf_counter()
    today = dt.date.today().isoformat()
    res: dict[str, Any] = {"schema": SCHEMA, "date": today, "started": dt.datetime.now().isoformat(timespec="seconds"),
                           "dry_run": args.dry_run, "host": socket.gethostname(), "command": " ".join(sys.argv),
                           "sections": {}}
    print(f"FlexPipe GPU check{' (DRY RUN on CPU: no figure below is a GPU figure)' if args.dry_run else ''}, "
          f"{today}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fp-gpu-check-") as tmp:
        for name in names:
            left = TOTAL_BUDGET - (time.perf_counter() - started)
            budget = min(SECTIONS[name][1], left)
            if budget < 10:
                res["sections"][name] = {"status": "skipped", "error": "no time left in the run's budget"}
                print(f"[{name}] skipped: no time left", flush=True)
                continue
            print(f"[{name}] (budget {budget:.0f} s)", flush=True)
            r = _spawn(name, args, budget, Path(tmp) / f"{name}.json")
            res["sections"][name] = r
            why = r.get("error") or r.get("skip_reason")
            extra = f": {why}" if why else ""
            print(f"[{name}] {r['status']} in {r.get('seconds', 0):.1f} s{extra}", flush=True)
            if name == "env":
                gpus = r.get("gpus") or []
                res["gpu"] = gpus[0]["name"] if gpus else None
                if not gpus and not args.dry_run and r["status"] == "ok":   # (a hung or failed env is
                    # no proof that there is no GPU: the sections below say more, and run)
                    print("no CUDA device visible to torch: nothing to check on a GPU "
                          f"(torch {r.get('torch')}, cuda_ipc: {r.get('cuda_ipc')})", flush=True)
                    res["exit_code"] = 2
                    print(f"results: {_write(res, args)}")
                    return 2
                if r.get("cupy") is None:
                    print(f"CuPy is missing ({r.get('cupy_missing', '?')}): CUDA IPC and NCCL parts will fail or "
                          "skip; the torch-only parts still run", flush=True)
    res["seconds"] = round(time.perf_counter() - started, 1)
    sections = res["sections"]
    tests = sections.get("tests", {})
    targets = [s["target"] for s in sections.values() if isinstance(s.get("target"), dict)]
    res["targets"] = targets
    failed = [n for n, s in sections.items() if s.get("status") not in ("ok", "skipped")]
    skipped = [n for n, s in sections.items() if s.get("status") == "skipped"]
    code = 1 if failed else 4 if skipped else 3 if any(t["met"] is False for t in targets) else 0
    res["exit_code"] = code
    print()
    for line in report_lines(res):
        print(line)
    if tests.get("cases") is not None:
        print(f"GPU tests: {tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, "
              f"{tests.get('error', 0)} errors, {tests.get('skipped', 0)} skipped, "
              f"{tests.get('not_run', 0)} not run (of {tests.get('collected')})")
        if tests.get("timeout"):
            print(f"  {tests['timeout'].strip('+ ')}")
        for c in tests["cases"]:
            if c["state"] != "passed" and not (c["state"] == "skipped" and tests.get("skip_reasons")):
                print(f"  {c['state']}: {c['name']}: {c['why'][:160]}")
        for why in tests.get("skip_reasons", []):
            print(f"  skip reason: {why[:200]}")
    path = _write(res, args)
    print(f"sections: {len(sections) - len(failed) - len(skipped)}/{len(sections)} ok"
          f"{' (failed: ' + ', '.join(failed) + ')' if failed else ''}"
          f"{' (skipped: ' + ', '.join(skipped) + ')' if skipped else ''}; targets met: "
          f"{sum(t['met'] is True for t in targets)}/{sum(t['met'] is not None for t in targets)}; "
          f"{res['seconds']:.0f} s; exit {code}; results: {path}")
    return code


def _write(res: dict, args: argparse.Namespace) -> Path:
    if args.out:
        path = Path(args.out)
    elif args.dry_run or res.get("exit_code") == 2:   # not beside the GPU machines' results in the repository
        kind = "dryrun" if args.dry_run else "nogpu"
        path = Path(tempfile.gettempdir()) / f"gpu_check-{res['date']}-{kind}.json"
    else:
        path = ROOT / "benchmarks" / "results" / f"gpu_check-{res['date']}-{_gpu_slug(res.get('gpu') or 'gpu')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1, default=str) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="run the control flow on CPU with tiny sizes")
    ap.add_argument("--sections", default="", help=f"comma-separated subset of: {', '.join(SECTIONS)}")
    ap.add_argument("--out", default="", help="results JSON (default benchmarks/results/gpu_check-<date>-<gpu>.json)")
    ap.add_argument("--section", default="", help=argparse.SUPPRESS)
    ap.add_argument("--section-out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.section:
        run_section(args.section, args)
        return
    sys.exit(drive(args))


if __name__ == "__main__":
    main()

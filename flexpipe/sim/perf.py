"""GPU performance model: per-unit roofline times, link transfer times, and calibration.

A stage's time for one micro-batch is the roofline of its units,
`max(flops / (peak_flops * compute_eff), bytes / (mem_bw * mem_eff)) + units * unit_overhead`,
where flops and bytes come from the model's per-unit costs (FP-1 `unit_costs`) plus the attention
term that grows with context.  A hop between stages costs `latency + overhead + bytes / bandwidth`.
Every constant below carries its source; the efficiency factors are assumptions until
`calibrate()` fits them from measured stage times (`flexpipe simulate calibrate`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any, Iterable, Sequence

import numpy as np

from flexpipe.errors import ConfigError

GB = 1e9


@dataclass(frozen=True, slots=True)
class GPUSpec:
    """One accelerator type: peak rates, memory, and the efficiency factors applied to them."""

    name: str
    peak_flops: float  # dense 16-bit tensor FLOP/s (fp32 for the CPU entry)
    mem_bw: float  # bytes/s of device memory
    mem_bytes: float
    compute_eff: float  # achieved / peak FLOP/s on large GEMMs (prefill)
    mem_eff: float  # achieved / peak bandwidth when streaming weights (decode)
    unit_overhead_s: float  # fixed cost per unit per micro-batch (kernel launches, framework)
    dtype_bytes: int = 2
    source: str = ""


# Peak figures: vendor datasheets.  compute_eff 0.55 and mem_eff 0.75 are assumptions in the range
# that serving engines report (vLLM/Sarathi-Serve prefill MFU ~50-60%; decode GEMV ~70-80% of HBM
# bandwidth); unit_overhead 15 us ~ 3 kernel launches of ~5 us each per unit.  Calibrate to replace.
GPUS: dict[str, GPUSpec] = {
    "A100-40": GPUSpec("A100-40", 312e12, 1555 * GB, 40 * GB, 0.55, 0.75, 15e-6,
                       source="NVIDIA A100 datasheet (SXM4 40GB): 312 TFLOPS bf16 dense, 1,555 GB/s"),
    "A100-80": GPUSpec("A100-80", 312e12, 2039 * GB, 80 * GB, 0.55, 0.75, 15e-6,
                       source="NVIDIA A100 datasheet (SXM4 80GB): 312 TFLOPS bf16 dense, 2,039 GB/s"),
    "H100": GPUSpec("H100", 989e12, 3350 * GB, 80 * GB, 0.50, 0.75, 10e-6,
                    source="NVIDIA H100 datasheet (SXM5): 989 TFLOPS bf16 dense, 3.35 TB/s"),
    "A10": GPUSpec("A10", 125e12, 600 * GB, 24 * GB, 0.55, 0.75, 15e-6,
                   source="NVIDIA A10 datasheet: 125 TFLOPS fp16 tensor dense, 600 GB/s"),
    # Peaks measured on this project's 2-core Xeon dev machine (numpy fp32 2048^2 matmul: 300 GFLOP/s;
    # np.copyto of 256 MiB: 24 GB/s read+write, ~12 GB/s one way).  The runtime runs fp32 on CPU.  The
    # factors are fitted to the runtime's own stage steps (`flexpipe simulate calibrate --measure-cpu`:
    # FP-3's StageCore, `tiny`, one torch thread, 40 prefill/decode steps over 4 unit ranges): one
    # thread on small matrices and a paged-KV gather reach ~25% of the matmul peak and ~37% of memcpy.
    # Refitted on 2026-11-28 after the StageCore speed-ups of FP-3 (transposed CPU weights, grouped
    # attention, fused norms): 0.246 / 0.366 / 33 us, mean error 8.5% over the 40 (8.5% on 10 held
    # out); the previous fit (0.156 / 0.250 / 16 us) was 34% off against the faster StageCore, the
    # first 0.5 / 0.6 / 30 us guess 60% off against the slower one.
    "CPU": GPUSpec("CPU", 300e9, 12 * GB, 16 * GB, 0.246, 0.366, 33e-6, dtype_bytes=4,
                   source="peaks: numpy fp32 matmul and memcpy on the 2-core dev VM; factors: fitted to "
                          "StageCore step times (flexpipe simulate calibrate --measure-cpu)"),
}


@dataclass(frozen=True, slots=True)
class LinkSpec:
    """A link kind between two stages: bandwidth, wire latency, and per-hop software overhead."""

    name: str
    bandwidth: float  # bytes/s
    latency: float  # s
    overhead: float  # s per hop: serialisation, RPC, synchronisation
    source: str = ""


# The 2 ms per cross-node hop comes from the FlexPipe paper's OPT-66B figures: inter-stage
# communication 6.3 ms at 4 stages (3 hops) and 65.1 ms at 32 stages (31 hops), ~2.1 ms per hop.
LINKS: dict[str, LinkSpec] = {
    "local": LinkSpec("local", 1e15, 0.0, 0.0, "same device: a reference handoff"),
    "nvlink": LinkSpec("nvlink", 300 * GB, 2e-6, 50e-6,
                       "NVLink3 600 GB/s bidirectional (A100 datasheet), one direction; CUDA IPC handoff"),
    "pcie": LinkSpec("pcie", 24 * GB, 5e-6, 100e-6, "PCIe 4.0 x16: 32 GB/s raw, ~24 GB/s achieved"),
    "net": LinkSpec("net", 12.5 * GB, 10e-6, 2.0e-3,
                    "100 Gbps (paper testbed); per-hop overhead ~2.1 ms from the paper's OPT-66B stage figures"),
}

# Weight-loading tiers (bytes/s into one GPU).  "remote": the paper's OPT-66B load of 47.1 s for a
# quarter of 132 GB (~0.7 GB/s per stage); "ssd": ServerlessLLM's local-NVMe loader (OSDI'24 reports
# loading near the SSD's ~6 GB/s); "host": pinned host memory over PCIe 4.0 (~20 GB/s achieved).
LOAD_TIERS: dict[str, float] = {"remote": 0.7 * GB, "ssd": 6 * GB, "host": 20 * GB}
# Process / CUDA context start of a new stage; the paper reports production initialisation time cut
# by 72% without giving the absolute figure, so this is an assumption (a warm container pool).
INIT_S = 1.0


# ---------------------------------------------------------------------------------------------
# model costs
@dataclass(frozen=True, slots=True)
class StageCost:
    """Aggregated costs of a contiguous unit range [start, end)."""

    start: int
    end: int
    param_bytes: float
    flops_per_token: float
    kv_bytes_per_token: float
    attn_layers: int
    units: int
    act_bytes_per_token: float  # residual stream leaving the stage


# Fallback shapes for when FP-1's ModelConfig is not importable (HF config.json values).
_FALLBACK = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab, mlp_kind)
    "llama2-7b": (4096, 32, 32, 32, 11008, 32000, "swiglu"),
    "llama2-13b": (5120, 40, 40, 40, 13824, 32000, "swiglu"),
    "llama2-70b": (8192, 80, 64, 8, 28672, 32000, "swiglu"),
    "opt-66b": (9216, 64, 72, 72, 36864, 50272, "relu"),
    "tiny": (64, 2, 4, 2, 128, 256, "swiglu"),
}


@dataclass(frozen=True, slots=True)
class _Unit:
    index: int
    name: str
    kind: str
    layer: int | None
    param_bytes: float
    flops_per_token: float
    kv_bytes_per_token: float
    act_bytes_per_token: float


def _fallback_units(name: str, dtype_bytes: int) -> tuple[list[_Unit], int]:
    h, L, nh, nkv, inter, vocab, mlp = _FALLBACK[name]
    hd = h // nh
    kvd = nkv * hd
    d = dtype_bytes
    units = [_Unit(0, "embed", "embedding", None, vocab * h * d, 0.0, 0, h * d)]
    attn_p = h * (h + 2 * kvd) + h * h + h
    mlp_p = (3 if mlp == "swiglu" else 2) * h * inter + h
    for i in range(L):
        units.append(_Unit(1 + 2 * i, f"attn.{i}", "attention", i, attn_p * d, 2.0 * attn_p, 2 * kvd * d, h * d))
        units.append(_Unit(2 + 2 * i, f"mlp.{i}", "mlp", i, mlp_p * d, 2.0 * mlp_p, 0, h * d))
    units.append(_Unit(2 * L + 1, "head", "head", None, (vocab * h + h) * d, 2.0 * vocab * h, 0, vocab * d))
    return units, h


class ModelCosts:
    """Per-unit costs of a model, with prefix sums so that any stage's totals cost O(1)."""

    def __init__(self, name: str, units: Sequence[Any], hidden: int, dtype_bytes: int = 2):
        self.name = name
        self.hidden = hidden
        self.dtype_bytes = dtype_bytes
        self.units = list(units)
        self.num_units = len(self.units)

        def psum(vals: Iterable[float]) -> np.ndarray:
            return np.concatenate([[0.0], np.cumsum(np.fromiter(vals, dtype=np.float64))])

        self._p = psum(u.param_bytes for u in self.units)
        self._f = psum(u.flops_per_token for u in self.units)
        self._k = psum(u.kv_bytes_per_token for u in self.units)
        self._a = psum(1.0 if u.kind == "attention" else 0.0 for u in self.units)
        self.param_bytes = float(self._p[-1])
        self.kv_bytes_per_token = float(self._k[-1])
        self.flops_per_token = float(self._f[-1])
        self.attn_layers = int(self._a[-1])

    @classmethod
    def for_model(cls, name: str, dtype_bytes: int = 2) -> "ModelCosts":
        """Costs from FP-1 (`ModelConfig.preset` + `unit_costs`), or from built-in shapes if absent."""
        try:
            from flexpipe.model.config import ModelConfig
            from flexpipe.model.units import unit_costs
        except ImportError:
            ModelConfig = None  # type: ignore[assignment]
        if ModelConfig is not None:
            cfg = ModelConfig.preset(name)
            return cls(name, unit_costs(cfg, dtype_bytes=dtype_bytes), int(cfg.hidden_size), dtype_bytes)
        if name not in _FALLBACK:
            raise ConfigError(f"unknown model {name!r} for the simulator; known: {', '.join(_FALLBACK)}")
        units, hidden = _fallback_units(name, dtype_bytes)
        return cls(name, units, hidden, dtype_bytes)

    def stage(self, start: int, end: int) -> StageCost:
        """Totals of the unit range [start, end)."""
        if not 0 <= start < end <= self.num_units:
            raise ConfigError(f"bad unit range [{start}, {end}) for {self.num_units} units")
        return StageCost(start, end, float(self._p[end] - self._p[start]), float(self._f[end] - self._f[start]),
                         float(self._k[end] - self._k[start]), int(self._a[end] - self._a[start]),
                         end - start, float(self.units[end - 1].act_bytes_per_token))

    def balanced_boundaries(self, stages: int) -> list[int]:
        """Cut points that balance parameter bytes (decode is weight-streaming bound)."""
        stages = max(1, min(stages, self.num_units))
        target = self._p[-1] / stages
        bounds = [0]
        for s in range(1, stages):
            j = int(np.searchsorted(self._p, target * s))
            j = max(bounds[-1] + 1, min(j, self.num_units - (stages - s)))
            bounds.append(j)
        bounds.append(self.num_units)
        return bounds


# ---------------------------------------------------------------------------------------------
# times
@dataclass(frozen=True, slots=True)
class Batch:
    """One iteration's work on a replica: decode tokens with their context, and prefill tokens."""

    decode: int = 0
    decode_ctx: float = 0.0  # sum of context lengths of the decoding sequences
    prefill: int = 0
    prefill_ctx: float = 0.0  # mean context position of the prefill tokens (attention cost)

    @property
    def tokens(self) -> int:
        return self.decode + self.prefill


def stage_time(sc: StageCost, gpu: GPUSpec, batch: Batch, hidden: int, tp: int = 1,
               tp_link: LinkSpec | None = None) -> float:
    """Seconds for one stage to run `batch` (as one micro-batch), roofline per stage."""
    tok = batch.tokens
    if tok <= 0:
        return 0.0
    attn_ctx = batch.decode_ctx + batch.prefill * batch.prefill_ctx
    # attention: QK^T and AV each 2*hidden FLOPs per (token, context token) per layer
    flops = tok * sc.flops_per_token + 4.0 * hidden * sc.attn_layers * attn_ctx
    kv_per_layer = sc.kv_bytes_per_token / max(sc.attn_layers, 1)
    byts = sc.param_bytes + kv_per_layer * sc.attn_layers * (batch.decode_ctx + tok) \
        + 2 * tok * sc.act_bytes_per_token
    t = max(flops / (gpu.peak_flops * gpu.compute_eff), byts / (gpu.mem_bw * gpu.mem_eff)) / tp
    t += sc.units * gpu.unit_overhead_s
    if tp > 1 and tp_link is not None:
        # two ring all-reduces of the residual stream per layer (Megatron-style TP)
        ar = 2 * (tp - 1) / tp * tok * hidden * gpu.dtype_bytes
        t += 2 * sc.attn_layers * (tp_link.latency + tp_link.overhead * 0.1 + ar / tp_link.bandwidth)
    return t


def hop_time(link: LinkSpec, tokens: int, act_bytes_per_token: float) -> float:
    """Seconds to move one micro-batch's residual stream across `link`."""
    return link.latency + link.overhead + tokens * act_bytes_per_token / link.bandwidth


@dataclass(frozen=True, slots=True)
class PipelineSpec:
    """What the round-time model needs to know about one replica's pipeline."""

    stages: tuple[StageCost, ...]
    gpus: tuple[GPUSpec, ...]
    links: tuple[LinkSpec, ...]  # len(stages) - 1
    hidden: int
    tp: int = 1
    tp_link: LinkSpec | None = None


def round_time(p: PipelineSpec, batch: Batch) -> tuple[float, float, float]:
    """(seconds per iteration, of which communication, busy GPU-seconds) for `batch` on pipeline `p`.

    The batch is cut into M = min(stages, sequences) micro-batches so that every stage is busy; each
    sequence advances one token per round.  A round lasts the longer of the bottleneck stage's M
    micro-batches and one micro-batch's trip through every stage and hop.
    """
    S = len(p.stages)
    seqs = batch.decode + (1 if batch.prefill else 0)
    M = max(1, min(S, seqs))
    mb = Batch(math.ceil(batch.decode / M), batch.decode_ctx / M, math.ceil(batch.prefill / M), batch.prefill_ctx)
    times = [stage_time(sc, g, mb, p.hidden, p.tp, p.tp_link) for sc, g in zip(p.stages, p.gpus)]
    hops = [hop_time(l, mb.tokens, sc.act_bytes_per_token) for l, sc in zip(p.links, p.stages)]
    comm = sum(hops)
    trip = sum(times) + comm
    # sends overlap the next micro-batch's compute, so a hop only sets the cycle when it is slower
    cycle = M * max(max(t, hops[i]) if i < len(hops) else t for i, t in enumerate(times))
    total = max(trip, cycle)
    busy = M * sum(times) * p.tp
    return total, (comm * total / trip if trip > 0 else 0.0), busy


class FastPipe:
    """`round_time` for one fixed pipeline, vectorised over stages and memoised on a coarse batch key."""

    CTX_Q = 256  # prefill positions are bucketed to this many tokens for the memo key

    def __init__(self, p: PipelineSpec):
        self.spec = p
        self.S = len(p.stages)
        st, g = p.stages, p.gpus
        self.Fc = np.array([s.flops_per_token for s in st]) / np.array([x.peak_flops * x.compute_eff for x in g])
        self.Ac = np.array([4.0 * p.hidden * s.attn_layers for s in st]) / np.array(
            [x.peak_flops * x.compute_eff for x in g])
        bw = np.array([x.mem_bw * x.mem_eff for x in g])
        self.P = np.array([s.param_bytes for s in st]) / bw
        self.K = np.array([s.kv_bytes_per_token for s in st]) / bw
        self.Act = np.array([2 * s.act_bytes_per_token for s in st]) / bw
        self.U = np.array([s.units * x.unit_overhead_s for s, x in zip(st, g)])
        self.tp = p.tp
        if p.tp > 1 and p.tp_link is not None:
            l = p.tp_link
            self.ar0 = np.array([2 * s.attn_layers * (l.latency + l.overhead * 0.1) for s in st])
            self.ar1 = np.array([2 * s.attn_layers * 2 * (p.tp - 1) / p.tp * p.hidden * x.dtype_bytes / l.bandwidth
                                 for s, x in zip(st, g)])
        else:
            self.ar0 = self.ar1 = np.zeros(self.S)
        self.H0 = np.array([l.latency + l.overhead for l in p.links] + [0.0])
        self.H1 = np.array([s.act_bytes_per_token / l.bandwidth for l, s in zip(p.links, st)] + [0.0])
        self._memo: dict[tuple[int, int, int, int, int], tuple[float, float, float]] = {}
        self._dmemo: dict[tuple[int, int, int], tuple[float, float, float]] = {}
        # the same coefficients as plain floats, one row per stage, for the scalar path of `round`
        self._rows = list(zip(*(a.tolist() for a in (self.Fc, self.Ac, self.P, self.K, self.Act, self.U, self.ar0,
                                                     self.ar1, self.H0, self.H1))))

    def round(self, decode: int, decode_ctx: float, prefill: int = 0, prefill_ctx: float = 0.0,
              prefill_seqs: int = 1, memo: dict | None = None) -> tuple[float, float, float]:
        """(seconds, comm seconds, busy GPU-seconds) of one iteration; see `round_time`.

        `prefill_seqs` requests share the prefill tokens; each can ride in its own micro-batch.
        Memo keys: context sums on a ~3% log grid, prefill chunks rounded up to 32 tokens, prefill
        positions in buckets of `CTX_Q`.  A decode-only round is a function of its key alone, so
        those are memoised on this object, which replicas with the same pipeline share.  A round with
        prefill is computed at the first position seen in its bucket and memoised in `memo` (one per
        replica and pipeline; this object's own when None), so that what a replica sees does not
        depend on what other replicas saw.
        """
        kc = int(math.log(decode_ctx) * 32) if decode_ctx >= 1 else -1
        if not prefill:
            if decode <= 0:
                return (0.0, 0.0, 0.0)
            # decode-only: the round depends on decode only through M and ceil(decode / M)
            M = min(self.S, decode)
            dkey = (M, -(-decode // M), kc)
            hit = self._dmemo.get(dkey)
            if hit is None:
                hit = self._compute(decode, kc, 0, 0.0, 0)
                if len(self._dmemo) < 400_000:
                    self._dmemo[dkey] = hit
            return hit
        prefill_seqs = min(prefill_seqs, self.S)
        prefill = -(-prefill // 32) * 32
        key = (decode, kc, prefill, int(prefill_ctx // self.CTX_Q), prefill_seqs)
        if memo is None:
            memo = self._memo
        hit = memo.get(key)
        if hit is None:
            hit = self._compute(decode, kc, prefill, prefill_ctx, prefill_seqs)
            if len(memo) < 200_000:
                memo[key] = hit
        return hit

    def _compute(self, decode: int, kc: int, prefill: int, prefill_ctx: float,
                 prefill_seqs: int) -> tuple[float, float, float]:
        dctx = math.exp((kc + 0.5) / 32) if kc >= 0 else 0.0
        seqs = decode + prefill_seqs
        if seqs == 0:
            return (0.0, 0.0, 0.0)
        M = max(1, min(self.S, seqs))
        d, pf = math.ceil(decode / M), math.ceil(prefill / M)
        tok = d + pf
        dc = dctx / M
        actx = dc + pf * prefill_ctx
        dtok = dc + tok
        tp = self.tp
        # per stage: roofline time t and hop time h, in plain floats (a pipeline has at most a few
        # dozen stages, where numpy's per-call overhead costs more than the arithmetic)
        ts: list[float] = []
        hs: list[float] = []
        worst = 0.0
        for fc, ac, p, kv, act, u, ar0, ar1, h0, h1 in self._rows:
            comp = fc * tok + ac * actx
            mem = p + kv * dtok + act * tok
            t = (comp if comp > mem else mem) / tp + u + ar0 + ar1 * tok
            h = h0 + h1 * tok
            ts.append(t)
            hs.append(h)
            if t > worst:
                worst = t
            if h > worst:
                worst = h
        comm = _np_sum(hs)
        tsum = _np_sum(ts)
        trip = tsum + comm
        cycle = M * worst
        total = max(trip, cycle)
        return (total, comm * total / trip, M * tsum * tp)


def _np_sum(xs: list[float]) -> float:
    """Sum of floats in the order numpy's `ndarray.sum` adds them (pairwise: blocks of up to 128 values
    summed with 8 accumulators), so that `FastPipe.round` gives the bits its numpy version gave."""
    n = len(xs)
    if n > 128:
        n2 = n // 2
        n2 -= n2 % 8
        return _np_sum(xs[:n2]) + _np_sum(xs[n2:])
    if n < 8:
        acc = 0.0
        for x in xs:
            acc += x
        return acc
    r = xs[:8]
    m = n - n % 8
    for i in range(8, m, 8):
        for j in range(8):
            r[j] += xs[i + j]
    res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
    for i in range(m, n):
        res += xs[i]
    return res


# ---------------------------------------------------------------------------------------------
# calibration
@dataclass(frozen=True, slots=True)
class Measurement:
    """One measured stage step: unit range, tokens, context, seconds."""

    start: int
    end: int
    tokens: int
    seconds: float
    context: float = 0.0  # sum of context lengths attended (decode), or mean position (prefill)
    phase: str = "decode"


@dataclass(frozen=True, slots=True)
class Calibration:
    """Fitted factors and the model's error on the measurements it was fitted to."""

    gpu: GPUSpec
    n: int
    mean_abs_rel_err: float
    max_abs_rel_err: float
    before_mean_abs_rel_err: float

    def to_dict(self) -> dict[str, Any]:
        return {"gpu": self.gpu.name, "compute_eff": self.gpu.compute_eff, "mem_eff": self.gpu.mem_eff,
                "unit_overhead_s": self.gpu.unit_overhead_s, "measurements": self.n,
                "mean_abs_rel_err": self.mean_abs_rel_err, "max_abs_rel_err": self.max_abs_rel_err,
                "before_mean_abs_rel_err": self.before_mean_abs_rel_err}


def _predict(costs: ModelCosts, gpu: GPUSpec, ms: Sequence[Measurement]) -> np.ndarray:
    out = np.empty(len(ms))
    for i, m in enumerate(ms):
        sc = costs.stage(m.start, m.end)
        b = Batch(m.tokens, m.context) if m.phase == "decode" else Batch(prefill=m.tokens, prefill_ctx=m.context)
        out[i] = stage_time(sc, gpu, b, costs.hidden)
    return out


def calibrate(costs: ModelCosts, gpu: GPUSpec, ms: Sequence[Measurement]) -> Calibration:
    """Fit compute_eff, mem_eff and unit_overhead_s to measured stage times (least relative error).

    For each (compute_eff, mem_eff) on a log grid, the overhead has a closed form (weighted least
    squares on relative error); the best grid point is then refined on a finer grid around it.
    """
    if len(ms) < 3:
        raise ConfigError("calibration needs at least 3 measurements")
    y = np.array([m.seconds for m in ms])
    if np.any(y <= 0):
        raise ConfigError("every measurement needs seconds > 0")
    units = np.array([m.end - m.start for m in ms], dtype=float)
    base = replace(gpu, unit_overhead_s=0.0)
    before = float(np.mean(np.abs(_predict(costs, gpu, ms) - y) / y))

    def fit(ce: float, me: float) -> tuple[float, float]:
        r = _predict(costs, replace(base, compute_eff=ce, mem_eff=me), ms)
        w = 1.0 / y ** 2  # relative error weights
        ov = max(0.0, float(np.sum(w * units * (y - r)) / np.sum(w * units * units)))
        err = float(np.mean(np.abs(r + ov * units - y) / y))
        return err, ov

    best = (math.inf, 0.0, 0.0, 0.0)
    grid = np.geomspace(0.01, 1.0, 25)
    for ce in grid:
        for me in grid:
            err, ov = fit(ce, me)
            if err < best[0]:
                best = (err, ce, me, ov)
    for _ in range(2):
        _, ce0, me0, _ = best
        for ce in np.clip(ce0 * np.geomspace(0.8, 1.25, 11), 1e-3, 1.0):
            for me in np.clip(me0 * np.geomspace(0.8, 1.25, 11), 1e-3, 1.0):
                err, ov = fit(ce, me)
                if err < best[0]:
                    best = (err, ce, me, ov)
    err, ce, me, ov = best
    fitted = replace(gpu, compute_eff=float(ce), mem_eff=float(me), unit_overhead_s=float(ov))
    rel = np.abs(_predict(costs, fitted, ms) - y) / y
    return Calibration(fitted, len(ms), float(rel.mean()), float(rel.max()), before)


def load_measurements(path: str) -> tuple[str, str, int, list[Measurement]]:
    """Read a measurements JSON file: {"model", "gpu", "dtype_bytes", "measurements": [...]}."""
    with open(path) as f:
        doc = json.load(f)
    try:
        ms = [Measurement(int(m["start"]), int(m["end"]), int(m["tokens"]), float(m["seconds"]),
                          float(m.get("context", 0.0)), str(m.get("phase", "decode")))
              for m in doc["measurements"]]
        return str(doc.get("model", "tiny")), str(doc.get("gpu", "CPU")), int(doc.get("dtype_bytes", 4)), ms
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: bad measurements file ({e}); see docs/sim.md for the format") from e

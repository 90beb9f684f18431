"""Balanced contiguous partition of the unit chain under per-stage memory caps.

Dynamic programming over cut points: `best[k][j]` is the best way to put units [0, j) into k stages.
A stage's time is the compute of its units plus the transfer of the residual stream to the next
stage (none after the last).  The objective is lexicographic: the slowest stage first (it sets the
pipeline's cycle time), then the number of cuts inside a layer (cuts at layer boundaries keep stages
mergeable, the paper's R penalty), then the sum of squared stage times (balance).  Two passes (the
least bottleneck, then the fewest mid-layer cuts and the balance among cuts within it) keep the
tie-breaks exact, and so does the arithmetic: stage times are integers over one common denominator
(every cost is an int or a float, i.e. a rational), so stages equal in exact arithmetic compare equal
(float prefix sums put one of two identical layers an ulp above the other).  O(S * N^2) for S stages
and N units: ~0.5 s for a 70B model at 32 stages in pure Python.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

from flexpipe.errors import PartitionError
from flexpipe.partition.graph import PipelineShape, UnitGraph

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12,
          "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int | float) -> int:
    """'2GB' -> 2e9, '512MiB' -> 512*2**20, 1000 -> 1000.  A size is finite and >= 0, in text or a number."""
    bad = PartitionError(f"cannot read memory size {text!r}: write e.g. 2GB, 1.5GiB, 512MB, or a number of "
                         f"bytes >= 0")
    if isinstance(text, numbers.Real) and not isinstance(text, bool):
        if not (math.isfinite(text) and text >= 0):   # (nan and inf were a bare ValueError, OverflowError)
            raise bad
        return int(text)
    if not isinstance(text, str):   # (True was 1 byte)
        raise bad
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise bad
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_bytes(n: float) -> str:
    """Human-readable bytes in binary units."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True, slots=True)
class CostModel:
    """How unit costs turn into stage times and memory for one operating point."""

    tokens: int = 1  # tokens per micro-batch step
    flops_per_s: float = 1e12  # effective compute rate of a stage's device
    bandwidth: float | Sequence[float] = 12.5e9  # bytes/s between stage k and k+1 (scalar or per link)
    latency: float = 0.0  # seconds per hop
    # seconds a unit costs a step whatever its work (its kernel launches, per-op host time): what makes
    # cuts follow unit counts where compute is tiny (the placer's CostModel.unit_overhead_s likewise)
    unit_overhead_s: float = 0.0
    kv_tokens: int = 0  # KV reserved per stage, in tokens (context x batch)
    overhead_bytes: int = 0  # per stage (activations, runtime)

    def link(self, k: int) -> float:
        if isinstance(self.bandwidth, numbers.Real):
            return float(self.bandwidth)
        return float(self.bandwidth[k])


@dataclass(frozen=True, slots=True)
class Partition:
    """A solved partition: cut points plus each stage's time and memory."""

    boundaries: tuple[int, ...]
    stage_times: tuple[float, ...]
    stage_bytes: tuple[int, ...]

    @property
    def num_stages(self) -> int:
        return len(self.boundaries) - 1

    @property
    def bottleneck(self) -> float:
        return max(self.stage_times)

    def shape(self, epoch: int = 0, devices: Sequence[str] | None = None) -> PipelineShape:
        return PipelineShape.from_boundaries(self.boundaries, epoch, devices)


def unit_bytes(graph: UnitGraph, cost: CostModel) -> list[int]:
    """Memory each unit needs on its stage: parameters plus its KV reservation."""
    return [u.param_bytes + u.kv_bytes_per_token * cost.kv_tokens for u in graph.units]


def solve(
    graph: UnitGraph,
    num_stages: int | None = None,
    caps: Sequence[int | str] | None = None,
    cost: CostModel = CostModel(),
) -> Partition:
    """Contiguous stages minimising the slowest stage; `caps` (one per stage, in order) bound memory.

    Give `num_stages`, or `caps` (then the stage count is len(caps)), or both when they agree.
    Raises PartitionError saying which unit or how much memory is missing when nothing fits, and saying what
    to give for an argument no partition can come from (a stage count that is not a whole number >= 1, a
    cap that is not a size >= 0, a cost model that check_cost refuses), as `flexpipe partition` does.
    """
    n = len(graph)
    if num_stages is not None:
        num_stages = check_whole(num_stages, "num_stages", "the number of pipeline stages", 1)
    capv: list[int | float] | None = None
    if caps is not None:
        if isinstance(caps, (str, bytes)):   # (each character was read as one stage's cap)
            raise PartitionError(f"caps {caps!r}: give a list of per-stage memory caps, e.g. ['2GB', '1GB']")
        capv = [parse_bytes(c) for c in caps]
        if num_stages is not None and num_stages != len(capv):
            raise PartitionError(f"{num_stages} stages asked but {len(capv)} caps given")
        num_stages = len(capv)
    elif num_stages is None:
        raise PartitionError("give a stage count or a list of per-stage memory caps")
    if num_stages < 1:
        raise PartitionError("a pipeline needs at least one stage")
    if num_stages > n:   # before anything is sized by it (2**62 stages were a MemoryError, 10**9 took 8 GB)
        raise PartitionError(f"{num_stages} stages asked but the model has only {n} units")
    tokens = check_cost(cost, num_stages)
    if capv is None:
        capv = [math.inf] * num_stages

    mem = unit_bytes(graph, cost)
    largest = max(capv)
    for u, m in zip(graph.units, mem):
        if m + cost.overhead_bytes > largest:
            raise PartitionError(
                f"unit {u.index} ({u.name}) needs {fmt_bytes(m + cost.overhead_bytes)} but the largest "
                f"stage cap is {fmt_bytes(largest)}: {fmt_bytes(m + cost.overhead_bytes - largest)} missing"
            )

    pmem = [0]
    for m in mem:
        pmem.append(pmem[-1] + m)
    # Exact stage times: each unit's compute and each hop's transfer as a Fraction (exact from ints and
    # floats), then all as integers over their least common denominator `den`, so that the DP below
    # adds and compares ints; floats only for the times reported.
    per_flop = tokens * _reciprocal(cost.flops_per_s, "flops_per_s")
    overhead = _finite(cost.unit_overhead_s, "unit_overhead_s")
    unit_q = [Fraction(u.flops_per_token) * per_flop + overhead for u in graph.units]
    latency = _finite(cost.latency, "latency")
    hop_q: list[list[Fraction]] = []   # hop_q[k][j]: transfer after unit j-1 from stage k to k+1
    for k in range(num_stages - 1):
        per_byte = tokens * _reciprocal(cost.link(k), f"bandwidth of link {k}")
        hop_q.append([Fraction(0)] + [u.act_bytes_per_token * per_byte + latency for u in graph.units])
    # The last stage sends too: its tokens back to the router, a message of the same latency (its bytes
    # are a few ids).  Charged to every stage, a latency that dwarfs the units' compute (a small model
    # on a GPU) moves no cut; charged to all but the last, it made the cheapest bottleneck a first stage
    # of one unit and a last stage of everything else.
    reply_q = Fraction(latency)
    den = math.lcm(*(q.denominator for q in unit_q), *(q.denominator for row in hop_q for q in row),
                   reply_q.denominator)
    reply = reply_q.numerator * (den // reply_q.denominator)
    ptime = [0]
    for q in unit_q:
        ptime.append(ptime[-1] + q.numerator * (den // q.denominator))
    hop = [[q.numerator * (den // q.denominator) for q in row] for row in hop_q]
    # a cut after unit j-1 is inside a layer when j-1 is an attention unit (its MLP follows)
    mid_layer = [False] * (n + 1)
    for u in graph.units:
        if u.kind == "attention":
            mid_layer[u.index + 1] = True

    def stage_time(k: int, i: int, j: int) -> int:   # seconds times `den`
        t = ptime[j] - ptime[i]
        return t + (hop[k][j] if k < num_stages - 1 else reply)

    def fits(k: int, i: int, j: int) -> bool:
        return pmem[j] - pmem[i] + cost.overhead_bytes <= capv[k]

    # Two passes, because the objective is lexicographic: a prefix kept for its lower bottleneck can
    # carry a mid-layer cut that a prefix with a higher (but not decisive) bottleneck avoids, so one
    # DP over (bottleneck, cuts, balance) can miss the layer-boundary cut at the same bottleneck.
    # Pass 1: the least bottleneck.  Pass 2: among cuts whose every stage is within it, the fewest
    # mid-layer cuts, then the least sum of squares (both additive, so the DP is exact).
    # low[k][j] = least bottleneck for units [0, j) in k+1 stages
    inf = math.inf
    low: list[list[float | int]] = [[inf] * (n + 1) for _ in range(num_stages)]
    for j in range(1, n - num_stages + 2):
        if fits(0, 0, j):
            low[0][j] = stage_time(0, 0, j)
    for k in range(1, num_stages):
        for j in range(k + 1, n - (num_stages - k - 1) + 1):
            cur = inf
            for i in range(k, j):
                prev = low[k - 1][i]
                if prev < cur and fits(k, i, j):
                    cur = min(cur, max(prev, stage_time(k, i, j)))
            low[k][j] = cur
    bound = low[num_stages - 1][n]

    if bound == inf:
        need = pmem[n] + cost.overhead_bytes * num_stages
        have = sum(capv)
        why = (f"the model needs {fmt_bytes(need)} in all but the caps give {fmt_bytes(have)}: "
               f"{fmt_bytes(need - have)} missing") if need > have else (
            f"the model's {fmt_bytes(need)} fit the caps' {fmt_bytes(have)} in total, but no contiguous "
            f"cut puts each stage under its cap (caps in order: {', '.join(fmt_bytes(c) for c in capv)}); "
            f"reorder the caps or add a stage")
        raise PartitionError(f"no partition of {n} units into {num_stages} stages fits: {why}")

    # best[k][j] = (mid-layer cuts, sum sq) for units [0, j) in k+1 stages, each stage within `bound`
    none: tuple[float | int, float | int] = (inf, inf)
    best = [[none] * (n + 1) for _ in range(num_stages)]
    back = [[-1] * (n + 1) for _ in range(num_stages)]
    for j in range(1, n - num_stages + 2):
        if fits(0, 0, j):
            t = stage_time(0, 0, j)
            if t <= bound:
                best[0][j] = (0, t * t)
                back[0][j] = 0
    for k in range(1, num_stages):
        for j in range(k + 1, n - (num_stages - k - 1) + 1):
            cur = none
            arg = -1
            for i in range(k, j):
                prev = best[k - 1][i]
                if prev[0] == inf or not fits(k, i, j):
                    continue
                t = stage_time(k, i, j)
                if t > bound:
                    continue
                cand = (prev[0] + mid_layer[i], prev[1] + t * t)
                if cand < cur:
                    cur, arg = cand, i
            best[k][j] = cur
            back[k][j] = arg

    cuts = [n]
    j = n
    for k in range(num_stages - 1, -1, -1):
        j = back[k][j]
        cuts.append(j)
    bounds = tuple(reversed(cuts))
    times = tuple(stage_time(k, bounds[k], bounds[k + 1]) / den for k in range(num_stages))  # int / int: rounded once
    sizes = tuple(pmem[bounds[k + 1]] - pmem[bounds[k]] + cost.overhead_bytes for k in range(num_stages))
    return Partition(bounds, times, sizes)


# The whole-number fields of a CostModel: (field, what it counts, least).  solve() checks them with
# check_whole, and `flexpipe partition` its flags of the same names, so that both refuse the same values in
# the same words: negative tokens or bytes gave negative times and memory that the solver then balanced as
# if they were real, and a fractional or boolean count was read as some other number.
WHOLE_FIELDS = (("tokens", "the tokens per micro-batch step", 1),
                ("kv_tokens", "the KV tokens reserved per stage", 0),
                ("overhead_bytes", "the bytes each stage holds besides its units", 0))


def check_whole(value: object, name: str, what: str, least: int) -> int:
    """`value` as an int if it is a whole number >= `least` (not a bool); else PartitionError
    "<name> <value>: give <what>, a whole number >= <least>"."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise PartitionError(f"{name} {value!r}: give {what}, a whole number >= {least}")
    return int(value)


def check_cost(cost: CostModel, num_stages: int) -> int:
    """Refuse, before any work, a cost model that no stage time or size can come from; returns its tokens.

    Each rate > 0 (or inf: free), the latency finite and >= 0, the counts whole numbers (WHOLE_FIELDS) and
    one bandwidth per link, or one for all.
    """
    for field, what, least in WHOLE_FIELDS:
        check_whole(getattr(cost, field), f"cost model: {field}", what, least)
    bw = cost.bandwidth
    if isinstance(bw, numbers.Real):
        links: list[object] = [bw]
    elif isinstance(bw, (str, bytes)) or not (hasattr(bw, "__len__") and hasattr(bw, "__getitem__")):
        # (a str was read as one rate per character)
        raise PartitionError(f"cost model: bandwidth is {bw!r}; give a rate > 0 in bytes/s, or a list of one "
                             f"per link")
    elif len(bw) < num_stages - 1:   # (an IndexError at the first link without one)
        raise PartitionError(f"cost model: bandwidth lists {len(bw)} link rate(s) for {num_stages} stages, "
                             f"which have {num_stages - 1} links; give one rate per link, or one for all")
    else:
        links = [bw[k] for k in range(num_stages - 1)]
    for k, rate in enumerate(links):   # (link() read True as 1 byte/s)
        _reciprocal(rate, f"bandwidth of link {k}")
    _reciprocal(cost.flops_per_s, "flops_per_s")
    _finite(cost.latency, "latency")
    _finite(cost.unit_overhead_s, "unit_overhead_s")
    return int(cost.tokens)


def _reciprocal(rate: object, what: str) -> Fraction:
    """1 / rate exactly; an infinite rate costs nothing (as it did in floats)."""
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real):   # (True was 1/s; a str, a TypeError)
        raise PartitionError(f"cost model: {what} is {rate!r}; give a rate > 0 (a number)")
    if rate == math.inf:
        return Fraction(0)
    if not rate > 0:   # also nan
        raise PartitionError(f"cost model: {what} is {rate!r}; give a rate > 0")
    return 1 / _exact(rate)


def _finite(x: object, what: str) -> Fraction:
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not (math.isfinite(x) and x >= 0):
        raise PartitionError(f"cost model: {what} is {x!r}; give a finite number of seconds >= 0")
    return _exact(x)


def _exact(x: numbers.Real) -> Fraction:
    """`x` as a Fraction: exactly for ints and floats, through float for other reals (numpy's float32)."""
    return Fraction(x) if isinstance(x, (numbers.Rational, float)) else Fraction(float(x))


def even_boundaries(num_units: int, num_stages: int) -> list[int]:
    """Cut points splitting `num_units` into `num_stages` ranges as evenly as possible."""
    if not 1 <= num_stages <= num_units:
        raise PartitionError(f"cannot split {num_units} units into {num_stages} stages")
    return [round(i * num_units / num_stages) for i in range(num_stages + 1)]

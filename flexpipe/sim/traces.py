"""Request traces: readers for public trace formats and synthetic arrival generators.

A trace is a `Trace`: arrival times (seconds from 0, sorted), prompt and output lengths, and a model
index per request (for multi-model workloads).  Readers: Azure LLM inference 2023 (TIMESTAMP,
ContextTokens, GeneratedTokens), Azure Functions 2019 (per-minute invocation counts) and 2021
(app, func, end_timestamp, duration), BurstGPT (Timestamp, Model, Request tokens, Response tokens,
...).  Generators: Poisson, gamma renewal with a chosen CV, time-varying rate (diurnal, bursts, a
measured envelope) by time-warping a unit-rate process, with lengths drawn jointly from an
empirical (prompt, output) sample such as the shipped Azure slice.
"""

from __future__ import annotations

import csv
import datetime as _dt
import math
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator, Sequence, TextIO

import numpy as np

from flexpipe.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Trace:
    """Requests sorted by arrival: times (s), prompt tokens, output tokens, model index."""

    arrivals: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    model: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.arrivals)
        if not (len(self.prompt) == len(self.output) == len(self.model) == n):
            raise ConfigError("trace columns differ in length")
        if n and np.any(np.diff(self.arrivals) < 0):
            raise ConfigError("trace arrivals must be sorted")

    def __len__(self) -> int:
        return len(self.arrivals)

    @property
    def duration(self) -> float:
        return float(self.arrivals[-1]) if len(self) else 0.0

    def cv(self) -> float:
        """Coefficient of variation of inter-arrival times."""
        gaps = np.diff(self.arrivals)
        return float(gaps.std() / gaps.mean()) if len(gaps) > 1 and gaps.mean() > 0 else 0.0

    def scaled_to_rate(self, rate: float) -> "Trace":
        """Same requests with time stretched so that the mean rate is `rate` req/s."""
        if len(self) < 2 or self.duration <= 0:
            return self
        k = (len(self) / self.duration) / rate
        return Trace(self.arrivals * k, self.prompt, self.output, self.model)

    def clipped(self, duration: float) -> "Trace":
        """Requests arriving before `duration`."""
        n = int(np.searchsorted(self.arrivals, duration, side="left"))
        return Trace(self.arrivals[:n], self.prompt[:n], self.output[:n], self.model[:n])

    @staticmethod
    def empty() -> "Trace":
        z = np.zeros(0)
        return Trace(z, z.astype(np.int64), z.astype(np.int64), z.astype(np.int64))


# ---------------------------------------------------------------------------------------------
# readers
def _parse_ts(text: str) -> float:
    """Seconds since the epoch of a number or an ISO time; a time without a zone is UTC (Azure's are),
    not the machine's local time, whose daylight-saving change would shift arrivals."""
    text = text.strip()
    try:
        secs = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(secs):   # (a nan arrival sorts anywhere)
            raise ValueError(f"not a time: {text!r}")
        return secs
    # Azure writes 7 fractional digits, more than fromisoformat accepts before 3.11's relaxations;
    # keep at most 6 and whatever follows them (a zone)
    if "." in text:
        head, rest = text.split(".", 1)
        n = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{head}.{rest[:min(n, 6)]}{rest[n:]}" if n else text
    when = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return when.timestamp()


@contextmanager
def _open_csv(path: str | Path) -> Iterator[TextIO]:
    """`path` opened as UTF-8 text for the csv module, a leading byte-order mark skipped (spreadsheets save
    "UTF-8 CSV" with one: it was read into the first column's name, and the column check refused the
    file).  A byte that is not UTF-8 (a binary file, or one saved in another encoding) is a ConfigError
    naming the file, not a UnicodeDecodeError from inside the reader."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            yield f
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r}: {e.reason}); "
                          f"save it as UTF-8 CSV") from None


def _missing(path: str | Path, line: int, column: str) -> ConfigError:
    """A row shorter than the header: csv gives None for the cells it lacks."""
    return ConfigError(f"{path}, line {line}: no {column} (the row has fewer columns than the header); "
                       f"fix or drop the row")


def _tokens(path: str | Path, line: int, column: str, text: str | None, what: str = "a token count") -> int:
    """A count in a trace row (tokens, invocations): a whole number >= 0, or a ConfigError naming file and
    line.  A whole decimal (BurstGPT's "472.0") is that number; a fraction is refused, not truncated."""
    if text is None:
        raise _missing(path, line, column)
    try:
        v = int(text)
    except ValueError:
        try:
            x = float(text)
        except ValueError:
            x = -1.0
        v = int(x) if math.isfinite(x) and x.is_integer() else -1
    if v < 0:
        raise ConfigError(f"{path}, line {line}: {column} {text!r} is not a whole number >= 0 ({what}); "
                          f"fix or drop the row")
    return v


def _time(path: str | Path, line: int, column: str, text: str | None, example: str) -> float:
    """A time in a trace row (seconds, or an ISO time in UTC), or a ConfigError naming file and line."""
    if text is None:
        raise _missing(path, line, column)
    try:
        return _parse_ts(text)
    except ValueError:
        raise ConfigError(f"{path}, line {line}: {column} {text!r} is not a time ({example})") from None


def _seconds(path: str | Path, line: int, column: str, text: str | None) -> float:
    """A duration in a trace row: a finite number of seconds >= 0, or a ConfigError naming file and line."""
    if text is None:
        raise _missing(path, line, column)
    try:
        x = float(text)
    except ValueError:
        x = math.nan
    if not (math.isfinite(x) and x >= 0):
        raise ConfigError(f"{path}, line {line}: {column} {text!r} is not a duration (a finite number of "
                          f"seconds >= 0); fix or drop the row")
    return x


def read_azure_llm(path: str | Path, model: int = 0) -> Trace:
    """Azure LLM inference trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens)."""
    t, p, o = [], [], []
    with _open_csv(path) as f:
        rd = csv.DictReader(f)
        need = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
        if not rd.fieldnames or not need <= set(rd.fieldnames):
            raise ConfigError(f"{path}: not an Azure LLM trace (columns {rd.fieldnames}, need {sorted(need)})")
        for row in rd:
            t.append(_time(path, rd.line_num, "TIMESTAMP", row["TIMESTAMP"],
                           "write e.g. 2023-11-16 18:17:03.9799600, in UTC, or seconds"))
            p.append(_tokens(path, rd.line_num, "ContextTokens", row["ContextTokens"]))
            o.append(_tokens(path, rd.line_num, "GeneratedTokens", row["GeneratedTokens"]))
    return _make(t, p, o, model)


def read_burstgpt(path: str | Path, model_name: str | None = None) -> Trace:
    """BurstGPT CSV (Timestamp, Model, Request tokens, Response tokens, Total tokens, Log Type)."""
    t, p, o, m = [], [], [], []
    names: dict[str, int] = {}
    with _open_csv(path) as f:
        rd = csv.DictReader(f)
        need = {"Timestamp", "Request tokens", "Response tokens"}
        if not rd.fieldnames or not need <= set(rd.fieldnames):
            raise ConfigError(f"{path}: not a BurstGPT trace (columns {rd.fieldnames}, need {sorted(need)})")
        for row in rd:
            name = row.get("Model") or ""
            if model_name and name != model_name:
                continue
            t.append(_time(path, rd.line_num, "Timestamp", row["Timestamp"], "write seconds, e.g. 5 or 5.25"))
            p.append(_tokens(path, rd.line_num, "Request tokens", row["Request tokens"]))
            o.append(_tokens(path, rd.line_num, "Response tokens", row["Response tokens"]))
            m.append(names.setdefault(name, len(names)))
    return _make(t, p, o, m)


def read_azure_functions_counts(path: str | Path, top: int | None = None) -> np.ndarray:
    """Azure Functions 2019 per-minute invocation counts (HashOwner,HashApp,HashFunction,Trigger,1..1440).

    Returns the per-minute totals over the `top` busiest functions (all when None).  An empty cell is 0.
    """
    rows = []
    with _open_csv(path) as f:
        rd = csv.reader(f)
        header = next(rd, None)   # (None: an empty file)
        if not header or "1" not in header:
            raise ConfigError(f"{path}: not an Azure Functions invocation-count file (columns {header}, need "
                              f"minute columns 1, 2, ...)")
        first = header.index("1")
        for row in rd:
            if not row:   # (a blank line: DictReader skips them too)
                continue
            if len(row) != len(header):   # (a short row summed into the first minutes only)
                raise ConfigError(f"{path}, line {rd.line_num}: {len(row)} columns but the header has "
                                  f"{len(header)}; fix or drop the row")
            cells = row[first:]
            try:   # (a day is ~46k rows of 1440 minutes: the common case without a call per cell)
                counts: np.ndarray | None = np.array([int(x or 0) for x in cells], dtype=np.int64)
            except (ValueError, OverflowError):
                counts = None
            if counts is None or (counts < 0).any():   # the cell at fault, named (or a whole decimal, read)
                counts = np.array([_tokens(path, rd.line_num, f"minute {header[first + i]}", x or "0",
                                           "an invocation count") for i, x in enumerate(cells)], dtype=np.int64)
            rows.append(counts)
    if not rows:
        return np.zeros(0, dtype=np.int64)
    mat = np.vstack(rows)
    if top is not None:
        mat = mat[np.argsort(-mat.sum(axis=1))[:top]]
    return mat.sum(axis=0)


def read_azure_functions_invocations(path: str | Path) -> np.ndarray:
    """Azure Functions 2021 invocation trace (app, func, end_timestamp, duration): sorted start times."""
    starts = []
    with _open_csv(path) as f:
        rd = csv.DictReader(f)
        if not rd.fieldnames or not {"end_timestamp", "duration"} <= set(rd.fieldnames):
            raise ConfigError(f"{path}: not an Azure Functions 2021 trace (columns {rd.fieldnames}, need "
                              f"end_timestamp, duration)")
        for row in rd:
            end = _time(path, rd.line_num, "end_timestamp", row["end_timestamp"], "write seconds, e.g. 10.5")
            starts.append(end - _seconds(path, rd.line_num, "duration", row["duration"]))
    a = np.sort(np.array(starts))
    return a - a[0] if len(a) else a


def arrivals_from_counts(counts: Sequence[int], bin_s: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times from per-bin counts, uniform within each bin."""
    out = [b * bin_s + np.sort(rng.random(int(c))) * bin_s for b, c in enumerate(counts) if c > 0]
    return np.concatenate(out) if out else np.zeros(0)


def _make(t, p, o, m) -> Trace:
    t = np.asarray(t, dtype=np.float64)
    order = np.argsort(t, kind="stable")
    t = t[order] - (t.min() if len(t) else 0.0)
    m = np.broadcast_to(np.asarray(m, dtype=np.int64), t.shape) if np.ndim(m) == 0 else np.asarray(m)[order]
    return Trace(t, np.asarray(p, dtype=np.int64)[order], np.asarray(o, dtype=np.int64)[order], np.array(m))


# ---------------------------------------------------------------------------------------------
# lengths
@dataclass(frozen=True, slots=True)
class Lengths:
    """An empirical sample of (prompt, output) pairs, drawn jointly."""

    prompt: np.ndarray
    output: np.ndarray

    def sample(self, n: int, rng: np.random.Generator, max_prompt: int | None = None,
               max_total: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        idx = rng.integers(0, len(self.prompt), n)
        p = np.maximum(self.prompt[idx], 1)
        o = np.maximum(self.output[idx], 1)
        if max_prompt is not None:
            p = np.minimum(p, max_prompt)
        if max_total is not None:
            p = np.minimum(p, max_total - 1)
            o = np.minimum(o, max_total - p)
        return p.astype(np.int64), o.astype(np.int64)

    @classmethod
    def from_traces(cls, *traces: Trace) -> "Lengths":
        return cls(np.concatenate([t.prompt for t in traces]), np.concatenate([t.output for t in traces]))


def shipped_slice_paths() -> list[Path]:
    """The small Azure LLM slices shipped in flexpipe/data/traces (see its README for attribution)."""
    base = resources.files("flexpipe") / "data" / "traces"
    return [Path(str(base / n)) for n in ("azure_llm_conv_slice.csv", "azure_llm_code_slice.csv")]


def default_lengths(paths: Sequence[str | Path] | None = None) -> Lengths:
    """Length sample from the given Azure LLM CSVs, or from the shipped slice."""
    ps = list(paths) if paths else shipped_slice_paths()
    traces = []
    for p in ps:
        tr = read_azure_llm(p)
        if not len(tr):   # (every draw would index an empty sample)
            raise ConfigError(f"{p}: no requests in it; a lengths file needs at least one row of "
                              f"TIMESTAMP,ContextTokens,GeneratedTokens after its header")
        traces.append(tr)
    return Lengths.from_traces(*traces)


def envelope_from_trace(t: Trace, bin_s: float = 60.0) -> np.ndarray:
    """Per-bin rate of a trace divided by its mean: a shape to modulate synthetic arrivals with."""
    counts = np.bincount((t.arrivals // bin_s).astype(int))
    if len(counts) > 1 and counts[-1] < 0.5 * counts[:-1].mean():
        counts = counts[:-1]  # a partial last bin
    return counts / counts.mean()


# ---------------------------------------------------------------------------------------------
# arrival generators
def unit_gamma(n: int, cv: float, rng: np.random.Generator) -> np.ndarray:
    """n arrival times of a unit-rate renewal process with gamma gaps of the given CV (CV=1: Poisson)."""
    if cv <= 0:
        gaps = np.ones(n)
    else:
        k = 1.0 / (cv * cv)
        gaps = rng.gamma(k, 1.0 / k, n)
    return np.cumsum(gaps)


RateFn = Callable[[np.ndarray], np.ndarray]


def constant_rate(rate: float) -> RateFn:
    return lambda t: np.full_like(t, rate, dtype=float)


def diurnal_rate(mean: float, amplitude: float = 0.6, period_s: float = 86400.0, phase: float = 0.0) -> RateFn:
    """mean * (1 + amplitude * sin(...)): a day-night cycle (amplitude in [0, 1))."""
    return lambda t: mean * (1.0 + amplitude * np.sin(2 * np.pi * t / period_s + phase))


def envelope_rate(mean: float, envelope: Sequence[float], duration_s: float) -> RateFn:
    """A measured per-bin shape stretched over `duration_s`, linearly interpolated, times `mean`."""
    env = np.asarray(envelope, dtype=float)
    env = env / env.mean()
    xs = (np.arange(len(env)) + 0.5) * duration_s / len(env)
    return lambda t: mean * np.interp(t, xs, env)


def burst_rate(base: RateFn, bursts: Sequence[tuple[float, float, float]]) -> RateFn:
    """`base` times a factor during each (start_s, length_s, factor) burst."""
    def f(t: np.ndarray) -> np.ndarray:
        r = base(t)
        for s, length, k in bursts:
            r = np.where((t >= s) & (t < s + length), r * k, r)
        return r
    return f


def warp_arrivals(unit_times: np.ndarray, rate: RateFn, duration_s: float, grid_s: float = 1.0) -> np.ndarray:
    """Map unit-rate arrival times through the inverse cumulative rate Λ⁻¹ (keeps the CV locally)."""
    grid = np.arange(0.0, duration_s + grid_s, grid_s)
    lam = np.concatenate([[0.0], np.cumsum(np.maximum(rate(grid[:-1] + grid_s / 2), 0.0) * grid_s)])
    keep = unit_times[unit_times < lam[-1]]
    return np.interp(keep, lam, grid)


def synthetic(duration_s: float, rate: float | RateFn, cv: float, lengths: Lengths, seed: int,
              models: Sequence[float] = (1.0,), max_total: int | None = None) -> Trace:
    """Gamma-CV arrivals at a constant or time-varying rate, lengths from `lengths`, models by share."""
    rng = np.random.default_rng(seed)
    fn = constant_rate(rate) if isinstance(rate, (int, float)) else rate
    grid = np.arange(0.0, duration_s, 1.0) + 0.5
    expected = float(np.sum(fn(grid))) if len(grid) else 0.0
    if expected <= 0:
        return Trace.empty()
    n = int(expected + 10 * math.sqrt(expected) * max(cv, 1.0) + 100)
    t = warp_arrivals(unit_gamma(n, cv, rng), fn, duration_s)
    while len(t) and t[-1] < duration_s * 0.999 and len(t) >= n * 0.999:
        n *= 2  # a heavy-tailed draw came up short; take more
        t = warp_arrivals(unit_gamma(n, cv, rng), fn, duration_s)
    t = t[t < duration_s]
    p, o = lengths.sample(len(t), rng, max_total=max_total)
    share = np.asarray(models, dtype=float)
    m = rng.choice(len(share), size=len(t), p=share / share.sum()) if len(share) > 1 else np.zeros(len(t), np.int64)
    return Trace(t, p, o, m.astype(np.int64))


def poisson(duration_s: float, rate: float, lengths: Lengths, seed: int) -> Trace:
    """Poisson arrivals (CV = 1)."""
    return synthetic(duration_s, rate, 1.0, lengths, seed)

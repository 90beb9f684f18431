"""Real-time traffic analysis: rates, burstiness, lengths, queueing, SLO attainment, change points.

`TrafficAnalyzer` is a plain, clock-agnostic object: every call takes the time `now` (seconds, any
origin, non-decreasing) and nothing reads a clock, sleeps or does I/O, so the live control loop passes
`time.monotonic()` and the simulator (FP-7) passes its virtual time, and the same event sequence gives
the same statistics bit for bit.  Per event the work is O(1); `snapshot()` is O(window / bucket).

How it keeps its numbers (all memory is bounded by the settings, not by traffic):
- Counts (arrivals, inter-arrival gap sums and squares, tokens, finishes, SLO hits, queue-length area)
  live in a ring of `bucket_s` time buckets that covers `window_s`; a window's figure is the sum over
  its buckets, so the window slides in steps of one bucket and nothing drifts.
- Length and latency distributions are windowed log-bucket histograms (DDSketch-style, relative error
  `rel_err` on every quantile) in a ring of `slabs` time slabs.  Chosen over a reservoir (random, hence
  not deterministic without a seed, and its error on p99 depends on the sample size) and over P^2
  (cannot forget old data, so it is not windowed): histograms are exact to `rel_err`, mergeable across
  slabs, and expire a slab at a time.
- Forecast: Holt's linear trend (level + slope) over per-bucket arrival rates, with smoothing set by time
  constants rather than per-sample weights, extrapolated `forecast_horizon_s` ahead with a damped trend
  (factor `trend_damping` per bucket): an undamped trend overshoots a step by about the step itself,
  and steps are the change detector's job; the forecast is for ramps.
- Change points: two-sided CUSUM on per-bucket arrival counts standardised by a slow baseline mean and
  variance (the variance keeps the observed dispersion, so bursty traffic does not alarm all the time).
  A step is flagged within a few buckets of the change; the change time is estimated as the start of
  the CUSUM run, and the baseline is reset to the run's mean so that one step gives one alarm.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from flexpipe.errors import ConfigError

NAN = float("nan")


@dataclass(frozen=True, slots=True)
class Dist:
    """Summary of a windowed distribution; every figure is NaN when n == 0."""

    n: int = 0
    mean: float = NAN
    p50: float = NAN
    p90: float = NAN
    p99: float = NAN
    max: float = NAN


@dataclass(frozen=True, slots=True)
class TrafficStats:
    """What the analyzer saw up to `now`.  Rates are per second; NaN means "not enough data"."""

    now: float
    elapsed_s: float = 0.0  # since the first event
    window_s: float = 60.0
    short_window_s: float = 10.0
    # arrivals
    arrivals: int = 0  # in the long window
    rate: float = 0.0  # arrivals/s over the long window
    rate_short: float = 0.0  # arrivals/s over the short window
    rate_forecast: float = 0.0  # Holt forecast forecast_horizon_s ahead (>= 0)
    forecast_horizon_s: float = 30.0
    rate_trend: float = 0.0  # arrivals/s per second
    peak_rate: float = 0.0  # highest long-window rate seen since the analyzer started
    cv: float = NAN  # coefficient of variation of inter-arrival gaps, long window
    cv_short: float = NAN
    gaps: int = 0  # gaps behind `cv`
    # lengths and latencies (long window)
    prompt_tokens: Dist = field(default_factory=Dist)
    output_tokens: Dist = field(default_factory=Dist)
    ttft_s: Dist = field(default_factory=Dist)
    tpot_s: Dist = field(default_factory=Dist)
    queue_delay_s: Dist = field(default_factory=Dist)
    # queue and service
    queue_len: int = 0  # latest
    queue_len_mean: float = 0.0  # time-weighted over the long window
    queue_wait_s: float = 0.0  # latest age of the oldest waiting request
    tokens_per_s: float = 0.0
    finished: int = 0
    slo_attainment: float = NAN  # share of finished requests that met the SLO
    # idleness and change points
    idle_s: float = 0.0  # since the last arrival (since the first event if none)
    change_points: int = 0  # flagged so far
    last_change_dir: int = 0  # +1 rate went up, -1 down, 0 none yet
    last_change_at: float = NAN  # estimated time of the change
    last_change_detected_at: float = NAN  # when it was flagged
    rate_since_change: float = NAN  # arrivals/s since last_change_at (NaN if older than the window)
    clock_regressions: int = 0  # events whose `now` went backwards (clamped)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (nested Dists as dicts), for logs and the decision record."""
        return asdict(self)

    @staticmethod
    def synthetic(now: float = 0.0, rate: float = 0.0, *, cv: float = 1.0, prompt_tokens: float = 512,
                  output_tokens: float = 128, **overrides: Any) -> "TrafficStats":
        """Stats of a steady load (tests, what-if studies, driving the policy without events)."""
        pt = Dist(1000, prompt_tokens, prompt_tokens, prompt_tokens, prompt_tokens, prompt_tokens)
        ot = Dist(1000, output_tokens, output_tokens, output_tokens, output_tokens, output_tokens)
        base: dict[str, Any] = dict(now=now, elapsed_s=max(now, 3600.0), arrivals=int(rate * 60), rate=rate,
                                    rate_short=rate, rate_forecast=rate, peak_rate=rate, cv=cv, cv_short=cv,
                                    gaps=int(rate * 60), prompt_tokens=pt, output_tokens=ot,
                                    tokens_per_s=rate * (prompt_tokens + output_tokens),
                                    idle_s=(1.0 / rate if rate > 0 else max(now, 3600.0)))
        base.update(overrides)
        return TrafficStats(**base)


class _LogSketch:
    """Windowed histogram over log-spaced bins: quantiles within `rel_err` (relative), O(1) add."""

    def __init__(self, slabs: int, rel_err: float, lo: float, hi: float):
        self.gamma = (1.0 + rel_err) / (1.0 - rel_err)
        self.inv_lg = 1.0 / math.log(self.gamma)
        self.lo = lo
        self.nb = int(math.ceil(math.log(hi / lo) * self.inv_lg)) + 1
        self.h = np.zeros((slabs, self.nb), dtype=np.int64)
        self.flat = self.h.reshape(-1)
        self.cnt = [0] * slabs
        self.sum = [0.0] * slabs
        self.max = [-math.inf] * slabs
        # value represented by bin i: the point of least relative error in (lo*g^(i-1), lo*g^i]
        self.rep = lo * 2.0 * self.gamma ** np.arange(self.nb) / (self.gamma + 1.0)
        self.rep[0] = lo

    def add(self, slab: int, v: float) -> None:
        i = 0 if v <= self.lo else min(self.nb - 1, math.ceil(math.log(v / self.lo) * self.inv_lg))
        self.flat[slab * self.nb + i] += 1
        self.cnt[slab] += 1
        self.sum[slab] += v
        if v > self.max[slab]:
            self.max[slab] = v

    def clear(self, slab: int) -> None:
        self.h[slab] = 0
        self.cnt[slab] = 0
        self.sum[slab] = 0.0
        self.max[slab] = -math.inf

    def dist(self) -> Dist:
        n = sum(self.cnt)
        if n == 0:
            return Dist()
        cum = np.cumsum(self.h.sum(axis=0))
        idx = np.searchsorted(cum, np.array([0.5, 0.9, 0.99]) * (n - 1), side="right")
        top = max(self.max)
        q = np.minimum(self.rep[np.minimum(idx, self.nb - 1)], top)
        return Dist(n, sum(self.sum) / n, float(q[0]), float(q[1]), float(q[2]), top)


# ring columns
_ARR, _GN, _GS, _GQ, _TOK, _FIN, _MET, _JUDGED, _QAREA = range(9)


class TrafficAnalyzer:
    """Streaming request statistics over sliding windows, driven by timestamped events.

    Per event, call the matching method (the simulator calls them from its event handlers):
      `on_arrival(now, prompt_tokens)`      a request arrived (before admission)
      `on_queue(now, queue_len, oldest_wait_s)`  the waiting queue changed (or on every scheduler step)
      `on_tokens(now, n)`                   n tokens were produced (per step; optional, see tokens_per_s)
      `on_finish(now, output_tokens, ttft_s, tpot_s, met_slo=None, queue_delay_s=None)`
    Per decision tick: `snapshot(now) -> TrafficStats` (O(window / bucket), ~0.1 ms with the defaults).
    Times are seconds on any clock that does not go backwards (events may share a timestamp; a time
    earlier than the last one is clamped to it and counted in `clock_regressions`).
    Every `on_*` method and `advance(now)` returns True when a change point was flagged during the
    call, so a control loop (or the simulator) can run the policy at once instead of waiting for its
    next tick; `snapshot` reports change points through the stats (`change_points`, `last_change_*`).
    `tokens_per_s` counts `on_tokens`; if `on_tokens` is never called it counts output tokens at finish.
    `met_slo=None` is judged against `slo_ttft_s`/`slo_tpot_s` when those are set, else left out.
    """

    def __init__(self, window_s: float = 60.0, short_window_s: float = 10.0, *, bucket_s: float = 0.5,
                 slabs: int = 6, rel_err: float = 0.01, forecast_horizon_s: float = 30.0,
                 level_tau_s: float = 10.0, trend_tau_s: float = 30.0, trend_damping: float = 0.95,
                 cusum_k: float = 1.0, cusum_h: float = 8.0, cusum_clip: float = 4.0, baseline_tau_s: float = 60.0,
                 warmup_s: float = 10.0, slo_ttft_s: float | None = None, slo_tpot_s: float | None = None):
        if not 0 < bucket_s <= short_window_s <= window_s:
            raise ConfigError("need 0 < bucket_s <= short_window_s <= window_s "
                              f"(got {bucket_s}, {short_window_s}, {window_s})")
        if slabs < 1 or not 0 < rel_err < 0.5:
            raise ConfigError(f"need slabs >= 1 and 0 < rel_err < 0.5 (got {slabs}, {rel_err})")
        if min(level_tau_s, trend_tau_s, baseline_tau_s) <= 0 or cusum_h <= 0 or cusum_k < 0:
            raise ConfigError("time constants and cusum_h must be > 0, cusum_k >= 0")
        if not 0.0 < trend_damping <= 1.0:
            raise ConfigError(f"trend_damping must be in (0, 1], got {trend_damping}")
        self.window_s, self.short_window_s, self.bucket_s = window_s, short_window_s, bucket_s
        self.forecast_horizon_s = forecast_horizon_s
        self.slo_ttft_s, self.slo_tpot_s = slo_ttft_s, slo_tpot_s
        self._n = int(round(window_s / bucket_s))
        self._m = max(1, int(round(short_window_s / bucket_s)))
        self._ring = [[0.0] * self._n for _ in range(9)]
        self._b: int | None = None  # absolute index of the current bucket
        self._arr_total = 0  # arrivals in the ring (exact, for the peak at bucket close)
        # distributions
        self._slabs = slabs
        self._slab_s = window_s / slabs
        self._s: int | None = None
        self._d_prompt = _LogSketch(slabs, rel_err, 1.0, 2.0**22)
        self._d_output = _LogSketch(slabs, rel_err, 1.0, 2.0**22)
        self._d_ttft = _LogSketch(slabs, rel_err, 1e-4, 1e5)
        self._d_tpot = _LogSketch(slabs, rel_err, 1e-5, 1e4)
        self._d_qdelay = _LogSketch(slabs, rel_err, 1e-4, 1e5)
        # clock
        self._t0: float | None = None
        self._now = -math.inf
        self._regressions = 0
        self._last_arrival: float | None = None
        # queue gauge
        self._q_len = 0
        self._q_wait = 0.0
        self._q_t: float | None = None
        self._tokens_reported = False
        # Holt forecast over per-bucket rates
        self._a_level = 1.0 - math.exp(-bucket_s / level_tau_s)
        self._a_trend = 1.0 - math.exp(-bucket_s / trend_tau_s)
        self._level: float | None = None
        self._trend = 0.0  # per bucket
        self._phi = trend_damping
        self._peak = 0.0
        # CUSUM on per-bucket counts
        self._k, self._h, self._clip = cusum_k, cusum_h, cusum_clip
        self._a_base = 1.0 - math.exp(-bucket_s / baseline_tau_s)
        self._warmup = max(2, int(round(warmup_s / bucket_s)))
        self._learn = 0  # buckets behind the baseline since it was (re)started
        self._learn_until = self._warmup  # no alarms until then: the baseline is still being learnt
        self._settle = int(math.ceil(3 * max(level_tau_s, trend_tau_s, baseline_tau_s) / bucket_s))
        self._mu = 0.0
        self._var = 0.0
        self._s_up = self._s_dn = 0.0
        self._up_start = self._dn_start = 0
        self._up_sum = self._dn_sum = 0.0
        self._up_n = self._dn_n = 0
        self._changes = 0
        self._change_dir = 0
        self._change_at = NAN
        self._change_detected_at = NAN
        self._flagged = False

    # ---- events --------------------------------------------------------------------------------
    def on_arrival(self, now: float, prompt_tokens: int) -> bool:
        """A request arrived with `prompt_tokens` prompt tokens."""
        now = self._advance(now)
        r = self._ring
        i = self._b % self._n
        r[_ARR][i] += 1
        self._arr_total += 1
        # A gap counts only when it starts inside the window: the first arrival after a long silence
        # would otherwise add one gap of the whole silence to a window of regular ones (CV ~5 for a
        # steady stream, inflating the demand for the reclaim window after every wake).
        if self._last_arrival is not None and self._last_arrival >= (self._b - self._n + 1) * self.bucket_s:
            g = now - self._last_arrival
            r[_GN][i] += 1
            r[_GS][i] += g
            r[_GQ][i] += g * g
        self._last_arrival = now
        self._d_prompt.add(self._s % self._slabs, float(prompt_tokens))
        return self._take_flag()

    def on_queue(self, now: float, queue_len: int, oldest_wait_s: float = 0.0) -> bool:
        """The waiting queue now holds `queue_len` requests, the oldest waiting `oldest_wait_s`."""
        now = self._advance(now)
        self._q_flush(now)
        self._q_len = int(queue_len)
        self._q_wait = float(oldest_wait_s)
        return self._take_flag()

    def on_tokens(self, now: float, n: int) -> bool:
        """`n` tokens (prefill and decode) were processed by the serving pipelines."""
        now = self._advance(now)
        self._tokens_reported = True
        self._ring[_TOK][self._b % self._n] += n
        return self._take_flag()

    def on_finish(self, now: float, output_tokens: int, ttft_s: float, tpot_s: float,
                  met_slo: bool | None = None, queue_delay_s: float | None = None) -> bool:
        """A request finished with `output_tokens` tokens, its TTFT and mean TPOT (seconds)."""
        now = self._advance(now)
        r = self._ring
        i = self._b % self._n
        s = self._s % self._slabs
        r[_FIN][i] += 1
        if not self._tokens_reported:
            r[_TOK][i] += output_tokens
        if met_slo is None and (self.slo_ttft_s is not None or self.slo_tpot_s is not None):
            met_slo = ((self.slo_ttft_s is None or ttft_s <= self.slo_ttft_s)
                       and (self.slo_tpot_s is None or tpot_s <= self.slo_tpot_s))
        if met_slo is not None:
            r[_JUDGED][i] += 1
            r[_MET][i] += 1 if met_slo else 0
        self._d_output.add(s, float(output_tokens))
        self._d_ttft.add(s, float(ttft_s))
        if output_tokens > 1:
            self._d_tpot.add(s, float(tpot_s))
        if queue_delay_s is not None:
            self._d_qdelay.add(s, float(queue_delay_s))
        return self._take_flag()

    def advance(self, now: float) -> bool:
        """Move the clock to `now` without an event (closes buckets, may flag a change)."""
        self._advance(now)
        return self._take_flag()

    # ---- snapshot ------------------------------------------------------------------------------
    def snapshot(self, now: float) -> TrafficStats:
        """Statistics as of `now` (advances the clock like any event)."""
        now = self._advance(now)
        if self._t0 is None:
            return TrafficStats(now=now, window_s=self.window_s, short_window_s=self.short_window_s,
                                forecast_horizon_s=self.forecast_horizon_s)
        self._take_flag()
        self._q_flush(now)
        r, n, m, bs = self._ring, self._n, self._m, self.bucket_s
        b0 = self._b * bs  # start of the current bucket
        span = max(bs, now - max(self._t0, b0 - (n - 1) * bs))
        span_short = max(bs, now - max(self._t0, b0 - (m - 1) * bs))
        arrivals = int(sum(r[_ARR]))
        gn, gs, gq = sum(r[_GN]), sum(r[_GS]), sum(r[_GQ])
        sgn, sgs, sgq = self._tail(r[_GN], m), self._tail(r[_GS], m), self._tail(r[_GQ], m)
        judged = sum(r[_JUDGED])
        rate = arrivals / span
        forecast = rate
        trend = 0.0
        if self._level is not None:
            trend = self._trend / bs
            h = self.forecast_horizon_s / bs  # buckets ahead; a damped trend adds phi + phi^2 + ... + phi^h
            reach = h if self._phi == 1.0 else self._phi * (1.0 - self._phi ** h) / (1.0 - self._phi)
            forecast = max(0.0, self._level + self._trend * reach)
        since = NAN
        if self._changes and now - self._change_at <= self.window_s:
            cb = int(math.floor(self._change_at / bs))
            k = min(n, self._b - cb + 1)
            since = self._tail(r[_ARR], k) / max(bs, now - self._change_at)
        last = self._last_arrival if self._last_arrival is not None else self._t0
        return TrafficStats(
            now=now, elapsed_s=now - self._t0, window_s=self.window_s, short_window_s=self.short_window_s,
            arrivals=arrivals, rate=rate, rate_short=self._tail(r[_ARR], m) / span_short,
            rate_forecast=forecast, forecast_horizon_s=self.forecast_horizon_s, rate_trend=trend,
            peak_rate=max(self._peak, rate if now - self._t0 >= self.short_window_s else 0.0),
            cv=_cv(gn, gs, gq), cv_short=_cv(sgn, sgs, sgq), gaps=int(gn),
            prompt_tokens=self._d_prompt.dist(), output_tokens=self._d_output.dist(),
            ttft_s=self._d_ttft.dist(), tpot_s=self._d_tpot.dist(), queue_delay_s=self._d_qdelay.dist(),
            queue_len=self._q_len, queue_len_mean=sum(r[_QAREA]) / span, queue_wait_s=self._q_wait,
            tokens_per_s=sum(r[_TOK]) / span, finished=int(sum(r[_FIN])),
            slo_attainment=(sum(r[_MET]) / judged if judged else NAN),
            idle_s=now - last, change_points=self._changes, last_change_dir=self._change_dir,
            last_change_at=self._change_at, last_change_detected_at=self._change_detected_at,
            rate_since_change=since, clock_regressions=self._regressions)

    # ---- internals -----------------------------------------------------------------------------
    def _tail(self, col: list[float], k: int) -> float:
        """Sum of the last k buckets of a ring column (the current one included)."""
        e = self._b % self._n + 1
        s = e - k
        return sum(col[s:e]) if s >= 0 else sum(col[s:]) + sum(col[:e])

    def _take_flag(self) -> bool:
        f, self._flagged = self._flagged, False
        return f

    def _advance(self, now: float) -> float:
        if now < self._now:
            self._regressions += 1
            now = self._now
        self._now = now
        b = int(math.floor(now / self.bucket_s))
        s = int(math.floor(now / self._slab_s))
        if self._t0 is None:
            self._t0, self._b, self._s, self._q_t = now, b, s, now
            return now
        if b > self._b:
            steps = b - self._b
            # after a long silence every bucket is empty: close enough of them to clear the ring and
            # settle the forecast and the CUSUM, then jump
            limit = self._n + self._settle
            for _ in range(min(steps, limit)):
                self._close_bucket()
            if steps > limit:
                self._b = b
                self._level, self._trend = 0.0, 0.0
                self._q_t = max(self._q_t, b * self.bucket_s)
        if s > self._s:
            for k in range(min(s - self._s, self._slabs)):
                slab = (self._s + 1 + k) % self._slabs
                for d in (self._d_prompt, self._d_output, self._d_ttft, self._d_tpot, self._d_qdelay):
                    d.clear(slab)
            self._s = s
        return now

    def _q_flush(self, now: float) -> None:
        """Add the queue-length area up to `now` to the current bucket."""
        if self._q_t is not None and now > self._q_t:
            self._ring[_QAREA][self._b % self._n] += self._q_len * (now - self._q_t)
        self._q_t = now

    def _close_bucket(self) -> None:
        """Close the current bucket: peak, forecast and CUSUM updates; open (clear) the next one."""
        r, bs = self._ring, self.bucket_s
        i = self._b % self._n
        end = (self._b + 1) * bs
        if self._q_t is not None and self._q_t < end:
            r[_QAREA][i] += self._q_len * (end - self._q_t)
            self._q_t = end
        c = r[_ARR][i]
        # peak of the long-window rate, once the short window has filled
        if end - self._t0 >= self.short_window_s:
            span = end - max(self._t0, end - self._n * bs)
            self._peak = max(self._peak, self._arr_total / span)
        # Holt's linear trend on the bucket's rate
        x = c / bs
        if self._level is None:
            self._level = x
        else:
            prev, phi = self._level, self._phi
            self._level = self._a_level * x + (1.0 - self._a_level) * (prev + phi * self._trend)
            self._trend = self._a_trend * (self._level - prev) + (1.0 - self._a_trend) * phi * self._trend
        self._cusum(c, end)
        # open the next bucket
        self._b += 1
        j = self._b % self._n
        self._arr_total -= int(r[_ARR][j])
        for col in r:
            col[j] = 0.0

    def _cusum(self, x: float, end: float) -> None:
        self._learn += 1
        if self._learn <= self._learn_until:
            # running mean and variance until the baseline has enough buckets (again after an alarm)
            d = x - self._mu
            self._mu += d / self._learn
            self._var += (d * (x - self._mu) - self._var) / self._learn
            return
        sd = math.sqrt(max(self._var, self._mu, 1.0))
        z = max(-self._clip, min(self._clip, (x - self._mu) / sd))
        start = end - self.bucket_s
        if self._s_up == 0.0:
            self._up_start, self._up_sum, self._up_n = start, 0.0, 0
        if self._s_dn == 0.0:
            self._dn_start, self._dn_sum, self._dn_n = start, 0.0, 0
        self._s_up = max(0.0, self._s_up + z - self._k)
        self._s_dn = max(0.0, self._s_dn - z - self._k)
        self._up_sum += x
        self._up_n += 1
        self._dn_sum += x
        self._dn_n += 1
        if self._s_up > self._h or self._s_dn > self._h:
            up = self._s_up > self._h
            at, mean = ((self._up_start, self._up_sum / self._up_n) if up
                        else (self._dn_start, self._dn_sum / self._dn_n))
            # restart: learn the new level from the run's buckets on (the run began at the change)
            self._var = max(1.0, self._var / max(self._mu, 1e-9)) * mean
            self._mu = mean
            self._learn = min(self._up_n if up else self._dn_n, self._warmup)
            self._learn_until = self._learn + self._warmup // 2
            self._s_up = self._s_dn = 0.0
            self._changes += 1
            self._change_dir = 1 if up else -1
            self._change_at, self._change_detected_at = at, end
            self._flagged = True
            return
        a = self._a_base
        d = x - self._mu
        self._mu += a * d
        self._var = (1.0 - a) * (self._var + a * d * d)


def _cv(n: float, s: float, q: float) -> float:
    """Coefficient of variation from count, sum and sum of squares (NaN below 2 samples)."""
    if n < 2 or s <= 0:
        return NAN
    mean = s / n
    var = max(0.0, (q - s * mean) / (n - 1))
    return math.sqrt(var) / mean


__all__ = ["Dist", "TrafficAnalyzer", "TrafficStats"]

"""TrafficAnalyzer on synthetic arrivals with known rate and CV; change points; sketches; determinism."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from flexpipe.errors import ConfigError
from flexpipe.planning.analyzer import TrafficAnalyzer, TrafficStats


def arrivals(rate: float, cv: float, until: float, seed: int, start: float = 0.0,
             step: tuple[float, float] | None = None) -> np.ndarray:
    """Renewal arrival times: exponential gaps (cv = 1) or gamma gaps with the given CV.

    `step=(t, k)` multiplies the rate by k from time t on.
    """
    rng = np.random.default_rng(seed)
    out, t = [], start
    while True:
        r = rate * step[1] if step and t >= step[0] else rate
        if cv == 1.0:
            t += rng.exponential(1.0 / r)
        else:
            k = 1.0 / cv**2
            t += rng.gamma(k, 1.0 / (r * k))
        if t >= until:
            return np.array(out)
        out.append(t)


def feed(an: TrafficAnalyzer, times: np.ndarray, prompt: int = 100) -> list[float]:
    """Arrivals into the analyzer; the times at which a change point was flagged."""
    return [float(t) for t in times if an.on_arrival(float(t), prompt)]


# ---- rate and CV -------------------------------------------------------------------------------
def test_poisson_rate_and_cv():
    an = TrafficAnalyzer(window_s=300.0)
    feed(an, arrivals(20.0, 1.0, 600.0, seed=1))
    s = an.snapshot(600.0)
    assert s.rate == pytest.approx(20.0, rel=0.05)
    assert s.cv == pytest.approx(1.0, abs=0.1)
    assert s.cv_short == pytest.approx(1.0, abs=0.3)  # 10 s: ~200 gaps
    assert s.rate_forecast == pytest.approx(20.0, rel=0.3)
    assert s.peak_rate >= s.rate


def test_gamma_cv4_rate_and_cv():
    # gamma gaps with CV 4 are heavy-tailed: the sample CV of ~6000 gaps is within ~20%
    an = TrafficAnalyzer(window_s=300.0)
    feed(an, arrivals(20.0, 4.0, 600.0, seed=2))
    s = an.snapshot(600.0)
    assert s.rate == pytest.approx(20.0, rel=0.2)
    assert 3.2 <= s.cv <= 4.8


def test_a_long_silence_is_not_an_inter_arrival_gap_of_the_window():
    # 1 req/s, 600 s of silence, 1 req/s again: the gaps in the window are all 1 s, CV 0 (the
    # silence used to count as one 600-s gap: CV 4.8, and demand inflated after every wake)
    an = TrafficAnalyzer()
    an.advance(0.0)
    t = 0.0
    for _ in range(60):
        an.on_arrival(t, 100)
        t += 1.0
    t += 600.0
    for _ in range(25):
        an.on_arrival(t, 100)
        t += 1.0
    s = an.snapshot(t)
    assert s.gaps == 24 and s.cv == pytest.approx(0.0, abs=1e-6), (s.gaps, s.cv)


def test_rates_over_short_and_long_windows_and_forecast_follow_a_ramp():
    an = TrafficAnalyzer()
    # 10 req/s for 120 s, then a linear ramp to 50 req/s over 120 s (deterministic spacing)
    t, times = 0.0, []
    while t < 240.0:
        r = 10.0 if t < 120.0 else 10.0 + 40.0 * (t - 120.0) / 120.0
        t += 1.0 / r
        times.append(t)
    feed(an, np.array(times[:-1]))
    s = an.snapshot(240.0)
    assert s.rate_short == pytest.approx(48.3, rel=0.1)  # mean of the last 10 s of the ramp
    assert s.rate < s.rate_short  # the 60 s window lags a ramp
    assert s.rate_trend > 0.05  # req/s per s (damped: under the true 0.33)
    assert s.rate_forecast == pytest.approx(50.0, rel=0.1)  # near the rate now, well above the window's
    assert s.cv < 0.2  # evenly spaced


def test_forecast_does_not_overshoot_a_step_by_much():
    an = TrafficAnalyzer()
    times = arrivals(20.0, 1.0, 360.0, seed=4, step=(300.0, 4.0))
    forecasts = []
    for tick in np.arange(290.0, 360.0, 0.5):
        feed(an, times[(times >= tick - 0.5) & (times < tick)] if tick > 290.0 else times[times < tick])
        forecasts.append(an.snapshot(float(tick)).rate_forecast)
    assert forecasts[0] == pytest.approx(20.0, rel=0.3)
    assert 65.0 < max(forecasts) < 80.0 * 1.3  # catches up with the new 80 req/s, overshoots by < 30%


# ---- change points -----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_poisson_step_burst_flagged_within_3s(seed):
    an = TrafficAnalyzer()
    times = arrivals(20.0, 1.0, 330.0, seed=seed, step=(300.0, 4.0))
    flags = feed(an, times)
    assert [f for f in flags if f < 300.0] == []  # no false alarm in 5 min of steady traffic
    assert flags and 300.0 <= flags[0] <= 303.0
    s = an.snapshot(330.0)
    assert s.last_change_dir == 1
    assert abs(s.last_change_at - 300.0) <= 2.0  # the change time is estimated, not the alarm time
    assert s.rate_since_change == pytest.approx(80.0, rel=0.2)


@pytest.mark.parametrize("seed", range(3))
def test_bursty_step_flagged_within_10s(seed):
    an = TrafficAnalyzer()
    times = arrivals(20.0, 4.0, 330.0, seed=seed, step=(300.0, 4.0))
    flags = feed(an, times)
    after = [f for f in flags if f >= 300.0]
    assert after and after[0] <= 310.0
    assert an.snapshot(330.0).last_change_dir == 1


def test_drop_flagged_and_no_false_alarms_in_steady_traffic():
    an = TrafficAnalyzer()
    flags = feed(an, arrivals(20.0, 1.0, 1200.0, seed=7))
    assert flags == []  # 20 min of Poisson traffic
    an = TrafficAnalyzer()
    flags = feed(an, arrivals(20.0, 1.0, 330.0, seed=7, step=(300.0, 0.25)))
    assert flags and 300.0 <= flags[0] <= 306.0
    assert an.snapshot(330.0).last_change_dir == -1


def test_traffic_stopping_is_a_downward_change_seen_by_advance():
    an = TrafficAnalyzer()
    feed(an, arrivals(20.0, 1.0, 120.0, seed=3))
    flagged = [t for t in np.arange(120.0, 130.0, 0.25) if an.advance(float(t))]
    assert flagged and flagged[0] <= 123.0
    s = an.snapshot(130.0)
    assert s.last_change_dir == -1 and s.idle_s >= 9.0


# ---- distributions, queue, service -------------------------------------------------------------
def test_length_quantiles_match_numpy_within_rel_err_and_window():
    rng = np.random.default_rng(5)
    an = TrafficAnalyzer(window_s=60.0, rel_err=0.01)
    old = rng.integers(1, 50, 2000)
    for i, p in enumerate(old):
        an.on_arrival(i * 0.01, int(p))  # 20 s of short prompts
    new = np.round(rng.lognormal(6.0, 1.0, 5000)).astype(int) + 1
    for i, p in enumerate(new):
        an.on_arrival(100.0 + i * 0.01, int(p))  # after the old ones left the window
    d = an.snapshot(150.0).prompt_tokens
    assert d.n == len(new)
    for q, got in ((0.5, d.p50), (0.9, d.p90), (0.99, d.p99)):
        want = float(np.quantile(new, q, method="lower"))
        assert got == pytest.approx(want, rel=0.025), q
    assert d.max == new.max() and d.mean == pytest.approx(new.mean())


def test_queue_tokens_slo_and_latency_figures():
    an = TrafficAnalyzer(slo_ttft_s=1.0, slo_tpot_s=0.1)
    an.on_arrival(0.0, 10)
    an.on_queue(0.0, 4, 0.5)
    an.on_queue(30.0, 0, 0.0)  # 4 waiting for 30 s, then none for 30 s
    for i in range(10):
        # 7 within the SLO, 2 with a slow first token, 1 with slow decode
        ttft = 0.5 if i < 8 else 2.0
        tpot = 0.05 if i != 7 else 0.2
        an.on_finish(40.0 + i, output_tokens=100, ttft_s=ttft, tpot_s=tpot, queue_delay_s=0.1 * i)
    s = an.snapshot(60.0)
    assert s.queue_len == 0 and s.queue_len_mean == pytest.approx(2.0, rel=0.01)
    assert s.finished == 10 and s.slo_attainment == pytest.approx(0.7)
    assert s.tokens_per_s == pytest.approx(1000 / 60.0, rel=0.01)  # output tokens: no on_tokens calls
    assert s.ttft_s.p50 == pytest.approx(0.5, rel=0.01) and s.ttft_s.max == 2.0
    assert s.queue_delay_s.n == 10 and s.queue_delay_s.max == pytest.approx(0.9)
    an.on_tokens(61.0, 6000)  # once reported per step, tokens/s counts those only
    assert an.snapshot(61.0).tokens_per_s > s.tokens_per_s


# ---- clock, memory, determinism ----------------------------------------------------------------
def test_clock_regression_is_clamped_and_counted_and_long_idle_is_cheap():
    an = TrafficAnalyzer()
    an.on_arrival(10.0, 5)
    an.on_arrival(9.0, 5)
    s = an.snapshot(10.0)
    assert s.clock_regressions == 1 and s.arrivals == 2
    an.on_arrival(10.0 + 10 * 3600.0, 5)  # ten hours later: a bounded amount of catch-up work
    s = an.snapshot(10.0 + 10 * 3600.0)
    assert s.arrivals == 1 and s.rate_forecast == pytest.approx(0.0, abs=1.0)
    assert s.peak_rate < 1.0


def test_memory_is_bounded_by_settings_not_traffic():
    an = TrafficAnalyzer()
    sizes = None
    for t in arrivals(200.0, 1.0, 200.0, seed=9):
        an.on_arrival(float(t), 100)
        an.on_finish(float(t), 50, 0.1, 0.02)
        if sizes is None and t > 100.0:
            sizes = (len(an._ring[0]), an._d_prompt.h.shape)
    assert (len(an._ring[0]), an._d_prompt.h.shape) == sizes


def test_same_events_same_stats_and_stats_serialise():
    snaps = []
    for _ in range(2):
        an = TrafficAnalyzer()
        times = arrivals(30.0, 2.0, 120.0, seed=11)
        for i, t in enumerate(times):
            an.on_arrival(float(t), 50 + i % 7)
            if i % 3 == 0:
                an.on_finish(float(t) + 0.01, 20, 0.2, 0.03)
        snaps.append(json.dumps(an.snapshot(120.0).to_dict()))
    assert snaps[0] == snaps[1]
    assert TrafficAnalyzer().snapshot(5.0).rate == 0.0  # no events: zeros, NaN CV
    assert math.isnan(TrafficAnalyzer().snapshot(5.0).cv)


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError):
        TrafficAnalyzer(window_s=10.0, short_window_s=20.0)
    with pytest.raises(ConfigError):
        TrafficAnalyzer(rel_err=0.0)


def test_synthetic_stats_helper():
    s = TrafficStats.synthetic(100.0, 5.0, cv=2.0, queue_len=3)
    assert s.rate == 5.0 and s.cv == 2.0 and s.queue_len == 3 and s.prompt_tokens.mean == 512

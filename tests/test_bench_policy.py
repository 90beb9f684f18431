"""benchmarks/bench_policy.py: the analyzer is fed what happened before each decision, and nothing after."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_policy  # noqa: E402


class _Recorder:
    """Records every call as (kind, time)."""

    def __init__(self, *args, **kwargs):
        self.calls: list[tuple[str, float]] = []
        super().__init__(*args, **kwargs)

    def on_arrival(self, now, prompt_tokens):
        self.calls.append(("arrival", now))
        return super().on_arrival(now, prompt_tokens)

    def on_finish(self, now, *args, **kwargs):
        self.calls.append(("finish", now))
        return super().on_finish(now, *args, **kwargs)

    def snapshot(self, now):
        self.calls.append(("snapshot", now))
        return super().snapshot(now)


class _Plain:
    def on_arrival(self, now, prompt_tokens):
        return False

    def on_finish(self, now, *args):
        return False

    def snapshot(self, now):
        return None


class _Log(_Recorder, _Plain):
    pass


def test_feed_gives_arrivals_before_the_tick_and_keeps_the_next_one():
    SyntheticArrivals, feed = bench_policy.SyntheticArrivals, bench_policy.feed
    src = SyntheticArrivals(np.random.default_rng(0), (20.0, 30.0))
    log, pending = _Log(), []
    for tick in range(1, 61):
        log.calls.clear()
        feed(log, src, pending, float(tick))
        times = [t for _, t in log.calls]
        assert times == sorted(times), "events in time order"
        assert all(t < tick for k, t in log.calls if k == "arrival")
        assert all(t <= tick for k, t in log.calls if k == "finish")
        assert all(t >= tick - 1 for k, t in log.calls if k == "arrival"), "nothing held back a tick too long"
        assert all(ft > tick for ft, _, _ in pending)
    # nothing lost or repeated: every arrival of the same stream before the last tick was fed, once
    fed = []
    src = SyntheticArrivals(np.random.default_rng(0), (20.0, 30.0))
    for tick in range(1, 61):
        fed += [a[0] for a in src.before(float(tick))]
    again = SyntheticArrivals(np.random.default_rng(0), (20.0, 30.0)).before(60.0)
    assert fed == [a[0] for a in again] and len(fed) > 1000


def test_benchmark_decides_on_what_arrived_before_each_tick(monkeypatch, capsys):
    class Recording(_Recorder, bench_policy.TrafficAnalyzer):
        made: list = []

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            Recording.made.append(self)

    monkeypatch.setattr(bench_policy, "TrafficAnalyzer", Recording)
    monkeypatch.setattr(sys, "argv", ["bench_policy.py", "--minutes", "0.25"])
    bench_policy.main()
    assert "decisions" in capsys.readouterr().out
    (an,) = Recording.made
    last_arrival, snapshots = -1.0, 0
    for kind, t in an.calls:
        if kind == "arrival":
            last_arrival = t
        elif kind == "snapshot":
            snapshots += 1
            assert last_arrival < t, f"an arrival at {last_arrival:.3f} s was fed before the decision at {t} s"
    assert snapshots >= 15

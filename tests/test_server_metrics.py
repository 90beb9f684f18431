"""The reshape metrics the server derives from engine.status(): what flexpipe_reshapes_total counts, and
the pause histogram, which the engine counts since it started (api.pause_histogram)."""

from __future__ import annotations

import pytest

pytest.importorskip("prometheus_client", reason="the 'serve' extra is not installed")

from flexpipe.server.metrics import ServerMetrics  # noqa: E402
from flexpipe.server.status import pipeline_view  # noqa: E402


def _record(to_epoch: int, ok: bool = True, kind: str = "reshape") -> dict:
    return {"kind": kind, "from_epoch": to_epoch - 1, "to_epoch": to_epoch, "ok": ok,
            "pause_s": 0.01, "at": 1000.0 + to_epoch, "from_boundaries": [0, 4, 8], "to_boundaries": [0, 8]}


def test_reshapes_total_counts_only_the_reshapes_that_succeeded():
    # A router daemon reports every record it holds (reshapes_total = len(history)), failed ones too;
    # an aborted reshape leaves the epoch where it was.
    history = [_record(1), _record(2, ok=False), _record(2), _record(3, ok=False), _record(3, ok=False)]
    router = {"shape": {"epoch": 2}, "reshapes": history, "reshapes_total": len(history)}
    assert pipeline_view(router).reshapes_total == 2
    # failures older than the recent list: the epoch still bounds the count
    assert pipeline_view({**router, "reshapes": history[-2:]}).reshapes_total == 2
    # the embedded engine reports no total: its epoch counts them
    assert pipeline_view({"shape": {"epoch": 2}, "reshapes": history}).reshapes_total == 2


@pytest.mark.timeout(60)
async def test_every_pause_reaches_the_histogram_however_many_reshapes_come_between_two_scrapes():
    """The engine used to report its last 16 reshape records only, and the server put those it had not
    seen into the histogram: a burst of more than 16 reshapes between two scrapes lost some pauses."""
    from prometheus_client import CollectorRegistry, Histogram

    from flexpipe.api import PAUSE_BUCKETS, FlexPipe
    from flexpipe.errors import ReshapeError

    m = ServerMetrics("tiny")
    async with FlexPipe.launch("tiny", stages=1, in_process=True) as fp:
        m.observe_status(pipeline_view(fp.status()))
        assert m.registry.get_sample_value("flexpipe_reshape_pause_seconds_count") == 0
        await fp.reshape(stages=2)
        m.observe_status(pipeline_view(fp.status()))
        for stages in [1, 3, 2] * 7:   # 21 reshapes before the next scrape
            await fp.reshape(stages=stages)
        fp.controller.fail_next_launch = True   # an aborted one: the old epoch kept serving, no reshape
        with pytest.raises(ReshapeError):
            await fp.reshape(stages=3)
        for _ in range(2):   # a status poll and a scrape of the same snapshot: nothing counted twice
            view = pipeline_view(fp.status())
            m.observe_status(view)
        history = list(fp.controller.history)
    assert len(history) == 23 and [st.ok for st in history].count(False) == 1
    # the oracle: prometheus_client's own histogram, shown every successful pause once
    oracle = CollectorRegistry()
    h = Histogram("flexpipe_reshape_pause_seconds", "-", buckets=PAUSE_BUCKETS, registry=oracle)
    for st in history:
        if st.ok:
            h.observe(st.pause_s)

    def samples(registry: CollectorRegistry, suffix: str) -> dict:
        return {tuple(sorted(s.labels.items())): s.value for f in registry.collect() for s in f.samples
                if s.name == "flexpipe_reshape_pause_seconds" + suffix}

    assert samples(m.registry, "_count") == samples(oracle, "_count") == {(): 22}
    assert samples(m.registry, "_bucket") == samples(oracle, "_bucket")
    assert samples(m.registry, "_sum")[()] == pytest.approx(samples(oracle, "_sum")[()])
    assert view.pause_total_s == pytest.approx(sum(st.pause_s for st in history if st.ok))   # all, not the last 16


def test_a_pause_histogram_that_does_not_add_up_is_left_out():
    good = {"bounds": [0.01, 0.1], "counts": [1, 2], "count": 3, "sum": 0.5}
    assert pipeline_view({"pauses": good}).pauses == good
    for bad in ({**good, "counts": [2, 1]}, {**good, "count": 1}, {**good, "bounds": [0.1, 0.01]},
                {**good, "counts": [1]}, {**good, "sum": "lots"}, {"count": 3}, [1, 2]):
        m = ServerMetrics("tiny")
        m.observe_status(pipeline_view({"shape": {"epoch": 1}, "pauses": bad}))
        assert m.registry.get_sample_value("flexpipe_reshape_pause_seconds_count") is None, bad
        assert m.registry.get_sample_value("flexpipe_pipeline_epoch") == 1

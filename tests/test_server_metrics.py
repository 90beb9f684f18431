"""The reshape metrics the server derives from engine.status(): what flexpipe_reshapes_total counts, and
the pause histogram over many scrapes of a sliding window of recent reshape records."""

from __future__ import annotations

import pytest

pytest.importorskip("prometheus_client", reason="the 'serve' extra is not installed")

from flexpipe.server.metrics import PAUSES_REMEMBERED, ServerMetrics  # noqa: E402
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


def test_the_pause_histogram_sees_each_reshape_once_with_bounded_memory():
    m = ServerMetrics("tiny")
    history: list[dict] = []
    scrapes = 3 * PAUSES_REMEMBERED
    for epoch in range(1, scrapes + 1):
        history.append(_record(epoch))
        view = pipeline_view({"shape": {"epoch": epoch}, "reshapes": history[-16:]})
        m.observe_status(view)
        m.observe_status(view)   # a status poll and a scrape of the same snapshot
    m.observe_status(pipeline_view({"shape": {"epoch": scrapes}, "reshapes": history[-20:-4]}))  # an older one
    assert m.registry.get_sample_value("flexpipe_reshape_pause_seconds_count") == scrapes
    assert len(m._pauses_seen) <= PAUSES_REMEMBERED

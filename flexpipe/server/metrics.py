"""Prometheus metrics of the HTTP server, plus the runtime's numbers read from engine.status()."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .status import PipelineView

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds.  TTFT on a CPU pipeline spans milliseconds to tens of seconds under load.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# (The reshape pause histogram's bounds are api.PAUSE_BUCKETS: the engine counts its pauses on them and
# reports bounds and counts together, which _RuntimeCollector exposes as they come.)


class ServerMetrics:
    """The server's registry: request counters and latency histograms it measures itself."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("flexpipe_http_requests", "HTTP requests answered, by endpoint and status "
                                "(499: the client disconnected before the end)", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("flexpipe_prompt_tokens", "Prompt tokens of admitted requests",
                                     registry=r)
        self.generation_tokens = Counter("flexpipe_generation_tokens", "Tokens generated and sent",
                                         registry=r)
        self.running = Gauge("flexpipe_http_requests_running", "Generation requests the server is "
                             "serving right now", registry=r)
        self.ttft = Histogram("flexpipe_time_to_first_token_seconds", "Time from request arrival to its "
                              "first generated token", buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("flexpipe_time_per_output_token_seconds", "Mean time between output tokens "
                              "of a request (after the first)", buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("flexpipe_request_latency_seconds", "Time from request arrival to its last "
                             "token", buckets=E2E_BUCKETS, registry=r)
        info = Gauge("flexpipe_model_info", "The served model (value 1)", ["model"], registry=r)
        info.labels(model=model_name).set(1)
        self._runtime = _RuntimeCollector()
        r.register(self._runtime)
        self.active = 0

    def begin(self) -> None:
        """A generation request starts."""
        self.active += 1
        self.running.inc()

    def end(self) -> None:
        """A generation request ended (finished, failed or abandoned by its client)."""
        self.active -= 1
        self.running.dec()

    def observe_status(self, view: PipelineView) -> None:
        """Take the runtime's current numbers (the reshape pause histogram among them: the engine counts
        every pause since it started, so no pause depends on how often the server reads its status)."""
        self._runtime.view, self._runtime.up = view, True

    def engine_unavailable(self) -> None:
        """The engine did not tell its status: no runtime numbers (rather than stale ones) until it does."""
        self._runtime.view, self._runtime.up = None, False

    def render(self) -> bytes:
        """Prometheus text exposition of everything."""
        return generate_latest(self.registry)


class _RuntimeCollector(Collector):
    """Gauges and counters of the pipeline, from the last engine.status() snapshot."""

    def __init__(self) -> None:
        self.view: PipelineView | None = None
        self.up: bool | None = None  # whether the engine answered the last status read (None: none yet)

    def describe(self) -> list[Metric]:
        return []  # values come and go with the snapshot; nothing to describe up front

    def collect(self) -> Iterator[Metric]:
        if self.up is not None:
            yield _gauge("flexpipe_engine_up", "1 when the engine (embedded, or the remote router) answered "
                         "the last status read, else 0 and the runtime's metrics are left out", int(self.up))
        v = self.view
        if v is None:
            return
        yield _gauge("flexpipe_pipeline_epoch", "Configuration epoch of the pipeline", v.epoch)
        yield _gauge("flexpipe_pipeline_stages", "Stages in the current pipeline", len(v.stages))
        yield _gauge("flexpipe_reserved_devices", "Devices reserved by the current pipeline",
                     v.reserved_devices)
        yield _gauge("flexpipe_queue_length", "Requests waiting for admission", v.waiting)
        yield _gauge("flexpipe_requests_active", "Requests the runtime is running (prefill or decode)",
                     v.running)
        yield _gauge("flexpipe_kv_cache_usage_ratio", "Fraction of KV blocks in use (0..1)", v.kv_usage)
        yield _gauge("flexpipe_kv_cache_blocks_used", "KV blocks in use", v.kv_blocks_used)
        yield _gauge("flexpipe_kv_cache_blocks_total", "KV blocks in the pool", v.kv_blocks_total)
        yield _counter("flexpipe_reshapes", "Successful pipeline reconfigurations (reshapes, recoveries, "
                       "scale to zero and back) since start", v.reshapes_total)
        if v.last_pause_s is not None:
            yield _gauge("flexpipe_last_reshape_pause_seconds", "Pause of the most recent reshape",
                         v.last_pause_s)
        if v.pauses is not None:
            yield _histogram("flexpipe_reshape_pause_seconds", "Pause that requests saw during each successful "
                             "reshape (quiesce + delta copy + switch) since the engine started", v.pauses)


def _gauge(name: str, doc: str, value: float | int | None) -> Metric:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], float(value or 0))
    return g


def _histogram(name: str, doc: str, h: dict[str, Any]) -> Metric:
    """A cumulative histogram as the engine counts it (status.PipelineView.pauses)."""
    buckets = [(floatToGoString(b), c) for b, c in zip(h["bounds"], h["counts"])]
    return HistogramMetricFamily(name, doc, buckets=[*buckets, ("+Inf", h["count"])], sum_value=h["sum"])


def _counter(name: str, doc: str, value: float | int | None) -> Metric:
    c = CounterMetricFamily(name, doc)
    c.add_metric([], float(value or 0))
    return c

"""The pipeline as the server shows it: engine.status() reduced to the numbers the page and metrics use."""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class PipelineView:
    """Current shape, load, KV use and recent reshapes of the engine, in one flat record."""

    epoch: int = 0
    stages: list[dict[str, Any]] = field(default_factory=list)  # index, start, end, device, kv_used, kv_capacity
    reserved_devices: int = 0
    waiting: int = 0
    running: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    kv_usage: float = 0.0
    reshapes_total: int = 0
    pause_total_s: float = 0.0
    last_pause_s: float | None = None
    reshapes: list[dict[str, Any]] = field(default_factory=list)  # recent, oldest first
    # every successful reshape's pause since the engine started, as a cumulative histogram (api.py's
    # pause_histogram: bounds, counts, count, sum); None where the engine reports none
    pauses: dict[str, Any] | None = None
    decisions: list[dict[str, Any]] = field(default_factory=list)  # recent, oldest first

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the web page's pipeline panel reads it)."""
        return jsonable(asdict(self))


async def read_status(engine: Any) -> dict[str, Any]:
    """engine.status(), whether the engine answers it directly (embedded) or awaits it (remote)."""
    status = engine.status()
    if inspect.isawaitable(status):
        status = await status
    return status


def pipeline_view(status: dict[str, Any]) -> PipelineView:
    """Reduce the engine's status dict (FlexPipe.status(): shape, router, stages, reshapes) to a PipelineView."""
    shape = status.get("shape") or {}
    router = status.get("router") or {}
    view = PipelineView(epoch=int(_first(shape.get("epoch"), router.get("epoch"), status.get("epoch"), 0)))
    stages = _first(status.get("stages"), shape.get("stages"), router.get("stages"), [])
    kv = _first(router.get("kv"), status.get("kv"), [])
    per_stage_kv = {int(k.get("stage", i)): k for i, k in enumerate(kv) if isinstance(k, dict)} \
        if isinstance(kv, list) else {}
    for i, s in enumerate(stages):
        s = s if isinstance(s, dict) else {}
        index = int(s.get("index", i))
        k = per_stage_kv.get(index, {})
        view.stages.append({"index": index, "start": s.get("start"), "end": s.get("end"),
                            "device": s.get("device"), "pid": s.get("pid"),
                            "kv_used": _first(s.get("kv_used"), k.get("used")),
                            "kv_capacity": _first(s.get("kv_capacity"), k.get("capacity"))})
    # Each stage holds a device of its own (a GPU, or a CPU process with its memory budget).
    view.reserved_devices = int(_first(status.get("reserved_devices"), len(view.stages)))
    view.waiting = int(_first(router.get("waiting"), status.get("waiting"), 0))
    view.running = int(_first(router.get("running"), status.get("running"), 0))

    used, total = _kv_totals(kv, view.stages)
    view.kv_blocks_used, view.kv_blocks_total = used, total
    view.kv_usage = used / total if total else 0.0

    view.reshapes = [_reshape(r) for r in _first(status.get("reshapes"), []) if isinstance(r, dict)]
    view.reshapes_total = _successful_reshapes(status.get("reshapes_total"), view.epoch, view.reshapes)
    view.pauses = _pauses(status.get("pauses"))
    view.pause_total_s = float(_first(status.get("pause_total_s"), view.pauses["sum"] if view.pauses else None,
                                      sum(r["pause_s"] or 0.0 for r in view.reshapes)))
    if view.reshapes:
        view.last_pause_s = view.reshapes[-1]["pause_s"]
    view.decisions = [d for d in _first(status.get("decisions"), router.get("decisions"), [])
                      if isinstance(d, dict)]
    return view


def _successful_reshapes(reported: Any, epoch: int, recent: list[dict[str, Any]]) -> int:
    """Reshapes, recoveries and the like that succeeded since the engine started.

    Each moves the epoch on by one (a rebuild after a failed switch by two; an aborted reshape not at
    all), so the epoch counts them, even those older than the engine's recent list.  A router daemon
    also reports how many records it holds, failed ones included: less the failures in its recent
    list, that is exact while older failures are none.  Both only ever grow, so the smaller does too.
    """
    if reported is None:
        return epoch
    failed = sum(1 for r in recent if r.get("ok") is False)
    return max(0, min(int(reported) - failed, epoch))


def _pauses(reported: Any) -> dict[str, Any] | None:
    """The engine's cumulative pause histogram, or None where it is missing or malformed (a report off
    the wire may carry anything; a histogram whose buckets do not add up would mislead)."""
    if not isinstance(reported, dict):
        return None
    try:
        bounds = [float(b) for b in reported["bounds"]]
        counts = [int(c) for c in reported["counts"]]
        count, total = int(reported["count"]), float(reported["sum"])
    except (KeyError, TypeError, ValueError):
        return None
    ordered = all(math.isfinite(b) for b in bounds) and all(a < b for a, b in zip(bounds, bounds[1:]))
    cumulative = all(0 <= a <= b for a, b in zip([0, *counts], [*counts, count]))
    if len(bounds) != len(counts) or not ordered or not cumulative or not math.isfinite(total):
        return None
    return {"bounds": bounds, "counts": counts, "count": count, "sum": total}


def _kv_totals(kv: Any, stages: list[dict[str, Any]]) -> tuple[int, int]:
    """Blocks used and in the pool of the fullest stage (a request needs room on every stage)."""
    best = (0, 0)
    for s in stages:
        used, cap = s.get("kv_used"), s.get("kv_capacity")
        if used is None or not cap:
            continue
        if not best[1] or used / cap > best[0] / best[1]:
            best = (int(used), int(cap))
    return best


def _reshape(r: dict[str, Any]) -> dict[str, Any]:
    """A reshape record with pause_s, and stage counts before and after for display."""
    out = dict(r)
    pause = r.get("pause_s")
    out["pause_s"] = float(pause) if pause is not None else None
    for side in ("from", "to"):
        bounds = r.get(f"{side}_boundaries")
        if isinstance(bounds, list) and len(bounds) >= 2:
            out.setdefault(f"{side}_stages", len(bounds) - 1)
    return out


def _first(*values: Any) -> Any:
    for v in values:
        if v is not None:
            return v
    return None


def jsonable(value: Any) -> Any:
    """Tuples to lists, NaN/inf to None, unknown objects to str: json.dumps must accept the result."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if hasattr(value, "__dataclass_fields__"):
        return jsonable(asdict(value))
    return str(value)

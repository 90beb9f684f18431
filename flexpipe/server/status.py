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
    """Reduce the engine's status dict to a PipelineView."""
    shape = status.get("shape") or {}
    view = PipelineView(epoch=int(_first(status.get("epoch"), shape.get("epoch"), 0)))
    stages = _first(shape.get("stages"), status.get("stages"), [])
    kv = status.get("kv") or {}
    per_stage_kv = kv.get("stages", []) if isinstance(kv, dict) else kv if isinstance(kv, list) else []
    for i, s in enumerate(stages):
        s = dict(s) if isinstance(s, dict) else {"units": s}
        if "units" in s and "start" not in s and isinstance(s["units"], (list, tuple)) and len(s["units"]) == 2:
            s["start"], s["end"] = s["units"]
        entry = {"index": s.get("index", i), "start": s.get("start"), "end": s.get("end"),
                 "device": s.get("device"), "kv_used": s.get("kv_used"), "kv_capacity": s.get("kv_capacity")}
        if i < len(per_stage_kv) and isinstance(per_stage_kv[i], dict):
            entry["kv_used"] = _first(entry["kv_used"], per_stage_kv[i].get("used"))
            entry["kv_capacity"] = _first(entry["kv_capacity"], per_stage_kv[i].get("capacity"))
        view.stages.append(entry)
    devices = {s["device"] for s in view.stages if s["device"] is not None}
    view.reserved_devices = int(_first(status.get("reserved_devices"), len(devices) or len(view.stages)))

    queue = status.get("queue")
    if isinstance(queue, dict):
        view.waiting = int(_first(queue.get("waiting"), 0))
        view.running = int(_first(queue.get("running"), 0))
    else:
        view.waiting = int(_first(queue, status.get("waiting"), 0))
        view.running = int(_first(status.get("running"), 0))

    used, total = _kv_totals(kv, view.stages)
    view.kv_blocks_used, view.kv_blocks_total = used, total
    usage = kv.get("usage") if isinstance(kv, dict) else None
    view.kv_usage = float(usage) if usage is not None else (used / total if total else 0.0)

    reshapes = _first(status.get("reshapes"), status.get("recent_reshapes"), [])
    view.reshapes = [_reshape(r) for r in reshapes if isinstance(r, dict)]
    counts = status.get("reshape_stats") or {}
    view.reshapes_total = int(_first(status.get("reshapes_total"), counts.get("count"), len(view.reshapes)))
    view.pause_total_s = float(_first(status.get("pause_total_s"), counts.get("pause_total_s"),
                                      sum(r["pause_s"] or 0.0 for r in view.reshapes)))
    if view.reshapes:
        view.last_pause_s = view.reshapes[-1]["pause_s"]
    view.decisions = [d for d in _first(status.get("decisions"), status.get("recent_decisions"), [])
                      if isinstance(d, dict)]
    return view


def _kv_totals(kv: Any, stages: list[dict[str, Any]]) -> tuple[int, int]:
    """Blocks used and in the pool of the fullest stage (a request needs room on every stage)."""
    if isinstance(kv, dict) and kv.get("blocks_total") is not None:
        return int(kv.get("blocks_used") or 0), int(kv["blocks_total"])
    best = (0, 0)
    for s in stages:
        used, cap = s.get("kv_used"), s.get("kv_capacity")
        if used is None or not cap:
            continue
        if not best[1] or used / cap > best[0] / best[1]:
            best = (int(used), int(cap))
    return best


def _reshape(r: dict[str, Any]) -> dict[str, Any]:
    pause = _first(r.get("pause_s"), r.get("pause"), _ms(r.get("pause_ms")))
    out = dict(r)
    out["pause_s"] = float(pause) if pause is not None else None
    return out


def _ms(value: Any) -> float | None:
    return None if value is None else float(value) / 1000.0


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

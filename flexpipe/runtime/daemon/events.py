"""The daemons' structured logs: one line per event, key=value or JSON."""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from typing import Any

log = logging.getLogger("flexpipe.daemon")


# --- structured logs ---------------------------------------------------------------------------------
def _kv(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, separators=(",", ":"), default=str)
    return s if s and not any(c in s for c in ' "=\n') else json.dumps(s)


class EventFormatter(logging.Formatter):
    """One line per record: ts=... level=... logger=... event=... key=value (or one JSON object)."""

    def __init__(self, fmt: str = "kv", static: dict[str, Any] | None = None):
        super().__init__()
        self.json = fmt == "json"
        self.static = dict(static or {})   # fields of every line after pid (a stage process: its actor's name)

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        out: dict[str, Any] = {"ts": ts.isoformat(timespec="milliseconds"), "level": record.levelname.lower(),
                               "logger": record.name, "pid": record.process, **self.static}
        event = getattr(record, "event", None)
        if event is not None:
            out["event"] = event
            out.update(getattr(record, "fields", {}))
        else:
            out["event"] = "log"
            out["msg"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if self.json:
            return json.dumps(out, default=str)
        return " ".join(f"{k}={_kv(v)}" for k, v in out.items())


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured event."""
    log.log(level, name, extra={"event": name, "fields": fields})


def configure_logging(fmt: str = "kv") -> None:
    """Every log record becomes one structured line on stderr; daemon events at INFO always show.

    The processes this one starts (a worker's stages, which write to its stderr) log in the same
    format: they read it from the environment they inherit (runtime/launcher.py, LOG_FORMAT_ENV)."""
    from flexpipe.runtime.launcher import LOG_FORMAT_ENV

    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
        root.setLevel(logging.WARNING)
    for h in root.handlers:
        h.setFormatter(EventFormatter(fmt))
    log.setLevel(logging.INFO)
    os.environ[LOG_FORMAT_ENV] = fmt

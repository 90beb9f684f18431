"""The actor runtime: messages and their codec, actors, the launcher.

Public names are imported lazily so that `import flexpipe.runtime.cache` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "message": "messages", "kind_of": "messages", "message_class": "messages",
    "KIND_RANGES": "messages", "ActorRef": "messages", "Started": "messages", "Ping": "messages",
    "Pong": "messages", "Terminated": "messages", "ErrorReply": "messages", "Stop": "messages",
    "Watch": "messages", "Unwatch": "messages",
    "encode": "codec", "decode": "codec", "PROTOCOL_VERSION": "codec",
    "ActorSettings": "actor", "handles": "actor", "ActorContext": "actor",
    "LocalContext": "actor", "Actor": "actor",
    "ActorSystem": "launcher", "ActorHandle": "launcher", "ActorSpec": "launcher",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flexpipe.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(f"flexpipe.runtime.{module}"), name)

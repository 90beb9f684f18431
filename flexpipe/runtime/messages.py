"""Message classes: the kind registry, the `@message` decorator, and the runtime's own messages.

Every message on the wire is a slotted dataclass registered under a small integer *kind*. The kind
travels in the frame header (see `codec.py`) so that dispatch never inspects the body.

Defining a message in another layer (its own module, its own kind range)::

    from flexpipe.runtime.messages import message

    @message(101)
    class StepInput:
        epoch: int
        step: int
        seq_ids: list[int]
        hidden: torch.Tensor | None = None   # tensors may be fields, or travel beside the message

Kind ranges, one block per module, so that layers built in parallel never collide (the registry
raises `ConfigError` on a duplicate kind or a kind outside 1..65535):

    runtime (this module)      1 -  99      router / stage            100 - 199
    cache manager            200 - 249      allocator                 250 - 299
    control / controller     300 - 399      transports (GPU)          400 - 449
    tests and benchmarks   60000 - 65535

Field values may be None, bool, int, float, str, bytes, lists, tuples (they arrive as lists),
dicts, other registered messages (nested), torch tensors and numpy arrays. Kind 0 is reserved: it
marks a plain value (used for replies such as `True` or a dict) rather than a registered message.
"""

from __future__ import annotations

import dataclasses
import operator
import sys
from typing import Any, Callable, TypeVar, dataclass_transform

from flexpipe.errors import ConfigError

__all__ = [
    "KIND_RANGES", "message", "kind_of", "message_class", "ActorRef", "Started", "Ping", "Pong",
    "Terminated", "ErrorReply", "Stop", "Watch", "Unwatch",
]

KIND_RANGES: dict[str, range] = {
    "runtime": range(1, 100),
    "router/stage": range(100, 200),
    "cache": range(200, 250),
    "allocator": range(250, 300),
    "control": range(300, 400),
    "transports (cuda_ipc, nccl)": range(400, 450),
    "tests": range(60000, 65536),
}

MAX_KIND = 0xFFFF
_T = TypeVar("_T")
_BY_KIND: dict[int, type] = {}
_KIND_OF: dict[type, int] = {}
# cls -> function returning the field values of an instance as a list, in declaration order
_FIELDS_OF: dict[type, Callable[[Any], list]] = {}
_NFIELDS: dict[type, int] = {}
_NREQUIRED: dict[type, int] = {}   # fields without a default: a peer built before later ones sends these


def _field_getter(names: tuple[str, ...]) -> Callable[[Any], list]:
    if not names:
        return lambda obj: []
    if len(names) == 1:
        name = names[0]
        return lambda obj: [getattr(obj, name)]
    get = operator.attrgetter(*names)
    return lambda obj: list(get(obj))


@dataclass_transform()
def message(kind: int, *, frozen: bool = False) -> Callable[[type[_T]], type[_T]]:
    """Register a class as a wire message under `kind`, making it a slotted dataclass."""
    if not isinstance(kind, int) or not 1 <= kind <= MAX_KIND:
        raise ConfigError(f"message kind must be an int in 1..{MAX_KIND}, got {kind!r}")

    def register(cls: type[_T]) -> type[_T]:
        other = _BY_KIND.get(kind)
        if other is not None and not _same_definition(cls, other):
            raise ConfigError(
                f"message kind {kind} of {cls.__module__}.{cls.__qualname__} is already taken by "
                f"{other.__module__}.{other.__qualname__}; pick a free kind in your module's range")
        if not dataclasses.is_dataclass(cls):
            cls = dataclasses.dataclass(slots=True, frozen=frozen)(cls)
        names = tuple(f.name for f in dataclasses.fields(cls))
        _BY_KIND[kind] = cls
        _KIND_OF[cls] = kind
        _FIELDS_OF[cls] = _field_getter(names)
        _NFIELDS[cls] = len(names)
        _NREQUIRED[cls] = sum(1 for f in dataclasses.fields(cls)
                              if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        return cls

    return register


def _same_definition(cls: type, other: type) -> bool:
    # A script run as __main__ and imported again by name (as multiprocessing's spawn does)
    # defines its classes twice: that is one definition, and the newest class wins on decode.
    def source(c: type) -> str | None:
        return getattr(sys.modules.get(c.__module__), "__file__", None)
    return cls.__qualname__ == other.__qualname__ and source(cls) is not None \
        and source(cls) == source(other)


def kind_of(cls: type) -> int:
    """The kind a message class was registered under (0 when it is not a registered message)."""
    return _KIND_OF.get(cls, 0)


def message_class(kind: int) -> type | None:
    """The message class registered under `kind`, or None."""
    return _BY_KIND.get(kind)


# --- the runtime's own messages (kinds 1-99) ----------------------------------------------------

@message(1, frozen=True)
class ActorRef:
    """Address of an actor: a name for logs and the endpoint its mailbox (ROUTER socket) binds."""
    name: str
    endpoint: str

    def __str__(self) -> str:
        return f"{self.name}@{self.endpoint}"


@message(2)
class Started:
    """A launched actor is serving (or failed to start, when `error` is set); sent to its starter."""
    ref: ActorRef
    pid: int
    token: str = ""
    error: str = ""


@message(3)
class Ping:
    """Heartbeat probe; answered with Pong by the mailbox loop even while a handler runs."""
    seq: int = 0


@message(4)
class Pong:
    """Heartbeat answer."""
    seq: int = 0


@message(5)
class Terminated:
    """Delivered to watchers of `ref` when it stopped, died, or stopped answering heartbeats."""
    ref: ActorRef
    reason: str


@message(6)
class ErrorReply:
    """Reply to an ask that failed: the remote error type name and message."""
    kind: str
    message: str


@message(7)
class Stop:
    """Ask an actor to stop cleanly (runs on_stop, tells watchers, closes its sockets)."""
    reason: str = "stop requested"


@message(8)
class Watch:
    """Sent by `watcher` so that the watched actor tells it Terminated when it stops cleanly."""
    watcher: ActorRef


@message(9)
class Unwatch:
    """Cancels a Watch."""
    watcher: ActorRef

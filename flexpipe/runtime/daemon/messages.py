"""The worker protocol: the messages between the router daemon and its workers (kinds 300-329)."""

from __future__ import annotations

from dataclasses import field

from flexpipe.runtime.actor import ActorSettings
from flexpipe.runtime.messages import ActorRef, message


# --- the worker protocol (kinds 300-329) -----------------------------------------------------------
@message(300)
class JoinCluster:
    """A worker joins: its devices (a cluster description) and the torch device of each local index."""
    worker: str
    ref: ActorRef
    host: str
    pid: int
    cluster: dict
    torch_devices: dict  # local device index (as str) -> "cpu" | "cuda:N"
    stages: list = field(default_factory=list)   # names of the stages it runs now (when it joins again)


@message(301)
class JoinReply:
    """The router accepted the worker; the device ids it knows them by."""
    router_pid: int
    model: str
    device_ids: list
    frontend: ActorRef | None = None   # the router's own ref: the one sender of StartStage, StopStage, KillStage
    stop: list = field(default_factory=list)   # stages it listed that the router does not know: stop them


@message(302)
class LeaveCluster:
    """A worker is leaving (its stages are stopped)."""
    worker: str
    reason: str = ""


@message(303)
class StartStage:
    """Start behaviour `target(**kwargs)` as a process named `name` (reply: StageStarted)."""
    name: str
    target: str
    kwargs: dict
    settings: ActorSettings
    timeout: float


@message(304)
class StageStarted:
    """A stage process is serving at `ref`."""
    name: str
    ref: ActorRef
    pid: int


@message(305)
class StopStage:
    """Stop stage `name` cleanly (killed after `timeout`); reply True."""
    name: str
    timeout: float = 5.0


@message(306)
class KillStage:
    """SIGKILL stage `name`."""
    name: str


@message(307)
class StageExited:
    """A stage process exited without being asked to (worker -> router)."""
    worker: str
    name: str
    ref: ActorRef
    reason: str


@message(308)
class DeviceUsage:
    """What the memory of a worker's devices is used by, every --usage-interval seconds (worker -> router).

    Per device id: `used`, bytes every process uses; `ours`, bytes this worker's own processes use
    (None where NVML cannot attribute memory to them: no per-process figures, or a live stage's pid
    missing from NVML's list; the router counts what it reserved there instead); `withheld`, bytes this
    worker does not offer (a GPU's memory beyond --memory); `stages`, stage name -> bytes that stage's
    processes use, for each live stage of a device where `ours` is known (part of `ours`).  The router
    books max(others_use(used, ours, what it reserved there, per stage), withheld) as other tenants'
    (`ReportUsage`; the rule: runtime/inventory.py others_use), so placement sees their memory change.

    `stages` came last, with a default: a worker built before it sends four fields, which the router
    takes (stages empty) and books by each device's totals, as it did for that worker before.
    """
    worker: str
    used: dict
    ours: dict
    withheld: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)   # device id -> {stage name: bytes}

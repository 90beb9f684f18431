"""AllocatorActor: the live GPU inventory, reservations, and placement decisions.

`AllocatorCore` is the logic with no transport (tests and the simulator call it directly);
`AllocatorBehaviour` puts it behind the actor runtime's messages (kinds 250-299).

Memory accounting per GPU: free = total - used by others - reserved by us.  Workers announce their
GPUs (a cluster description, the same format as the JSON files) and may later report how much other
tenants use; reservations are ours and only change through this actor.

Concurrency: a placement decision takes milliseconds, so the actor makes it off the event loop
(`plan` on a snapshot, in a worker thread) and then commits it on the loop (`commit`), which checks
the plan against the current free memory under a lock and re-plans when another request took the
memory meanwhile.  Every change to the books goes through `_take`/`_give` under that lock, so two
requests can never book the same bytes.

Reshapes: the runtime keeps the old stages serving until the switch (DESIGN.md, reconfiguration), so
a split or merge books the union of the old and the new placement (`union_amounts`) and the owner
ends it with `commit_reshape` once the switch is done (the old side is given back) or `abort_reshape`
when the old shape serves on (the new side is given back).

GPUs that leave (a worker withdraws, or announces again without them) take the reservations on them:
a reservation is lost when the shape it serves needs one of them.  A reshape whose new side only was
there aborts itself instead (the old shape, which never used those GPUs, serves on and keeps its
memory): `aborted` says why until the owner's `abort_reshape` acknowledges it, and `lost` says why a
reservation went, for the owner's later `release`.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from flexpipe.errors import PlacementError, TopologyError
from flexpipe.placement.placer import FlexPlacer, Placement, ReplicaRequest
from flexpipe.placement.topology import GiB, Node, Topology, as_number
from flexpipe.runtime.actor import handles
from flexpipe.runtime.messages import ActorRef, Terminated, message

__all__ = ["AllocatorCore", "AllocatorBehaviour", "Reservation", "Plan", "Conflict", "AnnounceGpus",
           "WithdrawWorker", "ReportUsage", "PlaceReplica", "ReserveMemory", "ReleaseReservation",
           "SplitStage", "MergeStages", "CommitReshape", "AbortReshape", "InventoryQuery", "Granted",
           "union_amounts"]


class Conflict(PlacementError):
    """A plan no longer fits: another request took the memory after the plan was made."""


@dataclass
class Reservation:
    """Memory held for one owner (a replica, usually), per GPU id, and the placement it implements.

    During a split or merge, `placement` is the new shape being prepared, `old_placement` the one still
    serving, and `amounts` holds both (`union_amounts`) until `commit_reshape` or `abort_reshape`.
    """

    id: str
    owner: str
    amounts: dict[str, int]
    placement: Placement | None = None
    old_placement: Placement | None = None  # the shape serving until the reshape ends (None: no reshape)
    old_amounts: dict[str, int] = field(default_factory=dict)  # what it held before the reshape began


def union_amounts(old: Placement, new: Placement, req: ReplicaRequest) -> dict[str, int]:
    """Bytes per GPU id while a replica goes from `old` to `new`: both serve or load until the switch.

    A new stage on a GPU where an old stage with units in common runs is that stage actor kept in place
    (controller.py matches them so): it loads the units it lacks beside the ones it holds and drops the
    others only at the switch, so it holds its old bytes plus those of the units it gains.  Any other new
    stage is a new process beside whatever runs on its GPU.  Each GPU holds at least what `old` and `new`
    each book there, so committing or aborting only ever gives memory back.
    """
    out = dict(old.reservations())
    held = {s.gpu: s for s in old.stages}
    for s in new.stages:
        o = held.get(s.gpu)
        if o is not None and min(o.end, s.end) > max(o.start, s.start):
            gained = req.stage_bytes(min(o.start, s.start), max(o.end, s.end)) - req.stage_bytes(o.start, o.end)
            out[s.gpu] = max(o.mem_bytes + gained, s.mem_bytes)
        else:
            out[s.gpu] = out.get(s.gpu, 0) + s.mem_bytes
    return out


@dataclass
class Plan:
    """A placement decided on a snapshot; `version` is the inventory version it saw."""

    placement: Placement
    version: int
    amounts: dict[str, int] = field(default_factory=dict)


class AllocatorCore:
    """Inventory and reservations of GPU memory, and placement decisions on them (no transport)."""

    def __init__(self, topology: Topology | None = None, placer: Any = None, worker: str = "static"):
        """Start from `topology` (its free memory is what other tenants leave), owned by `worker`."""
        self.topo = topology.copy() if topology is not None else Topology([], name="inventory")
        self.placer = placer or FlexPlacer()
        self.reservations: dict[str, Reservation] = {}
        self.reserved: dict[str, int] = {}  # GPU id -> bytes we hold there
        self.external: dict[str, int] = {g.id: int(g.memory_bytes - f)
                                         for g, f in zip(self.topo.gpus, self.topo.free)}
        self.workers: dict[str, list[str]] = {}  # worker -> node names it announced
        if topology is not None:
            self.workers[worker] = [nd.name for nd in topology.nodes]
        self.version = 0
        self.conflicts = 0
        # reservation id -> why: reshapes rolled back because their new side's GPUs left (until the owner's
        # abort_reshape), and reservations dropped with the GPUs they used (the latest LOST_KEPT)
        self.aborted: dict[str, str] = {}
        self.lost: dict[str, str] = {}
        self._ids = itertools.count(1)
        self._lock = threading.RLock()

    LOST_KEPT = 1024  # reasons kept for dropped reservations (the oldest are forgotten first)

    # --- inventory -----------------------------------------------------------------------------
    def announce(self, worker: str, cluster: Topology | Mapping[str, Any]) -> list[str]:
        """A worker's GPUs join (or replace its earlier announcement); returns their ids.

        Each GPU's free memory at announce time is what other tenants leave us.  GPUs of its earlier
        announcement that this one lacks (one fewer GPU, a renamed node) leave as `withdraw` has them
        leave: the reservations they break are dropped (their ids in `lost`) or, for a reshape whose
        new side only was there, rolled back (in `aborted`).  The ids returned stay the GPU ids: that
        is the worker's device list for the router.
        """
        topo = cluster if isinstance(cluster, Topology) else Topology.from_dict(cluster)
        with self._lock:
            names = {nd.name for nd in topo.nodes}
            others = {n for w, ns in self.workers.items() if w != worker for n in ns}
            if names & others:
                raise TopologyError(f"worker {worker} announces nodes already owned by another worker: "
                                    f"{sorted(names & others)}")
            old = set(self.workers.get(worker, []))
            now = {g.id for g in topo.gpus}
            gone = {g for g in {*self.external, *self.topo.index} if _node_of(g) in old and g not in now}
            self._leave(gone, f"worker {worker} announced again without GPU(s) {', '.join(sorted(gone))}")
            keep = [nd for nd in self.topo.nodes if nd.name not in old and nd.name not in names]
            for g, f in zip(topo.gpus, topo.free):
                self.external[g.id] = int(g.memory_bytes - f)
            self.workers[worker] = sorted(names)
            self._rebuild(keep + list(topo.nodes), topo.links)
            return [g.id for g in topo.gpus]

    def withdraw(self, worker: str) -> list[str]:
        """A worker left (or died): its GPUs go, and so do the reservations that used them (returned).

        A split or merge whose new shape only used them is not lost: it is rolled back to the old shape,
        which serves on and keeps its memory booked (listed in `aborted`, not returned).
        """
        with self._lock:
            gone = set(self.workers.pop(worker, []))
            if not gone:
                return []
            gpus = {g for g in {*self.external, *self.topo.index} if _node_of(g) in gone}
            lost = self._leave(gpus, f"worker {worker} left")
            self._rebuild([nd for nd in self.topo.nodes if nd.name not in gone], {})
            return lost

    def _leave(self, gone: set[str], why: str) -> list[str]:
        """GPUs `gone` leave the books (the caller rebuilds the topology); returns the reservations lost.

        A reservation is lost when the shape that serves needs one of them: with no reshape under way,
        any GPU it holds; during one, a GPU of the old shape (the new one has not served yet).  If only
        the new side's GPUs left, the reshape is aborted: the reservation goes back to its old amounts.
        """
        if not gone:
            return []
        lost = []
        for r in list(self.reservations.values()):
            if not gone & r.amounts.keys():
                continue
            if r.old_placement is not None and not gone & r.old_amounts.keys():
                self.aborted[r.id] = (f"{why}, taking GPU(s) {', '.join(sorted(gone & r.amounts.keys()))} of the "
                                      f"new shape only; the old shape serves on")
                self._shrink(r, r.old_amounts)
                r.placement, r.old_placement, r.old_amounts = r.old_placement, None, {}
                continue
            self._give(self.reservations.pop(r.id).amounts)
            self.aborted.pop(r.id, None)
            self.lost[r.id] = why
            lost.append(r.id)
        while len(self.lost) > self.LOST_KEPT:
            del self.lost[next(iter(self.lost))]
        for gid in gone:
            self.external.pop(gid, None)
            self.reserved.pop(gid, None)
        return lost

    def report(self, external_used: Mapping[str, int]) -> None:
        """Memory used by other tenants, per GPU id (our reservations excluded); all or nothing.

        TopologyError for a GPU not in the inventory or a figure that is not a byte count >= 0 (a
        negative one would make free memory exceed the GPU's and let reservations overbook it).
        """
        with self._lock:
            figures = {}
            for gid, used in external_used.items():
                i = self.topo.gpu_index(gid)
                if not _is_bytes(used):
                    raise TopologyError(f"usage report for GPU {gid}: {used!r} is not a byte count; report the "
                                        f"bytes other tenants use there as a number >= 0")
                figures[gid] = (i, int(used))
            for gid, (i, used) in figures.items():
                self.external[gid] = used
                self.topo.free[i] = self._free_of(gid, int(self.topo.total[i]))
            self.version += 1

    def _free_of(self, gid: str, total: int) -> int:
        return max(0, total - self.external.get(gid, 0) - self.reserved.get(gid, 0))

    def _rebuild(self, nodes: list[Node], links: Mapping) -> None:
        merged = dict(self.topo.links)
        merged.update(links)
        t = Topology(nodes, merged, name=self.topo.name)
        t.free = np.asarray([self._free_of(g.id, g.memory_bytes) for g in t.gpus], dtype=np.int64)
        busy = dict(zip((g.id for g in self.topo.gpus), self.topo.busy))
        t.busy = np.asarray([busy.get(g.id, 0.0) for g in t.gpus], dtype=np.float64)
        self.topo = t
        self.version += 1

    # --- the books ---------------------------------------------------------------------------------
    def _missing(self, gpus: Any) -> None:
        """Conflict if any of these GPU ids left the inventory (a plan or reshape made before it left)."""
        gone = sorted(g for g in gpus if g not in self.topo.index)
        if gone:
            raise Conflict(f"GPU(s) {', '.join(gone)} left the inventory (their worker withdrew) after the plan "
                           f"was made: plan again")

    def _take(self, amounts: Mapping[str, int]) -> None:
        """Book memory on several GPUs, all or nothing (caller holds the lock)."""
        idx = {g: self.topo.gpu_index(g) for g in amounts}
        for g, b in amounts.items():
            if b > self.topo.free[idx[g]]:
                raise Conflict(f"GPU {g}: {b / GiB:.2f} GiB asked, {self.topo.free[idx[g]] / GiB:.2f} GiB free")
        for g, b in amounts.items():
            self.topo.free[idx[g]] -= b
            self.reserved[g] = self.reserved.get(g, 0) + b
        self.version += 1

    def _give(self, amounts: Mapping[str, int]) -> None:
        for g, b in amounts.items():
            self.reserved[g] = self.reserved.get(g, 0) - b
            if g in self.topo.index:
                i = self.topo.index[g]
                self.topo.free[i] = self._free_of(g, int(self.topo.total[i]))
        self.version += 1

    def _grant(self, owner: str, amounts: dict[str, int], placement: Placement | None) -> Reservation:
        self._take(amounts)
        r = Reservation(f"r{next(self._ids)}", owner, amounts, placement)
        self.reservations[r.id] = r
        return r

    def reserve(self, amounts: Mapping[str, int], owner: str = "", placement: Placement | None = None) -> Reservation:
        """Reserve given bytes per GPU id, all or nothing (Conflict names the GPU short of memory).

        Zero amounts are left out; a negative one is a PlacementError (it would add free memory).
        """
        bad = {g: b for g, b in amounts.items() if not _is_bytes(b)}
        if bad:
            raise PlacementError(f"cannot reserve {bad}: give each GPU's bytes as a number >= 0")
        amounts = {str(g): int(b) for g, b in amounts.items() if int(b) > 0}
        with self._lock:
            return self._grant(owner, amounts, placement)

    def release(self, rid: str) -> dict[str, int]:
        """Give a reservation back; returns what it held."""
        with self._lock:
            r = self.reservations.pop(rid, None)
            if r is None:
                why = f" (dropped: {self.lost[rid]})" if rid in self.lost else ""
                raise PlacementError(f"no reservation {rid!r}{why}")
            self.aborted.pop(rid, None)
            self._give(r.amounts)
            return r.amounts

    # --- decisions ----------------------------------------------------------------------------------
    def snapshot(self) -> tuple[Topology, int]:
        """A copy of the current state and its version (for planning off the lock)."""
        with self._lock:
            return self.topo.copy(), self.version

    def plan(self, req: ReplicaRequest) -> Plan:
        """Decide a placement on a snapshot (safe to run in a worker thread); nothing is booked."""
        topo, version = self.snapshot()
        p = self.placer.place(req, topo)
        return Plan(p, version, p.reservations())

    def commit(self, plan: Plan, owner: str = "") -> Reservation:
        """Book a plan; Conflict when the memory (or a GPU) it counted on is gone: plan again."""
        with self._lock:
            if plan.version != self.version:
                self.conflicts += 1  # the state moved on; the plan stands only if it still fits
            self._missing(plan.amounts)
            return self._grant(owner, dict(plan.amounts), plan.placement)

    def place(self, req: ReplicaRequest, owner: str = "") -> Reservation:
        """Decide and book in one step (under the lock: callers on one thread never conflict)."""
        with self._lock:
            return self.commit(self.plan(req), owner)

    def split(self, rid: str, stage: int, req: ReplicaRequest) -> Reservation:
        """Split one stage of a reserved replica: books the new shape beside the old one (updated in
        place; `placement` is the new shape) until `commit_reshape` or `abort_reshape`."""
        with self._lock:
            r = self._placed(rid, reshaping=False)
            assert r.placement is not None
            new = self.placer.split(r.placement, stage, req, self.topo)
            self.aborted.pop(rid, None)
            return self._reshape(r, new, req)

    def merge(self, rid: str, req: ReplicaRequest, stages: int | None = None) -> tuple[Reservation, list[str]]:
        """Merge stages of a reserved replica, booked as `split` is; returns the reservation and the GPUs
        that `commit_reshape` will free (they serve until the switch)."""
        with self._lock:
            r = self._placed(rid, reshaping=False)
            assert r.placement is not None
            new, freed = self.placer.merge(r.placement, req, self.topo, stages)
            self.aborted.pop(rid, None)
            return self._reshape(r, new, req), freed

    def commit_reshape(self, rid: str) -> tuple[Reservation, list[str]]:
        """The switch to the new shape is done: give back what only the old one held; returns the
        reservation and the GPUs it no longer holds anything on."""
        with self._lock:
            r = self._placed(rid, reshaping=True)
            assert r.placement is not None
            freed = self._shrink(r, r.placement.reservations())
            r.old_placement, r.old_amounts = None, {}
            return r, freed

    def abort_reshape(self, rid: str) -> Reservation:
        """The reshape was abandoned and the old shape serves on: give back what only the new one held.

        A reshape already rolled back because its new side's GPUs left (`aborted`) is acknowledged: the
        reservation, back in its old shape, is returned as it stands.
        """
        with self._lock:
            if rid in self.aborted and rid in self.reservations:
                del self.aborted[rid]
                return self.reservations[rid]
            r = self._placed(rid, reshaping=True)
            self._shrink(r, r.old_amounts)
            r.placement, r.old_placement, r.old_amounts = r.old_placement, None, {}
            return r

    def _placed(self, rid: str, reshaping: bool) -> Reservation:
        """The placed reservation `rid`, with a reshape under way or not as `reshaping` says."""
        r = self.reservations.get(rid)
        if r is None or r.placement is None:
            why = f" (dropped: {self.lost[rid]})" if r is None and rid in self.lost else ""
            raise PlacementError(f"no placed replica under reservation {rid!r}{why}")
        if reshaping and r.old_placement is None and rid in self.aborted:
            raise PlacementError(f"the reshape of reservation {rid!r} was aborted: {self.aborted[rid]} "
                                 f"(abort_reshape acknowledges it)")
        if reshaping and r.old_placement is None:
            raise PlacementError(f"no reshape under way for reservation {rid!r} (split or merge starts one)")
        if not reshaping and r.old_placement is not None:
            raise PlacementError(f"reservation {rid!r} is being reshaped: commit_reshape (after the switch) or "
                                 f"abort_reshape it before reshaping it again")
        return r

    def _reshape(self, r: Reservation, new: Placement, req: ReplicaRequest) -> Reservation:
        """Book the union of r's placement and `new` (Conflict, and the books unchanged, if it does not fit)."""
        assert r.placement is not None
        hold = union_amounts(r.placement, new, req)
        hold = {g: max(b, r.amounts.get(g, 0)) for g, b in {**r.amounts, **hold}.items()}
        self._take({g: b - r.amounts.get(g, 0) for g, b in hold.items() if b > r.amounts.get(g, 0)})
        r.old_amounts, r.amounts = r.amounts, hold
        r.old_placement, r.placement = r.placement, new
        return r

    def _shrink(self, r: Reservation, keep: Mapping[str, int]) -> list[str]:
        """Give back what `r` holds beyond `keep` (bytes per GPU, never more than it holds); returns the
        GPUs it no longer holds anything on."""
        self._give({g: b - keep.get(g, 0) for g, b in r.amounts.items() if b > keep.get(g, 0)})
        gone = [g for g in r.amounts if not keep.get(g, 0)]
        r.amounts = {g: b for g, b in keep.items() if b > 0}
        return gone

    def check(self) -> None:
        """Assert the books balance: free + reserved + external = total, nothing negative (tests)."""
        with self._lock:
            held: dict[str, int] = {}
            for r in self.reservations.values():
                for g, b in r.amounts.items():
                    held[g] = held.get(g, 0) + b
            for i, g in enumerate(self.topo.gpus):
                if held.get(g.id, 0) != self.reserved.get(g.id, 0):
                    raise AssertionError(f"{g.id}: reservations hold {held.get(g.id, 0)}, books say "
                                         f"{self.reserved.get(g.id, 0)}")
                if self.topo.free[i] < 0 or self.reserved.get(g.id, 0) + self.external.get(g.id, 0) > g.memory_bytes:
                    raise AssertionError(f"{g.id} is oversubscribed")

    def status(self) -> dict[str, Any]:
        """Inventory figures for /status and the CLI."""
        with self._lock:
            s = self.topo.stats()
            s.update(reservations=len(self.reservations), reserved_bytes=sum(self.reserved.values()),
                     workers=sorted(self.workers), version=self.version, conflicts=self.conflicts)
            return s


def _node_of(gid: str) -> str:
    return gid.rsplit("/", 1)[0]


def _is_bytes(x: Any) -> bool:
    """A byte count: a finite number >= 0 (a float is cut to an integer), not a bool or text."""
    return not isinstance(x, (str, bytes)) and as_number(x, 0) is not None


# --- messages (kinds 250-299) ----------------------------------------------------------------------
@message(250)
class AnnounceGpus:
    """A worker's GPUs (a cluster description dict, as Topology.to_dict) join the inventory."""
    worker: str
    cluster: dict
    worker_ref: ActorRef | None = None  # watched: the worker's GPUs leave when it dies


@message(251)
class WithdrawWorker:
    """A worker's GPUs leave; the reply lists the reservation ids that were lost with them (a split or
    merge whose new side only was there is rolled back instead, not lost: AbortReshape acknowledges it,
    CommitReshape is refused)."""
    worker: str


@message(252)
class ReportUsage:
    """Memory used by other tenants, per GPU id."""
    external_used: dict


@message(253)
class PlaceReplica:
    """Place and reserve one replica (request: ReplicaRequest.to_dict()); the reply is Granted."""
    request: dict
    owner: str = ""


@message(254)
class ReserveMemory:
    """Reserve given bytes per GPU id, all or nothing; the reply is Granted."""
    amounts: dict
    owner: str = ""


@message(255)
class ReleaseReservation:
    """Give a reservation back; the reply is the amounts it held."""
    rid: str


@message(256)
class SplitStage:
    """Split one stage of a placed replica; the reply is Granted with the new placement, holding the old
    one beside it until CommitReshape or AbortReshape."""
    rid: str
    stage: int
    request: dict


@message(257)
class MergeStages:
    """Merge a placed replica's stages down to `stages` (0: one fewer); booked as SplitStage is, and
    Granted lists the GPUs that CommitReshape will free."""
    rid: str
    request: dict
    stages: int = 0


@message(260)
class CommitReshape:
    """The switch of a split or merge is done: give back what only the old shape held; the reply is
    Granted, listing the GPUs the reservation no longer holds anything on."""
    rid: str


@message(261)
class AbortReshape:
    """A split or merge was abandoned and the old shape serves on: give back what only the new shape
    held; the reply is Granted with the old placement (also when the allocator rolled it back already
    because the new side's GPUs left)."""
    rid: str


@message(258)
class InventoryQuery:
    """Ask for the inventory figures (reply: a dict); with `full`, also the cluster description."""
    full: bool = False


@message(259)
class Granted:
    """A reservation as it now stands."""
    rid: str
    owner: str
    amounts: dict
    placement: dict | None = None
    freed: list = field(default_factory=list)
    old_placement: dict | None = None  # during a split or merge: the shape serving until it ends

    def to_placement(self) -> Placement | None:
        return None if self.placement is None else Placement.from_dict(self.placement)


def _granted(r: Reservation, freed: list[str] | None = None) -> Granted:
    return Granted(r.id, r.owner, dict(r.amounts), r.placement.to_dict() if r.placement else None, list(freed or []),
                   r.old_placement.to_dict() if r.old_placement else None)


class AllocatorBehaviour:
    """The AllocatorActor's behaviour: AllocatorCore behind messages.

    cluster: a description (dict, or a path/name for load_cluster) to start with, e.g. in the
    simulator or a static deployment; workers may announce more.
    """

    def __init__(self, cluster: dict | str | None = None, max_retries: int = 8):
        from flexpipe.placement.topology import load_cluster

        topo = None
        if isinstance(cluster, dict):
            topo = Topology.from_dict(cluster)
        elif cluster:
            topo = load_cluster(cluster)
        self.core = AllocatorCore(topo)
        self.max_retries = max_retries
        self._watched: dict[ActorRef, str] = {}

    @handles(AnnounceGpus)
    def announce(self, ctx: Any, msg: AnnounceGpus) -> list[str]:
        ids = self.core.announce(msg.worker, msg.cluster)
        if msg.worker_ref is not None:
            self._watched[msg.worker_ref] = msg.worker
            ctx.watch(msg.worker_ref)
        return ids

    @handles(WithdrawWorker)
    def withdraw(self, ctx: Any, msg: WithdrawWorker) -> list[str]:
        return self.core.withdraw(msg.worker)

    @handles(Terminated)
    def worker_died(self, ctx: Any, msg: Terminated) -> None:
        worker = self._watched.pop(msg.ref, None)
        if worker is not None:
            self.core.withdraw(worker)

    @handles(ReportUsage)
    def report(self, ctx: Any, msg: ReportUsage) -> None:
        self.core.report(msg.external_used)

    @handles(PlaceReplica, concurrent=True)
    async def place(self, ctx: Any, msg: PlaceReplica) -> Granted:
        req = ReplicaRequest.from_dict(msg.request)
        for _ in range(self.max_retries):
            plan = await ctx.run_compute(self.core.plan, req)  # off the loop: heartbeats keep flowing
            try:
                return _granted(self.core.commit(plan, msg.owner))
            except Conflict:
                continue  # someone took the memory meanwhile: decide again on the new state
        return _granted(self.core.place(req, msg.owner))  # last try decides and books under the lock

    @handles(ReserveMemory)
    def reserve(self, ctx: Any, msg: ReserveMemory) -> Granted:
        return _granted(self.core.reserve(msg.amounts, msg.owner))

    @handles(ReleaseReservation)
    def release(self, ctx: Any, msg: ReleaseReservation) -> dict:
        return self.core.release(msg.rid)

    @handles(SplitStage)
    def split(self, ctx: Any, msg: SplitStage) -> Granted:
        return _granted(self.core.split(msg.rid, msg.stage, ReplicaRequest.from_dict(msg.request)))

    @handles(MergeStages)
    def merge(self, ctx: Any, msg: MergeStages) -> Granted:
        r, freed = self.core.merge(msg.rid, ReplicaRequest.from_dict(msg.request), msg.stages or None)
        return _granted(r, freed)

    @handles(CommitReshape)
    def commit_reshape(self, ctx: Any, msg: CommitReshape) -> Granted:
        return _granted(*self.core.commit_reshape(msg.rid))

    @handles(AbortReshape)
    def abort_reshape(self, ctx: Any, msg: AbortReshape) -> Granted:
        return _granted(self.core.abort_reshape(msg.rid))

    @handles(InventoryQuery)
    def query(self, ctx: Any, msg: InventoryQuery) -> dict:
        out = self.core.status()
        if msg.full:
            out["cluster"] = self.core.snapshot()[0].to_dict()
        return out

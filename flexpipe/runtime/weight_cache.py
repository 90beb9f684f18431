"""Host-memory cache of the parameters of retired stages: bounded, least recently used out first.

When a reshape takes units off a stage process (a split hands half of a stage to a new one, a merge
or a scale to zero retires a stage), their tensors are sent here, and a later scale-up builds those
units from RAM instead of reading the checkpoint (or generating a preset) again: the host-memory
tier of the paper's split/merge ("evict surplus parameters to host memory; merge: load from the
host-memory cache").  A stage can get a unit's weights from three tiers, and the reshape records
which one it used (`ReshapeStats.weights_from`); `benchmarks/bench_autoscale.py` times each:
  cache   this process's RAM, sent to the stage over the actor transport
  peer    a running stage that holds the unit sends it (same transport)
  source  the stage reads the checkpoint from disk, or generates the preset's weights

`WeightCache` is a plain object keyed by (model, unit): a unit is cached whole (every tensor it
needs) or not at all, so a hit is always enough to build the unit.  Its bound is in bytes; a put
that goes over it evicts the least recently used units; a unit larger than the whole bound is not
kept.  Tensors are stored as given (no copy): callers hand over tensors nobody writes to any more,
such as those decoded from a message.  A tensor shared by two units (tied embedding and head) is
held once per unit in the byte count, which overstates the memory by that tensor.

`WeightCacheActor` is the cache's mailbox: a stage's `SendUnits(units, dest=<this actor>)` arrives
as `UnitTensors` messages (several for units larger than max_message_bytes, a tensor above it in
pieces: runtime/chunks.py) and each unit is stored once all its tensors have arrived.  Reads need no
message: the controller lives in the same process and sends cached tensors to a stage itself.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch

from flexpipe.errors import ConfigError, ProtocolError
from flexpipe.runtime.actor import ActorContext, handles
from flexpipe.runtime.chunks import Assembler
from flexpipe.runtime.stage import UnitTensors


@dataclass(slots=True)
class WeightCacheStats:
    """Counters of a WeightCache (hits and misses count units)."""

    capacity_bytes: int
    bytes: int = 0
    units: int = 0
    hits: int = 0
    misses: int = 0
    puts: int = 0
    evictions: int = 0
    rejected: int = 0  # units larger than the whole cache

    def to_dict(self) -> dict:
        return asdict(self)


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes held by a unit's tensors."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


class WeightCache:
    """Bounded LRU map (model, unit) -> {tensor name: tensor}."""

    def __init__(self, capacity_bytes: int):
        if capacity_bytes < 0:
            raise ConfigError(f"weight cache capacity must be >= 0 bytes, got {capacity_bytes}")
        self.capacity_bytes = int(capacity_bytes)
        self._entries: OrderedDict[tuple[str, int], tuple[dict[str, torch.Tensor], int]] = OrderedDict()
        self._stats = WeightCacheStats(self.capacity_bytes)

    # ---- writes ---------------------------------------------------------------------------------
    def put(self, model: str, unit: int, tensors: Mapping[str, torch.Tensor]) -> bool:
        """Keep a unit's tensors as the most recently used entry; False when it can never fit."""
        key = (model, int(unit))
        size = tensor_bytes(tensors)
        old = self._entries.pop(key, None)
        if old is not None:
            self._stats.bytes -= old[1]
        if size > self.capacity_bytes:
            self._stats.rejected += 1
            self._sync()
            return False
        self._entries[key] = (dict(tensors), size)
        self._stats.bytes += size
        self._stats.puts += 1
        while self._stats.bytes > self.capacity_bytes:
            _, (_, freed) = self._entries.popitem(last=False)
            self._stats.bytes -= freed
            self._stats.evictions += 1
        self._sync()
        return True

    def touch(self, model: str, units: Iterable[int]) -> None:
        """Mark cached units as just used (units not cached are ignored)."""
        for u in units:
            key = (model, int(u))
            if key in self._entries:
                self._entries.move_to_end(key)

    def drop(self, model: str | None = None) -> None:
        """Forget every unit (of one model, or of all)."""
        for key in [k for k in self._entries if model is None or k[0] == model]:
            self._stats.bytes -= self._entries.pop(key)[1]
        self._sync()

    # ---- reads ----------------------------------------------------------------------------------
    def holds(self, model: str, units: Iterable[int]) -> bool:
        """Whether every one of `units` is cached (does not count as a use)."""
        return all((model, int(u)) in self._entries for u in units)

    def get(self, model: str, unit: int) -> dict[str, torch.Tensor] | None:
        """A unit's tensors (and it becomes the most recently used), or None."""
        key = (model, int(unit))
        hit = self._entries.get(key)
        if hit is None:
            self._stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self._stats.hits += 1
        return dict(hit[0])

    def take(self, model: str, units: Sequence[int]) -> dict[str, torch.Tensor]:
        """The tensors of all `units`, merged by name (KeyError naming the units that are not cached)."""
        missing = [u for u in units if (model, int(u)) not in self._entries]
        if missing:
            self._stats.misses += len(missing)
            raise KeyError(f"units {missing} of {model} are not in the weight cache")
        out: dict[str, torch.Tensor] = {}
        for u in units:
            out.update(self.get(model, u))
        return out

    def keys(self) -> list[tuple[str, int]]:
        """Cached (model, unit) keys, least recently used first."""
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._stats.bytes

    def stats(self) -> WeightCacheStats:
        """A copy of the counters."""
        return WeightCacheStats(**asdict(self._stats))

    def _sync(self) -> None:
        self._stats.units = len(self._entries)


def unit_names(cfg: Any) -> list[frozenset[str]]:
    """For each unit of the model, the names of the tensors it is built from."""
    from flexpipe.model.units import _roles

    return [frozenset(name for name, _ in _roles(cfg, u).values()) for u in range(cfg.num_units)]


class WeightCacheActor:
    """Mailbox of a WeightCache for one model: stores what stages send with `SendUnits(..., dest=this)`.

    One copy may span several UnitTensors (`more` set on all but its last): tensors are gathered (split
    ones assembled) until a unit has all of its, and what is left when the copy ends (a unit only part
    of which was sent) is dropped.  Copies come one at a time (the controller evicts stage by stage)."""

    def __init__(self, cache: WeightCache, model: str, cfg: Any):
        self.cache, self.model = cache, model
        self.names = unit_names(cfg)
        self.by_name: dict[str, list[int]] = {}
        for u, names in enumerate(self.names):
            for n in names:
                self.by_name.setdefault(n, []).append(u)
        self.got: dict[str, torch.Tensor] = {}   # tensors of the copy under way
        self.pieces = Assembler()

    @handles(UnitTensors)
    def unit_tensors(self, ctx: ActorContext, msg: UnitTensors, *tensors: torch.Tensor) -> int:
        """Store every unit whose tensors all arrived; replies with the number of units stored."""
        parts = msg.parts if msg.parts is not None else [None] * len(tensors)
        if len(msg.names) != len(tensors) or len(parts) != len(tensors):
            raise ProtocolError(f"UnitTensors with {len(msg.names)} names and {len(parts)} parts for "
                                f"{len(tensors)} tensors")
        done = {}
        for name, part, t in zip(msg.names, parts, tensors):
            whole = self.pieces.add(name, part, t)
            if whole is not None:
                done[name] = whole
        self.got.update(done)
        units = sorted({u for n in done for u in self.by_name.get(n, ())})
        stored = 0
        for u in units:
            if self.names[u] <= self.got.keys():
                stored += self.cache.put(self.model, u, {n: self.got[n] for n in self.names[u]})
        if not msg.more:   # the copy is over
            self.got = {}
            self.pieces.clear()
        return stored


__all__ = ["WeightCache", "WeightCacheActor", "WeightCacheStats", "tensor_bytes", "unit_names"]

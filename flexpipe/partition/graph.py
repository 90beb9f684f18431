"""The unit graph of a model and the pipeline shapes cut from it.

A model is a chain of units (see docs/CONTRACTS.md): every cut between two units carries only the
residual stream, so any contiguous split is a valid pipeline.  Two constraints remain:
tied weights (the Head of a tied model holds its own copy of the embedding matrix, so the two may
live apart; the copy is counted in the Head's bytes) and KV ownership (KV blocks of attention unit i
live on the stage that holds unit i).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from flexpipe.errors import ConfigError, PartitionError
from flexpipe.model.units import UnitCost, unit_costs


# One unit of the chain with its costs: the model's own cost record serves the solver as it is.
UnitNode = UnitCost


@dataclass(frozen=True, slots=True)
class UnitGraph:
    """Units in order; stages are contiguous half-open ranges [start, end)."""

    units: tuple[UnitNode, ...]
    tied_embeddings: bool = False

    @classmethod
    def from_config(cls, cfg: Any, dtype_bytes: int = 2) -> "UnitGraph":
        """Build the graph of a ModelConfig from its per-unit costs."""

        nodes = tuple(unit_costs(cfg, dtype_bytes=dtype_bytes))
        return cls(nodes, tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)))

    def __len__(self) -> int:
        return len(self.units)

    def validate_range(self, start: int, end: int) -> None:
        """Raise PartitionError unless [start, end) is a non-empty range inside the chain."""
        if not (0 <= start < end <= len(self.units)):
            raise PartitionError(
                f"stage range [{start}, {end}) is not a non-empty range of units 0..{len(self.units)}"
            )


@dataclass(frozen=True, slots=True)
class StageSpec:
    """One stage of a pipeline: a unit range placed on a device."""

    start: int
    end: int
    device: str = "cpu"

    @property
    def units(self) -> range:
        return range(self.start, self.end)

    def to_dict(self) -> dict:
        return {"start": self.start, "end": self.end, "device": self.device}

    @classmethod
    def from_dict(cls, d: dict) -> "StageSpec":
        return cls(int(d["start"]), int(d["end"]), str(d.get("device", "cpu")))


@dataclass(frozen=True, slots=True)
class PipelineShape:
    """The pipeline's shape: its stages in order, stamped with a config epoch."""

    epoch: int
    stages: tuple[StageSpec, ...] = field(default_factory=tuple)

    @classmethod
    def from_boundaries(cls, boundaries: Sequence[int], epoch: int = 0,
                        devices: Sequence[str] | None = None) -> "PipelineShape":
        """Shape from cut points [0, b1, ..., num_units]."""
        b = list(boundaries)
        devs = list(devices) if devices is not None else ["cpu"] * (len(b) - 1)
        if len(devs) != len(b) - 1:
            raise PartitionError(f"{len(b) - 1} stages but {len(devs)} devices given")
        return cls(epoch, tuple(StageSpec(b[i], b[i + 1], devs[i]) for i in range(len(b) - 1)))

    @property
    def boundaries(self) -> list[int]:
        return [s.start for s in self.stages] + ([self.stages[-1].end] if self.stages else [])

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def validate(self, num_units: int) -> None:
        """Raise PartitionError unless the stages cover units 0..num_units contiguously once."""
        if not self.stages:
            raise PartitionError("a pipeline needs at least one stage")
        pos = 0
        for i, s in enumerate(self.stages):
            if s.start != pos or s.end <= s.start:
                raise PartitionError(
                    f"stage {i} covers [{s.start}, {s.end}) but must start at unit {pos} and be non-empty"
                )
            pos = s.end
        if pos != num_units:
            raise PartitionError(f"stages end at unit {pos}, the model has {num_units} units")

    def stage_of(self, unit: int) -> int:
        """Index of the stage that holds `unit`."""
        for i, s in enumerate(self.stages):
            if s.start <= unit < s.end:
                return i
        raise PartitionError(f"unit {unit} is in no stage of {self.boundaries}")

    def with_epoch(self, epoch: int) -> "PipelineShape":
        return PipelineShape(epoch, self.stages)

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "stages": [s.to_dict() for s in self.stages]}

    @classmethod
    def from_dict(cls, d: dict) -> "PipelineShape":
        return cls(int(d["epoch"]), tuple(StageSpec.from_dict(s) for s in d["stages"]))


def check_shape_numbers(stages: Any, boundaries: Any, num_units: int | None) -> None:
    """Refuse, with a ConfigError naming the argument, a stage count that is not a whole number from 1 to
    `num_units`, or boundaries that are not at least two whole unit indices from 0 to `num_units`.

    What every reshape and launch checks first (the embedded runtime and the router through plan_shape,
    a router's client before msgpack, which fails on an int past 64 bits, the HTTP endpoint for its 400):
    the solver sized tables by a stage count it had not compared with the units yet.  `num_units` None (an
    engine that does not tell it): no upper bound here, the engine checks its own."""
    n = num_units
    if stages is not None:
        if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
            most = f", at most the model's {n} units" if n is not None else ""
            raise ConfigError(f"stages must be a whole number >= 1{most} (got {_shown(stages)})")
        if n is not None and stages > n:
            raise ConfigError(f"{_shown(stages)} stages asked but the model has only {n} units: stages must "
                              f"be a whole number from 1 to {n}")
    if boundaries is None:
        return
    last = n if n is not None else "num_units"
    if isinstance(boundaries, (str, bytes)) or not isinstance(boundaries, Sequence) \
            or not all(isinstance(b, int) and not isinstance(b, bool) for b in boundaries):
        raise ConfigError(f"boundaries must be a list of whole unit indices [0, ..., {last}] "
                          f"(got {_shown(boundaries)})")
    bad = next((b for b in boundaries if b < 0 or (n is not None and b > n)), None)
    if bad is not None:
        of = f"from 0 to {n} (the model has {n} units)" if n is not None else ">= 0"
        raise ConfigError(f"boundaries must be unit indices {of}, got {_shown(bad)}")
    if len(boundaries) < 2:
        raise ConfigError(f"boundaries {_shown(boundaries)} name no stage: give the cut points "
                          f"[0, ..., {last}], at least two")


def _shown(x: Any) -> str:
    """`x` for an error message, short: an int of thousands of digits has no repr (nor a list holding one)."""
    if isinstance(x, int) and not isinstance(x, bool) and x.bit_length() > 128:
        return f"-2**{(-x).bit_length() - 1} or less" if x < 0 else f"2**{x.bit_length() - 1} or more"
    if isinstance(x, (list, tuple)):
        return f"[{', '.join(_shown(v) for v in x[:8])}{', ...' if len(x) > 8 else ''}]"
    return f"{x!r:.80}"

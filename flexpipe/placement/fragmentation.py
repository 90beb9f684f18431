"""How much free GPU memory a cluster state leaves unusable for the stages the workload needs.

In the spirit of fragmentation gradient descent (Weng et al., ATC'23): fragmentation is measured
against a workload mix, not in the abstract.  The mix is a distribution over stage sizes (bytes one
stage needs on one GPU, for the models and granularities being served).  For a stage of size s, a
GPU's free memory f is a fragment when f < s (the whole of f is useless to that stage) and none of it
is when f >= s.  A GPU's expected fragment is therefore f * P(s > f), and the cluster's fragmentation
is the sum over GPUs.  A placement is good for the future when it lowers that sum (filling a hole
exactly) or leaves holes that the mix can still use; it is bad when it leaves slivers.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np


@dataclass(frozen=True)
class WorkloadMix:
    """A distribution over stage sizes in bytes (weights need not be normalised)."""

    sizes: tuple[int, ...]
    weights: tuple[float, ...] = ()
    _tail: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _tail_np: np.ndarray = field(init=False, repr=False, compare=False)
    _sizes_np: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        sizes = [int(s) for s in self.sizes]
        weights = [float(w) for w in self.weights] if self.weights else [1.0] * len(sizes)
        if not sizes or len(weights) != len(sizes) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError("a workload mix needs sizes and as many non-negative weights, not all zero")
        order = sorted(range(len(sizes)), key=sizes.__getitem__)
        total = sum(weights)
        s = tuple(sizes[i] for i in order)
        w = tuple(weights[i] / total for i in order)
        # tail[k] = P(size is among the sizes from rank k on) = P(s > f) when k = #sizes <= f
        tail = [0.0] * (len(s) + 1)
        for k in range(len(s) - 1, -1, -1):
            tail[k] = tail[k + 1] + w[k]
        object.__setattr__(self, "sizes", s)
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "_tail", tuple(tail))
        object.__setattr__(self, "_tail_np", np.asarray(tail))
        object.__setattr__(self, "_sizes_np", np.asarray(s, dtype=np.float64))

    @classmethod
    def merge(cls, mixes: Iterable[tuple["WorkloadMix", float]]) -> "WorkloadMix":
        """A mixture of mixes with the given popularities."""
        sizes: list[int] = []
        weights: list[float] = []
        for mix, pop in mixes:
            sizes.extend(mix.sizes)
            weights.extend(w * pop for w in mix.weights)
        return cls(tuple(sizes), tuple(weights))

    def fragment(self, free: float) -> float:
        """Expected unusable bytes of one GPU with `free` bytes free."""
        return free * self._tail[bisect_right(self.sizes, free)] if free > 0 else 0.0

    def fragments(self, free: np.ndarray) -> np.ndarray:
        """Vectorised fragment() over GPUs."""
        f = np.maximum(np.asarray(free, dtype=np.float64), 0.0)
        return f * self._tail_np[np.searchsorted(self._sizes_np, f, side="right")]


def _free_of(state: Any) -> np.ndarray:
    return np.asarray(getattr(state, "free", state))


def fragmentation(state: Any, mix: WorkloadMix) -> float:
    """Unusable free bytes of a cluster state (a Topology or an array of free bytes per GPU)."""
    return float(mix.fragments(_free_of(state)).sum())


def fragmentation_ratio(state: Any, mix: WorkloadMix) -> float:
    """Unusable share of the free memory, in [0, 1] (0 for a cluster with nothing free)."""
    free = _free_of(state)
    total = float(np.maximum(free, 0).sum())
    return fragmentation(free, mix) / total if total > 0 else 0.0


def placement_delta(state: Any, reservations: Mapping[int, int], mix: WorkloadMix) -> float:
    """Change in fragmentation (bytes) if `reservations` (GPU position -> bytes) were taken."""
    free = _free_of(state)
    need: dict[int, int] = {}
    for i, b in reservations.items():
        need[int(i)] = need.get(int(i), 0) + int(b)
    return sum(mix.fragment(float(free[i]) - b) - mix.fragment(float(free[i])) for i, b in need.items())


def delta_if_placed(free: np.ndarray, size: float, mix: WorkloadMix) -> np.ndarray:
    """Per GPU: fragmentation change if a stage of `size` bytes went there (inf where it does not fit)."""
    f = np.asarray(free, dtype=np.float64)
    d = mix.fragments(f - size) - mix.fragments(f)
    return np.where(f >= size, d, np.inf)

"""Preset weights drawn on the stage's device: PresetWeights' recipe without the trip through the CPU.

Drawing Llama-2-7B's 13 GB on the CPU takes minutes; on a GPU it takes seconds. The recipe is
PresetWeights' (a generator seeded per (seed, tensor name), norms 1, linear weights std 1/sqrt(fan_in),
embeddings std 1, biases std 0.02), but the generator is the device's, so the values differ from
PresetWeights' on CUDA (on the CPU in float32 they are the same). Every process that draws the same
tensor on the same kind of device gets the same values. Selected by a preset source with
`"on_device": True` (runtime/stage.py: source_from_spec).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from flexpipe.errors import CheckpointError
from flexpipe.model.checkpoint import PresetWeights

__all__ = ["DevicePresetWeights"]


class DevicePresetWeights(PresetWeights):
    """PresetWeights' recipe drawn directly on `device` in `dtype`."""

    def __repr__(self) -> str:
        return f"DevicePresetWeights({self.config.name!r}, seed={self.seed})"

    def load(self, names: Sequence[str], dtype: torch.dtype | None = None,
             device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Generate exactly `names` on `device` (default CPU) in `dtype` (default float32)."""
        dev = torch.device(device) if device is not None else torch.device("cpu")
        dt = dtype or torch.float32
        out = {}
        for n in names:
            if n not in self._specs:
                raise CheckpointError(f"{self!r}: tensor {n!r} is not part of model {self.config.name}")
            shape = self._specs[n]
            if "norm" in n:   # RMSNorm / LayerNorm weights and LayerNorm biases
                out[n] = (torch.ones if n.endswith(".weight") else torch.zeros)(shape, dtype=dt, device=dev)
                continue
            digest = hashlib.blake2b(f"{self.seed}/{n}".encode(), digest_size=8).digest()
            g = torch.Generator(device=dev).manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
            t = torch.randn(shape, generator=g, dtype=dt, device=dev)
            if n.endswith(".bias"):
                t.mul_(0.02)
            elif not ("embed_tokens" in n or "embed_positions" in n):
                t.mul_(shape[1] ** -0.5)   # [out, in]: std 1/sqrt(fan_in)
            out[n] = t
        return out

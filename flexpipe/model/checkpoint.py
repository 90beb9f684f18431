"""Weight sources: HF safetensors checkpoints read tensor by tensor, and seeded random weights.

Both yield only the tensors asked for, so a stage loads its own unit range and nothing else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flexpipe.errors import CheckpointError
from flexpipe.model.config import ModelConfig
from flexpipe.model.units import all_tensor_specs

INDEX_FILE = "model.safetensors.index.json"
LM_HEAD = "lm_head.weight"


class CheckpointReader:
    """An HF checkpoint directory: config.json plus one *.safetensors file or a sharded index."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory; expected an HF checkpoint directory "
                                  "(config.json + *.safetensors)")
        cfg_file = self.path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{cfg_file}: missing; an HF checkpoint directory needs config.json")
        self.config = ModelConfig.from_hf(cfg_file)
        self._specs = all_tensor_specs(self.config)
        self._weight_map: dict[str, str] | None = None  # tensor name -> shard file name
        self._files = self._find_files()
        if self.config.tie_word_embeddings and self._holds(LM_HEAD):
            # Tied, yet the file stores lm_head too: transformers 5 ties the two only where their values
            # are equal and otherwise uses each; reading the stored lm_head gives exactly that.
            self.config = dataclasses.replace(self.config, tie_word_embeddings=False)
            self._specs = all_tensor_specs(self.config)

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r})"

    @property
    def tokenizer_path(self) -> Path | None:
        """tokenizer.json of the checkpoint, if it brings one."""
        p = self.path / "tokenizer.json"
        return p if p.is_file() else None

    def _find_files(self) -> list[str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
                if not isinstance(wm, dict):
                    raise TypeError("weight_map is not an object")
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e}); expected JSON with a "
                                      "'weight_map' of tensor name -> shard file") from None
            self._weight_map = {str(k): str(v) for k, v in wm.items()}
            files = sorted(set(self._weight_map.values()))
            for f in files:
                if not (self.path / f).is_file():
                    raise CheckpointError(f"{index}: lists shard {f!r}, which is missing from {self.path}")
            return files
        files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no *.safetensors file and no {INDEX_FILE}")
        if len(files) == 1:
            self._weight_map = None  # one file holds everything; its header is read on first load
        return files

    def _holds(self, name: str) -> bool:
        """Whether the checkpoint stores `name` (reads headers only)."""
        if self._weight_map is None and len(self._files) == 1:
            with self._open(self._files[0]) as h:
                keys = set(h.keys())
            return name in keys or _bare(name) in keys
        wm = self._map_shards()
        return name in wm or _bare(name) in wm

    def _map_shards(self) -> dict[str, str]:
        if self._weight_map is None:
            self._weight_map = {}
            for f in self._files:  # several files and no index: read each header (headers only)
                with self._open(f) as h:
                    for k in h.keys():
                        self._weight_map.setdefault(k, f)
        return self._weight_map

    def _shard_of(self, name: str) -> str:
        if self._weight_map is None:
            if len(self._files) == 1:
                return self._files[0]
        wm = self._map_shards()
        shard = wm.get(name) or wm.get(_bare(name))
        if shard is None:
            where = self.path / INDEX_FILE if (self.path / INDEX_FILE).is_file() else self.path
            raise CheckpointError(f"{where}: tensor {name!r} missing; {self._expect(name)}")
        return shard

    def _expect(self, name: str) -> str:
        return f"config {self.config.name} expects shape {list(self._specs[name])}"

    def _open(self, fname: str):
        f = self.path / fname
        try:
            return safe_open(str(f), framework="pt")
        except Exception as e:  # safetensors raises its own SafetensorError (and OSError for I/O)
            raise CheckpointError(f"{f}: corrupt or unreadable safetensors header ({e}); expected an 8-byte "
                                  "header length, a JSON header and the tensor data it describes") from None

    def load(self, names: Sequence[str], dtype: torch.dtype | None = None,
             device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Read exactly `names`, opening only the shards that hold them."""
        for n in names:
            if n not in self._specs:
                raise CheckpointError(f"{self.path}: tensor {n!r} is not part of a {self.config.arch} model "
                                      f"with config {self.config.name}")
        by_shard: dict[str, list[str]] = {}
        for n in names:
            by_shard.setdefault(self._shard_of(n), []).append(n)
        out: dict[str, torch.Tensor] = {}
        for shard, shard_names in by_shard.items():
            fpath = self.path / shard
            with self._open(shard) as f:
                keys = set(f.keys())
                for n in shard_names:
                    stored = n if n in keys else _bare(n)
                    if stored not in keys:
                        raise CheckpointError(f"{fpath}: tensor {n!r} missing; {self._expect(n)}")
                    sl = f.get_slice(stored)
                    shape = tuple(sl.get_shape())
                    if sl.get_dtype() not in _WEIGHT_DTYPES:
                        raise CheckpointError(
                            f"{fpath}: tensor {stored!r} is stored as {sl.get_dtype()}, a quantized or "
                            f"integer format; FlexPipe loads weights stored as {'/'.join(_WEIGHT_DTYPES)}: "
                            "dequantize the checkpoint first")
                    if shape != self._specs[n]:
                        raise CheckpointError(f"{fpath}: tensor {stored!r} has shape {list(shape)}; "
                                              f"{self._expect(n)}")
                    try:
                        t = f.get_tensor(stored)
                    except Exception as e:
                        raise CheckpointError(f"{fpath}: tensor {n!r} could not be read ({e}); the file "
                                              "is truncated or corrupt") from None
                    out[n] = _convert(t, dtype, device)
        return out


# safetensors' names of the dtypes a weight may be stored in (float8 and integer tensors are quantized
# weights, which need their scales: loading them as plain numbers would compute garbage)
_WEIGHT_DTYPES = ("F32", "F16", "BF16", "F64")


def _bare(name: str) -> str:
    """`name` as a checkpoint of the bare base model stores it (OPTModel's decoder.*, as facebook/opt-*
    ship; LlamaModel's layers.*): transformers loads those into *ForCausalLM by adding the "model."
    prefix, and so do we."""
    return name.removeprefix("model.")


def _convert(t: torch.Tensor, dtype: torch.dtype | None, device: torch.device | str | None) -> torch.Tensor:
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t if device is None else t.to(device)


class PresetWeights:
    """Deterministic random weights, generated per tensor from (seed, tensor name).

    A stage generates only its own tensors and gets the same values as any other process would.
    Scales keep a random model well-behaved: norms 1, linear weights std 1/sqrt(fan_in),
    embeddings std 1, biases std 0.02.
    """

    def __init__(self, cfg: ModelConfig, seed: int = 0):
        self.config, self.seed = cfg, seed
        self._specs = all_tensor_specs(cfg)

    def __repr__(self) -> str:
        return f"PresetWeights({self.config.name!r}, seed={self.seed})"

    def load(self, names: Sequence[str], dtype: torch.dtype | None = None,
             device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Generate exactly `names` (on CPU, one at a time, then moved)."""
        out = {}
        for n in names:
            if n not in self._specs:
                raise CheckpointError(f"{self!r}: tensor {n!r} is not part of model {self.config.name}")
            out[n] = _convert(self._make(n, self._specs[n]), dtype, device)
        return out

    def _make(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if "norm" in name:  # RMSNorm / LayerNorm weights and LayerNorm biases
            return torch.ones(shape) if name.endswith(".weight") else torch.zeros(shape)
        digest = hashlib.blake2b(f"{self.seed}/{name}".encode(), digest_size=8).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
        t = torch.randn(shape, generator=g)
        if name.endswith(".bias"):
            return t.mul_(0.02)
        if "embed_tokens" in name or "embed_positions" in name:
            return t
        return t.mul_(shape[1] ** -0.5)  # [out, in]: std 1/sqrt(fan_in)


def save_checkpoint(cfg: ModelConfig, source, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write an HF-style directory (config.json + model.safetensors) with every tensor of `cfg`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    specs = all_tensor_specs(cfg)
    tensors = {n: t.contiguous() for n, t in source.load(list(specs), dtype=dtype, device="cpu").items()}
    hf = cfg.to_hf()
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return path

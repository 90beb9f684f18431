"""The oracle: single-process generation over all units, with one sequence's paged KV.

Every pipeline shape, under any sequence of reshapes, must produce what `generate` produces here.
"""

from __future__ import annotations

from typing import Sequence

import torch

from flexpipe.errors import RequestError
from flexpipe.model.attention import AttnMetadata, PagedKVCache
from flexpipe.model.config import ModelConfig
from flexpipe.model.sampling import SamplingParams, sample
from flexpipe.model.units import WeightSource, build_units, make_kv_caches, run_units


class ReferenceModel:
    """All units of a model in one process; prefill/decode one sequence and return logits."""

    def __init__(self, cfg: ModelConfig, source: WeightSource, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", block_size: int = 16):
        self.cfg, self.dtype, self.device, self.block_size = cfg, dtype, torch.device(device), block_size
        self.units = build_units(cfg, 0, cfg.num_units, source, dtype=dtype, device=device)
        self._caches: dict[int, PagedKVCache] = {}
        self._num_blocks = 0
        self.length = 0  # tokens of the current sequence in KV

    def _ensure_capacity(self, tokens: int) -> None:
        need = -(-tokens // self.block_size)
        if need <= self._num_blocks:
            return
        grow = max(need, 2 * self._num_blocks)
        new = make_kv_caches(self.cfg, self.units, grow, self.block_size, self.dtype, self.device)
        for i, c in self._caches.items():  # keep what the sequence already wrote
            ids = list(range(self._num_blocks))
            new[i].write_blocks(ids, *c.read_blocks(ids))
        self._caches, self._num_blocks = new, grow

    def _step(self, ids: Sequence[int], all_rows: bool) -> torch.Tensor:
        n = len(ids)
        if self.length + n > self.cfg.max_position_embeddings:
            raise RequestError(f"sequence of {self.length + n} tokens exceeds the model's "
                               f"{self.cfg.max_position_embeddings} positions")
        self._ensure_capacity(self.length + n)
        meta = AttnMetadata.build([self.length], [n], [list(range(self._num_blocks))], self.block_size,
                                  device=self.device)
        x = torch.tensor(list(ids), dtype=torch.int64, device=self.device)
        rows = None if all_rows else meta.last_token_rows()
        logits = run_units(self.units, x, meta, self._caches, logit_rows=rows)
        self.length += n
        return logits

    def prefill(self, prompt_ids: Sequence[int], all_rows: bool = True) -> torch.Tensor:
        """Start a new sequence; fp32 logits [len(prompt), V] (or [1, V] for the last row only)."""
        if not prompt_ids:
            raise RequestError("prompt is empty: give at least one token")
        self.length = 0
        return self._step(prompt_ids, all_rows)

    def decode(self, token_id: int) -> torch.Tensor:
        """Append one token to the current sequence; fp32 logits [V] for the next position."""
        if self.length == 0:
            raise RuntimeError("decode() before prefill()")
        return self._step([token_id], all_rows=True)[0]

    def logits_for(self, prompt_ids: Sequence[int], generated_ids: Sequence[int]) -> torch.Tensor:
        """[len(generated)+1, V]: row j holds the logits that chose generated[j] (last row: the next one)."""
        ids = list(prompt_ids) + list(generated_ids)
        return self.prefill(ids)[len(prompt_ids) - 1:]

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[int]:
        """Generated token ids; stops after max_tokens, on (and including) a stop token, or when prompt
        and output fill the model's positions."""
        params.validate(self.cfg.vocab_size)
        if params.temperature > 0 and params.seed is None:
            raise RequestError("sampling with temperature > 0 needs a seed for the oracle to be reproducible")
        if len(prompt_ids) >= self.cfg.max_position_embeddings:
            raise RequestError(f"prompt of {len(prompt_ids)} tokens leaves no room in the model's "
                               f"{self.cfg.max_position_embeddings} positions")
        stops = params.stop_ids(self.cfg.eos_token_ids)
        logits = self.prefill(prompt_ids, all_rows=False)[0]
        out: list[int] = []
        while True:
            tok = int(sample(logits[None], [params], [len(out)])[0])
            out.append(tok)
            # the context holds prompt + output (as HF's max_length and the server's check count it):
            # the last token sampled is never fed, so the KV holds at most one position less
            if tok in stops or len(out) >= params.max_tokens or \
                    len(prompt_ids) + len(out) >= self.cfg.max_position_embeddings:
                return out
            logits = self.decode(tok)


def generate(cfg: ModelConfig, source: WeightSource, prompt_ids: Sequence[int], params: SamplingParams,
             dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> list[int]:
    """The oracle's output for one request (see ReferenceModel.generate)."""
    return ReferenceModel(cfg, source, dtype=dtype, device=device).generate(prompt_ids, params)

"""Decode steps on fixed-shape buffers, captured in CUDA graphs.

A decode step of Llama-2-7B on one stage is ~1200 kernel launches for ~6 ms of GPU work; on the H200
that ran `benchmarks/gpu_check.sh` (docs/gpu.md) the step took 67 ms of host time. vLLM and gpt-fast
capture the decode step in a CUDA graph and replay it: one launch instead of ~1200. A graph replays
fixed shapes at fixed addresses, so a step here runs on buffers of a bucketed shape:

- B rows: the step's sequences (one new token each), padded up to a power of two;
- C keys: every row attends to C gathered keys, C the step's longest context rounded up to a multiple
  of C_STEP; keys past a row's context are masked.

Everything that varies per step goes in through one int64 array copied to the device (positions, the
new tokens' slots, context lengths, block tables), and the attention layout (gather slots, mask) is
computed from it on the device, inside the graph. Padded rows are harmless: each attends to one key
and writes its K/V to a slot of a block that no sequence owns during the step (a free block of the
stage's pool: its contents are garbage by definition), and their outputs are dropped.

Modes (StageCore's `decode`): "off" runs the eager path; "static" runs these buffers without a
graph (the CPU tests check it against the eager path); "graph" captures a CUDA graph per (B, C) on
first use and replays it. A step this cannot take (no free block for the padding, a sliding window,
more keys than the model's positions) runs eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from flexpipe.model.attention import AttnMetadata, PagedKVCache
from flexpipe.model.units import Unit, rope_tables, run_units

__all__ = ["DECODE_MODES", "C_STEP", "StaticDecode", "bucket_rows", "bucket_keys", "pack_inputs"]

DECODE_MODES = ("off", "static", "graph")
C_STEP = 256          # keys are gathered in multiples of this
MAX_ROWS = 256        # larger decode batches run eagerly (their launches are a smaller share)


def bucket_rows(n: int) -> int:
    """Rows of the buffers a step of n decodes runs on: the next power of two."""
    return 1 << max(0, (n - 1).bit_length())


def bucket_keys(max_ctx: int, step: int = C_STEP) -> int:
    """Keys gathered per row for a step whose longest context is max_ctx."""
    return max(step, -(-max_ctx // step) * step)


def pack_inputs(context_lens: Sequence[int], block_tables: Sequence[Sequence[int]], block_size: int, rows: int,
                keys: int, scratch_block: int) -> np.ndarray:
    """[rows, 3 + keys / block_size] int64: position, slot of the new token, context length, block table.

    A real row b decodes the token at position context_lens[b] - 1. Its block table is padded with its
    first block (those keys are masked). Padded rows: position 0, context 1, every block the scratch
    block (their one key and their K/V write land there).
    """
    nblk = keys // block_size
    out = np.empty((rows, 3 + nblk), dtype=np.int64)
    n = len(context_lens)
    out[n:, 0] = 0
    out[n:, 1] = scratch_block * block_size
    out[n:, 2] = 1
    out[n:, 3:] = scratch_block
    for b, (ctx, bt) in enumerate(zip(context_lens, block_tables)):
        pos = ctx - 1
        need = -(-ctx // block_size)
        if ctx < 1 or len(bt) < need or need > nblk:
            raise ValueError(f"row {b}: context {ctx} needs {need} blocks; table has {len(bt)}, buffers {nblk}")
        out[b, 0] = pos
        out[b, 1] = bt[pos // block_size] * block_size + pos % block_size
        out[b, 2] = ctx
        out[b, 3:3 + need] = bt[:need]
        out[b, 3 + need:] = bt[0]
    return out


@dataclass
class _Entry:
    """The buffers (and graph) of one (rows, keys) bucket."""

    rows: int
    keys: int
    packed: torch.Tensor                 # [rows, 3 + keys / block_size] int64, on the device
    x: torch.Tensor                      # [rows] token ids, or [rows, hidden] residual
    out: torch.Tensor | None = None      # what the last unit returned (the graph's output)
    graph: Any = None


class StaticDecode:
    """Runs pure decode steps of a stage's units on bucketed buffers, captured in CUDA graphs or not."""

    def __init__(self, units: Sequence[Unit], kv: dict[int, PagedKVCache], *, block_size: int, device: torch.device,
                 dtype: torch.dtype, hidden: int, first: bool, mode: str):
        if mode not in ("static", "graph"):
            raise ValueError(f"StaticDecode mode {mode!r}: 'static' or 'graph'")
        if mode == "graph" and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self.units, self.kv = list(units), kv
        self.block_size, self.device, self.dtype = block_size, device, dtype
        self.hidden, self.first, self.mode = hidden, first, mode
        self.entries: dict[tuple[int, int], _Entry] = {}
        self.pool: Any = None            # the graphs' shared memory pool
        self.stats = {"steps": 0, "captures": 0, "eager": 0}
        self.cfg = self.units[0].cfg
        self.max_keys = bucket_keys(self.cfg.max_position_embeddings)
        if any(u.kind == "attention" for u in self.units):   # graphs hold the rope tables' addresses
            rope_tables(self.cfg, self.max_keys, dtype, device)

    def can_run(self, n: int, max_ctx: int, free_block: int | None) -> bool:
        return (0 < n <= MAX_ROWS and free_block is not None and self.cfg.sliding_window is None
                and bucket_keys(max_ctx) <= self.max_keys)

    def run(self, x: torch.Tensor, context_lens: Sequence[int], block_tables: Sequence[Sequence[int]],
            scratch_block: int) -> torch.Tensor:
        """The units' output for the n = len(context_lens) decodes: [n, hidden] or logits [n, vocab]."""
        n = len(context_lens)
        rows, keys = bucket_rows(n), bucket_keys(max(context_lens))
        e = self.entries.get((rows, keys))
        if e is None:
            e = self.entries[(rows, keys)] = self._entry(rows, keys)
        packed = pack_inputs(context_lens, block_tables, self.block_size, rows, keys, scratch_block)
        e.packed.copy_(torch.from_numpy(packed))
        e.x[n:].zero_()
        e.x[:n].copy_(x)   # token ids, or the residual (copy_ moves and casts)
        self.stats["steps"] += 1
        if self.mode == "static":
            out = self._forward(e)
        else:
            if e.graph is None:
                self._capture(e)
            e.graph.replay()
            assert e.out is not None
            out = e.out
        return out[:n].clone()   # the buffers are overwritten by the next step

    # ---- the step on the buffers -----------------------------------------------------------------
    def _entry(self, rows: int, keys: int) -> _Entry:
        nblk = keys // self.block_size
        packed = torch.zeros(rows, 3 + nblk, dtype=torch.int64, device=self.device)
        if self.first:
            x = torch.zeros(rows, dtype=torch.int64, device=self.device)
        else:
            x = torch.zeros(rows, self.hidden, dtype=self.dtype, device=self.device)
        return _Entry(rows, keys, packed, x)

    def _forward(self, e: _Entry) -> torch.Tensor:
        """The step, from e.packed and e.x only (so that a graph of it replays any step of its bucket)."""
        bs, rows, keys = self.block_size, e.rows, e.keys
        p = e.packed
        positions, new_slots, ctx = p[:, 0].contiguous(), p[:, 1].contiguous(), p[:, 2].contiguous()
        tables = p[:, 3:]
        k = torch.arange(keys, device=self.device)
        slots = tables.index_select(1, k // bs) * bs + k % bs                 # [rows, keys]
        visible = k[None, :] < ctx[:, None]                                   # [rows, keys]
        meta = AttnMetadata(positions=positions, seq_lens=[1] * rows, context_lens=[keys] * rows,
                            block_tables=[[]] * rows, slot_mapping=new_slots, block_size=bs)
        # what paged_attention would build on the host, here from the buffers, on the device
        meta._scratch[("paged", bs, None)] = [{"B": rows, "max_q": 1, "slots": slots, "rows": None,
                                               "fresh": False, "mask": visible[:, None, None, :]}]
        e.out = run_units(self.units, e.x, meta, self.kv)
        return e.out

    def _capture(self, e: _Entry) -> None:
        """Warm up on a side stream (cuBLAS workspaces, the allocator), then capture the step."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(e)   # the step's own inputs: writing their K/V twice is idempotent
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        # thread_local: the stage's event loop thread may query channel events while this captures
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            self._forward(e)
        e.graph = graph
        self.stats["captures"] += 1

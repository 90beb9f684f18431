"""A stage's compute and KV state, with no sockets: units of a contiguous range plus their KV blocks.

`StageCore` is what a StageActor wraps (runtime/stage.py), and what tests and benchmarks drive
directly.  It owns one block pool shared by its attention units (one block table per sequence),
runs a micro-batch (prefill chunks and decodes mixed), samples on the last stage, and moves KV in
and out as (sequence, units, token range) for reshapes.

During a reshape a stage may hold two unit sets: the range it serves in the current epoch and the
range it will serve in the next.  Units are loaded for the next range while the current one keeps
serving; `activate()` switches at the epoch boundary and drops what is no longer owned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from flexpipe.errors import ConfigError
from flexpipe.model.attention import AttnMetadata, PagedKVCache, step_sdpa
from flexpipe.model.config import ModelConfig
from flexpipe.model.units import Unit, build_units, make_kv_caches, run_units


def torch_device(label: str) -> torch.device:
    """The torch device of a placement label: "cpu", "cpu:N" (a CPU slot, for moves), "cuda" or "cuda:N".

    "cuda" gets its index (the current device's): tensors on it report "cuda:0", and anything keyed
    by the device's name (the rope tables that captured decode graphs read) must use the same name."""
    if label.startswith("cpu"):
        return torch.device("cpu")
    if label == "cuda":
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return torch.device(label)


@dataclass(slots=True)
class StepMeta:
    """The per-sequence layout of one micro-batch (identical at every stage)."""

    seq_ids: list[str]
    starts: list[int]
    lens: list[int]
    sample: list[bool]
    out_index: list[int]
    sampling: list[list[float]]  # per sequence: [temperature, top_k, top_p, seed]


class StageCore:
    """Units [start, end) of one model on one device, with their paged KV."""

    def __init__(self, cfg: ModelConfig, source: Any, start: int, end: int, *, num_blocks: int,
                 block_size: int, dtype: torch.dtype = torch.float32, device: str = "cpu", decode: str = "off"):
        from flexpipe.model.static_decode import DECODE_MODES

        if decode not in DECODE_MODES:
            raise ConfigError(f"decode mode {decode!r}: give one of {', '.join(DECODE_MODES)}")
        self.cfg, self.source = cfg, source
        self.num_blocks, self.block_size = num_blocks, block_size
        self.dtype, self.device = dtype, torch_device(device)
        # start == end: an empty stage that receives its units later (peer weight copy)
        self.units: dict[int, Unit] = ({u.index: u for u in build_units(cfg, start, end, source, dtype, device)}
                                       if end > start else {})
        self.start, self.end = start, end
        self.kv: dict[int, PagedKVCache] = make_kv_caches(cfg, self.units.values(), num_blocks, block_size,
                                                          dtype, device)
        self.tables: dict[str, list[int]] = {}
        # tokens of KV held per sequence (computed by steps here, or copied in): where its next step
        # must start (or at 0, computed again) -- a step at a position already held would rewrite it
        self.lengths: dict[str, int] = {}
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        # decode steps on bucketed buffers (model/static_decode.py); graphs only where there are CUDA
        # graphs: a CPU stage of a pipeline launched with decode_graphs=graph runs eagerly
        self.decode = "off" if decode == "graph" and self.device.type != "cuda" else decode
        self._static: Any = None   # StaticDecode of the units served now, made on first use
        # Sequences freed while a reshape is under way (begin_reshape).  A peer may have exported
        # such a sequence's KV before the free reached it: that import must not bring back a table the
        # router's ledger no longer counts (see import_kv).  A new first chunk of the sequence (a
        # preempted request running again) takes it off the list.
        self._preparing = False
        self._dropped: set[str] = set()
        self._imported: set[str] = set()   # sequences whose table here was made by KV from a peer

    # ---- blocks ---------------------------------------------------------------------------------
    @property
    def has_kv(self) -> bool:
        return bool(self.kv)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def ensure(self, seq_id: str, tokens: int) -> list[int]:
        """Block table of `seq_id` grown to hold `tokens` tokens."""
        table = self.tables.setdefault(seq_id, [])
        need = -(-tokens // self.block_size) - len(table)
        if need > len(self._free):
            raise MemoryError(f"stage [{self.start},{self.end}) needs {need} more KV blocks for {seq_id}, "
                              f"{len(self._free)} free of {self.num_blocks}: the router's ledger disagrees")
        for _ in range(need):
            table.append(self._free.pop())
        return table

    def free(self, seq_ids: Sequence[str], *, settled: bool = False) -> None:
        """Return the blocks of `seq_ids` to the pool (unknown ids are ignored).

        settled: no KV of them is on its way here (the controller's frees between two copy rounds,
        each of which it awaited), so a later copy of them is taken: nothing is remembered as dropped
        (a new stage runs no step that would take it off the list before the switch)."""
        for s in seq_ids:
            self._free.extend(reversed(self.tables.pop(s, [])))
            self.lengths.pop(s, None)
            self._imported.discard(s)
        if settled:
            self._dropped.difference_update(seq_ids)
        elif self._preparing:
            self._dropped.update(seq_ids)

    def begin_reshape(self) -> None:
        """A reshape that may copy KV in has begun: remember what is freed until activate() or
        abort_prepare() (see take_kv)."""
        self._preparing = True

    def take_kv(self, seq_id: str, tokens: int) -> list[int] | None:
        """The block table of `seq_id` grown for `tokens` tokens of KV arriving from a peer, or None for
        a sequence freed here during this reshape (its KV must not come back), or when no reshape is
        under way here (KV of one aborted or switched since: no block may be taken outside the ledger)."""
        if seq_id in self._dropped or not self._preparing:
            return None
        if seq_id not in self.tables:
            self._imported.add(seq_id)
        table = self.ensure(seq_id, tokens)
        if seq_id in self._imported:   # (copy rounds may come in any order)
            self.lengths[seq_id] = max(self.lengths.get(seq_id, 0), tokens)
        # else it runs here: its own steps say where it continues, not a copy (a late one of a run
        # that was preempted and began again would put that past its KV, and its next step refused)
        return table

    def only_imported(self, seq_id: str) -> bool:
        """Whether this stage holds `seq_id` only through KV a peer copied in during this reshape (no
        step of it has run here since): what a peer that copied it may free again."""
        return seq_id in self._imported

    def reset(self) -> None:
        """Drop every sequence's KV."""
        self.free(list(self.tables))

    # ---- compute --------------------------------------------------------------------------------
    def _unit_list(self) -> list[Unit]:
        return [self.units[i] for i in range(self.start, self.end)]

    @torch.no_grad()
    def forward(self, meta: StepMeta, x: torch.Tensor) -> torch.Tensor:
        """Run this stage's units on a micro-batch: token ids [T] or residual [T, hidden] in.

        Returns the residual stream [T, hidden] for the next stage, or, on the last stage, the
        sampled token ids [S] of the sequences whose `sample` flag is set (in order).
        """
        if self._dropped:
            self._dropped.difference_update(s for s, st in zip(meta.seq_ids, meta.starts) if st == 0)
        if self._imported:
            self._imported.difference_update(meta.seq_ids)
        if self.has_kv:
            if 0 in meta.starts:   # computed again from its first token: blocks held from before are
                # stale (a preempted sequence whose free rode on a step that failed before it got here)
                for s, st in zip(meta.seq_ids, meta.starts):
                    if st == 0 and s in self.tables:
                        self._free.extend(reversed(self.tables.pop(s)))
            tables = [self.ensure(s, st + n) for s, st, n in zip(meta.seq_ids, meta.starts, meta.lens)]
            self.lengths.update((s, st + n) for s, st, n in zip(meta.seq_ids, meta.starts, meta.lens))
            if self.decode != "off" and max(meta.lens) == 1:
                out = self._static_decode(meta, tables, x)
                if out is not None:
                    return out
        else:  # no attention here: positions are all the units need
            tables = [[i] * (-(-(st + n) // self.block_size)) for i, (st, n) in
                      enumerate(zip(meta.starts, meta.lens))]
        am = AttnMetadata.build(meta.starts, meta.lens, tables, self.block_size, self.device)
        if x.dtype.is_floating_point:
            x = x.to(device=self.device, dtype=self.dtype)
        else:
            x = x.to(self.device)
        is_last = self.end == self.cfg.num_units
        rows = None
        if is_last:
            ends = am.last_token_rows()
            pick = torch.tensor([i for i, s in enumerate(meta.sample) if s], dtype=torch.int64)
            rows = ends.index_select(0, pick.to(ends.device))
        with step_sdpa(self.device):
            out = run_units(self._unit_list(), x, am, self.kv, logit_rows=rows)
        if not is_last:
            return out
        return self.sample(out, meta)

    def _static_decode(self, meta: StepMeta, tables: list[list[int]], x: torch.Tensor) -> torch.Tensor | None:
        """forward() of a pure decode step on StaticDecode's buffers; None where it cannot take it."""
        from flexpipe.model.static_decode import StaticDecode

        ctx = [st + 1 for st in meta.starts]
        scratch = self._free[-1] if self._free else None   # a block nobody owns during this step
        if self._static is None:
            self._static = StaticDecode(self._unit_list(), self.kv, block_size=self.block_size, device=self.device,
                                        dtype=self.dtype, hidden=self.cfg.hidden_size, first=self.start == 0,
                                        mode=self.decode)
        if not self._static.can_run(len(ctx), max(ctx), scratch):
            self._static.stats["eager"] += 1
            return None
        assert scratch is not None
        out = self._static.run(x, ctx, tables, scratch)
        if self.end != self.cfg.num_units:
            return out
        pick = [i for i, s in enumerate(meta.sample) if s]
        if len(pick) != len(ctx):
            out = out.index_select(0, torch.tensor(pick, dtype=torch.int64, device=out.device))
        return self.sample(out, meta)

    def sample(self, logits: torch.Tensor, meta: StepMeta) -> torch.Tensor:
        """Seeded sampling of the rows that asked for a token."""
        from flexpipe.model.sampling import SamplingParams, sample

        idx = [i for i, s in enumerate(meta.sample) if s]
        if not idx:
            return torch.empty(0, dtype=torch.int64)
        params = [SamplingParams(max_tokens=1, temperature=float(meta.sampling[i][0]), top_k=int(meta.sampling[i][1]),
                                 top_p=float(meta.sampling[i][2]), seed=int(meta.sampling[i][3])) for i in idx]
        return sample(logits, params, [meta.out_index[i] for i in idx]).to(torch.int64).cpu()

    # ---- KV migration -------------------------------------------------------------------------
    def _slots(self, table: list[int], t0: int, t1: int) -> torch.Tensor:
        pos = torch.arange(t0, t1, dtype=torch.int64)
        bt = torch.tensor(table, dtype=torch.int64)
        return (bt[pos // self.block_size] * self.block_size + pos % self.block_size).to(self.device)

    def export_kv(self, seq_id: str, units: Sequence[int], t0: int, t1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `units` for tokens [t0, t1) of `seq_id`: each [len(units), t1 - t0, kv_heads, head_dim]."""
        table = self.tables.get(seq_id)
        if table is None or -(-t1 // self.block_size) > len(table):
            raise KeyError(f"stage [{self.start},{self.end}) holds no KV of {seq_id} up to token {t1}")
        slots = self._slots(table, t0, t1)
        ks, vs = zip(*(self.kv[u].gather(slots) for u in units))
        return torch.stack(ks), torch.stack(vs)

    def import_kv(self, seq_id: str, units: Sequence[int], t0: int, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Write K/V [len(units), n, kv_heads, head_dim] of `units` at tokens [t0, t0 + n) of `seq_id`;
        False (nothing written) for a sequence freed here during this reshape (take_kv)."""
        n = k.shape[1]
        caches = []
        for u in units:   # before any block is taken: KV of units not held here (an aborted reshape's)
            cache = self.kv.get(u)
            if cache is None:
                raise KeyError(f"stage [{self.start},{self.end}) has no KV cache for unit {u}: prepare it first")
            caches.append(cache)
        table = self.take_kv(seq_id, t0 + n)
        if table is None:
            return False
        slots = self._slots(table, t0, t0 + n)
        for j, cache in enumerate(caches):
            cache.write(slots, k[j], v[j])
        return True

    # ---- reshaping ------------------------------------------------------------------------------
    def prepare(self, start: int, end: int, tensors_from: Any = None) -> list[int]:
        """Load the units of [start, end) that this stage lacks (kept beside the serving ones).

        Returns the indices loaded.  `tensors_from` is a weight source (the checkpoint or preset by
        default, or the tensors a peer stage sent).
        """
        missing = [i for i in range(start, end) if i not in self.units]
        src = tensors_from if tensors_from is not None else self.source
        for i in missing:
            (u,) = build_units(self.cfg, i, i + 1, src, self.dtype, self.device)
            self.units[i] = u
            if u.kind == "attention":
                self.kv[i] = PagedKVCache(self.num_blocks, self.block_size, self.cfg.num_kv_heads,
                                          self.cfg.head_dim, self.dtype, self.device)
        self._next = (start, end)
        self._preparing = True
        return missing   # the range served (and so StaticDecode's graphs) changes only at activate()

    def abort_prepare(self) -> None:
        """Forget units loaded for a reshape that was aborted."""
        for i in [i for i in self.units if not self.start <= i < self.end]:
            del self.units[i]
            self.kv.pop(i, None)
        self._preparing = False
        self._dropped.clear()
        self._imported.clear()

    def activate(self, start: int, end: int) -> None:
        """Serve [start, end) from now on; drop units (and their KV) outside it."""
        missing = [i for i in range(start, end) if i not in self.units]
        if missing:
            raise KeyError(f"cannot serve [{start},{end}): units {missing} were not prepared")
        for i in [i for i in self.units if not start <= i < end]:
            del self.units[i]
            self.kv.pop(i, None)
        self.start, self.end = start, end
        self._preparing = False
        self._dropped.clear()
        self._imported.clear()
        self._static = None   # its graphs hold the old range's units and KV pools
        if not self.kv:
            self.reset()

    def unit_tensors(self, units: Sequence[int]) -> dict[str, torch.Tensor]:
        """HF-named tensors of `units` (what a peer needs to load them without the checkpoint)."""
        return {name: t for i in units for name, t in self.units[i].hf_tensors().items()}

    def status(self) -> dict:
        return {"start": self.start, "end": self.end, "sequences": len(self.tables),
                "free_blocks": self.free_blocks, "num_blocks": self.num_blocks,
                "param_bytes": sum(u.param_bytes for u in self.units.values()), "decode": self.decode,
                "decode_stats": dict(self._static.stats) if self._static is not None else {}}

"""Where every request's KV lives: block accounting per stage, admission, and the layer map.

Each stage owns a pool of fixed-size KV blocks shared by its attention units (one block table per
sequence per stage, as vLLM shares one across layers).  A sequence of L tokens holds ceil(L / B)
blocks on every stage that has attention units, so one count per sequence, together with the
pipeline shape, says exactly which stage holds which layers' KV for how many tokens.

Allocation on the hot path is a method call by the router that owns this ledger (vLLM's scheduler
owns its KV manager the same way); `CacheManagerActor` serves the same object to other actors
(the reshape controller asks it for migration plans, stats come from it).

Stages keep their own block ids: the ledger counts, the stage maps.  KV moves between stages as
(sequence, layer, token range), never as block ids, so a migration needs no agreement on ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from flexpipe.errors import CapacityError


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks needed to hold `tokens` tokens."""
    return -(-tokens // block_size)


@dataclass(slots=True)
class StagePool:
    """One stage's KV pool as the ledger sees it."""

    capacity: int  # blocks
    layers: tuple[int, ...]  # attention layers this stage holds
    used: int = 0

    @property
    def has_kv(self) -> bool:
        return bool(self.layers)

    @property
    def free(self) -> int:
        return self.capacity - self.used


@dataclass(slots=True)
class CacheManager:
    """Block ledger for all stages of one pipeline epoch."""

    block_size: int
    pools: list[StagePool]
    seq_blocks: dict[str, int] = field(default_factory=dict)
    seq_tokens: dict[str, int] = field(default_factory=dict)
    watermark: int = 0  # blocks kept free at admission so running requests can grow

    # ---- capacity ----------------------------------------------------------------------------
    def _kv_pools(self) -> list[StagePool]:
        return [p for p in self.pools if p.has_kv]

    def free_blocks(self) -> int:
        """Free blocks on the fullest KV stage (what any sequence can still take)."""
        kv = self._kv_pools()
        return min((p.free for p in kv), default=1 << 40)

    def max_tokens(self) -> int:
        """Most tokens one sequence can ever hold (the smallest pool bounds it)."""
        kv = self._kv_pools()
        return min((p.capacity for p in kv), default=1 << 40) * self.block_size

    def check_fits_ever(self, tokens: int) -> None:
        """Raise CapacityError if `tokens` can never fit, saying how much is needed."""
        cap = self.max_tokens()
        if tokens > cap:
            need = blocks_for(tokens, self.block_size)
            raise CapacityError(
                f"request needs {tokens} tokens of KV ({need} blocks of {self.block_size}) on every stage, "
                f"but the smallest stage pool holds {cap} tokens: lower max_tokens or the prompt length, "
                f"or start the pipeline with more KV blocks"
            )

    def can_admit(self, tokens: int) -> bool:
        """Whether a new sequence of `tokens` fits now, leaving the watermark free."""
        return blocks_for(tokens, self.block_size) + self.watermark <= self.free_blocks()

    # ---- per sequence --------------------------------------------------------------------------
    def grow(self, seq_id: str, tokens: int) -> bool:
        """Reserve blocks so `seq_id` can hold `tokens` tokens on every KV stage; False if no room."""
        have = self.seq_blocks.get(seq_id, 0)
        need = blocks_for(tokens, self.block_size) - have
        if need > 0:
            if need > self.free_blocks():
                return False
            for p in self._kv_pools():
                p.used += need
            self.seq_blocks[seq_id] = have + need
        self.seq_tokens[seq_id] = max(tokens, self.seq_tokens.get(seq_id, 0))
        return True

    def release(self, seq_id: str) -> None:
        """Free every block of `seq_id` on every stage."""
        n = self.seq_blocks.pop(seq_id, 0)
        self.seq_tokens.pop(seq_id, None)
        for p in self._kv_pools():
            p.used -= n

    def holds(self, seq_id: str) -> bool:
        return seq_id in self.seq_blocks

    # ---- where KV lives ---------------------------------------------------------------------------
    def layer_map(self, seq_id: str) -> dict[int, tuple[int, ...]]:
        """stage index -> attention layers whose KV of `seq_id` that stage holds."""
        if seq_id not in self.seq_blocks:
            return {}
        return {i: p.layers for i, p in enumerate(self.pools) if p.has_kv}

    def sequences(self) -> Iterable[tuple[str, int]]:
        """(seq_id, tokens held) of every sequence with KV."""
        return list(self.seq_tokens.items())

    def rebuild(self, pools: list[StagePool]) -> None:
        """Adopt a new epoch's pools, carrying every sequence's blocks over (called at a reshape switch)."""
        for p in pools:
            p.used = sum(self.seq_blocks.values()) if p.has_kv else 0
        self.pools = pools

    def usage(self) -> list[dict]:
        """Per stage: capacity, used, layers."""
        return [{"stage": i, "capacity": p.capacity, "used": p.used, "layers": list(p.layers)}
                for i, p in enumerate(self.pools)]

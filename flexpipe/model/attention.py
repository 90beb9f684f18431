"""Paged attention in plain torch: KV lives in fixed-size blocks, each sequence has a block table.

Tokens of a micro-batch are flattened: sequence 0's new tokens first, then sequence 1's, and so on.
A step writes the new K/V into their slots, then every query attends (causally) to its sequence's
context gathered from the blocks: one SDPA call for the decodes together (or for all sequences when
they bring equally many tokens) and one per longer chunk, so no sequence is padded to another's length.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def gqa_in_kernel(device_type: str, masked: bool) -> bool:
    """Whether SDPA gets grouped KV heads as they are (enable_gqa) rather than repeated to the query's.

    On CUDA only flash attention takes enable_gqa, and flash takes no mask: a masked call with it
    falls to the math kernel, whose scores are [B, H, L, S] (quadratic in a prompt's length; with
    cuDNN off in stage steps, see step_sdpa, nothing else would take it).  Repeated heads let the
    memory-efficient kernel take it.  Elsewhere (CPU) as torch allows."""
    return _SDPA_GQA and not (masked and device_type == "cuda")


def step_sdpa(device: torch.device) -> contextlib.AbstractContextManager:
    """Where a stage step's attention calls run: on CUDA, SDPA without its cuDNN backend.

    torch prefers cuDNN attention on Hopper, and cuDNN builds a graph for the shapes it meets; a
    serving step meets new ones all the time (each decode step's context is a token longer, each
    prompt has its own length, masks broadcast).  The H200 profile of 2026-11-30 (gpu_check's
    profile section, llama2-7b fp16, one decode row) put 42.7 of a step's 101 ms of host time in its
    32 cuDNN attention calls, 1.3 ms a call against 45 us in HF generate's.  Flash, memory-efficient
    or math kernels have no per-shape build.  One context per step: entering one costs ~30 us of host
    time.  Elsewhere (CPU) nothing changes."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@dataclass
class AttnMetadata:
    """Where the tokens of one flattened micro-batch sit in their sequences and in the KV blocks."""

    positions: torch.Tensor  # [T] int64, position of each token in its sequence
    seq_lens: list[int]  # new tokens per sequence (they are contiguous in the flattened batch)
    context_lens: list[int]  # tokens in KV after this step, per sequence
    block_tables: list[list[int]]  # per sequence: block ids in this stage's pools
    slot_mapping: torch.Tensor  # [T] int64, block * block_size + offset of each new token
    block_size: int = 16
    # Derived tensors shared by every attention unit of a stage during one step.
    _scratch: dict[tuple, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, starts: Sequence[int], num_new: Sequence[int], block_tables: Sequence[Sequence[int]],
              block_size: int, device: torch.device | str = "cpu") -> "AttnMetadata":
        """Metadata for sequences whose new tokens occupy positions [start, start + n)."""
        if not (len(starts) == len(num_new) == len(block_tables)) or not starts:
            raise ValueError(f"need one start, count and block table per sequence (got {len(starts)}, "
                             f"{len(num_new)}, {len(block_tables)})")
        pos, slots = [], []
        for s, n, bt in zip(starts, num_new, block_tables):
            if s < 0 or n < 1:
                raise ValueError(f"sequence start {s} / new tokens {n}: need start >= 0 and n >= 1")
            if s + n > len(bt) * block_size:
                raise ValueError(f"block table of {len(bt)} blocks x {block_size} holds {len(bt) * block_size} "
                                 f"tokens; the step needs {s + n}")
            for p in range(s, s + n):
                pos.append(p)
                slots.append(bt[p // block_size] * block_size + p % block_size)
        return cls(
            positions=torch.tensor(pos, dtype=torch.int64, device=device),
            seq_lens=list(num_new),
            context_lens=[s + n for s, n in zip(starts, num_new)],
            block_tables=[list(bt) for bt in block_tables],
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_size=block_size,
        )

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    def last_token_rows(self) -> torch.Tensor:
        """[B] int64: row of each sequence's last new token (the rows that need sampling)."""
        key = ("last_rows",)
        if key not in self._scratch:
            ends, acc = [], 0
            for n in self.seq_lens:
                acc += n
                ends.append(acc - 1)
            self._scratch[key] = torch.tensor(ends, dtype=torch.int64, device=self.positions.device)
        return self._scratch[key]

    def cached(self, key: tuple, make) -> Any:
        """Value computed once per step and shared by the units of a stage."""
        v = self._scratch.get(key)
        if v is None:
            v = self._scratch[key] = make()
        return v


class PagedKVCache:
    """K/V of one attention unit: k, v as [num_blocks, block_size, num_kv_heads, head_dim]."""

    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def block_bytes(self) -> int:
        """Bytes of one block, K and V together."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.k.element_size()

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_bytes

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [T, kv_heads, head_dim] at flat slots [T]."""
        self.k.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, slots, k.to(self.k.dtype))
        self.v.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, slots, v.to(self.v.dtype))

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V at flat slots [...] -> [..., kv_heads, head_dim] each."""
        flat = slots.reshape(-1)
        k = self.k.view(-1, self.num_kv_heads, self.head_dim).index_select(0, flat)
        v = self.v.view(-1, self.num_kv_heads, self.head_dim).index_select(0, flat)
        shape = (*slots.shape, self.num_kv_heads, self.head_dim)
        return k.view(shape), v.view(shape)

    def read_blocks(self, ids: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of blocks `ids`: k, v as [n, block_size, kv_heads, head_dim] (for migration)."""
        idx = torch.as_tensor(ids, dtype=torch.int64, device=self.k.device)
        return self.k.index_select(0, idx), self.v.index_select(0, idx)

    def write_blocks(self, ids: Sequence[int] | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Overwrite blocks `ids` with k, v [n, block_size, kv_heads, head_dim] (for migration)."""
        idx = torch.as_tensor(ids, dtype=torch.int64, device=self.k.device)
        expect = (idx.numel(), self.block_size, self.num_kv_heads, self.head_dim)
        if tuple(k.shape) != expect or tuple(v.shape) != expect:
            raise ValueError(f"write_blocks: expected k and v of shape {expect}, got {tuple(k.shape)} "
                             f"and {tuple(v.shape)}")
        self.k.index_copy_(0, idx, k.to(device=self.k.device, dtype=self.k.dtype))
        self.v.index_copy_(0, idx, v.to(device=self.v.device, dtype=self.v.dtype))


def _layout(seq_lens: list[int], context_lens: list[int], block_tables: list[list[int]], block_size: int,
            window: int | None, dev: torch.device) -> dict[str, Any]:
    """Indices and mask of one group of sequences that all bring as many new tokens (max_q); computed
    once per step, shared by all attention units.

    Built with numpy on the host (a few small arrays: far cheaper per step than a dozen tiny torch
    ops on every stage) and moved to the device once.
    """
    if window is None and max(seq_lens) == 1:
        return _decode_layout(context_lens, block_tables, block_size, dev)
    return _any_layout(seq_lens, context_lens, block_tables, block_size, window, dev)


def _any_layout(seq_lens: list[int], context_lens: list[int], block_tables: list[list[int]], block_size: int,
                window: int | None, dev: torch.device) -> dict[str, Any]:
    """_layout of any group (a prefill chunk, a sliding window)."""
    B = len(seq_lens)
    max_q, max_ctx = max(seq_lens), max(context_lens)
    nblk = max(len(bt) for bt in block_tables)
    bt = np.zeros((B, nblk), dtype=np.int64)
    for b, row in enumerate(block_tables):
        bt[b, : len(row)] = row
    ctx = np.asarray(context_lens, dtype=np.int64)
    qn = np.asarray(seq_lens, dtype=np.int64)
    kpos = np.arange(max_ctx, dtype=np.int64)
    if (ctx > nblk * block_size).any() or (qn > ctx).any() or (qn != max_q).any():
        raise ValueError(f"context lens {context_lens} exceed the block tables or new tokens {seq_lens}, "
                         f"or a group's sequences bring different numbers of new tokens")
    slots = bt[:, kpos // block_size] * block_size + kpos % block_size  # [B, max_ctx]
    slots = np.where(kpos[None, :] < ctx[:, None], slots, slots[:, :1])
    j = np.arange(max_q, dtype=np.int64)
    qpos = (ctx - qn)[:, None] + j[None, :]  # [B, max_q]
    allowed = kpos[None, None, :] <= qpos[:, :, None]  # causal, also keeps keys < ctx
    if window is not None:
        allowed &= kpos[None, None, :] > qpos[:, :, None] - window
    out: dict[str, Any] = {"B": B, "max_q": max_q, "slots": torch.from_numpy(slots).to(dev), "rows": None,
                           "fresh": B == 1 and context_lens[0] == seq_lens[0]}
    # Mask only where some key must be hidden: decode steps at equal lengths need none.
    out["mask"] = None if bool(allowed.all()) else torch.from_numpy(allowed[:, None]).to(dev)  # [B, 1, max_q, max_ctx]
    return out


_OFFSETS: dict[int, np.ndarray] = {}


def _decode_layout(context_lens: list[int], block_tables: list[list[int]], block_size: int,
                   dev: torch.device) -> dict[str, Any]:
    """_layout of a group of decodes (one new token each, no window) in a third of the numpy calls:
    the same slots and mask as _any_layout (tests/test_model_units.py compares the two), 7-25 us
    instead of 20-39 us for 1-16 sequences on this project's CPU (`bench_pipeline.py --profile`), paid
    by every stage on every step."""
    B, max_ctx = len(context_lens), max(context_lens)
    if min(context_lens) < 1 or any(len(bt) * block_size < c for bt, c in zip(block_tables, context_lens)):
        raise ValueError(f"context lens {context_lens} exceed the block tables or are empty")
    nblk = -(-max_ctx // block_size)
    bt = np.array([bt[:nblk] + [0] * (nblk - len(bt)) for bt in block_tables], dtype=np.int64)
    off = _OFFSETS.get(block_size)
    if off is None:
        off = _OFFSETS[block_size] = np.arange(block_size, dtype=np.int64)
    slots = (bt[:, :, None] * block_size + off).reshape(B, nblk * block_size)[:, :max_ctx]
    mask = None   # equal lengths: every key is visible to every query
    if min(context_lens) != max_ctx:
        visible = np.arange(max_ctx)[None, :] < np.asarray(context_lens)[:, None]   # [B, max_ctx]
        slots = np.where(visible, slots, slots[:, :1])
        mask = torch.from_numpy(visible[:, None, None]).to(dev)   # [B, 1, 1, max_ctx]
    return {"B": B, "max_q": 1, "slots": torch.from_numpy(np.ascontiguousarray(slots)).to(dev), "rows": None,
            "fresh": B == 1 and context_lens[0] == 1, "mask": mask}


def _groups(meta: AttnMetadata, block_size: int, window: int | None) -> list[dict[str, Any]]:
    """The step's sequences in groups that attend without padding each other: all of them at once
    when every sequence brings as many new tokens, else the decodes (one token each) together and
    each longer chunk (a prefill) alone.  Padding a decode batch to a prefill chunk's length made a
    mixed step compute and mask max_q query rows for every sequence: 31 decodes beside one 40-token
    chunk cost 2-3x the two run apart.  Each group's "rows" are its tokens in the flattened batch
    (None: all of them, in order)."""
    dev = meta.positions.device
    B, T = len(meta.seq_lens), meta.num_tokens
    if sum(meta.seq_lens) != T or len(meta.context_lens) != B or len(meta.block_tables) != B:
        raise ValueError(f"attention metadata disagrees: {T} tokens, seq_lens {meta.seq_lens}, "
                         f"{len(meta.context_lens)} context lens, {len(meta.block_tables)} block tables")
    lens = meta.seq_lens
    if min(lens) == max(lens):
        return [_layout(lens, meta.context_lens, meta.block_tables, block_size, window, dev)]
    starts = np.cumsum([0] + lens[:-1])
    decodes = [b for b in range(B) if lens[b] == 1]
    members = ([decodes] if decodes else []) + [[b] for b in range(B) if lens[b] > 1]
    groups = []
    for g in members:
        lay = _layout([lens[b] for b in g], [meta.context_lens[b] for b in g], [meta.block_tables[b] for b in g],
                      block_size, window, dev)
        rows = np.concatenate([np.arange(starts[b], starts[b] + lens[b]) for b in g]).astype(np.int64)
        lay["rows"] = torch.from_numpy(rows).to(dev)
        lay["rows_np"] = rows
        groups.append(lay)
    return groups


# Fresh prompts (first chunks) attend in padded calls on CUDA, where a step is bound by its kernel
# launches: one group per prompt cost ~60 ops per layer each, and ~20 prompts in a prefill step made
# it ~10k ops (docs/gpu.md, "Time to first token"). On the CPU each prompt keeps its own call, so that
# outputs stay bit-identical to the reference run one request at a time (the padded call rounds
# differently: ~1e-6), although there too it was faster in the one step measured (21 prompts of the
# tiny model: 55 vs 70 ms, a scratch profile).
FRESH_TOGETHER_ON_CPU = False


def _fresh_batches(lens: Sequence[int], waste: float = 2.0) -> list[list[int]]:
    """Indices of prompts of these lengths in padded batches, longest first, each doing at most `waste`
    x the attention work of its prompts alone (G x L^2 against the sum of their n^2: one long prompt
    beside many short ones would pad them all to its length)."""
    order = sorted(range(len(lens)), key=lambda i: -lens[i])
    batches: list[list[int]] = []
    for i in order:
        b = batches[-1] if batches else None
        alone = sum(lens[j] ** 2 for j in b) + lens[i] ** 2 if b is not None else 0
        if b is not None and (len(b) + 1) * lens[b[0]] ** 2 <= waste * alone:
            b.append(i)
        else:
            batches.append([i])
    return batches


def _fresh_batch(fresh: list[dict[str, Any]], window: int | None, dev: torch.device) -> dict[str, Any]:
    """Layout of the fresh groups padded into one batch [G, L]: gather index, mask and output rows."""
    lens = [len(g["rows_np"]) for g in fresh]
    G, L = len(fresh), max(lens)
    idx = np.empty((G, L), dtype=np.int64)
    valid = np.zeros((G, L), dtype=bool)
    for i, g in enumerate(fresh):
        idx[i, :lens[i]] = g["rows_np"]
        idx[i, lens[i]:] = g["rows_np"][0]   # padding repeats a row of its own prompt; dropped after
        valid[i, :lens[i]] = True
    j = np.arange(L)
    allowed = (j[None, None, :] <= j[None, :, None]) & valid[:, None, :]   # [G, query, key]: causal, real keys
    if window is not None:
        allowed &= j[None, None, :] > j[None, :, None] - window
    return {"G": G, "L": L, "idx": torch.from_numpy(idx.reshape(-1)).to(dev),
            "mask": torch.from_numpy(allowed[:, None]).to(dev),                 # [G, 1, L, L]
            "take": torch.from_numpy(np.flatnonzero(valid.reshape(-1))).to(dev),
            "rows": torch.from_numpy(np.concatenate([g["rows_np"] for g in fresh])).to(dev)}


def _attend_fresh(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fb: dict[str, Any],
                  scale: float | None) -> torch.Tensor:
    """The fresh prompts' attention over their own new tokens, in one call: [sum of lens, H, D]."""
    G, L, idx = fb["G"], fb["L"], fb["idx"]
    H, D, KVH = q.shape[1], q.shape[2], k.shape[1]
    qb = q.index_select(0, idx).view(G, L, H, D).transpose(1, 2)
    kb = k.index_select(0, idx).view(G, L, KVH, D).transpose(1, 2)
    vb = v.index_select(0, idx).view(G, L, KVH, D).transpose(1, 2)
    o = _sdpa(qb, kb, vb, fb["mask"], False, scale)                      # [G, H, L, D]
    return o.transpose(1, 2).reshape(G * L, H, D).index_select(0, fb["take"])


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: PagedKVCache | None,
                    meta: AttnMetadata, scale: float | None = None, window: int | None = None) -> torch.Tensor:
    """Causal attention of q [T, heads, hd] over each sequence's context; writes k, v [T, kv_heads, hd].

    With cache=None every sequence's context is exactly its new tokens (a stateless prefill).
    Returns [T, heads, hd].
    """
    T, H, D = q.shape
    if cache is None:
        if meta.context_lens != meta.seq_lens:
            raise ValueError("attention without a KV cache needs context_lens == seq_lens (no earlier tokens)")
        outs, s = [], 0
        for n in meta.seq_lens:  # each sequence alone: its new tokens are its whole context
            outs.append(_self_attention(q[s:s + n], k[s:s + n], v[s:s + n], scale, window))
            s += n
        return outs[0] if len(outs) == 1 else torch.cat(outs)
    cache.write(meta.slot_mapping, k, v)
    if len(meta.seq_lens) == 1 and meta.context_lens[0] == T:
        return _self_attention(q, k, v, scale, window)  # prefill from position 0: new K/V are the context
    groups = meta.cached(("paged", cache.block_size, window), lambda: _groups(meta, cache.block_size, window))
    if len(groups) == 1:
        return _attend(q, cache, groups[0], scale)
    out = torch.empty_like(q)
    fresh = [lay for lay in groups if lay["fresh"]] if q.is_cuda or FRESH_TOGETHER_ON_CPU else []
    if len(fresh) > 1:
        batches = meta.cached(("fresh", cache.block_size, window), lambda: [
            _fresh_batch([fresh[i] for i in b], window, q.device)
            for b in _fresh_batches([len(lay["rows_np"]) for lay in fresh])])
        for fb in batches:
            out.index_copy_(0, fb["rows"], _attend_fresh(q, k, v, fb, scale))
        groups = [lay for lay in groups if not lay["fresh"]]
    for lay in groups:
        rows = lay["rows"]
        if lay["fresh"]:  # a first chunk: its new K/V are its whole context
            o = _self_attention(q.index_select(0, rows), k.index_select(0, rows), v.index_select(0, rows), scale, window)
        else:
            o = _attend(q.index_select(0, rows), cache, lay, scale)
        out.index_copy_(0, rows, o)
    return out


def _attend(q: torch.Tensor, cache: PagedKVCache, lay: dict[str, Any], scale: float | None) -> torch.Tensor:
    """Attention of one group's queries q [Tg, H, D] (its flattened tokens) over its gathered context."""
    T, H, D = q.shape
    B, max_q = lay["B"], lay["max_q"]
    kc, vc = cache.gather(lay["slots"])  # [B, max_ctx, KVH, D]
    KVH = kc.shape[2]
    if max_q == 1 and H != KVH:
        # Decode: fold each KV head's group of query heads into the query rows ([B, KVH, H/KVH, D])
        # instead of SDPA's GQA path (faster on CPU); the mask [B, 1, 1, S] broadcasts over them.
        o = _sdpa(q.view(B, KVH, H // KVH, D), kc.transpose(1, 2), vc.transpose(1, 2), lay["mask"], False, scale)
        return o.reshape(T, H, D)
    qb = q.view(B, max_q, H, D)  # the group's sequences bring max_q tokens each, in order
    o = _sdpa(qb.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), lay["mask"], False, scale)
    return o.transpose(1, 2).reshape(T, H, D)


def _self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                    window: int | None) -> torch.Tensor:
    """One sequence attending causally to exactly its own tokens: q [n, H, D], k/v [n, KVH, D]."""
    n = q.shape[0]
    mask = None
    if window is not None and n > window:
        i = torch.arange(n, device=q.device)
        mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)  # [n, n]
    o = _sdpa(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask,
              mask is None, scale)  # [1, H, n, D]
    return o[0].transpose(0, 1)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
          scale: float | None) -> torch.Tensor:
    """SDPA with grouped KV heads: q [B, H, Q, D], k/v [B, KVH, S, D] -> [B, H, Q, D]."""
    H, KVH = q.shape[1], k.shape[1]
    kw: dict[str, Any] = {}
    if H != KVH:
        if gqa_in_kernel(q.device.type, mask is not None):
            kw["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(H // KVH, dim=1), v.repeat_interleave(H // KVH, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, **kw)

"""Chunked copies: what a reshape sends between actors, cut into messages under max_message_bytes.

Every actor refuses a message above `ActorSettings.max_message_bytes` (runtime/actor.py; the sender
raises `MessageTooLarge`), and a reshape moves far more than that: a llama2-7b layer is ~400 MB in
fp16, a Llama-3-70B embedding 2.1 GB in one tensor, the KV of a long context GBs.  So every copy of
weights (stage to stage, stage to the weight cache, cache to stage) and of KV is planned here, by one
planner, into messages that each fit:

- `plan(items, budget)`: items of `rows` rows of `row_bytes` each (plus `overhead` bytes of message
  body per piece) packed in order; an item that fits a message of its own travels whole (a new
  message is begun rather than splitting it), a larger one is cut into row ranges, the first filling
  what is left of the current message.  Weights are planned with rows = elements (any tensor splits),
  KV with rows = tokens (an `ImportKV` item at t0 takes any token sub-range).
- `flat_slice(t, start, stop)`: elements [start, stop) of a tensor in row-major order, a view where
  the tensor is contiguous (else a copy of the rows it spans only: never of the whole tensor).
- `Assembler`: the receiver's side of a split tensor, preallocated at its first piece and filled in
  place, piece after piece in order.

`budget(max_message_bytes)` keeps headroom for the frame header and the msgpack body besides the
per-piece overheads the callers count (names, shapes, sequence ids).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from flexpipe.errors import MessageTooLarge, ProtocolError

__all__ = ["Piece", "Assembler", "budget", "limit_of", "plan", "flat_slice", "tensor_overhead"]


@dataclass(frozen=True, slots=True)
class Piece:
    """Rows [start, stop) of item `index` of a plan's input, in one message."""

    index: int
    start: int
    stop: int


def limit_of(settings: Any) -> int:
    """The max_message_bytes of an actor's (or actor system's) settings; the default where it has none
    (a behaviour driven by LocalContext)."""
    from flexpipe.runtime.actor import ActorSettings

    return int(getattr(settings, "max_message_bytes", 0) or ActorSettings().max_message_bytes)


def budget(max_message_bytes: int) -> int:
    """Bytes a plan may fill in one message of at most `max_message_bytes`: what is left after the
    14-byte frame header and the msgpack framing of the body (lists, field values), 1/16 of the limit
    kept for them, at least 256 bytes and at most 64 KiB."""
    return max_message_bytes - max(256, min(64 << 10, max_message_bytes // 16))


def tensor_overhead(name: str, ndim: int) -> int:
    """Bytes of message body one tensor (or piece of one) adds besides its data: its name, its ext
    header (dtype, shape, frame index) and a part descriptor (shape, start, stop), generously."""
    return len(name.encode()) + 18 * ndim + 96


def plan(items: Sequence[tuple[int, int, int]], budget: int) -> list[list[Piece]]:
    """Pack items (rows, row_bytes, overhead) in order into messages of at most `budget` bytes each,
    counting rows * row_bytes + overhead per piece.  An item that fits an empty message is never
    split; a larger one is cut into row ranges.  Empty items (0 rows) travel as a piece [0, 0).
    MessageTooLarge when a single row (with its overhead) is above the budget: nothing can carry it."""
    msgs: list[list[Piece]] = []
    cur: list[Piece] = []
    used = 0
    for i, (rows, row_bytes, over) in enumerate(items):
        if rows < 0 or row_bytes < 0 or over < 0:
            raise ValueError(f"item {i}: rows={rows}, row_bytes={row_bytes}, overhead={over} must be >= 0")
        if over + (row_bytes if rows else 0) > budget:
            raise MessageTooLarge(f"item {i} of a copy cannot be sent: one row of it is {row_bytes} bytes (+{over} "
                                  f"of header), above the {budget} bytes a message may carry: "
                                  f"{MessageTooLarge.HINT}")
        whole = over + rows * row_bytes
        if whole <= budget and used + whole > budget:
            msgs.append(cur)    # it fits a message of its own: begin one rather than split it
            cur, used = [], 0
        start = 0
        while True:
            room = budget - used - over
            fit = rows - start if row_bytes == 0 else (max(0, room) // row_bytes)
            if room >= 0 and fit >= rows - start:
                cur.append(Piece(i, start, rows))
                used += over + (rows - start) * row_bytes
                break
            if fit > 0:
                cur.append(Piece(i, start, start + fit))
                start += fit
            msgs.append(cur)   # (not empty: an empty message fits at least one row, checked above)
            cur, used = [], 0
    if cur:
        msgs.append(cur)
    return [m for m in msgs if m]


def flat_slice(t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Elements [start, stop) of `t` in row-major order, 1-d: a view of a contiguous tensor; of another
    (a transposed view) a copy of only the rows of dim 0 that the range spans."""
    if t.is_contiguous():
        return t.reshape(-1)[start:stop]
    row = t.numel() // t.shape[0]   # (non-contiguous: at least 2 dims, none of them empty)
    r0, r1 = start // row, -(-stop // row)
    return t[r0:r1].reshape(-1)[start - r0 * row:stop - r0 * row]


class Assembler:
    """Tensors arriving in pieces (elements [start, stop) of the flattened tensor, in order): the first
    piece preallocates the whole tensor, each piece is copied into place, and the last one hands it out.
    A piece out of order, or of another dtype or shape than the first, is a ProtocolError.  A tensor
    begun again (a first piece, or the whole tensor) replaces what an abandoned copy left of it."""

    def __init__(self) -> None:
        self._partial: dict[str, tuple[torch.Tensor, int]] = {}   # name -> (tensor, elements filled)

    def add(self, name: str, part: Any, piece: torch.Tensor) -> torch.Tensor | None:
        """The whole tensor once `piece` completes it (or when `part` is None: `piece` is whole), else None."""
        if part is None:
            self._partial.pop(name, None)
            return piece
        if not (isinstance(part, list) and len(part) == 3 and isinstance(part[0], list)
                and all(type(d) is int and d >= 0 for d in part[0]) and type(part[1]) is int
                and type(part[2]) is int):
            raise ProtocolError(f"piece of {name!r}: part {part!r:.80} is not [shape, start, stop]")
        shape, start, stop = part
        numel = math.prod(shape)
        buf, filled = self._partial.get(name, (None, 0)) if start else (None, 0)
        if start != filled or not start <= stop <= numel or piece.numel() != stop - start:
            raise ProtocolError(f"piece of {name!r} holds elements [{start}, {stop}) ({piece.numel()} of them) of "
                                f"{numel}: expected the next {filled}.. in order")
        if buf is None:
            buf = torch.empty(shape, dtype=piece.dtype)
        elif list(buf.shape) != shape or buf.dtype != piece.dtype:
            raise ProtocolError(f"piece of {name!r} is {piece.dtype}{shape}, earlier ones were {buf.dtype}"
                                f"{list(buf.shape)}")
        buf.view(-1)[start:stop].copy_(piece.reshape(-1))
        if stop == numel:
            self._partial.pop(name, None)
            return buf
        self._partial[name] = (buf, stop)
        return None

    @property
    def pending(self) -> list[str]:
        """Names of tensors of which some pieces, not all, have arrived."""
        return list(self._partial)

    def clear(self) -> None:
        """Drop tensors still incomplete (their transfer was abandoned)."""
        self._partial.clear()

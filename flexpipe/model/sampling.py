"""Sampling: greedy, temperature, top-k, top-p, with randomness keyed by (seed, output index).

The draw for output token n of a request is a Gumbel-max over noise generated from (seed, n) alone,
so a request's tokens never depend on what it was batched with, on preemption, or on reshapes.
Temperature, top-k and top-p are HF's warpers, in HF's order (warp_logits): the same tokens stay.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import secrets
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from flexpipe.errors import RequestError

MAX_TOKENS_LIMIT = 1_000_000
MAX_TOP_K = 2**31 - 1        # (any top_k >= the vocabulary keeps every token)
MAX_SEED = 2**63 - 1         # seeds travel in every step as 64-bit integers


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


@dataclass(slots=True)
class SamplingParams:
    """How to pick each next token; temperature 0 (or below GREEDY_BELOW) is greedy. top_k 0 and top_p 1 disable those filters."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None  # None: resolve_seed() draws one when the request is admitted
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # by default the model's EOS ids stop generation too

    def __post_init__(self) -> None:
        self.stop_token_ids = tuple(self.stop_token_ids or ())

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        """Raise RequestError saying what to change; returns self."""
        mt = self.max_tokens
        if isinstance(mt, bool) or not isinstance(mt, int) or not (1 <= mt <= MAX_TOKENS_LIMIT):
            raise RequestError(f"max_tokens must be an integer from 1 to {MAX_TOKENS_LIMIT} (got {mt!r})")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise RequestError(f"temperature must be a finite number >= 0, 0 for greedy (got {t!r})")
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_TOP_K:
            raise RequestError(f"top_k must be an integer from 0 to {MAX_TOP_K}, 0 to disable (got {_short(k)})")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 < p <= 1):
            raise RequestError(f"top_p must be in (0, 1], 1 to disable (got {p!r})")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -MAX_SEED - 1 <= self.seed <= MAX_SEED):
            raise RequestError(f"seed must be a 64-bit integer (-2**63 to 2**63 - 1) or None (got "
                               f"{_short(self.seed)})")
        for s in self.stop_token_ids:
            if isinstance(s, bool) or not isinstance(s, int) or s < 0 or (vocab_size is not None and s >= vocab_size):
                limit = f" below the vocabulary size {vocab_size}" if vocab_size is not None else ""
                raise RequestError(f"stop_token_ids must be token ids >= 0{limit} (got {s!r})")
        return self

    def resolve_seed(self) -> "SamplingParams":
        """A copy with a fresh random seed if none was given (so recomputation replays the same draws)."""
        if self.seed is not None:
            return self
        return dataclasses.replace(self, seed=secrets.randbits(63))

    def stop_ids(self, eos_token_ids: Sequence[int] = ()) -> frozenset[int]:
        """Token ids that end the request: stop_token_ids, plus the model's EOS unless ignore_eos."""
        return frozenset(self.stop_token_ids) | (frozenset() if self.ignore_eos else frozenset(eos_token_ids))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (msgpack-able)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["stop_token_ids"] = list(self.stop_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplingParams":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise RequestError(f"unknown sampling parameters {unknown}; known: {sorted(names)}")
        return cls(**d)


def _draw_seed(seed: int, n: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{n}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def gumbel_noise(seed: int, n: int, vocab_size: int) -> torch.Tensor:
    """[vocab] fp32 Gumbel noise for output token n of the request with this seed (generated on CPU)."""
    g = torch.Generator().manual_seed(_draw_seed(seed, n))
    u = torch.rand(vocab_size, generator=g)
    return -torch.log(-torch.log(u))  # u == 0 gives -inf: that token is never drawn


def warp_logits(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """fp32 [N, V]: each row as HF's sampling warpers leave it, in HF's order: divided by the temperature
    (TemperatureLogitsWarper), then top-k (TopKLogitsWarper), then top-p (TopPLogitsWarper); removed
    tokens are -inf. Every row needs temperature > 0.

    The filters repeat HF's operations, not just their maths, so that the kept set is HF's bit for bit:
    top-k keeps every token tied with the k-th value; top-p sorts the top-k survivors *ascending* with
    torch.sort's default (unstable) order, as TopPLogitsWarper does, and removes the tokens whose
    cumulative probability is <= 1 - top_p (compared in fp32), always keeping the last (most likely).
    At a tie across the nucleus' boundary the order of the tied tokens in that sort decides which stay,
    so a descending sort, or a stable one, keeps a different set. Each row depends on its own values
    only (torch.sort, softmax and cumsum work row by row), so batching cannot change what a row keeps."""
    N, V = logits.shape
    if len(params) != N or any(p.temperature <= 0 for p in params):
        raise ValueError(f"warp_logits: {N} logit rows need as many params, each with temperature > 0")
    dev = logits.device
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
    x = logits.float() / temps[:, None]  # (the same fp32 quotient as HF's scores / temperature)
    ks = [p.top_k if 0 < p.top_k < V else 0 for p in params]  # 0: no top-k on this row
    if any(ks):
        # the k-th largest value (a value: no order of ties enters), as HF's torch.topk(scores, k)[0][-1]
        at = torch.tensor([max(k, 1) - 1 for k in ks], device=dev)[:, None]
        kth = x.topk(max(ks), dim=-1).values.gather(1, at)  # [N, 1]
        x = x.masked_fill((x < kth) & torch.tensor([k > 0 for k in ks], device=dev)[:, None], -math.inf)
    ps = [float(p.top_p) for p in params]
    if min(ps) < 1.0:
        sx, order = torch.sort(x, descending=False)
        cum = sx.softmax(dim=-1).cumsum(dim=-1)
        # HF compares with the Python float 1 - top_p, which torch rounds to fp32; top_p 1 is no filter
        drop = (cum <= torch.tensor([1.0 - p for p in ps], dtype=torch.float32, device=dev)[:, None]) & \
            torch.tensor([p < 1.0 for p in ps], device=dev)[:, None]
        drop[:, -1] = False
        x = x.masked_fill(drop.scatter(1, order, drop), -math.inf)
    return x


# Temperatures below this are greedy (vLLM's _SAMPLING_EPS does the same): logits / 1e-40 overflow fp32 to
# infinities, and the draw over them was token 0 whatever the logits (HF's sampling does the same).
GREEDY_BELOW = 1e-5


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], out_index: Sequence[int]) -> torch.Tensor:
    """Next token [N] int64 for logits [N, V]; row i is output token out_index[i] of its request.
    Greedy rows (temperature < GREEDY_BELOW) take the argmax; the others a Gumbel-max draw over
    warp_logits (HF's warpers)."""
    N, V = logits.shape
    if len(params) != N or len(out_index) != N:
        raise ValueError(f"sample: {N} logit rows but {len(params)} params and {len(out_index)} indices")
    out = logits.argmax(dim=-1)  # greedy rows keep this
    rows = [i for i, p in enumerate(params) if p.temperature >= GREEDY_BELOW]
    if not rows:
        return out
    if any(params[i].seed is None for i in rows):
        raise ValueError("sampling with temperature > 0 needs a seed: call SamplingParams.resolve_seed()")
    dev = logits.device
    idx = torch.tensor(rows, dtype=torch.int64, device=dev)
    x = warp_logits(logits.index_select(0, idx), [params[i] for i in rows])
    noise = torch.stack([gumbel_noise(params[i].seed, out_index[i], V) for i in rows]).to(dev)
    out[idx] = (x + noise).argmax(dim=-1)
    return out

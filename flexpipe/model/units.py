"""The decoder as a chain of units: Embedding, Attention(i), MLP(i) for every layer, Head.

Every unit maps the residual stream x [T, hidden] to the next (Embedding takes token ids [T], Head
returns logits), so any contiguous range of units is a valid pipeline stage. Units are ordinary
nn.Modules holding only their own tensors, named as in HF checkpoints. On the CPU a unit keeps its
matrices transposed, [in, out] (`Unit.transposed`): there oneDNN/MKL's sgemm runs `x @ W^T` from that
layout 1.4-2x faster than F.linear's from HF's [out, in] (more at a few rows than at many; the
"matmul" line of `benchmarks/bench_pipeline.py --profile`);
`Unit.hf_tensors()` gives them back in HF's layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flexpipe.errors import CheckpointError
from flexpipe.model.attention import AttnMetadata, PagedKVCache, paged_attention
from flexpipe.model.config import OPT_POSITION_OFFSET, ModelConfig


class WeightSource(Protocol):
    """Where unit tensors come from: PresetWeights or CheckpointReader (model/checkpoint.py)."""

    def load(self, names: Sequence[str], dtype: torch.dtype | None = None,
             device: torch.device | str | None = None) -> dict[str, torch.Tensor]: ...


# --- tensor names and shapes (HF naming) ---------------------------------------------------------
def _roles(cfg: ModelConfig, i: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Unit i's tensors: role -> (HF tensor name, shape)."""
    kind, layer = cfg.unit_kind(i), cfg.unit_layer(i)
    H, V, I = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    opt = cfg.arch == "opt"
    base = "model.decoder" if opt else "model"
    embed = f"{base}.embed_tokens.weight"
    r: dict[str, tuple[str, tuple[int, ...]]] = {}
    if kind == "embedding":
        r["weight"] = (embed, (V, H))
        if opt:
            r["pos_weight"] = (f"{base}.embed_positions.weight", (cfg.max_position_embeddings + OPT_POSITION_OFFSET, H))
    elif kind == "head":
        norm = f"{base}.final_layer_norm" if opt else f"{base}.norm"
        r["norm_w"] = (f"{norm}.weight", (H,))
        if opt:
            r["norm_b"] = (f"{norm}.bias", (H,))
        # Tied: the Head holds its own copy of the embedding matrix (explicitly replicated).
        r["lm_w"] = (embed if cfg.tie_word_embeddings else "lm_head.weight", (V, H))
    elif kind == "attention":
        p = f"{base}.layers.{layer}"
        if opt:
            r["norm_w"], r["norm_b"] = (f"{p}.self_attn_layer_norm.weight", (H,)), (f"{p}.self_attn_layer_norm.bias", (H,))
        else:
            r["norm_w"] = (f"{p}.input_layernorm.weight", (H,))
        o_name = "out_proj" if opt else "o_proj"
        for role, proj, out in (("q", "q_proj", q_out), ("k", "k_proj", kv_out), ("v", "v_proj", kv_out)):
            r[f"{role}_w"] = (f"{p}.self_attn.{proj}.weight", (out, H))
            if cfg.attention_bias:
                r[f"{role}_b"] = (f"{p}.self_attn.{proj}.bias", (out,))
        r["o_w"] = (f"{p}.self_attn.{o_name}.weight", (H, q_out))
        if cfg.o_proj_bias:
            r["o_b"] = (f"{p}.self_attn.{o_name}.bias", (H,))
    else:  # mlp
        p = f"{base}.layers.{layer}"
        if opt:
            r["norm_w"], r["norm_b"] = (f"{p}.final_layer_norm.weight", (H,)), (f"{p}.final_layer_norm.bias", (H,))
            mats = (("fc1", f"{p}.fc1", (I, H)), ("fc2", f"{p}.fc2", (H, I)))
        else:
            r["norm_w"] = (f"{p}.post_attention_layernorm.weight", (H,))
            mats = (("gate", f"{p}.mlp.gate_proj", (I, H)), ("up", f"{p}.mlp.up_proj", (I, H)),
                    ("down", f"{p}.mlp.down_proj", (H, I)))
        for role, name, shape in mats:
            r[f"{role}_w"] = (f"{name}.weight", shape)
            if cfg.mlp_bias:
                r[f"{role}_b"] = (f"{name}.bias", shape[:1])
    return r


def tensor_specs(cfg: ModelConfig, unit_index: int) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for the tensors unit `unit_index` needs."""
    return {name: shape for name, shape in _roles(cfg, unit_index).values()}


def tensor_names(cfg: ModelConfig, unit_index: int) -> list[str]:
    """HF tensor names unit `unit_index` needs."""
    return list(tensor_specs(cfg, unit_index))


def all_tensor_specs(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model (a tied embedding appears once)."""
    out: dict[str, tuple[int, ...]] = {}
    for i in range(cfg.num_units):
        out.update(tensor_specs(cfg, i))
    return out


# --- costs (no tensors allocated) ----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class UnitCost:
    """What a unit costs; FLOPs count the matmuls (2 per weight), not attention over the context."""

    index: int
    name: str
    kind: str  # "embedding" | "attention" | "mlp" | "head"
    layer: int | None
    param_bytes: int
    flops_per_token: float
    kv_bytes_per_token: int
    act_bytes_per_token: int  # the unit's output per token: residual stream, or fp32 logits for Head


def unit_costs(cfg: ModelConfig, dtype_bytes: int = 2) -> list[UnitCost]:
    """Per-unit costs of `cfg` with weights and KV stored at `dtype_bytes` per element."""
    out = []
    for i in range(cfg.num_units):
        kind = cfg.unit_kind(i)
        params = flops = 0
        for role, (_, shape) in _roles(cfg, i).items():
            n = math.prod(shape)
            params += n
            if len(shape) == 2 and kind != "embedding":
                flops += 2 * n
        kv = 2 * cfg.num_kv_heads * cfg.head_dim * dtype_bytes if kind == "attention" else 0
        act = cfg.vocab_size * 4 if kind == "head" else cfg.hidden_size * dtype_bytes
        out.append(UnitCost(i, cfg.unit_name(i), kind, cfg.unit_layer(i), params * dtype_bytes, float(flops),
                            kv, act))
    return out


def attention_flops_per_token(cfg: ModelConfig, context_len: int) -> float:
    """FLOPs of one query token attending over `context_len` keys (QK^T and AV), per attention unit."""
    return 4.0 * cfg.num_heads * cfg.head_dim * context_len


# --- numerics shared with HF transformers ---------------------------------------------------------
def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm, computed in fp32 and cast back before the weight, as HF does:
    `w * (xf * rsqrt(mean(xf^2) + eps)).to(x.dtype)` with xf = x.float().

    torch's fused op gives the same numbers as those steps (tests/test_model_units.py checks it on
    CPU): one op in fp32, four in fp16/bf16 instead of eight. A decode step on a GPU is bound by
    its kernel launches (docs/gpu.md: ~1200 a step for Llama-2-7B, 65 norms of them).
    """
    if x.dtype == torch.float32 and w.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    return w * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """[head_dim/2] fp32 inverse frequencies, with linear or llama3 scaling applied."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    if rs["rope_type"] == "linear":
        return inv / rs["factor"]
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    lo_wavelen, hi_wavelen = old / lo, old / hi
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > lo_wavelen, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < hi_wavelen) * ~(wavelen > lo_wavelen)
    return torch.where(medium, smoothed, scaled)


_ROPE_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def rope_tables(cfg: ModelConfig, n: int, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin [>= n, head_dim] of positions 0, 1, ...: built once per process and
    grown by doubling, so a step only indexes them (the same numbers as computing them per step).

    HF rotates with `q * cos + rotate_half(q) * sin`, rotate_half(q) = cat(-q2, q1).  With the sign
    folded into sin (cat(-sin1, sin2)) that is `q * cos + q.roll(hd/2, -1) * sin`: bit-identical,
    since (-a) * b == a * (-b) exactly, and four ops instead of seven.
    """
    key = (cfg.head_dim, cfg.rope_theta, repr(cfg.rope_scaling), dtype, str(device))
    tab = _ROPE_TABLES.get(key)
    if tab is None or tab[0].shape[0] < n:
        size = max(n, 256, 2 * tab[0].shape[0] if tab is not None else 0)
        inv = rope_inv_freq(cfg).to(device)
        freqs = torch.arange(size, dtype=torch.int64, device=device).float()[:, None] * inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [size, hd]
        sin = emb.sin().to(dtype)
        h = cfg.head_dim // 2
        tab = _ROPE_TABLES[key] = (emb.cos().to(dtype), torch.cat((-sin[:, :h], sin[:, h:]), dim=-1))
    return tab


# --- units ---------------------------------------------------------------------------------------
def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """x @ W^T + b for a weight held as HF holds it ([out, in]) or `transposed` ([in, out])."""
    if not transposed:
        return F.linear(x, w, b)
    return x @ w if b is None else torch.addmm(b, x, w)


class Unit(nn.Module):
    """One unit of the chain; holds only its own tensors (registered under role names).

    The roles in `_matrices` are held transposed ([in, out]) when the unit is on the CPU; see the
    module docstring. `transposed` says which layout this unit holds.
    """

    kind = ""
    _matrices: tuple[str, ...] = ()

    def __init__(self, cfg: ModelConfig, index: int, tensors: Mapping[str, torch.Tensor]):
        super().__init__()
        if cfg.unit_kind(index) != self.kind:
            raise ValueError(f"unit {index} of {cfg.name} is a {cfg.unit_kind(index)}, not a {self.kind}")
        self.cfg, self.index = cfg, index
        self.name, self.layer = cfg.unit_name(index), cfg.unit_layer(index)
        roles = _roles(cfg, index)
        self.transposed = tensors[next(iter(roles.values()))[0]].device.type == "cpu"
        for role, (hf_name, _) in roles.items():
            t = tensors[hf_name]
            if self.transposed and role in self._matrices:
                t = t.t().contiguous()
            self.register_parameter(role, nn.Parameter(t, requires_grad=False))
        for role in self._optional:
            if not hasattr(self, role):
                self.register_parameter(role, None)

    _optional: tuple[str, ...] = ()

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        """This unit's tensors by HF name, in HF's layout (views: no copy)."""
        out = {}
        for role, (hf_name, _) in _roles(self.cfg, self.index).items():
            t = getattr(self, role).detach()
            out[hf_name] = t.t() if self.transposed and role in self._matrices else t
        return out

    @property
    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"index={self.index}, name={self.name!r}"


class Embedding(Unit):
    """Token ids [T] (+ learned positions for OPT) -> residual stream [T, hidden]."""

    kind = "embedding"
    _optional = ("pos_weight",)

    def forward(self, x: torch.Tensor, meta: AttnMetadata, kv: PagedKVCache | None = None) -> torch.Tensor:
        h = F.embedding(x, self.weight)  # [T, H]
        if self.pos_weight is not None:
            h = h + F.embedding(meta.positions + OPT_POSITION_OFFSET, self.pos_weight)
        return h


class Attention(Unit):
    """Pre-norm self-attention over the paged KV of this unit, plus the residual add."""

    kind = "attention"
    _optional = ("norm_b", "q_b", "k_b", "v_b", "o_b")
    _matrices = ("q_w", "k_w", "v_w", "o_w")

    def forward(self, x: torch.Tensor, meta: AttnMetadata, kv: PagedKVCache | None = None) -> torch.Tensor:
        cfg = self.cfg
        T = x.shape[0]
        nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        tr = self.transposed
        if cfg.arch == "opt":
            h = F.layer_norm(x, (cfg.hidden_size,), self.norm_w, self.norm_b, cfg.norm_eps)
            # OPT scales q before attention (as HF does), so SDPA runs with scale 1.
            q = (linear(h, self.q_w, self.q_b, tr) * hd ** -0.5).view(T, nh, hd)
            k = linear(h, self.k_w, self.k_b, tr).view(T, nkv, hd)
            v = linear(h, self.v_w, self.v_b, tr).view(T, nkv, hd)
            o = paged_attention(q, k, v, kv, meta, scale=1.0)
        else:
            h = rms_norm(x, self.norm_w, cfg.norm_eps)  # [T, H]
            q = linear(h, self.q_w, self.q_b, tr).view(T, nh, hd)
            k = linear(h, self.k_w, self.k_b, tr).view(T, nkv, hd)
            v = linear(h, self.v_w, self.v_b, tr).view(T, nkv, hd)
            cos, sin = meta.cached(("rope", id(cfg), x.dtype, x.device), lambda: self._cos_sin(meta, x))
            half = hd // 2
            q = q * cos + q.roll(half, -1) * sin  # cos/sin: [T, 1, hd]; see rope_tables
            k = k * cos + k.roll(half, -1) * sin
            o = paged_attention(q, k, v, kv, meta, scale=None, window=cfg.sliding_window)
        return x + linear(o.reshape(T, nh * hd), self.o_w, self.o_b, tr)  # o: [T, nh, hd]

    def _cos_sin(self, meta: AttnMetadata, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rope_tables(self.cfg, max(meta.context_lens), x.dtype, x.device)
        return cos.index_select(0, meta.positions)[:, None, :], sin.index_select(0, meta.positions)[:, None, :]


class MLP(Unit):
    """Pre-norm feed-forward (SwiGLU for Llama, fc1-ReLU-fc2 for OPT), plus the residual add."""

    kind = "mlp"
    _optional = ("norm_b", "gate_b", "up_b", "down_b", "fc1_b", "fc2_b")
    _matrices = ("gate_w", "up_w", "down_w", "fc1_w", "fc2_w")

    def forward(self, x: torch.Tensor, meta: AttnMetadata, kv: PagedKVCache | None = None) -> torch.Tensor:
        cfg, tr = self.cfg, self.transposed
        if cfg.arch == "opt":
            h = F.layer_norm(x, (cfg.hidden_size,), self.norm_w, self.norm_b, cfg.norm_eps)
            return x + linear(F.relu(linear(h, self.fc1_w, self.fc1_b, tr)), self.fc2_w, self.fc2_b, tr)
        h = rms_norm(x, self.norm_w, cfg.norm_eps)
        g = F.silu(linear(h, self.gate_w, self.gate_b, tr)) * linear(h, self.up_w, self.up_b, tr)  # [T, I]
        return x + linear(g, self.down_w, self.down_b, tr)


class Head(Unit):
    """Final norm + lm_head: residual rows [R, hidden] -> fp32 logits [R, vocab]."""

    kind = "head"
    _optional = ("norm_b",)
    _matrices = ("lm_w",)

    def forward(self, x: torch.Tensor, meta: AttnMetadata | None = None,
                kv: PagedKVCache | None = None) -> torch.Tensor:
        cfg = self.cfg
        if cfg.arch == "opt":
            h = F.layer_norm(x, (cfg.hidden_size,), self.norm_w, self.norm_b, cfg.norm_eps)
        else:
            h = rms_norm(x, self.norm_w, cfg.norm_eps)
        return linear(h, self.lm_w, None, self.transposed).float()


UNIT_CLASSES: dict[str, type[Unit]] = {"embedding": Embedding, "attention": Attention, "mlp": MLP, "head": Head}


def build_units(cfg: ModelConfig, start: int, end: int, source: WeightSource,
                dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> list[Unit]:
    """Units [start, end) of `cfg`, loading only their tensors from `source`."""
    if not (0 <= start < end <= cfg.num_units):
        raise ValueError(f"unit range [{start}, {end}) is not inside 0..{cfg.num_units} of {cfg.name}")
    specs: dict[str, tuple[int, ...]] = {}
    for i in range(start, end):
        specs.update(tensor_specs(cfg, i))
    tensors = source.load(list(specs), dtype=dtype, device=device)
    for name, shape in specs.items():
        t = tensors.get(name)
        if t is None:
            raise CheckpointError(f"weight source {source!r} did not provide tensor {name!r} (shape {list(shape)})")
        if tuple(t.shape) != shape:
            raise CheckpointError(f"weight source {source!r}: tensor {name!r} has shape {list(t.shape)}, "
                                  f"config {cfg.name} expects {list(shape)}")
    return [UNIT_CLASSES[cfg.unit_kind(i)](cfg, i, tensors) for i in range(start, end)]


def make_kv_caches(cfg: ModelConfig, units: Iterable[Unit], num_blocks: int, block_size: int,
                   dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> dict[int, PagedKVCache]:
    """One PagedKVCache per attention unit in `units`, keyed by unit index."""
    return {u.index: PagedKVCache(num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, dtype, device)
            for u in units if u.kind == "attention"}


@torch.no_grad()
def run_units(units: Sequence[Unit], x: torch.Tensor, meta: AttnMetadata,
              kv_caches: Mapping[int, PagedKVCache] | None = None,
              logit_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Thread x through `units` in order; kv_caches maps an attention unit's index to its cache.

    x is token ids [T] if the first unit is the Embedding, else the residual stream [T, hidden].
    logit_rows (e.g. meta.last_token_rows()) picks the rows the Head sees; default all rows.
    """
    for u in units:
        if u.kind == "head" and logit_rows is not None:
            x = x.index_select(0, logit_rows)
        x = u(x, meta, kv_caches.get(u.index) if (kv_caches is not None and u.kind == "attention") else None)
    return x

"""ModelConfig: the shape of a Llama-family or OPT decoder, from an HF config.json or a named preset."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexpipe.errors import ConfigError, UnknownModelError, UnsupportedArchitectureError

log = logging.getLogger("flexpipe.model")
ARCHS = ("llama", "opt")
# HF architecture name -> our arch.  Mistral and Qwen2 are Llama with a sliding window / qkv bias.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "OPTForCausalLM": "opt",
}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "opt": "OPTForCausalLM"}
ROPE_TYPES = ("linear", "llama3")  # plus None (plain RoPE); dynamic/yarn change with length: not supported
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

# Byte-level vocabulary of the built-in tiny models: ids 0..255 are bytes, then the specials.
BYTE_BOS, BYTE_EOS, BYTE_PAD, BYTE_VOCAB = 256, 257, 258, 320
OPT_POSITION_OFFSET = 2  # OPT's learned positions are looked up at position + 2 (a fairseq legacy)
GENERATION_CONFIG = "generation_config.json"


@dataclass(slots=True)
class ModelConfig:
    """Shape and numerics of a decoder; `__post_init__` validates and derives head_dim/num_kv_heads."""

    arch: str = "llama"
    vocab_size: int = BYTE_VOCAB
    hidden_size: int = 128
    intermediate_size: int = 352
    num_layers: int = 8
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: = num_heads (MHA)
    head_dim: int | None = None  # None: hidden_size // num_heads
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3", "factor": ..., ...}
    sliding_window: int | None = None  # Mistral: a query sees the last `sliding_window` keys
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections
    o_proj_bias: bool = False  # bias on the attention output projection (Llama ties it to attention_bias)
    mlp_bias: bool = False
    bos_token_id: int | None = None
    # Every id that ends generation (unless a request sets ignore_eos): the oracle and the router both
    # stop on exactly these. From a checkpoint: config.json's eos_token_id plus generation_config.json's
    # (what HF's generate stops on); not the tokenizer's eos_token, which HF's generate ignores too.
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"model config {self.name!r}: {msg}")

        if self.arch not in ARCHS:
            raise bad(f"arch {self.arch!r} is not one of {ARCHS}")
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "max_position_embeddings"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(f"{f} must be a positive integer (got {v!r})")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise bad(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
                          " (give head_dim explicitly)")
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise bad(f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim < 2 or self.head_dim % 2:
            raise bad(f"head_dim must be even and >= 2 (got {self.head_dim})")
        if not (self.norm_eps > 0 and math.isfinite(self.norm_eps)):
            raise bad(f"norm_eps must be positive (got {self.norm_eps})")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise bad(f"sliding_window must be >= 1 or None (got {self.sliding_window})")
        if isinstance(self.eos_token_ids, int):
            self.eos_token_ids = (self.eos_token_ids,)
        self.eos_token_ids = tuple(int(e) for e in (self.eos_token_ids or ()))
        for tid in (self.bos_token_id, self.pad_token_id, *self.eos_token_ids):
            if tid is not None and not (0 <= tid < self.vocab_size):
                raise bad(f"special token id {tid} is outside the vocabulary [0, {self.vocab_size})")
        if self.arch == "opt":
            if self.num_kv_heads != self.num_heads or self.head_dim * self.num_heads != self.hidden_size:
                raise bad("OPT has plain multi-head attention: num_kv_heads == num_heads and "
                          "head_dim * num_heads == hidden_size")
            if self.rope_scaling is not None or self.sliding_window is not None:
                raise bad("OPT uses learned positions: rope_scaling and sliding_window must be None")
        else:
            if not self.rope_theta > 0:
                raise bad(f"rope_theta must be positive (got {self.rope_theta})")
            self.rope_scaling = _check_rope_scaling(self.rope_scaling, self.name, self.max_position_embeddings)

    # --- units (docs/CONTRACTS.md): 0 = Embedding, 1+2i = Attention(i), 2+2i = MLP(i), 2L+1 = Head
    @property
    def num_units(self) -> int:
        return 2 * self.num_layers + 2

    @property
    def eos_token_id(self) -> int | None:
        """The first EOS id: a tokenizer's fallback EOS only; generation stops on all of eos_token_ids."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def unit_kind(self, i: int) -> str:
        """'embedding' | 'attention' | 'mlp' | 'head' for unit i."""
        self._check_unit(i)
        if i == 0:
            return "embedding"
        if i == self.num_units - 1:
            return "head"
        return "attention" if i % 2 == 1 else "mlp"

    def unit_layer(self, i: int) -> int | None:
        """Decoder layer of unit i (None for Embedding and Head)."""
        kind = self.unit_kind(i)
        return (i - 1) // 2 if kind in ("attention", "mlp") else None

    def unit_name(self, i: int) -> str:
        """Readable name of unit i: embedding, attention.3, mlp.3, head."""
        kind, layer = self.unit_kind(i), self.unit_layer(i)
        return kind if layer is None else f"{kind}.{layer}"

    def _check_unit(self, i: int) -> None:
        if not (0 <= i < self.num_units):
            raise IndexError(f"unit {i} out of range: {self.name} has units 0..{self.num_units - 1}")

    # --- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain dict (msgpack/JSON-able) that from_dict() turns back into an equal config."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Inverse of to_dict()."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown model config fields {unknown}; known: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_hf(cls, path_or_dict: str | Path | dict[str, Any], name: str | None = None) -> "ModelConfig":
        """Read an HF config.json (a checkpoint directory, the file itself, or its parsed dict); from a
        file, the EOS ids of generation_config.json beside it stop generation too."""
        gen_eos: tuple = ()
        if isinstance(path_or_dict, dict):
            raw, where = path_or_dict, "<config dict>"
        else:
            p = Path(path_or_dict)
            if p.is_dir():
                p = p / "config.json"
            where = str(p)
            try:
                raw = json.loads(p.read_text())
            except FileNotFoundError:
                raise ConfigError(f"{where}: no such file; an HF checkpoint directory needs config.json") from None
            except (OSError, ValueError) as e:
                raise ConfigError(f"{where}: not a readable JSON config ({e})") from None
            if name is None:
                name = raw.get("flexpipe_name") or p.parent.name
            gen_eos = _generation_eos(p.parent / GENERATION_CONFIG)
        return _from_hf_dict(raw, where, name or raw.get("flexpipe_name") or raw.get("model_type", "hf"), gen_eos)

    @staticmethod
    def preset(name: str) -> "ModelConfig":
        """The named preset (see `preset`)."""
        return preset(name)

    def to_hf(self) -> dict[str, Any]:
        """HF config.json content for this config (what save_checkpoint writes)."""
        return _to_hf_dict(self)


def _check_rope_scaling(rs: dict | None, name: str, max_positions: int) -> dict | None:
    """The normalised scaling dict, or None for plain RoPE. A llama3 scaling without
    original_max_position_embeddings takes max_position_embeddings, as transformers' config does
    (standardize_rope_params: setdefault, so an explicit value, even null, is kept and checked)."""
    if not rs:
        return None
    rs = dict(rs)
    rtype = rs.pop("rope_type", None) or rs.pop("type", None) or "default"
    rs.pop("type", None)
    rs.pop("rope_theta", None)
    if rtype == "default":
        return None
    if rtype not in ROPE_TYPES:
        raise UnsupportedArchitectureError(
            f"model config {name!r}: rope scaling {rtype!r} is not supported; supported: {list(ROPE_TYPES)}")
    needed = ("factor",) if rtype == "linear" else _LLAMA3_KEYS
    if rtype == "llama3":
        rs.setdefault("original_max_position_embeddings", max_positions)
    missing = [k for k in needed if k not in rs]
    if missing:
        raise ConfigError(f"model config {name!r}: {rtype} rope scaling needs {missing}")
    bad = [k for k in needed if isinstance(rs[k], bool) or not isinstance(rs[k], (int, float))]
    if bad:
        hint = ("; leave original_max_position_embeddings out to use max_position_embeddings, as transformers "
                "does" if "original_max_position_embeddings" in bad else "")
        raise ConfigError(f"model config {name!r}: {rtype} rope scaling's {bad} must be numbers "
                          f"(got {[rs[k] for k in bad]}){hint}")
    out = {"rope_type": rtype}
    for k in needed:
        out[k] = float(rs[k]) if k != "original_max_position_embeddings" else int(rs[k])
    return out


def _hf_rope(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """The RoPE parameters transformers 5 uses: `rope_scaling` (4.x) if set replaces `rope_parameters`
    (5.x) whole; rope_theta falls back to the top-level key, then 10000. Both set and disagreeing
    (where transformers silently drops rope_parameters) is refused."""
    params, legacy = raw.get("rope_parameters") or {}, raw.get("rope_scaling") or {}
    for key, v in (("rope_parameters", params), ("rope_scaling", legacy)):
        if not isinstance(v, dict):
            raise ConfigError(f"{where}: {key} must be an object (got {v!r})")
    eff = dict(legacy or params)
    eff["rope_type"] = eff.get("rope_type") or eff.pop("type", None) or "default"
    eff.pop("type", None)
    eff.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    if legacy and params:
        for k, v in params.items():
            k = "rope_type" if k == "type" else k
            if (k, v) != ("rope_type", "default") and eff.get(k) != v:
                raise ConfigError(
                    f"{where}: rope_parameters and rope_scaling disagree on {k} ({v!r} and {eff.get(k)!r}); "
                    "transformers would use rope_scaling and ignore rope_parameters; keep only the one "
                    "the model was trained with")
    return eff


def _token_ids(v: Any, what: str) -> tuple[int, ...]:
    ids = () if v is None else tuple(v) if isinstance(v, (list, tuple)) else (v,)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise ConfigError(f"{what} must be a token id or a list of them (got {v!r})")
    return ids


def _generation_eos(p: Path) -> tuple[int, ...]:
    """eos_token_id of a generation_config.json (HF's generate stops on these: Llama-3-Instruct's
    <|eot_id|> is only there); () when there is no such file."""
    if not p.is_file():
        return ()
    try:
        raw = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{p}: not a readable JSON generation config ({e})") from None
    return _token_ids(raw.get("eos_token_id") if isinstance(raw, dict) else None, f"{p}: eos_token_id")


def _special_ids(raw: dict[str, Any], where: str, gen_eos: tuple[int, ...]) -> dict[str, Any]:
    """bos/eos/pad ids for ModelConfig. transformers accepts ids outside the vocabulary (pad -1, a
    generation config's id the embedding lacks): such an id can never be produced, so dropping it
    changes nothing; a warning says so for bos/eos."""
    eos = tuple(dict.fromkeys(_token_ids(raw.get("eos_token_id"), f"{where}: eos_token_id") + gen_eos))
    bos, pad = raw.get("bos_token_id"), raw.get("pad_token_id")
    vocab = raw.get("vocab_size")
    if isinstance(vocab, int) and not isinstance(vocab, bool):
        def valid(t: Any) -> bool:
            return not isinstance(t, int) or 0 <= t < vocab  # a non-integer is ModelConfig's to refuse

        if [e for e in eos if not valid(e)]:
            log.warning("%s: eos ids %s are outside the vocabulary [0, %d) and can never be generated; "
                        "ignored%s", where, [e for e in eos if not valid(e)], vocab,
                        "" if any(map(valid, eos)) else " (no EOS is left: generation stops only at max_tokens "
                        "or a request's stop ids, as in transformers)")
            eos = tuple(e for e in eos if valid(e))
        if not valid(bos):
            log.warning("%s: bos_token_id %s is outside the vocabulary [0, %d); ignored", where, bos, vocab)
            bos = None
        pad = pad if valid(pad) else None  # pad -1 is a common "none"; FlexPipe never pads
    return dict(bos_token_id=bos, eos_token_ids=eos, pad_token_id=pad)


# What transformers' config classes assume for a key config.json leaves out (those that change the
# model; transformers 5's LlamaConfig, MistralConfig, Qwen2Config, OPTConfig). An explicit null stays null.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {"max_position_embeddings": 2048},
    "MistralForCausalLM": {"max_position_embeddings": 131072, "num_key_value_heads": 8, "sliding_window": 4096},
    "Qwen2ForCausalLM": {"max_position_embeddings": 32768, "num_key_value_heads": 32},
    "OPTForCausalLM": {"max_position_embeddings": 2048},
}


def _hf_architecture(raw: dict[str, Any], where: str) -> str:
    """The model transformers' AutoModelForCausalLM builds for `raw`: chosen by `model_type` (the
    config class), not by `architectures`, which it only records; `architectures` decides only when
    there is no model_type."""
    supported = sorted(HF_ARCHITECTURES)
    model_type, archs = raw.get("model_type"), raw.get("architectures") or []
    if model_type is not None:
        if model_type not in _MODEL_TYPES:
            raise UnsupportedArchitectureError(
                f"{where}: model_type {model_type!r} is not supported; supported model types: "
                f"{sorted(_MODEL_TYPES)} (transformers builds the model from model_type, whatever "
                f"'architectures' says)")
        hf_arch = _MODEL_TYPES[model_type]
        if archs and archs[0] != hf_arch:
            log.warning("%s: model_type %r builds %s, not the %s that 'architectures' names; loading it "
                        "as %s, as transformers does", where, model_type, hf_arch, archs[0], hf_arch)
        return hf_arch
    if not archs:
        raise UnsupportedArchitectureError(
            f"{where}: no 'architectures' or known 'model_type'; supported architectures: {supported}")
    if archs[0] not in HF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{where}: architecture {archs[0]!r} is not supported; supported: {supported}")
    return str(archs[0])


def _from_hf_dict(raw: dict[str, Any], where: str, name: str, gen_eos: tuple[int, ...] = ()) -> ModelConfig:
    hf_arch = _hf_architecture(raw, where)
    quant = raw.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "unnamed") if isinstance(quant, dict) else quant
        raise UnsupportedArchitectureError(
            f"{where}: a quantized checkpoint (quantization_config, quant_method {method!r}) is not "
            "supported: FlexPipe runs float32/float16/bfloat16 weights; load a checkpoint of unquantized "
            "weights, or dequantize this one and save it without quantization_config")
    raw = {**_HF_DEFAULTS[hf_arch], **raw}

    def unsupported(msg: str) -> UnsupportedArchitectureError:
        return UnsupportedArchitectureError(f"{where}: {hf_arch} with {msg} is not supported")

    def need(key: str) -> Any:
        if key not in raw:
            raise ConfigError(f"{where}: missing {key!r}, which {hf_arch} requires")
        return raw[key]

    common = dict(
        vocab_size=need("vocab_size"), hidden_size=need("hidden_size"),
        num_layers=need("num_hidden_layers"), num_heads=need("num_attention_heads"),
        max_position_embeddings=raw["max_position_embeddings"],
        **_special_ids(raw, where, gen_eos), name=name,
    )
    if HF_ARCHITECTURES[hf_arch] == "opt":
        if not raw.get("do_layer_norm_before", True):
            raise unsupported("do_layer_norm_before=false (post-LN, e.g. opt-350m)")
        if raw.get("_remove_final_layer_norm", False):
            raise unsupported("_remove_final_layer_norm=true")
        proj = raw.get("word_embed_proj_dim", common["hidden_size"])
        if proj != common["hidden_size"]:
            raise unsupported(f"word_embed_proj_dim={proj} != hidden_size={common['hidden_size']} "
                              "(project_in/out, e.g. opt-350m)")
        if raw.get("activation_function", "relu") != "relu":
            raise unsupported(f"activation_function={raw['activation_function']!r} (only relu)")
        if not raw.get("layer_norm_elementwise_affine", True):
            raise unsupported("layer_norm_elementwise_affine=false")
        bias = bool(raw.get("enable_bias", True))
        return _make(where, arch="opt", intermediate_size=need("ffn_dim"), norm_eps=1e-5,
                     tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
                     attention_bias=bias, o_proj_bias=bias, mlp_bias=bias, **common)

    if raw.get("hidden_act", "silu") != "silu":
        raise unsupported(f"hidden_act={raw['hidden_act']!r} (only silu)")
    scaling = _hf_rope(raw, where)
    theta = scaling["rope_theta"]
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise ConfigError(f"{where}: rope_theta must be a number (got {theta!r})")
    if scaling.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)) != 1.0:
        raise unsupported("partial_rotary_factor != 1")
    window = None
    if hf_arch == "Qwen2ForCausalLM":
        qkv_bias, o_bias, mlp_bias = True, False, False
        # as Qwen2Config: layers from max_window_layers on slide when use_sliding_window (4.x configs
        # have no layer_types); without use_sliding_window the window is None and every layer is full
        if raw.get("use_sliding_window") and raw.get("sliding_window", 4096) is not None:
            first, n = raw.get("max_window_layers", 28), common["num_layers"]
            types = raw.get("layer_types") or ["sliding_attention" if isinstance(first, int) and i >= first
                                               else "full_attention" for i in range(n if isinstance(n, int) else 0)]
            if "sliding_attention" in types:
                raise unsupported(f"use_sliding_window=true and sliding layers "
                                  f"{[i for i, t in enumerate(types) if t == 'sliding_attention']} (per-layer "
                                  "sliding windows; only Mistral's window on every layer is supported)")
    elif hf_arch == "MistralForCausalLM":
        qkv_bias = o_bias = mlp_bias = False
        window = raw.get("sliding_window")
    else:
        qkv_bias = o_bias = bool(raw.get("attention_bias", False))
        mlp_bias = bool(raw.get("mlp_bias", False))
    try:
        scaling = _check_rope_scaling(scaling, name, common["max_position_embeddings"])
    except UnsupportedArchitectureError:
        raise unsupported(f"rope scaling {scaling['rope_type']!r} (supported: {list(ROPE_TYPES)})") from None
    return _make(where, arch="llama", intermediate_size=need("intermediate_size"),
                 num_kv_heads=raw.get("num_key_value_heads"), head_dim=raw.get("head_dim"),
                 norm_eps=raw.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
                 sliding_window=window, tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                 attention_bias=qkv_bias, o_proj_bias=o_bias, mlp_bias=mlp_bias, **common)


def _make(where: str, **kw: Any) -> ModelConfig:
    try:
        return ModelConfig(**kw)
    except UnsupportedArchitectureError:
        raise
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _to_hf_dict(cfg: ModelConfig) -> dict[str, Any]:
    eos = list(cfg.eos_token_ids)
    d: dict[str, Any] = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": cfg.pad_token_id, "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": "float32", "flexpipe_name": cfg.name,
    }
    if cfg.arch == "opt":
        if not (cfg.attention_bias == cfg.o_proj_bias == cfg.mlp_bias):
            raise ConfigError(f"{cfg.name}: OPT export needs attention_bias == o_proj_bias == mlp_bias")
        d.update(architectures=["OPTForCausalLM"], model_type="opt", ffn_dim=cfg.intermediate_size,
                 word_embed_proj_dim=cfg.hidden_size, do_layer_norm_before=True, activation_function="relu",
                 enable_bias=cfg.attention_bias, layer_norm_elementwise_affine=True)
        return d
    d.update(intermediate_size=cfg.intermediate_size, num_key_value_heads=cfg.num_kv_heads,
             head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps, hidden_act="silu", rope_theta=cfg.rope_theta,
             rope_scaling=dict(cfg.rope_scaling) if cfg.rope_scaling else None)
    if cfg.attention_bias and not cfg.o_proj_bias and not cfg.mlp_bias and cfg.sliding_window is None:
        d.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False)
    elif cfg.sliding_window is not None:
        if cfg.attention_bias or cfg.o_proj_bias or cfg.mlp_bias:
            raise ConfigError(f"{cfg.name}: no HF architecture has a sliding window and biases")
        d.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=cfg.sliding_window)
    else:
        if cfg.attention_bias != cfg.o_proj_bias:
            raise ConfigError(f"{cfg.name}: Llama has one attention_bias flag for q/k/v and o")
        d.update(architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=cfg.attention_bias,
                 mlp_bias=cfg.mlp_bias)
    return d


# --- presets -------------------------------------------------------------------------------------
_LLAMA2 = dict(arch="llama", vocab_size=32000, max_position_embeddings=4096, norm_eps=1e-5,
               bos_token_id=1, eos_token_ids=(2,))
_PRESETS: dict[str, dict[str, Any]] = {
    # The embedded default: byte-level vocabulary, random weights from a fixed seed.
    "tiny": dict(arch="llama", vocab_size=BYTE_VOCAB, hidden_size=128, intermediate_size=352, num_layers=8,
                 num_heads=4, num_kv_heads=2, max_position_embeddings=2048, norm_eps=1e-5,
                 bos_token_id=BYTE_BOS, eos_token_ids=(BYTE_EOS,), pad_token_id=BYTE_PAD),
    "tiny-opt": dict(arch="opt", vocab_size=BYTE_VOCAB, hidden_size=128, intermediate_size=512, num_layers=8,
                     num_heads=4, max_position_embeddings=2048, tie_word_embeddings=True,
                     attention_bias=True, o_proj_bias=True, mlp_bias=True,
                     bos_token_id=BYTE_BOS, eos_token_ids=(BYTE_EOS,), pad_token_id=BYTE_PAD),
    # Full-size shapes (costs for the simulator and placement; never materialised in tests).
    "llama2-7b": dict(_LLAMA2, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32),
    "llama2-13b": dict(_LLAMA2, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40),
    "llama2-70b": dict(_LLAMA2, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                       num_kv_heads=8),
    "llama3-8b": dict(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_layers=32, num_heads=32, num_kv_heads=8, max_position_embeddings=8192,
                      norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000, eos_token_ids=(128001, 128009)),
    "mistral-7b": dict(arch="llama", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_layers=32, num_heads=32, num_kv_heads=8, max_position_embeddings=32768,
                       norm_eps=1e-5, sliding_window=4096, bos_token_id=1, eos_token_ids=(2,)),
    "qwen2-7b": dict(arch="llama", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                     num_layers=28, num_heads=28, num_kv_heads=4, max_position_embeddings=32768,
                     norm_eps=1e-6, rope_theta=1000000.0, attention_bias=True,
                     bos_token_id=151643, eos_token_ids=(151643,)),
    "opt-66b": dict(arch="opt", vocab_size=50272, hidden_size=9216, intermediate_size=36864, num_layers=64,
                    num_heads=72, max_position_embeddings=2048, tie_word_embeddings=True,
                    attention_bias=True, o_proj_bias=True, mlp_bias=True,
                    bos_token_id=2, eos_token_ids=(2,), pad_token_id=1),
}
PRESETS = tuple(_PRESETS)


def preset(name: str) -> ModelConfig:
    """The named preset ("tiny", "llama2-7b", ...); UnknownModelError lists them otherwise."""
    try:
        kw = _PRESETS[name]
    except KeyError:
        raise UnknownModelError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}") from None
    return ModelConfig(name=name, **kw)


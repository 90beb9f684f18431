"""Small random HF checkpoints written with transformers' save_pretrained, for oracle tests."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

# name -> (HF config class name, kwargs). Several per family: GQA ratios, tied/untied, bias, rope variants.
COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-mha": ("LlamaConfig", dict(COMMON, num_attention_heads=4, num_key_value_heads=4)),
    "llama-gqa4-llama3rope": ("LlamaConfig", dict(
        COMMON, num_attention_heads=8, num_key_value_heads=2, head_dim=16, attention_bias=True, mlp_bias=True,
        rope_theta=50000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "llama-tied-linear": ("LlamaConfig", dict(
        COMMON, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral-gqa-window": ("MistralConfig", dict(
        COMMON, num_attention_heads=4, num_key_value_heads=2, sliding_window=24)),
    "qwen2-bias": ("Qwen2Config", dict(COMMON, num_attention_heads=4, num_key_value_heads=2,
                                       rope_theta=1000000.0, use_sliding_window=False)),
    "qwen2-tied": ("Qwen2Config", dict(COMMON, num_attention_heads=2, num_key_value_heads=1, head_dim=48,
                                       tie_word_embeddings=True, use_sliding_window=False)),
    "opt": ("OPTConfig", dict(vocab_size=300, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64,
                              bos_token_id=2, eos_token_id=2, pad_token_id=1)),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Replace HF's std-0.02 init with larger scales so logits have clear top-2 margins."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # exercise the norm weights/biases too
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def make_hf_model(name: str, path: Path, seed: int = 0):
    """A random fp32 HF causal LM for CONFIGS[name], saved to `path`; returns the model (eval mode)."""
    import transformers

    cls_name, kw = CONFIGS[name]
    torch.manual_seed(seed)
    config = getattr(transformers, cls_name)(**kw)
    config._attn_implementation = "sdpa"  # the kernel our units use, so fp32 logits agree to ~1e-6
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    _randomize(model, seed)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    return model

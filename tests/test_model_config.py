"""ModelConfig: presets, HF config.json parsing for each family, validation, serialisation."""

from __future__ import annotations

import json

import msgpack
import pytest

from flexpipe.errors import ConfigError, UnknownModelError, UnsupportedArchitectureError
from flexpipe.model import PRESETS, ModelConfig, preset

LLAMA = {"architectures": ["LlamaForCausalLM"], "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
         "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": [2, 3], "hidden_act": "silu"}


def test_presets_and_unknown_name():
    assert set(PRESETS) >= {"tiny", "tiny-opt", "llama2-7b", "llama2-13b", "llama2-70b", "llama3-8b",
                            "mistral-7b", "qwen2-7b", "opt-66b"}
    tiny = preset("tiny")
    assert (tiny.vocab_size, tiny.hidden_size, tiny.num_layers, tiny.num_heads, tiny.num_kv_heads,
            tiny.intermediate_size, tiny.head_dim, tiny.tie_word_embeddings) == (320, 128, 8, 4, 2, 352, 32, False)
    assert ModelConfig.preset("llama2-70b").num_kv_heads == 8
    with pytest.raises(UnknownModelError) as e:
        preset("gpt5")
    assert "gpt5" in str(e.value) and "tiny" in str(e.value) and "opt-66b" in str(e.value)


def test_units_numbering():
    cfg = preset("tiny")
    assert cfg.num_units == 18
    assert [cfg.unit_name(i) for i in (0, 1, 2, 3, 16, 17)] == [
        "embedding", "attention.0", "mlp.0", "attention.1", "mlp.7", "head"]
    assert cfg.unit_layer(4) == 1 and cfg.unit_layer(17) is None
    with pytest.raises(IndexError):
        cfg.unit_name(18)


@pytest.mark.parametrize("name", PRESETS)
def test_dict_round_trip_through_msgpack(name):
    cfg = preset(name)
    wire = msgpack.unpackb(msgpack.packb(cfg.to_dict()))
    assert ModelConfig.from_dict(wire) == cfg


@pytest.mark.parametrize("name", PRESETS)
def test_hf_round_trip(name):
    cfg = preset(name)
    back = ModelConfig.from_hf(json.loads(json.dumps(cfg.to_hf())))
    assert back == cfg


def test_llama_from_hf_v4_and_v5_rope_formats(tmp_path):
    v4 = dict(LLAMA, rope_theta=500000.0, rope_scaling={"type": "llama3", "factor": 8, "low_freq_factor": 1,
                                                         "high_freq_factor": 4,
                                                         "original_max_position_embeddings": 8192})
    v5 = dict(LLAMA, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192})
    (tmp_path / "config.json").write_text(json.dumps(v4))
    a = ModelConfig.from_hf(tmp_path)
    b = ModelConfig.from_hf(v5, name=a.name)
    assert a == b
    assert a.rope_theta == 500000.0 and a.rope_scaling["rope_type"] == "llama3"
    assert a.eos_token_ids == (2, 3) and a.eos_token_id == 2 and a.num_kv_heads == 2 and a.head_dim == 16
    plain = ModelConfig.from_hf(dict(LLAMA, rope_parameters={"rope_type": "default", "rope_theta": 1e4}))
    assert plain.rope_scaling is None


def test_family_flags():
    qwen = ModelConfig.from_hf(dict(LLAMA, architectures=["Qwen2ForCausalLM"], use_sliding_window=False))
    assert qwen.attention_bias and not qwen.o_proj_bias and not qwen.mlp_bias
    mistral = ModelConfig.from_hf(dict(LLAMA, architectures=["MistralForCausalLM"], sliding_window=64))
    assert mistral.sliding_window == 64 and not mistral.attention_bias
    llama = ModelConfig.from_hf(dict(LLAMA, attention_bias=True))
    assert llama.attention_bias and llama.o_proj_bias and llama.sliding_window is None
    opt = ModelConfig.from_hf({"architectures": ["OPTForCausalLM"], "vocab_size": 500, "hidden_size": 64,
                               "ffn_dim": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                               "word_embed_proj_dim": 64, "eos_token_id": 2})
    assert opt.arch == "opt" and opt.tie_word_embeddings and opt.attention_bias and opt.mlp_bias
    assert opt.intermediate_size == 256


@pytest.mark.parametrize("patch, words", [
    ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "yarn"),
    ({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True,
      "layer_types": ["sliding_attention"] * 3}, "use_sliding_window"),
])
def test_unsupported_llama_variants(patch, words):
    with pytest.raises(UnsupportedArchitectureError) as e:
        ModelConfig.from_hf(dict(LLAMA, **patch))
    assert words in str(e.value)
    assert "supported" in str(e.value)


@pytest.mark.parametrize("patch, words", [
    ({"word_embed_proj_dim": 32}, "word_embed_proj_dim=32"),
    ({"do_layer_norm_before": False}, "do_layer_norm_before"),
    ({"activation_function": "gelu"}, "activation_function"),
])
def test_unsupported_opt_variants(patch, words, tmp_path):
    raw = {"architectures": ["OPTForCausalLM"], "vocab_size": 500, "hidden_size": 64, "ffn_dim": 256,
           "num_hidden_layers": 2, "num_attention_heads": 4, "word_embed_proj_dim": 64}
    (tmp_path / "config.json").write_text(json.dumps(dict(raw, **patch)))
    with pytest.raises(UnsupportedArchitectureError) as e:
        ModelConfig.from_hf(tmp_path)
    assert words in str(e.value) and str(tmp_path / "config.json") in str(e.value)


@pytest.mark.parametrize("kw, words", [
    (dict(num_heads=3), "not divisible"),
    (dict(num_kv_heads=3), "multiple of num_kv_heads"),
    (dict(hidden_size=0), "positive integer"),
    (dict(arch="gpt"), "arch"),
    (dict(eos_token_ids=(999,)), "outside the vocabulary"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
    (dict(arch="opt", num_kv_heads=2), "OPT"),
])
def test_invalid_configs(kw, words):
    with pytest.raises(ConfigError) as e:
        ModelConfig(**kw)
    assert words in str(e.value)


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="not a readable JSON"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(LLAMA, hidden_size=None) | {"hidden_size": 63}))
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_hf(tmp_path)
    with pytest.raises(ConfigError, match="unknown model config fields"):
        ModelConfig.from_dict({"hiden_size": 3})

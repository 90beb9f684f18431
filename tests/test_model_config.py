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


@pytest.mark.parametrize("rope", [
    # transformers-5 rope_parameters without rope_theta: the theta is the top-level key's
    dict(rope_theta=1e6, rope_parameters={"rope_type": "linear", "factor": 4.0}),
    dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 64}),
    # llama3 without original_max_position_embeddings: transformers takes max_position_embeddings
    dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
    dict(rope_theta=5e5, rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0}, original_max_position_embeddings=64),
    # a 5.x save with a 4.x rope_scaling added: transformers applies the rope_scaling
    dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rope_scaling={"type": "linear",
                                                                                     "factor": 4.0}),
    dict(rope_theta=5e5, rope_parameters={"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0},
         rope_scaling={"rope_type": "linear", "factor": 2.0}),
])
def test_rope_parameters_and_rope_scaling_read_as_transformers_does(rope):
    transformers = pytest.importorskip("transformers")
    raw = dict(LLAMA, **rope)
    hf = transformers.LlamaConfig.from_dict(json.loads(json.dumps(raw))).rope_parameters
    cfg = ModelConfig.from_hf(raw)
    assert cfg.rope_theta == hf["rope_theta"]
    assert cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == hf["rope_type"]
    assert all(cfg.rope_scaling[k] == hf[k] for k in cfg.rope_scaling)


def test_llama3_rope_without_original_max_positions_takes_max_position_embeddings():
    transformers = pytest.importorskip("transformers")
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    cfg = ModelConfig(rope_scaling=rs, max_position_embeddings=300)
    assert cfg.rope_scaling == dict(rs, original_max_position_embeddings=300)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg and ModelConfig.from_hf(cfg.to_hf()) == cfg
    # as transformers: an explicit value is kept (even one >= max_position_embeddings, which it only
    # warns about); an explicit null is refused (transformers fails comparing it), as is a missing factor
    assert ModelConfig(rope_scaling=dict(rs, original_max_position_embeddings=4096),
                       max_position_embeddings=300).rope_scaling["original_max_position_embeddings"] == 4096
    with pytest.raises(ConfigError, match="original_max_position_embeddings"):
        ModelConfig(rope_scaling=dict(rs, original_max_position_embeddings=None))
    with pytest.raises(Exception, match="NoneType"):
        transformers.LlamaConfig.from_dict(dict(LLAMA, rope_scaling=dict(rs, original_max_position_embeddings=None)))
    with pytest.raises(ConfigError, match="factor"):
        ModelConfig.from_hf(dict(LLAMA, rope_scaling={k: v for k, v in rs.items() if k != "factor"}))


@pytest.mark.parametrize("rope, error, words", [
    (dict(rope_theta=1e6, rope_parameters={"rope_type": "yarn", "factor": 4.0}), UnsupportedArchitectureError,
     "yarn"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4},
          rope_scaling={"type": "dynamic", "factor": 2.0}), UnsupportedArchitectureError, "dynamic"),
    # transformers would drop rope_parameters' theta for rope_scaling's default: refused, not guessed
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6},
          rope_scaling={"type": "linear", "factor": 4.0}), ConfigError, "disagree on rope_theta"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
          rope_scaling={"type": "linear", "factor": 4.0}), ConfigError, "disagree on factor"),
])
def test_rope_scaling_that_cannot_be_reproduced_is_refused(rope, error, words):
    with pytest.raises(error) as e:
        ModelConfig.from_hf(dict(LLAMA, **rope))
    assert words in str(e.value)


@pytest.mark.parametrize("max_window_layers", [0, 1, 2])
def test_qwen2_sliding_layers_of_a_4x_config_are_refused(max_window_layers):
    transformers = pytest.importorskip("transformers")
    # transformers-4.x configs have no layer_types: Qwen2Config derives them from max_window_layers
    raw = dict(LLAMA, architectures=["Qwen2ForCausalLM"], use_sliding_window=True, sliding_window=8,
               max_window_layers=max_window_layers)
    assert "sliding_attention" in transformers.Qwen2Config.from_dict(dict(raw)).layer_types
    with pytest.raises(UnsupportedArchitectureError, match="use_sliding_window"):
        ModelConfig.from_hf(raw)
    full = dict(raw, max_window_layers=LLAMA["num_hidden_layers"])  # no layer slides: plain attention
    assert set(transformers.Qwen2Config.from_dict(dict(full)).layer_types) == {"full_attention"}
    assert ModelConfig.from_hf(full).sliding_window is None


def test_special_ids_outside_the_vocabulary_are_dropped_as_transformers_accepts_them(caplog):
    transformers = pytest.importorskip("transformers")
    raw = dict(LLAMA, pad_token_id=-1, bos_token_id=1000, eos_token_id=[2, 1000, 3])
    transformers.LlamaConfig.from_dict(dict(raw))   # accepted there
    with caplog.at_level("WARNING", logger="flexpipe.model"):
        cfg = ModelConfig.from_hf(raw)
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_ids) == (None, None, (2, 3))
    assert "[1000]" in caplog.text and "bos_token_id 1000" in caplog.text
    # none left: no EOS (an id the model cannot produce never stopped generation anyway)
    assert ModelConfig.from_hf(dict(LLAMA, eos_token_id=-1)).eos_token_ids == ()
    with pytest.raises(ConfigError, match="outside the vocabulary"):   # a config built in code is still checked
        ModelConfig(eos_token_ids=(999,))


def test_generation_config_eos_ids_stop_generation_too(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))   # eos_token_id [2, 3]
    assert ModelConfig.from_hf(tmp_path).eos_token_ids == (2, 3)
    # as Llama-3-Instruct: <|eot_id|> is an EOS only in generation_config.json
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 7, 5000]}))
    cfg = ModelConfig.from_hf(tmp_path)
    assert cfg.eos_token_ids == (2, 3, 7)   # 5000 is outside the vocabulary
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg and ModelConfig.from_hf(cfg.to_hf()) == cfg
    (tmp_path / "generation_config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="generation_config.json"):
        ModelConfig.from_hf(tmp_path)

"""Checkpoints: per-unit loading, sharded indexes, export, and bad input that names file and tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import flexpipe.model.checkpoint as ckpt_mod
from flexpipe.errors import CheckpointError, ConfigError, UnsupportedArchitectureError
from flexpipe.model import (
    CheckpointReader, ModelConfig, PresetWeights, ReferenceModel, build_units, preset, save_checkpoint,
    tensor_names,
)
from flexpipe.model.units import all_tensor_specs


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    cfg = ModelConfig(name="small", num_layers=2, bos_token_id=256, eos_token_ids=(257,))
    return cfg, save_checkpoint(cfg, PresetWeights(cfg, 3), tmp_path_factory.mktemp("small") / "small")


def _copy(src, tmp_path):
    return shutil.copytree(src, tmp_path / "ckpt")


def test_export_round_trip_gives_same_model(tiny_dir):
    cfg, path = tiny_dir
    reader = CheckpointReader(path)
    assert reader.config == cfg
    prompt = [1, 2, 3, 4, 5]
    a = ReferenceModel(cfg, PresetWeights(cfg, 3)).prefill(prompt)
    b = ReferenceModel(reader.config, reader).prefill(prompt)
    assert torch.equal(a, b)


def test_preset_export_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = preset("tiny")
    save_checkpoint(cfg, PresetWeights(cfg, 0), tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompt = list(b"hello")
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0]
    got = ReferenceModel(cfg, PresetWeights(cfg, 0)).prefill(prompt)
    assert (got - want).abs().max().item() <= 1e-4


def test_sharded_checkpoint_opens_only_needed_shards(tiny_dir, tmp_path, monkeypatch):
    cfg, path = tiny_dir
    tensors = load_file(str(path / "model.safetensors"))
    names = sorted(tensors)
    shards = {f"model-0000{k + 1}-of-00003.safetensors": names[k::3] for k in range(3)}
    out = tmp_path / "sharded"
    out.mkdir()
    shutil.copy(path / "config.json", out / "config.json")
    weight_map = {}
    for fname, ns in shards.items():
        save_file({n: tensors[n] for n in ns}, str(out / fname))
        weight_map.update({n: fname for n in ns})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    opened = []
    real = ckpt_mod.safe_open
    monkeypatch.setattr(ckpt_mod, "safe_open", lambda f, **kw: opened.append(f) or real(f, **kw))
    reader = CheckpointReader(out)
    want = tensor_names(cfg, 1)  # attention.0
    got = reader.load(want)
    assert sorted(got) == sorted(want)
    assert {o.rsplit("/", 1)[1] for o in opened} == {weight_map[n] for n in want}
    for n in want:
        assert torch.equal(got[n], tensors[n])
    units = build_units(cfg, 0, cfg.num_units, reader)
    assert len(units) == cfg.num_units


def test_several_safetensors_without_index(tiny_dir, tmp_path):
    cfg, path = tiny_dir
    tensors = load_file(str(path / "model.safetensors"))
    names = sorted(tensors)
    out = tmp_path / "multi"
    out.mkdir()
    shutil.copy(path / "config.json", out / "config.json")
    save_file({n: tensors[n] for n in names[:5]}, str(out / "a.safetensors"))
    save_file({n: tensors[n] for n in names[5:]}, str(out / "b.safetensors"))
    got = CheckpointReader(out).load(names)
    assert all(torch.equal(got[n], tensors[n]) for n in names)


def test_missing_tensor_names_file_and_tensor(tiny_dir, tmp_path):
    cfg, path = tiny_dir
    p = _copy(path, tmp_path)
    tensors = load_file(str(p / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(p / "model.safetensors"))
    reader = CheckpointReader(p)
    with pytest.raises(CheckpointError) as e:
        build_units(cfg, 3, 5, reader)
    msg = str(e.value)
    assert "model.safetensors" in msg and "model.layers.1.mlp.up_proj.weight" in msg and "missing" in msg
    assert str([cfg.intermediate_size, cfg.hidden_size]) in msg
    build_units(cfg, 0, 3, reader)  # units that do not need it still load


def test_shape_mismatch_names_both_shapes(tiny_dir, tmp_path):
    cfg, path = tiny_dir
    p = _copy(path, tmp_path)
    tensors = load_file(str(p / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(96, cfg.hidden_size)
    save_file(tensors, str(p / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        build_units(cfg, 1, 2, CheckpointReader(p))
    msg = str(e.value)
    assert "k_proj.weight" in msg and "[96, 128]" in msg and "[128, 128]" in msg and "small" in msg and "model.safetensors" in msg


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_a_quantized_weight_is_refused_naming_its_format(tiny_dir, tmp_path, dtype):
    """float8 or int8 weights (bitsandbytes, FP8 re-uploads) need their scales; cast to fp32 as plain
    numbers they computed garbage (fp8) or failed in the first step with a dtype error (int8)."""
    cfg, path = tiny_dir
    p = _copy(path, tmp_path)
    tensors = load_file(str(p / "model.safetensors"))
    name = "model.layers.0.self_attn.k_proj.weight"
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, str(p / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        build_units(cfg, 1, 2, CheckpointReader(p))
    stored = "I8" if dtype == torch.int8 else "F8_E4M3"
    assert name in str(e.value) and f"stored as {stored}" in str(e.value) and "dequantize" in str(e.value)


def test_a_config_with_quantization_config_is_refused(tiny_dir, tmp_path):
    cfg, path = tiny_dir
    p = _copy(path, tmp_path)
    raw = json.loads((p / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (p / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UnsupportedArchitectureError, match="quantized checkpoint .*'fp8'"):
        CheckpointReader(p)


@pytest.mark.parametrize("damage", ["truncate", "garble_header", "tiny_file", "huge_length"])
def test_corrupt_file_fails_at_load_naming_the_file(tiny_dir, tmp_path, damage):
    cfg, path = tiny_dir
    p = _copy(path, tmp_path)
    f = p / "model.safetensors"
    data = f.read_bytes()
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garble_header":
        data = data[:8] + b"{not json" + data[17:]
    elif damage == "tiny_file":
        data = data[:5]
    else:
        data = (2**40).to_bytes(8, "little") + data[8:]
    f.write_bytes(data)
    reader = CheckpointReader(p)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        reader.load(list(all_tensor_specs(cfg)))


def test_missing_config_and_files(tmp_path, tiny_dir):
    with pytest.raises(CheckpointError, match="config.json"):
        CheckpointReader(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        CheckpointReader(tmp_path / "nope")
    _, path = tiny_dir
    shutil.copy(path / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        CheckpointReader(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"x": "gone.safetensors"}}')
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        CheckpointReader(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('not json')
    with pytest.raises(CheckpointError, match="index"):
        CheckpointReader(tmp_path)


def test_unsupported_architecture_names_file_and_supported_list(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "vocab_size": 10}))
    with pytest.raises(UnsupportedArchitectureError) as e:
        CheckpointReader(tmp_path)
    assert "config.json" in str(e.value) and "GPT2LMHeadModel" in str(e.value)
    assert "LlamaForCausalLM" in str(e.value) and "OPTForCausalLM" in str(e.value)
    assert isinstance(e.value, ConfigError)


def test_tensor_not_in_model_is_refused(tiny_dir):
    _, path = tiny_dir
    with pytest.raises(CheckpointError, match="not part of"):
        CheckpointReader(path).load(["model.layers.9.mlp.up_proj.weight"])
    cfg = preset("tiny")
    with pytest.raises(CheckpointError, match="not part of"):
        PresetWeights(cfg).load(["lm_head.bias"])


def test_load_converts_dtype_and_keeps_values(tiny_dir):
    cfg, path = tiny_dir
    name = "model.layers.0.mlp.down_proj.weight"
    got = CheckpointReader(path).load([name], dtype=torch.bfloat16)[name]
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, PresetWeights(cfg, 3).load([name])[name].bfloat16())

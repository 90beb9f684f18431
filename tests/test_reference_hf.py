"""The oracle against HF transformers on random tiny checkpoints saved with save_pretrained."""

from __future__ import annotations

import inspect

import pytest
import torch

from flexpipe.errors import UnsupportedArchitectureError
from flexpipe.model import CheckpointReader, ModelConfig, ReferenceModel, SamplingParams, generate
from helpers_hf import CONFIGS, make_hf_model

transformers = pytest.importorskip("transformers")

PROMPT = [5, 17, 99, 3, 200, 42, 7, 8, 150, 33, 12, 250, 61]
DECODE_STEPS = 32
TOL = 1e-4


def _hf_step(model, ids, cache):
    # transformers 5 renamed past_key_values to cache
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(torch.tensor([ids]), use_cache=True, **{kw: cache})
    return out.logits[0], getattr(out, "past_key_values", None) or getattr(out, "cache", None)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_hf_model(request.param, path)
    reader = CheckpointReader(path)
    return request.param, hf, reader, ReferenceModel(reader.config, reader)


@torch.no_grad()
def test_logits_match_hf_over_prefill_and_decode(pair):
    name, hf, _, ref = pair
    worst = _worst_logit_diff(hf, ref)
    assert worst <= TOL, f"{name}: max |logit diff| {worst:.2e} > {TOL}"


def _worst_logit_diff(hf, ref) -> float:
    """Largest |logit difference| of HF and the reference over the prompt's prefill and DECODE_STEPS
    greedy decode steps (HF's tokens fed to both)."""
    hl, cache = _hf_step(hf, PROMPT, None)
    worst = (hl - ref.prefill(PROMPT)).abs().max().item()
    tok = int(hl[-1].argmax())
    for _ in range(DECODE_STEPS):
        hl, cache = _hf_step(hf, [tok], cache)
        worst = max(worst, (hl[-1] - ref.decode(tok)).abs().max().item())
        tok = int(hl[-1].argmax())
    return worst


@torch.no_grad()
def test_greedy_tokens_match_hf_generate(pair):
    name, hf, _, ref = pair
    hf.generation_config.eos_token_id = None  # run the full 32 steps on both sides
    hf.generation_config.pad_token_id = 0
    want = hf.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                       max_new_tokens=DECODE_STEPS, do_sample=False)[0, len(PROMPT):].tolist()
    got = ref.generate(PROMPT, SamplingParams(max_tokens=DECODE_STEPS, ignore_eos=True))
    assert got == want, name


@torch.no_grad()
def test_generate_stops_at_eos_like_hf(tmp_path):
    hf = make_hf_model("llama-mha", tmp_path, seed=0)
    reader = CheckpointReader(tmp_path)
    cfg = reader.config
    ref = ReferenceModel(cfg, reader)
    # Make an EOS of whatever greedy picks fourth, so the stop is exercised on both sides.
    free = ref.generate(PROMPT, SamplingParams(max_tokens=8, ignore_eos=True))
    eos = free[3]
    cfg.eos_token_ids = (eos,)
    hf.generation_config.eos_token_id = eos
    hf.generation_config.pad_token_id = 0
    want = hf.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                       max_new_tokens=8, do_sample=False)[0, len(PROMPT):].tolist()
    got = generate(cfg, reader, PROMPT, SamplingParams(max_tokens=8))
    assert got == want == free[: free.index(eos) + 1]
    assert got[-1] == eos


def _first_new(tokens: list[int], start: int) -> int:
    """Index of the first token at or after `start` that did not occur before it."""
    return next(i for i in range(start, len(tokens)) if tokens[i] not in tokens[:i])


@torch.no_grad()
def test_generation_config_eos_ids_stop_like_hf(tmp_path):
    import json

    make_hf_model("llama-mha", tmp_path, seed=0)
    free = ReferenceModel(CheckpointReader(tmp_path).config, CheckpointReader(tmp_path)).generate(
        PROMPT, SamplingParams(max_tokens=12, ignore_eos=True))
    # config.json's EOS (2) first, then one greedy picks only later, in generation_config.json alone
    late, early = _first_new(free, 6), _first_new(free, 2)
    assert early < late and 2 not in free[:late + 1]
    (tmp_path / "config.json").write_text(json.dumps(
        json.loads((tmp_path / "config.json").read_text()) | {"eos_token_id": [2, free[late]]}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, free[early]]}))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").float().eval()
    hf.generation_config.pad_token_id = 0
    want = hf.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                       max_new_tokens=12, do_sample=False)[0, len(PROMPT):].tolist()
    reader = CheckpointReader(tmp_path)
    got = ReferenceModel(reader.config, reader).generate(PROMPT, SamplingParams(max_tokens=12))
    assert got == want == free[:early + 1]


@torch.no_grad()
def test_opt_checkpoint_of_the_bare_model_loads_like_hf(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    hf = make_hf_model("opt", tmp_path)
    f = tmp_path / "model.safetensors"
    # OPTModel's names (decoder.*, no "model." prefix), as facebook/opt-* ship
    bare = {k.removeprefix("model."): v for k, v in load_file(str(f)).items() if k != "lm_head.weight"}
    assert all(k.startswith("decoder.") for k in bare)
    save_file(bare, str(f), metadata={"format": "pt"})
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").float().eval()
    want = hf(torch.tensor([PROMPT])).logits[0]
    assert (again(torch.tensor([PROMPT])).logits[0] - want).abs().max().item() == 0
    reader = CheckpointReader(tmp_path)
    assert (ReferenceModel(reader.config, reader).prefill(PROMPT) - want).abs().max().item() <= TOL
    # and through a sharded index of those names
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model.safetensors" for k in bare}}))
    reader = CheckpointReader(tmp_path)
    assert (ReferenceModel(reader.config, reader).prefill(PROMPT) - want).abs().max().item() <= TOL


@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])
@torch.no_grad()
def test_llama3_rope_without_original_max_positions_matches_hf(tmp_path, key):
    """A llama3 rope scaling that leaves out original_max_position_embeddings (5.x rope_parameters or
    4.x rope_scaling): transformers takes max_position_embeddings (256 here, not the 64 it was made
    with), and so do we; logits agree over prefill and decode."""
    import json

    make_hf_model("llama-gqa4-llama3rope", tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    assert rope.pop("original_max_position_embeddings") == 64
    raw[key] = rope
    (tmp_path / "config.json").write_text(json.dumps(raw))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").float().eval()
    assert hf.config.rope_parameters["original_max_position_embeddings"] == raw["max_position_embeddings"]
    reader = CheckpointReader(tmp_path)
    assert reader.config.rope_scaling["original_max_position_embeddings"] == raw["max_position_embeddings"]
    ref = ReferenceModel(reader.config, reader)
    worst = _worst_logit_diff(hf, ref)
    assert worst <= TOL, f"max |logit diff| {worst:.2e} > {TOL}"


@pytest.mark.parametrize("name", ["llama-mha", "mistral-gqa-window", "qwen2-bias", "opt"])
def test_keys_left_out_of_config_json_take_transformers_defaults(tmp_path, name):
    """A config.json without max_position_embeddings, num_key_value_heads or sliding_window (hand-written
    or converted ones) means what transformers' config class assumes for it: Mistral slides a window of
    4096 and has 8 KV heads, Qwen2 has 32 and 32768 positions. FlexPipe took no window, num_heads and
    2048, so a Mistral prompt past 4096 tokens gave logits other than HF's."""
    import json

    cls_name, kw = CONFIGS[name]
    kw = dict(kw, num_attention_heads=32, hidden_size=256)   # so 8 or 32 KV heads divide the heads
    if name == "opt":
        kw["word_embed_proj_dim"] = 256
    kw.pop("head_dim", None)
    raw = getattr(transformers, cls_name)(**kw).to_dict()
    for key in ("max_position_embeddings", "num_key_value_heads", "sliding_window"):
        raw.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    ours = ModelConfig.from_hf(tmp_path)
    assert ours.max_position_embeddings == hf.max_position_embeddings
    if name != "opt":
        assert ours.num_kv_heads == hf.num_key_value_heads
    if name == "mistral-gqa-window":
        assert ours.sliding_window == hf.sliding_window == 4096
    else:
        assert ours.sliding_window is None


@torch.no_grad()
def test_model_type_decides_the_model_not_architectures(tmp_path):
    """transformers' AutoModelForCausalLM builds the model of config.json's model_type; `architectures`
    is only a record. A Qwen2 checkpoint whose architectures says Llama is a Qwen2 (q/k/v biases) to
    HF, and to FlexPipe (which took Llama and dropped the biases: logits off by 0.65)."""
    import json

    make_hf_model("qwen2-bias", tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["architectures"] = ["LlamaForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").float().eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    reader = CheckpointReader(tmp_path)
    assert reader.config.attention_bias
    worst = _worst_logit_diff(hf, ReferenceModel(reader.config, reader))
    assert worst <= TOL, f"max |logit diff| {worst:.2e} > {TOL}"


def test_an_unsupported_model_type_is_refused_whatever_architectures_says():
    raw = {"model_type": "qwen3", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 300, "hidden_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 96}
    with pytest.raises(UnsupportedArchitectureError, match="model_type 'qwen3' is not supported"):
        ModelConfig.from_hf(raw)


@pytest.mark.parametrize("same", [False, True])
@torch.no_grad()
def test_a_tied_checkpoint_that_also_stores_lm_head_loads_as_transformers_does(tmp_path, same):
    """tie_word_embeddings=true, and the file stores an lm_head.weight as well: transformers 5 ties the
    two only if their values are equal and otherwise uses the stored lm_head (with a warning). FlexPipe
    used the embedding whatever the file said: logits off by ~70 where the two differ."""
    from safetensors.torch import load_file, save_file

    make_hf_model("llama-tied-linear", tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    embed = tensors["model.embed_tokens.weight"]
    tensors["lm_head.weight"] = embed.clone() if same else torch.randn(embed.shape, generator=torch.Generator().manual_seed(5))
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").float().eval()
    reader = CheckpointReader(tmp_path)
    worst = _worst_logit_diff(hf, ReferenceModel(reader.config, reader))
    assert worst <= TOL, f"max |logit diff| {worst:.2e} > {TOL}"

"""Units, their costs, and paged attention: batched equals alone, any cut equals the whole."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexpipe.model import (
    AttnMetadata, PagedKVCache, PresetWeights, ReferenceModel, build_units, make_kv_caches, preset, run_units,
    tensor_names, unit_costs,
)
from flexpipe.model.config import ModelConfig

ATOL = 1e-4  # fp32: GEMMs of different row counts round differently; logits reach ~30 (tied OPT)


class RecordingSource:
    """A weight source that remembers which tensors were asked for."""

    def __init__(self, inner):
        self.inner, self.asked = inner, []

    def load(self, names, dtype=None, device=None):
        self.asked.extend(names)
        return self.inner.load(names, dtype=dtype, device=device)


@pytest.fixture(scope="module", params=["tiny", "tiny-opt", "window"])
def model(request):
    if request.param == "window":
        cfg = ModelConfig(name="tiny-window", num_layers=3, sliding_window=7, num_kv_heads=1,
                          bos_token_id=256, eos_token_ids=(257,))
    else:
        cfg = preset(request.param)
    return cfg, build_units(cfg, 0, cfg.num_units, PresetWeights(cfg, seed=1))


def _alone(cfg, units, ids_chunks):
    """Logits of one sequence fed chunk by chunk through its own cache: list of [n, V]."""
    caches = make_kv_caches(cfg, units, 16, 4)
    table, pos, out = list(range(16)), 0, []
    for chunk in ids_chunks:
        meta = AttnMetadata.build([pos], [len(chunk)], [table], 4)
        out.append(run_units(units, torch.tensor(chunk), meta, caches))
        pos += len(chunk)
    return out


def test_fresh_prompts_are_padded_together_only_where_little_is_wasted():
    from flexpipe.model.attention import _fresh_batches

    assert _fresh_batches([5, 17, 11]) == [[1, 2, 0]]                 # 3 x 17^2 <= 2 x (17^2 + 11^2 + 5^2)
    assert _fresh_batches([100, 1, 1, 1]) == [[0, 1], [2, 3]]         # the long one takes one short one
    assert _fresh_batches([40, 33, 10, 9, 8]) == [[0, 1, 2], [3, 4]]
    assert _fresh_batches([1000] + [1] * 20)[0] == [0, 1]             # not 21 x 1000^2 of work
    assert sorted(i for b in _fresh_batches([3, 1, 4, 1, 5, 9, 2, 6]) for i in b) == list(range(8))


@pytest.mark.parametrize("fresh_together", [False, True])
def test_batch_of_sequences_equals_each_alone(model, fresh_together, monkeypatch):
    """... whichever way the fresh prompts of a step attend: each in its own call (CPU), or padded
    into one call (CUDA's way; forced here), which step 1's three first chunks take."""
    from flexpipe.model import attention

    monkeypatch.setattr(attention, "FRESH_TOGETHER_ON_CPU", fresh_together)
    calls = []
    inner = attention._attend_fresh
    monkeypatch.setattr(attention, "_attend_fresh", lambda *a: calls.append(1) or inner(*a))
    cfg, units = model
    rng = random.Random(0)
    lens = [5, 17, 11]
    prompts = [[rng.randrange(256) for _ in range(n)] for n in lens]
    # Shuffled, interleaved block tables in one shared pool.
    blocks = list(range(40))
    rng.shuffle(blocks)
    tables = [blocks[0:8], blocks[8:16], blocks[16:24]]
    caches = make_kv_caches(cfg, units, 40, 4)
    # Step 1: prefill seq 0 fully, seq 1 only its first chunk (chunked prefill), seq 2 fully.
    first = [prompts[0], prompts[1][:9], prompts[2]]
    meta = AttnMetadata.build([0, 0, 0], [len(c) for c in first], tables, 4)
    got1 = run_units(units, torch.tensor(sum(first, [])), meta, caches)
    # Step 2: decode seq 0 and 2, second prefill chunk of seq 1 (mixed batch, unequal new tokens).
    nxt = [[7], prompts[1][9:], [9]]
    meta2 = AttnMetadata.build([5, 9, 11], [len(c) for c in nxt], tables, 4)
    got2 = run_units(units, torch.tensor(sum(nxt, [])), meta2, caches)
    # Step 3: pure decode, different context lengths.
    meta3 = AttnMetadata.build([6, 17, 12], [1, 1, 1], tables, 4)
    got3 = run_units(units, torch.tensor([1, 2, 3]), meta3, caches)

    alone = [_alone(cfg, units, [prompts[0], [7], [1]]),
             _alone(cfg, units, [prompts[1][:9], prompts[1][9:], [2]]),
             _alone(cfg, units, [prompts[2], [9], [3]])]
    for got, step in ((got1, 0), (got2, 1), (got3, 2)):
        want = torch.cat([a[step] for a in alone])
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert bool(calls) == fresh_together   # once per attention unit of step 1


def test_chunked_prefill_equals_one_shot(model):
    cfg, units = model
    ids = list(range(30, 60))
    whole = _alone(cfg, units, [ids])[0]
    chunked = torch.cat(_alone(cfg, units, [ids[:4], ids[4:5], ids[5:19], ids[19:]]))
    torch.testing.assert_close(chunked, whole, atol=ATOL, rtol=0)


def test_stateless_forward_equals_paged(model):
    cfg, units = model
    a, b = list(range(40, 52)), list(range(100, 105))
    meta = AttnMetadata.build([0, 0], [12, 5], [[0, 1, 2], [3, 4]], 4)
    stateless = run_units(units, torch.tensor(a + b), meta, None)
    paged = torch.cat([_alone(cfg, units, [a])[0], _alone(cfg, units, [b])[0]])
    torch.testing.assert_close(stateless, paged, atol=ATOL, rtol=0)


def test_any_cut_equals_whole_model(model):
    cfg, units = model
    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    rng = random.Random(1)
    whole = _alone(cfg, units, [ids.tolist()])[0]
    for _ in range(3):
        cuts = sorted(rng.sample(range(1, cfg.num_units), 3))
        bounds = [0, *cuts, cfg.num_units]
        caches = make_kv_caches(cfg, units, 4, 4)
        meta = AttnMetadata.build([0], [len(ids)], [[0, 1]], 4)
        x = ids
        for s, e in zip(bounds, bounds[1:]):
            x = run_units(units[s:e], x, meta, caches)
        torch.testing.assert_close(x, whole, atol=0, rtol=0)


def test_kv_blocks_migrate_between_pools(model):
    cfg, units = model
    ids = list(range(60, 75))  # 15 tokens: 4 blocks of 4
    src = make_kv_caches(cfg, units, 8, 4)
    dst = make_kv_caches(cfg, units, 8, 4)
    run_units(units, torch.tensor(ids), AttnMetadata.build([0], [15], [[6, 1, 4, 2]], 4), src)
    for i in src:  # move to other block ids in another pool, then continue there
        dst[i].write_blocks([0, 7, 3, 5], *src[i].read_blocks([6, 1, 4, 2]))
    got = run_units(units, torch.tensor([8]), AttnMetadata.build([15], [1], [[0, 7, 3, 5]], 4), dst)
    want = _alone(cfg, units, [ids, [8]])[1]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_build_units_loads_only_its_tensors():
    cfg = preset("tiny")
    src = RecordingSource(PresetWeights(cfg, 0))
    units = build_units(cfg, 3, 7, src)
    assert [u.index for u in units] == [3, 4, 5, 6]
    want = [n for i in range(3, 7) for n in tensor_names(cfg, i)]
    assert sorted(src.asked) == sorted(want)
    assert all("layers.1." in n or "layers.2." in n for n in src.asked)
    assert [u.kind for u in units] == ["attention", "mlp", "attention", "mlp"]


def test_preset_weights_do_not_depend_on_the_split():
    cfg = preset("tiny")
    whole = build_units(cfg, 0, cfg.num_units, PresetWeights(cfg, 5))
    part = build_units(cfg, 9, 12, PresetWeights(cfg, 5))
    for u in part:
        for (n1, p1), (n2, p2) in zip(u.named_parameters(), whole[u.index].named_parameters()):
            assert n1 == n2 and torch.equal(p1, p2)
    other_seed = build_units(cfg, 9, 10, PresetWeights(cfg, 6))[0]
    assert not torch.equal(other_seed.q_w, part[0].q_w)


@pytest.mark.parametrize("name", ["tiny", "tiny-opt"])
def test_cpu_units_hold_matrices_transposed_and_give_back_hf_layout(name):
    """On the CPU the matrices are held [in, out] (a faster sgemm); hf_tensors() gives back exactly
    what the checkpoint holds, which is what a peer loads a moved unit from (FP-4)."""
    cfg = preset(name)
    source = PresetWeights(cfg, 3)
    units = build_units(cfg, 0, cfg.num_units, source)
    for u in units:
        want = source.load(tensor_names(cfg, u.index))
        got = u.hf_tensors()
        assert got.keys() == want.keys()
        for n, t in want.items():
            assert torch.equal(got[n], t), n
        mats = [getattr(u, r) for r in u._matrices if getattr(u, r, None) is not None]
        assert u.transposed and all(w.is_contiguous() for w in mats)
        assert sum(not t.is_contiguous() for t in got.values()) == len(mats)   # views of [in, out]
    # the same layer rebuilt from those tensors computes the same thing, bit for bit
    from flexpipe.runtime.stage import _PeerTensors   # what a stage loads a peer's tensors through

    again = build_units(cfg, 1, 3, _PeerTensors({n: t for u in units[1:3] for n, t in u.hf_tensors().items()}))
    torch.manual_seed(0)
    x = torch.randn(5, cfg.hidden_size)
    mlp, mlp2 = units[2], again[1]
    assert mlp.kind == "mlp" and torch.equal(mlp(x, None), mlp2(x, None))
    # and what an HF-layout F.linear computes, to rounding
    w = mlp.hf_tensors()
    if cfg.arch != "opt":
        p = f"model.layers.{mlp.layer}.mlp."
        F = torch.nn.functional
        h = F.rms_norm(x, (cfg.hidden_size,), mlp.norm_w, cfg.norm_eps)
        g = F.silu(F.linear(h, w[p + "gate_proj.weight"])) * F.linear(h, w[p + "up_proj.weight"])
        torch.testing.assert_close(mlp(x, None), x + F.linear(g, w[p + "down_proj.weight"]), rtol=1e-5, atol=1e-5)


def test_tied_head_holds_its_own_copy():
    cfg = preset("tiny-opt")
    (head,) = build_units(cfg, cfg.num_units - 1, cfg.num_units, PresetWeights(cfg, 0))
    (emb,) = build_units(cfg, 0, 1, PresetWeights(cfg, 0))
    assert torch.equal(head.hf_tensors()["model.decoder.embed_tokens.weight"], emb.weight)
    assert head.lm_w.data_ptr() != emb.weight.data_ptr()
    assert "model.decoder.embed_tokens.weight" in tensor_names(cfg, cfg.num_units - 1)
    costs = unit_costs(cfg, dtype_bytes=4)
    assert costs[-1].param_bytes == head.param_bytes
    assert costs[0].param_bytes == emb.param_bytes


@pytest.mark.parametrize("name, billions", [("llama2-7b", 6.74), ("llama2-13b", 13.0), ("llama2-70b", 69.0),
                                            ("llama3-8b", 8.03), ("mistral-7b", 7.24), ("qwen2-7b", 7.62),
                                            ("opt-66b", 66.0)])
def test_unit_costs_match_published_sizes(name, billions):
    cfg = preset(name)
    costs = unit_costs(cfg, dtype_bytes=2)
    assert len(costs) == cfg.num_units
    total = sum(c.param_bytes for c in costs)
    if cfg.tie_word_embeddings:  # the Head's replica is counted: subtract it for the published size
        total -= cfg.vocab_size * cfg.hidden_size * 2
    assert total / 2 == pytest.approx(billions * 1e9, rel=0.02)
    attn = [c for c in costs if c.kind == "attention"]
    assert len(attn) == cfg.num_layers
    assert all(c.kv_bytes_per_token == 2 * cfg.num_kv_heads * cfg.head_dim * 2 for c in attn)
    assert all(c.kv_bytes_per_token == 0 for c in costs if c.kind != "attention")
    assert all(c.act_bytes_per_token == cfg.hidden_size * 2 for c in costs[:-1])
    assert costs[0].flops_per_token == 0 and costs[-1].flops_per_token == 2 * cfg.vocab_size * cfg.hidden_size
    assert [c.name for c in costs[:3]] == ["embedding", "attention.0", "mlp.0"]


def test_unit_param_bytes_agree_with_costs():
    cfg = preset("tiny")
    units = build_units(cfg, 0, cfg.num_units, PresetWeights(cfg, 0), dtype=torch.bfloat16)
    assert [u.param_bytes for u in units] == [c.param_bytes for c in unit_costs(cfg, dtype_bytes=2)]


def test_attn_metadata_build():
    meta = AttnMetadata.build([6, 0], [2, 3], [[5, 2], [1]], 4)
    assert meta.positions.tolist() == [6, 7, 0, 1, 2]
    assert meta.slot_mapping.tolist() == [2 * 4 + 2, 2 * 4 + 3, 4, 5, 6]
    assert meta.context_lens == [8, 3] and meta.seq_lens == [2, 3]
    assert meta.last_token_rows().tolist() == [1, 4]
    with pytest.raises(ValueError, match="holds 4 tokens"):
        AttnMetadata.build([3], [2], [[0]], 4)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.integers(1, 8).flatmap(lambda b: st.tuples(
    st.lists(st.integers(1, 100), min_size=b, max_size=b),       # context lengths
    st.lists(st.integers(0, 3), min_size=b, max_size=b),         # spare blocks in each table
    st.sampled_from([1, 4, 16]))))
def test_decode_layout_equals_the_general_one(case):
    from flexpipe.model.attention import _any_layout, _decode_layout

    ctx, spare, bs = case
    rng = random.Random(sum(ctx))
    tables = [rng.sample(range(500), -(-c // bs) + s) for c, s in zip(ctx, spare)]
    fast = _decode_layout(ctx, tables, bs, torch.device("cpu"))
    slow = _any_layout([1] * len(ctx), ctx, tables, bs, None, torch.device("cpu"))
    assert fast.keys() == slow.keys()
    for k, v in slow.items():
        assert (torch.equal(fast[k], v) if isinstance(v, torch.Tensor) else fast[k] == v), k
    assert fast["slots"].is_contiguous()


def test_decode_layout_refuses_a_table_too_short_for_its_context():
    from flexpipe.model.attention import _any_layout, _decode_layout

    for layout in (lambda: _decode_layout([17], [[0]], 16, torch.device("cpu")),
                   lambda: _any_layout([1], [17], [[0]], 16, None, torch.device("cpu"))):
        with pytest.raises(ValueError, match="exceed the block tables"):
            layout()


def test_paged_cache_rejects_wrong_block_shapes():
    c = PagedKVCache(4, 2, 1, 8)
    with pytest.raises(ValueError, match="expected k and v of shape"):
        c.write_blocks([0], torch.zeros(1, 3, 1, 8), torch.zeros(1, 3, 1, 8))
    assert c.block_bytes == 2 * 2 * 8 * 4 and c.nbytes == 4 * c.block_bytes


def test_random_tiny_model_is_well_behaved():
    cfg = preset("tiny")
    ref = ReferenceModel(cfg, PresetWeights(cfg, 0))
    logits = ref.prefill(list(b"The quick brown fox jumps over the lazy dog"))
    assert torch.isfinite(logits).all()
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-4  # no exact ties for greedy to trip on


def test_bfloat16_stays_close_to_float32():
    cfg = preset("tiny")
    prompt = list(b"bf16 is what GPUs run")
    f32 = ReferenceModel(cfg, PresetWeights(cfg, 0)).prefill(prompt)
    bf16 = ReferenceModel(cfg, PresetWeights(cfg, 0), dtype=torch.bfloat16).prefill(prompt)
    assert bf16.dtype == torch.float32  # the Head hands fp32 logits to sampling
    assert (bf16 - f32).abs().max() < 0.15 * f32.std()  # ~0.05 here: bf16 keeps ~3 significant digits


@pytest.mark.parametrize("hidden", [64, 256, 4096])
def test_fused_rms_norm_equals_the_hf_steps(hidden):
    """rms_norm takes torch's fused op: the very numbers of HF's steps (fp32 mean, rsqrt, then the
    weight in fp32, or after the cast back in fp16/bf16)."""
    from flexpipe.model.units import rms_norm

    g = torch.Generator().manual_seed(hidden)
    x, w = torch.randn(7, hidden, generator=g) * 3, torch.randn(hidden, generator=g)
    xf = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.equal(rms_norm(x, w, 1e-6), w * xf)
    for dtype in (torch.float16, torch.bfloat16):   # HF's steps for half weights: fp32 norm, cast, weight
        xh, wh = x.to(dtype), w.to(dtype)
        xf = xh.float()
        steps = wh * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
        assert torch.equal(rms_norm(xh, wh, 1e-6), steps), dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_tables_equal_rotate_half_per_step(dtype):
    """cos/sin tables indexed by position, rotated with roll and a sign-folded sin, give the numbers of
    HF's per-step `q * cos + rotate_half(q) * sin`."""
    from flexpipe.model.units import rope_inv_freq, rope_tables

    cfg = preset("tiny")
    pos = torch.tensor([0, 3, 17, 300, 1000, 5])
    cos_t, sin_t = rope_tables(cfg, 1001, dtype, torch.device("cpu"))
    assert cos_t.shape[0] >= 1001
    freqs = pos[:, None].float() * rope_inv_freq(cfg)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    q = torch.randn(len(pos), cfg.num_heads, cfg.head_dim).to(dtype)
    h = cfg.head_dim // 2
    want = q * cos + torch.cat((-q[..., h:], q[..., :h]), dim=-1) * sin
    got = q * cos_t[pos][:, None] + q.roll(h, -1) * sin_t[pos][:, None]
    assert torch.equal(got, want)

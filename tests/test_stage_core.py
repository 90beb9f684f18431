"""StageCore's KV bookkeeping during a reshape: KV a peer exported before a free reached this stage
must not bring back a table the router's ledger no longer counts."""

from __future__ import annotations

import torch

from flexpipe.model.checkpoint import PresetWeights
from flexpipe.model.config import ModelConfig
from flexpipe.runtime.stage_core import StageCore, StepMeta

GREEDY = [0.0, 0, 1.0, 0]


def _cores():
    cfg = ModelConfig(name="sc-h128-l2", hidden_size=128, intermediate_size=352, num_layers=2, num_heads=2,
                      num_kv_heads=1, bos_token_id=256, eos_token_ids=(257,), pad_token_id=258)
    src = PresetWeights(cfg, 0)
    # a merge 2 -> 1: the kept stage [0, 3) takes units [3, 6) (layer 1 and the head) from [3, 6)
    return cfg, StageCore(cfg, src, 0, 3, num_blocks=16, block_size=4), StageCore(cfg, src, 3, 6, num_blocks=16,
                                                                                     block_size=4)


def _prefill(cfg, first, last, seq, n):
    x = first.forward(StepMeta([seq], [0], [n], [False], [0], [GREEDY]), torch.arange(n) + 3)
    last.forward(StepMeta([seq], [0], [n], [True], [0], [GREEDY]), x)


def test_kv_of_a_sequence_freed_during_the_reshape_is_not_imported_back():
    cfg, kept, source = _cores()
    for seq in ("done", "live"):
        _prefill(cfg, kept, source, seq, 10)
    kept.begin_reshape()
    kept.prepare(0, 6)
    exported = {s: source.export_kv(s, [3], 0, 10) for s in ("done", "live")}   # before the free arrives
    kept.free(["done"])   # the step carrying "done"'s free reached the kept stage first
    assert kept.import_kv("done", [3], 0, *exported["done"]) is False
    assert "done" not in kept.tables and kept.free_blocks == 16 - 3
    assert kept.import_kv("live", [3], 0, *exported["live"]) is True
    assert not kept.only_imported("live")   # it held "live" already: steps of it ran here
    # a preempted request that runs again from its first token may take KV again
    kept.free(["live"])
    assert kept.take_kv("live", 10) is None
    kept.forward(StepMeta(["live"], [0], [10], [False], [0], [GREEDY]), torch.arange(10) + 3)
    assert kept.take_kv("live", 10) == kept.tables["live"]
    # a sequence this stage holds only through copied KV is what an exporter may free again
    assert kept.take_kv("new", 6) is not None and kept.only_imported("new")
    kept.activate(0, 6)   # the reshape's bookkeeping ends with it
    assert not kept.only_imported("new")
    kept.free(["new"])
    assert kept.take_kv("new", 4) is None   # no reshape under way: KV arriving now is a late one
    kept.begin_reshape()   # the next reshape starts with nothing remembered as dropped
    assert kept.take_kv("new", 4) is not None


def test_a_settled_free_lets_a_later_copy_in():
    # a new stage of a reshape runs no step before the switch, so nothing takes a freed sequence off
    # the dropped list there: the controller's frees between copy rounds (nothing in flight) are settled
    cfg, kept, source = _cores()
    _prefill(cfg, kept, source, "s", 10)
    fresh = StageCore(cfg, PresetWeights(cfg, 0), 3, 6, num_blocks=16, block_size=4)
    fresh.begin_reshape()
    assert fresh.import_kv("s", [3], 0, *source.export_kv("s", [3], 0, 10)) is True
    fresh.free(["s"])   # an exporter's free (a copy of "s" may still be on its way): refused after
    assert fresh.take_kv("s", 10) is None
    fresh.free(["s"], settled=True)   # preempted, recomputed, and copied again from token 0
    assert fresh.import_kv("s", [3], 0, *source.export_kv("s", [3], 0, 10)) is True
    assert fresh.free_blocks == 16 - 3 and fresh.only_imported("s")


def test_kv_arriving_after_an_aborted_reshape_takes_no_blocks():
    # a kept stage dropped the units it had prepared (AbortPrepare); an ImportKV still on its way for
    # them is refused before any block is taken, so the stage holds nothing the router's ledger lacks
    cfg, kept, source = _cores()
    _prefill(cfg, kept, source, "s", 10)
    kept.begin_reshape()
    kept.prepare(0, 6)
    late = source.export_kv("s", [3], 0, 10)
    kept.abort_prepare()
    before = (dict((s, list(t)) for s, t in kept.tables.items()), kept.free_blocks)
    for seq in ("s", "other"):
        try:
            kept.import_kv(seq, [3], 0, *late)
        except KeyError as e:
            assert "no KV cache for unit 3" in str(e)
        else:
            raise AssertionError("KV of a unit this stage does not hold was imported")
    assert (kept.tables, kept.free_blocks) == before
    assert not kept.only_imported("other")
    assert kept.take_kv("other", 4) is None and "other" not in kept.tables   # (GpuStageActor._reserve's path)


def test_a_sequence_computed_again_from_its_first_token_gets_fresh_blocks():
    # preempted, its free on a step that failed before this stage; then recomputed from token 0: the
    # blocks it held are stale, and keeping them put the stage above the router's ledger
    cfg, first, last = _cores()
    _prefill(cfg, first, last, "v", 10)   # 3 blocks of 4 on each stage
    assert first.free_blocks == 16 - 3
    x = first.forward(StepMeta(["v"], [0], [4], [False], [0], [GREEDY]), torch.arange(4) + 3)
    last.forward(StepMeta(["v"], [0], [4], [False], [0], [GREEDY]), x)
    assert len(first.tables["v"]) == len(last.tables["v"]) == 1
    assert first.free_blocks == last.free_blocks == 16 - 1


def test_steps_on_cuda_keep_sdpa_off_cudnn_and_cpu_steps_change_nothing():
    """On CUDA a step's attention runs with SDPA's cuDNN backend off (cuDNN builds a graph per new
    shape: 1.3 ms a call in the H200 profile of 2026-11-30); the backend flags are torch's own, so
    this is checked without a GPU. On CPU the step's context changes no flag."""
    from flexpipe.model.attention import step_sdpa

    before = torch.backends.cuda.cudnn_sdp_enabled()
    with step_sdpa(torch.device("cuda", 0)):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        with step_sdpa(torch.device("cpu")):
            assert torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def test_masked_grouped_query_attention_on_cuda_repeats_its_kv_heads():
    """enable_gqa only where a fused CUDA kernel takes it (flash: no mask); a masked call repeats the
    KV heads so the memory-efficient kernel takes it instead of the quadratic math one. On CPU (and
    unmasked) as before; the CPU path's outputs are unchanged."""
    from flexpipe.model import attention

    assert attention.gqa_in_kernel("cuda", masked=False) == attention._SDPA_GQA
    assert not attention.gqa_in_kernel("cuda", masked=True)
    assert attention.gqa_in_kernel("cpu", masked=True) == attention.gqa_in_kernel("cpu", masked=False) \
        == attention._SDPA_GQA
    q, k = torch.randn(2, 8, 3, 16), torch.randn(2, 2, 5, 16)
    mask = torch.ones(2, 1, 3, 5, dtype=torch.bool)
    full = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), k.repeat_interleave(4, 1),
                                                            attn_mask=mask)
    assert torch.allclose(attention._sdpa(q, k, k, mask, False, None), full, atol=1e-6)

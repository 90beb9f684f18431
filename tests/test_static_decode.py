"""Decode steps on bucketed buffers (model/static_decode.py): what a CUDA graph replays, checked on CPU
against the eager path (mode "static" runs the very code a graph captures, without the capture)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from flexpipe.errors import ConfigError
from flexpipe.model.checkpoint import PresetWeights
from flexpipe.model.config import ModelConfig
from flexpipe.model.static_decode import C_STEP, bucket_keys, bucket_rows, pack_inputs
from flexpipe.runtime.stage_core import StageCore, StepMeta

GREEDY = [0.0, 0, 1.0, 0]


def small_config() -> ModelConfig:
    return ModelConfig(name="sd-h128-l4", hidden_size=128, intermediate_size=352, num_layers=4, num_heads=2,
                       num_kv_heads=1, bos_token_id=256, eos_token_ids=(257,), pad_token_id=258)


def test_buckets():
    assert [bucket_rows(n) for n in (1, 2, 3, 5, 8, 9, 33)] == [1, 2, 4, 8, 8, 16, 64]
    assert [bucket_keys(c) for c in (1, C_STEP, C_STEP + 1, 3 * C_STEP)] == [C_STEP, C_STEP, 2 * C_STEP, 3 * C_STEP]


def test_pack_inputs_real_and_padded_rows():
    bs = 4
    packed = pack_inputs([6, 1], [[7, 2], [5]], bs, rows=4, keys=8, scratch_block=9)
    # row 0: token at position 5 -> block 2 (its second), offset 1; table padded with its first block
    assert packed[0].tolist() == [5, 2 * bs + 1, 6, 7, 2]
    assert packed[1].tolist() == [0, 5 * bs, 1, 5, 5]
    for r in (2, 3):   # padding: position 0, one key, everything in the scratch block
        assert packed[r].tolist() == [0, 9 * bs, 1, 9, 9]
    with pytest.raises(ValueError, match="needs 2 blocks"):
        pack_inputs([6], [[7]], bs, rows=1, keys=8, scratch_block=9)
    with pytest.raises(ValueError, match="buffers 2"):
        pack_inputs([9], [[1, 2, 3]], bs, rows=1, keys=8, scratch_block=0)


def _decode(cfg, cuts, mode, prompts, steps, num_blocks=128, leave=None):
    """Greedy decode of `prompts` through stages `cuts` in one process; sequence `leave` stops halfway.
    Returns the tokens, the last stage's logits of every step and the cores."""
    cores = [StageCore(cfg, PresetWeights(cfg, seed=3), a, b, num_blocks=num_blocks, block_size=16, decode=mode)
             for a, b in zip(cuts, cuts[1:])]
    logits: list[torch.Tensor] = []
    last = cores[-1]
    orig_sample = last.sample

    def keep(lg, meta):   # the logits the last stage samples from
        logits.append(lg.detach().clone())
        return orig_sample(lg, meta)
    last.sample = keep

    def step(meta, x):
        for c in cores:
            x = c.forward(meta, x)
        return x

    toks = {}
    for j, p in enumerate(prompts):
        toks[j] = [int(step(StepMeta([f"s{j}"], [0], [len(p)], [True], [0], [GREEDY]), torch.tensor(p))[0])]
    logits.clear()
    for k in range(steps):
        live = [j for j in toks if not (j == leave and k >= steps // 2)]
        if leave is not None and k == steps // 2:
            for c in cores:
                c.free([f"s{leave}"])
        meta = StepMeta([f"s{j}" for j in live], [len(prompts[j]) + k for j in live], [1] * len(live),
                        [True] * len(live), [k + 1] * len(live), [GREEDY] * len(live))
        for j, t in zip(live, step(meta, torch.tensor([toks[j][-1] for j in live])).tolist()):
            toks[j].append(t)
    return toks, logits, cores


@pytest.mark.parametrize("cuts", [[0, 10], [0, 4, 7, 10]])
def test_static_decode_equals_the_eager_path(cuts):
    """Tokens equal and logits within float noise of the eager path's, over steps whose batch shrinks
    (5 -> 4 rows: buckets 8 and 4) and whose contexts cross a key bucket (C_STEP)."""
    cfg = small_config()
    assert cfg.num_units == 10
    prompts = [[(7 * i + 3 * j) % 250 + 3 for i in range(C_STEP - 20 + 9 * j)] for j in range(5)]
    eager, lg_eager, _ = _decode(cfg, cuts, "off", prompts, 40, leave=2)
    static, lg_static, cores = _decode(cfg, cuts, "static", prompts, 40, leave=2)
    assert static == eager
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-5) for a, b in zip(lg_eager, lg_static))
    st = [c.status()["decode_stats"] for c in cores]
    assert all(s["steps"] == 40 and s["eager"] == 0 for s in st), st


def test_padded_rows_leave_every_owned_block_as_the_eager_path_does():
    cfg = small_config()
    prompts = [[5 + i % 200 for i in range(30 + 17 * j)] for j in range(3)]   # 3 rows: a 4-row bucket
    _, _, (eager,) = _decode(cfg, [0, 10], "off", prompts, 6)
    _, _, (static,) = _decode(cfg, [0, 10], "static", prompts, 6)
    assert eager.tables == static.tables
    owned = sorted(b for t in static.tables.values() for b in t)
    for u in static.kv:
        for a, b in ((eager.kv[u].k, static.kv[u].k), (eager.kv[u].v, static.kv[u].v)):
            assert torch.allclose(a[owned], b[owned], atol=1e-6)


def test_a_step_without_a_free_block_runs_eagerly():
    cfg = small_config()
    prompts = [[3 + i for i in range(16)], [9 + i for i in range(15)]]   # 2 blocks after one step: all of them
    toks, _, (core,) = _decode(cfg, [0, 10], "static", prompts, 1, num_blocks=3)
    ref, _, _ = _decode(cfg, [0, 10], "off", prompts, 1, num_blocks=3)
    assert toks == ref and core.free_blocks == 0
    assert core.status()["decode_stats"]["eager"] >= 1


def test_decode_modes_are_checked_and_graphs_need_cuda():
    from flexpipe.api import Settings

    cfg = small_config()
    with pytest.raises(ConfigError, match="decode mode 'fast'"):
        StageCore(cfg, PresetWeights(cfg, seed=0), 0, 10, num_blocks=8, block_size=16, decode="fast")
    core = StageCore(cfg, PresetWeights(cfg, seed=0), 0, 10, num_blocks=8, block_size=16, decode="graph")
    assert core.decode == "off"   # no CUDA graphs on a CPU stage: it decodes eagerly
    with pytest.raises(ConfigError, match="decode_graphs='yes'.*off, static, graph"):
        Settings(decode_graphs="yes").check()


async def test_pipeline_with_static_decode_equals_the_reference():
    """The runtime's own path: Settings.decode_graphs reaches the stage processes."""
    from flexpipe.api import FlexPipe
    from flexpipe.model.reference import ReferenceModel
    from flexpipe.model.sampling import SamplingParams

    prompts = [[(11 * i + 5 * j) % 200 + 3 for i in range(4 + 7 * j)] for j in range(6)]
    async with FlexPipe.launch(model="tiny", stages=2, decode_graphs="static") as fp:
        outs = [o.token_ids for o in await asyncio.gather(
            *(fp.complete(p, max_tokens=24, ignore_eos=True) for p in prompts))]
        status = await fp.controller.stage_status()
        ref = ReferenceModel(fp.config, fp.spec.weights())
    assert all(s["decode"] == "static" and s["decode_stats"]["steps"] > 0 for s in status), status
    for p, got in zip(prompts, outs):
        assert got == ref.generate(p, SamplingParams(max_tokens=24, ignore_eos=True))


def test_the_captured_step_touches_no_host_tensor_and_reads_no_device_value():
    """What a CUDA graph can capture, checked without a GPU: the step on the buffers runs on the meta
    device (no data: any read of a tensor's value fails) with every op's tensors on that device (a
    tensor made on the host inside the step, as the eager path's layout is, would be an upload the
    graph cannot replay). The eager path fails the same check, so the check can fail."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from flexpipe.model.attention import AttnMetadata
    from flexpipe.model.static_decode import StaticDecode
    from flexpipe.model.units import build_units, make_kv_caches, run_units

    class OnMeta(PresetWeights):
        def load(self, names, dtype=None, device=None):
            return {n: t.to("meta") for n, t in super().load(names, dtype, "cpu").items()}

    class DeviceOnly(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            for t in tree_flatten((args, kwargs or {}))[0]:
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    raise AssertionError(f"{func} inside the step touches a tensor on {t.device}")
            return func(*args, **(kwargs or {}))

    cfg, dev = small_config(), torch.device("meta")
    for first, (a, b) in ((True, (0, 5)), (False, (5, cfg.num_units))):   # token ids in, and a residual in
        units = build_units(cfg, a, b, OnMeta(cfg, 0), torch.float16, dev)
        assert not units[-1].transposed   # the layout CUDA stages hold
        kv = make_kv_caches(cfg, units, 64, 16, torch.float16, dev)
        sd = StaticDecode(units, kv, block_size=16, device=dev, dtype=torch.float16, hidden=cfg.hidden_size,
                          first=first, mode="static")
        e = sd._entry(8, 2 * C_STEP)
        with DeviceOnly():
            out = sd._forward(e)
        assert out.device == dev and out.shape[0] == 8
    with pytest.raises(AssertionError, match="touches a tensor on cpu"), DeviceOnly():
        meta = AttnMetadata.build([5, 6], [1, 1], [[1], [2]], 16, dev)
        run_units(units, torch.zeros(2, cfg.hidden_size, dtype=torch.float16, device=dev), meta, kv)


def test_a_reshape_keeps_decoding_on_buffers_and_the_new_range_gets_its_own():
    """prepare() loads units beside the served ones (the buffers of the served range stay); activate()
    changes the range, and the next decode steps build buffers for the new one: the tokens after the
    reshape are the eager path's."""
    cfg = small_config()
    prompts = [[3 + i for i in range(20)], [7 + i for i in range(33)]]

    def run(mode):
        toks, _, (first, last) = _decode(cfg, [0, 5, 10], mode, prompts, 4)
        kept = first._static
        first.prepare(0, 7)                   # grows to [0, 7); the next stage shrinks to [7, 10)
        assert first._static is kept and 5 in first.units and 6 in first.units
        first.activate(0, 7)
        assert first._static is None
        last.prepare(7, 10)
        for j, p in enumerate(prompts):       # what a reshape's KV copy brings (unit 6 is an MLP: no KV)
            k, v = last.export_kv(f"s{j}", [5], 0, len(p) + 4)
            first.import_kv(f"s{j}", [5], 0, k, v)
        last.activate(7, 10)
        for k in range(4, 10):
            meta = StepMeta(["s0", "s1"], [len(p) + k for p in prompts], [1, 1], [True, True], [k + 1] * 2,
                            [GREEDY, GREEDY])
            out = last.forward(meta, first.forward(meta, torch.tensor([toks[0][-1], toks[1][-1]])))
            toks[0].append(int(out[0]))
            toks[1].append(int(out[1]))
        if mode != "off":
            assert first._static.units[-1].index == 6 and first._static.stats["steps"] == 6
        return toks

    assert run("static") == run("off")

"""Reshape copies under max_message_bytes (runtime/chunks.py): weights (stage to stage, stage to the
weight cache, cache to stage) and KV go in messages that each fit the sender's limit, a tensor larger
than a message in pieces that the receiver assembles, a sequence's KV in token ranges.

Every actor refuses a message above ActorSettings.max_message_bytes (the sender raises
MessageTooLarge), and these copies used to be one message each: a stage range of a few llama2-7b
layers, a 70B embedding (2.1 GB, one tensor) or a long context's KV could not be copied, and the
reshape aborted.  Here the tiny preset meets a 32 KiB limit: its embedding (160 KB), its MLP matrices
(180 KB each) and the KV of a sequence of a few dozen tokens are all above it."""

import asyncio
import contextlib
import dataclasses
import random

import pytest
import torch

from flexpipe.api import FlexPipe, ModelSpec, Settings, plan_shape
from flexpipe.errors import MessageTooLarge, ProtocolError
from flexpipe.model.config import ModelConfig
from flexpipe.runtime import codec
from flexpipe.runtime.actor import ActorSettings
from flexpipe.runtime.chunks import Assembler, budget, flat_slice, plan, tensor_overhead
from flexpipe.runtime.controller import Controller
from flexpipe.runtime.launcher import ActorSystem
from flexpipe.runtime.stage import (
    ExpectPeers, ExportKV, PrepareUnits, SendUnits, StageActor, StageStatus, UnitTensors, send_unit_tensors,
)
from flexpipe.runtime.weight_cache import WeightCache, WeightCacheActor
from tests.pipeline_helpers import check_against_oracle, held, request_mix, run_all

LIMIT = 32 << 10
TINY = ModelConfig.preset("tiny")


# ---- the planner ----------------------------------------------------------------------------------
def _check_plan(items: list[tuple[int, int, int]], cap: int) -> list[list]:
    msgs = plan(items, cap)
    covered = {i: [] for i in range(len(items))}
    for m in msgs:
        assert m, "an empty message"
        assert sum(over + (p.stop - p.start) * rb for p in m for rows, rb, over in [items[p.index]]) <= cap
        for p in m:
            covered[p.index].append((p.start, p.stop))
    for i, (rows, row_bytes, over) in enumerate(items):
        ranges = covered[i]
        # in order, without gap or overlap, from 0 to rows; whole when it fits a message of its own
        assert ranges[0][0] == 0 and ranges[-1][1] == rows and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(b > a for a, b in ranges) or ranges == [(0, 0)]
        if over + rows * row_bytes <= cap:
            assert ranges == [(0, rows)], (i, items[i], ranges)
    order = [p.index for m in msgs for p in m]
    assert order == sorted(order)   # items keep their order (the receiver assembles a tensor in order)
    return msgs


def test_plan_keeps_every_message_under_the_budget_and_covers_each_item_in_order():
    rng = random.Random(7)
    for _ in range(300):
        cap = rng.choice([768, 1000, 4096, 30000])
        items = []
        for _ in range(rng.randint(0, 12)):
            row_bytes = rng.choice([0, 1, 2, 4, 8, 100, 512])
            over = rng.randint(0, 200)
            if over + row_bytes > cap:
                continue
            rows = rng.choice([0, 1, rng.randint(0, 50), rng.randint(0, 3 * cap // max(1, row_bytes))])
            items.append((rows, row_bytes, over))
        _check_plan(items, cap)


def test_plan_splits_only_what_no_message_holds_and_refuses_a_row_above_the_budget():
    # small items share a message; one that fits alone begins a new one; a large one fills what is left
    msgs = _check_plan([(10, 4, 10), (200, 4, 10), (100, 4, 10), (0, 4, 10), (1000, 4, 10), (3, 0, 10)], 1000)
    assert [[(p.index, p.start, p.stop) for p in m] for m in msgs] == [
        [(0, 0, 10), (1, 0, 200)],
        [(2, 0, 100), (3, 0, 0), (4, 0, 142)],   # 410 + 10 + 10 + 142 * 4 = 998 bytes
        [(4, 142, 389)], [(4, 389, 636)], [(4, 636, 883)],   # 247 rows: 998 bytes each
        [(4, 883, 1000), (5, 0, 3)]]
    assert plan([], 1000) == [] and [len(m) for m in plan([(0, 8, 0)] * 3, 10)] == [3]
    with pytest.raises(MessageTooLarge, match="one row of it is 990 bytes .*raise the max_message_bytes setting"):
        plan([(5, 990, 20)], 1000)


def test_budget_leaves_headroom_at_any_limit():
    for limit in (1024, 2048, LIMIT, 1 << 20, 1 << 30):
        assert 0 < budget(limit) < limit and limit - budget(limit) >= 256
    assert (1 << 30) - budget(1 << 30) == 64 << 10


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    big = torch.randn(300, 70, generator=g)                      # 84 KB fp32: split in pieces
    return {
        "model.layers.0.big.weight": big,
        "model.layers.0.bf16.weight": torch.randn(90, 130, generator=g).to(torch.bfloat16),   # 23 KB
        "model.layers.0.transposed.weight": torch.randn(64, 300, generator=g).t(),   # non-contiguous, 77 KB
        "model.layers.0.scalar": torch.tensor(2.5),
        "model.layers.0.empty": torch.zeros(0, 16),
        "model.layers.0.fp16.bias": torch.randn(20000, generator=g).to(torch.float16),  # 40 KB, 1-d
        "model.layers.0.small.bias": torch.randn(7, generator=g),
        "model.layers.0.empty2": torch.zeros(16, 0, dtype=torch.float16),
    }


async def test_split_tensors_travel_under_the_limit_and_reassemble_exactly():
    src = _tensors()
    sent, assembler, got = [], Assembler(), {}

    async def ask(dest, msg, *tensors):   # the wire: encoded and decoded as an actor does
        frames = codec.encode(msg, tensors, flags=codec.ASK)
        assert sum(map(len, frames)) <= LIMIT
        msg, tensors = codec.decode(frames)
        sent.append(msg)
        parts = msg.parts or [None] * len(tensors)
        for name, part, t in zip(msg.names, parts, tensors):
            whole = assembler.add(name, part, t)
            if whole is not None:
                got[name] = whole
        return True

    nbytes = await send_unit_tensors(ask, None, src, LIMIT)
    assert nbytes == sum(t.numel() * t.element_size() for t in src.values())
    assert got.keys() == src.keys() and not assembler.pending
    for n, t in src.items():
        assert got[n].dtype == t.dtype and got[n].shape == t.shape and torch.equal(got[n], t), n
    assert len(sent) >= 6 and [m.more for m in sent] == [True] * (len(sent) - 1) + [False]
    assert any(m.parts for m in sent)
    # nothing split: the messages an older peer takes (no parts, one message)
    one = []

    async def record(dest, msg, *tensors):
        one.append(msg)

    await send_unit_tensors(record, None, {"a": torch.ones(4), "b": torch.ones(3, 3)}, LIMIT)
    assert [(m.names, m.parts, m.more) for m in one] == [(["a", "b"], None, False)]
    # and an older peer's UnitTensors (names only) decodes with the defaults
    kind = codec.read_header(codec.encode(UnitTensors(["a"]))[0]).kind
    assert codec.build(kind, [["a"]]) == UnitTensors(["a"], None, False)


def test_flat_slice_is_a_view_where_it_can_be_and_the_assembler_refuses_pieces_out_of_order():
    t = torch.arange(60.0).reshape(6, 10)
    s = flat_slice(t, 13, 37)
    assert s.data_ptr() == t.data_ptr() + 13 * 4 and torch.equal(s, torch.arange(13.0, 37.0))
    tt = t.t()   # [10, 6], non-contiguous: a copy of the rows it spans only
    assert torch.equal(flat_slice(tt, 7, 20), tt.contiguous().view(-1)[7:20])
    a = Assembler()
    assert a.add("x", [[6, 10], 0, 20], t.view(-1)[:20]) is None
    with pytest.raises(ProtocolError, match="expected the next 20"):
        a.add("x", [[6, 10], 30, 40], t.view(-1)[30:40])
    with pytest.raises(ProtocolError, match="is not \\[shape, start, stop\\]"):
        a.add("x", [6, 20, 40], t.view(-1)[20:40])
    assert a.add("x", [[6, 10], 20, 60], t.view(-1)[20:]).equal(t)
    # a copy begun again (an abandoned one left pieces) starts over
    assert a.add("y", [[6, 10], 0, 20], t.view(-1)[:20]) is None
    assert a.add("y", [[6, 10], 0, 60], t.view(-1)).equal(t) and not a.pending
    assert tensor_overhead("abc", 2) > 3 + 2 * 9


# ---- real actors under a small limit --------------------------------------------------------------
SMALL = ActorSettings(heartbeat_interval=0.2, heartbeat_timeout=5.0, ask_timeout=30.0, max_message_bytes=LIMIT)


@pytest.mark.timeout(60)
async def test_stages_copy_units_and_long_kv_to_a_peer_and_the_cache_under_the_limit():
    """SendUnits of five units (the 160 KB embedding among them) to a stage and to the weight cache,
    and ExportKV of a 100-token sequence (100 KB of KV) between two stage actors with a 32 KiB
    limit: they used to fail with MessageTooLarge; now the copies are exact."""
    kw = dict(config=TINY.to_dict(), source={"kind": "preset", "seed": 0}, num_blocks=32, block_size=4)
    async with ActorSystem(SMALL, name="chunks") as system:
        a = await system.launch(StageActor, dict(kw, start=0, end=5), name="a", in_process=True)
        b = await system.launch(StageActor, dict(kw, start=0, end=0, load=False), name="b", in_process=True)
        cache = WeightCache(1 << 30)
        cache_actor = await system.spawn(WeightCacheActor(cache, "m", TINY), "weights")
        core_a, core_b = a.actor.behaviour.core, b.actor.behaviour.core
        units = list(range(5))
        want = core_a.unit_tensors(units)
        assert max(t.numel() * t.element_size() for t in want.values()) > LIMIT

        assert await system.ask(b.ref, SendUnits([], a.ref)) == 0   # (nothing to send: no message)
        nbytes = await system.ask(a.ref, SendUnits(units, b.ref))
        assert nbytes == sum(t.numel() * t.element_size() for t in want.values())
        await system.ask(b.ref, PrepareUnits(0, 5, from_peer=True))
        assert await system.ask(a.ref, SendUnits(units, cache_actor.ref)) == nbytes
        assert cache.holds("m", units) and len(cache) == len(units)
        for name, t in want.items():
            assert torch.equal(core_b.unit_tensors(units)[name], t), name
            assert torch.equal(cache.take("m", units)[name], t), name

        # KV of attention units 1 and 3 for 100 tokens: 1 KiB a token, filled with known values
        attn = [u for u in units if TINY.unit_kind(u) == "attention"]
        shape = (len(attn), 100, TINY.num_kv_heads, TINY.head_dim)
        k, v = torch.randn(shape), torch.randn(shape)
        core_a.begin_reshape()
        assert core_a.import_kv("s", attn, 0, k, v)
        await system.ask(b.ref, ExpectPeers(0, [a.ref]))
        sent = await system.ask(a.ref, ExportKV([["s", attn, 0, 60], ["s", attn, 60, 100]], b.ref, strict=True))
        assert sent == 2 * k.numel() * 4
        k2, v2 = core_b.export_kv("s", attn, 0, 100)
        assert torch.equal(k2, k) and torch.equal(v2, v)
        status = await system.ask(a.ref, StageStatus())
        assert status["kv_messages_out"] >= -(-sent // LIMIT), status


# ---- a reshape of a running pipeline --------------------------------------------------------------
@contextlib.asynccontextmanager
async def small_pipeline(boundaries: list[int], **overrides):
    """FlexPipe.launch("tiny", in_process=True) on an actor system whose max_message_bytes is LIMIT, with
    a weight cache (FlexPipe.launch takes no ActorSettings: what it does, with these)."""
    settings = dataclasses.replace(Settings(), **overrides)
    settings.check()
    spec = ModelSpec.resolve("tiny", settings.seed)
    shape = plan_shape(spec.config, boundaries=boundaries, device=settings.device)
    actor_settings = ActorSettings(heartbeat_interval=settings.heartbeat_interval,
                                   heartbeat_timeout=settings.heartbeat_timeout,
                                   start_timeout=settings.start_timeout, torch_threads=settings.torch_threads,
                                   max_message_bytes=LIMIT)
    async with ActorSystem(actor_settings, name="flexpipe") as system:
        controller = Controller(system, spec, settings, in_process=True, weight_cache=WeightCache(1 << 30))
        router = await controller.start(shape)
        try:
            yield FlexPipe(spec, settings, system, router, controller)
        finally:
            await controller.aclose()


@pytest.mark.timeout(120)
async def test_a_reshape_moves_peer_weights_cached_weights_and_long_kv_under_the_limit():
    """Two in-flight reshapes under a 32 KiB max_message_bytes, every output equal to the oracle:
    1. [0,9,18] -> [0,5,12,18] with a new first stage (another device) and peer weights: the embedding
       and the units a kept stage gains come from peers, the units that leave go to the weight cache,
       and KV of requests with 48+ tokens moves (units 1 and 3: 1 KiB a token; 9 and 11 likewise);
    2. back to [0,9,18] with weights from the cache (units 0-4 and 9-11, evicted by 1).
    Both used to abort (MessageTooLarge: one message per copy)."""
    reqs1 = request_mix(6, seed=5, max_tokens=(50, 70))
    reqs2 = request_mix(6, seed=6, max_tokens=(50, 70))
    long_kv = lambda r: r.computed >= 48   # noqa: E731  (its KV of two attention units: 48+ KiB)
    async with small_pipeline([0, 9, 18], max_batch_tokens=32) as fp:   # (a step's residual: 16 KiB)
        cache = fp.controller.weight_cache
        task1 = asyncio.ensure_future(run_all(fp, reqs1))
        async with held(fp.router, n=2, want=long_kv):
            st1 = await fp.reshape(boundaries=[0, 5, 12, 18], devices=["cpu:1", "cpu", "cpu"], weights_from="peer")
        assert st1.ok and st1.weights_from == "peer" and st1.weight_bytes > 10 * LIMIT, st1.to_dict()
        assert st1.kv_bytes > 2 * LIMIT and st1.requests_running >= 2, st1.to_dict()
        assert cache.holds(fp.controller.model_key, [*range(0, 5), *range(9, 12)])
        task2 = asyncio.ensure_future(run_all(fp, reqs2))
        async with held(fp.router, n=2, want=long_kv):
            st2 = await fp.reshape(boundaries=[0, 9, 18], weights_from="cache")
        assert st2.ok and st2.weights_from == "cache" and st2.weight_bytes > 10 * LIMIT, st2.to_dict()
        assert cache.stats().hits >= 8 and st2.kv_bytes > 2 * LIMIT, (cache.stats(), st2.to_dict())
        outs = await asyncio.gather(task1, task2)
        check_against_oracle(fp, reqs1 + reqs2, outs[0] + outs[1])
        assert [h.kind for h in fp.controller.history] == ["reshape", "reshape"]
        assert fp.router.sched.stats.preemptions == 0

"""The scheduler and KV ledger driven directly, with a deterministic stand-in for the model.

The stand-in's next token is a pure function of the sequence so far (as a greedy model's is), so
every request's output must be the same however it was batched, chunked or preempted.
"""

import random
from types import SimpleNamespace

import pytest

from flexpipe.errors import CapacityError
from flexpipe.runtime.cache import CacheManager, StagePool
from flexpipe.runtime.scheduler import Request, Scheduler


def next_token(seq):
    h = 1469598103934665603
    for t in seq:
        h = ((h ^ t) * 1099511628211) & ((1 << 64) - 1)
    return h % 97


def expected(prompt, max_tokens, stop):
    seq = list(prompt)
    out = []
    while len(out) < max_tokens:
        t = next_token(seq)
        out.append(t)
        seq.append(t)
        if t in stop:
            break
    return out


def make(n_blocks=64, block_size=4, stages=3, **kw):
    pools = [StagePool(n_blocks, (0,) if i else ()) for i in range(stages)]  # stage 0: no attention
    cache = CacheManager(block_size, pools)
    return Scheduler(cache, **kw)


def run(sched, reqs, rng):
    """Drive the scheduler like a pipeline with several steps in flight, finishing them in order."""
    outs = {r.id: [] for r in reqs}
    seen_kv = {}  # seq -> tokens the "stages" hold, to check chunks are contiguous
    inflight = []
    for _ in range(100000):
        mb = sched.schedule()
        if mb is not None:
            for f in mb.frees:
                seen_kv.pop(f, None)
            inflight.append(mb)
            continue
        if not inflight:
            if not sched.has_work():
                return outs
            raise AssertionError("scheduler stalled with work pending")
        mb = inflight.pop(0)
        ids, toks = [], []
        for c in mb.chunks:
            assert seen_kv.get(c.seq_id, 0) == c.start, "chunk does not continue the KV held"
            seen_kv[c.seq_id] = c.start + len(c.tokens)
            if c.sample:
                req = sched.requests[c.seq_id]
                ids.append(c.seq_id)
                toks.append(next_token(req.tokens))
        for ev in sched.on_output(mb.step, ids, toks):
            if ev.token_id is not None:
                outs[ev.request_id].append(ev.token_id)
        # the ledger never goes over capacity
        for p in sched.cache.pools:
            assert 0 <= p.used <= p.capacity
    raise AssertionError("did not finish")


def req(i, prompt, max_tokens, stop=frozenset()):
    return Request(f"r{i}", prompt, SimpleNamespace(max_tokens=max_tokens), frozenset(stop), 10_000)


@pytest.mark.parametrize("seed", range(5))
def test_outputs_independent_of_batching_and_preemption(seed):
    rng = random.Random(seed)
    sched = make(n_blocks=24, block_size=4, max_batch_tokens=16, max_inflight=3)
    reqs = [req(i, [rng.randrange(97) for _ in range(rng.randint(1, 30))], rng.randint(1, 20), {5})
            for i in range(24)]
    for r in reqs:
        sched.add(r)
    outs = run(sched, reqs, rng)
    for r in reqs:
        assert outs[r.id] == expected(r.prompt, r.params.max_tokens, {5})
    assert sched.stats.preemptions > 0, "memory was meant to be tight enough to preempt"
    assert all(p.used == 0 for p in sched.cache.pools)


def test_cancel_frees_blocks_and_tells_stages():
    sched = make(max_inflight=2)
    r = req(0, [1, 2, 3], 50)
    sched.add(r)
    mb = sched.schedule()
    assert sched.cancel("r0") == []  # in flight: finishes when the step returns
    evs = sched.on_output(mb.step, ["r0"], [7])
    assert evs[-1].finish_reason == "cancelled"
    assert sched.cache.pools[1].used == 0
    sched.add(req(1, [4], 2))
    assert "r0" in sched.schedule().frees


def test_admission_counts_the_rest_of_a_prompt_still_being_prefilled():
    # A's 36-token prompt goes in 8-token chunks; B was admitted into the KV A's later chunks needed,
    # then preempted by them and prefilled again: 71 tokens computed for 58
    sched = make(n_blocks=10, block_size=4, max_batch_tokens=8, max_inflight=2)
    a, b = req(0, list(range(36)), 2), req(1, list(range(12)), 10)
    for r in (a, b):
        sched.add(r)
    outs = run(sched, [a, b], random.Random(0))
    assert outs == {"r0": expected(a.prompt, 2, ()), "r1": expected(b.prompt, 10, ())}
    assert sched.stats.preemptions == 0 and sched.stats.tokens_scheduled == 36 + 1 + 12 + 9


def test_requests_queued_again_are_not_new_ones():
    # max_queued bounds the requests never admitted; a preempted (or recovered) request waiting again
    # for KV it once had filled that bound, and new requests were refused with QueueFullError
    t = [100.0]
    sched = make(clock=lambda: t[0])
    for i in range(3):
        sched.add(req(i, [1, 2, 3], 50))
    assert sched.queued_new() == 3
    sched.schedule()   # all three admitted
    assert sched.queued_new() == 0 and not sched.waiting
    sched.inflight.clear()
    for r in sched.requests.values():
        r.in_flight = False
    t[0] = 110.0
    sched._preempt("r2")
    assert list(sched.waiting) == ["r2"] and sched.queued_new() == 0
    assert sched.requests["r2"].queued_at == 110.0   # how long it has waited again: since now
    sched.add(req(3, [4], 2))
    assert sched.queued_new() == 1
    sched.requeue_all()   # a recovery queues every running request again: still none of them new
    assert sched.queued_new() == 1


def test_capacity_error_says_what_is_needed():
    cache = CacheManager(16, [StagePool(4, (0,))])
    with pytest.raises(CapacityError, match="needs 100 tokens of KV"):
        cache.check_fits_ever(100)
    cache.check_fits_ever(64)


def test_inflight_limit_and_spread():
    sched = make(max_inflight=4, max_batch_tokens=1000)
    for i in range(8):
        sched.add(req(i, [1, 2], 4))
    batches = [sched.schedule() for _ in range(5)]
    assert batches[4] is None
    assert [len(b.chunks) for b in batches[:4]] == [2, 2, 2, 2]


def test_parallel_slots_counts_devices_that_compute_at_once(monkeypatch):
    from flexpipe.runtime import router as router_mod

    monkeypatch.setattr(router_mod.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    slots = router_mod.parallel_slots
    assert slots(["cpu"] * 4) == 2  # 4 CPU stages share 2 cores
    assert slots(["cpu"] * 4, cpu_threads=2) == 1
    assert slots(["cpu"]) == 1
    assert slots(["cuda:0", "cuda:1", "cuda:2", "cuda:3"]) == 4
    assert slots(["cuda:0", "cuda:0"]) == 1  # two stages on one GPU take turns
    assert slots(["w1/0", "w2/0", "w2/0"]) == 2  # worker daemons' devices
    assert slots(["cuda:0", "cpu", "cpu", "cpu"]) == 3
    assert slots([]) == 1


def test_router_inflight_is_fixed_or_one_per_parallel_slot(monkeypatch):
    from flexpipe.runtime import router as router_mod
    from flexpipe.runtime.messages import ActorRef

    monkeypatch.setattr(router_mod.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    refs = [ActorRef(f"s{i}", f"ipc:///tmp/s{i}") for i in range(4)]
    ranges = [(0, 1), (1, 2), (2, 3), (3, 4)]
    cache = CacheManager(16, [StagePool(64, (0,))] * 4)
    auto = router_mod.RouterActor(cache, router_mod.Pipeline(0, refs, ranges, ["cpu"] * 4), max_context=512)
    assert auto.sched.max_inflight == 2
    auto.switch(router_mod.Pipeline(1, refs, ranges, ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]))
    assert auto.sched.max_inflight == 4
    fixed = router_mod.RouterActor(cache, router_mod.Pipeline(0, refs, ranges, ["cpu"] * 4), max_context=512,
                                   max_inflight=3)
    assert fixed.sched.max_inflight == 3


async def test_requeue_after_a_stage_death_ends_requests_cancelled_meanwhile():
    # a request cancelled while its step was in flight is not recomputed when that step is lost
    from flexpipe.model.sampling import SamplingParams
    from flexpipe.runtime import router as router_mod
    from flexpipe.runtime.messages import ActorRef

    refs = [ActorRef(f"s{i}", f"ipc:///tmp/s{i}") for i in range(2)]
    cache = CacheManager(16, [StagePool(64, (0,))] * 2)
    r = router_mod.RouterActor(cache, router_mod.Pipeline(0, refs, [(0, 1), (1, 2)], ["cpu"] * 2), max_context=512)
    (a, qa), (b, qb) = (r.submit([1, 2, 3], SamplingParams(max_tokens=4)) for _ in range(2))
    steps = [r.sched.schedule() for _ in range(2)]   # (one micro-batch per stage that computes at once)
    assert {c.seq_id for mb in steps if mb for c in mb.chunks} == {a, b}
    r.cancel(a)   # in flight: it ends when its step returns, which it never will
    assert qa.empty()
    assert r.requeue_all() == 1 and list(r.sched.waiting) == [b]
    ev = qa.get_nowait()
    assert ev.finish_reason == "cancelled" and qb.empty()


async def test_quiesce_does_not_wait_for_steps_through_a_stage_already_dead():
    # the router heard of the death before the reshape quiesced it: those steps never come back, and
    # waiting for them would hold the controller's lock that the recovery needs
    import asyncio

    from flexpipe.errors import ActorError
    from flexpipe.model.sampling import SamplingParams
    from flexpipe.runtime import router as router_mod
    from flexpipe.runtime.messages import ActorRef

    refs = [ActorRef(f"s{i}", f"ipc:///tmp/s{i}") for i in range(2)]
    r = router_mod.RouterActor(CacheManager(16, [StagePool(64, (0,))] * 2),
                               router_mod.Pipeline(0, refs, [(0, 1), (1, 2)], ["cpu"] * 2), max_context=512)
    r.submit([1, 2, 3], SamplingParams(max_tokens=4))
    assert r.sched.schedule() is not None
    r.ctx = SimpleNamespace(is_dead=lambda ref: ref == refs[1])   # what the actor knows of its peers
    with pytest.raises(ActorError, match="died"):
        await asyncio.wait_for(r.quiesce(), timeout=5)

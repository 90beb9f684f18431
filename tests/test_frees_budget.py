"""The frees of ended requests fit the message limit: they drain over later steps and new requests are served.

A step carried every pending free beside its batch.  With long request ids (128 characters, 4 bytes each)
or many requests ending at once, the step was above max_message_bytes: it failed (its requests "error"),
its frees were put back for the next step, which failed the same way, and so on: every later request
failed, the pending frees growing.  Now a step with requests carries what fits beside its residual and
frees beyond that go ahead in steps of frees only, each under the limit; the KV those frees release is
reused only by steps that come after them on every stage.
"""

import asyncio
from collections import deque
from types import SimpleNamespace

import pytest
import torch

from flexpipe.api import FlexPipe
from flexpipe.runtime.cache import CacheManager, StagePool, blocks_for
from flexpipe.runtime.codec import encode
from flexpipe.runtime.scheduler import FREES_RETRIES, Request, Scheduler
from flexpipe.runtime.stage import StepInput
from tests.pipeline_helpers import until
from tests.test_scheduler import expected, next_token

LIMIT = 1024   # the smallest max_message_bytes
LONG = "\U0001F600" * 127   # with one more character: the longest request id, 509 bytes


def step_bytes(mb, tensor: torch.Tensor) -> int:
    """The size of the StepInput of `mb` with `tensor` beside it (sampling fields at their largest)."""
    sampling = [[0.7, 40, 0.9, 123456]] * len(mb.chunks)
    msg = StepInput(0, mb.step, [c.seq_id for c in mb.chunks], [c.start for c in mb.chunks],
                    [len(c.tokens) for c in mb.chunks], [c.sample for c in mb.chunks],
                    [c.out_index for c in mb.chunks], sampling, mb.frees)
    return sum(len(bytes(f)) for f in encode(msg, [tensor]))


def message_bytes(mb) -> int:
    """The size of the StepInput the router sends for `mb` (RouterActor._launch), its token ids beside it."""
    return step_bytes(mb, torch.tensor([t for c in mb.chunks for t in c.tokens], dtype=torch.int64))


def fail(sched: Scheduler, mb) -> None:
    """What the router's _fail_step does to a step of frees only that failed."""
    sched.resend_frees(mb)
    del sched.inflight[mb.step]


def drive(sched: Scheduler, reqs: list[Request], capacity: int, refuse: int = 0, late: bool = False) -> dict:
    """Run `reqs` through a model of the stages: each applies a step's frees, then holds the KV its chunks
    write, in launch order.  Every message fits LIMIT (a step of one long id does: max_batch_seqs=1), and no
    stage ever holds more than `capacity` blocks (a block the ledger counted free is reused only after its
    free reached the stages).  The first `refuse` steps of frees only fail as the router's _fail_step ends
    them: not sent, or (`late`) a StepFailed in place of their output, after the stages applied their
    frees.  No request may be left waiting with nothing in flight."""
    for r in reqs:
        sched.add(r)
    outs = {r.id: [] for r in reqs}
    held: dict[str, int] = {}   # blocks the stages hold per sequence
    inflight: deque = deque()
    for _ in range(10_000):
        mb = sched.schedule()
        if mb is not None:
            assert message_bytes(mb) <= LIMIT, (mb.step, len(mb.chunks), mb.frees)
            if not mb.chunks and refuse and not late:
                refuse -= 1
                fail(sched, mb)
                continue
            for f in mb.frees:
                held.pop(f, None)   # (a free sent again after its step failed late: the stages ignore it)
            for c in mb.chunks:
                held[c.seq_id] = blocks_for(c.start + len(c.tokens), sched.cache.block_size)
            assert sum(held.values()) <= capacity, "a block was reused before its free reached the stages"
            inflight.append(mb)
            continue
        if not inflight:
            assert not sched.has_work(), "requests wait with nothing in flight"
            # (the frees of a step of frees only that failed wait for the next request: idle all the same)
            assert sched.idle() and set(held) <= set(sched.pending_frees)
            return outs
        mb = inflight.popleft()
        if not mb.chunks and refuse and late:
            refuse -= 1
            fail(sched, mb)
            continue
        ids, toks = [], []
        for c in mb.chunks:
            if c.sample:
                ids.append(c.seq_id)
                toks.append(next_token(sched.requests[c.seq_id].tokens))
        for ev in sched.on_output(mb.step, ids, toks):
            if ev.token_id is not None:
                outs[ev.request_id].append(ev.token_id)
    raise AssertionError("did not finish")


def request(rid: str, prompt: list[int], max_tokens: int) -> Request:
    return Request(rid, prompt, SimpleNamespace(max_tokens=max_tokens), frozenset(), 10_000)


def test_many_long_frees_go_in_steps_of_their_own_and_later_requests_are_served():
    # six long ids end within a few steps of each other (3 KB of frees), short ones keep arriving behind,
    # into 8 blocks: the KV of those frees is needed before they could all have gone
    sched = Scheduler(CacheManager(4, [StagePool(8, (0,))]), max_batch_tokens=8, max_batch_seqs=1,
                      max_inflight=2, max_message_bytes=LIMIT)
    reqs = [request(f"{i}{LONG}", [i + 1, 2, 3], 1 + i % 3) for i in range(6)]
    reqs += [request(f"s{i}", [9, i, 7, 5], 4) for i in range(6)]
    outs = drive(sched, reqs, capacity=8)
    assert outs == {r.id: expected(r.prompt, r.params.max_tokens, ()) for r in reqs}
    assert sched.stats.free_steps >= 6   # (a long free never rides beside a batch at this limit)


def test_a_preemption_whose_free_does_not_fit_the_step_sends_it_first():
    # 8 blocks of 4 tokens: the two requests cannot both grow to 24 tokens, the later one is preempted;
    # its long id does not fit beside the batch, so its free goes alone before its blocks are reused
    sched = Scheduler(CacheManager(4, [StagePool(8, (0,))]), max_batch_tokens=8, max_batch_seqs=1,
                      max_inflight=2, max_message_bytes=LIMIT)
    reqs = [request(f"a{LONG}", [1, 2, 3, 4], 20), request(f"b{LONG}", [5, 6, 7, 8], 20)]
    outs = drive(sched, reqs, capacity=8)
    assert outs == {r.id: expected(r.prompt, 20, ()) for r in reqs}
    assert sched.stats.preemptions >= 1


def test_a_step_of_frees_only_that_fails_is_sent_again_before_any_step_reuses_its_blocks():
    # x's long free does not fit beside a step; its step of frees only failed once, and b, which needs x's
    # blocks, was admitted at once: the stages still held them (MemoryError, b ended "error")
    sched = Scheduler(CacheManager(4, [StagePool(4, (0,))]), max_batch_tokens=16, max_batch_seqs=4,
                      max_inflight=1, max_message_bytes=LIMIT)
    reqs = [request(f"x{LONG}", list(range(1, 13)), 1), request("b", [5, 6, 7, 8, 9, 10, 11], 3)]
    outs = drive(sched, reqs, capacity=4, refuse=1)
    assert outs == {r.id: expected(r.prompt, r.params.max_tokens, ()) for r in reqs}


@pytest.mark.parametrize("refuse", [1, 2])
def test_a_preemption_after_a_failed_step_of_frees_only_sends_its_free_first_and_nothing_hangs(refuse):
    # a step of frees only failed after the stages applied them (StepFailed), then a pick preempted a long
    # id: its free could not ride and went nowhere (no step of frees only after one failed), so nothing
    # was in flight and the requests waited for ever
    sched = Scheduler(CacheManager(4, [StagePool(3, (0,))]), max_batch_tokens=8, max_batch_seqs=1,
                      max_inflight=3, max_message_bytes=LIMIT)
    reqs = [request("s0", [1, 2, 3], 5), request(f"1{LONG}", [4, 5, 6, 7], 1), request("s2", [8, 9, 1, 2], 7)]
    outs = drive(sched, reqs, capacity=3, refuse=refuse, late=True)
    assert outs == {r.id: expected(r.prompt, r.params.max_tokens, ()) for r in reqs}
    assert sched.stats.preemptions >= 1


@pytest.mark.parametrize("event", ["a request comes", "a new pipeline"])
def test_frees_a_step_waits_for_refused_again_and_again_hold_every_step_back_until_an_event(event):
    # after FREES_RETRIES refusals in a row nothing goes (no step may reuse x's blocks, and the pump must
    # not go round for ever); a step coming back, a request coming or ending, or a reshape's switch to a
    # new pipeline (RouterActor.switch) tries them again, first and alone
    sched = Scheduler(CacheManager(4, [StagePool(4, (0,))]), max_batch_tokens=16, max_inflight=1,
                      max_message_bytes=LIMIT)
    sched.add(request(f"x{LONG}", list(range(1, 13)), 1))
    sched.add(request("b", [5, 6, 7, 8, 9, 10, 11], 3))
    mb = sched.schedule()
    sched.on_output(mb.step, [f"x{LONG}"], [7])   # x ends: its free does not ride beside b's step
    for _ in range(FREES_RETRIES):
        alone = sched.schedule()
        assert alone.chunks == [] and alone.frees == [f"x{LONG}"]
        fail(sched, alone)
    assert sched.schedule() is None and sched.requests["b"].computed == 0 and not sched.inflight
    if event == "a new pipeline":
        sched.new_pipeline()
    else:
        sched.add(request("c", [1], 1))
    assert sched.schedule().frees == [f"x{LONG}"]   # first, alone
    assert [c.seq_id for c in sched.schedule().chunks] == (["b"] if event == "a new pipeline" else ["b", "c"])


@pytest.mark.timeout(60)
async def test_long_request_ids_at_the_smallest_limit_do_not_fail_every_later_request():
    # the long ids' frees made every step too large: all five requests failed, the frees pending grew
    async with FlexPipe.launch("tiny", stages=1, in_process=True, max_message_bytes=LIMIT,
                               max_batch_tokens=1) as fp:
        router = fp.router
        first = await asyncio.wait_for(asyncio.gather(
            *(fp.complete("ab", max_tokens=2, request_id=f"{i}{LONG}") for i in range(3))), 30)
        later = [await asyncio.wait_for(fp.complete("hello", max_tokens=3, request_id=f"s{i}"), 30)
                 for i in range(3)]
        await until(router, router.sched.idle, timeout=30)
        assert [c.finish_reason for c in first + later] == ["length"] * 6
        assert all(c.token_ids == fp.reference_tokens("ab", max_tokens=2) for c in first)
        assert all(c.token_ids == fp.reference_tokens("hello", max_tokens=3) for c in later)
        st = fp.status()["router"]
        assert st["frees_pending"] == 0 and st.get("step_failures", 0) == 0 and st["free_steps"] >= 3
        assert all(p["used"] == 0 for p in st["kv"])
        [stage] = await fp.controller.stage_status()
        assert stage["sequences"] == 0 and stage["free_blocks"] == stage["num_blocks"]


@pytest.mark.timeout(60)
async def test_frees_refused_again_and_again_with_nothing_in_flight_are_tried_again_later():
    # After FREES_RETRIES refusals of the frees a step waits for, with nothing in flight, nothing went
    # until a request came or ended: the requests running waited for an unrelated event.  The router
    # tries them again after a wait (doubling); here the first FREES_RETRIES + 2 steps of frees only are
    # refused the way Actor.tell refuses a message, and every request still ends with the oracle's tokens.
    from flexpipe.errors import MessageTooLarge

    async with FlexPipe.launch("tiny", stages=1, in_process=True, max_message_bytes=LIMIT,
                               max_batch_tokens=1) as fp:
        router = fp.router
        tell, refused = router.ctx.tell, []

        async def refuse_frees_only_steps(ref, msg, *tensors):
            if isinstance(msg, StepInput) and not msg.seq_ids and len(refused) < FREES_RETRIES + 2:
                refused.append(msg.step)
                raise MessageTooLarge(f"StepInput to {ref} not sent (refused by the test)")
            await tell(ref, msg, *tensors)

        router.ctx.tell = refuse_frees_only_steps
        done = await asyncio.wait_for(asyncio.gather(
            *(fp.complete("ab", max_tokens=2, request_id=f"{i}{LONG}") for i in range(3))), 45)
        assert len(refused) == FREES_RETRIES + 2
        assert [c.finish_reason for c in done] == ["length"] * 3
        assert all(c.token_ids == fp.reference_tokens("ab", max_tokens=2) for c in done)
        await until(router, router.sched.idle, timeout=30)
        assert fp.status()["router"]["frees_pending"] == 0

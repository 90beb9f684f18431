"""A step's request ids and fields fit the message limit beside its residual: chunks beyond it go in the next step.

Every chunk of a step carries its request's id (up to 128 characters) and fields.  The scheduler counted
tokens and frees but not those: at max_message_bytes=8192 with 15 tokens of tiny's residual (7680 bytes,
the budget check_hop_fits allows), a step of 15 requests with 16-character ids was 8473 bytes between two
stages (10168 with 128-character ids): not sent, and all 15 requests ended "error".
"""

import asyncio
from types import SimpleNamespace

import pytest
import torch

from flexpipe.api import FlexPipe
from flexpipe.runtime.cache import CacheManager, StagePool
from flexpipe.runtime.chunks import budget
from flexpipe.runtime.scheduler import Request, Scheduler
from tests.pipeline_helpers import until
from tests.test_frees_budget import step_bytes
from tests.test_scheduler import expected, next_token

LIMIT = 8192
TOKENS = 15            # max_batch_tokens: tiny's residual of 15 tokens is 7680 bytes, budget(8192)
HIDDEN = budget(LIMIT) // (4 * TOKENS)   # float32 [T, HIDDEN] of the whole budget at T = TOKENS
LONG = "\U0001F600" * 127   # with one more character: the longest request id, 509 bytes


def hop_bytes(mb) -> int:
    """The size of the StepInput a stage sends the next one for `mb`, its residual [T, HIDDEN] beside it."""
    return step_bytes(mb, torch.zeros(mb.num_tokens, HIDDEN))


def run(sched: Scheduler, reqs: list[Request]) -> tuple[dict, list]:
    """Run `reqs` one step at a time; returns each request's tokens and the sizes in chunks of the steps
    with requests (those of frees only go too: the frees of long ids are more than a step carries)."""
    for r in reqs:
        sched.add(r)
    outs = {r.id: [] for r in reqs}
    steps = []
    while sched.has_work():
        mb = sched.schedule()
        assert mb is not None, "requests wait with nothing in flight"
        assert mb.chunks or mb.frees
        assert hop_bytes(mb) <= sched.max_message_bytes, (mb.step, len(mb.chunks), len(mb.frees))
        if mb.chunks:
            steps.append(len(mb.chunks))
        ids = [c.seq_id for c in mb.chunks if c.sample]
        for ev in sched.on_output(mb.step, ids, [next_token(sched.requests[i].tokens) for i in ids]):
            if ev.token_id is not None:
                outs[ev.request_id].append(ev.token_id)
    return outs, steps


def request(rid: str, prompt: list[int], max_tokens: int) -> Request:
    return Request(rid, prompt, SimpleNamespace(max_tokens=max_tokens), frozenset(), 10_000)


@pytest.mark.parametrize("width", [16, 128, "long"])
def test_a_full_residual_and_the_ids_of_many_requests_go_in_steps_under_the_limit(width):
    sched = Scheduler(CacheManager(4, [StagePool(64, (0,))]), max_batch_tokens=TOKENS, max_inflight=1,
                      max_message_bytes=LIMIT)
    reqs = [request(f"{i:02d}" + (LONG if width == "long" else "x" * (width - 2)), [i + 1], 3) for i in range(15)]
    outs, steps = run(sched, reqs)
    assert outs == {r.id: expected(r.prompt, 3, ()) for r in reqs}
    assert max(steps) > (1 if width != "long" else 0)   # the ids that fit go together (two long ones do not)


def test_the_first_chunk_of_a_step_goes_whatever_its_ids_size():
    # at the smallest limit one long id is above the headroom beside a full residual: a step of it alone
    # goes (in one stage there is no residual), never a step of no chunks (but frees) or none at all;
    # three in one step were 1.7 KB even from the router to a single stage
    sched = Scheduler(CacheManager(4, [StagePool(64, (0,))]), max_batch_tokens=8, max_inflight=1,
                      max_message_bytes=1024)
    reqs = [request(f"{i}{LONG}", [i + 1, 2], 2) for i in range(3)]
    for r in reqs:
        sched.add(r)
    outs = {r.id: [] for r in reqs}
    while sched.has_work():
        mb = sched.schedule()
        assert mb is not None and (len(mb.chunks) == 1 or not mb.chunks and mb.frees)
        ids = [c.seq_id for c in mb.chunks if c.sample]
        for ev in sched.on_output(mb.step, ids, [next_token(sched.requests[i].tokens) for i in ids]):
            if ev.token_id is not None:
                outs[ev.request_id].append(ev.token_id)
    assert outs == {r.id: expected(r.prompt, 2, ()) for r in reqs}


@pytest.mark.timeout(60)
async def test_many_requests_beside_a_full_residual_between_two_stages_are_served():
    async with FlexPipe.launch("tiny", stages=2, in_process=True, max_message_bytes=LIMIT,
                               max_batch_tokens=TOKENS, max_inflight=1) as fp:
        done = await asyncio.wait_for(asyncio.gather(*[
            fp.complete([65 + i], max_tokens=3, request_id=f"{i:02d}".ljust(128, "x")) for i in range(15)]), 30)
        assert [c.finish_reason for c in done] == ["length"] * 15
        assert all(c.token_ids == fp.reference_tokens([65 + i], max_tokens=3) for i, c in enumerate(done))
        await until(fp.router, fp.router.sched.idle, timeout=30)
        assert fp.router.stats.get("step_failures", 0) == 0


def test_at_the_default_limit_a_step_takes_as_many_long_ids_as_before():
    # The ids were budgeted beside a residual of all of budget() whatever the model: at 1 GiB a step
    # of 128-character ids of 4-byte characters held 115 chunks instead of max_batch_seqs' 256 (2.2x
    # the decode steps; an auditor's comparison with the scheduler before). With the runtime's real
    # residual (tokens x hidden x dtype, a few MiB) the headroom is most of the limit.
    def first_step(residual):
        sched = Scheduler(CacheManager(16, [StagePool(4096, (0,))]), max_batch_tokens=512, max_inflight=1,
                          max_message_bytes=1 << 30, residual_bytes=residual)
        for i in range(256):
            sched.add(request(f"{i:02x}" + "\U0001F600" * 126, [5], 4))
        return len(sched.schedule().chunks)

    assert first_step(512 * 4096 * 2) == 256
    assert first_step(None) < 256   # (unknown: all of budget(), as before)

"""Frees of an idle pipeline reach every stage: the KV of requests that ended is dropped on the stages
as soon as nothing else runs, not when the next request comes (until then every stage held blocks
that the router's ledger counted free, and what a reshape meanwhile found on the stages was stale).

The frees ride on steps; with no step to carry them they go in a step of frees only, down the same
path, which every stage applies and passes on and which returns to the router like any other.  The
router is `idle()` once that step is back, so waiting on it (`until`) is a handshake with the data
path, never a sleep.
"""

import asyncio
from types import SimpleNamespace

import pytest

from flexpipe.api import FlexPipe
from flexpipe.runtime.cache import CacheManager, StagePool
from flexpipe.runtime.scheduler import Request, Scheduler
from tests.pipeline_helpers import check_against_oracle, request_mix, until

pytestmark = pytest.mark.timeout(120)   # stage processes start: slow on a busy 2-core machine


async def held_by_stages(fp) -> list[tuple[int, int]]:
    """(sequences, blocks in use) of each stage, from the status the controller exposes."""
    return [(st["sequences"], st["num_blocks"] - st["free_blocks"]) for st in await fp.controller.stage_status()]


async def complete_all(fp, reqs: list[dict], ids: list[str | None]) -> list:
    return await asyncio.gather(*(fp.complete(r["prompt"], request_id=rid, **{k: v for k, v in r.items()
                                                                            if k != "prompt"})
                                  for r, rid in zip(reqs, ids)))


async def test_an_idle_pipeline_frees_every_stage_and_serves_the_oracle_after():
    async with FlexPipe.launch("tiny", stages=3) as fp:   # (a middle stage passes the frees on too)
        router = fp.router
        await complete_all(fp, request_mix(4, seed=31, max_tokens=(4, 10)), ["r0", "r1", "r2", "r3"])
        await until(router, router.sched.idle, timeout=60)
        assert await held_by_stages(fp) == [(0, 0)] * 3
        st = fp.status()["router"]
        assert all(p["used"] == 0 for p in st["kv"]) and st["frees_pending"] == 0 and st["free_steps"] >= 1
        assert st.get("stale_outputs", 0) == 0 and st.get("step_failures", 0) == 0
        # every stage passed each step of frees on (none computed it), and the router took them back
        assert all(s["free_steps"] == st["free_steps"] for s in await fp.controller.stage_status())
        # requests after it, two under the ids of finished ones, equal the oracle: no block went astray
        more = request_mix(4, seed=32, max_tokens=(4, 10))
        check_against_oracle(fp, more, await complete_all(fp, more, ["r0", "r1", None, None]))
        await until(router, router.sched.idle, timeout=60)
        assert await held_by_stages(fp) == [(0, 0)] * 3


async def test_a_request_cancelled_while_idle_is_freed_on_every_stage():
    async with FlexPipe.launch("tiny", stages=2) as fp:
        router = fp.router
        events = []
        agen = fp.generate("cancel me while the pipeline waits", max_tokens=400, ignore_eos=True,
                           request_id="victim")
        async for ev in agen:
            events.append(ev)
            if len(events) == 3:
                break
        # paused with nothing in flight: the request is between steps and no step can carry its frees
        await router.quiesce()
        held = await held_by_stages(fp)
        assert all(n == 1 and used > 0 for n, used in held), held
        router.cancel("victim")   # not in flight: it ends now, its KV is free in the ledger
        await agen.aclose()
        assert all(p["used"] == 0 for p in fp.status()["router"]["kv"])
        assert await held_by_stages(fp) == held, "a paused router sends nothing, frees neither"
        router.resume()   # nothing to run: the frees go out alone
        await until(router, router.sched.idle, timeout=60)
        assert await held_by_stages(fp) == [(0, 0)] * 2
        assert router.sched.stats.cancelled == 1
        # and a request cancelled from the client side mid-stream (its step in flight) as well
        agen = fp.generate("and me", max_tokens=400, ignore_eos=True)
        async for ev in agen:
            break
        await agen.aclose()
        await until(router, router.sched.idle, timeout=60)
        assert await held_by_stages(fp) == [(0, 0)] * 2 and router.sched.stats.cancelled == 2
        c = await fp.complete("after", max_tokens=5, ignore_eos=True)
        assert c.token_ids == fp.reference_tokens("after", max_tokens=5, ignore_eos=True)


# ---- the scheduler's side, driven directly -------------------------------------------------------
def _sched(max_inflight: int = 1) -> Scheduler:
    return Scheduler(CacheManager(4, [StagePool(32, (0,))] * 2), max_batch_tokens=64, max_inflight=max_inflight)


def _req(rid: str, max_tokens: int = 1) -> Request:
    return Request(rid, [1, 2, 3], SimpleNamespace(max_tokens=max_tokens), frozenset(), 10_000)


def test_frees_go_alone_only_when_no_step_is_in_flight_and_take_no_stage_turn():
    sched = _sched(max_inflight=2)
    sched.add(_req("a"))
    sched.add(_req("b", max_tokens=5))
    first, second = sched.schedule(), None
    assert [c.seq_id for c in first.chunks] == ["a"]
    second = sched.schedule()
    assert [c.seq_id for c in second.chunks] == ["b"]
    sched.on_output(first.step, ["a"], [7])   # a ends; b's step is still in flight: it will carry them
    assert sched.pending_frees == ["a"] and sched.schedule() is None and not sched.idle()
    sched.on_output(second.step, ["b"], [7])
    third = sched.schedule()   # b's next decode takes a's frees
    assert third.chunks and third.frees == ["a"]
    sched.cancel("b")
    sched.on_output(third.step, ["b"], [7])   # b ends with it: nothing runs, nothing is in flight
    alone = sched.schedule()
    assert alone.chunks == [] and alone.frees == ["b"] and sched.stats.free_steps == 1
    assert sched.schedule() is None and not sched.idle()   # one at a time: it is in flight
    sched.max_inflight = 1
    sched.add(_req("c"))
    nxt = sched.schedule()   # a step of frees only takes no stage's turn: c goes at once behind it
    assert [c.seq_id for c in nxt.chunks] == ["c"] and nxt.frees == []
    assert sched.on_output(alone.step, [], []) == []
    sched.on_output(nxt.step, ["c"], [7])
    last = sched.schedule()
    assert last.chunks == [] and last.frees == ["c"]
    sched.on_output(last.step, [], [])
    assert sched.idle() and sched.stats.steps == 4 and sched.stats.free_steps == 2


def test_the_frees_of_a_failed_step_of_frees_wait_for_a_step_with_requests():
    # a stage refused the step of frees only: sending them alone again would go round for ever
    sched = _sched()
    sched.add(_req("a"))
    mb = sched.schedule()
    sched.on_output(mb.step, ["a"], [7])
    alone = sched.schedule()
    assert alone.frees == ["a"]
    sched.resend_frees(alone)
    del sched.inflight[alone.step]
    assert sched.pending_frees == ["a"] and sched.schedule() is None
    assert sched.idle()   # nothing can go until a request comes: idle (waiting on it would time out)
    sched.add(_req("b"))
    mb = sched.schedule()
    assert mb.frees == ["a"] and [c.seq_id for c in mb.chunks] == ["b"]
    sched.on_output(mb.step, ["b"], [7])
    assert sched.schedule().frees == ["b"]   # alone again, once a step with requests went


async def test_the_step_of_frees_goes_beside_its_message_not_down_a_channel_hop():
    # transport="shm": GpuStageActors with a channel between them (the machinery of cuda_ipc, on a host
    # ring).  The step of frees has an empty host tensor: down a cuda_ipc channel, which carries CUDA
    # tensors only, its send would fail and put the hop on the message path for good.  So it goes
    # beside its message, and every step with requests still takes its residual from the channel.
    async with FlexPipe.launch("tiny", stages=2, transport="shm") as fp:
        router = fp.router
        first = await fp.complete("through the hop", max_tokens=6, ignore_eos=True)
        await until(router, router.sched.idle, timeout=60)
        assert await held_by_stages(fp) == [(0, 0)] * 2
        again = await fp.complete("through the hop", max_tokens=6, ignore_eos=True)
        assert again.token_ids == first.token_ids == fp.reference_tokens("through the hop", max_tokens=6,
                                                                           ignore_eos=True)
        await until(router, router.sched.idle, timeout=60)
        hop, last = await fp.controller.stage_status()
        assert hop["hop"] == "shm" and hop["hop_failed"] == hop["hop_beside"] == 0, hop
        assert hop["free_steps"] == last["free_steps"] == 2 and hop["hop_sends"] == hop["steps"] > 0, hop
        assert await held_by_stages(fp) == [(0, 0)] * 2

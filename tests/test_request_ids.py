"""A request id a client picks names one request at a time, and is free again once that request ended.

Ended means finished, cancelled, or stopped at a stop string: a new request may take the id at once,
even while a step of the old one is still in flight, and nothing of the old one (a late cancel of its
client, its step's output, the frees of its KV) may reach the new one.  Outputs are the oracle's.
The interleavings are driven by the order of awaits, not by sleeps: the router launches a request's
next step before its client reads the token the last step produced.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import AsyncIterator

import pytest

from flexpipe.api import FlexPipe
from flexpipe.runtime.remote import RemoteFlexPipe
from tests.pipeline_helpers import until

pytestmark = pytest.mark.timeout(60)

PROMPT = "Once upon a time"
OTHER = "Hello again"


async def _idle_and_clean(fp: FlexPipe) -> None:
    """Nothing of any request is left: records, streams, ledger, and every stage's KV tables."""
    router = fp.router
    await until(router, router.sched.idle, timeout=30)
    assert not router.sched.requests and not router.streams and not router._keyed
    assert not router.cache.seq_blocks and all(p["used"] == 0 for p in router.cache.usage())
    for st in await fp.controller.stage_status():
        assert st["free_blocks"] == st["num_blocks"], st


def _first_stop(fp: FlexPipe, tokens: list[int], at: int) -> str:
    """The shortest end of the text of tokens[:at] that its text before token `at` lacks: a stop string
    that the `at`-th token completes (and no earlier one)."""
    dec = fp.tokenizer.decode
    before, text = dec(tokens[:at - 1]), dec(tokens[:at])
    assert text.startswith(before) and len(text) > len(before), "needs a token that adds whole characters"
    stop = next(text[-k:] for k in range(1, len(text) + 1) if text[-k:] not in before)
    assert text.find(stop) == len(text) - len(stop)
    return stop


async def test_a_late_close_of_a_finished_stream_does_not_cancel_the_next_request_of_its_id():
    # A's client read its last token but not its finish event, then closed its iterator only after
    # B had taken the id (an `async for` left with break closes it later, in a task): A's close
    # cancelled by id, and B ended "cancelled" with no token.
    async with FlexPipe.launch("tiny", stages=1, in_process=True) as fp:
        a = fp.generate(PROMPT, max_tokens=3, ignore_eos=True, request_id="conv-1")
        got = [(await a.__anext__()).token_id for _ in range(3)]
        assert "conv-1" not in fp.router.streams   # finished there: the id is free
        b = fp.generate(OTHER, max_tokens=8, ignore_eos=True, request_id="conv-1")
        events = [await b.__anext__()]
        await a.aclose()   # A ends now, late
        events += [ev async for ev in b]
        assert got == fp.reference_tokens(PROMPT, max_tokens=3, ignore_eos=True)
        assert [ev.token_id for ev in events if ev.token_id is not None] == \
            fp.reference_tokens(OTHER, max_tokens=8, ignore_eos=True)
        assert events[-1].finish_reason == "length"
        assert fp.router.stats["finish_length"] == 2 and fp.router.stats["finish_cancelled"] == 0
        await _idle_and_clean(fp)


@pytest.mark.parametrize("in_process", [True, False], ids=["in_process", "stage_process"])
async def test_an_id_cancelled_while_its_step_is_in_flight_names_a_new_request_at_once(in_process):
    # The old request's step is still out when the new one arrives: the new one was refused ("already
    # in use").  It must not share the old one's scheduler record or KV on the stages either.
    async with FlexPipe.launch("tiny", stages=1, in_process=in_process) as fp:
        router = fp.router
        finished = []
        router.listeners.append(lambda kind, _now, req: kind == "finish" and finished.append((req.id, req.finished)))
        a = fp.generate(PROMPT, max_tokens=40, ignore_eos=True, request_id="conv-1")
        await a.__anext__()
        old = router.sched.requests["conv-1"]
        assert old.in_flight   # (the pump launched its next step before this client read the token)
        await a.aclose()
        assert "conv-1" not in router.streams and old.cancel_requested and old.in_flight
        b = fp.generate(OTHER, max_tokens=8, ignore_eos=True, request_id="conv-1")
        events = [await b.__anext__()]
        new = router.streams["conv-1"].request
        assert new is not old and new.id != old.id   # another key on the stages than the old step's
        events += [ev async for ev in b]
        assert [ev.token_id for ev in events if ev.token_id is not None] == \
            fp.reference_tokens(OTHER, max_tokens=8, ignore_eos=True)
        assert events[-1].finish_reason == "length"
        await _idle_and_clean(fp)
        assert sorted(finished) == sorted([("conv-1", "cancelled"), (new.id, "length")])


async def test_a_stop_string_ends_its_request_before_its_next_step_and_frees_its_id():
    # The client found the stop string while the request's next step was in flight: the id stayed
    # in use until that step returned, and a new request of the id was refused.
    async with FlexPipe.launch("tiny", stages=1, in_process=True) as fp:
        router = fp.router
        finished = []
        router.listeners.append(lambda kind, _now, req: kind == "finish" and finished.append((req.finished,
                                                                                             list(req.output))))
        ref = fp.reference_tokens(PROMPT, max_tokens=20, ignore_eos=True)
        stop = _first_stop(fp, ref, 2)
        a = await fp.complete(PROMPT, max_tokens=20, ignore_eos=True, stop=[stop], request_id="conv-1")
        assert a.finish_reason == "stop" and a.token_ids == ref[:2]
        assert a.text == fp.tokenizer.decode(ref[:2])[:-len(stop)]
        b = await fp.complete(PROMPT, max_tokens=4, ignore_eos=True, request_id="conv-1")
        assert b.finish_reason == "length" and b.token_ids == ref[:4]
        assert finished == [("stop", ref[:2]), ("length", ref[:4])]   # (no token computed past the stop)
        assert router.stats["finish_stop"] == 1 and router.stats["finish_cancelled"] == 0
        await _idle_and_clean(fp)


async def test_a_stop_string_completed_by_the_last_allowed_token_counts_as_stop():
    # The scheduler had finished the request as "length" before the client saw the text; the
    # client's stop came too late and the router's stats and listeners counted "length".
    async with FlexPipe.launch("tiny", stages=2, in_process=True, block_size=4) as fp:
        router = fp.router
        reasons = []
        router.listeners.append(lambda kind, _now, req: kind == "finish" and reasons.append(req.finished))
        ref = fp.reference_tokens(PROMPT, max_tokens=4, ignore_eos=True)
        stop = _first_stop(fp, ref, 4)
        c = await fp.complete(PROMPT, max_tokens=4, ignore_eos=True, stop=[stop])
        assert c.finish_reason == "stop" and c.token_ids == ref
        assert c.text == fp.tokenizer.decode(ref)[:-len(stop)]
        assert reasons == ["stop"]
        assert router.stats["finish_stop"] == 1 and router.stats["finish_length"] == 0
        await _idle_and_clean(fp)


@contextlib.asynccontextmanager
async def _router_daemon() -> AsyncIterator[RemoteFlexPipe]:
    """A router daemon and a worker on this loop (its stage in a process of its own), and a client."""
    from flexpipe.runtime.daemon.router import RouterDaemon
    from flexpipe.runtime.daemon.worker import WorkerDaemon

    url = f"ipc:///tmp/fp-ids-{uuid.uuid4().hex[:12]}"   # (short: a long ipc path does not bind)
    stop_router, stop_worker = asyncio.Event(), asyncio.Event()
    router = asyncio.ensure_future(RouterDaemon(url, "tiny", stages=1, min_workers=1).run(stop_router))
    worker = asyncio.ensure_future(WorkerDaemon(url, name="w0", devices="cpu:0", memory=1 << 30).run(stop_worker))
    try:
        async with RemoteFlexPipe.connect(url, ready_timeout=60) as fp:
            yield fp
    finally:
        stop_router.set()   # (first: it stops its stage through the worker)
        assert await asyncio.wait_for(router, 60) == 0
        stop_worker.set()
        assert await asyncio.wait_for(worker, 60) == 0


async def test_through_a_router_daemon_an_id_is_free_once_its_request_ended_and_only_its_client_ends_it():
    # The client told its Cancel in a task: a Submit of the same id went out first, so the router
    # refused it (the old request still ran) or, when the old one had finished, took it and then
    # cancelled it.  The old request's last Tokens must not reach the new one either.
    async with _router_daemon() as fp:
        ref = await asyncio.to_thread(fp.reference_tokens, OTHER, max_tokens=8, ignore_eos=True)
        # the first request finished there (its last Tokens came), and is closed only after the next
        a = fp.generate(PROMPT, max_tokens=3, ignore_eos=True, request_id="conv-1")
        assert [(await a.__anext__()).index for _ in range(3)] == [0, 1, 2]
        b = fp.generate(OTHER, max_tokens=8, ignore_eos=True, request_id="conv-1")
        events = [await b.__anext__()]
        await a.aclose()
        events += [ev async for ev in b]
        assert [ev.token_id for ev in events if ev.token_id is not None] == ref
        assert events[-1].finish_reason == "length"
        # the same, closed before the next request (its Cancel went out after that one's Submit)
        a = fp.generate(PROMPT, max_tokens=3, ignore_eos=True, request_id="conv-0")
        assert [(await a.__anext__()).index for _ in range(3)] == [0, 1, 2]
        await a.aclose()
        c = await fp.complete(OTHER, max_tokens=8, ignore_eos=True, request_id="conv-0")
        assert c.finish_reason == "length" and c.token_ids == ref
        # cancelled while its next step runs, then the id at once
        a = fp.generate(PROMPT, max_tokens=40, ignore_eos=True, request_id="conv-2")
        await a.__anext__()
        await a.aclose()
        c = await fp.complete(OTHER, max_tokens=8, ignore_eos=True, request_id="conv-2")
        assert c.finish_reason == "length" and c.token_ids == ref
        # ended by a stop string (the client ends it: Cancel "stop"), then the id at once
        first = await asyncio.to_thread(fp.reference_tokens, PROMPT, max_tokens=20, ignore_eos=True)
        stop = _first_stop(fp, first, 2)
        c = await fp.complete(PROMPT, max_tokens=20, ignore_eos=True, stop=[stop], request_id="conv-3")
        assert c.finish_reason == "stop" and c.token_ids == first[:2]
        c = await fp.complete(OTHER, max_tokens=8, ignore_eos=True, request_id="conv-3")
        assert c.finish_reason == "length" and c.token_ids == ref
        st = (await fp.status())["router"]
        assert (st.get("finish_length"), st.get("finish_cancelled"), st.get("finish_stop")) == (6, 1, 1), st


async def test_a_decoder_that_fails_ends_its_own_request_only():
    # The router decodes the text now (inside a step's output): a decoder's exception there must end
    # that request with "error", not lose the tokens of the others in the step.
    class Failing:
        def __init__(self) -> None:
            self.fed = 0

        def feed(self, token_id: int) -> tuple[str, bool]:
            self.fed += 1
            if self.fed == 2:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a decoder's bug")
            return "x", False

        def flush(self) -> tuple[str, bool]:
            return "", False

    async with FlexPipe.launch("tiny", stages=1, in_process=True) as fp:
        params = fp._params(max_tokens=6, ignore_eos=True)
        _, queue = fp.router.submit(fp.encode(PROMPT), params, "bad", text=Failing())
        good = await fp.complete(OTHER, max_tokens=8, ignore_eos=True)
        events = [await queue.get() for _ in range(2)]
        assert [(ev.index, ev.finish_reason) for ev in events] == [(0, None), (1, "error")]
        assert good.token_ids == fp.reference_tokens(OTHER, max_tokens=8, ignore_eos=True)
        assert fp.router.stats["decode_errors"] == 1 and fp.router.stats["finish_error"] == 1
        await _idle_and_clean(fp)

"""Hostile pipeline traffic against a live 2-stage pipeline (hypothesis, fixed example budget):
StepInput / StepOutput / StepFailed / FreeSeqs with wrong and current epochs, unknown sequence ids,
malformed fields and tensors, duplicated and replayed messages, and truncated or mutated frames.
Afterwards every actor still answers, the KV ledger is empty, and real requests still equal the
oracle.

The fuzzer sends as the controller's own actor (fp.system) and as anonymous DEALERs, so a stage refuses
its steps (they come from no stage's upstream) and nothing may be allocated; tests/test_stage_roles.py
checks the refusals one by one and what a step from the right upstream may cost. Not covered here:
forged StepOutputs of a step really in flight, and a peer that announces another actor's ref (inside
the CURVE boundary, runtime/keys.py)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings, strategies as st

from flexpipe.api import FlexPipe
from flexpipe.runtime import codec
from flexpipe.runtime.codec import ASK
from flexpipe.runtime.stage import FreeSeqs, StageStatus, StepFailed, StepInput, StepOutput
from flexpipe.runtime.router import RouterStatus
from tests.pipeline_helpers import check_against_oracle, request_mix, run_all, until

pytestmark = pytest.mark.timeout(400)

EXAMPLES = 120


class LivePipe:
    """A FlexPipe on an event loop of its own thread, so hypothesis can drive it from sync code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.cm = FlexPipe.launch("tiny", stages=2, in_process=True)
        self.fp = self.run(self.cm.__aenter__(), 120)

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        try:
            self.run(self.cm.__aexit__(None, None, None), 60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.fixture(scope="module")
def live():
    pipe = LivePipe()
    yield pipe
    pipe.close()


@pytest.fixture(autouse=True)
def no_leaked_resources():
    """The module-scoped pipeline outlives single tests: its sockets are checked when it closes."""
    yield


ints = st.one_of(st.integers(-3, 40), st.integers(-2**63, 2**63 - 1))
junk = st.one_of(st.none(), st.booleans(), ints, st.text(max_size=8), st.binary(max_size=8),
                 st.lists(st.integers(-2, 5), max_size=3))
seq_ids = st.lists(st.one_of(st.sampled_from(["fz-a", "fz-b", "fz-c"]), junk), max_size=4)


def small_list(elem):
    return st.lists(elem, max_size=4)


@st.composite
def step_inputs(draw, epoch):
    ids = draw(seq_ids)
    n = len(ids)
    lens = draw(st.one_of(st.lists(st.integers(0, 6), min_size=n, max_size=n), small_list(junk)))
    msg = StepInput(draw(st.one_of(st.just(epoch), ints)), draw(ints), ids,
                    draw(st.one_of(st.lists(st.integers(0, 40), min_size=n, max_size=n), small_list(junk))),
                    lens,
                    draw(st.one_of(st.lists(st.booleans(), min_size=n, max_size=n), small_list(junk))),
                    draw(small_list(junk)),
                    draw(st.one_of(st.lists(st.just([0.0, 0, 1.0, 0]), min_size=n, max_size=n),
                                   small_list(small_list(junk)))),
                    draw(st.one_of(st.just([]), seq_ids)))
    total = sum(x for x in lens if isinstance(x, int) and not isinstance(x, bool)) if \
        all(isinstance(x, int) for x in lens) else 0
    x = draw(st.one_of(
        st.just(torch.randint(0, 200, (max(total, 0),), dtype=torch.int64)),   # right size
        st.builds(lambda k: torch.zeros(k, dtype=torch.int64), st.integers(0, 50)),
        st.builds(lambda k: torch.randn(k, 64), st.integers(0, 6)),          # a hidden-state shape
        st.just(torch.full((3,), 10**9, dtype=torch.int64)),                 # out of the vocabulary
        st.just(torch.zeros(2, dtype=torch.bfloat16)),
        st.none()))                                                          # no tensor at all
    return msg, x


@st.composite
def hostile(draw, epoch, n_stages):
    """(target, message, tensors): target is a stage index or "router"."""
    kind = draw(st.sampled_from(["input", "output", "failed", "free"]))
    if kind == "input":
        msg, x = draw(step_inputs(epoch))
        return draw(st.integers(0, n_stages - 1)), msg, () if x is None else (x,)
    ep = draw(st.one_of(st.just(epoch), ints))
    if kind == "output":
        return "router", StepOutput(ep, draw(ints), draw(seq_ids), draw(small_list(junk))), ()
    if kind == "failed":
        return "router", StepFailed(ep, draw(ints), draw(ints), draw(st.text(max_size=20))), ()
    return draw(st.integers(0, n_stages - 1)), FreeSeqs(ep, draw(seq_ids)), ()


def _mutations(frames: list, data) -> list:
    frames = [bytes(f) for f in frames]
    i = data.draw(st.integers(0, len(frames) - 1))
    f = bytearray(frames[i])
    op = data.draw(st.sampled_from(["truncate", "flip", "drop", "extra"]))
    if op == "truncate":
        frames[i] = bytes(f[:data.draw(st.integers(0, max(len(f) - 1, 0)))])
    elif op == "flip" and f:
        j = data.draw(st.integers(0, len(f) - 1))
        f[j] ^= data.draw(st.integers(1, 255))
        frames[i] = bytes(f)
    elif op == "drop" and len(frames) > 1:
        del frames[i]
    else:
        frames.append(data.draw(st.binary(max_size=64)))
    return frames


def _alive(live: LivePipe) -> None:
    fp = live.fp
    for sl in fp.controller.slots:
        assert isinstance(live.run(fp.system.ask(sl.ref, StageStatus(), timeout=10)), dict)
    assert isinstance(live.run(fp.system.ask(fp.controller.router_actor.ref, RouterStatus(), timeout=10)),
                      dict)


def test_hostile_messages_leave_every_actor_answering(live):
    fp = live.fp
    # a real load first, so replays below hit request ids and steps that really existed
    reqs = request_mix(3, seed=5, max_tokens=(6, 12))
    live.run(run_all(fp, reqs), 120)
    epoch = fp.controller.router.epoch
    n = len(fp.controller.slots)
    refs = [sl.ref for sl in fp.controller.slots]
    live.run(until(fp.router, fp.router.sched.idle, timeout=30))   # the last frees reached every stage
    free_before = [live.run(fp.system.ask(r, StageStatus()))["free_blocks"] for r in refs]
    router_ref = fp.controller.router_actor.ref
    zctx = zmq.Context()
    raw = {ref: zctx.socket(zmq.DEALER) for ref in (*refs, router_ref)}
    for ref, sock in raw.items():
        sock.linger = 0
        sock.connect(ref.endpoint)
    sent = {"messages": 0, "frames": 0}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(items=st.lists(hostile(epoch, n), min_size=1, max_size=6), data=st.data())
    def fuzz(items, data):
        for target, msg, tensors in items:
            ref = router_ref if target == "router" else refs[target]
            copies = data.draw(st.integers(1, 3))     # duplicated deliveries
            try:
                frames = codec.encode(msg, tensors, flags=data.draw(st.sampled_from([0, ASK])), corr=1)
            except Exception:   # not encodable at all: nothing to send
                continue
            for _ in range(copies):
                live.run(fp.system.tell(ref, msg, *tensors))
                sent["messages"] += 1
            if data.draw(st.booleans()):
                raw[ref].send_multipart(_mutations(frames, data))
                sent["frames"] += 1
        # out of order: the same batch again, reversed
        if data.draw(st.booleans()):
            for target, msg, tensors in reversed(items):
                ref = router_ref if target == "router" else refs[target]
                live.run(fp.system.tell(ref, msg, *tensors))
                sent["messages"] += 1

    try:
        fuzz()
        _alive(live)
    finally:
        for sock in raw.values():
            sock.close(linger=0)
        zctx.term()
    assert sent["messages"] > EXAMPLES
    # forged steps come from no stage's upstream: refused, and no KV block was taken
    stage_status = [live.run(fp.system.ask(r, StageStatus())) for r in refs]
    refused = sum(sl.handle.actor.stats["senders_refused"] for sl in fp.controller.slots)
    print(f"\nfuzz: {sent}; senders refused by the stages: {refused}")
    assert [s["free_blocks"] for s in stage_status] == free_before
    assert refused > 0
    # the router's ledger and the pipeline still serve real requests with the oracle's output
    reqs = request_mix(4, seed=11, max_tokens=(8, 20))
    outs = live.run(run_all(fp, reqs), 180)
    check_against_oracle(fp, reqs, outs)
    _alive(live)
    status = fp.status()
    assert status["router"]["stale_outputs"] > 0
    assert all(p["used"] == 0 for p in status["router"]["kv"])

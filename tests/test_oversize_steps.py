"""A step whose message is above max_message_bytes fails its requests at once (FlexPipe and `flexpipe serve`).

Actors refuse to send such a message (MessageTooLarge).  A stage (or the router) that could not send a step
logged it as if the next stage were gone and dropped it: nobody recovers a step that was refused, so its
requests waited for ever.  `check_hop_fits` refuses at launch a limit too small for a micro-batch's
residual, but not the rest of a StepInput beside it (request ids of up to 512 bytes, frees), nor a hop
that falls back to messages at run time; `flexpipe serve` met that refusal only in the app's startup."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys

import pytest
import torch

from flexpipe.api import FlexPipe
from flexpipe.errors import MessageTooLarge, PeerDeadError
from flexpipe.model.config import ModelConfig
from flexpipe.runtime.actor import LocalContext
from flexpipe.runtime.messages import ActorRef
from flexpipe.runtime.stage import Configure, StageActor, StepFailed, StepInput, StepOutput
from tests.pipeline_helpers import until

pytestmark = pytest.mark.timeout(60)

ROUTER = ActorRef("router", "ipc:///r")
NEXT = ActorRef("stage2", "ipc:///n")
LONG_ID = "\U0001F600" * 127   # the longest request id (MAX_ID_CHARS) in 4-byte characters: 508 bytes


class RefusingContext(LocalContext):
    """A LocalContext whose tells of `kind` raise `error` (what Actor.tell does above max_message_bytes)."""

    def __init__(self, *a, kind: type, error: Exception, **kw):
        super().__init__(*a, **kw)
        self.kind, self.error = kind, error

    async def tell(self, ref, msg, *tensors):
        if isinstance(msg, self.kind):
            raise self.error
        await super().tell(ref, msg, *tensors)


async def stage_of(units: tuple[int, int], kind: type, error: Exception) -> RefusingContext:
    cfg = ModelConfig.preset("tiny")
    stage = StageActor(cfg.to_dict(), {"kind": "preset", "seed": 0}, *units, num_blocks=32, block_size=4)
    ctx = await RefusingContext(stage, "stage1", kind=kind, error=error).start()
    last = units[1] == cfg.num_units
    await ctx.deliver(Configure(0, 0, None if last else NEXT, ROUTER, ROUTER))
    return ctx


def a_step() -> StepInput:
    return StepInput(0, 7, ["a"], [0], [3], [True], [0], [[0.0, 0, 1.0, 0]], [])


@pytest.mark.parametrize("units, kind", [((0, 2), StepInput), ((0, ModelConfig.preset("tiny").num_units), StepOutput)],
                         ids=["residual", "result"])
async def test_a_step_output_too_large_to_send_is_a_failed_step(units, kind):
    ctx = await stage_of(units, kind, MessageTooLarge(f"{kind.__name__} to x not sent: message of 9 bytes exceeds"))
    await ctx.deliver(a_step(), torch.tensor([1, 2, 3]))
    [(to, failed, _)] = ctx.outbox
    assert to == ROUTER and isinstance(failed, StepFailed)
    assert (failed.step, failed.stage) == (7, 0) and failed.error.startswith("MessageTooLarge: ")
    await ctx.deliver(StepInput(0, 8, ["b"], [0], [2], [False], [0], [[0.0, 0, 1.0, 0]], []), torch.tensor([1, 2]))
    assert len(ctx.outbox) == 2   # it goes on serving: the next step is refused the same way, not lost


async def test_a_next_stage_that_is_gone_is_left_to_the_routers_recovery():
    ctx = await stage_of((0, 2), StepInput, PeerDeadError("stage2 is dead"))
    await ctx.deliver(a_step(), torch.tensor([1, 2, 3]))
    assert ctx.outbox == []   # the router learns of the death itself and requeues the step's requests


async def test_a_residual_too_large_for_a_message_fails_its_requests_and_others_go_on(caplog):
    # 15 tokens x hidden 128 x float32 = 7680 bytes, just the budget check_hop_fits allows under 8192: the
    # longest request id beside it does not fit (stage 0 logged "not delivered" and the request waited)
    async with FlexPipe.launch("tiny", stages=2, in_process=True, max_message_bytes=8192,
                               max_batch_tokens=15) as fp:
        with caplog.at_level(logging.WARNING):
            failed = await asyncio.wait_for(fp.complete(list(range(65, 80)), max_tokens=3, request_id=LONG_ID), 30)
        assert failed.finish_reason == "error" and fp.router.stats["step_failures"] == 1
        assert "failed on stage 0: MessageTooLarge: StepInput" in caplog.text
        await until(fp.router, fp.router.sched.idle, timeout=30)   # its frees go out in a step of their own
        ok = await asyncio.wait_for(fp.complete(list(range(65, 80)), max_tokens=3), 30)
        await until(fp.router, fp.router.sched.idle, timeout=30)
        assert ok.finish_reason == "length" and fp.router.stats["step_failures"] == 1


async def test_a_step_the_router_cannot_send_fails_its_requests():
    # The router took a refusal to send (MessageTooLarge, what Actor.tell raises above the limit) for a
    # dead stage 0, and the step stayed in flight: every request behind it waited.  Fifteen requests of
    # the longest ids at 8192 bytes were such a step until the scheduler budgeted the ids too
    # (tests/test_step_id_budget.py); the router's first step is refused here the way tell refuses it.
    async with FlexPipe.launch("tiny", stages=1, in_process=True, max_message_bytes=8192,
                               max_batch_tokens=15) as fp:
        ctx = fp.router.ctx
        tell, refused = ctx.tell, []

        async def refuse_the_first_step(ref, msg, *tensors):
            if isinstance(msg, StepInput) and not refused:
                refused.append(msg.step)
                raise MessageTooLarge(f"StepInput to {ref} not sent: message of 9000 bytes exceeds "
                                      "max_message_bytes=8192")
            await tell(ref, msg, *tensors)

        ctx.tell = refuse_the_first_step
        done = await asyncio.wait_for(asyncio.gather(*[
            fp.complete([65], max_tokens=2, request_id=f"{i:x}" + LONG_ID) for i in range(15)]), 30)
        assert refused and "error" in {c.finish_reason for c in done} and fp.router.stats["step_failures"] == 1
        for c in done:   # a request not in the refused step is served
            assert c.finish_reason == "error" or c.token_ids == fp.reference_tokens([65], max_tokens=2)
        await until(fp.router, fp.router.sched.idle, timeout=30)   # no step is left waiting
        ok = await fp.complete([65], max_tokens=2)
        assert ok.finish_reason == "length" and ok.token_ids == fp.reference_tokens([65], max_tokens=2)


def test_serve_refuses_a_message_limit_below_a_micro_batch_in_one_line():
    pytest.importorskip("starlette", reason="the 'serve' extra is not installed")
    out = subprocess.run([sys.executable, "-m", "flexpipe.cli", "serve", "--port", "0", "--stages", "2",
                          "--max-message-bytes", "4096", "--max-batch-tokens", "256"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert "flexpipe: error: setting max_message_bytes=4096: a micro-batch's activations between stages" \
        in out.stderr
    assert "Traceback" not in out.stderr and "starting model" not in out.stderr, out.stderr

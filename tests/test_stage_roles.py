"""Who may send what to a stage, and what a hostile step may cost it (FP-9).

A stage takes steps of its epoch only from its upstream, reshape and KV commands only from its
controller, and copied KV or weights only from the peers the controller named; a step that does not
fit its KV (an unknown sequence not at token 0, malformed fields) is refused with a typed error and
allocates nothing.  And the sockets a pipeline holds come back to their count after reshapes."""

from __future__ import annotations

import os

import pytest
import torch

from flexpipe.api import FlexPipe
from flexpipe.errors import RemoteError, StepRejected
from flexpipe.model.config import ModelConfig
from flexpipe.runtime import ActorSystem
from flexpipe.runtime.actor import LocalContext
from flexpipe.runtime.messages import ActorRef
from flexpipe.runtime.stage import (
    Activate, Configure, ExpectPeers, ExportKV, FreeSeqs, ImportKV, ResetKV, StageActor, StageStatus, StepFailed,
    StepInput, StepOutput, UnitTensors,
)
from flexpipe.runtime.stage_core import StageCore, StepMeta
from tests.pipeline_helpers import until

pytestmark = pytest.mark.timeout(300)

ROUTER = ActorRef("router", "ipc:///r")
CTRL = ActorRef("system-1", "ipc:///c")
NEXT = ActorRef("stage2", "ipc:///n")
STRANGER = ActorRef("stranger", "ipc:///x")
GREEDY = [0.0, 0, 1.0, 0]


def step(seq: str, start: int, n: int, epoch: int = 0, **kw) -> StepInput:
    fields = dict(epoch=epoch, step=1, seq_ids=[seq], starts=[start], lens=[n], sample=[False], out_index=[0],
                  sampling=[GREEDY], frees=[])
    fields.update(kw)
    return StepInput(**fields)


async def first_stage() -> tuple[StageActor, LocalContext]:
    cfg = ModelConfig.preset("tiny")
    stage = StageActor(cfg.to_dict(), {"kind": "preset", "seed": 0}, 0, 2, num_blocks=32, block_size=4,
                       controller=[CTRL.name, CTRL.endpoint])
    ctx = await LocalContext(stage, "stage1").start()
    await ctx.deliver(Configure(0, 0, NEXT, ROUTER, ROUTER))
    return stage, ctx


async def test_a_stage_knows_who_may_send_what():
    stage, _ = await first_stage()
    ok = stage.check_sender
    assert ok(ROUTER, step("a", 0, 1)) is None                 # steps: from the upstream only
    assert "come from" in ok(STRANGER, step("a", 0, 1))
    assert "come from" in ok(CTRL, step("a", 0, 1))
    assert "come from" in ok(None, step("a", 0, 1))            # an anonymous DEALER
    assert ok(STRANGER, step("a", 0, 1, epoch=7)) is None      # another epoch: dropped as stale anyway
    for msg in (ResetKV(1), Activate(1, 0, 0, 2, NEXT, ROUTER, ROUTER), ExportKV([], NEXT), FreeSeqs(0, ["a"]),
                Configure(0, 0, NEXT, ROUTER, ROUTER), ExpectPeers(1, [STRANGER])):
        assert ok(CTRL, msg) is None
        assert "controller" in ok(STRANGER, msg)
        assert "controller" in ok(ROUTER, msg)
    for msg in (ImportKV([]), UnitTensors([])):
        assert ok(CTRL, msg) is None
        assert "neither" in ok(STRANGER, msg)
    stage.expect_peers(None, ExpectPeers(1, [STRANGER]))
    assert ok(STRANGER, ImportKV([])) is None
    assert ok(STRANGER, StageStatus()) is None                 # read-only: anyone may ask


async def test_forged_steps_get_a_typed_error_and_allocate_nothing():
    stage, ctx = await first_stage()
    core = stage.core
    free = core.free_blocks
    hostile = [
        (step("ghost", 40, 2), torch.tensor([1, 2])),                     # unknown sequence past token 0
        (step("a", 0, 3), torch.tensor([1, 2])),                          # tensor rows != sum(lens)
        (step("a", 0, 2, starts=[0, 4]), torch.tensor([1, 2])),           # fields of different lengths
        (step("a", 0, 2, lens=[-2]), torch.tensor([1, 2])),
        (step("a", 0, 2, sample=["yes"]), torch.tensor([1, 2])),
        (step(7, 0, 2), torch.tensor([1, 2])),                            # a sequence id that is no string
        (step("a", 0, 2), None),                                          # no tensor at all
    ]
    for msg, x in hostile:
        with pytest.raises(StepRejected):
            await ctx.deliver(msg, *(() if x is None else (x,)))
        assert core.free_blocks == free and not core.tables, msg
    # a step that passes the checks but fails inside forward gives back what it took (and says so)
    await ctx.deliver(step("a", 0, 2), torch.tensor([1, 10**9]))          # out of the vocabulary
    assert core.free_blocks == free and not core.tables
    assert [type(m).__name__ for _, m, _ in ctx.outbox][-1] == "StepFailed"
    # a stage that serves no attention unit yet (only units prepared for the next epoch, whose KV
    # arrives by ImportKV) takes later chunks of sequences it has no KV of
    cfg = ModelConfig.preset("tiny")
    embed = StageActor(cfg.to_dict(), {"kind": "preset", "seed": 0}, 0, 1, num_blocks=32, block_size=4)
    ectx = await LocalContext(embed, "embed").start()
    await ectx.deliver(Configure(0, 0, NEXT, ROUTER, ROUTER))
    embed.core.prepare(0, 3)
    await ectx.deliver(step("b", 40, 2), torch.tensor([1, 2]))
    assert [type(m).__name__ for _, m, _ in ectx.outbox] == ["StepInput"]
    # a real first chunk allocates, and its frees give it back
    await ctx.deliver(step("a", 0, 5), torch.tensor([1, 2, 3, 4, 5]))
    assert core.free_blocks == free - 2
    await ctx.deliver(FreeSeqs(0, ["a"]))
    assert core.free_blocks == free


async def test_a_step_must_continue_where_the_sequences_kv_ends():
    """A step of a held sequence starts where its KV ends (or at 0, computed again): one at a position
    the stage already holds would rewrite that request's KV, one past it would leave a hole."""
    stage, ctx = await first_stage()
    core = stage.core
    await ctx.deliver(step("a", 0, 5), torch.tensor([1, 2, 3, 4, 5]))
    k = core.kv[1].k.clone()
    for start in (2, 4, 6, 7):   # held positions, and past the 5 tokens (still inside its 2 blocks)
        with pytest.raises(StepRejected, match="starts at token 5"):
            await ctx.deliver(step("a", start, 1), torch.tensor([9]))
        assert core.lengths["a"] == 5 and torch.equal(core.kv[1].k, k)
    await ctx.deliver(step("a", 5, 1), torch.tensor([6]))                   # the next token
    assert core.lengths["a"] == 6
    await ctx.deliver(step("a", 0, 2), torch.tensor([1, 2]))                # computed again from token 0
    assert core.lengths["a"] == 2 and len(core.tables["a"]) == 1
    await ctx.deliver(FreeSeqs(0, ["a"]))
    assert not core.lengths and not core.tables


async def test_a_late_kv_copy_does_not_move_where_a_running_sequence_continues():
    """A kept stage of a merge imports KV of the units it will serve; a copy of a sequence's earlier
    run (preempted and begun again meanwhile) arriving late must not set where its next step starts."""
    cfg = ModelConfig.preset("tiny")
    stage, ctx = await first_stage()
    await ctx.deliver(ExpectPeers(1, []))
    stage.core.prepare(0, 4)
    toks = torch.arange(1, 9)
    await ctx.deliver(step("s", 0, 8), toks)
    peer = StageCore(cfg, stage.core.source, 0, 4, num_blocks=32, block_size=4)   # the merge's other half
    peer.forward(StepMeta(["s"], [0], [8], [False], [0], [GREEDY]), toks)
    k, v = peer.export_kv("s", [3], 0, 8)                      # the pre-copy round's KV of s, gathered
    await ctx.deliver(step("s", 0, 0, sample=[], out_index=[], sampling=[], seq_ids=[], starts=[], lens=[],
                           frees=["s"]), torch.empty(0, dtype=torch.int64))   # s preempted ...
    await ctx.deliver(step("s", 0, 4), toks[:4])              # ... and begun again
    await ctx.deliver(ImportKV([["s", [3], 0]]), k, v)       # the late copy of its earlier run
    assert stage.core.lengths["s"] == 4
    await ctx.deliver(step("s", 4, 4), toks[4:])              # its next chunk (was StepRejected)
    assert [type(m).__name__ for _, m, _ in ctx.outbox][-1] == "StepInput"


async def test_forged_messages_are_refused_on_a_live_pipeline():
    async with FlexPipe.launch("tiny", stages=2, in_process=True) as fp:
        await fp.complete("warm", max_tokens=2)
        await until(fp.router, fp.router.sched.idle, timeout=30)   # its frees reached every stage
        refs = [sl.ref for sl in fp.controller.slots]
        before = [await fp.system.ask(r, StageStatus()) for r in refs]
        async with ActorSystem(fp.system.settings, name="intruder") as intruder:
            x = torch.tensor([1, 2, 3])
            for r in refs:
                with pytest.raises(RemoteError) as e:
                    await intruder.ask(r, step("forged", 0, 3, epoch=fp.controller.router.epoch), x, timeout=10)
                assert e.value.kind == "SenderRefused"
                for msg in (ResetKV(99), FreeSeqs(0, ["x"]), ImportKV([])):
                    with pytest.raises(RemoteError) as e:
                        await intruder.ask(r, msg, timeout=10)
                    assert e.value.kind == "SenderRefused"
            # nor does the router take outputs or failures of its epoch from anyone but its stages
            epoch = fp.controller.router.epoch
            for msg in (StepOutput(epoch, 1, ["x"], [5]), StepFailed(epoch, 1, 0, "forged")):
                with pytest.raises(RemoteError) as e:
                    await intruder.ask(fp.controller.router_actor.ref, msg, timeout=10)
                assert e.value.kind == "SenderRefused"
            assert fp.controller.router_actor.stats["senders_refused"] == 2
        # the controller's own actor is not stage 0's upstream either
        with pytest.raises(RemoteError) as e:
            await fp.system.ask(refs[0], step("forged", 0, 3, epoch=fp.controller.router.epoch), x, timeout=10)
        assert e.value.kind == "SenderRefused"
        after = [await fp.system.ask(r, StageStatus()) for r in refs]
        assert [s["free_blocks"] for s in after] == [s["free_blocks"] for s in before]
        assert [s["epoch"] for s in after] == [s["epoch"] for s in before]
        assert sum(h.actor.stats["senders_refused"] for h in (sl.handle for sl in fp.controller.slots)) == 9
        c = await fp.complete("still serving", max_tokens=4)
        assert len(c.token_ids) == 4


def _fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
@pytest.mark.parametrize("in_process", [False, True], ids=["stage-processes", "in-process"])
async def test_fds_come_back_after_reshapes_and_a_recovery(in_process):
    # this process holds the router and the controller (a retired stage's Process kept two pipes), and
    # in-process the stages too; a stage process that lives through the reshapes kept a DEALER to
    # every next stage it ever had
    async with FlexPipe.launch("tiny", stages=2, in_process=in_process) as fp:
        await fp.complete("warm", max_tokens=2)
        base = _fds()
        stage_base = {} if in_process else {sl.handle.pid: _fds(sl.handle.pid) for sl in fp.controller.slots}
        for n in (3, 1, 2, 3, 2):
            await fp.reshape(stages=n)
            await fp.complete("after a reshape", max_tokens=2)
        assert fp.controller.history[-1].ok
        assert _fds() == base
        kept = {pid: _fds(pid) for pid in (sl.handle.pid for sl in fp.controller.slots) if pid in stage_base}
        assert in_process or kept, "no stage process lived through the reshapes: nothing to compare"
        assert kept == {pid: stage_base[pid] for pid in kept}
        if not in_process:
            fp.controller.slots[1].handle.kill()
            while not fp.controller.history or fp.controller.history[-1].kind != "recovery":
                await fp.complete("through a recovery", max_tokens=2)
            await fp.complete("after the recovery", max_tokens=2)
            assert _fds() == base

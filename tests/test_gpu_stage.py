"""GpuStageActor's decisions and bookkeeping without a GPU: which hop a stage pair gets, which
behaviour the controller launches, falling back to the message path (a plain neighbour, a residual
larger than the ring, a failed channel), refusing CUDA IPC KV copies where they cannot run, and the
device-drawn preset weights on the CPU. The data moving over CUDA is tests/test_gpu.py's."""

from __future__ import annotations

import asyncio

import pytest
import torch

from flexpipe.errors import ConfigError, RemoteError
from flexpipe.model.checkpoint import PresetWeights
from flexpipe.model.config import ModelConfig
from flexpipe.model.device_weights import DevicePresetWeights
from flexpipe.runtime.gpu_stage import (
    GPU_TARGET, PLAIN_TARGET, GpuStageActor, OpenHop, ReserveKV, choose_hop, hop_capacity, stage_target,
)
from flexpipe.runtime.actor import handles
from flexpipe.runtime.messages import ActorRef, message
from flexpipe.runtime.stage import Configure, FreeSeqs, StageStatus, StepFailed, StepInput, StepOutput
from flexpipe.runtime import codec
from flexpipe.transports import Endpoint
from tests.pipeline_helpers import poll_until

pytestmark = pytest.mark.timeout(60)

A0, A1 = Endpoint("a", 1, "cuda:0"), Endpoint("a", 2, "cuda:1")


@pytest.mark.parametrize("mode, src, dst, reason, want", [
    ("auto", A0, A1, "", "cuda_ipc"),
    ("auto", A0, Endpoint("a", 2, "cuda:0"), "", "cuda_ipc"),           # two processes on one GPU
    ("auto", A0, A1, "CuPy is not installed", "message"),
    ("auto", A0, Endpoint("b", 2, "cuda:0"), "", "message"),           # other host: NCCL is not wired in
    ("auto", A0, Endpoint("a", 1, "cuda:0"), "", "message"),           # same process
    ("auto", A0, Endpoint("a", 2, "cpu"), "", "message"),
    ("auto", Endpoint("a", 1, "cpu"), Endpoint("a", 2, "cpu"), "", "message"),
    ("message", A0, A1, "", "message"),
    ("cuda_ipc", A0, A1, "", "cuda_ipc"),
    ("shm", Endpoint("a", 1, "cpu"), Endpoint("a", 2, "cpu"), "", "shm"),
    ("shm", A0, A1, "CuPy is not installed", "shm"),
])
def test_choose_hop(mode, src, dst, reason, want):
    kind, why = choose_hop(mode, src, dst, reason)
    assert kind == want and (why == "") == (want != "message")
    if reason and want == "message":
        assert why == reason


@pytest.mark.parametrize("mode, dst, match", [
    ("cuda_ipc", Endpoint("a", 2, "cuda:1"), "CuPy"), ("cuda_ipc", Endpoint("b", 2, "cuda:0"), "different hosts"),
    ("cuda_ipc", Endpoint("a", 2, "cpu"), "not both stages are on CUDA"), ("shm", Endpoint("b", 2, "cpu"), "hosts"),
    ("shm", Endpoint("a", 1, "cpu"), "share a process"), ("nccl", A1, "give one of")])
def test_choose_hop_refuses_what_was_asked_for_and_cannot_be(mode, dst, match):
    with pytest.raises(ConfigError, match=match):
        choose_hop(mode, A0, dst, "CuPy is not installed")


def test_stage_target_keeps_cpu_stages_plain_under_auto():
    assert stage_target("auto", "cpu") == stage_target("message", "cuda:0") == PLAIN_TARGET
    assert stage_target("auto", "cuda:0") == stage_target("shm", "cpu") == stage_target("cuda_ipc", "cuda") \
        == GPU_TARGET
    with pytest.raises(ConfigError, match="transport 'ipc'"):
        stage_target("ipc", "cpu")


async def test_an_unknown_transport_setting_fails_the_launch():
    from flexpipe.api import FlexPipe

    with pytest.raises(ConfigError, match="transport='bogus': give one of auto"):
        async with FlexPipe.launch("tiny", transport="bogus", in_process=True):
            pass


@pytest.mark.timeout(120)   # stage processes start
async def test_the_hop_settings_reach_the_stages():
    """hop_ring_bytes and hop_wait_s are Settings (and flags): the launch passes them to every stage
    with a hop channel, whose ring has that size (a 200-token prefill's residual, 100 KiB, does not fit
    a 64 KiB ring and goes beside the message; the decodes' go through it) and whose waits are bounded
    by hop_wait_s (raised to twice the heartbeat timeout)."""
    from flexpipe.api import FlexPipe

    prompt = [(7 * i) % 250 + 3 for i in range(200)]
    for ring, wait, beside in ((1 << 16, 7.0, 1), (None, 0.5, 0)):
        kw = {} if ring is None else {"hop_ring_bytes": ring}
        async with FlexPipe.launch("tiny", stages=2, transport="shm", hop_wait_s=wait, heartbeat_timeout=1.0,
                                   heartbeat_interval=0.25, **kw) as fp:
            out = await fp.complete(prompt, max_tokens=4)
            assert len(out.token_ids) == 4
            up, down = [await fp.controller.system.ask(s.handle.ref, StageStatus()) for s in fp.controller.slots]
            assert up["hop_ring_bytes"] == down["hop_ring_bytes"] == (ring or 64 << 20)
            assert up["hop_wait_s"] == down["hop_wait_s"] == max(wait, 2.0)
            assert up["hop"] == "shm" and up["hop_sends"] == down["hop_recvs"] == 4 - beside, (up, down)
            assert up["hop_beside"] == beside, up


def test_hop_messages_roundtrip_through_the_codec():
    for m in (OpenHop(3, ["host", 12, "cuda:0"], "auto", ""), ReserveKV([["s1", 0, 33]], ["h", 1, "cuda:1"])):
        got, _ = codec.decode(codec.encode(m))
        assert got == m


# --- the actor's fallbacks, driven with a fake context ------------------------------------------------

class FakeCtx:
    """Records tells; `ask` answers with `reply` (or raises it)."""

    self_ref = ActorRef("fake", "ipc:///fake")

    def __init__(self, reply=None):
        self.reply = reply
        self.told: list = []
        self.asked: list = []

    async def ask(self, ref, msg, *tensors, timeout=None):
        self.asked.append(msg)
        if isinstance(self.reply, BaseException):
            raise self.reply
        return self.reply

    async def tell(self, ref, msg, *tensors):
        self.told.append((msg, tensors))

    async def run_compute(self, fn, *args, inline=False):
        return fn(*args)

    def prune_peers(self, keep):   # what ActorContext offers to drop sockets of peers that left
        pass


class FakeTx:
    def __init__(self, capacity: int, fail: bool = False):
        self.capacity, self.fail, self.sent, self.closed = capacity, fail, [], False

    async def send(self, *tensors):
        if self.fail:
            raise ConnectionError("ring gone")
        self.sent.append(tensors)

    async def aclose(self):
        self.closed = True


def stage(device: str = "cpu", transport: str = "shm") -> GpuStageActor:
    cfg = ModelConfig.preset("tiny")
    st = GpuStageActor(cfg.to_dict(), {"kind": "preset"}, 0, 2, device=device, transport=transport, load=False)
    st.next = ActorRef("next", "ipc:///x")
    return st


def step_msg() -> StepInput:
    return StepInput(0, 1, ["s"], [0], [3], [False], [0], [[0.0, 0, 1.0, 0]], [])


async def test_a_plain_neighbour_keeps_the_message_path():
    st = stage()
    ctx = FakeCtx(RemoteError("ProtocolError", "StageActor has no handler for OpenHop"))
    assert await st.configure(ctx, Configure(1, 0, ActorRef("n", "ipc:///n"), ActorRef("r", "ipc:///r")))
    assert (st.hop_kind, st.tx) == ("message", None) and "plain" in st.hop_why
    ctx.reply = RuntimeError("must not ask again")                       # same neighbour, next epoch
    await st.configure(ctx, Configure(2, 0, ActorRef("n", "ipc:///n"), ActorRef("r", "ipc:///r")))
    assert len(ctx.asked) == 1
    ctx.reply = RemoteError("ConfigError", "transport='cuda_ipc' ...")   # any other refusal is an error
    with pytest.raises(RemoteError):
        await st.configure(ctx, Configure(3, 0, ActorRef("m", "ipc:///m"), ActorRef("r", "ipc:///r")))


async def test_the_receiver_can_answer_message_and_the_sender_keeps_it():
    st = stage(transport="auto")
    ctx = FakeCtx({"kind": "message", "why": "not both stages are on CUDA (cpu -> cpu)"})
    await st.configure(ctx, Configure(1, 0, ActorRef("n", "ipc:///n"), ActorRef("r", "ipc:///r")))
    assert st.hop_kind == "message" and st.tx is None and "CUDA" in st.hop_why
    asked = ctx.asked[0]
    assert asked.mode == "auto" and asked.src[2] == "cpu" and asked.src_ipc == "stage on cpu"
    assert asked.sender == ctx.self_ref   # the receiver watches the stage that opened its channel


async def test_residuals_larger_than_the_ring_and_failed_channels_go_beside_the_message():
    st = stage()
    st.tx, st.hop_kind = FakeTx(capacity=1024), "shm"
    ctx = FakeCtx()
    small, big = torch.zeros(4, 8), torch.zeros(64, 8)                  # 128 B fit, 2 KiB do not
    await st._send_next(ctx, step_msg(), small)
    assert st.tx.sent and ctx.told[-1][1] == ()                         # through the channel, then the message
    await st._send_next(ctx, step_msg(), big)
    assert len(st.tx.sent) == 1 and ctx.told[-1][1][0] is big and st.stats["hop_beside"] == 1
    broken = st.tx = FakeTx(capacity=1 << 20, fail=True)
    await st._send_next(ctx, step_msg(), small)
    assert ctx.told[-1][1][0] is small and broken.closed and st.tx is None
    assert st.stats["hop_failed"] == 1 and st.hop_kind == "message" and "ring gone" in st.hop_why
    assert hop_capacity(object()) == 0


async def test_a_step_without_a_tensor_of_an_older_channel_is_dropped():
    st = stage()
    st.rx_epoch = 5
    await st.step(FakeCtx(), step_msg())                                # epoch 0 < 5, and no channel
    assert st.stats["stale_dropped"] == 1


async def test_kv_through_cuda_ipc_is_refused_where_it_cannot_run():
    ctx = FakeCtx()
    cpu = stage("cpu")
    assert await cpu.reserve_kv(ctx, ReserveKV([["s", 0, 16]], ["h", 1, "cuda:0"])) is None
    gpu = stage("cuda:0", "auto")   # never started: no core, and here no CUDA either
    assert gpu._kv_ipc_reason(Endpoint("elsewhere", 1, "cuda:0"))
    assert gpu._kv_ipc_reason(Endpoint(gpu._here().host, gpu._here().pid, "cuda:0"))   # same process
    if not torch.cuda.is_available():
        assert await gpu.reserve_kv(ctx, ReserveKV([["s", 0, 16]], ["h", 1, "cuda:0"])) is None


def test_device_preset_weights_on_the_cpu_equal_preset_weights_in_float32():
    cfg = ModelConfig.preset("tiny")
    names = ["model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"]
    a, b = PresetWeights(cfg, 3).load(names), DevicePresetWeights(cfg, 3).load(names)
    assert all(torch.equal(a[n], b[n]) for n in names)
    half = DevicePresetWeights(cfg, 3).load(names[:1], torch.float16)
    assert half[names[0]].dtype == torch.float16 and not half[names[0]].is_cuda


def test_source_spec_on_device_selects_device_weights():
    from flexpipe.runtime.stage import source_from_spec

    cfg = ModelConfig.preset("tiny")
    assert type(source_from_spec(cfg, {"kind": "preset", "seed": 1, "on_device": True})) is DevicePresetWeights
    assert type(source_from_spec(cfg, {"kind": "preset", "seed": 1})) is PresetWeights


async def test_gpu_stage_takes_kv_reservations_and_hop_requests_only_from_its_pipeline():
    """ReserveKV (it grows block tables), FreeSeqs (an old owner giving reserved blocks back) and
    OpenHop (it replaces the receiving channel) are refused from a stranger once the stage knows its
    roles; before its first Configure, OpenHop is open."""
    from flexpipe.runtime.actor import LocalContext
    from flexpipe.runtime.stage import ExpectPeers, StageActor

    ctrl, up, nxt, stranger = (ActorRef(n, f"ipc:///{n}") for n in ("system-1", "up", "next", "stranger"))
    stage = GpuStageActor(ModelConfig.preset("tiny").to_dict(), {"kind": "preset", "seed": 0}, 2, 4,
                          num_blocks=16, block_size=4, transport="message", controller=[ctrl.name, ctrl.endpoint])
    hop, reserve = OpenHop(0, ["h", 1, "cpu"]), ReserveKV([["a", 0, 4]], ["h", 1, "cpu"])
    free = FreeSeqs(1, ["a"])   # an old owner giving back blocks it reserved for a finished request
    assert stage.check_sender(stranger, hop) is None          # not configured yet: upstream unknown
    ctx = await LocalContext(stage, "stage2").start()
    StageActor.configure(stage, ctx, Configure(0, 1, nxt, ctrl, up))  # its roles, without opening a hop
    assert stage.check_sender(up, hop) is None
    assert stage.check_sender(ctrl, hop) is None
    assert "upstream" in stage.check_sender(stranger, hop)
    assert stage.check_sender(ctrl, reserve) is None
    assert "neither" in stage.check_sender(stranger, reserve)
    assert stage.check_sender(ctrl, free) is None
    assert "neither" in stage.check_sender(stranger, free)
    stage.expect_peers(None, ExpectPeers(1, [stranger]))      # named for a reshape: may send all three
    assert stage.check_sender(stranger, reserve) is None
    assert stage.check_sender(stranger, free) is None
    assert stage.check_sender(stranger, hop) is None


# --- a residual that never comes down the channel ------------------------------------------------------
# kinds 60420-60429 belong to these tests (see flexpipe/runtime/messages.py)

@message(60420)
class TellWithoutResidual:
    """Tell `stage` step `step` of `epoch` as its upstream, as if its residual had gone down the channel,
    which it never does (`open_hop`: first open the channel, naming this actor as its sender)."""
    stage: ActorRef
    epoch: int
    step: int
    open_hop: bool = True


class LostResidualUpstream:
    """An upstream stage whose residuals never reach the channel: it opens no sender, which is what a
    stage killed before its hello reached the receiver leaves (transports/base.PeerWatch: not seen)."""

    @handles(TellWithoutResidual)
    async def tell_without_residual(self, ctx, msg: TellWithoutResidual) -> bool:
        if msg.open_hop:
            here = Endpoint.here()
            address = await ctx.ask(msg.stage, OpenHop(msg.epoch, [here.host, here.pid, "cpu"], "shm",
                                                       "stage on cpu", ctx.self_ref))
            assert address["kind"] == "shm", address
        await ctx.tell(msg.stage, StepInput(msg.epoch, msg.step, ["lost"], [0], [3], [True], [0],
                                            [[0.0, 0, 1.0, 0]], []))
        return True


class StepRecorder:
    """The router's end of a stage: records the StepOutputs and StepFailed it is told, in order."""

    def __init__(self):
        self.got: list = []

    @handles(StepOutput, StepFailed)
    def record(self, ctx, msg) -> None:
        self.got.append(msg)


def test_an_open_hop_that_names_another_sender_is_refused():
    """The receiver watches the stage an OpenHop names as the channel's sender: only that stage may
    name itself (before the first Configure too, when anyone may open the channel)."""
    up, other = ActorRef("up", "ipc:///up"), ActorRef("other", "ipc:///other")
    st = stage()
    hop = OpenHop(0, ["h", 1, "cpu"], "shm", "", up)
    assert st.check_sender(up, hop) is None
    assert "names" in st.check_sender(other, hop) and "came from" in st.check_sender(other, hop)
    assert st.check_sender(other, OpenHop(0, ["h", 1, "cpu"])) is None   # (an older peer names nobody)
    assert codec.decode(codec.encode(hop))[0] == hop
    with pytest.raises(ConfigError, match="hop_wait_s"):
        GpuStageActor(ModelConfig.preset("tiny").to_dict(), {"kind": "preset"}, 0, 2, load=False,
                      hop_wait_s=0)


@pytest.mark.timeout(120)   # two stage processes start; slow on a busy 2-core machine
async def test_a_step_whose_residual_never_comes_ends_instead_of_blocking_the_stage():
    """The upstream tells a step whose residual never reaches the channel (what a stage SIGKILLed right
    after its send can leave).  The waiting step blocked the stage's mailbox for ever: here it ends when
    the wait's bound runs out while the upstream lives (the step fails: StepFailed, and so does a later
    one that went down the closed channel), and when the upstream is SIGKILLed, as soon as heartbeats
    declare it dead (the step is dropped: the router recomputes its requests; where no recovery follows,
    as here, a death only the stage declared, it fails hop_wait_s later).  The stage then answers, takes
    a new upstream's OpenHop and computes a step whose residual comes through it."""
    from flexpipe.runtime import ActorSettings, ActorSystem

    cfg = ModelConfig.preset("tiny")
    cut = cfg.num_units // 2
    kw = dict(config=cfg.to_dict(), source={"kind": "preset", "seed": 0}, num_blocks=16, block_size=4,
              transport="shm")
    fast = ActorSettings(heartbeat_interval=0.1, heartbeat_timeout=0.6, torch_threads=1)
    # the upstreams' processes are another system's: the stage hears of their death by heartbeats only
    async with ActorSystem(fast, name="ups") as ups, ActorSystem(fast, name="here") as here:
        up, up2 = await asyncio.gather(
            ups.launch("test_gpu_stage:LostResidualUpstream", name="up"),
            ups.launch("flexpipe.runtime.gpu_stage:GpuStageActor", dict(kw, start=0, end=cut), name="up2"))
        rec = await here.launch(StepRecorder, name="router", in_process=True)
        down = await here.launch(GpuStageActor, dict(kw, start=cut, end=cfg.num_units, hop_wait_s=0.2),
                                 name="down", in_process=True)
        st, got = down.actor.behaviour, rec.actor.behaviour.got
        assert st.hop_wait_s == 1.2                        # raised to twice the heartbeat timeout
        await here.ask(down.ref, Configure(1, 1, None, rec.ref, up.ref))

        # the upstream lives: the wait runs out, the channel is closed, the step fails
        assert await ups.ask(up.ref, TellWithoutResidual(down.ref, 1, 1))
        await poll_until(lambda: len(got) == 1)
        assert isinstance(got[0], StepFailed) and got[0].step == 1 and "did not come" in got[0].error, got
        assert st.rx is None and st.stats["hop_rx_lost"] == 1
        assert await ups.ask(up.ref, TellWithoutResidual(down.ref, 1, 2, open_hop=False))
        await poll_until(lambda: len(got) == 2)               # down the closed channel: failed, not dropped
        assert isinstance(got[1], StepFailed) and got[1].step == 2 and "closed" in got[1].error, got

        # the upstream is SIGKILLed while the step waits: heartbeats end the wait (not its bound, now 60 s)
        st.hop_wait_s = 60.0
        assert await ups.ask(up.ref, TellWithoutResidual(down.ref, 1, 3))
        await poll_until(lambda: st.stats["hop_recvs"] == 2)    # step 3 waits on the new channel (2 went by)
        st.hop_wait_s = 1.2   # (step 3's wait is bounded at 60 s already; its failure told later waits this)
        assert st.rx_from == up.ref
        up.kill()
        status = await here.ask(down.ref, StageStatus(), timeout=10)   # (the waiting step held this)
        assert status["hop_lost"] == 3 and status["hop_rx_lost"] == 2 and status["steps"] == 0, status
        assert st.rx is None and "died" in st.rx_lost and not st.rx_lost_fails
        await poll_until(lambda: len(got) == 3)   # no recovery: the dropped step fails after hop_wait_s
        assert isinstance(got[2], StepFailed) and got[2].step == 3 and "no recovery came" in got[2].error, got

        # a new upstream: its OpenHop is taken, and a step's residual comes through its channel
        await here.ask(down.ref, Configure(2, 1, None, rec.ref, up2.ref))
        assert await ups.ask(up2.ref, Configure(2, 0, down.ref, rec.ref, ups.client.ref))
        assert st.rx is not None and st.rx_from == up2.ref and st.rx_lost == ""
        await ups.tell(up2.ref, StepInput(2, 4, ["new"], [0], [5], [True], [0], [[0.0, 0, 1.0, 0]], []),
                       torch.tensor([10, 20, 30, 40, 50]))
        await poll_until(lambda: len(got) == 4)
        assert isinstance(got[3], StepOutput) and (got[3].step, got[3].seq_ids) == (4, ["new"]), got
        assert (await ups.ask(up2.ref, StageStatus()))["hop_sends"] == 1
        status = await here.ask(down.ref, StageStatus())
        assert status["hop_recvs"] == 3 and status["hop_lost"] == 3 and status["steps"] == 1, status

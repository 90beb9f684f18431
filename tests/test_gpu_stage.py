"""GpuStageActor's decisions and bookkeeping without a GPU: which hop a stage pair gets, which
behaviour the controller launches, falling back to the message path (a plain neighbour, a residual
larger than the ring, a failed channel), refusing CUDA IPC KV copies where they cannot run, and the
device-drawn preset weights on the CPU. The data moving over CUDA is tests/test_gpu.py's."""

from __future__ import annotations


import pytest
import torch

from flexpipe.errors import ConfigError, RemoteError
from flexpipe.model.checkpoint import PresetWeights
from flexpipe.model.config import ModelConfig
from flexpipe.model.device_weights import DevicePresetWeights
from flexpipe.runtime.gpu_stage import (
    GPU_TARGET, PLAIN_TARGET, GpuStageActor, OpenHop, ReserveKV, choose_hop, hop_capacity, stage_target,
)
from flexpipe.runtime.messages import ActorRef
from flexpipe.runtime.stage import Configure, FreeSeqs, StepInput
from flexpipe.runtime import codec
from flexpipe.transports import Endpoint

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


def test_hop_messages_roundtrip_through_the_codec():
    for m in (OpenHop(3, ["host", 12, "cuda:0"], "auto", ""), ReserveKV([["s1", 0, 33]], ["h", 1, "cuda:1"])):
        got, _ = codec.decode(codec.encode(m))
        assert got == m


# --- the actor's fallbacks, driven with a fake context ------------------------------------------------

class FakeCtx:
    """Records tells; `ask` answers with `reply` (or raises it)."""

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

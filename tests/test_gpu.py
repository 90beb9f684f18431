"""GPU tests (marker `gpu`), run by benchmarks/gpu_check.sh on a machine with an NVIDIA GPU and skipped
elsewhere with the reason: CUDA IPC moves exact bytes between processes (both completion modes,
streaming through a small ring, views holding ring space), KV blocks land where they should,
FlexPipe on cuda:0 equals model/reference.py on the same GPU (one plain stage; and GpuStageActor
stages with a cuda_ipc hop through a 1->2->1 reshape), NCCL channels over a pooled communicator (two GPUs), NVML inventory."""

from __future__ import annotations

import asyncio
import faulthandler
import hashlib
import sys
from pathlib import Path

import pytest
import torch

from flexpipe.errors import ProtocolError
from flexpipe.runtime import ActorSettings, ActorSystem, handles, message
from flexpipe.transports import cuda_ipc, nccl, open_receiver, open_sender
from ring_helpers import fill_ring

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:   # benchmarks/ holds the IPC stage harness; `python -m pytest` has it already
    sys.path.insert(0, str(ROOT))

from benchmarks.gpu_check import (  # noqa: E402
    TIE, MakePools, PoolDigest, blocks_digest, ipc_pipeline, make_config,
)
from flexpipe.model.device_weights import DevicePresetWeights  # noqa: E402

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason=f"no CUDA device: torch {torch.__version__} sees none "
                                                 "(a CPU build, or no NVIDIA GPU/driver)")
needs_ipc = pytest.mark.skipif(not cuda_ipc.available(),
                               reason=f"CUDA IPC unavailable: {cuda_ipc.unavailable_reason()}")
needs_two_gpus = pytest.mark.skipif(
    not nccl.available() or torch.cuda.device_count() < 2,
    reason=f"NCCL needs two GPUs (its two ranks on different devices) and CuPy with NCCL: "
           f"{torch.cuda.device_count() if CUDA else 0} GPU(s); {nccl.unavailable_reason() or 'NCCL available'}")
# 90 s a test (tiny models; the 1 -> 2 -> 1 reshape starts stage processes): a hang is dumped well inside
# gpu_check's tests section (--timeout-method=thread there; this marker wins over its --timeout)
pytestmark = [pytest.mark.gpu, pytest.mark.timeout(90)]

SETTINGS = ActorSettings(heartbeat_interval=0.5, heartbeat_timeout=20.0, ask_timeout=30.0, start_timeout=120.0)


def digest(tensors) -> list:
    return [[hashlib.sha256(t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()).hexdigest(),
             str(t.dtype), list(t.shape)] for t in tensors]


def payload(seed: int, big: int = 3 << 20) -> list[torch.Tensor]:
    """fp16, a non-contiguous bf16, an empty tensor, a blob larger than a 1 MiB ring, int64."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(5, 7, generator=g, device="cuda").half(),
            torch.randn(7, 5, generator=g, device="cuda").to(torch.bfloat16).t(),
            torch.empty(0, 3, device="cuda"),
            torch.randint(0, 256, (big,), generator=g, device="cuda", dtype=torch.uint8),
            torch.arange(10, device="cuda") * seed]


# --- a receiving process ----------------------------------------------------------------------------
@message(60400)
class SinkOpen:
    """Open a cuda_ipc receiver (reply: its address)."""
    sync: str
    ring_bytes: int


@message(60401)
class SinkDigest:
    """Receive one send (into new tensors, or into `into` specs) and answer with its digest."""
    into: list | None = None   # [[dtype name, shape], ...]


class GpuSink:
    """Receives through cuda_ipc in another process."""

    rx = None

    @handles(SinkOpen)
    async def open(self, ctx, msg: SinkOpen) -> dict:
        # this process's stacks too, if it is still here when the test's own timeout is near (a hang
        # inside a CUDA call answers no ask: only a dump says where it is)
        faulthandler.dump_traceback_later(EXACT_BYTES_TIMEOUT - 5, exit=False)
        self.rx = await open_receiver("cuda_ipc", device="cuda:0", ring_bytes=msg.ring_bytes, sync=msg.sync)
        return self.rx.address

    @handles(SinkDigest)
    async def digest(self, ctx, msg: SinkDigest) -> list:
        into = None if msg.into is None else [torch.empty(s, dtype=getattr(torch, d), device="cuda:0")
                                              for d, s in msg.into]
        got = await self.rx.recv(into=into)
        out = digest(got)
        del got
        return out

    async def on_stop(self, ctx) -> None:
        faulthandler.cancel_dump_traceback_later()
        if self.rx is not None:
            await self.rx.aclose()


@needs_ipc
async def test_cuda_ipc_received_views_hold_ring_space_until_dropped():
    rx = await open_receiver("cuda_ipc", device="cuda:0", ring_bytes=64 << 10)
    tx = await open_sender(rx.address)          # the same process: no handle to open, events shared
    a = torch.arange(4096, dtype=torch.int32, device="cuda")   # 16 KiB
    try:
        views, blocked, later = await fill_ring(tx, rx, a, wait=0.2)   # full: the sender waits
        del views[0]
        await asyncio.wait_for(blocked, 5)
        assert torch.equal((await later)[0], a + 4)
        await asyncio.to_thread(views.clear)                  # dropped in another thread
        send = asyncio.ensure_future(tx.send(a.float()))
        with pytest.raises(ProtocolError, match="tensor 0"):
            await rx.recv(into=[torch.empty(4096, device="cuda")[:4000]])
        await send
        send = asyncio.ensure_future(tx.send(a * 2))          # the channel is still in step
        assert torch.equal((await rx.recv())[0], a * 2)
        await send
    finally:
        await tx.aclose()
        await rx.aclose()


@needs_ipc
async def test_kv_blocks_copied_into_another_process_pools():
    async with ActorSystem(SETTINGS) as system:
        peer = await system.launch("benchmarks.gpu_check:Peer", name="peer")
        try:
            shape = [16, 4, 64]
            pools = await system.ask(peer.ref, MakePools(2, 64, shape, "bfloat16", "cuda:0"))
            opened = cuda_ipc.PeerPools()
            dst = opened.open(pools, 0)
            g = torch.Generator(device="cuda").manual_seed(3)
            src = [(torch.randn(48, *shape, generator=g, device="cuda").bfloat16(),
                    torch.randn(48, *shape, generator=g, device="cuda").bfloat16()) for _ in range(2)]
            s_ids, d_ids = [0, 1, 2, 3, 10, 11, 40, 5], [60, 61, 62, 63, 0, 1, 30, 2]
            runs = cuda_ipc.coalesce_runs(s_ids, d_ids)
            stream = torch.cuda.Stream()
            for u in range(2):
                cuda_ipc.copy_runs(src[u][0], dst[u][0], runs, stream)
                cuda_ipc.copy_runs(src[u][1], dst[u][1], runs, stream)
            stream.synchronize()
            for u in range(2):
                assert await system.ask(peer.ref, PoolDigest(u, d_ids)) == blocks_digest(*src[u], s_ids)
            assert await system.ask(peer.ref, PoolDigest(0, [3, 4])) == blocks_digest(
                torch.zeros_like(src[0][0]), torch.zeros_like(src[0][1]), [3, 4])   # untouched blocks stay zero
            opened.close()
        finally:
            await peer.stop()


# --- the oracle on the GPU --------------------------------------------------------------------------
def check_oracle(ref, prompts, outs, max_tokens) -> int:
    """Each greedy output equals the reference's; a difference only at a near-tie (< TIE); returns ties."""
    from flexpipe.model.sampling import SamplingParams

    ties = 0
    for p, got in zip(prompts, outs):
        want = ref.generate(p, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        if got == want:
            continue
        k = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        top2 = ref.logits_for(p, want[:k])[-1].topk(2).values
        margin = float(top2[0] - top2[1])
        assert margin < TIE, f"diverged at token {k} (top-2 margin {margin:.3g}): {got} != {want}"
        ties += 1
    return ties


PROMPTS = [[(31 * i + 7 * j) % 250 + 3 for i in range(5 + 9 * j)] for j in range(6)]


@needs_cuda
async def test_single_stage_on_cuda_equals_the_reference_on_the_same_gpu():
    """The plain runtime (no CuPy needed): one stage process on cuda:0, fp32."""
    from flexpipe.api import FlexPipe
    from flexpipe.model.reference import ReferenceModel

    async with FlexPipe.launch("tiny", stages=1, device="cuda:0", dtype="float32", start_timeout=120.0) as fp:
        outs = await asyncio.gather(*(fp.complete(p, max_tokens=24, ignore_eos=True) for p in PROMPTS))
        ref = ReferenceModel(fp.config, fp.spec.weights(), device="cuda:0")
    check_oracle(ref, PROMPTS, [o.token_ids for o in outs], 24)


@needs_ipc
async def test_ipc_stages_through_1_2_1_reshape_equal_the_reference():
    """Two GpuStageActor processes on one GPU (transport="cuda_ipc": the launch fails if the pair cannot
    have it), requests running across both reshapes; KV moved through CUDA IPC.

    Requests keep arriving until both reshapes are done: on an H200 the tiny model finishes a fixed
    batch of them in less time than a reshape takes to start a stage process (the first run of this
    test failed, most likely so, with nothing left to move)."""
    from flexpipe.model.reference import ReferenceModel

    cfg = make_config("tiny")
    m = 40
    outs: dict[int, list[list[int]]] = {}
    async with ipc_pipeline(cfg, stages=1, device="cuda:0", dtype="float32", num_blocks=256) as fp:
        stop, finished = asyncio.Event(), asyncio.Condition()
        done = [0]

        async def load(j: int) -> None:
            while not stop.is_set():
                out = await fp.complete(PROMPTS[j], max_tokens=m, ignore_eos=True)
                outs.setdefault(j, []).append(out.token_ids)
                async with finished:
                    done[0] += 1
                    finished.notify_all()

        async def completed(n: int) -> None:   # until n more requests have finished, in the shape of now
            target = done[0] + n
            async with finished:
                await finished.wait_for(lambda: done[0] >= target)

        tasks = [asyncio.create_task(load(j)) for j in range(len(PROMPTS))]
        try:
            await completed(len(PROMPTS))
            st2 = await fp.reshape(stages=2)
            status = await fp.controller.stage_status()
            await completed(len(PROMPTS))
            st1 = await fp.reshape(stages=1)
            await completed(len(PROMPTS))
        finally:
            stop.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        after = await asyncio.gather(*(fp.complete(p, max_tokens=12, ignore_eos=True) for p in PROMPTS[:2]))
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert [s["hop"] for s in status] == ["cuda_ipc", ""], status
    kv_ipc = sum(s.get("kv_ipc_bytes", 0) for s in status)   # 1 -> 2 copied KV through CUDA IPC
    assert st2.ok and st1.ok and st2.requests_running > 0 and st1.requests_running > 0, (st2, st1)
    assert st2.kv_bytes > 0 and st1.kv_bytes > 0 and kv_ipc > 0, (st2, st1, kv_ipc)
    ref = ReferenceModel(cfg, DevicePresetWeights(cfg, 0), device="cuda:0")
    for j, got in outs.items():   # every request of a prompt, before, across and after the reshapes
        distinct = [list(t) for t in {tuple(o) for o in got}]
        check_oracle(ref, [PROMPTS[j]] * len(distinct), distinct, m)
    check_oracle(ref, PROMPTS[:2], [o.token_ids for o in after], 12)


@needs_cuda
def test_device_preset_weights_are_deterministic_on_the_gpu():
    cfg = make_config("tiny")
    names = ["model.embed_tokens.weight", "model.layers.3.self_attn.q_proj.weight", "model.norm.weight"]
    a = DevicePresetWeights(cfg, 0).load(names, torch.float16, "cuda:0")
    b = DevicePresetWeights(cfg, 0).load(names, torch.float16, "cuda:0")
    c = DevicePresetWeights(cfg, 1).load(names[:1], torch.float16, "cuda:0")
    assert all(torch.equal(a[n], b[n]) and a[n].is_cuda and a[n].dtype == torch.float16 for n in names)
    assert not torch.equal(a[names[0]], c[names[0]])
    assert abs(float(a[names[1]].float().std()) - cfg.hidden_size ** -0.5) < 0.01


# --- NCCL on two GPUs ---------------------------------------------------------------------------------
@message(60410)
class NcclOpen:
    """Receiver: lease a communicator with `peer` and listen (reply: address). Sender: connect to `address`."""
    peer: str
    address: dict | None = None


@message(60411)
class NcclSend:
    """Send payload(seed) on the open channel."""
    seed: int


@message(60412)
class NcclRecv:
    """Receive one send and answer with its digest."""


@message(60413)
class NcclClose:
    """Close the open channel (its communicator goes back to the pool)."""


class NcclWorker(nccl.NcclBootstrap):
    """A worker with a communicator pool and one channel at a time."""

    def __init__(self, worker: str, device: int):
        torch.cuda.set_device(device)
        super().__init__(worker, device)
        self.ch = None

    @handles(NcclOpen)
    async def open(self, ctx, msg: NcclOpen):
        if msg.address is None:
            self.ch = await nccl.NcclTransport.listen(pool=self.pool, peer=msg.peer)
            return self.ch.address
        self.ch = await nccl.NcclTransport.connect(msg.address, pool=self.pool)
        return True

    @handles(NcclSend)
    async def send(self, ctx, msg: NcclSend):
        with torch.cuda.device(self.pool.device):
            sent = payload(msg.seed, big=1 << 20)
        await self.ch.send(*sent)
        return digest(sent)

    @handles(NcclRecv)
    async def recv(self, ctx, msg: NcclRecv):
        got = await self.ch.recv()
        return digest(got)

    @handles(NcclClose)
    async def close(self, ctx, msg: NcclClose):
        await self.ch.aclose()
        self.ch = None
        return True


@needs_two_gpus
async def test_nccl_channels_reuse_one_communicator_per_pair():
    async with ActorSystem(SETTINGS) as system:
        w = [await system.launch("test_gpu:NcclWorker", {"worker": f"w{i}", "device": i}, name=f"w{i}")
             for i in range(2)]
        try:
            status = await system.ask(w[1].ref, nccl.NcclEnsure("w0", w[0].ref), timeout=120)
            assert status["pairs"]["w0"]["total"] == 1
            for rnd in range(3):   # three "reshapes": a new channel each time, the same communicator
                address = await system.ask(w[1].ref, NcclOpen("w0"))
                assert await system.ask(w[0].ref, NcclOpen("w1", address))
                got = asyncio.ensure_future(system.ask(w[1].ref, NcclRecv()))
                sent = await system.ask(w[0].ref, NcclSend(rnd + 1))
                assert await got == sent
                await asyncio.gather(system.ask(w[0].ref, NcclClose()), system.ask(w[1].ref, NcclClose()))
            s0 = await system.ask(w[0].ref, nccl.NcclPoolStatus())
            assert s0["stats"]["created"] == 1 and s0["stats"]["reused"] == 2
        finally:
            for h in w:
                await h.stop()


# --- NVML ----------------------------------------------------------------------------------------------
@needs_cuda
def test_inventory_reads_this_machine():
    pytest.importorskip("pynvml", reason="pynvml (nvidia-ml-py) is not installed")
    from flexpipe.runtime.inventory import Inventory

    x = torch.empty(256 << 20, dtype=torch.uint8, device="cuda:0")   # 256 MiB of ours
    torch.cuda.synchronize()
    inv = Inventory(own_pids=lambda: [__import__("os").getpid()])
    try:
        samples = inv.sample()
        assert len(samples) >= torch.cuda.device_count() >= 1
        totals = {s.total for s in samples}
        assert any(abs(t - torch.cuda.get_device_properties(0).total_memory) < 2**30 for t in totals)
        ours = [s.used_by_us for s in samples if s.used_by_us]
        if any(s.used_by_us is None for s in samples):
            pytest.skip("NVML does not attribute memory to processes here (container pid namespace?)")
        assert ours and max(ours) >= 256 << 20
        topo = inv.cluster()
        assert len(topo["nodes"][0]["gpus"]) == len(samples)
    finally:
        inv.close()
        del x


# Second to last. First H200 run (2026-11-30): the graphs captured and replayed, but the test stopped
# at a stage that never decoded (the solver cut the tiny model's first stage to the embedding alone,
# fixed since), before its oracle check; not yet rerun on a GPU
@needs_cuda
async def test_decode_graphs_on_cuda_equal_the_reference_and_the_static_buffers():
    """decode_graphs="graph": two stage processes on cuda:0 capture a CUDA graph per (rows, keys) bucket
    and replay it; every output equals the reference (near-ties aside). In one process, replayed steps
    give the logits of the same buffers run without the graph."""
    from flexpipe.api import FlexPipe
    from flexpipe.model.reference import ReferenceModel
    from flexpipe.runtime.stage_core import StageCore, StepMeta

    async with FlexPipe.launch("tiny", stages=2, device="cuda:0", dtype="float32", start_timeout=120.0,
                               decode_graphs="graph") as fp:
        outs = await asyncio.gather(*(fp.complete(p, max_tokens=24, ignore_eos=True) for p in PROMPTS))
        status = await fp.controller.stage_status()
        ref = ReferenceModel(fp.config, fp.spec.weights(), device="cuda:0")
    assert all(s["decode_stats"]["captures"] > 0 and s["decode_stats"]["steps"] > 0 for s in status), status
    check_oracle(ref, PROMPTS, [o.token_ids for o in outs], 24)

    cfg, g = make_config("tiny"), [0.0, 0, 1.0, 0]
    logits = {}
    for mode in ("static", "graph"):
        core = StageCore(cfg, DevicePresetWeights(cfg, 0), 0, cfg.num_units, num_blocks=64, block_size=16,
                         device="cuda:0", decode=mode)
        seen = []
        core.sample = lambda lg, meta, seen=seen: seen.append(lg.clone()) or lg.argmax(-1).cpu()
        for j, p in enumerate(PROMPTS[:3]):
            core.forward(StepMeta([f"s{j}"], [0], [len(p)], [True], [0], [g]), torch.tensor(p))
        for k in range(3):   # capture, then two replays
            core.forward(StepMeta([f"s{j}" for j in range(3)], [len(p) + k for p in PROMPTS[:3]], [1] * 3,
                                  [True] * 3, [k + 1] * 3, [g] * 3), torch.tensor([5, 6, 7]))
        logits[mode] = seen[3:]
    # the same kernels on the same buffers: equal up to cuBLAS choosing another algorithm under capture;
    # a replay that read stale inputs would be off by far more
    assert len(logits["graph"]) == 3 and all(torch.allclose(a, b, atol=1e-4, rtol=1e-4)
                                             for a, b in zip(logits["static"], logits["graph"]))


# Last in the file: on an H200 (2026-11-28) neither variant finished. The cause, found on CPU: the
# receiver held the small tensors as ring views while the 3 MiB one streamed through the 1 MiB ring
# behind them (transports/base.py: views_fit; tests/test_transports.py reproduces it on CPU). Fixed;
# both variants passed on the H200 on 2026-11-30. Should one hang again, the timeout ends pytest and
# the tests above report.
EXACT_BYTES_TIMEOUT = 45   # seconds; a few on a GPU when it works


@needs_ipc
@pytest.mark.timeout(EXACT_BYTES_TIMEOUT)
@pytest.mark.parametrize("sync", ["event", "host"])
async def test_cuda_ipc_exact_bytes_to_another_process(sync):
    async with ActorSystem(SETTINGS) as system:
        sink = await system.launch("test_gpu:GpuSink", name="sink")
        tx = await open_sender(await system.ask(sink.ref, SinkOpen(sync, 1 << 20)), device="cuda:0")
        try:
            for seed in range(1, 4):   # new tensors
                sent = payload(seed)
                reply = asyncio.ensure_future(system.ask(sink.ref, SinkDigest()))
                await tx.send(*sent)
                assert await reply == digest(sent)
            sent = payload(7)          # into preallocated tensors
            specs = [[str(t.dtype).removeprefix("torch."), list(t.shape)] for t in sent]
            reply = asyncio.ensure_future(system.ask(sink.ref, SinkDigest(specs)))
            await tx.send(*sent)
            assert await reply == digest(sent)
            g = torch.Generator(device="cuda").manual_seed(5)   # many sizes: the ring wraps many times
            for i in range(60):
                n = int(torch.randint(1, 300_000, (1,)))
                x = torch.randint(0, 256, (n,), generator=g, device="cuda", dtype=torch.uint8)
                reply = asyncio.ensure_future(system.ask(sink.ref, SinkDigest()))
                await tx.send(x)
                x.add_(1)              # modifying after send() returns is allowed (the fence)
                assert (await reply)[0][0] == digest([x - 1])[0][0], f"send {i} of {n} bytes"
            assert tx.stats["sends"] == 64 and tx.stats["waits"] > 0
        finally:
            await tx.aclose()
            await sink.stop()
    assert len(cuda_ipc.HANDLES) == 0   # the sender's mapping was released on close

"""StageActor: one pipeline stage (a contiguous unit range on one device) behind a mailbox.

Every pipeline message carries the config epoch; a stage drops (and counts) messages of another
epoch, so no half-old, half-new step can exist.  A stage knows who may send what (`check_sender`):
steps of its epoch only from its upstream (the router for stage 0, else the stage before it), reshape
and KV commands only from the controller that launched it, copied KV and weights only from the peers
the controller named for the reshape.  A step must also fit the stage's KV (a sequence it holds no KV
of starts at token 0): anything else is refused with a typed error and allocates nothing.

Compute runs in a worker thread so heartbeats and control messages are answered during a long
prefill.  Steps of one stage run one at a time in arrival order (the mailbox is sequential), while
different stages overlap on different micro-batches.

KV is dropped where steps flow: a step's `frees` before it runs (a step of frees only computes
nothing and is passed on as it came), so a free never overtakes a step launched before it that
still uses those blocks, nor lags behind one launched after it.  (FreeSeqs drops KV that no step
has the frees of: what a reshape copied to a stage that no step has reached yet.)
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any, Awaitable, Callable

import torch

from flexpipe.errors import ActorClosed, PeerDeadError, ProtocolError, StepRejected
from flexpipe.runtime.actor import ActorContext, handles
from flexpipe.runtime.chunks import Assembler, budget, flat_slice, limit_of, plan, tensor_overhead
from flexpipe.runtime.memory import release_freed_memory
from flexpipe.runtime.messages import ActorRef, message
from flexpipe.runtime.stage_core import StageCore, StepMeta

log = logging.getLogger("flexpipe.stage")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---- pipeline messages (kinds 100-199) ----------------------------------------------------------
@message(100)
class StepInput:
    """One micro-batch entering a stage; the tensor beside it is token ids [T] or the residual [T, H].

    With no sequences it carries frees only (the router's step when the pipeline goes idle): each
    stage drops that KV and passes it on, the last one answers an empty StepOutput."""
    epoch: int
    step: int
    seq_ids: list
    starts: list
    lens: list
    sample: list
    out_index: list
    sampling: list  # per sequence [temperature, top_k, top_p, seed]
    frees: list  # sequences whose KV is dropped before this step runs


@message(101)
class StepOutput:
    """Sampled tokens of a micro-batch, from the last stage to the router."""
    epoch: int
    step: int
    seq_ids: list
    tokens: list
    compute_s: float = 0.0


@message(102)
class StepFailed:
    """A stage could not run a step; the router recovers the step's requests."""
    epoch: int
    step: int
    stage: int
    error: str


@message(103)
class Configure:
    """Where a stage sends its output, the epoch it serves, and who sends it steps (None: nobody)."""
    epoch: int
    index: int
    next: ActorRef | None
    router: ActorRef
    upstream: ActorRef | None = None


@message(104)
class PrepareUnits:
    """Load units [start, end) for the next epoch (from the source, or from a peer's tensors)."""
    start: int
    end: int
    from_peer: bool = False


@message(105)
class SendUnits:
    """Send the tensors of `units` to `dest` (peer weight copy); replies with bytes sent."""
    units: list
    dest: ActorRef


@message(106)
class UnitTensors:
    """Tensors of units sent by a peer: names in order, tensors beside the message.

    A copy larger than one message comes as several (`send_unit_tensors`, runtime/chunks.py): `parts`
    gives, per tensor beside, None (the whole tensor) or [shape, start, stop] (elements [start, stop)
    of the flattened tensor of `shape`, which the receiver assembles); `more` is set on every message
    of a copy but its last.  A peer built before them sends neither: whole tensors, one message."""
    names: list
    parts: list | None = None
    more: bool = False


@message(107)
class ExportKV:
    """Copy KV of (seq, units, t0, t1) items to `dest`; replies with bytes copied.

    In a pre-copy round (strict=False) a sequence whose KV is gone (it finished, or was preempted
    since the controller read its record) is skipped: the controller copies it again if it lives on
    (its preemption count changed).  In the delta (strict=True, pipeline quiesced) nothing may be
    missing, and a gap aborts the reshape.
    """
    items: list  # [seq_id, [unit indices], t0, t1]
    dest: ActorRef
    strict: bool = False


@message(108)
class ImportKV:
    """KV arriving for (seq, units, t0) items; tensors beside: k0, v0, k1, v1, ...  (An ExportKV item
    larger than a message arrives as items of consecutive token ranges, in one message or several.)"""
    items: list  # [seq_id, [unit indices], t0]


@message(109)
class Activate:
    """Serve [start, end) in `epoch`; drop units (and KV) outside it; steps come from `upstream`."""
    epoch: int
    index: int
    start: int
    end: int
    next: ActorRef | None
    router: ActorRef
    upstream: ActorRef | None = None


@message(110)
class AbortPrepare:
    """Forget units prepared for a reshape that was aborted."""
    epoch: int


@message(111)
class ResetKV:
    """Drop every sequence's KV and serve `epoch` (failure recovery: everything is recomputed)."""
    epoch: int


@message(112)
class StageStatus:
    """Ask for a stage's status dict."""


@message(113)
class FreeSeqs:
    """Drop the KV of these sequences (used when no step is going to carry the frees).

    settled: sent by the controller between two copy rounds, when no KV of these sequences is on its
    way to the stage: a later copy of them (a preempted request copied again from token 0, or a new
    request under a finished one's id) is taken, not refused as freed during the reshape."""
    epoch: int
    seq_ids: list
    settled: bool = False


@message(114)
class ExpectPeers:
    """The actors a stage may take weights (UnitTensors) and KV (ImportKV) from, for one reshape."""
    epoch: int
    refs: list


@message(115)
class StepLog:
    """Ask for a stage's log of its last steps: [step, handler start, result ready] each, in
    perf_counter seconds (one clock for every process of a machine)."""


def source_from_spec(cfg: Any, spec: dict) -> Any:
    """A weight source from its msgpack-able description: preset seed or checkpoint path."""
    from flexpipe.model.checkpoint import CheckpointReader, PresetWeights

    if spec.get("kind") == "checkpoint":
        return CheckpointReader(spec["path"])
    if spec.get("on_device"):  # drawn on the stage's device: other values, seconds instead of minutes for 7B
        from flexpipe.model.device_weights import DevicePresetWeights

        return DevicePresetWeights(cfg, int(spec.get("seed", 0)))
    return PresetWeights(cfg, int(spec.get("seed", 0)))


async def send_unit_tensors(ask: Callable[..., Awaitable[Any]], dest: ActorRef, tensors: dict[str, torch.Tensor],
                            max_message_bytes: int,
                            to_host: Callable[[list[torch.Tensor]], Awaitable[list[torch.Tensor]]] | None = None,
                            ) -> int:
    """Send `tensors` to `dest` as UnitTensors messages of at most `max_message_bytes` each (the plan of
    runtime/chunks.py: whole tensors grouped, one above the budget in element ranges); `ask(dest, msg,
    *tensors)` sends one and waits for its reply, so the receiver takes them in order and the sender
    holds one message's worth at a time.  `to_host` brings a message's tensors to host memory (one
    message's pieces, not whole tensors: a slice of a device tensor is a view).  Returns bytes sent."""
    names = list(tensors)
    items = [(t.numel(), t.element_size(), tensor_overhead(n, t.dim())) for n, t in tensors.items()]
    msgs = plan(items, budget(max_message_bytes))
    for k, pieces in enumerate(msgs):
        sent, parts, out = [], [], []
        for p in pieces:
            t = tensors[names[p.index]]
            whole = p.start == 0 and p.stop == t.numel()
            sent.append(names[p.index])
            parts.append(None if whole else [list(t.shape), p.start, p.stop])
            out.append(t if whole else flat_slice(t, p.start, p.stop))
        if to_host is not None:
            out = await to_host(out)
        split = any(part is not None for part in parts)   # (else the message an older peer takes too)
        await ask(dest, UnitTensors(sent, parts if split else None, k + 1 < len(msgs)), *out)
    return sum(t.numel() * t.element_size() for t in tensors.values())


class _PeerTensors:
    """A weight source over tensors received from a peer stage."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def load(self, names, dtype=None, device=None):
        return {n: self.tensors[n].to(dtype=dtype or self.tensors[n].dtype, device=device or "cpu")
                for n in names if n in self.tensors}


class StageActor:
    """Behaviour of a stage process: runs its units on each micro-batch and forwards the result."""

    # only the controller that launched the stage may send these (a subclass adds its own)
    control_messages: frozenset = frozenset({Configure, PrepareUnits, SendUnits, ExportKV, Activate, AbortPrepare,
                                             ResetKV, FreeSeqs, ExpectPeers})
    # these carry weights or KV into the stage: from the controller or the peers it named
    peer_messages: frozenset = frozenset({UnitTensors, ImportKV})
    # A step expected to take less than this runs on the event loop's thread (when nothing else is
    # computing): the hand-off to the compute thread and back costs two thread wake-ups per stage and
    # step, a large share of a small decode step; a longer step (a prefill) goes to the compute
    # thread so heartbeats and control messages are answered meanwhile.
    INLINE_S = 0.02

    def __init__(self, config: dict, source: dict, start: int, end: int, *, num_blocks: int = 1024,
                 block_size: int = 16, dtype: str = "float32", device: str = "cpu", epoch: int = 0,
                 index: int = 0, torch_threads: int = 0, load: bool = True, controller: list | None = None,
                 idle_trim_s: float = 5.0, decode: str = "off"):
        from flexpipe.model.config import ModelConfig

        self.cfg = ModelConfig.from_dict(config)
        self.source_spec = source
        self.range = (start, end) if load else (start, start)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.dtype, self.device = DTYPES[dtype], device
        self.epoch, self.index = epoch, index
        self.torch_threads = torch_threads
        self.next: ActorRef | None = None
        self.router: ActorRef | None = None
        self.upstream: ActorRef | None = None
        # [name, endpoint] of the controller's actor; None (launched by hand): control from anyone
        self.controller = ActorRef(*controller) if controller else None
        self.peers: set[ActorRef] = set()
        self.core: StageCore | None = None
        self.peer_tensors: dict[str, torch.Tensor] = {}
        self._pieces = Assembler()   # peer tensors split over several UnitTensors, until complete
        self._s_per_token = float("inf")   # running estimate of compute seconds per token of a step
        self.stats = {"steps": 0, "stale_dropped": 0, "compute_s": 0.0, "kv_bytes_in": 0, "kv_bytes_out": 0,
                      "memory_trims": 0, "free_steps": 0}
        self.step_log: collections.deque = collections.deque(maxlen=4096)   # (step, start, done)
        # A stage process keeps freed heap mapped while it serves (runtime/memory.py: up to 256 MiB
        # that the next steps reuse); after idle_trim_s without a step it hands that back (0: never).
        self.idle_trim_s = idle_trim_s
        self._trimmer: asyncio.Task | None = None
        self.decode = decode   # StageCore's decode mode (model/static_decode.py)

    async def on_start(self, ctx: ActorContext) -> None:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        t0 = time.perf_counter()
        source = source_from_spec(self.cfg, self.source_spec)
        self.core = StageCore(self.cfg, source, *self.range, num_blocks=self.num_blocks,
                              block_size=self.block_size, dtype=self.dtype, device=self.device, decode=self.decode)
        self.load_s = time.perf_counter() - t0
        if self.idle_trim_s > 0:
            self._trimmer = asyncio.get_running_loop().create_task(self._trim_when_idle())

    async def on_stop(self, ctx: ActorContext) -> None:
        if self._trimmer is not None:
            self._trimmer.cancel()

    async def _trim_when_idle(self) -> None:
        """Release the kept heap once per idle period: within idle_trim_s to 2 x idle_trim_s of the
        last step (a no-op where the process kept malloc's defaults, e.g. stages run in-process)."""
        seen, dirty = self.stats["steps"], False
        while True:
            await asyncio.sleep(self.idle_trim_s)
            steps = self.stats["steps"]
            if steps != seen:
                seen, dirty = steps, True
            elif dirty:
                dirty = False
                if release_freed_memory():
                    self.stats["memory_trims"] += 1

    # ---- who may send what ---------------------------------------------------------------------
    def check_sender(self, sender: ActorRef | None, msg: Any) -> str | None:
        """Why `sender` may not send `msg` to this stage, or None (run by the Actor before a handler)."""
        cls = type(msg)
        if cls is StepInput:
            if msg.epoch != self.epoch:
                return None   # dropped as stale by the handler, whoever sent it
            if self.upstream is None:
                return f"stage {self.index} has no upstream in epoch {self.epoch}: it takes no steps"
            if sender != self.upstream:
                return f"steps of epoch {self.epoch} come from {self.upstream}, not {sender}"
        elif cls in self.control_messages:
            if self.controller is not None and sender != self.controller:
                return f"{cls.__name__} comes from the controller {self.controller}, not {sender}"
        elif cls in self.peer_messages:
            if self.controller is not None and sender != self.controller and sender not in self.peers:
                return f"{cls.__name__} from {sender}, which is neither the controller nor a peer it named"
        return None

    def _adopt(self, ctx: ActorContext, msg: Configure | Activate) -> None:
        """Take the roles of a Configure or Activate, and close sockets to peers that left the pipeline."""
        self.epoch, self.index, self.next, self.router = msg.epoch, msg.index, msg.next, msg.router
        self.upstream = msg.upstream
        self.peers = set()
        # Keep sockets only to whom this stage sends: not its upstream, which only sends to it (a
        # socket there is left by answering its asks while KV or weights were copied in).
        ctx.prune_peers([r for r in (self.next, self.router, self.controller) if r is not None])

    # ---- data path ----------------------------------------------------------------------------
    @handles(Configure)
    def configure(self, ctx: ActorContext, msg: Configure) -> bool:
        self._adopt(ctx, msg)
        return True

    def _check_step(self, msg: StepInput, x: Any) -> None:
        """Raise StepRejected unless `msg` is well-formed and fits this stage's KV (allocates nothing)."""
        n = len(msg.seq_ids) if isinstance(msg.seq_ids, list) else -1
        fields = (msg.starts, msg.lens, msg.sample, msg.out_index, msg.sampling)
        if n < 0 or not all(isinstance(f, list) and len(f) == n for f in fields):
            raise StepRejected(f"step {msg.step}: per-sequence fields of different lengths")
        if not all(isinstance(s, str) for s in msg.seq_ids) or len(set(msg.seq_ids)) != n:
            raise StepRejected(f"step {msg.step}: sequence ids must be distinct strings")
        if not isinstance(msg.frees, list) or not all(isinstance(s, str) for s in msg.frees):
            raise StepRejected(f"step {msg.step}: frees must be sequence ids")
        for v in (*msg.starts, *msg.lens, *msg.out_index):
            if type(v) is not int or not 0 <= v < 1 << 31:
                raise StepRejected(f"step {msg.step}: positions and lengths must be small non-negative ints")
        if not all(type(v) is bool for v in msg.sample):
            raise StepRejected(f"step {msg.step}: sample flags must be booleans")
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != sum(msg.lens):
            raise StepRejected(f"step {msg.step}: the tensor does not hold sum(lens)={sum(msg.lens)} rows")
        core = self.core
        if not any(u in core.kv for u in range(core.start, core.end)):
            return   # it serves no KV (yet): KV of units prepared for the next epoch arrives by ImportKV
        for s, start in zip(msg.seq_ids, msg.starts):
            table = None if s in msg.frees else core.tables.get(s)   # frees apply before the step
            if table is None and start != 0:
                raise StepRejected(f"step {msg.step}: stage {self.index} holds no KV of sequence {s!r}, "
                                   f"which starts at token {start}: only a first chunk may be new")
            held = core.lengths.get(s, 0)
            if table is not None and start not in (0, held):   # 0: computed again from its first token
                raise StepRejected(f"step {msg.step}: stage {self.index} holds {held} tokens of KV of sequence "
                                   f"{s!r}, so its next step starts at token {held} (or 0), not {start}")

    def _forward(self, meta: StepMeta, x: torch.Tensor) -> torch.Tensor:
        """core.forward, run in the compute thread; a step that fails gives back the blocks it took
        for sequences new to this stage (a known one's are freed with it)."""
        core = self.core
        new = [s for s in meta.seq_ids if s not in core.tables]
        try:
            return core.forward(meta, x)
        except BaseException:
            core.free(new)
            raise

    @handles(StepInput)
    async def step(self, ctx: ActorContext, msg: StepInput, x: torch.Tensor | None = None) -> None:
        if msg.epoch != self.epoch:
            self.stats["stale_dropped"] += 1
            return
        core = self.core
        t0 = time.perf_counter()
        try:
            self._check_step(msg, x)
            meta = StepMeta(msg.seq_ids, msg.starts, msg.lens, msg.sample, msg.out_index, msg.sampling)
            if msg.frees:
                core.free(msg.frees)
            tokens = max(1, x.shape[0])
            if msg.seq_ids:
                out = await ctx.run_compute(self._forward, meta, x,
                                            inline=tokens * self._s_per_token < self.INLINE_S)
            else:   # frees only: nothing to compute, the empty tensor goes on as it came
                out = x
        except Exception as e:  # a step that cannot run must not hang the router
            log.warning("stage %d: step %d failed: %s: %s", self.index, msg.step, type(e).__name__, e)
            await self._tell_failed(ctx, msg, f"{type(e).__name__}: {e}")
            if isinstance(e, StepRejected):
                self.stats["steps_rejected"] = self.stats.get("steps_rejected", 0) + 1
                raise   # the typed error is the reply when the step was asked
            return
        t1 = time.perf_counter()
        dt = t1 - t0
        if msg.seq_ids:
            self.step_log.append((msg.step, t0, t1))
            est = self._s_per_token
            self._s_per_token = dt / tokens if est == float("inf") else est + 0.25 * (dt / tokens - est)
            self.stats["steps"] += 1
            self.stats["compute_s"] += dt
        else:   # (not a step of the step log, the idle trimmer or the per-token estimate)
            self.stats["free_steps"] += 1
        if msg.epoch != self.epoch:  # a switch happened while computing: the result is stale
            self.stats["stale_dropped"] += 1
            return
        try:
            if core.end < self.cfg.num_units:
                await self._send_next(ctx, msg, out)
            else:
                ids = [s for s, f in zip(msg.seq_ids, msg.sample) if f]
                await ctx.tell(self.router, StepOutput(msg.epoch, msg.step, ids, out.tolist(), dt))
        except (PeerDeadError, ActorClosed) as e:  # the next stage is gone: the router hears of it and recovers
            log.warning("stage %d: step %d not delivered: %s: %s", self.index, msg.step, type(e).__name__, e)
        except Exception as e:  # not sent (MessageTooLarge: a residual or body above max_message_bytes): nobody
            # recovers it, so its requests fail now instead of waiting for ever
            log.warning("stage %d: step %d not sent: %s: %s", self.index, msg.step, type(e).__name__, e)
            await self._tell_failed(ctx, msg, f"{type(e).__name__}: {e}")

    async def _tell_failed(self, ctx: ActorContext, msg: StepInput, why: str) -> None:
        """Tell the router that step `msg` failed here (its requests end "error"), if it can hear it."""
        if self.router is None:   # (not configured yet: nobody launched the step)
            return
        try:
            await ctx.tell(self.router, StepFailed(msg.epoch, msg.step, self.index, why))
        except Exception as e:   # the router is gone: nobody waits for the step
            log.warning("stage %d: step %d: cannot tell the router: %s: %s", self.index, msg.step,
                        type(e).__name__, e)

    async def _send_next(self, ctx: ActorContext, msg: StepInput, out: torch.Tensor) -> None:
        """Hand the residual [T, hidden] to the next stage (runtime/gpu_stage.py overrides this)."""
        # the codec carries host tensors; GpuStageActor sends CUDA pairs' residuals through cuda_ipc
        await ctx.tell(self.next, msg, out if out.device.type == "cpu" else out.cpu())

    @handles(FreeSeqs)
    def free_seqs(self, ctx: ActorContext, msg: FreeSeqs) -> bool:
        self.core.free(msg.seq_ids, settled=bool(msg.settled))
        return True

    # ---- reshaping ---------------------------------------------------------------------------------
    # The copy handlers run concurrently with steps: their tensor work goes through run_compute, whose
    # single thread serialises it with forward() (so block tables and unit sets never race), while
    # the old epoch keeps serving between their pieces instead of waiting behind a whole copy.
    @handles(PrepareUnits, concurrent=True)
    async def prepare(self, ctx: ActorContext, msg: PrepareUnits) -> dict:
        t0 = time.perf_counter()
        src = _PeerTensors(self.peer_tensors) if msg.from_peer else None
        loaded = await ctx.run_compute(self.core.prepare, msg.start, msg.end, src)
        self.peer_tensors = {}
        self._pieces.clear()
        return {"loaded": loaded, "seconds": time.perf_counter() - t0}

    @handles(SendUnits, concurrent=True)
    async def send_units(self, ctx: ActorContext, msg: SendUnits) -> int:
        # the units' own tensors (views): only the pieces of one message at a time are copied to the host
        tensors = await ctx.run_compute(self.core.unit_tensors, msg.units)

        async def to_host(ts: list[torch.Tensor]) -> list[torch.Tensor]:
            if all(t.device.type == "cpu" for t in ts):
                return ts
            return await ctx.run_compute(lambda: [t.cpu() for t in ts])

        return await send_unit_tensors(ctx.ask, msg.dest, tensors, limit_of(getattr(ctx, "settings", None)),
                                       to_host)

    @handles(UnitTensors)
    def unit_tensors(self, ctx: ActorContext, msg: UnitTensors, *tensors: torch.Tensor) -> bool:
        parts = msg.parts if msg.parts is not None else [None] * len(tensors)
        if len(msg.names) != len(tensors) or len(parts) != len(tensors):
            raise ProtocolError(f"UnitTensors with {len(msg.names)} names and {len(parts)} parts for "
                                f"{len(tensors)} tensors")
        for name, part, t in zip(msg.names, parts, tensors):
            whole = self._pieces.add(name, part, t)
            if whole is not None:
                self.peer_tensors[name] = whole
        return True

    def _kv_token_bytes(self, units: list) -> int:
        """Bytes of K and V of `units` per token (what core.export_kv gives for one token)."""
        cfg = self.cfg
        return 2 * len(units) * cfg.num_kv_heads * cfg.head_dim * self.dtype.itemsize

    @handles(ExportKV, concurrent=True)
    async def export_kv(self, ctx: ActorContext, msg: ExportKV) -> int:
        """Gather and send KV in messages under max_message_bytes (runtime/chunks.py): an item whose KV
        is larger than one is sent as consecutive token ranges, each gathered when its message is sent
        (host memory holds one message's KV at a time, and a step waits for one range's gather)."""
        wanted = [(str(s), list(u), int(t0), int(t1)) for s, u, t0, t1 in msg.items if t1 > t0]
        overhead = [len(s.encode()) + 9 * len(u) + 2 * tensor_overhead("", 4) for s, u, _, _ in wanted]
        msgs = plan([(t1 - t0, self._kv_token_bytes(u), over) for (_, u, t0, t1), over in zip(wanted, overhead)],
                    budget(limit_of(getattr(ctx, "settings", None))))
        gone: set[int] = set()   # items found freed here (pre-copy): skipped, with any range still to send
        nbytes = 0
        for pieces in msgs:
            items, tensors = [], []
            for p in pieces:
                if p.index in gone:
                    continue
                seq_id, units, t0, _ = wanted[p.index]
                try:
                    k, v = await ctx.run_compute(self.core.export_kv, seq_id, units, t0 + p.start, t0 + p.stop)
                except KeyError:
                    if msg.strict:
                        raise
                    self.stats["kv_export_skipped"] = self.stats.get("kv_export_skipped", 0) + 1
                    gone.add(p.index)
                    continue
                items.append([seq_id, units, t0 + p.start])
                tensors += [k.cpu(), v.cpu()]
            if items:
                await ctx.ask(msg.dest, ImportKV(items), *tensors)
                sent = sum(t.numel() * t.element_size() for t in tensors)
                nbytes += sent
                self.stats["kv_bytes_out"] += sent
                self.stats["kv_messages_out"] = self.stats.get("kv_messages_out", 0) + 1
        return nbytes

    @handles(ImportKV, concurrent=True)
    async def import_kv(self, ctx: ActorContext, msg: ImportKV, *tensors: torch.Tensor) -> bool:
        for j, (seq_id, units, t0) in enumerate(msg.items):
            k, v = tensors[2 * j], tensors[2 * j + 1]
            if await ctx.run_compute(self.core.import_kv, seq_id, units, t0, k, v):
                self.stats["kv_bytes_in"] += k.numel() * k.element_size() * 2
            else:   # freed here since the peer exported it
                self.stats["kv_import_skipped"] = self.stats.get("kv_import_skipped", 0) + 1
        return True

    @handles(Activate)
    def activate(self, ctx: ActorContext, msg: Activate) -> bool:
        self.core.activate(msg.start, msg.end)
        self._adopt(ctx, msg)
        return True

    @handles(ExpectPeers)
    def expect_peers(self, ctx: ActorContext, msg: ExpectPeers) -> bool:
        self.peers = {r for r in msg.refs if isinstance(r, ActorRef)}
        self.core.begin_reshape()
        return True

    @handles(AbortPrepare)
    def abort_prepare(self, ctx: ActorContext, msg: AbortPrepare) -> bool:
        self.core.abort_prepare()
        self.peer_tensors = {}
        self._pieces.clear()
        return True

    @handles(ResetKV)
    def reset_kv(self, ctx: ActorContext, msg: ResetKV) -> bool:
        self.core.reset()
        self.epoch = msg.epoch
        return True

    @handles(StepLog)
    def step_log_entries(self, ctx: ActorContext, msg: StepLog) -> list:
        return [list(e) for e in self.step_log]

    @handles(StageStatus)
    def status(self, ctx: ActorContext, msg: StageStatus) -> dict:
        import os

        return {**self.core.status(), **self.stats, "epoch": self.epoch, "index": self.index,
                "device": self.device, "pid": os.getpid(), "load_s": self.load_s,
                "peers": sorted(map(str, ctx.peers()))}

"""GpuStageActor: a StageActor whose hop to the next stage and whose KV moves can skip host memory.

The plain StageActor sends its residual [T, hidden] beside the next StepInput message: the wire codec
carries host tensors, so a CUDA stage copies it to the host, and the next one copies it back. Between
two CUDA stage processes of one node, GpuStageActor instead sends it through a `cuda_ipc` channel
(transports/cuda_ipc.py: one device-to-device copy into the receiver's ring, no host staging) opened
per neighbour pair when the pipeline is configured or activated, and kept while the neighbour stays.
Its ExportKV copies KV blocks straight into the new owner's pools (opened through CUDA IPC handles)
instead of gathering them into host tensors.

Which hop a pair gets is `choose_hop(mode, src, dst, ipc_reason)`, `mode` being Settings.transport:

    auto      cuda_ipc when both stages are on CUDA, on one host, in two processes, and CuPy works in
              both; otherwise the message path (what StageActor does)
    message   always the message path (the controller then launches plain StageActors)
    cuda_ipc  cuda_ipc, or ConfigError saying why not
    shm       a shared-memory ring between processes of one host, for any devices (CUDA stages stage
              through host memory): the same channel machinery on CPU, which is how it is tested
              without a GPU; not measured to be faster than the message path

The receiving stage makes the choice (it learns the sender's endpoint in `OpenHop`). A neighbour that
does not handle OpenHop (a plain StageActor) refuses it, and the hop stays on the message path.

Order on the data path: the sender puts the residual in the channel, then tells the StepInput without
a tensor; the receiver reads the channel when that message arrives. A residual larger than the
channel's ring goes beside the message instead (a send that had to stream through the ring would
wait for a receiver that has not been told yet), as does every send after a channel failed.

A residual that never comes. The StepInput may arrive while its residual never does: a sender killed
right after its send (a returned send() is no proof that the data left the process, and a sender that
died before its hello reached the receiver is not seen by the channel: transports/base.PeerWatch). The
receiver's step would wait for ever, and with it the stage's mailbox (steps run one at a time), so
that the recovery's messages to it (ResetKV, Activate, the new upstream's OpenHop) would time out.
So the receiver watches the stage that opened its channel (OpenHop names it, and check_sender holds
it to the sender the actor system saw) while the channel is open and that stage is its upstream:
once it is declared dead (its process ended, its heartbeats stopped), the channel is closed, the step
waiting on it ends and is dropped, as is every later step that put its residual there; the router
learns of the same death and recomputes their requests (runtime/recovery.py), where a StepFailed
would race that recovery and end them with an error; one is still sent `hop_wait_s` later, for a death
that only this stage declared (the router ignores it for a step its recovery has requeued). A wait is bounded too (`hop_wait_s`, at least
twice the heartbeat timeout, so that a sender's death is seen first): a residual that does not come
from a sender that lives is a channel out of step with its messages, so the channel is closed and the
step, and every later one that went down it, fails (StepFailed: its requests end with an error) until
a new OpenHop. Neither costs the data path anything but a timer per step (no round trip, no polling).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
from typing import Any

import torch

from flexpipe.errors import ActorClosed, ConfigError, RemoteError
from flexpipe.runtime.actor import ActorContext, handles
from flexpipe.runtime.messages import ActorRef, Terminated, message
from flexpipe.runtime.stage import (
    AbortPrepare, Activate, Configure, ExportKV, FreeSeqs, StageActor, StageStatus, StepInput,
)
from flexpipe.runtime.stage_core import StageCore
from flexpipe.transports import Endpoint, open_receiver, open_sender
from flexpipe.transports import cuda_ipc

__all__ = ["GpuStageActor", "OpenHop", "ReserveKV", "HOP_MODES", "check_mode", "choose_hop", "stage_target",
           "hop_capacity"]

log = logging.getLogger("flexpipe.gpu_stage")

HOP_MODES = ("auto", "message", "cuda_ipc", "shm")
PLAIN_TARGET = "flexpipe.runtime.stage:StageActor"
GPU_TARGET = "flexpipe.runtime.gpu_stage:GpuStageActor"
DEFAULT_RING_BYTES = 64 << 20   # per channel; a residual of 8192 tokens x 4096 fp16 fits
MIN_RING_BYTES = 4096           # a page: smaller rings would send nearly every residual beside the message
DEFAULT_HOP_WAIT_S = 10.0       # how long a step waits for its residual on the channel (module docstring)


def check_mode(mode: str) -> str:
    """`mode` if it is a transport setting, else ConfigError."""
    if mode not in HOP_MODES:
        raise ConfigError(f"transport {mode!r}: give one of {', '.join(HOP_MODES)}")
    return mode


def _is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def stage_target(mode: str, device: str) -> str:
    """The behaviour the controller launches for a stage on `device` under transport `mode`."""
    check_mode(mode)
    if mode == "message" or (mode == "auto" and not _is_cuda(device)):
        return PLAIN_TARGET   # CPU stages under auto: exactly the plain runtime
    return GPU_TARGET


def choose_hop(mode: str, src: Endpoint, dst: Endpoint, ipc_reason: str = "") -> tuple[str, str]:
    """(kind, why) of the hop from stage `src` to stage `dst`: "cuda_ipc", "shm" or "message".

    `ipc_reason` is why CUDA IPC cannot run at either end ("" when it can). `why` says why a pair
    that could have had a channel stays on the message path. ConfigError when `mode` asks for a
    channel the pair cannot have.
    """
    check_mode(mode)
    if mode == "message":
        return "message", "transport='message'"
    why = ""
    if src.host != dst.host:
        why = "the stages are on different hosts (NCCL is not wired into stages)"
    elif src.pid == dst.pid:
        why = "the stages share a process (the message carries the tensor itself)"
    if mode == "shm":
        if why:
            raise ConfigError(f"transport='shm' from {src} to {dst}: {why}")
        return "shm", ""
    if not why and not (_is_cuda(src.device) and _is_cuda(dst.device)):
        why = f"not both stages are on CUDA ({src.device} -> {dst.device})"
    if not why and ipc_reason:
        why = ipc_reason
    if not why:
        return "cuda_ipc", ""
    if mode == "cuda_ipc":
        raise ConfigError(f"transport='cuda_ipc' from {src} to {dst}: {why}")
    return "message", why


def hop_capacity(tx: Any) -> int:
    """Bytes one send may hold without streaming through the channel's ring (0: unknown)."""
    return int(getattr(tx, "capacity", 0) or 0)


@functools.cache
def _ipc_reason() -> str:
    """Why CUDA IPC cannot run in this process ("" when it can); CuPy is imported once."""
    return cuda_ipc.unavailable_reason()


def _rx_options(kind: str, device: str, ring_bytes: int) -> dict:
    if kind == "cuda_ipc":
        return {"device": device, "ring_bytes": ring_bytes}
    return {"ring_bytes": ring_bytes}


# ---- messages (kinds 420-429; gpu_check's helpers use 422-429) ----------------------------------------
@message(420)
class OpenHop:
    """Open the receiving end of the residual hop from the stage at `src` [host, pid, device]; reply:
    the channel's address, or {"kind": "message", "why": ...} to keep the message path.  `sender`:
    the stage that will send on it (the one asking), which the receiver watches while it is open."""
    epoch: int
    src: list
    mode: str = "auto"
    src_ipc: str = ""   # why CUDA IPC cannot run at the sender ("" when it can)
    sender: ActorRef | None = None


@message(421)
class ReserveKV:
    """Grow these sequences' block tables to hold [t0, t1) and return the new block ids and the KV
    pools (reply: {"tables", "pools"}), or None when the pair cannot copy through CUDA IPC."""
    items: list   # [seq_id, t0, t1]
    src: list     # the exporting stage [host, pid, device]


class GpuStageActor(StageActor):
    """A StageActor with a channel hop to the next stage and KV copies through CUDA IPC (see above)."""

    # ReserveKV grows block tables: only from the controller or the peers it named for a reshape.
    # FreeSeqs too: an old owner that reserved blocks here for a request which then finished gives
    # them back (export_kv); on a plain StageActor only the controller frees sequences.
    peer_messages: frozenset = StageActor.peer_messages | {ReserveKV, FreeSeqs}
    control_messages: frozenset = StageActor.control_messages - {FreeSeqs}

    def check_sender(self, sender: ActorRef | None, msg: Any) -> str | None:
        """StageActor's rules, and: OpenHop (which replaces the receiving channel) only from this
        stage's upstream, a peer named for the running reshape or the controller.  Before the first
        Configure the upstream is not known yet (the upstream's Configure may run first), so then
        any sender may open it (a channel opened that way is replaced by the upstream's request).
        A settled FreeSeqs (one that also forgets the frees, StageCore.free) only from the controller.
        An OpenHop that names its channel's sender only from that sender (the receiver watches it)."""
        if type(msg) is OpenHop and msg.sender is not None and sender is not None and msg.sender != sender:
            return f"OpenHop names {msg.sender} as the channel's sender, but it came from {sender}"
        if type(msg) is FreeSeqs and msg.settled and self.controller is not None and sender != self.controller:
            return "a settled FreeSeqs comes from the controller (only it knows that no copy is under way)"
        if type(msg) is OpenHop and self.upstream is not None:
            if sender not in (self.upstream, self.controller) and sender not in self.peers:
                return f"OpenHop comes from the upstream {self.upstream} or a named peer, not {sender}"
            return None
        return StageActor.check_sender(self, sender, msg)

    def __init__(self, *args: Any, transport: str = "auto", hop_ring_bytes: int = DEFAULT_RING_BYTES,
                 hop_wait_s: float = DEFAULT_HOP_WAIT_S, **kw: Any):
        super().__init__(*args, **kw)
        self.mode = check_mode(transport)
        if not isinstance(hop_ring_bytes, int) or hop_ring_bytes < MIN_RING_BYTES:
            raise ConfigError(f"hop_ring_bytes={hop_ring_bytes!r}: give the bytes of a hop channel's ring, at "
                              f"least {MIN_RING_BYTES}")
        self.ring_bytes = hop_ring_bytes
        if not hop_wait_s > 0:
            raise ConfigError(f"hop_wait_s={hop_wait_s!r}: give the seconds (> 0) a step may wait for its "
                              "residual")
        self.hop_wait_s = float(hop_wait_s)
        self.tx: Any = None                  # channel to the next stage
        self.tx_to: Any = None               # ... and the ref it leads to
        self.rx: Any = None                  # channel from the previous stage
        self.rx_epoch = -1                   # epoch in which rx was opened
        self.rx_from: ActorRef | None = None   # the stage that opened it (watched while it is open)
        self.rx_lost = ""                    # why the channel was closed under its sender ("": it was not)
        self.rx_lost_fails = False           # ... and whether steps that went down it fail (else: dropped)
        self._rx_closing: set[asyncio.Task] = set()
        self.hop_kind, self.hop_why = "", ""
        self.peer_pools: cuda_ipc.PeerPools | None = None   # other stages' KV pools, opened for one reshape
        self.kv_stream: Any = None
        self.stats.update(hop_sends=0, hop_beside=0, hop_failed=0, kv_ipc_bytes=0, hop_recvs=0,
                          hop_lost=0, hop_rx_lost=0)

    @property
    def _core(self) -> StageCore:
        """The started stage's core (on_start made it)."""
        if self.core is None:
            raise ActorClosed(f"stage {self.index} has not started (no units loaded)")
        return self.core

    def _here(self) -> Endpoint:
        return Endpoint(socket.gethostname(), os.getpid(), self.device)

    def _my_ipc_reason(self) -> str:
        return _ipc_reason() if _is_cuda(self.device) else f"stage on {self.device}"

    async def on_start(self, ctx: ActorContext) -> None:
        await super().on_start(ctx)
        settings = getattr(ctx, "settings", None)   # (the Actor's; a LocalContext has none)
        if settings is not None:   # a dead sender is seen (heartbeats) before a wait runs out
            self.hop_wait_s = max(self.hop_wait_s, 2 * float(settings.heartbeat_timeout))

    async def on_stop(self, ctx: ActorContext) -> None:
        await super().on_stop(ctx)
        await self._close_tx()
        if self.rx is not None:
            await self.rx.aclose()
            self.rx = None
        self._close_peer_pools()
        for task in list(self._rx_closing):   # (a failure told later: no router waits on a stopped stage)
            task.cancel()

    def _close_peer_pools(self) -> None:
        if self.peer_pools is not None:
            self.peer_pools.close()
            self.peer_pools = None

    async def _close_tx(self) -> None:
        if self.tx is not None:
            tx, self.tx = self.tx, None
            await tx.aclose()

    # ---- the hop ------------------------------------------------------------------------------------
    async def _connect_next(self, ctx: ActorContext) -> None:
        if self.next == self.tx_to and (self.tx is not None or self.next is None or self.hop_kind):
            return   # same neighbour: the channel (or the decision) carries on into the new epoch
        await self._close_tx()
        self.tx_to, self.hop_kind, self.hop_why = self.next, "", ""
        if self.next is None:
            return
        here = self._here()
        try:
            address = await ctx.ask(self.next, OpenHop(self.epoch, [here.host, here.pid, here.device], self.mode,
                                                       self._my_ipc_reason(), ctx.self_ref))
        except RemoteError as e:
            if not (e.kind == "ProtocolError" and "no handler for OpenHop" in e.message):
                raise
            self.hop_kind, self.hop_why = "message", "the next stage is a plain StageActor"
            return
        self.hop_kind = address["kind"]
        if self.hop_kind == "message":
            self.hop_why = str(address.get("why", ""))
            return
        opts = {"device": self.device} if self.hop_kind == "cuda_ipc" else {}
        self.tx = await open_sender(address, **opts)

    async def _forget_old_rx(self, ctx: ActorContext) -> None:
        """After new roles: a channel that a stage other than the upstream opened carries no step of
        this epoch (the new upstream opens its own), and its sender is no longer watched (its end, a
        reshape retiring it, is no news here)."""
        if self.rx_from is not None and self.rx_from != self.upstream:
            ctx.unwatch(self.rx_from)
            self.rx_from = None
            if self.rx is not None:
                rx, self.rx = self.rx, None
                await rx.aclose()

    @handles(Configure)
    async def configure(self, ctx: ActorContext, msg: Configure) -> bool:
        StageActor.configure(self, ctx, msg)
        await self._forget_old_rx(ctx)
        await self._connect_next(ctx)
        return True

    @handles(Activate)
    async def activate(self, ctx: ActorContext, msg: Activate) -> bool:
        StageActor.activate(self, ctx, msg)
        self._close_peer_pools()   # the reshape's KV copies are over
        await self._forget_old_rx(ctx)
        await self._connect_next(ctx)
        return True

    @handles(AbortPrepare)
    def abort_prepare(self, ctx: ActorContext, msg: AbortPrepare) -> bool:
        self._close_peer_pools()
        return StageActor.abort_prepare(self, ctx, msg)

    @handles(OpenHop)
    async def open_hop(self, ctx: ActorContext, msg: OpenHop) -> dict:
        src = Endpoint(str(msg.src[0]), int(msg.src[1]), str(msg.src[2]))
        kind, why = choose_hop(msg.mode, src, self._here(), msg.src_ipc or self._my_ipc_reason())
        if self.rx is not None:   # the previous upstream's channel: its unread sends are of older epochs
            rx, self.rx = self.rx, None
            await rx.aclose()
        # the stage that will send on the new channel: watched while the channel is open
        sender = msg.sender if isinstance(msg.sender, ActorRef) and msg.sender != ctx.self_ref else None
        if kind == "message":
            sender = None
        if self.rx_from is not None and self.rx_from != sender:
            ctx.unwatch(self.rx_from)
        self.rx_from, self.rx_lost, self.rx_lost_fails = None, "", False
        self.rx_epoch = msg.epoch
        if kind == "message":
            return {"kind": "message", "why": why}
        self.rx = await open_receiver(kind, **_rx_options(kind, self.device, self.ring_bytes))
        if sender is not None:
            self.rx_from = sender
            ctx.watch(sender)   # its death closes the channel (hop_sender_died)
        return self.rx.address

    @handles(Terminated, concurrent=True)   # (concurrent: a step may be waiting on the channel)
    async def hop_sender_died(self, ctx: ActorContext, msg: Terminated) -> None:
        """The stage that sends on this stage's channel is dead: what it has not sent will not come."""
        if msg.ref == self.rx_from and self.rx is not None:
            await self._abandon_rx(self.rx, f"its sender {msg.ref} died ({msg.reason})", fails=False)

    async def _abandon_rx(self, rx: Any, why: str, *, fails: bool) -> None:
        """Close the channel `rx` under its sender (a step waiting on it raises ActorClosed): steps that
        put their residual there are failed from now on (`fails`) or dropped, until a new OpenHop."""
        if self.rx is not rx:
            return   # (closed already, or replaced)
        self.rx, self.rx_lost, self.rx_lost_fails = None, why, fails
        self.stats["hop_rx_lost"] += 1
        log.warning("stage %d: the %s channel from the previous stage is closed: %s; the steps whose "
                    "residual went down it are %s", self.index, rx.kind, why,
                    "failed" if fails else "dropped (the router recovers their requests)")
        await rx.aclose()

    def _rx_overdue(self, rx: Any, step: int) -> None:
        """A step's residual did not come within hop_wait_s (a timer's callback)."""
        if self.rx is rx:
            task = asyncio.get_running_loop().create_task(self._abandon_rx(
                rx, f"the residual of step {step} did not come within {self.hop_wait_s:g}s of its message "
                    f"while its sender lives", fails=True))
            self._rx_closing.add(task)
            task.add_done_callback(self._rx_closing.discard)

    async def _input_lost(self, ctx: ActorContext, msg: StepInput) -> None:
        """A step whose residual went down a channel that was closed under it: fail it (its requests
        end with an error) or drop it (its sender died: the router recomputes its requests)."""
        self.stats["hop_lost"] += 1
        why = f"its residual was lost: the channel from the previous stage is closed ({self.rx_lost})"
        if msg.epoch != self.epoch or self.router is None:
            log.warning("stage %d: step %d dropped: %s", self.index, msg.step, why)
            return
        if not self.rx_lost_fails:
            # Dropped: the router recovers the sender's death and requeues the step's requests.  Were
            # the death this stage's verdict alone (its heartbeats missed, the router's not), nobody
            # would: so the step is failed later all the same, which the router ignores once a
            # recovery has requeued it (a step no longer in flight, or of an older epoch).
            log.warning("stage %d: step %d dropped: %s", self.index, msg.step, why)
            task = asyncio.get_running_loop().create_task(self._fail_later(ctx, msg, why))
            self._rx_closing.add(task)
            task.add_done_callback(self._rx_closing.discard)
            return
        log.warning("stage %d: step %d failed: %s", self.index, msg.step, why)
        await self._tell_failed(ctx, msg, f"ActorClosed: {why}")

    async def _fail_later(self, ctx: ActorContext, msg: StepInput, why: str) -> None:
        await asyncio.sleep(self.hop_wait_s)   # (>= 2 heartbeat timeouts: the router has seen a real death)
        if self.router is not None:
            await self._tell_failed(ctx, msg, f"ActorClosed: {why}; no recovery came within {self.hop_wait_s:g}s")

    @handles(StepInput)
    async def step(self, ctx: ActorContext, msg: StepInput, x: torch.Tensor | None = None) -> None:
        if x is None:   # the residual came down the channel, put there just before this message
            rx = self.rx
            if rx is None or msg.epoch < self.rx_epoch:
                if msg.epoch >= self.rx_epoch and self.rx_lost:   # closed under its sender (see above)
                    return await self._input_lost(ctx, msg)
                self.stats["stale_dropped"] += 1   # it went down a channel that is closed
                return
            self.stats["hop_recvs"] += 1   # (counted as the wait begins)
            timer = asyncio.get_running_loop().call_later(self.hop_wait_s, self._rx_overdue, rx, msg.step)
            try:
                (x,) = await rx.recv()   # a ring view: dropped when the step is done with it
            except Exception as e:
                # ActorClosed: the sender closed or died (dropped: the router recovers a stage's death),
                # or the channel was closed under the wait (above); else the channel is out of step
                await self._abandon_rx(rx, f"{type(e).__name__}: {e}", fails=not isinstance(e, ActorClosed))
                return await self._input_lost(ctx, msg)
            finally:
                timer.cancel()
        await StageActor.step(self, ctx, msg, x)

    async def _send_next(self, ctx: ActorContext, msg: StepInput, out: torch.Tensor) -> None:
        tx = self.tx
        if tx is None or not msg.seq_ids:   # (a step of frees only: its empty tensor goes beside)
            return await StageActor._send_next(self, ctx, msg, out)
        if out.numel() * out.element_size() > hop_capacity(tx):
            self.stats["hop_beside"] += 1
            return await StageActor._send_next(self, ctx, msg, out)
        try:
            await tx.send(out if self.hop_kind == "cuda_ipc" or out.device.type == "cpu" else out.cpu())
        except Exception as e:   # the channel is in an unknown state: stop using it, keep serving
            log.warning("stage %d: %s hop failed (%s: %s); the message path carries on", self.index,
                        self.hop_kind, type(e).__name__, e)
            self.stats["hop_failed"] += 1
            self.tx, self.hop_kind, self.hop_why = None, "message", f"channel failed: {type(e).__name__}: {e}"
            try:
                await tx.aclose()
            finally:
                await StageActor._send_next(self, ctx, msg, out)
            return
        self.stats["hop_sends"] += 1
        assert self.next is not None   # a channel exists only towards a next stage
        await ctx.tell(self.next, msg)

    # ---- KV through CUDA IPC ----------------------------------------------------------------------------
    def _kv_ipc_reason(self, src: Endpoint) -> str:
        """Why KV cannot be copied from `src` into this stage's pools through CUDA IPC ("" when it can)."""
        if not _is_cuda(self.device):
            return f"the new owner is on {self.device}"
        try:
            kind, why = choose_hop("auto", src, self._here(), self._my_ipc_reason())
        except ConfigError as e:
            return str(e)
        return why if kind != "cuda_ipc" else ""

    @handles(ReserveKV, concurrent=True)
    async def reserve_kv(self, ctx: ActorContext, msg: ReserveKV) -> dict | None:
        src = Endpoint(str(msg.src[0]), int(msg.src[1]), str(msg.src[2]))
        if self._kv_ipc_reason(src):
            return None
        return await ctx.run_compute(self._reserve, [(str(s), int(t0), int(t1)) for s, t0, t1 in msg.items])

    def _reserve(self, items: list[tuple[str, int, int]]) -> dict:
        core, bs = self._core, self.block_size
        tables = []
        for seq, t0, t1 in items:   # one freed here since the exporter read it: no blocks (StageCore.take_kv)
            table = core.take_kv(seq, t1)
            tables.append(table[t0 // bs:-(-t1 // bs)] if table is not None else [])
        # the sequences held here only through copied KV: those the exporter may free again
        created = [seq for seq, _, _ in items if core.only_imported(seq)]
        return {"tables": tables, "pools": cuda_ipc.export_pools(core.kv, self.num_blocks, bs), "created": created}

    @handles(ExportKV, concurrent=True)
    async def export_kv(self, ctx: ActorContext, msg: ExportKV) -> int:
        if self.mode == "message" or self._my_ipc_reason():
            return await StageActor.export_kv(self, ctx, msg)
        core, bs = self._core, self.block_size
        items = []
        for seq, units, t0, t1 in msg.items:
            if t1 <= t0:
                continue
            table = core.tables.get(seq)
            if table is None or -(-t1 // bs) > len(table):
                if msg.strict:
                    raise KeyError(f"stage [{core.start},{core.end}) holds no KV of {seq} up to token {t1}")
                self.stats["kv_export_skipped"] = self.stats.get("kv_export_skipped", 0) + 1
                continue
            items.append((seq, list(units), t0, t1))
        if not items:
            return 0
        here = self._here()
        try:
            reply = await ctx.ask(msg.dest, ReserveKV([[s, t0, t1] for s, _, t0, t1 in items],
                                                      [here.host, here.pid, here.device]), timeout=600)
        except RemoteError as e:
            if not (e.kind == "ProtocolError" and "no handler for ReserveKV" in e.message):
                raise
            reply = None
        if reply is None:   # the new owner cannot take it through CUDA IPC: host tensors, as StageActor
            return await StageActor.export_kv(self, ctx, msg)
        if self.peer_pools is None:
            self.peer_pools = cuda_ipc.PeerPools()
        if self.kv_stream is None:
            self.kv_stream = torch.cuda.Stream(core.device)
        dst = self.peer_pools.open(reply["pools"], core.device.index)
        nbytes, gone = await ctx.run_compute(self._copy_blocks, items, reply["tables"], dst, msg.strict)
        # freed here between the check and the copy: the blocks reserved for them go back, unless the
        # new owner runs the sequence itself (a preempted request that runs again there by now)
        gone = [s for s in gone if s in set(reply.get("created", gone))]
        if gone:
            await ctx.ask(msg.dest, FreeSeqs(self.epoch, gone))
        self.stats["kv_bytes_out"] += nbytes
        self.stats["kv_ipc_bytes"] += nbytes
        return nbytes

    def _copy_blocks(self, items: list, tables: list, dst: dict, strict: bool) -> tuple[int, list]:
        bs, core, stream = self.block_size, self._core, self.kv_stream
        stream.wait_stream(torch.cuda.current_stream(core.device))   # KV written so far is in place
        nbytes, gone = 0, []
        for (seq, units, t0, t1), dst_ids in zip(items, tables):
            if not dst_ids:   # the new owner freed it since (StageCore.take_kv): nothing to copy
                continue
            table = core.tables.get(seq)
            if table is None or -(-t1 // bs) > len(table):
                if strict:
                    raise KeyError(f"stage [{core.start},{core.end}) holds no KV of {seq} up to token {t1}")
                gone.append(seq)
                continue
            runs = cuda_ipc.coalesce_runs(table[t0 // bs:-(-t1 // bs)], dst_ids)
            for u in units:
                if u not in dst:
                    raise KeyError(f"the destination has no KV pool for unit {u}: prepare it first")
                nbytes += cuda_ipc.copy_runs(core.kv[u].k, dst[u][0], runs, stream)
                nbytes += cuda_ipc.copy_runs(core.kv[u].v, dst[u][1], runs, stream)
        stream.synchronize()   # the reply to ExportKV is the completion signal
        return nbytes, gone

    @handles(StageStatus)
    def status(self, ctx: ActorContext, msg: StageStatus) -> dict:
        return {**StageActor.status(self, ctx, msg), "hop": self.hop_kind, "hop_why": self.hop_why,
                "transport": self.mode, "host": socket.gethostname(), "hop_ring_bytes": self.ring_bytes,
                "hop_wait_s": self.hop_wait_s}

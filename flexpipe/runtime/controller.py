"""The reconfiguration protocol: reshape a running pipeline (stage failure and restarts: recovery.py).

From epoch e to e+1 (DESIGN.md):
  1. plan     match new stages to running stage actors (largest unit overlap on the same device);
              a matched actor stays and loads only the units it lacks, the rest are new processes
  2. prepare  load weights: from the checkpoint/preset, or from the peer stage that holds them
  3. pre-copy while epoch e serves, copy KV of every moved attention unit, token range [copied,
              computed), in rounds until what is left is small
  4. quiesce  the router stops launching steps and waits for those in flight
  5. delta    copy what was written since the last round
  6. switch   activate the new ranges (actors drop what they no longer own), swap the router's
              pipeline and KV ledger, bump the epoch, resume; retire actors that left the shape
The pause requests see is 4-6 and is measured.  A failure in 1-5 aborts: prepared units are
dropped, new actors stopped, and epoch e keeps serving.  KV moves as (sequence, units, token
range): KV of past positions never changes, so a copy of [0, computed) stays valid while the old
epoch appends after it; a request preempted meanwhile is copied again from 0.  Weights and KV travel
in messages under max_message_bytes (runtime/chunks.py): a tensor larger than one goes in pieces that
the receiver assembles, a sequence's KV in token ranges.

With a host-memory weight cache (runtime/weight_cache.py), units that leave a stage are sent to it
during prepare, and a stage that needs units the cache holds gets them from RAM ("cache" tier).
`suspend()` scales to zero (every stage retired to the cache, the router holds new requests) and
`wake(shape)` starts the pipeline again from the cache.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from flexpipe.errors import ActorError, ConfigError, PipelineDown, ReshapeError
from flexpipe.partition import PipelineShape
from flexpipe.runtime.cache import CacheManager, StagePool, blocks_for
from flexpipe.runtime.chunks import limit_of
from flexpipe.runtime.messages import ActorRef
from flexpipe.runtime.router import Pipeline, RouterActor
from flexpipe.runtime.stage import (
    AbortPrepare, Activate, Configure, ExpectPeers, ExportKV, FreeSeqs, PrepareUnits, SendUnits,
    DTYPES, StageStatus, StepFailed, StepLog, StepOutput, send_unit_tensors,
)
from flexpipe.settings import PRECOPY_DELTA_TOKENS, PRECOPY_MAX_ROUNDS

log = logging.getLogger("flexpipe.controller")
# where a reshape may take the weights of the units it loads ("auto": the cheapest tier that has them)
WEIGHT_SOURCES = ("auto", "source", "peer", "cache")
# A `copied` entry (tokens, preemptions, record) that matches no request: whatever reached the new
# owners is stale, and the next copy round frees it there (settled) before copying from token 0.
_UNKNOWN_COPY: tuple = (0, -1, None)


def check_weights_from(weights_from: Any) -> None:
    """ConfigError saying what to give unless `weights_from` is one of WEIGHT_SOURCES."""
    if not isinstance(weights_from, str) or weights_from not in WEIGHT_SOURCES:
        raise ConfigError(f"weights_from must be one of {', '.join(map(repr, WEIGHT_SOURCES))} "
                          f"(got {weights_from!r:.80})")


async def to_the_end(aw: Any) -> Any:
    """Await `aw` to its end even when the caller is cancelled meanwhile, and raise the cancellation
    after: for clean-ups that must not stop half way (stopping processes, resuming the router)."""
    task = asyncio.ensure_future(aw)
    interrupted = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():   # the clean-up itself was cancelled, not its caller
                raise
            interrupted = True
    if interrupted:
        raise asyncio.CancelledError()
    return result


@dataclass(slots=True)
class Slot:
    """A running stage actor and the range it serves."""

    handle: Any  # ActorHandle
    start: int
    end: int
    device: str

    @property
    def ref(self) -> ActorRef:
        return self.handle.ref


@dataclass(slots=True)
class ReshapeStats:
    """What one reshape (or recovery) did and cost."""

    kind: str  # "reshape" | "recovery" | "rebuild" (after a failed switch) | "scale_to_zero" | "cold_start" | ...
    from_epoch: int
    to_epoch: int
    from_boundaries: list[int]
    to_boundaries: list[int]
    ok: bool = True
    error: str = ""
    pause_s: float = 0.0  # quiesce -> resume: what requests see
    total_s: float = 0.0
    prepare_s: float = 0.0
    weight_bytes: int = 0  # parameters loaded into stages (from source or peers)
    weights_from: str = "source"  # "source" | "peer" | "cache" (the cache tier falls back to peers per unit)
    weights_s: float = 0.0  # copying and building units (loading inside a starting process excluded)
    kv_bytes: int = 0  # KV copied, pre-copy and delta together
    kv_bytes_delta: int = 0  # KV copied during the pause
    moved_kv_tokens: int = 0
    precopy_rounds: int = 0
    stages_kept: int = 0
    stages_started: int = 0
    stages_retired: int = 0
    requests_running: int = 0
    requests_recomputed: int = 0
    at: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        return asdict(self)


class Controller:
    """Owns the stage actors of one pipeline and changes their shape."""

    def __init__(self, system: Any, spec: Any, settings: Any, *, in_process: bool = False,
                 max_precopy_rounds: int = PRECOPY_MAX_ROUNDS, delta_tokens_target: int = PRECOPY_DELTA_TOKENS, stage_launcher: Any = None,
                 weight_cache: Any = None):
        self.system, self.spec, self.settings = system, spec, settings
        self.weight_cache = weight_cache  # a WeightCache (runtime/weight_cache.py), or None: no cache tier
        self.cache_actor: Any = None
        self.in_process = in_process
        # async (target, kwargs, name, device) -> handle with .ref .pid .stop() .kill(), and .device where it
        # may start the stage on another device than asked (the router daemon's); None: local processes
        self.stage_launcher = stage_launcher
        self.max_precopy_rounds = max_precopy_rounds
        self.delta_tokens_target = delta_tokens_target
        self.slots: list[Slot] = []
        self.shape: PipelineShape | None = None
        self.router: RouterActor | None = None
        self.router_actor: Any = None
        self.closed = False   # aclose() has run: nothing more is served or reshaped
        self.history: list[ReshapeStats] = []
        self._lock = asyncio.Lock()
        from flexpipe.runtime.recovery import Recovery   # (it imports this module)

        self.recovery = Recovery(self)   # stages that die, and restarts
        self._names = 0
        self.fail_next_launch = False  # test hook: make the next stage launch fail (aborted reshape)

    # ---- start / stop -----------------------------------------------------------------------------
    async def _launch(self, start: int, end: int, device: str, epoch: int, index: int, load: bool = True) -> Slot:
        s = self.settings
        self._names += 1
        kwargs = {"config": self.spec.config.to_dict(), "source": self.spec.source, "start": start, "end": end,
                  "num_blocks": s.num_blocks, "block_size": s.block_size, "dtype": s.dtype, "device": device,
                  "epoch": epoch, "index": index, "torch_threads": s.torch_threads, "load": load,
                  "idle_trim_s": s.idle_trim_s, "decode": s.decode_graphs,
                  "controller": [self.system.client.ref.name, self.system.client.ref.endpoint]}
        if self.fail_next_launch:
            self.fail_next_launch = False
            kwargs["source"] = {"kind": "checkpoint", "path": "/nonexistent/flexpipe-test-failure"}
        from flexpipe.runtime.gpu_stage import PLAIN_TARGET, stage_target

        target = stage_target(s.transport, device)  # CUDA stages: GpuStageActor (cuda_ipc hop, KV via IPC)
        if target != PLAIN_TARGET:
            kwargs.update(transport=s.transport, hop_ring_bytes=s.hop_ring_bytes, hop_wait_s=s.hop_wait_s)
        if self.stage_launcher is not None:  # e.g. the router daemon: a worker process starts it
            handle = await self.stage_launcher(target, kwargs, f"stage{self._names}", device)
        else:
            handle = await self.system.launch(target, kwargs, name=f"stage{self._names}", in_process=self.in_process)
        return Slot(handle, start, end, getattr(handle, "device", device))   # where it runs, not where asked

    def _running_shape(self, epoch: int) -> PipelineShape:
        """The shape of the running stages, in `epoch`: each on the device it runs on (a launcher may
        have started one elsewhere than its shape asked, as a recovery on another worker does)."""
        return PipelineShape.from_boundaries([sl.start for sl in self.slots] + [self.slots[-1].end], epoch,
                                             [sl.device for sl in self.slots])

    def _pools(self, shape: PipelineShape) -> list[StagePool]:
        cfg = self.spec.config
        return [StagePool(self.settings.num_blocks,
                          tuple(cfg.unit_layer(u) for u in range(st.start, st.end) if cfg.unit_kind(u) == "attention"))
                for st in shape.stages]

    async def _launch_all(self, launches: dict[int, Any], what: str, wrap: bool = True) -> dict[int, Slot]:
        """Await stage launches together: their slots by key, or, when any fails, its error (as a
        ReshapeError saying `what` when `wrap`) after the ones that did start are stopped again: no
        process, and no device memory, is left behind."""
        tasks = [asyncio.ensure_future(aw) for aw in launches.values()]
        try:
            res = await asyncio.gather(*tasks, return_exceptions=True)
        except asyncio.CancelledError:   # the caller was cancelled, and so are the launches: stop
            # those that had started already (one cancelled while its process starts kills it)
            res = await to_the_end(asyncio.gather(*tasks, return_exceptions=True))
            await to_the_end(asyncio.gather(*(r.handle.stop() for r in res if isinstance(r, Slot)),
                                             return_exceptions=True))
            raise
        slots = {j: r for j, r in zip(launches, res) if isinstance(r, Slot)}
        bad = next(((j, r) for j, r in zip(launches, res) if not isinstance(r, Slot)), None)
        if bad is None:
            return slots
        await asyncio.gather(*(sl.handle.stop() for sl in slots.values()), return_exceptions=True)
        j, e = bad
        if not wrap or not isinstance(e, Exception):   # (a cancellation is not a failed launch)
            raise e
        raise ReshapeError(f"{what}: stage {j} failed to start: {type(e).__name__}: {e}") from e

    async def start(self, shape: PipelineShape) -> RouterActor:
        """Launch the stages of `shape` and the router; returns the router behaviour."""
        slots = await self._launch_all({i: self._launch(st.start, st.end, st.device, shape.epoch, i)
                                        for i, st in enumerate(shape.stages)}, "start", wrap=False)
        self.slots = [slots[i] for i in range(len(shape.stages))]
        self.shape = self._running_shape(shape.epoch)
        cfg, s = self.spec.config, self.settings
        eos_ids = cfg.eos_token_ids   # the oracle's stop ids (ModelConfig.eos_token_ids), no others
        cache = CacheManager(s.block_size, self._pools(shape))
        self.router = RouterActor(cache, self._pipeline(shape.epoch), max_context=cfg.max_position_embeddings,
                                  eos_ids=eos_ids, max_batch_tokens=s.max_batch_tokens,
                                  max_batch_seqs=s.max_batch_seqs, max_inflight=s.max_inflight or None,
                                  cpu_threads=s.torch_threads,
                                  # a micro-batch's residual [tokens, hidden]: what a step's ids share the limit with
                                  residual_bytes=s.max_batch_tokens * cfg.hidden_size * DTYPES[s.dtype].itemsize)
        self.router.on_stage_death = self.recovery.on_stage_death
        if hasattr(self.system, "death_listeners"):
            self.system.death_listeners.append(self.recovery.actor_died)
        self.router_actor = await self.system.spawn(self.router, "router")
        self.router_actor.check_sender = self._router_sender_check
        if self.weight_cache is not None:
            from flexpipe.runtime.weight_cache import WeightCacheActor

            self.cache_actor = await self.system.spawn(WeightCacheActor(self.weight_cache, self.model_key, cfg),
                                                       "weights")
        await self._configure(shape.epoch)
        return self.router

    def _pipeline(self, epoch: int) -> Pipeline:
        return Pipeline(epoch, [sl.ref for sl in self.slots], [(sl.start, sl.end) for sl in self.slots],
                        [sl.device for sl in self.slots])

    async def _configure(self, epoch: int) -> None:
        rr = self.router_actor.ref
        await asyncio.gather(*(self.system.ask(sl.ref, Configure(epoch, i, self._next_ref(i), rr, self._upstream(i)))
                               for i, sl in enumerate(self.slots)))

    def _next_ref(self, i: int, slots: list[Slot] | None = None) -> ActorRef | None:
        slots = self.slots if slots is None else slots
        return slots[i + 1].ref if i + 1 < len(slots) else None

    def _router_sender_check(self, sender: ActorRef | None, msg: Any) -> str | None:
        """The router's roles (runtime/actor.py check_sender): outputs of its epoch come from the last
        stage, step failures from a stage of the pipeline; other epochs are dropped as stale anyway."""
        if type(msg) not in (StepOutput, StepFailed) or msg.epoch != self.router.epoch:
            return None
        refs = self.router.pipeline.refs
        if sender in (refs[-1:] if type(msg) is StepOutput else refs):
            return None
        return f"{type(msg).__name__} of epoch {msg.epoch} from {sender}, which is not " + \
            ("its last stage" if type(msg) is StepOutput else "one of its stages")

    def _upstream(self, i: int, slots: list[Slot] | None = None) -> ActorRef:
        """Who sends stage i its steps: the router, or the stage before it."""
        slots = self.slots if slots is None else slots
        return slots[i - 1].ref if i > 0 else self.router_actor.ref

    async def aclose(self) -> None:
        """Stop the router and every stage. Requests still running end with "error", and later ones
        (and reshapes) are refused with PipelineDown, rather than waiting for a pipeline that is gone."""
        self.closed = True
        if self.router is not None and self.router.down is None:
            self.router.fail_all("the pipeline is closed")
        if self.router_actor is not None:
            await self.router_actor.aclose("pipeline closed")
        if self.cache_actor is not None:
            await self.cache_actor.aclose("pipeline closed")
        await asyncio.gather(*(sl.handle.stop() for sl in self.slots), return_exceptions=True)

    def stage_info(self) -> list[dict]:
        return [{"index": i, "start": sl.start, "end": sl.end, "device": sl.device, "pid": sl.handle.pid,
                 "actor": str(sl.ref)} for i, sl in enumerate(self.slots)]

    async def stage_status(self) -> list[dict]:
        """Each stage's own status (asks every stage)."""
        return list(await asyncio.gather(*(self.system.ask(sl.ref, StageStatus()) for sl in self.slots)))

    async def step_logs(self) -> list[list]:
        """Each stage's log of its last steps, in pipeline order: [step, handler start, result ready]."""
        return list(await asyncio.gather(*(self.system.ask(sl.ref, StepLog()) for sl in self.slots)))

    # ---- reshape ------------------------------------------------------------------------------------
    def _match(self, shape: PipelineShape) -> list[int | None]:
        """For each new stage, the index of the running slot it reuses (largest overlap, same device)."""
        pairs = []
        for j, st in enumerate(shape.stages):
            for i, sl in enumerate(self.slots):
                ov = min(st.end, sl.end) - max(st.start, sl.start)
                if ov > 0 and st.device == sl.device:
                    exact = st.start == sl.start and st.end == sl.end
                    pairs.append((exact, ov, -abs(i - j), j, i))
        pairs.sort(reverse=True)
        match: list[int | None] = [None] * len(shape.stages)
        used: set[int] = set()
        for _, _, _, j, i in pairs:
            if match[j] is None and i not in used:
                match[j] = i
                used.add(i)
        return match

    async def reshape(self, shape: PipelineShape, *, weights_from: str = "auto") -> ReshapeStats:
        """Move the running pipeline to `shape` without losing or changing any request."""
        check_weights_from(weights_from)
        async with self._lock:
            if self.closed:
                raise PipelineDown("the pipeline is closed: launch a new one")
            if not self.slots:  # scaled to zero: nothing to reshape, start `shape`
                return await self._wake(shape)
            try:
                return await self._reshape(shape, weights_from)
            finally:
                self.recovery.involved = set()

    async def _reshape(self, shape: PipelineShape, weights_from: str) -> ReshapeStats:
        cfg = self.spec.config
        shape.validate(cfg.num_units)
        router = self.router
        old_epoch = self.shape.epoch
        shape = shape.with_epoch(old_epoch + 1)
        st = ReshapeStats("reshape", old_epoch, shape.epoch, self.shape.boundaries, shape.boundaries,
                          weights_from=weights_from)
        t0 = time.perf_counter()
        match = self._match(shape)
        new_slots: list[Slot | None] = [self.slots[i] if i is not None else None for i in match]
        started: list[Slot] = []
        paused = False
        switching = False   # Activate sent: from here a failure cannot go back to the old epoch
        tier = self._tier(shape, new_slots, weights_from)
        peer = tier != "source"  # cache and peer tiers both send tensors to stages that start empty
        st.weights_from = tier
        try:
            # 2. prepare: new processes, and missing units in kept ones
            launches = {j: self._launch(s.start, s.end, s.device, old_epoch, j, load=not peer)
                        for j, s in enumerate(shape.stages) if new_slots[j] is None}
            if launches:
                for j, r in (await self._launch_all(launches, "reshape")).items():
                    new_slots[j] = r
                    started.append(r)
                    if not peer:
                        st.weight_bytes += self._param_bytes_list(range(r.start, r.end))
            # the stages that may send weights and KV to one another during this reshape
            peers = [sl.ref for sl in {id(sl): sl for sl in (*self.slots, *new_slots)}.values()]
            self.recovery.involved = set(peers)
            # (a stage that died by now, or dies meanwhile, would answer no ask: abort at once instead)
            await self.recovery.unless_a_stage_dies(asyncio.gather(
                *(self.system.ask(sl.ref, ExpectPeers(shape.epoch, peers)) for sl in new_slots)))
            for j, s in enumerate(shape.stages):
                sl = new_slots[j]
                if sl in started:
                    missing = list(range(s.start, s.end)) if peer else []
                else:
                    missing = [u for u in range(s.start, s.end) if not sl.start <= u < sl.end]
                if not missing:
                    continue
                tw = time.perf_counter()
                if peer:
                    st.weight_bytes += await self.recovery.unless_a_stage_dies(
                        self._deliver(missing, sl, from_cache=tier == "cache"))
                else:
                    st.weight_bytes += self._param_bytes_list(missing)
                await self.recovery.unless_a_stage_dies(
                    self.system.ask(sl.ref, PrepareUnits(s.start, s.end, from_peer=peer), timeout=600))
                st.weights_s += time.perf_counter() - tw
            await self._evict_leaving(shape, new_slots)
            st.prepare_s = time.perf_counter() - t0

            # 3. pre-copy rounds while the old epoch serves
            moves = self._moves(shape, new_slots)
            copied: dict[str, tuple[int, int, Any]] = {}  # seq -> (tokens copied, preemptions, record) then
            for rnd in range(self.max_precopy_rounds):
                left = await self.recovery.unless_a_stage_dies(self._copy_round(moves, copied, st, delta=False))
                st.precopy_rounds = rnd + 1
                if left <= self.delta_tokens_target:
                    break

            # 4. quiesce, 5. delta, 6. switch
            tq = time.perf_counter()
            paused = True
            await router.quiesce()
            await self.recovery.unless_a_stage_dies(self._copy_round(moves, copied, st, delta=True))
            live = set(router.sched.requests)
            gone = [s for s in copied if s not in live]
            rr = self.router_actor.ref
            slots = [s for s in new_slots]
            switching = True
            await self.recovery.unless_a_stage_dies(asyncio.gather(*(
                self.system.ask(sl.ref, Activate(shape.epoch, j, s.start, s.end, self._next_ref(j, slots), rr,
                                                 self._upstream(j, slots)))
                for j, (sl, s) in enumerate(zip(slots, shape.stages)))))
            if gone:
                await asyncio.gather(*(self.system.ask(sl.ref, FreeSeqs(shape.epoch, gone)) for sl in slots))
            retired = [sl for sl in self.slots if sl not in slots]
            for sl, s in zip(slots, shape.stages):
                sl.start, sl.end = s.start, s.end
            cache = CacheManager(self.settings.block_size, self._pools(shape))
            cache.seq_blocks = dict(router.cache.seq_blocks)
            cache.seq_tokens = dict(router.cache.seq_tokens)
            cache.rebuild(cache.pools)
            self.slots = slots
            self.shape = self._running_shape(shape.epoch)
            router.switch(self._pipeline(shape.epoch), cache)
            router.resume()
            paused = False
            st.pause_s = time.perf_counter() - tq
            st.requests_running = len(router.sched.running)
        except BaseException as e:
            # A cancellation too (asyncio.wait_for's timeout, the autoscaler closing): it is raised again
            # once the old epoch serves again (or the new shape is rebuilt), never with the router paused.
            cancelled = not isinstance(e, Exception)
            st.ok, st.error = False, "cancelled" if cancelled else f"{type(e).__name__}: {e}"
            if switching:
                # Some stages may serve the new epoch (their old units dropped) and others the old one:
                # neither shape can resume as it is.  Go forward instead: the new shape from fresh
                # processes, every request recomputed from its record (as a recovery does).
                st.total_s = time.perf_counter() - t0
                self.history.append(st)
                log.error("reshape to %s failed while switching (%s): rebuilding it", shape.boundaries, st.error)
                involved = list({id(sl): sl for sl in (*self.slots, *(sl for sl in new_slots if sl))}.values())
                try:
                    # (one epoch past the new one: no message of the half-switched stages is taken)
                    await self.recovery.rebuild_or_down(
                        shape.with_epoch(shape.epoch + 1), involved,
                        ReshapeStats("rebuild", old_epoch, 0, self.shape.boundaries, shape.boundaries, error=st.error),
                        time.perf_counter(), f"a reshape failed while switching ({st.error}) and the rebuild")
                except Exception as e2:  # noqa: BLE001 - nothing left to serve with (the pipeline is down)
                    if cancelled:
                        raise e from e2
                    raise ReshapeError(f"reshape failed while switching ({st.error}); the rebuild failed too: "
                                       f"{type(e2).__name__}: {e2}") from e
                if cancelled:
                    raise
                raise ReshapeError(f"reshape failed while switching ({st.error}); the pipeline was rebuilt as "
                                   f"{list(shape.boundaries)} and its requests recomputed") from e
            try:
                # (every kept stage: each took ExpectPeers, and AbortPrepare also ends its reshape's bookkeeping)
                await to_the_end(self._abort([sl for sl in new_slots if sl is not None], started, old_epoch))
            finally:
                if paused:
                    router.resume()
                st.total_s = time.perf_counter() - t0
                self.history.append(st)
                log.warning("reshape to %s aborted: %s", shape.boundaries, st.error)
            if cancelled:
                raise
            raise e if isinstance(e, ReshapeError) else ReshapeError(f"reshape aborted, epoch {old_epoch} keeps "
                                                                     f"serving: {st.error}") from e
        st.stages_kept = sum(1 for m in match if m is not None)
        st.stages_started = len(started)
        st.stages_retired = len(retired)
        try:
            await to_the_end(asyncio.gather(*(sl.handle.stop() for sl in retired), return_exceptions=True))
        finally:
            st.total_s = time.perf_counter() - t0
            self.history.append(st)
        log.info("reshape %s -> %s: pause %.1f ms, total %.2f s, KV %d B, weights %d B", st.from_boundaries,
                 st.to_boundaries, st.pause_s * 1e3, st.total_s, st.kv_bytes, st.weight_bytes)
        return st

    # ---- weight tiers ----------------------------------------------------------------------------------
    @property
    def model_key(self) -> str:
        """The weight cache's key for this model: its name and where its weights come from."""
        src = self.spec.source
        return f"{self.spec.name}|{src.get('kind')}|{src.get('path', src.get('seed', ''))}|{self.settings.dtype}"

    def _tier(self, shape: PipelineShape, new_slots: list[Slot | None], weights_from: str) -> str:
        """Where the units a reshape loads come from: "cache", "peer" or "source"."""
        if weights_from == "cache" and self.weight_cache is None:
            raise ReshapeError("weights_from='cache' needs a weight cache (launch with autoscale= or a cache)")
        if weights_from != "auto":
            return weights_from
        need = [u for j, s in enumerate(shape.stages) for u in range(s.start, s.end)
                if new_slots[j] is None or not new_slots[j].start <= u < new_slots[j].end]
        if need and self.weight_cache is not None and self.weight_cache.holds(self.model_key, need):
            return "cache"
        return "peer" if self.spec.source.get("kind") == "checkpoint" else "source"

    async def _deliver(self, units: list[int], dest: Slot, *, from_cache: bool) -> int:
        """Send `units` to `dest`: cached ones from RAM (with from_cache), the rest from running peers."""
        total = 0
        if from_cache:
            hit = [u for u in units if self.weight_cache.holds(self.model_key, [u])]
            if hit:
                # in messages under max_message_bytes, as a stage sends its own (stage.send_unit_tensors)
                total += await send_unit_tensors(functools.partial(self.system.ask, timeout=600), dest.ref,
                                                 self.weight_cache.take(self.model_key, hit),
                                                 limit_of(getattr(self.system, "settings", None)))
            units = [u for u in units if u not in hit]
        if units:
            total += await self._peer_copy(units, dest)
        return total

    async def _evict_leaving(self, shape: PipelineShape | None, new_slots: list[Slot | None]) -> None:
        """Send the units that leave a running stage (not already cached) to the weight cache.

        `shape` None: every unit leaves (scale to zero)."""
        if self.cache_actor is None:
            return
        key = self.model_key
        for sl in self.slots:
            keep = (0, 0)
            if shape is not None and sl in new_slots:
                s = shape.stages[new_slots.index(sl)]
                keep = (s.start, s.end)
            leaving = [u for u in range(sl.start, sl.end) if not keep[0] <= u < keep[1]]
            self.weight_cache.touch(key, leaving)
            fresh = [u for u in leaving if not self.weight_cache.holds(key, [u])]
            if fresh:
                try:
                    await self.system.ask(sl.ref, SendUnits(fresh, self.cache_actor.ref), timeout=600)
                except ActorError as e:  # the cache is an optimisation: the reshape goes on without it
                    log.warning("units %s of %s not cached: %s", fresh, sl.ref, e)

    @property
    def busy(self) -> bool:
        """A reshape, restart, recovery, scale to zero or wake is in progress (the shape is in flux)."""
        return self._lock.locked()

    def shape_status(self) -> dict:
        """The shape as status() shows it; "running": False while no stage runs (scaled to zero, or down
        after a failed restart): the shape is then the one a wake or recovery starts, not one that serves."""
        return {**self.shape.to_dict(), "running": bool(self.slots)}

    # ---- scale to zero and back ------------------------------------------------------------------------
    @property
    def suspended(self) -> bool:
        """Scaled to zero: no stage runs; requests wait in the router until `wake`.  Not a pipeline that
        a failed restart or recovery left with no stage: that one is down (router.down) and refuses them."""
        return not self.slots and (self.router is None or self.router.down is None)

    async def suspend(self) -> ReshapeStats | None:
        """Scale to zero: retire every stage (its units to the weight cache) and hold new requests.

        Only when the router has no request at all (none waiting, running or in flight), before and
        after the eviction; returns None and keeps serving otherwise.  The router stays quiesced until
        `wake` (or `reshape`).
        """
        async with self._lock:
            router = self.router
            if not self.slots or router.sched.requests:
                return None
            old = self.shape
            st = ReshapeStats("scale_to_zero", old.epoch, old.epoch + 1, old.boundaries, [])
            t0 = time.perf_counter()
            try:
                await router.quiesce()
                if router.sched.requests:  # arrived meanwhile: keep serving
                    router.resume()
                    return None
                await self._evict_leaving(None, [])
                # the eviction takes a while (every unit to the cache): a request that arrived meanwhile
                # would otherwise wait for a cold start that nothing has asked for yet
                if router.sched.requests:
                    router.resume()
                    return None
            except BaseException:  # a failure or a cancellation before the switch: keep serving
                router.resume()
                raise
            st.weights_from = "cache" if self.cache_actor is not None else "none"
            retired, self.slots = self.slots, []
            self.shape = old.with_epoch(old.epoch + 1)
            router.switch(Pipeline(self.shape.epoch, [], []))  # stays paused: requests wait for wake()
            st.stages_retired = len(retired)
            try:
                await to_the_end(asyncio.gather(*(sl.handle.stop() for sl in retired), return_exceptions=True))
            finally:
                st.total_s = time.perf_counter() - t0
                self.history.append(st)
            log.info("scaled to zero: %d stages retired in %.2f s", len(retired), st.total_s)
            return st

    async def wake(self, shape: PipelineShape) -> ReshapeStats:
        """Start `shape` after a scale to zero, with weights from the cache where it holds them all."""
        async with self._lock:
            if self.slots:
                raise ReshapeError("wake() needs a pipeline scaled to zero; use reshape() on a running one")
            return await self._wake(shape)

    async def _wake(self, shape: PipelineShape) -> ReshapeStats:
        shape.validate(self.spec.config.num_units)
        router = self.router
        old = self.shape
        shape = shape.with_epoch(old.epoch + 1)
        st = ReshapeStats("cold_start", old.epoch, shape.epoch, [], shape.boundaries)
        t0 = time.perf_counter()
        units = range(self.spec.config.num_units)
        cached = self.weight_cache is not None and self.weight_cache.holds(self.model_key, units)
        st.weights_from = "cache" if cached else "source"
        slots: list[Slot] = []
        try:
            launched = await self._launch_all({j: self._launch(s.start, s.end, s.device, shape.epoch, j,
                                                               load=not cached)
                                               for j, s in enumerate(shape.stages)}, "cold start")
            slots = [launched[j] for j in range(len(shape.stages))]
            st.prepare_s = time.perf_counter() - t0
            tw = time.perf_counter()
            if cached:
                for sl, s in zip(slots, shape.stages):
                    st.weight_bytes += await self._deliver(list(range(s.start, s.end)), sl, from_cache=True)
                    await self.system.ask(sl.ref, PrepareUnits(s.start, s.end, from_peer=True), timeout=600)
            else:
                st.weight_bytes = self._param_bytes_list(units)
            st.weights_s = time.perf_counter() - tw
            rr = self.router_actor.ref
            await asyncio.gather(*(self.system.ask(sl.ref, Activate(shape.epoch, j, s.start, s.end,
                                                                   self._next_ref(j, slots), rr,
                                                                   self._upstream(j, slots)))
                                   for j, (sl, s) in enumerate(zip(slots, shape.stages))))
        except BaseException as e:   # a cancellation too: no stage of the cold start runs on
            await to_the_end(asyncio.gather(*(sl.handle.stop() for sl in slots), return_exceptions=True))
            st.ok = False
            st.error = f"{type(e).__name__}: {e}" if isinstance(e, Exception) else "cancelled"
            st.total_s = time.perf_counter() - t0
            self.history.append(st)
            if not isinstance(e, Exception):
                raise
            raise e if isinstance(e, ReshapeError) else ReshapeError(f"cold start failed, still at zero: "
                                                                     f"{st.error}") from e
        self.slots = slots
        self.shape = self._running_shape(shape.epoch)
        router.switch(self._pipeline(shape.epoch), CacheManager(self.settings.block_size, self._pools(shape)))
        router.down = None   # (a pipeline left with no stage by a failed restart: it serves again)
        router.resume()
        st.stages_started = len(slots)
        st.total_s = st.pause_s = time.perf_counter() - t0  # requests waiting meanwhile saw all of it
        self.history.append(st)
        log.info("cold start of %s: %.2f s, weights from %s", shape.boundaries, st.total_s, st.weights_from)
        return st

    def _param_bytes_list(self, units: Any) -> int:
        from flexpipe.model.units import unit_costs

        costs = unit_costs(self.spec.config, dtype_bytes={"float32": 4}.get(self.settings.dtype, 2))
        return sum(costs[u].param_bytes for u in units)

    async def _peer_copy(self, units: list[int], dest: Slot) -> int:
        """Have the running stages that hold `units` send their tensors to `dest`."""
        total = 0
        for sl in self.slots:
            have = [u for u in units if sl.start <= u < sl.end]
            if have and sl is not dest:
                total += await self.system.ask(sl.ref, SendUnits(have, dest.ref), timeout=600)
        return total

    def _moves(self, shape: PipelineShape, new_slots: list[Slot]) -> dict[tuple[int, int], list[int]]:
        """(old slot index, new slot index) -> attention units whose KV moves between them."""
        cfg = self.spec.config
        moves: dict[tuple[int, int], list[int]] = {}
        for u in range(cfg.num_units):
            if cfg.unit_kind(u) != "attention":
                continue
            i = next(k for k, sl in enumerate(self.slots) if sl.start <= u < sl.end)
            j = shape.stage_of(u)
            if new_slots[j] is not self.slots[i]:
                moves.setdefault((i, j), []).append(u)
        self._new_slots = new_slots
        self._next_epoch = shape.epoch
        self._freed_early: set[str] = set()
        return moves

    async def _copy_round(self, moves: dict, copied: dict, st: ReshapeStats, delta: bool) -> int:
        """One copy round, redone for the requests still live when one finished while it ran.

        A request that finishes after its items were listed may have its KV freed on the old owner
        (the frees ride on the next step) before the ExportKV arrives, which fails that export.
        Finished requests need no copy: the round is redone without them; they stay listed in
        `copied` so that whatever did reach a new owner is freed at the switch.

        A live request first listed in the failed attempt is copied again from token 0, and a new
        owner may refuse that copy: a GPU exporter that reserved blocks there for it and then found
        it freed on its own side (preempted) gave them back with a FreeSeqs that is not settled, so
        the new owner counts it as dropped for the rest of the reshape.  It is listed as copied by
        no known record (`_UNKNOWN_COPY`), so that the redo frees it there settled first (every
        export of the failed attempt has settled by then).
        """
        for attempt in range(8):
            before = dict(copied)
            try:
                return await self._copy_round_once(moves, copied, st, delta)
            except ActorError:
                live = self.router.sched.requests
                changed = [rid for rid, v in copied.items() if v is not before.get(rid)]
                gone = {rid: copied[rid] for rid in changed if rid not in live}
                if not gone or attempt == 7:
                    raise
                first = [rid for rid in changed if rid in live and rid not in before]
                copied.clear()
                copied.update(before)
                copied.update(gone)
                copied.update(dict.fromkeys(first, _UNKNOWN_COPY))
        raise AssertionError("unreachable")

    async def _copy_round_once(self, moves: dict, copied: dict, st: ReshapeStats, delta: bool) -> int:
        """Copy [copied, computed) of every request for every move; returns tokens still uncopied after.

        First the new stage processes drop the KV they were sent of requests that have finished or
        been preempted since: with KV nearly full the old epoch reuses those blocks at once, and the
        stale copies would otherwise hold them on the new owners until the switch, which then runs
        out.  (A kept stage needs no such help: the router's frees reach it with the old epoch's.)
        These frees are settled (FreeSeqs): the copies of the last round have all been imported, so
        none of them is on its way, and the new stage must take them again when copied from 0.

        `copied` maps a sequence id to (tokens copied, preemptions then, the request record then): an
        id can be taken again by a new request once the one it named has ended (the router checks
        only running ids), and what was copied of the old one is no part of the new one's KV.
        """
        sched = self.router.sched
        stale, finished = [], []
        for rid, entry in copied.items():
            req = sched.requests.get(rid)
            if req is None:
                if rid not in self._freed_early:
                    finished.append(rid)
            elif self._copied_upto(entry, req) == 0:
                stale.append(rid)
        fresh = {j for (_, j) in moves if self._new_slots[j] not in self.slots}
        if (stale or finished) and fresh:
            await asyncio.gather(*(self.system.ask(self._new_slots[j].ref,
                                                   FreeSeqs(self._next_epoch, stale + finished, settled=True))
                                   for j in fresh))
        self._freed_early.update(finished)
        items: list[tuple[str, int, int]] = []
        for rid, req in list(sched.requests.items()):
            if req.computed <= 0:
                continue
            t_done = self._copied_upto(copied.get(rid), req)
            if req.computed > t_done:
                items.append((rid, t_done, req.computed))
                copied[rid] = (req.computed, req.preemptions, req)
                self._freed_early.discard(rid)   # (a new request under the id of one that finished)
        if not items:
            return 0
        reqs = []
        for (i, j), units in moves.items():
            msg = ExportKV([[rid, units, a, b] for rid, a, b in items], self._new_slots[j].ref, strict=delta)
            reqs.append(self.system.ask(self.slots[i].ref, msg, timeout=600))
        res = await asyncio.gather(*reqs, return_exceptions=True)  # all settle before a retry
        err = next((r for r in res if isinstance(r, BaseException)), None)
        if err is not None:
            raise err
        nbytes = sum(res)
        st.kv_bytes += nbytes
        st.moved_kv_tokens += sum(b - a for _, a, b in items)
        if delta:
            st.kv_bytes_delta += nbytes
        # tokens written since this round started (what the next round or the delta must copy)
        return sum(r.computed - self._copied_upto(copied.get(rid), r) for rid, r in sched.requests.items())

    @staticmethod
    def _copied_upto(entry: tuple | None, req: Any) -> int:
        """Tokens of `req` whose KV the new owners hold from an earlier round (its `copied` entry): 0
        for none, for another request that had the same id, or when preempted since (its KV was
        recomputed: copy it again)."""
        if entry is None:
            return 0
        t_done, gen, rec = entry
        if rec is not req or gen != req.preemptions or t_done > req.computed:
            return 0
        return t_done

    async def _abort(self, kept: list[Slot], started: list[Slot], epoch: int) -> None:
        """Undo a reshape's prepare: kept stages drop what they prepared, started ones stop.

        A stage known dead is not asked: it would answer nothing, and each ask waited its 30 s with
        the controller's lock held, which the recovery of that death waits for (every request
        stalled meanwhile).  The recovery replaces it."""
        async def drop(sl: Slot) -> None:
            try:
                await self.system.ask(sl.ref, AbortPrepare(epoch), timeout=30)
            except ActorError as e:
                log.warning("abort: %s did not drop its prepared units: %s", sl.ref, e)

        await asyncio.gather(*(drop(sl) for sl in kept if sl not in started and not self.recovery.is_dead(sl.ref)))
        await asyncio.gather(*(sl.handle.stop() for sl in started), return_exceptions=True)

    # ---- stage failure and restarts (runtime/recovery.py) -----------------------------------------------
    async def restart(self, shape: PipelineShape, *, drain: bool) -> ReshapeStats:
        """Rebuild the pipeline from scratch (Recovery.restart): the baselines of benchmarks/bench_reshape.py."""
        return await self.recovery.restart(shape, drain=drain)


__all__ = ["Controller", "ReshapeStats", "Slot", "blocks_for"]

"""RouterActor: admission, the request records, continuous batching, and token streams.

The router owns the scheduler (runtime/scheduler.py) and the KV ledger (runtime/cache.py) and
launches micro-batches into stage 0 of the current epoch.  One pump task is the only sender of
steps, so steps leave in order; outputs come back as StepOutput messages from the last stage.
Outputs of another epoch are dropped and counted (epoch fencing).  The KV frees of requests that
ended travel on steps too: on the next one, or, when the pipeline goes idle or they are more than a
step's message holds beside its batch, on steps of frees only (no sequences) that every stage applies
and passes on, and that return like any other (runtime/scheduler.py bounds them by max_message_bytes).

The reshape controller (runtime/controller.py) acts through `quiesce()` / `resume()` and swaps the
pipeline (stage refs, ledger pools, epoch) while nothing is in flight.  `listeners` see arrivals,
finishes and steps (the autoscaler's traffic analyzer is fed from them).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from flexpipe.errors import ActorClosed, ActorError, PeerDeadError, PipelineDown, RequestError
from flexpipe.runtime.actor import ActorContext, handles
from flexpipe.runtime.cache import CacheManager
from flexpipe.runtime.chunks import limit_of
from flexpipe.runtime.messages import ActorRef, Terminated, message
from flexpipe.runtime.scheduler import Request, Scheduler, TokenEvent
from flexpipe.runtime.stage import StepFailed, StepInput, StepOutput

log = logging.getLogger("flexpipe.router")
MAX_ID_CHARS = 128   # a request id a client picks: it rides on every step of the request
# stalled frees (Scheduler.frees_stalled) are tried again after this wait, doubled up to the max each time
FREES_RETRY_S, FREES_RETRY_MAX_S = 0.1, 10.0


def _good_id(rid: Any) -> bool:
    if not isinstance(rid, str) or not 1 <= len(rid) <= MAX_ID_CHARS:
        return False
    try:
        rid.encode()   # (a lone surrogate cannot go on the wire)
    except UnicodeEncodeError:
        return False
    return True


@dataclass(slots=True)
class Pipeline:
    """The stages of one epoch, in order."""

    epoch: int
    refs: list[ActorRef]
    ranges: list[tuple[int, int]]
    devices: list[str] = field(default_factory=list)  # placement label per stage ("cpu", "cuda:0", ...)


def parallel_slots(devices: Sequence[str], cpu_threads: int = 1) -> int:
    """How many stages of a pipeline can compute at the same time.

    A device runs one stage's work at a time (a CUDA device without MPS, or a worker daemon's
    device "node/i"), except this host's CPU ("cpu", "cpu:N"), whose stages share the cores this
    process may use, `cpu_threads` torch threads each.  Keeping more micro-batches in flight than
    this only splits the batch into smaller, less efficient pieces that wait for a core: on a
    2-core host, 4 CPU stages run best with 2 micro-batches of half the streams each.
    """
    local_cpu = [d for d in devices if d == "cpu" or d.startswith("cpu:")]
    slots = len({d for d in devices if d not in local_cpu})
    if local_cpu:
        slots += min(len(local_cpu), cpu_stage_slots(cpu_threads))
    return max(1, slots)


def cpu_stage_slots(cpu_threads: int = 1) -> int:
    """CPU stages of `cpu_threads` torch threads each that this host can run at once: the cores this
    process may use (its CPU affinity, which a container or taskset narrows) over the threads."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, cpu_threads))


@message(120)
class RouterStatus:
    """Ask the router for its status dict."""


@dataclass(slots=True)
class RequestStream:
    """Where a request's events go: an asyncio queue read by the client.

    It holds its id (`RouterActor.streams`) until its request finishes or is cancelled: then the id can
    name a new request at once, even while a step of the old one is still in flight.  The router keeps
    it by its record's key until that record ends (when such a step returns), to count the finish."""

    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    request: Any = None  # its scheduler record (request.id: its key), kept for listeners after the scheduler drops it
    rid: str = ""   # the request id its client knows
    text: Any = None   # the client's StopTextStream (see RouterActor.submit); None: not decoded here


def check_prompt_length(tokens: int, max_context: int) -> None:
    """RequestError for an empty prompt or one the context cannot hold (with a token to spare)."""
    if not tokens:
        raise RequestError("the prompt is empty: give at least one token")
    if tokens >= max_context:
        raise RequestError(f"the prompt has {tokens} tokens but the context holds {max_context}: "
                           f"shorten it to at most {max_context - 1}")


class RouterActor:
    """Behaviour of the router: lives in the client's process (embedded) or in the router daemon."""

    def __init__(self, cache: CacheManager, pipeline: Pipeline, *, max_context: int, eos_ids: tuple[int, ...] = (),
                 max_batch_tokens: int = 256, max_inflight: int | None = None, max_batch_seqs: int = 256,
                 cpu_threads: int = 1, residual_bytes: int | None = None):
        self.pipeline = pipeline
        self.max_context = max_context
        self.eos_ids = tuple(eos_ids)
        self._fixed_inflight = max_inflight
        self.cpu_threads = cpu_threads
        self.sched = Scheduler(cache, max_batch_tokens=max_batch_tokens,
                               max_inflight=self._inflight_for(pipeline), max_batch_seqs=max_batch_seqs,
                               residual_bytes=residual_bytes)
        self.streams: dict[str, RequestStream] = {}   # by request id: the requests not ended yet
        self._keyed: dict[str, RequestStream] = {}   # by scheduler key: every record the scheduler holds
        self._keys = itertools.count(1)
        self.ctx: ActorContext | None = None
        self._wake = asyncio.Event()
        self._paused = False
        self._drained = asyncio.Event()
        self._drained.set()
        self._pump_task: asyncio.Task | None = None
        self._death_seen = False
        self._down: str | None = None   # why the pipeline can serve no more (fail_all), else None
        self._up = asyncio.Event()   # set while it is not down
        self._up.set()
        # what a refusal while down tells the client to do (the router daemon's recovers by itself)
        self.down_hint = "restart it"
        self.on_stage_death = None  # set by the controller: async fn(ref, reason)
        # fn(event, now, request) with now on the scheduler's clock: "arrival" (the record), "finish"
        # (the record, `finished` set), "step" (None; after each step's output); called inline: keep it O(1)
        self.listeners: list[Any] = []
        self.stats = collections.Counter()
        self.step_times: collections.deque = collections.deque(maxlen=1024)
        # (step, launched, output received) of the last steps, perf_counter seconds: with the stages'
        # step logs (StepLog), where a step's time went hop by hop (bench_pipeline.py's timeline)
        self.step_log: collections.deque = collections.deque(maxlen=4096)
        self._sent_at: dict[int, float] = {}

    @property
    def epoch(self) -> int:
        return self.pipeline.epoch

    @property
    def cache(self) -> CacheManager:
        return self.sched.cache

    async def on_start(self, ctx: ActorContext) -> None:
        self.ctx = ctx
        self.sched.max_message_bytes = limit_of(getattr(ctx, "settings", None))   # (its steps' frees fit it)
        for ref in self.pipeline.refs:
            ctx.watch(ref)
        self._pump_task = asyncio.get_running_loop().create_task(self._pump())

    async def on_stop(self, ctx: ActorContext) -> None:
        if self._pump_task is not None:
            self._pump_task.cancel()
        for st in list(self.streams.values()):
            ev = TokenEvent(st.request.id, None, -1, "error")
            if st.text is not None and self._decode(st, ev):
                ev.finish_reason = "stop"
            st.queue.put_nowait(ev)

    # ---- client side ------------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: Any, request_id: str | None = None,
               text: Any = None) -> tuple[str, asyncio.Queue]:
        """Queue a validated request; returns its id and the queue its TokenEvents arrive on.

        `text`: the client's StopTextStream (feed/flush), when the client wants the text: each event
        carries what its token adds (TokenEvent.text), and the request ends, as "stop", at the token
        whose text reaches a stop string.  Found here rather than by the client, the stop is counted
        as one (stats, finish listeners) also when that token was the last one max_tokens allowed, and
        the request leaves before its next step is launched."""
        if self.down is not None:
            raise PipelineDown(f"the pipeline is down: {self.down}; {self.down_hint}")
        check_prompt_length(len(prompt), self.max_context)
        self.cache.check_fits_ever(min(len(prompt) + params.max_tokens, self.max_context))
        if request_id is not None and not _good_id(request_id):
            raise RequestError(f"request_id must be 1 to {MAX_ID_CHARS} characters of valid text "
                               f"(got {str(request_id)[:40]!a})")
        rid = request_id or uuid.uuid4().hex[:16]
        if rid in self.streams:
            raise RequestError(f"request id {rid!r} is already in use: wait until it ends, or give another id")
        # The scheduler's key (the sequence id the stages hold its KV under) is the id, unless an
        # earlier request of this id ended while its step was in flight and the scheduler still holds
        # it: that step's output, and the frees of its KV, must not reach the new request.
        key = rid
        while key in self.sched.requests or key in self._keyed:
            key = f"{rid}#{next(self._keys)}"
        stop = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(self.eos_ids))
        req = Request(key, list(prompt), params, stop, self.max_context)
        self.sched.add(req)
        st = self.streams[rid] = self._keyed[key] = RequestStream(request=req, rid=rid, text=text)
        self.stats["requests"] += 1
        if self.listeners:
            self._notify("arrival", req)
        self._wake.set()
        return rid, st.queue

    def cancel(self, rid: str, reason: str = "cancelled", queue: asyncio.Queue | None = None) -> None:
        """End request `rid`; `reason`: see Scheduler.cancel.  Its id is free at once; its KV is freed
        now, or when its step in flight returns (its finish is counted then).

        `queue`: the one `submit` returned, from the client that ends its own request.  The cancel then
        ends that request only: a client that ends late (an iterator closed after its request
        finished) must not end a newer request that took the id meanwhile.  Its events are no longer
        decoded (nobody reads them)."""
        st = self.streams.get(rid)
        if st is None or (queue is not None and st.queue is not queue):
            return
        del self.streams[rid]
        if queue is not None:
            st.text = None
        self._emit(self.sched.cancel(st.request.id, reason))
        self._wake.set()

    def _emit(self, events: list[TokenEvent]) -> None:
        for ev in events:
            st = self._keyed.get(ev.request_id)
            if st is None:
                continue
            hit = self._decode(st, ev) if st.text is not None else False
            if ev.finish_reason is None:
                self.stats["tokens"] += 1
                end = "stop" if hit else "error" if hit is None else None
                if end is not None:
                    ev.finish_reason = end   # the client's last event: this token, and the finish
                st.queue.put_nowait(ev)
                if end is not None:
                    self._end_here(st, end)
                continue
            del self._keyed[ev.request_id]
            if self.streams.get(st.rid) is st:
                del self.streams[st.rid]
            if hit:   # the text held back until the end reached a stop string
                st.request.finished = "stop"
            ev.finish_reason = st.request.finished or ev.finish_reason   # (see _end_here)
            st.queue.put_nowait(ev)
            self.stats[f"finish_{ev.finish_reason}"] += 1
            if self.listeners:
                self._notify("finish", st.request)

    def _decode(self, st: RequestStream, ev: TokenEvent) -> bool | None:
        """Put what `ev` adds to its request's text in ev.text: True when that reached a stop string,
        None when the decoder failed (logged; the request ends with "error", the others go on)."""
        try:
            ev.text, hit = st.text.feed(ev.token_id) if ev.token_id is not None else st.text.flush()
        except Exception:  # noqa: BLE001 - a decoder's bug must not lose the tokens of the step's others
            log.exception("router: cannot decode a token of request %r", st.rid)
            self.stats["decode_errors"] += 1
            st.text = None
            return None
        return bool(hit)

    def _end_here(self, st: RequestStream, reason: str) -> None:
        """End the request of `st` at the token just delivered (its text reached a stop string), now:
        before its next step.  When the scheduler has just finished it otherwise (max_tokens), its
        finish event comes next in this step's events and takes `reason` from the record."""
        st.text = None
        if self.streams.get(st.rid) is st:
            del self.streams[st.rid]
        if st.request.finished:
            st.request.finished = reason
        else:   # (not in flight: its output has just come back)
            self._emit(self.sched.cancel(st.request.id, reason))

    # ---- the pump: the only sender of steps ---------------------------------------------------------
    async def _pump(self) -> None:
        retry_in = FREES_RETRY_S
        while True:
            if self._paused or not self.sched.frees_stalled():
                retry_in = FREES_RETRY_S
                await self._wake.wait()
            else:   # nothing in flight will come back to try them again (scheduler.py's module doc)
                try:
                    await asyncio.wait_for(self._wake.wait(), retry_in)
                except asyncio.TimeoutError:
                    log.warning("router: frees a step waits for were refused again and again with nothing in "
                                "flight; trying them again (next wait %.1f s)", min(FREES_RETRY_MAX_S, 2 * retry_in))
                    self.sched.retry_frees()
                    retry_in = min(FREES_RETRY_MAX_S, 2 * retry_in)
            self._wake.clear()
            while not self._paused:
                mb = self.sched.schedule()
                if mb is None:
                    break
                await self._launch(mb)
            if not self.sched.inflight:
                self._drained.set()

    async def _launch(self, mb) -> None:
        sampling, tokens = [], []
        for c in mb.chunks:
            p = self.sched.requests[c.seq_id].params
            sampling.append([float(p.temperature), int(p.top_k), float(p.top_p), int(p.seed or 0)])
            tokens.extend(c.tokens)
        msg = StepInput(self.epoch, mb.step, [c.seq_id for c in mb.chunks], [c.start for c in mb.chunks],
                        [len(c.tokens) for c in mb.chunks], [c.sample for c in mb.chunks],
                        [c.out_index for c in mb.chunks], sampling, mb.frees)
        self._drained.clear()
        if mb.chunks:   # (a step of frees only is no step of the step times and logs)
            self._sent_at[mb.step] = time.perf_counter()
        try:
            await self.ctx.tell(self.pipeline.refs[0], msg, torch.tensor(tokens, dtype=torch.int64))
        except (PeerDeadError, ActorClosed) as e:  # stage 0 is gone: recovery will requeue everything
            log.warning("router: cannot launch step %d: %s", mb.step, e)
        except Exception as e:  # noqa: BLE001 - e.g. a field msgpack cannot encode, or MessageTooLarge: that
            # step's requests fail, and the pump (the only sender of steps) goes on with the others
            log.error("router: cannot launch step %d: %s: %s", mb.step, type(e).__name__, e)
            self.stats["step_failures"] += 1
            self._fail_step(mb.step)

    # ---- stage side -----------------------------------------------------------------------------------
    @handles(StepOutput)
    def step_output(self, ctx: ActorContext, msg: StepOutput) -> None:
        if msg.epoch != self.epoch or msg.step not in self.sched.inflight:
            self.stats["stale_outputs"] += 1
            return
        t0 = self._sent_at.pop(msg.step, None)
        if t0 is not None:
            now = time.perf_counter()
            self.step_times.append(now - t0)
            self.step_log.append((msg.step, t0, now))
        events = self.sched.on_output(msg.step, msg.seq_ids, msg.tokens)
        self._wake.set()   # first: the pump launches the next step before the clients read these tokens
        self._emit(events)
        self._after_step()

    @handles(StepFailed)
    def step_failed(self, ctx: ActorContext, msg: StepFailed) -> None:
        """A stage could not run a step: its requests fail with the error (the stage keeps serving)."""
        if msg.epoch != self.epoch or msg.step not in self.sched.inflight:
            self.stats["stale_outputs"] += 1
            return
        self.stats["step_failures"] += 1
        log.error("router: step %d failed on stage %d: %s", msg.step, msg.stage, msg.error)
        self._fail_step(msg.step)

    def _fail_step(self, step: int) -> None:
        """End the requests of in-flight step `step` with "error" (a stage refused it, or it could not
        be sent); the others go on."""
        mb = self.sched.inflight[step]
        self.sched.resend_frees(mb)
        events = []
        for c in mb.chunks:
            req = self.sched.requests.get(c.seq_id)
            if req is not None:
                req.in_flight = False
                events.append(self.sched._finish(req, "error"))
        del self.sched.inflight[step]
        self._sent_at.pop(step, None)
        self._emit(events)
        self._after_step()

    def _after_step(self) -> None:
        if not self.sched.inflight:
            self._drained.set()
        self._wake.set()
        if self.listeners:
            self._notify("step", None)

    def _notify(self, event: str, req: Any) -> None:
        now = self.sched.clock()
        for fn in self.listeners:
            try:
                fn(event, now, req)
            except Exception:  # a listener's bug must not stop the data path; logged and counted
                self.stats["listener_errors"] += 1
                log.exception("router: listener %r failed on %s", fn, event)

    @handles(Terminated, concurrent=True)
    async def terminated(self, ctx: ActorContext, msg: Terminated) -> None:
        if msg.ref not in self.pipeline.refs:
            return
        self._death_seen = True
        self._drained.set()  # a quiesce in progress must not wait for steps that will never return
        log.warning("router: stage %s died: %s", msg.ref, msg.reason)
        self.stats["stage_deaths"] += 1
        if self.on_stage_death is not None:
            await self.on_stage_death(msg.ref, msg.reason)
        else:  # nobody can rebuild the pipeline: fail what is running rather than hang
            self.fail_all(f"stage {msg.ref} died ({msg.reason}) and nothing can replace it")

    @property
    def down(self) -> str | None:
        """Why the pipeline can serve no more (fail_all; a later recovery sets it back to None), else None."""
        return self._down

    @down.setter
    def down(self, why: str | None) -> None:
        self._down = why
        if why is None:
            self._up.set()
        else:
            self._up.clear()

    async def wait_up(self) -> None:
        """Return once the pipeline is not down (at once if it is not)."""
        await self._up.wait()

    def fail_all(self, why: str) -> None:
        """The pipeline cannot serve any more (a dead stage that could not be replaced): every request
        ends with "error" now, and later ones are refused with `why`, instead of waiting for ever."""
        self.down = why
        self._paused = True
        events = [self.sched._finish(r, "error") for r in list(self.sched.requests.values())]
        self.sched.inflight.clear()
        self._sent_at.clear()
        self._drained.set()
        self._emit(events)

    @handles(RouterStatus)
    def status_msg(self, ctx: ActorContext, msg: RouterStatus) -> dict:
        return self.status()

    # ---- control surface for the reshape controller ---------------------------------------------------
    async def quiesce(self) -> None:
        """Stop launching steps and wait until none is in flight."""
        self._paused = True
        # a stage that died before this call (its steps will never come back) counts as well
        is_dead = getattr(self.ctx, "is_dead", None)
        self._death_seen = is_dead is not None and any(is_dead(r) for r in self.pipeline.refs)
        if self.sched.inflight and not self._death_seen:
            self._drained.clear()
            await self._drained.wait()
        if self._death_seen:
            raise ActorError("a stage died while the pipeline was quiescing")

    def requeue_all(self) -> int:
        """Forget every step in flight and all KV (a recovery or a rebuild): each request is recomputed
        from its record, except those cancelled meanwhile, which end now, as their cancel said ("stop":
        the client found a stop string).  Returns how many requeue."""
        cancelled = [r for r in self.sched.requests.values() if r.cancel_requested]
        n = len(self.sched.requeue_all())
        self._sent_at.clear()
        self._emit([self.sched._finish(r, r.cancel_reason) for r in cancelled])
        return n - len(cancelled)

    def resume(self) -> None:
        """Launch steps again."""
        self._paused = False
        self._wake.set()

    def switch(self, pipeline: Pipeline, cache: CacheManager | None = None) -> None:
        """Adopt the next epoch's pipeline (called while quiesced)."""
        assert not self.sched.inflight, "switch while steps are in flight"
        for ref in self.pipeline.refs:
            if ref not in pipeline.refs and self.ctx is not None:
                self.ctx.unwatch(ref)
        for ref in pipeline.refs:
            if ref not in self.pipeline.refs and self.ctx is not None:
                self.ctx.watch(ref)
        self.pipeline = pipeline
        self._sent_at.clear()   # (steps a recovery forgot: none is in flight now)
        self.sched.new_pipeline()
        if cache is not None:
            self.sched.cache = cache
        self.sched.max_inflight = self._inflight_for(pipeline)

    def _inflight_for(self, pipeline: Pipeline) -> int:
        """Micro-batches in flight: the fixed setting, else one per stage that can compute at once."""
        if self._fixed_inflight:
            return self._fixed_inflight
        n = len(pipeline.refs)
        return max(1, min(n, parallel_slots(pipeline.devices, self.cpu_threads))) if pipeline.devices else max(1, n)

    def status(self) -> dict:
        s = self.sched
        return {
            "epoch": self.epoch,
            "stages": [{"index": i, "start": a, "end": b, "actor": str(r)}
                       for i, (r, (a, b)) in enumerate(zip(self.pipeline.refs, self.pipeline.ranges))],
            "running": len(s.running), "waiting": len(s.waiting),
            "inflight": sum(1 for mb in s.inflight.values() if mb.chunks), "max_inflight": s.max_inflight,
            "kv": self.cache.usage(), "block_size": self.cache.block_size,
            "preemptions": s.stats.preemptions, "steps": s.stats.steps, "paused": self._paused, "down": self.down,
            "free_steps": s.stats.free_steps, "frees_pending": len(s.pending_frees),
            "frees_inflight": sum(1 for mb in s.inflight.values() if not mb.chunks),   # steps of frees only
            **{k: v for k, v in self.stats.items()},
        }

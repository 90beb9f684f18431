"""Iteration-level continuous batching for a pipeline: which tokens go into the next micro-batch.

A plain class with no sockets (the RouterActor wraps it; tests and the simulator drive it directly).
Every request is a record that is the source of truth: prompt, sampling parameters, tokens so far,
and how many of those tokens have KV on the stages (`computed`).  Decode is a chunk of one token;
prefill is a chunk of up to the remaining budget (chunked prefill).  Up to `max_inflight`
micro-batches are in flight (one per stage keeps every stage busy); a request is in at most one.
When KV runs out a running request is preempted: its blocks are freed and it is recomputed later
from its record (vLLM's recompute preemption), which cannot change its output.

Frees (the KV of requests that ended or were preempted) ride on the next micro-batch, down the same
path as steps, so that every stage applies them after each step launched before and before each
step launched after.  When no micro-batch is in flight and none can go, the frees go in a
micro-batch of their own (no chunks): else an idle pipeline's stages would hold the blocks that the
ledger counts free until the next request came (a reshape meanwhile would copy and count them).

Frees are bounded by the message limit (`max_message_bytes`): ids are up to 128 characters, and a
step that could not be sent would put its frees back for the next one, which would fail too, for
ever.  A step with requests carries at most half the headroom `chunks.budget()` keeps beside a full
residual; frees beyond that go first, in steps of frees only (up to `budget()` bytes each, at once,
even while steps are in flight).  The ledger counts a free's blocks free as soon as its request
ends, so every free pending when a step is picked goes with that step or before it, and a
preemption whose free would not fit the step ends the pick there (it goes alone first).  When they
cannot go first, no step goes.

A step's chunks are bounded by the same limit: each carries its request's id and fields, and beside
the largest residual a step may carry (`residual_bytes`: a micro-batch's [tokens, hidden] where the
runtime says it, else all of `budget()`) they share what is left (less the body's framing) with the
frees riding on the step.
The pick stops at the first chunk that would not fit (the next step takes it), and a preemption for
a chunk after the first one does not happen when its free and that chunk would not fit.  The first
chunk of a step goes whatever its size: a step without it would carry nothing.

A step of frees only that failed puts its frees back (resend_frees).  Those that no step waits for
then wait for the next step with requests (sent alone again at once, they could go round for ever
to a stage that refuses them); those a step waits for (more than it may carry) go alone again at
once, as holding them back would let that step reuse their blocks, or leave the requests waiting
with nothing in flight.  Under budget() and of ids only, such a step has nothing a stage refuses:
after FREES_RETRIES refusals in a row, the next try waits for a step to come back, a request to
come or end, or the router's retry (`frees_stalled`, `retry_frees`: with nothing in flight no step
would come back, and the requests waiting would wait for an unrelated event).
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from flexpipe.errors import RequestError
from flexpipe.runtime.cache import CacheManager
from flexpipe.runtime.chunks import budget as message_budget, limit_of

FREES_RETRIES = 3   # steps of frees only refused in a row before the next waits for an event (module doc)
# Bytes of a step's message besides its residual, its chunks and its frees, generously: the frame header,
# epoch, step, the lists' headers and the residual's ext header (62 measured with 9-byte epoch and step).
STEP_FRAMING_BYTES = 96
# Bytes one chunk adds besides its id (Scheduler._chunk_bytes): start, length, sample flag, output index and
# its sampling [temperature, top_k, top_p, seed] as msgpack numbers, generously (49 measured at their largest).
CHUNK_FIELD_BYTES = 56


@dataclass(slots=True)
class Request:
    """The router's record of one request: the source of truth for recovery and migration."""

    id: str   # its key here and its sequence id on the stages: unique among the records held (see add)
    prompt: list[int]
    params: Any  # flexpipe.model.sampling.SamplingParams
    stop_ids: frozenset[int]
    max_context: int
    output: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose KV is held by the stages
    in_flight: bool = False
    finished: str | None = None  # finish reason once done: "stop" | "length" | "cancelled" | "error"
    cancel_requested: bool = False
    cancel_reason: str = "cancelled"   # or "stop": the client found a stop string in the text
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    preemptions: int = 0
    queued_at: float | None = None   # when it last went back to the queue (preempted); else arrival
    admitted: bool = False   # scheduled at least once (a preemption or a recovery queues it again)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def total(self) -> int:
        return len(self.prompt) + len(self.output)


@dataclass(slots=True)
class Chunk:
    """One request's slice of a micro-batch: tokens[start:start+n] are fed, KV written there."""

    seq_id: str
    start: int
    tokens: list[int]
    sample: bool  # the chunk reaches the end of the known tokens: sample the next one
    out_index: int  # index of the output token sampled (seeded draws depend on it)


@dataclass(slots=True)
class MicroBatch:
    """What the router launches into the pipeline in one step (no chunks: it carries frees only)."""

    step: int
    chunks: list[Chunk]
    frees: list[str]  # sequences whose KV the stages drop before running this batch

    @property
    def num_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.chunks)


@dataclass(slots=True)
class TokenEvent:
    """A token produced for a request (finish_reason set on its last event)."""

    request_id: str   # the record's key (Request.id)
    token_id: int | None
    index: int
    finish_reason: str | None = None
    text: str = ""   # what the token adds to the text, where the router decodes it (RouterActor.submit)


@dataclass(slots=True)
class SchedulerStats:
    steps: int = 0
    tokens_scheduled: int = 0
    preemptions: int = 0
    finished: int = 0
    cancelled: int = 0
    free_steps: int = 0   # micro-batches of frees only (not in `steps`)


class Scheduler:
    """Continuous batching under a token budget, with chunked prefill and recompute preemption."""

    def __init__(self, cache: CacheManager, *, max_batch_tokens: int = 256, max_inflight: int = 1,
                 max_batch_seqs: int = 256, clock: Callable[[], float] = time.monotonic,
                 max_message_bytes: int | None = None, residual_bytes: int | None = None):
        self.cache = cache
        self.max_message_bytes = max_message_bytes or limit_of(None)   # bounds the frees of a step (module doc)
        # the largest residual a step carries between stages (None: all of budget(), as check_hop_fits allows)
        self.residual_bytes = residual_bytes
        self.max_batch_tokens = max_batch_tokens
        self.max_inflight = max_inflight
        self.max_batch_seqs = max_batch_seqs
        self.clock = clock
        self.requests: dict[str, Request] = {}
        self.waiting: deque[str] = deque()
        self.running: list[str] = []  # admitted, in admission order (latest is preempted first)
        self.inflight: dict[int, MicroBatch] = {}
        self.pending_frees: list[str] = []
        # micro-batches of frees only refused since a step last came back, went with requests, or a
        # request came or ended: what of the pending frees may still go alone (module doc)
        self._frees_refused = 0
        self._steps = itertools.count()
        self.stats = SchedulerStats()
        self.admit = True  # False: only requests already running are scheduled (draining)

    # ---- requests ----------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        """Queue a validated request.  Its key must not be one held: a record that ended while its step
        was in flight is held until that step returns, and the step's output (and the frees of its KV)
        would go to the new one (the router gives a request whose id is held another key)."""
        if req.id in self.requests:
            raise RequestError(f"a request with key {req.id!r} is still held by the scheduler: give another key")
        self.requests[req.id] = req
        self.waiting.append(req.id)
        self._frees_refused = 0

    def cancel(self, req_id: str, reason: str = "cancelled") -> list[TokenEvent]:
        """End a request the client is done with; frees its KV now, or when its in-flight step returns.
        `reason` is what it finishes with: "cancelled", or "stop" when its text reached a stop string."""
        req = self.requests.get(req_id)
        if req is None or req.finished:
            return []
        req.cancel_requested, req.cancel_reason = True, reason
        self._frees_refused = 0
        if req.in_flight:
            return []
        return [self._finish(req, reason)]

    def queued_new(self) -> int:
        """Requests waiting that were never admitted (the max_queued bound): not those preempted or
        requeued by a recovery, which wait again at the front of the queue for KV they once had."""
        return sum(1 for rid in self.waiting if not self.requests[rid].admitted)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def idle(self) -> bool:
        """Nothing in flight, nothing to run, and every free that can go alone delivered to the stages
        (after a step of frees only failed, its frees wait for the next request's step: not work)."""
        return not self.inflight and not self.has_work() and not (self.pending_frees and not self._frees_refused)

    # ---- scheduling -----------------------------------------------------------------------------
    def schedule(self) -> MicroBatch | None:
        """Build the next micro-batch from requests not in flight, or None if nothing can go.

        Frees too many to ride the next step go first, alone, or nothing goes (a step would reuse their
        blocks); with no request to run, frees that wait while no micro-batch is in flight (one would
        take them when it returns and the next goes) go in a micro-batch of their own (see the module
        doc)."""
        if self._frees_overflow():
            return self._frees_only()   # (it takes no stage's turn)
        if sum(1 for mb in self.inflight.values() if mb.chunks) >= self.max_inflight:
            return None   # (one of frees only computes nothing: it takes no stage's turn)
        chunks = self._pick()
        if not chunks:
            return self._frees_only() if not self.inflight or self._frees_overflow() else None
        mb = MicroBatch(next(self._steps), chunks, self._take_frees(self._riding_bytes()))
        self._frees_refused = 0   # those of a failed micro-batch of frees only go with this one
        self.inflight[mb.step] = mb
        self.stats.steps += 1
        self.stats.tokens_scheduled += mb.num_tokens
        return mb

    def _frees_only(self) -> MicroBatch | None:
        """A micro-batch of pending frees alone (as many as a message holds), when there are some and
        they may go alone: after one refused, only those a step waits for (module doc)."""
        if self._frees_refused >= (FREES_RETRIES if self._frees_overflow() else 1) or not self.pending_frees:
            return None
        mb = MicroBatch(next(self._steps), [], self._take_frees(message_budget(self.max_message_bytes),
                                                                at_least_one=True))
        self.inflight[mb.step] = mb
        self.stats.free_steps += 1
        return mb

    # ---- how many frees a step carries ----------------------------------------------------------------
    @staticmethod
    def _free_bytes(seq_id: str) -> int:
        """Bytes one free adds to a step's body: the id and its msgpack string header."""
        return len(seq_id.encode()) + 5

    def _riding_bytes(self) -> int:
        """Bytes of frees a step with requests may carry: between stages its residual may take all of
        `budget()` (check_hop_fits), so half the headroom kept beside it; the rest is for the body's
        framing and the requests' own fields (which also take what the frees leave: `_step_bytes`)."""
        return (self.max_message_bytes - message_budget(self.max_message_bytes)) // 2

    def _step_bytes(self) -> int:
        """Bytes of a step's body that its chunks' ids and fields and its frees may take together: what
        the largest residual leaves of the limit, less the body's framing (module doc)."""
        budget = message_budget(self.max_message_bytes)
        residual = budget if self.residual_bytes is None else min(self.residual_bytes, budget)
        return self.max_message_bytes - residual - STEP_FRAMING_BYTES

    def _chunk_bytes(self, seq_id: str) -> int:
        """Bytes one chunk adds to a step's body besides its tokens: its id and its fields."""
        return self._free_bytes(seq_id) + CHUNK_FIELD_BYTES

    def _frees_overflow(self) -> bool:
        """Whether the pending frees are more than the next step with requests may carry."""
        return sum(map(self._free_bytes, self.pending_frees)) > self._riding_bytes()

    def _take_frees(self, room: int, at_least_one: bool = False) -> list[str]:
        """The oldest pending frees that fit `room` bytes (at least one if asked: none is above a
        message of frees only, as ids are short), no longer pending."""
        n = used = 0
        for s in self.pending_frees:
            used += self._free_bytes(s)
            if used > room and (n or not at_least_one):
                break
            n += 1
        taken, self.pending_frees = self.pending_frees[:n], self.pending_frees[n:]
        return taken

    def _pick(self) -> list[Chunk]:
        """The chunks of the next micro-batch: running requests first, then admissions (FCFS)."""
        active = len(self.running) + len(self.waiting)
        if active == 0:
            return []
        # spread requests over the micro-batches in flight so every stage has work
        seq_cap = min(self.max_batch_seqs, max(1, math.ceil(active / self.max_inflight)))
        budget = self.max_batch_tokens
        chunks: list[Chunk] = []
        # bytes of frees this step can still carry beside those pending (all of them go with it or
        # before it: schedule() picks no step while they are more): a victim's blocks are reused by
        # this step only if its free rides on it too
        frees = sum(map(self._free_bytes, self.pending_frees))
        room = self._riding_bytes() - frees
        left = self._step_bytes() - frees   # bytes of the body still free beside a full residual (module doc)

        for rid in list(self.running):
            if budget <= 0 or len(chunks) >= seq_cap:
                break
            req = self.requests[rid]
            if req.in_flight or req.finished or rid not in self.running:
                continue
            need = self._chunk_bytes(rid) if chunks else 0   # (the first chunk goes whatever its size)
            if need > left:
                return chunks   # the next step takes it (and no admission overtakes it)
            n = min(req.total - req.computed, budget)
            while not self.cache.grow(rid, req.computed + n):
                victim = self._victim(exclude=rid)
                if victim is None:
                    n = 0
                    break
                if need and need + self._free_bytes(victim) > left:
                    return chunks   # they would not both fit: the next step takes this chunk
                self._preempt(victim)
                room -= self._free_bytes(victim)
                left -= self._free_bytes(victim)
                if room < 0:   # its free goes alone after this step: nothing in this one may take its blocks
                    return chunks
            if n <= 0:
                continue
            chunks.append(self._chunk(req, n))
            budget -= n
            left -= self._chunk_bytes(rid)

        while self.admit and self.waiting and budget > 0 and len(chunks) < seq_cap:
            req = self.requests[self.waiting[0]]
            if chunks and self._chunk_bytes(req.id) > left:
                break
            if not self.cache.can_admit(req.total):
                break  # FCFS: a large request at the head is not overtaken forever
            n = min(req.total - req.computed, budget)
            # the whole known prefix now, not only this chunk: the rest of a prompt prefilled in chunks
            # over later steps is not free memory for the next admission (which would be preempted
            # again, its prefill wasted, once this one's later chunks claim it)
            if not self.cache.grow(req.id, req.total):
                break
            self.waiting.popleft()
            self.running.append(req.id)
            req.admitted = True
            chunks.append(self._chunk(req, n))
            budget -= n
            left -= self._chunk_bytes(req.id)
        return chunks

    def _chunk(self, req: Request, n: int) -> Chunk:
        req.in_flight = True  # at once, so a later pick in this same batch cannot preempt it
        toks = req.tokens[req.computed:req.computed + n]
        sample = req.computed + n == req.total
        return Chunk(req.id, req.computed, toks, sample, len(req.output))

    def _victim(self, exclude: str) -> str | None:
        for rid in reversed(self.running):
            if rid != exclude and not self.requests[rid].in_flight:
                return rid
        return None

    def _preempt(self, rid: str) -> None:
        req = self.requests[rid]
        self.cache.release(rid)
        self.pending_frees.append(rid)
        req.computed = 0
        req.preemptions += 1
        req.queued_at = self.clock()
        self.running.remove(rid)
        self.waiting.appendleft(rid)
        self.stats.preemptions += 1

    def frees_stalled(self) -> bool:
        """Whether nothing goes until an event: the frees a step waits for were refused FREES_RETRIES
        times in a row, and nothing is in flight (no step will come back)."""
        return not self.inflight and self._frees_refused >= FREES_RETRIES and self._frees_overflow()

    def retry_frees(self) -> None:
        """Let stalled frees go alone once more (the router's retry, after a wait)."""
        self._frees_refused = min(self._frees_refused, FREES_RETRIES - 1)

    def new_pipeline(self) -> None:
        """The router switched to another pipeline (a reshape): frees its old one refused may go alone again."""
        self._frees_refused = 0

    # ---- results ------------------------------------------------------------------------------
    def on_output(self, step: int, seq_ids: list[str], tokens: list[int]) -> list[TokenEvent]:
        """Apply a finished micro-batch: sampled tokens for the chunks that asked for one."""
        mb = self.inflight.pop(step)
        self._frees_refused = 0   # the pipeline carries steps again
        sampled = dict(zip(seq_ids, tokens))
        events: list[TokenEvent] = []
        now = self.clock()
        for c in mb.chunks:
            req = self.requests.get(c.seq_id)
            if req is None or req.finished:
                continue
            req.in_flight = False
            req.computed = c.start + len(c.tokens)
            if req.cancel_requested:
                events.append(self._finish(req, req.cancel_reason))
                continue
            if not c.sample:
                continue
            tok = int(sampled[c.seq_id])
            req.output.append(tok)
            if req.first_token_at is None:
                req.first_token_at = now
            reason = None
            if tok in req.stop_ids:
                reason = "stop"
            elif len(req.output) >= req.params.max_tokens or req.total >= req.max_context:
                reason = "length"
            events.append(TokenEvent(req.id, tok, len(req.output) - 1))
            if reason:
                events.append(self._finish(req, reason))
        return events

    def resend_frees(self, mb: MicroBatch) -> None:
        """Send the frees of in-flight micro-batch `mb`, which failed, again with a later one: the stages
        after the failing one never applied them (nor the failing one, when it refused the step).  Not
        those of a preempted request that is running again by now: freeing it would drop its new KV."""
        self.pending_frees.extend(s for s in mb.frees if not self.cache.holds(s))
        if not mb.chunks:
            self._frees_refused += 1

    def _finish(self, req: Request, reason: str) -> TokenEvent:
        req.finished = reason
        req.in_flight = False
        if self.cache.holds(req.id):
            self.cache.release(req.id)
            self.pending_frees.append(req.id)
        if req.id in self.running:
            self.running.remove(req.id)
        try:
            self.waiting.remove(req.id)
        except ValueError:
            pass
        self.requests.pop(req.id, None)
        if reason == "cancelled":
            self.stats.cancelled += 1
        else:
            self.stats.finished += 1
        return TokenEvent(req.id, None, len(req.output), reason)

    def requeue_all(self) -> list[str]:
        """Forget every in-flight step and all KV: each request will be recomputed from its record.

        Used when a stage dies (and by restart-and-recompute): nothing is lost because the records
        hold prompt and tokens so far, and seeded draws depend only on (seed, output index).
        """
        self.inflight.clear()
        self.pending_frees.clear()
        self._frees_refused = 0
        for rid in list(self.running):
            self.cache.release(rid)
        for rid in reversed(self.running):
            self.waiting.appendleft(rid)
        self.running.clear()
        for req in self.requests.values():
            req.in_flight = False
            req.computed = 0
        return list(self.waiting)

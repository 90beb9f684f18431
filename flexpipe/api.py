"""The embedded runtime: start a pipeline from Python and generate from it.

    async with FlexPipe.launch(model="tiny", stages=3) as fp:
        async for ev in fp.generate("Hello", max_tokens=16, seed=1):
            print(ev.text, end="")
        await fp.reshape(stages=2)

The router (scheduler, KV ledger, controller) runs on the caller's event loop; each stage is an
actor in its own spawned process by default (`in_process=True` keeps them on this loop).
`autoscale=True` (or a PolicyConfig / AutoscaleConfig) starts the control loop of
runtime/autoscale.py: the pipeline then reshapes and scales to zero by itself.
"""

from __future__ import annotations

import asyncio
import atexit
import bisect
import contextlib
import dataclasses
import itertools
import math
import operator
import re
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable, Sequence

from flexpipe.errors import ConfigError, PipelineDown, QueueFullError, RequestError, UnknownModelError
from flexpipe.model.config import ModelConfig
from flexpipe.model.sampling import SamplingParams
from flexpipe.model.tokenizer import StopTextStream, load_tokenizer
from flexpipe.partition import CostModel, PipelineShape, UnitGraph, check_shape_numbers, solve

# Seconds: the bounds of the reshape pause histogram (the server's flexpipe_reshape_pause_seconds).  The
# engine counts its pauses on them and reports them with the counts (pause_histogram), so that the
# server (prometheus_client) and the engines (torch, no prometheus_client) share one definition.
PAUSE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(slots=True)
class Settings:
    """Runtime settings of an embedded pipeline (each has a flag in `flexpipe serve --help`)."""

    block_size: int = 16  # tokens per KV block
    num_blocks: int = 1024  # KV blocks per stage
    max_batch_tokens: int = 256  # token budget of one micro-batch (chunked prefill fills it)
    max_batch_seqs: int = 256
    max_inflight: int = 0  # micro-batches in flight; 0 = one per stage that can run in parallel
    dtype: str = "float32"
    device: str = "cpu"
    transport: str = "auto"  # stage hop: auto (cuda_ipc between CUDA stages of a node), message, cuda_ipc, shm
    hop_ring_bytes: int = 64 << 20  # ring of each shm / cuda_ipc hop channel (larger residuals go beside it)
    hop_wait_s: float = 10.0  # a step waits this long for its residual on a hop channel, then fails
    decode_graphs: str = "off"  # CUDA stages' decode steps: off, graph (CUDA graphs), static (model/static_decode.py)
    seed: int = 0  # weights seed of presets
    torch_threads: int = 1  # per stage process
    idle_trim_s: float = 5.0  # a stage process idle this long returns its kept free heap (0: never)
    heartbeat_interval: float = 0.5
    heartbeat_timeout: float = 3.0
    start_timeout: float = 120.0
    max_queued: int = 4096  # requests waiting beyond this are refused (back-pressure)
    rt_priority: int = 0  # SCHED_RR priority of every pipeline process (runtime/sched.py); 0 = kernel default
    max_message_bytes: int = 1 << 30  # largest message of the router's and stages' actors (reshape copies: pieces)

    def check(self) -> "Settings":
        """Raise ConfigError for the first setting out of range, saying what it accepts (before
        anything starts: a zero block size divided by zero in a stage, a zero token budget left
        every request waiting forever)."""
        from flexpipe.runtime.actor import ActorSettings
        from flexpipe.runtime.gpu_stage import HOP_MODES, MIN_RING_BYTES
        from flexpipe.runtime.stage import DTYPES

        def bad(name: str, want: str) -> ConfigError:
            return ConfigError(f"setting {name}={getattr(self, name)!r}: {want}")

        for name, low in (("block_size", 1), ("num_blocks", 1), ("max_batch_tokens", 1), ("max_batch_seqs", 1),
                          ("max_inflight", 0), ("seed", 0), ("torch_threads", 1), ("max_queued", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise bad(name, f"give an integer >= {low}" + (" (0: one per stage that can compute in parallel)"
                                                               if name == "max_inflight" else ""))
        if not isinstance(self.hop_ring_bytes, int) or isinstance(self.hop_ring_bytes, bool) \
                or self.hop_ring_bytes < MIN_RING_BYTES:
            raise bad("hop_ring_bytes", f"give the bytes of a hop channel's ring, at least {MIN_RING_BYTES} "
                      "(default 67108864: 64 MiB)")
        for name, positive in (("heartbeat_interval", True), ("heartbeat_timeout", True), ("start_timeout", True),
                               ("hop_wait_s", True), ("idle_trim_s", False)):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) \
                    or not (v > 0 if positive else v >= 0):
                raise bad(name, "give a number of seconds " + ("> 0" if positive else ">= 0 (0: never)"))
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise bad("heartbeat_timeout", f"give more than heartbeat_interval={self.heartbeat_interval!r} "
                      "(a stage that beats this rarely would count as dead)")
        if not isinstance(self.rt_priority, int) or isinstance(self.rt_priority, bool) \
                or not 0 <= self.rt_priority <= 99:
            raise bad("rt_priority", "give an integer from 0 (the kernel's default scheduler) to 99")
        try:   # the actors' own rule (the same words as ActorSettings's)
            ActorSettings(max_message_bytes=self.max_message_bytes)
        except ConfigError as e:
            raise ConfigError(f"setting {e}") from None
        if self.dtype not in DTYPES:
            raise bad("dtype", f"give one of {', '.join(DTYPES)}")
        if not _is_device(self.device):
            raise bad("device", "give cpu, cuda or cuda:N")
        if self.transport not in HOP_MODES:
            raise bad("transport", f"give one of {', '.join(HOP_MODES)}")
        from flexpipe.model.static_decode import DECODE_MODES
        if self.decode_graphs not in DECODE_MODES:
            raise bad("decode_graphs", f"give one of {', '.join(DECODE_MODES)}")
        return self


@dataclass(slots=True)
class GenerationEvent:
    """One streamed token (token_id None on a final event that carries only the finish reason)."""

    token_id: int | None
    text: str
    index: int
    finish_reason: str | None = None


@dataclass(slots=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(slots=True)
class ModelSpec:
    """A resolved model: config, where its weights come from, and its tokenizer."""

    name: str
    config: ModelConfig
    source: dict  # msgpack-able: {"kind": "preset", "seed": n} or {"kind": "checkpoint", "path": p}
    tokenizer: Any = None

    @classmethod
    def resolve(cls, model: str, seed: int = 0) -> "ModelSpec":
        """A preset name or an HF checkpoint directory (UnknownModelError otherwise)."""
        p = Path(model).expanduser()
        if p.is_dir():
            from flexpipe.model.checkpoint import CheckpointReader

            reader = CheckpointReader(p)
            cfg = reader.config
            return cls(p.name, cfg, {"kind": "checkpoint", "path": str(p.resolve())},
                       load_tokenizer(cfg, reader.path))
        try:
            cfg = ModelConfig.preset(model)
        except UnknownModelError as e:
            raise UnknownModelError(f"{e}; or give an HF checkpoint directory (no directory {str(p)!r})") from None
        return cls(model, cfg, {"kind": "preset", "seed": seed}, load_tokenizer(cfg, None))

    def weights(self) -> Any:
        from flexpipe.runtime.stage import source_from_spec

        return source_from_spec(self.config, self.source)


def plan_shape(cfg: ModelConfig, stages: int | None = None, boundaries: Sequence[int] | None = None,
               epoch: int = 0, device: str = "cpu") -> PipelineShape:
    """A pipeline shape from explicit boundaries, or the solver's balanced cut for `stages`."""
    check_shape_numbers(stages, boundaries, cfg.num_units)
    if boundaries is not None:
        shape = PipelineShape.from_boundaries(list(boundaries), epoch, [device] * (len(boundaries) - 1))
    else:
        # operating point of a decode-heavy micro-batch: CPU stages talk over ipc, GPU stages over
        # NVLink/PCIe; only the ratio of compute to transfer matters for where the cuts go.  On a GPU a
        # small model's units compute in well under a microsecond, and each costs a step its kernel
        # launches whatever its work: 15 us, as the simulator's GPUSpec and the placer assume (the H200's
        # llama2-7b decode step in CUDA graphs spent 1.2 ms beside its kernels over 66 units, 18 us
        # each); without it the bytes a hop sends made the cheapest cut a first stage of the embedding
        # alone (the H200 run of 2026-11-30)
        cost = (CostModel(tokens=64, flops_per_s=5e10, bandwidth=5e9, latency=1e-4) if device.startswith("cpu")
                else CostModel(tokens=64, flops_per_s=3e14, bandwidth=5e10, latency=2e-5, unit_overhead_s=15e-6))
        part = solve(UnitGraph.from_config(cfg), num_stages=stages or 1, cost=cost)
        shape = part.shape(epoch, [device] * part.num_stages)
    shape.validate(cfg.num_units)
    return shape


def pause_histogram(history: Sequence[Any], bounds: Sequence[float] = PAUSE_BUCKETS) -> dict:
    """The pauses of every successful reshape in `history` (the controller's ReshapeStats) as a
    cumulative histogram: {"bounds", "counts" (per bound, the pauses no longer than it), "count", "sum"}.

    Totals since start rather than the recent records: a reader that samples the status now and then
    (the server's /metrics) sees each pause exactly once, however many reshapes came between two reads.
    The embedded engine and the router daemon both report it as status()["pauses"]."""
    per_bucket = [0] * (len(bounds) + 1)   # the last: above every bound
    count, total = 0, 0.0
    for st in history:
        if not st.ok:   # an aborted reshape: the old epoch kept serving (flexpipe_reshapes leaves it out too)
            continue
        pause = float(st.pause_s)
        count += 1
        total += pause
        per_bucket[bisect.bisect_left(bounds, pause)] += 1   # first bound >= pause: Prometheus' "le"
    return {"bounds": list(bounds), "counts": list(itertools.accumulate(per_bucket[:-1])), "count": count,
            "sum": total}


class EngineClient:
    """What the embedded runtime and a router daemon's client (runtime/remote.py) share: the model
    as a client sees it, prompt checks, sampling parameters, completions and the oracle's answer.
    Subclasses provide `spec` (a ModelSpec-like object) and `generate`."""

    spec: Any

    # ---- properties -------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.spec.name

    @property
    def config(self) -> ModelConfig:
        return self.spec.config

    @property
    def tokenizer(self) -> Any:
        return self.spec.tokenizer

    @property
    def max_context(self) -> int:
        return self.spec.config.max_position_embeddings

    @property
    def max_sequence_tokens(self) -> int:
        """Most tokens (prompt + output) one request can hold: the model's context, or less where the
        pipeline's KV memory per stage holds less (what vLLM calls max_model_len)."""
        return self.max_context

    # ---- requests ------------------------------------------------------------------------------------
    def _params(self, **kw: Any) -> SamplingParams:
        """Validated sampling parameters (RequestError says what to change); a seed is drawn if none."""
        kw["stop_token_ids"] = _token_ids(kw.get("stop_token_ids") or (), "stop_token_ids", self.config.vocab_size)
        return SamplingParams(**kw).validate(self.config.vocab_size).resolve_seed()

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt given as text or ids (ids are checked against the vocabulary)."""
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("the prompt is empty: give some text or token ids")
            return self.tokenizer.encode(prompt)
        return list(_token_ids(prompt, "prompt token ids", self.config.vocab_size))

    async def complete(self, prompt: str | Sequence[int], **kw: Any) -> Completion:
        """Generate to the end and return the whole completion."""
        ids = self.encode(prompt)
        toks, parts, reason = [], [], "length"
        async for ev in self.generate(ids, **kw):
            if ev.token_id is not None:
                toks.append(ev.token_id)
            parts.append(ev.text)
            if ev.finish_reason:
                reason = ev.finish_reason
        return Completion("".join(parts), toks, reason, len(ids), len(toks))

    def reference_tokens(self, prompt: str | Sequence[int], *, max_tokens: int = 64, temperature: float = 0.0,
                         top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                         stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False) -> list[int]:
        """What the single-process oracle (model/reference.py) generates for the same request."""
        from flexpipe.model.reference import generate

        params = self._params(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed if seed is not None else 0, stop_token_ids=stop_token_ids,
                              ignore_eos=ignore_eos)
        return generate(self.config, self.spec.weights(), self.encode(prompt), params)


class FlexPipe(EngineClient):
    """A running pipeline: router on this loop, stages as actors.  Create with `FlexPipe.launch`."""

    def __init__(self, spec: ModelSpec, settings: Settings, system: Any, router: Any, controller: Any):
        self.spec, self.settings = spec, settings
        self.system, self.router, self.controller = system, router, controller
        self.autoscaler: Any = None  # runtime/autoscale.py's Autoscaler when launched with autoscale=

    # ---- life cycle ---------------------------------------------------------------------------
    @classmethod
    @contextlib.asynccontextmanager
    async def launch(cls, model: str = "tiny", stages: int = 1, *, boundaries: Sequence[int] | None = None,
                     in_process: bool = False, settings: Settings | None = None, autoscale: Any = None,
                     **overrides: Any) -> AsyncIterator["FlexPipe"]:
        """Start the pipeline; stops every stage and closes every socket on exit.

        `autoscale`: None/False (off), True, a planning.PolicyConfig or a runtime.autoscale.AutoscaleConfig.
        """
        from flexpipe.runtime.actor import ActorSettings
        from flexpipe.runtime.autoscale import AutoscaleConfig, Autoscaler, make_weight_cache
        from flexpipe.runtime.controller import Controller
        from flexpipe.runtime.launcher import ActorSystem
        from flexpipe.runtime.sched import use_realtime

        unknown = sorted(set(overrides) - set(Settings.__slots__))
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(map(repr, unknown))}; settings: "
                              f"{', '.join(Settings.__slots__)}")
        # a copy: the caller's Settings (maybe shared by other runtimes) is not changed by the overrides
        settings = dataclasses.replace(settings or Settings(), **overrides)
        settings.check()
        auto = AutoscaleConfig.of(autoscale)
        spec = ModelSpec.resolve(model, settings.seed)
        shape = plan_shape(spec.config, stages, boundaries, device=settings.device)
        check_hop_fits(spec.config, settings, in_process)
        actor_settings = ActorSettings(heartbeat_interval=settings.heartbeat_interval,
                                       heartbeat_timeout=settings.heartbeat_timeout,
                                       start_timeout=settings.start_timeout,
                                       torch_threads=settings.torch_threads, rt_priority=settings.rt_priority,
                                       max_message_bytes=settings.max_message_bytes)   # its stages' too (ActorSpec)
        restore = use_realtime(settings.rt_priority) if settings.rt_priority else None   # ConfigError if refused
        try:
            async with ActorSystem(actor_settings, name="flexpipe") as system:
                controller = Controller(system, spec, settings, in_process=in_process,
                                        weight_cache=make_weight_cache(auto))
                router = await controller.start(shape)
                fp = cls(spec, settings, system, router, controller)
                try:
                    if auto is not None:
                        fp.autoscaler = Autoscaler(controller, auto)
                        await fp.autoscaler.start()
                    yield fp
                finally:
                    if fp.autoscaler is not None:
                        await fp.autoscaler.aclose()
                    await controller.aclose()
        finally:
            if restore is not None:
                restore()

    async def generate(self, prompt: str | Sequence[int], *, max_tokens: int = 64, temperature: float = 0.0,
                       top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                       stop: Sequence[str] | None = None, stop_token_ids: Sequence[int] | None = None,
                       ignore_eos: bool = False, request_id: str | None = None) -> AsyncIterator[GenerationEvent]:
        """Stream the new tokens of one request; closing the iterator early cancels the request."""
        ids = self.encode(prompt)
        params = self._params(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                              stop_token_ids=stop_token_ids, ignore_eos=ignore_eos)
        if self.router.sched.queued_new() >= self.settings.max_queued:
            raise QueueFullError(f"{self.settings.max_queued} requests are already queued: retry later")
        # the router decodes the text and ends the request at a stop string (RouterActor.submit)
        rid, queue = self.router.submit(ids, params, request_id, text=StopTextStream(self.tokenizer.stream(), stop))
        done = False
        try:
            while True:
                ev = await queue.get()
                if ev.finish_reason is not None:   # (a token too, when its text reached a stop string)
                    done = True
                    yield GenerationEvent(ev.token_id, ev.text, ev.index, ev.finish_reason)
                    return
                yield GenerationEvent(ev.token_id, ev.text, ev.index)
        finally:
            if not done:   # this request only: its id may name a newer one by now
                self.router.cancel(rid, queue=queue)

    @property
    def max_sequence_tokens(self) -> int:
        return min(self.max_context, self.router.cache.max_tokens())

    # ---- pipeline -------------------------------------------------------------------------------------
    def status(self) -> dict:
        """Current shape, KV usage, queue, recent reshapes, every reshape's pause (a cumulative
        histogram) and the autoscaler's decisions."""
        auto = self.autoscaler
        return {"model": self.model_name, "shape": self.controller.shape_status(), "router": self.router.status(),
                "reshapes": [r.to_dict() for r in self.controller.history[-16:]],
                "pauses": pause_histogram(self.controller.history),
                "stages": self.controller.stage_info(),
                "decisions": auto.decision_log() if auto is not None else [],
                "autoscale": auto.status() if auto is not None else {"enabled": False}}

    async def reshape(self, stages: int | None = None, boundaries: Sequence[int] | None = None, *,
                      devices: Sequence[str] | None = None, weights_from: str = "auto") -> Any:
        """Change the pipeline's shape while requests run; returns the ReshapeStats."""
        if (stages is None) == (boundaries is None):
            raise ConfigError("give either stages=N or boundaries=[0, ..., num_units]")
        shape = plan_shape(self.config, stages, boundaries, self.controller.shape.epoch + 1, self.settings.device)
        devices = check_reshape_targets(devices, weights_from, shape.num_stages)
        if devices is not None:
            shape = PipelineShape.from_boundaries(shape.boundaries, shape.epoch, devices)
        return await self.controller.reshape(shape, weights_from=weights_from)


class SyncFlexPipe:
    """A blocking wrapper for scripts: the pipeline runs on an event loop in a background thread.

    Close it (`close()` or `with SyncFlexPipe(...) as fp:`); one left open is closed when it is
    collected, or at the latest when the interpreter exits (before threads are joined, while the
    loop can still stop the stages), so a script that forgets leaves no stage process or socket."""

    def __init__(self, model: str = "tiny", stages: int = 1, **kw: Any):
        loop = asyncio.new_event_loop()
        self._state = st = _SyncState(loop, threading.Thread(target=loop.run_forever, name="flexpipe-loop",
                                                             daemon=True))
        st.thread.start()
        try:
            st.cm = FlexPipe.launch(model, stages, **kw)
            self.fp: FlexPipe = asyncio.run_coroutine_threadsafe(st.cm.__aenter__(), loop).result()
        except BaseException:   # (a bad setting, an unknown model): no loop thread left behind
            st.cm = None
            _sync_close(st)
            raise
        self._finalizer = weakref.finalize(self, _sync_close, st)
        self._finalizer.atexit = False
        # threading's exit hooks run before the interpreter stops threads and executors (atexit's
        # run after: too late to await the stages' exit); concurrent.futures registers the same way
        getattr(threading, "_register_atexit", atexit.register)(self._finalizer)

    def __enter__(self) -> "SyncFlexPipe":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _run(self, coro: Any) -> Any:
        if self._state.closed:
            coro.close()
            raise PipelineDown("this SyncFlexPipe is closed: create a new one")
        return asyncio.run_coroutine_threadsafe(coro, self._state.loop).result()

    def complete(self, prompt: str | Sequence[int], **kw: Any) -> Completion:
        return self._run(self.fp.complete(prompt, **kw))

    def reshape(self, **kw: Any) -> Any:
        return self._run(self.fp.reshape(**kw))

    def status(self) -> dict:
        return self._run(_call(self.fp.status))

    def close(self) -> None:
        self._finalizer()


class _SyncState:
    """What closing a SyncFlexPipe needs (held by its finalizer, which must not hold the wrapper)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread):
        self.loop, self.thread, self.cm, self.closed = loop, thread, None, False


def _sync_close(st: _SyncState) -> None:
    if st.closed:
        return
    st.closed = True
    if threading.current_thread() is st.thread:   # collected on its own loop: close there, not waiting
        async def close_here() -> None:
            try:
                await st.cm.__aexit__(None, None, None)
            finally:
                st.loop.stop()
        st.loop.create_task(close_here())
        return
    try:
        if st.cm is not None and st.thread.is_alive():
            asyncio.run_coroutine_threadsafe(st.cm.__aexit__(None, None, None), st.loop).result()
    finally:
        st.loop.call_soon_threadsafe(st.loop.stop)
        st.thread.join()
        st.loop.close()


def check_hop_fits(cfg: ModelConfig, settings: Settings, in_process: bool) -> None:
    """ConfigError unless one message holds a micro-batch's residual where it goes beside the StepInput
    (the message path: CPU stages, in-process stages, transport='message', or a residual larger than
    a hop channel's ring): a step whose message is too large fails its requests.  Checked for one stage
    too: a reshape (or the autoscaler) may cut the pipeline later."""
    from flexpipe.runtime.chunks import budget
    from flexpipe.runtime.stage import DTYPES

    residual = settings.max_batch_tokens * cfg.hidden_size * DTYPES[settings.dtype].itemsize   # [T, H]
    ring = not in_process and (settings.transport in ("shm", "cuda_ipc")
                               or settings.transport == "auto" and settings.device.startswith("cuda"))
    if residual > budget(settings.max_message_bytes) and not (ring and residual <= settings.hop_ring_bytes):
        raise ConfigError(f"setting max_message_bytes={settings.max_message_bytes}: a micro-batch's activations "
                          f"between stages ({settings.max_batch_tokens} tokens x hidden size {cfg.hidden_size} x "
                          f"{settings.dtype}: {residual} bytes) do not fit in one message; raise it or lower "
                          "max_batch_tokens")


def _is_device(d: Any) -> bool:
    """A device name stages can run on: cpu, cuda or cuda:N."""
    return isinstance(d, str) and re.fullmatch(r"(cpu|cuda)(:\d+)?", d) is not None


def check_reshape_targets(devices: Any, weights_from: Any, num_stages: int | None = None, *,
                          is_device: Callable[[Any], bool] = _is_device,
                          names: str = "device names (cpu, cuda or cuda:N)") -> list | None:
    """`devices` as a list (None stays None: the runtime places the stages), ConfigError saying what to
    give unless it is a list of `num_stages` (where known) items that pass `is_device`, and unless
    `weights_from` is one of WEIGHT_SOURCES: checked before a reshape starts (a bare string is no list
    of devices: it was split into its letters)."""
    from flexpipe.runtime.controller import check_weights_from

    check_weights_from(weights_from)
    if devices is None:
        return None
    listed = None if isinstance(devices, (str, bytes)) or not isinstance(devices, Iterable) else list(devices)
    if listed is None or not all(map(is_device, listed)) or num_stages is not None and len(listed) != num_stages:
        count = "" if num_stages is None else f"{num_stages} "
        raise ConfigError(f"devices must be a list of {count}{names}, one per stage (got {devices!r:.80})")
    return listed


def _token_ids(ids: Any, what: str, vocab_size: int) -> tuple[int, ...]:
    """`ids` (a sequence of integers: ints, numpy or torch integer scalars) as a tuple of ints in
    [0, vocab_size); RequestError saying what to change otherwise."""
    if isinstance(ids, (bytes, bytearray, memoryview)):
        raise RequestError(f"{what} must be a list of integers, not {type(ids).__name__}: decode bytes to str "
                           "for a text prompt")
    if isinstance(ids, (str, int)) or not isinstance(ids, Iterable):
        raise RequestError(f"{what} must be a list of integers (got {type(ids).__name__} {ids!r:.40})")
    out, bad = [], []
    for t in ids:
        try:
            i = operator.index(t) if not isinstance(t, bool) else None
        except TypeError:
            i = None
        if i is None or not 0 <= i < vocab_size:
            bad.append(t)
        else:
            out.append(i)
    if bad:
        raise RequestError(f"{what} must be integers in [0, {vocab_size}); got {bad[:5]}")
    return tuple(out)


async def _call(fn: Any) -> Any:
    return fn()


__all__ = ["Completion", "EngineClient", "FlexPipe", "GenerationEvent", "ModelSpec", "PAUSE_BUCKETS", "Settings",
           "SyncFlexPipe", "check_hop_fits", "check_reshape_targets", "pause_histogram", "plan_shape"]

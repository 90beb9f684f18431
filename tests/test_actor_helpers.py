"""Behaviours and messages shared by the actor tests; importable by name ("test_actor_helpers:Echo")
so that launched subprocesses can load them. Holds no tests itself."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time

from flexpipe.runtime import ActorSettings, Terminated, handles, message

# kinds 60050-60099 belong to these helpers (see flexpipe/runtime/messages.py)


@message(60050)
class Say:
    """Echo me back (tell or ask)."""
    text: str
    n: int = 0


@message(60051)
class Fail:
    """Raise an error of `kind` with `text` in the handler."""
    kind: str
    text: str


@message(60052)
class Sleep:
    """Sleep `seconds` on the loop (async) before answering."""
    seconds: float


@message(60053)
class Log:
    """Ask for everything received so far."""


@message(60054)
class Compute:
    """Burn `seconds` of torch compute through run_compute, then answer."""
    seconds: float


@message(60055)
class WatchIt:
    """Start watching `ref`."""
    ref: object


@message(60056)
class Deaths:
    """Ask for the Terminated messages received so far."""


@message(60057)
class Pid:
    """Ask for the process id."""


@message(60058)
class SlowConcurrent:
    """A concurrent handler that sleeps."""
    seconds: float
    tag: int


@message(60059)
class Quit:
    """Make the handler call ctx.stop()."""


@message(60060)
class BadReply:
    """Make the handler return something the wire cannot carry."""


@message(60061)
class Nap:
    """An async handler that logs its start and end and, for seconds >= 0, awaits asyncio.sleep(seconds)
    between them (sleep(0) yields to the loop once); for seconds < 0 it never suspends."""
    n: int
    seconds: float


@message(60062)
class QuitAndNap:
    """An async handler that calls ctx.stop() and then sleeps `seconds` (logging its end, as Nap does)."""
    seconds: float


FAST = ActorSettings(heartbeat_interval=0.1, heartbeat_timeout=0.6, ask_timeout=5.0,
                     start_timeout=30.0, torch_threads=1, linger_ms=100)


def burn(seconds: float) -> int:
    """Torch work for about `seconds` (matmuls release the GIL)."""
    import torch   # only here: the processes of the other tests start faster without torch
    a = torch.randn(256, 256)
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        a = torch.tanh(a @ a)
        n += 1
    return n


class JobThenStop:
    """A Say that runs a 0.4-s compute job; on_stop notes whether that job had finished."""

    def __init__(self):
        self.job_started = threading.Event()
        self.job_done = False
        self.done_at_stop: bool | None = None

    def _job(self) -> None:
        self.job_started.set()
        time.sleep(0.4)
        self.job_done = True

    async def on_stop(self, ctx) -> None:
        self.done_at_stop = self.job_done

    @handles(Say)
    async def say(self, ctx, msg: Say):
        await ctx.run_compute(self._job)
        return msg


class SlowStop:
    """Echo's Say, with an on_stop that takes a while (as a GPU stage closing its channels does)."""

    def __init__(self):
        self.events: list[str] = []
        self.stopping = asyncio.Event()   # set when on_stop begins
        self.release = asyncio.Event()    # on_stop ends once this is set (or after 10 s)

    async def on_stop(self, ctx) -> None:
        self.events.append("on_stop begins")
        self.stopping.set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.release.wait(), 10)
        self.events.append("on_stop ends")

    @handles(Say)
    def say(self, ctx, msg: Say):
        self.events.append(f"handled {msg.text}")
        return msg


class Echo:
    """Answers Say with Say, records every message, and can fail, sleep or compute on request."""

    def __init__(self, tag: str = ""):
        self.tag = tag
        self.seen: list = []
        self.deaths: list[Terminated] = []
        self.started = False
        self.stopped = False
        self.running = self.peak = 0   # SlowConcurrent handlers running now, and at most

    async def on_start(self, ctx) -> None:
        self.started = True

    async def on_stop(self, ctx) -> None:
        self.stopped = True

    @handles(Say)
    def say(self, ctx, msg: Say, *tensors):
        self.seen.append(msg)
        if tensors:
            return [msg, *tensors]
        return msg

    @handles(Fail)
    def fail(self, ctx, msg: Fail):
        raise {"ValueError": ValueError, "KeyError": KeyError}.get(msg.kind, RuntimeError)(msg.text)

    @handles(Sleep)
    async def sleep(self, ctx, msg: Sleep):
        await asyncio.sleep(msg.seconds)
        return msg.seconds

    @handles(Nap)
    async def nap(self, ctx, msg: Nap):
        self.seen.append(("start", msg.n))
        try:
            if msg.seconds >= 0:
                await asyncio.sleep(msg.seconds)
        finally:
            self.seen.append(("end", msg.n))   # also when cancelled
        return msg.n

    @handles(SlowConcurrent, concurrent=True)
    async def slow(self, ctx, msg: SlowConcurrent):
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await asyncio.sleep(msg.seconds)
        finally:
            self.running -= 1
        return msg.tag

    @handles(Log)
    def log(self, ctx, msg: Log):
        return self.seen

    @handles(Compute)
    async def compute(self, ctx, msg: Compute):
        return await ctx.run_compute(burn, msg.seconds)

    @handles(WatchIt)
    def watch_it(self, ctx, msg: WatchIt):
        ctx.watch(msg.ref)
        return True

    @handles(Terminated)
    def terminated(self, ctx, msg: Terminated):
        self.deaths.append(msg)

    @handles(Deaths)
    def get_deaths(self, ctx, msg: Deaths):
        return self.deaths

    @handles(Pid)
    def pid(self, ctx, msg: Pid):
        return os.getpid()

    @handles(Quit)
    def quit(self, ctx, msg: Quit):
        ctx.stop("asked to quit")
        return True

    @handles(QuitAndNap)
    async def quit_and_nap(self, ctx, msg: QuitAndNap):
        ctx.stop("asked to quit")
        try:
            await asyncio.sleep(msg.seconds)
        except BaseException as e:   # what interrupted it (CancelledError, not GeneratorExit at GC)
            self.seen.append(("interrupted", type(e).__name__))
            raise
        finally:
            self.seen.append(("end", "quit"))

    @handles(BadReply)
    def bad_reply(self, ctx, msg: BadReply):
        return object()


class FailsToStart:
    """A behaviour whose on_start raises."""

    async def on_start(self, ctx) -> None:
        raise RuntimeError("no GPU here")


class DiesBeforeStarted:
    """A behaviour whose process exits in on_start, before it can tell Started."""

    async def on_start(self, ctx) -> None:
        os._exit(3)

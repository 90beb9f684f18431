"""Starting actors: in-process on the running loop, or in a spawned subprocess; the ActorSystem.

    async with ActorSystem(ActorSettings(heartbeat_timeout=1.0)) as system:
        h = await system.launch("mypkg.stage:StageBehaviour", {"units": [0, 5]}, name="stage0")
        reply = await system.ask(h.ref, SomeRequest(...))
        await h.stop()            # or h.kill() for SIGKILL

A subprocess is started with the multiprocessing *spawn* context, so it inherits no torch or
ZeroMQ state. Its only argument is an `ActorSpec` encoded by the wire codec (no pickled objects of
ours); readiness is a handshake: the child binds its mailbox and tells its starter `Started`, which
`launch` awaits with a timeout. The parent watches the child's process sentinel, so a death is known
at once (asks to it fail with PeerDeadError, watchers get Terminated), without waiting for heartbeats.

Remote workers (later): a worker daemon receives an `ActorSpec` in a message and calls
`launch_spec(spec)` on its own ActorSystem; the Started handshake is the same.

Signals. A child is its parent's to stop. A terminal's Ctrl-C sends SIGINT to every process of the
foreground group, children included, and `timeout`, systemd and init-less containers send SIGTERM to
all of them: a child that died of either at once was reported by its router as a stage that "died"
(and a Ctrl-C printed a KeyboardInterrupt traceback from each), while its parent was about to stop the
pipeline in order. So a child ignores SIGINT, and on SIGTERM stops itself only `term_grace` seconds
(ActorSettings, default 5) later unless its parent has stopped it meanwhile (a SIGTERM sent to the
child alone still stops it). A child whose parent is gone stops within a second, whatever the signals;
one whose parent died while it booted does not start at all (ActorSpec.parent_pid: the launcher names
the parent; a child that read os.getppid() once booted read init's pid, and served for ever), and one
whose parent dies while it boots (a stage loading its weights: minutes) exits at once, not once loaded.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import importlib
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from typing import Any, Callable

import zmq
import zmq.asyncio

from flexpipe.errors import ActorClosed, ActorError, AskTimeout, ConfigError, PeerDeadError
from flexpipe.runtime import codec, keys
from flexpipe.runtime.actor import Actor, ActorSettings
from flexpipe.runtime.memory import keep_freed_memory
from flexpipe.runtime.messages import ActorRef, Started, Stop, message
from flexpipe.runtime.sched import use_realtime

__all__ = ["ActorSpec", "ActorHandle", "ActorSystem", "load_behaviour", "launch_spec"]

log = logging.getLogger("flexpipe.launcher")

# Set by a daemon (runtime/daemon/events.py: configure_logging) to "kv" or "json": the processes it
# launches, which write to its stderr, log in its format, one structured line per record.
LOG_FORMAT_ENV = "FLEXPIPE_CHILD_LOG_FORMAT"
# Set by a daemon (runtime/daemon/cli.py) to its --log-level: the processes it launches log at it (unset,
# or not a level name: WARNING).  They logged at WARNING whatever the daemon's level.
LOG_LEVEL_ENV = "FLEXPIPE_CHILD_LOG_LEVEL"


@message(11)
class ActorSpec:
    """Everything needed to start an actor elsewhere: what, with which arguments, and who to tell."""
    target: str                       # "package.module:BehaviourClass"
    kwargs: dict
    name: str
    settings: ActorSettings
    parent: ActorRef | None = None    # receives Started(token=...)
    token: str = ""
    endpoint: str = ""                # "" = chosen by the child's ActorSystem
    # The launching process (`launch` sets its own pid; 0 = whatever the child's parent is when it starts
    # serving). A child that read os.getppid() itself, once booted, read 1 (or a subreaper's pid) when
    # its parent had died meanwhile, and then never noticed: it served for ever, holding its device.
    parent_pid: int = 0


def load_behaviour(target: str) -> type:
    """Import "module:Class" and return the class (ConfigError when it cannot be found)."""
    module, _, attr = target.partition(":")
    if not module or not attr:
        raise ConfigError(f"behaviour target {target!r} is not of the form 'module:Class'")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot load behaviour {target!r}: {e}") from e
    return obj


class ActorHandle:
    """A launched actor: its ref and pid, and how to stop it (cleanly) or kill it."""

    def __init__(self, system: "ActorSystem", ref: ActorRef, pid: int, *,
                 actor: Actor | None = None, process: Any = None):
        self.system = system
        self.ref = ref
        self.pid = pid
        self.actor = actor            # the Actor itself when in-process
        self.process = process        # the multiprocessing.Process when a subprocess
        self.exitcode: int | None = None
        self._exited = asyncio.Event()

    @property
    def alive(self) -> bool:
        """True until the actor has stopped or its process has exited."""
        if self.actor is not None:
            return not self.actor.closed
        return not self._exited.is_set()

    async def stop(self, timeout: float = 5.0) -> None:
        """Ask the actor to stop; a subprocess that has not exited after `timeout` is killed."""
        if self.actor is not None:
            await self.actor.aclose("stopped by its handle")
            # as when a subprocess exits: the other actors here close their sockets to it
            self.system.declare_dead(self.ref, "stopped by its handle")
            return
        if self._exited.is_set():
            return
        try:
            await self.system.ask(self.ref, Stop("stopped by its handle"), timeout=timeout)
        except (AskTimeout, PeerDeadError, ActorClosed) as e:
            log.info("stop of %s: %s", self.ref, e)
        try:
            await asyncio.wait_for(self._exited.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("%s did not exit %gs after Stop; killing it", self.ref, timeout)
            self.kill()
            await self._exited.wait()

    def kill(self) -> None:
        """SIGKILL the subprocess (in-process: close its sockets without any goodbye)."""
        if self.actor is not None:
            self.actor.abort()
            self.system.declare_dead(self.ref, "killed")
        elif not self._exited.is_set():
            os.kill(self.pid, signal.SIGKILL)

    async def wait(self) -> int | None:
        """Wait until the actor has stopped; returns the process exit code (None in-process)."""
        if self.actor is not None:
            await self.actor.wait_closed()
        else:
            await self._exited.wait()
        return self.exitcode

    def _on_exit(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.process.sentinel)
        self._reap(loop)

    def _reap(self, loop: asyncio.AbstractEventLoop) -> None:
        # the sentinel closes while the child is still exiting: wait (briefly) to read its code
        if self.process.exitcode is None:
            loop.call_later(0.005, self._reap, loop)
            return
        self.exitcode = self.process.exitcode
        self._exited.set()
        # Process holds two pipe fds (its sentinel and the spawn pipe) until it is closed: without
        # this, every stage a reshape retires or a recovery replaces kept two fds open for good
        self.process.close()
        self.system._forget(self)
        self.system.declare_dead(self.ref, f"process {self.pid} exited with code {self.exitcode}")

    def __repr__(self) -> str:
        return f"<ActorHandle {self.ref} pid={self.pid} alive={self.alive}>"


class ActorSystem:
    """The actors of one process: a ZeroMQ context, an ipc temp dir, settings, and a client actor.

    Use as `async with ActorSystem(settings) as system:`; leaving it stops every actor it started
    (subprocesses included), closes every socket, and terminates the context.
    """

    def __init__(self, settings: ActorSettings | None = None, *, name: str = "system"):
        self.settings = settings or ActorSettings()
        self.name = name
        self.zctx: zmq.asyncio.Context | None = None
        self.actors: list[Actor] = []
        self.handles: list[ActorHandle] = []
        self._client: Actor | None = None
        # fn(ref, reason), called when a launched actor exits or is declared dead
        self.death_listeners: list[Any] = []
        self._dir: str | None = None
        self._owns_dir = False

    async def __aenter__(self) -> "ActorSystem":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def start(self) -> "ActorSystem":
        """Create the ZeroMQ context, the ipc dir and the client actor; called by `async with`."""
        if self.zctx is None:
            self.zctx = zmq.asyncio.Context()
            if self.settings.bind == "ipc":
                if self.settings.endpoint_dir:
                    self._dir = self.settings.endpoint_dir
                else:
                    self._dir = tempfile.mkdtemp(prefix="fp-")
                    self._owns_dir = True
            try:
                self._client = await self.spawn(None, f"{self.name}-{os.getpid()}")
            except BaseException:
                await self.aclose()
                raise
        return self

    def endpoint_for(self, name: str) -> str:
        """A fresh endpoint to bind an actor's mailbox on (per the `bind` setting)."""
        if self.settings.bind == "tcp":
            return f"tcp://{self.settings.host}:*"
        if self.settings.bind != "ipc":
            raise ConfigError(f"bind must be 'ipc' or 'tcp', got {self.settings.bind!r}")
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:32]
        return f"ipc://{self._dir}/{safe}-{uuid.uuid4().hex[:8]}"

    async def spawn(self, behaviour: Any, name: str, *, endpoint: str = "") -> Actor:
        """Start `behaviour` as an actor on this event loop; returns the started Actor."""
        if self.zctx is None:
            raise ActorClosed("the system is not running; use `async with ActorSystem()`")
        actor = Actor(behaviour, name, endpoint or self.endpoint_for(name), zctx=self.zctx,
                      settings=self.settings)
        await actor.start()
        self.actors = [a for a in self.actors if not a.closed]   # retired in-process stages
        self.actors.append(actor)
        return actor

    @property
    def client(self) -> Actor:
        """An actor with no handlers, for telling and asking from outside any actor."""
        if self._client is None or self._client.closed:
            raise ActorClosed("the system is not running; use `async with ActorSystem()`")
        return self._client

    async def tell(self, ref: ActorRef, msg: Any, *tensors: Any) -> None:
        """Tell from the system's client actor."""
        await self.client.tell(ref, msg, *tensors)

    async def ask(self, ref: ActorRef, msg: Any, *tensors: Any, timeout: float | None = None) -> Any:
        """Ask from the system's client actor."""
        return await self.client.ask(ref, msg, *tensors, timeout=timeout)

    def _forget(self, handle: ActorHandle) -> None:
        """Drop an exited subprocess's handle (the caller may keep it: its exit code stays)."""
        try:
            self.handles.remove(handle)
        except ValueError:
            pass

    def declare_dead(self, ref: ActorRef, reason: str) -> None:
        """Tell every actor of this system that `ref` is dead (used when its process exits)."""
        for actor in self.actors:
            if not actor.closed:
                actor._declare_dead(ref, reason)
        for fn in list(self.death_listeners):
            fn(ref, reason)

    async def launch(self, target: str | type, kwargs: dict | None = None, *, name: str,
                     in_process: bool = False, endpoint: str = "",
                     timeout: float | None = None) -> ActorHandle:
        """Start the behaviour `target` ("module:Class", or a class when in-process) with `kwargs`.

        In a subprocess, kwargs must be msgpack-able. Raises AskTimeout when Started does not come
        within `timeout` (default: settings.start_timeout), PeerDeadError when the child exits
        first, and ActorError when the behaviour failed to start.
        """
        kwargs = kwargs or {}
        if in_process:
            cls = load_behaviour(target) if isinstance(target, str) else target
            try:
                actor = await self.spawn(cls(**kwargs), name, endpoint=endpoint)
            except Exception as e:   # as from a subprocess: typed, and saying which actor
                raise ActorError(f"actor {name} failed to start: {type(e).__name__}: {e}") from e
            handle = ActorHandle(self, actor.ref, os.getpid(), actor=actor)
            self.handles.append(handle)
            return handle
        if not isinstance(target, str):
            raise ConfigError("a subprocess actor is named by an import path 'module:Class'")
        client = self.client
        settings = dataclasses.replace(self.settings, endpoint_dir=self._dir or "")
        spec = ActorSpec(target, kwargs, name, settings, client.ref, uuid.uuid4().hex, endpoint,
                         parent_pid=os.getpid())
        started = client.expect_started(spec.token)
        blob = bytes(codec.encode(spec, inline_max=1 << 62)[0])
        process = multiprocessing.get_context("spawn").Process(
            target=_child_main, args=(blob,), name=f"fp-{name}", daemon=True)
        process.start()
        handle = ActorHandle(self, ActorRef(name, ""), process.pid, process=process)
        self.handles.append(handle)
        loop = asyncio.get_running_loop()
        loop.add_reader(process.sentinel, handle._on_exit)
        wait = timeout if timeout is not None else self.settings.start_timeout
        exited = asyncio.ensure_future(handle._exited.wait())
        try:
            done, _ = await asyncio.wait({started, exited}, timeout=wait,
                                         return_when=asyncio.FIRST_COMPLETED)
        except BaseException:   # cancelled while the child starts: nobody would own it once started
            started.cancel()
            handle.kill()
            raise
        finally:
            exited.cancel()
        if started not in done:
            started.cancel()
            if handle._exited.is_set():
                raise PeerDeadError(f"actor {name} (pid {handle.pid}) exited with code "
                                    f"{handle.exitcode} before it started")
            handle.kill()
            raise AskTimeout(f"actor {name} (pid {handle.pid}) did not start within {wait:g}s")
        msg: Started = started.result()
        if msg.error:
            await handle.wait()
            raise ActorError(f"actor {name} failed to start: {msg.error}")
        handle.ref = msg.ref
        return handle

    async def aclose(self) -> None:
        """Stop every launched subprocess and every actor, close all sockets and the context."""
        await asyncio.gather(*(h.stop() for h in self.handles if h.process is not None),
                             return_exceptions=True)
        loop = asyncio.get_running_loop()
        for h in self.handles:
            if h.process is not None and not h._exited.is_set():
                loop.remove_reader(h.process.sentinel)
        for actor in reversed(self.actors):
            await actor.aclose("system closed")
        self.actors.clear()
        if self.zctx is not None:
            zctx, self.zctx = self.zctx, None
            keys.stop_authenticator(zctx)
            await asyncio.to_thread(zctx.term)
        if self._owns_dir and self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)


# --- the child side -------------------------------------------------------------------------------

def _child_main(blob: bytes) -> None:
    """Entry point of a spawned actor process."""
    spec, _ = codec.decode([blob])
    keep_freed_memory()   # before torch allocates: step tensors come back from the heap, not fresh mmaps
    if spec.settings.torch_threads:   # read by torch when (if) the behaviour imports it
        os.environ["OMP_NUM_THREADS"] = str(spec.settings.torch_threads)
    if spec.settings.rt_priority:   # an OpenMP worker spinning at a real-time priority keeps the others off its core
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _child_logging(spec.name)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent's (module docstring); asyncio.run keeps it
    asyncio.run(launch_spec(spec))


def _child_logging(name: str) -> None:
    """Log records of a launched process go to stderr (its parent's): one structured line each, in the
    format of a daemon parent (LOG_FORMAT_ENV: kv or json, as the daemon's own lines, with an `actor`
    field), else plain text naming the actor; at a daemon parent's level (LOG_LEVEL_ENV), else WARNING.
    A worker's stages used to write plain text into a worker's JSON log, and at WARNING whatever the
    worker's --log-level."""
    fmt = os.environ.get(LOG_FORMAT_ENV, "")
    level = os.environ.get(LOG_LEVEL_ENV, "").upper()
    if level not in ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"):   # (the parent checked its own)
        level = "WARNING"
    if fmt not in ("kv", "json"):
        logging.basicConfig(level=level, format=f"%(levelname)s {name}[%(process)d] %(name)s: %(message)s")
        return
    from flexpipe.runtime.daemon.events import EventFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EventFormatter(fmt, static={"actor": name}))
    logging.basicConfig(level=level, handlers=[handler])


# prctl(2)'s option: the kernel sends this process a signal when its parent exits (Linux)
_PR_SET_PDEATHSIG = 1


def _parent_death_signal(sig: int) -> bool:
    """Have the kernel send this process `sig` when its parent exits (0: no longer); False where there is
    no prctl (not Linux) or it is refused."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(sig)) == 0
    except (OSError, AttributeError):
        return False


def _exit_with_parent_while_booting(name: str, parent_pid: int) -> Callable[[], object]:
    """Exit as soon as the parent is gone while this process boots; returns what ends that (the serve loop
    watches the parent from then on, and stops its actor cleanly).

    Booting builds the behaviour, and a stage loads its weights then, in this thread, with the event loop
    blocked: minutes for a large model, which the stage of a dead parent spent holding its devices for
    nobody. The load holds the GIL in long C calls (safetensors blocks in open() with it on a stalled file
    system), so no thread of ours can be counted on to notice: on Linux the kernel kills the process. (Its
    "parent" there is the launcher's thread that started it, the event loop's: launch() awaits the boot
    on it, and kills the child itself when abandoned.) Elsewhere a thread polls between those C calls.
    """
    if _parent_death_signal(signal.SIGKILL):
        return lambda: _parent_death_signal(0)
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.2):
            if os.getppid() != parent_pid:
                log.warning("%s: parent process %d exited while it booted; exiting", name, parent_pid)
                os._exit(0)

    threading.Thread(target=watch, name="flexpipe-parent-watch", daemon=True).start()
    return stop.set


async def launch_spec(spec: ActorSpec, *, exit_with_parent: bool = True) -> None:
    """Serve the actor described by `spec` until it stops (what a child process or worker runs).

    With `exit_with_parent`, it does not start (or stops within a second) when its parent process is
    not, or is no longer, `spec.parent_pid`: a parent that died while the child booted is already gone.
    """
    parent_pid = spec.parent_pid or os.getppid()
    booted: Callable[[], object] = lambda: None
    if exit_with_parent:   # (before the check: a parent that dies in between is seen by one or the other)
        booted = _exit_with_parent_while_booting(spec.name, parent_pid)
    if exit_with_parent and os.getppid() != parent_pid:
        log.warning("%s: parent process %d exited before it started; not starting", spec.name, parent_pid)
        return
    loop = asyncio.get_running_loop()
    term: list[float] = []   # when a SIGTERM came (module docstring: a grace for the parent)
    if exit_with_parent:   # from before Started: a SIGTERM right after the parent's launch() waits too
        loop.add_signal_handler(signal.SIGTERM, lambda: term or term.append(loop.time()))
    try:
        await _serve_spec(spec, parent_pid, term, exit_with_parent, booted)
    finally:
        if exit_with_parent:
            loop.remove_signal_handler(signal.SIGTERM)


async def _serve_spec(spec: ActorSpec, parent_pid: int, term: list[float], exit_with_parent: bool,
                      booted: Callable[[], object]) -> None:
    loop = asyncio.get_running_loop()
    async with ActorSystem(spec.settings, name=f"{spec.name}-launcher") as system:
        try:
            if spec.settings.rt_priority:   # every thread of this process, before the behaviour starts its own
                use_realtime(spec.settings.rt_priority)
            cls = load_behaviour(spec.target)
            if spec.settings.torch_threads and "torch" in sys.modules:
                sys.modules["torch"].set_num_threads(spec.settings.torch_threads)
            behaviour = cls(**spec.kwargs)
            actor = await system.spawn(behaviour, spec.name, endpoint=spec.endpoint)
        except Exception as e:
            log.error("actor %s failed to start: %s: %s", spec.name, type(e).__name__, e)
            if spec.parent is not None:
                await system.tell(spec.parent, Started(ActorRef(spec.name, ""), os.getpid(),
                                                       spec.token, f"{type(e).__name__}: {e}"))
            return
        # booted: from here this loop watches the parent, and stops the actor cleanly (before Started: a
        # parent that dies as soon as it hears it must find the child past the kernel's kill)
        booted()
        if spec.parent is not None:
            await actor.tell(spec.parent, Started(actor.ref, os.getpid(), spec.token))
        while not actor.closed:
            if exit_with_parent and os.getppid() != parent_pid:
                log.warning("%s: parent process %d is gone; stopping", spec.name, parent_pid)
                await actor.aclose("parent process exited")
                break
            if term and loop.time() - term[0] >= spec.settings.term_grace:
                log.warning("%s: SIGTERM, and its parent did not stop it within %gs; stopping",
                            spec.name, spec.settings.term_grace)
                await actor.aclose("SIGTERM")
                break
            wait = 1.0 if not term else max(0.0, min(1.0, term[0] + spec.settings.term_grace - loop.time()))
            try:
                await asyncio.wait_for(actor.wait_closed(), wait)
            except asyncio.TimeoutError:
                pass

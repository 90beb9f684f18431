"""Running the app under uvicorn: in the foreground (`flexpipe serve`) or in a thread (tests, examples)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn


class _Server(uvicorn.Server):
    """uvicorn.Server that reports when it listens (a handshake, not a sleep)."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[str], None] | None = None):
        super().__init__(config)
        self.ready = threading.Event()
        self.url: str | None = None
        self._on_ready = on_ready
        # the app's hook for the graceful-shutdown window (app.py: streams end with an error event
        # and [DONE] before uvicorn would cancel them mid-body)
        app_server = getattr(getattr(config.app, "state", None), "server", None)
        self._begin_shutdown: Callable[[float], None] | None = getattr(app_server, "begin_shutdown", None)

    async def shutdown(self, sockets: Any = None) -> None:
        if self._begin_shutdown is not None and self.config.timeout_graceful_shutdown is not None:
            self._begin_shutdown(float(self.config.timeout_graceful_shutdown))
        await super().shutdown(sockets=sockets)

    async def startup(self, sockets: Any = None) -> None:
        try:
            await super().startup(sockets=sockets)
            if not self.should_exit and self.servers:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                host = f"[{host}]" if ":" in host else host
                self.url = f"http://{host}:{port}"
                if self._on_ready is not None:
                    self._on_ready(self.url)
        finally:
            self.ready.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn's own version re-raises SIGTERM/SIGINT after its graceful shutdown, so the process
        # would die of the signal; a daemon that stopped cleanly should exit 0 instead.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def serve_forever(app: Any, *, host: str, port: int, log_level: str = "info", access_log: bool = False,
                  on_ready: Callable[[str], None] | None = None, graceful_s: float = 10.0) -> bool:
    """Serve `app` until SIGINT/SIGTERM; False if it could not start (port taken, engine failed)."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            lifespan="on", timeout_graceful_shutdown=graceful_s)
    server = _Server(config, on_ready)
    server.run()
    return server.url is not None


class ServerThread:
    """The app under uvicorn in a background thread, on a free port picked by the OS.

    `with ServerThread(app) as url: ...` returns once the server listens (and the app's lifespan,
    engine launch included, has finished starting); leaving the block stops it and waits.
    """

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 start_timeout_s: float = 120.0, graceful_s: float = 5.0):
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                timeout_graceful_shutdown=graceful_s)
        self.server = _Server(config)
        self.start_timeout_s = start_timeout_s
        self._thread = threading.Thread(target=self._run, name="flexpipe-http", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.server.run()
        except BaseException as e:  # noqa: BLE001 - re-raised in the thread that waits for startup
            self._error = e
        finally:
            self.server.ready.set()

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:53121."""
        if self.server.url is None:
            raise RuntimeError("the server is not running")
        return self.server.url

    def start(self) -> str:
        """Start and wait until it listens; raises if it cannot start."""
        self._thread.start()
        if not self.server.ready.wait(self.start_timeout_s):
            self.stop()
            raise TimeoutError(f"the HTTP server did not start within {self.start_timeout_s:.0f} s")
        if self.server.url is None:
            self._thread.join(10)
            raise RuntimeError(f"the HTTP server failed to start: {self._error!r}") from self._error
        return self.url

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ask uvicorn to exit (which runs the app's shutdown) and wait for the thread."""
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise TimeoutError(f"the HTTP server did not stop within {timeout_s:.0f} s")

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

"""One engine generation driven for one HTTP request, cancelled the moment its client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_END = object()


class ClientGone(Exception):
    """The HTTP client disconnected before the generation finished."""


class ServerStopping(Exception):
    """The server's graceful-shutdown window closed before the generation finished."""


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class Generation:
    """Consumes an engine's event iterator in a task of its own and watches the client.

    The engine's generator always runs in that one task (so whatever it holds across yields stays
    valid); a disconnect cancels the task once, which lets the generator's cleanup (freeing the
    request's KV blocks) run to completion instead of being cancelled again by a cancel scope.
    """

    def __init__(self, events: AsyncIterator[Any], receive: Receive | None = None,
                 stopping: asyncio.Event | None = None):
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._pump = asyncio.create_task(self._run(events), name="flexpipe-generation")
        self._watch = asyncio.create_task(self._watch_client(receive)) if receive is not None else None
        self._stop = asyncio.create_task(self._watch_stopping(stopping)) if stopping is not None else None
        self.client_gone = False

    async def _run(self, events: AsyncIterator[Any]) -> None:
        try:
            async for event in events:
                self._queue.put_nowait(event)
        except asyncio.CancelledError:
            await _aclose(events)
            raise
        except Exception as e:  # noqa: BLE001 - handed to the request handler, which answers it
            self._queue.put_nowait(_Failed(e))
        else:
            self._queue.put_nowait(_END)
        await _aclose(events)

    async def _watch_client(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.client_gone = True
        self._pump.cancel()
        self._queue.put_nowait(_Failed(ClientGone()))

    async def _watch_stopping(self, stopping: asyncio.Event) -> None:
        await stopping.wait()
        if not self._pump.done():
            self._pump.cancel()
            self._queue.put_nowait(_Failed(ServerStopping()))

    async def next(self) -> Any | None:
        """The next engine event; None at the end.  Raises the engine's error, ClientGone or ServerStopping."""
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)
            return None
        if isinstance(item, _Failed):
            self._queue.put_nowait(item)
            raise item.error
        return item

    async def close(self) -> None:
        """Stop watching the client; cancel the generation if it is still running and wait for it."""
        tasks = [t for t in (self._pump, self._watch, self._stop) if t is not None]
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _aclose(events: AsyncIterator[Any]) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()


class EventStreamResponse:
    """An ASGI response that sends server-sent events from `chunks` (bytes, one event each)."""

    media_type = "text/event-stream; charset=utf-8"

    def __init__(self, chunks: AsyncIterator[bytes], headers: dict[str, str] | None = None):
        self.chunks = chunks
        self.headers = {"cache-control": "no-cache", "x-accel-buffering": "no", **(headers or {})}

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        raw = [(b"content-type", self.media_type.encode())]
        raw += [(k.encode(), v.encode()) for k, v in self.headers.items()]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": raw})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # ASGI 2.4 servers report a gone client by failing send(); the generator closes below
        finally:
            await _aclose(self.chunks)

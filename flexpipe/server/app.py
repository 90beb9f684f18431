"""The OpenAI-compatible HTTP front end: a starlette app over any engine with FlexPipe's interface."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, AsyncContextManager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from flexpipe.errors import (
    ActorError, CapacityError, ConfigError, FlexPipeError, PartitionError, PipelineDown, PlacementError,
    QueueFullError, RequestError, ReshapeError,
)

from .chat_template import ChatTemplate
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import (APIError, ChatRequest, SamplingRequest, bad_request,
                       parse_chat, parse_completion, parse_json_body)
from .status import jsonable, pipeline_view, read_status
from .streams import ClientGone, EventStreamResponse, Generation, ServerStopping

log = logging.getLogger("flexpipe.server")

STATIC_DIR = Path(__file__).parent / "static"
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CLIENT_GONE = 499  # status recorded (never sent) for requests whose client disconnected
OFF_LOOP_CHARS = 16384  # prompts of more characters are tokenized (and templated) in a worker thread
HEALTH_TIMEOUT_S = 5.0   # a remote router slower than this to tell its status is reported unavailable
RESHAPE_KEYS = frozenset({"stages", "boundaries"})   # what POST /v1/flexpipe/reshape takes (docs/reshape.md)
QUEUE_FULL_RETRY_AFTER_S = 1   # the Retry-After of a 429 queue_full: the queue drains as requests finish

EngineFactory = Callable[[], AsyncContextManager[Any]]


def create_app(engine: Any, *, model_name: str | None = None, api_key: str | None = None,
               chat_template: str | None = None, default_max_tokens: int | None = None,
               max_request_bytes: int = 4 << 20, allowed_origins: list[str] | None = None,
               body_timeout_s: float = 30.0) -> Starlette:
    """The server's ASGI app.

    `engine` is a running engine with the FlexPipe interface (embedded FlexPipe, or a router
    client), or a zero-argument callable returning an async context manager that yields one, e.g.
    `lambda: FlexPipe.launch(model="tiny", stages=2)`: it is entered in the app's lifespan so that
    the engine lives in the server's event loop.  `model_name` is the name clients send (default:
    the engine's).  With `api_key`, every /v1 route wants `Authorization: Bearer <api_key>`.
    `chat_template` (jinja2 text or a file) overrides the tokenizer's.  `default_max_tokens` caps
    generations whose request names no max_tokens (default: 16 for completions, the rest of the
    context for chat).  `allowed_origins` (e.g. ["https://app.example"], or ["*"]) lets web pages of
    other origins call the API from a browser (CORS); the chat page is served from the same origin.
    A request body that has not arrived whole within `body_timeout_s` is answered 408 (a client that
    sends its headers and then trickles or stalls holds a connection for no longer than that).
    """
    if api_key is not None and not api_key.strip():
        raise ConfigError("api_key is empty: give a key, or None to serve without one")
    server = _Server(model_name=model_name, api_key=api_key, template_override=chat_template,
                     default_max_tokens=default_max_tokens, max_request_bytes=max_request_bytes,
                     body_timeout_s=body_timeout_s)
    factory: EngineFactory | None = None
    if hasattr(engine, "generate"):
        server.attach(engine)
    elif callable(engine):
        factory = engine
    else:
        raise TypeError(f"engine must have the FlexPipe interface or be a factory of one, not {engine!r}")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if factory is None:
            yield
            return
        async with factory() as running:
            server.attach(running)
            log.info("engine ready: model %s, max context %s", server.model_name, server.max_context)
            yield

    routes = [
        Route("/", server.page, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics_endpoint, methods=["GET"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/models/{model:path}", server.model, methods=["GET"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/flexpipe/status", server.status, methods=["GET"]),
        Route("/v1/flexpipe/reshape", server.reshape, methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    middleware = []
    if allowed_origins:
        from starlette.middleware import Middleware
        from starlette.middleware.cors import CORSMiddleware

        middleware.append(Middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                                     allow_headers=["authorization", "content-type"], expose_headers=["x-request-id"],
                                     max_age=600))
    app = Starlette(routes=routes, lifespan=lifespan, middleware=middleware, exception_handlers={
        HTTPException: server.http_error, APIError: server.api_error, Exception: server.internal_error})
    app.state.server = server
    return app


class _Server:
    """Request handlers and the state they share."""

    def __init__(self, *, model_name: str | None, api_key: str | None, template_override: str | None,
                 default_max_tokens: int | None, max_request_bytes: int, body_timeout_s: float = 30.0):
        self.engine: Any = None
        self.model_name = model_name
        self.api_key = api_key
        self.template_override = template_override
        self.default_max_tokens = default_max_tokens
        self.max_request_bytes = max_request_bytes
        self.body_timeout_s = body_timeout_s
        self.template: ChatTemplate | None = None
        self.metrics: ServerMetrics | None = None
        self.created = int(time.time())
        self.stopping = asyncio.Event()   # set when the graceful-shutdown window is about to close
        self.vocab_size: int | None = None

    def attach(self, engine: Any) -> None:
        """Serve `engine` from now on."""
        self.engine = engine
        self.model_name = self.model_name or engine.model_name
        self.vocab_size = getattr(getattr(engine, "config", None), "vocab_size", None)
        self.template = ChatTemplate.for_tokenizer(engine.tokenizer, self.template_override)
        if self.metrics is None:
            self.metrics = ServerMetrics(self.model_name)

    def begin_shutdown(self, grace_s: float) -> None:
        """The HTTP server stopped taking connections and gives running requests `grace_s` seconds:
        shortly before that ends, streams still running are ended with a 'server_shutdown' error
        event and [DONE] (and non-streamed requests answered 503), not cut mid-body."""
        margin = min(1.0, grace_s / 2)
        asyncio.get_running_loop().call_later(max(0.0, grace_s - margin), self.stopping.set)

    async def _engine_status(self) -> dict[str, Any]:
        """The engine's status, or asyncio.TimeoutError after HEALTH_TIMEOUT_S (a remote router that
        hangs must not hang /health, /metrics or the status route)."""
        return await asyncio.wait_for(read_status(self.engine), HEALTH_TIMEOUT_S)

    @property
    def max_context(self) -> int:
        """Most tokens a request may hold: the model's context, or less where the KV memory of a
        stage holds less (read per request: a reshape can change it)."""
        if self.engine is None:
            return 0
        return int(getattr(self.engine, "max_sequence_tokens", self.engine.max_context))

    # --- plain routes ------------------------------------------------------------------------------
    async def page(self, request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={"cache-control": "no-cache"})

    async def health(self, request: Request) -> Response:
        """200 while the engine can serve; 503 while it starts, once its pipeline is down (a stage died
        and could not be replaced: restart the server) or when a remote router does not answer."""
        if self.engine is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        try:
            status = await self._engine_status()
        except Exception as e:   # a remote router that is gone or slow: not healthy, and say why
            return JSONResponse({"status": "unavailable", "model": self.model_name,
                                 "reason": f"{type(e).__name__}: {e}"[:500]}, status_code=503)
        down = (status.get("router") or {}).get("down")
        if down:
            return JSONResponse({"status": "down", "model": self.model_name, "reason": str(down)},
                                status_code=503)
        return JSONResponse({"status": "ok", "model": self.model_name})

    async def metrics_endpoint(self, request: Request) -> Response:
        """Always 200 with the server's own metrics: during an outage of the engine (a remote router
        gone or slow) they matter most.  The runtime's gauges come along while it answers, and
        flexpipe_engine_up says whether it did."""
        try:
            status = await self._engine_status()
        except Exception as e:   # noqa: BLE001 - reported as flexpipe_engine_up 0 and logged
            log.warning("/metrics without the runtime's numbers: engine status failed: %s: %s",
                        type(e).__name__, e)
            self.metrics.engine_unavailable()
        else:
            self.metrics.observe_status(pipeline_view(status))
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def models(self, request: Request) -> Response:
        self._authorize(request, "models")
        return self._json("models", {"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        self._authorize(request, "models")
        self._check_model(request.path_params["model"], param=None)
        return self._json("models", self._model_card())

    async def status(self, request: Request) -> Response:
        self._authorize(request, "status")
        try:
            status = await self._engine_status()
        except asyncio.TimeoutError:   # (a remote router that hangs: say so, do not hang the client)
            raise APIError(503, f"The engine did not tell its status within {HEALTH_TIMEOUT_S:g} s; retry later.",
                           type="server_error", code="engine_unavailable") from None
        view = pipeline_view(status)
        self.metrics.observe_status(view)
        return self._json("status", {"model": self.model_name, "max_context": self.max_context,
                                     "uptime_s": round(time.time() - self.created, 3),
                                     "requests_running": self.metrics.active,
                                     "pipeline": view.to_dict()})

    async def reshape(self, request: Request) -> Response:
        """Reshape the pipeline now: {"stages": N} or {"boundaries": [0, ..., num_units]}.

        Everything a client can get wrong is a 4xx: a malformed body, an unknown key (a typo such as
        "stage" used to be ignored), a number out of the model's unit range (one past 64 bits used to
        fail to encode for a router: a 500), a shape that cannot be cut (400), or one that no device
        has the memory for (PlacementError: 409 reshape_does_not_fit; the old shape keeps serving).
        """
        from flexpipe.partition.graph import check_shape_numbers   # (here: this module imports no torch)

        self._authorize(request, "reshape")
        body = await self._body(request)
        unknown = sorted(set(body) - RESHAPE_KEYS)
        if unknown:
            raise bad_request(f"Unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: "
                              "send one of 'stages' (an integer) or 'boundaries' (a list of unit indices), "
                              "nothing else.", unknown[0], "unknown_parameter")
        stages, bounds = body.get("stages"), body.get("boundaries")
        if (stages is None) == (bounds is None):
            raise bad_request("Send exactly one of 'stages' (an integer) or 'boundaries' (a list of unit "
                              "indices from 0 to the number of units).", "stages")
        try:
            # (the engine checks them too: here they are a 400 before anything reaches it)
            check_shape_numbers(stages, bounds, self._num_units())
            stats = await self.engine.reshape(**({"stages": stages} if stages is not None else
                                                 {"boundaries": bounds}))
        except (PartitionError, RequestError, ValueError) as e:   # ConfigError is a ValueError
            raise bad_request(str(e), "stages" if stages is not None else "boundaries") from None
        except (PlacementError, ReshapeError) as e:   # the old shape serves on: a conflict, not a failure
            raise _api_error(e) from None
        return self._json("reshape", {"ok": True, "stats": jsonable(stats)})

    def _num_units(self) -> int | None:
        """The model's unit count (None for an engine that does not tell its config)."""
        n = getattr(getattr(self.engine, "config", None), "num_units", None)
        return n if isinstance(n, int) and n > 0 else None

    # --- generation --------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        self._authorize(request, "completions")
        req = parse_completion(await self._body(request))
        self._check_model(req.model)
        prompt = await _off_loop(len(req.prompt), self._prompt_ids, req.prompt)
        return await self._generate(request, "completions", req, prompt)

    async def chat_completions(self, request: Request) -> Response:
        self._authorize(request, "chat")
        req = parse_chat(await self._body(request))
        self._check_model(req.model)
        chars = sum(len(m["content"]) for m in req.messages)
        prompt = await _off_loop(chars, self.template.encode, self.engine.tokenizer, req.messages)
        return await self._generate(request, "chat", req, prompt)

    async def _generate(self, request: Request, endpoint: str, req: SamplingRequest,
                        prompt: list[int]) -> Response:
        chat = isinstance(req, ChatRequest)
        max_tokens = self._max_tokens(req, len(prompt), chat)
        self._in_vocab(req.stop_token_ids, "stop_token_ids")
        track = _Tracker(self.metrics, endpoint, len(prompt))
        kwargs = {k: v for k, v in req.sampling_kwargs().items() if v is not None}
        try:
            events = self.engine.generate(prompt, max_tokens=max_tokens, **kwargs)
        except Exception as e:
            track.fail()
            raise _api_error(e) from e
        gen = Generation(events, request.receive, self.stopping)
        try:
            first = await gen.next()
        except ClientGone:
            await gen.close()
            track.finish(CLIENT_GONE)
            return Response(status_code=CLIENT_GONE)
        except Exception as e:
            await gen.close()
            track.fail()
            raise _api_error(e) from e
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        shaper = _ChatChunks(rid, self.model_name) if chat else _TextChunks(rid, self.model_name)
        if req.stream:
            return EventStreamResponse(self._stream(gen, first, track, shaper, req.include_usage),
                                       headers={"x-request-id": rid})
        return await self._collect(gen, first, track, shaper)

    async def _collect(self, gen: Generation, event: Any, track: "_Tracker", shaper: Any) -> Response:
        texts: list[str] = []
        finish = None
        try:
            while event is not None:
                track.token(event)
                texts.append(event.text or "")
                finish = event.finish_reason or finish
                event = await gen.next()
        except ClientGone:
            track.finish(CLIENT_GONE)
            return Response(status_code=CLIENT_GONE)
        except Exception as e:   # ServerStopping included
            track.fail()
            raise _api_error(e) from e
        finally:
            await gen.close()
        try:
            reason = _finish_reason(finish)
        except APIError:
            track.fail()
            raise
        track.finish(200)
        return JSONResponse(shaper.whole("".join(texts), reason, track.usage()),
                            headers={"x-request-id": shaper.id})

    async def _stream(self, gen: Generation, event: Any, track: "_Tracker", shaper: Any,
                      include_usage: bool) -> AsyncIterator[bytes]:
        status = CLIENT_GONE  # unless the loop below reaches its end
        try:
            head = shaper.head()
            if head is not None:
                yield _sse(head)
            while event is not None:
                track.token(event)
                finish = _finish_reason(event.finish_reason) if event.finish_reason else None
                usage = track.usage() if finish and not include_usage else None
                for chunk in shaper.delta(event.text or "", finish, usage):
                    yield _sse(chunk)
                event = await gen.next() if not finish else None
            if include_usage:
                yield _sse(shaper.usage_only(track.usage()))
            yield b"data: [DONE]\n\n"
            status = 200
        except ClientGone:
            pass
        except Exception as e:  # noqa: BLE001 - the status line is sent: tell the client in the stream
            err = _api_error(e)
            status = err.status
            yield _sse(err.to_dict())
            yield b"data: [DONE]\n\n"
        finally:
            await gen.close()
            track.finish(status)

    # --- checks ------------------------------------------------------------------------------------
    def _authorize(self, request: Request, endpoint: str) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            return
        raise APIError(401, "Missing or invalid API key. Send the server's key as "
                       "'Authorization: Bearer <key>' (openai clients: api_key=...).",
                       param=None, code="invalid_api_key")

    async def _body(self, request: Request) -> dict[str, Any]:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_request_bytes:
            raise APIError(413, f"The request body has {length} bytes; this server takes at most "
                           f"{self.max_request_bytes}.", code="request_too_large")
        raw = bytearray()
        try:
            async with asyncio.timeout(self.body_timeout_s):
                async for part in request.stream():
                    raw += part
                    if len(raw) > self.max_request_bytes:
                        raise APIError(413, f"The request body is over {self.max_request_bytes} bytes.",
                                       code="request_too_large")
        except TimeoutError:
            raise APIError(408, f"The request body did not arrive within {self.body_timeout_s:g} s; send it "
                           "whole, at once.", code="request_timeout") from None
        except ClientDisconnect:   # gone while sending its body: a client's doing (499), not a server error
            raise APIError(CLIENT_GONE, "The client disconnected before its request body arrived.",
                           code="client_disconnected") from None
        return parse_json_body(bytes(raw))

    def _check_model(self, name: str, param: str | None = "model") -> None:
        if name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist on this server; it serves "
                           f"'{self.model_name}' (GET /v1/models).", param=param, code="model_not_found")

    def _encode(self, text: str) -> list[int]:
        ids = list(self.engine.tokenizer.encode(text))
        if not ids:
            raise bad_request("The prompt is empty; send at least one character.", "prompt")
        return ids

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self._encode(prompt)
        return self._in_vocab(prompt, "prompt")

    def _in_vocab(self, ids: list[int], param: str) -> list[int]:
        if ids and self.vocab_size is not None and max(ids) >= self.vocab_size:
            raise bad_request(f"'{param}' holds token id {max(ids)}; this model's vocabulary has ids 0 to "
                              f"{self.vocab_size - 1}.", param)
        return ids

    def _max_tokens(self, req: SamplingRequest, prompt_len: int, chat: bool) -> int:
        room = self.max_context - prompt_len
        if req.max_tokens is None:
            if room < 1:
                raise _too_long(self.max_context, prompt_len, 1, chat)
            default = self.default_max_tokens or (room if chat else COMPLETION_DEFAULT_MAX_TOKENS)
            return min(default, room)
        if req.max_tokens > room:
            raise _too_long(self.max_context, prompt_len, req.max_tokens, chat)
        return req.max_tokens

    # --- answers -----------------------------------------------------------------------------------
    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "flexpipe",
                "max_model_len": self.max_context}

    def _json(self, endpoint: str, body: dict[str, Any], status: int = 200) -> Response:
        if self.metrics is not None:
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
        return JSONResponse(body, status_code=status)

    async def api_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        if self.metrics is not None:
            self.metrics.requests.labels(endpoint=_endpoint(request), status=str(exc.status)).inc()
        headers = {"www-authenticate": "Bearer"} if exc.status == 401 else None
        if exc.code == "queue_full":
            headers = {"retry-after": str(QUEUE_FULL_RETRY_AFTER_S)}
        return JSONResponse(exc.to_dict(), status_code=exc.status, headers=headers)

    async def http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            message = f"There is no route {request.url.path}; see /v1/models, /v1/completions, " \
                      "/v1/chat/completions, /v1/flexpipe/status, /health, /metrics."
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}."
        else:
            message = str(exc.detail)
        err = APIError(exc.status_code, message, type="invalid_request_error" if exc.status_code < 500
                       else "server_error")
        return await self.api_error(request, err)

    async def internal_error(self, request: Request, exc: Exception) -> Response:
        log.error("unhandled %s on %s %s: %s", type(exc).__name__, request.method, request.url.path, exc)
        return await self.api_error(request, _api_error(exc))


class _Tracker:
    """Times one generation request and records it in the metrics when it ends."""

    def __init__(self, metrics: ServerMetrics, endpoint: str, prompt_tokens: int):
        self.metrics = metrics
        self.endpoint = endpoint
        self.prompt_tokens = prompt_tokens
        self.tokens = 0
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.done = False
        metrics.begin()

    def token(self, event: Any) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            self.metrics.ttft.observe(now - self.start)
        self.last = now
        if event.token_id is not None:
            self.tokens += 1

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.tokens,
                "total_tokens": self.prompt_tokens + self.tokens}

    def fail(self) -> None:
        """The request ends in an error raised to the error handler (which counts it)."""
        if not self.done:
            self.done = True
            self.metrics.end()

    def finish(self, status: int) -> None:
        """The request ends here with `status`."""
        if self.done:
            return
        self.done = True
        m = self.metrics
        m.end()
        m.requests.labels(endpoint=self.endpoint, status=str(status)).inc()
        if self.first is None:
            return
        m.prompt_tokens.inc(self.prompt_tokens)
        m.generation_tokens.inc(self.tokens)
        m.e2e.observe(self.last - self.start)
        if self.tokens > 1:
            m.tpot.observe((self.last - self.first) / (self.tokens - 1))


class _TextChunks:
    """Bodies of /v1/completions answers."""

    def __init__(self, rid: str, model: str):
        self.id, self.model, self.created = rid, model, int(time.time())

    def _base(self, choices: list[dict[str, Any]], usage: dict[str, int] | None) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage}

    def whole(self, text: str, finish: str, usage: dict[str, int]) -> dict[str, Any]:
        return self._base([{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], usage)

    def head(self) -> None:
        return None

    def delta(self, text: str, finish: str | None, usage: dict[str, int] | None) -> list[dict[str, Any]]:
        if not text and not finish:
            return []
        return [self._base([{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], usage)]

    def usage_only(self, usage: dict[str, int]) -> dict[str, Any]:
        return self._base([], usage)


class _ChatChunks:
    """Bodies of /v1/chat/completions answers."""

    def __init__(self, rid: str, model: str):
        self.id, self.model, self.created = rid, model, int(time.time())

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "system_fingerprint": None, "choices": choices, "usage": usage}

    def whole(self, text: str, finish: str, usage: dict[str, int]) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "system_fingerprint": None, "usage": usage,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": finish}]}

    def head(self) -> dict[str, Any]:
        return self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}], None)

    def delta(self, text: str, finish: str | None, usage: dict[str, int] | None) -> list[dict[str, Any]]:
        out = []
        if text:
            out.append(self._chunk([{"index": 0, "delta": {"content": text}, "logprobs": None,
                                     "finish_reason": None}], None))
        if finish:
            out.append(self._chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}],
                                   usage))
        return out

    def usage_only(self, usage: dict[str, int]) -> dict[str, Any]:
        return self._chunk([], usage)


# Characters JSON allows raw in a string that line splitters other than SSE's (Python's splitlines, and
# with it httpx's iter_lines; JavaScript before ES2019) take for line ends: sent escaped.
_LINE_ENDS = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _sse(body: dict[str, Any]) -> bytes:
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":")).translate(_LINE_ENDS)
    return b"data: " + text.encode() + b"\n\n"


def _finish_reason(reason: str | None) -> str:
    """OpenAI's finish reason for the engine's: 'stop' (EOS, stop string) or 'length'.

    A request the engine ended otherwise ("error" when a stage died and it could not be recomputed,
    "cancelled") did not finish: that is an error for the client, not a short answer.
    """
    if reason in ("error", "cancelled", "shutdown"):
        raise APIError(503, f"The pipeline ended this request early ({reason}); retry it.", type="server_error",
                       code="generation_failed")
    return "length" if reason == "length" else "stop"


async def _off_loop(size: int, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), in a worker thread when `size` (characters of text to tokenize) is large enough to
    hold up the event loop, and every stream on it, for more than a moment."""
    if size < OFF_LOOP_CHARS:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def _too_long(max_context: int, prompt_len: int, max_tokens: int, chat: bool) -> APIError:
    prompt = "messages" if chat else "prompt"
    return bad_request(
        f"This model's maximum context length is {max_context} tokens. However, you requested "
        f"{prompt_len + max_tokens} tokens ({prompt_len} in the {prompt}, {max_tokens} for the completion). "
        f"Please reduce the length of the {prompt} or of max_tokens.", "max_tokens" if prompt_len < max_context
        else prompt, "context_length_exceeded")


def _api_error(e: BaseException) -> APIError:
    """How an engine error reads to an HTTP client."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, CapacityError):
        return bad_request(f"{e} Reduce the prompt or max_tokens.", "max_tokens", "capacity_exceeded")
    if isinstance(e, QueueFullError):
        return APIError(429, str(e), type="rate_limit_error", code="queue_full")
    if isinstance(e, RequestError):
        return bad_request(str(e))
    if isinstance(e, ReshapeError):
        return APIError(409, f"{e}", type="invalid_request_error", code="reshape_aborted")
    if isinstance(e, PlacementError):   # (a reshape no device has the memory for; nothing changed)
        return APIError(409, f"{e}", type="invalid_request_error", code="reshape_does_not_fit")
    if isinstance(e, ServerStopping):
        return APIError(503, "The server is shutting down and ended this request before it finished; send it "
                        "again once the server is back.", type="server_error", code="server_shutdown")
    if isinstance(e, PipelineDown):
        log.error("pipeline down: %s", e)
        return APIError(503, f"The pipeline is down ({e}). GET /health says 503 until it serves again: a pipeline "
                        "this server runs must be restarted with it; a router's (serve --router) recovers when "
                        "a worker joins it, else the router must be restarted.", type="server_error",
                        code="pipeline_down")
    if isinstance(e, ActorError):
        log.error("engine unavailable: %s", e)
        return APIError(503, f"The engine is unavailable ({type(e).__name__}: {e}); retry later.",
                        type="server_error", code="engine_unavailable")
    if isinstance(e, FlexPipeError):
        log.error("engine error: %s: %s", type(e).__name__, e)
        return APIError(500, f"{type(e).__name__}: {e}", type="server_error")
    return APIError(500, "Internal server error (logged on the server).", type="server_error")


def _endpoint(request: Request) -> str:
    path = request.url.path
    for prefix, name in (("/v1/chat/", "chat"), ("/v1/completions", "completions"), ("/v1/models", "models"),
                         ("/v1/flexpipe/status", "status"), ("/v1/flexpipe/reshape", "reshape")):
        if path.startswith(prefix):
            return name
    return "other"



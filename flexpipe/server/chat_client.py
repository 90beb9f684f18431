"""The terminal chat client behind `flexpipe chat`: streams answers from a running server."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, TextIO

import httpx


class ServerError(Exception):
    """The server could not be reached or answered with an error (the message says which)."""


class ChatClient:
    """A conversation with one server: history, streaming turns, a line-based loop."""

    def __init__(self, url: str, *, api_key: str | None = None, model: str | None = None,
                 system: str | None = None, sampling: dict[str, Any] | None = None, timeout_s: float = 600.0):
        self.url = url.rstrip("/")
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers,
                                 timeout=httpx.Timeout(timeout_s, connect=10.0))
        self.model = model
        self.system = system
        self.sampling = {k: v for k, v in (sampling or {}).items() if v is not None}
        self.history: list[dict[str, str]] = []
        self.reset()

    def __enter__(self) -> "ChatClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.http.close()

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def connect(self) -> str:
        """Check the server and pick the model; returns the model name."""
        models = self._get("/v1/models")
        names = [m.get("id") for m in models.get("data", [])]
        if self.model is None:
            if not names:
                raise ServerError(f"{self.url} serves no model")
            self.model = names[0]
        elif self.model not in names:
            raise ServerError(f"{self.url} does not serve {self.model!r}; it serves {', '.join(names)}")
        return self.model

    def status_line(self) -> str:
        """One line about the pipeline: epoch, stages, devices, last reshape."""
        p = self._get("/v1/flexpipe/status").get("pipeline", {})
        stages = " | ".join(f"[{s.get('start')},{s.get('end')})@{s.get('device') or '?'}"
                            for s in p.get("stages", []))
        last = p.get("last_pause_s")
        pause = f", last reshape paused {last * 1000:.1f} ms" if last is not None else ""
        return (f"epoch {p.get('epoch')}: {len(p.get('stages', []))} stages {stages}; "
                f"{p.get('running', 0)} running, {p.get('waiting', 0)} waiting, "
                f"KV {100 * (p.get('kv_usage') or 0):.0f}%{pause}")

    def stream(self, text: str) -> Iterator[str]:
        """Send `text` as the next user message and yield the answer's pieces as they arrive."""
        body = {"model": self.model, "messages": self.history + [{"role": "user", "content": text}],
                "stream": True, **self.sampling}
        answer: list[str] = []
        try:
            with self.http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    raise ServerError(_error_text(r))
                for data in _sse_data(_lines(r.iter_text())):
                    if "error" in data:
                        raise ServerError(data["error"].get("message", str(data["error"])))
                    for choice in data.get("choices", []):
                        piece = (choice.get("delta") or {}).get("content") or ""
                        if piece:
                            answer.append(piece)
                            yield piece
        except httpx.HTTPError as e:
            raise ServerError(f"lost the server at {self.url}: {e}") from None
        except KeyboardInterrupt:   # stopped by the user: what was shown stays in the conversation
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(answer)}]
            raise
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(answer)}]

    def turn(self, text: str, out: TextIO) -> bool:
        """One exchange printed to `out`; False (with the reason printed) if it failed."""
        try:
            for piece in self.stream(text):
                out.write(_printable(piece))
                out.flush()
        except ServerError as e:
            out.write(f"\n[error] {e}\n")
            return False
        out.write("\n")
        out.flush()
        return True

    def repl(self, inp: TextIO, out: TextIO) -> int:
        """Read messages line by line until /quit or end of input; 1 when input came from a pipe or
        file and a turn failed (a script learns it from the exit status), else 0. Ctrl-C during an
        answer stops that answer (the request ends on the server) and keeps the conversation.

        A failed turn is left out of the conversation, as on the chat page, and says so: its cause
        often lies in the request itself (a prompt past the context), and kept, it would go with every
        later message and fail it too. /retry sends its message again, until another one is sent."""
        interactive = inp.isatty()
        failed = False
        retry: str | None = None   # the last message, if its turn failed
        out.write(f"Chatting with {self.model} at {self.url}. /reset, /retry, /status, /quit.\n")
        while True:
            if interactive:
                out.write("you> ")
                out.flush()
            line = inp.readline()
            if not line:
                return 1 if failed and not interactive else 0
            text = line.strip()
            if not text:
                continue
            if text in ("/quit", "/exit"):
                return 1 if failed and not interactive else 0
            if text == "/reset":
                self.reset()
                retry = None
                out.write("[conversation cleared]\n")
                continue
            if text == "/status":
                try:
                    out.write(self.status_line() + "\n")
                except ServerError as e:
                    out.write(f"[error] {e}\n")
                continue
            if text == "/retry":
                if retry is None:
                    out.write("[nothing to retry: /retry sends the last message again when its answer failed]\n")
                    continue
                text = retry
            out.write(f"{self.model}> ")
            retry = None
            try:
                if not self.turn(text, out):
                    failed, retry = True, text
                    out.write("[not part of the conversation: the model is not given this message or its "
                              "answer; /retry sends it again]\n")
            except KeyboardInterrupt:
                out.write("\n[stopped, kept in the conversation]\n")
                out.flush()

    def _get(self, path: str) -> dict[str, Any]:
        try:
            r = self.http.get(path)
        except httpx.HTTPError as e:
            raise ServerError(f"cannot reach {self.url} ({e}); is `flexpipe serve` running there?") from None
        if r.status_code != 200:
            raise ServerError(_error_text(r))
        return r.json()


def _lines(chunks: Iterator[str]) -> Iterator[str]:
    """The lines of a server-sent event stream: split at LF (and CRLF) only, as the SSE format says.
    (httpx's iter_lines splits like str.splitlines, also at U+0085, U+2028 and U+2029, which JSON
    strings may hold: a data line cut there was a JSONDecodeError's traceback.)"""
    buf = ""
    for chunk in chunks:
        buf += chunk
        *lines, buf = buf.split("\n")
        for line in lines:
            yield line.removesuffix("\r")
    if buf:
        yield buf


def _sse_data(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """JSON payloads of the `data:` lines of a server-sent event stream, up to [DONE]."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        try:
            yield json.loads(payload)
        except ValueError:
            raise ServerError(f"the server sent an event that is not JSON: {payload[:80]!r}") from None


# C0 and C1 control characters but newline and tab: written raw, model output could move the cursor,
# recolour or retitle the terminal (ESC sequences)
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    return _CONTROL.sub("\ufffd", text)


def _error_text(r: httpx.Response) -> str:
    try:
        message = r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = r.text[:200]
    return f"HTTP {r.status_code}: {message}"

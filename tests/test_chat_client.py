"""`flexpipe chat`'s client against server-sent event streams as servers write them (httpx's own
MockTransport in place of the network, so the client's real httpx stack reads every byte)."""

from __future__ import annotations

import io
import json

import pytest

httpx = pytest.importorskip("httpx")

from flexpipe.server.app import _sse  # noqa: E402
from flexpipe.server.chat_client import ChatClient  # noqa: E402


def _event(piece: str) -> bytes:
    # as a server that writes JSON with ensure_ascii=False and no escaping of U+2028 and friends
    body = {"choices": [{"index": 0, "delta": {"content": piece}}]}
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"


def _client(events: list[bytes], seen: list[dict] | None = None, interrupt_after: int | None = None) -> ChatClient:
    def stream():
        for i, e in enumerate(events):
            if interrupt_after is not None and i == interrupt_after:
                raise KeyboardInterrupt
            yield e
        yield b"data: [DONE]\n\n"

    def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(json.loads(request.content))
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=stream())

    c = ChatClient("http://test", model="tiny")
    c.http = httpx.Client(base_url="http://test", transport=httpx.MockTransport(handler))
    return c


class _Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_an_answer_holding_unicode_line_separators_is_read_whole():
    # httpx's iter_lines split the data line at U+2028 / U+0085: a JSONDecodeError traceback
    pieces = ["a\u2028b", "c\u0085d", "e\u2029f"]
    c = _client([_event(p) for p in pieces])
    assert list(c.stream("hi")) == pieces
    assert c.history[-1] == {"role": "assistant", "content": "".join(pieces)}


def test_the_server_escapes_them_so_that_any_line_splitter_keeps_its_events_whole():
    body = {"choices": [{"delta": {"content": "x\u2028y\u0085z\u2029"}}]}
    raw = _sse(body)
    line = raw.decode().removesuffix("\n\n")
    assert raw.endswith(b"\n\n") and line.splitlines() == [line]
    assert json.loads(raw.decode()[len("data: "):]) == body


def test_control_characters_of_an_answer_do_not_reach_the_terminal():
    out = _Pipe()
    c = _client([_event("red \x1b[31mtext\x07\ttab\nline\x9b")])
    assert c.turn("hi", out)
    assert "\x1b" not in out.getvalue() and "\x07" not in out.getvalue() and "\x9b" not in out.getvalue()
    assert "\ttab\nline" in out.getvalue()
    assert c.history[-1]["content"] == "red \x1b[31mtext\x07\ttab\nline\x9b"   # the history keeps the text as is


def test_piped_input_whose_turn_failed_exits_1():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {"message": "max_tokens is too large"}})

    c = ChatClient("http://test", model="tiny")
    c.http = httpx.Client(base_url="http://test", transport=httpx.MockTransport(handler))
    out = _Pipe()
    assert c.repl(_Pipe("hi\n"), out) == 1 and "[error] HTTP 400: max_tokens is too large" in out.getvalue()
    assert _client([_event("ok")]).repl(_Pipe("hi\n"), _Pipe()) == 0


def test_ctrl_c_stops_the_answer_and_keeps_the_conversation():
    seen: list[dict] = []
    c = _client([_event("par"), _event("tial"), _event("never")], seen, interrupt_after=2)
    out = _Pipe()
    assert c.repl(_Pipe("first\nsecond\n"), out) == 0   # the loop goes on to the second message
    assert "[stopped]" in out.getvalue()
    assert seen[1]["messages"][:2] == [{"role": "user", "content": "first"},
                                       {"role": "assistant", "content": "partial"}]

"""`flexpipe chat`'s client against server-sent event streams as servers write them (httpx's own
MockTransport in place of the network, so the client's real httpx stack reads every byte)."""

from __future__ import annotations

import io
import json
import socket

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
    assert "[stopped, kept in the conversation]" in out.getvalue()
    assert seen[1]["messages"][:2] == [{"role": "user", "content": "first"},
                                       {"role": "assistant", "content": "partial"}]


class _Lines(_Pipe):
    """Piped input that calls `before(line)` as it reads each line: the test acts between turns."""

    def __init__(self, text: str, before):
        super().__init__(text)
        self.before = before

    def readline(self, *args) -> str:   # type: ignore[override]
        line = super().readline(*args)
        self.before(line.strip())
        return line


@pytest.mark.timeout(60)
def test_a_failed_turn_is_said_to_be_left_out_and_retry_sends_it_again():
    # A real server on a port that answers nothing until the test starts it (a restart, say), and that
    # then refuses a prompt past the context. A failed turn used to leave the conversation without a
    # word (printed like the others, never sent again) and could only be resent by typing it anew.
    pytest.importorskip("starlette", reason="the 'serve' extra is not installed")
    from flexpipe.api import FlexPipe
    from flexpipe.server import ServerThread, create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ServerThread(create_app(lambda: FlexPipe.launch(model="tiny", stages=1, in_process=True)), port=port)
    c = ChatClient(f"http://127.0.0.1:{port}", model="tiny", sampling={"max_tokens": 3, "temperature": 0})
    reads: list[tuple[str, list[dict]]] = []   # each line as it is read, with the conversation then

    def before(line: str) -> None:
        reads.append((line, list(c.history)))
        if len(reads) == 3:   # "hello" failed: the server comes up before its /retry
            server.start()

    too_long = "x" * 5000   # more tokens than tiny's 2048-token context: the server's request validation
    out = _Pipe()
    try:
        with c:
            code = c.repl(_Lines(f"/retry\nhello\n/retry\n{too_long}\nagain\n/retry\n", before), out)
    finally:
        server.stop()
    text = out.getvalue()
    assert code == 1   # piped input with failed turns
    assert text.count("[nothing to retry") == 2   # before any turn, and after "again" was answered
    assert "lost the server" in text and "HTTP 400" in text and "maximum context length" in text
    assert text.count("[not part of the conversation: the model is not given this message or its answer; "
                      "/retry sends it again]") == 2
    assert reads[2] == ("/retry", [])   # the failed "hello" is not in the conversation
    hello = reads[4][1]
    assert reads[4][0] == "again" and [m["role"] for m in hello] == ["user", "assistant"]
    assert hello[0]["content"] == "hello"   # its retry is, once; the refused long prompt is not
    assert c.history[:2] == hello and c.history[2] == {"role": "user", "content": "again"} and len(c.history) == 4

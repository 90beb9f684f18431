"""A router daemon's max_message_bytes, as its clients see it.

`flexpipe router --max-message-bytes N` holds the router's mailbox to N bytes a frame: ZeroMQ cuts off a
peer that sends it a larger one, and that message is lost unread.  A client (RemoteFlexPipe: 1 GiB,
ActorSettings' default) did not know the router's limit: a Submit above it (a long prompt, or long stop
strings) was dropped at the router's socket, and the client waited out its ask timeout (AskTimeout; the
HTTP server of `flexpipe serve --router` answered 503 "retry later").  Now the router says its limit in
ModelInfo, the client holds every message to the router to it (Actor.send_limits: MessageTooLarge, sending
nothing), and a request too large for one message is a RequestError (an HTTP 400) that names the
router's --max-message-bytes.

The clients here ask with a 10 s timeout: before the fix, each of these tests failed when it ran out.
"""

from __future__ import annotations

import pytest

from flexpipe.errors import MessageTooLarge, RequestError
from flexpipe.runtime.remote import Cancel, RemoteFlexPipe
from tests.test_daemons import logs, one_torch_thread, router_and_worker  # noqa: F401 - (a module fixture: autouse)

# a router and a worker (~15 s on 2 cores): under `make test-slow`
pytestmark = [pytest.mark.timeout(60), pytest.mark.slow]

LIMIT = 64 << 10
LONG = 80_000   # prompt tokens: past the tiny model's 2,048-token context (and 80,000 bytes of msgpack, above LIMIT)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A router of one stage and one worker with one CPU device, both under LIMIT (their flag)."""
    limit = ["--max-message-bytes", str(LIMIT)]
    with router_and_worker(tmp_path_factory.mktemp("client-limit"), stages=1,
                           router_args=["--max-batch-tokens", "64", *limit], worker_args=limit) as url:
        yield url


def connect(url: str) -> RemoteFlexPipe:
    return RemoteFlexPipe.connect(url, ready_timeout=30, heartbeat_timeout=5, ask_timeout=10)


async def test_the_router_tells_its_limit_and_the_client_sends_it_nothing_larger(cluster):
    async with connect(cluster) as fp:
        assert fp.info.max_message_bytes == LIMIT
        assert fp.actor.settings.max_message_bytes > LIMIT   # (the client's own: the default)
        with pytest.raises(MessageTooLarge) as e:
            await fp.actor.tell(fp.frontend, Cancel("x" * LIMIT))
        assert f"exceeds max_message_bytes={LIMIT} (the receiver's)" in str(e.value), e.value
        assert (await fp.status())["state"] == "serving"   # (the router's mailbox did not cut the client off)


async def test_a_request_too_large_for_the_routers_messages_is_a_request_error_and_the_next_request_runs(cluster):
    async with connect(cluster) as fp:
        with pytest.raises(RequestError, match=f"the prompt has {LONG} tokens but the context holds"):
            await fp.complete([65] * LONG, max_tokens=1)   # (the router's words, before its message limit's)
        with pytest.raises(RequestError) as e:
            async for _ in fp.generate([65, 66], max_tokens=1, stop=["x" * LIMIT]):
                pass
        words = str(e.value)
        assert f"stop strings of {LIMIT} characters" in words and f"max_message_bytes={LIMIT}" in words, words
        assert "router's --max-message-bytes" in words, words
        assert isinstance(e.value.__cause__, MessageTooLarge)
        assert fp._behaviour.streams == {}   # (the id is free again: nothing to cancel at the router)
        c = await fp.complete("abc", max_tokens=4, ignore_eos=True)
        assert c.finish_reason == "length" and len(c.token_ids) == 4, (c, logs())


def test_the_http_server_answers_a_request_too_large_for_the_router_with_a_400(cluster):
    """What `flexpipe serve --router URL` runs; stop strings make the message large here (a prompt as
    long is refused for the model's context first)."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("starlette", reason="the 'serve' extra is not installed")
    from flexpipe.runtime.remote import connect as remote_connect
    from flexpipe.server import ServerThread, create_app

    app = create_app(lambda: remote_connect(cluster, ready_timeout=30, heartbeat_timeout=5, ask_timeout=10))
    with ServerThread(app) as base, httpx.Client(base_url=base, timeout=30) as http:
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 2,
                                               "stop": ["x" * LIMIT]})
        assert r.status_code == 400, f"{r.status_code} {r.text}\n{logs()}"
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and "--max-message-bytes" in err["message"], err
        assert f"stop strings of {LIMIT} characters" in err["message"], err
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 2})
        assert r.status_code == 200, r.text

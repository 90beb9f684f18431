"""Back-pressure under overload: with Settings.max_queued = Q, a burst of many more requests than the
pipeline can run leaves at most Q waiting; the rest are refused at once with a reason (RequestError in
the embedded API, a 4xx JSON error over HTTP), the router's records stay bounded, and every admitted
request finishes. Over HTTP the refusal is 429 (rate_limit_error, code queue_full)."""

from __future__ import annotations

import asyncio

import pytest

from flexpipe.api import FlexPipe
from flexpipe.errors import RequestError

pytestmark = pytest.mark.timeout(300)

QUEUE = 8
BURST = 120


async def test_overload_is_refused_beyond_the_queue_bound():
    async with FlexPipe.launch("tiny", stages=2, in_process=True, max_queued=QUEUE, max_batch_seqs=4) as fp:
        peak = {"waiting": 0, "streams": 0}
        outcome: list[str] = []

        async def one(i):
            try:
                async for _ in fp.generate(f"{i} overload", max_tokens=4, ignore_eos=True):
                    pass
                outcome.append("finished")
            except RequestError as e:
                assert "retry later" in str(e)
                outcome.append("refused")

        async def sample():
            while True:
                peak["waiting"] = max(peak["waiting"], len(fp.router.sched.waiting))
                peak["streams"] = max(peak["streams"], len(fp.router.streams))
                await asyncio.sleep(0)

        sampler = asyncio.ensure_future(sample())
        try:
            await asyncio.gather(*(one(i) for i in range(BURST)))
        finally:
            sampler.cancel()
        refused, finished = outcome.count("refused"), outcome.count("finished")
        print(f"\nburst {BURST}, max_queued {QUEUE}: finished {finished}, refused {refused}, peak {peak}")
        assert finished + refused == BURST and refused > 0 and finished >= QUEUE
        assert peak["waiting"] <= QUEUE
        # records held by the router: the queue plus what can run at once, not the burst
        assert peak["streams"] <= QUEUE + fp.settings.max_batch_seqs * 2 + 8
        assert not fp.router.streams and all(p["used"] == 0 for p in fp.status()["router"]["kv"])


starlette = pytest.importorskip("starlette", reason="the 'serve' extra is not installed")


async def _http_burst(url: str, n: int) -> dict[int, int]:
    import httpx

    codes: dict[int, int] = {}
    async with httpx.AsyncClient(base_url=url, timeout=120,
                                 limits=httpx.Limits(max_connections=n)) as client:
        async def one(i):
            r = await client.post("/v1/completions", json={"model": "tiny", "prompt": f"{i} x",
                                                           "max_tokens": 4, "ignore_eos": True})
            r.json()   # every answer is JSON, refusal included
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            return r
        rs = await asyncio.gather(*(one(i) for i in range(n)))
    codes["refusal_bodies"] = sorted({r.json()["error"]["message"] for r in rs if r.status_code >= 400})[:1]
    return codes


@pytest.fixture(scope="module")
def http_server():
    from flexpipe.server import ServerThread, create_app

    app = create_app(lambda: FlexPipe.launch("tiny", stages=2, in_process=True, max_queued=QUEUE,
                                             max_batch_seqs=4))
    with ServerThread(app) as url:
        yield url


@pytest.fixture(autouse=True)
def no_leaked_resources():
    """The module-scoped server outlives single tests; the first test holds its own resources."""
    yield


def _burst_codes(url):
    return asyncio.run(_http_burst(url, BURST))


def test_http_overload_is_refused_with_a_reason(http_server):
    codes = _burst_codes(http_server)
    print(f"\nHTTP burst {BURST}, max_queued {QUEUE}: {codes}")
    statuses = {k: v for k, v in codes.items() if isinstance(k, int)}
    assert sum(statuses.values()) == BURST
    assert not any(c >= 500 for c in statuses)
    assert any(400 <= c < 500 for c in statuses), "an overload this size must be refused"
    assert "retry later" in codes["refusal_bodies"][0]


def test_http_overload_refusal_is_429(http_server):
    codes = _burst_codes(http_server)
    assert 429 in codes and 400 not in codes


def test_a_stalled_body_gets_408_and_a_client_gone_mid_body_is_no_server_error():
    # a client that sent its headers and then stalled held its connection for ever (no body deadline);
    # one that closed mid-body was an "unhandled ClientDisconnect", a traceback and a 500 in /metrics
    import socket
    import time

    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from flexpipe.server import ServerThread, create_app

    app = create_app(lambda: FlexPipe.launch("tiny", stages=1, in_process=True), body_timeout_s=1.0)
    with ServerThread(app) as url:
        host, port = url.removeprefix("http://").split(":")
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                "Content-Length: 100\r\n\r\n").encode()
        with socket.create_connection((host, int(port)), timeout=20) as s:
            s.sendall(head + b'{"model"')
            got = b""
            while b"request_timeout" not in got:   # (headers and body may come in separate reads)
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
            answer = got.decode()
        assert answer.startswith("HTTP/1.1 408") and "request_timeout" in answer, answer[:300]
        with socket.create_connection((host, int(port)), timeout=20) as s:
            s.sendall(head + b'{"model"')
        deadline = time.monotonic() + 20

        def by_status() -> dict[str, float]:
            text = httpx.get(f"{url}/metrics").text
            return {s.labels["status"]: s.value for f in text_string_to_metric_families(text)
                    if f.name == "flexpipe_http_requests" for s in f.samples
                    if s.name.endswith("_total") and s.labels.get("endpoint") == "completions"}

        while by_status().get("499", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert by_status() == {"408": 1.0, "499": 1.0}

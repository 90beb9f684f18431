"""`flexpipe serve` over HTTP on 127.0.0.1: the official openai client, SSE, errors, API key, metrics,
status and client disconnects, against the real embedded engine (tiny model, two stage processes)."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("starlette", reason="the 'serve' extra is not installed")
openai = pytest.importorskip("openai", reason="the 'test' extra is not installed")

import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from flexpipe.server import ServerThread, create_app  # noqa: E402

KEY = "sk-test-flexpipe"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "tiny"


class Live:
    """A running server: its URL, an httpx client with the key, an openai client."""

    def __init__(self, url: str, app):
        self.url = url
        self.app = app
        self.http = httpx.Client(base_url=url, headers=AUTH, timeout=30)
        self.oai = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=30)

    @property
    def engine(self):
        return self.app.state.server.engine

    def status(self) -> dict:
        r = self.http.get("/v1/flexpipe/status")
        assert r.status_code == 200, r.text
        return r.json()

    def metrics(self) -> dict[str, list]:
        r = httpx.get(f"{self.url}/metrics", timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return {f.name: f.samples for f in text_string_to_metric_families(r.text)}


@pytest.fixture(scope="module")
def live():
    from flexpipe.api import FlexPipe

    app = create_app(lambda: FlexPipe.launch(model="tiny", stages=2), api_key=KEY)
    with ServerThread(app) as url:
        server = Live(url, app)
        yield server
        server.http.close()
        server.oai.close()


def _sse(lines) -> list[dict]:
    """The JSON events of an SSE body, checking that it ends with [DONE]."""
    events, done = [], False
    for line in lines:
        if not line.startswith("data: "):
            assert line == "", f"unexpected SSE line {line!r}"
            continue
        assert not done, "data after [DONE]"
        if line == "data: [DONE]":
            done = True
            continue
        events.append(json.loads(line[6:]))
    assert done, "the stream did not end with data: [DONE]"
    return events


def _wait_idle(live: Live, timeout_s: float = 15.0) -> dict:
    """Poll the status until no request runs and no KV block is held (each poll is an HTTP round trip)."""
    deadline = time.monotonic() + timeout_s
    while True:
        st = live.status()
        p = st["pipeline"]
        if st["requests_running"] == 0 and p["running"] == 0 and p["waiting"] == 0 and p["kv_blocks_used"] == 0:
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"the request was not freed: {st}")
        time.sleep(0.05)


# --- the OpenAI API through the official client -----------------------------------------------------
def test_models_and_health(live):
    models = live.oai.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].max_model_len == live.engine.max_context
    assert live.oai.models.retrieve(MODEL).id == MODEL
    r = httpx.get(f"{live.url}/health")  # no key needed
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_completion_equals_the_reference(live):
    prompt = "FlexPipe reshapes pipelines"
    c = live.oai.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    ref = live.engine.reference_tokens(prompt, max_tokens=12, temperature=0.0)
    tok = live.engine.tokenizer
    assert c.choices[0].text == tok.decode(ref)
    assert c.usage.completion_tokens == len(ref)
    assert c.usage.prompt_tokens == len(tok.encode(prompt))
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    assert c.choices[0].finish_reason in ("length", "stop")
    assert c.object == "text_completion" and c.model == MODEL


def test_completion_stream_matches_non_stream(live):
    args = dict(model=MODEL, prompt="Hello", max_tokens=10, temperature=0)
    whole = live.oai.completions.create(**args)
    chunks = list(live.oai.completions.create(**args, stream=True))
    assert len(chunks) > 1
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    last = chunks[-1]
    assert last.choices[0].finish_reason == whole.choices[0].finish_reason
    assert last.usage is not None and last.usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_with_include_usage_matches_non_stream(live):
    args = dict(model=MODEL, max_tokens=10, temperature=0.8, seed=1234,
                messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}])
    whole = live.oai.chat.completions.create(**args)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens >= 1
    again = live.oai.chat.completions.create(**args)  # same seed, same answer
    assert again.choices[0].message.content == whole.choices[0].message.content
    chunks = list(live.oai.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_usage_rides_in_the_last_chunk_by_default(live):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": True,
            "temperature": 0}
    with live.http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _sse(r.iter_lines())
    assert events[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert events[-1]["usage"]["completion_tokens"] >= 1
    assert all(e["usage"] is None for e in events[:-1])
    assert len({e["id"] for e in events}) == 1 and events[0]["id"].startswith("chatcmpl-")


async def test_concurrent_streams_each_get_their_own_answer(live):
    """Requests batched together in the pipeline answer as they would alone (greedy)."""
    import asyncio

    prompts = [f"Request number {i}: " + "word " * i for i in range(6)]
    alone = [live.oai.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0).choices[0].text
             for p in prompts]
    client = openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=60)

    async def one(p: str) -> str:
        stream = await client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream])

    together = await asyncio.gather(*(one(p) for p in prompts))
    await client.close()
    assert together == alone


# --- bad input: OpenAI-style errors, and the server keeps serving --------------------------------------
LONG = "x" * 5000


@pytest.mark.parametrize("path, body, status, param, words", [
    ("/v1/completions", b"{not json", 400, None, "not valid JSON"),
    ("/v1/completions", b"", 400, None, "empty"),
    ("/v1/completions", b"[]", 400, None, "JSON object"),
    ("/v1/completions", {"prompt": "x"}, 400, "model", "'model'"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt", "'prompt'"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model", "serves 'tiny'"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", "integer"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature", "at least 0"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 1.5}, 400, "top_p", "at most 1"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 3}, 400, "n", "n=1"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "best_of": 2}, 400, "best_of", "not supported"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 1}, 400, "logprobs", "not supported"),
    ("/v1/completions", {"model": MODEL, "prompt": LONG}, 400, "prompt", "maximum context length"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10**6}, 400, "max_tokens",
     "maximum context length"),
    ("/v1/completions", {"model": MODEL, "prompt": [99999]}, 400, "prompt", "vocabulary"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages", "'messages'"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content", "string or an array"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, 400,
     "messages[0].role", "not supported"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": True},
     400, "logprobs", "not supported"),
    ("/v1/nope", {}, 404, None, "no route"),
])
def test_bad_input_gets_an_openai_error(live, path, body, status, param, words):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = live.http.post(path, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and words in err["message"], err
    assert err["type"] == "invalid_request_error"


def test_errors_through_the_openai_client_and_server_still_serves(live):
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        live.oai.completions.create(model=MODEL, prompt=LONG, max_tokens=4)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        live.oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    r = live.http.get("/v1/completions")
    assert r.status_code == 405 and "not allowed" in r.json()["error"]["message"]
    ok = live.oai.completions.create(model=MODEL, prompt="still here", max_tokens=3, temperature=0)
    assert ok.usage.completion_tokens >= 1


def test_api_key_is_required_on_v1(live):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(f"{live.url}/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=headers)
        assert r.status_code == 401
        err = r.json()["error"]
        assert err["code"] == "invalid_api_key" and "Authorization: Bearer" in err["message"]
    assert httpx.get(f"{live.url}/v1/models").status_code == 401
    assert httpx.get(f"{live.url}/v1/flexpipe/status").status_code == 401
    bad = openai.OpenAI(base_url=f"{live.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    bad.close()
    page = httpx.get(f"{live.url}/")  # the chat page itself is public; it asks for the key
    assert page.status_code == 200 and "FlexPipe" in page.text


# --- disconnects ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_frees_its_request(live, stream):
    _wait_idle(live)
    gone_before = _samples(live.metrics(), "flexpipe_http_requests", status="499")
    budget = live.engine.max_context - 2
    body = {"model": MODEL, "prompt": "A", "max_tokens": budget, "temperature": 0, "stream": stream,
            "ignore_eos": True}
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=30) as client:
        if stream:
            with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                got = [next(lines) for _ in range(6)]
                assert any(line.startswith("data: {") for line in got)
                assert live.status()["requests_running"] == 1
        else:
            with pytest.raises(httpx.ReadTimeout):
                client.post("/v1/completions", json=body, timeout=0.5)
    # Leaving the blocks closed the connection mid-generation.
    st = _wait_idle(live)
    assert st["pipeline"]["kv_blocks_used"] == 0
    assert _samples(live.metrics(), "flexpipe_http_requests", status="499") == gone_before + 1
    ok = live.oai.completions.create(model=MODEL, prompt="after", max_tokens=3)
    assert ok.usage.completion_tokens >= 1


# --- metrics and status -----------------------------------------------------------------------------------
def _samples(families: dict[str, list], name: str, suffix: str = "_total", **labels) -> float:
    total = 0.0
    for s in families.get(name, []):
        if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items()):
            total += s.value
    return total


def test_metrics_parse_and_count(live):
    live.oai.completions.create(model=MODEL, prompt="count me", max_tokens=4, temperature=0)
    httpx.post(f"{live.url}/v1/completions", json={"model": MODEL, "prompt": "x"})  # 401
    m = live.metrics()
    assert _samples(m, "flexpipe_http_requests", endpoint="completions", status="200") >= 1
    assert _samples(m, "flexpipe_http_requests", status="401") >= 1
    assert _samples(m, "flexpipe_http_requests", status="400") >= 1
    assert _samples(m, "flexpipe_prompt_tokens") > 0
    assert _samples(m, "flexpipe_generation_tokens") >= 4
    assert _samples(m, "flexpipe_time_to_first_token_seconds", "_count") >= 1
    assert _samples(m, "flexpipe_time_per_output_token_seconds", "_count") >= 1
    assert _samples(m, "flexpipe_request_latency_seconds", "_count") >= 1
    assert _samples(m, "flexpipe_pipeline_stages", "") == 2
    assert _samples(m, "flexpipe_reserved_devices", "") >= 1
    for name in ("flexpipe_queue_length", "flexpipe_kv_cache_usage_ratio", "flexpipe_kv_cache_blocks_total",
                 "flexpipe_http_requests_running", "flexpipe_pipeline_epoch"):
        assert m[name], name
    assert m["flexpipe_reshapes"][0].name == "flexpipe_reshapes_total"
    assert "flexpipe_reshape_pause_seconds" in m  # histogram, filled as reshapes happen
    assert _samples(m, "flexpipe_kv_cache_blocks_total", "") > 0


def test_status_shows_the_shape(live):
    st = live.status()
    assert st["model"] == MODEL and st["max_context"] == live.engine.max_context
    stages = st["pipeline"]["stages"]
    assert len(stages) == 2
    assert stages[0]["start"] == 0 and stages[0]["end"] == stages[1]["start"]
    assert stages[-1]["end"] == live.engine.config.num_units

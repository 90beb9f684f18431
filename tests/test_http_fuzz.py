"""The HTTP API under hypothesis: bodies drawn over the request schema (each field valid or junk, plus
unknown fields and non-object bodies) against completions, chat, and reshape. Every answer is 2xx or
4xx, never 5xx; every non-streamed answer is JSON, every streamed 200 is SSE ending in [DONE]; the
server keeps serving afterwards."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("starlette", reason="the 'serve' extra is not installed")

import httpx  # noqa: E402
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from flexpipe.server import ServerThread, create_app  # noqa: E402

pytestmark = pytest.mark.timeout(400)

KEY = "sk-fuzz"
EXAMPLES = 80

junk = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                 st.text(max_size=12), st.lists(st.integers(-5, 300), max_size=4),
                 st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


def field(valid):
    return st.one_of(valid, junk)


def maybe(d: dict) -> st.SearchStrategy:
    """A dict strategy whose keys are each present or not."""
    return st.fixed_dictionaries({}, optional=d)


common = {
    "model": field(st.sampled_from(["tiny", "other"])),
    "max_tokens": field(st.integers(1, 4)),
    "temperature": field(st.floats(0, 2)),
    "top_p": field(st.floats(0, 1)),
    "top_k": field(st.integers(-1, 50)),
    "seed": field(st.integers(0, 2**31)),
    "stop": field(st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=3))),
    "stream": field(st.booleans()),
    "ignore_eos": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "n": junk, "logprobs": junk, "unknown_field": junk,
}
completion = maybe({**common, "prompt": field(st.one_of(st.text(max_size=40),
                                                        st.lists(st.integers(-3, 300), max_size=8)))})
message = st.fixed_dictionaries({"role": field(st.sampled_from(["system", "user", "assistant"])),
                                 "content": field(st.text(max_size=30))})
chat = maybe({**common, "messages": field(st.lists(message, max_size=3)),
              "max_completion_tokens": field(st.integers(1, 4))})
reshape = maybe({"stages": junk, "boundaries": junk, "devices": junk, "weights_from": junk})


def _small(body):   # keep generations short: a valid max_tokens is at most 4
    if isinstance(body, dict):
        for k in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(k), int) and not isinstance(body.get(k), bool) and body[k] > 4:
                body[k] = 4
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = 3
    return body


valid_common = {
    "model": st.just("tiny"), "max_tokens": st.integers(1, 4), "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1), "top_k": st.integers(-1, 50), "seed": st.integers(0, 2**31),
    "stop": st.lists(st.text(min_size=1, max_size=3), max_size=2), "stream": st.booleans(),
    "ignore_eos": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}
valid_completion = st.fixed_dictionaries(
    {"model": st.just("tiny"), "prompt": st.one_of(st.text(min_size=1, max_size=40),
                                                   st.lists(st.integers(0, 255), min_size=1, max_size=8))},
    optional={k: v for k, v in valid_common.items() if k != "model"})
valid_chat = st.fixed_dictionaries(
    {"model": st.just("tiny"),
     "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                 "content": st.text(max_size=30)}), min_size=1, max_size=3)},
    optional={k: v for k, v in valid_common.items() if k != "model"})

requests = st.one_of(
    st.tuples(st.just("/v1/completions"), valid_completion.map(_small)),
    st.tuples(st.just("/v1/chat/completions"), valid_chat.map(_small)),
    st.tuples(st.just("/v1/completions"), completion.map(_small)),
    st.tuples(st.just("/v1/chat/completions"), chat.map(_small)),
    st.tuples(st.just("/v1/flexpipe/reshape"), reshape),
    st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
              st.one_of(junk, st.binary(max_size=20))),                     # not an object
)


@pytest.fixture(scope="module")
def server():
    from flexpipe.api import FlexPipe

    app = create_app(lambda: FlexPipe.launch(model="tiny", stages=2, in_process=True), api_key=KEY)
    with ServerThread(app) as url:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
            yield http


@pytest.fixture(autouse=True)
def no_leaked_resources():
    """The module-scoped server outlives single tests (a fuzzed reshape opens new sockets): its
    sockets close with it."""
    yield


def _check(r: httpx.Response, path: str) -> None:
    assert 200 <= r.status_code < 500, (path, r.status_code, r.text[:300])
    ctype = r.headers.get("content-type", "")
    if ctype.startswith("text/event-stream"):
        assert r.status_code == 200
        events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
        assert events and events[-1] == "[DONE]", r.text[-200:]
        for e in events[:-1]:
            json.loads(e)
    else:
        body = r.json()
        assert isinstance(body, dict)
        if r.status_code >= 400:
            assert "error" in body and body["error"].get("message"), body


def test_http_api_fuzz_never_5xx(server):
    seen: dict[int, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(req=requests)
    def fuzz(req):
        path, body = req
        if isinstance(body, bytes):
            r = server.post(path, content=body, headers={"content-type": "application/json"})
        else:
            r = server.post(path, json=body)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        _check(r, path)

    fuzz()
    print(f"\nstatus codes: {dict(sorted(seen.items()))}")
    assert any(200 <= c < 300 for c in seen) and any(400 <= c < 500 for c in seen)
    r = server.post("/v1/completions", json={"model": "tiny", "prompt": "still here", "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert server.get("/health").status_code == 200

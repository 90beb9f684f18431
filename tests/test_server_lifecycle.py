"""The server around its engine's life: what it offers when KV memory is smaller than the model's
context, /health once the pipeline is down, streams still running when it shuts down, CORS, and the
`flexpipe serve` settings it refuses before starting.  uvicorn runs on the test's own event loop (a
real HTTP server on a real port) next to an in-process engine, so the tests can act on the engine
between requests."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest

pytest.importorskip("starlette", reason="the 'serve' extra is not installed")

import httpx  # noqa: E402
import uvicorn  # noqa: E402

from flexpipe.api import FlexPipe  # noqa: E402
from flexpipe.cli import main as cli_main  # noqa: E402
from flexpipe.errors import ConfigError  # noqa: E402
from flexpipe.server import create_app  # noqa: E402
from flexpipe.server.runner import _Server  # noqa: E402

MSG = [{"role": "user", "content": "hi"}]


@contextlib.asynccontextmanager
async def serving(app, graceful_s: float = 5.0):
    """uvicorn serving `app` on this loop; yields (the uvicorn server, an httpx client on its URL)."""
    server = _Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on",
                                    timeout_graceful_shutdown=graceful_s))
    task = asyncio.create_task(server.serve())
    try:
        assert await asyncio.to_thread(server.ready.wait, 60) and server.url, "the server did not start"
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            yield server, http
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


@pytest.mark.timeout(120)
async def test_requests_without_max_tokens_get_what_the_kv_memory_holds():
    # 8 blocks of 16 tokens per stage: 128 tokens, far below tiny's 2048-token context; a chat with
    # no max_tokens used to ask for the whole context and was refused as never fitting
    async with FlexPipe.launch(model="tiny", stages=1, in_process=True, num_blocks=8, block_size=16) as fp:
        assert fp.max_sequence_tokens == 128 < fp.max_context
        async with serving(create_app(fp)) as (_, http):
            card = (await http.get("/v1/models")).json()["data"][0]
            assert card["max_model_len"] == 128
            r = await http.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG, "seed": 1})
            assert r.status_code == 200, r.text
            usage = r.json()["usage"]
            assert usage["total_tokens"] <= 128
            r = await http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 500})
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
            assert "128" in r.json()["error"]["message"]


@pytest.mark.timeout(120)
async def test_health_says_down_once_the_pipeline_cannot_serve():
    async with FlexPipe.launch(model="tiny", stages=1, in_process=True) as fp:
        async with serving(create_app(fp)) as (_, http):
            r = await http.get("/health")
            assert r.status_code == 200 and r.json()["status"] == "ok"
            fp.router.fail_all("stage 0 died and could not be replaced")
            r = await http.get("/health")
            assert r.status_code == 503, r.text
            assert r.json()["status"] == "down" and "could not be replaced" in r.json()["reason"]
            r = await http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
            err = r.json()["error"]
            assert r.status_code == 503 and err["code"] == "pipeline_down" and "restarted" in err["message"]


@pytest.mark.timeout(120)
async def test_a_stream_running_at_shutdown_ends_with_an_error_event_and_done():
    # the router is paused after the first token, so the stream would run past the graceful window;
    # shortly before that window closes the server ends it in the SSE format instead of cutting it
    async with FlexPipe.launch(model="tiny", stages=1, in_process=True) as fp:
        async with serving(create_app(fp), graceful_s=1.0) as (server, http):
            body = {"model": "tiny", "messages": MSG, "max_tokens": 500, "ignore_eos": True, "stream": True}
            events, done = [], False
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if not line:
                        continue
                    if line == "data: [DONE]":
                        done = True
                        continue
                    events.append(json.loads(line.removeprefix("data: ")))
                    if len(events) == 2:   # the role chunk, then the first token
                        await fp.router.quiesce()
                        server.should_exit = True
            assert done, "the stream was cut without [DONE]"
            assert events[-1]["error"]["code"] == "server_shutdown", events[-1]
            assert all("choices" in e for e in events[:-1])
        fp.router.resume()
        st = fp.router.status()
        assert st["running"] == st["waiting"] == 0 and fp.router.cache.usage()[0]["used"] == 0


@pytest.mark.timeout(120)
async def test_cors_preflight_only_for_allowed_origins():
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    async with FlexPipe.launch(model="tiny", stages=1, in_process=True) as fp:
        async with serving(create_app(fp, allowed_origins=["https://app.example"])) as (_, http):
            r = await http.options("/v1/chat/completions", headers=preflight)
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
            assert "authorization" in r.headers["access-control-allow-headers"].lower()
            r = await http.options("/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
            assert "access-control-allow-origin" not in r.headers
        async with serving(create_app(fp)) as (_, http):   # by default no other origin may call it
            r = await http.options("/v1/chat/completions", headers=preflight)
            assert "access-control-allow-origin" not in r.headers


def _samples(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


@pytest.mark.timeout(120)
async def test_metrics_keep_the_servers_own_counters_while_the_engine_does_not_answer(monkeypatch):
    # A remote router that is gone (its status() raises) or hangs: Prometheus still gets the server's
    # own counters, flexpipe_engine_up says 0 and the runtime's gauges are left out rather than stale.
    import flexpipe.server.app as app_module
    from flexpipe.runtime.remote import RouterUnavailable

    monkeypatch.setattr(app_module, "HEALTH_TIMEOUT_S", 0.2)
    async with FlexPipe.launch(model="tiny", stages=1, in_process=True) as fp:
        async with serving(create_app(fp)) as (_, http):
            r = await http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
            assert r.status_code == 200, r.text
            r = await http.get("/metrics")
            assert r.status_code == 200
            up = _samples(r.text)
            assert up["flexpipe_engine_up"] == 1 and up["flexpipe_pipeline_stages"] == 1

            def gone():
                raise RouterUnavailable("the router at tcp://127.0.0.1:1 is gone")

            async def hangs():
                await asyncio.Event().wait()

            for status in (gone, hangs):
                monkeypatch.setattr(fp, "status", status)
                r = await http.get("/v1/flexpipe/status")   # an error saying so, not a hang
                assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable", r.text
                r = await http.get("/metrics")
                assert r.status_code == 200, r.text
                down = _samples(r.text)
                assert down["flexpipe_engine_up"] == 0, status
                assert "flexpipe_pipeline_stages" not in down and "flexpipe_reshapes_total" not in down
                assert down["flexpipe_generation_tokens_total"] == up["flexpipe_generation_tokens_total"] == 2
            monkeypatch.undo()
            assert _samples((await http.get("/metrics")).text)["flexpipe_engine_up"] == 1


def test_an_empty_api_key_is_refused_not_taken_as_no_key():
    with pytest.raises(ConfigError, match="api_key is empty"):
        create_app(lambda: None, api_key="")


@pytest.mark.parametrize("args, words", [
    (["--stages", "0"], "stages must be >= 1"),
    (["--port", "70000"], "port must be 0..65535"),
    (["--default-max-tokens", "-5"], "default_max_tokens must be >= 1"),
    (["--default-max-tokens", "0"], "default_max_tokens must be >= 1"),
    (["--api-key", ""], "api_key is empty"),
    (["./no-such-model-dir"], "unknown model preset './no-such-model-dir'"),
    (["--stages", "99"], "stages"),
])
def test_serve_refuses_bad_settings_before_loading_anything(args, words, capsys):
    assert cli_main(["serve", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("flexpipe: error: ") and words in err and "Traceback" not in err


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args, words", [
    (["--chat-template", "/nonexistent.jinja"], "chat template '/nonexistent.jinja' is neither a file"),
    (["--router", "nonsense"], "router 'nonsense' is not of the form tcp://HOST:PORT"),
    (["--router", "tcp://127.0.0.1:port"], "router 'tcp://127.0.0.1:port' is not of the form"),
    (["--router", "tcp://127.0.0.1:5555", "--autoscale"], "the router daemon has no control loop yet"),
    pytest.param(["--device", "cuda"], "sees no CUDA GPU",
                 marks=pytest.mark.skipif("_cuda_available()", reason="this torch has CUDA")),
])
def test_serve_refuses_what_it_would_trip_over_once_started(args, words, capsys, monkeypatch):
    # these used to start the server (and the engine) and end in a traceback, or (autoscale) be ignored
    def started(*a, **kw):
        raise AssertionError("flexpipe serve started a server")

    monkeypatch.setattr("flexpipe.server.runner.serve_forever", started)
    assert cli_main(["serve", "--port", "0", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("flexpipe: error: ") and words in err and "Traceback" not in err

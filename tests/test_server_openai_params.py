"""OpenAI request options the server either honours or refuses, never silently ignores: stop_token_ids
reaches the engine, options it does not implement are a 400 naming them, an empty prompt is refused,
max_completion_tokens counts on /v1/completions, a full queue says when to retry, and the context
error of a chat names its messages.  Parsing needs no engine; the rest runs against one in-process
engine served through httpx's ASGI transport (no sockets)."""

from __future__ import annotations

import pytest

pytest.importorskip("starlette", reason="the 'serve' extra is not installed")

import httpx  # noqa: E402
import pytest_asyncio  # noqa: E402

from flexpipe.server import create_app  # noqa: E402
from flexpipe.server.protocol import APIError, parse_chat, parse_completion  # noqa: E402

MSG = [{"role": "user", "content": "hi"}]
CONTEXT = 128   # 8 KV blocks of 16 tokens: a chat over this many tokens is too long
P = {"model": "m", "prompt": "x"}
C = {"model": "m", "messages": MSG}


# --- parsing ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, param", [
    ({**P, "min_tokens": 5}, "min_tokens"),
    ({**P, "repetition_penalty": 2.0}, "repetition_penalty"),
    ({**P, "min_p": 0.1}, "min_p"),
    ({**P, "min_p": "0"}, "min_p"),
    ({**P, "guided_json": {"type": "object"}}, "guided_json"),
    ({**P, "guided_regex": "[a-z]+"}, "guided_regex"),
    ({**P, "guided_choice": ["yes", "no"]}, "guided_choice"),
    ({**P, "guided_grammar": "root ::= 'a'"}, "guided_grammar"),
    ({**P, "structured_outputs": {"json": {}}}, "structured_outputs"),
    ({**C, "tool_choice": "required"}, "tool_choice"),
    ({**C, "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ({**C, "function_call": {"name": "get_weather"}}, "function_call"),
    ({**C, "modalities": ["text", "audio"]}, "modalities"),
    ({**C, "audio": {"voice": "alloy", "format": "wav"}}, "audio"),
])
def test_options_that_change_the_output_are_refused_by_name(body, param):
    parse = parse_chat if "messages" in body else parse_completion
    with pytest.raises(APIError) as e:
        parse(body)
    err = e.value.to_dict()["error"]
    assert e.value.status == 400 and err["param"] == param and err["code"] == "unsupported_value", err
    assert f"'{param}'" in err["message"] and err["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, param, words", [
    ({**P, "prompt": ""}, "prompt", "empty"),
    ({**P, "prompt": [""]}, "prompt", "empty"),
    ({**P, "prompt": []}, "prompt", "empty"),
    ({**P, "prompt": [[]]}, "prompt", "empty"),
    ({**P, "stop_token_ids": 5}, "stop_token_ids", "array of token ids"),
    ({**P, "stop_token_ids": [1, "a"]}, "stop_token_ids", "array of token ids"),
    ({**P, "stop_token_ids": [True]}, "stop_token_ids", "array of token ids"),
    ({**P, "stop_token_ids": [-1]}, "stop_token_ids", "non-negative"),
    ({**P, "max_completion_tokens": 0}, "max_completion_tokens", ">= 1"),
])
def test_bad_values_are_a_400_saying_what_to_send(body, param, words):
    with pytest.raises(APIError) as e:
        parse_completion(body)
    assert e.value.status == 400 and e.value.param == param and words in e.value.message


def test_stop_token_ids_max_completion_tokens_and_neutral_values_are_taken():
    neutral = {"min_tokens": 0, "repetition_penalty": 1, "min_p": 0.0, "tool_choice": "none",
               "function_call": "auto", "modalities": ["text"], "audio": None}
    req = parse_completion({**P, **neutral, "stop_token_ids": [5, 7], "max_completion_tokens": 3})
    assert req.sampling_kwargs()["stop_token_ids"] == [5, 7]
    assert req.max_tokens == 3
    # as on chat: max_completion_tokens (OpenAI's newer name) wins over max_tokens
    assert parse_completion({**P, "max_tokens": 9, "max_completion_tokens": 3}).max_tokens == 3
    assert parse_chat({**C, **neutral, "tool_choice": "auto", "stop_token_ids": []}).sampling_kwargs() \
        == parse_chat(C).sampling_kwargs()


# --- against an engine --------------------------------------------------------------------------------
@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served():
    """(the engine, an httpx client on the app) shared by the tests below."""
    from flexpipe.api import FlexPipe

    async with FlexPipe.launch(model="tiny", stages=1, in_process=True, num_blocks=CONTEXT // 16,
                               block_size=16) as fp:
        transport = httpx.ASGITransport(app=create_app(fp))
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as http:
            yield fp, http


@pytest.mark.timeout(60)
@pytest.mark.asyncio(loop_scope="module")
async def test_stop_token_ids_end_the_answer(served):
    fp, http = served
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    base = await fp.complete("Hello", max_tokens=12, temperature=0.0, ignore_eos=True)
    toks = base.token_ids
    # a token past the first that the answer had not held before: ids that end the answer there
    stop_at = min(i for i, t in enumerate(toks) if i and toks.index(t) == i)
    assert stop_at + 1 < len(toks), toks
    r = await http.post("/v1/completions", json={**body, "stop_token_ids": [toks[stop_at]]})
    assert r.status_code == 200, r.text
    choice, usage = r.json()["choices"][0], r.json()["usage"]
    assert choice["finish_reason"] == "stop" and usage["completion_tokens"] <= stop_at + 1 < len(toks)
    # an id outside the vocabulary: a 400 naming the parameter, in OpenAI's error JSON
    vocab = fp.config.vocab_size
    r = await http.post("/v1/completions", json={**body, "stop_token_ids": [vocab]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "stop_token_ids" and f"0 to {vocab - 1}" in r.json()["error"]["message"]


@pytest.mark.timeout(60)
@pytest.mark.asyncio(loop_scope="module")
async def test_empty_prompt_is_a_400_not_an_answer_from_bos_alone(served):
    _, http = served
    for prompt in ("", [""]):
        r = await http.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 4})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


@pytest.mark.timeout(60)
@pytest.mark.asyncio(loop_scope="module")
async def test_a_full_queue_is_a_429_with_retry_after(served, monkeypatch):
    fp, http = served
    monkeypatch.setattr(fp.router.sched, "queued_new", lambda: fp.settings.max_queued)
    for stream in (False, True):
        r = await http.post("/v1/completions", json={"model": "tiny", "prompt": "q", "max_tokens": 4,
                                                     "stream": stream})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full", r.text
        assert int(r.headers["retry-after"]) >= 1


@pytest.mark.timeout(60)
@pytest.mark.asyncio(loop_scope="module")
async def test_a_chat_too_long_for_the_context_names_its_messages(served):
    _, http = served
    long = [{"role": "user", "content": "x" * CONTEXT}]
    r = await http.post("/v1/chat/completions", json={"model": "tiny", "messages": long, "max_tokens": 4})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages", err

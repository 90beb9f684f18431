"""The server's pure parts: request validation, chat templates, settings resolution (no engine, no sockets)."""

from __future__ import annotations

import argparse
import json

import pytest

pytest.importorskip("starlette", reason="the 'serve' extra is not installed")

from flexpipe.errors import ConfigError  # noqa: E402
from flexpipe.model.tokenizer import ByteTokenizer  # noqa: E402
from flexpipe.server import cli  # noqa: E402
from flexpipe.server.chat_template import DEFAULT_CHAT_TEMPLATE, ChatTemplate, load_template_source  # noqa: E402
from flexpipe.server.protocol import APIError, parse_chat, parse_completion, parse_json_body  # noqa: E402
from flexpipe.server.status import pipeline_view  # noqa: E402
from flexpipe.settings import resolve_settings  # noqa: E402

MSG = [{"role": "user", "content": "hi"}]


# --- protocol -----------------------------------------------------------------------------------------
def test_completion_defaults_and_fields():
    req = parse_completion({"model": "m", "prompt": "x", "max_tokens": 5, "temperature": 0, "top_p": 0.5,
                            "top_k": 3, "seed": 7, "stop": "\n", "stream": True,
                            "stream_options": {"include_usage": True}, "user": "ignored"})
    assert (req.prompt, req.max_tokens, req.temperature, req.top_p, req.top_k, req.seed, req.stop) == \
        ("x", 5, 0.0, 0.5, 3, 7, ["\n"])
    assert req.stream and req.include_usage
    assert req.sampling_kwargs() == {"temperature": 0.0, "top_k": 3, "top_p": 0.5, "seed": 7, "stop": ["\n"]}
    d = parse_completion({"model": "m", "prompt": [1, 2, 3]})
    assert d.prompt == [1, 2, 3] and d.max_tokens is None and not d.stream
    assert d.sampling_kwargs()["top_k"] == 0  # -1 (OpenAI/vLLM "off") becomes the engine's 0
    assert parse_completion({"model": "m", "prompt": ["only one"]}).prompt == "only one"


def test_top_p_zero_is_greedy():
    """OpenAI takes top_p in [0, 1]; a nucleus of mass 0 keeps only the most likely token."""
    req = parse_completion({"model": "m", "prompt": "x", "temperature": 0.8, "top_p": 0, "seed": 3})
    assert req.sampling_kwargs()["temperature"] == 0.0 and req.sampling_kwargs()["top_p"] == 1.0


def test_an_assistant_message_without_content_is_taken_as_empty():
    # OpenAI's API allows content null on an assistant message (one that only called tools, or a
    # history a client replays); it was a 400
    req = parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": None},
                                                 {"role": "user", "content": "again"}]})
    assert req.messages[1] == {"role": "assistant", "content": ""}
    with pytest.raises(APIError, match="not null"):   # a user's message must say something
        parse_chat({"model": "m", "messages": [{"role": "user", "content": None}]})


def test_chat_content_parts_and_max_completion_tokens():
    req = parse_chat({"model": "m", "max_completion_tokens": 9, "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert req.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]
    assert req.max_tokens == 9


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "x"}, "model", "Missing required parameter: 'model'"),
    ({"model": "m"}, "prompt", "Missing required parameter: 'prompt'"),
    ({"model": 3, "prompt": "x"}, "model", "non-empty string"),
    ({"model": "m", "prompt": 3}, "prompt", "string or a list of token ids"),
    ({"model": "m", "prompt": ["a", "b"]}, "prompt", "one prompt per request"),
    ({"model": "m", "prompt": [1, -2]}, "prompt", "non-negative"),
    ({"model": "m", "prompt": "x", "max_tokens": "9"}, "max_tokens", "must be an integer"),
    ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens", "integer >= 1"),
    ({"model": "m", "prompt": "x", "max_tokens": True}, "max_tokens", "must be an integer"),
    ({"model": "m", "prompt": "x", "temperature": 2.5}, "temperature", "at most 2"),
    ({"model": "m", "prompt": "x", "temperature": "hot"}, "temperature", "must be a number"),
    ({"model": "m", "prompt": "x", "top_p": -0.1}, "top_p", "at least 0"),
    ({"model": "m", "prompt": "x", "top_k": -5}, "top_k", "integer from -1"),
    ({"model": "m", "prompt": "x", "seed": -1}, "seed", "from 0"),
    ({"model": "m", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"model": "m", "prompt": "x", "stop": [1]}, "stop", "array of strings"),
    ({"model": "m", "prompt": "x", "n": 2}, "n", "n=1"),
    ({"model": "m", "prompt": "x", "n": True}, "n", "n=1"),   # True == 1 in Python, not in JSON
    ({"model": "m", "prompt": "x", "best_of": True}, "best_of", "not supported"),
    ({"model": "m", "prompt": "x", "best_of": 3}, "best_of", "not supported"),
    ({"model": "m", "prompt": "x", "logprobs": 2}, "logprobs", "not supported"),
    ({"model": "m", "prompt": "x", "logprobs": 0}, "logprobs", "not supported"),
    ({"model": "m", "prompt": "x", "echo": True}, "echo", "not supported"),
    ({"model": "m", "prompt": "x", "suffix": "y"}, "suffix", "not supported"),
    ({"model": "m", "prompt": "x", "presence_penalty": 0.5}, "presence_penalty", "send 0"),
    ({"model": "m", "prompt": "x", "logit_bias": {"1": 5}}, "logit_bias", "not supported"),
    ({"model": "m", "prompt": "x", "stream": "yes"}, "stream", "true or false"),
    ({"model": "m", "prompt": "x", "temperature": 10 ** 400}, "temperature", "out of range"),   # no float holds it
    ({"model": "m", "prompt": "x", "seed": 10 ** 4000}, "seed", "4001-digit number is out of range"),
    ({"model": "m", "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options",
     "only allowed when 'stream' is true"),
])
def test_completion_rejections(body, param, words):
    with pytest.raises(APIError) as e:
        parse_completion(body)
    assert e.value.status == 400 and e.value.param == param and words in e.value.message
    err = e.value.to_dict()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, param, words", [
    ({"model": "m"}, "messages", "Missing required parameter: 'messages'"),
    ({"model": "m", "messages": []}, "messages", "non-empty array"),
    ({"model": "m", "messages": "hi"}, "messages", "non-empty array"),
    ({"model": "m", "messages": ["hi"]}, "messages[0]", "must be an object"),
    ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "one of system"),
    ({"model": "m", "messages": [{"role": "user"}]}, "messages[0].content", "string or an array"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0]", "only text parts"),
    ({"model": "m", "messages": MSG, "logprobs": True}, "logprobs", "not supported"),
    ({"model": "m", "messages": MSG, "top_logprobs": 2}, "top_logprobs", "not supported"),
    ({"model": "m", "messages": MSG, "tools": [{"type": "function"}]}, "tools", "tool calling"),
    ({"model": "m", "messages": MSG, "response_format": {"type": "json_object"}}, "response_format", "text"),
    ({"model": "m", "messages": MSG, "max_completion_tokens": 0}, "max_completion_tokens", ">= 1"),
])
def test_chat_rejections(body, param, words):
    with pytest.raises(APIError) as e:
        parse_chat(body)
    assert e.value.status == 400 and e.value.param == param and words in e.value.message


@pytest.mark.parametrize("raw, words", [(b"", "empty"), (b"{nope", "not valid JSON"), (b"[1, 2]", "JSON object"),
                                        (b"\xff\xfe", "not valid JSON"),
                                        (b'{"max_tokens": ' + b"9" * 5000 + b"}", "not valid JSON"),
                                        (b"[" * 100_000 + b"]" * 100_000, "too deeply"),
                                        (b'{"model": "m", "prompt": "a\\ud800b"}', "surrogate"),
                                        (b'{"messages": [{"content": "\\udc00"}]}', "surrogate")])
def test_json_body_rejections(raw, words):
    with pytest.raises(APIError) as e:
        parse_json_body(raw)
    assert e.value.status == 400 and words in e.value.message


# --- chat templates -------------------------------------------------------------------------------------
def test_default_template_for_byte_tokenizer():
    tok = ByteTokenizer()
    t = ChatTemplate.for_tokenizer(tok)
    assert t.is_default and t.source == DEFAULT_CHAT_TEMPLATE
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    assert t.render(msgs) == "System: S\nUser: hi\nAssistant:"
    assert t.encode(tok, msgs) == [tok.bos_token_id, *b"System: S\nUser: hi\nAssistant:"]


HF_STYLE = ("{{ bos_token }}{% for m in messages %}"
            "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
            "[{{ m['role'] }}]{{ m['content'] | trim }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}")


class _Tok:
    """A tokenizer as HF checkpoints bring it: its own template and named special tokens."""

    chat_template = HF_STYLE
    bos_token, eos_token = "<s>", "</s>"

    def encode(self, text, add_special_tokens=True):
        self.last = (text, add_special_tokens)
        return [1, 2, 3]


def test_checkpoint_template_renders_specials_and_is_encoded_without_adding_them():
    tok = _Tok()
    t = ChatTemplate.for_tokenizer(tok)
    assert not t.is_default
    assert t.encode(tok, [{"role": "user", "content": " hi "}]) == [1, 2, 3]
    assert tok.last == ("<s>[user]hi</s>[assistant]", False)


def test_template_refusal_is_a_400_naming_the_reason():
    t = ChatTemplate(HF_STYLE)
    with pytest.raises(APIError) as e:
        t.render([{"role": "assistant", "content": "x"}])
    assert e.value.status == 400 and "must alternate" in e.value.message


def test_template_sources(tmp_path):
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "T"},
                                                 {"name": "default", "template": "{{ 'D' }}"}]}))
    assert load_template_source(str(cfg)) == "{{ 'D' }}"
    j = tmp_path / "t.jinja"
    j.write_text("{{ messages | length }}")
    assert ChatTemplate(load_template_source(str(j))).render(MSG) == "1"
    assert load_template_source("{{ 'inline' }}") == "{{ 'inline' }}"
    with pytest.raises(ConfigError, match="neither a file"):
        load_template_source("no-such-file.jinja")
    with pytest.raises(ConfigError, match="does not compile"):
        ChatTemplate("{% for %}")


# --- status view -----------------------------------------------------------------------------------------
def test_pipeline_view_tolerates_missing_numbers():
    v = pipeline_view({})
    assert (v.epoch, v.stages, v.kv_usage, v.reshapes_total, v.last_pause_s) == (0, [], 0.0, 0, None)
    json.dumps(v.to_dict())


# --- settings: flag > env > config file > default ------------------------------------------------------
def _serve_args(argv):
    parser = argparse.ArgumentParser()
    cli.add_serve_parser(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_settings_precedence(tmp_path):
    f = tmp_path / "flexpipe.yaml"
    f.write_text("serve:\n  port: 9001\n  stages: 3\n  api-key: from-file\n  in_process: true\n")
    args = _serve_args(["--config", str(f), "--port", "9100"])
    cfg = resolve_settings(cli.SERVE_SETTINGS, args, "serve", environ={"FLEXPIPE_STAGES": "4"})
    assert cfg["port"] == 9100  # flag
    assert cfg["stages"] == 4  # environment over file
    assert cfg["api_key"] == "from-file" and cfg["in_process"] is True  # file
    assert cfg["host"] == "127.0.0.1" and cfg["model"] == "tiny"  # defaults
    toml = tmp_path / "s.toml"
    toml.write_text('model = "tiny"\nport = 8123\n')
    cfg = resolve_settings(cli.SERVE_SETTINGS, _serve_args([]), "serve", environ={"FLEXPIPE_CONFIG": str(toml)})
    assert cfg["port"] == 8123


def test_settings_errors_say_what_is_wrong(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="unknown setting.*prot"):
        resolve_settings(cli.SERVE_SETTINGS, _serve_args(["--config", str(f)]), "serve", environ={})
    with pytest.raises(ConfigError, match="FLEXPIPE_PORT"):
        resolve_settings(cli.SERVE_SETTINGS, _serve_args([]), "serve", environ={"FLEXPIPE_PORT": "eighty"})
    with pytest.raises(ConfigError, match="FLEXPIPE_IN_PROCESS"):
        resolve_settings(cli.SERVE_SETTINGS, _serve_args([]), "serve", environ={"FLEXPIPE_IN_PROCESS": "maybe"})
    with pytest.raises(ConfigError, match="cannot read"):
        resolve_settings(cli.SERVE_SETTINGS, _serve_args(["--config", str(tmp_path / "none.yaml")]), "serve",
                    environ={})


def test_help_names_every_setting_with_its_environment_variable(capsys):
    from flexpipe.cli import main as flexpipe

    with pytest.raises(SystemExit):
        flexpipe(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for s in cli.SERVE_SETTINGS + cli.RUNTIME_SETTINGS:
        assert s.env in text.replace("- ", "-"), s.name
    with pytest.raises(SystemExit):
        flexpipe(["chat", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "FLEXPIPE_URL" in text and "FLEXPIPE_CHAT_MAX_TOKENS" in text and "--message" in text


def test_runtime_flags_match_the_runtime_settings():
    import dataclasses

    from flexpipe.api import Settings

    fields = {f.name: f.default for f in dataclasses.fields(Settings)}
    flags = {s.name: s.default for s in cli.RUNTIME_SETTINGS}
    assert flags == fields, "flexpipe.api.Settings changed: update RUNTIME_SETTINGS in flexpipe/server/cli.py"


def test_runtime_settings_from_env_and_file(tmp_path):
    f = tmp_path / "f.yaml"
    f.write_text("num_blocks: 64\n")
    args = _serve_args(["--config", str(f), "--block-size", "8"])
    cfg = resolve_settings(cli.SERVE_SETTINGS + cli.RUNTIME_SETTINGS, args, "serve", environ={"FLEXPIPE_MAX_QUEUED": "5"})
    assert (cfg["num_blocks"], cfg["block_size"], cfg["max_queued"], cfg["dtype"]) == (64, 8, 5, "float32")

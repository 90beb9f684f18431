"""OpenAI request validation: JSON bodies in, typed requests or OpenAI-style errors out."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

# Sampling ranges accepted by the OpenAI API; the engine may be stricter and says so itself.
MAX_STOP_SEQUENCES = 4
MAX_SEED = 2**63 - 1
CHAT_ROLES = ("system", "developer", "user", "assistant")
# Options that change the output (vLLM's extensions included), by the value that leaves it unchanged
NEUTRAL_OPTIONS = {"presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1, "min_p": 0,
                   "min_tokens": 0}
STRUCTURED_OUTPUT_OPTIONS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar",
                             "structured_outputs")


class APIError(Exception):
    """An HTTP error answered with OpenAI's error JSON; the message says what to change."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def to_dict(self) -> dict[str, Any]:
        """The body OpenAI clients parse: {"error": {"message", "type", "param", "code"}}."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 invalid_request_error about one parameter."""
    return APIError(400, message, param=param, code=code)


@dataclass
class SamplingRequest:
    """Fields shared by completions and chat completions, validated."""

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)   # vLLM's extension: ids that end the answer
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens even past end-of-sequence
    stream: bool = False
    include_usage: bool = False

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of engine.generate() other than the prompt and max_tokens."""
        out = {"temperature": self.temperature, "top_k": self.top_k if self.top_k > 0 else 0,
               "top_p": self.top_p, "seed": self.seed, "stop": list(self.stop) or None}
        if self.stop_token_ids:
            out["stop_token_ids"] = list(self.stop_token_ids)
        if self.ignore_eos:
            out["ignore_eos"] = True
        return out


@dataclass
class CompletionRequest(SamplingRequest):
    """A validated /v1/completions request: the prompt is text or token ids."""

    prompt: str | list[int] = ""


@dataclass
class ChatRequest(SamplingRequest):
    """A validated /v1/chat/completions request: messages with text content only."""

    messages: list[dict[str, str]] = field(default_factory=list)


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """Decode a request body that must be one JSON object."""
    if not raw.strip():
        raise bad_request("The request body is empty; send a JSON object "
                          "(Content-Type: application/json).")
    try:
        body = json.loads(raw)
    except ValueError as e:   # JSONDecodeError, UnicodeDecodeError, and an integer of over 4300 digits
        raise bad_request(f"The request body is not valid JSON ({str(e)[:200]}); send a JSON object.",
                          code="invalid_json") from None
    except RecursionError:    # arrays or objects nested thousands deep
        raise bad_request("The request body nests arrays or objects too deeply; send a flat JSON object.",
                          code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request(f"The request body must be a JSON object, not {_kind(body)}.",
                          code="invalid_json")
    try:   # JSON may escape lone UTF-16 surrogates (\ud800) that no text can hold
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError as e:
        raise bad_request(f"The request body holds a lone UTF-16 surrogate escape ({e.object[e.start:e.end]!a}); "
                          "send valid Unicode text.", code="invalid_json") from None
    return body


def parse_completion(body: dict[str, Any]) -> CompletionRequest:
    """Validate a /v1/completions body (raises APIError)."""
    _reject_unsupported(body, chat=False)
    if "prompt" not in body:
        raise bad_request("Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
    req = CompletionRequest(**_sampling_fields(body), prompt=_prompt(body["prompt"]))
    return req


def parse_chat(body: dict[str, Any]) -> ChatRequest:
    """Validate a /v1/chat/completions body (raises APIError)."""
    _reject_unsupported(body, chat=True)
    if "messages" not in body:
        raise bad_request("Missing required parameter: 'messages'.", "messages",
                          "missing_required_parameter")
    return ChatRequest(**_sampling_fields(body), messages=_messages(body["messages"]))


# --- fields ---------------------------------------------------------------------------------------
def _sampling_fields(body: dict[str, Any]) -> dict[str, Any]:
    if "model" not in body:
        raise bad_request("Missing required parameter: 'model' (GET /v1/models lists the served name).",
                          "model", "missing_required_parameter")
    if not isinstance(body["model"], str) or not body["model"]:
        raise bad_request(f"'model' must be a non-empty string, not {_kind(body['model'])}.", "model")
    out: dict[str, Any] = {"model": body["model"]}
    if body.get("max_tokens") is not None:
        out["max_tokens"] = _int(body, "max_tokens", lo=1)
    if body.get("max_completion_tokens") is not None:   # OpenAI's newer name of max_tokens: it wins
        out["max_tokens"] = _int(body, "max_completion_tokens", lo=1)
    if body.get("temperature") is not None:
        out["temperature"] = _number(body, "temperature", lo=0.0, hi=2.0)
    if body.get("top_p") is not None:
        out["top_p"] = _number(body, "top_p", lo=0.0, hi=1.0)
        if out["top_p"] == 0.0:   # OpenAI accepts 0: the nucleus shrinks to the most likely token
            out["top_p"], out["temperature"] = 1.0, 0.0
    if body.get("top_k") is not None:
        out["top_k"] = _int(body, "top_k", lo=-1, hi=2**31 - 1)
    if body.get("seed") is not None:
        out["seed"] = _int(body, "seed", lo=0, hi=MAX_SEED)
    if body.get("stop") is not None:
        out["stop"] = _stop(body["stop"])
    if body.get("stop_token_ids") is not None:
        out["stop_token_ids"] = _token_ids(body["stop_token_ids"], "stop_token_ids")
    for name in ("stream", "ignore_eos"):
        flag = body.get(name)
        if flag is not None and not isinstance(flag, bool):
            raise bad_request(f"'{name}' must be true or false, not {_kind(flag)}.", name)
        out[name] = bool(flag)
    opts = body.get("stream_options")
    if opts is not None:
        if not out["stream"]:
            raise bad_request("'stream_options' is only allowed when 'stream' is true.", "stream_options")
        if not isinstance(opts, dict):
            raise bad_request(f"'stream_options' must be an object, not {_kind(opts)}.", "stream_options")
        usage = opts.get("include_usage")
        if usage is not None and not isinstance(usage, bool):
            raise bad_request("'stream_options.include_usage' must be true or false.",
                              "stream_options.include_usage")
        out["include_usage"] = bool(usage)
    return out


def _reject_unsupported(body: dict[str, Any], *, chat: bool) -> None:
    """Refuse options this server does not implement rather than silently ignoring them."""
    n = body.get("n")
    if n is not None and (n != 1 or isinstance(n, bool)):
        raise bad_request(f"'n' = {n!r} is not supported: this server returns one choice per request. "
                          "Send n=1 (or omit it) and repeat the request for more samples.", "n",
                          "unsupported_value")
    best_of = body.get("best_of")
    if best_of is not None and (best_of != 1 or isinstance(best_of, bool)):
        raise bad_request(f"'best_of' = {best_of!r} is not supported; omit it or send 1.", "best_of",
                          "unsupported_value")
    logprobs = body.get("logprobs")
    if logprobs is not None and logprobs is not False:
        raise bad_request("'logprobs' is not supported by this server; omit it"
                          + (" or send false." if chat else " or send null."), "logprobs",
                          "unsupported_value")
    if body.get("top_logprobs") is not None:
        raise bad_request("'top_logprobs' is not supported by this server; omit it.", "top_logprobs",
                          "unsupported_value")
    if body.get("echo") not in (None, False):
        raise bad_request("'echo' is not supported; omit it or send false.", "echo", "unsupported_value")
    if body.get("suffix") not in (None, ""):
        raise bad_request("'suffix' (insertion) is not supported; omit it.", "suffix", "unsupported_value")
    for name, neutral in NEUTRAL_OPTIONS.items():
        value = body.get(name)
        if value is not None and (not _is_number(value) or value != neutral):
            raise bad_request(f"'{name}' = {value!r} is not supported; omit it or send {neutral}.", name,
                              "unsupported_value")
    if body.get("logit_bias") not in (None, {}):
        raise bad_request("'logit_bias' is not supported; omit it.", "logit_bias", "unsupported_value")
    for name in ("tools", "functions"):
        if body.get(name) not in (None, []):
            raise bad_request(f"'{name}' (tool calling) is not supported by this server; omit it.", name,
                              "unsupported_value")
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in (None, "none", "auto"):
            raise bad_request(f"'{name}' = {body[name]!r:.100} is not supported: this server calls no tools. "
                              "Omit it or send \"none\" or \"auto\".", name, "unsupported_value")
    for name in STRUCTURED_OUTPUT_OPTIONS:
        if body.get(name) is not None:
            raise bad_request(f"'{name}' (structured output) is not supported by this server; omit it.", name,
                              "unsupported_value")
    if body.get("modalities") not in (None, ["text"]):
        raise bad_request("Only text output is supported: omit 'modalities' or send [\"text\"].", "modalities",
                          "unsupported_value")
    if body.get("audio") is not None:
        raise bad_request("'audio' output is not supported by this server; omit it.", "audio",
                          "unsupported_value")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise bad_request("Only response_format {\"type\": \"text\"} is supported; omit it.",
                          "response_format", "unsupported_value")


def _prompt(value: Any) -> str | list[int]:
    if value == "" or value == []:   # (a tokenizer that adds BOS would generate from BOS alone)
        raise bad_request("'prompt' is empty; send some text or token ids.", "prompt")
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if all(_is_int(t) for t in value):
            return _token_ids(value, "prompt")
        if len(value) == 1 and (isinstance(value[0], str) or isinstance(value[0], list)):
            return _prompt(value[0])
        if len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
            raise bad_request(f"'prompt' holds {len(value)} prompts; this server takes one prompt per "
                              "request. Send a string (or one list of token ids) per request.", "prompt",
                              "unsupported_value")
    raise bad_request(f"'prompt' must be a string or a list of token ids, not {_kind(value)}.", "prompt")


def _token_ids(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(_is_int(t) for t in value):
        found = "other values" if isinstance(value, list) else _kind(value)
        raise bad_request(f"'{name}' must be an array of token ids (integers), not {found}.", name, "invalid_type")
    if any(t < 0 for t in value):
        raise bad_request(f"Token ids in '{name}' must be non-negative.", name)
    return list(value)


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise bad_request("'messages' must be a non-empty array of {\"role\", \"content\"} objects.",
                          "messages")
    out = []
    for i, msg in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad_request(f"'{where}' must be an object with 'role' and 'content', not {_kind(msg)}.",
                              where)
        role = msg.get("role")
        if role not in CHAT_ROLES:
            raise bad_request(f"'{where}.role' = {role!r} is not supported; use one of "
                              f"{', '.join(CHAT_ROLES)}.", f"{where}.role")
        if msg.get("tool_calls") or msg.get("function_call"):
            raise bad_request(f"'{where}' carries tool calls, which this server does not support.", where,
                              "unsupported_value")
        content = msg.get("content")
        if content is None and role == "assistant":   # OpenAI's API allows it (an answer that was all tool calls,
            content = ""                               # a history a client replays)
        out.append({"role": role, "content": _content(content, f"{where}.content")})
    return out


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else _kind(part)
                raise bad_request(f"'{where}[{j}]' is a {kind!r} part; only text parts "
                                  "({\"type\": \"text\", \"text\": ...}) are supported.", f"{where}[{j}]")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"'{where}' must be a string or an array of text parts, not {_kind(value)}.", where)


def _stop(value: Any) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request(f"'stop' must be a string or an array of strings, not {_kind(value)}.", "stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise bad_request(f"'stop' has {len(stops)} sequences; send at most {MAX_STOP_SEQUENCES}.", "stop")
    if any(s == "" for s in stops):
        raise bad_request("'stop' sequences must not be empty strings.", "stop")
    return stops


def _int(body: dict[str, Any], name: str, *, lo: int | None = None, hi: int | None = None) -> int:
    value = body[name]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise bad_request(f"'{name}' must be an integer, not {_kind(value)}.", name, "invalid_type")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        shown = str(value) if abs(value) < 10 ** 30 else f"{'-' if value < 0 else ''}{len(str(abs(value)))}-digit number"
        raise bad_request(f"'{name}' = {shown} is out of range; send {_range(lo, hi)}.", name,
                          "invalid_value")
    return value


def _number(body: dict[str, Any], name: str, *, lo: float, hi: float) -> float:
    value = body[name]
    if not _is_number(value):
        raise bad_request(f"'{name}' must be a number, not {_kind(value)}.", name, "invalid_type")
    try:
        value = float(value)
    except OverflowError:   # an integer too large for a float: out of range like one
        value = math.inf if value > 0 else -math.inf
    if not math.isfinite(value) or value > hi or value < lo:
        raise bad_request(f"'{name}' = {value:g} is out of range; send a number at least {lo:g} and at most "
                          f"{hi:g}.", name, "invalid_value")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _range(lo: int | None, hi: int | None) -> str:
    if hi is None:
        return f"an integer >= {lo}"
    if lo is None:
        return f"an integer <= {hi}"
    return f"an integer from {lo} to {hi}"


def _kind(value: Any) -> str:
    """How a JSON value reads in an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__

"""Chat templates: the checkpoint's jinja2 template (tokenizer_config.json), or a plain default."""

from __future__ import annotations

import datetime
import inspect
import json
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from flexpipe.errors import ConfigError

from .protocol import bad_request

# For the built-in model, which has no template of its own: one "Role: text" line per message.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class TemplateError(Exception):
    """The template itself refused the conversation (its raise_exception())."""


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    # Same as transformers: templates expect non-ASCII text kept as is.
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled chat template; render(messages) gives the prompt text for the model."""

    def __init__(self, source: str | None = None, *, bos_token: str = "", eos_token: str = ""):
        self.source = source if source is not None else DEFAULT_CHAT_TEMPLATE
        self.is_default = source is None
        self.bos_token = bos_token
        self.eos_token = eos_token
        # The same environment settings as Hugging Face's apply_chat_template, so checkpoint
        # templates render identically here and there.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"chat template does not compile: {e.message} (line {e.lineno})") from None

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, override: str | None = None) -> "ChatTemplate":
        """The template to use with `tokenizer`: `override` (text or a file), else its own, else the default."""
        source = load_template_source(override) if override else _pick(getattr(tokenizer, "chat_template", None))
        return cls(source, bos_token=_special(tokenizer, "bos"), eos_token=_special(tokenizer, "eos"))

    def encode(self, tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
        """Prompt token ids for `messages`.

        A checkpoint's template writes its special tokens itself (as transformers' apply_chat_template
        assumes), so its text is encoded without adding them again; the plain default relies on the
        tokenizer's BOS.
        """
        return list(tokenizer.encode(self.render(messages), add_special_tokens=self.is_default))

    def render(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """Prompt text for `messages`; a refusal by the template is a 400 for the client."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as e:
            raise bad_request(f"The model's chat template refused these messages: {e}", "messages") from None
        except jinja2.TemplateError as e:
            raise bad_request(f"The model's chat template failed on these messages: {e}", "messages") from None


def load_template_source(value: str) -> str:
    """A template given on the command line: a file path (.jinja, or tokenizer_config.json) or inline text."""
    path = Path(value)
    if "{" not in value and path.is_file():
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            source = _pick(json.loads(text).get("chat_template"))
            if source is None:
                raise ConfigError(f"{path} has no 'chat_template' entry")
            return source
        return text
    if "{" not in value:
        raise ConfigError(f"chat template {value!r} is neither a file nor jinja2 text")
    return value


def _pick(template: Any) -> str | None:
    """tokenizer_config's chat_template is a string, or a list of {name, template} (take 'default')."""
    if template is None or isinstance(template, str):
        return template or None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    if isinstance(template, dict):
        return template.get("default")
    return None


def _special(tokenizer: Any, which: str) -> str:
    """Text of the tokenizer's BOS/EOS token, for templates that write {{ bos_token }}."""
    text = getattr(tokenizer, f"{which}_token", None)
    if isinstance(text, str):
        return text
    token_id = getattr(tokenizer, f"{which}_token_id", None)
    if token_id is None or "skip_special_tokens" not in inspect.signature(tokenizer.decode).parameters:
        return ""
    return tokenizer.decode([token_id], skip_special_tokens=False)

"""Tokenizers: byte-level for the built-in models, HF tokenizer.json when a checkpoint brings one."""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from flexpipe.errors import ConfigError, RequestError
from flexpipe.model.config import BYTE_BOS, BYTE_EOS, BYTE_PAD, ModelConfig


class StreamDecoder:
    """Turns token ids into text incrementally, emitting text only once its UTF-8 is complete."""

    def __init__(self, tokenizer: "ByteTokenizer | HFTokenizer"):
        self._tok = tokenizer
        self._bytes = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []
        self._prefix = self._read = 0  # HF: ids[prefix:read] already emitted, as context for the next

    def feed(self, token_id: int) -> str:
        """Text completed by this token ('' while a multi-byte character is still open)."""
        if isinstance(self._tok, ByteTokenizer):
            return self._bytes.decode(bytes([token_id])) if token_id < 256 else ""
        self._ids.append(token_id)
        # Decode with a little left context so tokenizers that strip leading spaces stay correct.
        prev = self._tok.decode(self._ids[self._prefix:self._read])
        full = self._tok.decode(self._ids[self._prefix:])
        if len(full) > len(prev) and not full.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return full[len(prev):]
        return ""

    def flush(self) -> str:
        """Whatever is left (an unfinished character becomes U+FFFD)."""
        if isinstance(self._tok, ByteTokenizer):
            return self._bytes.decode(b"", final=True)
        prev = self._tok.decode(self._ids[self._prefix:self._read])
        full = self._tok.decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return full[len(prev):]


class StopTextStream:
    """A request's text as its tokens arrive, cut before the first stop string (which is not part of
    the output, as in OpenAI's API).  Text that could be the start of a stop string is held back
    until the next tokens show whether it is one, so no part of a stop string that spans tokens is
    ever emitted; what is held is given out at the end (`flush`)."""

    def __init__(self, decoder: StreamDecoder, stops: str | Sequence[str] | None = None):
        self.dec = decoder
        if isinstance(stops, str):   # one stop string, not one per character
            stops = [stops]
        if stops is not None and (not isinstance(stops, Sequence) or not all(isinstance(s, str) for s in stops)):
            raise RequestError(f"stop must be a string or a list of strings (got {type(stops).__name__} "
                               f"{stops!r:.80})")
        self.stops = [s for s in (stops or []) if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.sent = 0   # text[:sent] has been emitted

    def feed(self, token_id: int) -> tuple[str, bool]:
        """The text this token releases, and whether a stop string ended the output here."""
        return self._add(self.dec.feed(token_id), final=False)

    def flush(self) -> tuple[str, bool]:
        """At the end of the request: the held text and the decoder's tail, cut at a stop string."""
        return self._add(self.dec.flush(), final=True)

    def _add(self, piece: str, final: bool) -> tuple[str, bool]:
        if not self.stops:
            return piece, False
        self.text += piece
        t, sent = self.text, self.sent
        hit = min((i for i in (t.find(s, sent) for s in self.stops) if i >= 0), default=-1)
        if hit >= 0:
            self.sent = len(t)
            return t[sent:hit], True
        end = len(t)
        if not final:   # keep the longest end of the text that begins a stop string
            end -= next((k for k in range(min(self.hold, end - sent), 0, -1)
                         if any(s.startswith(t[-k:]) for s in self.stops)), 0)
        self.sent = end
        return t[sent:end], False


class ByteTokenizer:
    """Bytes 0..255 are ids 0..255; BOS, EOS and PAD follow. No chat template."""

    chat_template = None

    def __init__(self, vocab_size: int = 320, bos_token_id: int = BYTE_BOS, eos_token_id: int = BYTE_EOS,
                 pad_token_id: int = BYTE_PAD):
        specials = (bos_token_id, eos_token_id, pad_token_id)
        if vocab_size < 259 or any(not (256 <= s < vocab_size) for s in specials):
            raise ConfigError(f"a byte-level tokenizer needs vocab_size >= 259 and specials in [256, vocab_size) "
                              f"(got vocab_size {vocab_size}, specials {specials})")
        self.vocab_size = vocab_size
        self.bos_token_id, self.eos_token_id, self.pad_token_id = specials

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """UTF-8 bytes of `text`, after BOS when add_special_tokens."""
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of the byte ids (invalid UTF-8 becomes U+FFFD); other ids are dropped."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)


class HFTokenizer:
    """A `tokenizers` tokenizer.json plus tokenizer_config.json (chat template, special tokens)."""

    def __init__(self, path: str | Path, cfg: ModelConfig | None = None):
        from tokenizers import Tokenizer

        path = Path(path)
        d = path if path.is_dir() else path.parent
        tj = d / "tokenizer.json"
        try:
            self._tok = Tokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a bare Exception for a bad file
            raise ConfigError(f"{tj}: not a readable tokenizer.json ({e})") from None
        tc: dict[str, Any] = {}
        if (d / "tokenizer_config.json").is_file():
            try:
                tc = json.loads((d / "tokenizer_config.json").read_text())
            except ValueError as e:
                raise ConfigError(f"{d / 'tokenizer_config.json'}: not valid JSON ({e})") from None
        template = tc.get("chat_template")
        if template is None and (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text()
        # a string, or the list of {name, template} some checkpoints ship (the server picks "default")
        self.chat_template: str | list | None = template if isinstance(template, (str, list)) else None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = self._special(tc.get("bos_token"), cfg.bos_token_id if cfg else None)
        self.eos_token_id = self._special(tc.get("eos_token"), cfg.eos_token_id if cfg else None)
        self.pad_token_id = self._special(tc.get("pad_token"), cfg.pad_token_id if cfg else None)

    def _special(self, tok: Any, fallback: int | None) -> int | None:
        if isinstance(tok, dict):
            tok = tok.get("content")
        if isinstance(tok, str):
            tid = self._tok.token_to_id(tok)
            if tid is not None:
                return tid
        return fallback

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)


def load_tokenizer(cfg: ModelConfig, path: str | Path | None = None) -> ByteTokenizer | HFTokenizer:
    """The tokenizer of a checkpoint directory (or its tokenizer.json): its tokenizer.json, or the
    byte-level tokenizer for a checkpoint FlexPipe wrote without one (save_checkpoint of a preset's
    byte vocabulary); any other checkpoint without tokenizer.json is refused (ConfigError), as bytes
    would be garbage for its vocabulary. `path` None (a preset): the byte-level tokenizer."""
    if path is not None:
        p = Path(path)
        d = p.parent if p.name == "tokenizer.json" else p
        if (d / "tokenizer.json").is_file():
            return HFTokenizer(d / "tokenizer.json", cfg)
        if not _written_by_flexpipe(d):
            others = [n for n in ("tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json")
                      if (d / n).is_file()]
            raise ConfigError(
                f"{d}: no tokenizer.json (FlexPipe reads only that fast-tokenizer file"
                + (f"; this checkpoint has {', '.join(others)}" if others else "") + "). Write one with "
                f"transformers: AutoTokenizer.from_pretrained({str(d)!r}).save_pretrained({str(d)!r})")
    def pick(tid: int | None, default: int) -> int:
        return tid if tid is not None and 256 <= tid < cfg.vocab_size else default
    if cfg.vocab_size < 259:
        raise ConfigError(f"model {cfg.name} has no tokenizer.json and a vocabulary of {cfg.vocab_size} < 259 "
                          "ids, too small for the byte-level tokenizer; add tokenizer.json to the checkpoint")
    return ByteTokenizer(cfg.vocab_size, pick(cfg.bos_token_id, BYTE_BOS), pick(cfg.eos_token_id, BYTE_EOS),
                         pick(cfg.pad_token_id, BYTE_PAD))


def _written_by_flexpipe(d: Path) -> bool:
    """Whether config.json in `d` is save_checkpoint's (it records the config's flexpipe_name)."""
    try:
        raw = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and "flexpipe_name" in raw

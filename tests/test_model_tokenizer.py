"""Tokenizers: byte-level round trips and streaming, HF tokenizer.json with its config."""

from __future__ import annotations

import json

import pytest

from flexpipe.errors import ConfigError
from flexpipe.model import ByteTokenizer, HFTokenizer, ModelConfig, load_tokenizer, preset


def test_byte_round_trip_and_specials():
    tok = load_tokenizer(preset("tiny"))
    assert isinstance(tok, ByteTokenizer)
    assert (tok.bos_token_id, tok.eos_token_id, tok.vocab_size, tok.chat_template) == (256, 257, 320, None)
    text = "héllo, 世界 🚀"
    ids = tok.encode(text)
    assert ids[0] == 256 and ids[1:] == list(text.encode())
    assert tok.decode(ids + [257]) == text
    assert tok.encode("a", add_special_tokens=False) == [97]
    assert tok.decode([0xE4, 0xB8]) == "\ufffd"  # an unfinished character is replaced, not raised


def test_byte_stream_waits_for_complete_characters():
    tok = ByteTokenizer()
    text = "a世🚀b"
    s = tok.stream()
    pieces = [s.feed(i) for i in text.encode()]
    assert "".join(pieces) + s.flush() == text
    assert pieces[1:3] == ["", ""] and pieces[3] == "世"
    s = tok.stream()
    assert s.feed(0xF0) == "" and s.feed(257) == "" and s.flush() == "\ufffd"


def test_byte_tokenizer_needs_room_for_specials():
    with pytest.raises(ConfigError, match="tokenizer.json"):
        load_tokenizer(ModelConfig(vocab_size=100, name="small-vocab"))
    with pytest.raises(ConfigError, match="vocab_size >= 259"):
        ByteTokenizer(vocab_size=200)


@pytest.fixture
def hf_dir(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["hello world", "hello there", "world of words"] * 5, trainer)
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": {"content": "</s>"}, "bos_token": "<s>", "chat_template": "{{ messages }}"}))
    return tmp_path


def test_hf_tokenizer_with_config(hf_dir):
    cfg = ModelConfig(vocab_size=320, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2)
    tok = load_tokenizer(cfg, hf_dir)
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_token_id, tok.eos_token_id, tok.chat_template) == (0, 1, "{{ messages }}")
    text = "hello world, 世界 🚀"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    s = tok.stream()
    pieces = [s.feed(i) for i in ids]
    assert "".join(pieces) + s.flush() == text
    assert all("\ufffd" not in p for p in pieces)  # half characters are held back, not emitted


def test_bad_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("nope")
    with pytest.raises(ConfigError, match="tokenizer.json"):
        load_tokenizer(preset("tiny"), tmp_path)

"""Tokenizers: byte-level round trips and streaming, HF tokenizer.json with its config."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ 'D' }}"}]
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert load_tokenizer(cfg, hf_dir).chat_template == named   # the server's template picks "default"
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


def _stream_with_stops(text: str, stops: list[str]) -> tuple[list[str], bool]:
    """Feed text's bytes one token at a time; the pieces emitted (flush last) and whether a stop hit."""
    from flexpipe.model.tokenizer import StopTextStream

    tok = load_tokenizer(preset("tiny"))
    st = StopTextStream(tok.stream(), stops)
    pieces = []
    for b in text.encode():
        piece, hit = st.feed(b)
        pieces.append(piece)
        if hit:
            return pieces, True
    piece, hit = st.flush()
    return pieces + [piece], hit


def test_stop_strings_that_span_tokens_are_never_emitted():
    pieces, hit = _stream_with_stops("one\ntwo\n\nthree", ["\n\n"])
    assert hit and "".join(pieces) == "one\ntwo"
    assert pieces[3] == "" and pieces[4] == "\nt"   # the newline is held until "t" shows it is text
    pieces, hit = _stream_with_stops("abcab", ["abd", "bx"])
    assert not hit and "".join(pieces) == "abcab" and pieces[-1] == "ab"   # held to the end, then given out
    assert _stream_with_stops("héllo", ["é"]) == (["h", "", ""], True)   # a stop inside a 2-byte character


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab\né", max_size=12), st.lists(st.text(alphabet="ab\né", min_size=1, max_size=3),
                                                         max_size=3))
def test_stop_text_stream_emits_exactly_the_text_before_the_first_stop(text, stops):
    pieces, hit = _stream_with_stops(text, stops)
    # the output ends at the first stop string to be complete, cut where that one (or, of those
    # complete by then, the one that starts first) begins
    ends = [n for n in range(1, len(text) + 1) if any(s in text[:n] for s in stops)]
    cut = min(text[:ends[0]].find(s) for s in stops if s in text[:ends[0]]) if ends else -1
    assert hit == (cut >= 0)
    assert "".join(pieces) == (text[:cut] if hit else text)
    emitted = ""
    for p in pieces:   # at no point was any part of a stop string out already
        emitted += p
        assert text.startswith(emitted) and (not hit or len(emitted) <= cut)


def test_a_checkpoint_without_tokenizer_json_is_refused_unless_flexpipe_wrote_it(tmp_path):
    from flexpipe.api import ModelSpec
    from flexpipe.model import PresetWeights, save_checkpoint

    cfg = ModelConfig(name="small", num_layers=1, hidden_size=16, intermediate_size=32, num_heads=2,
                      bos_token_id=256, eos_token_ids=(257,))
    ours = save_checkpoint(cfg, PresetWeights(cfg, 0), tmp_path / "ours")
    # save_checkpoint's models use the byte vocabulary of the presets
    assert isinstance(load_tokenizer(cfg, ours), ByteTokenizer)
    assert isinstance(ModelSpec.resolve(str(ours)).tokenizer, ByteTokenizer)
    # an HF checkpoint with only SentencePiece's tokenizer.model: bytes would be garbage for its vocabulary
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "model.safetensors").write_bytes((ours / "model.safetensors").read_bytes())
    raw = json.loads((ours / "config.json").read_text())
    del raw["flexpipe_name"]
    (theirs / "config.json").write_text(json.dumps(raw))
    (theirs / "tokenizer.model").write_bytes(b"sentencepiece")
    for call in (lambda: load_tokenizer(cfg, theirs), lambda: ModelSpec.resolve(str(theirs))):
        with pytest.raises(ConfigError) as e:
            call()
        msg = str(e.value)
        assert "no tokenizer.json" in msg and "tokenizer.model" in msg and "save_pretrained" in msg

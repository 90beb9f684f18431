"""A router whose answer to a client's Hello does not fit in its own max_message_bytes is refused at start.

The router answers every client's Hello with one ModelInfo that carries the checkpoint's tokenizer files as
text (a real tokenizer.json is often several MiB).  Under a --max-message-bytes below that message, the
router used to start, take its workers and report "ready", while every client's Hello was refused
(MessageTooLarge, nothing said about the tokenizer): no client could ever connect.  Now the router says so
before it binds: the size of the tokenizer files, and the max_message_bytes that would do.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from flexpipe.api import Settings
from flexpipe.errors import ConfigError
from flexpipe.runtime.daemon.router import RouterDaemon
from flexpipe.runtime.remote import ModelInfo
from tests.test_daemon_cli_errors import _hello
from tests.test_daemon_usage import events, router

pytestmark = pytest.mark.timeout(60)

LIMIT = 64 << 10
NEVER = "ipc:///tmp/flexpipe-never-bound"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small checkpoint with a word-level tokenizer.json of ~150 KB (above LIMIT; its weights are not)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from flexpipe.model import PresetWeights, save_checkpoint
    from flexpipe.model.config import ModelConfig

    words = 4000
    cfg = ModelConfig(name="wordy", num_layers=1, hidden_size=16, intermediate_size=32, num_heads=2,
                      vocab_size=words + 3, bos_token_id=1, eos_token_ids=(2,))
    path = save_checkpoint(cfg, PresetWeights(cfg, 0), tmp_path_factory.mktemp("ckpt") / "wordy")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"word{i:05d}-of-a-long-vocabulary": i + 3 for i in range(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    assert (path / "tokenizer.json").stat().st_size > 2 * LIMIT
    return path


def _stopped() -> asyncio.Event:
    stop = asyncio.Event()
    stop.set()   # (a router that starts serves nobody and stops at once: exit code 0)
    return stop


async def test_a_limit_below_the_hello_answer_is_refused_before_binding_and_the_limit_it_names_serves(
        checkpoint, tmp_path):
    size = (checkpoint / "tokenizer.json").stat().st_size
    with pytest.raises(ConfigError) as e:
        await asyncio.wait_for(RouterDaemon(NEVER, str(checkpoint), min_workers=99,
                                            settings=Settings(max_message_bytes=LIMIT)).run(_stopped()), 30)
    msg = str(e.value)
    assert msg.startswith(f"setting max_message_bytes={LIMIT}: ") and f"tokenizer.json: {size} bytes" in msg, msg
    least = int(re.search(r"raise max_message_bytes \(--max-message-bytes\) to at least (\d+)$", msg)[1])
    assert least > size
    with pytest.raises(ConfigError, match=f"to at least {least}$"):   # one byte less does not do
        await RouterDaemon(NEVER, str(checkpoint), settings=Settings(max_message_bytes=least - 1)).run(_stopped())
    # the limit it names does: a client's Hello gets the tokenizer files under it
    async with events() as ev, router(tmp_path, ev, model=str(checkpoint),
                                      settings=Settings(max_message_bytes=least)) as (_, url):
        info = await _hello(url)
    assert isinstance(info, ModelInfo) and info.max_message_bytes == least
    assert info.tokenizer_files["tokenizer.json"] == (checkpoint / "tokenizer.json").read_text()


def test_the_router_command_says_it_in_one_line(checkpoint, monkeypatch, capsys):
    import flexpipe.runtime.daemon.cli as daemon_cli
    from flexpipe.cli import main

    monkeypatch.setattr(daemon_cli, "_serve", lambda daemon: asyncio.run(daemon.run(_stopped())))
    monkeypatch.setenv("FLEXPIPE_CHILD_LOG_FORMAT", "")   # (set by the daemon's logging; undone after)
    monkeypatch.setenv("FLEXPIPE_CHILD_LOG_LEVEL", "")
    assert main(["router", "--bind", NEVER, "--model", str(checkpoint), "--max-message-bytes", str(LIMIT)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"flexpipe: error: setting max_message_bytes={LIMIT}: the router answers a client's "
                          "Hello with the model's config and tokenizer files (tokenizer.json: ") \
        and err.count("\n") == 1, err

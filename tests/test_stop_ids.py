"""The pipeline stops on the same ids as the oracle: every EOS of config.json and generation_config.json."""

from __future__ import annotations

import dataclasses
import json

import pytest

from flexpipe.api import FlexPipe
from flexpipe.model import CheckpointReader, PresetWeights, ReferenceModel, SamplingParams, preset, save_checkpoint

pytestmark = pytest.mark.timeout(240)


def _first_new(tokens: list[int], start: int) -> int:
    """Index of the first token at or after `start` that did not occur before it."""
    return next(i for i in range(start, len(tokens)) if tokens[i] not in tokens[:i])


@pytest.mark.parametrize("generation_config", [False, True])
async def test_pipeline_stops_on_every_eos_id_like_the_oracle(tmp_path, generation_config):
    cfg = dataclasses.replace(preset("tiny"), num_layers=2, name="tiny-eos")
    prompt = [256, *b"stop here"]
    free = ReferenceModel(cfg, PresetWeights(cfg, 0)).generate(prompt, SamplingParams(max_tokens=24,
                                                                                      ignore_eos=True))
    early, late = _first_new(free, 2), _first_new(free, 8)
    unused = next(t for t in range(cfg.vocab_size) if t not in free)
    assert early < late
    # config.json: an id greedy never picks, then a later pick (the router read only the first id);
    # generation_config.json: an earlier pick (read by nobody)
    cfg = dataclasses.replace(cfg, eos_token_ids=(unused, free[late]))
    path = save_checkpoint(cfg, PresetWeights(cfg, 0), tmp_path / "tiny-eos")
    want = free[:late + 1]
    if generation_config:
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": free[early]}))
        want = free[:early + 1]
    reader = CheckpointReader(path)
    assert set(reader.config.eos_token_ids) == {unused, free[late]} | ({free[early]} if generation_config else set())
    assert ReferenceModel(reader.config, reader).generate(prompt, SamplingParams(max_tokens=24)) == want
    async with FlexPipe.launch(str(path), stages=2, in_process=True) as fp:
        assert fp.reference_tokens(prompt, max_tokens=24) == want
        c = await fp.complete(prompt, max_tokens=24)
        assert c.token_ids == want and c.finish_reason == "stop"

"""A reshape's `stages` / `boundaries` numbers: one check (partition.graph.check_shape_numbers) for the
embedded runtime and the router (plan_shape), the router's client and the HTTP endpoint.

The embedded FlexPipe.reshape(stages=2**70) was a raw OverflowError, 2**62 a MemoryError and 10**9 took
~8 GB: plan_shape let any stage count >= 1 through, and solve() sized a list by it before comparing it
with the model's units.  Each is now a ConfigError naming the argument, before anything is sized by it.
"""

from __future__ import annotations

import pytest

from flexpipe.api import FlexPipe, ModelSpec, plan_shape
from flexpipe.errors import ConfigError, PartitionError
from flexpipe.partition import UnitGraph, solve

UNITS = 18   # the tiny model's
TOO_MANY = f"stages asked but the model has only {UNITS} units: stages must be a whole number from 1 to {UNITS}"
NOT_WHOLE = f"stages must be a whole number >= 1, at most the model's {UNITS} units"
OUT_OF_RANGE = f"boundaries must be unit indices from 0 to {UNITS} (the model has {UNITS} units)"
BAD = [
    (dict(stages=2**70), TOO_MANY),      # was an OverflowError
    (dict(stages=2**62), TOO_MANY),      # was a MemoryError
    (dict(stages=10**9), TOO_MANY),      # took ~8 GB
    (dict(stages=UNITS + 1), TOO_MANY),
    (dict(stages=0), NOT_WHOLE),
    (dict(stages=-(2**70)), NOT_WHOLE),
    (dict(stages=True), NOT_WHOLE),
    (dict(stages=2.0), NOT_WHOLE),
    (dict(boundaries=[0, 2**65, UNITS]), f"{OUT_OF_RANGE}, got {2**65}"),
    (dict(boundaries=[0, -1, UNITS]), f"{OUT_OF_RANGE}, got -1"),
    (dict(boundaries=[0, 10**5000, "x"]), "boundaries must be a list of whole unit indices [0, ..., 18] (got [0, "
                                          "2**16609 or more, 'x'])"),   # (such an int has no repr)
    (dict(boundaries=7), "boundaries must be a list of whole unit indices"),
    (dict(boundaries=[0]), f"boundaries [0] name no stage: give the cut points [0, ..., {UNITS}], at least two"),
]


@pytest.fixture(scope="module")
def tiny():
    return ModelSpec.resolve("tiny").config


@pytest.mark.parametrize("kw, words", BAD)
def test_plan_shape_refuses_numbers_no_shape_of_the_model_has(tiny, kw, words):
    with pytest.raises(ConfigError) as e:
        plan_shape(tiny, kw.get("stages"), kw.get("boundaries"))
    assert words in str(e.value)


def test_plan_shape_still_cuts_what_the_model_has(tiny):
    assert plan_shape(tiny, UNITS).num_stages == UNITS
    assert plan_shape(tiny, None, (0, 9, UNITS)).boundaries == [0, 9, UNITS]


@pytest.mark.timeout(60)
async def test_the_embedded_reshape_refuses_them_and_the_pipeline_serves_on():
    async with FlexPipe.launch("tiny", stages=2, in_process=True) as fp:
        for kw, words in BAD:
            with pytest.raises(ConfigError) as e:
                await fp.reshape(**kw)
            assert words in str(e.value), kw
        assert fp.controller.shape.epoch == 0 and fp.status()["reshapes"] == []
        assert (await fp.complete("still serving", max_tokens=2)).finish_reason == "length"
        await fp.reshape(stages=3)   # and a good one runs
        assert fp.controller.shape.num_stages == 3


@pytest.mark.parametrize("num_stages", [10**12, 2**70])   # were a MemoryError, an OverflowError
def test_solve_compares_the_stage_count_with_the_units_before_sizing_anything(tiny, num_stages):
    with pytest.raises(PartitionError, match=f"{num_stages} stages asked but the model has only {UNITS} units"):
        solve(UnitGraph.from_config(tiny), num_stages=num_stages)


@pytest.mark.timeout(60)
async def test_the_http_endpoint_checks_what_it_can_when_the_engine_does_not_tell_its_units():
    pytest.importorskip("starlette", reason="the 'serve' extra is not installed")
    import httpx

    from flexpipe.server import create_app

    class NoConfig:
        """An engine that does not tell its config: the endpoint knows no unit count."""
        model_name = "tiny"
        tokenizer = ModelSpec.resolve("tiny").tokenizer

        def __init__(self):
            self.asked: list[dict] = []

        async def generate(self, *args, **kwargs):
            raise NotImplementedError

        async def reshape(self, **kw):
            self.asked.append(kw)
            return {"ok": True}

    engine = NoConfig()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(create_app(engine)), base_url="http://t") as http:
        for body, param, words in [({"stages": 0}, "stages", "stages must be a whole number >= 1 (got 0)"),
                                   ({"stages": 2.5}, "stages", "stages must be a whole number >= 1"),
                                   ({"boundaries": [0]}, "boundaries", "name no stage"),
                                   ({"boundaries": [0, -3]}, "boundaries", "unit indices >= 0, got -3")]:
            r = await http.post("/v1/flexpipe/reshape", json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
            assert words in r.json()["error"]["message"], r.text
        assert engine.asked == []
        # the unit count is the engine's to check: what could be a shape of some model reaches it
        r = await http.post("/v1/flexpipe/reshape", json={"stages": 50})
        assert r.status_code == 200 and engine.asked == [{"stages": 50}], r.text

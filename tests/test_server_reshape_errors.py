"""POST /v1/flexpipe/reshape through `flexpipe serve --router`'s app: what a client gets wrong is a 4xx
that says what to change, never a 500, and nothing reaches the router that it cannot take.

A real router daemon and worker daemon (processes; each of the worker's two CPU devices has 8 MiB: a
stage of half the tiny model fits, the whole model does not) and the HTTP server in a thread.  These
were 500s: a reshape no device can hold (PlacementError, logged as unhandled), and a number past 64
bits (the router client failed to encode it).  Unknown keys ("devices", "weights_from", a typo) were
ignored, so a mistyped reshape ran as another one.
"""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("starlette", reason="the 'serve' extra is not installed")

import httpx  # noqa: E402

from flexpipe.server import ServerThread, create_app  # noqa: E402
from tests.test_daemons import logs, router_and_worker  # noqa: E402

pytestmark = pytest.mark.timeout(120)

UNITS = 18   # the tiny model's


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from flexpipe.runtime.remote import connect as remote_connect

    with router_and_worker(tmp_path_factory.mktemp("reshape-errors"), devices="cpu:0,cpu:1", memory="8MiB") as url:
        app = create_app(lambda: remote_connect(url, ready_timeout=60, heartbeat_timeout=5))
        with ServerThread(app) as base, httpx.Client(base_url=base, timeout=60) as http:
            yield http


def _epoch(http: httpx.Client) -> int:
    r = http.get("/v1/flexpipe/status")
    assert r.status_code == 200, r.text
    return r.json()["pipeline"]["epoch"]


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, f"{r.status_code} {r.text}\n{logs()}"
    return r.json()["error"]


def test_a_reshape_no_device_can_hold_is_a_409_and_the_old_shape_serves_on(served, caplog):
    epoch = _epoch(served)
    with caplog.at_level(logging.INFO, logger="flexpipe.server"):
        err = _error(served.post("/v1/flexpipe/reshape", json={"stages": 1}), 409)
    assert err["code"] == "reshape_does_not_fit" and err["type"] == "invalid_request_error", err
    assert "MiB" in err["message"] and "add workers or memory" in err["message"], err
    assert not [r for r in caplog.records if "unhandled" in r.getMessage()]   # no server error logged
    assert _epoch(served) == epoch
    r = served.post("/v1/completions", json={"model": "tiny", "prompt": "still here", "max_tokens": 2})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("body, param, words", [
    ({"stages": 10**30}, "stages", f"has only {UNITS} units: stages must be a whole number from 1 to {UNITS}"),
    ({"stages": UNITS + 1}, "stages", f"from 1 to {UNITS}"),
    ({"stages": -(2**70)}, "stages", f"stages must be a whole number >= 1, at most the model's {UNITS} units"),
    ({"boundaries": [0, 10**20, UNITS]}, "boundaries",
     f"from 0 to {UNITS} (the model has {UNITS} units), got {10**20}"),
    ({"boundaries": [-(2**64), UNITS]}, "boundaries", f"from 0 to {UNITS}"),
])
def test_numbers_outside_the_models_units_are_a_400_saying_the_range(served, body, param, words):
    epoch = _epoch(served)
    err = _error(served.post("/v1/flexpipe/reshape", json=body), 400)
    assert err["param"] == param and words in err["message"], err
    assert _epoch(served) == epoch


@pytest.mark.parametrize("body, param", [
    ({"stages": 2, "devices": ["nope/0", "nope/1"]}, "devices"),
    ({"stages": 2, "weights_from": "nowhere"}, "weights_from"),
    ({"stage": 2}, "stage"),                                      # a typo of "stages"
    ({"boundaries": [0, 9, UNITS], "model": "tiny"}, "model"),
])
def test_unknown_keys_are_a_400_naming_the_ones_it_takes(served, body, param):
    epoch = _epoch(served)
    err = _error(served.post("/v1/flexpipe/reshape", json=body), 400)
    assert err["param"] == param and err["code"] == "unknown_parameter", err
    assert f"'{param}'" in err["message"] and "'stages'" in err["message"] and "'boundaries'" in err["message"]
    assert _epoch(served) == epoch   # nothing was reshaped


def test_a_valid_reshape_still_runs(served):
    epoch = _epoch(served)
    r = served.post("/v1/flexpipe/reshape", json={"boundaries": [0, 9, UNITS]})
    assert r.status_code == 200 and r.json()["ok"], r.text
    assert _epoch(served) == epoch + 1

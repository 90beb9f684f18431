"""Stop strings and reshape arguments through the router daemon, as the embedded runtime has them.

A router daemon and one worker daemon as real processes (as tests/test_daemons.py starts them), driven
through RemoteFlexPipe, against an embedded FlexPipe of the same model (in process) as the reference.

The client used to find stop strings in its own text and Cancel the request ("stop"): a stop string
completed by the last token max_tokens allowed counted as "length" in the router's stats (and for
its autoscaler), and a request ran steps past its stop until the Cancel came.  RemoteFlexPipe.reshape
with a number past 64 bits failed in msgpack (a raw OverflowError), and a Reshape message with a
number of stages far beyond the model's units reached the solver (which sized a list by it).
"""

from __future__ import annotations

import asyncio

import pytest

from flexpipe.api import FlexPipe
from flexpipe.errors import ConfigError, RemoteError
from flexpipe.runtime.remote import RemoteFlexPipe, Reshape, Submit
from tests.test_daemons import one_torch_thread, router_and_worker  # noqa: F401 - (a module fixture: autouse)

pytestmark = pytest.mark.timeout(120)

UNITS = 18   # the tiny model's
PROMPT = "abc"
COUNTS = ("finish_stop", "finish_length", "tokens", "steps")   # of the router's status (one request: a step a token)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A router (2 stages) on an ipc socket and one worker with one CPU device."""
    with router_and_worker(tmp_path_factory.mktemp("stop-cluster")) as url:
        yield url


def connect(url: str) -> RemoteFlexPipe:
    return RemoteFlexPipe.connect(url, ready_timeout=30, heartbeat_timeout=5)


async def _router_stats(fp) -> dict:
    """The router's stats once it runs nothing (a request's end may still be on its way there)."""
    for _ in range(200):
        st = (await fp.status())["router"]
        if st["running"] == st["waiting"] == st["inflight"] == 0:
            return st
        await asyncio.sleep(0.05)
    raise AssertionError(f"the router still runs requests: {st}")


def _delta(after: dict, before: dict, key: str) -> int:
    return after.get(key, 0) - before.get(key, 0)


async def _pieces(fp, **kw) -> list[str]:
    """The text of each token of a request without stop strings (its last event: the decoder's tail)."""
    return [ev.text async for ev in fp.generate(PROMPT, ignore_eos=True, **kw)]


async def _embedded(**kw):
    """The embedded runtime's completion of the same request, and its router's stats' changes."""
    async with FlexPipe.launch("tiny", stages=1, in_process=True) as fp:
        before = fp.router.status()
        c = await fp.complete(PROMPT, ignore_eos=True, **kw)
        return c, {k: _delta(fp.router.status(), before, k) for k in COUNTS}


@pytest.mark.timeout(60)
async def test_a_stop_string_the_last_allowed_token_completes_counts_as_stop_at_the_router(cluster):
    n = 12
    async with connect(cluster) as fp:
        pieces = await _pieces(fp, max_tokens=n)
        text = "".join(pieces)
        assert pieces[n - 1] and not pieces[n], "the last token must end the text (pick another prompt)"
        # the shortest end of the text that is nowhere before it: the last token completes it
        stop = next(text[-k:] for k in range(1, len(text) + 1) if text.find(text[-k:]) == len(text) - k)
        before = await _router_stats(fp)
        events = [ev async for ev in fp.generate(PROMPT, max_tokens=n, stop=[stop], ignore_eos=True)]
        after = await _router_stats(fp)
    assert "".join(ev.text for ev in events) == text[:-len(stop)]
    assert len(events) == n and events[-1].token_id is not None and events[-1].finish_reason == "stop"
    # the router ended it as stopped (its stats; the autoscaler learns from the same finish)
    assert {k: _delta(after, before, k) for k in ("finish_stop", "finish_length")} == {"finish_stop": 1,
                                                                                      "finish_length": 0}
    c, embedded = await _embedded(max_tokens=n, stop=[stop])
    assert (c.text, c.finish_reason, len(c.token_ids)) == (text[:-len(stop)], "stop", n)
    assert embedded == {"finish_stop": 1, "finish_length": 0, "tokens": n, "steps": n}


@pytest.mark.timeout(60)
async def test_a_stop_string_mid_generation_ends_the_request_as_in_the_embedded_runtime(cluster):
    async with connect(cluster) as fp:
        text = "".join(await _pieces(fp, max_tokens=40))
        stop = next(text[i:i + 2] for i in range(6, len(text) - 1) if text[i:i + 2] not in text[:i + 1])
        before = await _router_stats(fp)
        c = await fp.complete(PROMPT, max_tokens=40, stop=[stop, "\x00never"], ignore_eos=True)
        after = await _router_stats(fp)
    want, embedded = await _embedded(max_tokens=40, stop=[stop, "\x00never"])
    assert c == want and c.finish_reason == "stop" and c.text == text[:text.index(stop)]
    # ended at its stop token, before its next step: no step past it ran for nobody
    assert {k: _delta(after, before, k) for k in COUNTS} == embedded
    assert embedded == {"finish_stop": 1, "finish_length": 0, "tokens": len(c.token_ids), "steps": len(c.token_ids)}
    assert len(c.token_ids) < 40


@pytest.mark.timeout(60)
async def test_stop_strings_off_the_wire_must_be_strings(cluster):
    async with connect(cluster) as fp:
        for bad in ([1], ["ok", b"no"], {"a": 1}, 7):
            with pytest.raises(RemoteError, match="stop must be a string or a list of strings") as e:
                await fp.actor.ask(fp.frontend, Submit("bad-stop", [1, 2, 3], {"max_tokens": 2}, fp.actor.ref, bad))
            assert e.value.kind == "RequestError"
        # no stop strings (what a client built before the field sends): served as before
        c = await fp.complete("still serving", max_tokens=3, stop=None)
        assert c.finish_reason == "length" and len(c.token_ids) == 3


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kw, words", [
    (dict(stages=2**70), f"the model has only {UNITS} units: stages must be a whole number from 1 to {UNITS}"),
    (dict(stages=-(2**70)), f"stages must be a whole number >= 1, at most the model's {UNITS} units"),
    (dict(stages=UNITS + 1), f"stages must be a whole number from 1 to {UNITS}"),
    (dict(boundaries=[2**65]), f"boundaries must be unit indices from 0 to {UNITS} (the model has {UNITS} units)"),
    (dict(boundaries=[0, 2**64, UNITS]), f"boundaries must be unit indices from 0 to {UNITS}"),
    (dict(boundaries=[0, -(2**70), UNITS]), f"boundaries must be unit indices from 0 to {UNITS}"),
])
async def test_reshape_arguments_the_wire_cannot_carry_are_config_errors(cluster, kw, words):
    async with connect(cluster) as fp:
        epoch = (await fp.status())["shape"]["epoch"]
        with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
            await fp.reshape(**kw)
        assert (await fp.status())["shape"]["epoch"] == epoch


@pytest.mark.timeout(60)
@pytest.mark.parametrize("msg, words", [
    (Reshape(stages=True), "stages must be a whole number"),
    (Reshape(stages=2.0), "stages must be a whole number"),
    (Reshape(stages="2"), "stages must be a whole number"),
    (Reshape(stages=2**62), f"stages must be a whole number from 1 to {UNITS}"),   # the solver sized a list by it
    (Reshape(boundaries=7), "boundaries must be a list of whole unit indices"),
    (Reshape(boundaries=[0, 2**63, UNITS]), f"boundaries must be unit indices from 0 to {UNITS}"),
    (Reshape(boundaries=[0, 9.0, UNITS]), "boundaries must be a list of whole unit indices"),
])
async def test_the_routers_reshape_refuses_bad_numbers_off_the_wire_with_config_errors(cluster, msg, words):
    async with connect(cluster) as fp:
        epoch = (await fp.status())["shape"]["epoch"]
        with pytest.raises(RemoteError, match=words) as e:
            await fp.actor.ask(fp.frontend, msg, timeout=30)
        assert e.value.kind == "ConfigError", e.value
        assert (await fp.status())["shape"]["epoch"] == epoch
        assert (await fp.complete("still serving", max_tokens=2)).finish_reason == "length"

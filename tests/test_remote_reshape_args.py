"""The router's client (RemoteFlexPipe) checks what it sends, against a stand-in router (one actor, no
workers or stages: what the client sees of a router is its frontend's answers).

reshape(): `devices` and `weights_from` went into the Reshape message unchecked: devices=[object()], 5 or
[2**70] were a raw TypeError/OverflowError from msgpack, devices="w/0" was sent as its letters, and
weights_from=3 (or None) reached the router.  Each is now a ConfigError saying what to give, before anything
is sent (the check FlexPipe.reshape uses: api.check_reshape_targets); which ids a live worker has stays the
router's to say, naming them.

`flexpipe serve --router URL --max-message-bytes N` ignored N: its client sent up to 1 GiB (ActorSettings'
default) to a router that takes more, so the flag held nothing.  Now serve gives its client the limit.
"""

from __future__ import annotations

import asyncio

import pytest

from flexpipe.api import ModelSpec
from flexpipe.errors import ConfigError, RequestError
from flexpipe.runtime import ActorSettings, ActorSystem, handles
from flexpipe.runtime.remote import Hello, ModelInfo, RemoteFlexPipe, Reshape, Submit, Tokens

pytestmark = pytest.mark.timeout(60)

ROUTER_LIMIT = 1 << 30
CLIENT_LIMIT = 64 << 10


class StandIn:
    """A router's frontend: tells the tiny model, records what comes, answers at once."""

    def __init__(self):
        self.got: list = []

    @handles(Hello)
    def hello(self, ctx, msg):
        cfg = ModelSpec.resolve("tiny").config
        return ModelInfo("tiny", cfg.to_dict(), {"kind": "preset", "seed": 0}, {}, cfg.max_position_embeddings,
                         True, max_message_bytes=ROUTER_LIMIT)

    @handles(Reshape)
    def reshape(self, ctx, msg):
        from flexpipe.runtime.controller import ReshapeStats

        self.got.append(msg)
        return ReshapeStats("reshape", 0, 1, [0, 18], [0, 9, 18]).to_dict()

    @handles(Submit)
    async def submit(self, ctx, msg):
        self.got.append(msg)
        await ctx.tell(msg.client, Tokens(msg.rid, 0, [], "length"))
        return True


@pytest.fixture
async def router(tmp_path):
    """(url, the stand-in) of a router at an ipc path."""
    url = f"ipc://{tmp_path}/router"
    standin = StandIn()
    async with ActorSystem(ActorSettings(bind="ipc"), name="router") as system:
        await system.spawn(standin, "frontend", endpoint=url)
        yield url, standin


WORDS = "devices must be a list of device ids of the router's workers (as its status lists them), one per stage"
SOURCES = "weights_from must be one of 'auto', 'source', 'peer', 'cache'"
BAD = [
    (dict(devices=[object()]), WORDS),            # was msgpack's TypeError
    (dict(devices=5), WORDS),                     # was list()'s TypeError
    (dict(devices=[2**70, 1]), WORDS),            # was msgpack's OverflowError
    (dict(devices="w/0"), WORDS),                 # was sent as ["w", "/", "0"]
    (dict(devices=b"w/0"), WORDS),
    (dict(devices=[["w/0"], "w/1"]), WORDS),
    (dict(weights_from=3), f"{SOURCES} (got 3)"),   # was sent
    (dict(weights_from=None), f"{SOURCES} (got None)"),
    (dict(weights_from="peers"), f"{SOURCES} (got 'peers')"),
    (dict(weights_from=object()), SOURCES),       # was msgpack's TypeError
]


async def test_bad_reshape_targets_are_config_errors_and_nothing_is_sent(router):
    url, standin = router
    async with RemoteFlexPipe.connect(url, ready_timeout=10, heartbeat_timeout=5, ask_timeout=10) as fp:
        for kw, words in BAD:
            with pytest.raises(ConfigError) as e:
                await fp.reshape(stages=2, **kw)
            assert words in str(e.value), (kw, e.value)
        assert standin.got == []
        st = await fp.reshape(stages=2, devices=(d for d in ("w/0", "w/1")), weights_from="peer")
        assert st.to_boundaries == [0, 9, 18]
        await fp.reshape(boundaries=[0, 9, 18], devices=[1, 2])   # (the router's to refuse, naming live ids)
        assert [(m.stages, m.boundaries, m.devices, m.weights_from) for m in standin.got] == \
            [(2, None, ["w/0", "w/1"], "peer"), (None, [0, 9, 18], [1, 2], "auto")]


async def test_serve_with_a_router_holds_its_client_to_its_max_message_bytes(router, monkeypatch):
    pytest.importorskip("starlette", reason="the 'serve' extra is not installed")
    import flexpipe.server.app
    import flexpipe.server.runner
    from flexpipe.cli import build_parser

    url, standin = router
    launches = []
    monkeypatch.setattr(flexpipe.server.app, "create_app", lambda launch, **kw: launches.append(launch))
    monkeypatch.setattr(flexpipe.server.runner, "serve_forever", lambda app, **kw: True)
    args = build_parser().parse_args(["serve", "--router", url, "--router-timeout", "10",
                                      "--max-message-bytes", str(CLIENT_LIMIT), "--port", "0"])
    assert await asyncio.to_thread(args.func, args) == 0   # (it connects once before "serving")
    async with launches[0]() as fp:   # what the HTTP server's startup runs
        assert fp.info.max_message_bytes == ROUTER_LIMIT
        assert fp.actor.settings.max_message_bytes == CLIENT_LIMIT
        with pytest.raises(RequestError) as e:
            await fp.complete("abc", max_tokens=1, stop=["x" * CLIENT_LIMIT])
        words = str(e.value)
        assert f"max_message_bytes={CLIENT_LIMIT}" in words and "this client's max_message_bytes" in words, words
        assert standin.got == []
        assert (await fp.complete("abc", max_tokens=1)).finish_reason == "length"   # (and a request that fits goes)
        assert len(standin.got) == 1

"""CURVE on tcp mailboxes: authorized peers ask and tell (in-process and across a subprocess); a
peer without CURVE, with an unknown client key, or expecting another server key never gets a
message handled, while the actor keeps serving; `flexpipe keys` writes usable key files."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import stat

import pytest
import zmq
import zmq.asyncio
import zmq.auth

from flexpipe.errors import ConfigError
from flexpipe.runtime import ActorSystem
from flexpipe.runtime import codec
from flexpipe.runtime.codec import ASK
from flexpipe.runtime.keys import add_keys_parser, create_keypair, curve_enabled, refused_count
from test_actor_helpers import FAST, Echo, Log, Say

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CURVE")]


@pytest.fixture
def keyfiles(tmp_path):
    d = tmp_path / "keys"
    auth = tmp_path / "authorized"
    auth.mkdir()
    paths = {}
    for name in ("server", "client", "intruder"):
        paths[name] = create_keypair(str(d), name)      # (public, secret)
    os.link(paths["client"][0], auth / "client.key")     # only the client is authorized
    paths["authorized"] = str(auth)
    return paths


def curve_settings(keyfiles, **kw):
    return dataclasses.replace(FAST, bind="tcp", curve_server_secret=keyfiles["server"][1],
                               curve_client_secret=keyfiles["client"][1],
                               curve_authorized=keyfiles["authorized"], **kw)


async def test_ask_and_tell_over_curve_tcp(keyfiles):
    settings = curve_settings(keyfiles)
    assert curve_enabled(settings)
    async with ActorSystem(settings) as system:
        echo = await system.spawn(Echo(), "echo")
        assert echo.ref.endpoint.startswith("tcp://")
        assert await system.ask(echo.ref, Say("hi", 1)) == Say("hi", 1)
        await system.tell(echo.ref, Say("told", 2))
        assert [m.text for m in await system.ask(echo.ref, Log())] == ["hi", "told"]
        # a child process inherits the key paths with its settings and serves CURVE too
        h = await system.launch("test_actor_helpers:Echo", {"tag": "sub"}, name="sub")
        assert h.ref.endpoint.startswith("tcp://")
        assert await system.ask(h.ref, Say("child", 3)) == Say("child", 3)
        assert await echo.ask(h.ref, Say("peer", 4)) == Say("peer", 4)   # actor to actor
        await h.stop()
        assert refused_count(system.zctx) == 0


def _raw_dealer(zctx, endpoint, *, server_public=None, client=None):
    """A bare DEALER (no actor behind it), optionally a CURVE client with the given keys."""
    sock = zctx.socket(zmq.DEALER)
    sock.linger = 0
    if server_public is not None:
        pub, sec = zmq.auth.load_certificate(client)
        sock.curve_serverkey = zmq.auth.load_certificate(server_public)[0]
        sock.curve_publickey, sock.curve_secretkey = pub, sec
    sock.connect(endpoint)
    return sock


async def _asks(sock, text, corr, wait_ms=1000) -> bool:
    """Ask Say(text) from a raw socket; True when a reply came within the wait."""
    try:   # a DEALER whose handshake failed has no pipe: its send waits for one that never comes
        await asyncio.wait_for(sock.send_multipart(
            codec.encode(Say(text, corr), flags=ASK, corr=corr), copy=False), wait_ms / 1000)
    except asyncio.TimeoutError:
        return False
    return bool(await sock.poll(wait_ms, zmq.POLLIN))


async def test_a_peer_without_the_right_key_is_never_handled(keyfiles):
    async with ActorSystem(curve_settings(keyfiles)) as system:
        echo = await system.spawn(Echo(), "echo")
        ep = echo.ref.endpoint
        zctx = zmq.asyncio.Context()
        socks = []
        try:
            plain = _raw_dealer(zctx, ep)
            stranger = _raw_dealer(zctx, ep, server_public=keyfiles["server"][0],
                                   client=keyfiles["intruder"][1])
            # the right client key, but it expects another server: the handshake fails
            spoofed = _raw_dealer(zctx, ep, server_public=keyfiles["intruder"][0],
                                  client=keyfiles["client"][1])
            good = _raw_dealer(zctx, ep, server_public=keyfiles["server"][0],
                               client=keyfiles["client"][1])
            socks = [plain, stranger, spoofed, good]
            for i, sock in enumerate((plain, stranger, spoofed)):
                assert not await _asks(sock, f"evil{i}", 100 + i)
            assert echo.stats["received"] == 0 and echo.behaviour.seen == []
            assert refused_count(system.zctx) >= 1          # the ZAP handler saw the stranger
            # the same raw harness with the authorized key is answered: the refusals above are
            # the keys, not the harness
            assert await _asks(good, "friend", 7, wait_ms=10_000)
            reply, _ = codec.decode(await good.recv_multipart())
            assert reply == Say("friend", 7)
            # the actor kept serving its authorized peers throughout
            assert await system.ask(echo.ref, Say("after", 8)) == Say("after", 8)
            assert [m.text for m in echo.behaviour.seen] == ["friend", "after"]
        finally:
            for s in socks:
                s.close(linger=0)
            zctx.term()


async def test_without_curve_settings_tcp_stays_plain(keyfiles):
    settings = dataclasses.replace(FAST, bind="tcp")
    assert not curve_enabled(settings)
    async with ActorSystem(settings) as system:
        echo = await system.spawn(Echo(), "echo")
        zctx = zmq.asyncio.Context()
        plain = _raw_dealer(zctx, echo.ref.endpoint)
        try:
            assert await _asks(plain, "plain", 1, wait_ms=10_000)
        finally:
            plain.close(linger=0)
            zctx.term()


async def test_curve_mailbox_without_a_server_secret_is_a_config_error(keyfiles):
    settings = dataclasses.replace(FAST, bind="tcp", curve_server_public=keyfiles["server"][0],
                                   curve_client_secret=keyfiles["client"][1],
                                   curve_authorized=keyfiles["authorized"])
    with pytest.raises(ConfigError, match="curve_server_secret"):
        async with ActorSystem(settings) as system:
            await system.spawn(Echo(), "echo")


@pytest.mark.parametrize("given", [{"curve_client_secret": "client"}, {"curve_authorized": "authorized"}])
async def test_client_or_authorized_keys_without_a_server_key_are_refused_not_plain(keyfiles, given):
    # a mistyped FLEXPIPE_CURVE_SERVER_SECRET used to leave a daemon serving plain tcp, silently
    files = {"client": keyfiles["client"][1], "authorized": keyfiles["authorized"]}
    settings = dataclasses.replace(FAST, bind="tcp", **{k: files[v] for k, v in given.items()})
    with pytest.raises(ConfigError, match="no server key: CURVE would be off"):
        async with ActorSystem(settings) as system:
            await system.spawn(Echo(), "echo")


def test_keys_command_writes_a_keypair(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_keys_parser(parser.add_subparsers())
    args = parser.parse_args(["keys", "--dir", str(tmp_path / "k"), "--name", "w1",
                              "--authorize", str(tmp_path / "auth")])
    assert args.func(args) == 0
    pub, sec = tmp_path / "k" / "w1.key", tmp_path / "k" / "w1.key_secret"
    assert stat.S_IMODE(sec.stat().st_mode) == 0o600
    public, secret = zmq.auth.load_certificate(str(sec))
    assert secret is not None and zmq.auth.load_certificate(str(pub))[0] == public
    assert (tmp_path / "auth" / "w1.key").exists()
    assert "w1.key_secret" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="--force"):
        args.func(args)
    args.force = True
    assert args.func(args) == 0

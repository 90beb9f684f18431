"""max_message_bytes end to end, with real sockets: a sender refuses a message above it (MessageTooLarge,
naming the size, the limit and the setting) and sends nothing; a reply too large for its asker fails the
ask at once, also when the asker's limit is the smaller one; ZeroMQ cuts off a peer that sends a frame
above it before the actor holds any of it (a mailbox, and a DEALER), and the actor serves on; a message
of frames each within the limit but above it in total still gets its ErrorReply."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import resource

import numpy as np
import pytest
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from flexpipe.errors import ConfigError, MessageTooLarge
from flexpipe.runtime import ActorRef, ActorSettings, ActorSystem, ErrorReply, codec, handles, message
from flexpipe.runtime.codec import ASK
from flexpipe.runtime.keys import create_keypair
from test_actor_helpers import FAST, Echo, Log, Say

pytestmark = pytest.mark.timeout(30)

LIMIT = 64 * 1024
SMALL = dataclasses.replace(FAST, max_message_bytes=LIMIT)
WAIT_MS = 10_000   # bound of every wait on a socket


# kinds 60430-60439 belong to this file (see flexpipe/runtime/messages.py)
@message(60430)
class Stats:
    """Ask a Probe for its actor's counters and its process's peak resident memory."""


class Probe(Echo):
    """Echo that also reports its actor's stats and its process's ru_maxrss (launched in a subprocess)."""

    @handles(Stats)
    def stats(self, ctx, msg: Stats) -> dict:
        return {"stats": dict(ctx.stats), "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def zeros(n: int) -> np.ndarray:
    return np.zeros(n, dtype=np.uint8)


def wire_size(msg, *tensors) -> int:
    """Bytes of the frames `msg` with `tensors` takes on the wire (as the actors count them)."""
    return sum(memoryview(f).nbytes for f in codec.encode(msg, tensors))


async def recv_within(sock: zmq.asyncio.Socket, what: str) -> list:
    assert await sock.poll(WAIT_MS), f"no {what} within {WAIT_MS} ms"
    return await sock.recv_multipart()


def monitor(sock: zmq.asyncio.Socket) -> zmq.asyncio.Socket:
    return sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)


def close(sock: zmq.asyncio.Socket, mon: zmq.asyncio.Socket | None = None) -> None:
    if mon is not None:
        sock.disable_monitor()
        mon.close(0)
    sock.close(0)


def test_max_message_bytes_must_be_a_whole_number_of_bytes_a_control_message_fits_in():
    # ZeroMQ reads MAXMSGSIZE -1 as "no limit" and 0 as "empty frames only": neither may slip through
    for bad in (-1, 0, 100, 1.5e9, True, "1G"):
        with pytest.raises(ConfigError, match=r"max_message_bytes=.*give a whole number of bytes >= 1024"):
            ActorSettings(max_message_bytes=bad)
    assert ActorSettings(max_message_bytes=1024).max_message_bytes == 1024


async def test_a_tell_or_ask_above_the_limit_raises_at_the_sender_and_sends_nothing():
    async with ActorSystem(SMALL) as system:
        echo = await system.spawn(Echo(), "echo")
        big = zeros(LIMIT)
        size = wire_size(Say("big"), big)
        for send in (system.tell, system.ask):
            with pytest.raises(MessageTooLarge, match=rf"Say to echo@\S+ not sent: message of {size} bytes exceeds "
                                                      rf"max_message_bytes={LIMIT} .*raise the max_message_bytes setting"):
                await send(echo.ref, Say("big"), big)
        assert await system.ask(echo.ref, Log()) == []          # neither reached it
        assert echo.stats["received"] == 1 and echo.stats["oversize"] == 0
        assert system.client.stats["oversize_out"] == 2

        # the sender counts as the mailbox does: exactly the limit goes (in several frames), a byte more does not
        a, b = zeros(LIMIT // 2), zeros(LIMIT // 2)
        b = zeros(b.nbytes - (wire_size(Say("edge"), a, b) - LIMIT))
        assert wire_size(Say("edge"), a, b) == LIMIT
        await system.tell(echo.ref, Say("edge"), a, b)
        with pytest.raises(MessageTooLarge, match=f"message of {LIMIT + 1} bytes exceeds"):
            await system.tell(echo.ref, Say("edge"), a, zeros(b.nbytes + 1))
        assert await system.ask(echo.ref, Log()) == [Say("edge")]
        assert echo.stats["oversize"] == 0


async def test_a_reply_above_the_limit_fails_the_ask_at_once_and_the_replier_serves_on():
    settings = dataclasses.replace(SMALL, ask_timeout=60.0)   # an answer that never came would hit the test timeout
    async with ActorSystem(settings) as system:
        echo = await system.spawn(Echo(), "echo")
        for i in range(3):   # each within the limit, their log (the reply) above it
            await system.tell(echo.ref, Say("y" * (LIMIT // 2), i))
        with pytest.raises(MessageTooLarge, match=r"the reply from echo@\S+ was refused: message of \d+ bytes "
                                                  rf"exceeds max_message_bytes={LIMIT} \(the replier's\)"):
            await system.ask(echo.ref, Log())
        assert echo.stats["oversize_out"] == 1
        assert system.client.stats["oversize"] == 0             # nothing above the limit came in
        assert await system.ask(echo.ref, Say("after")) == Say("after")


async def test_a_reply_above_the_askers_smaller_limit_is_refused_by_the_replier_not_cut_off():
    # the asker's DEALER announces its limit; the replier (of a 4x larger limit) holds the reply to it,
    # instead of sending what the asker's mailbox would cut off (the ask would then wait for nothing)
    async with ActorSystem(SMALL) as small, \
            ActorSystem(dataclasses.replace(FAST, max_message_bytes=4 * LIMIT)) as large:
        echo = await large.spawn(Echo(), "echo")
        for i in range(3):
            await small.tell(echo.ref, Say("y" * (LIMIT // 2), i))
        with pytest.raises(MessageTooLarge, match=r"the reply from echo@\S+ was refused: message of \d+ bytes "
                                                  rf"exceeds max_message_bytes={LIMIT} \(the asker's\)"):
            await small.ask(echo.ref, Log())                     # (an AskTimeout after 5 s without the announcement)
        assert echo.stats["oversize_out"] == 1 and small.client.stats["oversize"] == 0
        assert len(await large.ask(echo.ref, Log())) == 3       # the larger limit takes it
        assert await small.ask(echo.ref, Say("after")) == Say("after")


async def test_a_frame_above_the_limit_cuts_its_peer_off_before_the_actor_holds_any_of_it():
    huge = 64 << 20   # 1024x the limit: held whole, it would show in the actor process's peak memory
    async with ActorSystem(SMALL) as system:
        probe = await system.launch("test_actor_limits:Probe", name="probe")
        before = await system.ask(probe.ref, Stats())
        raw = system.zctx.socket(zmq.DEALER)   # a plain socket: replies come back through the mailbox
        raw.setsockopt(zmq.LINGER, 0)
        mon = monitor(raw)
        try:
            raw.connect(probe.ref.endpoint)
            await raw.send_multipart(codec.encode(Say("huge"), [zeros(huge)], flags=ASK, corr=1), copy=False)
            poller = zmq.asyncio.Poller()
            poller.register(raw, zmq.POLLIN)
            poller.register(mon, zmq.POLLIN)
            ready = dict(await poller.poll(WAIT_MS))
            if raw in ready:
                answer, _ = codec.decode(await raw.recv_multipart())
                pytest.fail(f"the actor received the frame whole and answered {answer}")
            assert mon in ready, f"the peer was not cut off within {WAIT_MS} ms"
            assert parse_monitor_message(await mon.recv_multipart())["event"] == zmq.EVENT_DISCONNECTED

            assert await system.ask(probe.ref, Say("well-behaved")) == Say("well-behaved")   # others are served
            await raw.send_multipart(codec.encode(Say("small"), flags=ASK, corr=2))   # its DEALER reconnected
            assert codec.decode(await recv_within(raw, "reply to the small ask"))[0] == Say("small")
        finally:
            close(raw, mon)
        after = await system.ask(probe.ref, Stats())
        assert await system.ask(probe.ref, Log()) == [Say("well-behaved"), Say("small")]
        assert after["stats"].get("oversize", 0) == 0 and after["stats"].get("bad_frames", 0) == 0
        assert after["stats"].get("internal_errors", 0) == 0
        grown_mib = (after["maxrss_kib"] - before["maxrss_kib"]) / 1024
        assert grown_mib < huge / 2 / (1 << 20), f"the actor's peak memory grew by {grown_mib:.0f} MiB"


async def test_a_frame_above_the_limit_sent_to_an_actors_dealer_cuts_that_connection():
    # An actor's DEALERs read nothing (replies come back through mailboxes): a peer that pushes a frame at
    # one anyway (here a raw ROUTER at an endpoint the client tells to) is cut off instead of having the
    # frame buffered. ZeroMQ closes a connecting socket's connection for good after such a protocol error.
    async with ActorSystem(SMALL) as system:
        echo = await system.spawn(Echo(), "echo")
        endpoint = system.endpoint_for("raw")
        raw = system.zctx.socket(zmq.ROUTER)
        raw.setsockopt(zmq.LINGER, 0)
        mon = monitor(raw)
        try:
            raw.bind(endpoint)
            await system.tell(ActorRef("raw", endpoint), Say("first"))
            ident, *frames = await recv_within(raw, "first tell")
            assert codec.decode(frames)[0] == Say("first")
            await raw.send_multipart([ident, bytes(LIMIT + 1)])
            assert await mon.poll(WAIT_MS), f"the client's DEALER did not cut the connection within {WAIT_MS} ms"
            assert parse_monitor_message(await mon.recv_multipart())["event"] == zmq.EVENT_DISCONNECTED
        finally:
            close(raw, mon)
        assert await system.ask(echo.ref, Say("after")) == Say("after")   # the client serves on
        assert system.client.stats["internal_errors"] == 0


async def test_frames_each_within_the_limit_but_above_it_in_total_get_an_error_reply():
    async with ActorSystem(SMALL) as system:
        echo = await system.spawn(Echo(), "echo")
        raw = system.zctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        try:
            raw.connect(echo.ref.endpoint)
            part = zeros(LIMIT * 3 // 4)   # ZeroMQ limits frames: each of these passes, their sum is checked after
            await raw.send_multipart(codec.encode(Say("parts"), [part, part], flags=ASK, corr=7), copy=False)
            env = codec.decode_envelope(await recv_within(raw, "error reply"))
        finally:
            close(raw)
        assert env.corr == 7 and isinstance(env.msg, ErrorReply) and env.msg.kind == "ProtocolError"
        assert f"exceeds max_message_bytes={LIMIT}" in env.msg.message
        assert echo.stats["oversize"] == 1 and echo.stats["handled"] == 0
        assert await system.ask(echo.ref, Say("after")) == Say("after")


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CURVE")
async def test_a_single_frame_of_exactly_the_limit_passes_over_curve(tmp_path):
    # CURVE wraps each frame in a 33-byte longer box, and MAXMSGSIZE counts the box
    server, client = create_keypair(str(tmp_path), "server"), create_keypair(str(tmp_path), "client")
    os.mkdir(tmp_path / "authorized")
    os.link(client[0], tmp_path / "authorized" / "client.key")
    settings = dataclasses.replace(SMALL, bind="tcp", curve_server_secret=server[1],
                                   curve_client_secret=client[1], curve_authorized=str(tmp_path / "authorized"))
    async with ActorSystem(settings) as system:
        echo = await system.spawn(Echo(), "echo")
        text = "z" * (LIMIT - wire_size(Say("")))
        text = text[:len(text) - (wire_size(Say(text)) - LIMIT)]
        frames = codec.encode(Say(text))
        assert len(frames) == 1 and len(frames[0]) == LIMIT
        await system.tell(echo.ref, Say(text))
        assert await system.ask(echo.ref, Say("after")) == Say("after")   # (a pair's messages keep their order)
        assert echo.behaviour.seen == [Say(text), Say("after")] and echo.stats["oversize"] == 0

"""Thousands of random, truncated and mutated frames sent to a live actor (seeded, bounded): each
is refused (an error reply when the header asked for one, a log line, a counter) or handled, and
the actor still answers afterwards."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import struct

import msgpack
import pytest
import torch
import zmq
import zmq.asyncio

from flexpipe.runtime import ActorRef, ActorSystem, ErrorReply, codec
from flexpipe.runtime.actor import ident_of
from flexpipe.runtime.codec import ASK, PROTOCOL_VERSION, REPLY
from flexpipe.runtime.messages import Stop, kind_of
from test_actor_helpers import FAST, Echo, Log, Say

pytestmark = pytest.mark.timeout(60)

N_FRAMES = 4000
MAX_BYTES = 64 * 1024


def corpus() -> list[list[bytes]]:
    """Valid messages to mutate (frames as bytes)."""
    x = torch.arange(600, dtype=torch.float32)           # 2400 bytes: a frame of its own
    msgs = [
        codec.encode(Say("hello", 1)),
        codec.encode(Say("ask", 2), flags=ASK, corr=99),
        codec.encode(Say("tensor", 3), [x], flags=ASK, corr=100),
        codec.encode(Say("small", 4), [torch.ones(3, dtype=torch.bfloat16)]),
        codec.encode(Log(), flags=ASK, corr=7),
        codec.encode({"plain": [1, 2, {"x": None}]}, flags=ASK, corr=8),
        codec.encode(ErrorReply("E", "m"), flags=REPLY, corr=5),
    ]
    return [[bytes(memoryview(f)) for f in m] for m in msgs]


def mutate(rng: random.Random, base: list[list[bytes]]) -> list[bytes]:
    """One hostile message."""
    frames = [bytearray(f) for f in rng.choice(base)]
    how = rng.randrange(9)
    if how == 0:                                   # random bytes, 1-3 frames
        return [rng.randbytes(rng.randrange(0, 200)) for _ in range(rng.randrange(1, 4))]
    if how == 1:                                   # truncated frame 0
        frames[0] = frames[0][:rng.randrange(0, len(frames[0]))]
    elif how == 2:                                 # a few flipped bytes anywhere in frame 0
        for _ in range(rng.randrange(1, 9)):
            frames[0][rng.randrange(len(frames[0]))] = rng.randrange(256)
    elif how == 3:                                 # valid header, random body
        frames[0] = frames[0][:codec.HEADER_SIZE] + rng.randbytes(rng.randrange(0, 100))
    elif how == 4:                                 # a tensor frame dropped, added or cut
        if len(frames) > 1 and rng.random() < 0.5:
            frames.pop()
        elif len(frames) > 1:
            frames[1] = frames[1][:rng.randrange(len(frames[1]))]
        else:
            frames.append(bytearray(rng.randbytes(rng.randrange(1, 3000))))
    elif how == 5:                                 # another kind (never Stop, which is legitimate)
        kind = rng.choice([0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 100, 60051, 60052, 60099,
                           rng.randrange(65536)])
        struct.pack_into("<H", frames[0], 4, kind if kind != kind_of(Stop) else 0)
    elif how == 6:                                 # another version or flags
        frames[0][2 + rng.randrange(2)] = rng.randrange(256)
        if rng.random() < 0.3:
            frames[0][2] = PROTOCOL_VERSION + 1
    elif how == 7:                                 # oversize in total, each frame within the limit
        # (a single frame above it gets the connection cut off instead: tests/test_actor_limits.py)
        frames += [bytearray(MAX_BYTES // 2 + rng.randrange(1, 1000)) for _ in range(2)]
    else:                                          # valid header, body of well-formed msgpack junk
        junk = [rng.choice([None, 1, "s", b"b", [1, 2], {"k": 1}, -1.5]) for _ in range(3)]
        frames[0] = frames[0][:codec.HEADER_SIZE] + msgpack.packb(rng.choice([junk, junk[:2]]))
    return [bytes(f) for f in frames]


async def test_fuzzed_frames_leave_the_actor_answering():
    settings = dataclasses.replace(FAST, max_message_bytes=MAX_BYTES)
    rng = random.Random(20240611)
    base = corpus()
    async with ActorSystem(settings) as system:
        echo = await system.spawn(Echo(), "fuzzed")
        anonymous = system.zctx.socket(zmq.DEALER)            # a plain socket: replies via ROUTER
        impostor = system.zctx.socket(zmq.DEALER)             # claims to be an actor that isn't
        impostor.setsockopt(zmq.ROUTING_ID, ident_of(ActorRef("ghost", "ipc:///nonexistent/x")))
        liar = system.zctx.socket(zmq.DEALER)                 # ... at an endpoint that can't be
        liar.setsockopt(zmq.ROUTING_ID, ident_of(ActorRef("liar", "no such endpoint")))
        try:
            for sock in (anonymous, impostor, liar):
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(echo.ref.endpoint)
            for i in range(N_FRAMES):
                sock = anonymous if i % 10 else impostor if i % 20 else liar
                await sock.send_multipart(mutate(rng, base))
                if i % 1000 == 999:   # still serving in the middle of the storm
                    assert await system.ask(echo.ref, Say("alive", i)) == Say("alive", i)
            assert await system.ask(echo.ref, Say("after", -1)) == Say("after", -1)
            while echo.stats["received"] < N_FRAMES + 5:     # every frame (and 5 asks) seen
                await asyncio.sleep(0.01)
            replies = 0
            while await anonymous.poll(100):
                frames = await anonymous.recv_multipart()
                msg, _ = codec.decode(frames)                 # every reply is well-formed
                replies += 1
        finally:
            for sock in (anonymous, impostor, liar):
                sock.close(0)
        refused = echo.stats["bad_frames"] + echo.stats["oversize"] + echo.stats["unhandled"]
        assert echo.stats["bad_frames"] > N_FRAMES // 3 and echo.stats["oversize"] > 100
        assert refused + echo.stats["handled"] + echo.stats["handler_errors"] \
            + echo.stats["late_replies"] <= echo.stats["received"]
        assert replies > 100 and echo.stats["internal_errors"] == 0
        assert not echo.closed

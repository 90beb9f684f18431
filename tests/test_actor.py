"""Actors on one event loop: ask/tell, ordering, timeouts, remote errors, one-at-a-time handling,
bad input, monitors, clean shutdown; and the same behaviour driven with no sockets (LocalContext)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import pytest
import torch

from flexpipe.errors import ActorClosed, AskTimeout, PeerDeadError, ProtocolError, RemoteError
from flexpipe.errors import ConfigError
from flexpipe.runtime import ActorRef, ActorSystem, LocalContext, Ping, Pong, Stop, Terminated, handles, message
from flexpipe.errors import MessageTooLarge
from test_actor_helpers import (
    FAST, BadReply, Compute, Deaths, Echo, Fail, JobThenStop, Log, Nap, Quit, QuitAndNap, Say, Sleep, SlowConcurrent,
    SlowStop, WatchIt,
)

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def system():
    async with ActorSystem(FAST) as system:
        yield system


async def test_ask_and_tell(system):
    echo = await system.spawn(Echo(), "echo")
    assert await system.ask(echo.ref, Say("hi", 1)) == Say("hi", 1)
    await system.tell(echo.ref, Say("told", 2))
    x = torch.randn(64, 64).to(torch.bfloat16)
    reply, y = await system.ask(echo.ref, Say("tensor"), x)   # a handler may return tensors
    assert reply == Say("tensor") and torch.equal(x, y)
    assert [m.text for m in await system.ask(echo.ref, Log())] == ["hi", "told", "tensor"]
    assert echo.behaviour.started and echo.stats["handled"] == 4


async def test_messages_between_a_pair_keep_their_order(system):
    echo = await system.spawn(Echo(), "echo")
    a = await system.spawn(Echo(), "a")
    for i in range(500):
        await a.tell(echo.ref, Say("a", i))
        if i % 50 == 0:   # interleave asks with the tells
            assert (await a.ask(echo.ref, Say("ask", i))).n == i
    seen = await a.ask(echo.ref, Log())
    assert [m.n for m in seen if m.text == "a"] == list(range(500))


async def test_tell_waits_at_the_high_water_mark_and_keeps_order(system):
    endpoint = system.endpoint_for("late")
    sender = await system.spawn(Echo(), "sender")
    n = 1500   # more than the DEALER's high-water mark (1000) while nobody listens yet
    sends = asyncio.gather(*(sender.tell(ActorRef("late", endpoint), Say("n", i))
                             for i in range(n)))
    await asyncio.sleep(0.2)
    assert not sends.done()                        # back-pressure: the later tells wait
    late = await system.spawn(Echo(), "late", endpoint=endpoint)
    await asyncio.wait_for(sends, 10)
    while len(late.behaviour.seen) < n:
        await asyncio.sleep(0.01)
    assert [m.n for m in late.behaviour.seen] == list(range(n))


async def test_ask_timeout_is_typed_and_the_actor_keeps_serving(system):
    echo = await system.spawn(Echo(), "echo")
    with pytest.raises(AskTimeout, match="within 0.2s"):
        await system.ask(echo.ref, Sleep(1.0), timeout=0.2)
    assert system.client.stats["late_replies"] == 0     # raised before the reply came, not after it
    assert await system.ask(echo.ref, Say("after")) == Say("after")   # waits for the sleep
    assert system.client.stats["late_replies"] == 1


async def test_ask_to_nobody_times_out_and_a_bad_endpoint_is_peer_dead():
    async with ActorSystem(FAST) as system:
        nobody = ActorRef("nobody", system.endpoint_for("nobody"))
        with pytest.raises(AskTimeout):
            await system.ask(nobody, Say("?"), timeout=0.3)
        with pytest.raises(PeerDeadError, match="cannot connect"):
            await system.tell(ActorRef("x", "not an endpoint"), Say("?"))


async def test_remote_error_carries_type_and_message_and_is_counted(system):
    echo = await system.spawn(Echo(), "echo")
    with pytest.raises(RemoteError) as err:
        await system.ask(echo.ref, Fail("ValueError", "bad prompt"))
    assert err.value.kind == "ValueError" and err.value.message == "bad prompt"
    await system.tell(echo.ref, Fail("KeyError", "told, nobody hears"))
    assert await system.ask(echo.ref, Say("still here")) == Say("still here")
    assert echo.stats["handler_errors"] == 2


async def test_unhandled_message_and_unencodable_reply_are_remote_errors(system):
    echo = await system.spawn(Echo(), "echo")
    with pytest.raises(RemoteError, match="no handler for Stopwatch") as err:
        await system.ask(echo.ref, Stopwatch(1))
    assert err.value.kind == "ProtocolError"
    with pytest.raises(RemoteError, match="reply not encodable"):
        await system.ask(echo.ref, BadReply())
    assert echo.stats["unhandled"] == 1 and echo.stats["reply_errors"] == 1
    assert await system.ask(echo.ref, Say("fine")) == Say("fine")


@message(60098)
class Stopwatch:
    """A message the Echo behaviour has no handler for."""
    t: int


async def test_one_message_at_a_time_unless_concurrent(system):
    echo = await system.spawn(Echo(), "echo")
    t = time.perf_counter()
    await asyncio.gather(*(system.ask(echo.ref, Sleep(0.15)) for _ in range(3)))
    assert time.perf_counter() - t >= 0.45
    tags = await asyncio.gather(*(system.ask(echo.ref, SlowConcurrent(0.3, i)) for i in range(5)))
    assert tags == list(range(5)) and echo.behaviour.peak == 5   # all five ran at once


async def test_async_handlers_start_at_once_yet_run_one_at_a_time_in_order(system):
    # An async handler starts inside the mailbox's reader when the actor is idle (no loop turn through
    # the worker task); one that suspends keeps the actor busy, and what arrives meanwhile waits its turn.
    echo = await system.spawn(Echo(), "echo")
    a = await system.spawn(Echo(), "a")
    naps = [-1, 0, 0.02, -1, -1, 0.01, 0, -1] * 4
    for i, s in enumerate(naps):
        await a.tell(echo.ref, Nap(i, s))
    assert await a.ask(echo.ref, Nap(len(naps), 0.01)) == len(naps)   # behind all the tells
    assert echo.behaviour.seen == [(e, i) for i in range(len(naps) + 1) for e in ("start", "end")]
    assert echo.stats["handled"] == len(naps) + 1 and echo.stats["internal_errors"] == 0
    assert await system.ask(echo.ref, Nap(99, -1)) == 99   # idle again: started at once, answered


async def test_closing_cancels_an_async_handler_suspended_after_an_eager_start():
    async with ActorSystem(FAST) as system:
        echo = await system.spawn(Echo(), "echo")
        await system.tell(echo.ref, Nap(1, 30.0))
        await system.tell(echo.ref, Nap(2, -1))   # queued behind the sleeping one
        while ("start", 1) not in echo.behaviour.seen:
            await asyncio.sleep(0.01)
        t = time.perf_counter()
        await echo.aclose()
        assert time.perf_counter() - t < 2
    assert echo.behaviour.seen == [("start", 1), ("end", 1)] and echo.behaviour.stopped


async def test_an_async_handler_that_stops_its_actor_and_waits_on_is_cancelled_by_the_close(system):
    echo = await system.spawn(Echo(), "echo")
    await system.tell(echo.ref, QuitAndNap(30.0))
    await asyncio.wait_for(echo.wait_closed(), 2)
    assert echo.behaviour.seen == [("interrupted", "CancelledError"), ("end", "quit")] and echo.behaviour.stopped


async def test_pings_are_answered_while_a_handler_is_busy(system):
    echo = await system.spawn(Echo(), "echo")
    busy = asyncio.ensure_future(system.ask(echo.ref, Sleep(0.5)))
    await asyncio.sleep(0.05)
    assert await system.ask(echo.ref, Ping(7)) == Pong(7)
    assert not busy.done()   # answered while the handler still sleeps
    await busy


async def test_an_oversize_message_is_refused_by_its_sender():
    # nothing is sent (the receiver's own checks: tests/test_actor_limits.py)
    settings = dataclasses.replace(FAST, max_message_bytes=10_000)
    async with ActorSystem(settings) as system:
        echo = await system.spawn(Echo(), "echo")
        with pytest.raises(MessageTooLarge, match="exceeds max_message_bytes=10000"):
            await system.ask(echo.ref, Say("big"), torch.zeros(20_000, dtype=torch.uint8))
        assert echo.stats["received"] == 0 and system.client.stats["oversize_out"] == 1
        assert await system.ask(echo.ref, Say("small")) == Say("small")


async def test_an_oversize_reply_fails_the_ask_at_once(system):
    # the asker refuses a reply larger than its max_message_bytes: it says so now, not at ask_timeout
    echo = await system.spawn(Echo(), "echo")
    async with ActorSystem(dataclasses.replace(FAST, max_message_bytes=2_000, ask_timeout=20.0)) as small:
        asker = await small.spawn(Echo(), "asker")
        for _ in range(5):
            await asker.tell(echo.ref, Say("y" * 500))
        with pytest.raises(ProtocolError, match="reply from .* was refused: message of .* bytes exceeds"):
            await asker.ask(echo.ref, Log())   # (an AskTimeout, after 20 s, before)
        assert echo.stats["oversize_out"] == 1 and asker.stats["oversize"] == 0   # refused by the replier


async def test_watch_sees_a_clean_stop_at_once_and_a_crash_within_the_heartbeat_timeout(system):
    watcher = await system.spawn(Echo(), "watcher")
    a = await system.launch(Echo, name="a", in_process=True)
    b = await system.spawn(Echo(), "b")
    await system.ask(watcher.ref, WatchIt(a.ref))
    await system.ask(watcher.ref, WatchIt(b.ref))
    await asyncio.sleep(0.2)   # a few heartbeats go by: nobody is declared dead
    assert await system.ask(watcher.ref, Deaths()) == []

    assert await system.ask(a.ref, Stop("done")) is True
    while not await system.ask(watcher.ref, Deaths()):
        await asyncio.sleep(0.01)
    assert (await system.ask(watcher.ref, Deaths()))[0].reason == "done"   # told by the actor, not by heartbeats
    assert a.actor.behaviour.stopped

    b.abort()   # no goodbye, and the system is not told: only heartbeats can notice
    t = time.perf_counter()
    while len(await system.ask(watcher.ref, Deaths())) < 2:
        await asyncio.sleep(0.02)
    elapsed = time.perf_counter() - t
    death = (await system.ask(watcher.ref, Deaths()))[1]
    assert death.ref == b.ref and "heartbeat" in death.reason
    assert elapsed <= FAST.heartbeat_timeout + 0.2
    with pytest.raises(PeerDeadError):
        await watcher.ask(b.ref, Say("anyone?"))


async def test_killed_in_process_actor_fails_pending_asks_with_peer_dead(system):
    h = await system.launch("test_actor_helpers:Echo", name="victim", in_process=True)
    pending = asyncio.ensure_future(system.ask(h.ref, Sleep(5)))
    await asyncio.sleep(0.05)
    h.kill()
    with pytest.raises(PeerDeadError, match="killed"):
        await pending
    with pytest.raises(PeerDeadError):
        await system.ask(h.ref, Say("?"))


async def test_heartbeats_flow_during_compute_in_a_worker_thread(system):
    echo = await system.spawn(Echo(), "echo")
    watcher = await system.spawn(Echo(), "watcher")
    await system.ask(watcher.ref, WatchIt(echo.ref))
    work = asyncio.ensure_future(system.ask(echo.ref, Compute(1.0)))
    answered = 0   # pings answered while the compute runs: one at most if it held the loop
    while not work.done():
        await system.ask(echo.ref, Ping())
        answered += not work.done()
        await asyncio.sleep(0.05)
    assert await work > 0 and answered >= 4, answered
    assert await system.ask(watcher.ref, Deaths()) == []


async def test_inline_compute_runs_on_the_loop_thread_only_while_the_compute_thread_is_idle(system):
    actor = await system.spawn(Echo(), "echo")
    me = threading.get_ident()
    assert await actor.run_compute(threading.get_ident, inline=True) == me
    assert await actor.run_compute(threading.get_ident) != me
    started, gate = threading.Event(), threading.Event()

    def hold() -> bool:
        started.set()
        return gate.wait(5)

    busy = asyncio.ensure_future(actor.run_compute(hold))
    assert await asyncio.to_thread(started.wait, 5)
    queued = asyncio.ensure_future(actor.run_compute(threading.get_ident, inline=True))
    await asyncio.sleep(0)   # one loop turn: an inline call would have finished in it
    assert not queued.done()   # behind the running job on the compute thread, not beside it
    gate.set()
    assert await busy is True and await queued != me


async def test_clean_shutdown_runs_on_stop_and_closes_everything():
    async with ActorSystem(FAST) as system:
        echo = await system.spawn(Echo(), "echo")
        other = await system.spawn(Echo(), "other")
        await other.ask(echo.ref, Say("x"))
        await system.ask(other.ref, WatchIt(echo.ref))
    assert echo.closed and other.closed and echo.behaviour.stopped
    with pytest.raises(ActorClosed):
        await echo.ask(other.ref, Say("too late"))
    # (the autouse fixture fails this test if any socket or context is still open)


async def test_no_handler_starts_while_the_actor_closes(system):
    slow = await system.spawn(SlowStop(), "slow")
    sender = await system.spawn(Echo(), "sender")
    assert await sender.ask(slow.ref, Say("before")) == Say("before")
    closing = asyncio.ensure_future(slow.aclose())
    await asyncio.wait_for(slow.behaviour.stopping.wait(), 10)   # on_stop is running
    await sender.tell(slow.ref, Say("during"))
    for _ in range(500):   # until the message was read (dropped, or handled before the fix)
        if slow.stats["dropped_closing"] or "handled during" in slow.behaviour.events:
            break
        await asyncio.sleep(0.01)
    slow.behaviour.release.set()
    await closing
    assert slow.behaviour.events == ["handled before", "on_stop begins", "on_stop ends"]
    assert slow.stats["dropped_closing"] == 1


async def test_on_stop_runs_after_the_compute_job_of_a_cancelled_handler(system):
    busy = await system.spawn(JobThenStop(), "busy")
    ask = asyncio.ensure_future(system.ask(busy.ref, Say("work")))
    assert await asyncio.to_thread(busy.behaviour.job_started.wait, 10)   # the job runs in the compute thread
    await busy.aclose()
    assert busy.behaviour.done_at_stop is True
    ask.cancel()   # (its reply never comes: the handler was cancelled)


async def test_a_peer_declared_dead_by_mistake_still_gets_its_replies(system):
    # late heartbeats made b declare a dead; a is alive and asks b: the reply must reach it
    a = await system.spawn(Echo(), "a")
    b = await system.spawn(Echo(), "b")
    b._declare_dead(a.ref, "heartbeats late (a test)")
    for i in range(3):
        assert await a.ask(b.ref, Say("still here", i), timeout=5.0) == Say("still here", i)
    assert b.stats["replies_to_dead"] == 3 and a.ref not in b.peers()


async def test_stop_from_inside_a_handler(system):
    echo = await system.spawn(Echo(), "echo")
    assert await system.ask(echo.ref, Quit()) is True
    await asyncio.wait_for(echo.wait_closed(), 2)
    assert echo.behaviour.stopped


async def test_tcp_endpoints():
    async with ActorSystem(dataclasses.replace(FAST, bind="tcp")) as system:
        echo = await system.spawn(Echo(), "echo")
        assert echo.ref.endpoint.startswith("tcp://127.0.0.1:")
        assert await system.ask(echo.ref, Say("tcp")) == Say("tcp")


async def test_local_context_drives_a_behaviour_without_sockets():
    echo = Echo()
    ctx = await LocalContext(echo, "e").start()
    assert echo.started
    assert await ctx.deliver(Say("hi")) == Say("hi")
    with pytest.raises(ValueError, match="boom"):   # plain exceptions, no RemoteError
        await ctx.deliver(Fail("ValueError", "boom"))
    with pytest.raises(ProtocolError, match="no handler"):
        await ctx.deliver(Stopwatch(1))
    assert await ctx.deliver(Compute(0.01)) > 0
    peer = await LocalContext(Echo(), "peer").start()
    ctx.peers[peer.self_ref] = peer
    await ctx.tell(peer.self_ref, Say("to peer"))
    assert await ctx.ask(peer.self_ref, Log()) == [Say("to peer")]
    stranger = ActorRef("x", "ipc:///nowhere")
    await ctx.tell(stranger, Say("recorded"))
    assert ctx.outbox == [(stranger, Say("recorded"), ())]
    await ctx.deliver(WatchIt(stranger))
    assert ctx.watched == {stranger}
    await ctx.close()
    assert echo.stopped


async def test_settings_validation():
    with pytest.raises(ConfigError, match="bind must be"):
        async with ActorSystem(dataclasses.replace(FAST, bind="udp")) as system:
            await system.spawn(Echo(), "x")


class Mourner(Echo):
    """Echo that sets an event on each Terminated (a handshake for the tests below)."""

    def __init__(self):
        super().__init__()
        self.died = asyncio.Event()

    @handles(Terminated)
    def terminated(self, ctx, msg: Terminated):
        self.deaths.append(msg)
        self.died.set()


async def _first_death(watcher, bound: float = 10 * FAST.heartbeat_timeout) -> Terminated:
    await asyncio.wait_for(watcher.behaviour.died.wait(), bound)
    return watcher.behaviour.deaths[0]


async def test_a_watched_actor_restarted_at_its_endpoint_is_a_death():
    # a peer that crashed and came back at the same endpoint within the heartbeat timeout answers
    # pings, but it knows nothing of what its old self did: it holds no watch from us.  (A heartbeat
    # timeout far beyond the wait below: only the answer to a ping can tell; pings every 0.5 s, so that
    # none is on its way to the old actor when it goes.)
    slow = dataclasses.replace(FAST, heartbeat_interval=0.5, heartbeat_timeout=60.0)
    async with ActorSystem(slow) as system:
        watcher = await system.spawn(Mourner(), "watcher")
        victim = await system.spawn(Echo(), "victim")
        assert await system.ask(watcher.ref, WatchIt(victim.ref)) is True
        # (after its Watch and first ping, on the same socket: the ping has been answered)
        assert await watcher.ask(victim.ref, Say("first life")) == Say("first life")
        victim.abort()   # no goodbye
        again = await system.spawn(Echo(), "victim", endpoint=victim.ref.endpoint)
        assert again.ref == victim.ref
        death = await _first_death(watcher, 20.0)
        assert death.ref == victim.ref and "lost our watch" in death.reason, death
        watcher.watch(again.ref)   # watching again works: the new incarnation holds the new watch
        assert await watcher.ask(again.ref, Say("second life")) == Say("second life")
        assert watcher.is_dead(again.ref) is False


async def test_a_watcher_its_peer_declared_dead_hears_of_it(system):
    # b declared a dead (its heartbeats were late: a's loop stalled) while a watches b: a must learn
    # it, not go on waiting for messages b will never send it
    a = await system.spawn(Mourner(), "a")
    b = await system.spawn(Echo(), "b")
    assert await system.ask(a.ref, WatchIt(b.ref)) is True
    assert await system.ask(b.ref, WatchIt(a.ref)) is True
    assert await a.ask(b.ref, Say("hello")) == Say("hello")   # b holds a's watch by now
    b._declare_dead(a.ref, "heartbeats late (a test)")
    death = await _first_death(a)
    assert death.ref == b.ref and "lost our watch" in death.reason, death
    with pytest.raises(PeerDeadError):
        await b.tell(a.ref, Say("?"))
    # a watches b again (as a client does when it reconnects): b takes it as a sign of life
    a.watch(b.ref)
    assert await a.ask(b.ref, Say("back")) == Say("back")   # (after the Watch, on the same socket)
    assert not b.is_dead(a.ref)
    await b.tell(a.ref, Say("welcome back"))


async def test_a_watcher_that_declared_its_watcher_dead_and_watches_it_again_is_not_declared_dead(system):
    # a and b watch each other; a declares b dead (b's heartbeats were late) and watches it again at
    # once (as a worker's join loop or a reconnecting client does). b's monitor never stopped: its next
    # ping found no watch at a, b declared a dead, a's next ping found none at b, and so on for ever
    a = await system.spawn(Mourner(), "a")
    b = await system.spawn(Mourner(), "b")
    assert await system.ask(a.ref, WatchIt(b.ref)) is True
    assert await system.ask(b.ref, WatchIt(a.ref)) is True
    assert await a.ask(b.ref, Say("hello")) == Say("hello") and await b.ask(a.ref, Say("hi")) == Say("hi")
    a._declare_dead(b.ref, "heartbeats late (a test)")
    a.watch(b.ref)
    assert await a.ask(b.ref, Say("back")) == Say("back")
    assert await b.ask(a.ref, Ping(-1)) == Pong(-1)   # a watcher's ping: a holds b's watch again
    assert not a.is_dead(b.ref) and not b.is_dead(a.ref) and not b.behaviour.died.is_set()


async def test_a_clean_stop_of_a_peer_bound_to_a_wildcard_is_heard_under_the_address_dialled():
    # a router daemon binds tcp://0.0.0.0:P and calls itself so; its workers and clients dial
    # tcp://host:P and watch that ref: its Terminated named the other, so they heard of a clean stop
    # only at the heartbeat timeout (60 s here: the test's bound is far shorter)
    from flexpipe.runtime.actor import ActorSettings

    slow = ActorSettings(heartbeat_interval=5.0, heartbeat_timeout=60.0)
    async with ActorSystem(slow) as system:
        server = await system.spawn(Echo(), "server", endpoint="tcp://0.0.0.0:0")
        port = server.self_ref.endpoint.rsplit(":", 1)[1]
        dialled = ActorRef("server", f"tcp://127.0.0.1:{port}")
        watcher = await system.spawn(Mourner(), "watcher")
        assert await system.ask(watcher.ref, WatchIt(dialled)) is True
        assert await watcher.ask(dialled, Say("hi")) == Say("hi")   # (its reply says how it calls itself)
        await server.aclose("stopped by its operator")
        death = await asyncio.wait_for(_first_death(watcher, 60.0), 10)
        assert death.ref == dialled and "stopped by its operator" in death.reason, death


async def test_ask_ids_start_at_random(system):
    # replies are matched by corr alone: a reply still on its way to an earlier actor at the same
    # endpoint (restarted meanwhile) must not complete an ask of the new one with the same number
    firsts = {next((await system.spawn(Echo(), f"x{i}"))._corr) for i in range(4)}
    assert len(firsts) == 4 and 1 not in firsts


async def test_watching_an_endpoint_that_cannot_be_connected_is_a_death(system):
    watcher = await system.spawn(Mourner(), "watcher")
    bad = ActorRef("x", "not an endpoint")
    assert await system.ask(watcher.ref, WatchIt(bad)) is True   # watch() does not raise: a verdict comes
    death = await _first_death(watcher)
    assert death.ref == bad and "cannot connect" in death.reason, death
    assert watcher.is_dead(bad)


async def test_asks_under_ever_new_refs_do_not_grow_the_connections_without_bound(tmp_path):
    # each answer went through a DEALER opened to the asker's announced ref and kept for ever: a peer
    # asking under new refs grew an actor's sockets and file descriptors without end (an fp9 audit)
    import zmq

    from flexpipe.runtime import codec
    from flexpipe.runtime.actor import ident_of
    from flexpipe.runtime.codec import ASK

    async with ActorSystem(dataclasses.replace(FAST, max_peers=8)) as system:
        echo = await system.spawn(Echo(), "echo")
        watched = await system.spawn(Echo(), "watched")
        echo.watch(watched.ref)   # kept whatever the count
        zctx = zmq.Context()
        try:
            for i in range(40):
                s = zctx.socket(zmq.DEALER)
                s.setsockopt(zmq.ROUTING_ID, ident_of(ActorRef(f"x{i}", f"ipc://{tmp_path}/x{i}")))
                s.connect(echo.ref.endpoint)
                s.send_multipart(codec.encode(Ping(1), flags=ASK, corr=i + 1))
                s.close(linger=1000)
            deadline = time.monotonic() + 10
            # 40 answers, each through a DEALER of its own: at most 8 stay (the watched peer's among them)
            while echo.stats["peers_pruned"] < 32 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert echo.stats["peers_pruned"] >= 32
            assert len(echo.peers()) <= 8 and watched.ref in echo.peers()
            assert await system.ask(echo.ref, Say("still", 1)) == Say("still", 1)
        finally:
            zctx.term()

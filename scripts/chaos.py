"""Randomized soak ("chaos") test of FlexPipe's embedded runtime (`FlexPipe.launch`).

For DURATION seconds it drives one pipeline of the built-in "tiny" model with random concurrent
clients (cancelled by `aclose()` or by cancelling their task, stop strings and stop token ids,
seeded sampling, request ids reused while another request may hold them), random reshapes (a
stage count or random boundaries, weights from the source, peers or either; some cut short by a
timeout, some queued back to back) and SIGKILLs of stage processes. Then it checks:

- every client finished: no request hung, none ended with PipelineDown, finish "error" or an
  unexpected error (CapacityError, QueueFullError and a request id in use are accepted);
- every reshape finished or failed with a ReshapeError (one with no timeout may not hang);
- the router went idle: nothing running, waiting, in flight, paused or down, no KV in its ledger;
  each stage holds no KV, is at the router's epoch and serves the router's unit range;
- a last request completes;
- once the pipeline closed: no child process, shared-memory segment, control file or open shm ring
  of this run is left (shm names under FLEXPIPE_SHM_PREFIX, default "fp-shm");
- every output that was not cancelled and did not fail equals, token for token, what the
  single-process oracle (flexpipe/model/reference.py) generates; a cancelled or stopped one is a
  prefix of it. A greedy divergence at a near-tie (top-2 logit margin < 1e-4) is counted, not failed.

It prints every action with its time, then "SEED n: OK (0)" or "SEED n: FAILURES (k)" followed by
the failures, and exits 0 when OK, 1 otherwise. SEED fixes the random choices (requests, reshapes,
kills, sleeps), not the timing: a failure is a lead, not always a reproducer. `make test-slow` runs a
short version (tests/test_chaos.py); docs/reshape.md, "Soak tests (chaos)", says more.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

try:
    import flexpipe  # noqa: F401
except ImportError:   # a Python without the package installed: use the checkout this script is in
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flexpipe.api import FlexPipe  # noqa: E402
from flexpipe.errors import CapacityError, PipelineDown, QueueFullError, ReshapeError, RequestError  # noqa: E402
from flexpipe.model.reference import ReferenceModel  # noqa: E402
from flexpipe.transports.shm import name_prefix, names_on_disk, open_rings  # noqa: E402

WORDS = ["pipe", "stage", "token", "reshape", "cache", "GPU", "flex", "a", "the", "z"]
STOPS = ["e", "pi", "ca", "st", "x y", "."]

T0 = time.monotonic()
ACTIONS: list[str] = []
FAIL: list[str] = []


def act(msg: str) -> None:
    """Print (and keep) one timestamped line of what the run did."""
    line = f"[{time.monotonic() - T0:8.3f}] {msg}"
    ACTIONS.append(line)
    print(line, flush=True)


def fail(msg: str) -> None:
    """Record a failure: the run goes on, and its end lists every failure."""
    FAIL.append(msg)
    act("FAIL: " + msg)


class Rec:
    """One client request: what it asked for, how it is to be cancelled, and what it got."""

    def __init__(self, i: int, kw: dict[str, Any], prompt: str, cancel_mode: str | None,
                 cancel_after: float | None, rid: str | None):
        self.i, self.kw, self.prompt = i, kw, prompt
        self.cancel_mode, self.cancel_after, self.rid = cancel_mode, cancel_after, rid
        self.toks: list[int] = []
        self.finish: str | None = None
        self.err: BaseException | None = None
        self.cancelled = False
        self.kill_seen = False   # a stage kill happened while it ran
        self.t_start = time.monotonic()
        self.t_end: float | None = None
        self.task: asyncio.Future | None = None


def make_request(rng: random.Random, i: int, rid_pool: list[str]) -> Rec:
    """A random request: prompt length, sampling, stops, cancellation and (sometimes) a shared id."""
    n_words = rng.choice([1, 2, 5, 10, 20, 30, 45])
    words = " ".join(rng.choice(WORDS) for _ in range(n_words))
    prompt = f"{i}: {words}"
    temp = rng.choice([0.0, 0.0, 0.7, 1.0, 1e-3])
    kw: dict[str, Any] = {
        "max_tokens": rng.choice([1, 2, 5, 16, 40, 80, 150]), "temperature": temp,
        "top_k": rng.choice([0, 20]) if temp else 0, "top_p": rng.choice([1.0, 0.9]) if temp else 1.0,
        "seed": rng.randint(0, 10000), "ignore_eos": rng.random() < 0.7}
    if rng.random() < 0.2:
        kw["stop"] = [rng.choice(STOPS)]
    if rng.random() < 0.1:
        kw["stop_token_ids"] = [rng.randint(0, 255)]
    r = rng.random()
    cancel_mode: str | None = None
    cancel_after: float | None = None
    if r < 0.15:
        cancel_mode, cancel_after = "aclose", rng.randint(0, 10)
    elif r < 0.25:
        cancel_mode, cancel_after = "task", rng.uniform(0.0, 1.5)
    rid = rng.choice(rid_pool) if rng.random() < 0.25 else None
    return Rec(i, kw, prompt, cancel_mode, cancel_after, rid)


async def client(fp: FlexPipe, rec: Rec, timeout: float) -> None:
    """Stream one request into `rec`; an "aclose" request stops reading after cancel_after tokens."""
    gen = fp.generate(rec.prompt, request_id=rec.rid, **rec.kw)
    try:
        async with asyncio.timeout(timeout):
            async for ev in gen:
                if ev.token_id is not None:
                    rec.toks.append(ev.token_id)
                if ev.finish_reason:
                    rec.finish = ev.finish_reason
                if rec.cancel_mode == "aclose" and len(rec.toks) >= rec.cancel_after and rec.finish is None:
                    rec.cancelled = True
                    break
        await gen.aclose()
    except asyncio.CancelledError:
        rec.cancelled = True
        await gen.aclose()
        raise
    except TimeoutError as e:
        rec.err = e
        await gen.aclose()
    except Exception as e:  # noqa: BLE001  (judged by check_outputs)
        rec.err = e
    finally:
        rec.t_end = time.monotonic()


def random_boundaries(rng: random.Random, num_units: int) -> list[int]:
    """Random cut points for 1 to 4 stages."""
    k = rng.randint(1, 4)
    cuts = sorted(rng.sample(range(1, num_units), k - 1))
    return [0, *cuts, num_units]


async def do_reshape(fp: FlexPipe, rng: random.Random, tag: str, in_process: bool) -> str:
    """One random reshape, maybe cut short by a timeout; returns how it ended."""
    stages_now = len(fp.controller.slots)
    maxk = 4 if not in_process else 5
    kw: dict[str, Any]
    if rng.random() < 0.5:
        kw = {"stages": rng.randint(1, maxk)}
    else:
        kw = {"boundaries": random_boundaries(rng, fp.config.num_units)}
    wf = rng.choice(["auto", "source", "peer"])
    tmo = rng.choice([None, None, None, None, 0.5, 2.0, rng.uniform(0.001, 0.2)])
    act(f"{tag} reshape {kw} weights_from={wf} timeout={tmo} (now {stages_now} stages, "
        f"bounds {fp.controller.shape.boundaries})")
    t = time.monotonic()
    try:
        coro = fp.reshape(weights_from=wf, **kw)
        st = await asyncio.wait_for(coro, tmo if tmo else 180)
        act(f"{tag} reshape ok: pause {st.pause_s * 1e3:.1f} ms total {st.total_s:.2f}s kv {st.kv_bytes} "
            f"rounds {st.precopy_rounds} -> {fp.controller.shape.boundaries}")
        return "ok"
    except TimeoutError:
        el = time.monotonic() - t
        if tmo is None:
            fail(f"{tag} reshape hung >180s")
        act(f"{tag} reshape cancelled by timeout {tmo} after {el:.2f}s; shape {fp.controller.shape.boundaries}")
        return "timeout"
    except ReshapeError as e:
        act(f"{tag} reshape ReshapeError: {e}")
        return "reshape_error"
    except Exception as e:  # noqa: BLE001
        fail(f"{tag} reshape unexpected {type(e).__name__}: {e}\n{traceback.format_exc()}")
        return "unexpected"


def kill_stage(fp: FlexPipe, rng: random.Random, in_process: bool, recs_running: list[Rec]) -> None:
    """SIGKILL a random stage process (in-process: kill its actor)."""
    slots = fp.controller.slots
    if not slots:
        return
    i = rng.randrange(len(slots))
    sl = slots[i]
    act(f"KILL stage {i} pid={sl.handle.pid} ref={sl.ref} units [{sl.start},{sl.end})")
    for r in recs_running:
        r.kill_seen = True
    if in_process:
        sl.handle.kill()
    else:
        try:
            os.kill(sl.handle.pid, signal.SIGKILL)
        except ProcessLookupError:
            act("  (already gone)")


async def chaos(args: argparse.Namespace) -> dict[str, int]:
    """The whole run: load, then the checks; failures go to FAIL."""
    seed = args.seed
    rng = random.Random(seed)
    act(f"SEED {seed} duration {args.duration}s in_process={args.in_process} stages={args.stages} "
        f"blocks={args.blocks} transport={args.transport}")
    counts = {"requests": 0, "reshapes": 0, "kills": 0, "cancels": 0, "rid_reuse": 0, "b2b": 0}
    prefix = name_prefix()
    shm_before, rings_before = names_on_disk(prefix), open_rings("self", prefix)
    children_before = set(multiprocessing.active_children())
    recs: list[Rec] = []
    rid_pool = [f"rid-{k}" for k in range(4)]
    overrides = dict(num_blocks=args.blocks, block_size=16, heartbeat_interval=0.3, heartbeat_timeout=2.0,
                     max_batch_tokens=rng.choice([32, 64, 128, 256]), transport=args.transport)
    act(f"launch overrides {overrides} shm prefix {prefix}")
    bg: set[asyncio.Future] = set()
    async with FlexPipe.launch("tiny", stages=args.stages, in_process=args.in_process, **overrides) as fp:
        loop = asyncio.get_running_loop()
        t_end = loop.time() + args.duration
        reshape_task: asyncio.Future | None = None
        last_kill = -100.0
        i = 0
        while loop.time() < t_end:
            r = rng.random()
            running = [x for x in recs if x.t_end is None]
            if r < 0.60:
                n = rng.choice([1, 1, 2, 4, 8])
                for _ in range(n):
                    rec = make_request(rng, i, rid_pool)
                    i += 1
                    counts["requests"] += 1
                    if rec.rid:
                        counts["rid_reuse"] += 1
                    if rec.cancel_mode:
                        counts["cancels"] += 1
                    recs.append(rec)
                    rec.task = asyncio.ensure_future(client(fp, rec, args.req_timeout))
                    bg.add(rec.task)
                    if rec.cancel_mode == "task":
                        async def canceller(rec: Rec = rec) -> None:
                            await asyncio.sleep(rec.cancel_after or 0.0)
                            if rec.task is not None and not rec.task.done():
                                rec.task.cancel()
                        bg.add(asyncio.ensure_future(canceller()))
            elif r < 0.78:
                if reshape_task is None or reshape_task.done():
                    counts["reshapes"] += 1
                    reshape_task = asyncio.ensure_future(do_reshape(fp, rng, f"R{counts['reshapes']}",
                                                                    args.in_process))
                    bg.add(reshape_task)
                    if rng.random() < 0.2:   # back-to-back: a second one queued on the lock
                        counts["b2b"] += 1
                        counts["reshapes"] += 1
                        t2 = asyncio.ensure_future(do_reshape(fp, rng, f"R{counts['reshapes']}(b2b)",
                                                              args.in_process))
                        bg.add(t2)
            elif r < 0.83:
                if loop.time() - last_kill > args.kill_gap and args.kills:
                    last_kill = loop.time()
                    counts["kills"] += 1
                    kill_stage(fp, rng, args.in_process, running)
            await asyncio.sleep(rng.uniform(0.0, 0.6))

        act("load phase over; waiting for clients and reshapes")
        pending = [t for t in bg if not t.done()]
        done, notdone = await asyncio.wait(pending, timeout=args.drain_timeout) if pending else (set(), set())
        if notdone:
            fail(f"{len(notdone)} tasks still running after {args.drain_timeout}s drain")
            dump_router(fp)
            for t in notdone:
                t.cancel()
            await asyncio.wait(notdone, timeout=30)
        router = fp.router
        try:
            await wait_for_cond(lambda: router.sched.idle() and not router.streams, 30)
        except TimeoutError:
            fail("router not idle 30 s after the load")
            dump_router(fp)
        st = fp.status()
        rs = st["router"]
        act(f"final router status: epoch {rs['epoch']} running {rs['running']} waiting {rs['waiting']} "
            f"inflight {rs['inflight']} paused {rs['paused']} down {rs['down']} frees_pending {rs['frees_pending']} "
            f"kv {[p['used'] for p in rs['kv']]} preemptions {rs['preemptions']} stats "
            f"{ {k: v for k, v in rs.items() if k.startswith(('finish', 'stale', 'stage_', 'step_', 'requests'))} }")
        if any(p["used"] for p in rs["kv"]):
            fail(f"KV ledger used != 0 after idle: {rs['kv']}")
        if rs["running"] or rs["waiting"] or rs["inflight"] or rs["paused"] or rs["down"]:
            fail(f"router not clean: {rs}")
        if "epoch" in st["shape"] and rs["epoch"] != st["shape"]["epoch"]:
            fail(f"epoch mismatch router {rs['epoch']} shape {st['shape']}")
        if len(st["stages"]) != len(rs["stages"]):
            fail(f"stage count mismatch {st['stages']} vs {rs['stages']}")
        try:
            sst = await stages_settled(fp, 30)
            for k, s in enumerate(sst):
                if s["free_blocks"] != s["num_blocks"] or s["sequences"] != 0:
                    fail(f"stage {k} holds KV after idle: free {s['free_blocks']}/{s['num_blocks']} "
                         f"sequences {s['sequences']} epoch {s['epoch']}")
                if s["epoch"] != rs["epoch"]:
                    fail(f"stage {k} epoch {s['epoch']} != router epoch {rs['epoch']}")
                if (s["start"], s["end"]) != (rs["stages"][k]["start"], rs["stages"][k]["end"]):
                    fail(f"stage {k} range {(s['start'], s['end'])} != router {rs['stages'][k]}")
        except Exception as e:  # noqa: BLE001
            fail(f"stage_status failed: {type(e).__name__}: {e}")
        try:   # a final request works
            c = await asyncio.wait_for(fp.complete("final check", max_tokens=4, ignore_eos=True), 60)
            if c.finish_reason != "length":
                fail(f"final request finish {c.finish_reason}")
        except Exception as e:  # noqa: BLE001
            fail(f"final request failed: {type(e).__name__}: {e}")
        hist = [(h.kind, h.ok, h.error[:80]) for h in fp.controller.history]
        kinds = {k: sum(1 for h in hist if h[0] == k and h[1]) for k in {h[0] for h in hist}}
        act(f"history ({len(hist)}): kinds {kinds} failed {[h for h in hist if not h[1]]}")
    act("pipeline closed")
    try:   # (active_children() also reaps the stage processes that have exited)
        await wait_for_cond(lambda: not set(multiprocessing.active_children()) - children_before, 10)
    except TimeoutError:
        pass   # judged just below
    kids = set(multiprocessing.active_children()) - children_before
    if kids:
        fail(f"leaked child processes: {[p.name for p in kids]}")
    shm = names_on_disk(prefix) - shm_before
    if shm:
        fail(f"leaked shm segments or control files: {sorted(shm)}")
    rings = open_rings("self", prefix) - rings_before
    if rings:
        fail(f"shm rings left open in this process (a receiver not closed): {sorted(rings)}")
    # the oracle, off the event loop (the run's overall deadline still applies)
    await asyncio.to_thread(check_outputs, fp, recs, counts)
    return counts


async def stages_settled(fp: FlexPipe, timeout: float) -> list[dict]:
    """The stages' statuses once each holds no KV (its last frees may still be on their way when the
    router goes idle), or as they are after `timeout`: the caller judges them."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        sst = await asyncio.wait_for(fp.controller.stage_status(), timeout)
        if loop.time() > end or all(s["free_blocks"] == s["num_blocks"] and s["sequences"] == 0 for s in sst):
            return sst
        await asyncio.sleep(0.05)


def dump_router(fp: FlexPipe) -> None:
    """Print the router's scheduling state (when it did not go idle)."""
    r = fp.router
    s = r.sched
    act(f"DUMP router paused={r._paused} down={r.down} "
        f"inflight={ {k: (len(m.chunks), len(m.frees)) for k, m in s.inflight.items()} } "
        f"running={s.running} waiting={list(s.waiting)} streams={list(r.streams)} pending_frees={s.pending_frees} "
        f"ctl_busy={fp.controller.busy}")
    for rid, q in list(s.requests.items())[:20]:
        act(f"  req {rid}: computed {q.computed} out {len(q.output)} in_flight {q.in_flight} finished {q.finished} "
            f"cancel_req {q.cancel_requested}")


async def wait_for_cond(cond: Any, timeout: float) -> None:
    """Poll `cond` (router state has no event to wait on) until true; TimeoutError after `timeout`."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise TimeoutError
        await asyncio.sleep(0.05)


def check_outputs(fp: FlexPipe, recs: list[Rec], counts: dict[str, int]) -> None:
    """Judge every request: its error, if any, and its tokens against the oracle's."""
    ref_model = ReferenceModel(fp.config, fp.spec.weights())
    tok = fp.tokenizer
    summary: dict[str, int] = {}
    oracle_cache: dict[Any, list[int]] = {}
    for rec in recs:
        kind = None
        e = rec.err
        if e is not None:
            if isinstance(e, RequestError) and "already in use" in str(e) and rec.rid:
                kind = "rid_in_use"
            elif isinstance(e, CapacityError):
                kind = "capacity"
            elif isinstance(e, QueueFullError):
                kind = "queue_full"
            elif isinstance(e, PipelineDown):
                kind = "pipeline_down"
                fail(f"req {rec.i} PipelineDown: {e}")
            elif isinstance(e, TimeoutError):
                kind = "timeout"
                fail(f"req {rec.i} (rid {rec.rid}) hung: no finish within the timeout; got {len(rec.toks)} "
                     f"tokens kw={rec.kw}")
            else:
                kind = "unexpected_err"
                fail(f"req {rec.i} unexpected error {type(e).__name__}: {e}")
            summary[kind] = summary.get(kind, 0) + 1
            continue
        if rec.finish == "error":
            fail(f"req {rec.i} finished with 'error' (kill_seen={rec.kill_seen}) kw={rec.kw}")
        kw = {k: v for k, v in rec.kw.items() if k != "stop"}
        key = (rec.prompt, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kw.items())))
        if key not in oracle_cache:
            pk = dict(kw)
            pk["seed"] = pk.get("seed") if pk.get("seed") is not None else 0
            oracle_cache[key] = ref_model.generate(fp.encode(rec.prompt), fp._params(**pk))
            if len(oracle_cache) <= 3:   # this fast path agrees with the public oracle
                public = fp.reference_tokens(rec.prompt, **kw)
                if oracle_cache[key] != public:
                    fail(f"req {rec.i}: the oracle's two paths disagree: {oracle_cache[key]} vs {public}")
        want = oracle_cache[key]
        got = rec.toks
        complete = rec.finish is not None and not rec.cancelled
        if rec.cancelled or rec.finish is None:
            kind = "cancelled"
            cmp_want = want[:len(got)]
        elif "stop" in rec.kw and rec.finish == "stop" and len(got) < len(want):
            kind = "stop_string"
            cmp_want = want[:len(got)]
            text = tok.decode(got)
            if not any(s in text for s in rec.kw["stop"]) \
                    and not (got and got[-1] in (rec.kw.get("stop_token_ids") or [])) \
                    and not (got and got[-1] in fp.config.eos_token_ids):
                fail(f"req {rec.i} finished 'stop' but no stop string in {text!r} (stop {rec.kw['stop']})")
        else:
            kind = f"complete_{rec.finish}"
            cmp_want = want
        summary[kind] = summary.get(kind, 0) + 1
        if got == cmp_want:
            if complete and "stop" in rec.kw and rec.finish != "stop":
                # the oracle's text must not contain the stop string
                if any(s in tok.decode(want) for s in rec.kw["stop"]):
                    fail(f"req {rec.i} missed its stop string {rec.kw['stop']}: {tok.decode(want)!r}")
            continue
        if len(got) > len(cmp_want):
            fail(f"req {rec.i} got more tokens than oracle: {len(got)} > {len(cmp_want)} (finish {rec.finish}, "
                 f"kind {kind}) kw={rec.kw} rid={rec.rid}")
            continue
        k = next((j for j, (a, b) in enumerate(zip(got, cmp_want)) if a != b), None)
        if k is None:
            fail(f"req {rec.i} short output {len(got)} < {len(cmp_want)} finish {rec.finish} kind {kind} "
                 f"kw={rec.kw} rid={rec.rid} kill_seen={rec.kill_seen}")
            continue
        ids = fp.encode(rec.prompt)
        logits = ref_model.logits_for(ids, want[:k])[-1]
        top2 = logits.topk(2).values
        margin = float(top2[0] - top2[1])
        if rec.kw["temperature"] == 0 and margin < 1e-4:
            summary["near_tie"] = summary.get("near_tie", 0) + 1
            continue
        fail(f"req {rec.i} diverged at {k} (got {got[k]}, want {want[k]}, margin {margin:.3g}) finish "
             f"{rec.finish} kind {kind} kw={rec.kw} rid={rec.rid} prompt={rec.prompt!r} kill_seen={rec.kill_seen} "
             f"t=[{rec.t_start - T0:.2f},{(rec.t_end or 0) - T0:.2f}]")
    act(f"outcomes: {summary}")
    act(f"counts: {counts}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(
        description="Soak test of FlexPipe's embedded runtime: random concurrent clients (cancels, stop "
                    "strings, seeded sampling, reused request ids), random reshapes (some cut short by "
                    "timeouts, some back to back) and SIGKILLs of stage processes on one pipeline of the "
                    "'tiny' model. At the end it checks that nothing hung or failed unexpectedly, that "
                    "the router and every stage are idle and agree on the shape, that nothing leaked "
                    "(child processes, shm segments and rings), and that every output that was not "
                    "cancelled and did not fail equals the single-process oracle's (a cancelled or "
                    "stopped one: a prefix of it).",
        epilog="Prints 'SEED n: OK (0)' and exits 0, or 'SEED n: FAILURES (k)' with the failures and "
               "exits 1. SEED reproduces the random choices, not the timing. "
               "Example: python scripts/chaos.py 7 120 --transport shm --stages 3")
    ap.add_argument("seed", type=int, help="seed of every random choice (requests, reshapes, kills, pauses)")
    ap.add_argument("duration", type=float,
                    help="seconds of load; the drain, the checks and the oracle come after (a 60 s run "
                         "took 1 min 45 s on 2 cores)")
    ap.add_argument("--in-process", action="store_true",
                    help="run the stages as actors in this process instead of one process each "
                         "(a 'kill' then kills the actor)")
    ap.add_argument("--stages", type=int, default=3, help="stages at launch (default: %(default)s)")
    ap.add_argument("--blocks", type=int, default=40,
                    help="KV blocks (16 tokens each) per stage: few, so that requests wait, get preempted "
                         "and hit CapacityError (default: %(default)s)")
    ap.add_argument("--transport", default="auto", choices=["auto", "message", "shm", "cuda_ipc"],
                    help="hop between stage processes (default: %(default)s)")
    ap.add_argument("--kills", type=int, default=1,
                    help="0: no stage kills; any other value: kill a random stage now and then, at most "
                         "once every --kill-gap seconds (default: %(default)s)")
    ap.add_argument("--kill-gap", type=float, default=25.0,
                    help="least seconds between two stage kills (default: %(default)s)")
    ap.add_argument("--req-timeout", type=float, default=240.0,
                    help="a request not finished after this many seconds counts as hung (default: %(default)s)")
    ap.add_argument("--drain-timeout", type=float, default=300.0,
                    help="seconds after the load for every client and reshape to end (default: %(default)s)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run, print the verdict; 0 when OK, 1 on any failure."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # SIGTERM (timeout, a test's deadline) unwinds like Ctrl-C: the pipeline is closed, the verdict printed
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:   # an overall bound: a hang anywhere still ends in a verdict
        asyncio.run(asyncio.wait_for(chaos(args), args.duration + 900))
    except BaseException as e:  # noqa: BLE001  (KeyboardInterrupt and SIGTERM included: the verdict still prints)
        fail(f"chaos run raised {type(e).__name__}: {e}\n{traceback.format_exc()}")
    print("=" * 60)
    print(f"SEED {args.seed}: {'FAILURES' if FAIL else 'OK'} ({len(FAIL)})")
    for f in FAIL:
        print(" -", f[:2000])
    return 1 if FAIL else 0


if __name__ == "__main__":
    sys.exit(main())

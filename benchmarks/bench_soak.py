"""Load and soak through the HTTP server on loopback: a burst of concurrent streaming requests, then a
soak with random client cancellations, periodic reshapes and one injected kill -9 of a stage process.
Afterwards every request is accounted for (finished, cancelled by the client, refused with a reason);
`lost` (anything else: 5xx, a broken stream, a stream without [DONE]) must be 0.

    python benchmarks/bench_soak.py                       # 1,000 burst, 5-minute soak
    python benchmarks/bench_soak.py --minutes 1 --burst 300

Prints: requests by outcome, p50/p99 latency of finished requests, peak RSS of the server process
tree, fds and sockets of the tree at baseline and at the end, recovery time after the stage kill
(kill -> first request sent after it that finishes).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import httpx

KEY = "sk-soak"


def _tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc)."""
    children = collections.defaultdict(list)
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children[ppid].append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _rss(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def _fd_targets(pid: int) -> list[str]:
    """What each open fd of `pid` points at (Linux /proc; fds closed meanwhile are skipped)."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    out = []
    for n in names:
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{n}"))
        except OSError:
            continue
    return out


def _fds(pids: list[int]) -> tuple[int, int]:
    targets = [t for p in pids for t in _fd_targets(p)]
    return len(targets), sum(t.startswith("socket:") for t in targets)


def _role(pid: int, server_pid: int) -> str:
    if pid == server_pid:
        return "server"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return "gone"
    return "resource_tracker" if b"resource_tracker" in cmd else "stage"


# Baseline and end are both measured idle, this long after the last request: the server has closed
# what the requests used and every stage process has handed its kept heap back (runtime setting
# idle_trim_s, default 5 s: a stage trims within 1-2x that of its last step).
SETTLE_S = 12.0


def _rss_by_role(server_pid: int) -> collections.Counter:
    """RSS of the server tree by process role (bytes)."""
    out: collections.Counter = collections.Counter()
    for p in _tree(server_pid):
        out[_role(p, server_pid)] += _rss([p])
    return out


def _fd_kinds(server_pid: int) -> collections.Counter:
    """Open fds of the server tree by (process role, kind of target), e.g. ("server", "socket")."""
    out: collections.Counter = collections.Counter()
    for p in _tree(server_pid):
        role = _role(p, server_pid)
        for target in _fd_targets(p):
            kind = target.split(":", 1)[0] if ":" in target and not target.startswith(("/", "anon")) else target
            if kind.startswith("/dev/shm/"):
                kind = "/dev/shm/*"
            elif kind.startswith("/tmp/"):
                kind = "/tmp/*"
            out[(role, kind)] += 1
    return out


def _stage_pids(server_pid: int) -> list[int]:
    out = []
    for p in _tree(server_pid)[1:]:
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ")
        except OSError:
            continue
        if b"multiprocessing.spawn" in cmd or b"spawn_main" in cmd:
            if b"resource_tracker" not in cmd:
                out.append(p)
    return out


class Tally:
    def __init__(self) -> None:
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.refusals: collections.Counter[str] = collections.Counter()
        self.lost: list[str] = []
        self.latency: list[float] = []


async def stream_one(client: httpx.AsyncClient, tally: Tally, rng: random.Random, *, cancel_p: float,
                     max_tokens: int, prompt: str = "") -> str:
    body = {"model": "tiny", "prompt": prompt or f"soak {rng.random():.6f}", "max_tokens": max_tokens,
            "stream": True, "ignore_eos": True, "seed": rng.randrange(1 << 30),
            "temperature": rng.choice([0.0, 0.8])}
    cancel_after = rng.randint(1, max_tokens) if rng.random() < cancel_p else None
    t0 = time.perf_counter()
    tokens, done = 0, False
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                if 400 <= r.status_code < 500:
                    try:
                        reason = json.loads(text)["error"]["message"]
                    except (ValueError, KeyError, TypeError):
                        reason = ""
                    if reason:
                        tally.outcomes["refused"] += 1
                        tally.refusals[f"{r.status_code} {reason[:60]}"] += 1
                        return "refused"
                tally.lost.append(f"HTTP {r.status_code}: {text[:120]}")
                return "lost"
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                tokens += 1
                if cancel_after is not None and tokens >= cancel_after:
                    tally.outcomes["cancelled"] += 1
                    return "cancelled"     # leaving the block closes the connection mid-stream
    except httpx.HTTPError as e:
        tally.lost.append(f"{type(e).__name__}: {e}")
        return "lost"
    if not done:
        tally.lost.append("stream ended without [DONE]")
        return "lost"
    tally.outcomes["finished"] += 1
    tally.latency.append(time.perf_counter() - t0)
    return "finished"


async def warm(client: httpx.AsyncClient, rng: random.Random) -> None:
    """One request long enough that stage processes send activations as zero-copy frames: the first
    one starts pyzmq's garbage-collector context in that process (~7 fds, once per process)."""
    await stream_one(client, Tally(), rng, cancel_p=0, max_tokens=4, prompt="warm " * 60)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def main_async(args: argparse.Namespace) -> int:
    port = args.port or _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "flexpipe.cli", "serve", "tiny", "--port", str(port), "--stages", "2",
           "--api-key", KEY, "--max-queued", str(args.max_queued), "--heartbeat-interval", "0.2",
           "--heartbeat-timeout", "1.0"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL if not args.verbose
                              else None)
    rng = random.Random(args.seed)
    tally = Tally()
    peak = {"rss": 0}
    limits = httpx.Limits(max_connections=args.burst + 64, max_keepalive_connections=64)
    headers = {"Authorization": f"Bearer {KEY}"}
    try:
        # the baseline and end figures are taken with no HTTP connection open: a client's keep-alive
        # connections are the client's, not the server's
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(600, connect=60)) as c:
            for _ in range(600):
                try:
                    if (await c.get("/health")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
            else:
                print("server did not come up", file=sys.stderr)
                return 1
            await warm(c, rng)
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(600, connect=60),
                                     limits=limits) as client:
            await asyncio.sleep(SETTLE_S)
            base_rss = _rss(_tree(server.pid))
            base_fds, base_socks = _fds(_tree(server.pid))
            base_stages = len(_stage_pids(server.pid))
            base_kinds = _fd_kinds(server.pid)
            base_roles = _rss_by_role(server.pid)

            async def sampler():
                while True:
                    peak["rss"] = max(peak["rss"], _rss(_tree(server.pid)))
                    await asyncio.sleep(0.5)

            sampling = asyncio.ensure_future(sampler())
            # --- burst ---------------------------------------------------------------------------
            t0 = time.perf_counter()
            await asyncio.gather(*(stream_one(client, tally, rng, cancel_p=0.0, max_tokens=rng.randint(4, 16))
                                   for _ in range(args.burst)))
            burst_s = time.perf_counter() - t0
            burst = dict(tally.outcomes)
            burst_lat, tally.latency = tally.latency, []
            print(f"burst: {args.burst} concurrent streaming requests in {burst_s:.1f}s: {burst}, "
                  f"lost {len(tally.lost)}", flush=True)
            # --- soak ----------------------------------------------------------------------------
            end = time.perf_counter() + args.minutes * 60
            kill_at = time.perf_counter() + args.minutes * 60 / 2
            recovery: dict[str, float] = {}
            reshapes: collections.Counter[str] = collections.Counter()

            async def worker():
                while time.perf_counter() < end:
                    await stream_one(client, tally, rng, cancel_p=args.cancel_p, max_tokens=rng.randint(4, 24))

            async def reshaper():
                while time.perf_counter() + args.reshape_every < end:
                    await asyncio.sleep(args.reshape_every)
                    n = rng.randint(1, 3)
                    r = await client.post("/v1/flexpipe/reshape", json={"stages": n})
                    reshapes[str(r.status_code)] += 1
                    if r.status_code != 200:
                        print(f"  reshape to {n} stages: HTTP {r.status_code} {r.text[:200]}", flush=True)

            async def killer():
                await asyncio.sleep(max(0.0, kill_at - time.perf_counter()))
                # a stage that serves (not one a reshape is starting): the kill must cost a recovery
                r = await client.get("/v1/flexpipe/status")
                serving = [st.get("pid") for st in r.json().get("pipeline", {}).get("stages", [])] \
                    if r.status_code == 200 else []
                pids = [p for p in _stage_pids(server.pid) if p in serving]
                if not pids:
                    recovery["error"] = 1
                    return
                t = time.perf_counter()
                os.kill(rng.choice(pids), signal.SIGKILL)
                while time.perf_counter() - t < 120:
                    probe = Tally()
                    if await stream_one(client, probe, rng, cancel_p=0, max_tokens=4) == "finished":
                        recovery["s"] = time.perf_counter() - t
                        return
                    tally.outcomes["probe_failed"] += 1

            await asyncio.gather(*(worker() for _ in range(args.concurrency)), reshaper(), killer())
            sampling.cancel()
            # back to the baseline shape, so that the end figures compare like with like
            r = await client.post("/v1/flexpipe/reshape", json={"stages": base_stages})
            if r.status_code != 200:
                print(f"  final reshape to {base_stages} stages: HTTP {r.status_code} {r.text[:200]}")
            await warm(client, rng)   # as before the baseline: every connection of the new shape opened once
            await client.aclose()
            await asyncio.sleep(SETTLE_S)   # let the server close what the last requests used
            pids = _tree(server.pid)
            print(f"stage processes: baseline {base_stages}, end {len(_stage_pids(server.pid))}")
            end_rss = _rss(pids)
            end_fds, end_socks = _fds(pids)
            total = sum(v for k, v in tally.outcomes.items() if k != "probe_failed") + len(tally.lost)
            print(f"requests: {total}  finished {tally.outcomes['finished']}  "
                  f"cancelled {tally.outcomes['cancelled']}  refused {tally.outcomes['refused']}  "
                  f"lost {len(tally.lost)}")
            for reason, n in tally.refusals.most_common(3):
                print(f"  refused {n}: {reason}")
            for why in tally.lost[:5]:
                print(f"  lost: {why}")
            print(f"latency of finished requests: burst p50 {pct(burst_lat, 0.5):.2f}s "
                  f"p99 {pct(burst_lat, 0.99):.2f}s; soak p50 {pct(tally.latency, 0.5):.2f}s "
                  f"p99 {pct(tally.latency, 0.99):.2f}s")
            print(f"reshapes (HTTP status: count): {dict(reshapes)}")
            print(f"stage kill -9 -> first new request finished: {recovery.get('s', float('nan')):.2f}s")
            print(f"server tree RSS: baseline {base_rss / 2**20:.0f} MiB, peak {peak['rss'] / 2**20:.0f} MiB, "
                  f"end {end_rss / 2**20:.0f} MiB")
            end_roles = _rss_by_role(server.pid)
            print("  by process: " + ", ".join(f"{r} {base_roles[r] / 2**20:.0f} -> {end_roles[r] / 2**20:.0f} MiB"
                                               for r in sorted(set(base_roles) | set(end_roles))))
            print(f"server tree fds: baseline {base_fds} ({base_socks} sockets), end {end_fds} "
                  f"({end_socks} sockets)")
            end_kinds = _fd_kinds(server.pid)
            for key in sorted(set(base_kinds) | set(end_kinds)):
                if base_kinds[key] != end_kinds[key]:
                    print(f"  fds of {key[0]} -> {key[1]}: baseline {base_kinds[key]}, end {end_kinds[key]}")
            return 0 if not tally.lost else 1
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--burst", type=int, default=1000, help="concurrent streaming requests first (default 1000)")
    p.add_argument("--minutes", type=float, default=5.0, help="soak length (default 5)")
    p.add_argument("--concurrency", type=int, default=32, help="clients during the soak (default 32)")
    p.add_argument("--cancel-p", type=float, default=0.15, help="share of soak requests the client cancels")
    p.add_argument("--reshape-every", type=float, default=20.0, help="seconds between reshapes (default 20)")
    p.add_argument("--max-queued", type=int, default=4096, help="server --max-queued (default 4096)")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="show the server's log")
    args = p.parse_args()
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())

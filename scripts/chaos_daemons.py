"""Randomized soak ("chaos") test of FlexPipe's daemon mode: a router and three workers as processes.

It starts `flexpipe router` (the "tiny" model, 2 stages, the given --transport, 3 workers required)
and three `flexpipe worker`s (wa, wb, wc), all as `python -m flexpipe.cli` of the Python running this
script, then for DURATION seconds drives 6 clients through RemoteFlexPipe (random prompts, greedy or
seeded sampling, ignore_eos) while, every 2 to 6 seconds, it reshapes to 1 to 4 stages, SIGKILLs a
random stage process, or SIGKILLs a random worker and starts it again 1 to 5 seconds later. Then it
checks:

- every request that finished with "length" (all do unless something broke) has exactly the tokens
  the single-process oracle (flexpipe/model/reference.py) generates for it;
- no daemon exited by itself before the end, and each exits 0 within 30 s of SIGTERM (docs/daemons.md,
  "Shutdown");
- once they have, no process they started (a stage) is still running 10 s later.

Client errors and failed reshapes during the chaos are logged, not failed: a request may lose its
router for a moment, and a reshape may lose a stage. Every process the script started is stopped on
the way out, whatever happened (a SIGTERM or Ctrl-C to the script included). It prints what it did,
each daemon's ERROR lines and tracebacks, the failures, then "RESULT OK []" (exit status 0) or
"RESULT FAILURES [...]" (exit status 1). SEED fixes the random choices, not the timing.
`make test-slow` runs a short version (tests/test_chaos.py); docs/reshape.md, "Soak tests (chaos)".
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

try:
    import flexpipe
except ImportError:   # a Python without the package installed: use the checkout this script is in
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import flexpipe

import torch  # noqa: E402

from flexpipe.runtime.remote import RemoteFlexPipe  # noqa: E402

WORKERS = ("wa", "wb", "wc")
CLIENTS = 6
SIGTERM_WAIT_S = 30.0     # a daemon must exit this soon after SIGTERM
LEFTOVER_WAIT_S = 10.0    # its stages, this soon after it exited ("a stage whose parent is gone stops within a second")
RUN_MARK = "FLEXPIPE_CHAOS_RUN"   # in the environment of every process this run starts, stages included

T0 = time.monotonic()
FAIL: list[str] = []


def log(*a: Any) -> None:
    """Print one timestamped line of what the run did."""
    print(f"[{time.monotonic() - T0:7.1f}]", *a, flush=True)


def fail(msg: str) -> None:
    """Record a failure: the run goes on, and its end lists every failure."""
    FAIL.append(msg)
    log("FAIL:", msg)


class StartupError(Exception):
    """A daemon did not log the event the script waits for (it exited, or not in time)."""


class Daemon:
    """One daemon process started by this script, and the JSON log lines of its stderr."""

    def __init__(self, name: str, args: list[str], env: dict[str, str]):
        self.name = name
        self.lines: list[str] = []
        self.eof = False
        self.killed = False   # by the chaos: its end is not a failure
        self.cond = threading.Condition()
        self.proc = subprocess.Popen([sys.executable, "-m", "flexpipe.cli", *args, "--log-format", "json"],
                                     stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        threading.Thread(target=self._read, name=f"log-{name}", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self.cond:
                self.lines.append(line.rstrip())
                self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def wait_event(self, event: str, timeout: float) -> dict:
        """The first log record whose event is `event`, waiting up to `timeout` s for it."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self.cond:
            while True:
                for line in self.lines[seen:]:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(rec, dict) and rec.get("event") == event:
                        return rec
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self.eof or left <= 0:
                    why = f"exited ({self.proc.poll()})" if self.eof else f"nothing in {timeout:.0f} s"
                    raise StartupError(f"no {event!r} from {self.name}: {why}; its last lines:\n"
                                       + "\n".join(x[:500] for x in self.lines[-20:]))
                self.cond.wait(left)

    def problems(self) -> list[str]:
        """Its ERROR lines and tracebacks."""
        with self.cond:
            return [x for x in self.lines if '"level": "ERROR"' in x or "Traceback" in x]


class Daemons:
    """Every daemon this run started (restarted workers included), and the current one of each name."""

    def __init__(self) -> None:
        pkg_root = str(Path(flexpipe.__file__).resolve().parent.parent)
        self.mark = uuid.uuid4().hex
        # the daemons import the flexpipe this script imported, and carry the run's mark to their stages
        self.env = dict(os.environ, **{RUN_MARK: self.mark})
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH")) if p)
        self.started: list[Daemon] = []
        self.current: dict[str, Daemon] = {}
        self.url = ""

    def start(self, name: str, args: list[str]) -> Daemon:
        n = sum(1 for d in self.started if d.name.split("#")[0] == name)
        d = Daemon(name if n == 0 else f"{name}#{n + 1}", args, self.env)
        self.started.append(d)
        self.current[name] = d
        return d

    def start_worker(self, name: str) -> Daemon:
        return self.start(name, ["worker", "--router", self.url, "--name", name, "--devices", "cpu:0",
                                 "--memory", "2GB", "--heartbeat-timeout", "3"])

    def stop_all(self) -> None:
        """SIGTERM the current daemons and judge how they end; then make sure nothing of the run is left."""
        for name, d in self.current.items():
            if d.proc.poll() is not None and not d.killed:
                fail(f"daemon {d.name} exited by itself (status {d.proc.returncode}) before the end")
        live = [d for d in self.current.values() if d.proc.poll() is None]
        for d in live:
            d.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + SIGTERM_WAIT_S
        for d in live:
            try:
                rc = d.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                fail(f"daemon {d.name} did not exit within {SIGTERM_WAIT_S:.0f} s of SIGTERM")
                d.proc.kill()
                d.proc.wait()
            else:
                log(f"{d.name} exited with status {rc} on SIGTERM")
                if rc != 0:
                    fail(f"daemon {d.name} exited with status {rc} on SIGTERM, not 0")
        for d in self.started:   # the killed ones too: reap them
            if d.proc.poll() is None:
                d.proc.kill()
            d.proc.wait()
        deadline = time.monotonic() + LEFTOVER_WAIT_S
        left = run_processes(self.mark)
        while left and time.monotonic() < deadline:
            time.sleep(0.2)   # (nothing to wait on for processes that are not our children)
            left = run_processes(self.mark)
        if left:
            fail(f"processes of this run still running {LEFTOVER_WAIT_S:.0f} s after every daemon exited: {left}")
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def run_processes(mark: str) -> dict[int, str]:
    """Live processes (not zombies) whose environment carries this run's mark: pid -> command line."""
    found = {}
    want = f"{RUN_MARK}={mark}".encode()
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if want not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                found[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
        except (OSError, IndexError):   # gone meanwhile, or not ours to read
            continue
    return found


async def drive(args: argparse.Namespace, daemons: Daemons) -> None:
    """Clients and chaos for args.duration seconds, then the oracle check."""
    rng = random.Random(args.seed)
    async with RemoteFlexPipe.connect(daemons.url, ready_timeout=30, heartbeat_timeout=3) as fp:
        done: list[tuple[str, dict, Any]] = []
        stop = time.monotonic() + args.duration

        async def client(i: int) -> None:
            r = random.Random(args.seed * 100 + i)
            while time.monotonic() < stop:
                p = "".join(r.choice("abcdefgh ") for _ in range(r.randint(3, 40)))
                kw: dict[str, Any] = dict(max_tokens=r.randint(5, 120), ignore_eos=True)
                if r.random() < 0.5:
                    kw.update(temperature=0.8, seed=r.randint(0, 99))
                try:
                    out = await fp.complete(p, **kw)
                    done.append((p, kw, out))
                except Exception as e:  # noqa: BLE001  (the chaos makes some; logged)
                    log("client", i, type(e).__name__, str(e)[:200])
                    await asyncio.sleep(0.5)

        async def chaos() -> None:
            while time.monotonic() < stop - 10:
                await asyncio.sleep(rng.uniform(2, 6))
                action = rng.random()
                try:
                    if action < 0.45:
                        k = rng.randint(1, 4)
                        st = await fp.reshape(stages=k)
                        log("reshape", k, st.ok, st.error[:100], "kv", st.kv_bytes)
                    elif action < 0.8:
                        stages = (await fp.status())["stages"]
                        v = rng.choice(stages)
                        os.kill(v["pid"], signal.SIGKILL)
                        log("killed stage", v["name"], v["worker"])
                    else:
                        w = rng.choice([n for n in WORKERS if daemons.current[n].proc.poll() is None])
                        daemons.current[w].killed = True
                        daemons.current[w].proc.kill()
                        log("killed worker", w)
                        await asyncio.sleep(rng.uniform(1, 5))
                        daemons.start_worker(w)
                        log("restarted worker", w)
                except Exception as e:  # noqa: BLE001  (a reshape may lose a stage; logged)
                    log("chaos action", type(e).__name__, str(e)[:200])

        await asyncio.gather(chaos(), *(client(i) for i in range(CLIENTS)))
        st = await fp.status()
        log("history", [(h["kind"], h["ok"], (h.get("error") or "")[:80]) for h in st["reshapes"]][-40:])
        log("finished", len(done), "requests; checking against the oracle")
        reasons: dict[str, int] = {}
        bad = 0
        for p, kw, out in done:
            reasons[out.finish_reason] = reasons.get(out.finish_reason, 0) + 1
            if out.finish_reason != "length":
                continue
            want = await asyncio.to_thread(fp.reference_tokens, p, **kw)   # off the event loop
            if out.token_ids != want:
                bad += 1
                k = next((j for j, (a, b) in enumerate(zip(out.token_ids, want)) if a != b),
                         min(len(out.token_ids), len(want)))
                fail(f"mismatch {p!r} {kw}: {len(out.token_ids)} tokens, oracle {len(want)}, first "
                     f"difference at {k}")
        log("reasons", reasons, "mismatches", bad)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(
        description="Soak test of FlexPipe's daemon mode: a router daemon and 3 worker daemons as "
                    "processes (python -m flexpipe.cli), 6 clients through RemoteFlexPipe, and random "
                    "reshapes, stage SIGKILLs and worker SIGKILLs with restarts. At the end it checks "
                    "every finished output against the single-process oracle, that no daemon exited "
                    "by itself, that each exits 0 on SIGTERM, and that no stage outlives them.",
        epilog="Prints 'RESULT OK []' and exits 0, or 'RESULT FAILURES [...]' and exits 1. SEED "
               "reproduces the random choices, not the timing. Example: "
               "python scripts/chaos_daemons.py 3 120 shm")
    ap.add_argument("seed", type=int, help="seed of every random choice (prompts, sampling, chaos actions)")
    ap.add_argument("duration", type=float,
                    help="seconds of load (the chaos stops 10 s before its end); the oracle check and "
                         "the shutdown come after")
    ap.add_argument("transport", choices=["auto", "message", "shm", "cuda_ipc"],
                    help="the router's --transport: the hop between stage processes")
    ap.add_argument("--startup-timeout", type=float, default=120.0,
                    help="seconds for the router to listen, and then to be ready with its workers "
                         "(default: %(default)s)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run, stop everything, print the verdict; 0 when OK, 1 on any failure."""
    args = parse_args(argv)
    torch.set_num_threads(1)   # the oracle, beside 4 daemons and their stages
    # SIGTERM (timeout, a test's deadline) unwinds like Ctrl-C, so the daemons are stopped on the way out
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    daemons = Daemons()
    try:
        log(f"SEED {args.seed} duration {args.duration}s transport {args.transport} python {sys.executable}")
        router = daemons.start("router", [
            "router", "--bind", "tcp://127.0.0.1:0", "--model", "tiny", "--stages", "2",
            "--transport", args.transport, "--min-workers", "3", "--heartbeat-timeout", "3",
            "--num-blocks", "120"])
        daemons.url = router.wait_event("listening", args.startup_timeout)["endpoint"]
        for n in WORKERS:
            daemons.start_worker(n)
        router.wait_event("ready", args.startup_timeout)
        # an overall bound: a hang anywhere still ends in a verdict
        asyncio.run(asyncio.wait_for(drive(args, daemons), args.duration + 600))
    except BaseException as e:  # noqa: BLE001  (KeyboardInterrupt and SIGTERM included)
        fail(f"the run raised {type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # the clean-up runs to its end
        try:
            daemons.stop_all()
        except BaseException as e:  # noqa: BLE001
            fail(f"stopping the daemons raised {type(e).__name__}: {e}\n{traceback.format_exc()}")
            for d in daemons.started:
                if d.proc.poll() is None:
                    d.proc.kill()
        for d in daemons.started:
            bad = d.problems()
            print("---", d.name, len(d.lines), "lines;", len(bad), "errors")
            print("\n".join(x[:500] for x in bad[:15]))
    for f in FAIL:
        print(" -", f[:2000])
    print("RESULT", "FAILURES" if FAIL else "OK", [f.splitlines()[0][:300] for f in FAIL[:5]], flush=True)
    return 1 if FAIL else 0


if __name__ == "__main__":
    sys.exit(main())

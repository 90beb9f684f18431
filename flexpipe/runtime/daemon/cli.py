"""The command line of the daemons: `flexpipe router`, `flexpipe worker`, `python -m flexpipe.runtime.daemon`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any

from flexpipe.errors import ConfigError
from flexpipe.runtime.daemon.events import configure_logging
from flexpipe.runtime.daemon.router import RouterDaemon
from flexpipe.runtime.daemon.worker import WorkerDaemon
from flexpipe.runtime.remote import CURVE_FIELDS, curve_from_env
from flexpipe.settings import ROUTER_SETTINGS, RUNTIME_SETTINGS, WORKER_SETTINGS, Setting


# --- command line ------------------------------------------------------------------------------------------
# The runtime settings `flexpipe router` offers: all of flexpipe.api.Settings but the device (each
# worker says which devices it has); one list with `flexpipe serve`'s (flexpipe/settings.py).
_RUNTIME_FLAGS: list[tuple[str, Any, str]] = [(s.name, s.type, s.help) for s in RUNTIME_SETTINGS
                                              if s.name != "device"]


def _env(name: str, default: Any) -> Any:
    return os.environ.get(name, default)


def _add_settings(p: argparse.ArgumentParser, settings: list[Setting]) -> None:
    """--flags of daemon-only settings (flexpipe/settings.py), each also read from its environment variable."""
    for s in settings:
        p.add_argument(s.flag, dest=s.name, type=s.type, default=_env(s.env, s.default), metavar=s.metavar,
                       help=f"{s.help} (env {s.env}; default %(default)s)")


def add_daemon_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register `flexpipe router` and `flexpipe worker`."""
    fmt = {"choices": ["kv", "json"], "default": _env("FLEXPIPE_LOG_FORMAT", "kv"),
           "help": "log lines as key=value or JSON (env FLEXPIPE_LOG_FORMAT; default %(default)s)"}
    r = subparsers.add_parser(
        "router", help="the router daemon: serves a pipeline whose stages run on worker daemons",
        description="Run the router daemon: bind --bind for clients (flexpipe serve --router, RemoteFlexPipe) "
                    "and workers, wait for --min-workers workers, start the pipeline's stages on them, and "
                    "serve until SIGTERM (then drain, stop the stages, exit 0).")
    r.add_argument("--bind", default=_env("FLEXPIPE_ROUTER_BIND", "tcp://127.0.0.1:5555"),
                   help="tcp://HOST:PORT for clients and workers (PORT 0: a free port, logged in the "
                        "'listening' event), or ipc:///PATH when all run on this host "
                        "(env FLEXPIPE_ROUTER_BIND; default %(default)s)")
    r.add_argument("--advertise", default=None, metavar="HOST",
                   help="address peers reach this router at (default: the --bind host, or this machine's "
                        "address when it binds every interface)")
    r.add_argument("--model", default="tiny", help="preset name or HF checkpoint directory (default: tiny)")
    r.add_argument("--stages", type=int, default=2, help="pipeline stages to start with (default: 2)")
    r.add_argument("--boundaries", default=None, metavar="0,A,B,...,N",
                   help="explicit stage boundaries (unit indices) instead of --stages")
    r.add_argument("--min-workers", type=int, default=1,
                   help="workers that must join before the pipeline starts (default: 1)")
    r.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds running requests may take to finish before they end with "
                        "finish_reason 'shutdown' (default: 30)")
    _add_settings(r, ROUTER_SETTINGS)
    r.add_argument("--log-format", **fmt)
    _add_curve_flags(r)
    g = r.add_argument_group("runtime settings (flexpipe.api.Settings; default: the runtime's own)")
    for name, typ, help_ in _RUNTIME_FLAGS:
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=help_)
    r.set_defaults(func=router_main)

    w = subparsers.add_parser(
        "worker", help="a worker daemon: offers this host's devices to a router and runs its stages",
        description="Run a worker daemon: announce this host's devices to the router, start and stop stage "
                    "processes when it asks, and report their health; on SIGTERM stop them and exit 0. "
                    "Several workers may run on one host (each with its own --name and --devices).")
    w.add_argument("--router", default=_env("FLEXPIPE_ROUTER", None), required="FLEXPIPE_ROUTER" not in os.environ,
                   help="the router's tcp://HOST:PORT or ipc:///PATH (env FLEXPIPE_ROUTER)")
    w.add_argument("--name", default=None, help="worker (and node) name, unique in the cluster "
                   "(default: HOSTNAME-PID)")
    w.add_argument("--host", default=None, help="address the router and other stages reach this worker's stages "
                   "at (default: this machine's address on the route to the router)")
    w.add_argument("--devices", default="auto", help="auto (GPUs via pynvml, else one CPU device), cpu, "
                   "cpu:0,cpu:1, cuda, or cuda:0,cuda:1 (default: auto)")
    w.add_argument("--memory", default=None, help="memory budget of each CPU device, e.g. 2GB (default: 2GiB); "
                   "for GPUs, a cap on what each offers")
    w.add_argument("--heartbeat-interval", type=float, default=0.5, help="seconds between heartbeats (default 0.5)")
    w.add_argument("--heartbeat-timeout", type=float, default=3.0,
                   help="seconds without a heartbeat before the router counts as gone (default 3)")
    _add_settings(w, WORKER_SETTINGS)
    w.add_argument("--log-format", **fmt)
    _add_curve_flags(w)
    w.set_defaults(func=worker_main)


def _add_curve_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("CURVE authentication of tcp endpoints (key files of `flexpipe keys`)")
    for f, help_ in zip(CURVE_FIELDS, ["server keypair (.key_secret) every tcp mailbox presents: needed by every "
                                       "daemon and client (each has a tcp mailbox of its own)",
                                       "server public key (.key) to expect of the mailboxes this host connects to "
                                       "(default: the public half of --curve-server-secret, which is needed "
                                       "anyway; this does not replace it)",
                                       "this host's client keypair (.key_secret; default: the server's)",
                                       "authorized client public keys (.key file or directory)"]):
        g.add_argument("--" + f.replace("_", "-"), dest=f, default=None, metavar="FILE",
                       help=f"{help_} (env FLEXPIPE_{f.upper()})")


def _curve(args: argparse.Namespace) -> dict[str, str]:
    return {**curve_from_env(), **{f: getattr(args, f) for f in CURVE_FIELDS if getattr(args, f, None)}}


def _configure_logging(args: argparse.Namespace) -> None:
    """The daemon's structured log lines (configure_logging, which passes its format down to the processes
    it starts), and its level passed down the same way (LOG_LEVEL_ENV): a worker's stages logged at
    WARNING whatever the worker's --log-level."""
    from flexpipe.runtime.launcher import LOG_LEVEL_ENV

    configure_logging(args.log_format)
    level = getattr(args, "log_level", None) or logging.getLevelName(logging.getLogger().getEffectiveLevel())
    os.environ[LOG_LEVEL_ENV] = str(level).upper()


def _serve(daemon: Any) -> int:
    """Run a daemon until SIGTERM or SIGINT."""
    async def go() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            return await daemon.run(stop)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    return asyncio.run(go())


def router_main(args: argparse.Namespace) -> int:
    """`flexpipe router`."""
    from flexpipe.api import ModelSpec, Settings, plan_shape

    _configure_logging(args)
    settings = Settings(**{n: getattr(args, n) for n, _, _ in _RUNTIME_FLAGS if getattr(args, n) is not None})
    try:
        bounds = [int(b) for b in args.boundaries.split(",")] if args.boundaries else None
    except ValueError:
        raise ConfigError(f"--boundaries {args.boundaries!r}: give unit indices separated by commas, "
                          "e.g. 0,12,24") from None
    # "flexpipe: error: ..." now, not once the first worker joins: the shape the router will start
    settings.check()
    plan_shape(ModelSpec.resolve(args.model, settings.seed).config, args.stages, bounds)
    return _serve(RouterDaemon(args.bind, args.model, args.stages, boundaries=bounds, min_workers=args.min_workers,
                               drain_timeout=args.drain_timeout, advertise=args.advertise, settings=settings,
                               curve=_curve(args), stage_overhead=args.stage_overhead))


def worker_main(args: argparse.Namespace) -> int:
    """`flexpipe worker`."""
    from flexpipe.partition import parse_bytes
    from flexpipe.runtime.daemon.devices import check_memory

    _configure_logging(args)
    memory = check_memory(parse_bytes(args.memory), args.memory) if args.memory else None
    return _serve(WorkerDaemon(args.router, name=args.name, host=args.host, devices=args.devices, memory=memory,
                               heartbeat_interval=args.heartbeat_interval, heartbeat_timeout=args.heartbeat_timeout,
                               curve=_curve(args), usage_interval=args.usage_interval))


def main(argv: list[str] | None = None) -> int:
    """`python -m flexpipe.runtime.daemon router|worker ...`: `flexpipe router|worker ...`, run by flexpipe's
    own main (its --log-level check, and one 'flexpipe: error:' line for a bad value or a missing file
    rather than a traceback).  This parser only keeps the entry point to the two daemons: its usage
    and --help name them alone."""
    from flexpipe.cli import main as flexpipe_main

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="flexpipe-daemon")
    parser.add_argument("--log-level", default=os.environ.get("FLEXPIPE_LOG_LEVEL", "WARNING"),
                        help="logging level (env FLEXPIPE_LOG_LEVEL; default WARNING)")
    add_daemon_parsers(parser.add_subparsers(dest="command", required=True))
    parser.parse_args(argv)
    return flexpipe_main(argv)

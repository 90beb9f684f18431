"""The command line of the daemons: `flexpipe router`, `flexpipe worker`, `python -m flexpipe.runtime.daemon`.

Each setting (flexpipe/settings.py: ROUTER_SETTINGS and ROUTER_RUNTIME_SETTINGS, WORKER_SETTINGS) is taken
as `flexpipe serve` takes its own: the flag, else its environment variable, else the config file (--config
or FLEXPIPE_CONFIG; its [router] / [worker] table, else its top level), else the default (resolve_settings).
The CURVE key files are flags and FLEXPIPE_CURVE_* variables only, read by every client the same way
(runtime/remote.py: curve_from_env).
"""

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
from flexpipe.settings import (ROUTER_RUNTIME_SETTINGS, ROUTER_SETTINGS, WORKER_SETTINGS, add_setting_flags,
                               resolve_settings)


# --- command line ------------------------------------------------------------------------------------------
_WHERE = ("Each setting is taken from its flag, else its environment variable, else the config file (--config "
          "or FLEXPIPE_CONFIG: its [{0}] table, else its top level, where the other commands' keys are left to "
          "them), else its default.")


def add_daemon_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register `flexpipe router` and `flexpipe worker`."""
    r = subparsers.add_parser(
        "router", help="the router daemon: serves a pipeline whose stages run on worker daemons",
        description="Run the router daemon: bind --bind for clients (flexpipe serve --router, RemoteFlexPipe) "
                    "and workers, wait for --min-workers workers, start the pipeline's stages on them, and "
                    "serve until SIGTERM (then drain, stop the stages, exit 0). " + _WHERE.format("router"))
    add_setting_flags(r, ROUTER_SETTINGS, "router")
    _add_curve_flags(r)
    g = r.add_argument_group("runtime settings (flexpipe.api.Settings; the device is each worker's)")
    add_setting_flags(g, ROUTER_RUNTIME_SETTINGS, "router", config_flag=False)
    r.set_defaults(func=router_main)

    w = subparsers.add_parser(
        "worker", help="a worker daemon: offers this host's devices to a router and runs its stages",
        description="Run a worker daemon: announce this host's devices to the router, start and stop stage "
                    "processes when it asks, and report their health; on SIGTERM stop them and exit 0. "
                    "Several workers may run on one host (each with its own --name and --devices). "
                    + _WHERE.format("worker"))
    add_setting_flags(w, WORKER_SETTINGS, "worker")
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


def _configure_logging(log_format: str, args: argparse.Namespace) -> None:
    """The daemon's structured log lines (configure_logging, which passes its format down to the processes
    it starts), and its level passed down the same way (LOG_LEVEL_ENV): a worker's stages logged at
    WARNING whatever the worker's --log-level."""
    from flexpipe.runtime.launcher import LOG_LEVEL_ENV

    configure_logging(log_format)
    level = getattr(args, "log_level", None) or logging.getLevelName(logging.getLogger().getEffectiveLevel())
    os.environ[LOG_LEVEL_ENV] = str(level).upper()


def _serve(daemon: Any) -> int:
    """Run a daemon until SIGTERM or SIGINT, then let it shut down; returns its exit code.

    A signal repeated meanwhile (a supervisor's, a second `kill`) changes nothing, nor once the daemon
    has returned, as the process exits: then the signals are ignored.  Given back their default action
    there, one killed a process that had shut down cleanly (exit -15).  The handlers are the signal
    module's, not the loop's, so that no moment between the two has the default action (the loop's
    removal sets it)."""
    async def go() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))
        try:
            return await daemon.run(stop)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_IGN)

    return asyncio.run(go())


def router_main(args: argparse.Namespace) -> int:
    """`flexpipe router`."""
    cfg = resolve_settings(ROUTER_SETTINGS + ROUTER_RUNTIME_SETTINGS, args, "router")
    from flexpipe.api import ModelSpec, Settings, check_hop_fits, plan_shape

    _configure_logging(cfg["log_format"], args)
    # Only what was set anywhere goes to the runtime (as `flexpipe serve` does); the rest keeps its defaults.
    settings = Settings(**{s.name: cfg[s.name] for s in ROUTER_RUNTIME_SETTINGS if cfg[s.name] != s.default})
    boundaries = cfg["boundaries"]
    try:
        bounds = [int(b) for b in boundaries.split(",")] if boundaries else None
    except ValueError:
        raise ConfigError(f"--boundaries {boundaries!r}: give unit indices separated by commas, "
                          "e.g. 0,12,24") from None
    # "flexpipe: error: ..." now, not once the first worker joins: the shape the router will start, and a
    # max_message_bytes its stages' activations fit in (between workers they always go as messages)
    settings.check()
    config = ModelSpec.resolve(cfg["model"], settings.seed).config
    plan_shape(config, cfg["stages"], bounds)
    check_hop_fits(config, settings, in_process=False)
    return _serve(RouterDaemon(cfg["bind"], cfg["model"], cfg["stages"], boundaries=bounds,
                               min_workers=cfg["min_workers"], drain_timeout=cfg["drain_timeout"],
                               advertise=cfg["advertise"], settings=settings, curve=_curve(args),
                               stage_overhead=cfg["stage_overhead"]))


def worker_main(args: argparse.Namespace) -> int:
    """`flexpipe worker`."""
    from flexpipe.partition import parse_bytes
    from flexpipe.runtime.daemon.devices import check_memory

    cfg = resolve_settings(WORKER_SETTINGS, args, "worker")
    if not cfg["router"]:
        raise ConfigError("which router should this worker join? Give its tcp://HOST:PORT or ipc:///PATH as "
                          "--router, the environment variable FLEXPIPE_ROUTER or the config key 'router'")
    _configure_logging(cfg["log_format"], args)
    memory = check_memory(parse_bytes(cfg["memory"]), cfg["memory"]) if cfg["memory"] else None
    return _serve(WorkerDaemon(cfg["router"], name=cfg["name"], host=cfg["host"], devices=cfg["devices"],
                               memory=memory, heartbeat_interval=cfg["heartbeat_interval"],
                               heartbeat_timeout=cfg["heartbeat_timeout"], curve=_curve(args),
                               usage_interval=cfg["usage_interval"], max_message_bytes=cfg["max_message_bytes"]))


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

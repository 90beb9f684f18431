"""`flexpipe serve` (the HTTP front end) and `flexpipe chat` (a terminal client of a running server).

Every setting comes from, in this order: the command line, an environment variable FLEXPIPE_<NAME>,
a config file (--config, YAML or TOML; keys at the top level or under a [serve] / [chat] table),
the default (flexpipe/settings.py: resolve_settings, which every command that reads a config file
shares).  The settings themselves (SERVE_SETTINGS, CHAT_SETTINGS) are declared in flexpipe/settings.py,
which needs no extra, so that `flexpipe generate` and the daemons know their keys in a shared file.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

from flexpipe.errors import ConfigError
from flexpipe.settings import CHAT_SETTINGS, RUNTIME_SETTINGS, SERVE_SETTINGS, add_setting_flags, resolve_settings


# --- flexpipe serve ------------------------------------------------------------------------------
def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `flexpipe serve`."""
    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server with a chat page, on an embedded pipeline",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Start a FlexPipe pipeline in this machine and serve it over HTTP:\n"
                    "  /                     chat page with a live view of the pipeline\n"
                    "  /v1/models, /v1/completions, /v1/chat/completions   (OpenAI API, stream: true)\n"
                    "  /v1/flexpipe/status   current shape and recent reshapes\n"
                    "  /health, /metrics     liveness and Prometheus metrics\n\n"
                    "Each setting is taken from its flag, else its environment variable, else the\n"
                    "config file, else its default.")
    add_setting_flags(p, SERVE_SETTINGS, "serve")
    runtime = p.add_argument_group("runtime settings (passed to the pipeline)")
    add_setting_flags(runtime, RUNTIME_SETTINGS, "serve", config_flag=False)
    p.set_defaults(func=serve_main)
    return p


def serve_main(args: argparse.Namespace) -> int:
    """Run `flexpipe serve` until SIGINT/SIGTERM."""
    cfg = resolve_settings(SERVE_SETTINGS + RUNTIME_SETTINGS, args, "serve")
    from flexpipe.api import FlexPipe

    from .app import create_app
    from .runner import serve_forever

    # Only what was set anywhere goes to the runtime; the rest keeps the runtime's own defaults.
    options = {s.name: cfg[s.name] for s in RUNTIME_SETTINGS if cfg[s.name] != s.default}
    model, stages, in_process = cfg["model"], cfg["stages"], cfg["in_process"]
    _check_serve_settings(cfg)
    if cfg["router"]:
        print(f"flexpipe serve: connecting to the router at {cfg['router']} (waiting up to "
              f"{cfg['router_timeout']:g}s for it to answer, {cfg['router_ready_timeout']:g}s for it to serve)...",
              file=sys.stderr, flush=True)
        _check_router(cfg["router"], cfg["router_timeout"], cfg["router_ready_timeout"], cfg["max_message_bytes"])
    else:
        from flexpipe.api import ModelSpec, Settings, check_hop_fits, plan_shape

        # "flexpipe: error: ..." now, not a traceback from the server's startup after the engine loads
        settings = Settings(**options)
        settings.check()
        _check_device(settings.device)
        config = ModelSpec.resolve(model, settings.seed).config
        plan_shape(config, stages, device=settings.device)
        check_hop_fits(config, settings, in_process)

    def launch() -> Any:
        if cfg["router"]:
            from flexpipe.runtime.remote import connect

            return connect(cfg["router"], answer_timeout=cfg["router_timeout"],
                           ready_timeout=cfg["router_ready_timeout"], max_message_bytes=cfg["max_message_bytes"])
        return FlexPipe.launch(model=model, stages=stages, in_process=in_process,
                               autoscale=True if cfg["autoscale"] else None, **options)

    origins = [o.strip() for o in (cfg["allowed_origins"] or "").split(",") if o.strip()]
    app = create_app(launch, model_name=cfg["served_model_name"], api_key=cfg["api_key"],
                     chat_template=cfg["chat_template"], default_max_tokens=cfg["default_max_tokens"],
                     allowed_origins=origins, body_timeout_s=cfg["body_timeout_s"])
    if not cfg["router"]:
        print(f"flexpipe serve: starting model {model!r} on {stages} stage(s)...", file=sys.stderr, flush=True)

    def ready(url: str) -> None:
        shown = url.replace("0.0.0.0", "127.0.0.1").replace("[::]", "[::1]")
        key = " (API key required)" if cfg["api_key"] else ""
        print(f"flexpipe serve: chat page {shown}/   OpenAI API {shown}/v1{key}   Ctrl-C to stop",
              file=sys.stderr, flush=True)

    log_level = (getattr(args, "log_level", None) or os.environ.get("FLEXPIPE_LOG_LEVEL") or "info").lower()
    if log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
        log_level = "info"
    started = serve_forever(app, host=cfg["host"], port=cfg["port"], on_ready=ready, log_level=log_level,
                            access_log=cfg["access_log"], graceful_s=cfg["graceful_shutdown_s"])
    return 0 if started else 1


def _check_router(url: str, timeout: float, ready_timeout: float, max_message_bytes: int) -> None:
    """Connect to the router once, before the HTTP server starts: a router that does not answer within
    `timeout` seconds, or whose pipeline does not serve within `ready_timeout` (from the start), is one
    'flexpipe: error:' line and exit 1.  The server connects again in its own event loop (where the
    engine must live); failing there, in the app's startup, gave a traceback from uvicorn and exit 3,
    after 120 s of silence.  A router that answered but never served was waited for 120 s whatever the
    options said (RemoteFlexPipe.connect's own ready_timeout)."""
    import asyncio

    from flexpipe.runtime.remote import connect

    async def probe() -> None:
        async with connect(url, answer_timeout=timeout, ready_timeout=ready_timeout,
                           max_message_bytes=max_message_bytes):
            pass

    asyncio.run(probe())


def _check_serve_settings(cfg: dict[str, Any]) -> None:
    """Refuse values `flexpipe serve` would only trip over later (or silently misread), saying which."""
    if not 0 <= cfg["port"] <= 65535:
        raise ConfigError(f"port must be 0..65535 (0: any free port), not {cfg['port']}")
    if cfg["stages"] is not None and cfg["stages"] < 1:
        raise ConfigError(f"stages must be >= 1, not {cfg['stages']}")
    if cfg["default_max_tokens"] is not None and cfg["default_max_tokens"] < 1:
        raise ConfigError(f"default_max_tokens must be >= 1 (leave it unset for the default), "
                          f"not {cfg['default_max_tokens']}")
    if cfg["api_key"] is not None and not cfg["api_key"].strip():
        raise ConfigError("api_key is empty (a flag, FLEXPIPE_API_KEY or the config file set it to ''): give a "
                          "key, or leave it unset to serve without one")
    if not cfg["graceful_shutdown_s"] >= 0:
        raise ConfigError(f"graceful_shutdown_s must be >= 0 seconds, not {cfg['graceful_shutdown_s']}")
    if not (math.isfinite(cfg["body_timeout_s"]) and cfg["body_timeout_s"] > 0):
        raise ConfigError(f"body_timeout_s must be a finite number of seconds > 0, not {cfg['body_timeout_s']}")
    if cfg["chat_template"] is not None:
        from .chat_template import load_template_source

        try:
            load_template_source(cfg["chat_template"])
        except ConfigError:
            raise
        except (OSError, ValueError) as e:   # unreadable, not UTF-8, or a tokenizer_config that is no JSON
            raise ConfigError(f"chat_template {cfg['chat_template']!r}: {e}") from None
    if cfg["router"]:
        from flexpipe.runtime.remote import parse_endpoint

        try:
            parse_endpoint(cfg["router"], "router")
        except ConfigError:
            raise
        except ValueError:   # urlsplit's, for a port that is no number or out of range
            raise ConfigError(f"router {cfg['router']!r} is not of the form tcp://HOST:PORT or "
                              "ipc:///PATH") from None
        for key in ("router_timeout", "router_ready_timeout"):
            if not (0 < cfg[key] < float("inf")):
                raise ConfigError(f"{key} must be a number of seconds > 0, not {cfg[key]}")
        if cfg["autoscale"]:
            raise ConfigError("autoscale cannot be used with router: the router daemon has no control loop yet "
                              "(docs/autoscale.md); reshape it through POST /v1/flexpipe/reshape, or serve an "
                              "embedded pipeline (no router) to autoscale")


def _check_device(device: str) -> None:
    """A cuda device that this machine's torch can use (the stages would fail on it only once started)."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: this torch ({torch.__version__}) sees no CUDA GPU; use cpu")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: torch sees {torch.cuda.device_count()} CUDA GPU(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")


# --- flexpipe chat -------------------------------------------------------------------------------
def add_chat_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `flexpipe chat`."""
    p = subparsers.add_parser(
        "chat", help="chat in the terminal with a running `flexpipe serve`",
        description="Talk to a running `flexpipe serve` (answers stream as they are generated). Type a "
                    "message and Enter; /reset forgets the conversation, /retry sends a failed message again "
                    "(a failed turn is not part of the conversation), /status shows the pipeline, "
                    "/quit (or Ctrl-D) leaves. Each setting is taken from its flag, else its environment "
                    "variable, else the config file, else its default.")
    add_setting_flags(p, CHAT_SETTINGS, "chat")
    p.set_defaults(func=chat_main)
    return p


def chat_main(args: argparse.Namespace) -> int:
    """Run `flexpipe chat`."""
    from .chat_client import ChatClient, ServerError

    cfg = resolve_settings(CHAT_SETTINGS, args, "chat")
    client = ChatClient(cfg["url"], api_key=cfg["api_key"], model=cfg["model"], system=cfg["system"],
                        sampling={"max_tokens": cfg["max_tokens"], "temperature": cfg["temperature"],
                                  "top_p": cfg["top_p"], "seed": cfg["seed"]})
    with client:
        try:
            client.connect()
        except ServerError as e:
            print(f"flexpipe chat: {e}", file=sys.stderr)
            return 1
        if cfg["message"] is not None:
            return 0 if client.turn(cfg["message"], sys.stdout) else 1
        return client.repl(sys.stdin, sys.stdout)

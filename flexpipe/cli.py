"""The `flexpipe` command.  Each subcommand lives with the layer it drives; this file only wires them."""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import sys

from flexpipe.errors import ConfigError, FlexPipeError
from flexpipe.settings import GENERATE_SETTINGS, add_setting_flags, resolve_settings

# (module, add-parser function) of subcommands owned by other layers, imported lazily so that a
# missing optional extra (serve, sim, gpu) disables only its own subcommand.
_EXTERNAL: list[tuple[str, str, str | None]] = [
    ("flexpipe.server.cli", "add_serve_parser", "serve"),
    ("flexpipe.server.cli", "add_chat_parser", "serve"),
    ("flexpipe.sim.cli", "add_simulate_parser", "sim"),
    ("flexpipe.placement.cli", "add_topology_parser", None),
    ("flexpipe.runtime.keys", "add_keys_parser", None),
    ("flexpipe.runtime.daemon", "add_daemon_parsers", None),
]


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a completion through a pipeline of stage processes",
                       description="Start the pipeline (router in this process, one process per stage), "
                                   "generate one completion and print it as it streams.")
    p.add_argument("prompt", nargs="?", default="Hello", help="prompt text (default: %(default)r)")
    p.add_argument("--model", default="tiny", help="preset name or HF checkpoint directory (default: tiny)")
    p.add_argument("--stages", type=int, default=2, help="number of pipeline stages (default: 2)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate (default: 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--in-process", action="store_true", help="run stages in this process")
    p.add_argument("--check", action="store_true",
                   help="also run the single-process reference and fail if the tokens differ")
    runtime = p.add_argument_group("runtime settings (flexpipe.api.Settings), each from its flag, else its "
                                   "environment variable, else the config file, else its default")
    add_setting_flags(runtime, GENERATE_SETTINGS, "generate")
    p.set_defaults(func=_generate_main)


def _generate_main(args: argparse.Namespace) -> int:
    import anyio

    from flexpipe.api import FlexPipe

    from flexpipe.model.sampling import SamplingParams

    # The runtime settings (all but the weights seed: flexpipe/settings.py, GENERATE_SETTINGS), each taken
    # as `flexpipe serve` takes it: the flag, else FLEXPIPE_<NAME>, else the config file, else the default.
    cfg = resolve_settings(GENERATE_SETTINGS, args, "generate")
    # Only what was set anywhere goes to the runtime (as `flexpipe serve` does); the rest keeps its defaults.
    settings = {s.name: cfg[s.name] for s in GENERATE_SETTINGS if cfg[s.name] != s.default}
    # sampling parameters refused before any stage starts (or any weight loads), not after the prompt prints
    SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed).validate()

    async def go() -> int:
        async with FlexPipe.launch(model=args.model, stages=args.stages, in_process=args.in_process,
                                   **settings) as fp:
            shape = fp.status()["shape"]
            print(f"# model {fp.model_name}: {len(shape['stages'])} stages "
                  f"{[(s['start'], s['end']) for s in shape['stages']]}", flush=True)
            print(args.prompt, end="", flush=True)
            ids: list[int] = []
            async for ev in fp.generate(args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                        top_k=args.top_k, top_p=args.top_p, seed=args.seed):
                if ev.token_id is not None:
                    ids.append(ev.token_id)
                print(ev.text, end="", flush=True)
            print()
            if args.check:
                ref = fp.reference_tokens(args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                          top_k=args.top_k, top_p=args.top_p, seed=args.seed)
                if ref != ids:
                    print(f"# MISMATCH with the reference: {ids} != {ref}", flush=True)
                    return 1
                print(f"# {len(ids)} tokens, identical to the single-process reference", flush=True)
        return 0

    return anyio.run(go)


def _add_partition(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("partition", help="print the unit table and a balanced partition",
                       description="Show the model's units with their costs and the stage boundaries the "
                                   "solver picks for a stage count or a list of per-stage memory caps.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", default=None, help="model preset (tiny, llama2-7b, opt-66b, ...)")
    g.add_argument("--model", default=None, help="HF checkpoint directory (reads config.json only)")
    p.add_argument("--stages", type=int, default=None, help="number of stages")
    p.add_argument("--caps", default=None, help="per-stage memory caps in order, e.g. 2GB,1GB,1GB")
    p.add_argument("--tokens", type=int, default=256, help="tokens per micro-batch step (default: 256)")
    p.add_argument("--kv-tokens", type=int, default=0, help="KV tokens reserved per stage (default: 0)")
    p.add_argument("--tflops", type=float, default=100.0, help="effective TFLOP/s per stage (default: 100)")
    p.add_argument("--bandwidth", default="12.5GB", help="bytes/s between stages (default: 12.5GB)")
    p.add_argument("--dtype-bytes", type=int, default=2, help="bytes per parameter (default: 2)")
    p.add_argument("--units", action="store_true", help="print every unit, not only the stages")
    p.set_defaults(func=_partition_main)


def _partition_main(args: argparse.Namespace) -> int:
    from flexpipe.model.config import ModelConfig
    from flexpipe.partition import CostModel, UnitGraph, parse_bytes, solve
    from flexpipe.partition.solver import WHOLE_FIELDS, check_whole, fmt_bytes

    # the operating point, refused before any work: a zero rate divided by zero, negative tokens or
    # bytes gave negative times and memory that the solver then balanced as if they were real.  The
    # counts are the solver's own checks (the same rule and words), named by their flags.
    if not (math.isfinite(args.tflops) and args.tflops > 0):
        raise ConfigError(f"--tflops {args.tflops:g}: give the effective TFLOP/s of a stage, a finite number > 0")
    if parse_bytes(args.bandwidth) <= 0:
        raise ConfigError(f"--bandwidth {args.bandwidth!r}: give the bytes/s between stages, > 0 (e.g. 12.5GB)")
    flags = {"tokens": "--tokens", "kv_tokens": "--kv-tokens"}
    for field, what, least in WHOLE_FIELDS:
        if field in flags:
            check_whole(getattr(args, field), flags[field], what, least)
    check_whole(args.dtype_bytes, "--dtype-bytes", "the bytes per parameter", 1)
    if args.stages is not None:
        check_whole(args.stages, "--stages", "the number of pipeline stages", 1)
    cfg = ModelConfig.from_hf(args.model) if args.model else ModelConfig.preset(args.preset or "tiny")
    graph = UnitGraph.from_config(cfg, dtype_bytes=args.dtype_bytes)
    caps = args.caps.split(",") if args.caps else None
    if caps is None and args.stages is None:
        args.stages = 1
    cost = CostModel(tokens=args.tokens, flops_per_s=args.tflops * 1e12,
                     bandwidth=float(parse_bytes(args.bandwidth)), kv_tokens=args.kv_tokens)
    part = solve(graph, num_stages=args.stages, caps=caps, cost=cost)
    print(f"model {cfg.name}: {len(graph)} units, "
          f"{fmt_bytes(sum(u.param_bytes for u in graph.units))} of parameters")
    if args.units:
        print(f"{'unit':>5} {'name':<16} {'params':>12} {'GFLOP/tok':>10} {'KV B/tok':>9}")
        for u in graph.units:
            print(f"{u.index:>5} {u.name:<16} {fmt_bytes(u.param_bytes):>12} "
                  f"{u.flops_per_token / 1e9:>10.3f} {u.kv_bytes_per_token:>9}")
    print(f"{'stage':>5} {'units':>11} {'first':<16} {'last':<16} {'memory':>12} {'cap':>12} {'time ms':>9}")
    for k in range(part.num_stages):
        a, b = part.boundaries[k], part.boundaries[k + 1]
        cap = fmt_bytes(parse_bytes(caps[k])) if caps else "-"
        print(f"{k:>5} {f'[{a},{b})':>11} {graph.units[a].name:<16} {graph.units[b - 1].name:<16} "
              f"{fmt_bytes(part.stage_bytes[k]):>12} {cap:>12} {part.stage_times[k] * 1e3:>9.3f}")
    print(f"slowest stage {part.bottleneck * 1e3:.3f} ms at {args.tokens} tokens per step")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every subcommand whose dependencies are installed."""
    parser = argparse.ArgumentParser(
        prog="flexpipe",
        description="FlexPipe: LLM serving as a pipeline of fine-grained stages, reshaped while requests run.")
    parser.add_argument("--log-level", default=os.environ.get("FLEXPIPE_LOG_LEVEL", "WARNING"),
                        help="logging level (env FLEXPIPE_LOG_LEVEL; default WARNING)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_generate(sub)
    _add_partition(sub)
    for module, fn, extra in _EXTERNAL:
        try:
            add = getattr(importlib.import_module(module), fn)
        except ModuleNotFoundError as e:
            if extra is None or (e.name or "").startswith("flexpipe"):
                raise
            hint = f"install the '{extra}' extra: pip install 'flexpipe[{extra}]' (missing {e.name})"
            name = fn.removeprefix("add_").removesuffix("_parser")
            p = sub.add_parser(name, help=f"(unavailable: {hint})")
            p.set_defaults(func=lambda _a, h=hint: (print(f"flexpipe: {h}", file=sys.stderr), 2)[1])
            continue
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    levels = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
    if args.log_level.upper() not in levels:
        parser.error(f"--log-level {args.log_level!r} (or FLEXPIPE_LOG_LEVEL): give one of {', '.join(levels)}")
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except FlexPipeError as e:
        print(f"flexpipe: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.filename is None:   # not about a file the user named: a bug or the system's, with its traceback
            raise
        # a file or folder given on the command line that is missing, unreadable or unwritable
        logging.getLogger("flexpipe").debug("%s", e, exc_info=True)
        names = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        print(f"flexpipe: error: {names}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

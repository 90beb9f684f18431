"""`flexpipe topology`: print this machine's GPU topology (or a described cluster), write a description."""

from __future__ import annotations

import argparse
import json
import sys

from flexpipe.errors import ConfigError, FlexPipeError, NoDriverError


def add_topology_parser(sub: argparse._SubParsersAction) -> None:
    """Register the `topology` subcommand (its handler is topology_main)."""
    p = sub.add_parser(
        "topology", help="show the local GPU topology (pynvml) or a cluster description",
        description="Discover this machine's GPUs with pynvml (memory, NVLink, PCIe paths) and print them, "
                    "or load a cluster description (a path, or a shipped name such as paper-testbed-82). "
                    "Without an NVIDIA driver, says so and exits 1.")
    p.add_argument("--from", dest="source", default=None, metavar="FILE|NAME",
                   help="a cluster description (.json/.yaml) or shipped name instead of discovery")
    p.add_argument("--fragment", type=int, default=None, metavar="SEED",
                   help="replace the occupancy with a random fragmented one (the paper's statistics)")
    p.add_argument("--write", default=None, metavar="FILE", help="write the description (.json or .yaml)")
    p.add_argument("--no-state", action="store_true", help="with --write: leave out free memory and load")
    p.add_argument("--json", action="store_true", help="print the description as JSON instead of a table")
    p.add_argument("--rows", type=int, default=None, help="print at most this many GPU rows")
    p.add_argument("--list", action="store_true", help="list the shipped cluster descriptions")
    p.add_argument("--node", default=None, help="node name for discovery (default: the host name)")
    p.set_defaults(func=topology_main)


def topology_main(args: argparse.Namespace) -> int:
    """Run `flexpipe topology`; returns the exit status."""
    from flexpipe.placement.topology import CLUSTERS_DIR, discover_local, format_table, fragment, load_cluster

    if args.list:
        for path in sorted(CLUSTERS_DIR.glob("*.*")):
            t = load_cluster(path)
            print(f"{path.stem:<24} {len(t.nodes):>4} nodes {len(t):>5} GPUs  {t.description[:70]}")
        return 0
    try:
        topo = load_cluster(args.source) if args.source else discover_local(args.node)
    except NoDriverError as e:
        print(f"flexpipe topology: {e}", file=sys.stderr)
        print("flexpipe topology: shipped descriptions: flexpipe topology --list", file=sys.stderr)
        return 1
    except FlexPipeError as e:
        print(f"flexpipe topology: {e}", file=sys.stderr)
        return 1
    if args.rows is not None and args.rows < 0:
        raise ConfigError(f"--rows {args.rows}: the number of GPU rows to print is an integer >= 0")
    if args.fragment is not None:
        if args.fragment < 0:
            raise ConfigError(f"--fragment {args.fragment}: the seed is an integer >= 0")
        topo = fragment(topo, args.fragment)
    if args.write:
        topo.save(args.write, state=not args.no_state)
        print(f"# wrote {args.write}", file=sys.stderr)
    if args.json:
        print(json.dumps(topo.to_dict(), indent=1))
    else:
        print(format_table(topo, args.rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (python -m flexpipe.placement.cli)."""
    ap = argparse.ArgumentParser(prog="flexpipe")
    add_topology_parser(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``python -m dynviz --help``.

One module per group of commands, each adding its subcommands with ``argtypes.command``; a
command imports the library only when it runs, so ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import logging
import sys

from dynviz import __version__
from dynviz.cli import bench, data, init, predict, ship, train
from dynviz.cli.argtypes import WORKSPACE_HELP


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dynviz",
        description="Dynamic inference for image classifiers: data, training, caches, "
                    "policies, evaluation and benchmarks.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and an error's traceback")
    parser.add_argument("--version", action="version", version=f"dynviz {__version__}")
    parser.add_argument("--workspace", metavar="DIR", help=WORKSPACE_HELP)
    parser.set_defaults(needs_workspace=True)      # argtypes.command sets it per command
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (init, data, train, bench, ship, predict):
        group.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from dynviz import runtime, workspace
    runtime.keep_freed_memory()      # steadier timings (see there); before any model runs
    try:
        if args.needs_workspace:
            args.ws = workspace.resolve(args.workspace)
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as err:  # incl. missing data/checkpoints
        if args.verbose:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 1

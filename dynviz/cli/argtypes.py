"""Argument types that refuse a bad value while parsing, before any slow work starts, and
the one way a command is added."""
from __future__ import annotations

import argparse
from pathlib import Path


def positive_int(text: str) -> int:
    """A whole number ≥ 1 (batches, repeats, epochs, images)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number ≥ 1")
    return value


def fraction(text: str) -> float:
    """A number from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number from 0 to 1")
    return value


def output_file(text: str) -> Path:
    """A file to write: its directory exists and it is not itself a directory."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; name a file in it")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{path.parent} does not exist; create it first")
    return path


WORKSPACE_HELP = ("the workspace (a directory with a dynviz.toml) to work on (default: "
                  "$DYNVIZ_WORKSPACE, else the built-in CIFAR-10 zoo)")


def command(sub, name: str, *, workspace: bool = True, **kwargs) -> argparse.ArgumentParser:
    """``sub.add_parser(name, **kwargs)``. A command that works in a workspace also takes
    ``--workspace`` after its name (unset there, the one given before the name holds); one
    that does not (``workspace=False``) is run without resolving one."""
    parser = sub.add_parser(name, **kwargs)
    parser.set_defaults(needs_workspace=workspace)
    if workspace:
        parser.add_argument("--workspace", metavar="DIR", help=WORKSPACE_HELP,
                            default=argparse.SUPPRESS)
    return parser

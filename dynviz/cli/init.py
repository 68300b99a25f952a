"""``init``: a starter workspace for an ImageFolder of one's own."""
from __future__ import annotations

import argparse

from dynviz.cli.argtypes import command


def add_parser(sub) -> None:
    p = command(
        sub, "init", workspace=False, help="start a workspace for your own ImageFolder",
        description="Write DIR/dynviz.toml for the ImageFolder IMAGEFOLDER "
                    "(IMAGEFOLDER/<class>/<image>; any class names, at least 2 classes of at "
                    "least 20 images): its classes, input size, per-channel mean/std of the "
                    "train split, the split (last 10% "
                    "of every class by sorted file name for validation) and the default "
                    "systems, each with the command that trains it.")
    p.add_argument("directory", metavar="DIR", help="the workspace directory (created)")
    p.add_argument("--data", required=True, metavar="IMAGEFOLDER", help="the dataset")
    p.add_argument("--image-size", type=int, metavar="N",
                   help="input side in pixels (default: the median image side, at most 64)")
    p.add_argument("--force", action="store_true", help="write over an existing dynviz.toml")
    p.set_defaults(func=_cmd_init)


def _cmd_init(args: argparse.Namespace) -> int:
    from dynviz import scaffold, workspace

    path = scaffold.starter(args.directory, args.data, args.image_size, args.force)
    ws = workspace.load(path.parent)
    print(f"wrote {path}: {ws.data.n_classes} classes, {ws.data.image_size}x"
          f"{ws.data.image_size} input; next: train its systems with the commands it lists")
    return 0

"""``train``: run a named recipe on the workspace's dataset."""
from __future__ import annotations

import argparse
import json
import sys

from dynviz.cli.argtypes import command, positive_int


def add_parser(sub) -> None:
    p = command(sub, "train", help="train a named recipe",
                description="Train a recipe on the workspace's dataset; writes NAME.pt "
                            "and NAME.json into the workspace's checkpoints (the "
                            "built-in workspace: into .cache/runs/NAME/), or --out-dir. "
                            "Over a checkpoint the app loads only with --replace. "
                            "Checkpoints every epoch; --resume continues. "
                            "Data-parallel: torchrun --nproc_per_node N -m dynviz train R")
    p.add_argument("recipe", help="recipe name: dynviz/recipes.py RECIPES, or a [recipes.NAME] "
                                  "table of the workspace's dynviz.toml")
    p.add_argument("--name", help="output name (default: the recipe name)")
    p.add_argument("--resume", action="store_true", help="continue the last run of NAME")
    p.add_argument("--epochs", type=positive_int, help="override the recipe's epochs")
    p.add_argument("--limit-batches", type=positive_int, help="batches per epoch (smoke runs)")
    p.add_argument("--out-dir", help="where NAME.pt/.json go (default: the workspace's "
                                     "checkpoints; the built-in workspace: .cache/runs/NAME)")
    p.add_argument("--replace", action="store_true",
                   help="overwrite NAME.pt/.json in the checkpoint directory the app loads")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from dynviz import recipes, train

    known = recipes.for_workspace(args.ws)
    if args.recipe not in known:
        print(f"unknown recipe {args.recipe!r}; choose from {', '.join(known)}",
              file=sys.stderr)
        return 2
    train.init_distributed()
    manifest = train.train(args.ws, args.name or args.recipe, known[args.recipe],
                           resume=args.resume, epochs=args.epochs,
                           limit_batches=args.limit_batches, out_dir=args.out_dir,
                           replace=args.replace)
    if manifest:
        print(json.dumps(manifest["metrics"], indent=2))
    return 0

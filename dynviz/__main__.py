"""Command line: ``python -m dynviz --help``."""
from __future__ import annotations

import argparse
import json
import logging
import sys


def _cmd_data(args: argparse.Namespace) -> int:
    from dynviz import data

    if args.download:
        dest = data.download_cifar10(args.dest)
        print(f"CIFAR-10 is in {dest}")
    dataset = data.open_cifar10(args.root)
    splits = {name: data.get_split(name, dataset) for name in data.SPLITS}
    print(f"dataset: {dataset.root} ({dataset.kind}, {len(dataset)} images, "
          f"fingerprint {dataset.fingerprint})")
    for name, split in splits.items():
        print(f"  {name:6s} {len(split):6d} images  fingerprint {split.fingerprint}")
    if args.decode:
        images = data.load_images(dataset)
        print(f"decoded cache: {images.shape} {images.dtype}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from dynviz import train

    if args.recipe not in train.RECIPES:
        print(f"unknown recipe {args.recipe!r}; choose from {', '.join(train.RECIPES)}",
              file=sys.stderr)
        return 2
    train.init_distributed()
    manifest = train.train(args.name or args.recipe, train.RECIPES[args.recipe],
                           resume=args.resume, epochs=args.epochs,
                           limit_batches=args.limit_batches, out_dir=args.out_dir)
    if manifest:
        print(json.dumps(manifest["metrics"], indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dynviz",
        description="Dynamic inference for image classifiers: data, training, caches, "
                    "policies, evaluation and benchmarks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("data", help="find CIFAR-10, show the splits, decode the image cache",
                       description="Locate CIFAR-10 ($DYNVIZ_DATA, ./data, "
                                   "../shared/datasets/cifar10-jpeg), print the splits and "
                                   "their fingerprints.")
    p.add_argument("--root", help="dataset root (default: search the usual places)")
    p.add_argument("--download", action="store_true",
                   help="download CIFAR-10 with torchvision first (needs internet)")
    p.add_argument("--dest", help="download destination (default: $DYNVIZ_DATA or ./data)")
    p.add_argument("--decode", action="store_true", help="build the decoded uint8 cache now")
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser("train", help="train a named recipe",
                       description="Train a recipe; writes models/checkpoints/NAME.pt and "
                                   "NAME.json. Checkpoints every epoch; --resume continues. "
                                   "Data-parallel: torchrun --nproc_per_node N -m dynviz train R")
    p.add_argument("recipe", help="recipe name (see dynviz/train.py RECIPES)")
    p.add_argument("--name", help="output name (default: the recipe name)")
    p.add_argument("--resume", action="store_true", help="continue the last run of NAME")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    p.add_argument("--limit-batches", type=int, help="batches per epoch (smoke runs)")
    p.add_argument("--out-dir", help="where NAME.pt/.json go (default models/checkpoints)")
    p.set_defaults(func=_cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

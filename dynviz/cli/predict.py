"""``predict``: classify image files with a system, one JSON line each."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dynviz.cli.argtypes import command


def add_parser(sub) -> None:
    p = command(sub, "predict", help="classify image files with a system",
                description="Prediction, compute path summary, MACs and measured "
                            "latency (dynamic vs dense) per image, one JSON line each.")
    p.add_argument("system", help="a system of the workspace (its dynviz.toml)")
    p.add_argument("images", nargs="+", help="image files (jpg, png, webp, bmp, gif, tiff)")
    p.add_argument("--loss", type=float, choices=[0.5, 1.0],
                   help="operating point of staged systems: max accuracy loss in %% "
                        "(default 0.5)")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    from dynviz import live, operating_points, uploads, zoo

    ws = args.ws
    images = []       # every file decoded before a model loads: a bad one fails at once
    for path in args.images:
        try:
            images.append(uploads.preprocess_upload(Path(path).read_bytes(),
                                                    ws.data.image_size))
        except (OSError, uploads.InvalidImageError) as err:
            raise ValueError(f"{path}: {getattr(err, 'strerror', None) or err}") from None
    policy = (operating_points.load_policy(ws, args.system, args.loss / 100) if args.loss
              else None)
    if args.loss and policy is None and zoo.staged(ws, [args.system]):
        raise FileNotFoundError(f"no shipped ≤{args.loss:g}% loss point for {args.system}; run "
                                f"`{live.policies_command(ws)}`")
    system = live.build(ws, args.system, policy)
    for path, image in zip(args.images, images):
        print(json.dumps({"image": path} | live.inspect_image(system, image).summary()))
    return 0

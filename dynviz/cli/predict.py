"""``predict``: classify image files with a system, one JSON line each."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="classify image files with a system",
                       description="Prediction, compute path summary, MACs and measured "
                                   "latency (dynamic vs dense) per image, one JSON line each.")
    p.add_argument("system", help="a default system (see dynviz/zoo.py)")
    p.add_argument("images", nargs="+", help="image files (jpg, png, webp, bmp, gif, tiff)")
    p.add_argument("--loss", type=float, choices=[0.5, 1.0],
                   help="operating point of staged systems: max accuracy loss in %% "
                        "(default 0.5)")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    from dynviz import data, live, operating_points

    images = []       # every file decoded before a model loads: a bad one fails at once
    for path in args.images:
        try:
            images.append(data.preprocess_upload(Path(path).read_bytes()))
        except (OSError, data.InvalidImageError) as err:
            raise ValueError(f"{path}: {getattr(err, 'strerror', None) or err}") from None
    policy = operating_points.load_policy(args.system, args.loss / 100) if args.loss else None
    system = live.build(args.system, policy)
    for path, image in zip(args.images, images):
        print(json.dumps({"image": path} | live.inspect_image(system, image).summary()))
    return 0

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
    from dynviz.recipes import RECIPES

    if args.recipe not in RECIPES:
        print(f"unknown recipe {args.recipe!r}; choose from {', '.join(RECIPES)}",
              file=sys.stderr)
        return 2
    train.init_distributed()
    manifest = train.train(args.name or args.recipe, RECIPES[args.recipe],
                           resume=args.resume, epochs=args.epochs,
                           limit_batches=args.limit_batches, out_dir=args.out_dir)
    if manifest:
        print(json.dumps(manifest["metrics"], indent=2))
    return 0


def _cmd_bench_gated(args: argparse.Namespace) -> int:
    from dynviz import bench

    rows = []
    for placement in args.placement:
        rows += bench.bench_gated(args.model, placement=placement, blocks_off=args.blocks_off,
                                  channels_off=args.channels_off,
                                  batch_sizes=tuple(args.batch), repeats=args.repeats,
                                  checkpoint=args.checkpoint, calibrate=not args.no_calibrate,
                                  same_channels=args.same_channels,
                                  use_native={"auto": None, "native": True,
                                              "python": False}[args.runner])
    print(bench.format_rows(rows))
    return 0


def _cmd_native(args: argparse.Namespace) -> int:
    from dynviz import engine, settings

    if not settings.native_enabled():
        print("the native block runner is turned off (DYNVIZ_NATIVE=0)")
        return 0
    module = engine.native_module()
    if module is None:
        print("the native block runner is not available here; Python blocks run (see above)",
              file=sys.stderr)
        return 1
    print(f"native block runner: {module.__file__}")
    return 0


def _cmd_bench_policy(args: argparse.Namespace) -> int:
    from dynviz import bench

    print(bench.format_rows(bench.bench_policy(args.n, args.stages, args.repeats)))
    return 0


def _cmd_bench_stages(args: argparse.Namespace) -> int:
    from dynviz import bench

    print(bench.format_rows(bench.bench_stages(args.model, batch_sizes=tuple(args.batch),
                                               repeats=args.repeats)))
    return 0


def _cmd_bench_staged(args: argparse.Namespace) -> int:
    from dynviz import bench

    rows = []
    for system in args.system:
        rows += bench.bench_staged(system, loss=args.loss / 100, n_images=args.images,
                                   repeats=args.repeats)
    print(bench.format_rows(rows))
    return 0


def _split_arg(args: argparse.Namespace):
    from dynviz import data

    return data.test_split(args.data) if args.data else data.get_split(args.split)


def _cmd_cache(args: argparse.Namespace) -> int:
    from dynviz import zoo

    split = _split_arg(args)
    names = list(zoo.SYSTEMS) if args.model == "all" else [args.model]
    for name in names:
        missing = zoo.missing(name)
        if missing:
            print(f"{name}: skipped, untrained checkpoints: {', '.join(missing)} "
                  f"(train with: {zoo.train_command(missing[0])})", file=sys.stderr)
            continue
        cached = zoo.outputs(name, split)
        print(f"{name}: {len(cached)} images of {split.name} -> {cached.directory}")
    return 0


def _cmd_ship(args: argparse.Namespace) -> int:
    """Rebuild everything under assets/: caches, policies, results."""
    from dynviz import cache, data, settings, zoo

    val = data.get_split("val")
    for name in zoo.available():
        shipped = cache.ensure(name, zoo.load_system(name), val, zoo.checkpoint_sha(name),
                               root=settings.assets_dir() / "outputs")
        print(f"{name}: {shipped.directory}")
    args.out = str(settings.assets_dir() / "results.json")
    args.split, args.data = "check", None
    return _cmd_policies(args) or _cmd_evaluate(args)


def _cmd_policies(args: argparse.Namespace) -> int:
    from dynviz import data, operating_points, policy_report, zoo

    for path in operating_points.ship(args.family, args.feature):
        print(f"wrote {path}")
    val = data.get_split("val")
    print("\nOn the check half (learned policy vs one global threshold, and vs the oracle):")
    print("Baseline: the global threshold chosen on fit for the same budget; hindsight: the "
          "best threshold on check at the learned policy's cost there;\n± one paired "
          "standard error of the gap.")
    print(policy_report.markdown([policy_report.report(name, val, args.family, args.feature)
                                  for name in zoo.staged(zoo.available())]))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dynviz import evaluate

    split = _split_arg(args)
    rows = evaluate.evaluate(split, time_it=not args.no_timing, repeats=args.repeats)
    evaluate.write(rows, Path(args.out))
    print(evaluate.markdown(rows))
    print(f"\nwrote {args.out} ({split.name}, {len(split)} images)")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dynviz import data, inspect, operating_points

    images = []       # every file decoded before a model loads: a bad one fails at once
    for path in args.images:
        try:
            images.append(data.preprocess_upload(Path(path).read_bytes()))
        except (OSError, data.InvalidImageError) as err:
            raise ValueError(f"{path}: {getattr(err, 'strerror', None) or err}") from None
    policy = operating_points.load_policy(args.system, args.loss / 100) if args.loss else None
    runner = inspect.build_runner(args.system, policy)
    for path, image in zip(args.images, images):
        print(json.dumps({"image": path} | inspect.inspect_image(runner, image).summary()))
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

    p = sub.add_parser("native", help="build the native (C++) block runner",
                       description="Compiles models/csrc/blocks.cpp into the cache (once, about "
                                   "a minute) and says where it is; exit status 1 when it "
                                   "cannot be built here (Python blocks then run).")
    p.set_defaults(func=_cmd_native)

    p = sub.add_parser("train", help="train a named recipe",
                       description="Train a recipe; writes models/checkpoints/NAME.pt and "
                                   "NAME.json. Checkpoints every epoch; --resume continues. "
                                   "Data-parallel: torchrun --nproc_per_node N -m dynviz train R")
    p.add_argument("recipe", help="recipe name (see dynviz/recipes.py RECIPES)")
    p.add_argument("--name", help="output name (default: the recipe name)")
    p.add_argument("--resume", action="store_true", help="continue the last run of NAME")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    p.add_argument("--limit-batches", type=int, help="batches per epoch (smoke runs)")
    p.add_argument("--out-dir", help="where NAME.pt/.json go (default models/checkpoints)")
    p.set_defaults(func=_cmd_train)

    bench = sub.add_parser("bench", help="benchmarks (measured wall-clock)",
                           description="Benchmarks; each prints a Markdown table.")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    p = bench_sub.add_parser(
        "gated", help="dense vs masked vs sparse LC-Net execution",
        description="Times the plain ResNet, the gated model's masked path and its sparse "
                    "path (calibrated per block) at each batch size; medians after warm-up.")
    p.add_argument("--model", default="lcnet_resnet56", help="gated model (registry name)")
    p.add_argument("--checkpoint", help="trained weights to load (keeps their gates)")
    p.add_argument("--placement", nargs="+", default=["sequential"],
                   choices=["parallel", "sequential"])
    p.add_argument("--blocks-off", type=float, default=0.5,
                   help="fraction of blocks skipped per image (random patterns)")
    p.add_argument("--channels-off", type=float, default=0.0,
                   help="fraction of channels off per image in executed blocks")
    p.add_argument("--same-channels", action="store_true",
                   help="one channel set per block for every image (else per-image sets)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 256], help="batch sizes")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per measurement")
    p.add_argument("--no-calibrate", action="store_true",
                   help="always slice channels instead of calibrating per block")
    p.add_argument("--runner", choices=["auto", "native", "python"], default="auto",
                   help="run the frozen blocks of both networks from C++ (native) or Python; "
                        "auto: native when it can be built")
    p.set_defaults(func=_cmd_bench_gated)

    p = bench_sub.add_parser("policy", help="policy refit and sweep times",
                             description="Median times of fitting policies on N cached "
                                         "outputs of K stages (synthetic confidences).")
    p.add_argument("--n", type=int, default=2500, help="images (default: the fit half)")
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.set_defaults(func=_cmd_bench_policy)

    p = bench_sub.add_parser("stages", help="time vs MACs, stage by stage, of a plain ResNet",
                             description="Median time of the stem, every stage and the head "
                                         "of a plain ResNet (random weights, BN folded) "
                                         "beside its share of the MACs.")
    p.add_argument("--model", default="resnet56", help="plain ResNet (registry name)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 256], help="batch sizes")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per measurement")
    p.set_defaults(func=_cmd_bench_stages)

    p = bench_sub.add_parser(
        "staged", help="batch-1 time of a staged system, by the stage images leave at",
        description="For the first check images, grouped by the stage they leave at under "
                    "the shipped operating point: the dense network, the stages they ran "
                    "(network work only) and the system deciding as it goes; medians of "
                    "round-robin runs.")
    p.add_argument("--system", nargs="+", default=["exits_resnet56", "cascade_r8_r20_r56"],
                   help="staged systems (default: %(default)s)")
    p.add_argument("--loss", type=float, default=0.5, choices=[0.5, 1.0],
                   help="operating point: max accuracy loss in %% (default %(default)s)")
    p.add_argument("--images", type=int, default=64, help="check images, one at a time")
    p.add_argument("--repeats", type=int, default=9, help="timed runs per measurement")
    p.set_defaults(func=_cmd_bench_staged)

    def add_split(p):
        p.add_argument("--split", default="val", choices=["train", "val", "fit", "check"],
                       help="CIFAR-10 split (default: %(default)s)")
        p.add_argument("--data", help="an ImageFolder directory to use as a test split instead")

    p = sub.add_parser("cache", help="cache a system's outputs on a split",
                       description="Run a system on every image of a split and store logits, "
                                   "per-image MACs and gate scores (rebuilt when stale).")
    p.add_argument("--model", default="all", help="system name or 'all' (default)")
    add_split(p)
    p.set_defaults(func=_cmd_cache)

    def add_policy_kind(p: argparse.ArgumentParser) -> None:
        p.add_argument("--family", default="auto",
                       choices=["auto", "constant", "threshold", "linear"],
                       help="policy family; auto (default): the cheapest on the fit half "
                            "among thresholds on each feature and the linear family")
        p.add_argument("--feature", default="max_prob",
                       choices=["max_prob", "margin", "neg_entropy"],
                       help="feature of a threshold family, and of the global-threshold "
                            "baseline (default: %(default)s)")

    p = sub.add_parser("policies", help="choose and ship the default operating points",
                       description="For every staged system, the cheapest policy within 0.5% "
                                   "and 1% accuracy of resnet56 on the fit half (one paired "
                                   "standard error kept in reserve) -> assets/policies; then "
                                   "the learned policies against one global threshold on the "
                                   "check half.")
    add_policy_kind(p)
    p.set_defaults(func=_cmd_policies)

    p = sub.add_parser("ship", help="rebuild assets/: cached outputs, policies, results",
                       description="Cache every trained system's outputs on the validation "
                                   "split into assets/outputs, choose the default operating "
                                   "points (assets/policies) and write assets/results.json.")
    add_policy_kind(p)
    p.add_argument("--no-timing", action="store_true", help="skip latency measurements")
    p.add_argument("--repeats", type=int, default=7,
                   help="timed rounds; a speedup is the median of their ratios")
    p.set_defaults(func=_cmd_ship)

    p = sub.add_parser("evaluate", help="the results table of every default system",
                       description="Accuracy, MACs, MAC reduction and measured speedups "
                                   "(batch 1 and 256, against resnet56) of every trained "
                                   "system, one JSON row each.")
    p.add_argument("--split", default="check", choices=["train", "val", "fit", "check"],
                   help="CIFAR-10 split (default: %(default)s)")
    p.add_argument("--data", help="an ImageFolder directory to evaluate instead")
    p.add_argument("--out", default="results.json", help="JSON output (default: %(default)s)")
    p.add_argument("--no-timing", action="store_true", help="skip latency measurements")
    p.add_argument("--repeats", type=int, default=7,
                   help="timed rounds; a speedup is the median of their ratios")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="classify image files with a system",
                       description="Prediction, compute path summary, MACs and measured "
                                   "latency (dynamic vs dense) per image, one JSON line each.")
    p.add_argument("system", help="a default system (see dynviz/zoo.py)")
    p.add_argument("images", nargs="+", help="image files (jpg, png, webp, bmp, gif, tiff)")
    p.add_argument("--loss", type=float, choices=[0.5, 1.0],
                   help="operating point of staged systems: max accuracy loss in %% "
                        "(default 0.5)")
    p.set_defaults(func=_cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from dynviz import engine
    engine.keep_freed_memory()       # steadier timings (see there); before any model runs
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as err:  # incl. missing data/checkpoints
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

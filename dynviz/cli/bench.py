"""``bench gated|policy|stages|staged``: measured wall-clock, each a Markdown table."""
from __future__ import annotations

import argparse

from dynviz.cli.argtypes import command, fraction, positive_int


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (measured wall-clock)",
                           description="Benchmarks; each prints a Markdown table.")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    p = command(
        bench_sub, "gated", help="dense vs masked vs sparse LC-Net execution",
        description="Times the plain ResNet, the gated model's masked path and its sparse "
                    "path (calibrated per block) at each batch size; medians after warm-up.")
    p.add_argument("--model", default="lcnet_resnet56", help="gated model (registry name)")
    p.add_argument("--checkpoint",
                   help="trained weights in the workspace to load (keeps their gates)")
    p.add_argument("--placement", nargs="+", default=["sequential"],
                   choices=["parallel", "sequential"])
    p.add_argument("--blocks-off", type=fraction, default=0.5,
                   help="fraction of blocks skipped per image (random patterns)")
    p.add_argument("--channels-off", type=fraction, default=0.0,
                   help="fraction of channels off per image in executed blocks")
    p.add_argument("--same-channels", action="store_true",
                   help="one channel set per block for every image (else per-image sets)")
    p.add_argument("--batch", type=positive_int, nargs="+", default=[1, 256], help="batch sizes")
    p.add_argument("--repeats", type=positive_int, default=10, help="timed runs per measurement")
    p.add_argument("--no-calibrate", action="store_true",
                   help="always slice channels instead of calibrating per block")
    p.add_argument("--runner", choices=["auto", "native", "python"], default="auto",
                   help="run the folded blocks of both networks from C++ (native) or Python; "
                        "auto: native when it can be built")
    p.set_defaults(func=_cmd_bench_gated)

    p = command(bench_sub, "policy", workspace=False,          # synthetic outputs
                help="policy refit and sweep times",
                description="Median times of fitting policies on N cached outputs of K "
                            "stages (synthetic confidences).")
    p.add_argument("--n", type=positive_int, default=2500, help="images (default: the fit half)")
    p.add_argument("--stages", type=positive_int, default=3)
    p.add_argument("--repeats", type=positive_int, default=20)
    p.set_defaults(func=_cmd_bench_policy)

    p = command(bench_sub, "stages", help="time vs MACs, stage by stage, of a plain ResNet",
                description="Median time of the stem, every stage and the head of a plain "
                            "ResNet (random weights, BN folded) beside its share of the MACs.")
    p.add_argument("--model", default="resnet56", help="plain ResNet (registry name)")
    p.add_argument("--batch", type=positive_int, nargs="+", default=[1, 256], help="batch sizes")
    p.add_argument("--repeats", type=positive_int, default=10, help="timed runs per measurement")
    p.set_defaults(func=_cmd_bench_stages)

    p = command(
        bench_sub, "staged", help="batch-1 time of a staged system, by the stage images leave at",
        description="For the first check images, grouped by the stage they leave at under "
                    "the shipped operating point: the dense network, the stages they ran "
                    "(network work only) and the system deciding as it goes; medians of "
                    "round-robin runs.")
    p.add_argument("--system", nargs="+",
                   help="staged systems (default: every trained one of the workspace)")
    p.add_argument("--loss", type=float, default=0.5, choices=[0.5, 1.0],
                   help="operating point: max accuracy loss in %% (default %(default)s)")
    p.add_argument("--images", type=positive_int, default=64, help="check images, one at a time")
    p.add_argument("--repeats", type=positive_int, default=9, help="timed runs per measurement")
    p.set_defaults(func=_cmd_bench_staged)


def _cmd_bench_gated(args: argparse.Namespace) -> int:
    from dynviz import bench
    from dynviz.bench import gated

    rows = []
    for placement in args.placement:
        rows += gated.bench_gated(args.ws, args.model, placement=placement,
                                  blocks_off=args.blocks_off, channels_off=args.channels_off,
                                  batch_sizes=tuple(args.batch), repeats=args.repeats,
                                  checkpoint=args.checkpoint, calibrate=not args.no_calibrate,
                                  same_channels=args.same_channels,
                                  use_native={"auto": None, "native": True,
                                              "python": False}[args.runner])
    print(bench.format_rows(rows))
    return 0


def _cmd_bench_policy(args: argparse.Namespace) -> int:
    from dynviz import bench
    from dynviz.bench import policy

    print(bench.format_rows(policy.bench_policy(args.n, args.stages, args.repeats)))
    return 0


def _cmd_bench_stages(args: argparse.Namespace) -> int:
    from dynviz import bench
    from dynviz.bench import stages

    print(bench.format_rows(stages.bench_stages(args.ws, args.model,
                                               batch_sizes=tuple(args.batch),
                                               repeats=args.repeats)))
    return 0


def _cmd_bench_staged(args: argparse.Namespace) -> int:
    from dynviz import bench, operating_points, zoo
    from dynviz.bench import staged

    systems = args.system or zoo.staged(args.ws, zoo.available(args.ws))
    if not systems:
        raise ValueError("the workspace has no trained staged system (early exits or a "
                         "cascade) to time")
    for system in systems:       # a policy file to mend is refused before any timing
        if system in zoo.staged(args.ws, list(args.ws.systems)):
            operating_points.load_policy(args.ws, system, args.loss / 100)
    rows = []
    for system in systems:
        rows += staged.bench_staged(args.ws, system, loss=args.loss / 100, n_images=args.images,
                                   repeats=args.repeats)
    print(bench.format_rows(rows))
    return 0

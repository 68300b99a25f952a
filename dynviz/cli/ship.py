"""``cache``, ``policies``, ``evaluate`` and ``ship`` (all three into the workspace's results
directory, assets/ for the built-in one): what a model answered on a split, the operating
points chosen on it, and the results table."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dynviz.cli.argtypes import command, output_file, positive_int

if TYPE_CHECKING:
    from dynviz.data import Split
    from dynviz.workspace import Workspace

SPLIT_CHOICES = ["train", "val", "fit", "check"]


def add_parser(sub) -> None:
    p = command(sub, "cache", help="cache a system's outputs on a split",
                description="Run a system on every image of a split and store logits, "
                            "per-image MACs and what the gates ran (rebuilt when stale).")
    p.add_argument("--model", default="all", help="system name or 'all' (default)")
    p.add_argument("--split", default="val", choices=SPLIT_CHOICES,
                   help="split of the workspace's dataset (default: %(default)s)")
    p.add_argument("--data", help="an ImageFolder directory to use as a test split instead")
    p.set_defaults(func=_cmd_cache)

    p = command(sub, "policies", help="choose and ship the default operating points",
                description="For every staged system, the cheapest policy within 0.5% "
                            "and 1% accuracy of the reference network on the fit half "
                            "(one paired standard error kept in reserve) -> the "
                            "workspace's results/policies (assets/policies for the "
                            "built-in one); then the learned policies against one "
                            "global threshold on the check half.")
    _add_policy_kind(p)
    p.set_defaults(func=_cmd_policies)

    p = command(sub, "ship", help="rebuild the results: cached outputs, policies, table",
                description="Cache every trained system's outputs on the validation "
                            "split into the workspace's results directory (assets/ "
                            "for the built-in one) under outputs/, choose the default "
                            "operating points (policies/) and write results.json.")
    _add_policy_kind(p)
    _add_timing(p)
    p.set_defaults(func=_cmd_ship)

    p = command(sub, "evaluate", help="the results table of every default system",
                description="Accuracy, MACs, MAC reduction and measured speedups "
                            "(batch 1 and 256, against the reference network) of "
                            "every trained system, one JSON row each.")
    p.add_argument("--split", default="check", choices=SPLIT_CHOICES,
                   help="split of the workspace's dataset (default: %(default)s)")
    p.add_argument("--data", help="an ImageFolder directory to evaluate instead")
    p.add_argument("--out", default="results.json", type=output_file,
                   help="JSON output (default: %(default)s)")
    _add_timing(p)
    p.set_defaults(func=_cmd_evaluate)


def _add_policy_kind(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", default="auto",
                   choices=["auto", "constant", "threshold", "linear"],
                   help="policy family; auto (default): the cheapest on the fit half "
                        "among thresholds on each feature and the linear family")
    p.add_argument("--feature", default="max_prob",
                   choices=["max_prob", "margin", "neg_entropy"],
                   help="feature of a threshold family, and of the global-threshold "
                        "baseline (default: %(default)s)")


def _add_timing(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-timing", action="store_true",
                   help="skip latency measurements (speedups are then null)")
    p.add_argument("--repeats", type=positive_int, default=7,
                   help="timed rounds; a speedup is the median of their ratios")


def _split(ws: Workspace, name: str, directory: str | None) -> Split:
    """The named split of the workspace's dataset, or every image of ``directory`` (an
    ImageFolder with the workspace's classes)."""
    from dynviz import data

    return data.test_split(directory, ws.data) if directory else ws.split(name)


def report_policies(ws: Workspace, family: str, feature: str) -> None:
    """Choose and write the shipped operating points, then print how every staged system's
    learned policies compare with one global threshold and with the oracle on check."""
    from dynviz import operating_points, policy_report, zoo

    val = ws.split("val")
    for path in operating_points.ship(ws, family, feature, val):
        print(f"wrote {path}")
    print("\nOn the check half (learned policy vs one global threshold, and vs the oracle):")
    print("Baseline: the global threshold chosen on fit for the same budget; hindsight: the "
          "best threshold on check at the learned policy's cost there;\n± one paired "
          "standard error of the gap.")
    print(policy_report.markdown([policy_report.report(ws, name, val, family, feature)
                                  for name in zoo.staged(ws, zoo.available(ws))]))


def write_results(ws: Workspace, split: Split, out: Path, *, time_it: bool,
                  repeats: int) -> None:
    """The results table of every available system on ``split``: JSON to ``out``, Markdown
    to stdout."""
    from dynviz import evaluate

    rows = evaluate.evaluate(ws, split, time_it=time_it, repeats=repeats)
    evaluate.write(rows, out)
    print(evaluate.markdown(rows))
    print(f"\nwrote {out} ({split.name}, {len(split)} images)")


def _cmd_cache(args: argparse.Namespace) -> int:
    from dynviz import zoo

    ws = args.ws
    split = _split(ws, args.split, args.data)
    names = list(ws.systems) if args.model == "all" else [ws.spec(args.model).name]
    for name in names:
        missing = zoo.missing(ws, name)
        if missing:
            print(f"{name}: skipped, not ready: " + "; ".join(need.fix(ws) for need in missing),
                  file=sys.stderr)
            continue
        cached = zoo.outputs(ws, name, split)
        print(f"{name}: {len(cached)} images of {split.name} -> {cached.directory}")
    return 0


def _cmd_policies(args: argparse.Namespace) -> int:
    report_policies(args.ws, args.family, args.feature)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    write_results(args.ws, _split(args.ws, args.split, args.data), Path(args.out),
                  time_it=not args.no_timing, repeats=args.repeats)
    return 0


def _cmd_ship(args: argparse.Namespace) -> int:
    """Rebuild everything under the workspace's results: caches, policies, the table."""
    from dynviz import cache, zoo

    ws = args.ws
    val = ws.split("val")
    for name in zoo.available(ws):
        shipped = cache.ensure(ws, name, lambda n=name: zoo.load_system(ws, n), val,
                               zoo.checkpoint_sha(ws, name), root=ws.results / "outputs")
        print(f"{name}: {shipped.directory}")
    report_policies(ws, args.family, args.feature)
    write_results(ws, ws.split("check", val.dataset), ws.results / "results.json",
                  time_it=not args.no_timing, repeats=args.repeats)
    return 0

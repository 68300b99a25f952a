"""Judge an early-exit layout trained outside the default zoo, as `ship` would judge it:

    .venv/bin/python -m dynviz train exits_resnet56_shallow --out-dir .cache/trials
    .venv/bin/python scripts/exits_trial.py .cache/trials/exits_resnet56_shallow.pt \\
        --exits 8 13 17 19 21 23 --head-convs 1

Caches the layout's outputs on the validation split (in .cache/trials), chooses the ≤0.5%
and ≤1% loss operating points on the *fit* half exactly as `python -m dynviz policies` does
and prints each point's accuracy and MAC reduction against resnet56 on *fit* (where a
trial is to be judged, so that adopting it does not look at check) and on *check*, the
per-stage accuracies, the oracle's reduction and the hindsight ceiling (the cheapest policy
of per-stage maximum-probability thresholds within 0.5% of resnet56 when chosen on the
check half itself) — beside the same figures for the shipped exits_resnet56.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
from dynviz import cache, data, learn, operating_points, settings, workspace, zoo  # noqa: E402
from dynviz import policy as P  # noqa: E402


def trial_outputs(checkpoint: Path, exits: tuple[int, ...], head_convs: int | tuple[int, ...],
                  val: data.Split) -> cache.CachedOutputs:
    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    directory = ROOT / ".cache" / "trials" / f"{checkpoint.stem}-{sha[:12]}"
    if (directory / "manifest.json").exists():
        return cache.load(directory)
    model = models.create("exits_resnet56", exits=exits, head_convs=head_convs)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    model = model.to(settings.device(), memory_format=torch.channels_last).eval()
    with torch.no_grad():
        arrays = cache.compute_outputs(model, val.images(), val.spec, device=settings.device())
    return cache.store(directory, checkpoint.stem, model, val, sha, arrays)


def hindsight_reduction(check: P.StageOutputs, accuracy: float, n_points: int = 300) -> float:
    """MAC reduction of the cheapest policy, fit on ``check`` itself, reaching ``accuracy``."""
    best = None
    for lam in np.geomspace(1e-4, 30.0, n_points):
        outcome = P.simulate(learn.fit(check, float(lam)), check)
        if outcome.correct.mean() >= accuracy - 1e-12:
            cost = float(outcome.cost.mean())
            best = cost if best is None else min(best, cost)
    return check.reference_cost / best if best else float("nan")


def report(name: str, cached: cache.CachedOutputs, ref_fit: np.ndarray,
           ref_check_accuracy: float) -> None:
    fit, check = cached.half("fit"), cached.half("check")
    print(f"{name}: stages {', '.join(check.stage_names)}; per-stage check accuracy "
          + "/".join(f"{a:.1%}" for a in check.correct.mean(0)))
    print("  per-stage fit accuracy " + "/".join(f"{a:.1%}" for a in fit.correct.mean(0)))
    for loss in operating_points.LOSSES:
        pol = operating_points.choose(fit, ref_fit, loss)
        on_fit, outcome = P.simulate(pol, fit), P.simulate(pol, check)
        print(f"  ≤{loss:.1%} point: fit {on_fit.correct.mean():.2%}, "
              f"{fit.reference_cost / on_fit.cost.mean():.3f}× fewer MACs (where it was "
              f"chosen); check {outcome.correct.mean():.2%}, "
              f"{check.reference_cost / outcome.cost.mean():.3f}× fewer MACs")
    oracle = P.oracle(check)
    print(f"  oracle: {oracle.correct.mean():.2%}, "
          f"{check.reference_cost / oracle.cost.mean():.3f}×; hindsight ceiling at ≤0.5% "
          f"loss: {hindsight_reduction(check, ref_check_accuracy - 0.005):.3f}×")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="weights of the trial exits_resnet56")
    parser.add_argument("--exits", type=int, nargs="+", required=True, help="block indices")
    parser.add_argument("--head-convs", type=int, nargs="+", required=True,
                        help="3×3 convs per exit head (one count, or one per exit)")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        parser.error(f"no checkpoint at {args.checkpoint}")
    convs = args.head_convs[0] if len(args.head_convs) == 1 else tuple(args.head_convs)
    ws = workspace.builtin()
    val = ws.split("val")
    reference = zoo.outputs(ws, ws.reference, val)
    ref_fit = reference.half("fit").correct[:, -1]
    ref_check = float(reference.half("check").correct[:, -1].mean())
    print(f"{ws.reference} on check: {ref_check:.2%}")
    if "exits_resnet56" in zoo.available(ws):
        report("exits_resnet56 (shipped)", zoo.outputs(ws, "exits_resnet56", val), ref_fit,
               ref_check)
    report(args.checkpoint.stem, trial_outputs(args.checkpoint, tuple(args.exits), convs, val),
           ref_fit, ref_check)


if __name__ == "__main__":
    main()

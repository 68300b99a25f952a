"""Does choosing among the policy kinds by cross-validation on the *fit* half beat one
global threshold at more budgets than choosing on fit itself (what `policies` does)?

    .venv/bin/python scripts/policy_cv_trial.py                  # every shipped staged system
    .venv/bin/python scripts/policy_cv_trial.py --system exits_resnet56 --folds 5

For every candidate kind (`operating_points.CANDIDATES`) and every λ of the sweep, the policy
is fit on k − 1 folds of *fit* and run on the held-out fold, so every image of fit gets an
out-of-fold outcome. The Pareto frontier of these out-of-fold (cost, accuracy) estimates picks
the (kind, λ) pairs; each is then refit on all of fit and judged on *check* against the
global maximum-probability threshold exactly as `python -m dynviz policies` judges the
in-sample frontier (`policy_report.baseline_comparison`). The ≤0.5% / ≤1% points are chosen
with the shipped rule (loss plus one paired standard error within budget) on the out-of-fold
outcomes. Both reports are printed, the in-sample one first.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dynviz import learn, operating_points, policy_report, workspace, zoo  # noqa: E402
from dynviz import policy as P  # noqa: E402


def out_of_fold_frontier(fit: P.StageOutputs, topology: str, folds: int, n_points: int,
                         seed: int = 0) -> tuple[list[learn.SweepPoint], dict[int, np.ndarray]]:
    """Frontier of the out-of-fold estimates (each point's policy refit on all of ``fit``)
    and, per point (by ``id``), the out-of-fold correctness of its images."""
    fold = np.random.default_rng(seed).permutation(len(fit)) % folds
    parts = [(fit.subset(np.flatnonzero(fold != f)), fit.subset(np.flatnonzero(fold == f)),
              np.flatnonzero(fold == f)) for f in range(folds)]
    points, correct_of = [], {}
    for family, feature in operating_points.CANDIDATES:
        for lam in np.geomspace(1e-4, 30.0, n_points):
            correct, cost = np.zeros(len(fit), bool), np.zeros(len(fit))
            for train, held, index in parts:
                outcome = P.simulate(learn.fit(train, float(lam), family, feature, topology), held)
                correct[index], cost[index] = outcome.correct, outcome.cost
            point = learn.SweepPoint(float(lam), float(correct.mean()),
                                     float(cost.mean() / fit.reference_cost),
                                     learn.fit(fit, float(lam), family, feature, topology))
            points.append(point)
            correct_of[id(point)] = correct
    return learn.pareto(points), correct_of


def summarise(title: str, rows: list[dict]) -> None:
    wins, compared, worst = policy_report.against_baseline(rows)
    if worst is None:
        print(f"  {title}: no budget where a global threshold is affordable")
        return
    print(f"  {title}: learned >= baseline at {wins}/{compared} budgets; "
          f"worst {(worst['learned'] - worst['baseline']) * 100:+.2f} ± "
          f"{worst['gap_se'] * 100:.2f} pt (budget {worst['budget']:.3f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", nargs="+", default=None,
                        help="staged systems (default: every available exits/cascade system)")
    parser.add_argument("--folds", type=int, default=5, help="folds of the fit half (5)")
    parser.add_argument("--points", type=int, default=40, help="λ values per kind (40)")
    args = parser.parse_args(argv)
    if args.folds < 2:
        parser.error("--folds must be at least 2")
    ws = workspace.builtin()
    staged = zoo.staged(ws, zoo.available(ws))
    for name in args.system or []:
        if name not in staged:
            parser.error(f"{name!r} is not a trained staged system; choose from {staged}")
    systems = args.system or staged
    val = ws.split("val")
    reference = zoo.outputs(ws, ws.reference, val)
    ref_fit = reference.half("fit").correct[:, -1]
    ref_check = reference.half("check").correct[:, -1].mean()
    for name in systems:
        cached = zoo.outputs(ws, name, val)
        fit, check = cached.half("fit"), cached.half("check")
        topology = ws.spec(name).topology
        print(f"{name} (check half, resnet56 at {ref_check * 100:.2f}%)")
        summarise("in-sample frontier (shipped rule)", policy_report.baseline_comparison(
            fit, check, topology=topology, n_points=args.points))
        front, correct_of = out_of_fold_frontier(fit, topology, args.folds, args.points)
        summarise(f"{args.folds}-fold frontier", policy_report.baseline_comparison(
            fit, check, topology=topology, frontier=front))
        for loss in operating_points.LOSSES:
            good = [p for p in front
                    if ref_fit.mean() - p.accuracy + operating_points.MARGIN_SE
                    * operating_points.paired_se(ref_fit, correct_of[id(p)]) <= loss + 1e-12]
            point = (min(good, key=lambda p: p.cost_fraction) if good
                     else max(front, key=lambda p: p.accuracy))
            outcome = P.simulate(point.policy, check)
            print(f"  {args.folds}-fold ≤{loss * 100:g}% point: {point.policy.family}/"
                  f"{point.policy.feature}, check {outcome.correct.mean() * 100:.2f}% at "
                  f"{check.reference_cost / outcome.cost.mean():.2f}× fewer MACs")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Do confidence features that compare a stage with the stages before it let the learned
policy beat one global threshold at more budgets than the shipped features do?

    .venv/bin/python scripts/policy_features_trial.py                  # every staged system
    .venv/bin/python scripts/policy_features_trial.py --system cascade_r8_r20_r56

The shipped policies see one stage's confidence only (`policy.FEATURES`: maximum
probability, margin, negative entropy). Here stage k also sees
- ``agree``: whether its prediction equals stage k − 1's (0 at the first stage);
- ``prev_prob``: stage k − 1's probability of stage k's predicted class (0 at the first);
- ``mean_prob``: the mean over stages ≤ k of their probability of stage k's class.
For each set of extra features, the linear family over the shipped three plus those is swept
on *fit* and its frontier judged on *check* against the global maximum-probability threshold
chosen on fit for the same budget, as `python -m dynviz policies` judges the shipped
frontier (printed first).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dynviz import learn, policy_report, workspace, zoo  # noqa: E402
from dynviz import policy as P  # noqa: E402

EXTRA = ("agree", "prev_prob", "mean_prob")
TRIALS = (("agree",), ("prev_prob",), ("mean_prob",), EXTRA)


def cross_stage_features(out: P.StageOutputs) -> dict[str, np.ndarray]:
    """The ``EXTRA`` features of every image and stage, each (N, K)."""
    z = out.logits.astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)                                   # (N, K, C)
    pred = out.predictions                                          # (N, K)
    n, k = pred.shape
    # prob_of_pred[i, s, j]: stage j's probability of stage s's predicted class, (N, K, K)
    prob_of_pred = np.take_along_axis(p, np.broadcast_to(pred[:, None, :], (n, k, k)),
                                      -1).transpose(0, 2, 1)
    agree, prev = np.zeros((n, k)), np.zeros((n, k))
    agree[:, 1:] = pred[:, 1:] == pred[:, :-1]
    prev[:, 1:] = prob_of_pred[:, np.arange(1, k), np.arange(k - 1)]
    mean = np.array([prob_of_pred[:, s, :s + 1].mean(1) for s in range(k)]).T
    return {"agree": agree, "prev_prob": prev, "mean_prob": mean}


def with_features(out: P.StageOutputs, extra: tuple[str, ...]) -> P.StageOutputs:
    """``out`` whose ``features`` are the shipped three followed by ``extra``."""
    cols = cross_stage_features(out)
    wide = P.StageOutputs(out.logits, out.labels, out.stage_costs, out.jump_costs,
                          out.stage_names, out.reference)
    # ``features`` is a cached_property: filling its slot is what every policy then reads
    wide.__dict__["features"] = np.concatenate(
        [out.features] + [cols[name][..., None] for name in extra], -1)
    return wide


def summary(rows: list[dict]) -> str:
    wins, compared, worst = policy_report.against_baseline(rows)
    gap = worst["learned"] - worst["baseline"]
    return f"{wins}/{compared}  {gap * 100:+.2f} ± {worst['gap_se'] * 100:.2f} pt"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", nargs="+", default=None,
                        help="staged systems (default: every available exits/cascade system)")
    parser.add_argument("--points", type=int, default=40, help="λ values per sweep (40)")
    args = parser.parse_args(argv)
    ws = workspace.builtin()
    staged = zoo.staged(ws, zoo.available(ws))
    for name in args.system or []:
        if name not in staged:
            parser.error(f"{name!r} is not a trained staged system; choose from {staged}")
    val = ws.split("val")
    for name in args.system or staged:
        cached = zoo.outputs(ws, name, val)
        fit, check = cached.half("fit"), cached.half("check")
        topology = ws.spec(name).topology
        print(f"{name} (check half; learned >= baseline, worst gap ± paired SE)")
        rows = policy_report.baseline_comparison(fit, check, topology=topology,
                                                 n_points=args.points)
        print(f"  {'shipped kinds':40s} {summary(rows)}")
        for extra in TRIALS:
            front = learn.sweep(with_features(fit, extra), args.points, "linear", "max_prob",
                                topology, lam_range=(1e-4, 30.0))
            rows = policy_report.baseline_comparison(fit, check, frontier=front,
                                                     learned_on=with_features(check, extra))
            print(f"  {'linear + ' + ', '.join(extra):40s} {summary(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

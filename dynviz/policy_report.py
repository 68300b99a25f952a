"""How a staged system's learned policies compare on the validation *check* half with one
global confidence threshold shared by every exit (the common heuristic), and with the oracle:
the table ``python -m dynviz policies`` prints.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dynviz import data, learn, operating_points, policy as P, zoo
from dynviz.workspace import Workspace

BASELINE_GRID = 400  # global thresholds tried: quantiles of the feature on the fit half


@dataclass
class PolicyReport:
    """How a staged system's learned policies compare on the *check* half.

    ``budgets``: one row per point of the learned frontier (policies fit on *fit* for a
    sweep of λ), its mean cost on fit (the budget it was chosen for) and its cost and
    accuracy on check, beside two single-global-threshold baselines:
    - ``baseline``: the threshold chosen like the learned policy, on *fit* — the most
      accurate one whose mean cost on fit is within the same budget — judged on check;
    - ``baseline_hindsight``: the most accurate threshold on check whose cost on check is at
      most the learned policy's there (chosen on the data it is judged on, which favours it).
    ``oracle_share``: at the shipped ≤0.5%-loss operating point, the MACs it saves against
    the reference over those an oracle saves at the same accuracy (``P.oracle_cost_at``).
    """
    system: str
    budgets: list[dict]
    beats_baseline: int          # budgets where learned >= baseline (both chosen on fit)
    beats_hindsight: int         # budgets where learned >= baseline_hindsight
    compared: int                # budgets where some threshold is affordable
    worst_gap: float             # min over budgets of learned - baseline accuracy
    worst_gap_se: float          # its paired standard error (``operating_points.paired_se``)
    worst_gap_hindsight: float
    operating_point: dict | None
    oracle_share: float | None


def baseline_thresholds(out: P.StageOutputs, feature: str,
                        n: int = BASELINE_GRID) -> np.ndarray:
    """Thresholds for the global-threshold baseline: ``n`` quantiles of the feature over
    every early exit of ``out``, and +inf (never leave early)."""
    values = out.features[:, :-1, P.FEATURES.index(feature)]
    return np.unique(np.append(np.quantile(values, np.linspace(0, 1, n)), np.inf))


def _cost_accuracy(policy: P.Policy, out: P.StageOutputs) -> tuple[float, float]:
    o = P.simulate(policy, out)
    return float(o.cost.mean() / out.reference_cost), float(o.correct.mean())


def _best_within(points: np.ndarray, budget: float) -> int | None:
    """Index of the most accurate (then cheapest) (cost, accuracy) row costing <= budget."""
    idx = np.flatnonzero(points[:, 0] <= budget + 1e-12)
    if not idx.size:
        return None
    return int(idx[np.lexsort((points[idx, 0], -points[idx, 1]))[0]])


def baseline_comparison(fit: P.StageOutputs, check: P.StageOutputs,
                        kinds=operating_points.CANDIDATES, feature: str = "max_prob",
                        topology: str = "chain", n_points: int = 40,
                        n_thresholds: int = BASELINE_GRID,
                        frontier: list[learn.SweepPoint] | None = None,
                        learned_on: P.StageOutputs | None = None) -> list[dict]:
    """The ``budgets`` rows of ``PolicyReport`` (see there) for outputs split in two: the
    learned frontier of ``kinds`` (or the given ``frontier``, whose points' budgets are their
    ``cost_fraction``) against one global threshold on ``feature``. ``learned_on``: the check
    images as the frontier's policies see them, when their features differ from ``check``'s
    (default: ``check``)."""
    sweep = frontier if frontier is not None else operating_points.learned_frontier(
        fit, kinds, topology, n_points)
    thresholds = baseline_thresholds(fit, feature, n_thresholds)
    on_fit = np.array([_cost_accuracy(P.global_threshold(fit, t, feature), fit)
                       for t in thresholds])
    outcomes = [P.simulate(P.global_threshold(check, t, feature), check) for t in thresholds]
    check_right = np.array([o.correct for o in outcomes])                 # (T, N)
    on_check = np.column_stack([[o.cost.mean() / check.reference_cost for o in outcomes],
                                check_right.mean(1)])
    rows = []
    for point in sweep:
        learned = P.simulate(point.policy, check if learned_on is None else learned_on)
        cost = float(learned.cost.mean() / check.reference_cost)
        chosen = _best_within(on_fit, point.cost_fraction)
        hindsight = _best_within(on_check, cost)
        rows.append({
            "budget": point.cost_fraction, "cost_fraction": cost,
            "learned": float(learned.correct.mean()),
            "baseline": None if chosen is None else float(on_check[chosen, 1]),
            "baseline_cost": None if chosen is None else float(on_check[chosen, 0]),
            "gap_se": None if chosen is None else operating_points.paired_se(
                learned.correct, check_right[chosen]),
            "baseline_hindsight": None if hindsight is None else float(on_check[hindsight, 1]),
        })
    return rows


def against_baseline(rows: list[dict]) -> tuple[int, int, dict | None]:
    """Of ``baseline_comparison`` rows: (budgets where learned >= baseline, budgets where some
    threshold is affordable, the row of the worst gap learned − baseline, or None when no
    threshold is affordable)."""
    compared = [r for r in rows if r["baseline"] is not None]
    gaps = [r["learned"] - r["baseline"] for r in compared]
    worst = compared[int(np.argmin(gaps))] if compared else None
    return sum(g >= 0 for g in gaps), len(gaps), worst


def report(ws: Workspace, name: str, val: data.Split, family: str = operating_points.AUTO,
           feature: str = "max_prob", n_points: int = 40) -> PolicyReport:
    """``family`` ``AUTO``: the learned frontier of every candidate kind against a global
    threshold on the maximum probability; else that family and feature for both."""
    cached = zoo.outputs(ws, name, val)
    fit, check = cached.half("fit"), cached.half("check")
    kinds = operating_points.candidates(family, feature)
    rows = baseline_comparison(fit, check, kinds, feature, ws.spec(name).topology, n_points)
    wins, compared, worst = against_baseline(rows)
    hindsight_gaps = [r["learned"] - r["baseline_hindsight"] for r in rows
                      if r["baseline_hindsight"] is not None]
    pol = operating_points.load_policy(ws, name, operating_points.LOSSES[0])
    op, share = None, None
    if pol is not None:
        outcome = P.simulate(pol, check)
        op = outcome.summary(check.reference_cost, check.n_stages)
        oracle_frac = P.oracle_cost_at(check, op["accuracy"]) / check.reference_cost
        share = (1 - op["cost_fraction"]) / max(1 - oracle_frac, 1e-12)
    return PolicyReport(name, rows, wins, sum(g >= 0 for g in hindsight_gaps), compared,
                        worst["learned"] - worst["baseline"] if worst else 0.0,
                        worst["gap_se"] if worst else 0.0, min(hindsight_gaps, default=0.0),
                        op, share)


def markdown(reports: list[PolicyReport]) -> str:
    """One table row per system: wins against each baseline, the worst gaps, and the shipped
    ≤0.5%-loss point's accuracy, cost and share of the oracle's saving, on check."""
    lines = ["| system | learned >= baseline | worst gap | learned >= hindsight | worst gap "
             "| ≤0.5% point: accuracy | cost | oracle share |",
             "|---|---|---|---|---|---|---|---|"]
    for r in reports:
        op = r.operating_point or {}
        lines.append(f"| {r.system} | {r.beats_baseline}/{r.compared} | "
                     f"{r.worst_gap * 100:+.2f} ± {r.worst_gap_se * 100:.2f} pt | "
                     f"{r.beats_hindsight}/{r.compared} | {r.worst_gap_hindsight * 100:+.2f} pt | "
                     f"{op.get('accuracy', float('nan')) * 100:.2f}% | "
                     f"{op.get('cost_fraction', float('nan')):.3f} | "
                     f"{(r.oracle_share or float('nan')) * 100:.0f}% |")
    return "\n".join(lines)

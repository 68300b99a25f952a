"""The Budget page's computations: re-learn a policy for a cost budget on the *fit* half,
judge it on the *check* half, and the curves it is shown against."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from dynviz import learn, policy as P


@dataclass(frozen=True)
class BudgetQuery:
    family: str = "threshold"
    feature: str = "max_prob"
    topology: str = "chain"
    budget: float = 0.5          # mean cost as a fraction of the reference


@dataclass
class BudgetResult:
    policy: P.Policy
    fit: dict                    # Outcome.summary on the fit half
    check: dict                  # ... and on the check half
    refit_ms: float


def latency_costs(out: P.StageOutputs, per_stage: list[float], dense: float) -> P.StageOutputs:
    """``out`` with measured seconds per image per stage as its cost."""
    n = len(out)
    stage_costs = np.tile(np.asarray(per_stage, dtype=np.float64), (n, 1))
    jump = None if out.jump_costs is None else np.full(n, per_stage[-1])
    return out.with_costs(stage_costs, jump, dense)


def solve(fit: P.StageOutputs, check: P.StageOutputs, query: BudgetQuery) -> BudgetResult:
    started = time.perf_counter()
    pol = learn.target_budget(fit, query.budget, query.family, query.feature, query.topology)
    refit_ms = (time.perf_counter() - started) * 1e3
    k = fit.n_stages
    return BudgetResult(pol, P.simulate(pol, fit).summary(fit.reference_cost, k),
                        P.simulate(pol, check).summary(check.reference_cost, k), refit_ms)


def whole_percent(fraction: float, lo: int = 5, hi: int = 100) -> int:
    """A cost fraction of the reference as a budget of the slider: whole percent, rounded up
    (a budget it fits in), within [lo, hi]."""
    return min(hi, max(lo, math.ceil(round(float(fraction) * 100, 6))))


def start_percent(policy: P.Policy, fit: P.StageOutputs, lo: int = 5, hi: int = 100) -> int:
    """Where the budget slider starts for a shipped policy: its mean cost on the fit half
    as a ``whole_percent``."""
    return whole_percent(P.simulate(policy, fit).cost.mean() / fit.reference_cost, lo, hi)


@dataclass
class Curves:
    learned: tuple[np.ndarray, np.ndarray]      # (cost fraction, accuracy) on check
    baseline: tuple[np.ndarray, np.ndarray]     # one global threshold, on check
    oracle: tuple[float, float]
    statics: dict[str, tuple[float, float]]


def curves(fit: P.StageOutputs, check: P.StageOutputs, query: BudgetQuery,
           n_points: int = 40) -> Curves:
    """Frontier of policies learned on fit and judged on check, the single-threshold
    baseline, the oracle and every static stage — all on check."""
    def point(outcome: P.Outcome) -> tuple[float, float]:
        return float(outcome.cost.mean() / check.reference_cost), float(outcome.correct.mean())

    learned = [point(P.simulate(p.policy, check))
               for p in learn.sweep(fit, n_points, query.family, query.feature, query.topology,
                                    lam_range=(1e-4, 30.0))]
    thresholds = np.quantile(fit.features[:, :-1, P.FEATURES.index(query.feature)],
                             np.linspace(0, 1, n_points))
    baseline = [point(P.simulate(P.global_threshold(check, t, query.feature), check))
                for t in np.unique(thresholds)]
    names = check.stage_names or tuple(f"stage {k}" for k in range(check.n_stages))
    statics = {}
    for k, name in enumerate(names):
        outcome = P.static(check, k)
        if check.jump_costs is not None:       # a cascade's networks each run on their own
            outcome.cost = check.stage_costs[:, k]
        statics[name] = point(outcome)
    learned.sort()
    baseline.sort()
    return Curves(tuple(np.array(v) for v in zip(*learned)),
                  tuple(np.array(v) for v in zip(*baseline)),
                  point(P.oracle(check)), statics)

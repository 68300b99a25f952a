"""Learning early-exit and network-selection policies (Bolukbasi et al., ICML 2017) on
cached outputs (``dynviz.policy.StageOutputs``).

The objective for a trade-off λ is

    mean over images of  σ_exit(x) + λ · T_exit(x) / T_ref

with σ the 0-1 loss of the stage the image leaves at, T its cumulative cost and T_ref the
mean cost of the most expensive static system (so λ is "error per unit of full cost").
It is reduced, bottom-up (last decision first), to one weighted binary classification per
stage: with the downstream policy fixed, an image is labelled *exit* iff exiting costs no
more than continuing, with weight |difference|; a classifier minimising the weighted error
is then exactly the best stage-k decision. In the *jump* topology (network selection) a
second decision per stage sends a continuing image to the next stage or straight to the last.

Everything here is numpy on cached arrays: refitting takes milliseconds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from dynviz.policy import (ALWAYS, FAMILIES, FEATURES, NEVER, TOPOLOGIES, Decision, Outcome,
                           Policy, StageOutputs, simulate)


# ---------------------------------------------------------------------------- decisions
def fit_stump(score: np.ndarray, positive: np.ndarray, weight: np.ndarray,
              order: np.ndarray | None = None) -> tuple[float, float]:
    """Exact minimiser of the weighted error of ``score >= theta`` over theta.

    Returns (theta, weighted error). Thresholds sit midway between consecutive distinct
    scores (±inf at the ends), so a score recomputed with rounding noise decides alike.
    ``order``: indices sorting ``score`` ascending (ties in any order), if known.
    """
    if order is None:
        order = np.argsort(score, kind="stable")
    s, y, w = score[order], positive[order], weight[order]
    # error with the first i (lowest) scores negative: positives below + negatives at/above
    pos_below = np.concatenate([[0.0], np.cumsum(w * y)])
    neg_above = np.concatenate([np.cumsum((w * ~y)[::-1])[::-1], [0.0]])
    error = pos_below + neg_above                               # (N + 1,)
    valid = np.ones(len(s) + 1, dtype=bool)
    valid[1:-1] = s[1:] > s[:-1]                                # cut only between values
    error = np.where(valid, error, np.inf)
    i = int(np.argmin(error))
    if i == 0:
        theta = -math.inf
    elif i == len(s):
        theta = math.inf
    else:
        theta = float((s[i - 1] + s[i]) / 2)
    return theta, float(error[i])


def _fit_decision(phi: np.ndarray, positive: np.ndarray, weight: np.ndarray, family: str,
                  feature: int, order: np.ndarray | None = None) -> Decision:
    """The decision of ``family`` minimising the weighted error on (phi, positive, weight);
    ``order`` sorts ``phi[:, feature]`` ascending (threshold family), if known."""
    n_features = phi.shape[1]
    if family == "constant":
        return ALWAYS if (weight * positive).sum() >= (weight * ~positive).sum() else NEVER
    if family == "threshold":
        best = None
        if order is None:
            order = np.argsort(phi[:, feature], kind="stable")
        for sign, sort in ((1.0, order), (-1.0, order[::-1])):   # either polarity
            theta, err = fit_stump(sign * phi[:, feature], positive, weight, sort)
            if best is None or err < best[0]:
                w = [0.0] * n_features
                w[feature] = sign
                best = (err, Decision(tuple(w), theta))
        return best[1]
    if family == "linear":
        direction = weighted_logistic_direction(phi, positive, weight)
        theta, _ = fit_stump(phi @ direction, positive, weight)
        return Decision(tuple(float(v) for v in direction), theta)
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def weighted_logistic_direction(phi: np.ndarray, positive: np.ndarray, weight: np.ndarray,
                                l2: float = 1e-3, iterations: int = 15) -> np.ndarray:
    """Weight vector of a weighted, L2-regularised logistic regression (Newton steps on
    standardised features; the intercept is dropped, the stump fit sets the offset)."""
    mu, sd = phi.mean(0), phi.std(0) + 1e-12
    x = np.column_stack([(phi - mu) / sd, np.ones(len(phi))])   # (N, F + 1)
    y = positive.astype(np.float64)
    w = weight / max(weight.sum(), 1e-300)
    beta = np.zeros(x.shape[1])
    reg = np.full(x.shape[1], l2)
    reg[-1] = 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ beta, -30, 30)))
        gradient = x.T @ (w * (p - y)) + reg * beta
        hessian = (x * (w * p * (1 - p))[:, None]).T @ x + np.diag(reg + 1e-9)
        step = np.linalg.solve(hessian, gradient)
        beta -= step
        if np.abs(step).max() < 1e-8:
            break
    return beta[:-1] / sd


# ---------------------------------------------------------------------------- policies
def fit(out: StageOutputs, lam: float, family: str = "threshold", feature: str = "max_prob",
        topology: str = "chain") -> Policy:
    """Learn a policy for trade-off ``lam`` bottom-up (see the module docstring)."""
    if topology not in TOPOLOGIES:
        raise ValueError(f"unknown topology {topology!r}; choose from {TOPOLOGIES}")
    if topology == "jump" and out.jump_costs is None:
        raise ValueError("the jump topology needs jump_costs (a cascade)")
    f_index = FEATURES.index(feature)
    k = out.n_stages
    scale = lam / out.reference_cost
    err = ~out.correct                                            # σ_k, (N, K)
    exit_loss = err + scale * out.cumulative_costs                # (N, K)
    downstream = exit_loss[:, -1].copy()                          # the last stage exits
    exits, jumps = [NEVER] * (k - 1), [NEVER] * (k - 1)
    for stage in range(k - 2, -1, -1):
        phi = out.features[:, stage]
        order = out.feature_order(stage, f_index) if family == "threshold" else None
        if topology == "jump":
            jump_loss = err[:, -1] + scale * (out.cumulative_costs[:, stage] + out.jump_costs)
            jumps[stage] = _fit_decision(phi, jump_loss < downstream,
                                         np.abs(jump_loss - downstream), family, f_index, order)
            downstream = np.where(jumps[stage](phi), jump_loss, downstream)
        here = exit_loss[:, stage]
        exits[stage] = _fit_decision(phi, here <= downstream, np.abs(here - downstream),
                                     family, f_index, order)
        downstream = np.where(exits[stage](phi), here, downstream)
    return Policy(family, feature, topology, float(lam), tuple(exits),
                  tuple(jumps) if topology == "jump" else ())


def objective(outcome: Outcome, lam: float, reference_cost: float) -> float:
    """The objective ``fit`` minimises (see the module docstring), of one outcome."""
    return float(np.mean(~outcome.correct + lam * outcome.cost / reference_cost))


# ---------------------------------------------------------------------------- budgets
def target_budget(out: StageOutputs, budget: float, family: str = "threshold",
                  feature: str = "max_prob", topology: str = "chain",
                  iterations: int = 25) -> Policy:
    """The policy of largest accuracy-leaning λ whose mean cost on ``out`` is at most
    ``budget`` (a fraction of ``out.reference_cost``), by bisection on λ."""
    def cost(lam: float) -> tuple[float, Policy]:
        p = fit(out, lam, family, feature, topology)
        return simulate(p, out).cost.mean() / out.reference_cost, p

    lo, hi = 0.0, 1.0
    c_lo, p_lo = cost(lo)
    if c_lo <= budget:
        return p_lo
    c_hi, p_hi = cost(hi)
    while c_hi > budget and hi < 1e6:
        hi *= 4
        c_hi, p_hi = cost(hi)
    for _ in range(iterations):
        mid = (lo + hi) / 2 if hi < 16 else math.sqrt(max(lo, 1e-6) * hi)
        c_mid, p_mid = cost(mid)
        if c_mid <= budget:
            hi, p_hi = mid, p_mid
        else:
            lo = mid
    return p_hi


@dataclass
class SweepPoint:
    lam: float
    accuracy: float
    cost_fraction: float
    policy: Policy = field(repr=False)


def sweep(out: StageOutputs, n_points: int = 50, family: str = "threshold",
          feature: str = "max_prob", topology: str = "chain",
          lam_range: tuple[float, float] = (1e-3, 30.0)) -> list[SweepPoint]:
    """Policies for ``n_points`` λ on a log grid; the Pareto frontier (accuracy vs cost)."""
    points = []
    for lam in np.geomspace(*lam_range, n_points):
        p = fit(out, float(lam), family, feature, topology)
        o = simulate(p, out)
        points.append(SweepPoint(float(lam), float(o.correct.mean()),
                                 float(o.cost.mean() / out.reference_cost), p))
    return pareto(points)


def pareto(points: list[SweepPoint]) -> list[SweepPoint]:
    """Points not dominated (no other is at most as costly and more accurate), by cost."""
    front, best = [], -1.0
    for p in sorted(points, key=lambda p: (p.cost_fraction, -p.accuracy)):
        if p.accuracy > best:
            front.append(p)
            best = p.accuracy
    return front

"""Adaptive early-exit and network-selection policies (Bolukbasi et al., ICML 2017).

A system has K stages (exits of one network, or networks of a cascade). Stage k's
classifier output is known for every cached image, so every policy can be simulated exactly.
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

import json
import math
from dataclasses import asdict, dataclass, field
from functools import cached_property

import numpy as np

FEATURES = ("max_prob", "margin", "neg_entropy")   # larger = more confident
FEATURE_NAMES = {"max_prob": "max probability", "margin": "top-1 − top-2 probability",
                 "neg_entropy": "negative entropy"}
FAMILIES = ("constant", "threshold", "linear")
TOPOLOGIES = ("chain", "jump")


def confidence_features(logits: np.ndarray) -> np.ndarray:
    """(..., C) logits -> (..., 3) [max-probability, top-1 minus top-2, minus entropy]."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(-1, keepdims=True)
    top2 = np.partition(p, -2, axis=-1)[..., -2:]
    entropy = -(p * np.log(np.clip(p, 1e-300, None))).sum(-1)
    return np.stack([top2[..., 1], top2[..., 1] - top2[..., 0], -entropy], -1)


def row_confidence_features(logits: list[float]) -> tuple[float, float, float]:
    """``confidence_features`` of one image's logits, in plain Python floats. For ten numbers
    the arithmetic is nothing and numpy's per-call overhead is everything: between the convs
    of a batch-1 forward the numpy version cost 0.1-0.2 ms per stage on this machine, this one
    a few tens of µs (``python -m dynviz bench staged``, column ``ms_deciding``)."""
    top = max(logits)
    exps = [math.exp(z - top) for z in logits]
    total = math.fsum(exps)
    p = [e / total for e in exps]
    second, first = sorted(p)[-2:]
    entropy = -math.fsum(q * math.log(max(q, 1e-300)) for q in p)
    return first, first - second, -entropy


@dataclass(frozen=True, eq=False)
class StageOutputs:
    """What every stage of a K-stage system said about N images.

    Args:
        logits: (N, K, C) per-stage logits.
        labels: (N,) true classes.
        stage_costs: (N, K) cost of stage k for each image, given stages < k ran (MACs, or
            seconds); the cumulative cost of leaving at k is the sum over stages <= k.
        jump_costs: (N,) cost of running the last stage alone, for the jump topology
            (cascades); None where jumping is not possible (early exits of one network).
        stage_names: one label per stage, for reports.
        reference: the cost budgets and λ are measured against (default: the mean cost of
            running every stage); e.g. the backbone alone for early exits, the last network
            alone for a cascade.
    """
    logits: np.ndarray
    labels: np.ndarray
    stage_costs: np.ndarray
    jump_costs: np.ndarray | None = None
    stage_names: tuple[str, ...] = ()
    reference: float | None = None

    def __post_init__(self):
        n, k = self.stage_costs.shape
        if self.logits.shape[:2] != (n, k) or self.labels.shape != (n,):
            raise ValueError(f"shapes disagree: logits {self.logits.shape}, labels "
                             f"{self.labels.shape}, stage_costs {self.stage_costs.shape}")
        if k < 1:
            raise ValueError("a system needs at least one stage")

    @property
    def n_stages(self) -> int:
        return self.stage_costs.shape[1]

    def __len__(self) -> int:
        return len(self.labels)

    @cached_property
    def features(self) -> np.ndarray:            # (N, K, 3)
        return confidence_features(self.logits)

    @cached_property
    def predictions(self) -> np.ndarray:         # (N, K)
        return self.logits.argmax(-1)

    @cached_property
    def correct(self) -> np.ndarray:             # (N, K) bool
        return self.predictions == self.labels[:, None]

    @cached_property
    def cumulative_costs(self) -> np.ndarray:    # (N, K) T_k
        return np.cumsum(self.stage_costs, axis=1, dtype=np.float64)

    @cached_property
    def reference_cost(self) -> float:
        """What cost fractions are relative to (see ``reference``)."""
        if self.reference is not None:
            return float(self.reference)
        return float(self.cumulative_costs[:, -1].mean())

    def feature_order(self, stage: int, feature: int) -> np.ndarray:
        """Indices sorting feature ``feature`` of stage ``stage`` ascending; memoised, as every
        refit (one per λ) sorts the same scores."""
        memo = self.__dict__.setdefault("_orders", {})
        if (stage, feature) not in memo:
            memo[stage, feature] = np.argsort(self.features[:, stage, feature], kind="stable")
        return memo[stage, feature]

    def subset(self, index: np.ndarray) -> "StageOutputs":
        return StageOutputs(self.logits[index], self.labels[index], self.stage_costs[index],
                            None if self.jump_costs is None else self.jump_costs[index],
                            self.stage_names, self.reference)

    def with_costs(self, stage_costs: np.ndarray, jump_costs: np.ndarray | None,
                   reference: float) -> "StageOutputs":
        """The same answers under another cost metric (e.g. measured seconds per stage)."""
        return StageOutputs(self.logits, self.labels, stage_costs, jump_costs,
                            self.stage_names, reference)


# ---------------------------------------------------------------------------- decisions
@dataclass(frozen=True)
class Decision:
    """A binary decision on a stage's feature vector φ: yes iff φ·w >= theta.

    Constant decisions have w = 0 and theta = ∓inf; threshold decisions a ±one-hot w.
    """
    w: tuple[float, ...]
    theta: float

    def score(self, phi: np.ndarray) -> np.ndarray:
        """φ·w, the value compared with ``theta``."""
        return phi @ np.asarray(self.w)

    def __call__(self, phi: np.ndarray) -> np.ndarray:
        return self.score(phi) >= self.theta

    def one(self, phi: tuple[float, ...]) -> bool:
        """The decision for one image's features, in plain Python (see
        ``row_confidence_features``)."""
        return sum(w * f for w, f in zip(self.w, phi) if w) >= self.theta


ALWAYS = Decision((0.0, 0.0, 0.0), -math.inf)
NEVER = Decision((0.0, 0.0, 0.0), math.inf)


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
@dataclass(frozen=True)
class Policy:
    """Per stage k < K-1: ``exits[k]`` (leave here?) and, in the jump topology,
    ``jumps[k]`` (if continuing, go straight to the last stage?). The last stage exits."""
    family: str
    feature: str
    topology: str
    lam: float
    exits: tuple[Decision, ...]
    jumps: tuple[Decision, ...] = ()

    def to_json(self) -> str:
        return json.dumps(asdict(self) | {"kind": "dynviz.policy", "version": 1},
                          allow_nan=True)

    @classmethod
    def from_json(cls, text: str) -> "Policy":
        raw = json.loads(text)
        if raw.pop("kind", None) != "dynviz.policy":
            raise ValueError("not a dynviz policy")
        raw.pop("version", None)
        raw["exits"] = tuple(Decision(tuple(d["w"]), float(d["theta"])) for d in raw["exits"])
        raw["jumps"] = tuple(Decision(tuple(d["w"]), float(d["theta"])) for d in raw["jumps"])
        return cls(**raw)

    def score_name(self) -> str:
        """What ``Decision.score`` of its exits measures, for display."""
        if self.family == "linear":
            return "policy score φ·w"
        if self.family == "threshold":
            negated = any(sum(d.w) < 0 for d in self.exits)   # a stage leaves on low values
            return ("± " if negated else "") + FEATURE_NAMES[self.feature]
        return "max probability"

    def exit_scores(self, phi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For one image's features (K, 3): per early stage, the exit decision's score and
        its threshold (it leaves iff score >= threshold). A constant decision scores the
        maximum probability against −inf (always leave) or +inf (never)."""
        scores = [d.score(phi[k]) if any(d.w) else phi[k, 0] for k, d in enumerate(self.exits)]
        return np.asarray(scores, float), np.asarray([d.theta for d in self.exits], float)

    def decide_one(self, stage: int, phi: tuple[float, ...], n_stages: int) -> tuple[bool, bool]:
        """``decide`` for one image's features (3,), in plain Python."""
        if stage >= n_stages - 1:
            return True, False
        leave = self.exits[stage].one(phi)
        return leave, bool(self.jumps) and not leave and self.jumps[stage].one(phi)

    def decide(self, stage: int, phi: np.ndarray, n_stages: int) -> tuple[np.ndarray, np.ndarray]:
        """For images at ``stage`` with features (B, 3): (exit (B,), jump (B,)) booleans."""
        if stage >= n_stages - 1:
            return np.ones(len(phi), bool), np.zeros(len(phi), bool)
        leave = self.exits[stage](phi)
        jump = self.jumps[stage](phi) & ~leave if self.jumps else np.zeros(len(phi), bool)
        return leave, jump


@dataclass
class Outcome:
    """Where each image left and what it cost. ``exit_stage`` is the stage whose answer is
    used; ``jumped`` marks images that skipped from an earlier stage to the last."""
    exit_stage: np.ndarray   # (N,) int
    jumped: np.ndarray       # (N,) bool
    cost: np.ndarray         # (N,) float
    correct: np.ndarray      # (N,) bool
    predictions: np.ndarray  # (N,) int

    def summary(self, reference_cost: float, n_stages: int) -> dict:
        return {
            "accuracy": float(self.correct.mean()),
            "cost_mean": float(self.cost.mean()),
            "cost_fraction": float(self.cost.mean() / reference_cost),
            "reduction": float(reference_cost / self.cost.mean()),
            "exit_histogram": np.bincount(self.exit_stage, minlength=n_stages).tolist(),
            "jumped": int(self.jumped.sum()),
        }


def _outcome(out: StageOutputs, exit_stage: np.ndarray, jumped: np.ndarray,
             jumped_from: np.ndarray) -> Outcome:
    rows = np.arange(len(out))
    cost = out.cumulative_costs[rows, exit_stage]
    if out.jump_costs is not None and jumped.any():
        cost = np.where(jumped, out.cumulative_costs[rows, jumped_from] + out.jump_costs, cost)
    return Outcome(exit_stage, jumped, cost, out.correct[rows, exit_stage],
                   out.predictions[rows, exit_stage])


def simulate(policy: Policy, out: StageOutputs) -> Outcome:
    """Run ``policy`` on cached outputs: the same decisions the live classifier takes."""
    n, k = len(out), out.n_stages
    exit_stage = np.full(n, k - 1)
    jumped = np.zeros(n, bool)
    jumped_from = np.zeros(n, int)
    active = np.ones(n, bool)
    for stage in range(k - 1):
        idx = np.flatnonzero(active)
        leave, jump = policy.decide(stage, out.features[idx, stage], k)
        exit_stage[idx[leave]] = stage
        jumped[idx[jump]] = True
        jumped_from[idx[jump]] = stage
        active[idx[leave | jump]] = False
    return _outcome(out, exit_stage, jumped, jumped_from)


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
    return float(np.mean(~outcome.correct + lam * outcome.cost / reference_cost))


# ---------------------------------------------------------------------------- references
def oracle(out: StageOutputs) -> Outcome:
    """Knows which stages are right: takes each image's cheapest route to a right answer —
    leaving at a right stage or, in a cascade, jumping from the first stage to the last when
    the last is right — and, when no stage is right, leaves at the first (cheapest)."""
    n, k = len(out), out.n_stages
    rows = np.arange(n)
    route_costs = np.where(out.correct, out.cumulative_costs, np.inf)           # (N, K)
    exit_stage = route_costs.argmin(1)
    any_correct = out.correct.any(1)
    exit_stage[~any_correct] = 0
    jumped = np.zeros(n, bool)
    if out.jump_costs is not None and k > 2:
        jump_cost = out.cumulative_costs[:, 0] + out.jump_costs
        jumped = out.correct[:, -1] & (jump_cost < route_costs[rows, exit_stage])
        exit_stage[jumped] = k - 1
    return _outcome(out, exit_stage, jumped, np.zeros(n, int))


def oracle_cost_at(out: StageOutputs, accuracy: float) -> float:
    """The least mean cost at which an oracle reaches ``accuracy``: it leaves every image at
    its cheapest correct route (``oracle``) and, to trade accuracy for cost, gives up the
    images whose right answer costs most beyond the cheapest wrong one (stage 0)."""
    best = oracle(out)
    n = len(out)
    candidates = best.correct & ~out.correct[:, 0]     # right only beyond stage 0
    give_up = min(max(0, int(best.correct.sum()) - math.ceil(accuracy * n - 1e-9)),
                  int(candidates.sum()))
    saving = np.sort(best.cost[candidates] - out.cumulative_costs[candidates, 0])[::-1]
    return float((best.cost.sum() - saving[:give_up].sum()) / n)


def static(out: StageOutputs, stage: int) -> Outcome:
    """Every image runs stages 0..stage and leaves there."""
    return _outcome(out, np.full(len(out), stage), np.zeros(len(out), bool),
                    np.zeros(len(out), int))


def global_threshold(out: StageOutputs, threshold: float, feature: str = "max_prob") -> Policy:
    """The common heuristic: one confidence threshold shared by every exit."""
    w = [0.0] * len(FEATURES)
    w[FEATURES.index(feature)] = 1.0
    decision = Decision(tuple(w), float(threshold))
    return Policy("global_threshold", feature, "chain", math.nan,
                  tuple([decision] * (out.n_stages - 1)))


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

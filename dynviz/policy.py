"""Adaptive early-exit and network-selection policies (Bolukbasi et al., ICML 2017): what a
policy is, and what it does on cached outputs.

A system has K stages (exits of one network, or networks of a cascade). Stage k's
classifier output is known for every cached image, so every policy can be simulated exactly
(``simulate``), and so can the references it is judged against (``oracle``, ``static``,
``global_threshold``). A policy decides on confidence features of each stage's output, one
``Decision`` per stage; learning one for a trade-off λ is ``dynviz.learn``.

Everything here is numpy on cached arrays.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
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

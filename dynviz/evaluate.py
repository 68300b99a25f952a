"""Operating points and the results table: every default system on a split, with accuracy,
mean MACs, MAC reduction and measured speedups against the reference network.

Policies are chosen on the validation *fit* half and judged wherever they are evaluated
(by default the *check* half). Latencies are measured on the current device with BN folded
into the convs for every contender alike.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dynviz import data, engine, learn, policy as P, settings, zoo
from dynviz.adaptive import AdaptiveClassifier
from models.lcnet import GatedResNet

log = logging.getLogger(__name__)

LOSSES = (0.005, 0.01)  # accuracy loss against the reference, for shipped operating points
# The policy kinds a shipped operating point is chosen among, as (family, feature): each is
# swept on the fit half, and the cheapest policy of any of them within the budget is shipped.
CANDIDATES = (("threshold", "max_prob"), ("threshold", "margin"),
              ("threshold", "neg_entropy"), ("linear", "max_prob"))
AUTO = "auto"   # a family argument meaning: every candidate

# Shipped points keep their loss on the fit half one paired standard error below the target,
# as their loss on unseen images is larger: early exits chosen at ≤0.5% on fit without it
# lost 1.0 point on the check half (0.3 on fit).
MARGIN_SE = 1.0


def policies_dir() -> Path:
    return settings.assets_dir() / "policies"


def policy_path(system: str, loss: float) -> Path:
    return policies_dir() / f"{system}-loss{loss * 100:g}pct.json"


def candidates(family: str = AUTO, feature: str = "max_prob") -> tuple[tuple[str, str], ...]:
    """``CANDIDATES`` for ``AUTO``, else the one (family, feature) pair."""
    if family == AUTO:
        return CANDIDATES
    if family not in P.FAMILIES or feature not in P.FEATURES:
        raise ValueError(f"unknown policy {family!r}/{feature!r}: family one of "
                         f"{(AUTO,) + P.FAMILIES}, feature one of {P.FEATURES}")
    return ((family, feature),)


def learned_frontier(fit: P.StageOutputs, kinds=CANDIDATES, topology: str = "chain",
                     n_points: int = 60) -> list[learn.SweepPoint]:
    """The Pareto frontier on ``fit`` of the λ sweeps of every (family, feature) in ``kinds``."""
    return learn.pareto([point for family, feature in kinds
                         for point in learn.sweep(fit, n_points, family, feature, topology,
                                                  lam_range=(1e-4, 30.0))])


def choose_operating_point(fit: P.StageOutputs, reference_correct: np.ndarray, max_loss: float,
                           *, margin_se: float = MARGIN_SE, kinds=CANDIDATES,
                           topology: str = "chain", n_points: int = 60) -> P.Policy:
    """The cheapest policy of the frontier on ``fit`` (``learned_frontier`` of ``kinds``)
    whose accuracy loss against the reference (``reference_correct``, per image of ``fit``),
    plus ``margin_se`` paired standard errors, is at most ``max_loss``; the most accurate
    policy if none is."""
    front = learned_frontier(fit, kinds, topology, n_points)
    good = []
    for point in front:
        correct = P.simulate(point.policy, fit).correct
        loss = float(reference_correct.mean() - correct.mean())
        if loss + margin_se * paired_se(reference_correct, correct) <= max_loss + 1e-12:
            good.append(point)
    return (min(good, key=lambda p: p.cost_fraction) if good
            else max(front, key=lambda p: p.accuracy)).policy


def ship_operating_points(family: str = AUTO, feature: str = "max_prob",
                          val: data.Split | None = None) -> list[Path]:
    """Choose, on the fit half of ``val``, and write the default policies of every available
    staged system (among every candidate kind of policy, or ``family``/``feature``)."""
    kinds = candidates(family, feature)
    val = val if val is not None else data.get_split("val")
    ref_correct = zoo.outputs(zoo.REFERENCE, val).half("fit").correct[:, -1]
    written = []
    for name in zoo.available():
        s = zoo.spec(name)
        if s.kind not in ("exits", "cascade"):
            continue
        fit = zoo.outputs(name, val).half("fit")
        for loss in LOSSES:
            pol = choose_operating_point(fit, ref_correct, loss, kinds=kinds,
                                         topology=s.topology)
            path = policy_path(name, loss)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(pol.to_json() + "\n")
            written.append(path)
    return written


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
    worst_gap_se: float          # its paired standard error (``paired_se``)
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


def baseline_comparison(fit: P.StageOutputs, check: P.StageOutputs, kinds=CANDIDATES,
                        feature: str = "max_prob", topology: str = "chain",
                        n_points: int = 40, n_thresholds: int = BASELINE_GRID,
                        frontier: list[learn.SweepPoint] | None = None,
                        learned_on: P.StageOutputs | None = None) -> list[dict]:
    """The ``budgets`` rows of ``PolicyReport`` (see there) for outputs split in two: the
    learned frontier of ``kinds`` (or the given ``frontier``, whose points' budgets are their
    ``cost_fraction``) against one global threshold on ``feature``. ``learned_on``: the check
    images as the frontier's policies see them, when their features differ from ``check``'s
    (default: ``check``)."""
    sweep = frontier if frontier is not None else learned_frontier(fit, kinds, topology,
                                                                     n_points)
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
            "gap_se": None if chosen is None else paired_se(learned.correct,
                                                             check_right[chosen]),
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


def paired_se(a: np.ndarray, b: np.ndarray) -> float:
    """Standard error of mean(a) − mean(b) for two correctness vectors on the same images
    (only the images where they disagree contribute)."""
    d = a.astype(np.float64) - b.astype(np.float64)
    return float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0


def policy_report(name: str, val: data.Split, family: str = AUTO,
                  feature: str = "max_prob", n_points: int = 40) -> PolicyReport:
    """``family`` ``AUTO``: the learned frontier of every candidate kind against a global
    threshold on the maximum probability; else that family and feature for both."""
    cached = zoo.outputs(name, val)
    fit, check = cached.half("fit"), cached.half("check")
    kinds = candidates(family, feature)
    rows = baseline_comparison(fit, check, kinds, feature, zoo.spec(name).topology, n_points)
    wins, compared, worst = against_baseline(rows)
    hindsight_gaps = [r["learned"] - r["baseline_hindsight"] for r in rows
                      if r["baseline_hindsight"] is not None]
    pol, op, share = load_policy(name, LOSSES[0]), None, None
    if pol is not None:
        outcome = P.simulate(pol, check)
        op = outcome.summary(check.reference_cost, check.n_stages)
        oracle_frac = P.oracle_cost_at(check, op["accuracy"]) / check.reference_cost
        share = (1 - op["cost_fraction"]) / max(1 - oracle_frac, 1e-12)
    return PolicyReport(name, rows, wins, sum(g >= 0 for g in hindsight_gaps), compared,
                        worst["learned"] - worst["baseline"] if worst else 0.0,
                        worst["gap_se"] if worst else 0.0, min(hindsight_gaps, default=0.0),
                        op, share)


def load_policy(system: str, loss: float) -> P.Policy | None:
    path = policy_path(system, loss)
    return P.Policy.from_json(path.read_text()) if path.exists() else None


# ---------------------------------------------------------------------------- timing
def _speedup(fn, reference, images: np.ndarray, batch: int, device, repeats: int) -> float:
    """Reference time / ``fn`` time over the images in batches of ``batch``, both measured
    round-robin, as the median of the per-round ratios (``engine.paired_ratio``)."""
    chunks = [data.to_tensor(np.ascontiguousarray(images[i:i + batch]), device)
              for i in range(0, len(images), batch)]
    with torch.no_grad():
        times = engine.round_robin_times({"reference": lambda: [reference(c) for c in chunks],
                                          "system": lambda: [fn(c) for c in chunks]},
                                         repeats=repeats, warmup=1, device=device)
    return engine.paired_ratio(times["reference"], times["system"])


@dataclass
class Row:
    system: str
    kind: str
    operating_point: str
    accuracy: float
    macs_mean: float
    macs_reduction: float
    speedup_b1: float | None
    speedup_b256: float | None
    policy: dict | None = None


def evaluate(split: data.Split, *, time_it: bool = True, b1_images: int = 64,
             b256_images: int = 1024, repeats: int = 7, progress: bool = True) -> list[Row]:
    """One row per available system (static, gated, each staged system at each shipped
    operating point, and the oracle of each staged system) on ``split``. Speedups are
    measured against the reference network on the first ``b1_images`` images one by one
    and on the first ``b256_images`` in batches of 256."""
    device = settings.device()
    images = split.images()
    ref_out = zoo.outputs(zoo.REFERENCE, split, progress=progress).stage_outputs()
    ref_macs = float(ref_out.stage_costs.sum(1).mean())
    reference = engine.fold_batchnorm(zoo.load_system(zoo.REFERENCE, device))

    def timed(name: str, fn) -> tuple[float, float] | tuple[None, None]:
        if not time_it:
            return None, None
        if name == zoo.REFERENCE:
            return 1.0, 1.0                      # by definition
        return (_speedup(fn, reference, images[:b1_images], 1, device, repeats),
                _speedup(fn, reference, images[:b256_images], 256, device, repeats))

    def row(name, kind, point, accuracy, macs, speedups, policy=None) -> Row:
        b1, b256 = speedups
        return Row(name, kind, point, round(float(accuracy), 4), round(float(macs)),
                   round(ref_macs / float(macs), 3),
                   None if b1 is None else round(b1, 3),
                   None if b256 is None else round(b256, 3),
                   None if policy is None else json.loads(policy.to_json()))

    rows = []
    for name in zoo.available():
        s = zoo.spec(name)
        out = zoo.outputs(name, split, progress=progress).stage_outputs()
        model = zoo.load_system(name, device)
        if s.kind in ("static", "gated"):
            if isinstance(model, GatedResNet):
                folded = engine.fold_batchnorm(model)
                plans = {b: engine.calibrate(folded, b) for b in (1, 256)} if time_it else {}
                fn = _GatedRunner(folded, plans)
            else:
                fn = engine.fold_batchnorm(model)
            rows.append(row(name, s.kind, "trained", out.correct[:, 0].mean(),
                            out.stage_costs[:, 0].mean(), timed(name, fn)))
            continue
        for loss in LOSSES:
            pol = load_policy(name, loss)
            if pol is None:
                log.warning("%s has no shipped policy for %.1f%% loss; run "
                            "`python -m dynviz policies`", name, loss * 100)
                continue
            sim = P.simulate(pol, out)
            rows.append(row(name, s.kind, f"≤{loss * 100:g}% loss (fit half)",
                            sim.correct.mean(), sim.cost.mean(),
                            timed(name, AdaptiveClassifier(engine.fold_batchnorm(model), pol)),
                            pol))
        o = P.oracle(out)
        rows.append(row(f"{name} oracle", "oracle", "knows the correct stages",
                        o.correct.mean(), o.cost.mean(), (None, None)))
    return rows


class _GatedRunner:
    """Sparse path of a gated model with the plan calibrated for the batch size."""

    def __init__(self, model: GatedResNet, plans: dict):
        self.model, self.plans = model, plans

    def __call__(self, x):
        plan = self.plans.get(1 if x.shape[0] == 1 else 256)
        return self.model(x, plan) if plan is not None else self.model(x)


def write(rows: list[Row], path: Path) -> None:
    path.write_text(json.dumps([asdict(r) for r in rows], indent=1, ensure_ascii=False) + "\n")


def markdown(rows: list[Row]) -> str:
    head = "| system | operating point | accuracy | MACs (M) | MAC reduction | speedup b1 | speedup b256 |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda v: "—" if v is None else f"{v:.2f}×"  # noqa: E731
        lines.append(f"| {r.system} | {r.operating_point} | {r.accuracy * 100:.2f}% | "
                     f"{r.macs_mean / 1e6:.1f} | {r.macs_reduction:.2f}× | {fmt(r.speedup_b1)} | "
                     f"{fmt(r.speedup_b256)} |")
    return "\n".join(lines)

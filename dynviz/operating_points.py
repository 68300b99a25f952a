"""The shipped operating points of the staged systems: for each accuracy-loss budget against
the reference network, the cheapest learned policy within it on the validation *fit* half,
written to ``<workspace results>/policies/<system>-loss<pct>pct.json`` and read back by the
pages, the results table and the commands.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dynviz import data, files, learn, policy as P, zoo
from dynviz.workspace import Workspace

LOSSES = (0.005, 0.01)  # accuracy loss against the reference, for shipped operating points
# The policy kinds a shipped operating point is chosen among, as (family, feature): each is
# swept on the fit half, and the cheapest policy of any of them within the budget is shipped.
CANDIDATES = (("threshold", "max_prob"), ("threshold", "margin"),
              ("threshold", "neg_entropy"), ("linear", "max_prob"))
AUTO = "auto"   # a family argument meaning: every candidate
# the key of a policy file that records the system's ``zoo.checkpoint_sha`` it was chosen on
CHOSEN_FOR = "chosen_for"

# Shipped points keep their loss on the fit half one paired standard error below the target,
# as their loss on unseen images is larger: early exits chosen at ≤0.5% on fit without it
# lost 1.0 point on the check half (0.3 on fit).
MARGIN_SE = 1.0


def policies_dir(ws: Workspace) -> Path:
    return ws.results / "policies"


def policy_path(ws: Workspace, system: str, loss: float) -> Path:
    return policies_dir(ws) / f"{system}-loss{loss * 100:g}pct.json"


class PolicyFileError(ValueError):
    """A shipped policy that cannot be read, or was chosen for other weights than the
    system's; the message names the file and how to choose it again."""


def load_policy(ws: Workspace, system: str, loss: float) -> P.Policy | None:
    """The shipped policy of ``system`` for accuracy loss ``loss``; None if none is shipped.

    Raises:
        PolicyFileError: the file is not a policy, or it records the outputs of other weights
            (``zoo.checkpoint_sha``) than the system has now (it was retrained since).
        zoo.CheckpointError: those weights differ because a checkpoint is damaged.
    """
    path = policy_path(ws, system, loss)
    if not path.exists():
        return None
    fix = f"choose it again with `{ws.command('policies')}`"
    try:
        raw = json.loads(path.read_text())
        chosen_for = raw.pop(CHOSEN_FOR, None)
        policy = P.Policy.from_json(json.dumps(raw))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise PolicyFileError(f"{path} is not a dynviz policy ({type(err).__name__}: {err}); "
                              f"{fix}") from None
    if chosen_for is not None and chosen_for != zoo.checkpoint_sha(ws, system):
        zoo.read_checkpoints(ws, system)     # a damaged checkpoint is the error to show
        raise PolicyFileError(f"{path} was chosen for other weights than {system}'s (trained "
                              f"again since?); {fix}")
    return policy


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


def paired_se(a: np.ndarray, b: np.ndarray) -> float:
    """Standard error of mean(a) − mean(b) for two correctness vectors on the same images
    (only the images where they disagree contribute)."""
    d = a.astype(np.float64) - b.astype(np.float64)
    return float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0


def choose(fit: P.StageOutputs, reference_correct: np.ndarray, max_loss: float, *,
           margin_se: float = MARGIN_SE, kinds=CANDIDATES, topology: str = "chain",
           n_points: int = 60) -> P.Policy:
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


def ship(ws: Workspace, family: str = AUTO, feature: str = "max_prob",
         val: data.Split | None = None) -> list[Path]:
    """Choose, on the fit half of ``val`` (default: the workspace's), and write the default
    policies of every available staged system (among every candidate kind of policy, or
    ``family``/``feature``)."""
    kinds = candidates(family, feature)
    val = val if val is not None else ws.split("val")
    ref_correct = zoo.outputs(ws, ws.reference, val).half("fit").correct[:, -1]
    written = []
    for name in zoo.staged(ws, zoo.available(ws)):
        fit = zoo.outputs(ws, name, val).half("fit")
        for loss in LOSSES:
            pol = choose(fit, ref_correct, loss, kinds=kinds, topology=ws.spec(name).topology)
            path = policy_path(ws, name, loss)
            path.parent.mkdir(parents=True, exist_ok=True)
            record = json.loads(pol.to_json()) | {CHOSEN_FOR: zoo.checkpoint_sha(ws, name)}
            files.atomic_write_text(path, json.dumps(record, allow_nan=True) + "\n")
            written.append(path)
    return written

"""Policies: confidence features, one-image and batched decisions alike, the oracle held to
brute force, JSON round trips."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from dynviz import learn, policy as P
from tests.helpers import synthetic_outputs


def test_features_match_their_definitions():
    logits = np.array([[2.0, 1.0, 0.0]])
    p = np.exp(logits) / np.exp(logits).sum()
    max_prob, margin, neg_entropy = P.confidence_features(logits)[0]
    assert max_prob == pytest.approx(p[0, 0])
    assert margin == pytest.approx(p[0, 0] - p[0, 1])
    assert neg_entropy == pytest.approx((p * np.log(p)).sum())


def test_one_image_features_and_decisions_equal_the_batched_ones():
    rng = np.random.default_rng(5)
    logits = np.concatenate([rng.normal(0, 3, (200, 10)),
                             np.array([[0.0] * 10, [80.0, -80.0] + [0.0] * 8,      # ties, a
                                       [1e-3] * 9 + [1e-3 + 1e-7]])]).astype(np.float32)
    batched = P.confidence_features(logits)          # the reference: numpy over the batch
    one = np.array([P.row_confidence_features(row.tolist()) for row in logits])
    assert np.allclose(one, batched, rtol=1e-12, atol=1e-12)
    out = synthetic_outputs(seed=4, jump=True)
    for family in ("threshold", "linear", "constant"):
        for topology in P.TOPOLOGIES:
            pol = learn.fit(out, 0.2, family, topology=topology)
            for stage in range(out.n_stages):
                leave, jump = pol.decide(stage, out.features[:, stage], out.n_stages)
                for i in range(0, len(out), 13):
                    phi = tuple(out.features[i, stage].tolist())
                    assert pol.decide_one(stage, phi, out.n_stages) == (leave[i], jump[i])


# ---------------------------------------------------------------------------- oracle
def _routes(out: P.StageOutputs) -> tuple[np.ndarray, np.ndarray]:
    """Every way through the system, per image: (N, R) costs and correctness — leave at
    stage k, and in a cascade also jump from stage j < K−1 straight to the last network."""
    costs, right = [out.cumulative_costs], [out.correct]
    if out.jump_costs is not None:
        for j in range(out.n_stages - 2):
            costs.append((out.cumulative_costs[:, j] + out.jump_costs)[:, None])
            right.append(out.correct[:, -1:])
    return np.concatenate(costs, 1), np.concatenate(right, 1)


def _cheapest_per_hits(out: P.StageOutputs) -> dict[int, float]:
    """#correct images -> least total cost of any assignment of routes reaching it."""
    costs, right = _routes(out)
    rows = np.arange(len(out))
    cheapest: dict[int, float] = {}
    for assignment in itertools.product(range(costs.shape[1]), repeat=len(out)):
        a = np.array(assignment)
        hits, cost = int(right[rows, a].sum()), costs[rows, a].sum()
        for h in range(hits + 1):
            cheapest[h] = min(cheapest.get(h, math.inf), cost)
    return cheapest


def _cheap_jumps(out: P.StageOutputs) -> P.StageOutputs:
    """A cascade whose last network alone costs less than its middle stage on some images,
    so the oracle's cheapest right route is sometimes a jump."""
    jump_costs = out.stage_costs[:, -1] * np.where(np.arange(len(out)) % 2, 0.1, 1.2)
    return P.StageOutputs(out.logits, out.labels, out.stage_costs, jump_costs)


@pytest.mark.parametrize("jump", [False, True])
def test_oracle_is_the_cheapest_way_to_its_accuracy(jump):
    out = synthetic_outputs(n=6, seed=7)
    out = _cheap_jumps(out) if jump else out
    o = P.oracle(out)
    assert o.correct.mean() == out.correct.any(1).mean()
    assert o.cost.sum() == pytest.approx(_cheapest_per_hits(out)[int(o.correct.sum())])


@pytest.mark.parametrize("jump", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_oracle_cost_at_an_accuracy_is_the_brute_force_minimum(seed, jump):
    out = synthetic_outputs(n=6 if jump else 7, k=4 if jump else 3, seed=seed)
    out = _cheap_jumps(out) if jump else out
    for hits, cost in _cheapest_per_hits(out).items():
        assert P.oracle_cost_at(out, hits / len(out)) * len(out) == pytest.approx(cost)


# ---------------------------------------------------------------------------- JSON
@pytest.mark.parametrize("family", P.FAMILIES)
@pytest.mark.parametrize("topology", P.TOPOLOGIES)
def test_policy_json_round_trip(family, topology):
    out = synthetic_outputs(jump=True)
    pol = learn.fit(out, 0.3, family, "margin", topology)
    again = P.Policy.from_json(pol.to_json())
    assert again == pol
    assert np.array_equal(P.simulate(again, out).exit_stage, P.simulate(pol, out).exit_stage)
    baseline = P.global_threshold(out, 0.7)
    assert P.Policy.from_json(baseline.to_json()).exits == baseline.exits
    with pytest.raises(ValueError):
        P.Policy.from_json('{"kind": "something else"}')


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="shapes"):
        P.StageOutputs(np.zeros((4, 2, 3)), np.zeros(4, int), np.zeros((5, 2)))


@pytest.mark.parametrize("family", P.FAMILIES)
@pytest.mark.parametrize("feature", P.FEATURES)
def test_exit_scores_are_what_the_exits_decide_on(family, feature):
    out = synthetic_outputs(n=300, seed=11, jump=True)
    for lam in (0.05, 0.5, 5.0):
        pol = learn.fit(out, lam, family, feature, "chain")
        for i in range(0, 300, 37):
            phi = out.features[i]                                    # (K, 3)
            scores, thresholds = pol.exit_scores(phi)
            for k, decision in enumerate(pol.exits):
                assert (scores[k] >= thresholds[k]) == bool(decision(phi[k][None])[0])
                if family == "threshold" and feature == "margin":     # ±φ_margin by hand
                    assert abs(scores[k]) == pytest.approx(phi[k, 1])
        named = {"linear": "φ·w", "constant": "max probability"}
        assert pol.score_name().endswith(named.get(family, P.FEATURE_NAMES[feature]))


def test_cross_stage_trial_features_match_their_definitions():
    """``scripts/policy_features_trial.py``'s features, image by image and stage by stage."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "scripts" / "policy_features_trial.py"
    spec = importlib.util.spec_from_file_location("policy_features_trial", path)
    trial = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trial)
    out = synthetic_outputs(n=50, k=4)
    cols = trial.cross_stage_features(out)
    z = out.logits.astype(np.float64)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    for i in range(len(out)):
        for s in range(out.n_stages):
            c = int(np.argmax(p[i, s]))
            assert cols["agree"][i, s] == (s > 0 and c == int(np.argmax(p[i, s - 1])))
            assert cols["prev_prob"][i, s] == pytest.approx(p[i, s - 1, c] if s else 0.0)
            assert cols["mean_prob"][i, s] == pytest.approx(p[i, :s + 1, c].mean())
    wide = trial.with_features(out, ("prev_prob", "agree"))
    assert np.array_equal(wide.features[..., :3], out.features)
    assert np.array_equal(wide.features[..., 3], cols["prev_prob"])
    assert np.array_equal(wide.features[..., 4], cols["agree"])

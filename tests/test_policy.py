"""Policies: confidence features, one-image and batched decisions alike, the oracle held to
brute force, JSON round trips."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from dynviz import evaluate, learn, policy as P
from tests.conftest import synthetic_outputs


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


# ---------------------------------------------------------------------------- baseline
def _global_threshold_by_hand(out: P.StageOutputs, thresholds: np.ndarray) -> np.ndarray:
    """(T, 2) mean cost fraction and accuracy of leaving at the first early stage whose
    softmax maximum reaches each threshold, computed image by image."""
    z = out.logits.astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    conf = (p / p.sum(-1, keepdims=True)).max(-1)
    rows = []
    for t in thresholds:
        cost = right = 0.0
        for i in range(len(out)):
            k = next((k for k in range(out.n_stages - 1) if conf[i, k] >= t), out.n_stages - 1)
            cost += out.stage_costs[i, :k + 1].sum()
            right += out.logits[i, k].argmax() == out.labels[i]
        rows.append((cost / len(out) / out.reference_cost, right / len(out)))
    return np.array(rows)


@pytest.mark.parametrize("topology", ["chain", "jump"])
def test_baseline_columns_equal_a_brute_force_scan_of_thresholds(topology):
    fit = synthetic_outputs(n=300, seed=5, jump=True)
    check = synthetic_outputs(n=300, seed=6, jump=True)
    thresholds = evaluate.baseline_thresholds(fit, "max_prob", n=60)
    on_fit = _global_threshold_by_hand(fit, thresholds)
    on_check = _global_threshold_by_hand(check, thresholds)
    rows = evaluate.baseline_comparison(fit, check, topology=topology, n_points=15,
                                        n_thresholds=60)
    assert len(rows) >= 5
    for row in rows:
        affordable = np.flatnonzero(on_fit[:, 0] <= row["budget"] + 1e-9)
        # chosen on fit: the most accurate affordable threshold there, then the cheapest
        best = affordable[on_fit[affordable, 1] >= on_fit[affordable, 1].max() - 1e-12]
        chosen = best[on_fit[best, 0].argmin()]
        assert row["baseline"] == pytest.approx(on_check[chosen, 1])
        assert row["baseline_cost"] == pytest.approx(on_check[chosen, 0])
        within = on_check[:, 0] <= row["cost_fraction"] + 1e-9
        assert row["baseline_hindsight"] == pytest.approx(on_check[within, 1].max())


def test_learned_column_runs_on_the_outputs_it_is_given():
    """``learned_on``: the frontier's policies run on those outputs (e.g. the check images with
    more features), the baseline stays on ``check``."""
    fit, check = synthetic_outputs(n=300, seed=5), synthetic_outputs(n=300, seed=6)
    front = learn.sweep(fit, 12, "linear")
    plain = evaluate.baseline_comparison(fit, check, frontier=front, n_thresholds=60)
    assert plain == evaluate.baseline_comparison(fit, check, frontier=front, n_thresholds=60,
                                                 learned_on=check)
    other = synthetic_outputs(n=300, seed=7)          # other images: other learned outcomes
    rows = evaluate.baseline_comparison(fit, check, frontier=front, n_thresholds=60,
                                        learned_on=other)
    for point, row, base in zip(front, rows, plain):
        outcome = P.simulate(point.policy, other)
        assert row["learned"] == pytest.approx(outcome.correct.mean())
        assert row["cost_fraction"] == pytest.approx(outcome.cost.mean() / check.reference_cost)
        assert (row["baseline"], row["baseline_cost"]) == (base["baseline"],
                                                           base["baseline_cost"])
    assert [r["learned"] for r in rows] != [r["learned"] for r in plain]


def test_against_baseline_counts_wins_and_finds_the_worst_gap():
    rows = [{"learned": 0.90, "baseline": 0.88, "gap_se": 0.01},
            {"learned": 0.80, "baseline": None, "gap_se": None},     # nothing affordable
            {"learned": 0.85, "baseline": 0.87, "gap_se": 0.02},     # worst: -0.02
            {"learned": 0.86, "baseline": 0.86, "gap_se": 0.0},      # a tie counts as a win
            {"learned": 0.70, "baseline": 0.71, "gap_se": 0.03}]
    wins, compared, worst = evaluate.against_baseline(rows)
    assert (wins, compared) == (2, 4) and worst is rows[2]
    assert evaluate.against_baseline([rows[1]]) == (0, 0, None)


def test_paired_standard_error_is_the_formula():
    a = np.array([1, 1, 0, 1, 0, 1, 1, 0], bool)
    b = np.array([1, 0, 0, 1, 1, 1, 0, 0], bool)
    d = [0, 1, 0, 0, -1, 0, 1, 0]                    # a − b per image
    mean = sum(d) / 8
    var = sum((x - mean) ** 2 for x in d) / 7
    assert evaluate.paired_se(a, b) == pytest.approx(math.sqrt(var / 8))
    assert evaluate.paired_se(a, a) == 0.0


@pytest.mark.parametrize("max_loss", [0.0, 0.01, 0.03])
@pytest.mark.parametrize("kinds", [(("threshold", "max_prob"),), evaluate.CANDIDATES])
def test_operating_point_is_the_cheapest_within_the_loss_and_its_margin(max_loss, kinds):
    fit = synthetic_outputs(n=800, seed=9)
    reference = fit.correct[:, -1]                    # the last stage alone
    # every kind's sweep, and of all their policies those no other beats on cost and accuracy
    swept = [point for family, feature in kinds
             for point in learn.sweep(fit, 60, family, feature, lam_range=(1e-4, 30.0))]
    front = [p for p in swept if not any(q.cost_fraction <= p.cost_fraction and
                                         q.accuracy > p.accuracy for q in swept)]
    chosen = {}
    for margin in (0.0, 1.0):
        pol = evaluate.choose_operating_point(fit, reference, max_loss, margin_se=margin,
                                              kinds=kinds)
        chosen[margin] = P.simulate(pol, fit)
        # by hand over the same sweep: every policy whose loss (plus margin) fits the budget
        fits = []
        for point in front:
            right = P.simulate(point.policy, fit).correct
            d = reference.astype(float) - right
            se = d.std(ddof=1) / math.sqrt(len(d))
            if d.mean() + margin * se <= max_loss + 1e-12:
                fits.append(point.cost_fraction)
        assert fits, "the sweep's most accurate policy loses nothing to the last stage"
        assert chosen[margin].cost.mean() / fit.reference_cost == pytest.approx(min(fits))
    assert chosen[1.0].cost.mean() >= chosen[0.0].cost.mean()
    assert chosen[1.0].correct.mean() >= reference.mean() - max_loss


def test_policy_kinds_are_every_candidate_or_the_one_named():
    assert evaluate.candidates() == evaluate.CANDIDATES
    assert evaluate.candidates("linear", "margin") == (("linear", "margin"),)
    with pytest.raises(ValueError, match="unknown policy"):
        evaluate.candidates("threshold", "entropy")


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
        assert pol.score_name().endswith(
            {"linear": "φ·w", "constant": "max probability"}.get(family, P.FEATURE_NAMES[feature]))


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

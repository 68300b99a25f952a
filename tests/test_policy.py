"""Policy learning held to brute force, limits of λ, the oracle bound and JSON round trips."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from dynviz import evaluate, policy as P


def synthetic(n: int = 600, k: int = 3, classes: int = 10, seed: int = 0,
              jump: bool = False) -> P.StageOutputs:
    """Stages of growing accuracy and cost; confidence tracks correctness, as in real nets."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    difficulty = rng.random(n)
    logits = rng.normal(0, 1, (n, k, classes))
    for stage in range(k):
        skill = 0.45 + 0.5 * (stage + 1) / k                      # later stages see more
        knows = difficulty < skill
        logits[np.arange(n), stage, labels] += np.where(knows, 3.0 + 2 * rng.random(n), 0.0)
    costs = np.tile(np.array([1.0, 2.0, 4.0, 8.0][:k]), (n, 1))
    costs *= rng.uniform(0.9, 1.1, (n, k))                        # per-image variation
    jump_costs = costs[:, -1] * 1.2 if jump else None
    return P.StageOutputs(logits.astype(np.float32), labels, costs, jump_costs)


# ---------------------------------------------------------------------------- stumps
@pytest.mark.parametrize("seed", range(5))
def test_stump_fit_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 40
    score = np.round(rng.normal(size=n), 1)                       # ties on purpose
    positive = rng.random(n) < 0.5
    weight = rng.random(n)
    theta, error = P.fit_stump(score, positive, weight)
    candidates = np.concatenate([np.unique(score), [np.inf]])     # every distinct cut
    brute = min(((score >= t) != positive).astype(float) @ weight for t in candidates)
    assert error == pytest.approx(brute)
    assert ((score >= theta) != positive).astype(float) @ weight == pytest.approx(brute)
    assert theta not in set(score.tolist())                       # thresholds between values
    # a known order (here the reverse one, for the negated score) gives the same optimum
    flipped = min(((-score >= t) != positive).astype(float) @ weight
                  for t in np.concatenate([np.unique(-score), [np.inf]]))
    _, error = P.fit_stump(-score, positive, weight, np.argsort(score, kind="stable")[::-1])
    assert error == pytest.approx(flipped)


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
    out = synthetic(seed=4, jump=True)
    for family in ("threshold", "linear", "constant"):
        for topology in P.TOPOLOGIES:
            pol = P.fit(out, 0.2, family, topology=topology)
            for stage in range(out.n_stages):
                leave, jump = pol.decide(stage, out.features[:, stage], out.n_stages)
                for i in range(0, len(out), 13):
                    phi = tuple(out.features[i, stage].tolist())
                    assert pol.decide_one(stage, phi, out.n_stages) == (leave[i], jump[i])


# ---------------------------------------------------------------------------- limits
@pytest.mark.parametrize("family", P.FAMILIES)
def test_lambda_zero_loses_no_accuracy_to_the_last_stage(family):
    out = synthetic()
    outcome = P.simulate(P.fit(out, 0.0, family), out)
    assert outcome.correct.mean() >= P.static(out, out.n_stages - 1).correct.mean()


def test_lambda_zero_never_exits_when_only_later_stages_are_right():
    out = synthetic(seed=3)
    outcome = P.simulate(P.fit(out, 0.0, "threshold"), out)
    later_right = ~out.correct[:, 0] & out.correct[:, -1]
    left_early_wrong = later_right & (outcome.exit_stage == 0)
    # a stump cannot separate everything, but λ = 0 must not trade accuracy for cost
    assert outcome.correct.sum() >= out.correct[:, -1].sum()
    assert left_early_wrong.sum() <= (out.correct[:, 0] & ~out.correct[:, -1]).sum()


@pytest.mark.parametrize("family", P.FAMILIES)
@pytest.mark.parametrize("topology", P.TOPOLOGIES)
def test_huge_lambda_always_takes_the_first_exit(family, topology):
    out = synthetic(jump=True)
    outcome = P.simulate(P.fit(out, 1e6, family, topology=topology), out)
    assert (outcome.exit_stage == 0).all() and not outcome.jumped.any()


# ---------------------------------------------------------------------------- optimality
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("lam", [0.05, 0.3, 1.0])
def test_threshold_policy_beats_every_constant_policy(seed, lam):
    out = synthetic(seed=seed)
    learned = P.objective(P.simulate(P.fit(out, lam, "threshold"), out), lam,
                          out.reference_cost)
    constants = [P.objective(P.static(out, k), lam, out.reference_cost)
                 for k in range(out.n_stages)]
    assert learned <= min(constants) + 1e-12
    constant_fit = P.objective(P.simulate(P.fit(out, lam, "constant"), out), lam,
                               out.reference_cost)
    assert constant_fit == pytest.approx(min(constants))          # bottom-up finds the best


@pytest.mark.parametrize("seed", range(3))
def test_bottom_up_matches_brute_force_over_threshold_pairs(seed):
    """For 3 stages, search every pair of stage thresholds directly."""
    out = synthetic(n=60, seed=seed)
    lam, f = 0.4, 0
    learned = P.objective(P.simulate(P.fit(out, lam, "threshold"), out), lam,
                          out.reference_cost)
    best = math.inf
    cuts = [np.concatenate([[-np.inf], np.unique(out.features[:, s, f]), [np.inf]])
            for s in range(2)]
    for t0, t1 in itertools.product(*cuts):
        for s0, s1 in itertools.product((1.0, -1.0), repeat=2):
            w0, w1 = [0.0] * 3, [0.0] * 3
            w0[f], w1[f] = s0, s1
            pol = P.Policy("threshold", "max_prob", "chain", lam,
                           (P.Decision(tuple(w0), s0 * t0), P.Decision(tuple(w1), s1 * t1)))
            best = min(best, P.objective(P.simulate(pol, out), lam, out.reference_cost))
    # bottom-up is exact per stage given the later ones; jointly it can only tie or be
    # slightly worse, never better than the exhaustive optimum
    assert best - 1e-12 <= learned <= best + 0.02


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
    out = synthetic(n=6, seed=7)
    out = _cheap_jumps(out) if jump else out
    o = P.oracle(out)
    assert o.correct.mean() == out.correct.any(1).mean()
    assert o.cost.sum() == pytest.approx(_cheapest_per_hits(out)[int(o.correct.sum())])


@pytest.mark.parametrize("jump", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_oracle_cost_at_an_accuracy_is_the_brute_force_minimum(seed, jump):
    out = synthetic(n=6 if jump else 7, k=4 if jump else 3, seed=seed)
    out = _cheap_jumps(out) if jump else out
    for hits, cost in _cheapest_per_hits(out).items():
        assert P.oracle_cost_at(out, hits / len(out)) * len(out) == pytest.approx(cost)


def test_learned_policies_never_beat_the_oracle():
    out = synthetic(seed=2)
    o = P.oracle(out)
    for point in P.sweep(out, n_points=20):
        if point.accuracy >= o.correct.mean():
            assert point.cost_fraction * out.reference_cost >= o.cost.mean() - 1e-9


# ---------------------------------------------------------------------------- topology
def test_jump_topology_skips_a_useless_middle_stage():
    out = synthetic(seed=4)
    logits = out.logits.copy()
    logits[:, 1] = np.random.default_rng(0).normal(size=logits[:, 1].shape)  # stage 1 guesses
    costs = out.stage_costs.copy()
    costs[:, 1] = 3.0
    bad_middle = P.StageOutputs(logits, out.labels, costs, jump_costs=costs[:, 2])
    lam = 0.2
    chain = P.simulate(P.fit(bad_middle, lam, topology="chain"), bad_middle)
    jump = P.simulate(P.fit(bad_middle, lam, topology="jump"), bad_middle)
    assert jump.jumped.sum() > 0
    assert (P.objective(jump, lam, bad_middle.reference_cost)
            < P.objective(chain, lam, bad_middle.reference_cost))


def test_jump_needs_jump_costs():
    with pytest.raises(ValueError, match="jump_costs"):
        P.fit(synthetic(), 0.1, topology="jump")


# ---------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("family", ["threshold", "linear"])
def test_target_budget_meets_the_budget(family):
    out = synthetic(seed=5)
    for budget in (0.3, 0.5, 0.8):
        pol = P.target_budget(out, budget, family)
        assert P.simulate(pol, out).cost.mean() / out.reference_cost <= budget + 1e-9


def test_sweep_is_a_pareto_frontier():
    front = P.sweep(synthetic(seed=6), n_points=30)
    costs = [p.cost_fraction for p in front]
    accs = [p.accuracy for p in front]
    assert costs == sorted(costs) and accs == sorted(accs) and len(front) >= 3


# ---------------------------------------------------------------------------- JSON
@pytest.mark.parametrize("family", P.FAMILIES)
@pytest.mark.parametrize("topology", P.TOPOLOGIES)
def test_policy_json_round_trip(family, topology):
    out = synthetic(jump=True)
    pol = P.fit(out, 0.3, family, "margin", topology)
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
    fit, check = synthetic(n=300, seed=5, jump=True), synthetic(n=300, seed=6, jump=True)
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
    fit, check = synthetic(n=300, seed=5), synthetic(n=300, seed=6)
    front = P.sweep(fit, 12, "linear")
    plain = evaluate.baseline_comparison(fit, check, frontier=front, n_thresholds=60)
    assert plain == evaluate.baseline_comparison(fit, check, frontier=front, n_thresholds=60,
                                                 learned_on=check)
    other = synthetic(n=300, seed=7)          # other images: other learned outcomes
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
    fit = synthetic(n=800, seed=9)
    reference = fit.correct[:, -1]                    # the last stage alone
    # every kind's sweep, and of all their policies those no other beats on cost and accuracy
    swept = [point for family, feature in kinds
             for point in P.sweep(fit, 60, family, feature, lam_range=(1e-4, 30.0))]
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
    out = synthetic(n=300, seed=11, jump=True)
    for lam in (0.05, 0.5, 5.0):
        pol = P.fit(out, lam, family, feature, "chain")
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
    out = synthetic(n=50, k=4)
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

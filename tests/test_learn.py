"""Policy learning held to brute force, the limits of λ, the oracle bound, budgets and
frontiers."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from dynviz import learn, policy as P
from tests.helpers import synthetic_outputs


# ---------------------------------------------------------------------------- stumps
@pytest.mark.parametrize("seed", range(5))
def test_stump_fit_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 40
    score = np.round(rng.normal(size=n), 1)                       # ties on purpose
    positive = rng.random(n) < 0.5
    weight = rng.random(n)
    theta, error = learn.fit_stump(score, positive, weight)
    candidates = np.concatenate([np.unique(score), [np.inf]])     # every distinct cut
    brute = min(((score >= t) != positive).astype(float) @ weight for t in candidates)
    assert error == pytest.approx(brute)
    assert ((score >= theta) != positive).astype(float) @ weight == pytest.approx(brute)
    assert theta not in set(score.tolist())                       # thresholds between values
    # a known order (here the reverse one, for the negated score) gives the same optimum
    flipped = min(((-score >= t) != positive).astype(float) @ weight
                  for t in np.concatenate([np.unique(-score), [np.inf]]))
    _, error = learn.fit_stump(-score, positive, weight, np.argsort(score, kind="stable")[::-1])
    assert error == pytest.approx(flipped)


# ---------------------------------------------------------------------------- limits
@pytest.mark.parametrize("family", P.FAMILIES)
def test_lambda_zero_loses_no_accuracy_to_the_last_stage(family):
    out = synthetic_outputs()
    outcome = P.simulate(learn.fit(out, 0.0, family), out)
    assert outcome.correct.mean() >= P.static(out, out.n_stages - 1).correct.mean()


def test_lambda_zero_never_exits_when_only_later_stages_are_right():
    out = synthetic_outputs(seed=3)
    outcome = P.simulate(learn.fit(out, 0.0, "threshold"), out)
    later_right = ~out.correct[:, 0] & out.correct[:, -1]
    left_early_wrong = later_right & (outcome.exit_stage == 0)
    # a stump cannot separate everything, but λ = 0 must not trade accuracy for cost
    assert outcome.correct.sum() >= out.correct[:, -1].sum()
    assert left_early_wrong.sum() <= (out.correct[:, 0] & ~out.correct[:, -1]).sum()


@pytest.mark.parametrize("family", P.FAMILIES)
@pytest.mark.parametrize("topology", P.TOPOLOGIES)
def test_huge_lambda_always_takes_the_first_exit(family, topology):
    out = synthetic_outputs(jump=True)
    outcome = P.simulate(learn.fit(out, 1e6, family, topology=topology), out)
    assert (outcome.exit_stage == 0).all() and not outcome.jumped.any()


# ---------------------------------------------------------------------------- optimality
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("lam", [0.05, 0.3, 1.0])
def test_threshold_policy_beats_every_constant_policy(seed, lam):
    out = synthetic_outputs(seed=seed)
    learned = learn.objective(P.simulate(learn.fit(out, lam, "threshold"), out), lam,
                              out.reference_cost)
    constants = [learn.objective(P.static(out, k), lam, out.reference_cost)
                 for k in range(out.n_stages)]
    assert learned <= min(constants) + 1e-12
    constant_fit = learn.objective(P.simulate(learn.fit(out, lam, "constant"), out), lam,
                                   out.reference_cost)
    assert constant_fit == pytest.approx(min(constants))          # bottom-up finds the best


@pytest.mark.parametrize("seed", range(3))
def test_bottom_up_matches_brute_force_over_threshold_pairs(seed):
    """For 3 stages, search every pair of stage thresholds directly."""
    out = synthetic_outputs(n=60, seed=seed)
    lam, f = 0.4, 0
    learned = learn.objective(P.simulate(learn.fit(out, lam, "threshold"), out), lam,
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
            best = min(best, learn.objective(P.simulate(pol, out), lam, out.reference_cost))
    # bottom-up is exact per stage given the later ones; jointly it can only tie or be
    # slightly worse, never better than the exhaustive optimum
    assert best - 1e-12 <= learned <= best + 0.02


def test_learned_policies_never_beat_the_oracle():
    out = synthetic_outputs(seed=2)
    o = P.oracle(out)
    for point in learn.sweep(out, n_points=20):
        if point.accuracy >= o.correct.mean():
            assert point.cost_fraction * out.reference_cost >= o.cost.mean() - 1e-9


# ---------------------------------------------------------------------------- topology
def test_jump_topology_skips_a_useless_middle_stage():
    out = synthetic_outputs(seed=4)
    logits = out.logits.copy()
    logits[:, 1] = np.random.default_rng(0).normal(size=logits[:, 1].shape)  # stage 1 guesses
    costs = out.stage_costs.copy()
    costs[:, 1] = 3.0
    bad_middle = P.StageOutputs(logits, out.labels, costs, jump_costs=costs[:, 2])
    lam = 0.2
    chain = P.simulate(learn.fit(bad_middle, lam, topology="chain"), bad_middle)
    jump = P.simulate(learn.fit(bad_middle, lam, topology="jump"), bad_middle)
    assert jump.jumped.sum() > 0
    assert (learn.objective(jump, lam, bad_middle.reference_cost)
            < learn.objective(chain, lam, bad_middle.reference_cost))


def test_jump_needs_jump_costs():
    with pytest.raises(ValueError, match="jump_costs"):
        learn.fit(synthetic_outputs(), 0.1, topology="jump")


# ---------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("family", ["threshold", "linear"])
def test_target_budget_meets_the_budget(family):
    out = synthetic_outputs(seed=5)
    for budget in (0.3, 0.5, 0.8):
        pol = learn.target_budget(out, budget, family)
        assert P.simulate(pol, out).cost.mean() / out.reference_cost <= budget + 1e-9


def test_sweep_is_a_pareto_frontier():
    front = learn.sweep(synthetic_outputs(seed=6), n_points=30)
    costs = [p.cost_fraction for p in front]
    accs = [p.accuracy for p in front]
    assert costs == sorted(costs) and accs == sorted(accs) and len(front) >= 3

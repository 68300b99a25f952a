"""Shipped operating points: the cheapest policy of the learned frontier within the loss
budget and its margin, the paired standard error it uses, and the kinds it chooses among."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dynviz import learn, operating_points, policy as P
from tests.helpers import synthetic_outputs


def test_paired_standard_error_is_the_formula():
    a = np.array([1, 1, 0, 1, 0, 1, 1, 0], bool)
    b = np.array([1, 0, 0, 1, 1, 1, 0, 0], bool)
    d = [0, 1, 0, 0, -1, 0, 1, 0]                    # a − b per image
    mean = sum(d) / 8
    var = sum((x - mean) ** 2 for x in d) / 7
    assert operating_points.paired_se(a, b) == pytest.approx(math.sqrt(var / 8))
    assert operating_points.paired_se(a, a) == 0.0


@pytest.mark.parametrize("max_loss", [0.0, 0.01, 0.03])
@pytest.mark.parametrize("kinds", [(("threshold", "max_prob"),), operating_points.CANDIDATES])
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
        pol = operating_points.choose(fit, reference, max_loss, margin_se=margin, kinds=kinds)
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
    assert operating_points.candidates() == operating_points.CANDIDATES
    assert operating_points.candidates("linear", "margin") == (("linear", "margin"),)
    with pytest.raises(ValueError, match="unknown policy"):
        operating_points.candidates("threshold", "entropy")

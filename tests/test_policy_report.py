"""The learned-against-baseline comparison held to a brute-force scan of global thresholds,
and its summary counts."""
from __future__ import annotations

import numpy as np
import pytest

from dynviz import learn, policy as P, policy_report
from tests.helpers import synthetic_outputs


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
    thresholds = policy_report.baseline_thresholds(fit, "max_prob", n=60)
    on_fit = _global_threshold_by_hand(fit, thresholds)
    on_check = _global_threshold_by_hand(check, thresholds)
    rows = policy_report.baseline_comparison(fit, check, topology=topology, n_points=15,
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
    plain = policy_report.baseline_comparison(fit, check, frontier=front, n_thresholds=60)
    assert plain == policy_report.baseline_comparison(fit, check, frontier=front,
                                                      n_thresholds=60, learned_on=check)
    other = synthetic_outputs(n=300, seed=7)          # other images: other learned outcomes
    rows = policy_report.baseline_comparison(fit, check, frontier=front, n_thresholds=60,
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
    wins, compared, worst = policy_report.against_baseline(rows)
    assert (wins, compared) == (2, 4) and worst is rows[2]
    assert policy_report.against_baseline([rows[1]]) == (0, 0, None)


def test_markdown_is_one_row_per_system_in_points_and_percent():
    report = policy_report.PolicyReport(
        "cascade_r8_r20_r56", budgets=[], beats_baseline=28, beats_hindsight=24, compared=36,
        worst_gap=-0.0048, worst_gap_se=0.0037, worst_gap_hindsight=-0.006,
        operating_point={"accuracy": 0.9012, "cost_fraction": 0.372}, oracle_share=0.72)
    unshipped = policy_report.PolicyReport("exits_resnet56", [], 0, 0, 0, 0.0, 0.0, 0.0,
                                           None, None)
    lines = policy_report.markdown([report, unshipped]).splitlines()
    assert len(lines) == 4 and lines[1] == "|---|---|---|---|---|---|---|---|"
    assert lines[0].count("|") == lines[2].count("|") == 9
    assert lines[2] == ("| cascade_r8_r20_r56 | 28/36 | -0.48 ± 0.37 pt | 24/36 | -0.60 pt | "
                        "90.12% | 0.372 | 72% |")
    assert lines[3] == ("| exits_resnet56 | 0/0 | +0.00 ± 0.00 pt | 0/0 | +0.00 pt | nan% | nan | "
                        "nan% |")

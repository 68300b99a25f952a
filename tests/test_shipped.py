"""What the repository ships agrees with itself: the cached outputs in assets/ belong to the
committed checkpoints, assets/results.json is what those caches and the shipped policies give
on the check half, and README.md's results table is that file."""
from __future__ import annotations

import json

import pytest

from dynviz import cache, evaluate, operating_points, policy as P, settings, zoo

RESULTS = settings.PROJECT_ROOT / "assets" / "results.json"
OUTPUTS = settings.PROJECT_ROOT / "assets" / "outputs"
pytestmark = pytest.mark.skipif(not RESULTS.exists(), reason="no shipped results")


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return json.loads(RESULTS.read_text())


def _shipped(system: str) -> cache.CachedOutputs:
    found = sorted(OUTPUTS.glob(f"{system}-val-*"))
    assert len(found) == 1, f"{system}: expected one shipped cache, found {found}"
    return cache.load(found[0])


def test_shipped_caches_belong_to_the_committed_checkpoints(ws):
    for system in zoo.available(ws):
        manifest = _shipped(system).manifest
        assert manifest["checkpoint_sha256"] == zoo.checkpoint_sha(ws, system), (
            f"{system}: assets/outputs is stale; run `python -m dynviz ship`")


def test_results_are_what_the_shipped_caches_and_policies_give(rows, ws):
    reference = _shipped(ws.reference).half("check")
    ref_macs = reference.stage_costs.sum(1).mean()
    for row in rows:
        system = row["system"].removesuffix(" oracle")
        check = _shipped(system).half("check")
        if row["kind"] in ("static", "gated"):
            correct, cost = check.correct[:, 0], check.stage_costs[:, 0]
        else:
            outcome = (P.oracle(check) if row["kind"] == "oracle" else
                       P.simulate(P.Policy.from_json(json.dumps(row["policy"])), check))
            correct, cost = outcome.correct, outcome.cost
        assert row["accuracy"] == pytest.approx(correct.mean(), abs=5e-5), row["system"]
        assert row["macs_mean"] == pytest.approx(cost.mean(), abs=0.5), row["system"]
        assert row["macs_reduction"] == pytest.approx(ref_macs / cost.mean(), abs=5e-4)
    staged = {r["system"] for r in rows if r["kind"] in ("exits", "cascade")}
    for system in staged:              # the policies in the rows are the shipped ones
        shipped = [operating_points.load_policy(ws, system, loss)
                   for loss in operating_points.LOSSES]
        in_rows = [P.Policy.from_json(json.dumps(r["policy"])) for r in rows
                   if r["system"] == system]
        assert in_rows == shipped


def test_readme_results_table_is_the_shipped_results(rows):
    table = evaluate.markdown([evaluate.Row(**r) for r in rows])
    readme = (settings.PROJECT_ROOT / "README.md").read_text()
    assert table in readme, "README.md's results table differs from assets/results.json"


def test_every_system_is_in_the_results(rows, ws):
    names = {r["system"] for r in rows}
    assert set(zoo.available(ws)) <= names
    reference = [r["macs_reduction"] for r in rows if r["system"] == ws.reference]
    assert reference == [1.0]

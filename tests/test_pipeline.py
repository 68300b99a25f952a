"""Zoo -> cache -> policies -> evaluate -> inspect, end to end on a tiny split with
checkpoints of random weights (written to temporary directories)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import models
from dynviz import data, evaluate, live, operating_points, policy as P, policy_report, zoo
from dynviz import workspace
from dynviz.cli import main
from tests.helpers import make_imagefolder, write_random_checkpoints

pytestmark = pytest.mark.slow

CHECKPOINTS = {"resnet8": "resnet8", "resnet20": "resnet20", "resnet56": "resnet56",
               "lcnet_resnet20": "lcnet_resnet20", "exits_resnet56": "exits_resnet56"}


@pytest.fixture(scope="module")
def fake_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    mp = pytest.MonkeyPatch()
    for var, sub in (("DYNVIZ_CHECKPOINTS", "ckpt"), ("DYNVIZ_CACHE", "cache"),
                     ("DYNVIZ_ASSETS", "assets")):
        mp.setenv(var, str(root / sub))
    write_random_checkpoints(root / "ckpt", CHECKPOINTS)
    ws = workspace.builtin()
    dataset = data.open_imagefolder(make_imagefolder(root / "tiny", per_class=4), ws.data)
    val = data.Split(dataset, "val", np.arange(len(dataset)))
    yield ws, val
    mp.undo()


def test_available_systems_and_missing_ones(fake_zoo):
    ws, _ = fake_zoo
    avail = zoo.available(ws)
    assert {"resnet8", "resnet20", "resnet56", "lcnet_resnet20", "exits_resnet56",
            "cascade_r8_r20_r56"} <= set(avail)
    assert "lcnet_resnet56_seq" not in avail
    with pytest.raises(zoo.MissingCheckpointError,
                       match="python -m dynviz train lcnet_resnet56_ste"):
        zoo.load_system(ws, "lcnet_resnet56_seq")


def test_cascade_loads_its_members(fake_zoo):
    ws, _ = fake_zoo
    cascade = zoo.load_system(ws, "cascade_r8_r20_r56", torch.device("cpu"))
    r20 = zoo.load_system(ws, "resnet20", torch.device("cpu"))
    for a, b in zip(cascade.stages[1].state_dict().values(), r20.state_dict().values()):
        assert torch.equal(a, b)


def test_policies_evaluate_and_inspect(fake_zoo, capsys):
    ws, val = fake_zoo
    written = operating_points.ship(ws, val=val)
    assert {p.name for p in written} >= {"exits_resnet56-loss0.5pct.json",
                                         "cascade_r8_r20_r56-loss1pct.json"}
    rows = evaluate.evaluate(ws, val, time_it=False, progress=False)
    by_name = {(r.system, r.operating_point): r for r in rows}
    ref = by_name[("resnet56", "trained")]
    assert ref.macs_reduction == 1.0 and ref.macs_mean == models.create("resnet56").macs()
    # every staged row equals the policy simulated on the cache
    for r in rows:
        if r.policy is not None:
            pol = P.Policy.from_json(json.dumps(r.policy))
            out = zoo.outputs(ws, r.system, val, progress=False).stage_outputs()
            assert r.accuracy == pytest.approx(P.simulate(pol, out).correct.mean(), abs=1e-4)
    # the oracle is right whenever any stage is, so no policy of the system beats it
    oracle = {r.system.removesuffix(" oracle"): r for r in rows if r.kind == "oracle"}
    assert set(oracle) == {"exits_resnet56", "cascade_r8_r20_r56"}
    for r in rows:
        if r.policy is not None:
            assert r.accuracy <= oracle[r.system].accuracy

    # against the oracle at the same accuracy, a policy can save no more MACs than it does
    for name in ("exits_resnet56", "cascade_r8_r20_r56"):
        report = policy_report.report(ws, name, val)
        check = zoo.outputs(ws, name, val, progress=False).half("check")
        shipped = P.simulate(operating_points.load_policy(ws, name, operating_points.LOSSES[0]),
                             check)
        assert report.operating_point["accuracy"] == pytest.approx(shipped.correct.mean())
        assert report.oracle_share <= 1 + 1e-9
        assert report.beats_baseline <= report.compared <= len(report.budgets)
        assert report.beats_hindsight <= report.compared

    image = val.images()[3]
    for name in ("resnet20", "lcnet_resnet20", "exits_resnet56", "cascade_r8_r20_r56"):
        system = live.build(ws, name, calibrate=False)
        result = live.inspect_image(system, image, timing_repeats=1)
        assert result.probs.shape == (10,) and abs(result.probs.sum() - 1) < 1e-5
        assert result.ms_dynamic > 0 and result.ms_dense > 0
        if name == "lcnet_resnet20":
            model = zoo.load_system(ws, name, torch.device("cpu"))
            with torch.no_grad():
                trace = model(ws.data.to_tensor(image[None])).trace
            assert result.macs == int(trace.macs[0])
            assert np.allclose(result.path.block_scores, trace.block_scores[0].numpy(),
                               atol=1e-5)
        if name in ("exits_resnet56", "cascade_r8_r20_r56"):
            out = zoo.outputs(ws, name, val, progress=False).stage_outputs(np.array([3]))
            sim = P.simulate(system.system.policy, out)
            assert result.path.exit_stage == sim.exit_stage[0]
            assert result.macs == pytest.approx(sim.cost[0])
            assert result.prediction == ws.data.classes[sim.predictions[0]]

    assert main(["evaluate", "--data", str(val.dataset.root), "--no-timing",
                 "--out", str(val.dataset.root.parent / "r.json")]) == 0
    assert "resnet56" in capsys.readouterr().out


def test_evaluate_shows_which_system_it_is_timing(fake_zoo, monkeypatch, capsys):
    """Timing takes minutes: a bar on stderr names each system as it is measured (the
    measurements themselves stubbed out here)."""
    from dynviz import runtime

    ws, val = fake_zoo
    operating_points.ship(ws, val=val)
    monkeypatch.setattr(runtime, "calibrate_all", lambda *args, **kwargs: None)
    monkeypatch.setattr(evaluate, "_speedup", lambda *args: 1.0)
    evaluate.evaluate(ws, val, repeats=1, progress=True)
    err = capsys.readouterr().err
    names = zoo.available(ws)
    assert "timing: 100%" in err and f"{len(names)}/{len(names)}" in err
    assert all(f", {name}]" in err for name in names)


def test_evaluate_refuses_a_stale_policy_before_timing_anything(fake_zoo, monkeypatch):
    from dynviz import runtime

    ws, val = fake_zoo
    operating_points.ship(ws, val=val)
    timed = []
    monkeypatch.setattr(runtime, "calibrate_all", lambda *args, **kwargs: timed.append(1))
    monkeypatch.setattr(evaluate, "_speedup", lambda *args: timed.append(1) or 1.0)
    path = zoo.checkpoint_path(ws, "exits_resnet56")
    kept = path.read_bytes()
    weights = torch.load(path, weights_only=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}, path)
    try:                                    # exits_resnet56 trained again since its policies
        with pytest.raises(operating_points.PolicyFileError, match="exits_resnet56-loss"):
            evaluate.evaluate(ws, val, repeats=1, progress=False)
    finally:
        path.write_bytes(kept)
    assert not timed

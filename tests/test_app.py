"""Every page through Streamlit's AppTest, on a synthetic CIFAR-10 (500+ images per class)
and on a workspace of one's own, with checkpoints of random weights in temporary directories."""
from __future__ import annotations

import base64
import io
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

from dynviz import budget, evaluate, gallery, operating_points, runtime, workspace, zoo
from dynviz import policy as P
from tests.helpers import make_imagefolder, run_page, workspace_toml


def _png(colour=(200, 30, 30), size=(48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def _plotted(values) -> np.ndarray:
    """An array of a plotly figure's JSON (plotly writes numpy arrays as base64 typed arrays)."""
    if isinstance(values, dict):
        return np.frombuffer(base64.b64decode(values["bdata"]), dtype=values["dtype"])
    return np.asarray(values)


def _no_exception(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


@pytest.mark.parametrize("page", ["inspect", "budget", "galleries", "models"])
def test_every_page_loads(app_env, page):
    at = run_page(page)
    _no_exception(at)
    assert at.title[0].value.lower() == page


def test_pickers_start_on_a_dynamic_system_and_inspect_shows_an_image(app_env, ws):
    trained = [n for n in ws.systems if not zoo.missing(ws, n)]
    dynamic = [n for n in trained if ws.spec(n).kind in ("gated", "exits", "cascade")]
    start = ws.featured if ws.featured in trained else dynamic[0]
    assert ws.spec(start).kind != "static"
    inspect = run_page("inspect")
    _no_exception(inspect)
    assert inspect.selectbox(key="inspect_system").value == start
    assert inspect.radio(key="inspect_source").value == "A validation image"
    assert [m for m in inspect.metric if m.label == "Prediction"]   # something on arrival
    galleries = run_page("galleries")
    _no_exception(galleries)
    picker = galleries.selectbox(key="gallery_system")
    assert picker.value == start and picker.options == dynamic   # no static network


def test_inspect_upload_good_then_broken_then_good(app_env, ws):
    at = run_page("inspect", inspect_system="resnet20", inspect_source="Upload an image")
    assert at.caption[-1].value.startswith("Pick or upload an image")
    at.file_uploader(key="inspect_upload").set_value(("red.png", _png(), "image/png")).run()
    _no_exception(at)
    prediction = [m for m in at.metric if m.label == "Prediction"]
    assert prediction and prediction[0].value in ws.data.classes
    at.file_uploader(key="inspect_upload").set_value(
        ("notes.jpg", b"this is text, not a picture", "image/jpeg")).run()
    _no_exception(at)
    assert len(at.error) == 1 and "notes.jpg" in at.error[0].value
    assert not [m for m in at.metric if m.label == "Prediction"]
    at.file_uploader(key="inspect_upload").set_value(("ok.png", _png((0, 0, 250)),
                                                      "image/png")).run()
    _no_exception(at)
    assert not at.error and [m for m in at.metric if m.label == "Prediction"]


def test_inspect_gated_shows_what_the_masked_model_computes(app_env, ws):
    at = run_page("inspect", inspect_system="lcnet_resnet20", inspect_source="A validation image",
              inspect_class="ship", inspect_index=2)
    _no_exception(at)
    charts = at.get("plotly_chart")
    assert len(charts) == 4  # top-5, the diagram, block strip, channel heatmap
    # reference: the same image through the masked path of the checkpoint, outside the app
    check = ws.split("check", app_env.dataset)
    index = np.flatnonzero(check.labels == ws.data.classes.index("ship"))[2]
    model = zoo.load_system(ws, "lcnet_resnet20", torch.device("cpu"))
    with torch.no_grad():
        out = model(ws.data.to_tensor(check.images()[index:index + 1]))
        logits, trace = out.logits, out.trace
    shown = {m.label: m.value for m in at.metric}
    assert shown["Prediction"] == ws.data.classes[int(logits.argmax())]
    assert shown["MACs"] == f"{int(trace.macs[0]) / 1e6:.1f} M"
    strip = json.loads(charts[2].proto.spec)["data"][0]   # every block's S_L, as plotted
    assert np.allclose(_plotted(strip["customdata"]), trace.block_scores[0].numpy(), atol=1e-5)


def test_inspect_cascade_shows_the_stage_path(app_env, ws):
    at = run_page("inspect", inspect_system="cascade_r8_r20_r56",
              inspect_source="A validation image", inspect_class="ship", inspect_index=3)
    _no_exception(at)
    assert len(at.get("plotly_chart")) == 3  # top-5, the diagram and the stage path
    # reference: every stage of the cascade on the image, outside the app, and the shipped
    # ≤0.5% policy simulated on those answers (the batch rule, not the app's batch-1 path)
    check = ws.split("check", app_env.dataset)
    index = np.flatnonzero(check.labels == ws.data.classes.index("ship"))[3]
    x = ws.data.to_tensor(check.images()[index:index + 1])
    system = zoo.load_system(ws, "cascade_r8_r20_r56", torch.device("cpu"))
    with torch.no_grad():
        out = system(x)
        answers = P.StageOutputs(out.stage_logits.numpy(), check.labels[index:index + 1],
                                 out.stage_macs.numpy().astype(float),
                                 out.stage_macs[:, -1].numpy().astype(float))
    shipped = operating_points.load_policy(ws, "cascade_r8_r20_r56",
                                           operating_points.LOSSES[0])
    outcome = P.simulate(shipped, answers)
    shown = {m.label: m.value for m in at.metric}
    assert shown["Prediction"] == ws.data.classes[int(outcome.predictions[0])]
    assert shown["MACs"] == f"{outcome.cost[0] / 1e6:.1f} M"
    # what each stage spent on it: its full cost if it ran, else 0, adding up to the total
    (caption,) = [c.value for c in at.caption if c.value.startswith("MACs per stage: ")]
    parts = [p.rsplit(" ", 2) for p in caption.removeprefix("MACs per stage: ").split(", ")]
    assert [name for name, _, _ in parts] == system.stage_names
    spent = [float(m) for _, m, _ in parts]
    assert all(m in (0.0, round(full / 1e6, 1)) for m, full in zip(spent, system.stage_macs()))
    assert spent[0] > 0 and (spent[-1] > 0) == (outcome.exit_stage[0] == 2)
    assert abs(sum(spent) - outcome.cost[0] / 1e6) < 0.1
    # the stage path plots what each early exit decided on: φ·w of the shipped policy at the
    # stages the image reached, beside θ; it left where φ·w >= θ, not before
    policy = operating_points.load_policy(ws, "cascade_r8_r20_r56", operating_points.LOSSES[0])
    bars, marks = json.loads(at.get("plotly_chart")[2].proto.spec)["data"]
    reached = outcome.exit_stage[0] if not outcome.jumped[0] else 0
    for k, decision in enumerate(policy.exits):
        phi = answers.features[0, k]
        if k <= reached:
            score = sum(a * b for a, b in zip(phi.tolist(), decision.w))
            assert _plotted(bars["y"])[k] == pytest.approx(score, abs=1e-5)
            assert (score >= decision.theta) == (k == outcome.exit_stage[0])
    finite = [d.theta for d in policy.exits if math.isfinite(d.theta)]
    assert np.allclose(_plotted(marks["y"]), finite)


def test_budget_slider_moves_the_operating_point_as_the_library_says(app_env, ws):
    at = run_page("budget", budget_system="cascade_r8_r20_r56")
    _no_exception(at)
    fit = zoo.outputs(ws, "cascade_r8_r20_r56", app_env, progress=False).half("fit")
    check = zoo.outputs(ws, "cascade_r8_r20_r56", app_env, progress=False).half("check")
    seen = []
    for percent in (20, 60, 95):
        at.slider(key="budget_slider").set_value(percent).run()
        _no_exception(at)
        expected = budget.solve(fit, check, budget.BudgetQuery(
            at.selectbox(key="budget_family").value, at.selectbox(key="budget_feature").value,
            "jump", percent / 100))
        shown = at.session_state["budget_last"]
        assert shown["check"] == expected.check and shown["fit"] == expected.fit
        assert shown["check"]["cost_fraction"] <= percent / 100 + 0.05
        for half, summary in (("check", expected.check), ("fit", expected.fit)):
            acc = [m for m in at.metric if m.label == f"Accuracy ({half})"][0]
            assert acc.value == f"{summary['accuracy']:.2%}"
            # the loss against resnet56 itself on that half, from its own cached outputs
            alone = zoo.outputs(ws, "resnet56", app_env, progress=False).half(half)
            ref = float((alone.logits[:, 0].argmax(-1) == alone.labels).mean())
            assert acc.delta == f"{(summary['accuracy'] - ref) * 100:+.2f} pt vs resnet56"
        # in MACs the ratio to dense is a MAC reduction, never called a speedup
        ratio = [m for m in at.metric if m.label == "MAC reduction (check)"][0].value
        assert ratio == f"{1 / expected.check['cost_fraction']:.2f}×"
        assert not [m for m in at.metric if "peedup" in m.label]
        seen.append(expected.fit["cost_fraction"])
    assert seen == sorted(seen) and seen[0] < seen[-1]


def test_budget_slider_starts_at_each_systems_shipped_point(app_env, ws):
    at = run_page("budget", budget_system="cascade_r8_r20_r56")
    starts = {}
    for name in ("exits_resnet56", "cascade_r8_r20_r56"):
        at.selectbox(key="budget_system").set_value(name).run()
        _no_exception(at)
        shipped = operating_points.load_policy(ws, name, 0.005)
        fit = zoo.outputs(ws, name, app_env, progress=False).half("fit")
        cost = P.simulate(shipped, fit).cost.mean() / fit.reference_cost   # a fraction
        starts[name] = at.slider(key="budget_slider").value
        # the smallest whole percent the shipped point fits in, within the slider's 5..100
        assert starts[name] - 1 < 100 * cost <= starts[name] or \
            (starts[name], 100 * cost <= 5) == (5, True) or \
            (starts[name], 100 * cost > 99) == (100, True)
        assert at.session_state["budget_last"]["budget"] == starts[name] / 100
        # ...with the kind of policy it ships
        assert at.selectbox(key="budget_family").value == shipped.family
        assert at.selectbox(key="budget_feature").value == shipped.feature
        at.slider(key="budget_slider").set_value(97).run()     # a move stays put...
        assert at.session_state["budget_last"]["budget"] == 0.97
    at.selectbox(key="budget_system").set_value("exits_resnet56").run()   # ...until a switch
    assert at.slider(key="budget_slider").value == starts["exits_resnet56"]


def test_budget_policy_goes_to_inspect(app_env, ws):
    at = run_page("budget", budget_system="exits_resnet56")
    at.button(key="budget_use").click().run()
    _no_exception(at)
    handed = at.session_state["budget_policy"]["exits_resnet56"]
    # the policy handed over is the one the library learns for the budget the page shows
    cached = zoo.outputs(ws, "exits_resnet56", app_env, progress=False)
    query = budget.BudgetQuery(at.selectbox(key="budget_family").value,
                               at.selectbox(key="budget_feature").value,
                               ws.spec("exits_resnet56").topology,
                               at.session_state["budget_last"]["budget"])
    expected = budget.solve(cached.half("fit"), cached.half("check"), query)
    assert handed == expected.policy.to_json()
    # Inspect offers it, and runs the image with it
    inspect = run_page("inspect", inspect_system="exits_resnet56", budget_policy={
        "exits_resnet56": handed}, inspect_source="A validation image")
    _no_exception(inspect)
    point = inspect.selectbox(key="inspect_point")
    assert "from the Budget page" in point.options
    point.set_value("from the Budget page").run()
    _no_exception(inspect)
    assert [m for m in inspect.metric if m.label == "Prediction"]


def test_galleries_rank_a_class_by_what_the_model_spent(app_env, ws):
    at = run_page("galleries", gallery_system="lcnet_resnet20")
    _no_exception(at)
    assert [s.value for s in at.subheader][:2] == ["Cheapest", "Costliest"]
    assert len(at.get("plotly_chart")) == 2  # class cost, channel firing
    at.selectbox(key="gallery_class").set_value("cat").run()
    _no_exception(at)
    # reference: every cat of the validation split through the checkpoint, outside the app
    cats = np.flatnonzero(app_env.labels == ws.data.classes.index("cat"))
    n = min(8, len(cats))
    model = zoo.load_system(ws, "lcnet_resnet20", torch.device("cpu"))
    with torch.no_grad():
        trace = model(ws.data.to_tensor(app_env.images()[cats])).trace
    spent = np.sort(trace.macs.numpy()) / 1e6
    assert spent[n - 1] < spent[-n]            # the two galleries can be told apart
    captions = [c for el in at.get("image") for c in el.captions]   # one image per column
    assert len(captions) == 2 * n and all(c.startswith("cat → ") for c in captions)
    shown = [[float(c.rsplit(" ", 1)[1].rstrip("M")) for c in g]
             for g in (captions[:n], captions[n:])]
    assert np.allclose(shown[0], spent[:n], atol=0.051)
    assert np.allclose(shown[1], spent[::-1][:n], atol=0.051)


def test_galleries_firing_rates_and_their_starting_block_by_brute_force(app_env, ws):
    cached = zoo.outputs(ws, "lcnet_resnet20", app_env, progress=False)
    n_classes = ws.data.n_classes
    labels = cached.arrays["labels"].astype(int)
    ran, names = cached.blocks_run(), cached.manifest["block_names"]
    spreads = []
    for block in range(len(names)):
        on = cached.channels_on(block)
        rates = np.zeros((n_classes, on.shape[1]))
        for i, label in enumerate(labels):           # image by image
            if ran[i, block]:
                rates[label] += on[i]
        rates /= np.bincount(labels, minlength=n_classes)[:, None]
        assert np.allclose(gallery.class_firing_rates(cached, block, n_classes), rates)
        spreads.append(np.mean([rates[:, j].var() for j in range(rates.shape[1])]))
    assert max(spreads) > 0
    start = gallery.most_class_specific_block(cached, n_classes)
    assert spreads[start] == pytest.approx(max(spreads))
    at = run_page("galleries", gallery_system="lcnet_resnet20")
    _no_exception(at)
    picker = at.selectbox(key="gallery_block")
    assert picker.value == start
    other = (start + 1) % len(names)
    picker.set_value(other).run()                      # a block chosen stays chosen...
    assert at.selectbox(key="gallery_block").value == other
    at.selectbox(key="gallery_system").set_value("exits_resnet56").run()
    at.selectbox(key="gallery_system").set_value("lcnet_resnet20").run()
    _no_exception(at)                                  # ...until the system changes
    assert at.selectbox(key="gallery_block").value == start
    expected = gallery.class_firing_rates(cached, start, n_classes)
    z = json.loads(at.get("plotly_chart")[1].proto.spec)["data"][0]["z"]   # the heatmap
    assert np.allclose(_plotted(z).reshape(expected.shape), expected)


def test_models_page_lists_results_checkpoints_and_papers(app_env, ws, tmp_path, monkeypatch,
                                                         fresh_caches):
    rows = [evaluate.Row("resnet56", "static", "trained", 0.8916, 125.7e6, 1.0, 1.0, 1.0),
            evaluate.Row("cascade_r8_r20_r56", "cascade", "≤0.5% loss (fit half)", 0.8964,
                         45.1e6, 2.79, 1.64, 2.15)]
    (tmp_path / "assets").mkdir()
    evaluate.write(rows, tmp_path / "assets" / "results.json")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "resnet8.json").write_text(json.dumps({
        "name": "resnet8", "model": "resnet8", "history": [{}] * 30, "wall_seconds": 1500,
        "metrics": {"check": {"accuracy": 0.8156, "macs_mean": 12.5e6}}}))
    monkeypatch.setenv("DYNVIZ_ASSETS", str(tmp_path / "assets"))
    monkeypatch.setenv("DYNVIZ_CHECKPOINTS", str(tmp_path / "ckpt"))
    at = run_page("models")
    _no_exception(at)
    results, checkpoints, papers = (df.value for df in at.dataframe)
    assert results["system"].tolist() == [r.system for r in rows]
    assert results["accuracy"].tolist() == pytest.approx([100 * r.accuracy for r in rows])
    assert results["MAC reduction"].tolist() == [r.macs_reduction for r in rows]
    assert checkpoints.to_dict("records") == [{
        "checkpoint": "resnet8", "model": "resnet8", "check accuracy": pytest.approx(81.56),
        "MACs (M)": 12.5, "epochs": 30, "train minutes": 25}]
    assert any("LC-Net" in s for s in papers["source"])
    # no weights in this checkpoint directory: every system says how to train it
    assert all(f"**{name}**" in at.info[0].value for name in ws.systems)


def test_budget_in_measured_latency(app_env):
    at = run_page("budget", budget_system="cascade_r8_r20_r56",
              budget_metric="measured latency (batch 1)")
    _no_exception(at)
    cost = [m for m in at.metric if m.label == "Mean cost (check)"][0]
    assert cost.value.endswith(" ms")
    ratio = [m for m in at.metric if m.label == "Speedup (check)"][0].value   # measured time
    assert ratio == f"{1 / at.session_state['budget_last']['check']['cost_fraction']:.2f}×"
    budget_set = at.slider(key="budget_slider").value / 100
    assert 0 < at.session_state["budget_last"]["check"]["cost_fraction"] <= budget_set + 0.05


@pytest.mark.parametrize("page, checkpoint", [("inspect", "lcnet_resnet20"),
                                              ("budget", "exits_resnet56"),
                                              ("galleries", "lcnet_resnet20")])
def test_a_truncated_checkpoint_shows_how_to_restore_it(page, checkpoint, app_env, app_root,
                                                        tmp_path, monkeypatch, fresh_caches):
    """Each page's first system, its weights cut short: one error line, no traceback."""
    checkpoints = tmp_path / "ckpt"
    shutil.copytree(app_root / "ckpt", checkpoints)
    for path in checkpoints.glob("*.pt"):
        path.write_bytes(path.read_bytes()[:4096])
    shutil.copytree(app_root / "cache" / "images", tmp_path / "cache" / "images")
    monkeypatch.setenv("DYNVIZ_CHECKPOINTS", str(checkpoints))
    monkeypatch.setenv("DYNVIZ_CACHE", str(tmp_path / "cache"))
    at = run_page(page)
    _no_exception(at)
    (error,) = at.error
    assert error.value.startswith(f"cannot read {checkpoints / checkpoint}.pt: truncated or "
                                  "corrupt (")
    assert error.value.endswith(f"; restore it with `python -m dynviz train {checkpoint} "
                                f"--out-dir {checkpoints} --replace`")


OWN_CLASSES = ("cat_a", "dog_b", "emu")
OWN_TOML = workspace_toml(
    OWN_CLASSES, 36,                                         # the files are 40×40
    {"resnet8": {"kind": "static", "model": "resnet8", "checkpoint": "resnet8"},
     "resnet20": {"kind": "static", "model": "resnet20", "checkpoint": "resnet20"},
     "lcnet_resnet8": {"kind": "gated", "model": "lcnet_resnet8", "checkpoint": "lcnet_resnet8"},
     "r8_r20": {"kind": "cascade", "members": ["resnet8", "resnet20"]},
     "resnet32": {"kind": "static", "model": "resnet32", "checkpoint": "resnet32"}},  # untrained
    reference="resnet20",                   # not the first system: the pages must read it
    val_fraction=0.25)                      # 6 of 24 a class: 3 in each half


def test_every_page_serves_a_workspace_of_ones_own(tmp_path, monkeypatch):
    """Three classes that are not CIFAR's, another input size and reference, random weights
    (nothing trained, no policy shipped): every page shows the workspace's classes,
    systems, size and reference, and says how to train what is missing."""
    root = tmp_path / "animals"
    make_imagefolder(root / "images", per_class=24, size=40, classes=OWN_CLASSES)
    (root / "dynviz.toml").write_text(OWN_TOML)
    ws = workspace.load(root)
    ws.checkpoints.mkdir()
    for name in ("resnet8", "resnet20", "lcnet_resnet8"):
        torch.save(zoo.create_model(ws, ws.spec(name)).state_dict(), ws.checkpoints / f"{name}.pt")
    (ws.checkpoints / "resnet8.json").write_text(json.dumps({"name": "resnet8", "model": "r8"}))
    ws.results.mkdir()
    evaluate.write([evaluate.Row("resnet20", "static", "trained", 0.4, 51.7e6, 1.0, 1.0, 1.0)],
                   ws.results / "results.json")
    monkeypatch.setenv("DYNVIZ_WORKSPACE", str(root))
    monkeypatch.setenv("DYNVIZ_DEVICE", "cpu")
    trained = ["resnet8", "resnet20", "lcnet_resnet8", "r8_r20"]

    # Inspect: the workspace's systems, classes and size; the gated network's prediction
    at = run_page("inspect", inspect_class="emu", inspect_index=1)
    _no_exception(at)
    assert at.selectbox(key="inspect_system").options == trained
    assert at.selectbox(key="inspect_system").value == "lcnet_resnet8"   # the first dynamic
    assert at.selectbox(key="inspect_class").options == list(OWN_CLASSES)
    check = ws.split("check")
    index = np.flatnonzero(check.labels == OWN_CLASSES.index("emu"))[1]
    model = zoo.load_system(ws, "lcnet_resnet8", torch.device("cpu"))
    with torch.no_grad():
        logits = model(ws.data.to_tensor(check.images()[index:index + 1])).logits
    shown = {m.label: m.value for m in at.metric}
    assert shown["Prediction"] == OWN_CLASSES[int(logits.argmax())]
    assert [c for el in at.get("image") for c in el.captions] == ["as the model sees it (36×36)"]
    top = json.loads(at.get("plotly_chart")[0].proto.spec)["data"][0]["y"]
    assert sorted(top) == sorted(OWN_CLASSES)              # all 3: fewer than top-5
    at.radio(key="inspect_source").set_value("Upload an image").run()
    at.file_uploader(key="inspect_upload").set_value(("red.png", _png(), "image/png")).run()
    _no_exception(at)
    assert [m for m in at.metric if m.label == "Prediction"][0].value in OWN_CLASSES
    assert [c for el in at.get("image") for c in el.captions] == ["as the model sees it (36×36)"]

    # Budget: the one staged system, its losses against the workspace's reference
    at = run_page("budget")
    _no_exception(at)
    assert at.selectbox(key="budget_system").options == ["r8_r20"]
    deltas = [m.delta for m in at.metric if m.label.startswith("Accuracy (")]
    assert len(deltas) == 2 and all(d.endswith(" pt vs resnet20") for d in deltas)
    hist = json.loads(at.get("plotly_chart")[1].proto.spec)["data"][0]   # the cascade's stages
    assert hist["x"] == ["resnet8", "resnet20"]
    real, sizes = runtime.stage_seconds, []     # in latency, its stages timed at 36×36 images
    monkeypatch.setattr(runtime, "stage_seconds",
                        lambda system, size, **kw: sizes.append(size) or real(system, size, **kw))
    at.selectbox(key="budget_metric").set_value("measured latency (batch 1)").run()
    _no_exception(at)
    cost = [m.value for m in at.metric if m.label == "Mean cost (check)"]
    assert sizes == [36] and cost[0].endswith(" ms") and float(cost[0].split()[0]) > 0

    # Galleries: dynamic systems only, the workspace's classes in pickers, captions and axes
    at = run_page("galleries", gallery_system="lcnet_resnet8", gallery_class="dog_b")
    _no_exception(at)
    assert at.selectbox(key="gallery_system").options == ["lcnet_resnet8", "r8_r20"]
    assert at.selectbox(key="gallery_class").options == ["all", *OWN_CLASSES]
    captions = [c for el in at.get("image") for c in el.captions]
    assert len(captions) == 2 * 6 and all(c.startswith("dog_b → ") for c in captions)
    cost, firing = (json.loads(c.proto.spec)["data"][0] for c in at.get("plotly_chart"))
    assert list(cost["x"]) == list(OWN_CLASSES) and list(firing["y"]) == list(OWN_CLASSES)

    # Models: the workspace's results and checkpoints, and how to train what is missing
    at = run_page("models")
    _no_exception(at)
    assert at.subheader[0].value == "Results on the check half (vs resnet20)"
    assert [df.value.iloc[:, 0].tolist() for df in at.dataframe[:2]] == [["resnet20"],
                                                                         ["resnet8"]]
    (info,) = at.info
    command = zoo.train_command(ws, "resnet32")
    assert f"**resnet32**: run `{command}`" in info.value and f"--workspace {root}" in command
    assert not any(f"**{name}**" in info.value for name in trained)

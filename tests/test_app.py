"""Every page through Streamlit's AppTest, on a synthetic CIFAR-10 (500+ images per class)
and checkpoints of random weights written to temporary directories."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

from dynviz import budget, data, settings, zoo

PAGES = str(settings.PROJECT_ROOT / "dynviz" / "ui" / "{}_page.py")


def _run(page: str, **state) -> AppTest:
    at = AppTest.from_file(PAGES.format(page), default_timeout=120)
    for key, value in state.items():
        at.session_state[key] = value
    return at.run()


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
    at = _run(page)
    _no_exception(at)
    assert at.title[0].value.lower() == page


def test_inspect_upload_good_then_broken_then_good(app_env):
    at = _run("inspect", inspect_system="resnet20")
    at.file_uploader(key="inspect_upload").set_value(("red.png", _png(), "image/png")).run()
    _no_exception(at)
    prediction = [m for m in at.metric if m.label == "Prediction"]
    assert prediction and prediction[0].value in data.CLASSES
    at.file_uploader(key="inspect_upload").set_value(
        ("notes.jpg", b"this is text, not a picture", "image/jpeg")).run()
    _no_exception(at)
    assert len(at.error) == 1 and "notes.jpg" in at.error[0].value
    assert not [m for m in at.metric if m.label == "Prediction"]
    at.file_uploader(key="inspect_upload").set_value(("ok.png", _png((0, 0, 250)),
                                                      "image/png")).run()
    _no_exception(at)
    assert not at.error and [m for m in at.metric if m.label == "Prediction"]


def test_inspect_gated_shows_what_the_masked_model_computes(app_env):
    at = _run("inspect", inspect_system="lcnet_resnet20", inspect_source="A validation image",
              inspect_class="ship", inspect_index=2)
    _no_exception(at)
    charts = at.get("plotly_chart")
    assert len(charts) == 3  # top-5, block strip, channel heatmap
    # reference: the same image through the masked path of the checkpoint, outside the app
    check = data.get_split("check", app_env.dataset)
    index = np.flatnonzero(check.labels == data.CLASSES.index("ship"))[2]
    model = zoo.load_system("lcnet_resnet20", torch.device("cpu"))
    with torch.no_grad():
        logits, trace = model(data.to_tensor(check.images()[index:index + 1]))
    shown = {m.label: m.value for m in at.metric}
    assert shown["Prediction"] == data.CLASSES[int(logits.argmax())]
    assert shown["MACs"] == f"{int(trace.macs[0]) / 1e6:.1f} M"
    strip = json.loads(charts[1].proto.spec)["data"][0]   # every block's S_L, as plotted
    assert np.allclose(_plotted(strip["customdata"]), trace.block_scores[0].numpy(), atol=1e-5)


def test_inspect_cascade_shows_the_stage_path(app_env):
    at = _run("inspect", inspect_system="cascade_r8_r20_r56",
              inspect_source="A validation image", inspect_class="ship", inspect_index=3)
    _no_exception(at)
    assert len(at.get("plotly_chart")) == 2  # top-5 and the stage path
    assert any("MACs per stage" in c.value for c in at.caption)


def test_budget_slider_moves_the_operating_point_as_the_library_says(app_env):
    at = _run("budget", budget_system="cascade_r8_r20_r56")
    _no_exception(at)
    fit = zoo.outputs("cascade_r8_r20_r56", app_env, progress=False).half("fit")
    check = zoo.outputs("cascade_r8_r20_r56", app_env, progress=False).half("check")
    seen = []
    for percent in (20, 60, 95):
        at.slider(key="budget_slider").set_value(percent).run()
        _no_exception(at)
        expected = budget.solve(fit, check, budget.BudgetQuery(
            "threshold", "max_prob", "jump", percent / 100))
        shown = at.session_state["budget_last"]
        assert shown["check"] == expected.check and shown["fit"] == expected.fit
        assert shown["check"]["cost_fraction"] <= percent / 100 + 0.05
        acc = [m for m in at.metric if m.label == "Accuracy (check)"][0].value
        assert acc == f"{expected.check['accuracy']:.2%}"
        seen.append(expected.fit["cost_fraction"])
    assert seen == sorted(seen) and seen[0] < seen[-1]


def test_budget_policy_goes_to_inspect(app_env):
    at = _run("budget", budget_system="exits_resnet56")
    at.button(key="budget_use").click().run()
    _no_exception(at)
    handed = at.session_state["budget_policy"]["exits_resnet56"]
    # the policy handed over is the one the library learns for the budget the page shows
    cached = zoo.outputs("exits_resnet56", app_env, progress=False)
    query = budget.BudgetQuery("threshold", "max_prob", zoo.spec("exits_resnet56").topology,
                               at.session_state["budget_last"]["budget"])
    expected = budget.solve(cached.half("fit"), cached.half("check"), query)
    assert handed == expected.policy.to_json()
    # Inspect offers it, and runs the image with it
    inspect = _run("inspect", inspect_system="exits_resnet56", budget_policy={
        "exits_resnet56": handed}, inspect_source="A validation image")
    _no_exception(inspect)
    point = inspect.selectbox(key="inspect_point")
    assert "from the Budget page" in point.options
    point.set_value("from the Budget page").run()
    _no_exception(inspect)
    assert [m for m in inspect.metric if m.label == "Prediction"]


def test_galleries_show_cheapest_and_costliest(app_env):
    at = _run("galleries", gallery_system="lcnet_resnet20")
    _no_exception(at)
    assert [s.value for s in at.subheader][:2] == ["Cheapest", "Costliest"]
    assert len(at.get("plotly_chart")) == 2  # class cost, channel firing
    at.selectbox(key="gallery_class").set_value("cat").run()
    _no_exception(at)


def test_models_page_lists_checkpoints_and_papers(app_env):
    at = _run("models")
    _no_exception(at)
    assert len(at.dataframe) >= 1
    assert any("LC-Net" in str(df.value) for df in at.dataframe)


def test_budget_in_measured_latency(app_env):
    at = _run("budget", budget_system="cascade_r8_r20_r56",
              budget_metric="measured latency (batch 1)")
    _no_exception(at)
    cost = [m for m in at.metric if m.label == "Mean cost (check)"][0]
    assert cost.value.endswith(" ms")
    assert 0 < at.session_state["budget_last"]["check"]["cost_fraction"] <= 0.55

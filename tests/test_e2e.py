"""End to end in Debian's Chromium, driven by Playwright, against ``streamlit run app.py``
on localhost (fake zoo of the ``app_env`` fixture). Screenshots go to tests/artifacts/."""
from __future__ import annotations

import io
import math
import time

import pytest
import torch
from PIL import Image

from dynviz import budget, operating_points, uploads, workspace, zoo
from dynviz import policy as P
from tests.helpers import ARTIFACTS, CHROMIUM, app_variables, choose, settle

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                                 "(scripts/run.sh test installs it with apt-get as root)")]


def _no_exception(page) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0


@pytest.mark.parametrize("path, title, content", [
    ("", "Inspect", ["Prediction", "as the model sees it"]),   # opens on a validation image
    ("budget", "Budget", ["Mean cost (check)"]),
    ("galleries", "Galleries", ["Cheapest", "Costliest"]),
    ("models", "Models", ["Trained checkpoints", "The papers' figures"])])
def test_page_renders_its_content(server, page, path, title, content):
    page.goto(f"{server}/{path}")
    page.get_by_role("heading", name=title).wait_for()
    for text in content:
        page.get_by_text(text).first.wait_for()
    settle(page)
    _no_exception(page)
    page.screenshot(path=str(ARTIFACTS / f"{path or 'inspect'}.png"), full_page=True)


def test_upload_shows_the_models_answer_and_path(server, page, tmp_path, app_root,
                                                monkeypatch):
    page.goto(server)  # Inspect is the default page
    page.get_by_role("heading", name="Inspect").wait_for()
    settle(page)
    choose(page, "lcnet_resnet20")
    page.get_by_text("Upload an image").click()
    settle(page)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 160, 40)).save(buf, "PNG")
    image = tmp_path / "green.png"
    image.write_bytes(buf.getvalue())
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(image))
    page.get_by_text("Prediction").wait_for()
    page.get_by_text("blocks ran").first.wait_for()   # the compute-path diagram's title
    settle(page)
    _no_exception(page)
    # reference: the upload through the masked path of the same checkpoint, outside the app
    for var, value in app_variables(app_root).items():
        monkeypatch.setenv(var, value)
    ws = workspace.builtin()
    model = zoo.load_system(ws, "lcnet_resnet20", torch.device("cpu"))
    image = uploads.preprocess_upload(buf.getvalue(), ws.data.image_size)
    with torch.no_grad():
        out = model(ws.data.to_tensor(image[None]))
        logits, trace = out.logits, out.trace
    metrics = page.locator('[data-testid="stMetric"]')
    shown = metrics.filter(has_text="Prediction").inner_text().split("\n")
    assert shown[-1].strip() == ws.data.classes[int(logits.argmax())]
    assert f"{int(trace.macs[0]) / 1e6:.1f} M" in metrics.filter(has_text="MACs").inner_text()
    ran = int(trace.blocks_executed.sum())
    page.get_by_text(f"{ran} of {len(model.blocks)} blocks ran").first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "inspect-upload.png"), full_page=True)


def test_budget_slider_updates_the_operating_point(server, page, app_root, monkeypatch):
    for var, value in app_variables(app_root).items():
        monkeypatch.setenv(var, value)
    name = "cascade_r8_r20_r56"
    ws = workspace.builtin()
    cached = zoo.outputs(ws, name, ws.split("val"), progress=False)
    # the slider starts at the shipped ≤0.5% point's cost on fit, rounded up
    shipped = operating_points.load_policy(ws, name, 0.005)
    start = max(5, math.ceil(100 * P.simulate(shipped, cached.half("fit")).cost.mean()
                             / cached.half("fit").reference_cost))
    page.goto(f"{server}/budget")
    page.get_by_role("heading", name="Budget").wait_for()
    choose(page, name)
    metric = page.locator('[data-testid="stMetric"]').filter(has_text="Mean cost (check)")
    metric.wait_for()
    # the rerun for the chosen system has drawn its slider (the first system's may still show)
    page.wait_for_function(
        "(v) => { const t = document.querySelector('[data-testid=\"stSliderThumbValue\"]');"
        " return t && t.innerText.trim() === v; }", arg=str(start), timeout=60_000)
    settle(page)
    before = metric.inner_text()
    thumb = page.locator('[data-testid="stSliderThumbValue"]')
    first_percent = int(thumb.inner_text())
    slider = page.get_by_role("slider")
    slider.focus()
    for _ in range(30):
        page.keyboard.press("ArrowRight")
    page.wait_for_function(
        "(before) => { const m = [...document.querySelectorAll('[data-testid=\"stMetric\"]')]"
        ".find(e => e.innerText.includes('Mean cost (check)'));"
        " return m && m.innerText !== before; }",
        arg=before, timeout=60_000)

    def reference(percent: int) -> dict:   # the policy the library learns for that budget
        return budget.solve(cached.half("fit"), cached.half("check"), budget.BudgetQuery(
            shipped.family, shipped.feature, ws.spec(name).topology, percent / 100)).check

    # key presses still landing start more reruns: wait until the page shows the figures of
    # the slider's last value (or give up after a minute, and let the assertions below fail)
    deadline = time.monotonic() + 60
    while True:
        settle(page)
        percent = int(thumb.inner_text())
        expected = reference(percent)
        if f"{expected['cost_mean'] * 1e-6:.1f} M" in metric.inner_text() or \
                time.monotonic() > deadline:
            break
        page.wait_for_timeout(500)
    _no_exception(page)
    page.screenshot(path=str(ARTIFACTS / "budget-moved.png"), full_page=True)
    # it moved right (how many of the 30 key presses land while the page reruns varies with
    # the machine's load)
    assert first_percent == start < percent
    assert f"{expected['cost_mean'] * 1e-6:.1f} M" in metric.inner_text()
    shown = page.locator('[data-testid="stMetric"]').filter(has_text="Accuracy (check)")
    assert f"{expected['accuracy']:.2%}" in shown.inner_text()

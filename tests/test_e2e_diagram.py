"""The compute-path diagram in Debian's Chromium (Playwright) against ``streamlit run app.py``
on the ``app_env`` zoo: its SVG is drawn and marks the blocks / the exit the trace says.
Screenshots go to tests/artifacts/."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from dynviz import live, zoo
from tests.helpers import ARTIFACTS, CHROMIUM, choose, settle

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                                 "(scripts/run.sh test installs it with apt-get as root)")]

# the diagram's figure as the page holds it: trace names and customdata, and per trace the
# points plotly drew in the SVG
DIAGRAM_JS = """() => {
  for (const el of document.querySelectorAll('.js-plotly-plot')) {
    const title = el.layout && el.layout.title && el.layout.title.text;
    if (!title || !title.includes('Compute path')) continue;
    const drawn = [...el.querySelectorAll('.scatterlayer g.trace')].map(
        g => g.querySelectorAll('path.point').length);
    return {title, drawn, svg: !!el.querySelector('svg.main-svg'),
            traces: el.data.map(t => ({name: t.name, customdata: t.customdata || []}))};
  }
  return null;
}"""


def _diagram_of(page, server, name: str, title_part: str) -> dict:
    """Inspect on ``name``, its first validation image of the first class (the defaults)."""
    page.goto(server)
    page.get_by_role("heading", name="Inspect").wait_for()
    settle(page)
    choose(page, name)
    page.get_by_text(title_part).first.wait_for()
    settle(page)
    assert page.locator('[data-testid="stException"]').count() == 0
    page.screenshot(path=str(ARTIFACTS / f"diagram-{name}.png"), full_page=True)
    return page.evaluate(DIAGRAM_JS)


def _default_image(ws, app_env) -> np.ndarray:
    check = ws.split("check", app_env.dataset)
    return np.asarray(check.images()[np.flatnonzero(check.labels == 0)[0]])


def test_gated_diagram_shows_the_skipped_blocks(server, page, app_env, ws):
    name = "lcnet_resnet20"
    shown = _diagram_of(page, server, name, "blocks ran")
    # reference: the same image through the unfolded masked model, outside the app
    model = zoo.load_system(ws, name, torch.device("cpu"))
    with torch.no_grad():
        scores = model(ws.data.to_tensor(_default_image(ws, app_env)[None])).trace.block_scores[0]
    skipped = [n for n, s in zip(model.block_names(), scores) if s == 0]
    assert shown["svg"]
    traces = {t["name"]: t for t in shown["traces"]}
    assert [c[0] for c in traces["skipped"]["customdata"]] == skipped
    names = [t["name"] for t in shown["traces"]]
    assert shown["drawn"][names.index("skipped")] == len(skipped)          # in the SVG
    assert shown["drawn"][names.index("ran")] == len(scores) - len(skipped)
    assert f"{len(scores) - len(skipped)} of {len(scores)} blocks ran" in shown["title"]


def test_staged_diagram_shows_where_the_image_left(server, page, app_env, ws):
    name = "cascade_r8_r20_r56"
    shown = _diagram_of(page, server, name, "left at")
    # reference: the library's own inspection under the shipped ≤0.5% policy (Inspect's
    # default operating point)
    result = live.inspect_image(live.build(ws, name, calibrate=False),
                                _default_image(ws, app_env), timing_repeats=1)
    left = result.path.stage_names[result.path.exit_stage]
    assert shown["svg"]
    traces = {t["name"]: t for t in shown["traces"]}
    assert traces["left here"]["customdata"] == [[left]]
    assert f"left at {left}" in shown["title"]
    assert page.locator(".js-plotly-plot text", has_text="left here").count() == 1

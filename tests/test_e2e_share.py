"""Shareable views and click to explore, end to end in Debian's Chromium (Playwright)
against ``streamlit run app.py`` on the ``app_root`` fake zoo (fixtures: tests/conftest.py)."""
from __future__ import annotations

from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest

from dynviz import budget, data, gallery, live, operating_points, workspace, zoo
from tests.helpers import ARTIFACTS, CHROMIUM, app_variables, choose, settle

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                                 "(scripts/run.sh test installs it with apt-get as root)")]
STAGED = "exits_resnet56"
GATED = "lcnet_resnet20"


@pytest.fixture
def env_ws(app_root, monkeypatch):
    for var, value in app_variables(app_root).items():
        monkeypatch.setenv(var, value)
    return workspace.builtin()


def _no_exception(page) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0


def _thumb_is(page, value: int) -> None:
    page.wait_for_function(
        "(v) => { const t = document.querySelector('[data-testid=\"stSliderThumbValue\"]');"
        " return t && t.innerText.trim() === v; }", arg=str(value), timeout=240_000)


def _system_shown(page) -> str:
    return page.locator('[data-testid="stSelectbox"]').first.locator("input").input_value()


def _query(page) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlparse(page.url).query).items()}


def _expected_check(ws, percent: int) -> dict:
    """Reference: the policy ``learn.target_budget`` gives for the budget on fit, on check,
    of the shipped policy's kind (what the page starts with)."""
    cached = zoo.outputs(ws, STAGED, ws.split("val"), progress=False)
    shipped = operating_points.load_policy(ws, STAGED, operating_points.LOSSES[0])
    return budget.solve(cached.half("fit"), cached.half("check"), budget.BudgetQuery(
        shipped.family, shipped.feature, ws.spec(STAGED).topology, percent / 100)).check


def _mean_cost(page):
    return page.locator('[data-testid="stMetric"]').filter(has_text="Mean cost (check)")


def test_budget_link_restores_the_view(server, page, env_ws):
    page.goto(f"{server}/budget?system={STAGED}&budget=63")
    page.get_by_role("heading", name="Budget").wait_for()
    _thumb_is(page, 63)
    settle(page)
    _no_exception(page)
    assert _system_shown(page) == STAGED
    expected = _expected_check(env_ws, 63)
    assert f"{expected['cost_mean'] * 1e-6:.1f} M" in _mean_cost(page).inner_text()
    assert _query(page) == {"system": STAGED, "budget": "63"}
    assert page.locator('[data-testid="stAlert"]').count() == 0     # no note: all was used


def test_malformed_links_show_the_note(server, page, env_ws):
    page.goto(f"{server}/budget?system=nope&budget=12x")
    page.get_by_text("system='nope'").wait_for()
    page.get_by_text("budget='12x'").wait_for()
    _mean_cost(page).wait_for()                    # the default view is there under the note
    settle(page)
    _no_exception(page)
    page.goto(f"{server}/?system={GATED}&class=foo&index=zz")
    page.get_by_text("class='foo'").wait_for()
    page.get_by_text("Prediction").first.wait_for()
    settle(page)
    _no_exception(page)
    assert _query(page)["class"] == env_ws.data.classes[0]   # the default class, written back


def _inspect_reference(ws, name: str, cls: str, k: int) -> str:
    """The prediction ``live.inspect_image`` gives for the k-th check image of ``cls``."""
    split = ws.split("val")
    check = ws.split("check", split.dataset)
    members = np.flatnonzero(check.labels == ws.data.classes.index(cls))
    image = np.asarray(data.load_images(split.dataset)[check.indices[members[k]]])
    return live.inspect_image(live.build(ws, name), image).prediction


def _prediction(page) -> str:
    metric = page.locator('[data-testid="stMetric"]').filter(has_text="Prediction").first
    return metric.inner_text().split("\n")[-1].strip()


def test_inspect_link_restores_the_image(server, page, env_ws):
    page.goto(f"{server}/?system={GATED}&class=ship&index=2")
    page.get_by_text("Prediction").first.wait_for()
    settle(page)
    _no_exception(page)
    assert _system_shown(page) == GATED
    _thumb_is(page, 2)
    assert _prediction(page) == _inspect_reference(env_ws, GATED, "ship", 2)
    assert _query(page) == {"system": GATED, "class": "ship", "index": "2"}
    assert page.locator('[data-testid="stAlert"]').count() == 0


# the frontier's points in pixels of the page, by trace and point: plotly's own axes mapping
# of its decoded data (calcdata)
_POINTS_JS = """() => {
  const gd = [...document.querySelectorAll('.js-plotly-plot')]
      .find(g => g.layout && g.layout.title && String(g.layout.title.text || g.layout.title)
                 .includes('Accuracy vs cost'));
  const box = gd.querySelector('.nsewdrag').getBoundingClientRect();
  const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
  return gd.calcdata.map(t => t.map(p => [box.left + xa.c2p(p.x), box.top + ya.c2p(p.y), p.x]));
}"""


def test_click_on_the_frontier_moves_the_operating_point(server, page, env_ws):
    page.goto(f"{server}/budget?system={STAGED}&budget=90")
    _thumb_is(page, 90)
    page.get_by_text("Accuracy vs cost").first.wait_for()
    settle(page)
    traces = page.evaluate(_POINTS_JS)
    # reference: the learned curve of the library (MACs, the shipped policy's kind)
    ws = env_ws
    cached = zoo.outputs(ws, STAGED, ws.split("val"), progress=False)
    shipped = operating_points.load_policy(ws, STAGED, operating_points.LOSSES[0])
    curve = budget.curves(cached.half("fit"), cached.half("check"), budget.BudgetQuery(
        shipped.family, shipped.feature, ws.spec(STAGED).topology)).learned
    assert np.allclose([x for _, _, x in traces[0]], curve[0])
    # the learned point farthest (on screen) from every other point, with a budget unlike 90
    others = [(px, py) for t in traces for px, py, _ in t]

    def room(i):
        px, py, _ = traces[0][i]
        return min(np.hypot(px - qx, py - qy) for qx, qy in others if (qx, qy) != (px, py))

    candidates = [i for i in range(len(curve[0])) if budget.whole_percent(curve[0][i]) < 80]
    i = max(candidates, key=room)
    percent = budget.whole_percent(curve[0][i])
    expected = _expected_check(ws, percent)
    px, py, _ = traces[0][i]
    page.mouse.click(px, py)
    _thumb_is(page, percent)
    page.wait_for_function(
        "(v) => [...document.querySelectorAll('[data-testid=\"stMetric\"]')]"
        ".some(e => e.innerText.includes('Mean cost (check)') && e.innerText.includes(v))",
        arg=f"{expected['cost_mean'] * 1e-6:.1f} M", timeout=240_000)
    settle(page)
    _no_exception(page)
    accuracy = page.locator('[data-testid="stMetric"]').filter(has_text="Accuracy (check)")
    assert f"{expected['accuracy']:.2%}" in accuracy.inner_text()
    assert _query(page) == {"system": STAGED, "budget": str(percent)}
    page.screenshot(path=str(ARTIFACTS / "budget-clicked.png"), full_page=True)


def test_gallery_click_opens_the_images_path(server, page, env_ws):
    ws = env_ws
    page.goto(f"{server}/galleries")
    page.get_by_text("Cheapest").first.wait_for()
    settle(page)
    if _system_shown(page) != GATED:
        choose(page, GATED)
    # reference: the cheapest image as the library ranks it, through live.inspect_image
    split = ws.split("val")
    cached = zoo.outputs(ws, GATED, split, progress=False)
    cost, _, _ = gallery.per_image_cost(ws, GATED, cached)
    first = int(np.argsort(cost, kind="stable")[0])
    image = np.asarray(data.load_images(split.dataset)[split.indices[first]])
    expected = live.inspect_image(live.build(ws, GATED), image)
    page.get_by_role("button", name="Path").first.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text(f"validation image {first} ").wait_for()
    dialog.get_by_text("Prediction").wait_for()
    settle(page)
    _no_exception(page)
    shown = dialog.locator('[data-testid="stMetric"]').filter(has_text="Prediction")
    assert shown.inner_text().split("\n")[-1].strip() == expected.prediction
    ran = expected.path.summary()
    dialog.get_by_text(f"Compute path: {ran['blocks_executed']} of {ran['blocks']} blocks ran"
                       ).first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "gallery-path.png"), full_page=True)

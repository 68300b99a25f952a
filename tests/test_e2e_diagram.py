"""The compute-path diagram in Debian's Chromium (Playwright) against ``streamlit run app.py``
on the ``app_env`` zoo: its SVG is drawn and marks the blocks / the exit the trace says.

The server, browser and page fixtures repeat test_e2e.py's (test files import nothing from
one another); screenshots go to tests/artifacts/."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch

from dynviz import live, settings, zoo
from tests.helpers import app_variables

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = settings.PROJECT_ROOT / "tests" / "artifacts"
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(app_root):
    port = _free_port()
    env = dict(os.environ) | app_variables(app_root)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = open(ARTIFACTS / "streamlit-diagram.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
         "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false",
         "--server.address", "127.0.0.1", "--server.port", str(port)],
        cwd=settings.PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("streamlit did not start; see tests/artifacts/streamlit-diagram.log")
    yield url
    proc.terminate()
    proc.wait(timeout=20)
    log.close()


@pytest.fixture(scope="module")
def page(app_root):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(90_000)
        yield pg
        browser.close()


def _settle(page) -> None:
    page.wait_for_selector('[data-testid="stApp"]')
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=90_000)


def _diagram_of(page, server, name: str, title_part: str) -> dict:
    """Inspect on ``name``, its first validation image of the first class (the defaults)."""
    page.goto(server)
    page.get_by_role("heading", name="Inspect").wait_for()
    _settle(page)
    page.locator('[data-testid="stSelectbox"]').first.click()
    page.get_by_role("option", name=name).click()
    _settle(page)
    page.get_by_text(title_part).first.wait_for()
    _settle(page)
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

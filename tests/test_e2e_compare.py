"""Inspect's two tables in Debian's Chromium (Playwright) against ``streamlit run app.py`` on
the ``app_root`` zoo: "Compare systems" and a multi-file upload (fixtures: tests/conftest.py)."""
from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from dynviz import workspace, zoo
from tests.helpers import ARTIFACTS, CHROMIUM, app_variables, choose, settle

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                                 "(scripts/run.sh test installs it with apt-get as root)")]


def _table(page, which: int = 0) -> list[list[str]]:
    """The cells of a st.dataframe, row by row, from the grid's accessible table (the
    canvas draws them; glide-data-grid mirrors the visible ones as role=gridcell)."""
    grid = page.locator('[data-testid="stDataFrame"]').nth(which)
    grid.wait_for()
    grid.locator('[role="gridcell"]').first.wait_for(state="attached")   # mirrored late
    rows = grid.locator('[role="row"]')
    cells = [[c.inner_text().strip() for c in row.locator('[role="gridcell"]').all()]
             for row in rows.all()]
    return [r for r in cells if r]


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buf, "PNG")
    return buf.getvalue()


def _predict(app_root, monkeypatch, capsys, system: str, files) -> list[str]:
    """What ``python -m dynviz predict`` says for each file (the zoo's environment)."""
    from dynviz.cli import main

    for var, value in app_variables(app_root).items():
        monkeypatch.setenv(var, value)
    capsys.readouterr()
    assert main(["predict", system, *map(str, files)]) == 0
    return [json.loads(line)["prediction"] for line in capsys.readouterr().out.splitlines()]


def test_compare_shows_one_row_per_system_with_predicts_answer(server, page, tmp_path,
                                                               app_root, monkeypatch, capsys):
    page.goto(server)
    page.get_by_role("heading", name="Inspect").wait_for()
    settle(page)
    page.get_by_text("Upload an image").click()
    settle(page)
    image = tmp_path / "orange.png"
    image.write_bytes(_png((230, 140, 20)))
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(image))
    page.get_by_text("Prediction").wait_for()
    settle(page)
    page.get_by_text("Compare systems").click()
    page.locator('[data-testid="stDataFrame"]').wait_for()
    settle(page)
    assert page.locator('[data-testid="stException"]').count() == 0
    page.screenshot(path=str(ARTIFACTS / "inspect-compare.png"), full_page=True)
    page.locator('[data-testid="stDataFrame"]').screenshot(
        path=str(ARTIFACTS / "inspect-compare-table.png"))
    rows = _table(page)
    for var, value in app_variables(app_root).items():
        monkeypatch.setenv(var, value)
    names = zoo.available(workspace.builtin())
    assert [r[0] for r in rows] == names
    said = {name: _predict(app_root, monkeypatch, capsys, name, [image])[0] for name in names}
    assert [r[2] for r in rows] == [said[name] for name in names]


def test_multi_upload_warns_about_the_bad_file_and_tables_the_others(server, page, tmp_path,
                                                                     app_root, monkeypatch,
                                                                     capsys):
    page.goto(server)
    page.get_by_role("heading", name="Inspect").wait_for()
    settle(page)
    choose(page, "lcnet_resnet20")
    page.get_by_text("Upload an image").click()
    settle(page)
    files = [tmp_path / "red.png", tmp_path / "notes.jpg", tmp_path / "blue.png"]
    files[0].write_bytes(_png((200, 30, 30)))
    files[1].write_bytes(b"this is text, not a picture")
    files[2].write_bytes(_png((20, 40, 220)))
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(
        [str(f) for f in files])
    page.locator('[data-testid="stDataFrame"]').wait_for()
    settle(page)
    assert page.locator('[data-testid="stException"]').count() == 0
    warnings = page.locator('[data-testid="stAlertContentWarning"]')
    assert warnings.count() == 1 and "notes.jpg" in warnings.inner_text()
    page.screenshot(path=str(ARTIFACTS / "inspect-batch.png"), full_page=True)
    rows = _table(page)
    good = [files[0], files[2]]
    assert [r[0] for r in rows] == [f.name for f in good]
    assert [r[1] for r in rows] == _predict(app_root, monkeypatch, capsys, "lcnet_resnet20",
                                            good)
    # selecting a row shows that image in full below the table
    grid = page.locator('[data-testid="stDataFrame"]').first
    box = grid.bounding_box()
    row_height = 35   # streamlit's default row (and header) height, px
    page.mouse.click(box["x"] + 12, box["y"] + row_height + row_height * 1.5)   # blue.png
    page.get_by_role("heading", name="blue.png").wait_for()
    settle(page)
    shown = page.locator('[data-testid="stMetric"]').filter(has_text="Prediction")
    assert shown.inner_text().split("\n")[-1].strip() == rows[1][1]
    page.locator(".gtitle").filter(has_text="blocks ran").first.wait_for()   # its diagram
    page.screenshot(path=str(ARTIFACTS / "inspect-batch-selected.png"), full_page=True)

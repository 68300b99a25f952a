"""Draws the README's compute-path picture (docs/images/diagram.png): the diagram Inspect
shows for one picture through a system, screenshotted in Chromium.

The picture is generated here (a red disc on a blue-green gradient), so the repository holds
no dataset image. The figure is the app's own (``live.path_diagram``), written to a page with
plotly's bundled JavaScript; nothing is fetched.

    python scripts/readme_diagram.py                          # lcnet_resnet56_seq
    python scripts/readme_diagram.py --system exits_resnet56 --out /tmp/exits.png
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from dynviz import live, settings, workspace

WIDTH = 840      # px, about the width of Inspect's main column


def picture(size: int) -> np.ndarray:
    """(size, size, 3) uint8: a red disc left of centre on a blue-to-green gradient."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    image = np.stack([0.15 + 0.1 * x, 0.35 + 0.4 * y, 0.8 - 0.4 * y], axis=-1)
    disc = (x - 0.42) ** 2 + (y - 0.5) ** 2 < 0.22 ** 2
    image[disc] = (0.85, 0.12, 0.1)
    return (255 * image).round().astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--system", default="lcnet_resnet56_seq",
                        help="a system of the built-in workspace (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=settings.PROJECT_ROOT / "docs" / "images"
                        / "diagram.png", help="the PNG to write (default: %(default)s)")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("error: Debian's chromium is not installed (scripts/run.sh test installs it)",
              file=sys.stderr)
        return 1
    from playwright.sync_api import sync_playwright

    ws = workspace.builtin()
    system = live.build(ws, args.system, calibrate=False)
    result = live.inspect_image(system, picture(ws.data.image_size), timing_repeats=1)
    figure = live.path_diagram(system, result)
    figure.update_layout(width=WIDTH)
    with tempfile.TemporaryDirectory() as tmp:
        page_file = Path(tmp) / "diagram.html"
        figure.write_html(page_file, include_plotlyjs=True, full_html=True,
                          config={"displayModeBar": False})
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium)
            page = browser.new_page(viewport={"width": WIDTH + 40, "height": 600})
            page.goto(page_file.as_uri())
            page.locator(".js-plotly-plot .main-svg").first.wait_for()
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.locator(".js-plotly-plot").first.screenshot(path=str(args.out))
            browser.close()
    print(f"{args.out}: {figure.layout.title.text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

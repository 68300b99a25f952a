"""App performance benchmark (server time), a script rather than a test:

    .venv/bin/python scripts/bench_app.py [--system NAME] [--staged NAME] [--repeats N]

- Inspect: upload → rendered result (a full run of the page script with a new upload);
- Budget: one slider move (refit on fit + evaluate on check + figures, inside the fragment);
- cold start: ``streamlit run app.py`` until the first page has rendered.

Warm figures use Streamlit's AppTest in this process (what the server executes per rerun,
without the browser's paint); the cold start launches a real server and, when Debian's
chromium is present, waits in the browser for the page title.
"""
from __future__ import annotations

import argparse
import io
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dynviz import workspace, zoo  # noqa: E402


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 40 + seed).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def bench_inspect(system: str, repeats: int) -> list[float]:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "dynviz/ui/inspect_page.py"), default_timeout=300)
    at.session_state["inspect_system"] = system
    at.session_state["inspect_source"] = "Upload an image"   # the page opens on a val image
    at.run()
    at.file_uploader(key="inspect_upload").set_value(("warm.png", _png(0), "image/png")).run()
    times = []
    for i in range(repeats):
        upload = at.file_uploader(key="inspect_upload").set_value(
            (f"img{i}.png", _png(i + 1), "image/png"))
        start = time.perf_counter()
        upload.run()
        times.append(time.perf_counter() - start)
        assert not at.exception, [e.value for e in at.exception]
    return times


def bench_budget(system: str, repeats: int) -> list[float]:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "dynviz/ui/budget_page.py"), default_timeout=300)
    at.session_state["budget_system"] = system
    at.run()
    times = []
    for i in range(repeats):
        slider = at.slider(key="budget_slider").set_value(20 + (i * 7) % 70)
        start = time.perf_counter()
        slider.run()
        times.append(time.perf_counter() - start)
        assert not at.exception, [e.value for e in at.exception]
    return times


def bench_cold_start() -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py",
                             "--server.headless", "true", "--server.fileWatcherType", "none",
                             "--browser.gatherUsageStats", "false", "--server.port", str(port),
                             "--server.address", "127.0.0.1"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        chromium = shutil.which("chromium")
        if chromium:
            from playwright.sync_api import sync_playwright
            while True:
                try:
                    urllib.request.urlopen(f"{url}/_stcore/health", timeout=1)
                    break
                except OSError:
                    time.sleep(0.05)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium, headless=True, args=[
                    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run"])
                page = browser.new_page()
                page.goto(url)
                page.get_by_role("heading", name="Inspect").wait_for(timeout=120_000)
                elapsed = time.perf_counter() - start
                browser.close()
                return elapsed
        while True:
            try:
                urllib.request.urlopen(f"{url}/_stcore/health", timeout=1)
                return time.perf_counter() - start
            except OSError:
                time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ws = workspace.builtin()
    available = zoo.available(ws)
    parser.add_argument("--system", nargs="+", default=[n for n in ("lcnet_resnet56_seq",
                        "lcnet_resnet20", "cascade_r8_r20_r56", "exits_resnet56")
                        if n in available][:2] or None,
                        help="systems for Inspect (default: a gated one and a staged one)")
    parser.add_argument("--staged", default=next((n for n in ("cascade_r8_r20_r56",
                        "exits_resnet56") if n in available), None),
                        help="system for Budget (default: the cascade)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if args.system is None or args.staged is None:
        print("needs trained systems: " + ", ".join(
            f"{n} ({zoo.missing(ws, n)[0].fix(ws)})" for n in ws.systems
            if zoo.missing(ws, n)), file=sys.stderr)
        return 1
    rows = [("cold start to first rendered page", [bench_cold_start()])]
    rows += [(f"Inspect upload → result ({name})", bench_inspect(name, args.repeats))
             for name in args.system]
    rows.append((f"Budget slider move ({args.staged})", bench_budget(args.staged, args.repeats)))
    print("| what | median ms | max ms |\n|---|---|---|")
    for name, times in rows:
        print(f"| {name} | {statistics.median(times) * 1e3:.0f} | {max(times) * 1e3:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

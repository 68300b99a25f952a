"""Load benchmark (a script, not a test): N browser sessions use one app server at once.

    .venv/bin/python scripts/load_test.py [--sessions 8] [--rounds 3] [--system NAME]

Each session, in its own browser context, uploads images on Inspect one after another (a
different generated image per session and round) and waits until the page shows that
image's answer, then moves the Budget slider and waits until the figures change. It reports
p50/p95 of both latencies, the errors, how many answers shown were another image's than the
session's own (checked against the library's answer for each image, computed here), and the
server's resident memory before, after every round, and at the end.

Every session's pages run on the server's cores, so the latencies measure the server under
N users, not one page alone.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dynviz import live, uploads, workspace, zoo  # noqa: E402

STATUS = '[data-testid="stStatusWidget"]'
METRIC = '[data-testid="stMetric"]'
TIMEOUT_MS = 180_000


def _image(session: int, round_: int) -> bytes:
    """A PNG of its own for every (session, round): coloured noise over a gradient."""
    rng = np.random.default_rng(1000 * session + round_)
    base = rng.integers(0, 256, 3)
    ramp = np.linspace(0, 1, 48)[None, :, None] * rng.integers(-120, 120, 3)
    pixels = np.clip(base + ramp + rng.normal(0, 30, (48, 48, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _rss_mb(pid: int) -> float:
    """Resident memory of a process and its children, in MB (Linux /proc)."""
    total = 0
    for p in [pid] + _children(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def _children(pid: int) -> list[int]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    out = [int(k) for k in kids]
    return out + [g for k in out for g in _children(k)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _settled(page) -> None:
    await page.wait_for_function(f"() => !document.querySelector('{STATUS}')",
                                 timeout=TIMEOUT_MS)


async def _metric(page, label: str) -> str:
    return await page.locator(METRIC).filter(has_text=label).first.inner_text()


async def session(browser, url: str, index: int, rounds: int, expected: dict, out: dict,
                  tmp: Path) -> None:
    context = await browser.new_context(viewport={"width": 1300, "height": 900})
    page = await context.new_page()
    try:
        await page.goto(url)
        await page.get_by_role("heading", name="Inspect").wait_for(timeout=TIMEOUT_MS)
        await _settled(page)
        await page.get_by_text("Upload an image").click()
        await _settled(page)
        for r in range(rounds):
            path = tmp / f"s{index}-r{r}.png"
            path.write_bytes(_image(index, r))
            want = expected[index, r]
            start = time.perf_counter()
            await page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(
                str(path))
            # done when this image's answer is shown and no run is going on
            deadline = time.perf_counter() + TIMEOUT_MS / 1e3
            while True:
                macs = re.search(r"[\d.]+ M", await _metric(page, "MACs"))
                shown = (await _metric(page, "Prediction")).split("\n")[-1].strip(), \
                    macs.group(0) if macs else ""
                running = await page.locator(STATUS).count()
                if shown == want and not running:
                    out["upload_s"].append(time.perf_counter() - start)
                    break
                if time.perf_counter() > deadline:
                    out["wrong"].append((index, r, shown, want))
                    break
                await page.wait_for_timeout(50)
            if await page.locator('[data-testid="stException"]').count():
                out["errors"].append((index, r, "exception on Inspect"))
        await page.goto(f"{url}/budget")
        # every move re-learns the policy and shows how long that took: the one figure that
        # changes even when two budgets give the same policy
        metric = page.locator(METRIC).filter(has_text="Refit")
        await metric.wait_for(timeout=TIMEOUT_MS)
        await _settled(page)
        for r in range(rounds):
            before = await metric.inner_text()
            slider = page.get_by_role("slider")
            await slider.focus()
            start = time.perf_counter()
            await page.keyboard.press("ArrowLeft" if r % 2 else "ArrowRight")
            await page.wait_for_function(
                "(b) => { const m = [...document.querySelectorAll('" + METRIC + "')]"
                ".find(e => e.innerText.includes('Refit'));"
                " return m && m.innerText !== b; }", arg=before, timeout=TIMEOUT_MS)
            out["slider_s"].append(time.perf_counter() - start)
            await _settled(page)
            if await page.locator('[data-testid="stException"]').count():
                out["errors"].append((index, r, "exception on Budget"))
    except Exception as err:           # a session that broke: counted, the others go on
        out["errors"].append((index, -1, f"{type(err).__name__}: {err}"[:200]))
    finally:
        await context.close()


async def run_all(url: str, sessions: int, rounds: int, expected: dict, pid: int,
                  tmp: Path) -> dict:
    from playwright.async_api import async_playwright

    out = {"upload_s": [], "slider_s": [], "wrong": [], "errors": [], "rss_mb": []}
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update",
            "--disable-sync"])
        out["rss_mb"].append(_rss_mb(pid))
        await asyncio.gather(*(session(browser, url, i, rounds, expected, out, tmp)
                               for i in range(sessions)))
        out["rss_mb"].append(_rss_mb(pid))
        await browser.close()
    return out


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> int:
    ws = workspace.builtin()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=8, help="browser sessions at once")
    parser.add_argument("--rounds", type=int, default=3,
                        help="uploads and slider moves per session (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every session this many times against the same server, "
                             "reporting its memory after each (default %(default)s)")
    parser.add_argument("--system", default=ws.featured,
                        help="the system Inspect opens on (default %(default)s); its answers "
                             "are the reference")
    args = parser.parse_args()
    if not shutil.which("chromium"):
        print("needs Debian's chromium (apt-get install chromium)", file=sys.stderr)
        return 1
    missing = zoo.missing(ws, args.system)
    if missing:
        print(f"{args.system} is not ready: {missing[0].fix(ws)}", file=sys.stderr)
        return 1
    print(f"reference answers ({args.system}, in this process)…", file=sys.stderr)
    system = live.build(ws, args.system)
    expected = {}
    for i in range(args.sessions):
        for r in range(args.rounds):
            image = uploads.preprocess_upload(_image(i, r), ws.data.image_size)
            result = live.inspect_image(system, image, timing_repeats=1)
            expected[i, r] = (result.prediction, f"{result.macs / 1e6:.1f} M")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    tmp = ROOT / ".cache" / "load-test"
    tmp.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
         "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false",
         "--server.address", "127.0.0.1", "--server.port", str(port)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    try:
        while True:
            try:
                urllib.request.urlopen(f"{url}/_stcore/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        totals = {"upload_s": [], "slider_s": [], "wrong": [], "errors": []}
        memory = [_rss_mb(server.pid)]
        for k in range(args.repeat):
            out = asyncio.run(run_all(url, args.sessions, args.rounds, expected, server.pid,
                                      tmp))
            for key in totals:
                totals[key] += out[key]
            memory.append(out["rss_mb"][-1])
            print(f"pass {k + 1}/{args.repeat}: server {memory[-1]:.0f} MB", file=sys.stderr)
    finally:
        server.terminate()
        server.wait(timeout=30)
    n_uploads = args.sessions * args.rounds * args.repeat
    print(f"{args.sessions} sessions × {args.rounds} rounds × {args.repeat} passes "
          f"({n_uploads} uploads and as many slider moves), system {args.system}\n")
    print("| what | n | p50 s | p95 s | max s |\n|---|---|---|---|---|")
    for name, key in (("upload → its answer shown", "upload_s"),
                      ("slider move → figures changed", "slider_s")):
        v = totals[key]
        print(f"| {name} | {len(v)} | {_percentile(v, 50):.2f} | {_percentile(v, 95):.2f} | "
              f"{max(v, default=float('nan')):.2f} |")
    print(f"\nerrors: {len(totals['errors'])}  answers not the session's own: "
          f"{len(totals['wrong'])}")
    for item in (totals["errors"] + totals["wrong"])[:10]:
        print(f"  {item}")
    print("server memory (MB): " + " → ".join(f"{m:.0f}" for m in memory))
    return 0 if not totals["errors"] and not totals["wrong"] else 1


if __name__ == "__main__":
    sys.exit(main())

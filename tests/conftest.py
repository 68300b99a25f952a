"""Fixtures: seeded RNG, temporary caches, synthetic CIFAR-10 roots and a synthetic zoo.
Plain helpers live in tests/helpers.py."""
from __future__ import annotations

import os

import pytest
import torch

from dynviz import data, settings, workspace
from tests.helpers import (ARTIFACTS, BROWSER_WAIT_MS, CHROMIUM, app_variables, fake_outputs,
                           make_imagefolder, write_random_checkpoints)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    """Caches go to a temporary directory for the test."""
    monkeypatch.setenv("DYNVIZ_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def tiny_split(tmp_path, cache_env):
    """30 random images (3 per class) as a ``test`` split."""
    root = make_imagefolder(tmp_path / "tiny", per_class=3)
    return data.test_split(root, workspace.builtin().data)


@pytest.fixture(scope="session")
def small_cifar(tmp_path_factory):
    """A synthetic CIFAR-10 root with 510 images per class (the split needs > 500)."""
    root = tmp_path_factory.mktemp("cifar")
    make_imagefolder(root / "train", per_class=510)
    return root


@pytest.fixture(scope="session")
def real_cifar():
    try:
        return workspace.builtin().dataset()
    except data.DatasetNotFoundError as err:
        pytest.skip(f"CIFAR-10 not present: {err}")


TRAINED = ("resnet8", "resnet20", "resnet56", "lcnet_resnet20", "exits_resnet56")


@pytest.fixture(scope="session")
def app_root(tmp_path_factory):
    """A synthetic CIFAR-10 (502 images per class), random-weight checkpoints of the default
    systems, their cached outputs and shipped policies, under one temporary directory
    (``app_variables`` names it to dynviz)."""
    from dynviz import cache, operating_points, zoo

    root = tmp_path_factory.mktemp("appzoo")
    with pytest.MonkeyPatch.context() as mp:
        for var, value in app_variables(root).items():
            mp.setenv(var, value)
        make_imagefolder(root / "cifar" / "train", per_class=502, size=32)
        write_random_checkpoints(root / "ckpt", {name: name for name in TRAINED})
        ws = workspace.builtin()
        val = ws.split("val")
        for name in zoo.available(ws):
            model = zoo.load_system(ws, name)
            if ws.spec(name).kind == "gated":    # cheap enough to run for real (gate scores)
                zoo.outputs(ws, name, val, model=model, progress=False)
            else:                                # the rest: answers of growing accuracy
                sha = zoo.checkpoint_sha(ws, name)
                cache.store(cache.directory_for(ws, name, val, sha), name, model, val, sha,
                            fake_outputs(model, val.labels, seed=len(name)))
        operating_points.ship(ws, val=val)
    return root


@pytest.fixture
def app_env(app_root, monkeypatch):
    """The ``app_root`` zoo for one test; yields its validation split."""
    for var, value in app_variables(app_root).items():
        monkeypatch.setenv(var, value)
    return workspace.builtin().split("val")


@pytest.fixture
def ws():
    """The built-in workspace as the environment (set by the other fixtures) redirects it."""
    return workspace.builtin()


@pytest.fixture
def fresh_caches():
    """Empty the app's caches around a test that redirects the built-in workspace's
    directories (the app resolves it once per process, and keys models by its root, which
    stays)."""
    import streamlit as st

    st.cache_resource.clear()
    st.cache_data.clear()
    yield
    st.cache_resource.clear()
    st.cache_data.clear()


# ---------------------------------------------------------------------------- browser tests
@pytest.fixture(scope="module")
def server(app_root, request):
    """``streamlit run app.py`` on localhost over the ``app_root`` zoo, one per test module;
    its log goes to tests/artifacts/streamlit-<module>.log."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ) | app_variables(app_root)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log_path = ARTIFACTS / f"streamlit-{request.module.__name__.split('.')[-1]}.log"
    log = open(log_path, "w")
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
        pytest.fail(f"streamlit did not start; see {log_path}")
    yield url
    proc.terminate()
    proc.wait(timeout=20)
    log.close()


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium through Playwright (``executable_path``), headless."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1400})
    pg = context.new_page()
    pg.set_default_timeout(BROWSER_WAIT_MS)
    yield pg
    context.close()

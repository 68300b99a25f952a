"""Helpers shared by the tests: random models, inputs, FLOP counting, synthetic datasets
and zoos. Fixtures built on them live in conftest.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from dynviz import settings
from dynviz.policy import StageOutputs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = settings.PROJECT_ROOT / "tests" / "artifacts"     # screenshots and server logs
BROWSER_WAIT_MS = 240_000    # a live model calibrates first; slow on a loaded machine

INSTALL_HINT = ("dynviz must be installed from this checkout into the venv: scripts/run.sh "
                "does it (pip install --no-deps --no-build-isolation -e .)")


def model_input(model: nn.Module, batch: int, size: int | None = None, seed: int = 0):
    """(B, 3, S, S) standard-normal images; S: 64 for ImageNet-stem models, else 32."""
    cfg = getattr(model, "cfg", None)
    size = size or (64 if cfg is not None and cfg.stem == "imagenet" else 32)
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _onednn_conv_flop(x_shape, w_shape, _bias, _padding, _stride, _dilation, _groups, *args,
                      out_shape=None, **kwargs) -> int:
    return conv_flop_count(x_shape, w_shape, out_shape)


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, also counting the oneDNN convolution that large inference convs
    call directly (``dynviz.runtime.folded.conv2d``), with torch's own convolution formula."""
    return FlopCounterMode(display=False,
                           custom_mapping={torch.ops.aten.mkldnn_convolution: _onednn_conv_flop})


def flops_macs(fn) -> int:
    with flop_counter() as counter:
        fn()
    return counter.get_total_flops() // 2


def randomize(model: nn.Module, seed: int = 0, open_fraction: float = 0.5) -> nn.Module:
    """Random BN statistics and random gates: about ``open_fraction`` of block and channel
    scores > 0, some of them strictly between 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        for block in getattr(model, "blocks", []):
            # residual branches small against the identity, as in a trained ResNet: keeps
            # a 110-layer random network's activations O(1) in float32
            last_bn = getattr(block, "bn3", block.bn2)
            last_bn.weight.mul_(0.2)
        for name, m in model.named_modules():
            if name.endswith("_gate.fc"):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 2 / m.in_features**0.5)
                # bias b: P(score > 0) ~ open_fraction for a unit-variance pre-activation
                shift = torch.distributions.Normal(0, 1).icdf(torch.tensor(1 - open_fraction))
                m.bias.fill_(-float(shift))
    return model


def make_imagefolder(root, per_class: int, size: int = 32, seed: int = 0, fmt: str = "PNG",
                     classes: tuple[str, ...] | None = None):
    """An ImageFolder of random images: root/<class>/<NNNN>.png (default: CIFAR-10's
    classes, as the built-in workspace names them)."""
    from dynviz import workspace

    rng = np.random.default_rng(seed)
    for name in classes or workspace.builtin().data.classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:04d}.png", fmt)
    return root


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)                  # a JSON string is a TOML basic string
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


def workspace_toml(classes, image_size: int, systems: dict[str, dict], *, root="images",
                   reference: str | None = None, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                   extra: str = "", **data) -> str:
    """A workspace's dynviz.toml as one writes it by hand: ``reference``, the [data] table
    (``data``: further keys, e.g. ``val_fraction``), one [systems.NAME] table per entry of
    ``systems`` (its keys as written in the file), then ``extra`` (e.g. [recipes.*]
    tables). One ``key = value`` a line, lists as ``["a", "b"]``."""
    lines = [f"reference = {_toml_value(reference)}"] if reference is not None else []
    table = {"root": root, "classes": list(classes), "image_size": image_size,
             "mean": list(mean), "std": list(std), **data}
    lines += ["", "[data]", *(f"{k} = {_toml_value(v)}" for k, v in table.items())]
    for name, keys in systems.items():
        lines += ["", f"[systems.{name}]", *(f"{k} = {_toml_value(v)}" for k, v in keys.items())]
    return "\n".join(lines) + "\n" + extra


def write_random_checkpoints(directory, checkpoints: dict[str, str]) -> None:
    """``checkpoints``: name -> architecture. Random BN statistics and gates, and classifier
    heads confident enough that policies have something to choose between."""
    import models

    directory.mkdir(parents=True)
    for i, (name, arch) in enumerate(checkpoints.items()):
        torch.manual_seed(i)
        model = randomize(models.create(arch).eval(), seed=i)
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.out_features == 10:
                torch.nn.init.normal_(m.weight, std=2 / m.in_features**0.5)
        torch.save(model.state_dict(), directory / f"{name}.pt")


def app_variables(root) -> dict[str, str]:
    return {"DYNVIZ_DATA": str(root / "cifar"), "DYNVIZ_CHECKPOINTS": str(root / "ckpt"),
            "DYNVIZ_CACHE": str(root / "cache"), "DYNVIZ_ASSETS": str(root / "assets"),
            "DYNVIZ_DEVICE": "cpu"}


def fake_outputs(model, labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Per-stage logits whose accuracy and confidence grow with the stage, and the
    model's own static MACs per stage."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    k = model.n_stages
    difficulty = rng.random(n)
    logits = rng.normal(0, 1, (n, k, 10))
    for stage in range(k):
        knows = difficulty < 0.5 + 0.45 * (stage + 1) / k
        logits[np.arange(n), stage, labels] += np.where(knows, 2.5 + 3 * rng.random(n), 0.0)
    macs = np.tile(np.array(model.stage_macs()), (n, 1))
    out = {"logits": logits.astype(np.float32), "stage_macs": macs}
    if k > 1 and model.can_jump:
        out["jump_macs"] = macs[:, -1].copy()
    return out


def synthetic_outputs(n: int = 600, k: int = 3, classes: int = 10, seed: int = 0,
                      jump: bool = False) -> StageOutputs:
    """Cached outputs of a K-stage system: stages of growing accuracy and cost, confidence
    tracking correctness, as in real nets."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    difficulty = rng.random(n)
    logits = rng.normal(0, 1, (n, k, classes))
    for stage in range(k):
        skill = 0.45 + 0.5 * (stage + 1) / k                      # later stages see more
        knows = difficulty < skill
        logits[np.arange(n), stage, labels] += np.where(knows, 3.0 + 2 * rng.random(n), 0.0)
    costs = np.tile(np.array([1.0, 2.0, 4.0, 8.0][:k]), (n, 1))
    costs *= rng.uniform(0.9, 1.1, (n, k))                        # per-image variation
    jump_costs = costs[:, -1] * 1.2 if jump else None
    return StageOutputs(logits.astype(np.float32), labels, costs, jump_costs)


def colour_images(n: int, seed: int = 0) -> np.ndarray:
    """(N, 32, 32, 3) uint8 noise, each image with a colour cast of its own."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 1, 1, 3))                     # per-image colour cast
    noise = rng.integers(-60, 60, (n, 32, 32, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def confident_system(name: str, **kw):
    """A registry model with random BN statistics and confident, varied classifier heads."""
    import models

    torch.manual_seed(0)                                          # the builders' init
    system = models.create(name, **kw).eval()
    for i, module in enumerate(system.modules()):
        if isinstance(module, torch.nn.Linear):                  # confident, varied heads
            torch.nn.init.normal_(module.weight, std=1.5 / module.in_features**0.5,
                                  generator=torch.Generator().manual_seed(i))
    return randomize(system, seed=11)


def stage_outputs_of(system, x) -> StageOutputs:
    """Every stage of ``system`` on ``x`` as cached outputs; the last stage is mostly right."""
    with torch.no_grad():
        out = system(x)
    logits, macs = out.stage_logits, out.stage_macs
    # a cascade's trace: what its last network costs on its own (a jump's cost)
    jump = out.trace.jump_macs.numpy().astype(float) if system.can_jump else None
    labels = logits[:, -1].argmax(1).numpy()                     # the last stage is "right"
    labels[::7] = (labels[::7] + 1) % 10                          # ... mostly
    return StageOutputs(logits.numpy(), labels, macs.numpy().astype(float), jump)


def run_outside(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``args`` run in ``cwd``, outside the repository, without PYTHONPATH: whatever they
    import of dynviz comes from the venv's install, not from the source tree."""
    assert not cwd.resolve().is_relative_to(settings.PROJECT_ROOT), cwd
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def run_page(page: str, **state):
    """One of the app's pages (``inspect``, ``budget``, ``galleries``, ``models``) run
    through Streamlit's AppTest, with ``state`` set in its session first."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(settings.PROJECT_ROOT / "dynviz" / "ui" / f"{page}_page.py"),
                           default_timeout=120)
    for key, value in state.items():
        at.session_state[key] = value
    return at.run()


def settle(page) -> None:
    """Wait until Streamlit has finished the current run of the page (Playwright)."""
    page.wait_for_selector('[data-testid="stApp"]')
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')",
        timeout=BROWSER_WAIT_MS)


def choose(page, option: str, box: int = 0, attempts: int = 4) -> None:
    """Pick ``option`` in the page's ``box``-th selectbox and wait for the rerun (Playwright).

    A click that lands while Streamlit is still redrawing the page can open a list that the
    redraw closes again, so the click is retried until the option shows."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    for attempt in range(attempts):
        settle(page)
        page.locator('[data-testid="stSelectbox"]').nth(box).click()
        try:
            page.get_by_role("option", name=option, exact=True).click(timeout=15_000)
            break
        except PlaywrightTimeout:
            if attempt == attempts - 1:
                raise
            page.keyboard.press("Escape")
    settle(page)


def sketch_marks(sketch: str) -> dict[str, list[str]]:
    """What a path sketch (SVG, or its data URL) marks: the ``data-block`` / ``data-stage``
    names by class (``ran``, ``skipped``, ``reached``, ``not-reached``, ``left``)."""
    import base64
    import xml.etree.ElementTree as ET

    if sketch.startswith("data:"):
        head, _, body = sketch.partition(",")
        assert head == "data:image/svg+xml;base64", head
        sketch = base64.b64decode(body).decode()
    marks: dict[str, list[str]] = {}
    for el in ET.fromstring(sketch).iter():
        name = el.get("data-block") or el.get("data-stage")
        if name is not None:
            marks.setdefault(el.get("class"), []).append(name)
    return marks

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dynviz import data
from dynviz.policy import StageOutputs


def make_imagefolder(root, per_class: int, size: int = 32, seed: int = 0, fmt: str = "PNG"):
    """A CIFAR-like ImageFolder of random images: root/<class>/<NNNN>.png."""
    rng = np.random.default_rng(seed)
    for name in data.CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:04d}.png", fmt)
    return root


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    """Caches go to a temporary directory for the test."""
    monkeypatch.setenv("DYNVIZ_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def small_cifar(tmp_path_factory):
    """A synthetic CIFAR-10 root with 510 images per class (the split needs > 500)."""
    root = tmp_path_factory.mktemp("cifar")
    make_imagefolder(root / "train", per_class=510)
    return root


@pytest.fixture(scope="session")
def real_cifar():
    try:
        return data.open_cifar10()
    except data.DatasetNotFoundError as err:
        pytest.skip(f"CIFAR-10 not present: {err}")


TRAINED = ("resnet8", "resnet20", "resnet56", "lcnet_resnet20", "exits_resnet56")


def write_random_checkpoints(directory, checkpoints: dict[str, str]) -> None:
    """``checkpoints``: name -> architecture. Random BN statistics and gates, and classifier
    heads confident enough that policies have something to choose between."""
    import models
    from tests.test_models import randomize

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
        val = data.get_split("val")
        for name in zoo.available():
            model = zoo.load_system(name)
            if zoo.spec(name).kind == "gated":   # cheap enough to run for real (gate scores)
                zoo.outputs(name, val, model=model, progress=False)
            else:                                # the rest: answers of growing accuracy
                sha = zoo.checkpoint_sha(name)
                cache.store(cache.directory_for(name, val, sha), name, model, val, sha,
                            fake_outputs(model, val.labels, seed=len(name)))
        operating_points.ship(val=val)
    return root


@pytest.fixture
def app_env(app_root, monkeypatch):
    """The ``app_root`` zoo for one test; yields its validation split."""
    for var, value in app_variables(app_root).items():
        monkeypatch.setenv(var, value)
    return data.get_split("val")


def fake_outputs(model, labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Per-stage logits whose accuracy and confidence grow with the stage, and the
    model's own static MACs per stage."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    staged = hasattr(model, "stage_macs")
    k = model.n_stages if staged else 1
    difficulty = rng.random(n)
    logits = rng.normal(0, 1, (n, k, 10))
    for stage in range(k):
        knows = difficulty < 0.5 + 0.45 * (stage + 1) / k
        logits[np.arange(n), stage, labels] += np.where(knows, 2.5 + 3 * rng.random(n), 0.0)
    macs = np.tile(np.array(model.stage_macs() if staged else [model.macs()]), (n, 1))
    out = {"logits": logits.astype(np.float32), "stage_macs": macs}
    if hasattr(model, "jump_macs"):
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

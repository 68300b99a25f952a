from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dynviz import data


def make_imagefolder(root, per_class: int, size: int = 32, seed: int = 0, fmt: str = "PNG"):
    """A CIFAR-like ImageFolder of random images: root/<class>/<NNNN>.png."""
    rng = np.random.default_rng(seed)
    for name in data.CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:04d}.png", fmt)
    return root


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

"""The cache of validation outputs: what it keeps round-trips, it is rebuilt when the
checkpoint changes, a shipped one is copied rather than recomputed, gated models keep their
gate scores."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import models
from dynviz import cache, data
from tests.helpers import confident_system, make_imagefolder, randomize


@pytest.fixture
def tiny_split(tmp_path):
    root = make_imagefolder(tmp_path / "tiny", per_class=3)
    return data.test_split(root)


def test_cache_round_trip_and_staleness(tiny_split, cache_env):
    system = confident_system("exits_resnet20")
    built = cache.ensure("exits_resnet20", system, tiny_split, "a" * 64, progress=False)
    assert built.arrays["logits"].shape == (30, 3, 10)
    assert isinstance(built.arrays["logits"], np.memmap)
    assert built.ids == tiny_split.ids
    with torch.no_grad():
        out = system(data.to_tensor(tiny_split.images()))
    assert np.allclose(built.arrays["logits"], out.stage_logits.numpy(), atol=1e-5)
    assert np.array_equal(built.arrays["stage_macs"], out.stage_macs.numpy())
    assert np.array_equal(built.arrays["labels"], tiny_split.labels)
    manifest = json.loads((built.directory / "manifest.json").read_text())
    assert manifest["data_fingerprint"] == tiny_split.fingerprint
    assert not list(built.directory.parent.glob(".tmp-*"))
    again = cache.ensure("exits_resnet20", system, tiny_split, "a" * 64, progress=False)
    assert again.directory == built.directory and again.manifest["created"] == manifest["created"]

    def must_not_load():
        raise AssertionError("the model was loaded although its outputs are cached")

    lazily = cache.ensure("exits_resnet20", must_not_load, tiny_split, "a" * 64, progress=False)
    assert lazily.directory == built.directory
    loads = []
    cache.ensure("exits_resnet20", lambda: loads.append(1) or system, tiny_split, "c" * 64,
                 progress=False)
    assert loads == [1]                  # a missing cache loads the model once
    reported = []
    rebuilt = cache.ensure("exits_resnet20", system, tiny_split, "b" * 64, progress=False,
                           on_progress=reported.append)
    assert rebuilt.directory != built.directory and not built.directory.exists()
    assert reported == [1.0]             # 30 images: one batch
    reported.clear()
    cache.compute_outputs(system, tiny_split.images(), device=torch.device("cpu"),
                          batch_size=8, progress=False, on_progress=reported.append)
    assert reported == pytest.approx([8 / 30, 16 / 30, 24 / 30, 1.0])
    out = rebuilt.stage_outputs()
    assert out.n_stages == 3 and len(out) == 30


def test_shipping_a_cache_copies_it_without_recomputing(tiny_split, cache_env, tmp_path):
    local = cache.ensure("resnet8", models.create("resnet8").eval(), tiny_split, "e" * 64,
                         progress=False)

    class MustNotRun(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("the shipped copy was recomputed")

    shipped = cache.ensure("resnet8", MustNotRun(), tiny_split, "e" * 64, progress=False,
                           root=tmp_path / "assets")
    assert shipped.directory.parent == tmp_path / "assets"
    assert shipped.manifest == local.manifest
    for name, array in local.arrays.items():
        assert np.array_equal(shipped.arrays[name], array)


def test_cache_of_a_gated_model_keeps_its_gates(tiny_split, cache_env):
    model = randomize(models.create("lcnet_resnet8").eval(), seed=12)
    cached = cache.ensure("lcnet_resnet8", model, tiny_split, "c" * 64, progress=False)
    with torch.no_grad():
        trace = model(data.to_tensor(tiny_split.images())).trace
    assert np.abs(cached.block_scores() - trace.block_scores.numpy()).max() <= 0.5 / 255 + 1e-6
    for b in range(len(model.blocks)):
        assert np.abs(cached.channel_scores(b) - trace.channel_scores[b].numpy()).max() \
            <= 0.5 / 255 + 1e-6
    assert np.array_equal(cached.arrays["stage_macs"][:, 0], trace.macs.numpy())


def test_halves_need_the_val_split(tiny_split, cache_env):
    cached = cache.ensure("resnet8", models.create("resnet8").eval(), tiny_split, "d" * 64,
                          progress=False)
    with pytest.raises(ValueError, match="val"):
        cached.half("fit")

"""The cache of validation outputs: what it keeps round-trips, it is rebuilt when the
checkpoint changes, a shipped one is copied rather than recomputed, gated models keep their
gate scores. It heals: a corrupt local cache is set aside, logged and rebuilt the same as a
fresh one; what killed writes leave is cleaned; a shipped cache is reported, never moved."""
from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import models
from dynviz import cache, workspace
from tests.helpers import confident_system, randomize


def test_cache_round_trip_and_staleness(tiny_split, cache_env, ws):
    system = confident_system("exits_resnet20")
    built = cache.ensure(ws, "exits_resnet20", system, tiny_split, "a" * 64, progress=False)
    assert built.arrays["logits"].shape == (30, 3, 10)
    assert isinstance(built.arrays["logits"], np.memmap)
    assert built.ids == tiny_split.ids
    with torch.no_grad():
        out = system(tiny_split.spec.to_tensor(tiny_split.images()))
    assert np.allclose(built.arrays["logits"], out.stage_logits.numpy(), atol=1e-5)
    assert np.array_equal(built.arrays["stage_macs"], out.stage_macs.numpy())
    assert np.array_equal(built.arrays["labels"], tiny_split.labels)
    manifest = json.loads((built.directory / "manifest.json").read_text())
    assert manifest["data_fingerprint"] == tiny_split.fingerprint
    assert not list(built.directory.parent.glob(".tmp-*"))
    again = cache.ensure(ws, "exits_resnet20", system, tiny_split, "a" * 64, progress=False)
    assert again.directory == built.directory and again.manifest["created"] == manifest["created"]

    def must_not_load():
        raise AssertionError("the model was loaded although its outputs are cached")

    lazily = cache.ensure(ws, "exits_resnet20", must_not_load, tiny_split, "a" * 64,
                          progress=False)
    assert lazily.directory == built.directory
    loads = []
    cache.ensure(ws, "exits_resnet20", lambda: loads.append(1) or system, tiny_split,
                 "c" * 64, progress=False)
    assert loads == [1]                  # a missing cache loads the model once
    reported = []
    rebuilt = cache.ensure(ws, "exits_resnet20", system, tiny_split, "b" * 64, progress=False,
                           on_progress=reported.append)
    assert rebuilt.directory != built.directory and not built.directory.exists()
    assert reported == [1.0]             # 30 images: one batch
    reported.clear()
    cache.compute_outputs(system, tiny_split.images(), tiny_split.spec,
                          device=torch.device("cpu"), batch_size=8, progress=False,
                          on_progress=reported.append)
    assert reported == pytest.approx([8 / 30, 16 / 30, 24 / 30, 1.0])
    out = rebuilt.stage_outputs()
    assert out.n_stages == 3 and len(out) == 30


def test_shipping_a_cache_copies_it_without_recomputing(tiny_split, cache_env, ws, tmp_path):
    local = cache.ensure(ws, "resnet8", models.create("resnet8").eval(), tiny_split, "e" * 64,
                         progress=False)

    class MustNotRun(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("the shipped copy was recomputed")

    shipped = cache.ensure(ws, "resnet8", MustNotRun(), tiny_split, "e" * 64, progress=False,
                           root=tmp_path / "assets")
    assert shipped.directory.parent == tmp_path / "assets"
    assert shipped.manifest == local.manifest
    for name, array in local.arrays.items():
        assert np.array_equal(shipped.arrays[name], array)


def test_cache_of_a_gated_model_keeps_its_gates_exactly(tiny_split, cache_env, ws):
    model = randomize(models.create("lcnet_resnet8").eval(), seed=12)
    with torch.no_grad():      # scores just above 0: the block and the channel still run
        for gate in (model.blocks[1].block_gate, model.blocks[2].channel_gate):
            gate.fc.weight.zero_()
            gate.fc.bias[:1] = 1e-4
    cached = cache.ensure(ws, "lcnet_resnet8", model, tiny_split, "c" * 64, progress=False)
    with torch.no_grad():
        trace = model(tiny_split.spec.to_tensor(tiny_split.images())).trace
    assert ((0 < trace.block_scores[:, 1]) & (trace.block_scores[:, 1] < 1 / 510)).all()
    assert np.array_equal(cached.blocks_run(), (trace.block_scores > 0).numpy())
    assert cached.blocks_run().any() and not cached.blocks_run().all()
    for b in range(len(model.blocks)):
        assert np.array_equal(cached.channels_on(b), (trace.channel_scores[b] > 0).numpy())
    assert cached.channels_on(2)[:, 0].all()
    width = sum(b.mid_channels for b in model.blocks)       # 8 yes/no to a byte
    assert cached.arrays["channels_on"].shape == (len(tiny_split.ids), -(-width // 8))
    assert np.array_equal(cached.arrays["stage_macs"][:, 0], trace.macs.numpy())


def test_a_yes_no_array_reads_back_any_columns_from_its_packed_bytes():
    rng = np.random.default_rng(4)
    yes = rng.random((5, 29)) < 0.5                      # 29: columns cross byte borders
    cached = cache.CachedOutputs(Path("."), {"packed": {"x": 29}}, {"x": np.packbits(yes, 1)})
    assert np.array_equal(cached.yes_no("x"), yes)
    for lo in range(29):
        for hi in range(lo + 1, 30):
            assert np.array_equal(cached.yes_no("x", lo, hi), yes[:, lo:hi]), (lo, hi)


def test_halves_need_the_val_split(tiny_split, cache_env, ws):
    cached = cache.ensure(ws, "resnet8", models.create("resnet8").eval(), tiny_split, "d" * 64,
                          progress=False)
    with pytest.raises(ValueError, match="val"):
        cached.half("fit")


# ---------------------------------------------------------------------------- healing
def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _single_quoted(path) -> None:
    path.write_text(path.read_text().replace('"', "'"))


# how a cache directory gets damaged -> what the warning must say about it
CORRUPTIONS = {
    "truncated manifest": (lambda d: _truncate(d / "manifest.json"),
                           "manifest.json is unreadable"),
    "invalid JSON manifest": (lambda d: _single_quoted(d / "manifest.json"),
                              "manifest.json is unreadable"),
    "truncated array": (lambda d: _truncate(d / "logits.npy"), "logits.npy is unreadable"),
    "missing array": (lambda d: (d / "stage_macs.npy").unlink(), "stage_macs.npy is missing"),
    "array of another shape": (lambda d: np.save(d / "logits.npy", np.zeros((3, 1, 10))),
                               "logits.npy holds [3, 1, 10]"),
}


def _contents(cached: cache.CachedOutputs) -> tuple[dict, dict]:
    """Manifest (less when it was written) and arrays, copied out of the memory maps."""
    manifest = {k: v for k, v in cached.manifest.items() if k not in ("created", "seconds")}
    return manifest, {name: np.array(a) for name, a in cached.arrays.items()}


@pytest.mark.parametrize("damage", CORRUPTIONS)
def test_a_corrupt_cache_is_set_aside_logged_and_rebuilt(damage, tiny_split, cache_env, ws,
                                                         caplog):
    model = models.create("resnet8").eval()
    fresh = cache.ensure(ws, "resnet8", model, tiny_split, "a" * 64, progress=False)
    directory, (manifest, arrays) = fresh.directory, _contents(fresh)
    del fresh                      # its maps must not be read once the files are damaged
    corrupt, says = CORRUPTIONS[damage]
    corrupt(directory)
    with caplog.at_level(logging.WARNING):
        rebuilt = cache.ensure(ws, "resnet8", model, tiny_split, "a" * 64, progress=False)
    aside = [p.name for p in directory.parent.iterdir() if p != directory]
    assert len(aside) == 1 and re.fullmatch(re.escape(directory.name) + r"\.corrupt-\d{8}T\d{6}Z",
                                            aside[0])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(directory) in warnings[0] and says in warnings[0]
    assert rebuilt.directory == directory
    got_manifest, got_arrays = _contents(rebuilt)
    assert got_manifest == manifest and got_arrays.keys() == arrays.keys()
    for name, array in arrays.items():
        assert np.array_equal(got_arrays[name], array), name
    again = cache.ensure(ws, "resnet8", _must_not_run, tiny_split, "a" * 64)
    assert again.directory == directory


def _must_not_run():
    raise AssertionError("a whole cache was rebuilt")


def _as_format_1(directory, gates: bool = False) -> None:
    """What an older dynviz wrote: no format in the manifest (and for a gated model, scores
    where format 2 keeps yes/no; their contents do not matter here)."""
    manifest = json.loads((directory / "manifest.json").read_text())
    del manifest["format"]
    if gates:
        manifest["shapes"]["block_scores"] = manifest["shapes"].pop("blocks_run")
        (directory / "blocks_run.npy").rename(directory / "block_scores.npy")
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_a_gated_cache_in_an_older_format_is_passed_over_rebuilt_or_named_if_shipped(
        tiny_split, cache_env, tmp_path, monkeypatch, caplog):
    model = randomize(models.create("lcnet_resnet8").eval(), seed=3)
    monkeypatch.setenv("DYNVIZ_ASSETS", str(tmp_path / "assets"))
    ws = workspace.builtin()
    local = cache.ensure(ws, "lcnet_resnet8", model, tiny_split, "a" * 64, progress=False)
    directory, manifest = local.directory, _contents(local)[0]
    del local
    _as_format_1(directory, gates=True)
    assert cache.find(ws, "lcnet_resnet8", "test", "a" * 64) is None    # images absent:
    assert (directory / "manifest.json").exists()                       # nothing lost
    with caplog.at_level(logging.WARNING):
        rebuilt = cache.ensure(ws, "lcnet_resnet8", model, tiny_split, "a" * 64, progress=False)
    assert not caplog.records and [p for p in directory.parent.iterdir()] == [directory]
    assert _contents(rebuilt)[0] == manifest and rebuilt.blocks_run().shape == (30, 3)
    shipped = cache.ensure(ws, "lcnet_resnet8", model, tiny_split, "a" * 64, progress=False,
                           root=tmp_path / "assets" / "outputs").directory
    _as_format_1(shipped, gates=True)
    with pytest.raises(cache.FormatError,
                       match=r"are in another format: format 1, written by an older dynviz; "
                             r"this one reads format 2; restore"):
        cache.find(ws, "lcnet_resnet8", tiny_split, "a" * 64)
    assert (shipped / "manifest.json").exists()


def test_a_cache_without_gates_reads_in_format_1_and_none_in_a_newer_one(tiny_split,
                                                                         cache_env, ws):
    model = models.create("resnet8").eval()
    directory = cache.ensure(ws, "resnet8", model, tiny_split, "a" * 64,
                             progress=False).directory
    _as_format_1(directory)                  # logits, MACs and labels: read as they were
    assert cache.ensure(ws, "resnet8", _must_not_run, tiny_split, "a" * 64).directory \
        == directory
    manifest = json.loads((directory / "manifest.json").read_text())
    (directory / "manifest.json").write_text(json.dumps(manifest | {"format": 3}))
    with pytest.raises(cache.FormatError, match="format 3, written by a newer dynviz"):
        cache.load(directory)


def test_leftovers_of_killed_writes_are_cleaned_when_a_cache_is_next_written(tiny_split,
                                                                             cache_env, ws):
    outputs = cache_env / "outputs"
    killed = outputs / ".tmp-killed"              # a write killed two hours ago
    killed.mkdir(parents=True)
    (killed / "logits.npy").write_bytes(b"\x93NUMPY half an array")
    two_hours_ago = time.time() - 2 * 3600
    os.utime(killed, (two_hours_ago, two_hours_ago))
    running = outputs / ".tmp-running"             # another process writing right now
    running.mkdir()
    cache.ensure(ws, "resnet8", models.create("resnet8").eval(), tiny_split, "a" * 64,
                 progress=False)
    assert not killed.exists() and running.exists()


def test_a_corrupt_shipped_cache_is_reported_and_never_moved(tiny_split, cache_env, tmp_path,
                                                              monkeypatch):
    assets = tmp_path / "assets"
    monkeypatch.setenv("DYNVIZ_ASSETS", str(assets))
    ws = workspace.builtin()
    model = models.create("resnet8").eval()
    shipped = cache.ensure(ws, "resnet8", model, tiny_split, "a" * 64, progress=False,
                           root=assets / "outputs").directory
    _truncate(shipped / "logits.npy")
    before = {p: p.read_bytes() for p in assets.rglob("*") if p.is_file()}
    for call in (lambda: cache.ensure(ws, "resnet8", model, tiny_split, "a" * 64,
                                      progress=False),
                 lambda: cache.find(ws, "resnet8", "test", "a" * 64)):
        with pytest.raises(ValueError) as err:
            call()
        assert str(shipped) in str(err.value) and "`git checkout -- assets/`" in str(err.value)
        assert isinstance(err.value, cache.CorruptCacheError)
    # another checkpoint of the same system and split: rebuilt locally, the shipped one stays
    other = cache.ensure(ws, "resnet8", model, tiny_split, "b" * 64, progress=False)
    assert other.directory.parent == cache_env / "outputs"
    assert {p: p.read_bytes() for p in assets.rglob("*") if p.is_file()} == before

"""A workspace's dataset: the fixed split (its rule checked file by file), the decoded
cache, CIFAR-10's torchvision batches read without running code, augmentation and batches,
and the classification of odd uploads."""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import pickle
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from dynviz import data, uploads, workspace
from tests.helpers import make_imagefolder


# ---------------------------------------------------------------------------- the split
def test_real_split_sizes_balance_and_membership(real_cifar):
    splits = {name: data.get_split(real_cifar.spec, name, real_cifar) for name in data.SPLITS}
    assert {n: len(s) for n, s in splits.items()} == {
        "train": 45000, "val": 5000, "fit": 2500, "check": 2500}
    for name, per_class in (("train", 4500), ("val", 500), ("fit", 250), ("check", 250)):
        assert np.bincount(splits[name].labels, minlength=10).tolist() == [per_class] * 10
    # validation = the last 500 file names of every class, by sorted name (0000..4999)
    val_ids = set(splits["val"].ids)
    expected = {f"{c}/{i:04d}.jpg" for c in real_cifar.spec.classes for i in range(4500, 5000)}
    assert val_ids == expected
    assert not val_ids & set(splits["train"].ids)
    fit, check = set(splits["fit"].ids), set(splits["check"].ids)
    assert not fit & check and fit | check == val_ids
    # fit/check alternate within the validation order
    assert splits["fit"].ids[:2] == ["airplane/4500.jpg", "airplane/4502.jpg"]
    assert splits["check"].ids[:2] == ["airplane/4501.jpg", "airplane/4503.jpg"]


def test_split_is_deterministic_and_disjoint(small_cifar, ws):
    a, b = data.open_dataset(ws.data, small_cifar), data.open_dataset(ws.data, small_cifar)
    for name in data.SPLITS:
        assert np.array_equal(ws.split(name, a).indices, ws.split(name, b).indices)
        assert ws.split(name, a).fingerprint == ws.split(name, b).fingerprint
    parts = data.split_indices(a.labels, ws.data)
    assert len(parts["train"]) == 100 and len(parts["val"]) == 5000
    assert np.intersect1d(parts["train"], parts["val"]).size == 0
    assert sorted(np.concatenate([parts["train"], parts["val"]])) == list(range(len(a)))
    assert np.array_equal(np.sort(np.concatenate([parts["fit"], parts["check"]])), parts["val"])


def test_split_refuses_too_few_images(tmp_path, ws):
    make_imagefolder(tmp_path / "train", per_class=3)
    with pytest.raises(ValueError, match="the split needs at least 501"):
        ws.split("val", data.open_dataset(ws.data, tmp_path))


SMALL = data.DataSpec((), ("kiwi", "emu", "moa"), 8, (0.5,) * 3, (0.25,) * 3)


def test_a_class_of_fewer_than_20_images_is_refused_by_name():
    labels = np.repeat([0, 1, 2], [25, 19, 25])
    with pytest.raises(ValueError) as err:
        data.split_indices(labels, SMALL)
    assert str(err.value) == "class emu has 19 images; the split needs at least 20"
    assert set(data.split_indices(np.repeat([0, 1, 2], [25, 20, 25]), SMALL)) == set(data.SPLITS)


def test_the_split_is_the_last_tenth_of_each_class_by_name_halved_in_turn(tmp_path):
    """The rule of data.py's docstring and DataSpec, applied by hand: a class's last 10% of
    files by sorted name (to the nearest whole file, halves up, at least 2) are
    validation; alternate validation images, counted across classes, are fit and check."""
    sizes = {"kiwi": 25, "emu": 27, "moa": 20}     # 2.5 -> 3, 2.7 -> 3, 2.0 -> 2
    kept = {"kiwi": 3, "emu": 3, "moa": 2}
    for name, n in sizes.items():
        make_imagefolder(tmp_path, per_class=n, size=8, classes=(name,), seed=n)
    dataset = data.open_imagefolder(tmp_path, SMALL, every_class=True)
    val = []
    for name in SMALL.classes:                      # label order, then sorted file name
        names = sorted(os.listdir(tmp_path / name))
        val += [f"{name}/{f}" for f in names[len(names) - kept[name]:]]
    splits = {name: data.get_split(SMALL, name, dataset) for name in data.SPLITS}
    assert splits["val"].ids == val
    assert splits["fit"].ids == val[0::2] and splits["check"].ids == val[1::2]
    assert sorted(splits["train"].ids) == sorted(set(dataset.ids) - set(val))
    assert splits["fit"].ids[:3] == ["kiwi/0022.png", "kiwi/0024.png", "emu/0025.png"]


def test_fingerprint_changes_when_a_file_changes(tmp_path, ws):
    root = make_imagefolder(tmp_path / "train", per_class=2)
    before = data.open_imagefolder(root, ws.data).fingerprint
    assert data.open_imagefolder(root, ws.data).fingerprint == before
    Image.new("RGB", (32, 32), (9, 9, 9)).save(root / "cat" / "0001.png")  # different size
    changed = data.open_imagefolder(root, ws.data).fingerprint
    assert changed != before
    (root / "cat" / "0001.png").rename(root / "cat" / "0007.png")
    assert data.open_imagefolder(root, ws.data).fingerprint not in (before, changed)


def test_unknown_class_folder_is_an_error(tmp_path, ws):
    (tmp_path / "cat").mkdir()
    (tmp_path / "unicorn").mkdir()
    with pytest.raises(ValueError, match="unicorn"):
        data.open_imagefolder(tmp_path, ws.data)


def test_missing_dataset_says_what_to_do(tmp_path, ws):
    nowhere = dataclasses.replace(ws.data, roots=(tmp_path / "nothing",))
    with pytest.raises(data.DatasetNotFoundError, match="DYNVIZ_DATA"):
        data.find_root(nowhere)


def test_a_wrong_dynviz_data_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    """The built-in workspace's list of roots finds a copy; $DYNVIZ_DATA, set, replaces it."""
    home = tmp_path / "repo"                     # a repository root whose ./data holds a copy
    home.mkdir()
    (home / workspace.FILE).write_text((workspace.settings.PROJECT_ROOT / workspace.FILE)
                                       .read_text())
    good = make_imagefolder(home / "data" / "train", per_class=1).parent
    monkeypatch.setattr(workspace.settings, "PROJECT_ROOT", home)
    monkeypatch.setenv("DYNVIZ_DATA", str(tmp_path / "typo"))
    with pytest.raises(data.DatasetNotFoundError, match="typo"):
        data.find_root(workspace.builtin().data)
    monkeypatch.setenv("DYNVIZ_DATA", str(good))
    assert data.find_root(workspace.builtin().data) == good
    monkeypatch.delenv("DYNVIZ_DATA")
    assert data.find_root(workspace.builtin().data) == good      # unset: the search list


def test_test_split_reads_any_imagefolder(tmp_path, cache_env, ws):
    for i, name in enumerate(("cat", "dog")):
        (tmp_path / name).mkdir()
        Image.new("RGB", (64, 48), (i * 100, 0, 0)).save(tmp_path / name / "a.png")
    split = data.test_split(tmp_path, ws.data)
    classes = ws.data.classes
    assert split.labels.tolist() == [classes.index("cat"), classes.index("dog")]
    images = split.images()
    assert images.shape == (2, 32, 32, 3)
    assert images[1, 16, 16].tolist() == [100, 0, 0]


# ---------------------------------------------------------------------------- decoding
def test_uint8_cache_round_trip_equals_fresh_decode(small_cifar, cache_env, ws):
    dataset = data.open_dataset(ws.data, small_cifar)
    cached = data.load_images(dataset)
    files = list((cache_env / "images").glob("*.npy"))
    assert len(files) == 1 and not list((cache_env / "images").glob("*.tmp"))
    again = data.load_images(dataset)                 # second call maps the file
    assert isinstance(again, np.memmap)
    for i in (0, 777, len(dataset) - 1):
        fresh = np.asarray(Image.open(dataset.root / dataset.ids[i]).convert("RGB"))
        assert np.array_equal(cached[i], fresh) and np.array_equal(again[i], fresh)
    split = ws.split("check", dataset)
    assert np.array_equal(split.images(), cached[split.indices])


def test_torchvision_format_is_read_in_class_order(tmp_path, cache_env, ws):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    labels = rng.permutation(np.repeat(np.arange(10), 501)).tolist()
    pixels = rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({"data": pixels, "labels": labels}, f)
    dataset = data.open_dataset(ws.data, tmp_path)
    assert dataset.kind == "torchvision"
    assert np.all(np.diff(dataset.labels) >= 0)
    images = data.load_images(dataset)
    first_cat = labels.index(3)
    position = dataset.ids.index(f"data_batch_1:{first_cat}")
    assert dataset.labels[position] == 3
    assert np.array_equal(images[position], pixels[first_cat].reshape(3, 32, 32).transpose(1, 2, 0))
    assert len(ws.split("fit", dataset)) == 2500


def test_a_truncated_image_cache_is_set_aside_and_decoded_again(cache_env, tiny_split, caplog):
    dataset = tiny_split.dataset
    fresh = np.array(data.load_images(dataset))
    (path,) = (cache_env / "images").glob("*.npy")
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    killed = path.with_name(f".{path.name}.4242-0123456789ab.tmp")     # an atomic_write's
    killed.write_bytes(b"\x93NUMPY half")                           # temporary, long dead
    two_hours_ago = time.time() - 2 * 3600
    os.utime(killed, (two_hours_ago, two_hours_ago))
    with caplog.at_level(logging.WARNING):
        again = data.load_images(dataset)
    assert np.array_equal(again, fresh)
    names = sorted(p.name for p in path.parent.iterdir())
    assert len(names) == 2 and names[0] == path.name and \
        names[1].startswith(f"{path.name}.corrupt-")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0] and "unreadable" in warnings[0]


class _Python2Pickler(pickle._Pickler):
    """Writes as Python 2's cPickle wrote CIFAR-10's batches: protocol 2, bytes as str
    (BINSTRING), NumPy's array reconstructor under its NumPy 1 module, numpy.core."""
    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


class _RunsACommand:
    """Unpickling calls os.system(command)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_torchvision_batches_are_read_without_running_code(tmp_path, cache_env, ws):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    labels = np.repeat(np.arange(10), 501).tolist()
    pixels = np.random.default_rng(0).integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    with open(folder / "data_batch_1", "wb") as f:       # as the real batches were written
        _Python2Pickler(f, protocol=2).dump({"batch_label": "training batch 1 of 1",
                                             "labels": labels, "data": pixels,
                                             "filenames": [f"{i}.png" for i in labels]})
    dataset = data.open_dataset(ws.data, tmp_path)
    images = data.load_images(dataset)
    assert np.array_equal(images[-1], pixels[-1].reshape(3, 32, 32).transpose(1, 2, 0))
    marker = tmp_path / "the-pickle-ran-a-command"
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({"labels": [0], "data": _RunsACommand(f"touch {marker}")}, f)
    with pytest.raises(ValueError, match=r"data_batch_2 is not a CIFAR-10 batch: "
                                         r"posix\.system is not allowed"):
        data.open_dataset(ws.data, tmp_path)
    assert not marker.exists()


# ---------------------------------------------------------------------------- tensors
def test_augment_is_a_seeded_crop_and_flip():
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8))
    out = data.augment(images, torch.Generator().manual_seed(5))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out, data.augment(images, torch.Generator().manual_seed(5)))
    assert not torch.equal(out, data.augment(images, torch.Generator().manual_seed(6)))
    padded = torch.nn.functional.pad(images, (0, 0, 4, 4, 4, 4))
    for b in range(len(images)):  # brute force: some crop of the (flipped) padded image
        candidates = [view[dy:dy + 8, dx:dx + 8]
                      for view in (padded[b], padded[b].flip(1))
                      for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out[b], c) for c in candidates)


def test_to_tensor_normalises(ws):
    images = np.full((2, 4, 4, 3), 255, dtype=np.uint8)
    x = ws.data.to_tensor(images)
    assert x.shape == (2, 3, 4, 4)
    expected = [(1 - m) / s for m, s in zip(ws.data.mean, ws.data.std)]
    assert torch.allclose(x[0, :, 0, 0], torch.tensor(expected))


def test_training_batches_shard_without_overlap(ws):
    labels = np.arange(40)  # unique labels tag every image
    images = np.zeros((40, 4, 4, 3), dtype=np.uint8)
    seen = []
    for rank in (0, 1):
        g = torch.Generator().manual_seed(3)
        for x, y in data.batches(images, labels, 8, ws.data, generator=g, train=True,
                                 shard=(rank, 2)):
            seen.append(y)
    # 5 batches of 8 split over two ranks: every image once
    assert sorted(torch.cat(seen).tolist()) == list(range(40))


# ---------------------------------------------------------------------------- uploads
def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height pixels, with one tiny data chunk."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))


def _palette_image() -> Image.Image:
    img = Image.new("P", (40, 40), 0)
    img.putpalette([10, 200, 30] + [0] * 765)
    return img


GOOD_UPLOADS = {
    # name: (bytes, expected colour of the centre pixel)
    "rgb-jpeg": (_encode(Image.new("RGB", (50, 80), (200, 10, 10)), "JPEG", quality=95),
                 (200, 10, 10)),
    "L-png": (_encode(Image.new("L", (40, 40), 100), "PNG"), (100, 100, 100)),
    "LA-png-transparent": (_encode(Image.new("LA", (40, 40), (0, 0)), "PNG"), (255, 255, 255)),
    "P-png": (_encode(_palette_image(), "PNG"), (10, 200, 30)),
    "RGBA-png-opaque": (_encode(Image.new("RGBA", (40, 40), (1, 2, 3, 255)), "PNG"), (1, 2, 3)),
    "RGBA-png-transparent": (_encode(Image.new("RGBA", (40, 40), (1, 2, 3, 0)), "PNG"),
                             (255, 255, 255)),
    "CMYK-jpeg-white": (_encode(Image.new("CMYK", (40, 40), (0, 0, 0, 0)), "JPEG", quality=100),
                        (255, 255, 255)),
    "I16-png-max": (_encode(Image.new("I;16", (40, 40), 65535), "PNG"), (255, 255, 255)),
    "I16-png-half": (_encode(Image.new("I;16", (40, 40), 32896), "PNG"), (128, 128, 128)),
    "one-pixel": (_encode(Image.new("RGB", (1, 1), (7, 8, 9)), "PNG"), (7, 8, 9)),
    "webp": (_encode(Image.new("RGB", (33, 33), (0, 0, 255)), "WEBP", lossless=True),
             (0, 0, 255)),
    "bmp": (_encode(Image.new("RGB", (33, 33), (0, 255, 0)), "BMP"), (0, 255, 0)),
    "tiff": (_encode(Image.new("RGB", (33, 33), (255, 255, 0)), "TIFF"), (255, 255, 0)),
    "gif-first-frame": (_encode(Image.new("RGB", (20, 20), (255, 0, 0)), "GIF", save_all=True,
                                append_images=[Image.new("RGB", (20, 20), (0, 0, 255))]),
                        (255, 0, 0)),
}


@pytest.mark.parametrize("name", list(GOOD_UPLOADS))
def test_upload_preprocessing_accepts_every_mode(name):
    raw, colour = GOOD_UPLOADS[name]
    out = uploads.preprocess_upload(raw, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.abs(out[16, 16].astype(int) - colour).max() <= 3, out[16, 16]


def test_upload_honours_exif_orientation():
    img = Image.new("RGB", (60, 30), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 30, 30))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    out = uploads.preprocess_upload(_encode(img, "JPEG", exif=exif, quality=95), size=30)
    # displayed upright the image is 30 wide, 60 tall, white on top; centre crop is its middle
    assert out.shape == (30, 30, 3)
    rotated = np.asarray(img.transpose(Image.Transpose.ROTATE_270))
    middle = rotated[15:45]
    assert np.abs(out.astype(int) - middle.astype(int)).mean() < 20


BAD_UPLOADS = {
    "empty": (b"", "empty"),
    "text-named-jpg": (b"hello, this is not an image\n" * 20, "not an image"),
    "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "not an image"),
    "truncated-jpeg": (_encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")[:300],
                       "truncated or corrupt"),
    "bomb-header": (_png_header_only(10000, 10000), "megapixels"),
}


@pytest.mark.parametrize("name", list(BAD_UPLOADS))
def test_upload_preprocessing_rejects_bad_input(name):
    raw, message = BAD_UPLOADS[name]
    with pytest.raises(uploads.InvalidImageError, match=message):
        uploads.preprocess_upload(raw, 32)
    assert issubclass(uploads.InvalidImageError, ValueError)


def test_upload_accepts_file_objects():
    raw, _ = GOOD_UPLOADS["bmp"]
    from_file = uploads.preprocess_upload(io.BytesIO(raw), 32)
    assert from_file.shape == (32, 32, 3)
    assert np.array_equal(from_file, uploads.preprocess_upload(raw, 32))

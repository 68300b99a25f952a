"""A workspace's dataset on disk: finding it, the fixed train/validation split, a decoded
uint8 cache and tensor augmentation (uploaded images: ``dynviz.uploads``). ``DataSpec`` says
which dataset: its directory, classes, image size and normalisation (a workspace's ``[data]``
table).

Image order is fixed everywhere: class-major (in ``DataSpec.classes`` order), then sorted
file name. The validation split is the last files of every class (``DataSpec.val_count``);
its even positions form the *fit* half (policies learn there), its odd positions the *check*
half.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from dynviz import decode, files, settings
from dynviz.decode import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "fit", "check")
# the validation split's halves: positions in it (fit for choosing, check for reporting)
HALVES = {"fit": slice(0, None, 2), "check": slice(1, None, 2)}
MIN_PER_CLASS = 20    # a class needs this many images: 10% of them still fills fit and check
TORCHVISION_DIR = "cifar-10-batches-py"


class DatasetNotFoundError(FileNotFoundError):
    """No dataset where we looked; the message says how to get one."""


class DatasetError(ValueError):
    """A dataset that is there but cannot be used (class folders that do not match, a class
    too small to split, an unreadable image or batch); the message names the file."""


@dataclass(frozen=True)
class DataSpec:
    """Args:
        roots: dataset directories in search order; the first that exists is read.
        layout: ``"imagefolder"`` (``<root>/<class>/<file>``) or ``"cifar10"``
            (``<root>/train/<class>/`` or torchvision's ``cifar-10-batches-py``).
        classes: class names, in label order (an ImageFolder's sub-folder names).
        image_size: side of the square images the systems see.
        mean, std: per-channel normalisation of images scaled to [0, 1].
        val_fraction: the last share of every class's files (by sorted name) that forms
            the validation split, halved into *fit* and *check*.
        val_per_class: a fixed number of validation files per class instead.
        decoded_cache: the directory of the decoded uint8 arrays (the workspace's cache).
    """
    roots: tuple[Path, ...]
    classes: tuple[str, ...]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layout: str = "imagefolder"
    val_fraction: float = 0.1
    val_per_class: int | None = None
    decoded_cache: Path | None = None     # where decoded images are kept (default: settings)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def val_count(self, class_size: int) -> int:
        """How many of a class's ``class_size`` files are validation images."""
        if self.val_per_class is not None:
            return self.val_per_class
        return max(2, int(class_size * self.val_fraction + 0.5))    # nearest, halves up

    def to_tensor(self, images: np.ndarray | torch.Tensor,
                  device: torch.device | str = "cpu") -> torch.Tensor:
        """uint8 (N, H, W, 3) -> normalised float32 (N, 3, H, W) in channels_last memory."""
        if not torch.is_tensor(images):
            array = np.asarray(images)
            images = torch.from_numpy(array if array.flags.writeable else array.copy())
        x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


@dataclass(frozen=True, eq=False)
class Dataset:
    """Images of one directory in the fixed order.

    Args:
        spec: the dataset's description (classes, size, normalisation).
        root: the directory read.
        kind: ``"imagefolder"`` (``<root>/<class>/<file>``) or ``"torchvision"``
            (``<root>/cifar-10-batches-py``).
        ids: per image, its path relative to ``root`` (or ``batch:index``).
        labels: (N,) int64 index into ``spec.classes``.
        sizes: (N,) int64 file size in bytes (for the fingerprint).
    """
    spec: DataSpec
    root: Path
    kind: str
    ids: tuple[str, ...]
    labels: np.ndarray
    sizes: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def fingerprint(self) -> str:
        return _fingerprint(self.ids, self.sizes)


@dataclass(frozen=True, eq=False)
class Split:
    """A named subset of a ``Dataset``; ``indices`` index into it."""
    dataset: Dataset
    name: str
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def spec(self) -> DataSpec:
        return self.dataset.spec

    @property
    def ids(self) -> list[str]:
        return [self.dataset.ids[i] for i in self.indices]

    @property
    def labels(self) -> np.ndarray:
        return self.dataset.labels[self.indices]

    @property
    def fingerprint(self) -> str:
        return _fingerprint(self.ids, self.dataset.sizes[self.indices])

    def images(self) -> np.ndarray:
        """(N, S, S, 3) uint8 at the dataset's image size, read from the decoded cache."""
        return load_images(self.dataset)[self.indices]


def _fingerprint(ids: list[str] | tuple[str, ...], sizes: np.ndarray) -> str:
    digest = hashlib.sha256()
    for name, size in zip(ids, sizes.tolist()):
        digest.update(f"{name}\t{size}\n".encode())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------- finding
def missing_data_message(spec: DataSpec) -> str:
    looked = "\n".join(f"  - {p}" for p in spec.roots)
    fixes = ("  - set DYNVIZ_DATA to a directory holding train/<class>/*.jpg "
             "(or torchvision's cifar-10-batches-py);\n"
             "  - run `python -m dynviz data --download` on a machine with internet access."
             if spec.layout == "cifar10" else
             "  - fix data.root in the workspace's dynviz.toml.")
    return f"The dataset was not found. Looked in:\n{looked}\nFix one of:\n{fixes}"


def _holds_dataset(root: Path, layout: str) -> bool:
    if layout == "cifar10":
        return (root / "train").is_dir() or (root / TORCHVISION_DIR).is_dir()
    return root.is_dir()


def find_root(spec: DataSpec) -> Path:
    """The first of ``spec.roots`` that holds the dataset (``$DYNVIZ_DATA`` replaces the
    built-in workspace's list: whoever set it meant that copy)."""
    for candidate in spec.roots:
        if _holds_dataset(candidate, spec.layout):
            return candidate
    raise DatasetNotFoundError(missing_data_message(spec))


def open_dataset(spec: DataSpec, root: str | Path | None = None) -> Dataset:
    """The images of ``spec`` (at ``root``, default ``find_root(spec)``): for the
    ``cifar10`` layout its train images, else every image of the ImageFolder."""
    root = Path(root) if root is not None else find_root(spec)
    if spec.layout == "imagefolder":
        return open_imagefolder(root, spec, every_class=True)
    if (root / "train").is_dir():
        return open_imagefolder(root / "train", spec, every_class=True)
    if (root / TORCHVISION_DIR).is_dir():
        return _open_torchvision(root, spec)
    raise DatasetNotFoundError(f"{root} holds neither train/<class>/ nor {TORCHVISION_DIR}/\n"
                               + missing_data_message(spec))


def image_files(directory: Path) -> list[os.DirEntry]:
    """The image files (by suffix) directly in ``directory``, sorted by name."""
    return sorted((e for e in os.scandir(directory)
                   if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)),
                  key=lambda e: e.name)


def class_folders(directory: Path) -> list[str]:
    """The sub-folders of an ImageFolder, sorted; hidden ones (``.ipynb_checkpoints``) are
    not classes."""
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def open_imagefolder(directory: str | Path, spec: DataSpec,
                     every_class: bool = False) -> Dataset:
    """Every image under ``directory/<class>/``; the class folders must be among
    ``spec.classes`` (with ``every_class``, all of them, none empty)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetNotFoundError(f"{directory} is not a directory")
    class_dirs = class_folders(directory)
    unknown = [name for name in class_dirs if name not in spec.classes]
    if unknown or not class_dirs:
        raise DatasetError(f"{directory}: expected sub-folders named after the classes "
                           f"{', '.join(spec.classes)}; found {class_dirs}")
    ids, labels, sizes = [], [], []
    for label, name in enumerate(spec.classes):
        if not (directory / name).is_dir():
            if every_class:
                raise DatasetError(f"{directory}: the class folder {name}/ is missing")
            continue
        entries = image_files(directory / name)
        if every_class and not entries:
            raise DatasetError(f"{directory / name}: the class holds no image files "
                               f"({', '.join(IMAGE_SUFFIXES)})")
        ids += [f"{name}/{e.name}" for e in entries]
        sizes += [e.stat().st_size for e in entries]
        labels += [label] * len(entries)
    if not ids:
        raise DatasetError(f"{directory}: no image files in the class folders")
    return Dataset(spec, directory, "imagefolder", tuple(ids),
                   np.asarray(labels, dtype=np.int64), np.asarray(sizes, dtype=np.int64))


class _CifarUnpickler(pickle.Unpickler):
    """Reads torchvision's CIFAR-10 batches (Python 2 pickles of a dict of a uint8 array,
    lists, bytes and str) and refuses every other global: a pickle can call any function it
    names, ``os.system`` included."""

    # global a batch names -> where it lives now: the array's reconstructor (numpy.core
    # before NumPy 2, where the batches were written; numpy._core since), its type, its dtype
    _RECONSTRUCT = ("numpy._core.multiarray", "_reconstruct")
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
               _RECONSTRUCT: _RECONSTRUCT,
               ("numpy", "ndarray"): ("numpy", "ndarray"),
               ("numpy", "dtype"): ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(*self.ALLOWED[module, name])


def _read_batch(path: Path) -> dict:
    """One ``data_batch_*`` of torchvision's CIFAR-10, through ``_CifarUnpickler``."""
    with open(path, "rb") as f:
        try:
            batch = _CifarUnpickler(f, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError,
                KeyError) as err:          # what a damaged or foreign pickle raises
            raise DatasetError(f"{path} is not a CIFAR-10 batch: {err}") from None
    if not isinstance(batch, dict) or not {"data", "labels"} <= batch.keys():
        raise DatasetError(f"{path} is not a CIFAR-10 batch: it holds no data and labels")
    return batch


def _open_torchvision(root: Path, spec: DataSpec) -> Dataset:
    batches = sorted((root / TORCHVISION_DIR).glob("data_batch_*"))
    ids, labels, sizes = [], [], []
    for batch in batches:
        batch_labels = _read_batch(batch)["labels"]
        ids += [f"{batch.name}:{i}" for i in range(len(batch_labels))]
        labels += batch_labels
        sizes += [batch.stat().st_size] * len(batch_labels)
    labels = np.asarray(labels, dtype=np.int64)
    order = np.argsort(labels, kind="stable")  # class-major, file order within a class
    return Dataset(spec, root, "torchvision", tuple(ids[i] for i in order), labels[order],
                   np.asarray(sizes, dtype=np.int64)[order])


def split_indices(labels: np.ndarray, spec: DataSpec) -> dict[str, np.ndarray]:
    """Index arrays of the four splits for a dataset in the fixed order (DESIGN.md)."""
    train, val = [], []
    for label, name in enumerate(spec.classes):
        members = np.flatnonzero(labels == label)
        n_val = spec.val_count(len(members))
        if len(members) < max(MIN_PER_CLASS, n_val + 1):
            raise DatasetError(f"class {name} has {len(members)} images; the split needs "
                               f"at least {max(MIN_PER_CLASS, n_val + 1)}")
        train.append(members[:-n_val])
        val.append(members[-n_val:])
    val_all = np.concatenate(val)
    return {"train": np.concatenate(train), "val": val_all,
            **{half: val_all[at] for half, at in HALVES.items()}}


def get_split(spec: DataSpec, name: str, dataset: Dataset | None = None) -> Split:
    """One of ``SPLITS`` of ``dataset`` (default: ``open_dataset(spec)``)."""
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; choose from {SPLITS}")
    dataset = dataset if dataset is not None else open_dataset(spec)
    return Split(dataset, name, split_indices(dataset.labels, spec)[name])


def test_split(directory: str | Path, spec: DataSpec) -> Split:
    """Every image of another ImageFolder directory with ``spec``'s classes, as a split named
    ``test``."""
    dataset = open_imagefolder(directory, spec)
    return Split(dataset, "test", np.arange(len(dataset)))


# ---------------------------------------------------------------------------- decoding
def _decode_file(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return decode.to_rgb_array(img, size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(f"{path}: not a readable image ({err}); remove or replace it") from None


def _decode_all(dataset: Dataset, size: int) -> np.ndarray:
    from tqdm import tqdm

    if dataset.kind == "torchvision":
        by_batch = {}
        for batch in sorted((dataset.root / TORCHVISION_DIR).glob("data_batch_*")):
            by_batch[batch.name] = _read_batch(batch)["data"]
        out = np.empty((len(dataset), 32, 32, 3), dtype=np.uint8)
        for i, image_id in enumerate(dataset.ids):
            batch, index = image_id.split(":")
            out[i] = by_batch[batch][int(index)].reshape(3, 32, 32).transpose(1, 2, 0)
        if size != 32:
            out = np.stack([decode.to_rgb_array(Image.fromarray(im), size) for im in out])
        return out
    out = np.empty((len(dataset), size, size, 3), dtype=np.uint8)
    for i, image_id in enumerate(tqdm(dataset.ids, desc=f"decoding {dataset.root.name}",
                                      unit="img", mininterval=1.0, leave=False)):
        out[i] = _decode_file(dataset.root / image_id, size)
    return out


def load_images(dataset: Dataset) -> np.ndarray:
    """(N, size, size, 3) uint8 of the whole dataset, memory-mapped from a disk cache.

    The first call decodes every file once and writes ``<cache>/images/<fingerprint>-<size>.npy``
    atomically; later calls (and other processes) map that file read-only. A cache file that
    cannot be read or holds another shape (a damaged disk) is set aside and decoded again.
    """
    size = dataset.spec.image_size
    directory = dataset.spec.decoded_cache or settings.cache_dir() / "images"
    path = directory / f"{dataset.fingerprint}-{size}.npy"
    images = _map_cached(path, (len(dataset), size, size, 3))
    if images is not None:
        return images
    images = _decode_all(dataset, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.remove_leftovers(path.parent, ".*.tmp")       # what atomic_write leaves when killed
    with files.atomic_write(path) as f:
        np.save(f, images)
    log.info("cached %d decoded images at %s", len(images), path)
    return np.load(path, mmap_mode="r")


def _map_cached(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The decoded images at ``path``, memory-mapped; None when absent or corrupt (set aside)."""
    if not path.exists():
        return None
    try:
        images = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as err:
        files.set_aside(path, f"unreadable, truncated? ({err})")
        return None
    if images.shape != shape or images.dtype != np.uint8:
        files.set_aside(path, f"holds {images.dtype} {images.shape}, not uint8 {shape}")
        return None
    return images


# ---------------------------------------------------------------------------- tensors
def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop after ``pad`` zero pixels on each side, and random horizontal flip.

    Works on a uint8 (B, H, W, C) batch on any device; ``generator`` (a CPU generator)
    makes it reproducible.
    """
    b, h, w, _ = images.shape
    padded = torch.nn.functional.pad(images, (0, 0, pad, pad, pad, pad))  # (B, H+2p, W+2p, C)
    dy = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator).to(images.device)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator).to(images.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(images.device)
    rows = dy + torch.arange(h, device=images.device)  # (B, H)
    cols = dx + torch.arange(w, device=images.device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=images.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)


def batches(images: np.ndarray, labels: np.ndarray, batch_size: int, spec: DataSpec, *,
            generator: torch.Generator | None = None, train: bool = False,
            device: torch.device | str = "cpu",
            shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields (inputs (B, 3, H, W) float, labels (B,) int64).

    With ``train`` the order is shuffled by ``generator``, images are augmented and the last
    incomplete batch is dropped. ``shard=(rank, world)`` keeps every ``world``-th batch
    starting at ``rank`` (data-parallel training: every rank draws the same permutation).
    """
    n = len(labels)
    if train:
        if generator is None:
            raise ValueError("training batches need a generator")
        order = torch.randperm(n, generator=generator).numpy()
        n_batches = n // batch_size
    else:
        order = np.arange(n)
        n_batches = -(-n // batch_size)
    rank, world = shard
    labels_t = torch.as_tensor(np.asarray(labels))
    # One seed per epoch, one generator per batch: every rank draws the same order and the
    # same augmentation for a batch, whichever batches it skips.
    epoch_seed = int(torch.randint(2**62, (1,), generator=generator)) if train else 0
    for k in range(rank, n_batches, world):
        idx = np.sort(order[k * batch_size:(k + 1) * batch_size])
        x = torch.from_numpy(np.ascontiguousarray(images[idx]))
        if train:
            x = augment(x, torch.Generator().manual_seed(epoch_seed + k))
        yield spec.to_tensor(x, device), labels_t[idx].to(device)

"""CIFAR-10 on disk: finding it, the fixed train/validation split, a decoded uint8 cache,
tensor augmentation, and the one preprocessing function for uploaded images (the image
arithmetic behind it is ``dynviz.decode``).

Image order is fixed everywhere: class-major (in ``CLASSES`` order), then sorted file name.
The validation split is the last ``VAL_PER_CLASS`` files of every class; its even positions
form the *fit* half (policies learn there), its odd positions the *check* half.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dynviz import decode, files, settings

log = logging.getLogger(__name__)

CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # per-channel mean of the CIFAR-10 train images
CIFAR_STD = (0.2470, 0.2435, 0.2616)
VAL_PER_CLASS = 500
IMAGE_SIZE = 32
SPLITS = ("train", "val", "fit", "check")
# The formats dynviz reads (PIL's names) and their file suffixes: the ImageFolder file filter,
# the upload page's `type=` and the upload decoder's `formats=` all come from here.
IMAGE_FORMATS = {"JPEG": ("jpg", "jpeg"), "PNG": ("png",), "WEBP": ("webp",), "BMP": ("bmp",),
                 "GIF": ("gif",), "TIFF": ("tif", "tiff")}
IMAGE_SUFFIXES = tuple(f".{s}" for suffixes in IMAGE_FORMATS.values() for s in suffixes)
MAX_UPLOAD_PIXELS = 40_000_000  # refuse to decode larger images (decompression bombs)
# PIL's WebP decoder holds four canvases of 4 bytes a pixel (libwebp's two, allocated when the
# file is opened, the frame's bytes and the image): a quarter of the limit keeps a WebP to
# what a full-size RGB image of another format costs.
MAX_WEBP_PIXELS = MAX_UPLOAD_PIXELS // 4
TORCHVISION_DIR = "cifar-10-batches-py"


class DatasetNotFoundError(FileNotFoundError):
    """No CIFAR-10 copy where we looked; the message says how to get one."""


class InvalidImageError(ValueError):
    """An upload that is not a decodable image of acceptable size."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """Images of one directory in the fixed order.

    Args:
        root: the directory read.
        kind: ``"imagefolder"`` (``<root>/<class>/<file>``) or ``"torchvision"``
            (``<root>/cifar-10-batches-py``).
        ids: per image, its path relative to ``root`` (or ``batch:index``).
        labels: (N,) int64 index into ``CLASSES``.
        sizes: (N,) int64 file size in bytes (for the fingerprint).
    """
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
    def ids(self) -> list[str]:
        return [self.dataset.ids[i] for i in self.indices]

    @property
    def labels(self) -> np.ndarray:
        return self.dataset.labels[self.indices]

    @property
    def fingerprint(self) -> str:
        return _fingerprint(self.ids, self.dataset.sizes[self.indices])

    def images(self, size: int = IMAGE_SIZE) -> np.ndarray:
        """(N, size, size, 3) uint8, read from the decoded cache."""
        return load_images(self.dataset, size)[self.indices]


def _fingerprint(ids: list[str] | tuple[str, ...], sizes: np.ndarray) -> str:
    digest = hashlib.sha256()
    for name, size in zip(ids, sizes.tolist()):
        digest.update(f"{name}\t{size}\n".encode())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------- finding
def missing_data_message() -> str:
    looked = "\n".join(f"  - {p}" for p in settings.data_candidates())
    return (
        "CIFAR-10 was not found. Looked in:\n" + looked + "\n"
        "Fix one of:\n"
        "  - set DYNVIZ_DATA to a directory holding train/<class>/*.jpg "
        "(or torchvision's cifar-10-batches-py);\n"
        "  - run `python -m dynviz data --download` on a machine with internet access."
    )


def _looks_like_cifar(root: Path) -> bool:
    return (root / "train").is_dir() or (root / TORCHVISION_DIR).is_dir()


def find_root() -> Path:
    """The first dataset root in ``settings.data_candidates()`` that holds CIFAR-10. A
    ``$DYNVIZ_DATA`` that holds none is an error, not a reason to look elsewhere: whoever set
    it meant that copy."""
    chosen = os.environ.get("DYNVIZ_DATA")
    if chosen and not _looks_like_cifar(Path(chosen).expanduser()):
        raise DatasetNotFoundError(
            f"DYNVIZ_DATA={chosen} holds no CIFAR-10: expected {chosen}/train/<class>/*.jpg or "
            f"{chosen}/{TORCHVISION_DIR}. Fix the path, or unset DYNVIZ_DATA to use "
            "./data or ../shared/datasets/cifar10-jpeg.")
    for candidate in settings.data_candidates():
        if _looks_like_cifar(candidate):
            return candidate
    raise DatasetNotFoundError(missing_data_message())


def open_imagefolder(directory: str | Path) -> Dataset:
    """Every image under ``directory/<class>/``; class folders must be CIFAR-10 class names."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetNotFoundError(f"{directory} is not a directory")
    class_dirs = sorted(p for p in directory.iterdir() if p.is_dir())
    unknown = [p.name for p in class_dirs if p.name not in CLASSES]
    if unknown or not class_dirs:
        raise ValueError(f"{directory}: expected sub-folders named after the CIFAR-10 classes "
                         f"{', '.join(CLASSES)}; found {[p.name for p in class_dirs]}")
    ids, labels, sizes = [], [], []
    for label, name in enumerate(CLASSES):
        if not (directory / name).is_dir():
            continue
        entries = sorted((e for e in os.scandir(directory / name)
                          if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)),
                         key=lambda e: e.name)
        ids += [f"{name}/{e.name}" for e in entries]
        sizes += [e.stat().st_size for e in entries]
        labels += [label] * len(entries)
    if not ids:
        raise ValueError(f"{directory}: no image files in the class folders")
    return Dataset(directory, "imagefolder", tuple(ids), np.asarray(labels, dtype=np.int64),
                   np.asarray(sizes, dtype=np.int64))


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
            raise ValueError(f"{path} is not a CIFAR-10 batch: {err}") from None
    if not isinstance(batch, dict) or not {"data", "labels"} <= batch.keys():
        raise ValueError(f"{path} is not a CIFAR-10 batch: it holds no data and labels")
    return batch


def _open_torchvision(root: Path) -> Dataset:
    batches = sorted((root / TORCHVISION_DIR).glob("data_batch_*"))
    ids, labels, sizes = [], [], []
    for batch in batches:
        batch_labels = _read_batch(batch)["labels"]
        ids += [f"{batch.name}:{i}" for i in range(len(batch_labels))]
        labels += batch_labels
        sizes += [batch.stat().st_size] * len(batch_labels)
    labels = np.asarray(labels, dtype=np.int64)
    order = np.argsort(labels, kind="stable")  # class-major, file order within a class
    return Dataset(root, "torchvision", tuple(ids[i] for i in order), labels[order],
                   np.asarray(sizes, dtype=np.int64)[order])


def open_cifar10(root: str | Path | None = None) -> Dataset:
    """The CIFAR-10 train images at ``root`` (default: ``find_root()``)."""
    root = Path(root) if root is not None else find_root()
    if (root / "train").is_dir():
        return open_imagefolder(root / "train")
    if (root / TORCHVISION_DIR).is_dir():
        return _open_torchvision(root)
    raise DatasetNotFoundError(f"{root} holds neither train/<class>/ nor {TORCHVISION_DIR}/\n"
                               + missing_data_message())


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Index arrays of the four splits for a dataset in the fixed order (DESIGN.md)."""
    train, val = [], []
    for label in range(len(CLASSES)):
        members = np.flatnonzero(labels == label)
        if len(members) <= VAL_PER_CLASS:
            raise ValueError(f"class {CLASSES[label]} has {len(members)} images; the split "
                             f"needs more than {VAL_PER_CLASS}")
        train.append(members[:-VAL_PER_CLASS])
        val.append(members[-VAL_PER_CLASS:])
    val_all = np.concatenate(val)
    return {"train": np.concatenate(train), "val": val_all,
            "fit": val_all[0::2], "check": val_all[1::2]}


def get_split(name: str, dataset: Dataset | None = None) -> Split:
    """One of ``SPLITS`` of CIFAR-10 (default: the copy ``find_root()`` finds)."""
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; choose from {SPLITS}")
    dataset = dataset if dataset is not None else open_cifar10()
    return Split(dataset, name, split_indices(dataset.labels)[name])


def test_split(directory: str | Path) -> Split:
    """Every image of another ImageFolder directory, as a split named ``test``."""
    dataset = open_imagefolder(directory)
    return Split(dataset, "test", np.arange(len(dataset)))


# ---------------------------------------------------------------------------- decoding
def _decode_file(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as img:
        return decode.to_rgb_array(img, size)


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


def load_images(dataset: Dataset, size: int = IMAGE_SIZE) -> np.ndarray:
    """(N, size, size, 3) uint8 of the whole dataset, memory-mapped from a disk cache.

    The first call decodes every file once and writes ``<cache>/images/<fingerprint>-<size>.npy``
    atomically; later calls (and other processes) map that file read-only. A cache file that
    cannot be read or holds another shape (a damaged disk) is set aside and decoded again.
    """
    path = settings.cache_dir() / "images" / f"{dataset.fingerprint}-{size}.npy"
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
def to_tensor(images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised float32 (N, 3, H, W) in channels_last memory."""
    if not torch.is_tensor(images):
        array = np.asarray(images)
        images = torch.from_numpy(array if array.flags.writeable else array.copy())
    x = images
    x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(CIFAR_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


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


def batches(images: np.ndarray, labels: np.ndarray, batch_size: int, *,
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
        yield to_tensor(x, device), labels_t[idx].to(device)


# ---------------------------------------------------------------------------- uploads
def _refuse_if_too_large(declared: tuple[int, int], decoded: tuple[int, int], limit: int,
                         what: str = "") -> None:
    """``decoded``: the size decoding allocates (a JPEG may decode at 1/2, 1/4 or 1/8)."""
    if decoded[0] * decoded[1] <= limit:
        return
    scaled = "" if decoded == declared else f" ({decoded[0]}×{decoded[1]} as decoded)"
    raise InvalidImageError(f"the image is {declared[0]}×{declared[1]} pixels{scaled}; the limit "
                            f"{what}is {limit / 1e6:.0f} megapixels")


def preprocess_upload(data: bytes | BinaryIO, size: int = IMAGE_SIZE) -> np.ndarray:
    """Bytes of an uploaded image -> (size, size, 3) uint8 as the model sees it.

    Only ``IMAGE_FORMATS`` are opened, and only the first frame is decoded (later frames are
    never read, whatever size they declare). Its size is held to ``MAX_UPLOAD_PIXELS`` before
    decoding, and again after. A JPEG decodes at the smallest scale (1/2, 1/4, 1/8) that keeps
    ``decode.REDUCING_GAP × size`` pixels on its short side; ``decode.to_rgb_array`` then
    shrinks without full-size copies: an upload costs one decoded image at its own bit depth
    plus bands.
    WebP is the exception (four canvases, see ``MAX_WEBP_PIXELS``); its size is read from its
    header before PIL opens it.

    Raises:
        InvalidImageError: empty, not an image of those formats (text, SVG, ICO), truncated or
            corrupt, or larger than ``MAX_UPLOAD_PIXELS`` as decoded (``MAX_WEBP_PIXELS``).
    """
    raw = data if isinstance(data, bytes) else data.read()
    if not raw:
        raise InvalidImageError("the file is empty")
    if webp := decode.webp_size(raw):
        _refuse_if_too_large(webp, webp, MAX_WEBP_PIXELS, "for WebP ")
    try:
        # no warning filter around this: filters are process-wide, and changing them per
        # upload races with every other session (PIL may warn about an image that our own,
        # lower, pixel limit then refuses)
        img = Image.open(io.BytesIO(raw), formats=list(IMAGE_FORMATS))
        with img:
            declared = img.size
            if min(declared) < 1:
                raise InvalidImageError("the image has no pixels")
            gap = decode.REDUCING_GAP
            drafted = img.draft("RGB", (gap * size, gap * size))   # JPEG only
            _refuse_if_too_large(declared, img.size, MAX_UPLOAD_PIXELS)
            img.load()
            _refuse_if_too_large(declared, img.size, MAX_UPLOAD_PIXELS)   # as decoded
            return decode.to_rgb_array(img, size, drafted[1][2:] if drafted else None)
    except InvalidImageError:
        raise
    except UnidentifiedImageError:
        raise InvalidImageError("this is not an image format we can read "
                                f"({', '.join(IMAGE_FORMATS)})") from None
    except Image.DecompressionBombError as err:
        raise InvalidImageError(f"the image is too large to decode safely: {err}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise InvalidImageError(f"the image could not be decoded (truncated or corrupt): "
                                f"{err}") from None


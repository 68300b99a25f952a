"""``dynviz init``: a starter workspace for an ImageFolder — its classes, input size,
normalisation and split, and the default systems, each with the command that trains it."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from dynviz import data, decode, recipes, settings, workspace

log = logging.getLogger(__name__)

MAX_IMAGE_SIZE = 64       # the default input side is capped: the default systems train on CPU
SIZE_SAMPLE = 20          # images per class whose sides set the default input size
STATS_SAMPLE = 5000       # at most this many train images (evenly spaced) set mean and std
MIN_STEPS = 4             # batches an epoch the default recipes get at least

# the default systems: name, kind, the TOML lines after kind, the recipe that trains it
# (None: no training of its own) and what the comment above it adds
SYSTEMS = (
    ("resnet8", "static", 'model = "resnet8"\ncheckpoint = "resnet8"', "resnet8", ""),
    ("resnet20", "static", 'model = "resnet20"\ncheckpoint = "resnet20"', "resnet20", ""),
    ("resnet56", "static", 'model = "resnet56"\ncheckpoint = "resnet56"', "resnet56", ""),
    # kd16's L1 pull works at any input size; lcnet_resnet56_ste's MAC target is CIFAR's
    ("lcnet_resnet56", "gated", 'model = "lcnet_resnet56"\ncheckpoint = "lcnet_resnet56_kd16"',
     "lcnet_resnet56_kd16", "     (after resnet56: it starts from it)"),
    ("exits_resnet56", "exits", 'model = "exits_resnet56"\ncheckpoint = "exits_resnet56"',
     "exits_resnet56", "          (after resnet56: it starts from it)"),
    ("cascade_r8_r20_r56", "cascade",
     'members = ["resnet8", "resnet20", "resnet56"]\ntopology = "jump"', None,
     "no training of its own: it runs its members"),
)
TRAINED = tuple(recipe for *_, recipe, _ in SYSTEMS if recipe)


def classes_of(root: Path) -> tuple[str, ...]:
    """The class folders of the ImageFolder ``root``, sorted by name; one clear error for a
    folder that is not one (missing, fewer than 2 classes, a class without enough images)."""
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    classes = tuple(data.class_folders(root))
    if len(classes) < 2:
        raise ValueError(f"{root} has {len(classes)} class folder(s); an ImageFolder needs at "
                         f"least 2 (<root>/<class>/<image>)")
    for name in classes:
        n = len(data.image_files(root / name))
        if n < data.MIN_PER_CLASS:
            raise ValueError(f"class {name} has {n} images in {root / name}; every class needs "
                             f"at least {data.MIN_PER_CLASS} ({', '.join(decode.IMAGE_SUFFIXES)})")
    return classes


def median_side(root: Path, classes: tuple[str, ...]) -> int:
    """The median short side of the first ``SIZE_SAMPLE`` images of every class (headers
    only: nothing is decoded)."""
    sides = []
    for name in classes:
        for entry in data.image_files(root / name)[:SIZE_SAMPLE]:
            try:
                with Image.open(entry.path) as img:
                    sides.append(min(img.size))
            except OSError:
                continue                       # unreadable files fail later, when decoded
    if not sides:
        raise ValueError(f"no readable image in {root}")
    return int(np.median(sides))


def channel_stats(dataset: data.Dataset, indices: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of images scaled to [0, 1], over ``indices`` (at most
    ``STATS_SAMPLE`` of them, evenly spaced)."""
    if len(indices) > STATS_SAMPLE:
        indices = indices[np.linspace(0, len(indices) - 1, STATS_SAMPLE).astype(int)]
    images = data.load_images(dataset)
    total = np.zeros(3)
    squares = np.zeros(3)
    for start in range(0, len(indices), 512):
        chunk = np.asarray(images[indices[start:start + 512]], dtype=np.float64) / 255.0
        total += chunk.sum(axis=(0, 1, 2))
        squares += (chunk ** 2).sum(axis=(0, 1, 2))
    count = len(indices) * images.shape[1] * images.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean ** 2, 1e-12))
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


def starter(directory: str | Path, data_root: str | Path, image_size: int | None = None,
            force: bool = False) -> Path:
    """Write ``directory/dynviz.toml`` for the ImageFolder ``data_root`` and return its path.

    Reads the classes (folder names), sets the input size (``image_size``, default the
    median short side capped at ``MAX_IMAGE_SIZE``), decodes the images once into the
    workspace's cache and computes mean and std on the train split.

    Raises:
        ValueError: not an ImageFolder of at least 2 classes of at least 20 images, a size
            out of range, or a ``dynviz.toml`` already there (without ``force``).
    """
    directory = Path(directory).expanduser().resolve()
    data_root = Path(data_root).expanduser().resolve()
    target = directory / workspace.FILE
    if target.exists() and not force:
        raise ValueError(f"{target} exists; add --force to write over it")
    classes = classes_of(data_root)
    size = image_size or min(MAX_IMAGE_SIZE, max(8, median_side(data_root, classes)))
    if not 8 <= size <= 1024:
        raise ValueError(f"--image-size {size} is outside 8..1024")
    spec = data.DataSpec((data_root,), classes, size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
                         decoded_cache=directory / ".cache" / "images")
    dataset = data.open_dataset(spec)
    splits = data.split_indices(dataset.labels, spec)
    mean, std = channel_stats(dataset, splits["train"])
    directory.mkdir(parents=True, exist_ok=True)
    target.write_text(_toml(directory, data_root, classes, size, mean, std,
                            {k: len(v) for k, v in splits.items()}), encoding="utf-8")
    workspace.load(directory)        # what was written reads back
    return target


def _shown(path: Path, directory: Path) -> str:
    """``path`` relative to the workspace when it lies inside it, else absolute."""
    try:
        return path.relative_to(directory).as_posix()
    except ValueError:
        return str(path)


def _list(values) -> str:
    return "[" + ", ".join(_quoted(v) if isinstance(v, str) else repr(v) for v in values) + "]"


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def smaller_batches(n_train: int) -> dict[str, dict[str, int | float]]:
    """The default recipes whose batch gives fewer than ``MIN_STEPS`` batches an epoch of
    ``n_train`` images, each with what to change: the largest power of 2 that gives that many
    (at least 1) and its learning rates scaled in proportion."""
    fitting = 1 << max(0, (n_train // MIN_STEPS).bit_length() - 1)
    changes = {}
    for name in TRAINED:
        recipe = recipes.RECIPES[name]
        if n_train // recipe.batch_size < MIN_STEPS:
            scale = fitting / recipe.batch_size
            changes[name] = {"batch_size": fitting, "peak_lr": recipe.peak_lr * scale}
            if recipe.gate_lr is not None:
                changes[name]["gate_lr"] = recipe.gate_lr * scale
    return changes


def _recipe_tables(n_train: int) -> str:
    smaller = smaller_batches(n_train)
    if not smaller:
        return ""
    tables = "\n".join(f'[recipes.{name}]\nbase = "{name}"\n' + "".join(
        f"{key} = {value!r}\n" for key, value in changes.items())
        for name, changes in smaller.items())
    return (f"\n# The built-in recipes train in batches of "
            f"{recipes.RECIPES[TRAINED[0]].batch_size}, too large for {n_train} training "
            f"images;\n# these tables keep their other fields, with smaller batches and the "
            f"learning rates scaled with them.\n{tables}")


def _toml(directory: Path, root: Path, classes, size, mean, std, counts) -> str:
    command = settings.command("train", directory)
    blocks = "\n".join(
        f"# {f'{command} {recipe}{note}' if recipe else note}\n[systems.{name}]\n"
        f"kind = \"{kind}\"\n{body}\n"
        for name, kind, body, recipe, note in SYSTEMS)
    return f"""# A dynviz workspace, written by `dynviz init`; relative paths are from this file.
# Train a system with the command above it, then `{command.removesuffix(" train")} ship`
# (or serve the app with DYNVIZ_WORKSPACE set to this directory).
name = {_quoted(directory.name)}
reference = "resnet56"        # speedups and accuracy losses are measured against this system

[data]
root = {_quoted(_shown(root, directory))}
classes = {_list(classes)}
image_size = {size}
# per channel, over the train split (images scaled to [0, 1])
mean = {_list(mean)}
std = {_list(std)}
# validation: the last 10% of every class's files by sorted name, halved into fit/check
# (train {counts['train']}, fit {counts['fit']}, check {counts['check']} images)
val_fraction = 0.1

{blocks}{_recipe_tables(counts['train'])}"""

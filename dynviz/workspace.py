"""A workspace: a dataset, the systems built on it, and the directories dynviz writes beside
its ``dynviz.toml`` (checkpoints, caches, results).

The repository root is the built-in workspace (the CIFAR-10 zoo); any other directory with a
``dynviz.toml`` is a workspace of one's own (``python -m dynviz init`` writes a starter file).
Relative paths in the file are relative to its directory. Every function that needs the
dataset or the systems takes the ``Workspace`` it works on; ``resolve`` picks it once per
command (``--workspace``, else ``$DYNVIZ_WORKSPACE``, else the built-in one).
"""
from __future__ import annotations

import functools
import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

import models
from dynviz import data as _data
from dynviz import settings
from dynviz.data import DataSpec

FILE = "dynviz.toml"
KINDS = ("static", "gated", "exits", "cascade")
TOPOLOGIES = ("chain", "jump")


class WorkspaceError(ValueError):
    """A workspace that cannot be used: no ``dynviz.toml``, or a key missing or malformed.
    The message is one line naming the file and the key."""


@dataclass(frozen=True)
class SystemSpec:
    """Args:
        name: the system's name.
        kind: one of ``KINDS``.
        model: registry name (None for a program or a cascade).
        weights: (submodule path, checkpoint name) pairs; "" loads into the whole model.
        model_args: overrides for ``models.create`` (the workspace adds its classes and size).
        program: a ``torch.export`` file (``.pt2``) that is the whole system.
        members: a cascade's systems, cheapest first.
        topology: ``"chain"`` or ``"jump"`` (cascades may jump to the last network).
    """
    name: str
    kind: str
    model: str | None = None
    weights: tuple[tuple[str, str], ...] = ()
    model_args: tuple[tuple[str, object], ...] = ()
    program: Path | None = None
    members: tuple[str, ...] = ()
    topology: str = "chain"

    @property
    def checkpoints(self) -> list[str]:
        return [ckpt for _, ckpt in self.weights]


@dataclass(frozen=True, eq=False)
class Workspace:
    """Args:
        root: the directory holding ``dynviz.toml``.
        data: the dataset.
        systems: by name, in the file's order.
        reference: the static system speedups and accuracy losses are measured against.
        featured: the system the app's pickers start on, when it is trained.
        checkpoints, results, cache: where trained weights, shipped caches and policies
            (``outputs/``, ``policies/``, ``results.json``), and local caches live.
        builtin: the repository's own CIFAR-10 zoo (its shipped checkpoints are guarded).
    """
    root: Path
    data: DataSpec
    systems: dict[str, SystemSpec]
    reference: str
    featured: str | None
    checkpoints: Path
    results: Path
    cache: Path
    builtin: bool = False
    name: str = field(default="")

    def spec(self, name: str) -> SystemSpec:
        try:
            return self.systems[name]
        except KeyError:
            raise KeyError(f"unknown system {name!r}; choose from "
                           f"{', '.join(self.systems)}") from None

    def dataset(self) -> _data.Dataset:
        """Every image of the workspace's dataset, in the fixed order."""
        return _data.open_dataset(self.data)

    def split(self, name: str, dataset: _data.Dataset | None = None) -> _data.Split:
        """One of ``data.SPLITS`` (of ``dataset``, default: ``self.dataset()``)."""
        return _data.get_split(self.data, name, dataset)

    def program_path(self, spec: SystemSpec) -> Path:
        return _path(self.root, spec.program)

    def command(self, args: str) -> str:
        """The command line that runs ``python -m dynviz ARGS`` in this workspace."""
        return settings.command(args, None if self.builtin else self.root)


def resolve(directory: str | Path | None = None) -> Workspace:
    """The workspace at ``directory``, else ``$DYNVIZ_WORKSPACE``, else the built-in one."""
    directory = directory or os.environ.get("DYNVIZ_WORKSPACE")
    if not directory or Path(directory).expanduser().resolve() == settings.PROJECT_ROOT:
        return builtin()           # the repository itself: its overrides and guards apply
    return load(directory)


def builtin() -> Workspace:
    """The repository's CIFAR-10 zoo; ``DYNVIZ_DATA``, ``DYNVIZ_CHECKPOINTS``,
    ``DYNVIZ_ASSETS`` and ``DYNVIZ_CACHE`` redirect its directories (see ``settings``).

    Raises:
        WorkspaceError: dynviz was installed without its repository (not editable), so
            there is no built-in zoo: a workspace must be named."""
    if not (settings.PROJECT_ROOT / FILE).is_file():
        raise WorkspaceError(
            f"the built-in CIFAR-10 zoo lives in a checkout of the dynviz repository "
            f"(installed with `pip install -e .`), and {settings.PROJECT_ROOT} is not one: "
            f"pass --workspace DIR or set DYNVIZ_WORKSPACE (`dynviz init` makes one)")
    ws = load(settings.PROJECT_ROOT)
    roots = ws.data.roots
    if os.environ.get("DYNVIZ_DATA"):
        roots = (Path(os.environ["DYNVIZ_DATA"]).expanduser(),)
    cache = settings.env_path("DYNVIZ_CACHE", ws.cache)
    return replace(ws, data=replace(ws.data, roots=roots, decoded_cache=cache / "images"),
                   builtin=True, cache=cache,
                   checkpoints=settings.env_path("DYNVIZ_CHECKPOINTS", ws.checkpoints),
                   results=settings.env_path("DYNVIZ_ASSETS", ws.results))


def load(directory: str | Path) -> Workspace:
    """The workspace whose ``dynviz.toml`` is in ``directory``.

    Raises:
        WorkspaceError: no such file, not TOML, or a key missing or malformed (named).
    """
    root = Path(directory).expanduser().resolve()
    path = root / FILE
    if not path.is_file():
        hint = (f"; create one with `dynviz init {directory} --data IMAGEFOLDER`"
                if root.is_dir() or not root.exists() else "")
        raise WorkspaceError(f"{path} does not exist{hint}")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise WorkspaceError(f"{path} is not valid TOML: {err}") from None
    read = _Reader(path)
    read.known(doc, ("name", "reference", "featured", "data", "paths", "systems", "recipes"))
    data_table = read.table(doc, "data")
    data = _data_spec(read, root, data_table)
    systems_table = read.table(doc, "systems")
    if not systems_table:
        raise WorkspaceError(f"{path}: [systems] lists no system")
    systems = {name: _system(read, name, read.table(systems_table, name, f"systems.{name}"))
               for name in systems_table}
    for spec in systems.values():
        _check_model(read, spec, data)
    for spec in systems.values():
        for member in spec.members:
            if member not in systems:
                raise WorkspaceError(f"{path}: systems.{spec.name}.members names {member!r}, "
                                     f"which is not a system here")
            if systems[member].kind == "cascade":
                raise WorkspaceError(f"{path}: systems.{spec.name}.members: {member!r} is a "
                                     f"cascade; members are single systems")
    reference = read.string(doc, "reference", default=next(iter(systems)))
    if reference not in systems:
        raise WorkspaceError(f"{path}: reference = {reference!r} is not a system here")
    if systems[reference].kind not in ("static", "gated"):
        raise WorkspaceError(f"{path}: reference = {reference!r} is a {systems[reference].kind} "
                             f"system; the reference is a static (or gated) network")
    featured = read.string(doc, "featured", default=None)
    if featured is not None and featured not in systems:
        raise WorkspaceError(f"{path}: featured = {featured!r} is not a system here")
    paths = read.table(doc, "paths", default={})
    read.known(paths, ("checkpoints", "results", "cache"), "paths.")
    cache = _path(root, read.string(paths, "cache", ".cache", "paths.cache"))
    return Workspace(
        root, replace(data, decoded_cache=cache / "images"), systems, reference, featured,
        checkpoints=_path(root, read.string(paths, "checkpoints", "checkpoints",
                                            "paths.checkpoints")),
        results=_path(root, read.string(paths, "results", "results", "paths.results")),
        cache=cache, name=read.string(doc, "name", default=root.name))


def _path(root: Path, value: str | Path) -> Path:
    value = Path(value).expanduser()
    return value if value.is_absolute() else root / value


def _data_spec(read: _Reader, root: Path, table: dict) -> DataSpec:
    raw_root = table.get("root")
    if raw_root is None:
        raise WorkspaceError(f"{read.path}: data.root is missing (the ImageFolder directory)")
    roots = [raw_root] if isinstance(raw_root, str) else raw_root
    if not isinstance(roots, list) or not roots or not all(isinstance(r, str) for r in roots):
        raise WorkspaceError(f"{read.path}: data.root must be a path or a list of paths")
    classes = read.strings(table, "classes", "data.classes")
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise WorkspaceError(f"{read.path}: data.classes must name at least 2 distinct classes")
    size = read.number(table, "image_size", "data.image_size", integer=True)
    if not 8 <= size <= 1024:
        raise WorkspaceError(f"{read.path}: data.image_size = {size} is outside 8..1024")
    mean = read.triple(table, "mean", "data.mean")
    std = read.triple(table, "std", "data.std")
    if min(std) <= 0:
        raise WorkspaceError(f"{read.path}: data.std must be positive")
    layout = read.string(table, "layout", "imagefolder", "data.layout")
    if layout not in ("imagefolder", "cifar10"):
        raise WorkspaceError(f"{read.path}: data.layout must be imagefolder or cifar10")
    fraction = float(read.number(table, "val_fraction", "data.val_fraction", default=0.1))
    if not 0 < fraction < 1:
        raise WorkspaceError(f"{read.path}: data.val_fraction must be between 0 and 1")
    per_class = table.get("val_per_class")
    if per_class is not None:
        per_class = read.number(table, "val_per_class", "data.val_per_class", integer=True)
    unknown = set(table) - {"root", "classes", "image_size", "mean", "std", "layout",
                            "val_fraction", "val_per_class"}
    if unknown:
        raise WorkspaceError(f"{read.path}: unknown key data.{sorted(unknown)[0]}")
    return DataSpec(tuple(_path(root, r) for r in roots), tuple(classes), size, mean, std,
                    layout, fraction, per_class)


_SYSTEM_KEYS = {"kind", "model", "checkpoint", "weights", "args", "program", "members",
                "topology"}


def _system(read: _Reader, name: str, table: dict) -> SystemSpec:
    where = f"systems.{name}"
    unknown = set(table) - _SYSTEM_KEYS
    if unknown:
        raise WorkspaceError(f"{read.path}: unknown key {where}.{sorted(unknown)[0]}")
    kind = read.string(table, "kind", where=f"{where}.kind")
    if kind not in KINDS:
        raise WorkspaceError(f"{read.path}: {where}.kind = {kind!r}; choose from "
                             f"{', '.join(KINDS)}")
    args = tuple(read.table(table, "args", f"{where}.args", default={}).items())
    if kind == "cascade":
        members = read.strings(table, "members", f"{where}.members")
        if len(members) < 2:
            raise WorkspaceError(f"{read.path}: {where}.members must list at least 2 systems")
        topology = read.string(table, "topology", "chain", f"{where}.topology")
        if topology not in TOPOLOGIES:
            raise WorkspaceError(f"{read.path}: {where}.topology must be chain or jump")
        return SystemSpec(name, kind, members=tuple(members), topology=topology)
    program = read.string(table, "program", None, f"{where}.program")
    if program is not None:
        if kind != "static" or "model" in table:
            raise WorkspaceError(f"{read.path}: {where}.program is a static system of its own "
                                 f"(kind = \"static\", no model)")
        return SystemSpec(name, kind, program=Path(program))
    model = read.string(table, "model", where=f"{where}.model")
    weights = read.table(table, "weights", f"{where}.weights", default=None)
    if weights is not None:             # several checkpoints, one per submodule
        pairs = tuple((module, read.string(weights, module, where=f"{where}.weights.{module}"))
                      for module in weights)
    else:
        pairs = (("", read.string(table, "checkpoint", where=f"{where}.checkpoint")),)
    return SystemSpec(name, kind, model, pairs, args)


def _check_model(read: _Reader, spec: SystemSpec, data: DataSpec) -> None:
    """Build ``spec``'s registry model without memory (meta tensors): an unknown model, an
    argument it does not take, or a model of another kind fails here, naming the key."""
    if spec.model is None:
        return
    where = f"systems.{spec.name}"
    if spec.model not in models.names():
        raise WorkspaceError(f"{read.path}: {where}.model = {spec.model!r} is not a registered "
                             f"model (python -c 'import models; print(models.names())')")
    args = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in spec.model_args)
    try:
        kind = model_kind(spec.model, args, data.n_classes, data.image_size)
    except (TypeError, ValueError, KeyError) as err:
        raise WorkspaceError(f"{read.path}: {where}.args do not fit {spec.model} "
                             f"({' '.join(str(err).split())})") from None
    if kind != spec.kind:
        raise WorkspaceError(f"{read.path}: {where}.kind = {spec.kind!r}, but {spec.model} is "
                             f"a {kind} model")
    net = _meta_model(spec.model, args, data.n_classes, data.image_size)
    parts = {name for name, _ in net.named_modules() if name}
    for part, _ in spec.weights:
        if part and part not in parts:
            top = ", ".join(name for name, _ in net.named_children())
            raise WorkspaceError(f"{read.path}: {where}.weights: {spec.model} has no part "
                                 f"{part!r} (its top-level parts: {top})")


@functools.lru_cache(maxsize=256)
def _meta_model(model: str, args: tuple, n_classes: int, image_size: int) -> torch.nn.Module:
    """The registry model on the meta device: its structure, no memory."""
    with torch.device("meta"):
        return models.create(model, num_classes=n_classes, input_size=image_size, **dict(args))


def model_kind(model: str, args: tuple = (), n_classes: int = 10, image_size: int = 32) -> str:
    """What a registry model is: ``gated`` (LC-Net), ``exits`` (several stages) or
    ``static``; told from the model built on the meta device."""
    net = _meta_model(model, args, n_classes, image_size)
    if hasattr(net, "plain_macs"):                  # a GatedResNet
        return "gated"
    return "exits" if net.n_stages > 1 else "static"



class _Reader:
    """Typed reads of a parsed TOML document that name the key on failure."""

    _MISSING = object()

    def __init__(self, path: Path):
        self.path = path

    def _get(self, table: dict, key: str, where: str, default):
        if key in table:
            return table[key]
        if default is self._MISSING:
            raise WorkspaceError(f"{self.path}: {where} is missing")
        return default

    def known(self, table: dict, keys: tuple[str, ...], prefix: str = "") -> None:
        unknown = sorted(set(table) - set(keys))
        if unknown:
            raise WorkspaceError(f"{self.path}: unknown key {prefix}{unknown[0]} (known: "
                                 f"{', '.join(keys)})")

    def table(self, table: dict, key: str, where: str | None = None, default=_MISSING) -> dict:
        value = self._get(table, key, where or key, default)
        if value is not default and not isinstance(value, dict):
            raise WorkspaceError(f"{self.path}: {where or key} must be a table")
        return value

    def string(self, table: dict, key: str, default=_MISSING, where: str | None = None):
        value = self._get(table, key, where or key, default)
        if value is not default and not isinstance(value, str):
            raise WorkspaceError(f"{self.path}: {where or key} must be a string")
        return value

    def strings(self, table: dict, key: str, where: str) -> list[str]:
        value = self._get(table, key, where, self._MISSING)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise WorkspaceError(f"{self.path}: {where} must be a list of strings")
        return value

    def number(self, table: dict, key: str, where: str, default=_MISSING,
               integer: bool = False):
        value = self._get(table, key, where, default)
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok:
            raise WorkspaceError(f"{self.path}: {where} must be "
                                 f"{'an integer' if integer else 'a number'}")
        return value

    def triple(self, table: dict, key: str, where: str) -> tuple[float, float, float]:
        value = self._get(table, key, where, self._MISSING)
        if (not isinstance(value, list) or len(value) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                           for v in value)):
            raise WorkspaceError(f"{self.path}: {where} must be a list of 3 numbers "
                                 f"(red, green, blue)")
        return tuple(float(v) for v in value)

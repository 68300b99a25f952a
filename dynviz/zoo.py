"""The default systems: which registry model, which trained checkpoints, which topology.

A system is what the app and ``python -m dynviz evaluate`` show: a static network, a gated
network, an early-exit network or a cascade, built from checkpoints in
``settings.checkpoint_dir()`` (``NAME.pt`` weights + ``NAME.json`` manifest).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import models
from dynviz import cache, data, files, settings

log = logging.getLogger(__name__)

KINDS = ("static", "gated", "exits", "cascade")


class MissingCheckpointError(FileNotFoundError):
    """A system needs a checkpoint that has not been trained; the message says how."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded (truncated, corrupt, holding more than tensors and
    plain data, or weights of another model); the message names the file and how to restore
    it."""


@dataclass(frozen=True)
class SystemSpec:
    """Args:
        name: the system's name.
        kind: one of ``KINDS``.
        model: registry name.
        weights: (submodule path, checkpoint name) pairs; "" loads into the whole model.
        model_args: overrides for ``models.create``.
        topology: ``"chain"`` or ``"jump"`` (cascades may jump to the last network).
    """
    name: str
    kind: str
    model: str
    weights: tuple[tuple[str, str], ...]
    model_args: tuple[tuple[str, object], ...] = ()
    topology: str = "chain"

    @property
    def checkpoints(self) -> list[str]:
        return [ckpt for _, ckpt in self.weights]


def _static(name: str) -> SystemSpec:
    return SystemSpec(name, "static", name, (("", name),))


SYSTEMS: dict[str, SystemSpec] = {s.name: s for s in (
    _static("resnet8"),
    _static("resnet20"),
    _static("resnet56"),
    SystemSpec("lcnet_resnet20", "gated", "lcnet_resnet20", (("", "lcnet_resnet20"),)),
    # lcnet_resnet56_kd16: savings in skipped blocks, learning from resnet56, 16 epochs (see
    # dynviz/recipes.py)
    SystemSpec("lcnet_resnet56_seq", "gated", "lcnet_resnet56",
               (("", "lcnet_resnet56_kd16"),), (("placement", "sequential"),)),
    SystemSpec("lcnet_resnet56_par", "gated", "lcnet_resnet56",
               (("", "lcnet_resnet56_kd16"),), (("placement", "parallel"),)),
    SystemSpec("exits_resnet56", "exits", "exits_resnet56", (("", "exits_resnet56"),)),
    SystemSpec("cascade_r8_r20_r56", "cascade", "cascade_r8_r20_r56",
               (("stages.0", "resnet8"), ("stages.1", "resnet20"), ("stages.2", "resnet56")),
               topology="jump"),
)}
REFERENCE = "resnet56"  # speedups and MAC reductions are against this static network
FEATURED = "lcnet_resnet56_seq"  # the system the app's pickers start on, when trained


def spec(name: str) -> SystemSpec:
    try:
        return SYSTEMS[name]
    except KeyError:
        raise KeyError(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}") from None


def checkpoint_path(name: str) -> Path:
    return settings.checkpoint_dir() / f"{name}.pt"


def missing(name: str) -> list[str]:
    """Checkpoints ``name`` needs that are not on disk."""
    return [c for c in spec(name).checkpoints if not checkpoint_path(c).exists()]


def available() -> list[str]:
    return [name for name in SYSTEMS if not missing(name)]


def dynamic(names: list[str]) -> list[str]:
    """The systems among ``names`` that spend per image (every kind but static)."""
    return [name for name in names if spec(name).kind != "static"]


def staged(names: list[str]) -> list[str]:
    """The systems among ``names`` that run under a policy (early exits and cascades)."""
    return [name for name in names if spec(name).kind in ("exits", "cascade")]


def train_command(checkpoint: str, out_dir: Path | None = None, replace: bool = False) -> str:
    """The command that trains ``checkpoint`` into ``out_dir`` (default: the checkpoint
    directory the app loads), over an existing file there with ``replace``."""
    out = _shown(out_dir if out_dir is not None else settings.checkpoint_dir())
    return f"python -m dynviz train {checkpoint} --out-dir {out}" + " --replace" * replace


def restore_command(path: Path) -> str:
    """How to get a good checkpoint ``path`` back: ``git checkout`` for one the repository
    ships (git tracks it), else the command that trains it again."""
    try:
        shipped = subprocess.run(["git", "ls-files", "--error-unmatch", "--",
                                  str(path.resolve())], cwd=settings.PROJECT_ROOT,
                                 capture_output=True).returncode == 0
    except OSError:              # no git here: the built-in directory holds the shipped ones
        shipped = path.resolve().parent == settings.BUILTIN_CHECKPOINTS.resolve()
    if shipped:
        return f"git checkout -- {_shown(path)}"
    return train_command(path.stem, path.parent, replace=True)


def _shown(path: Path) -> str:
    """``path`` relative to the project root when inside it (commands run from there)."""
    try:
        return str(path.resolve().relative_to(settings.PROJECT_ROOT))
    except ValueError:
        return str(path)


def read_checkpoint(path: Path, fix: str | None = None) -> dict:
    """The dict of tensors and plain data saved at ``path``, read on the CPU with
    ``weights_only=True``.

    Raises:
        CheckpointError: the file cannot be read; the message names it and ``fix`` (default:
            how ``restore_command`` restores it).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # a damaged file fails in torch's zip reader or its unpickler
        raise CheckpointError(_unreadable(path, _why(err), fix)) from err
    if not isinstance(state, dict):
        raise CheckpointError(_unreadable(path, f"it holds a {type(state).__name__}, not a "
                                                f"dict", fix))
    return state


def _why(err: Exception) -> str:
    """What is wrong with a file ``torch.load`` refused, in a few words (its messages run to
    paragraphs, and the weights-only one suggests loading the file unsafely)."""
    text = str(err)
    if "Weights only load failed" in text:
        refused = re.search(r"GLOBAL (\S+)", text)
        if refused:
            return f"it holds more than tensors and plain data ({refused.group(1)})"
        text = text.split("WeightsUnpickler error:")[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"truncated or corrupt ({lines[0].split('. ')[0] if lines else type(err).__name__})"


def _unreadable(path: Path, why: str, fix: str | None = None) -> str:
    return f"cannot read {path}: {why}; {fix or f'restore it with `{restore_command(path)}`'}"


def load_weights(model: nn.Module, path: Path, strict: bool = True) -> None:
    """Load the checkpoint at ``path`` into ``model``; with ``strict`` off, parameters it
    lacks start fresh (logged), but weights the model lacks are still an error.

    Raises:
        CheckpointError: the file cannot be read, or its weights do not fit ``model``.
    """
    state = read_checkpoint(path)
    try:
        result = model.load_state_dict(state, strict=strict)
    except RuntimeError as err:     # missing or unexpected keys, other shapes
        detail = " ".join(str(err).split())[:200]
        raise CheckpointError(_unreadable(path, f"its weights do not fit "
                                                f"{type(model).__name__} ({detail})")) from err
    if not strict and result.unexpected_keys:
        raise CheckpointError(_unreadable(path, f"it has weights the model does not: "
                                                f"{result.unexpected_keys[:5]}"))
    if not strict and result.missing_keys:
        log.info("%s: %d parameters start fresh (e.g. %s)", path.name,
                 len(result.missing_keys), result.missing_keys[0])


def _sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256_of(path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=256)
def _sha256_of(path: Path, mtime_ns: int, size: int) -> str:
    """Digest of a file, remembered while its modification time and size stay the same."""
    return files.sha256_file(path)


def checkpoint_sha(name: str) -> str:
    """One digest over every checkpoint a system loads (keys its caches)."""
    s = spec(name)
    if missing(name):
        raise MissingCheckpointError(_missing_message(name))
    digests = "".join(_sha256(checkpoint_path(c)) for c in s.checkpoints)
    return hashlib.sha256((s.model + repr(s.model_args) + digests).encode()).hexdigest()


def _missing_message(name: str) -> str:
    commands = "\n".join(f"  {train_command(c)}" for c in missing(name))
    return f"system {name} needs checkpoints that are not trained yet; run:\n{commands}"


def load_system(name: str, device: torch.device | None = None) -> nn.Module:
    """The system ``name`` with its trained weights, in eval mode on ``device``."""
    s = spec(name)
    if missing(name):
        raise MissingCheckpointError(_missing_message(name))
    model = models.create(s.model, **dict(s.model_args))
    for path, ckpt in s.weights:
        load_weights(model.get_submodule(path) if path else model, checkpoint_path(ckpt))
    device = device or settings.device()
    return model.to(device, memory_format=torch.channels_last).eval()


def outputs(name: str, split: data.Split, *,
            model: nn.Module | Callable[[], nn.Module] | None = None, progress: bool = True,
            on_progress: Callable[[float], None] | None = None) -> cache.CachedOutputs:
    """Cached outputs of system ``name`` on ``split``, built on first use by ``model`` (or
    the function returning it; default: the trained system), ``progress`` and
    ``on_progress`` as in ``cache.compute_outputs``."""
    return cache.ensure(name, model or (lambda: load_system(name)), split, checkpoint_sha(name),
                        progress=progress, on_progress=on_progress)

"""The default systems: which registry model, which trained checkpoints, which topology.

A system is what the app and ``python -m dynviz evaluate`` show: a static network, a gated
network, an early-exit network or a cascade, built from checkpoints in
``settings.checkpoint_dir()`` (``NAME.pt`` weights + ``NAME.json`` manifest).
"""
from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import models
from dynviz import cache, data, files, settings

KINDS = ("static", "gated", "exits", "cascade")


class MissingCheckpointError(FileNotFoundError):
    """A system needs a checkpoint that has not been trained; the message says how."""


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


def train_command(checkpoint: str) -> str:
    return f"python -m dynviz train {checkpoint}"


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
        target = model.get_submodule(path) if path else model
        state = torch.load(checkpoint_path(ckpt), map_location="cpu", weights_only=True)
        target.load_state_dict(state)
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

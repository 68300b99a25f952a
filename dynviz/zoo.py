"""A workspace's systems: which checkpoints they need, loading them, and keying their caches.

A system is what the app and ``python -m dynviz evaluate`` show: a static network, a gated
network, an early-exit network or a cascade, as a workspace's ``[systems]`` table describes
it, built from checkpoints in ``Workspace.checkpoints`` (``NAME.pt`` weights + ``NAME.json``
manifest) or from a ``torch.export`` program.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import models
from models.staged import Cascade
from dynviz import cache, data, files, settings
from dynviz.workspace import SystemSpec, Workspace

log = logging.getLogger(__name__)


class MissingCheckpointError(FileNotFoundError):
    """A system needs a checkpoint that has not been trained; the message says how."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded (truncated, corrupt, holding more than tensors and
    plain data, or weights of another model); the message names the file and how to restore
    it."""


def checkpoint_path(ws: Workspace, name: str) -> Path:
    return ws.checkpoints / f"{name}.pt"


def members(ws: Workspace, name: str) -> list[SystemSpec]:
    """The single systems ``name`` is made of: its members for a cascade, else itself."""
    s = ws.spec(name)
    return [ws.spec(m) for m in s.members] if s.kind == "cascade" else [s]


@dataclass(frozen=True)
class Need:
    """A file a system needs that is not on disk: a checkpoint to train, or a program to
    add (exactly one of the two)."""
    checkpoint: str | None = None
    program: Path | None = None

    def __post_init__(self):
        if (self.checkpoint is None) == (self.program is None):
            raise ValueError("a Need is a checkpoint or a program, exactly one of the two")

    def __str__(self) -> str:
        return self.checkpoint if self.program is None else settings.shown(self.program)

    def fix(self, ws: Workspace, markdown: bool = False) -> str:
        """What to do about it, in a few words with the command (code-quoted in Markdown)."""
        quote = "`" if markdown else ""
        if self.program is not None:
            return f"add the torch.export program {quote}{self}{quote}"
        return f"run {quote}{train_command(ws, self.checkpoint)}{quote}"


def missing(ws: Workspace, name: str) -> list[Need]:
    """What ``name`` needs that is not on disk, each once."""
    needs = []
    for s in members(ws, name):
        if s.program is not None:
            if not ws.program_path(s).exists():
                needs.append(Need(program=ws.program_path(s)))
        else:
            needs += [Need(checkpoint=c) for c in s.checkpoints
                      if not checkpoint_path(ws, c).exists()]
    return list(dict.fromkeys(needs))


def available(ws: Workspace) -> list[str]:
    return [name for name in ws.systems if not missing(ws, name)]


def dynamic(ws: Workspace, names: list[str]) -> list[str]:
    """The systems among ``names`` that spend per image (every kind but static)."""
    return [name for name in names if ws.spec(name).kind != "static"]


def staged(ws: Workspace, names: list[str]) -> list[str]:
    """The systems among ``names`` that run under a policy (early exits and cascades)."""
    return [name for name in names if ws.spec(name).kind in ("exits", "cascade")]


def train_command(ws: Workspace, checkpoint: str, replace: bool = False) -> str:
    """The command that trains ``checkpoint`` into the workspace's checkpoints (the ones the
    app loads), over an existing file there with ``replace``."""
    return ws.command(_train_args(checkpoint, ws.checkpoints, replace))


def _train_args(checkpoint: str, out_dir: Path, replace: bool) -> str:
    return f"train {checkpoint} --out-dir {settings.shown(out_dir)}" + " --replace" * replace


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
        return f"git checkout -- {settings.shown(path)}"
    # a workspace's checkpoints/ sits beside its dynviz.toml
    home = path.resolve().parent.parent
    workspace = home if (home / "dynviz.toml").is_file() and home != settings.PROJECT_ROOT \
        else None
    return settings.command(_train_args(path.stem, path.parent, replace=True), workspace)


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


def checkpoint_sha(ws: Workspace, name: str) -> str:
    """One digest over what a system's outputs depend on: its models, their arguments, every
    checkpoint or program it loads, and the input it sees (keys its caches)."""
    if missing(ws, name):
        raise MissingCheckpointError(_missing_message(ws, name))
    s = ws.spec(name)
    if s.kind == "cascade":
        parts = [s.kind, s.topology] + [checkpoint_sha(ws, m) for m in s.members]
    elif s.program is not None:
        parts = [s.kind, _sha256(ws.program_path(s))] + _input(ws)
    else:
        parts = ([s.kind, s.model, repr(s.model_args)]
                 + [_sha256(checkpoint_path(ws, c)) for c in s.checkpoints] + _input(ws))
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def read_checkpoints(ws: Workspace, name: str) -> None:
    """Reads every checkpoint system ``name`` loads (a cascade's members' too).

    Raises:
        CheckpointError: one cannot be read (the message says how to restore it).
    """
    s = ws.spec(name)
    for member in s.members:
        read_checkpoints(ws, member)
    for checkpoint in s.checkpoints:
        read_checkpoint(checkpoint_path(ws, checkpoint))


def _input(ws: Workspace) -> list:
    d = ws.data
    return [d.image_size, list(d.mean), list(d.std), list(d.classes)]


def _missing_message(ws: Workspace, name: str) -> str:
    return (f"system {name} needs what is not there yet:\n"
            + "\n".join(f"  {need.fix(ws)}" for need in missing(ws, name)))


def create_model(ws: Workspace, s: SystemSpec) -> nn.Module:
    """An untrained registry model of ``s`` for the workspace's classes and input size."""
    return models.create(s.model, num_classes=ws.data.n_classes,
                         input_size=ws.data.image_size, **dict(s.model_args))


def _load_single(ws: Workspace, s: SystemSpec) -> nn.Module:
    if s.program is not None:
        from models import program
        try:
            return program.load_program(ws.program_path(s), ws.data.image_size,
                                        ws.data.n_classes)
        except program.ProgramError as err:
            raise CheckpointError(f"system {s.name}: {err}") from None
    model = create_model(ws, s)
    for path, ckpt in s.weights:
        _check_trained_for(ws, checkpoint_path(ws, ckpt))
        load_weights(model.get_submodule(path) if path else model, checkpoint_path(ws, ckpt))
    return model


def _check_trained_for(ws: Workspace, path: Path) -> None:
    """A checkpoint trained on other classes or another input size (its manifest, when
    ``train`` wrote one, says) is refused: the same number of classes would load silently
    with the wrong labels."""
    try:
        manifest = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return                        # no manifest (weights from elsewhere): nothing to check
    classes = manifest.get("classes") if isinstance(manifest, dict) else None
    if classes is not None and tuple(classes) != ws.data.classes:
        raise CheckpointError(f"{path} was trained on the classes {', '.join(classes)}, not "
                              f"this workspace's {', '.join(ws.data.classes)}")
    size = manifest.get("image_size")
    if size is not None and size != ws.data.image_size:
        raise CheckpointError(f"{path} was trained on {size}×{size} images, not this "
                              f"workspace's {ws.data.image_size}×{ws.data.image_size}")


def load_system(ws: Workspace, name: str, device: torch.device | None = None) -> nn.Module:
    """The system ``name`` with its trained weights, in eval mode on ``device``."""
    if missing(ws, name):
        raise MissingCheckpointError(_missing_message(ws, name))
    s = ws.spec(name)
    if s.kind == "cascade":
        model = Cascade([_load_single(ws, m) for m in members(ws, name)], list(s.members),
                        can_jump=s.topology == "jump")
    else:
        model = _load_single(ws, s)
    device = device or settings.device()
    return model.to(device, memory_format=torch.channels_last).eval()


def outputs(ws: Workspace, name: str, split: data.Split, *,
            model: nn.Module | Callable[[], nn.Module] | None = None, progress: bool = True,
            on_progress: Callable[[float], None] | None = None) -> cache.CachedOutputs:
    """Cached outputs of system ``name`` on ``split``, built on first use by ``model`` (or
    the function returning it; default: the trained system), ``progress`` and
    ``on_progress`` as in ``cache.compute_outputs``."""
    return cache.ensure(ws, name, model or (lambda: load_system(ws, name)), split,
                        checkpoint_sha(ws, name), progress=progress, on_progress=on_progress)

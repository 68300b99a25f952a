"""Where things live and which device runs them: the environment variables of the built-in
workspace, the device and the native block runner.

A workspace's own directories are in its ``dynviz.toml`` (``dynviz.workspace``); these
variables redirect the built-in one's (the repository root's ``dynviz.toml``), which tests
rely on:

- ``DYNVIZ_DATA``: a CIFAR-10 root (ImageFolder ``train/<class>/*.jpg`` or torchvision's
  ``cifar-10-batches-py``), instead of the file's list of roots.
- ``DYNVIZ_CACHE``: decoded-image, run and validation-output caches (default ``.cache/``).
- ``DYNVIZ_CHECKPOINTS``: trained weights (default ``models/checkpoints/``).
- ``DYNVIZ_ASSETS``: shipped caches and policies (default ``assets/``).

``workspace.builtin()`` applies these three; library code uses the ``Workspace`` it is given
(``ws.cache``, ``ws.checkpoints``, ``ws.results``). ``cache_dir`` is only the fallback of a
``DataSpec`` built without a workspace.
For any workspace:

- ``DYNVIZ_WORKSPACE``: the workspace commands and the app work on (``workspace.resolve``).
- ``DYNVIZ_DEVICE``: ``cuda``, ``cpu``, ``cuda:1``...; default CUDA when present.
- ``DYNVIZ_NATIVE``: ``0`` turns the native (C++) block runner off.
- ``DYNVIZ_NATIVE_DIR``: where it is compiled (default ``.cache/native``; not under
  ``DYNVIZ_CACHE``, so that redirecting the data caches does not rebuild it).
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path

import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BUILTIN_CHECKPOINTS = PROJECT_ROOT / "models" / "checkpoints"   # the shipped zoo's weights


def env_path(name: str, default: Path) -> Path:
    """``$name`` as a path when it is set, else ``default``."""
    value = os.environ.get(name)
    return Path(value).expanduser() if value else default


def shown(path: Path) -> str:
    """``path`` relative to the project root when inside it (commands run from there)."""
    try:
        return str(path.resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


def command(args: str, workspace: Path | None = None) -> str:
    """The command line ``python -m dynviz ARGS`` in the workspace at ``workspace`` (None:
    the built-in one, which needs no ``--workspace``)."""
    where = "" if workspace is None else f" --workspace {shlex.quote(str(workspace))}"
    return f"python -m dynviz{where} {args}"


def cache_dir() -> Path:
    return env_path("DYNVIZ_CACHE", PROJECT_ROOT / ".cache")


def native_dir() -> Path:
    """Where the native block runner (``models/csrc``) is compiled."""
    return env_path("DYNVIZ_NATIVE_DIR", PROJECT_ROOT / ".cache" / "native")


def native_enabled() -> bool:
    return os.environ.get("DYNVIZ_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


class SettingError(ValueError):
    """An environment variable set to what cannot be used; the message names it."""


def device() -> torch.device:
    """CUDA when available, else CPU; ``DYNVIZ_DEVICE`` overrides.

    Raises:
        SettingError: ``DYNVIZ_DEVICE`` is not a device, or names CUDA where there is none.
    """
    requested = os.environ.get("DYNVIZ_DEVICE")
    if requested:
        try:
            dev = torch.device(requested)
        except RuntimeError:
            raise SettingError(f"DYNVIZ_DEVICE={requested} is not a device; set it to cpu, "
                               f"cuda or cuda:N, or unset it") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SettingError(f"DYNVIZ_DEVICE={requested} but CUDA is not available here; "
                               f"set it to cpu or unset it")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

"""Cached validation outputs: every stage's logits, per-image MACs and which blocks and
channels the gates ran, of one system on one split, as flat ``.npy`` arrays (yes/no arrays
packed 8 to a byte) plus ``manifest.json``.

One directory per (system, checkpoint sha256, split fingerprint); written atomically (a
temporary directory renamed into place), read memory-mapped, rebuilt when the checkpoint or
the data changes (the old directory of that system and split is then removed). A local
cache that cannot be read whole (a damaged disk, a hand edit) is set aside as
``<dir>.corrupt-<time>`` and rebuilt, one in another ``FORMAT`` is rebuilt over; a shipped
one (assets/) is never moved: the error says how to restore it. Policies, the Budget page and
the evaluation read only these arrays.
"""
from __future__ import annotations

from collections.abc import Callable

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from dynviz import __version__, data, files, settings
from dynviz.policy import StageOutputs
from dynviz.workspace import Workspace

log = logging.getLogger(__name__)

RESTORE_SHIPPED = "git checkout -- assets/"
FORMAT = 2   # 2: gates kept as packed yes/no (1: scores in uint8, which lost those < 1/510)
FORMAT_1_GATES = {"block_scores", "channel_scores"}   # a format-1 cache with them: rebuilt


def _restore_shipped(ws: Workspace) -> str:
    """How to get a workspace's shipped caches back: git has the repository's; a workspace
    of one's own ships them again."""
    if ws.builtin:
        return f"restore the shipped caches with `{RESTORE_SHIPPED}`"
    return f"delete it and run `{ws.command('ship')}`"


class CorruptCacheError(ValueError):
    """A cache directory whose manifest or arrays cannot be read, or disagree."""
    state = "corrupt"

    def __init__(self, directory: Path, reason: str, hint: str = ""):
        super().__init__(f"cached outputs {directory} are {self.state}: {reason}{hint}")
        self.directory, self.reason = directory, reason


class FormatError(CorruptCacheError):
    """A cache whole but written in a ``FORMAT`` this version does not read: a gated model's
    in format 1, or any in a newer one."""
    state = "in another format"


@dataclass(frozen=True, eq=False)
class CachedOutputs:
    directory: Path
    manifest: dict
    arrays: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.arrays["labels"])

    @property
    def ids(self) -> list[str]:
        return self.manifest["ids"]

    def stage_outputs(self, index: np.ndarray | None = None) -> StageOutputs:
        """The arrays a policy needs, for all images or ``index`` (positions)."""
        a = self.arrays
        pick = (lambda v: v) if index is None else (lambda v: v[index])
        jump = a.get("jump_macs")
        return StageOutputs(pick(a["logits"]), pick(a["labels"]).astype(np.int64),
                            pick(a["stage_macs"]).astype(np.float64),
                            None if jump is None else pick(jump).astype(np.float64),
                            tuple(self.manifest["stage_names"]),
                            self.manifest.get("reference_macs"))

    def half(self, name: str) -> StageOutputs:
        """The *fit* (even positions) or *check* (odd positions) half of a ``val`` cache."""
        if self.manifest["split"] != "val":
            raise ValueError(f"halves exist for the val split, not {self.manifest['split']}")
        return self.stage_outputs(np.arange(len(self))[data.HALVES[name]])

    def yes_no(self, name: str, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """(N, hi − lo) bool: columns lo..hi of a yes/no array, unpacked from only the bytes
        that hold them."""
        hi = self.manifest["packed"][name] if hi is None else hi
        bits = np.unpackbits(self.arrays[name][:, lo // 8:-(-hi // 8)], axis=1)
        return bits[:, lo % 8:lo % 8 + hi - lo].astype(bool)

    def blocks_run(self) -> np.ndarray:
        """(N, n_blocks) bool: S_L > 0, the block ran."""
        return self.yes_no("blocks_run")

    def channels_on(self, block: int) -> np.ndarray:
        """(N, C_mid) bool: S_C > 0 for each channel of ``block`` (computed if it ran)."""
        return self.yes_no("channels_on", *self.manifest["channel_offsets"][block:block + 2])


def _to_numpy(name: str, value: torch.Tensor) -> np.ndarray:
    """Logits as float32; the rest as is."""
    if name == "logits":
        return value.float().cpu().numpy()
    return value.cpu().numpy()


@torch.no_grad()
def compute_outputs(model: nn.Module, images: np.ndarray, spec: data.DataSpec, *,
                    device: torch.device,
                    batch_size: int = 250, progress: bool = True,
                    on_progress: Callable[[float], None] | None = None) -> dict[str, np.ndarray]:
    """Run ``model`` on uint8 images (N, H, W, 3), normalised as ``spec`` says: every stage's
    logits and MACs, and what its trace keeps (``Output.arrays``).

    ``progress``: a tqdm bar on stderr; ``on_progress``: called with the fraction done
    after every batch (the app's progress bar)."""
    from tqdm import tqdm

    model = model.to(device).eval()
    parts: dict[str, list[np.ndarray]] = {}
    for start in tqdm(range(0, len(images), batch_size), desc="caching outputs", unit="batch",
                      disable=not progress, leave=False):
        x = spec.to_tensor(np.ascontiguousarray(images[start:start + batch_size]), device)
        for name, value in model(x).arrays().items():
            parts.setdefault(name, []).append(_to_numpy(name, value))
        if on_progress is not None:
            on_progress(min(1.0, (start + batch_size) / len(images)))
    return {name: np.concatenate(values) for name, values in parts.items()}


def _write(directory: Path, arrays: dict[str, np.ndarray], manifest: dict) -> None:
    directory.parent.mkdir(parents=True, exist_ok=True)
    files.remove_leftovers(directory.parent, ".tmp-*")
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".tmp-"))
    try:
        for name, value in arrays.items():
            with files.atomic_write(tmp / f"{name}.npy") as f:
                np.save(f, value)
        files.atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=1) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def load(directory: Path) -> CachedOutputs:
    """The cache in ``directory``, its arrays memory-mapped.

    Raises:
        CorruptCacheError: the manifest is missing or not JSON, or an array it lists is
            missing, unreadable (truncated) or of another shape than it says.
    """
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except FileNotFoundError:
        raise CorruptCacheError(directory, "manifest.json is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptCacheError(directory, f"manifest.json is unreadable ({err})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shapes"), dict) \
            or "labels" not in manifest["shapes"] or not isinstance(manifest.get("ids"), list):
        raise CorruptCacheError(directory, "manifest.json lacks the arrays' shapes or ids")
    written = manifest.get("format", 1)
    if written > FORMAT or (written < FORMAT and FORMAT_1_GATES & set(manifest["shapes"])):
        age = "a newer" if written > FORMAT else "an older"
        raise FormatError(directory, f"format {written}, written by {age} dynviz; this one "
                                     f"reads format {FORMAT}")
    arrays = {}
    for name, shape in manifest["shapes"].items():
        try:
            arrays[name] = np.load(directory / f"{name}.npy", mmap_mode="r")
        except FileNotFoundError:
            raise CorruptCacheError(directory, f"{name}.npy is missing") from None
        except (OSError, ValueError, EOFError) as err:
            raise CorruptCacheError(directory, f"{name}.npy is unreadable, truncated? "
                                               f"({err})") from None
        got = list(arrays[name].shape)
        if got != shape or got[:1] != [len(manifest["ids"])]:
            raise CorruptCacheError(directory, f"{name}.npy holds {got}, the manifest says "
                                               f"{shape} for {len(manifest['ids'])} images")
    return CachedOutputs(directory, manifest, arrays)


def _load_or_set_aside(directory: Path) -> CachedOutputs | None:
    """The cache in ``directory``; None when there is none, when it is in another format
    (left in place until a fresh one is written over it) or when it was corrupt (it is then
    set aside, with a warning, to be rebuilt)."""
    if not directory.exists():
        return None
    try:
        return load(directory)
    except FormatError as err:
        log.info("%s is not read: %s", directory.name, err.reason)
        return None
    except CorruptCacheError as err:
        files.set_aside(directory, err.reason)
        return None


def directory_for(ws: Workspace, system: str, split: data.Split, checkpoint_sha: str,
                  root: Path | None = None) -> Path:
    root = root if root is not None else ws.cache / "outputs"
    return root / f"{system}-{split.name}-{split.fingerprint}-{checkpoint_sha[:12]}"


def find(ws: Workspace, system: str, split: data.Split | str,
         checkpoint_sha: str) -> CachedOutputs | None:
    """A fresh cache of ``system`` on ``split``: the shipped one (the workspace's results) or
    the local one.

    ``split`` may be just a split's name, when its images are absent: any cache of that
    split and checkpoint is then taken, as its data fingerprint cannot be checked. A corrupt
    local cache is set aside (and None returned, so that it is rebuilt), one in another
    format is passed over; a shipped one of either kind raises ``CorruptCacheError`` (or
    ``FormatError``) saying how to restore it, and stays where it is.
    """
    if isinstance(split, str):
        pattern = f"{system}-{split}-*-{checkpoint_sha[:12]}"
    else:
        pattern = directory_for(ws, system, split, checkpoint_sha).name
    for directory in sorted((ws.results / "outputs").glob(pattern)):
        try:
            return load(directory)
        except CorruptCacheError as err:
            raise type(err)(directory, err.reason, f"; {_restore_shipped(ws)}") from None
    for directory in sorted((ws.cache / "outputs").glob(pattern)):
        found = _load_or_set_aside(directory)
        if found is not None:
            return found
    return None


def ensure(ws: Workspace, system: str, model: nn.Module | Callable[[], nn.Module],
           split: data.Split, checkpoint_sha: str, *, device: torch.device | None = None,
           root: Path | None = None, progress: bool = True,
           on_progress: Callable[[float], None] | None = None) -> CachedOutputs:
    """The cache of ``system`` on ``split``, built if missing or corrupt; once it is written,
    the other (stale) caches of that system and split beside it are removed.

    ``model`` may be a function returning it, called only when outputs must be computed.
    ``root``: write there instead of the local cache (``ship`` names assets/outputs); caches
    are only ever removed or set aside in the directory written to.
    """
    if root is None:
        found = find(ws, system, split, checkpoint_sha)
        if found is not None:
            return found
    directory = directory_for(ws, system, split, checkpoint_sha, root)
    found = _load_or_set_aside(directory)
    if found is not None:
        return found
    found = find(ws, system, split, checkpoint_sha) if root is not None else None
    if found is not None:                        # computed elsewhere already: copy it
        _write(directory, {name: np.asarray(a) for name, a in found.arrays.items()},
               found.manifest)
        cached = load(directory)
    else:
        device = device or settings.device()
        if not isinstance(model, nn.Module):
            model = model()
        started = time.perf_counter()
        arrays = compute_outputs(model, split.images(), split.spec, device=device,
                                 progress=progress,
                                 on_progress=on_progress)
        cached = store(directory, system, model, split, checkpoint_sha, arrays,
                       seconds=time.perf_counter() - started)
    for stale in directory.parent.glob(f"{system}-{split.name}-*"):
        if stale != directory and ".corrupt-" not in stale.name:
            log.info("removing stale cache %s", stale.name)
            shutil.rmtree(stale, ignore_errors=True)
    return cached


def store(directory: Path, system: str, model: nn.Module, split: data.Split,
          checkpoint_sha: str, arrays: dict[str, np.ndarray], seconds: float = 0.0
          ) -> CachedOutputs:
    """Write ``arrays`` (what ``compute_outputs`` returns; bool ones packed into bits) and the
    manifest for ``model``."""
    packed = {k: v.shape[1] for k, v in arrays.items() if v.dtype == bool}
    arrays = {k: np.packbits(v, axis=1) if k in packed else v for k, v in arrays.items()}
    arrays["labels"] = split.labels.astype(np.int16)
    staged = model.n_stages > 1
    manifest = {
        "system": system, "checkpoint_sha256": checkpoint_sha, "split": split.name,
        "data_fingerprint": split.fingerprint, "data_root": _portable(split.dataset.root),
        "ids": split.ids,
        "stage_names": list(model.stage_names) if staged else [system],
        "format": FORMAT, "shapes": {k: list(v.shape) for k, v in arrays.items()},
        "packed": packed,
        "stage_macs_static": model.stage_macs(),
        # what budgets of a staged system are shares of: its dense counterpart
        "reference_macs": model.dense_counterpart().macs() if staged else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(seconds, 1), "dynviz": __version__,
    } | model.cache_layout()
    _write(directory, arrays, manifest)
    return load(directory)


def _portable(path: Path) -> str:
    """A path relative to the project root where possible (no machine paths in assets)."""
    try:
        return os.path.relpath(path, settings.PROJECT_ROOT)
    except ValueError:
        return path.name

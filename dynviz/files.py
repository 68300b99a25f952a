"""Small file helpers shared by the library: a file's SHA-256, atomic writes, and what to do
with what a killed write or a damaged disk leaves behind."""
from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of the file's bytes, read in chunks (checkpoints can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """Open a binary file that replaces ``path`` only once the ``with`` block succeeds.

    The bytes go to a uniquely named temporary file in the same directory (so concurrent
    writers never share one, and the rename stays on one file system), which is flushed and
    fsynced, then renamed over ``path``: a reader sees the old file or the whole new one,
    never a part. On an error the temporary file is removed and ``path`` is untouched. The
    file gets the permissions of a plain ``open`` (0o666 less the umask), unlike ``mkstemp``'s
    0o600.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through ``atomic_write``."""
    with atomic_write(path) as f:
        f.write(text.encode())


def set_aside(path: Path, reason: str) -> Path | None:
    """Rename a corrupt file or directory to ``<name>.corrupt-<UTC time>`` beside it, so that
    it is neither read again nor lost, and log a warning naming it and ``reason``.

    Returns the new path, or None when it was gone already (another process set it aside).
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    try:
        os.rename(path, target)
    except FileNotFoundError:
        return None
    log.warning("%s is corrupt (%s): set aside as %s; it is rebuilt", path, reason, target.name)
    return target


def remove_leftovers(directory: Path, pattern: str, min_age_s: float = 3600.0) -> None:
    """Delete the temporary files or directories (names matching ``pattern``) that killed
    writes left in ``directory``, once older than ``min_age_s``: a younger one may belong to
    a write still running in another process."""
    now = time.time()
    for leftover in directory.glob(pattern):
        try:
            if now - leftover.lstat().st_mtime < min_age_s:
                continue
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
        except FileNotFoundError:   # another process cleaned it first
            continue
        log.info("removed %s, left by an interrupted write", leftover)

"""Small file helpers shared by the library: a file's SHA-256, and atomic writes."""
from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


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

"""The shared file helpers: a chunked SHA-256 equals hashlib's over the whole file, and an
atomic write leaves either the old file or the whole new one, and no temporary file."""
from __future__ import annotations

import hashlib
import os

import pytest

from dynviz import files


def test_sha256_of_a_file_read_in_chunks_is_the_digest_of_its_bytes(tmp_path):
    path = tmp_path / "blob.bin"
    payload = os.urandom(10_000)
    path.write_bytes(payload)
    expected = hashlib.sha256(payload).hexdigest()
    for chunk in (1, 7, 4096, 1 << 20):          # chunk sizes that do and do not divide it
        assert files.sha256_file(path, chunk_bytes=chunk) == expected


def test_an_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with files.atomic_write(path) as f:
        f.write(b"new ")
        assert path.read_bytes() == b"old"          # readers see the old file meanwhile
        f.write(b"bytes")
    assert path.read_bytes() == b"new bytes"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_a_failed_atomic_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="midway"):
        with files.atomic_write(path) as f:
            f.write(b"half")
            raise RuntimeError("midway")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_an_atomically_written_file_gets_the_permissions_of_a_plain_one(tmp_path):
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")
    with files.atomic_write(tmp_path / "atomic.bin") as f:
        f.write(b"x")
    assert (tmp_path / "atomic.bin").stat().st_mode == plain.stat().st_mode

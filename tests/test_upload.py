"""Decoding uploads: the formats and sizes the page takes. The classification of ordinary
odd files (modes, formats, refusals) is in test_data.py."""
from __future__ import annotations

import io
import tomllib
from pathlib import Path

import pytest
from PIL import Image

from dynviz import data

ROOT = Path(__file__).resolve().parents[1]


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# ---------------------------------------------------------------------------- limits
def test_streamlit_refuses_what_the_page_refuses():
    """Streamlit's own upload limit (MB) is the page's, so an oversized file is refused
    before the server buffers it."""
    from dynviz.ui import inspect_page

    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["maxUploadSize"] == inspect_page.MAX_UPLOAD_MB


def test_file_suffixes_name_the_formats_the_decoder_opens():
    extensions = Image.registered_extensions()   # PIL's own suffix -> format table
    for fmt, suffixes in data.IMAGE_FORMATS.items():
        for suffix in suffixes:
            assert extensions[f".{suffix}"] == fmt
    assert set(data.IMAGE_SUFFIXES) == {f".{s}" for v in data.IMAGE_FORMATS.values() for s in v}


@pytest.mark.parametrize("fmt", ["ICO", "TGA", "PCX", "PPM", "QOI"])
def test_formats_pil_reads_but_the_page_does_not_accept_are_refused(fmt):
    raw = _encode(Image.new("RGB", (16, 16), (1, 2, 3)), fmt)
    assert Image.open(io.BytesIO(raw)).format == fmt          # PIL would open it
    with pytest.raises(data.InvalidImageError, match="not an image format we can read"):
        data.preprocess_upload(raw)

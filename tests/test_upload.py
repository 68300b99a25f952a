"""Decoding uploads in bounded memory, and what the shortcuts that bound it (whole-factor
shrinking at the image's own bit depth, JPEG draft decoding) produce, against references
computed here from the full-size image. The classification of ordinary odd files (modes,
formats, refusals) is in test_data.py."""
from __future__ import annotations

import importlib.util
import io
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from dynviz import decode, uploads

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("upload_memory",
                                                  ROOT / "scripts" / "upload_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # its dataclass looks its module up while being made
    spec.loader.exec_module(module)
    return module


upload_memory = _load_script()


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _smooth_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    """Random colours on a 12×9 grid, bicubically enlarged: smooth, but not symmetric."""
    cells = np.random.default_rng(seed).integers(0, 256, (9, 12, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize((width, height), Image.Resampling.BICUBIC)


def _reference(img: Image.Image, size: int = 32) -> np.ndarray:
    """The full-size image's centred square, resized in one Lanczos step."""
    side = min(img.size)
    left, top = (img.width - side) / 2, (img.height - side) / 2
    return np.asarray(img.resize((size, size), Image.Resampling.LANCZOS,
                                 box=(left, top, left + side, top + side)), dtype=int)


# ---------------------------------------------------------------------------- limits
def test_streamlit_refuses_what_the_page_refuses():
    """Streamlit's own upload limit (MB) is the page's, so an oversized file is refused
    before the server buffers it."""
    from dynviz.ui import inspect_page

    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["maxUploadSize"] == inspect_page.MAX_UPLOAD_MB


def test_file_suffixes_name_the_formats_the_decoder_opens():
    extensions = Image.registered_extensions()   # PIL's own suffix -> format table
    for fmt, suffixes in decode.IMAGE_FORMATS.items():
        for suffix in suffixes:
            assert extensions[f".{suffix}"] == fmt
    suffixes = {f".{s}" for v in decode.IMAGE_FORMATS.values() for s in v}
    assert set(decode.IMAGE_SUFFIXES) == suffixes


@pytest.mark.parametrize("fmt", ["ICO", "TGA", "PCX", "PPM", "QOI"])
def test_formats_pil_reads_but_the_page_does_not_accept_are_refused(fmt):
    raw = _encode(Image.new("RGB", (16, 16), (1, 2, 3)), fmt)
    assert Image.open(io.BytesIO(raw)).format == fmt          # PIL would open it
    with pytest.raises(uploads.InvalidImageError, match="not an image format we can read"):
        uploads.preprocess_upload(raw, 32)


def test_a_large_jpeg_is_accepted_at_the_scale_it_decodes_to():
    """8000×6000 is above MAX_UPLOAD_PIXELS, but decodes at 1/8: 1000×750."""
    assert 8000 * 6000 > uploads.MAX_UPLOAD_PIXELS
    raw = _encode(_smooth_rgb(800, 600).resize((8000, 6000)), "JPEG", quality=85)
    assert uploads.preprocess_upload(raw, 32).shape == (32, 32, 3)


def test_a_jpeg_too_large_even_at_one_eighth_is_refused(monkeypatch):
    monkeypatch.setattr(uploads, "MAX_UPLOAD_PIXELS", 100 * 75 - 1)
    raw = _encode(_smooth_rgb(800, 600), "JPEG")
    with pytest.raises(uploads.InvalidImageError, match=r"800×600 pixels \(100×75 as decoded\)"):
        uploads.preprocess_upload(raw, 32)


@pytest.mark.parametrize("kw", [dict(lossless=True), dict(quality=80)])
@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_webp_size_is_read_from_its_header(mode, kw):
    for size in [(1, 1), (333, 77), (16383, 3)]:
        raw = _encode(Image.new(mode, size), "WEBP", **kw)
        assert decode.webp_size(raw) == Image.open(io.BytesIO(raw)).size
    animated = _encode(Image.new(mode, (40, 30)), "WEBP", save_all=True,
                       append_images=[Image.new(mode, (40, 30), "red")], **kw)
    assert decode.webp_size(animated) == (40, 30)
    assert decode.webp_size(_encode(Image.new("RGB", (40, 30)), "PNG")) is None


def test_webp_has_its_own_lower_limit():
    side = int(uploads.MAX_WEBP_PIXELS ** 0.5) + 1
    raw = _encode(Image.new("RGB", (side, side)), "WEBP", lossless=True)
    with pytest.raises(uploads.InvalidImageError, match="limit for WebP is 10 megapixels"):
        uploads.preprocess_upload(raw, 32)
    small = _encode(Image.new("RGB", (side - 2, side - 2), (0, 0, 255)), "WEBP", lossless=True)
    assert uploads.preprocess_upload(small, 32)[16, 16].tolist() == [0, 0, 255]


# ---------------------------------------------------------------------------- high bit depth
def test_16_bit_gradient_keeps_its_high_byte():
    v = np.arange(256 * 256, dtype=np.uint16).reshape(256, 256)   # every 16-bit value / 1
    out = uploads.preprocess_upload(_encode(Image.fromarray(v), "PNG"), size=256)
    assert out.dtype == np.uint8
    assert np.abs(out[..., 0].astype(int) - (v >> 8)).max() <= 1
    assert (out[..., 0] == out[..., 2]).all()


def test_16_bit_gradient_shrunk_from_4096_pixels():
    x = np.arange(4096, dtype=np.uint16) * 16                      # 0 .. 65520 along x
    v = np.broadcast_to(x, (4096, 4096))
    out = uploads.preprocess_upload(_encode(Image.fromarray(np.ascontiguousarray(v)), "PNG"), 32)
    centres = (np.arange(32) + 0.5) * 4096 / 32                    # output column centres
    expected = (centres * 16).astype(int) >> 8                     # linear: mean = centre
    assert np.abs(out[16, 2:30, 0].astype(int) - expected[2:30]).max() <= 1


def test_float_image_within_0_1_maps_to_0_255():
    v = np.random.default_rng(0).random((48, 48), dtype=np.float32)
    out = uploads.preprocess_upload(_encode(Image.fromarray(v, "F"), "TIFF"), size=48)
    assert np.abs(out[..., 1].astype(int) - np.round(v * 255)).max() <= 1


def test_float_image_of_any_range_maps_min_max():
    v = np.random.default_rng(1).uniform(-3, 7, (48, 48)).astype(np.float32)
    out = uploads.preprocess_upload(_encode(Image.fromarray(v, "F"), "TIFF"), size=48)
    expected = np.round((v - v.min()) / (v.max() - v.min()) * 255)
    assert np.abs(out[..., 0].astype(int) - expected).max() <= 1


def test_large_float_image_maps_its_own_range_after_shrinking():
    """Four constant quadrants of 1024×1024 float; the output's quadrant interiors hold the
    values mapped by hand."""
    values = np.array([[-2.0, 0.5], [3.0, 10.0]], dtype=np.float32)
    v = np.kron(values, np.ones((512, 512), dtype=np.float32))
    raw = _encode(Image.fromarray(v, "F"), "TIFF", compression="tiff_deflate")
    out = uploads.preprocess_upload(raw, 32)[..., 0].astype(int)
    expected = np.round((values + 2) / 12 * 255)
    for (i, j), value in np.ndenumerate(expected):
        quadrant = out[16 * i:16 * i + 16, 16 * j:16 * j + 16][3:-3, 3:-3]
        assert np.abs(quadrant - value).max() <= 1, (i, j, quadrant.mean(), value)


# ---------------------------------------------------------------------------- shrinking
def test_jpeg_drafted_decode_matches_the_full_decode():
    raw = _encode(_smooth_rgb(2400, 1800), "JPEG", quality=95)
    full = Image.open(io.BytesIO(raw))
    full.load()                                                     # no draft: full size
    assert full.size == (2400, 1800)
    diff = np.abs(uploads.preprocess_upload(raw, 32).astype(int) - _reference(full))
    assert diff.mean() < 1.0 and diff.max() <= 6, (diff.mean(), diff.max())


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "BMP"])
def test_shrunk_image_matches_one_lanczos_step(fmt):
    img = _smooth_rgb(1900, 1300, seed=2)
    out = uploads.preprocess_upload(_encode(img, fmt), 32)
    diff = np.abs(out.astype(int) - _reference(img))
    assert diff.mean() < 1.0 and diff.max() <= 6, (diff.mean(), diff.max())


def test_transparency_is_composited_like_the_full_image():
    img = _smooth_rgb(1500, 1000, seed=3).convert("RGBA")
    alpha = np.linspace(0, 255, 1500, dtype=np.uint8)[None].repeat(1000, 0)
    img.putalpha(Image.fromarray(alpha))
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    reference = _reference(Image.alpha_composite(white, img).convert("RGB"))
    diff = np.abs(uploads.preprocess_upload(_encode(img, "PNG"), 32).astype(int) - reference)
    assert diff.mean() < 1.0 and diff.max() <= 6, (diff.mean(), diff.max())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_after_shrinking(orientation):
    img = _smooth_rgb(1200, 700, seed=4)
    exif = Image.Exif()
    exif[0x0112] = orientation
    raw = _encode(img, "PNG", exif=exif)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(raw)))   # PIL's reading of it
    diff = np.abs(uploads.preprocess_upload(raw, 32).astype(int) - _reference(upright))
    assert diff.mean() < 1.0 and diff.max() <= 6, (diff.mean(), diff.max())


# ---------------------------------------------------------------------------- memory
# Inputs and the measurement are scripts/upload_memory.py's: a fresh process per decode, peak
# RSS over the RSS before it. Every accepted input costs at most one decoded copy at its own
# bit depth plus SLACK_MB (bands of rows, PIL's block rounding); WebP holds four (see
# uploads.MAX_WEBP_PIXELS); a refused one, SLACK_MB. The inputs a server has met stay under
# 128 MB.
SLACK_MB = 24
UNDER_128_MB = {"16-bit PNG 6300×6300", "float TIFF 4500×4500",
                "ICO (says 16×16) holding a 6000×6000 PNG",
                "PNG declaring 64×64, data for 6000×6000", "TIFF 64×64, second page 6000×6000",
                "GIF 64×64, second frame 6000×6000", "JPEG 7800×5000", "JPEG 8000×6000"}
REFUSED = {"ICO (says 16×16) holding a 6000×6000 PNG": "not an image format",
           "WebP 6000×6000": "limit for WebP"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(upload_memory.INPUTS))
def test_decoding_peak_memory(kind, tmp_path):
    path = upload_memory.write_inputs(tmp_path, [kind])[kind]
    result = upload_memory.measure(path)
    assert Path(result["module"]).resolve() == (ROOT / "dynviz" / "uploads.py").resolve()
    if kind in REFUSED:
        assert result["outcome"].startswith("refused") and REFUSED[kind] in result["outcome"]
    else:
        assert result["outcome"] == "accepted (32, 32, 3)", result["outcome"]
    copies = 0 if kind in REFUSED else 4 if kind.startswith("WebP") else 1
    bound = copies * upload_memory.INPUTS[kind].decoded_mb + SLACK_MB
    if kind in UNDER_128_MB:
        bound = min(bound, 128)
    assert result["peak_mb"] <= bound, result

"""Any PIL image to the model's (size, size, 3) uint8, in bounded memory: the full-size image
is never copied. It is shrunk by whole factors a band of rows at a time, at 32 bits for high
bit depths, and only the small result is converted, composited, resized and turned upright.
``dynviz.data`` opens the files (uploads, datasets) and calls ``to_rgb_array``.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import ExifTags, Image

# The formats dynviz reads (PIL's names) and their file suffixes: the ImageFolder file filter,
# the upload page's `type=` and the upload decoder's `formats=` all come from here.
IMAGE_FORMATS = {"JPEG": ("jpg", "jpeg"), "PNG": ("png",), "WEBP": ("webp",), "BMP": ("bmp",),
                 "GIF": ("gif",), "TIFF": ("tif", "tiff")}
IMAGE_SUFFIXES = tuple(f".{s}" for suffixes in IMAGE_FORMATS.values() for s in suffixes)
REDUCING_GAP = 2      # shrink by whole factors while an image stays ≥ 2× the output side
_BAND_PIXELS = 2**20  # rows converted at a time while shrinking: ≤ 4 MB in mode I, F or RGBA

_ORIENTATION = {  # EXIF orientation -> the transposition that shows the image upright
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def _working_mode(img: Image.Image) -> str:
    """The mode an image is shrunk in: 32-bit for high bit depths, RGBA where there is alpha
    (``reduce`` premultiplies it), else 8-bit L or RGB. Palettes and bilevel are expanded."""
    if img.mode.startswith("I") or img.mode == "F":   # I, I;16, I;16B, I;16L, F
        return "I" if img.mode.startswith("I") else "F"
    if img.has_transparency_data:
        return "RGBA"
    return "L" if img.mode in ("L", "1") else "RGB"


def _shrunk(img: Image.Image, box: tuple[float, float, float, float], mode: str,
            factor: int) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """The part of ``img`` under ``box`` (pixel edges, may be fractional) in ``mode``, reduced
    ``factor`` times by box averages on the image's own grid of ``factor``-pixel boxes (as
    ``Image.resize(reducing_gap=...)`` does), and ``box`` in the reduced image's coordinates.

    Rows are converted and reduced one band at a time: no full-size copy is ever made.
    """
    left, top = int(box[0]) // factor * factor, int(box[1]) // factor * factor
    right = min(img.width, -(-math.ceil(box[2]) // factor) * factor)
    bottom = min(img.height, -(-math.ceil(box[3]) // factor) * factor)
    rows = factor * max(1, _BAND_PIXELS // ((right - left) * factor))   # a multiple of factor
    out = Image.new(mode, (-(-(right - left) // factor), -(-(bottom - top) // factor)))
    for y in range(top, bottom, rows):
        band = img.crop((left, y, right, min(y + rows, bottom))).convert(mode)
        out.paste(band.reduce(factor), (0, (y - top) // factor))
    return out, ((box[0] - left) / factor, (box[1] - top) / factor,
                 (box[2] - left) / factor, (box[3] - top) / factor)


def _to_8bit(img: Image.Image, source_mode: str, extrema: tuple[float, float]) -> Image.Image:
    """A small mode-I or F image -> mode L. 16-bit images scale 0..65535 to 0..255; float
    images within [0, 1] scale to 0..255; anything else maps its own min..max (``extrema``,
    of the full-size image) to 0..255, except that integers within 0..255 or 0..65535 keep
    that range."""
    lo, hi = extrema
    if source_mode.startswith("I;16"):
        low, high = 0.0, 65535.0
    elif source_mode == "F" and 0 <= lo and hi <= 1:
        low, high = 0.0, 1.0
    elif source_mode == "I" and 0 <= lo and hi <= 65535:
        low, high = 0.0, (255.0 if hi <= 255 else 65535.0)
    else:
        low, high = (lo, hi) if hi > lo else (0.0, 255.0)   # a constant image: as 8-bit
    arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=low)   # small: ≤ 4× the output
    scaled = (arr - low) * (255.0 / (high - low)) + 0.5
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), "L")


def to_rgb_array(img: Image.Image, size: int,
                 extent: tuple[float, float] | None = None) -> np.ndarray:
    """Any PIL image -> (size, size, 3) uint8: EXIF orientation, any mode to RGB (alpha
    composited on white, 16-bit and float scaled to 8 bits), centre-cropped to a square and
    resized (Lanczos). ``extent``: the width and height the picture covers in ``img`` when
    that is fractional (a JPEG decoded at 1/8 of 900 pixels covers 112.5 of its 113).

    Memory: beside ``img`` itself only bands of rows and a small image are allocated. The
    square is first shrunk by a whole factor (box average, at 32 bits for high bit depths) to
    a side of at least ``REDUCING_GAP × size``; every other step runs on that small copy.
    """
    source_mode = img.mode
    extrema = img.getextrema() if source_mode in ("I", "F") else (0.0, 0.0)
    orientation = img.getexif().get(ExifTags.Base.Orientation)
    width, height = extent or img.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    factor = max(1, int(side) // (REDUCING_GAP * size))
    img, box = _shrunk(img, (left, top, left + side, top + side), _working_mode(img), factor)
    if img.mode in ("I", "F"):
        img = _to_8bit(img, source_mode, extrema)
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    img = img.convert("RGB").resize((size, size), Image.Resampling.LANCZOS, box=box)
    if orientation in _ORIENTATION:   # the crop is centred: turning it last is exact
        img = img.transpose(_ORIENTATION[orientation])
    return np.asarray(img, dtype=np.uint8)


def webp_size(raw: bytes) -> tuple[int, int] | None:
    """The canvas a WebP file declares in its first chunk (VP8X, VP8L or VP8), or None when
    ``raw`` is not a WebP file. PIL allocates that canvas when it opens the file, so this
    is how to know the size before."""
    if raw[:4] != b"RIFF" or raw[8:12] != b"WEBP" or len(raw) < 30:
        return None
    chunk = raw[12:16]
    if chunk == b"VP8X":   # 24-bit width - 1 and height - 1 at bytes 24 and 27
        return 1 + int.from_bytes(raw[24:27], "little"), 1 + int.from_bytes(raw[27:30], "little")
    if chunk == b"VP8L":   # after the 0x2f signature: 14-bit width - 1, 14-bit height - 1
        bits = int.from_bytes(raw[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + (bits >> 14 & 0x3FFF)
    if chunk == b"VP8 ":   # after the frame tag and start code: 14-bit width, 14-bit height
        return (int.from_bytes(raw[26:28], "little") & 0x3FFF,
                int.from_bytes(raw[28:30], "little") & 0x3FFF)
    return None

"""The one preprocessing function for uploaded images: bytes in, the (size, size, 3) uint8 a
system sees out, in bounded memory and with one clear error for anything that is not a
decodable image of acceptable size (the image arithmetic is ``dynviz.decode``).
"""
from __future__ import annotations

import io
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from dynviz import decode
from dynviz.decode import IMAGE_FORMATS

MAX_UPLOAD_PIXELS = 40_000_000  # refuse to decode larger images (decompression bombs)
# PIL's WebP decoder holds four canvases of 4 bytes a pixel (libwebp's two, allocated when the
# file is opened, the frame's bytes and the image): a quarter of the limit keeps a WebP to
# what a full-size RGB image of another format costs.
MAX_WEBP_PIXELS = MAX_UPLOAD_PIXELS // 4


class InvalidImageError(ValueError):
    """An upload that is not a decodable image of acceptable size."""


def _refuse_if_too_large(declared: tuple[int, int], decoded: tuple[int, int], limit: int,
                         what: str = "") -> None:
    """``decoded``: the size decoding allocates (a JPEG may decode at 1/2, 1/4 or 1/8)."""
    if decoded[0] * decoded[1] <= limit:
        return
    scaled = "" if decoded == declared else f" ({decoded[0]}×{decoded[1]} as decoded)"
    raise InvalidImageError(f"the image is {declared[0]}×{declared[1]} pixels{scaled}; the limit "
                            f"{what}is {limit / 1e6:.0f} megapixels")


def preprocess_upload(data: bytes | BinaryIO, size: int) -> np.ndarray:
    """Bytes of an uploaded image -> (size, size, 3) uint8 as the model sees it.

    Only ``IMAGE_FORMATS`` are opened, and only the first frame is decoded (later frames are
    never read, whatever size they declare). Its size is held to ``MAX_UPLOAD_PIXELS`` before
    decoding, and again after. A JPEG decodes at the smallest scale (1/2, 1/4, 1/8) that keeps
    ``decode.REDUCING_GAP × size`` pixels on its short side; ``decode.to_rgb_array`` then
    shrinks without full-size copies: an upload costs one decoded image at its own bit depth
    plus bands.
    WebP is the exception (four canvases, see ``MAX_WEBP_PIXELS``); its size is read from its
    header before PIL opens it.

    Raises:
        InvalidImageError: empty, not an image of those formats (text, SVG, ICO), truncated or
            corrupt, or larger than ``MAX_UPLOAD_PIXELS`` as decoded (``MAX_WEBP_PIXELS``).
    """
    raw = data if isinstance(data, bytes) else data.read()
    if not raw:
        raise InvalidImageError("the file is empty")
    if webp := decode.webp_size(raw):
        _refuse_if_too_large(webp, webp, MAX_WEBP_PIXELS, "for WebP ")
    try:
        # no warning filter around this: filters are process-wide, and changing them per
        # upload races with every other session (PIL may warn about an image that our own,
        # lower, pixel limit then refuses)
        img = Image.open(io.BytesIO(raw), formats=list(IMAGE_FORMATS))
        with img:
            declared = img.size
            if min(declared) < 1:
                raise InvalidImageError("the image has no pixels")
            gap = decode.REDUCING_GAP
            drafted = img.draft("RGB", (gap * size, gap * size))   # JPEG only
            _refuse_if_too_large(declared, img.size, MAX_UPLOAD_PIXELS)
            img.load()
            _refuse_if_too_large(declared, img.size, MAX_UPLOAD_PIXELS)   # as decoded
            return decode.to_rgb_array(img, size, drafted[1][2:] if drafted else None)
    except InvalidImageError:
        raise
    except UnidentifiedImageError:
        raise InvalidImageError("this is not an image format we can read "
                                f"({', '.join(IMAGE_FORMATS)})") from None
    except Image.DecompressionBombError as err:
        raise InvalidImageError(f"the image is too large to decode safely: {err}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise InvalidImageError(f"the image could not be decoded (truncated or corrupt): "
                                f"{err}") from None


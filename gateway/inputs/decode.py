"""Image bytes -> RGB ``uint8 [H, W, 3]``, bounded and allow-listed. Pure: no runpod, no tritonclient.

Base64 (raw or ``data:`` URI) is length-checked before decoding and decoded with ``validate=True``. The
pixel count is checked from the header before any pixel is decoded (decompression bombs), decode work
is bounded first (``decode_limits``: JPEG scans, TIFF strips and tiles), only the
allow-listed formats are opened (GIF: its first frame), EXIF orientation is applied, and every mode
(grayscale, palette, transparency, CMYK, 16-bit) is converted to 8-bit RGB.
"""

from __future__ import annotations

import binascii
import io
import re
import warnings
from collections.abc import Callable

import numpy as np
import pybase64
from PIL import Image, ImageOps, UnidentifiedImageError

from catalogue.size import Size
from gateway.errors import ImageError
from gateway.inputs.decode_limits import check_decode_work

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
ORIENTATION = 0x0112  # the EXIF tag
SIDEWAYS = (5, 6, 7, 8)  # orientations stored rotated by 90 degrees
EXIF_IFD, FOCAL_LENGTH_35MM = 0x8769, 0xA405
_DATA_URI = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)


def decode_base64(text: str, max_chars: int) -> bytes:
    """Raw base64 or a ``data:image/...;base64,`` URI to bytes."""
    text = text.strip()  # the same object when there is nothing to strip: no copy of a large image
    payload = text
    if text[:5].lower() == "data:":  # only the head is looked at (lower-casing all of it copied it)
        found = _DATA_URI.match(text)
        if found is None:
            raise ImageError("unsupported data URI: expected data:image/...;base64,")
        payload = text[found.end() :]
    if len(payload) > max_chars:
        raise ImageError(f"base64 image too large: {len(payload)} characters, at most {max_chars}")
    try:
        data = pybase64.b64decode(payload, validate=True)  # SIMD: 50x the stdlib's validating decode
    except (binascii.Error, ValueError):
        raise ImageError("invalid base64 image data") from None
    if not data:
        raise ImageError("empty image data")
    return data


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Read only the header of ``data``: decode-work limits, format allow-list and pixel count checked."""
    check_decode_work(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise ImageError(f"not an image, or not one of the supported formats ({', '.join(ALLOWED_FORMATS)})") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageError("image has too many pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError):
        raise ImageError("image data is corrupt or truncated") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"image too large: {width}x{height} pixels, at most {max_pixels} pixels")
    if width < 1 or height < 1:
        raise ImageError("image has no pixels")
    return image


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode ``data`` to RGB uint8, with EXIF orientation applied (``open_image``'s checks first)."""
    return decode_scaled(data, max_pixels, None)[0]


def decode_scaled(data: bytes, max_pixels: int, at_least: Callable[[Size], Size] | None) -> tuple[np.ndarray, Size]:
    """``decode_image``, possibly at a reduced scale, and the photo's upright size.

    ``at_least`` maps the photo's upright size to the smallest size the caller
    needs; a JPEG is then decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, what Pillow's
    ``draft`` asks for) when that still covers it: a 4032x3024 photo for a 686x518 network input
    decodes at 1008x756, several times faster and in a sixteenth of the memory.
    """
    image = open_image(data, max_pixels)
    try:
        orientation = image.getexif().get(ORIENTATION, 1)
        sideways = orientation in SIDEWAYS
        stored = Size(*image.size)
        upright = stored.turned() if sideways else stored
        if at_least is not None and image.format == "JPEG":
            needed = at_least(upright)
            image.draft(image.mode, needed.turned() if sideways else needed)
        image.load()
        if orientation != 1:
            image = ImageOps.exif_transpose(image)
        return to_rgb(image), upright
    except (OSError, SyntaxError, ValueError, EOFError):
        raise ImageError("image data is corrupt or truncated") from None


def focal_length_35mm(data: bytes) -> float | None:
    """The photo's EXIF ``FocalLengthIn35mmFilm`` in millimetres, if it states a positive one."""
    try:
        value = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS).getexif().get_ifd(EXIF_IFD).get(FOCAL_LENGTH_35MM)
        return float(value) if value and float(value) > 0 else None
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, UnidentifiedImageError):
        return None


def to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow mode to contiguous RGB uint8; transparency is composited onto white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        gray = np.clip(values * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float32)
        gray = np.clip(values * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        image = image.convert("RGBA")
        if image.getchannel("A").getextrema() != (255, 255):  # opaque everywhere: no copy to composite
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)

"""Arrays -> encoded image bytes, and bytes -> base64 text (or kept as bytes for uploads). Pure.

PNG goes through the fast encoder in ``gateway.outputs.png``; JPEG and WebP through OpenCV's codecs. An image
wider or taller than WebP (16383 px) or JPEG (65500 px) allows is written as PNG instead.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import cv2
import numpy as np
import pybase64

from catalogue.size import Size
from gateway.outputs.png import encode_png

MIME = {"png": "image/png", "webp": "image/webp", "jpg": "image/jpeg"}
MAX_SIDE = {"webp": 16383, "jpg": 65500}  # the formats' own limits (libwebp, libjpeg)


def writable_format(fmt: str, size: Size) -> str:
    """``fmt``, or ``png`` when the image is larger than ``fmt`` can hold (the ``*_mime`` key says which)."""
    return "png" if max(size) > MAX_SIDE.get(fmt, 1 << 31) else fmt


def encode_image(array: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    """RGB uint8 [H, W, 3], or grayscale uint8/uint16 [H, W], as png / webp / jpg."""
    if fmt == "png":
        return encode_png(array)
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    if fmt == "jpg":
        params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    elif fmt == "webp":
        params = [cv2.IMWRITE_WEBP_QUALITY, quality]
    else:
        raise ValueError(f"unknown output format {fmt!r}")
    ok, buffer = cv2.imencode(f".{fmt}", array, params)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {fmt} image")
    return buffer.tobytes()


def encode_npz(depth: np.ndarray) -> bytes:
    """``np.savez_compressed`` archive holding one float32 array ``depth``."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, depth=depth.astype(np.float32, copy=False))
    return buffer.getvalue()


def b64(data: bytes | bytearray) -> str:
    return pybase64.b64encode_as_string(data)  # SIMD base64 written straight into the str: no second copy


def keep(data: bytes) -> bytes:
    """Outputs that are uploaded stay bytes: no base64 on the way out and back."""
    return data


Pack = Callable[[bytes], str | bytes]

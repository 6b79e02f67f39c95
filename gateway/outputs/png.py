"""A fast PNG encoder for 8/16-bit grayscale and 8-bit RGB arrays.

libpng (behind OpenCV and Pillow) tries every row filter and runs zlib; on a 1024x768 depth map that costs
40-50 ms of one core. Here every row uses the "Up" filter (one vectorized subtraction, which suits smooth
depth maps and renderings of them) and ISA-L's deflate at level 1: about 7 ms, with files smaller than
Pillow's defaults for 16-bit depth. The CRCs are ISA-L's too (a tenth of zlib's time on a 1.8 MB body).
The output is plain PNG (any decoder reads it; the tests check round trips through OpenCV and Pillow, and
every chunk's CRC).
"""

from __future__ import annotations

import struct

import numpy as np
from isal import isal_zlib

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FILTER_UP = 2
_COLOR_TYPES = {1: 0, 3: 2}  # channels -> PNG colour type (grayscale, truecolour)


def _chunk(kind: bytes, body: bytes) -> list[bytes]:
    """One chunk's parts (length, type, body, CRC), for one join: the body, up to megabytes, is copied once."""
    return [struct.pack(">I", len(body)), kind, body, struct.pack(">I", isal_zlib.crc32(body, isal_zlib.crc32(kind)))]


def encode_png(array: np.ndarray, level: int = 1) -> bytes:
    """``uint8``/``uint16`` ``[H, W]`` (grayscale) or ``uint8 [H, W, 3]`` (RGB) as PNG bytes."""
    if array.dtype not in (np.uint8, np.uint16) or array.ndim not in (2, 3):
        raise ValueError(f"cannot write {array.dtype} {array.shape} as PNG")
    channels = 1 if array.ndim == 2 else array.shape[2]
    if channels not in _COLOR_TYPES or (channels == 3 and array.dtype != np.uint8):
        raise ValueError(f"cannot write {array.dtype} {array.shape} as PNG")
    height, width = array.shape[:2]
    rows = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder(">")).view(np.uint8).reshape(height, -1)
    filtered = np.empty((height, rows.shape[1] + 1), np.uint8)
    filtered[:, 0] = _FILTER_UP
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    header = struct.pack(">IIBBBBB", width, height, array.dtype.itemsize * 8, _COLOR_TYPES[channels], 0, 0, 0)
    data = isal_zlib.compress(filtered.data, level)
    return b"".join([_SIGNATURE, *_chunk(b"IHDR", header), *_chunk(b"IDAT", data), *_chunk(b"IEND", b"")])

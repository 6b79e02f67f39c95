"""Awkward image files, built with Pillow: bombs, truncations, odd modes, rotations, extreme shapes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels, with one empty data chunk."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def photo_like(width: int, height: int) -> np.ndarray:
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack(
        [cols * 255 // max(width - 1, 1), rows * 255 // max(height - 1, 1), (rows + cols) % 256], axis=2
    ).astype(np.uint8)


def gradient_16bit() -> bytes:
    return encode(Image.fromarray(np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (16, 1))), "PNG")


def palette_with_transparency() -> bytes:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([255, 0, 0, 0, 0, 255])
    image.paste(1, (4, 0, 8, 8))
    return encode(image, "PNG", transparency=0)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_rotated_jpeg(width: int = 60, height: int = 40) -> bytes:
    """Stored ``width x height``, EXIF orientation 6 (rotate 90 degrees clockwise to display)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(photo_like(width, height)), "JPEG", exif=exif.tobytes())


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (30, 20), (0, 255, 255, 0)), "JPEG")


def truncated_jpeg() -> bytes:
    data = encode(Image.fromarray(photo_like(64, 64)), "JPEG")
    return data[: len(data) // 2]


def ppm() -> bytes:
    return encode(Image.fromarray(photo_like(8, 8)), "PPM")


def real_bomb() -> bytes:
    """8000 x 7000 black grayscale (56 M pixels) compressed to a few dozen kB."""
    return encode(Image.new("L", (8000, 7000)), "PNG")

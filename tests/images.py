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


def _jpeg_segments(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each start-of-scan segment, its entropy-coded data included."""
    spans, position = [], 2
    while position < len(data) - 1:
        marker = data[position + 1]
        if marker == 0xD9:
            break
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        end = position + 2 + length
        if marker == 0xDA:
            while not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
                end += 1
            spans.append((position, end))
        position = end
    return spans


def scan_bomb_jpeg(side: int = 2048, repeats: int = 3000) -> bytes:
    """A small progressive JPEG whose last scan is repeated ``repeats`` times (each a full decode pass)."""
    data = encode(Image.new("L", (side, side), 128), "JPEG", progressive=True, quality=10)
    start, end = _jpeg_segments(data)[-1]
    return data[:start] + data[start:end] * repeats + data[end:]


def strip_bomb_tiff(strips: int = 1_500_000) -> bytes:
    """A 4x4 grayscale TIFF whose directory lists ``strips`` strips, all pointing at the same 4 bytes."""
    entries = [(256, 3, 1, 4), (257, 3, 1, 4), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1)]
    offsets_at = 8 + 2 + 8 * 12 + 4
    counts_at = offsets_at + 4 * strips
    pixels_at = counts_at + 4 * strips
    entries += [(273, 4, strips, offsets_at), (278, 3, 1, 1), (279, 4, strips, counts_at)]
    directory = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + bytes(4)
    body = struct.pack(f"<{strips}I", *[pixels_at] * strips) + struct.pack(f"<{strips}I", *[4] * strips)
    return b"II*\x00" + struct.pack("<I", 8) + directory + body + b"\x80" * 16


def _riff_chunk(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("<I", len(body)) + body + (b"\x00" if len(body) % 2 else b"")


def huge_canvas_webp(side: int = 7000) -> bytes:
    """An animated WebP of about 100 bytes: a ``side x side`` canvas holding one 1x1 frame."""
    single = encode(Image.new("RGB", (1, 1), (10, 20, 30)), "WEBP", lossless=True)
    bitstream = single[12:]  # the VP8L chunk, as is
    size = struct.pack("<I", side - 1)[:3] * 2
    canvas = _riff_chunk(b"VP8X", bytes([0x02, 0, 0, 0]) + size)  # flags: animation
    animation = _riff_chunk(b"ANIM", bytes(4) + struct.pack("<H", 0))
    frame = _riff_chunk(b"ANMF", bytes(6) + bytes(6) + struct.pack("<I", 100)[:3] + b"\x00" + bitstream)
    body = b"WEBP" + canvas + animation + frame
    return b"RIFF" + struct.pack("<I", len(body)) + body

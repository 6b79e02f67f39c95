"""The fast PNG encoder: exact round trips through OpenCV and Pillow, clear refusals."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from gateway.outputs.png import encode_png

rng = np.random.default_rng(0)


@pytest.mark.parametrize(
    "array",
    [
        rng.integers(0, 65536, (7, 5), dtype=np.uint16),
        rng.integers(0, 256, (1, 1), dtype=np.uint8),
        rng.integers(0, 256, (3, 9, 3), dtype=np.uint8),
        rng.integers(0, 256, (1, 300, 3), dtype=np.uint8),
        np.zeros((768, 1024), np.uint16),
        np.full((4, 4), 65535, np.uint16),
        np.asfortranarray(rng.integers(0, 256, (6, 4), dtype=np.uint8)),
    ],
)
def test_round_trip_is_exact(array: np.ndarray) -> None:
    data = encode_png(array)
    with_opencv = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array.ndim == 3:
        with_opencv = cv2.cvtColor(with_opencv.reshape(*array.shape[:2], 3), cv2.COLOR_BGR2RGB)
    assert np.array_equal(with_opencv.reshape(array.shape), array)
    with_pillow = Image.open(io.BytesIO(data))
    with_pillow.load()  # checks the CRCs and the zlib stream
    assert np.array_equal(np.asarray(with_pillow).reshape(array.shape).astype(array.dtype), array)


def test_chunks_are_framed_with_their_crcs() -> None:
    array = rng.integers(0, 65536, (40, 30), dtype=np.uint16)
    data = encode_png(array)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, kinds = 8, []
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        kinds.append(kind)
        at += 12 + length
    assert at == len(data)
    assert kinds == [b"IHDR", b"IDAT", b"IEND"]
    assert struct.unpack(">IIBB", data[16:26]) == (30, 40, 16, 0)  # width, height, bit depth, grayscale


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((4, 4), np.float32),
        np.zeros((4, 4, 3), np.uint16),
        np.zeros((4, 4, 4), np.uint8),
        np.zeros(4, np.uint8),
    ],
)
def test_unsupported_arrays_are_refused(array: np.ndarray) -> None:
    with pytest.raises(ValueError, match="cannot write"):
        encode_png(array)

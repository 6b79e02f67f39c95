"""Helpers for asserting on gateway outputs, and for waiting on what a running worker does."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable

import cv2
import numpy as np


def decode_image(b64: str) -> np.ndarray:
    """base64 PNG/WebP/JPEG -> array as stored (uint16 gray, uint8 gray, or RGB)."""
    array = cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_UNCHANGED)
    assert array is not None, "output is not a decodable image"
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB) if array.ndim == 3 else array


def decode_npz(b64: str) -> np.ndarray:
    with np.load(io.BytesIO(base64.b64decode(b64))) as archive:
        assert list(archive.keys()) == ["depth"]
        return archive["depth"]


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


def b64decode(text: str) -> bytes:
    return base64.b64decode(text)


def wait_until(condition: Callable[[], object], timeout: float, what: str = "condition not met") -> None:
    """Poll ``condition`` until it holds; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} (after {timeout:g} s)")
        time.sleep(0.05)

"""Image sizing before inference: the ``max_size`` downscale and the snap to a shape bucket. Pure.

Triton batches only requests of equal shape, so every image is resized to one of the model's few
network shapes (its "buckets", from the model's Triton config): the one whose aspect ratio is nearest
in log space. Shrinking uses area averaging (an antialiased resize, like Pillow's); enlarging uses the
checkpoint's own filter (bicubic for Depth-Anything, bilinear for DPT).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from catalogue.size import Size

_ENLARGE = {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR}


def limited_size(size: Size, max_size: int) -> Size:
    """``size`` with the longest edge at most ``max_size`` (aspect kept); never larger."""
    longest = max(size)
    if longest <= max_size:
        return Size(*size)
    scale = max_size / longest
    return Size(max(1, round(size.width * scale)), max(1, round(size.height * scale)))


def limit_size(image: np.ndarray, max_size: int) -> np.ndarray:
    """Downscale so that the longest edge is at most ``max_size`` (aspect kept); never upscales."""
    return shrink_to(image, limited_size(Size.of(image), max_size))


def shrink_to(image: np.ndarray, size: Size) -> np.ndarray:
    """Area-downscale to ``size``; ``image`` itself when it is nowhere larger (a reduced-scale decode may
    already be smaller than ``size``)."""
    current = Size.of(image)
    if size.width >= current.width and size.height >= current.height:
        return image
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def nearest_bucket(size: Size, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is closest to ``size``'s."""
    aspect = math.log(size.width / size.height)
    return min(buckets, key=lambda bucket: abs(math.log(bucket.width / bucket.height) - aspect))


def to_bucket(image: np.ndarray, bucket: Size, resample: str) -> np.ndarray:
    """Resize RGB uint8 ``image`` to ``bucket``."""
    if Size.of(image) == bucket:
        return np.ascontiguousarray(image)
    shrinking = bucket.pixels < Size.of(image).pixels
    interpolation = cv2.INTER_AREA if shrinking else _ENLARGE[resample]
    return cv2.resize(image, bucket, interpolation=interpolation)

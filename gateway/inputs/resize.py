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

_ENLARGE = {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR}


def limited_size(width: int, height: int, max_size: int) -> tuple[int, int]:
    """(width, height) with the longest edge at most ``max_size`` (aspect kept); never larger."""
    longest = max(height, width)
    if longest <= max_size:
        return width, height
    scale = max_size / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def limit_size(image: np.ndarray, max_size: int) -> np.ndarray:
    """Downscale so that the longest edge is at most ``max_size`` (aspect kept); never upscales."""
    height, width = image.shape[:2]
    return shrink_to(image, limited_size(width, height, max_size))


def shrink_to(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-downscale to ``size`` (width, height); ``image`` itself when it is nowhere larger (a
    reduced-scale decode may already be smaller than ``size``)."""
    height, width = image.shape[:2]
    if size[0] >= width and size[1] >= height:
        return image
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The (height, width) bucket whose aspect ratio is closest to the image's."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda bucket: abs(math.log(bucket[1] / bucket[0]) - aspect))


def to_bucket(image: np.ndarray, bucket: tuple[int, int], resample: str) -> np.ndarray:
    """Resize RGB uint8 ``image`` to ``bucket`` (height, width)."""
    height, width = bucket
    if image.shape[:2] == (height, width):
        return np.ascontiguousarray(image)
    shrinking = height * width < image.shape[0] * image.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else _ENLARGE[resample]
    return cv2.resize(image, (width, height), interpolation=interpolation)

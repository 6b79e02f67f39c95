"""Depth map -> the five task outputs, on the CPU. Pure: NumPy, OpenCV and matplotlib's colormap tables.

All outputs are at the original image size. A flat or constant depth map gives valid outputs (zeros after
normalization), never a division by zero or NaN. Conventions:

- ``normalized``: (d - min) / (max - min) with ``normalize``; otherwise a fixed scale, d / max_depth for
  metric models and d clipped to [0, 1] for relative ones; for the colorized output. ``invert`` (1 - that)
  applies to it only.
- normals: computed from the back-projected surface (``geometry.surface_normals``), encoded here as
  (n + 1) / 2 * 255.
- disparity: reciprocal depth, min-max normalized to 8 bits. Metric models give distance d, so it is
  1 / d (d clipped to a thousandth of the map's range above zero); relative models already give
  affine-invariant inverse depth, which is shown as it is (inverting it again gave depth back,
  dominated by its smallest values: an almost black picture).
- point cloud: every pixel at (column, distance) on a ``grid x grid`` canvas, camera at the bottom,
  far at the top, each cell the mean colour of the image pixels that land there.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import cv2
import numpy as np
from matplotlib import colormaps

COLORMAPS = ("viridis", "magma", "inferno", "plasma", "turbo", "gray")


@cache
def colormap_lut(name: str) -> np.ndarray:
    """A 256 x 3 uint8 RGB lookup table sampled from matplotlib's colormap (built once per name)."""
    if name not in COLORMAPS:
        raise ValueError(f"unknown colormap {name!r}")
    source = "gray" if name == "gray" else name
    return np.round(colormaps[source](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0).astype(np.uint8)


def upsample(depth: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of the network's depth map back to the original image size (float32)."""
    depth = np.ascontiguousarray(depth, dtype=np.float32)
    if depth.shape == (height, width):
        return depth
    return cv2.resize(depth, (width, height), interpolation=cv2.INTER_LINEAR)


def depth_stats(depth: np.ndarray) -> tuple[float, float, float]:
    return float(depth.min()), float(depth.max()), float(depth.mean(dtype=np.float64))


def _min_max(values: np.ndarray, top: float, dtype: int) -> np.ndarray:
    """min -> 0 and max -> ``top`` in one pass (rounded and saturated for integer types); flat -> 0."""
    return cv2.normalize(values, None, 0.0, top, cv2.NORM_MINMAX, dtype)


def normalized(depth: np.ndarray, normalize: bool, max_depth: float | None) -> np.ndarray:
    """Depth scaled to [0, 1] for the visual outputs (see module docstring)."""
    if normalize:
        return _min_max(depth, 1.0, cv2.CV_32F)
    scale = np.float32(1.0 / max_depth if max_depth else 1.0)  # relative models: d clipped to [0, 1]
    return np.clip(depth * scale, 0.0, 1.0)


def to_uint8(unit: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8, rounded, in one pass."""
    return cv2.convertScaleAbs(unit, alpha=255.0)


def depth_uint16(depth: np.ndarray) -> np.ndarray:
    """The map's min -> 0 and max -> 65535, rounded."""
    return _min_max(depth, 65535.0, cv2.CV_16U)


def colorize(unit: np.ndarray, colormap: str) -> np.ndarray:
    """[0, 1] map -> RGB uint8 through the colormap's lookup table. OpenCV's ``applyColorMap`` with the
    table as its user colormap maps the one channel straight to three (it swaps no channels): 1.5 -> 0.7
    ms for a 1024x768 map against three copies merged and then looked up."""
    return cv2.applyColorMap(to_uint8(unit), colormap_lut(colormap).reshape(256, 1, 3))


def normals_rgb(normals: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Unit normals ``[h, w, 3]`` (or their three planes) as RGB uint8, (n + 1) / 2 * 255 rounded."""
    planes = cv2.split(normals) if isinstance(normals, np.ndarray) else normals
    return cv2.merge([cv2.convertScaleAbs(plane, alpha=127.5, beta=127.5) for plane in planes])


def decode_normals(rgb: np.ndarray) -> np.ndarray:
    """Inverse of ``normals`` (for clients and tests): RGB uint8 -> float vectors in [-1, 1]."""
    return rgb.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def disparity(depth: np.ndarray, metric: bool) -> np.ndarray:
    """Reciprocal depth normalized to 0..255 (uint8): 1 / d for metric maps, relative maps as they are."""
    if not metric:
        return _min_max(depth, 255.0, cv2.CV_8U)
    floor = max((float(depth.max()) - float(depth.min())) * 1e-3, 1e-6)
    inverse = np.maximum(depth, np.float32(floor))
    np.reciprocal(inverse, out=inverse)
    return _min_max(inverse, 255.0, cv2.CV_8U)


def point_cloud(image: np.ndarray, distance: np.ndarray, grid: int) -> np.ndarray:
    """Top-down (x, distance) preview: ``distance`` in [0, 1] (0 = at the camera), RGB uint8 grid x grid."""
    width = distance.shape[1]
    columns = np.rint(np.arange(width) * ((grid - 1) / max(width - 1, 1))).astype(np.intp)
    rows = np.rint((1.0 - distance) * np.float32(grid - 1)).astype(np.intp)  # far at the top
    np.clip(rows, 0, grid - 1, out=rows)
    rows *= grid
    rows += columns
    cells = rows.ravel()  # intp, as bincount wants: no conversion in each of the four calls
    counts = np.maximum(np.bincount(cells, minlength=grid * grid), 1)
    planes = [np.bincount(cells, weights=plane.ravel(), minlength=grid * grid) / counts for plane in cv2.split(image)]
    return cv2.merge([plane.astype(np.uint8).reshape(grid, grid) for plane in planes])


def distance_from_camera(depth: np.ndarray, metric: bool) -> np.ndarray:
    """[0, 1] distance for the point cloud: metric depth grows with distance, relative output shrinks."""
    unit = _min_max(depth, 1.0, cv2.CV_32F)
    return unit if metric else 1.0 - unit

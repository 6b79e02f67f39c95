"""Depth map + camera -> 3D points and a triangle mesh over the pixel grid. Pure: NumPy only.

Camera (pinhole): ``fx, fy, cx, cy`` in pixels of the original image, pixel centres at integer
coordinates as in OpenCV (column u, row v; the image's edges are at -0.5 and W - 0.5). Where the request
gives none: the photo's EXIF ``FocalLengthIn35mmFilm`` (f_px = f35 * diagonal_px / 43.27, the 35 mm
frame's diagonal), else a 60 degree horizontal field of view (the field of view of Hypersim's renders,
on which the indoor metric checkpoint was trained). The principal point defaults to the image centre.

Geometry: Z is planar depth; X = (u - cx) Z / fx, Y = (v - cy) Z / fy, in OpenCV's camera frame (x right,
y down, z forward). Metric models give Z in metres. Relative models give affine-invariant inverse depth,
mapped to Z by spreading the normalized output over [1/far, 1/near] (defaults 1 and 10: a scene ten times
deeper than its nearest point, in arbitrary units, marked ``relative``).

Flying pixels: where neighbouring depths differ by more than ``edge_threshold`` times the nearer one,
the pixels (points) and triangles across that jump are dropped; 0 keeps everything. Size: the grid is
subsampled with the smallest stride that keeps at most ``max_points`` (or ``max_vertices``) samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FILM_DIAGONAL_MM = 43.27  # of the 36 x 24 mm frame
DEFAULT_FOV_X = 60.0
DEFAULT_NEAR, DEFAULT_FAR = 1.0, 10.0


@dataclass(frozen=True)
class Intrinsics:
    fx: float
    fy: float
    cx: float
    cy: float
    source: str  # "request", "exif" or "default"

    def as_dict(self) -> dict:
        return {"fx": self.fx, "fy": self.fy, "cx": self.cx, "cy": self.cy, "source": self.source}


def from_fov(width: int, height: int, fov_x: float, source: str) -> Intrinsics:
    focal = (width / 2) / math.tan(math.radians(fov_x) / 2)
    return Intrinsics(focal, focal, (width - 1) / 2, (height - 1) / 2, source)


def intrinsics_for(width: int, height: int, camera: dict | None, focal_35mm: float | None) -> Intrinsics:
    """The request's camera (``{"fov_x"}`` or ``{"fx", "fy", "cx", "cy"}``), else EXIF, else 60 degrees."""
    if camera is not None:
        if "fov_x" in camera:
            return from_fov(width, height, camera["fov_x"], "request")
        return Intrinsics(camera["fx"], camera["fy"], camera["cx"], camera["cy"], "request")
    if focal_35mm:
        focal = focal_35mm * math.hypot(width, height) / FILM_DIAGONAL_MM
        return Intrinsics(focal, focal, (width - 1) / 2, (height - 1) / 2, "exif")
    return from_fov(width, height, DEFAULT_FOV_X, "default")


def planar_depth(
    depth: np.ndarray,
    metric: bool,
    near: float = DEFAULT_NEAR,
    far: float = DEFAULT_FAR,
    value_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """Z for every pixel: metric depth as it is; relative inverse depth spread over [1/far, 1/near].

    ``value_range`` (low, high) of the whole map, when ``depth`` is a subsample of it.
    """
    if metric:
        return depth.astype(np.float32, copy=False)
    low, high = value_range or (float(depth.min()), float(depth.max()))
    unit = (depth - np.float32(low)) / np.float32(high - low) if high > low else np.zeros_like(depth)
    inverse = np.float32(1.0 / far) + unit * np.float32(1.0 / near - 1.0 / far)
    return np.reciprocal(inverse, dtype=np.float32)


def stride_for(height: int, width: int, limit: int) -> int:
    """The smallest grid step that keeps at most ``limit`` samples."""
    return max(1, math.ceil(math.sqrt(height * width / limit)))


@dataclass(frozen=True)
class Grid:
    """Points of every ``stride``-th pixel: ``xyz [h, w, 3]`` (OpenCV frame), ``rgb [h, w, 3]``, ``valid``."""

    xyz: np.ndarray
    rgb: np.ndarray
    valid: np.ndarray
    jumps_right: np.ndarray  # [h, w-1]: depth jump between a sample and its right neighbour
    jumps_down: np.ndarray  # [h-1, w]
    jumps_diagonal: np.ndarray  # [h-1, w-1]: between top-right and bottom-left of each quad


def sample_grid(zs: np.ndarray, colours: np.ndarray, camera: Intrinsics, stride: int, edge_threshold: float) -> Grid:
    """Back-project ``zs``, the Z of every ``stride``-th pixel (``z[::stride, ::stride]``), and its colours."""
    rows = np.arange(zs.shape[0], dtype=np.float32) * np.float32(stride)
    cols = np.arange(zs.shape[1], dtype=np.float32) * np.float32(stride)
    xyz = np.empty((*zs.shape, 3), np.float32)
    np.multiply((cols[None, :] - np.float32(camera.cx)) / np.float32(camera.fx), zs, out=xyz[..., 0])
    np.multiply((rows[:, None] - np.float32(camera.cy)) / np.float32(camera.fy), zs, out=xyz[..., 1])
    xyz[..., 2] = zs
    valid = np.isfinite(zs) & (zs > 0)
    jumps_right = _jumps(zs[:, :-1], zs[:, 1:], edge_threshold)
    jumps_down = _jumps(zs[:-1, :], zs[1:, :], edge_threshold)
    jumps_diagonal = _jumps(zs[:-1, 1:], zs[1:, :-1], edge_threshold)
    return Grid(xyz, colours, valid, jumps_right, jumps_down, jumps_diagonal)


def _jumps(a: np.ndarray, b: np.ndarray, threshold: float) -> np.ndarray:
    if threshold <= 0:
        return np.zeros(a.shape, bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.abs(a - b) > threshold * np.minimum(a, b)


def point_mask(grid: Grid) -> np.ndarray:
    """Valid samples that touch no depth jump (a flying pixel sits on one)."""
    keep = grid.valid.copy()
    keep[:, :-1] &= ~grid.jumps_right
    keep[:, 1:] &= ~grid.jumps_right
    keep[:-1, :] &= ~grid.jumps_down
    keep[1:, :] &= ~grid.jumps_down
    return keep


def triangles(grid: Grid) -> np.ndarray:
    """``int64 [n, 3]`` vertex indices (into the flattened grid), two per quad, none across a jump.

    Wound counter-clockwise as seen from the camera in glTF's frame (y up), so the faces look at it.
    """
    h, w = grid.valid.shape
    index = np.arange(h * w).reshape(h, w)
    a, b, c, d = index[:-1, :-1], index[:-1, 1:], index[1:, :-1], index[1:, 1:]  # tl, tr, bl, br
    valid = grid.valid
    va, vb, vc, vd = valid[:-1, :-1], valid[:-1, 1:], valid[1:, :-1], valid[1:, 1:]
    top, bottom = grid.jumps_right[:-1, :], grid.jumps_right[1:, :]
    left, right = grid.jumps_down[:, :-1], grid.jumps_down[:, 1:]
    diagonal = grid.jumps_diagonal
    first = va & vb & vc & ~top & ~left & ~diagonal  # a, c, b
    second = vb & vc & vd & ~bottom & ~right & ~diagonal  # b, c, d
    return np.concatenate(
        [np.stack([a[first], c[first], b[first]], axis=1), np.stack([b[second], c[second], d[second]], axis=1)]
    )

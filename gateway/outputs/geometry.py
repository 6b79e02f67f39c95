"""Depth map + camera -> 3D points, a triangle mesh over the pixel grid, and surface normals. Pure:
NumPy and OpenCV's array operations.

Camera (pinhole): ``fx, fy, cx, cy`` in pixels of the original image, pixel centres at integer
coordinates as in OpenCV (column u, row v; the image's edges are at -0.5 and W - 0.5). Where the request
gives none: the photo's EXIF ``FocalLengthIn35mmFilm`` (f_px = f35 * diagonal_px / 43.27, the 35 mm
frame's diagonal), else a 60 degree horizontal field of view (the field of view of Hypersim's renders,
on which the indoor metric checkpoint was trained). The principal point defaults to the image centre.
A camera is accepted when it is physically meaningful for the image (``check_intrinsics``): each focal
length gives a field of view between 1 and 179 degrees along its axis, and the principal point lies
within one image size of the image. An EXIF focal length outside that is ignored (the default is used).

Geometry: Z is planar depth; X = (u - cx) Z / fx, Y = (v - cy) Z / fy, in OpenCV's camera frame (x right,
y down, z forward). Metric models give Z in metres. Relative models give affine-invariant inverse depth,
mapped to Z by spreading the normalized output over [1/far, 1/near] (defaults 1 and 10: a scene ten times
deeper than its nearest point, in arbitrary units, marked ``relative``).

Coordinates are computed in float64 and stored as float32; a sample that is not finite after that is
never written, so every PLY and GLB coordinate is finite whatever the depth values.

Normals (``surface_normals``): the cross product of the back-projected surface's derivatives along the
pixel grid, with the same camera and Z as the points, in one frame for every model: x right, y up, z
towards the camera (the usual normal-map convention), pointing towards the camera. A floor is (0, 1, 0),
a wall facing the camera (0, 0, 1).

Flying pixels: where neighbouring depths differ by more than ``edge_threshold`` times the nearer one,
the pixels (points) and triangles across that jump are dropped; 0 keeps everything. Size: the grid is
subsampled with the smallest stride that keeps at most ``max_points`` (or ``max_vertices``) samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

FILM_DIAGONAL_MM = 43.27  # of the 36 x 24 mm frame
DEFAULT_FOV_X = 60.0
MIN_FOV, MAX_FOV = 1.0, 179.0  # degrees, along each axis
PRINCIPAL_POINT_MARGIN = 1.0  # image sizes the principal point may lie outside the image


class CameraError(ValueError):
    """The camera is not physically meaningful for this image; the message says which value and why."""


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


def focal_range(side: int) -> tuple[float, float]:
    """The focal lengths (pixels) that give a field of view between ``MIN_FOV`` and ``MAX_FOV`` across
    ``side`` pixels."""
    return side / 2 / math.tan(math.radians(MAX_FOV) / 2), side / 2 / math.tan(math.radians(MIN_FOV) / 2)


def check_intrinsics(camera: Intrinsics, width: int, height: int) -> Intrinsics:
    """``camera``, or CameraError when it is not physically meaningful for a ``width`` x ``height`` image."""
    for name, focal, side, extent in (("fx", camera.fx, width, "wide"), ("fy", camera.fy, height, "tall")):
        low, high = focal_range(side)
        if not low <= focal <= high:
            raise CameraError(
                f"camera.{name} {focal:.6g} px gives a field of view outside {MIN_FOV:g}-{MAX_FOV:g} degrees for "
                f"this {side} px {extent} image; expected {low:.4g} to {high:.4g} px"
            )
    for name, centre, side in (("cx", camera.cx, width), ("cy", camera.cy, height)):
        low, high = -PRINCIPAL_POINT_MARGIN * side, (1 + PRINCIPAL_POINT_MARGIN) * side
        if not low <= centre <= high:
            raise CameraError(
                f"camera.{name} {centre:.6g} px is too far outside the image; expected {low:g} to {high:g}"
            )
    return camera


def intrinsics_for(width: int, height: int, camera: dict | None, focal_35mm: float | None) -> Intrinsics:
    """The request's camera (``{"fov_x"}`` or ``{"fx", "fy", "cx", "cy"}``), else EXIF, else 60 degrees;
    CameraError when the request's camera does not fit the image."""
    if camera is not None:
        if "fov_x" in camera:
            return check_intrinsics(from_fov(width, height, camera["fov_x"], "request"), width, height)
        return check_intrinsics(
            Intrinsics(camera["fx"], camera["fy"], camera["cx"], camera["cy"], "request"), width, height
        )
    if focal_35mm:
        focal = focal_35mm * math.hypot(width, height) / FILM_DIAGONAL_MM
        exif = Intrinsics(focal, focal, (width - 1) / 2, (height - 1) / 2, "exif")
        try:
            return check_intrinsics(exif, width, height)
        except CameraError:
            pass  # a nonsensical EXIF value: the default camera instead
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


def stride_for(pixels: int, limit: int) -> int:
    """The smallest grid step that keeps at most ``limit`` of ``pixels`` samples."""
    return max(1, math.ceil(math.sqrt(pixels / limit)))


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
    """Back-project ``zs``, the Z of every ``stride``-th pixel (``z[::stride, ::stride]``), and its colours.
    Rays are computed in float64; a sample whose coordinates are not finite in float32 is not valid."""
    rows = np.arange(zs.shape[0], dtype=np.float64) * stride
    cols = np.arange(zs.shape[1], dtype=np.float64) * stride
    xyz = np.empty((*zs.shape, 3), np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        np.multiply(((cols - camera.cx) / camera.fx).astype(np.float32)[None, :], zs, out=xyz[..., 0])
        np.multiply(((rows - camera.cy) / camera.fy).astype(np.float32)[:, None], zs, out=xyz[..., 1])
    xyz[..., 2] = zs
    valid = np.isfinite(xyz).all(axis=2) & (zs > 0)
    xyz[~valid] = 0.0  # never written, but kept finite for the GLB's bounds
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


def gradient(z: np.ndarray, axis: int) -> np.ndarray:
    """``np.gradient(z, axis=axis)`` of a finite float32 map, the same values (zeros along a side of one
    pixel): central differences inside, one-sided at the edges. OpenCV's [-1, 0, 1] filter does it in one
    pass (np.gradient takes several): 0.84 -> 0.36 ms along the rows of a 1024x768 map, 0.69 -> 0.55 ms
    down its columns."""
    if z.shape[axis] < 2:
        return np.zeros_like(z)
    dx, dy = (1, 0) if axis == 1 else (0, 1)
    d = cv2.Sobel(z, cv2.CV_32F, dx, dy, ksize=1, scale=0.5, borderType=cv2.BORDER_REPLICATE)
    for edge in (d[:, 0], d[:, -1]) if axis == 1 else (d[0], d[-1]):
        edge *= 2  # the replicated border halved the one-sided difference
    return d


def surface_normals(zs: np.ndarray, camera: Intrinsics) -> np.ndarray:
    """``surface_normal_planes`` as one ``float32 [h, w, 3]`` array."""
    return cv2.merge(surface_normal_planes(zs, camera))


def surface_normal_planes(zs: np.ndarray, camera: Intrinsics) -> list[np.ndarray]:
    """Unit normals of the surface ``zs`` (planar depth of every pixel) as three ``float32 [h, w]`` planes
    (x, y, z; no interleaved copy for the encoder to split again), pointing
    towards the camera, in the frame x right, y up, z towards the camera.

    With P = Z ((u - cx) / fx, (v - cy) / fy, 1), dP/du x dP/dv is proportional to
    (-fx Z_u, -fy Z_v, (u - cx) Z_u + (v - cy) Z_v + Z) in OpenCV's frame, whose dot product with P is
    Z^2 > 0 (away from the camera): it is negated, then y and z are flipped into the output frame, which
    leaves (fx Z_u, -fy Z_v, (u - cx) Z_u + (v - cy) Z_v + Z). Where Z is not finite and positive the normal
    faces the camera.
    """
    height, width = zs.shape
    z = zs.astype(np.float32)  # a copy: it is written below
    if not np.isfinite(z).all():  # finite in the common case: no second pass over it
        z = np.nan_to_num(z, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    np.maximum(z, np.float32(0), out=z)
    z_v, z_u = gradient(z, 0), gradient(z, 1)
    u = (np.arange(width, dtype=np.float64) - camera.cx).astype(np.float32)
    v = (np.arange(height, dtype=np.float64) - camera.cy).astype(np.float32)
    nz = np.multiply(z_u, u[None, :])
    nz += z
    nz += np.multiply(z_v, v[:, None], out=z)  # z's memory, no longer needed
    z_u *= np.float32(camera.fx)  # nx
    z_v *= np.float32(-camera.fy)  # ny
    length = cv2.magnitude(cv2.magnitude(z_u, z_v), nz)
    flat = ~(length > 0) | ~np.isfinite(length)
    length[flat] = np.inf  # a flat or unknown spot: (0, 0, 0) + the camera-facing fix below
    np.reciprocal(length, out=length)
    planes = [z_u, z_v, nz]
    for plane in planes:
        plane *= length
    nz[flat] = 1.0
    return planes

"""The pure CPU stages on synthetic maps: planes, flat maps, LUTs, buckets and point clouds."""

from __future__ import annotations

import base64
import subprocess
import sys

import numpy as np
import pytest
from matplotlib import colormaps

from catalogue.models import DEPTH_ANYTHING_BUCKETS
from catalogue.size import Size
from gateway.inputs.resize import limit_size, nearest_bucket, to_bucket
from gateway.outputs import geometry
from gateway.outputs import postprocess as pp
from gateway.outputs.encode import encode_image, writable_format
from tests.helpers import decode_image


def plane(height: int = 60, width: int = 80) -> np.ndarray:
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    return 2.0 + 0.03 * cols + 0.01 * rows


CAMERA = geometry.from_fov(80, 60, 60.0, "default")


def test_normals_round_trip_through_their_rgb_encoding() -> None:
    normals = geometry.surface_normals(plane(), CAMERA)
    assert np.abs(pp.decode_normals(pp.normals_rgb(normals)) - normals).max() <= 1 / 127.5 + 1e-6
    assert np.abs(np.linalg.norm(normals, axis=2) - 1).max() < 1e-5


@pytest.mark.parametrize("value", [0.0, 3.5])
def test_a_constant_map_gives_valid_outputs(value: float) -> None:
    depth = np.full((20, 30), value, np.float32)
    unit = pp.normalized(depth, normalize=True, max_depth=None)
    assert np.array_equal(unit, np.zeros_like(unit))
    assert np.array_equal(pp.depth_uint16(depth), np.zeros((20, 30), np.uint16))
    vectors = geometry.surface_normals(depth, geometry.from_fov(30, 20, 60.0, "default"))
    assert np.allclose(vectors, [0, 0, 1], atol=1e-6)  # a wall facing the camera; Z = 0: facing it too
    assert np.isfinite(pp.disparity(depth, metric=True)).all()
    assert np.isfinite(pp.disparity(depth, metric=False)).all()
    assert np.array_equal(pp.colorize(unit, "viridis"), np.broadcast_to(pp.colormap_lut("viridis")[0], (20, 30, 3)))
    preview = pp.point_cloud(np.full((20, 30, 3), 200, np.uint8), pp.distance_from_camera(depth, metric=True), 32)
    assert preview.shape == (32, 32, 3)
    assert (preview.sum(axis=2) > 0).sum() == 30  # one row of 30 columns, all at distance 0


@pytest.mark.parametrize("name", pp.COLORMAPS)
def test_lookup_tables_match_matplotlib(name: str) -> None:
    expected = colormaps["gray" if name == "gray" else name](np.linspace(0, 1, 256))[:, :3] * 255
    assert np.abs(pp.colormap_lut(name).astype(float) - expected).max() <= 0.5


def test_depth_uint16_spans_the_full_range() -> None:
    depth = plane()
    quantized = pp.depth_uint16(depth)
    assert quantized.min() == 0
    assert quantized.max() == 65535
    round_trip = decode_image(base64.b64encode(encode_image(quantized, "png")).decode())
    assert np.array_equal(round_trip, quantized)


def test_normalize_false_uses_a_fixed_scale() -> None:
    depth = np.array([[0.0, 10.0, 20.0, 40.0]], np.float32)
    assert pp.normalized(depth, normalize=False, max_depth=20.0).tolist() == [[0, 0.5, 1, 1]]
    assert pp.normalized(depth / 40, normalize=False, max_depth=None).tolist() == [[0, 0.25, 0.5, 1]]


def test_disparity_of_a_metric_map_is_its_reciprocal_normalized() -> None:
    depth = np.array([[1.0, 2.0, 4.0]], np.float32)
    disparity = pp.disparity(depth, metric=True)
    assert disparity.dtype == np.uint8
    # 1/d = 1, 0.5, 0.25 -> (x - 0.25) / 0.75 * 255
    assert disparity.ravel().tolist() == [255, 85, 0]


def ramp_1_to_10_m() -> np.ndarray:
    """A scene whose true depth grows from 1 m (left) to 10 m (right) in equal steps of disparity."""
    return np.tile(1.0 / np.linspace(1.0, 0.1, 200, dtype=np.float32), (50, 1))


def test_disparity_is_the_same_picture_for_a_metric_map_and_its_relative_inverse() -> None:
    metric = ramp_1_to_10_m()
    relative = 3.0 / metric + 0.7  # what a relative model returns: affine-invariant inverse depth
    from_metric = pp.disparity(metric, metric=True).astype(int)
    from_relative = pp.disparity(relative, metric=False).astype(int)
    assert np.abs(from_metric - from_relative).max() <= 1
    row = from_metric[0]
    assert row[0] == 255  # 1 m: nearest, brightest
    assert row[-1] == 0  # 10 m
    assert np.all(np.diff(row) <= 0)
    steps = np.diff(row)  # equal steps of 1/d: a linear picture, not a few bright pixels on black
    assert steps.min() >= -2
    assert 120 <= np.median(row) <= 135


def test_disparity_of_a_relative_map_is_not_dominated_by_its_smallest_values() -> None:
    relative = 3.0 / ramp_1_to_10_m() + 0.7
    histogram = np.bincount(pp.disparity(relative, metric=False).ravel(), minlength=256)
    assert histogram[:32].sum() < 0.2 * relative.size  # the old 1 / d of this map was mostly black


def test_point_cloud_places_pixels_by_column_and_distance() -> None:
    image = np.zeros((2, 3, 3), np.uint8)
    image[0, :] = (255, 0, 0)
    image[1, :] = (0, 0, 255)
    distance = np.array([[0.0, 0.5, 1.0], [0.0, 0.5, 1.0]], np.float32)
    preview = pp.point_cloud(image, distance, 5)
    # Camera at the bottom row, far at the top; both rows of the image land on the same cells: mean colour.
    assert preview[4, 0].tolist() == [127, 0, 127]
    assert preview[2, 2].tolist() == [127, 0, 127]
    assert preview[0, 4].tolist() == [127, 0, 127]
    assert (preview.sum(axis=2) > 0).sum() == 3


@pytest.mark.parametrize(
    ("width", "height", "bucket"),
    [(1024, 768, (686, 518)), (768, 1024, (518, 686)), (1920, 1080, (924, 518)), (600, 400, (770, 518)),
     (500, 500, (518, 518)), (10000, 10, (924, 518)), (1, 1, (518, 518))],
)  # fmt: skip
def test_nearest_bucket(width: int, height: int, bucket: tuple[int, int]) -> None:
    assert nearest_bucket(Size(width, height), DEPTH_ANYTHING_BUCKETS) == bucket


def test_limit_size_and_to_bucket() -> None:
    image = np.random.default_rng(0).integers(0, 255, (768, 1024, 3), dtype=np.uint8)
    assert limit_size(image, 2048) is image
    assert limit_size(image, 512).shape == (384, 512, 3)
    assert to_bucket(image, Size(686, 518), "bicubic").shape == (518, 686, 3)
    assert to_bucket(image[:10, :10], Size(518, 518), "bicubic").shape == (518, 518, 3)


@pytest.mark.parametrize("shape", [(1, 1), (1, 50), (50, 1)])
def test_single_pixel_rows_and_columns(shape: tuple[int, int]) -> None:
    depth = np.linspace(1, 2, shape[0] * shape[1], dtype=np.float32).reshape(shape)
    unit = pp.normalized(depth, normalize=True, max_depth=None)
    vectors = geometry.surface_normals(depth, geometry.from_fov(shape[1], shape[0], 60.0, "default"))
    assert vectors.shape == (*shape, 3)
    assert np.abs(np.linalg.norm(vectors, axis=2) - 1).max() < 0.01
    assert pp.disparity(depth, metric=True).shape == shape
    assert pp.point_cloud(np.zeros((*shape, 3), np.uint8), unit, 16).shape == (16, 16, 3)


@pytest.mark.parametrize("grid", [512, 1024])
def test_point_cloud_rows_reach_every_band_of_a_large_grid(grid: int) -> None:
    """A depth ramp from the camera to the far end fills rows 0..grid-1, not only the first 256."""
    height, width = 400, 300
    distance = np.repeat(np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None], width, axis=1)
    image = np.full((height, width, 3), 200, np.uint8)
    used_rows = np.flatnonzero(pp.point_cloud(image, distance, grid).sum(axis=(1, 2)))
    assert used_rows.min() == 0
    assert used_rows.max() == grid - 1
    bands = np.unique(used_rows * 8 // grid)  # eight horizontal bands of the canvas
    assert bands.tolist() == list(range(8))
    assert len(used_rows) == height  # one row per depth level: nothing piles up on one row


def test_formats_fall_back_to_png_past_their_size_limits() -> None:
    assert writable_format("webp", Size(16383, 10)) == "webp"
    assert writable_format("webp", Size(20000, 10)) == "png"
    assert writable_format("jpg", Size(10, 65500)) == "jpg"
    assert writable_format("jpg", Size(10, 70000)) == "png"
    assert writable_format("png", Size(10, 70000)) == "png"


FAULTS = """
import resource, sys
import numpy as np
from gateway.outputs import geometry
from gateway.serving.imagework import keep_freed_memory
if sys.argv[1] == "kept":
    keep_freed_memory()
z = np.random.default_rng(0).random((768, 1024), dtype=np.float32) + 1
camera = geometry.from_fov(1024, 768, 60.0, "default")
geometry.surface_normals(z, camera)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    geometry.surface_normals(z, camera)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_image_workers_reuse_freed_memory_instead_of_page_faulting_it_back() -> None:
    def faults(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
        return int(run.stdout)

    glibc_defaults, kept = faults("defaults"), faults("kept")
    assert glibc_defaults > 10 * 700  # ten normals maps: several fresh 3 MB arrays each
    assert kept < glibc_defaults / 5


@pytest.mark.parametrize("name", pp.COLORMAPS)
def test_colorize_is_the_colormap_looked_up_per_pixel_in_rgb_order(name: str) -> None:
    unit = np.random.default_rng(5).random((37, 53), dtype=np.float32)
    unit[0, :3] = (0.0, 1.0, 0.5)
    rgb = pp.colorize(unit, name)
    index = np.rint(unit * 255).astype(np.intp)
    assert np.array_equal(rgb, pp.colormap_lut(name)[index])
    top = np.round(np.array(colormaps["gray" if name == "gray" else name](1.0)[:3]) * 255)
    assert rgb[0, 1].tolist() == top.astype(int).tolist()  # matplotlib's own colour for 1.0: R, G, B in order

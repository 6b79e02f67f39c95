"""3D outputs on scenes whose geometry is known, through the pure render path, read back with an
independent library (trimesh) and every GLB checked by the Khronos glTF validator."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from catalogue.models import get_spec
from gateway.errors import ImageError
from gateway.inputs.decode import focal_length_35mm
from gateway.inputs.schema import CAMERA_FORMS, DepthRequest
from gateway.outputs import geometry
from gateway.outputs import postprocess as pp
from gateway.outputs.formats3d import encode_glb, opencv_to_gltf
from gateway.outputs.postprocess import decode_normals
from gateway.outputs.render import render
from gateway.served_model import ServedModel
from tests.conftest import DPT_ID, METRIC_ID, RELATIVE_ID, ROOT
from tests.helpers import b64decode, decode_image


def decode_image_b64(text: str) -> np.ndarray:
    return decode_image(text)


VALIDATOR = Path(os.environ.get("GLTF_VALIDATOR_DIR", ROOT / ".cache" / "node"))


def served(model_id: str) -> ServedModel:
    spec = get_spec(model_id)
    return ServedModel(
        name=spec.triton_name, hf_id=spec.hf_id, metric=spec.metric, max_depth=spec.max_depth, precision="fp32",
        families=spec.families, resample=spec.resample, on_gpu=False, license=spec.license,
    )  # fmt: skip


def render_3d(depth: np.ndarray, model_id: str = METRIC_ID, focal_35mm: float | None = None, **fields) -> dict:
    height, width = depth.shape
    photo = np.full((height, width, 3), (200, 120, 40), np.uint8)
    request = DepthRequest(image_b64="x", tasks=["points", "mesh"], **fields)
    return render((width, height), photo, depth, request, served(model_id), focal_35mm)


def read_ply(out: dict) -> np.ndarray:
    cloud = trimesh.load(io.BytesIO(b64decode(out["points_b64"])), file_type="ply")
    assert isinstance(cloud, trimesh.PointCloud)
    assert len(cloud.vertices) == out["points_count"]
    return np.asarray(cloud.vertices)


def read_glb(out: dict) -> trimesh.Trimesh:
    scene = trimesh.load(io.BytesIO(b64decode(out["mesh_b64"])), file_type="glb")
    mesh = scene.to_geometry() if isinstance(scene, trimesh.Scene) else scene
    assert len(mesh.faces) == out["mesh_triangles"]
    return mesh


def validate(glbs: list[bytes], tmp_path: Path) -> list[dict]:
    paths = []
    for index, glb in enumerate(glbs):
        paths.append(tmp_path / f"{index}.glb")
        paths[-1].write_bytes(glb)
    command = ["node", str(ROOT / "tests" / "gltf_validate.mjs"), *map(str, paths)]
    env = {**os.environ, "GLTF_VALIDATOR_DIR": str(VALIDATOR)}
    return json.loads(subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout)


def test_a_fronto_parallel_plane_at_2_5_m(tmp_path: Path) -> None:
    out = render_3d(np.full((120, 160), 2.5, np.float32), camera={"fov_x": 70})
    points = read_ply(out)
    assert out["points_count"] == 120 * 160
    assert np.allclose(points[:, 2], 2.5)
    camera = out["intrinsics"]
    assert camera["source"] == "request"
    tan_half = math.tan(math.radians(35))
    # pixel centres at integers: the image's edges are half a pixel beyond the outer columns
    assert (camera["cx"] + 0.5) / camera["fx"] == pytest.approx(tan_half)
    assert points[:, 0].min() / 2.5 == pytest.approx(-camera["cx"] / camera["fx"], abs=1e-6)
    assert (points[:, 0].max() / 2.5 + 0.5 / camera["fx"]) == pytest.approx(tan_half, abs=1e-6)
    mesh = read_glb(out)
    assert np.allclose(mesh.vertices[:, 2], -2.5)  # glTF: the camera looks down -z
    assert out["mesh_triangles"] == 2 * 119 * 159
    assert np.all(mesh.face_normals[:, 2] > 0.999)  # every face looks back at the camera
    assert validate([b64decode(out["mesh_b64"])], tmp_path)[0]["errors"] == 0


def test_a_tilted_plane_stays_planar() -> None:
    height, width = 90, 120
    camera = geometry.from_fov(width, height, 60, "request")
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    # the plane 0.3 x - 0.2 y + z = 3: along a pixel's ray, 1 / Z is affine in (u, v)
    inverse = (0.3 * (cols - camera.cx) / camera.fx - 0.2 * (rows - camera.cy) / camera.fy + 1.0) / 3.0
    out = render_3d((1.0 / inverse).astype(np.float32), camera={"fov_x": 60})
    points = read_ply(out)
    assert out["points_count"] == height * width  # a smooth slope is no depth jump
    centred = points - points.mean(axis=0)
    normal = np.linalg.svd(centred, full_matrices=False)[2][-1]
    assert np.abs(centred @ normal).max() < 1e-4
    assert np.allclose(normal / normal[2], [0.3, -0.2, 1.0], atol=1e-3)


def step_edge() -> np.ndarray:
    """2 m on the left, 4 m on the right, and a 3-pixel ramp between them (what upsampling makes)."""
    depth = np.full((60, 80), 2.0, np.float32)
    depth[:, 41:] = 4.0
    depth[:, 38:41] = np.linspace(2.0, 4.0, 5, dtype=np.float32)[1:4]
    return depth


def test_a_step_edge_leaves_no_point_or_triangle_between_the_levels(tmp_path: Path) -> None:
    on = render_3d(step_edge())
    z = read_ply(on)[:, 2]
    assert np.all((np.abs(z - 2.0) < 1e-6) | (np.abs(z - 4.0) < 1e-6))
    mesh_z = -read_glb(on).vertices[read_glb(on).faces][:, :, 2]
    assert np.all(np.ptp(mesh_z, axis=1) < 1e-6)  # no triangle spans the jump

    off = render_3d(step_edge(), depth_edge_threshold=0)
    z_off = read_ply(off)[:, 2]
    assert np.any((z_off > 2.1) & (z_off < 3.9))  # flying pixels
    faces_off = -read_glb(off).vertices[read_glb(off).faces][:, :, 2]
    assert np.any(np.ptp(faces_off, axis=1) > 0.3)
    reports = validate([b64decode(on["mesh_b64"]), b64decode(off["mesh_b64"])], tmp_path)
    assert [report["errors"] for report in reports] == [0, 0]


def test_exif_focal_length_sets_fx_as_the_formula_says() -> None:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0xA405] = 28
    buffer = io.BytesIO()
    Image.new("RGB", (400, 300)).save(buffer, "JPEG", exif=exif.tobytes())
    focal = focal_length_35mm(buffer.getvalue())
    assert focal == 28.0
    out = render_3d(np.full((300, 400), 3.0, np.float32), focal_35mm=focal)
    assert out["intrinsics"]["source"] == "exif"
    assert out["intrinsics"]["fx"] == pytest.approx(28 * 500 / 43.27)  # diagonal of 400 x 300: 500 px
    default = render_3d(np.full((300, 400), 3.0, np.float32))["intrinsics"]
    assert default["source"] == "default"
    assert default["fx"] == pytest.approx(200 / math.tan(math.radians(30)))
    assert focal_length_35mm(b"not an image") is None


def test_relative_maps_are_spread_between_near_and_far_and_marked_relative() -> None:
    inverse = np.tile(np.linspace(0.2, 5.0, 100, dtype=np.float32), (50, 1))  # larger is nearer
    out = render_3d(inverse, RELATIVE_ID, near=2.0, far=8.0)
    assert out["units"] == "relative"
    z = read_ply(out)[:, 2]
    assert z.min() == pytest.approx(2.0, rel=1e-5)
    assert z.max() == pytest.approx(8.0, rel=1e-5)


def test_default_sizes_keep_a_1024x768_image_small(tmp_path: Path) -> None:
    rows, cols = np.mgrid[0:768, 0:1024].astype(np.float32)
    out = render_3d(2.0 + 0.002 * cols + 0.001 * rows)
    ply, glb = b64decode(out["points_b64"]), b64decode(out["mesh_b64"])
    assert out["points_count"] == 512 * 384  # stride 2 for at most 250,000 points
    assert len(ply) < 4e6
    assert out["mesh_vertices"] <= 100_000
    assert len(glb) < 4e6
    assert validate([glb], tmp_path)[0]["errors"] == 0


def test_an_empty_mesh_is_still_a_valid_glb(tmp_path: Path) -> None:
    glb, vertices = encode_glb(
        opencv_to_gltf(np.zeros((4, 3), np.float32)), np.zeros((4, 3), np.uint8), np.zeros((0, 3), int)
    )
    assert vertices == 0
    report = validate([glb], tmp_path)[0]
    assert report["errors"] == 0, report["messages"]


# --------------------------------------------------------------------------- cameras at their extremes

EXTREMES = [1e-300, 1e-40, 0.01, 1.0, 300.0, 1e6, 1e37, 1e308]
CENTRES = [-1e308, -1e37, -200.0, 79.5, 300.0, 1e37, 1e308]


def test_any_camera_gives_a_clear_error_or_finite_points_and_a_valid_glb(tmp_path: Path) -> None:
    """A grid of extreme intrinsics on a 160 x 120 image: each is refused with a message that names the
    value and the accepted range, or served with every coordinate finite and a GLB the validator passes."""
    rows, cols = np.mgrid[0:120, 0:160].astype(np.float32)
    depth = 2.0 + 0.004 * cols + 0.002 * rows
    served_glbs, refusals = [], []
    for fx in EXTREMES:
        for centre in CENTRES:
            camera = {"fx": fx, "fy": fx, "cx": centre, "cy": centre * 0.75}
            try:
                out = render_3d(depth, camera=camera)
            except ImageError as error:
                refusals.append(str(error))
                continue
            points = read_ply(out)
            assert np.isfinite(points).all()
            assert out["points_count"] == 120 * 160
            served_glbs.append(b64decode(out["mesh_b64"]))
    low, high = geometry.focal_range(160)
    assert all(message.startswith(("camera.fx ", "camera.cx ")) and "expected " in message for message in refusals)
    assert len(refusals) == len(EXTREMES) * len(CENTRES) - len(served_glbs)
    assert len(served_glbs) == sum(low <= fx <= high for fx in EXTREMES) * sum(
        -160 <= c <= 320 and -120 <= c * 0.75 <= 240 for c in CENTRES
    )
    for report in validate(served_glbs, tmp_path):
        assert report["errors"] == 0, report["messages"]


def test_the_field_of_view_limits_are_those_the_error_states() -> None:
    low, high = geometry.focal_range(640)
    assert math.degrees(2 * math.atan(320 / low)) == pytest.approx(179)
    assert math.degrees(2 * math.atan(320 / high)) == pytest.approx(1)
    assert geometry.intrinsics_for(640, 480, {"fov_x": 179}, None).fx == pytest.approx(low)
    with pytest.raises(geometry.CameraError, match=r"camera.fy 1e-40 px gives a field of view outside 1-179"):
        geometry.intrinsics_for(640, 480, {"fx": 500, "fy": 1e-40, "cx": 320, "cy": 240}, None)
    nonsense_exif = geometry.intrinsics_for(640, 480, None, focal_35mm=1e-9)  # EXIF is not trusted blindly
    assert nonsense_exif.source == "default"


# --------------------------------------------------------------------------- normals on known planes


def plane_depth(normal: tuple[float, float, float], distance: float, camera: geometry.Intrinsics, shape) -> np.ndarray:
    """Planar depth Z of the plane n . P = -distance (n in OpenCV's frame, facing the camera)."""
    height, width = shape
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    rays = np.stack([(u - camera.cx) / camera.fx, (v - camera.cy) / camera.fy, np.ones_like(u)], axis=-1)
    return (-distance / (rays @ np.asarray(normal))).astype(np.float32)


PLANES = {
    # name: the surface normal in OpenCV's frame (x right, y down, z forward), the plane's distance
    "floor": ((0.0, -1.0, 0.0), 1.5),  # camera 1.5 m above it, looking level
    "wall": ((0.0, 0.0, -1.0), 3.0),
    "tilted": ((0.5, -0.3, -((1 - 0.34) ** 0.5)), 2.0),
}


@pytest.mark.parametrize("name", PLANES)
@pytest.mark.parametrize("model_id", [METRIC_ID, RELATIVE_ID])
def test_normals_of_known_planes_agree_for_metric_and_relative_models(name: str, model_id: str) -> None:
    """Metric models give Z; relative ones inverse depth (here exactly 1 / Z, spread over near..far as
    the request says). Either way the normals are the plane's, in the documented frame (x right, y up,
    z towards the camera), pointing towards the camera."""
    normal, distance = PLANES[name]
    shape = (90, 120)
    camera = geometry.from_fov(shape[1], shape[0], 70.0, "request")
    z = plane_depth(normal, distance, camera, shape)
    rows = slice(60, 88) if name == "floor" else slice(2, 88)  # the floor is below the horizon only
    visible = np.zeros(shape, bool)
    visible[rows, 2:118] = True
    z = np.where(visible, z, np.float32(np.nan))
    if model_id == METRIC_ID:
        depth = np.where(visible, z, np.nanmax(z)).astype(np.float32)
        fields = {}
    else:
        inverse = np.where(visible, 1 / z, np.nanmin(1 / z)).astype(np.float32)
        depth = inverse
        near, far = float(np.nanmin(z)), float(np.nanmax(z))
        fields = {"near": near, "far": max(far, 2 * near)}  # a wall is flat: any far will do
    request = DepthRequest(image_b64="x", tasks=["normals"], camera={"fov_x": 70.0}, **fields)
    out = render((shape[1], shape[0]), None, depth, request, served(model_id))
    normals = decode_normals(decode_image_b64(out["normals_b64"]))
    expected = np.array([normal[0], -normal[1], -normal[2]])  # into x right, y up, z towards the camera
    inner = normals[rows.start + 2 : rows.stop - 2, 4:116]
    assert np.abs(inner - expected).max() < 0.03, (name, inner.mean(axis=(0, 1)), expected)


def test_a_floor_is_green_and_a_wall_blue() -> None:
    """The encoding, as a person sees it: floor (0, 1, 0) -> RGB (128, 255, 128), wall -> (128, 128, 255)."""
    camera = geometry.from_fov(120, 90, 70.0, "request")
    floor = geometry.surface_normals(plane_depth((0.0, -1.0, 0.0), 1.5, camera, (90, 120)), camera)[60:85, 5:-5]
    wall = geometry.surface_normals(np.full((90, 120), 3.0, np.float32), camera)
    for normals, rgb in ((floor, (128, 255, 128)), (wall, (128, 128, 255))):  # 0 encodes as 127.5
        assert np.abs(pp.normals_rgb(normals).reshape(-1, 3).mean(axis=0) - rgb).max() <= 1


# --------------------------------------------------------------------------- through the running gateway


@pytest.mark.parametrize(("model_id", "units"), [(METRIC_ID, "m"), (RELATIVE_ID, "relative"), (DPT_ID, "relative")])
def test_points_and_mesh_through_the_stack(
    run_job, photo_urls: dict[str, str], tmp_path: Path, model_id: str, units: str
) -> None:
    out = run_job({"image_url": photo_urls["astronaut"], "model": model_id, "tasks": ["points", "mesh"]})
    (result,) = out["results"]
    assert result["units"] == units
    assert result["points_mime"] == "application/x-ply"
    assert result["mesh_mime"] == "model/gltf-binary"
    focal = 256 / math.tan(math.radians(30))  # a 512 x 512 photo, 60 degrees across
    assert result["intrinsics"] == {"fx": focal, "fy": focal, "cx": 255.5, "cy": 255.5, "source": "default"}
    points = read_ply(result)
    assert 0 < result["points_count"] <= 512 * 512
    assert np.all(points[:, 2] > 0)
    if units == "m":
        assert points[:, 2].max() <= get_spec(model_id).max_depth
    else:
        assert points[:, 2].min() >= 1.0 - 1e-4  # near and far defaults
        assert points[:, 2].max() <= 10.0 + 1e-3
    assert read_glb(result).vertices.shape[0] == result["mesh_vertices"]
    assert validate([b64decode(result["mesh_b64"])], tmp_path)[0]["errors"] == 0


def test_the_photos_exif_focal_length_is_used(run_job, photos: dict[str, np.ndarray]) -> None:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0xA405] = 50
    buffer = io.BytesIO()
    Image.fromarray(photos["coffee"]).save(buffer, "JPEG", exif=exif.tobytes())
    out = run_job({"image_b64": base64.b64encode(buffer.getvalue()).decode(), "tasks": ["points"]})
    intrinsics = out["results"][0]["intrinsics"]
    assert intrinsics["source"] == "exif"
    assert intrinsics["fx"] == pytest.approx(50 * math.hypot(600, 400) / 43.27)


@pytest.mark.parametrize(
    ("camera", "message"),
    [
        ({"fov_x": -10}, "invalid camera: camera.fov_x must be between 1 and 179 degrees"),
        ({"fov_x": 180}, "invalid camera: camera.fov_x must be between 1 and 179 degrees"),
        ({"fov_x": 5e-324}, "invalid camera: camera.fov_x must be between 1 and 179 degrees"),
        ({"fx": 500, "fy": 500, "cx": 320}, f"invalid camera: camera must be {CAMERA_FORMS}"),
        ({"fov_x": "60"}, "invalid camera: camera.fov_x must be a finite number"),
        ({"fx": 500, "fy": -1, "cx": 320, "cy": 240}, "invalid camera: camera.fx and camera.fy must be positive"),
        ("wide", "invalid camera: Input should be a valid dictionary"),
    ],
)
def test_a_bad_camera_is_a_clean_request_error(
    run_job, photo_urls: dict[str, str], camera: object, message: str
) -> None:
    assert run_job({"image_url": photo_urls["coffee"], "tasks": ["points"], "camera": camera}) == {"error": message}


def test_near_must_be_before_far(run_job, photo_urls: dict[str, str]) -> None:
    job = {"image_url": photo_urls["coffee"], "tasks": ["points"], "near": 5, "far": 2}
    assert run_job(job) == {"error": "far (2) must be larger than near (5)"}


@pytest.mark.parametrize("shape", [(768, 1024), (2, 5), (5, 2), (3, 3), (1, 7), (7, 1), (1, 1)])
def test_gradient_is_numpys(shape: tuple[int, int]) -> None:
    z = np.random.default_rng(3).random(shape, dtype=np.float32) * 10
    for axis in (0, 1):
        expected = np.gradient(z, axis=axis) if shape[axis] > 1 else np.zeros_like(z)
        got = geometry.gradient(z, axis)
        assert got.dtype == np.float32
        assert np.array_equal(got, expected)  # bit for bit

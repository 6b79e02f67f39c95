"""One image's CPU work after inference: every requested output. Pure.

``render`` upsamples the network's depth to the original size and produces the response keys of each
requested task; it reads the photo itself only for the point cloud, points and mesh (``needs_photo``),
so the photo need not travel otherwise. A camera that does not fit the image (``geometry.CameraError``)
fails the image with an ``ImageError`` that says which value and what range is accepted. The network
input is made before inference by ``gateway.inputs.network_input``.
"""

from __future__ import annotations

import numpy as np

from catalogue.size import Size
from gateway.errors import ImageError
from gateway.inputs.schema import DepthRequest
from gateway.outputs import geometry
from gateway.outputs import postprocess as pp
from gateway.outputs.encode import MIME, Pack, b64, encode_image, encode_npz, writable_format
from gateway.outputs.formats3d import GLB_MIME, PLY_MIME, encode_glb, encode_ply, opencv_to_gltf
from gateway.served_model import ServedModel

THREE_D = ("points", "mesh")


def needs_photo(tasks: list[str]) -> bool:
    """Whether rendering ``tasks`` reads the photo's pixels (the point clouds' and mesh's colours)."""
    return any(task in tasks for task in ("point_cloud", *THREE_D))


def uses_camera(tasks: list[str]) -> bool:
    """Whether ``tasks`` back-project the depth through a camera (3D outputs and normals)."""
    return any(task in tasks for task in (*THREE_D, "normals"))


def needs_camera(request: DepthRequest) -> bool:
    """Whether the photo's EXIF focal length is wanted (a task uses a camera, and the request gives none)."""
    return request.camera is None and uses_camera(request.tasks)


def render(
    size: Size,
    photo: np.ndarray | None,
    network_depth: np.ndarray,
    request: DepthRequest,
    model: ServedModel,
    focal_35mm: float | None = None,
    pack: Pack = b64,
) -> dict:
    """Stats and every requested task's keys, all at the original ``size``.

    ``photo`` (RGB at ``size``) is needed only when ``needs_photo(request.tasks)``. Each output's bytes
    go through ``pack``: base64 text for a response, or the bytes themselves (``keep``) for an upload.
    """
    width, height = size
    depth = pp.upsample(network_depth, width, height)
    low, high, mean = pp.depth_stats(depth)
    out: dict = {"depth_min": low, "depth_max": high, "depth_mean": mean, "tasks": list(request.tasks)}
    fmt = writable_format(request.output_format, size)
    mime = MIME[fmt]
    unit = pp.normalized(depth, request.normalize, model.max_depth) if "colorized" in request.tasks else None
    camera = None
    if uses_camera(request.tasks):
        try:
            camera = geometry.intrinsics_for(width, height, request.camera, focal_35mm)
        except geometry.CameraError as error:
            raise ImageError(str(error)) from None
        out["intrinsics"] = camera.as_dict()
    for task in request.tasks:
        if task == "depth":
            out["depth_png_b64"] = pack(encode_image(pp.depth_uint16(depth), "png"))
            out["depth_png_mime"] = MIME["png"]
            if request.include_raw:
                out["depth_npz_b64"] = pack(encode_npz(depth))
        elif task == "colorized":
            shown = 1.0 - unit if request.invert else unit
            out["colorized_b64"] = pack(encode_image(pp.colorize(shown, request.colormap), fmt, request.quality))
            out["colorized_mime"] = mime
            out["colormap"] = request.colormap
        elif task == "normals":
            assert camera is not None
            zs = geometry.planar_depth(depth, model.metric, request.near, request.far)
            normals = pp.normals_rgb(geometry.surface_normal_planes(zs, camera))
            out["normals_b64"] = pack(encode_image(normals, fmt, request.quality))
            out["normals_mime"] = mime
        elif task == "disparity":
            out["disparity_b64"] = pack(encode_image(pp.disparity(depth, model.metric), fmt, request.quality))
            out["disparity_mime"] = mime
        elif task == "point_cloud":
            distance = pp.distance_from_camera(depth, model.metric)
            assert photo is not None, "point_cloud needs the photo"
            preview = pp.point_cloud(photo, distance, request.point_cloud_grid)
            out["point_cloud_b64"] = pack(encode_image(preview, "png"))
            out["point_cloud_mime"] = MIME["png"]
            out["point_cloud_grid"] = request.point_cloud_grid
    if any(task in request.tasks for task in THREE_D):
        assert photo is not None, "3D outputs need the photo"
        assert camera is not None
        out.update(render_3d(depth, photo, request, model, camera, pack))
    return out


def render_3d(
    depth: np.ndarray,
    photo: np.ndarray,
    request: DepthRequest,
    model: ServedModel,
    camera: geometry.Intrinsics,
    pack: Pack = b64,
) -> dict:
    """The ``points`` (PLY) and ``mesh`` (GLB) outputs, with the units they used."""
    value_range = (float(depth.min()), float(depth.max()))
    units = "m" if model.metric else "relative"
    out: dict = {"units": units}

    def grid(limit: int) -> geometry.Grid:
        stride = geometry.stride_for(depth.size, limit)
        zs = geometry.planar_depth(depth[::stride, ::stride], model.metric, request.near, request.far, value_range)
        return geometry.sample_grid(zs, photo[::stride, ::stride], camera, stride, request.depth_edge_threshold)

    if "points" in request.tasks:
        points = grid(request.max_points)
        keep = geometry.point_mask(points)
        comments = [f"units {units}", f"intrinsics fx {camera.fx:g} fy {camera.fy:g} cx {camera.cx:g} cy {camera.cy:g}"]
        comments.append("frame opencv: x right, y down, z forward")
        if keep.all():  # nothing dropped: no copy through a mask
            xyz, rgb = points.xyz.reshape(-1, 3), points.rgb.reshape(-1, 3)
        else:
            xyz, rgb = points.xyz[keep], points.rgb[keep]
        out["points_b64"] = pack(encode_ply(xyz, rgb, comments))
        out["points_mime"] = PLY_MIME
        out["points_count"] = int(keep.sum())
    if "mesh" in request.tasks:
        surface = grid(request.max_mesh_vertices)
        faces = geometry.triangles(surface)
        positions = opencv_to_gltf(surface.xyz.reshape(-1, 3))
        extras = {"units": units, "intrinsics": camera.as_dict()}
        glb, vertices = encode_glb(positions, surface.rgb.reshape(-1, 3), faces, extras)
        out["mesh_b64"] = pack(glb)
        out["mesh_mime"] = GLB_MIME
        out["mesh_vertices"] = vertices
        out["mesh_triangles"] = len(faces)
    return out

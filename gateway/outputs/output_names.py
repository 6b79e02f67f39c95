"""The response's output keys and what each is called as a file or object. Pure; shared by the worker
(uploads) and the client (files).

Inline, an output is ``<name>_b64`` with its MIME type in ``<name>_mime``; in storage it is ``<name>_url``
(same MIME key). As a file or object it is ``<image>_<suffix>.<extension>``.
"""

from __future__ import annotations

OUTPUTS = {  # inline key -> (suffix, key naming its MIME type)
    "depth_png_b64": ("depth", "depth_png_mime"),
    "depth_npz_b64": ("depth_raw", None),
    "colorized_b64": ("colorized", "colorized_mime"),
    "normals_b64": ("normals", "normals_mime"),
    "disparity_b64": ("disparity", "disparity_mime"),
    "point_cloud_b64": ("point_cloud", "point_cloud_mime"),
    "points_b64": ("points", "points_mime"),
    "mesh_b64": ("mesh", "mesh_mime"),
    "depth_video_b64": ("depth", "depth_video_mime"),
    "colorized_video_b64": ("colorized", "colorized_video_mime"),
}
EXTENSIONS = {
    "image/png": "png",
    "image/webp": "webp",
    "image/jpeg": "jpg",
    "application/x-ply": "ply",
    "model/gltf-binary": "glb",
    "video/x-matroska": "mkv",
    "video/mp4": "mp4",
    None: "npz",
}
NPZ_MIME = "application/octet-stream"


def url_key(inline_key: str) -> str:
    return inline_key.removesuffix("_b64") + "_url"


def file_name(image: str, inline_key: str, result: dict) -> str:
    """``<image>_<suffix>.<extension>`` of one output of ``result``."""
    suffix, mime_key = OUTPUTS[inline_key]
    return f"{image}_{suffix}.{EXTENSIONS[result.get(mime_key) if mime_key else None]}"


def content_type(inline_key: str, result: dict) -> str:
    mime_key = OUTPUTS[inline_key][1]
    return result[mime_key] if mime_key else NPZ_MIME

"""3D outputs as bytes: binary PLY point clouds and binary glTF 2.0 (``.glb``) meshes. Pure: NumPy only.

Both are written directly (a PLY header and one packed array; a GLB of one mesh, three accessors and one
buffer): the formats are small, and a general library (trimesh, pygltflib) would add a dependency and a
copy of every array to the worker. Readers that check them in the tests: trimesh (an independent
implementation) and the Khronos glTF validator.

- PLY: ``x y z`` float32 and ``red green blue`` uint8 per vertex, little-endian; header comments carry the
  units and the camera intrinsics. Coordinates in OpenCV's camera frame (x right, y down, z forward).
- GLB: glTF's own frame (y up, the camera looking down -z), i.e. (x, -y, -z) of OpenCV's; vertex colours
  as normalized RGBA bytes; ``uint32`` indices; faces wound counter-clockwise towards the camera.
"""

from __future__ import annotations

import json
import struct

import numpy as np

PLY_MIME = "application/x-ply"
GLB_MIME = "model/gltf-binary"
_PLY_VERTEX = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
_FLOAT, _UNSIGNED_BYTE, _UNSIGNED_INT = 5126, 5121, 5125


def encode_ply(xyz: np.ndarray, rgb: np.ndarray, comments: list[str] = ()) -> bytes:
    """``xyz float32 [n, 3]`` and ``rgb uint8 [n, 3]`` as a binary little-endian PLY."""
    records = np.empty((len(xyz), _PLY_VERTEX.itemsize), np.uint8)  # 15 packed bytes a vertex
    records[:, :12] = np.ascontiguousarray(xyz, "<f4").view(np.uint8).reshape(-1, 12)
    records[:, 12:] = rgb
    header = ["ply", "format binary_little_endian 1.0", *(f"comment {c}" for c in comments)]
    header += [f"element vertex {len(xyz)}"]
    header += [f"property float {axis}" for axis in "xyz"]
    header += [f"property uchar {name}" for name in ("red", "green", "blue")]
    header += ["end_header"]
    return ("\n".join(header) + "\n").encode("ascii") + records.tobytes()


def opencv_to_gltf(xyz: np.ndarray) -> np.ndarray:
    """OpenCV camera frame (x right, y down, z forward) -> glTF (x right, y up, looking down -z)."""
    return xyz * np.array([1.0, -1.0, -1.0], np.float32)


def encode_glb(
    positions: np.ndarray, rgb: np.ndarray, faces: np.ndarray, extras: dict | None = None
) -> tuple[bytearray, int]:
    """A GLB of one triangle mesh, and how many vertices it holds: ``positions float32 [n, 3]`` (glTF
    frame), ``rgb uint8 [n, 3]``, ``faces [m, 3]`` indices into them. Vertices no face uses are left out.
    The arrays are written once, straight into the file's buffer."""
    used, remapped = compact(faces, len(positions))
    gltf: dict = {"asset": {"version": "2.0", "generator": "depth-serving"}, "scene": 0, "scenes": [{}]}
    if extras:
        gltf["asset"]["extras"] = extras
    if not len(used):
        return _glb(gltf, []), 0
    points = positions[used]
    sizes = [points.size * 4, len(used) * 4, remapped.size * 4]  # float32 xyz, RGBA bytes, uint32 indices
    offsets = np.cumsum([0, *sizes]).tolist()
    targets = (_ARRAY_BUFFER, _ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER)
    gltf["scenes"] = [{"nodes": [0]}]
    gltf["nodes"] = [{"mesh": 0}]
    gltf["meshes"] = [{"primitives": [{"attributes": {"POSITION": 0, "COLOR_0": 1}, "indices": 2, "mode": 4}]}]
    gltf["buffers"] = [{"byteLength": offsets[-1]}]
    gltf["bufferViews"] = [
        {"buffer": 0, "byteOffset": offsets[i], "byteLength": sizes[i], "target": targets[i]} for i in range(3)
    ]
    gltf["accessors"] = [
        {
            "bufferView": 0,
            "componentType": _FLOAT,
            "count": len(used),
            "type": "VEC3",
            "min": [float(points[:, axis].min()) for axis in range(3)],
            "max": [float(points[:, axis].max()) for axis in range(3)],
        },
        {"bufferView": 1, "componentType": _UNSIGNED_BYTE, "normalized": True, "count": len(used), "type": "VEC4"},
        {"bufferView": 2, "componentType": _UNSIGNED_INT, "count": remapped.size, "type": "SCALAR"},
    ]

    def write(buffer: bytearray, start: int) -> None:
        np.frombuffer(buffer, np.float32, points.size, start).reshape(-1, 3)[:] = points
        colours = np.frombuffer(buffer, np.uint8, sizes[1], start + offsets[1]).reshape(-1, 4)
        colours[:, :3] = rgb[used]
        colours[:, 3] = 255
        np.frombuffer(buffer, np.uint32, remapped.size, start + offsets[2])[:] = remapped

    return _glb(gltf, [(offsets[-1], write)]), len(used)


def compact(faces: np.ndarray, vertex_count: int) -> tuple[np.ndarray, np.ndarray]:
    """(the vertices ``faces`` use, ``faces`` renumbered over them): a mask and a running count, no sort."""
    mask = np.zeros(vertex_count, bool)
    mask[faces.ravel()] = True
    renumber = np.cumsum(mask) - 1
    return np.flatnonzero(mask), renumber[faces.ravel()]


def _glb(gltf: dict, binary: list) -> bytearray:
    """The GLB container: header, JSON chunk, and a BIN chunk of ``(size, write(buffer, offset))``."""
    text = json.dumps(gltf, separators=(",", ":"), allow_nan=False).encode()  # standard JSON numbers only
    text += b" " * (-len(text) % 4)
    size = sum(length for length, _write in binary)
    padded = size + (-size % 4)
    total = 12 + 8 + len(text) + (8 + padded if binary else 0)
    buffer = bytearray(total)
    struct.pack_into("<4sII", buffer, 0, b"glTF", 2, total)
    struct.pack_into("<I4s", buffer, 12, len(text), b"JSON")
    buffer[20 : 20 + len(text)] = text
    if binary:
        start = 20 + len(text)
        struct.pack_into("<I4s", buffer, start, padded, b"BIN\x00")
        for _length, write in binary:
            write(buffer, start + 8)
    return buffer

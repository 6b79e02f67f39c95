"""Decoded outputs -> files under ``--out``, one per task, written atomically; and whether they exist.

Outputs come inline (base64) or, with ``output_mode`` url or auto, as URLs that are downloaded; either
way an image named ``trip/img1`` gets ``trip/img1_depth.png``, ``trip/img1_depth_raw.npz`` (``include_raw``),
``trip/img1_colorized.<format>``, ``_normals``, ``_disparity``, ``trip/img1_point_cloud.png``,
``trip/img1_points.ply`` and ``trip/img1_mesh.glb``. Each file is written to a temporary name beside it and
renamed, so an interrupted run leaves whole files or none.
"""

from __future__ import annotations

import base64
import os
import urllib.request
from pathlib import Path

from gateway.outputs.output_names import OUTPUTS, file_name, url_key

FORMATTED = {"colorized", "normals", "disparity"}  # follow output_format (PNG when too large for it)
FIXED = {"depth": "png", "point_cloud": "png", "points": "ply", "mesh": "glb"}


def expected(name: str, tasks: list[str], output_format: str, include_raw: bool) -> list[list[str]]:
    """For each output: the relative file names that count as having it (the first is the usual one)."""
    wanted = []
    for task in tasks:
        if task in FORMATTED:
            wanted.append([f"{name}_{task}.{output_format}", f"{name}_{task}.png"])
        else:
            wanted.append([f"{name}_{task}.{FIXED[task]}"])
    if include_raw and "depth" in tasks:
        wanted.append([f"{name}_depth_raw.npz"])
    return wanted


def already_done(out: Path, name: str, tasks: list[str], output_format: str, include_raw: bool) -> bool:
    return all(
        any((out / option).exists() for option in options)
        for options in expected(name, tasks, output_format, include_raw)
    )


def write_result(out: Path, name: str, result: dict) -> list[Path]:
    """Every output of one image's result, inline or by URL (``output_mode``), each written atomically;
    returns the paths written. A URL that cannot be fetched raises OSError."""
    written = []
    for key in OUTPUTS:
        if key in result:
            data = base64.b64decode(result[key])
        elif url_key(key) in result:
            with urllib.request.urlopen(result[url_key(key)], timeout=600) as response:
                data = response.read()
        else:
            continue
        path = out / file_name(name, key, result)
        write_atomically(path, data)
        written.append(path)
    return written


def remove_temporaries(out: Path) -> int:
    """Delete what an interrupted run left half-written (``.<name>.<pid>.tmp``); returns how many."""
    stale = list(out.rglob(".*.tmp")) if out.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)

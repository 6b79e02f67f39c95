"""Checked results -> files under ``--out``: one per output, a sidecar JSON per input, written atomically.

An image named ``trip/img1`` gets ``trip/img1_depth.png``, ``trip/img1_depth_raw.npz`` (``include_raw``),
``trip/img1_colorized.<format>``, ``_normals``, ``_disparity``, ``trip/img1_point_cloud.png``,
``trip/img1_points.ply``, ``trip/img1_mesh.glb``, and ``trip/img1.json``: the request that produced them
(and its digest), the result's fields without the outputs (depth range, units, direction, the 16-bit
PNG's decode formula, intrinsics, network size, ...) and the files written. The depth PNG also carries
the facts needed to turn it back into depth as PNG text chunks. Outputs given as URLs are fetched over
https (http only when allowed), within ``MAX_DOWNLOAD_BYTES``, never from another scheme. Each file is
written to a temporary name beside it and renamed, so an interrupted run leaves whole files or none; the
sidecar is written last, so it vouches for the files it lists. Nothing is written outside ``--out``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import urllib.request
import zlib
from pathlib import Path
from urllib.parse import urlsplit

from gateway.client.results import Checked
from gateway.outputs.output_names import EXTENSIONS, OUTPUTS

MAX_DOWNLOAD_BYTES = 2 << 30
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DEPTH_TEXT = ("depth_min", "depth_max", "depth_units", "depth_direction", "depth_png_decode", "model")


def request_digest(request: dict) -> str:
    """What identifies a request for resuming: its options as canonical JSON, hashed."""
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]


def sidecar_path(out: Path, name: str) -> Path:
    return out / f"{name}.json"


def resume_state(out: Path, name: str, digest: str) -> str:
    """``done`` when a sidecar of this request lists files that all exist; else why it must run:
    ``new``, ``changed`` (another request made the outputs) or ``incomplete`` (files missing)."""
    try:
        sidecar = json.loads(sidecar_path(out, name).read_text())
    except (OSError, ValueError):
        return "new"
    if not isinstance(sidecar, dict) or sidecar.get("request_digest") != digest:
        return "changed"
    files = sidecar.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) and inside(out, out / f).exists() for f in files):
        return "incomplete"
    return "done"


def inside(out: Path, path: Path) -> Path:
    """``path``, which must lie under ``out`` (ValueError otherwise)."""
    resolved = path.resolve()
    if not resolved.is_relative_to(out.resolve()):
        raise ValueError(f"{path} is outside the output folder")
    return path


def write_result(
    out: Path, name: str, source: str, request: dict, checked: Checked, allow_http: bool = False
) -> list[Path]:
    """Every output of one image, then its sidecar; returns the paths written. OSError when an output
    URL cannot be fetched (nothing of the image is vouched for then)."""
    written = []
    for key, mime in checked.mimes.items():
        suffix, _mime_key = OUTPUTS[key]
        data = checked.inline[key] if key in checked.inline else fetch(checked.linked[key], allow_http)
        if key == "depth_png_b64":
            data = with_text(data, {field: checked.metadata.get(field) for field in DEPTH_TEXT})
        path = inside(out, out / f"{name}_{suffix}.{EXTENSIONS[mime]}")
        write_atomically(path, data)
        written.append(path)
    sidecar = {
        "input": source,
        "request": request,
        "request_digest": request_digest(request),
        "result": checked.metadata,
        "files": [path.relative_to(out).as_posix() for path in written],
    }
    write_atomically(inside(out, sidecar_path(out, name)), json.dumps(sidecar, indent=1).encode())
    return written


class _HttpOnly(urllib.request.HTTPRedirectHandler):
    """Redirects only to http(s): a result's link can never reach a local file or another scheme."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urlsplit(newurl).scheme not in ("http", "https"):
            raise OSError(f"an output URL redirected to {urlsplit(newurl).scheme}:")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch(url: str, allow_http: bool, limit: int = MAX_DOWNLOAD_BYTES) -> bytes:
    """The body at ``url`` (https, or http when allowed), at most ``limit`` bytes; OSError otherwise."""
    if urlsplit(url).scheme not in (("https", "http") if allow_http else ("https",)):
        raise OSError(f"refused to fetch an output from {urlsplit(url).scheme}:")
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(), _HttpOnly()):
        opener.add_handler(handler)
    opener.add_handler(urllib.request.HTTPErrorProcessor())
    with opener.open(url, timeout=600) as response:
        data = response.read(limit + 1)
    if len(data) > limit:
        raise OSError(f"an output is larger than {limit} bytes")
    return data


def with_text(png: bytes, fields: dict) -> bytes:
    """``png`` with a ``tEXt`` chunk per field that has a value, right after its header chunk."""
    if not png.startswith(PNG_SIGNATURE) or len(png) < 33:
        return png
    chunks = b""
    for key, value in fields.items():
        if value is None:
            continue
        text = f"{key}\0{value}".encode("latin-1", "replace")
        body = b"tEXt" + text
        chunks += struct.pack(">I", len(text)) + body + struct.pack(">I", zlib.crc32(body))
    header_end = 8 + 8 + 13 + 4  # signature, IHDR length and type, its 13 bytes, its CRC
    return png[:header_end] + chunks + png[header_end:]


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

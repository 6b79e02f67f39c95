"""``python -m gateway.client IMAGE_OR_URL ... --out DIR``: send images to a running endpoint, save the outputs.

The endpoint is Runpod's local API (``--endpoint http://127.0.0.1:8000``, the default) or a deployed
Runpod endpoint (``--endpoint-id ID`` with ``RUNPOD_API_KEY`` set). Local files travel as base64, http(s)
arguments as URLs. Every output is decoded and written as a file, with ``response.json`` beside them
(base64 fields replaced by file names). Exit status: 0 when every image succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

OUTPUT_FIELDS = {
    "depth_png_b64": ("depth", "depth_png_mime"),
    "depth_npz_b64": ("depth_raw", None),
    "colorized_b64": ("colorized", "colorized_mime"),
    "normals_b64": ("normals", "normals_mime"),
    "disparity_b64": ("disparity", "disparity_mime"),
    "point_cloud_b64": ("point_cloud", "point_cloud_mime"),
    "points_b64": ("points", "points_mime"),
    "mesh_b64": ("mesh", "mesh_mime"),
}
EXTENSIONS = {
    "image/png": "png",
    "image/webp": "webp",
    "image/jpeg": "jpg",
    "application/x-ply": "ply",
    "model/gltf-binary": "glb",
    None: "npz",
}


def build_input(sources: list[str], args: argparse.Namespace) -> dict:
    images = []
    for source in sources:
        if source.startswith(("http://", "https://")):
            images.append({"type": "url", "data": source})
        else:
            images.append({"type": "b64", "data": base64.b64encode(Path(source).read_bytes()).decode()})
    payload = {"images": images, "tasks": args.tasks, "colormap": args.colormap, "output_format": args.format}
    if args.model:
        payload["model"] = args.model
    if args.include_raw:
        payload["include_raw"] = True
    return payload


def endpoint_url(args: argparse.Namespace) -> tuple[str, dict[str, str]]:
    headers = {"Content-Type": "application/json"}
    if args.endpoint_id:
        key = os.environ.get("RUNPOD_API_KEY")
        if not key:
            raise SystemExit("error: --endpoint-id needs RUNPOD_API_KEY in the environment")
        headers["Authorization"] = f"Bearer {key}"
        return f"https://api.runpod.ai/v2/{args.endpoint_id}/runsync", headers
    return f"{args.endpoint.rstrip('/')}/runsync", headers


def send(url: str, headers: dict[str, str], payload: dict, timeout: float) -> dict:
    request = urllib.request.Request(url, data=json.dumps({"input": payload}).encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def save_outputs(output: dict, sources: list[str], out: Path) -> list[str]:
    """Write every decoded output of every result into ``out``; returns one summary line per image."""
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for result in output["results"]:
        index = result["index"]
        stem = Path(sources[index].split("?")[0]).stem or "image"
        if "error" in result:
            lines.append(f"[{index}] {sources[index]}: error: {result['error']}")
            continue
        written = []
        for field, (task, mime_field) in OUTPUT_FIELDS.items():
            if field not in result:
                continue
            path = out / f"{index:02d}_{stem}_{task}.{EXTENSIONS[result.get(mime_field) if mime_field else None]}"
            path.write_bytes(base64.b64decode(result[field]))
            result[field] = path.name
            written.append(path.name)
        lines.append(
            f"[{index}] {sources[index]}: {result['width']}x{result['height']}, "
            f"depth {result['depth_min']:.4g}..{result['depth_max']:.4g}, {result['elapsed_sec']:.3f} s -> "
            + ", ".join(written)
        )
    (out / "response.json").write_text(json.dumps(output, indent=2) + "\n")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.client", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_URL")
    parser.add_argument("--out", type=Path, required=True, help="folder for the decoded outputs")
    parser.add_argument("--tasks", nargs="+", default=["depth", "colorized"])
    parser.add_argument("--model")
    parser.add_argument("--colormap", default="viridis")
    parser.add_argument("--format", default="png", choices=["png", "webp", "jpg"])
    parser.add_argument("--include-raw", action="store_true")
    parser.add_argument("--endpoint", default="http://127.0.0.1:8000", help="Runpod local API base URL")
    parser.add_argument("--endpoint-id", help="a deployed Runpod endpoint id (needs RUNPOD_API_KEY)")
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args(argv)
    url, headers = endpoint_url(args)
    try:
        payload = build_input(args.images, args)
        reply = send(url, headers, payload, args.timeout)
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if reply.get("status") != "COMPLETED":
        print(f"error: job {reply.get('status', 'failed')}: {reply.get('error', reply)}", file=sys.stderr)
        return 1
    for line in save_outputs(reply["output"], args.images, args.out):
        print(line)
    print(f"outputs in {args.out.resolve()}")
    return 0 if all("error" not in r for r in reply["output"]["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Render docs/api.md (models, request fields, videos) and docs/request.schema.json from the model table,
the request schema the gateway validates with and the settings' defaults.

python scripts/api_docs.py           # write the files
python scripts/api_docs.py --check   # exit 1 if they differ from the schema (the tests run this)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from catalogue.models import MODELS
from gateway.inputs.schema import VIDEO_ONLY, VIDEO_TASKS, DepthRequest
from gateway.inputs.video import DEFAULT_FPS_CAP
from gateway.outputs.video import COLOR_VIDEO_MIME, DEPTH_VIDEO_MIME, X264_CRF, X264_PRESET
from gateway.settings import Settings
from gateway.video_service import DEPTH_VIDEO_DECODE

ROOT = Path(__file__).resolve().parents[1]
HEADER = """\
# API reference

Generated from `catalogue/models.py` and `gateway/inputs/schema.py` by `python scripts/api_docs.py`; do not edit
by hand. The JSON Schema of the request is in [request.schema.json](request.schema.json); the response
is described in the README ("API").

## Models

Every result states `depth_units`, `depth_direction` and `depth_png_decode`; the response states the
model's `license` (as its model card gives it: check it before commercial use).

| `model` | depth | `process_res` (network short side) | licence |
|---|---|---|---|
{models}

## Request fields

| field | type | default | constraints | meaning |
|---|---|---|---|---|
"""


VIDEOS = """
## Videos

A job with `video_url` or `video_b64` (one video, no image fields) runs the video path on the same
models. Tasks: {tasks} (others are a request error that names them); `include_raw` adds the float16 depth
of every frame. Options: {options}; `max_size`, `process_res`, `colormap`, `invert`, `normalize` and
`output_mode` as for images. Frames are sampled at `fps` (default: the source's rate, at most {fps_cap:g}),
the first frame at or after each point of that grid (never interpolated, never repeated), from `start`
for `duration` seconds; rotation metadata is honoured.

Temporal consistency (`temporal`, default `align`): each frame of a relative model is mapped onto the
clip's running reference by a robust scale and shift in inverse-depth space (median start, then a fit
on the 60 % of pixels that fit best, so moving objects do not drag it); metric models are never
re-scaled; `none` keeps every frame as the network gave it. Either way the clip has one value range,
never one per frame.

One result (`index` 0) with:

| key | meaning |
|---|---|
| `kind` | `"video"` |
| `width`, `height` | the output frames' size (after `max_size`, display orientation) |
| `network_size` | `[width, height]` of the bucket the network ran at (every size in the API is width first) |
| `frames`, `fps`, `timestamps` | frames served, the sampling rate, each frame's source timestamp (s) |
| `source` | `codec`, `width`, `height`, `fps`, `duration`, `rotation` as the file says |
| `temporal`, `alignment` | what was done, and the per-frame `scale` and `shift` lists applied |
| `depth_min`, `depth_max`, `depth_units`, `depth_direction` | the clip's exact range, as for images |
| `depth_video_decode` | `{decode}` |
| `colorized_range` | the values mapped to the colormap's ends (1st and 99th percentiles of the clip) |
| `depth_video_b64` or `_url`, `depth_video_mime` | 16-bit FFV1 `gray16le` in Matroska (`{depth_mime}`), lossless |
| `colorized_video_b64` or `_url`, `colorized_video_mime` | H.264 in MP4 (`{color_mime}`), see below |
| `depth_npz_b64` or `_url` | `depth`: float16 `[frames, height, width]`, the values the 16-bit video encodes |
| `cut` | present when a limit shortened the clip: which (`max_frames`, `MAX_VIDEO_SECONDS`, ...) |
| `stopped` | present when the stream is corrupt part way: the frames before it are served |
| `audio` | present when the source has audio and a colorized video was asked for: `copied (aac)`, or why not |
| `timings` | seconds for fetch, decode and inference, encoding, delivery |

The colorized video is H.264 `yuv420p` (libx264 `{preset}`, CRF {crf}), cropped by a pixel to even
dimensions when needed, with the index at the front of the file: browsers play it. The source's audio
over the served window is copied into it unchanged when MP4 carries its codec (AAC, MP3, Opus, AC-3,
E-AC-3, ALAC, FLAC); the depth video has none.
Outputs go inline while they fit `MAX_RESPONSE_BYTES`, else (`url`, `auto`) to the bucket; inline
output that does not fit is the video's error, which says to use a bucket. Limits (worker settings):
`MAX_VIDEO_BYTES` {max_bytes} (download), `MAX_VIDEO_SECONDS` {max_seconds:g} and `MAX_VIDEO_FRAMES`
{max_frames} (longer clips are cut and say so), `MAX_VIDEO_PIXELS` {max_pixels} per frame (checked from
the header before decoding, and by FFmpeg on every frame), `VIDEO_SPOOL_BYTES` {spool} (disk for the
aligned frames; the clip is cut to fit), `VIDEO_TIMEOUT` {timeout:g} s for the whole job. Progress:
`frames 240/900` every few seconds, as a progress update (the `IN_PROGRESS` post of runpod's
`progress_update`, which `/status` shows; posted before the job's result).
"""


def video_section() -> str:
    settings = Settings()
    return VIDEOS.format(
        tasks=", ".join(f"`{task}`" for task in VIDEO_TASKS),
        options=", ".join(f"`{name}`" for name in VIDEO_ONLY),
        fps_cap=DEFAULT_FPS_CAP,
        decode=DEPTH_VIDEO_DECODE,
        depth_mime=DEPTH_VIDEO_MIME,
        color_mime=COLOR_VIDEO_MIME,
        preset=X264_PRESET,
        crf=X264_CRF,
        max_bytes=f"{settings.max_video_bytes >> 20} MiB",
        max_seconds=settings.max_video_seconds,
        max_frames=settings.max_video_frames,
        max_pixels=f"{settings.max_video_pixels:,}",
        spool=f"{settings.video_spool_bytes >> 30} GiB",
        timeout=settings.video_timeout,
    )


def model_rows() -> str:
    rows = []
    for model_id, spec in MODELS.items():
        if spec.metric:
            depth = f"metric: depth in metres, larger is farther (`m`, `distance`), up to {spec.max_depth:g} m"
        else:
            depth = "relative: inverse depth, larger is nearer, arbitrary scale (`relative`, `inverse`)"
        sizes = ", ".join(f"{size}{' (default)' if i == 0 else ''}" for i, (size, _b) in enumerate(spec.families))
        rows.append(f"| `{model_id}` | {depth} | {sizes} | {spec.license} |")
    return "\n".join(rows)


def type_name(prop: dict) -> str:
    if "anyOf" in prop:
        return " or ".join(type_name(p) for p in prop["anyOf"] if p.get("type") != "null")
    if "enum" in prop:
        return " \\| ".join(f"`{v}`" for v in prop["enum"])
    if prop.get("type") == "array":
        return f"list of {type_name(prop['items'])}"
    if "$ref" in prop:
        return "object"
    return prop.get("type", "any")


def render() -> tuple[str, str]:
    schema = DepthRequest.model_json_schema()
    rows = []
    for name, prop in schema["properties"].items():
        field = DepthRequest.model_fields[name]
        default = "-" if field.default is None else f"`{json.dumps(field.get_default(call_default_factory=True))}`"
        bounds = {key: value for option in prop.get("anyOf", [prop]) for key, value in option.items()}
        names = ("minimum", "exclusiveMinimum", "maximum", "minItems")
        limits = [f"{k} {bounds[k]}" for k in names if k in bounds]
        rows.append(f"| `{name}` | {type_name(prop)} | {default} | {', '.join(limits)} | {field.description} |")
    table = HEADER.format(models=model_rows()) + "\n".join(rows) + "\n" + video_section()
    return table, json.dumps(schema, indent=2) + "\n"


def main() -> int:
    table, schema = render()
    targets = {ROOT / "docs" / "api.md": table, ROOT / "docs" / "request.schema.json": schema}
    if "--check" in sys.argv:
        stale = [str(path) for path, text in targets.items() if not path.exists() or path.read_text() != text]
        if stale:
            print("out of date (run python scripts/api_docs.py):", ", ".join(stale))
            return 1
        return 0
    for path, text in targets.items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

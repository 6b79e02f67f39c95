"""The request contract (API.md) as a pydantic model: field types, defaults, ranges and the image sources.

Pure: imports neither runpod nor tritonclient. ``parse_request`` turns a job's ``input`` into a
``DepthRequest`` or raises ``RequestError`` with one readable sentence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.errors import QUOTE_LIMIT, quoted, safe_text
from gateway.outputs.geometry import MAX_FOV, MIN_FOV

Task = Literal["depth", "colorized", "normals", "disparity", "point_cloud", "points", "mesh"]
Colormap = Literal["viridis", "magma", "inferno", "plasma", "turbo", "gray"]
OutputFormat = Literal["png", "webp", "jpg"]
Dtype = Literal["float16", "float32"]


class RequestError(ValueError):
    """The request is wrong as a whole; the message is shown to the client."""


class ImageSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["url", "b64"] = Field(description="`url`: http(s) URL; `b64`: raw base64 or a data URI")
    data: str = Field(description="the URL or the base64 text")


class DepthRequest(BaseModel):
    """The ``input`` of a job."""

    model_config = ConfigDict(extra="forbid")

    image_url: str | None = Field(None, description="one image by http(s) URL")
    image_urls: list[str] | None = Field(None, description="several image URLs")
    image_b64: str | None = Field(None, description="one image, raw base64 or a `data:image/...;base64,` URI")
    images: list[ImageSource] | None = Field(None, description='`[{"type": "url" or "b64", "data": ...}]`, mixed')
    video_url: str | None = Field(None, description="one video by http(s) URL (instead of images)")
    video_b64: str | None = Field(None, description="one small video, raw base64 or a data URI (instead of images)")
    fps: float | None = Field(
        None,
        gt=0,
        le=120,
        description="video: sample at most this many frames per second (default: the source's, up to 30)",
    )
    start: float | None = Field(None, ge=0, le=1e6, description="video: seconds into the clip to begin at (default 0)")
    duration: float | None = Field(None, gt=0, le=1e6, description="video: seconds to process (default: to the end)")
    max_frames: int | None = Field(None, ge=1, le=1_000_000, description="video: most frames to sample")
    temporal: Literal["align", "none"] | None = Field(
        None,
        description='video: `"align"` (default) maps every frame of a relative model onto the clip\'s running '
        'reference (scale and shift), removing flicker; `"none"` keeps each frame as the network gave it',
    )
    model: str | None = Field(None, description="one of the six model ids; default `$DEPTH_MODEL` (Small)")
    tasks: list[Task] = Field(
        default_factory=lambda: ["depth"], min_length=1, description="any of the seven tasks; one named twice runs once"
    )
    colormap: Colormap = Field("viridis", description="colormap of the `colorized` output")
    normalize: bool = Field(True, description="min-max normalize for the visual outputs (else a fixed scale)")
    output_format: OutputFormat = Field("png", description="format of colorized, normals and disparity")
    quality: int = Field(95, ge=1, le=100, description="JPEG / WebP quality")
    max_size: int = Field(1024, ge=16, le=8192, description="longest edge the image is shrunk to before inference")
    process_res: int | None = Field(
        None,
        ge=1,
        le=8192,
        description="the network's short side: one of the sizes the model serves (Depth-Anything: 518, the default, "
        "770 or 1036; DPT: 384); larger sizes show finer edges and cost more",
    )
    invert: bool = Field(False, description="swap near and far before colorization")
    include_raw: bool = Field(False, description="add the float32 depth as `depth_npz_b64` (np.savez_compressed)")
    point_cloud_grid: int = Field(512, ge=16, le=4096, description="side of the square point-cloud preview")
    dtype: Dtype | None = Field(None, description="precision variant; default float16 on GPU, float32 on CPU")
    output_mode: Literal["inline", "url", "auto"] = Field(
        "inline",
        description="`inline`: outputs as base64 in the result; `url`: uploaded to the bucket (the worker's, or the "
        "job's `s3Config`), the result carries `<name>_url` presigned links instead of `<name>_b64`; `auto`: "
        "inline while the result fits its size limit, else url",
    )
    camera: dict[str, Any] | None = Field(
        None,
        description='for `points`, `mesh` and `normals`: `{"fov_x": degrees}` or `{"fx", "fy", "cx", "cy"}` in '
        "pixels of the original image (pixel centres at integers, as OpenCV); each focal length must give a field "
        "of view of 1 to 179 degrees along its axis and the principal point lie within one image size of the "
        "image (else that image fails with a message giving the accepted range); default: the photo's EXIF "
        "35 mm focal length when it is in that range, else a 60 degree horizontal field of view",
    )
    near: float = Field(1.0, ge=1e-6, le=1e6, description="relative models' 3D and normals: depth of the nearest point")
    far: float = Field(
        10.0, ge=1e-6, le=1e6, description="relative models' 3D and normals: depth of the farthest point (> near)"
    )
    depth_edge_threshold: float = Field(
        0.05,
        ge=0,
        le=10,
        description="`points`/`mesh`: drop points and triangles across depth jumps larger than this fraction of "
        "the nearer depth (flying pixels); 0 keeps all",
    )
    max_points: int = Field(250_000, ge=1000, le=5_000_000, description="`points`: most points (grid subsampled)")
    max_mesh_vertices: int = Field(
        100_000, ge=1000, le=2_000_000, description="`mesh`: most vertices (grid subsampled)"
    )

    @field_validator("tasks")
    @classmethod
    def _dedupe(cls, tasks: list[str]) -> list[str]:
        return list(dict.fromkeys(tasks))

    @field_validator("camera")
    @classmethod
    def _camera(cls, camera: dict[str, Any] | None) -> dict[str, float] | None:
        return None if camera is None else check_camera(camera)

    @model_validator(mode="after")
    def _near_before_far(self) -> DepthRequest:
        if self.far <= self.near:
            raise ValueError(f"far ({self.far:g}) must be larger than near ({self.near:g})")
        return self

    def sources(self) -> list[ImageSource]:
        """Every image source, in the order image_url, image_urls, image_b64, images."""
        found = []
        if self.image_url is not None:
            found.append(ImageSource(type="url", data=self.image_url))
        found += [ImageSource(type="url", data=url) for url in self.image_urls or []]
        if self.image_b64 is not None:
            found.append(ImageSource(type="b64", data=self.image_b64))
        found += self.images or []
        return found


CAMERA_FORMS = '{"fov_x": degrees} or {"fx", "fy", "cx", "cy"} in pixels'


def check_camera(camera: dict[str, Any]) -> dict[str, float]:
    """The camera as floats, or ValueError with one sentence naming what is wrong."""
    keys = set(camera)
    if keys not in ({"fov_x"}, {"fx", "fy", "cx", "cy"}):
        raise ValueError(f"camera must be {CAMERA_FORMS}")
    values = {}
    for key, value in camera.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"camera.{key} must be a finite number")
        values[key] = float(value)
    if "fov_x" in values and not MIN_FOV <= values["fov_x"] <= MAX_FOV:
        raise ValueError(f"camera.fov_x must be between {MIN_FOV:g} and {MAX_FOV:g} degrees")
    if "fx" in values and (values["fx"] <= 0 or values["fy"] <= 0):
        raise ValueError("camera.fx and camera.fy must be positive")
    return values


VIDEO_TASKS = ("depth", "colorized")
VIDEO_ONLY = ("fps", "start", "duration", "max_frames", "temporal")


@dataclass(frozen=True)
class ParsedRequest:
    request: DepthRequest
    sources: list[ImageSource]  # the images; empty for a video job
    video: ImageSource | None = None


def parse_request(payload: object, max_images: int) -> ParsedRequest:
    """Validate a job input; raises RequestError naming the first problem."""
    if not isinstance(payload, dict):
        raise RequestError("input must be a JSON object")
    try:
        request = DepthRequest.model_validate(payload)
    except ValidationError as error:
        raise RequestError(_describe(error)) from None
    sources = request.sources()
    videos = [ImageSource(type="url", data=request.video_url)] if request.video_url is not None else []
    videos += [ImageSource(type="b64", data=request.video_b64)] if request.video_b64 is not None else []
    if videos:
        return ParsedRequest(request, [], _check_video(request, sources, videos))
    given = [name for name in VIDEO_ONLY if getattr(request, name) is not None]
    if given:
        raise RequestError(f"{', '.join(given)} apply to videos only (video_url or video_b64)")
    if not sources:
        raise RequestError("no image given: set image_url, image_urls, image_b64 or images (or video_url, video_b64)")
    if len(sources) > max_images:
        raise RequestError(f"too many images: {len(sources)} given, at most {max_images} per request")
    return ParsedRequest(request, sources)


def _check_video(request: DepthRequest, images: list[ImageSource], videos: list[ImageSource]) -> ImageSource:
    """The job's one video, or RequestError: a video job has no images and only the video tasks."""
    if images:
        raise RequestError("a job takes either one video (video_url or video_b64) or images, not both")
    if len(videos) > 1:
        raise RequestError("one video per job: set video_url or video_b64, not both")
    other = [task for task in request.tasks if task not in VIDEO_TASKS]
    if other:
        raise RequestError(
            f"tasks {', '.join(other)} do not apply to a video; a video supports "
            f"{' and '.join(VIDEO_TASKS)} (and include_raw for the float16 depth of every frame)"
        )
    return videos[0]


def _describe(error: ValidationError) -> str:
    """One sentence naming the first problem; user input is quoted short (see ``errors.quoted``)."""
    first = error.errors()[0]
    where = safe_text(".".join(str(part)[:QUOTE_LIMIT] for part in first["loc"])) or "input"
    if first["type"] == "extra_forbidden":
        return f"unknown field {quoted(where)}"
    if first["type"] == "literal_error":
        expected = first["msg"].removeprefix("Input should be ")
        return f"invalid value {quoted(first.get('input'))} for {where}: expected {expected}"
    message = safe_text(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "value_error" and where == "input":
        return message[:200]
    return f"invalid {where}: {message[:200]}"

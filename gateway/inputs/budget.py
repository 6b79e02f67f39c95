"""What one job may cost: decoded pixels across its images and the size of its response; and what one
image costs in working memory (``estimated_work_bytes``, drawn from the worker's budget). Pure.

Both are reserved per image from the image header, before any pixel is decoded, so a request of a few
hundred bytes cannot make the worker allocate gigabytes only to refuse the result afterwards. The output
size is estimated from the pixel count and the tasks with compressed sizes typical of depth outputs
(``BYTES_PER_PIXEL``, measured on photos and deliberately on the low side), so an image is refused only
when its outputs would be over the limit even at that rate; the response's real size is still checked
when each image's outputs are rendered (``settle``): an image whose real outputs would take the job past
its limit fails alone, and the others keep theirs. An image that does not fit gets a per-image error and
costs the others nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from gateway.errors import ImageError

BASE64_GROWTH = 4 / 3
# Encoded bytes per original pixel, at least, for each output (PNG unless a lossy format is asked for).
BYTES_PER_PIXEL = {
    "depth": 0.5,  # 16-bit PNG of a smooth map: 0.7-1.2 measured
    "raw": 1.0,  # compressed float32: 2-3 measured
    "colorized": 0.2,
    "normals": 0.2,
    "disparity": 0.1,
}
LOSSY_BYTES_PER_PIXEL = 0.02  # webp / jpg at any quality
POINT_CLOUD_BYTES_PER_CELL = 0.1
PLY_BYTES_PER_POINT = 15  # x y z float32, r g b uint8: not compressed
GLB_BYTES_PER_VERTEX = 16  # position and colour; indices come on top


# Working memory per photo pixel from decode to render, at most (measured on a 4 MP JPEG with
# ``python -m bench.memory``: peak RSS of an image worker per task set; each figure rounded up, with room).
WORK_BYTES_PER_PIXEL = {
    "base": 16,  # the decoded photo and the depth at photo size, float32
    "photo": 8,  # the photo kept for the outputs (and its parked copy in /dev/shm)
    "depth": 8,
    "raw": 4,
    "colorized": 8,
    "normals": 36,  # back-projected surface normals (41 B measured, with the base)
    "disparity": 4,
    "point_cloud": 16,
}
WORK_BYTES_PER_POINT = 90  # ``points``: per point kept (measured 83)
WORK_BYTES_PER_VERTEX = 120  # ``mesh``: per vertex kept (measured 116)
NETWORK_BYTES_PER_PIXEL = 16  # network input (uint8 RGB) and depth (float32), each possibly copied once


def estimated_work_bytes(
    pixels: int,
    network_pixels: int,
    tasks: Iterable[str],
    include_raw: bool,
    needs_photo: bool,
    max_points: int = 0,
    max_mesh_vertices: int = 0,
) -> int:
    """A high estimate of the memory one image of ``pixels`` holds from decode to render (all processes)."""
    per_pixel = WORK_BYTES_PER_PIXEL["base"] + (WORK_BYTES_PER_PIXEL["photo"] if needs_photo else 0)
    total = network_pixels * NETWORK_BYTES_PER_PIXEL
    for task in tasks:
        if task == "points":
            total += min(pixels, max_points) * WORK_BYTES_PER_POINT
        elif task == "mesh":
            total += min(pixels, max_mesh_vertices) * WORK_BYTES_PER_VERTEX
        else:
            per_pixel += WORK_BYTES_PER_PIXEL.get(task, 0)
    if include_raw:
        per_pixel += WORK_BYTES_PER_PIXEL["raw"]
    return int(total + pixels * per_pixel)


def estimated_output_bytes(
    pixels: int,
    tasks: Iterable[str],
    output_format: str,
    include_raw: bool,
    point_cloud_grid: int,
    max_points: int = 0,
    max_mesh_vertices: int = 0,
) -> int:
    """A low estimate of the base64 bytes one image of ``pixels`` pixels adds to the response."""
    total = 0.0
    for task in tasks:
        if task == "points":
            total += min(pixels, max_points) * PLY_BYTES_PER_POINT * 0.5  # up to half of them flying pixels
        elif task == "mesh":
            total += min(pixels, max_mesh_vertices) * GLB_BYTES_PER_VERTEX * 0.5
        elif task == "depth":
            total += pixels * (BYTES_PER_PIXEL["depth"] + (BYTES_PER_PIXEL["raw"] if include_raw else 0.0))
        elif task == "point_cloud":
            total += point_cloud_grid**2 * POINT_CLOUD_BYTES_PER_CELL
        elif task in BYTES_PER_PIXEL:
            lossy = output_format != "png"
            total += pixels * (LOSSY_BYTES_PER_PIXEL if lossy else BYTES_PER_PIXEL[task])
    return int(total * BASE64_GROWTH)


class JobBudget:
    """Pixels and response bytes left to one job; ``admit`` is called from worker threads."""

    def __init__(
        self, max_pixels: int, max_response_bytes: int, estimate_bytes, limit_name: str = "the response"
    ) -> None:
        self.limit_name = limit_name  # what the byte limit is, for messages
        self.pixels_left = max_pixels
        self.bytes_left = max_response_bytes
        self.max_pixels = max_pixels
        self.max_response_bytes = max_response_bytes
        self.estimate_bytes = estimate_bytes  # pixels -> estimated response bytes of one image
        self._lock = threading.Lock()

    def admit(self, width: int, height: int) -> int:
        """Reserve one image's share (returns the bytes reserved), or raise ImageError saying which limit
        it would pass."""
        pixels = width * height
        needed = self.estimate_bytes(pixels)
        with self._lock:
            if pixels > self.pixels_left:
                raise ImageError(
                    f"the job's images exceed {self.max_pixels / 1e6:.0f} M pixels in all; send fewer or smaller images"
                )
            if needed > self.bytes_left:
                raise ImageError(
                    f"this image's outputs (about {needed / 1e6:.1f} MB) would take {self.limit_name} over its "
                    f"{self.max_response_bytes / 1e6:.0f} MB limit (outputs keep the photo's size); ask for fewer "
                    "tasks, a smaller max_size or jpg/webp output"
                    + (", or use output_mode url or auto with a bucket" if self.limit_name == "the response" else "")
                )
            self.pixels_left -= pixels
            self.bytes_left -= needed
        return needed

    def settle(self, reserved: int, actual: int) -> None:
        """The image's outputs are rendered: ``actual`` bytes replace the ``reserved`` estimate, or
        ImageError when they do not fit in what the job has left (the image's outputs are dropped)."""
        with self._lock:
            if actual > self.bytes_left + reserved:
                self.bytes_left += reserved
                raise ImageError(
                    f"this image's outputs ({actual / 1e6:.1f} MB) would take {self.limit_name} over its "
                    f"{self.max_response_bytes / 1e6:.0f} MB limit; ask for fewer tasks, a smaller max_size "
                    "or jpg/webp output"
                    + (", or use output_mode url or auto with a bucket" if self.limit_name == "the response" else "")
                )
            self.bytes_left -= actual - reserved

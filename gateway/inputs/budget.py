"""What one job may cost: decoded pixels across its images and the size of its response. Pure.

Both are reserved per image from the image header, before any pixel is decoded, so a request of a few
hundred bytes cannot make the worker allocate gigabytes only to refuse the result afterwards. The output
size is estimated from the pixel count and the tasks with compressed sizes typical of depth outputs
(``BYTES_PER_PIXEL``, measured on photos and deliberately on the low side), so an image is refused only
when its outputs would be over the limit even at that rate; the response's real size is still checked
at the end. An image that does not fit gets a per-image error and costs the others nothing.
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

    def __init__(self, max_pixels: int, max_response_bytes: int, estimate_bytes) -> None:
        self.pixels_left = max_pixels
        self.bytes_left = max_response_bytes
        self.max_pixels = max_pixels
        self.max_response_bytes = max_response_bytes
        self.estimate_bytes = estimate_bytes  # pixels -> estimated response bytes of one image
        self._lock = threading.Lock()

    def admit(self, width: int, height: int) -> None:
        """Reserve one image's share, or raise ImageError saying which limit it would pass."""
        pixels = width * height
        needed = self.estimate_bytes(pixels)
        with self._lock:
            if pixels > self.pixels_left:
                raise ImageError(
                    f"the job's images exceed {self.max_pixels / 1e6:.0f} M pixels in all; send fewer or smaller images"
                )
            if needed > self.bytes_left:
                raise ImageError(
                    f"this image's outputs (about {needed / 1e6:.1f} MB) would take the response over its "
                    f"{self.max_response_bytes / 1e6:.0f} MB limit; ask for fewer tasks, a smaller image, "
                    "or jpg/webp output"
                )
            self.pixels_left -= pixels
            self.bytes_left -= needed

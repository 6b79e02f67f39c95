"""Per-image CPU work in worker processes, so that it scales with cores instead of sharing one GIL.

Profiled through the production job loop, the decode/resize/render threads held the GIL about 4 ms of
every 1024x768 image (base64, Pillow-to-NumPy copies, PNG framing), on top of the event loop's own 4 ms:
one worker process could not pass ~120 images/s whatever its core count. Here that work runs in a pool
of processes (``CPU_WORKERS``, default: the core count), started with ``spawn`` (no fork of a process that
runs gRPC threads). The gateway process keeps what must stay in one place: the base64 decode, the
header checks and the job's budget (``decode.open_image`` + ``budget``), Triton, and the job loop.

Two calls per image: ``decode_and_prepare`` (photo bytes -> network input, and the photo itself only when
the point cloud needs its colours) and ``render_outputs`` (network depth -> the response keys). A
crashed worker process (a decoder bug, a kill) fails the images it held with a clean error and the pool
is replaced; the other images are not affected.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from gateway.errors import ImageError
from gateway.inputs.decode import decode_image, focal_length_35mm
from gateway.inputs.schema import DepthRequest
from gateway.outputs.render import needs_camera, needs_photo, prepare, render
from gateway.serving.triton import ServedModel

log = logging.getLogger("gateway")


@dataclass(frozen=True)
class Decoded:
    network_input: np.ndarray
    inference_size: tuple[int, int]  # (width, height) after max_size
    network_size: tuple[int, int]  # (width, height) of the bucket the network runs at
    size: tuple[int, int]  # (width, height) of the photo, EXIF orientation applied
    photo: np.ndarray | None  # only when the tasks need its pixels
    focal_35mm: float | None  # EXIF, only when the 3D tasks need it and the request gives no camera


def decode_and_prepare(data: bytes, max_pixels: int, request: DepthRequest, model: ServedModel) -> Decoded:
    photo = decode_image(data, max_pixels)
    prepared = prepare(photo, request.max_size, model, request.process_res)
    height, width = photo.shape[:2]
    kept = photo if needs_photo(request.tasks) else None
    focal = focal_length_35mm(data) if needs_camera(request) else None
    return Decoded(prepared.network_input, prepared.inference_size, prepared.network_size, (width, height), kept, focal)


def render_outputs(decoded: Decoded, depth: np.ndarray, request: DepthRequest, model: ServedModel) -> dict:
    return render(decoded.size, decoded.photo, depth, request, model, decoded.focal_35mm)


def _warm(_: int) -> int:
    return 0


def _one_thread_each() -> None:
    """In each worker process: parallelism comes from the processes, so OpenCV runs single-threaded."""
    cv2.setNumThreads(1)


class ImageWorkers:
    """The process pool, replaced when one of its processes dies."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self.processes, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread_each
        )

    def warm_up(self) -> None:
        """Start every process now (imports take about a second each) rather than on the first jobs."""
        list(self._pool.map(_warm, range(self.processes * 2)))

    async def decode(self, data: bytes, max_pixels: int, request: DepthRequest, model: ServedModel) -> Decoded:
        return await self._run(functools.partial(decode_and_prepare, data, max_pixels, request, model))

    async def render(self, decoded: Decoded, depth: np.ndarray, request: DepthRequest, model: ServedModel) -> dict:
        return await self._run(functools.partial(render_outputs, decoded, depth, request, model))

    async def _run(self, call: functools.partial) -> Any:
        pool = self._pool
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, call)
        except BrokenProcessPool:
            if pool is self._pool:
                log.error("an image worker process died; starting a new pool")
                self._pool = self._new_pool()
                pool.shutdown(wait=False)
            raise ImageError("image processing failed (a worker process stopped); try again") from None

"""Per-image CPU work in worker processes, so that it scales with cores instead of sharing one GIL.

Profiled through the production job loop, the decode/resize/render threads held the GIL about 4 ms of
every 1024x768 image (base64, Pillow-to-NumPy copies, PNG framing), on top of the event loop's own 4 ms:
one worker process could not pass ~120 images/s whatever its core count. Here that work runs in a pool
of processes (``CPU_WORKERS``, default: the core count; ``process_pool``). The gateway process keeps what
must stay in one place: the base64 decode, the header checks and the job's budget (``decode.open_image`` +
``budget``), Triton, and the job loop.

Two calls per image: ``decode_and_prepare`` (photo bytes -> network input, and the photo itself only when
the point cloud needs its colours) and ``render_parked`` (``render_outputs``: network depth -> the
response keys). With a shared-memory slot (``shared_memory``), the network input and the depth stay in
the slot and only the slot's numbers travel; otherwise they travel through the pool's sockets. A photo
the outputs need is parked in its own segment (``SharedPhoto``) between the two calls, and the encoded
outputs, when they are large, in theirs (``SharedOutputs``) on their way back (outputs to upload stay
there until the thread that uploads each reads it, ``HandedOutputs``). Every call is tracked in
the image's ``Holdings``: its slot and parked segments are given back only when the gateway is done with
the image and no call of it is still running, so a cancelled job's late decode cannot write into another
image's slot, and a cancelled job's late outputs do not stay in /dev/shm.
A crashed worker process (a decoder bug, a kill) fails the image it held with a clean error and another
process takes its place; the other images are not affected.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pybase64

from catalogue.size import Size
from gateway.errors import ImageError
from gateway.inputs.decode import decode_scaled, focal_length_35mm
from gateway.inputs.network_input import network_bucket, prepare
from gateway.inputs.schema import DepthRequest
from gateway.outputs.encode import b64, keep
from gateway.outputs.output_names import OUTPUTS
from gateway.outputs.render import needs_camera, needs_photo, render
from gateway.outputs.video import ClipEncoding, EncodedClip, encode_clip
from gateway.served_model import ServedModel
from gateway.serving.ownership import Holdings
from gateway.serving.process_pool import ProcessDied, ProcessPool
from gateway.serving.shared_memory import SharedOutputs, SharedPhoto, Slot
from gateway.serving.triton_process import die_with_parent

log = logging.getLogger("gateway")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
PARK_OUTPUTS_FROM = 256 << 10  # bytes of encoded outputs; smaller ones travel through the pipe


class NonFiniteDepth(Exception):
    """The depth map has NaN or infinite values (FP16 overflow): it is never rendered."""


@dataclass(frozen=True)
class Decoded:
    network_input: np.ndarray | None  # None when it went straight into a shared-memory slot
    inference_size: Size  # after max_size
    network_size: Size  # the bucket the network runs at
    size: Size  # the photo's, EXIF orientation applied
    photo: SharedPhoto | np.ndarray | None  # only when the tasks need its pixels; parked when /dev/shm has room
    focal_35mm: float | None  # EXIF, only when the 3D tasks need it and the request gives no camera


def decode_and_prepare(
    data: bytes, max_pixels: int, request: DepthRequest, model: ServedModel, slot: Slot | None
) -> Decoded:
    keep = needs_photo(request.tasks)

    def bucket_size(size: Size) -> Size:
        return network_bucket(size, request.max_size, model, request.process_res)

    # Without the photo in the outputs, a JPEG is decoded only as large as the network input needs.
    photo, size = decode_scaled(data, max_pixels, None if keep else bucket_size)
    prepared = prepare(photo, request.max_size, model, request.process_res, size)
    network_input = prepared.network_input
    if slot is not None:
        slot.write_input(network_input)
        network_input = None
    focal = focal_length_35mm(data) if needs_camera(request) else None
    parked = (SharedPhoto.park(photo) or photo) if keep else None
    return Decoded(network_input, prepared.inference_size, prepared.network_size, size, parked, focal)


def render_outputs(
    decoded: Decoded,
    depth: np.ndarray | None,
    request: DepthRequest,
    model: ServedModel,
    slot: Slot | None,
    uploaded: bool = False,
) -> dict:
    """The response keys; the depth is ``depth``, or read from ``slot`` when None. Outputs are base64 text,
    or their bytes when they will be ``uploaded`` (no base64 out of this process and back again)."""
    if depth is None:
        assert slot is not None
        depth = slot.read_output(decoded.network_size)
    if not np.isfinite(depth).all():
        raise NonFiniteDepth

    def render_with(photo: np.ndarray | None) -> dict:
        return render(decoded.size, photo, depth, request, model, decoded.focal_35mm, keep if uploaded else b64)

    if isinstance(decoded.photo, SharedPhoto):
        return decoded.photo.read(render_with)
    return render_with(decoded.photo)


@dataclass(frozen=True)
class Rendered:
    """An image's response keys from an image worker; its encoded outputs (None in ``fields``) parked
    in shared memory when they were large and /dev/shm had room."""

    fields: dict
    parked: SharedOutputs | None

    def outputs(self) -> dict:
        """The response keys, parked outputs read back in their places."""
        if self.parked is None:
            return self.fields
        parked = self.parked.read()
        return {key: parked.get(key, value) for key, value in self.fields.items()}


class HandedOutputs:
    """An image's parked outputs handed to the job that uploads them (url mode). Each output is read by
    the thread that uploads it (``take``) and the segment is discarded after the last read, or by
    ``discard`` when the job ends first (cancelled, failed, out of time): the bytes are copied once, in
    the upload's thread, with no hand-off through the event loop to read them first."""

    def __init__(self, parked: SharedOutputs) -> None:
        self._parked = parked
        self._left = set(parked.spans)
        self._lock = threading.Lock()  # upload threads take outputs of one segment at once

    def outputs(self) -> dict[str, ParkedOutput]:
        return {key: ParkedOutput(self, key, size) for key, (_at, size) in self._parked.spans.items()}

    def take(self, key: str) -> bytes:
        try:
            return self._parked.read_one(key)
        finally:
            with self._lock:
                self._left.discard(key)
                last = not self._left
            if last:
                self._parked.discard()

    def discard(self) -> None:
        """End the segment now, unless the last read already did (no second unlink on the event loop)."""
        with self._lock:
            unread, self._left = self._left, set()
        if unread:
            self._parked.discard()


@dataclass(frozen=True)
class ParkedOutput:
    """One output of ``HandedOutputs``, in its image's result until it is uploaded."""

    handed: HandedOutputs
    key: str
    size: int

    def read(self) -> bytes:
        return self.handed.take(self.key)


def handed_in(fields: dict) -> set[HandedOutputs]:
    """The parked segments that an image's response keys refer to."""
    return {value.handed for value in fields.values() if isinstance(value, ParkedOutput)}


def render_parked(
    decoded: Decoded,
    depth: np.ndarray | None,
    request: DepthRequest,
    model: ServedModel,
    slot: Slot | None,
    uploaded: bool = False,
) -> Rendered:
    """``render_outputs`` in an image worker, its encoded outputs parked (``SharedOutputs``) when they
    come to ``PARK_OUTPUTS_FROM`` bytes or more."""
    fields = render_outputs(decoded, depth, request, model, slot, uploaded=True)
    encoded = {key: fields[key] for key in OUTPUTS if key in fields}
    if not uploaded:
        encoded = {key: pybase64.b64encode(data) for key, data in encoded.items()}
    parked = None
    if sum(len(data) for data in encoded.values()) >= PARK_OUTPUTS_FROM:
        parked = SharedOutputs.park(encoded, text=not uploaded)
    for key, data in encoded.items():
        fields[key] = None if parked is not None else data if uploaded else data.decode("ascii")
    return Rendered(fields, parked)


def keep_freed_memory() -> None:
    """Let this process reuse the memory it frees instead of handing it back to the kernel.

    glibc serves allocations over 128 kB (up to its adaptive threshold) with fresh ``mmap`` pages and
    unmaps them on free, so each multi-megabyte array of an image's work page-faulted in afresh: normals
    of a 1024x768 map spent 6.7 of 8.9 ms in 3,400 page faults. Kept in the heap (allocations up to
    64 MB, up to 128 MB of free heap kept), ``bench.cpu_postprocess`` against ``--glibc-malloc``: normals
    16.5 -> 8.4 ms with its PNG, point cloud 21.0 -> 13.7 ms, all five tasks 59 -> 42 ms per image. What
    stays is bounded by the process's peak use. The heap is the main thread's; other threads use it
    when the process runs with one arena (``gateway.allocator``).
    """
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_THRESHOLD, 64 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 128 << 20)


def _start_worker() -> None:
    """In each worker process: dies with the gateway (even a SIGKILLed one, so that nothing holds on to
    the shared memory; SIGKILL, as a lane's workers inherit its ignored SIGTERM); parallelism comes from
    the processes, so OpenCV runs single-threaded."""
    die_with_parent(signal.SIGKILL)
    keep_freed_memory()
    cv2.setNumThreads(1)


class ImageWorkers:
    """The image worker processes (``process_pool``): a process that dies fails only the image it held."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._pool = ProcessPool(processes, _start_worker)

    def start(self) -> None:
        """Start every process now (imports take about a second each) rather than on the first jobs."""
        self._pool.start()

    def close(self) -> None:
        """Stop the processes once their calls end (also at exit)."""
        self._pool.close()

    async def decode(
        self,
        data: bytes,
        max_pixels: int,
        request: DepthRequest,
        model: ServedModel,
        slot: Slot | None,
        holdings: Holdings,
    ) -> Decoded:
        """The decoded image; a photo it parked is the image's until its holdings are given back, whether or
        not this call is still awaited when the process finishes."""

        def hold_photo(decoded: Decoded) -> None:
            if isinstance(decoded.photo, SharedPhoto):
                holdings.on_give_back(decoded.photo.discard)

        call = functools.partial(decode_and_prepare, data, max_pixels, request, model, slot)
        return await self._run(call, holdings, hold_photo)

    async def render(
        self,
        decoded: Decoded,
        depth: np.ndarray | None,
        request: DepthRequest,
        model: ServedModel,
        slot: Slot | None,
        holdings: Holdings,
        uploaded: bool = False,
    ) -> dict:
        """The image's response keys (see ``render_outputs``); parked outputs are the image's until read
        back here or, when this call is no longer awaited, until its holdings are given back. Outputs to be
        ``uploaded`` stay parked: they come back as ``ParkedOutput``s, whose segment (``handed_in``) the
        caller owns from then on."""
        handed_over = False

        def hold_outputs(rendered: Rendered) -> None:
            parked = rendered.parked
            if parked is not None:
                holdings.on_give_back(lambda: None if handed_over else parked.discard())

        call = functools.partial(render_parked, decoded, depth, request, model, slot, uploaded)
        rendered = await self._run(call, holdings, hold_outputs)
        if rendered.parked is None:
            return rendered.fields
        parked = rendered.parked
        if uploaded:
            handed_over = True
            return {**rendered.fields, **HandedOutputs(parked).outputs()}

        def read_and_discard() -> dict:
            try:
                return rendered.outputs()
            finally:
                parked.discard()  # the kernel frees megabytes of pages: not on the event loop either

        # Megabytes to copy: in a thread, off the event loop. The thread ends the segment even when this
        # call is cancelled meanwhile (and the image's holdings discard it again, which does nothing).
        return await asyncio.to_thread(read_and_discard)

    async def encode_clip(self, job: ClipEncoding, holdings: Holdings) -> EncodedClip:
        """A video's output files, written from its spool by one worker process."""
        return await self._run(functools.partial(encode_clip, job), holdings)

    async def _run(
        self, call: functools.partial, holdings: Holdings, on_result: Callable[[Any], None] | None = None
    ) -> Any:
        """``call`` in a worker process, tracked in ``holdings`` until the process is done with it (a
        cancelled caller does not stop the process; a call no process has taken yet is dropped)."""
        future = await self._pool.submit(call)
        holdings.track(future, on_result)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            self._pool.withdraw(future)
            raise
        except ProcessDied:
            raise ImageError("image processing failed (a worker process stopped); try again") from None

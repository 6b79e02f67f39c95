"""Triton system shared memory for the network input going in and the depth coming out.

When Triton runs beside the gateway (the embedded server, or ``TRITON_URL`` on loopback with the same
``/dev/shm``), an image's tensors never travel through gRPC or the image workers' pipes. One region,
named after the gateway's process and registered with Triton, is cut into slots; an image holds one slot
from decode to render. The worker process that decodes writes the network input into its slot, Triton
reads it there and writes the depth into the slot's second part, and the worker process that renders
reads the depth from there: what crosses processes is a ``Slot``, a few numbers.

Sizing: a slot holds the default model's largest default bucket (3 bytes in and 4 bytes out per pixel,
3.4 MB for Depth-Anything at 518); an image of a larger network size (another model, a larger
``process_res``) uses plain gRPC payloads. ``SHARED_MEMORY_SLOTS`` slots (default 64), fewer when
``/dev/shm`` has not twice their size free; under 4, shared memory is off. Images wait for a free slot,
which also bounds the decoded images in flight.

Lifetime: the region is registered at startup, and again whenever Triton answers that it does not know
it (a restart); it is unregistered and unlinked on exit, and Python's resource tracker unlinks it if the
gateway is killed. A slot whose inference ended without Triton's answer (deadline, cancellation) is
kept out of use for the Triton timeout, so that a late write cannot land in another image's slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import TypeVar
from urllib.parse import urlsplit

import numpy as np
import tritonclient.grpc as grpcsync
import tritonclient.grpc.aio as grpcaio
import tritonclient.utils.shared_memory as triton_shm
from tritonclient.utils import InferenceServerException

log = logging.getLogger("gateway")
T = TypeVar("T")

SHM_DIR = "/dev/shm"
MIN_SLOTS = 4
INPUT_BYTES_PER_PIXEL = 3  # RGB uint8
OUTPUT_BYTES_PER_PIXEL = 4  # float32 depth


@dataclass(frozen=True)
class Slot:
    """One image's part of the region; picklable, usable from any process on the host."""

    key: str  # the POSIX shared-memory name, without the leading slash
    region: str  # the name Triton knows the region by
    index: int
    input_offset: int
    output_offset: int

    def input_bytes(self, height: int, width: int) -> int:
        return height * width * INPUT_BYTES_PER_PIXEL

    def output_bytes(self, height: int, width: int) -> int:
        return height * width * OUTPUT_BYTES_PER_PIXEL

    def write_input(self, image: np.ndarray) -> None:
        """Copy the RGB uint8 network input ``[H, W, 3]`` into the slot."""
        view = np.ndarray(image.shape, np.uint8, buffer=_buffer(self.key), offset=self.input_offset)
        view[...] = image

    def read_output(self, height: int, width: int) -> np.ndarray:
        """The depth ``[H, W]`` Triton wrote into the slot (a view: valid while the slot is held)."""
        return np.ndarray((height, width), np.float32, buffer=_buffer(self.key), offset=self.output_offset)


class SharedPhoto:
    """A decoded photo parked in its own segment between the image worker that decodes it and the one
    that renders it (the point cloud and 3D colours read it), so that its megabytes never pass through
    the gateway process's pipes. The gateway, which owns the image's lifetime, ``discard``s it."""

    def __init__(self, name: str, shape: tuple[int, ...]) -> None:
        self.name = name
        self.shape = shape

    @classmethod
    def park(cls, photo: np.ndarray) -> SharedPhoto | None:
        """The photo copied into a new segment; None when /dev/shm has no room for it."""
        segment = shared_memory.SharedMemory(create=True, size=max(photo.nbytes, 1))
        try:
            _allocate(segment.name, segment.size)
        except OSError:
            segment.close()
            segment.unlink()
            return None
        np.ndarray(photo.shape, np.uint8, buffer=segment.buf)[...] = photo
        segment.close()
        return cls(segment.name, photo.shape)

    def read(self, use: Callable[[np.ndarray], T]) -> T:
        """``use(photo)`` on the parked pixels, mapped only for that call."""
        segment = shared_memory.SharedMemory(self.name)
        try:
            return use(np.ndarray(self.shape, np.uint8, buffer=segment.buf))
        finally:
            segment.close()  # ``use``'s result must not keep a view of the pixels

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            segment = shared_memory.SharedMemory(self.name)
            segment.close()
            segment.unlink()


_attached: dict[str, shared_memory.SharedMemory] = {}


def _buffer(key: str) -> memoryview:
    """The region mapped into this process, once per process."""
    if key not in _attached:
        _attached[key] = shared_memory.SharedMemory(key)
    return _attached[key].buf


def is_local(url: str) -> bool:
    """Whether Triton's gRPC address is on this host (only then can it share ``/dev/shm``)."""
    host = urlsplit(f"//{url}").hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def slots_that_fit(wanted: int, slot_bytes: int, shm_dir: str = SHM_DIR) -> int:
    """``wanted``, or fewer so that the region takes at most half of the free space in ``shm_dir``."""
    try:
        stats = os.statvfs(shm_dir)
    except OSError:
        return 0
    free = stats.f_bavail * stats.f_frsize
    return max(0, min(wanted, free // 2 // slot_bytes))


class SharedTensors:
    """The region, its slots and its registration with Triton. Owned by the gateway process."""

    def __init__(self, slots: int, pixels: int, timeout: float) -> None:
        self.pixels = pixels
        self.timeout = timeout
        self.key = f"depth-gateway-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.region = self.key
        size = slot_bytes(pixels)
        self.byte_size = slots * size
        self.handle = triton_shm.create_shared_memory_region(self.region, self.key, self.byte_size, create_only=True)
        try:
            _allocate(self.key, self.byte_size)
        except OSError:
            self.destroy()
            raise
        self.slots = [
            Slot(
                self.key,
                self.region,
                index,
                index * size,
                index * size + _aligned(pixels * INPUT_BYTES_PER_PIXEL),
            )
            for index in range(slots)
        ]
        self._free: asyncio.Queue[Slot] = asyncio.Queue()
        for slot in self.slots:
            self._free.put_nowait(slot)
        self._unanswered: set[Slot] = set()
        self._registering: asyncio.Lock | None = None

    def fits(self, pixels: int) -> bool:
        return pixels <= self.pixels

    async def acquire(self) -> Slot:
        return await self._free.get()

    def hold_back(self, slot: Slot) -> None:
        """An inference into ``slot`` ended without Triton's answer: Triton may still write into it."""
        self._unanswered.add(slot)

    def release(self, slot: Slot) -> None:
        """Back to the free slots; after the Triton timeout when it was held back."""
        if slot in self._unanswered:
            self._unanswered.discard(slot)
            asyncio.get_running_loop().call_later(self.timeout, self._free.put_nowait, slot)
        else:
            self._free.put_nowait(slot)

    async def register(self, client: grpcaio.InferenceServerClient) -> None:
        """Register the region with Triton, unless it already is (one registration however many callers)."""
        if self._registering is None:
            self._registering = asyncio.Lock()
        async with self._registering:
            status = await client.get_system_shared_memory_status(client_timeout=self.timeout)
            if self.region in status.regions:
                return
            await client.register_system_shared_memory(
                self.region, f"/{self.key}", self.byte_size, client_timeout=self.timeout
            )
            log.info(
                "shared memory region %s registered with Triton: %d slots of up to %d pixels",
                self.region,
                len(self.slots),
                self.pixels,
            )

    def close(self, url: str) -> None:
        """At exit: unregister from Triton (when it still runs) and unlink the region."""
        try:
            client = grpcsync.InferenceServerClient(url)
            client.unregister_system_shared_memory(self.region, client_timeout=5)
            client.close()
        except InferenceServerException:
            pass  # Triton already gone: nothing of ours left in it
        self.destroy()

    def destroy(self) -> None:
        """Unlink the region (Triton keeps its own mapping until unregistered or stopped)."""
        handle, self.handle = self.handle, None
        if handle is not None:
            triton_shm.destroy_shared_memory_region(handle)


def _allocate(key: str, byte_size: int) -> None:
    """Give the region its pages now. tmpfs allocates them on first write otherwise, and a write that
    finds /dev/shm full is a SIGBUS in whichever process makes it (an image worker, or Triton); here a
    full /dev/shm is an ``OSError`` at startup instead."""
    fd = os.open(os.path.join(SHM_DIR, key), os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, byte_size)
    finally:
        os.close(fd)


def slot_bytes(pixels: int) -> int:
    """Bytes of one slot: the network input and the depth of up to ``pixels`` pixels."""
    return _aligned(pixels * INPUT_BYTES_PER_PIXEL) + _aligned(pixels * OUTPUT_BYTES_PER_PIXEL)


def _aligned(size: int, alignment: int = 64) -> int:
    return -(-size // alignment) * alignment


def is_shared_memory_error(message: str) -> bool:
    """Triton's words for a region it does not know (it restarted since the gateway registered)."""
    return "shared memory" in message.lower()

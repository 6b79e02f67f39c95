"""Shared memory between the gateway's processes: an image's slot and its parked photo. Pure (no Triton
client): the image workers import it.

When Triton runs beside the gateway, an image's tensors never travel through gRPC or the image workers'
pipes: the region (``shm_region.SharedTensors``, registered with Triton) is cut into slots, and an image
holds one from decode to render. The worker process that decodes writes the network input into its
slot (``Slot.write_input``), Triton reads it there and writes the depth into the slot's second part,
and the worker process that renders reads the depth there (``Slot.read_output``): what crosses processes
is a ``Slot``, a few numbers. A photo the outputs need is parked in its own segment (``SharedPhoto``)
between the two workers, and an image's encoded outputs in theirs (``SharedOutputs``) from the worker
that renders them to the gateway. Who may touch a slot, photo or outputs when is ``ownership``'s rule.

Sizing: a slot holds the default model's largest default bucket (3 bytes in and 4 bytes out per pixel,
3.4 MB for Depth-Anything at 518); ``slots_that_fit`` keeps the region under half of the free
``/dev/shm``. Pages are allocated up front (``allocate``), so a /dev/shm that fills up later cannot SIGBUS
a writer.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from typing import TypeVar

import numpy as np

from catalogue.size import Size

T = TypeVar("T")

SHM_DIR = "/dev/shm"
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

    def input_bytes(self, size: Size) -> int:
        return size.pixels * INPUT_BYTES_PER_PIXEL

    def output_bytes(self, size: Size) -> int:
        return size.pixels * OUTPUT_BYTES_PER_PIXEL

    def write_input(self, image: np.ndarray) -> None:
        """Copy the RGB uint8 network input ``[H, W, 3]`` into the slot."""
        view = np.ndarray(image.shape, np.uint8, buffer=_buffer(self.key), offset=self.input_offset)
        view[...] = image

    def read_output(self, size: Size) -> np.ndarray:
        """The depth ``[H, W]`` Triton wrote into the slot (a view: valid while the slot is held)."""
        return np.ndarray(size.shape, np.float32, buffer=_buffer(self.key), offset=self.output_offset)


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
        name = new_segment([np.ascontiguousarray(photo)])
        return None if name is None else cls(name, photo.shape)

    def read(self, use: Callable[[np.ndarray], T]) -> T:
        """``use(photo)`` on the parked pixels, mapped read-only for that call (no copy: the pixels count
        once in the image's working memory)."""
        size = int(np.prod(self.shape))
        fd = os.open(os.path.join(SHM_DIR, self.name), os.O_RDONLY)
        try:
            mapped = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        try:
            return use(np.ndarray(self.shape, np.uint8, buffer=mapped))
        finally:
            # ``use``'s result must not keep a view of the pixels; after an error, a traceback may (the
            # mapping then goes when it does).
            with contextlib.suppress(BufferError):
                mapped.close()

    def discard(self) -> None:
        unlink(self.name)


class SharedOutputs:
    """An image's encoded outputs (base64 text inline, or the bytes to upload), parked in one segment by
    the image worker that rendered them and read once by the gateway (all at once, or each output by the
    thread that uploads it), which then ``discard``s it.

    Sent back through multiprocessing's pool (read 64 kB at a time, each read into a fresh buffer as large
    as what remains), the 8 MB of a 3D image's PLY and GLB cost the gateway's receiving thread 10-19 ms
    (``bench.worker``), against about 3 ms read from here, in a thread (``read``); and an answer through
    ``process_pool`` is read on the event loop."""

    def __init__(self, name: str, spans: dict[str, tuple[int, int]], text: bool) -> None:
        self.name = name
        self.spans = spans  # key -> (offset, length)
        self.text = text

    @classmethod
    def park(cls, outputs: dict[str, bytes], text: bool) -> SharedOutputs | None:
        """The outputs copied into a new segment; None when /dev/shm has no room for them. ``text``: they
        are ASCII (base64) and are read back as ``str``."""
        name = new_segment(list(outputs.values()))
        if name is None:
            return None
        spans, offset = {}, 0
        for key, data in outputs.items():
            spans[key] = (offset, len(data))
            offset += len(data)
        return cls(name, spans, text)

    def read(self) -> dict[str, str | bytes]:
        """Every output, copied out of the segment: ``bytes`` read as a file (the kernel's copy, without
        the GIL); ``str`` (``text``) decoded straight from the mapped segment, its pages faulted in by
        ``mmap`` itself (``MAP_POPULATE``, without the GIL). Reading text as bytes first and decoding
        them copied it twice: 0.91 -> 0.66 ms of CPU for the 5.4 MB of base64 of all five 2D tasks
        (``bench/lane_copies.py``)."""
        if not self.text:
            return {key: self.read_one(key) for key in self.spans}
        fd = os.open(os.path.join(SHM_DIR, self.name), os.O_RDONLY)
        try:
            return self._decoded(fd)
        finally:
            os.close(fd)

    def read_one(self, key: str) -> bytes:
        """One output's bytes, read as a file (by the thread that uploads it, in url mode; the kernel's
        copy, without the GIL)."""
        at, size = self.spans[key]
        fd = os.open(os.path.join(SHM_DIR, self.name), os.O_RDONLY)
        try:
            data = os.pread(fd, size, at)
        finally:
            os.close(fd)
        if len(data) != size:
            raise OSError(f"shared outputs {self.name} are shorter than written")
        return data

    def _decoded(self, fd: int) -> dict[str, str | bytes]:
        end = max((at + size for at, size in self.spans.values()), default=0)
        if os.fstat(fd).st_size < end:  # mapped past its end, a read would raise SIGBUS
            raise OSError(f"shared outputs {self.name} are shorter than written")
        if end == 0:
            return {key: "" for key in self.spans}
        mapped = mmap.mmap(fd, end, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
        try:
            with memoryview(mapped) as view:
                return {key: str(view[at : at + size], "ascii") for key, (at, size) in self.spans.items()}
        finally:
            mapped.close()

    def discard(self) -> None:
        unlink(self.name)


def new_segment(parts: Sequence[bytes | bytearray | memoryview | np.ndarray]) -> str | None:
    """The name of a new segment holding ``parts`` one after another; None when /dev/shm has no room.

    Made with file calls: the pages are allocated first (see ``allocate``) and ``pwritev`` copies into
    them in the kernel. Through ``SharedMemory`` (map, then copy with a page fault per 4 kB; mapped again
    to unlink) parking and discarding an image's 2.8 MB of outputs cost 1.7 ms of CPU against 0.8 ms.
    It is registered with multiprocessing's resource tracker as a ``SharedMemory`` is, so a killed
    gateway leaves nothing behind.
    """
    size = sum(memoryview(part).nbytes for part in parts)
    name = f"psm_{secrets.token_hex(8)}"  # SharedMemory's own naming
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        try:
            allocate(name, max(size, 1))
        except OSError:
            os.unlink(path)
            return None
        if os.pwritev(fd, parts, 0) != size:
            os.unlink(path)
            raise OSError(f"could not write {size} bytes to {path}")
    finally:
        os.close(fd)
    resource_tracker.register(f"/{name}", "shared_memory")
    return name


def unlink(name: str) -> None:
    """Remove segment ``name`` (gone already: nothing to do)."""
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        return
    resource_tracker.unregister(f"/{name}", "shared_memory")


_attached: dict[str, shared_memory.SharedMemory] = {}


def _buffer(key: str) -> memoryview:
    """The region mapped into this process, once per process."""
    if key not in _attached:
        _attached[key] = shared_memory.SharedMemory(key)
    return _attached[key].buf


def slots_that_fit(wanted: int, slot_bytes: int, shm_dir: str = SHM_DIR) -> int:
    """``wanted``, or fewer so that the region takes at most half of the free space in ``shm_dir``."""
    try:
        stats = os.statvfs(shm_dir)
    except OSError:
        return 0
    free = stats.f_bavail * stats.f_frsize
    return max(0, min(wanted, free // 2 // slot_bytes))


def allocate(key: str, byte_size: int) -> None:
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
    return aligned(pixels * INPUT_BYTES_PER_PIXEL) + aligned(pixels * OUTPUT_BYTES_PER_PIXEL)


def aligned(size: int, alignment: int = 64) -> int:
    return -(-size // alignment) * alignment

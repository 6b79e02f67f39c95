"""The worker's memory, in three budgets that every image draws on before it spends any.

- ``inputs``: the encoded image bytes, from before the download (``MAX_DOWNLOAD_BYTES`` is reserved,
  then cut to what arrived) until the decode is done. Waits when full.
- ``work``: what an image costs from decode to render in the gateway, its worker process and /dev/shm
  (decoded photo, network tensors, the full-size maps and 3D arrays of its tasks), estimated from its
  header (``budget.estimated_work_bytes``) and given back with its other holdings, when no process
  works on it any more. Waits when full.
- ``outputs``: the encoded outputs held until the job is answered (inline, or uploaded). Never waits:
  an image whose outputs do not fit fails with a clear error.

No deadlock: an image waits for ``inputs`` holding nothing, for ``work`` holding only its inputs, and
never waits while holding ``work`` or ``outputs``; holders of ``work`` always run to completion. An
image that needs more than a whole budget fails at once. With these, the memory a worker can reach is
its start-up size plus the three budgets (plus what the allocator keeps per image-worker process),
whatever the jobs: README, "Reliability".
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from gateway.errors import ImageError


class MemoryBudget:
    """Bytes that images reserve and give back; FIFO among waiters. Use from one event loop."""

    def __init__(self, name: str, capacity: int, setting: str) -> None:
        self.name = name
        self.capacity = capacity
        self.setting = setting
        self.free = capacity
        self._waiters: list[tuple[int, asyncio.Future]] = []

    def _too_large(self, size: int) -> ImageError:
        return ImageError(
            f"this image needs about {size / 1e6:.0f} MB of {self.name}, more than the worker's "
            f"{self.capacity / 1e6:.0f} MB ({self.setting}); send a smaller image or fewer tasks"
        )

    async def acquire(self, size: int) -> None:
        """Wait until ``size`` bytes are free, then take them."""
        if size > self.capacity:
            raise self._too_large(size)
        if not self._waiters and size <= self.free:
            self.free -= size
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((size, waiter))
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():  # granted as it was cancelled: give it back
                self.release(size)
            elif (size, waiter) in self._waiters:
                self._waiters.remove((size, waiter))
                self._wake()
            raise

    def try_acquire(self, size: int) -> None:
        """Take ``size`` bytes now, or raise ImageError."""
        if size > self.capacity:
            raise self._too_large(size)
        if size > self.free:
            raise ImageError(f"the worker holds too much {self.name} right now; try again shortly")
        self.free -= size

    def release(self, size: int) -> None:
        self.free += size
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._waiters[0][0] <= self.free:
            size, waiter = self._waiters.pop(0)
            if waiter.done():
                continue
            self.free -= size
            waiter.set_result(None)

    @contextlib.asynccontextmanager
    async def reserved(self, size: int) -> AsyncIterator[Reservation]:
        """``size`` bytes for the block; the block may cut the reservation down (``Reservation.resize``)."""
        await self.acquire(size)
        reservation = Reservation(self, size)
        try:
            yield reservation
        finally:
            self.release(reservation.size)


class Reservation:
    def __init__(self, budget: MemoryBudget, size: int) -> None:
        self.budget = budget
        self.size = size

    def resize(self, size: int) -> None:
        """Keep only ``size`` bytes (no more than reserved: growing would have to wait)."""
        size = min(size, self.size)
        self.budget.release(self.size - size)
        self.size = size


class WorkerMemory:
    def __init__(self, inputs: int, work: int, outputs: int) -> None:
        self.inputs = MemoryBudget("memory for encoded images", inputs, "INPUT_MEMORY_BYTES")
        self.work = MemoryBudget("working memory", work, "WORK_MEMORY_BYTES")
        self.outputs = MemoryBudget("memory for outputs", outputs, "OUTPUT_MEMORY_BYTES")

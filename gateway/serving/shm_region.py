"""The shared-memory region registered with Triton (system shared memory), cut into ``Slot``s.

Used when Triton's gRPC address is on this host (``is_local``) and Triton can map the region. The region
is registered at startup, and again whenever Triton answers that it does not know it (a restart,
``is_shared_memory_error``); it is unregistered and unlinked on exit, and Python's resource tracker
unlinks it if the gateway is killed. A slot whose inference ended without Triton's answer (deadline,
cancellation) is kept out of use for the Triton timeout (``hold_back``), so that a late write cannot
land in another image's slot. Under ``MIN_SLOTS`` slots, shared memory is off.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from urllib.parse import urlsplit

import tritonclient.grpc as grpcsync
import tritonclient.grpc.aio as grpcaio
import tritonclient.utils.shared_memory as triton_shm
from tritonclient.utils import InferenceServerException

from gateway.serving.shared_memory import INPUT_BYTES_PER_PIXEL, Slot, aligned, allocate, slot_bytes

log = logging.getLogger("gateway")

MIN_SLOTS = 4


def is_local(url: str) -> bool:
    """Whether Triton's gRPC address is on this host (only then can it share ``/dev/shm``)."""
    host = urlsplit(f"//{url}").hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


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
            allocate(self.key, self.byte_size)
        except OSError:
            self.destroy()
            raise
        self.slots = [
            Slot(
                self.key,
                self.region,
                index,
                index * size,
                index * size + aligned(pixels * INPUT_BYTES_PER_PIXEL),
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


def is_shared_memory_error(message: str) -> bool:
    """Triton's words for a region it does not know (it restarted since the gateway registered)."""
    return "shared memory" in message.lower()

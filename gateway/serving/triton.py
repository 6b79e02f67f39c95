"""The gateway's inference over async gRPC: one request per image (or video frame), with its deadline,
retries and batch cap, in gRPC payloads or Triton's shared memory. Model discovery and lifetime are
``model_lifetime``'s; ``TritonModels`` is both.

Every call carries a deadline, and Triton is told the rest of it (a request's ``timeout``: Triton's queue
policy drops a request that waited past it instead of running it for nobody); only transient faults
(server unavailable, queue full) are retried, with backoff (``triton_errors``). A network size whose
``batch_caps`` is below the model's full batch has at most that many requests at Triton, so that its
dynamic batcher never forms a larger batch. Errors raised here carry short, safe messages.

Tensors travel in gRPC payloads (``infer``) or, when Triton is on this host, through system shared
memory (``use_shared_memory``, ``infer_in_slot``; see ``shared_memory``): a region Triton no longer
knows (it restarted) is registered again and the request retried, like a model it no longer has loaded.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import time

import numpy as np
import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from catalogue.size import Size
from gateway.errors import ImageError
from gateway.served_model import ServedModel
from gateway.serving.model_lifetime import ModelLifetime
from gateway.serving.model_names import ModelUnavailable
from gateway.serving.shared_memory import Slot, slot_bytes, slots_that_fit
from gateway.serving.shm_region import MIN_SLOTS, SharedTensors, is_local, is_shared_memory_error
from gateway.serving.triton_errors import TRANSIENT, describe, model_missing

log = logging.getLogger("gateway")


class InferenceTimeout(ImageError):
    """No answer from Triton within the deadline (it may still run the request)."""


class TritonModels(ModelLifetime):
    """The models' lifetime and their inference, over one async gRPC client. Use from one event loop at a
    time."""

    def __init__(self, url: str, max_loaded: int, timeout: float, retries: int) -> None:
        super().__init__(url, max_loaded, timeout)
        self.retries = retries
        self._in_flight: dict[tuple[str, int], asyncio.Semaphore] = {}  # (model, network size) -> its batch cap
        self.shared: SharedTensors | None = None

    def _new_client(self) -> None:
        super()._new_client()
        self._in_flight = {}  # semaphores belong to the loop the client was made for

    async def infer(self, model: ServedModel, image: np.ndarray) -> np.ndarray:
        """Depth ``[H, W]`` for one RGB uint8 ``[H, W, 3]`` image already at a bucket shape."""
        height, width = image.shape[:2]
        tensor = InferInput("image", [1, height, width, 3], "UINT8")
        tensor.set_data_from_numpy(np.ascontiguousarray(image[None]))
        result = await self._infer(model, tensor, InferRequestedOutput("depth"), None)
        return result.as_numpy("depth")[0]

    async def infer_in_slot(self, model: ServedModel, slot: Slot, size: Size) -> None:
        """The same for an image already in ``slot``; Triton writes the depth into the slot. Without
        Triton's answer (deadline, cancellation) the slot is held back when released."""
        assert self.shared is not None
        tensor = InferInput("image", [1, *size.shape, 3], "UINT8")
        tensor.set_shared_memory(slot.region, slot.input_bytes(size), slot.input_offset)
        output = InferRequestedOutput("depth")
        output.set_shared_memory(slot.region, slot.output_bytes(size), slot.output_offset)
        try:
            await self._infer(model, tensor, output, slot)
        except InferenceTimeout:
            self.shared.hold_back(slot)
            raise
        except ImageError:  # Triton answered, with an error
            raise
        except BaseException:  # cancelled, or failed before Triton answered
            self.shared.hold_back(slot)
            raise

    async def _infer(
        self, model: ServedModel, tensor: InferInput, output: InferRequestedOutput, slot: Slot | None
    ) -> grpcaio.InferResult:
        deadline = time.monotonic() + self.timeout
        _batch, height, width, _channels = tensor.shape()
        with self.using(model.name):
            async with self._within_batch_cap(model, Size(width, height)):
                return await self._infer_with_retries(model, tensor, output, slot, deadline)

    def _within_batch_cap(self, model: ServedModel, bucket: Size) -> contextlib.AbstractAsyncContextManager:
        """At most the model's batch cap of requests of this network size at Triton, so that its dynamic
        batcher never forms a batch larger than the size's activation budget (``batch_caps`` in the
        config); no limit for a size without a cap."""
        size = model.size_of(bucket)
        cap = model.batch_cap(size)
        if cap is None:
            return contextlib.nullcontext()
        key = (model.name, size)
        if key not in self._in_flight:
            self._in_flight[key] = asyncio.Semaphore(cap)
        return self._in_flight[key]

    async def _infer_with_retries(
        self, model: ServedModel, tensor: InferInput, output: InferRequestedOutput, slot: Slot | None, deadline: float
    ) -> grpcaio.InferResult:
        for attempt in range(self.retries + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                return await self.client.infer(
                    model.name, [tensor], outputs=[output], timeout=int(remaining * 1e6), client_timeout=remaining
                )
            except InferenceServerException as error:
                status, message = error.status() or "", error.message() or ""
                if "DEADLINE_EXCEEDED" in status:
                    break
                if slot is not None and is_shared_memory_error(message) and attempt < self.retries:
                    await self._register_quietly()  # Triton restarted: it no longer knows the region
                    continue
                if "NOT_FOUND" in status or model_missing(message):
                    self.loaded.pop(model.name, None)  # Triton lost it (restart): load again, then retry
                    if attempt < self.retries:
                        await self._reload_quietly(model.name)
                        continue
                if status not in TRANSIENT or attempt == self.retries:
                    raise ImageError(describe(status, message)) from None
                await asyncio.sleep(min(0.2 * 2**attempt, max(deadline - time.monotonic(), 0)))
        raise InferenceTimeout(f"depth inference timed out after {self.timeout:g} s")

    async def use_shared_memory(self, pixels: int, wanted_slots: int) -> bool:
        """Tensors of up to ``pixels`` through shared memory from now on, when Triton is on this host
        and can map the region (registered now, and again after a Triton restart)."""
        if not is_local(self.url):
            return False
        slots = slots_that_fit(wanted_slots, slot_bytes(pixels))
        if slots < MIN_SLOTS:
            log.warning("shared memory off: /dev/shm has room for %d slots of %d pixels", slots, pixels)
            return False
        try:
            shared = SharedTensors(slots, pixels, self.timeout)
        except OSError as error:  # /dev/shm filled up since it was measured
            log.warning("shared memory off: could not allocate %d slots (%s)", slots, error.strerror)
            return False
        try:
            await shared.register(self.client)
        except InferenceServerException as error:  # e.g. Triton in another container, with its own /dev/shm
            shared.destroy()
            log.warning("shared memory off: Triton could not map it (%s)", error.message())
            return False
        atexit.register(shared.close, self.url)
        self.shared = shared
        return True

    async def _register_quietly(self) -> None:
        assert self.shared is not None
        try:
            await self.shared.register(self.client)
        except InferenceServerException:
            await asyncio.sleep(0.2)

    async def _reload_quietly(self, name: str) -> None:
        try:
            await self.ensure_loaded(name)
        except ModelUnavailable:
            await asyncio.sleep(0.2)

"""The gateway's side of Triton: model discovery, model lifetime and inference over async gRPC.

What is served is learned from Triton: the repository index says which model names exist, and a loaded
model's config ``parameters`` (written by the exporter) give its HF id, kind, max depth, precision,
buckets per network size, resample filter and licence; its resolved ``instance_group`` says whether it
runs on a GPU. The only table used is the model table's HF id -> Triton name rule (``model_names``), so a
request's text never becomes a model name; Triton's errors are read by ``triton_errors``.

Models load on first use (Triton in explicit model-control mode); beyond ``max_loaded`` the least
recently used one that no job is using (``using``: from the job's choice of model to its answer, not
only during inference) is unloaded. The repository index is cached for ``INDEX_TTL`` seconds (asked
again at once when a name is missing), so a job costs no index RPC. Every call carries a deadline, and
Triton is told the rest of it (a request's ``timeout``: Triton's queue policy drops a request that waited
past it instead of running it for nobody); only transient faults (server unavailable, queue full) are
retried, with backoff. Errors raised here carry short, safe messages.

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
from collections import OrderedDict, defaultdict
from collections.abc import Iterator

import numpy as np
import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from catalogue.models import MODELS
from gateway.errors import ImageError, quoted
from gateway.served_model import ServedModel
from gateway.serving.model_names import DTYPE_PRECISION, MODEL_CHOICES, ModelUnavailable, variant_name
from gateway.serving.shared_memory import Slot, slot_bytes, slots_that_fit
from gateway.serving.shm_region import MIN_SLOTS, SharedTensors, is_local, is_shared_memory_error
from gateway.serving.triton_errors import TRANSIENT, describe, model_missing

log = logging.getLogger("gateway")

LOAD_TIMEOUT = 900.0  # a load runs the warm-up of every bucket (and may build TensorRT engines)
INDEX_TTL = 30.0  # seconds the repository index is trusted


class InferenceTimeout(ImageError):
    """No answer from Triton within the deadline (it may still run the request)."""


class TritonModels:
    """Async gRPC client, model catalogue and LRU model lifetime. Use from one event loop at a time."""

    def __init__(self, url: str, max_loaded: int, timeout: float, retries: int) -> None:
        self.url = url
        self.max_loaded = max_loaded
        self.timeout = timeout
        self.retries = retries
        self.loaded: OrderedDict[str, ServedModel] = OrderedDict()
        self.in_use: defaultdict[str, int] = defaultdict(int)  # jobs that chose each model and are not answered
        self._index: tuple[float, set[str]] | None = None  # (when asked, names)
        self.gpu: bool | None = None
        self._client: grpcaio.InferenceServerClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._in_flight: dict[tuple[str, int], asyncio.Semaphore] = {}  # (model, network size) -> its batch cap
        self.shared: SharedTensors | None = None

    @property
    def client(self) -> grpcaio.InferenceServerClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client = grpcaio.InferenceServerClient(self.url)
            self._client_loop = loop
            self._lock = asyncio.Lock()
            self._in_flight = {}
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def served_names(self, fresh: bool = False) -> set[str]:
        """The model names in Triton's repository (cached for ``INDEX_TTL`` unless ``fresh``)."""
        if not fresh and self._index is not None and time.monotonic() - self._index[0] < INDEX_TTL:
            return self._index[1]
        try:
            index = await self.client.get_model_repository_index(client_timeout=self.timeout)
        except InferenceServerException:
            raise ModelUnavailable("the inference server is unavailable right now; try again shortly") from None
        names = {model.name for model in index.models}
        self._index = (time.monotonic(), names)
        return names

    async def served_dtypes(self, hf_id: str) -> list[str]:
        """The dtypes ``hf_id`` is served at (the index asked again when the cached one has none)."""
        if hf_id not in MODELS:
            raise ModelUnavailable(f"unknown model {quoted(hf_id)}; {MODEL_CHOICES}")
        for fresh in (False, True):
            names = await self.served_names(fresh)
            served = [d for d in DTYPE_PRECISION if variant_name(hf_id, d) in names]
            if served:
                return served
        available = sorted(m for m in MODELS if any(variant_name(m, d) in names for d in DTYPE_PRECISION))
        raise ModelUnavailable(f"model {hf_id} is not served here; served models: {', '.join(available)}")

    async def resolve(self, hf_id: str, dtype: str | None) -> tuple[str, str]:
        """(Triton name, dtype) serving ``hf_id`` at ``dtype`` (default: float16 on GPU, float32 on CPU)."""
        served = await self.served_dtypes(hf_id)
        if dtype is None:
            preferred = "float16" if self.gpu else "float32"
            dtype = preferred if preferred in served else served[0]
        elif dtype not in served:
            raise ModelUnavailable(f"dtype {dtype} is not served for {hf_id}; served dtypes: {', '.join(served)}")
        return variant_name(hf_id, dtype), dtype

    async def preload(self, hf_id: str) -> ServedModel:
        """Load the variant a request without ``dtype`` gets. Before any model is loaded it is not known
        whether Triton runs them on a GPU: the float16 variant is loaded first to learn it, and exchanged
        for float32 when it runs on the CPU and float32 is served."""
        served = await self.served_dtypes(hf_id)
        if self.gpu is None and "float16" in served:
            model = await self.ensure_loaded(variant_name(hf_id, "float16"))
            if model.on_gpu or "float32" not in served:
                return model
            await self.unload(model.name)
        name, _dtype = await self.resolve(hf_id, None)
        return await self.ensure_loaded(name)

    @contextlib.contextmanager
    def using(self, name: str) -> Iterator[None]:
        """A job that chose model ``name``: it is not unloaded until the job is answered."""
        self.in_use[name] += 1
        try:
            yield
        finally:
            self.in_use[name] -= 1

    async def unload(self, name: str) -> None:
        self.loaded.pop(name, None)
        with contextlib.suppress(InferenceServerException):  # already gone, e.g. Triton restarted
            await self.client.unload_model(name, client_timeout=self.timeout)

    async def ensure_loaded(self, name: str) -> ServedModel:
        """Load ``name`` if needed (evicting the least recently used idle model) and return its metadata."""
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return self.loaded[name]
        _ = self.client
        assert self._lock is not None
        async with self._lock:
            if name not in self.loaded:
                await self._evict_for_one_more()
                try:
                    await self.client.load_model(name, client_timeout=max(self.timeout, LOAD_TIMEOUT))
                    response = await self.client.get_model_config(name, client_timeout=self.timeout)
                except InferenceServerException:
                    raise ModelUnavailable(f"model {name} could not be loaded; try again shortly") from None
                model = ServedModel.from_config(response.config)
                self.loaded[name] = model
                self.gpu = model.on_gpu
            self.loaded.move_to_end(name)
            return self.loaded[name]

    async def _evict_for_one_more(self) -> None:
        for victim in list(self.loaded):
            if len(self.loaded) < self.max_loaded:
                return
            if self.in_use[victim] == 0:
                await self.unload(victim)

    async def infer(self, model: ServedModel, image: np.ndarray) -> np.ndarray:
        """Depth ``[H, W]`` for one RGB uint8 ``[H, W, 3]`` image already at a bucket shape."""
        height, width = image.shape[:2]
        tensor = InferInput("image", [1, height, width, 3], "UINT8")
        tensor.set_data_from_numpy(np.ascontiguousarray(image[None]))
        result = await self._infer(model, tensor, InferRequestedOutput("depth"), None)
        return result.as_numpy("depth")[0]

    async def infer_in_slot(self, model: ServedModel, slot: Slot, height: int, width: int) -> None:
        """The same for an image already in ``slot``; Triton writes the depth into the slot. Without
        Triton's answer (deadline, cancellation) the slot is held back when released."""
        assert self.shared is not None
        tensor = InferInput("image", [1, height, width, 3], "UINT8")
        tensor.set_shared_memory(slot.region, slot.input_bytes(height, width), slot.input_offset)
        output = InferRequestedOutput("depth")
        output.set_shared_memory(slot.region, slot.output_bytes(height, width), slot.output_offset)
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
            async with self._within_batch_cap(model, height, width):
                return await self._infer_with_retries(model, tensor, output, slot, deadline)

    def _within_batch_cap(self, model: ServedModel, height: int, width: int) -> contextlib.AbstractAsyncContextManager:
        """At most the model's batch cap of requests of this network size at Triton, so that its dynamic
        batcher never forms a batch larger than the size's activation budget (``batch_caps`` in the
        config); no limit for a size without a cap."""
        size = model.size_of(height, width)
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

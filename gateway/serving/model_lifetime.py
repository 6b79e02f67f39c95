"""Which models Triton serves and which are loaded: model discovery and lifetime over async gRPC.

What is served is learned from Triton: the repository index says which model names exist, and a loaded
model's config ``parameters`` (written by the exporter) give its HF id, kind, max depth, precision,
buckets per network size, resample filter, licence and batch caps; its resolved ``instance_group`` says
whether it runs on a GPU. The only table used is the model table's HF id -> Triton name rule
(``model_names``), so a request's text never becomes a model name.

Models load on first use (Triton in explicit model-control mode); beyond ``max_loaded`` the least
recently used one that no job is using (``using``: from the job's choice of model to its answer, not
only during inference) is unloaded. The repository index is cached for ``INDEX_TTL`` seconds (asked
again at once when a name is missing), so a job costs no index RPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, defaultdict
from collections.abc import Iterator

import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from catalogue.models import MODELS
from gateway.errors import quoted
from gateway.served_model import ServedModel
from gateway.serving.model_names import DTYPE_PRECISION, MODEL_CHOICES, ModelUnavailable, variant_name

LOAD_TIMEOUT = 900.0  # a load runs the warm-up of every bucket (and may build TensorRT engines)
INDEX_TTL = 30.0  # seconds the repository index is trusted


class ModelLifetime:
    """Async gRPC client, model catalogue and LRU model lifetime. Use from one event loop at a time."""

    def __init__(self, url: str, max_loaded: int, timeout: float) -> None:
        self.url = url
        self.max_loaded = max_loaded
        self.timeout = timeout
        self.loaded: OrderedDict[str, ServedModel] = OrderedDict()
        self.in_use: defaultdict[str, int] = defaultdict(int)  # jobs that chose each model and are not answered
        self._index: tuple[float, set[str]] | None = None  # (when asked, names)
        self.gpu: bool | None = None
        self._client: grpcaio.InferenceServerClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None

    @property
    def client(self) -> grpcaio.InferenceServerClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client = grpcaio.InferenceServerClient(self.url)
            self._client_loop = loop
            self._new_client()
        return self._client

    def _new_client(self) -> None:
        """A client was made for a new event loop: what belongs to the old loop is made again."""
        self._lock = asyncio.Lock()

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

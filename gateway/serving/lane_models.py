"""A lane's models: inference as ``TritonModels`` does it, loading and unloading left to the intake.

Several lanes share one Triton, so only the intake loads and unloads models (its ``ModelLifetime``
evicts the least recently used model that no lane is using). A lane asks it for a model it has not got
(``("load", ...)``, answered with the model's ``ServedModel`` or an error), tells it when a model becomes
busy or idle in this lane (the first job using it begins, the last one ends), and drops a model from
its own table when the intake says it was unloaded. A model Triton lost (it restarted) is asked for
again with ``missing``, so that the intake loads it even though its table still lists it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Iterator

from gateway.served_model import ServedModel
from gateway.serving.lane_link import Link
from gateway.serving.model_names import ModelUnavailable
from gateway.serving.triton import TritonModels


class LaneModels(TritonModels):
    """``TritonModels`` whose loads go through the intake over ``link``. Use from the lane's event loop."""

    def __init__(self, url: str, max_loaded: int, timeout: float, retries: int, link: Link) -> None:
        super().__init__(url, max_loaded, timeout, retries)
        self.link = link
        self._requests = itertools.count()
        self._answers: dict[int, asyncio.Future[ServedModel | str]] = {}

    async def _ask(self, *message: object) -> ServedModel:
        request = next(self._requests)
        answer = self._answers[request] = asyncio.get_running_loop().create_future()
        self.link.send(message[0], request, *message[1:])
        try:
            model = await answer
        finally:
            self._answers.pop(request, None)
        if isinstance(model, str):
            raise ModelUnavailable(model)
        self.loaded[model.name] = model
        self.gpu = model.on_gpu
        return model

    def answered(self, request: int, model: ServedModel | str) -> None:
        """The intake's answer to a load or preload request."""
        future = self._answers.get(request)
        if future is not None and not future.done():
            future.set_result(model)

    def unloaded(self, name: str) -> None:
        """The intake unloaded ``name``: the next job that wants it asks for it again."""
        self.loaded.pop(name, None)

    def lost(self) -> None:
        """The intake has gone: requests waiting for it fail."""
        for future in self._answers.values():
            if not future.done():
                future.set_result("the worker is shutting down")

    async def preload(self, hf_id: str) -> ServedModel:
        return await self._ask("preload", hf_id)

    async def ensure_loaded(self, name: str) -> ServedModel:
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return self.loaded[name]
        return await self._ask("load", name, False)

    async def _reload_quietly(self, name: str) -> None:
        """Triton lost ``name``: the intake loads it again even though its table still lists it."""
        try:
            await self._ask("load", name, True)
        except ModelUnavailable:
            await asyncio.sleep(0.2)

    async def unload(self, name: str) -> None:
        self.unloaded(name)  # Triton is the intake's to change

    @contextlib.contextmanager
    def using(self, name: str) -> Iterator[None]:
        if self.in_use[name] == 0:
            self.link.send("busy", name)
        self.in_use[name] += 1
        try:
            yield
        finally:
            self.in_use[name] -= 1
            if self.in_use[name] == 0:
                self.link.send("idle", name)

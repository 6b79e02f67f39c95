"""Model lifetime against a real tritonserver of its own: a model a job is using is never unloaded for
another (only idle ones are), the repository index is asked once per ``INDEX_TTL`` and again when a
name is missing, and start-up ends with the variant requests will get loaded (on this CPU: float32),
float16 having been loaded only to learn where Triton runs the models."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.serving.triton import TritonModels
from gateway.serving.triton_process import EmbeddedTriton
from tests.conftest import DPT_ID, METRIC_ID, RELATIVE_ID, SMALL
from tests.test_supervisor import model_states

METRIC = "depth_anything_v2_metric_indoor_large"
DPT = "dpt_large"


@pytest.fixture(scope="module")
def own_triton(serving_repository: Path) -> Iterator[EmbeddedTriton]:
    server = EmbeddedTriton(serving_repository, start_timeout=120).start()
    yield server
    server.stop()


def ready(server: EmbeddedTriton) -> set[str]:
    return {name for name, state in model_states(server).items() if state == "READY"}


def test_a_model_in_use_by_a_job_is_not_unloaded_for_another(own_triton: EmbeddedTriton) -> None:
    async def run() -> None:
        models = TritonModels(own_triton.grpc_url, max_loaded=1, timeout=30, retries=1)
        try:
            await models.ensure_loaded(SMALL)
            with models.using(SMALL):  # a job chose it and still downloads or decodes its images
                await models.ensure_loaded(METRIC)
                assert ready(own_triton) >= {SMALL, METRIC}
                assert list(models.loaded) == [SMALL, METRIC]
            await models.ensure_loaded(DPT)  # both are idle now: the least recently used go
            assert list(models.loaded) == [DPT]
            assert ready(own_triton) & {SMALL, METRIC, DPT} == {DPT}
        finally:
            await models.close()

    asyncio.run(run())


def test_the_repository_index_is_asked_once_per_ttl_and_again_for_a_missing_name(
    own_triton: EmbeddedTriton,
) -> None:
    async def run() -> tuple[int, int]:
        models = TritonModels(own_triton.grpc_url, max_loaded=2, timeout=30, retries=1)
        calls = 0
        index = models.client.get_model_repository_index

        async def counted(*args, **kwargs):
            nonlocal calls
            calls += 1
            return await index(*args, **kwargs)

        models.client.get_model_repository_index = counted  # type: ignore[method-assign]
        try:
            for _ in range(50):
                for model_id in (RELATIVE_ID, METRIC_ID, DPT_ID):
                    await models.resolve(model_id, None)
            per_jobs = calls
            models._index = (models._index[0], set())  # a model added since the index was cached
            assert await models.resolve(RELATIVE_ID, "float32") == (f"{SMALL}_fp32", "float32")
            return per_jobs, calls
        finally:
            await models.close()

    per_jobs, total = asyncio.run(run())
    assert per_jobs == 1  # 150 jobs' model choices, one index RPC
    assert total == 2


def test_startup_loads_the_variant_requests_get(own_triton: EmbeddedTriton) -> None:
    async def run() -> tuple[str, list[str], bool | None]:
        models = TritonModels(own_triton.grpc_url, max_loaded=2, timeout=30, retries=1)
        try:
            for name in list(ready(own_triton)):
                await models.unload(name)
            model = await models.preload(RELATIVE_ID)
            return model.name, list(models.loaded), models.gpu
        finally:
            await models.close()

    name, loaded, gpu = asyncio.run(run())
    assert gpu is False  # learned from the float16 variant's instance group
    assert name == f"{SMALL}_fp32"
    assert loaded == [name]
    assert ready(own_triton) == {name}  # float16 was unloaded again: on a CPU requests get float32

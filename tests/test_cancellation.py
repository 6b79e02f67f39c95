"""Jobs cancelled at every stage of an image (download, header, decode, inference, render, upload), by
content: the gateway's real ``DepthService`` in this process, its real image-worker processes and shared
memory, the session's real tritonserver, a loopback image server and a real SeaweedFS bucket.

One shared-memory slot serves every image, so an image that is cancelled while a worker process still
writes its slot and one that takes the slot next meet; each served depth must equal the depth of its own
pixels (measured alone beforehand), every slot must come back and no parked photo may stay in /dev/shm.
A stand-in for a busy Triton queue delays every inference by ``QUEUE_DELAY``: without the ownership rule,
the cancelled image's late decode lands in the slot while the next image waits for Triton.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import io
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bench.seaweed import ADMIN, Weed
from gateway import storage
from gateway.inputs.fetch import AddressPolicy, Fetcher
from gateway.service import DepthService
from gateway.serving.shared_memory import SHM_DIR
from gateway.serving.shm_region import SharedTensors
from gateway.serving.triton import TritonModels
from gateway.settings import Settings
from tests import images
from tests.conftest import RELATIVE_ID
from tests.helpers import decode_npz
from tests.servers import ImageServer
from tests.test_robustness import b64

QUEUE_DELAY = 0.3  # seconds every inference waits, as behind a busy Triton queue
HOLD_BACK = 2.0  # TRITON_TIMEOUT here: how long a slot whose inference got no answer stays out of use
STAGES = ("download", "header", "decode", "inference", "render", "upload")


class Victim:
    """The job to cancel, the stage to cancel it at, and whether it got there."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.task = asyncio.current_task()
        self.reached = asyncio.Event()


VICTIM: contextvars.ContextVar[Victim | None] = contextvars.ContextVar("victim", default=None)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def bystander_pixels(seed: int) -> np.ndarray:
    """Photos that differ from each other everywhere (a flat level plus a seed's own pattern)."""
    base = images.photo_like(96, 72).astype(np.int16)
    return np.clip(base // 2 + 40 * seed, 0, 255).astype(np.uint8)


NOISE = np.random.default_rng(1).integers(0, 256, (1800, 2400, 3), dtype=np.uint8)  # ~0.1 s to decode


@pytest.fixture(scope="module")
def bucket(seaweed: Weed) -> Weed:
    seaweed.client().create_bucket(Bucket="cancel-outputs")
    return seaweed


def parked_photos() -> set[str]:
    return {name for name in os.listdir(SHM_DIR) if name.startswith("psm_")}


def cancelling(stage: str, real: Callable[..., Awaitable[Any]], delay: float) -> Callable[..., Awaitable[Any]]:
    """``real``, except that in the victim's job at ``stage`` the job is cancelled once the stage is under
    way (``delay`` seconds in: a process call running, a download half read)."""

    @functools.wraps(real)
    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        victim = VICTIM.get()
        if victim is None or victim.stage != stage or victim.task is None:
            return await real(*args, **kwargs)
        inner = asyncio.ensure_future(real(*args, **kwargs))
        victim.reached.set()
        await asyncio.sleep(delay)
        victim.task.cancel()
        return await inner

    return wrapped


def instrument(service: DepthService) -> None:
    """Every stage of the service can cancel the victim's job; inferences wait as in a busy queue."""
    infer_in_slot = service.triton.infer_in_slot

    async def queued(*args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(QUEUE_DELAY)
        return await infer_in_slot(*args, **kwargs)

    service.fetcher.fetch = cancelling("download", service.fetcher.fetch, 0.2)  # type: ignore[method-assign]
    service._cpu = cancelling("header", service._cpu, 0)  # type: ignore[method-assign]
    service.workers.decode = cancelling("decode", service.workers.decode, 0.03)  # type: ignore[method-assign]
    service.triton.infer_in_slot = cancelling("inference", queued, QUEUE_DELAY + 0.01)  # type: ignore[method-assign]
    service.workers.render = cancelling("render", service.workers.render, 0)  # type: ignore[method-assign]
    service.storage.upload = cancelling("upload", service.storage.upload, 0.01)  # type: ignore[method-assign]


def victim_job(stage: str, server: ImageServer) -> dict:
    """The job cancelled at ``stage``: a slow PNG to decode, by URL (a drip) for the download stage."""
    job: dict = {"tasks": ["depth", "point_cloud"], "include_raw": True, "output_mode": "inline"}
    if stage == "download":
        return {**job, "image_url": server.url("/drip")}
    if stage == "upload":
        job["output_mode"] = "url"
    return {**job, "image_b64": b64(png(NOISE))}


async def served_depths(service: DepthService, jobs: list[dict]) -> list[np.ndarray]:
    replies = await asyncio.gather(*(service.handle(job) for job in jobs))
    depths = []
    for reply in replies:
        (result,) = reply["results"]
        assert "error" not in result, result
        depths.append(decode_npz(result["depth_npz_b64"]))
    return depths


async def cancel_at(stage: str, service: DepthService, server: ImageServer, bystanders: list[dict]) -> list:
    victims: list[Victim] = []

    async def victim() -> dict:
        victims.append(Victim(stage))
        VICTIM.set(victims[0])
        return await service.handle(victim_job(stage, server), job_id=f"victim-{stage}")

    victim_task = asyncio.create_task(victim())
    await asyncio.sleep(0)
    await asyncio.wait_for(victims[0].reached.wait(), 30)  # the victim holds the slot (from the decode on)
    others = asyncio.gather(*(service.handle(job) for job in bystanders))
    with pytest.raises(asyncio.CancelledError):
        await victim_task
    replies = await others
    return [decode_npz(reply["results"][0]["depth_npz_b64"]) for reply in replies]


def test_a_job_cancelled_at_any_stage_never_puts_its_pixels_into_another_image(
    triton, image_server: ImageServer, bucket: Weed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One upload of a job at a time: cancelled in its first upload, the victim leaves outputs that no upload
    # has read yet in their parked segment, which the job itself must then discard.
    monkeypatch.setattr(storage, "UPLOAD_THREADS", 1)
    settings = Settings(
        default_model=RELATIVE_ID,
        triton_url=triton.grpc_url,
        triton_timeout=HOLD_BACK,
        shared_memory="off",  # set up below with a single slot
        cpu_workers=2,
        bucket_endpoint_url=bucket.url,
        bucket_access_key_id=ADMIN[0],
        bucket_secret_access_key=ADMIN[1],
        bucket_name="cancel-outputs",
    )
    triton_models = TritonModels(settings.triton_url, 2, settings.triton_timeout, settings.triton_retries)
    fetcher = Fetcher(AddressPolicy(["127.0.0.1"]), 8 << 20, 10.0)
    service = DepthService(settings, triton_models, fetcher)
    photos_before = parked_photos()
    bystanders = [
        {"image_b64": b64(png(bystander_pixels(seed))), "tasks": ["depth", "points"], "include_raw": True}
        for seed in range(4)
    ]

    async def scenario() -> None:
        await service.startup()
        model = await triton_models.ensure_loaded("depth_anything_v2_small")
        shared = SharedTensors(1, max(h * w for h, w in model.buckets), HOLD_BACK)
        await shared.register(triton_models.client)
        triton_models.shared = shared
        try:
            alone = [(await served_depths(service, [job]))[0] for job in bystanders]  # references, one at a time
            instrument(service)
            for stage in STAGES:
                served = await cancel_at(stage, service, image_server, bystanders)
                for seed, (depth, reference) in enumerate(zip(served, alone, strict=True)):
                    assert np.allclose(depth, reference, rtol=1e-3, atol=1e-3), (stage, seed)
                await asyncio.sleep(HOLD_BACK + 0.2)  # a held-back slot is free again after the hold-back
                assert shared._free.qsize() == 1, stage
                assert parked_photos() == photos_before, stage
        finally:
            shared.close(triton.grpc_url)
            await fetcher.close()
            await triton_models.close()

    try:
        asyncio.run(scenario())
    finally:
        service.workers.close()

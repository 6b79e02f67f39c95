"""The worker's memory bound: the three budgets (``gateway.serving.memory``) on their own, the work
estimates against measured peaks, and the worker's peak memory
under heavy jobs (4 MP photos at ``process_res`` 1036 with 3D outputs) staying under the bound README
states: start-up size + INPUT_MEMORY_BYTES + WORK_MEMORY_BYTES + OUTPUT_MEMORY_BYTES + ALLOCATOR_KEEPS
per process (the gateway and each image worker)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data

from bench.seaweed import ADMIN, Weed
from bench.worker import children
from devstack.jobapi import JobApi
from gateway.errors import ImageError
from gateway.inputs.budget import estimated_work_bytes
from gateway.serving.memory import MemoryBudget
from gateway.serving.triton_process import EmbeddedTriton
from tests.conftest import ROOT
from tests.servers import ImageServer
from tests.test_jobloop import start_worker
from tests.test_robustness import b64

ALLOCATOR_KEEPS = 128 << 20  # per process: glibc's trim threshold as keep_freed_memory sets it
MB = 1 << 20


def test_budgets_wait_in_order_refuse_what_never_fits_and_survive_cancellation() -> None:
    async def run() -> None:
        budget = MemoryBudget("working memory", 100, "WORK_MEMORY_BYTES")
        await budget.acquire(60)
        with pytest.raises(ImageError, match=r"more than the worker's 0 MB \(WORK_MEMORY_BYTES\)"):
            await budget.acquire(101)
        order: list[str] = []

        async def take(name: str, size: int) -> None:
            await budget.acquire(size)
            order.append(name)

        big = asyncio.create_task(take("big", 50))  # waits: 40 free
        await asyncio.sleep(0)
        small = asyncio.create_task(take("small", 10))  # would fit, but waits its turn behind big
        cancelled = asyncio.create_task(take("cancelled", 30))
        await asyncio.sleep(0.01)
        assert order == []
        cancelled.cancel()
        budget.release(60)  # 100 free: big (50) then small (10)
        await asyncio.gather(big, small)
        assert order == ["big", "small"]
        assert budget.free == 40
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        with pytest.raises(ImageError, match="holds too much working memory right now"):
            budget.try_acquire(41)
        budget.try_acquire(40)
        assert budget.free == 0

    asyncio.run(run())


def test_work_estimates_grow_with_pixels_tasks_and_3d_limits() -> None:
    depth = estimated_work_bytes(4_000_000, 518 * 686, ["depth"], False, False)
    everything = estimated_work_bytes(
        4_000_000, 518 * 686, ["depth", "normals", "points", "mesh"], True, True, 5_000_000, 2_000_000
    )
    assert depth < estimated_work_bytes(8_000_000, 518 * 686, ["depth"], False, False)
    assert everything > 4 * depth


@pytest.mark.parametrize(
    ("tasks", "process_res"),
    [(["depth"], None), (["normals"], None), (["depth", "colorized", "normals", "disparity", "point_cloud", "points",
     "mesh"], None), (["depth", "point_cloud"], 1036)],
)  # fmt: skip
def test_the_work_estimate_covers_the_measured_peak_of_a_4mp_image(tasks: list[str], process_res: int | None) -> None:
    """``bench.memory``'s measurement, in a fresh process: decode and render of a 4 MP JPEG."""
    case = json.dumps([tasks, process_res])
    line = subprocess.run(
        [sys.executable, "-m", "bench.memory", "--case", case], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.splitlines()[-1]
    measured = json.loads(line)
    assert measured["peak_mb"] > 10  # it measured something
    assert measured["estimate_mb"] >= measured["peak_mb"], measured


def photo_4mp() -> bytes:
    photo = cv2.resize(data.astronaut(), (2304, 1728), interpolation=cv2.INTER_CUBIC)
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def noisy_jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def memory_of(pid: int) -> int:
    """RSS of the worker and its image-worker processes, plus what /dev/shm holds."""
    total = 0
    for process in [pid, *children(pid)]:
        try:
            for line in Path(f"/proc/{process}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    shm = os.statvfs("/dev/shm")
    return total + (shm.f_blocks - shm.f_bfree) * shm.f_frsize


class PeakMemory:
    """``memory_of(pid)`` sampled every 20 ms while the block runs; ``grown``: its peak over its start."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.started = self.peak = memory_of(pid)
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, memory_of(self.pid))
            time.sleep(0.02)

    @property
    def grown(self) -> int:
        return self.peak - self.started

    def __enter__(self) -> PeakMemory:
        self._sampler.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._sampler.join()


@pytest.fixture(scope="module")
def bucket(seaweed: Weed) -> Weed:
    seaweed.client().create_bucket(Bucket="heavy")
    return seaweed


def test_heavy_jobs_stay_under_the_stated_bound(
    triton: EmbeddedTriton, image_server: ImageServer, bucket: Weed, tmp_path: Path
) -> None:
    """Outputs go to a bucket (url mode), so only the worker's budgets limit what is admitted."""
    budgets = {"INPUT_MEMORY_BYTES": 64 * MB, "WORK_MEMORY_BYTES": 320 * MB, "OUTPUT_MEMORY_BYTES": 128 * MB}
    workers = 2
    api = JobApi().start()
    extra = {name: str(value) for name, value in budgets.items()}
    extra |= {"CPU_WORKERS": str(workers), "URL_ALLOWLIST": "127.0.0.1", "MAX_DOWNLOAD_BYTES": str(8 * MB)}
    extra |= {"BUCKET_ENDPOINT_URL": bucket.url, "BUCKET_NAME": "heavy", "UPLOAD_TIMEOUT": "60"}
    extra |= {"BUCKET_ACCESS_KEY_ID": ADMIN[0], "BUCKET_SECRET_ACCESS_KEY": ADMIN[1]}
    process = start_worker(api, triton, tmp_path / "worker.log", concurrency=4, extra=extra)
    try:
        api.wait_for([api.submit({"image_b64": b64(noisy_jpeg(0))})], timeout=120)
        urls = [image_server.add(f"mem-{n}.jpg", photo_4mp()) for n in range(16)]
        sources = [{"type": "url", "data": url} for url in urls]
        jobs = [
            {"images": sources[:10], "process_res": 1036, "tasks": ["depth", "point_cloud"]},
            {"images": sources[6:], "process_res": 1036, "tasks": ["depth", "point_cloud"]},
            {"images": sources[:8], "tasks": ["depth", "colorized", "normals", "points", "mesh"],
             "max_points": 5_000_000, "max_mesh_vertices": 2_000_000},
            {"images": sources[:8], "tasks": ["depth", "normals", "disparity"], "include_raw": True},
        ]  # fmt: skip
        jobs = [{**job, "output_mode": "url"} for job in jobs]
        with PeakMemory(process.pid) as memory:
            ids = [api.submit(job) for job in jobs]
            results = api.wait_for(ids, timeout=300)
        bound = sum(budgets.values()) + (workers + 1) * ALLOCATOR_KEEPS  # the gateway process keeps too
        assert memory.grown < bound, f"grew {memory.grown / MB:.0f} MB, bound {bound / MB:.0f} MB"
        served = 0
        for result in results.values():
            assert "output" in result, result
            for image in result["output"]["results"]:
                served += "error" not in image
        assert served >= 8  # the bound is met by admitting work in turn, not by refusing it all
    finally:
        process.kill()
        process.wait()
        api.stop()

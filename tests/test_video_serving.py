"""Video jobs end to end: runpod's production job loop (the job-API stand-in), a real tritonserver, the
image-worker processes and SeaweedFS for url mode.

The model is an instant one whose depth for every frame is ``a_k * D + b_k``, ``D`` the frame's red
channel (+1) and ``a_k``, ``b_k`` drawn at random per inference: the flicker per-frame affine
ambiguity causes, in its purest form. With ``temporal: "align"`` a still scene must come back as ``D`` up
to one affine map for the whole clip; with ``"none"`` it flickers.
"""

from __future__ import annotations

import base64
import io
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from catalogue.models import get_spec
from export.triton_config import build_config, render
from gateway.devjobs import JobApi
from gateway.serving.triton_process import EmbeddedTriton
from tests import clips
from tests.test_jobloop import start_worker
from tests.test_storage import ADMIN, Weed

SMALL = "depth-anything/Depth-Anything-V2-Small-hf"
METRIC = "depth-anything/Depth-Anything-V2-Metric-Indoor-Large-hf"
AFFINE_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.random = np.random.default_rng()

    def execute(self, requests):
        responses = []
        for request in requests:
            image = pb_utils.get_input_tensor_by_name(request, "image").as_numpy()
            scene = image[..., 0].astype(np.float32) / 255 + 1
            a = self.random.uniform(0.3, 3.0, (len(image), 1, 1)).astype(np.float32)
            b = self.random.uniform(-1.0, 1.0, (len(image), 1, 1)).astype(np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("depth", a * scene + b)]))
        return responses
"""
LIMIT_SECONDS = 3


def add_model(repository: Path, model_id: str) -> None:
    spec = get_spec(model_id)
    model_dir = repository / spec.served_name("fp16")
    (model_dir / "1").mkdir(parents=True)
    config = build_config(spec, "fp16", "python")
    del config.model_warmup[:]
    (model_dir / "config.pbtxt").write_text(render(config))
    (model_dir / "1" / "model.py").write_text(AFFINE_MODEL)


@pytest.fixture(scope="module")
def bucket(seaweed: Weed) -> Weed:
    seaweed.client().create_bucket(Bucket="videos")
    return seaweed


@pytest.fixture(scope="module")
def video_worker(tmp_path_factory: pytest.TempPathFactory, bucket: Weed) -> Iterator[tuple[JobApi, Path]]:
    root = tmp_path_factory.mktemp("video")
    repository = root / "repository"
    add_model(repository, SMALL)
    add_model(repository, METRIC)
    triton = EmbeddedTriton(repository, start_timeout=120).start()
    api = JobApi().start()
    extra = {
        "DEPTH_MODEL": SMALL,
        "URL_ALLOWLIST": "127.0.0.1",
        "BUCKET_ENDPOINT_URL": bucket.url,
        "BUCKET_NAME": "videos",
        "BUCKET_ACCESS_KEY_ID": ADMIN[0],
        "BUCKET_SECRET_ACCESS_KEY": ADMIN[1],
        "MAX_VIDEO_SECONDS": str(LIMIT_SECONDS),
        "CPU_WORKERS": "2",
    }
    log_path = root / "worker.log"
    process = start_worker(api, triton, log_path, concurrency=4, extra=extra)
    try:
        yield api, log_path
    finally:
        process.terminate()
        process.wait(timeout=60)
        api.stop()
        triton.stop()


def run(api: JobApi, job: dict, timeout: float = 180) -> dict:
    job_id = api.submit(job)
    result = api.wait_for([job_id], timeout=timeout)[job_id]
    assert "output" in result, result
    return result["output"]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def fetched(result: dict, key: str) -> bytes:
    """An output, inline or from its presigned URL."""
    if f"{key}_b64" in result:
        return base64.b64decode(result[f"{key}_b64"])
    with urllib.request.urlopen(result[f"{key}_url"], timeout=30) as response:
        return response.read()


def npz_stack(data: bytes) -> np.ndarray:
    with np.load(io.BytesIO(data)) as archive:
        return archive["depth"]


def smooth_still(count: int, width: int = 96, height: int = 72) -> list[np.ndarray]:
    """A still, smooth scene (resampling to the network and back changes it little)."""
    picture = cv2.GaussianBlur(clips.scene(width, height)[:, :width], (0, 0), 3)
    return [picture] * count


def flicker(stack: np.ndarray, low: float, high: float) -> float:
    unit = (stack.astype(np.float64) - low) / (high - low)
    return float(np.abs(np.diff(unit, axis=0)).mean())


def test_aligned_still_scene_is_one_affine_map_of_the_scene_and_does_not_flicker(video_worker) -> None:
    api, _ = video_worker
    video = b64(clips.encode(smooth_still(12), fps=6))
    results = {}
    for mode in ("align", "none"):
        job = {"video_b64": video, "tasks": ["depth"], "include_raw": True, "temporal": mode}
        output = run(api, job)
        assert output["temporal"] == mode
        (result,) = output["results"]
        results[mode] = (result, npz_stack(fetched(result, "depth_npz")))
    aligned, stack = results["align"]
    assert aligned["frames"] == 12
    assert stack.shape == (12, 72, 96)
    assert aligned["alignment"]["scale"][0] == 1.0
    assert len(set(aligned["alignment"]["scale"])) > 6
    frames, _, _ = clips.read_frames(clips.encode(smooth_still(12), fps=6))
    scene = np.stack([frame[..., 0].astype(np.float64) / 255 + 1 for frame in frames])
    design = np.stack([scene.ravel(), np.ones(scene.size)], axis=1)
    (scale, shift), *_ = np.linalg.lstsq(design, stack.ravel().astype(np.float64), rcond=None)
    residual = np.abs(stack - (scale * scene + shift))
    spread = np.ptp(stack)
    assert np.percentile(residual, 95) < 0.03 * spread  # one map for the whole clip, up to resampling
    raw = results["none"][1]
    steady = flicker(stack, aligned["depth_min"], aligned["depth_max"])
    jumpy = flicker(raw, results["none"][0]["depth_min"], results["none"][0]["depth_max"])
    assert jumpy > 20 * steady, (jumpy, steady)
    assert results["none"][0]["alignment"]["scale"] == [1.0] * 12


def test_the_outputs_round_trip_and_play_with_their_frame_count_size_and_rate(video_worker) -> None:
    api, _ = video_worker
    frames = clips.frames_of(194, 122, 15, pan=3)  # shrunk to 97x61: the colorized video is cropped to 96x60
    job = {"video_b64": b64(clips.encode(frames, fps=10)), "tasks": ["depth", "colorized"], "include_raw": True}
    job["max_size"] = 97
    output = run(api, {**job, "output_mode": "url"})
    assert output["output_mode"] == "url"
    (result,) = output["results"]
    assert {"depth_video_url", "colorized_video_url", "depth_npz_url"} <= set(result)
    assert result["depth_video_mime"] == "video/x-matroska"
    assert result["colorized_video_mime"] == "video/mp4"
    assert (result["width"], result["height"], result["frames"], result["fps"]) == (97, 61, 15, 10)
    assert result["timestamps"] == pytest.approx([k / 10 for k in range(15)], abs=1e-3)
    stack = npz_stack(fetched(result, "depth_npz"))
    depth_frames, depth_stream, times = clips.read_frames(fetched(result, "depth_video"))
    assert depth_stream.codec_context.name == "ffv1"
    assert len(depth_frames) == 15
    assert times == pytest.approx([k / 10 for k in range(15)], abs=1e-3)
    low, high = result["depth_min"], result["depth_max"]
    decoded = low + np.stack(depth_frames).astype(np.float64) / 65535 * (high - low)
    assert np.abs(decoded - stack.astype(np.float64)).max() <= (high - low) / 65535  # within one 16-bit step
    colour_frames, colour_stream, _ = clips.read_frames(fetched(result, "colorized_video"))
    assert colour_stream.codec_context.name == "h264"
    assert colour_stream.codec_context.pix_fmt == "yuv420p"
    assert len(colour_frames) == 15
    assert colour_frames[0].shape == (60, 96, 3)
    assert float(colour_stream.average_rate) == pytest.approx(10)

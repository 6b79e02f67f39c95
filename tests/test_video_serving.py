"""Video jobs end to end: runpod's production job loop (the job-API stand-in), a real tritonserver, the
image-worker processes and SeaweedFS for url mode.

The model is an instant one whose depth for every frame is ``a_k * D + b_k``, ``D`` the frame's red
channel (+1) and ``a_k``, ``b_k`` drawn at random per inference: the flicker per-frame affine
ambiguity causes, in its purest form. With ``temporal: "align"`` a still scene must come back as ``D`` up
to one affine map for the whole clip; with ``"none"`` it flickers.
"""

from __future__ import annotations

import asyncio
import base64
import io
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from bench import clips
from bench.seaweed import ADMIN, Weed
from catalogue.models import get_spec
from devstack.jobapi import JobApi
from export.triton_config import build_config, render
from gateway.inputs.fetch import AddressPolicy, Fetcher
from gateway.service import DepthService
from gateway.serving.triton import TritonModels
from gateway.serving.triton_process import EmbeddedTriton
from gateway.settings import Settings
from gateway.video_service import ENCODER_BYTES, decode_window_bytes
from tests.servers import ImageServer
from tests.test_jobloop import start_worker
from tests.test_memory import ALLOCATOR_KEEPS, MB, PeakMemory

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
MAX_FRAMES = 400


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
def video_worker(tmp_path_factory: pytest.TempPathFactory, bucket: Weed) -> Iterator[tuple[JobApi, subprocess.Popen]]:
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
        "MAX_VIDEO_FRAMES": str(MAX_FRAMES),
        "CPU_WORKERS": "2",
    }
    log_path = root / "worker.log"
    process = start_worker(api, triton, log_path, concurrency=4, extra=extra)
    try:
        yield api, process
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


# --------------------------------------------------------------------------- cancellation, in process


@pytest.mark.parametrize("shared_memory", ["off", "auto"])
def test_a_video_job_cancelled_while_decoding_or_encoding_gives_everything_back(
    triton, tmp_path: Path, shared_memory: str
) -> None:
    """The real ``DepthService`` and image workers on the session's Triton: a video job cancelled mid-clip
    and one cancelled while a worker process writes its outputs. The spool folder stays while the process
    may write it and is removed after; the memory budgets and every shared-memory slot come back whole
    (after the hold-back of an inference cancelled unanswered); the next job is served."""
    settings = Settings(
        default_model=SMALL, triton_url=triton.grpc_url, shared_memory=shared_memory, cpu_workers=1, triton_timeout=2
    )
    triton_models = TritonModels(settings.triton_url, 2, settings.triton_timeout, settings.triton_retries)
    fetcher = Fetcher(AddressPolicy(["127.0.0.1"]), 8 << 20, 10.0)
    service = DepthService(settings, triton_models, fetcher)
    video = b64(clips.encode(clips.frames_of(640, 480, 30, pan=4), fps=10))
    job = {"video_b64": video, "tasks": ["depth", "colorized"], "max_size": 640}
    folders: list[Path] = []
    encode_clip = service.workers.encode_clip

    async def encoding(encoding, holdings):
        folders.append(encoding.folder)
        return await encode_clip(encoding, holdings)

    service.workers.encode_clip = encoding  # type: ignore[method-assign]
    full = (service.memory.inputs.free, service.memory.work.free, service.memory.outputs.free)

    async def cancelled(when: Callable[[], bool]) -> None:
        task = asyncio.create_task(service.handle(job))
        while not when():
            assert not task.done(), "the job ended before the stage to cancel it at was seen"
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    async def scenario() -> None:
        await service.startup()
        try:
            await cancelled(lambda: bool(list(tempfile_root.glob("video-*/depth.f16"))))  # mid-clip
            await cancelled(lambda: bool(folders) and (folders[0] / "depth.mkv").exists())  # a process writes
            folder = folders[0]
            assert folder.exists()  # the process still writes it: kept
            for _ in range(400):
                if not folder.exists():
                    break
                await asyncio.sleep(0.05)
            assert not folder.exists()
            assert list(tempfile_root.iterdir()) == []
            assert (service.memory.inputs.free, service.memory.work.free, service.memory.outputs.free) == full
            shared = triton_models.shared
            if shared_memory == "auto":
                assert shared is not None
                await asyncio.sleep(settings.triton_timeout + 0.2)  # a held-back slot's hold-back
                assert shared._free.qsize() == len(shared.slots)
            (result,) = (await service.handle({**job, "max_frames": 3}))["results"]
            assert result["frames"] == 3
        finally:
            if triton_models.shared is not None:
                triton_models.shared.close(triton.grpc_url)
            await fetcher.close()
            await triton_models.close()

    tempfile_root = tmp_path / "tmp"
    tempfile_root.mkdir()
    original = tempfile.tempdir
    tempfile.tempdir = str(tempfile_root)
    try:
        asyncio.run(scenario())
    finally:
        tempfile.tempdir = original
        service.workers.close()


# --------------------------------------------------------------------------- bad input, limits, delivery


def test_bad_videos_get_clear_errors_and_the_worker_serves_on(video_worker, image_server: ImageServer) -> None:
    api, _ = video_worker
    good = clips.encode(clips.frames_of(320, 240, 20, pan=3), fps=10, container="matroska")
    bad = {
        "garbage": ({"video_b64": b64(b"\x00not a video" * 50)}, "not a video this worker can read"),
        "audio": ({"video_b64": b64(clips.audio_only())}, "the file has no video stream"),
        "late start": ({"video_b64": b64(good), "start": 9}, "start 9 s is at or past the end of the video"),
        "private url": ({"video_url": "http://10.1.2.3/a.mp4"}, "video URL points to a private, loopback or reserved"),
        "missing url": ({"video_url": image_server.url("/files/none.mp4")}, "video download failed with HTTP status"),
    }
    ids = {name: api.submit(job) for name, (job, _) in bad.items()}
    corrupt = api.submit({"video_b64": b64(clips.corrupt_packet(good, 8)), "tasks": ["depth"]})
    answers = api.wait_for([*ids.values(), corrupt], timeout=120)
    for name, (_, message) in bad.items():
        (result,) = answers[ids[name]]["output"]["results"]
        assert message in result["error"], (name, result)
    (partial,) = answers[corrupt]["output"]["results"]
    assert 0 < partial["frames"] < 20
    assert partial["stopped"].startswith(f"decoding stopped after {partial['frames']} frames")
    url = image_server.add("clip.mkv", good, "video/x-matroska")
    (result,) = run(api, {"video_url": url, "tasks": ["colorized"]})["results"]
    assert (result["frames"], result["input"]) == (20, {"kind": "video_url", "url": url})


def test_a_cut_clip_says_so_rotation_is_honoured_and_progress_is_reported(video_worker) -> None:
    api, _ = video_worker
    rotated = clips.encode(clips.frames_of(64, 48, 40, pan=1), fps=10, rotation=90)
    job_id = api.submit({"video_b64": b64(rotated), "tasks": ["depth"], "include_raw": True, "max_frames": 30})
    output = api.wait_for([job_id], timeout=120)[job_id]["output"]
    (result,) = output["results"]
    assert result["cut"] == ["the clip is cut to 30 frames (max_frames)"]
    assert result["frames"] == 30
    assert (result["width"], result["height"], result["source"]["rotation"]) == (48, 64, 90)
    stack = npz_stack(fetched(result, "depth_npz"))
    upright = np.rot90(clips.read_frames(rotated)[0][0], 1)[..., 0].astype(np.float64)
    assert np.corrcoef(stack[0].ravel(), upright.ravel())[0, 1] > 0.9  # depth follows the displayed frame
    assert any(str(update).startswith("frames ") for update in api.progress[job_id])


def test_metric_models_are_not_rescaled_and_an_inline_result_too_large_says_to_use_a_bucket(video_worker) -> None:
    api, _ = video_worker
    video = b64(clips.encode(clips.frames_of(64, 48, 6), fps=10))
    (result,) = run(api, {"video_b64": video, "model": METRIC})["results"]
    assert result["depth_units"] == "m"
    assert result["alignment"]["scale"] == [1.0] * 6
    big = b64(clips.encode(clips.frames_of(640, 480, 30, pan=8), fps=10))
    (result,) = run(api, {"video_b64": big, "max_size": 640, "include_raw": True, "output_mode": "inline"})["results"]
    assert "over the 10 MB limit of an inline result; use output_mode url or auto with a bucket" in result["error"]
    output = run(api, {"video_b64": big, "max_size": 640, "include_raw": True, "output_mode": "auto"})
    assert output["output_mode"] == "url"
    assert npz_stack(fetched(output["results"][0], "depth_npz")).shape == (30, 480, 640)


def test_a_60_s_1080p_clip_streams_within_the_stated_memory_bound(video_worker) -> None:
    """README's bound for one video job: the clip's bytes, the decode window (the work reservation) and the
    encoding process's buffers (``ENCODER_BYTES``), plus what glibc keeps (as ``test_memory``)."""
    api, process = video_worker
    clip = clips.encode(clips.panning(1920, 1080, 600, pan=6), fps=10, x264={"crf": "32", "preset": "ultrafast"})
    job = {"video_b64": b64(clip), "tasks": ["depth", "colorized"], "fps": 5, "output_mode": "url"}
    with PeakMemory(process.pid) as memory:
        (result,) = run(api, job, timeout=300)["results"]
    assert (result["frames"], result["source"]["width"], result["source"]["height"]) == (300, 1920, 1080)
    network_pixels = result["network_size"][0] * result["network_size"][1]
    work = decode_window_bytes(Settings().video_window, network_pixels, 1920 * 1080)
    bound = len(clip) * 2 + work + ENCODER_BYTES + 2 * ALLOCATOR_KEEPS  # base64 and bytes; gateway + encoder
    grown = memory.grown
    print(f"60 s 1080p clip: grew {grown / MB:.0f} MB, bound {bound / MB:.0f} MB")
    assert grown < bound, f"grew {grown / MB:.0f} MB, bound {bound / MB:.0f} MB"


def test_a_video_over_its_deadline_is_an_error_and_holds_nothing_after(triton, tmp_path: Path) -> None:
    """``VIDEO_TIMEOUT`` bounds the whole job: past it the result is an error that says so, the job's
    memory comes back, and its spool folder goes once no process writes it."""
    settings = Settings(default_model=SMALL, triton_url=triton.grpc_url, shared_memory="off", cpu_workers=1,
                        video_timeout=0.8)  # fmt: skip
    triton_models = TritonModels(settings.triton_url, 2, settings.triton_timeout, settings.triton_retries)
    fetcher = Fetcher(AddressPolicy(["127.0.0.1"]), 8 << 20, 10.0)
    service = DepthService(settings, triton_models, fetcher)
    video = b64(clips.encode(clips.frames_of(640, 480, 80, pan=4), fps=20))
    full = (service.memory.inputs.free, service.memory.work.free)
    tempfile_root = tmp_path / "tmp"
    tempfile_root.mkdir()

    async def scenario() -> dict:
        await service.startup()
        try:
            started = time.monotonic()
            reply = await service.handle({"video_b64": video, "tasks": ["depth", "colorized"]})
            assert time.monotonic() - started < settings.video_timeout + 1.0
            for _ in range(400):
                if not list(tempfile_root.iterdir()):
                    break
                await asyncio.sleep(0.05)
            return reply
        finally:
            await fetcher.close()
            await triton_models.close()

    original = tempfile.tempdir
    tempfile.tempdir = str(tempfile_root)
    try:
        reply = asyncio.run(scenario())
    finally:
        tempfile.tempdir = original
        service.workers.close()
    (result,) = reply["results"]
    assert result["error"] == "the video took longer than 0.8 s (VIDEO_TIMEOUT)"
    assert list(tempfile_root.iterdir()) == []
    assert (service.memory.inputs.free, service.memory.work.free) == full


def test_the_colorized_video_keeps_the_sources_audio_over_the_served_window(video_worker) -> None:
    api, _ = video_worker
    with_audio = b64(clips.encode(clips.frames_of(64, 48, 20), fps=10, audio=True))  # 2 s, AAC
    output = run(api, {"video_b64": with_audio, "tasks": ["depth", "colorized"], "start": 0.5, "duration": 1.0})
    (result,) = output["results"]
    assert result["audio"] == "copied (aac)"
    assert result["timestamps"][0] == pytest.approx(0.5)
    with av.open(io.BytesIO(fetched(result, "colorized_video"))) as played:
        (video,) = played.streams.video
        (audio,) = played.streams.audio
        assert audio.codec_context.name == "aac"
        seconds = [float(s.duration * s.time_base) for s in (video, audio)]
    assert seconds[0] == pytest.approx(1.0, abs=0.11)
    assert abs(seconds[1] - seconds[0]) < 0.15  # the window's audio, not the whole clip's
    (depth_only,) = run(api, {"video_b64": with_audio, "tasks": ["depth"]})["results"]
    assert "audio" not in depth_only  # no colorized video to carry it

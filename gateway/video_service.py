"""A video job: fetch, decode and sample, infer frame by frame, align, spool, encode, deliver.

Streaming, so that a job's memory does not grow with the clip: one thread of the job decodes a frame at a
time (``inputs.video``), FFmpeg resizing it straight to the network's bucket (one resize, in C). At most
``VIDEO_WINDOW`` frames are at Triton at once, each its own request, so that the dynamic batcher packs
them with other jobs' work. Depth comes back in order, is aligned (``outputs.temporal``) and appended to
a spool file at the network's size in float16. A second pass in an image-worker process reads the spool
and writes the output files (``outputs.video``) with the clip's one range; they are sent inline while
they fit the response, else uploaded (``output_mode``). Disk: the spool is at most ``VIDEO_SPOOL_BYTES``
(the clip is cut to fit, and says so) plus the outputs.

A video that cannot be served gets its result's ``error``, as an image does; the whole job is bounded by
``VIDEO_TIMEOUT``. The spool folder is removed once no process can still write it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pybase64

from catalogue.size import Size
from gateway.errors import ImageError, safe_text
from gateway.inputs.decode import decode_base64
from gateway.inputs.fetch import Fetcher
from gateway.inputs.resize import limited_size, nearest_bucket
from gateway.inputs.schema import DepthRequest, ImageSource
from gateway.inputs.video import Clip, Sampling, VideoLimits, output_rate
from gateway.outputs.output_names import OUTPUTS, content_type, file_name, url_key
from gateway.outputs.temporal import Aligner, Alignment, ClipRange
from gateway.outputs.video import COLOR_VIDEO_MIME, DEPTH_VIDEO_MIME, MP4_AUDIO, AudioCopy, ClipEncoding
from gateway.served_model import ServedModel
from gateway.serving.imagework import ImageWorkers
from gateway.serving.memory import WorkerMemory
from gateway.serving.ownership import Holdings
from gateway.serving.shared_memory import Slot
from gateway.serving.triton import TritonModels
from gateway.settings import Settings
from gateway.storage import Storage, StorageTarget

log = logging.getLogger("gateway")

ENCODER_BYTES = 256 << 20  # an encoding process's buffers (x264's lookahead, FFV1's slices); see README
PROGRESS_EVERY = 3.0
FLOAT16_MAX = float(np.finfo(np.float16).max)  # seconds between progress updates
DEPTH_VIDEO_DECODE = "depth = depth_min + v / 65535 * (depth_max - depth_min), v the 16-bit pixel"
OUTPUT_KEYS = {  # file from outputs.video -> (inline key, its MIME type; the npz has none, as for images)
    "depth": ("depth_video_b64", DEPTH_VIDEO_MIME),
    "colorized": ("colorized_video_b64", COLOR_VIDEO_MIME),
    "raw": ("depth_npz_b64", None),
}


class VideoService:
    """Serves the video jobs of one worker, on the image path's Triton, processes and storage."""

    def __init__(
        self,
        settings: Settings,
        triton: TritonModels,
        fetcher: Fetcher,
        workers: ImageWorkers,
        memory: WorkerMemory,
        storage: Storage,
    ) -> None:
        self.settings = settings
        self.triton = triton
        self.fetcher = fetcher
        self.workers = workers
        self.memory = memory
        self.storage = storage
        self.limits = VideoLimits(settings.max_video_seconds, settings.max_video_frames, settings.max_video_pixels)

    async def serve(self, job: VideoJob) -> dict:
        """The video's result (its outputs inline or uploaded) or ``{"index": 0, "input", "error"}``; what
        the job holds is given back once no thread or process of it runs."""
        started = time.perf_counter()
        job.holdings.on_give_back(functools.partial(shutil.rmtree, job.folder, ignore_errors=True))
        try:
            async with asyncio.timeout(self.settings.video_timeout):
                result = await self._serve(job)
        except TimeoutError:
            result = {"error": f"the video took longer than {self.settings.video_timeout:g} s (VIDEO_TIMEOUT)"}
        except ImageError as error:
            result = {"error": str(error)}
        except Exception:
            log.exception("video job %s failed unexpectedly", job.job_id)
            result = {"error": "internal error while processing this video"}
        finally:
            job.thread.shutdown(wait=False, cancel_futures=True)
            job.store.shutdown(wait=False, cancel_futures=True)
            job.holdings.close()
        if "error" in result:
            return {"index": 0, "input": job.described, "error": result["error"]}
        return {"index": 0, "input": job.described, **result, "elapsed_sec": round(time.perf_counter() - started, 4)}

    async def _serve(self, job: VideoJob) -> dict:
        loop = asyncio.get_running_loop()
        request, model = job.request, job.model
        timings: dict[str, float] = {}
        clock = time.perf_counter()
        async with self.memory.inputs.reserved(self._input_bytes(job.source)) as encoded:
            data = await self._fetch(job)
            encoded.resize(len(data))
            timings["fetch"] = round(time.perf_counter() - clock, 4)
            sampling = Sampling(request.start or 0.0, request.duration, request.fps, request.max_frames)
            clip = await loop.run_in_executor(job.thread, Clip, data, self.limits, sampling)
            try:
                async with self.memory.work.reserved(self._work_bytes(clip, request, model)):
                    frames = await self._infer_clip(clip, job)
            finally:
                await loop.run_in_executor(job.thread, clip.close)
            audio, audio_note = await self._audio(clip, frames, data, job)
        timings["decode_infer"] = round(time.perf_counter() - clock - timings["fetch"], 4)
        encoding = self._encoding(frames, clip, job, audio)
        encoded = await self.workers.encode_clip(encoding, job.holdings)
        files = encoded.files
        audio_note = encoded.audio or audio_note
        timings["encode"] = round(time.perf_counter() - clock - sum(timings.values()), 4)
        outputs = await self._deliver(files, job)
        timings["deliver"] = round(time.perf_counter() - clock - sum(timings.values()), 4)
        width, height = frames.size
        low, high = encoding.depth_range
        return {
            "kind": "video",
            "model": model.hf_id,
            "metric": model.metric,
            "width": width,
            "height": height,
            "network_size": list(frames.network_size),
            "frames": frames.count,
            "fps": round(clip.fps, 6),
            "timestamps": [round(t, 6) for t in frames.times],
            "source": {
                "codec": clip.codec,
                "width": clip.source_size.width,
                "height": clip.source_size.height,
                "fps": clip.source_fps,
                "duration": clip.duration,
                "rotation": clip.rotation,
            },
            "temporal": frames.temporal,
            "alignment": {
                "scale": [round(a.scale, 7) for a in frames.alignments],
                "shift": [round(a.shift, 7) for a in frames.alignments],
            },
            "depth_min": low,
            "depth_max": high,
            "depth_units": "m" if model.metric else "relative",
            "depth_direction": "distance" if model.metric else "inverse",
            "depth_video_decode": DEPTH_VIDEO_DECODE,
            "colorized_range": list(encoding.color_range),
            **({"audio": audio_note} if audio_note else {}),
            **({"cut": clip.cut} if clip.cut else {}),
            **({"stopped": clip.stopped} if clip.stopped else {}),
            **outputs,
            "timings": timings,
        }

    def _input_bytes(self, source: ImageSource) -> int:
        if source.type == "url":
            return self.settings.max_video_bytes
        return min(len(source.data), self.settings.max_b64_chars) * 3 // 4 + 3

    async def _fetch(self, job: VideoJob) -> bytes:
        if job.source.type == "url":
            limit, timeout = self.settings.max_video_bytes, self._download_timeout()
            return await self.fetcher.fetch(job.source.data, max_bytes=limit, timeout=timeout, what="video")
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(job.thread, decode_base64, job.source.data, self.settings.max_b64_chars)
        job.described["bytes"] = len(data)
        return data

    def _work_bytes(self, clip: Clip, request: DepthRequest, model: ServedModel) -> int:
        network_pixels = model.largest_pixels(request.process_res)
        return decode_window_bytes(self.settings.video_window, network_pixels, clip.source_size.pixels)

    def _download_timeout(self) -> float:
        """Videos are larger than photos: the image deadline, scaled to the video size limit (at most 5 min)."""
        scale = max(1.0, self.settings.max_video_bytes / max(self.settings.max_download_bytes, 1))
        return min(self.settings.download_timeout * scale, 300.0)

    async def _infer_clip(self, clip: Clip, job: VideoJob) -> SpooledFrames:
        """Every sampled frame inferred, aligned and appended to the spool, in order.

        With Triton's shared memory, each frame in flight holds a slot: the decoding thread writes the
        network input into it and Triton the depth, and it is given back only when no thread of the job
        and no inference can still touch it (``Holdings``, as for images)."""
        request, model = job.request, job.model
        source = NetworkFrames(clip, request.max_size, model.family(request.process_res), model.resample)
        shared = self.triton.shared
        if shared is not None and not shared.fits(model.largest_pixels(request.process_res)):
            shared = None
        spooled = SpooledFrames(job.folder / "depth.f16", Aligner(request.temporal or "align", model.metric))
        pending: deque[InFlight] = deque()
        progress = Progress(job.report, clip.expected_frames())
        flight = InFlight()
        try:
            while True:
                flight = InFlight()  # closed in ``finally`` until it is pending, then by ``spooled.add``
                if shared is not None:
                    flight.slot = await shared.acquire()
                    flight.holdings.on_give_back(functools.partial(shared.release, flight.slot))
                decoding = job.thread.submit(source.next_input, flight.slot)
                flight.holdings.track(decoding)
                item = await asyncio.wrap_future(decoding)
                if item is None:
                    break
                if not spooled.times:
                    self._check_spool(source.bucket, clip)
                spooled.times.append(item[0])
                flight.inference = asyncio.create_task(self._infer_frame(model, item[1], flight.slot, source.bucket))
                pending.append(flight)
                flight = InFlight()  # nothing held
                while len(pending) >= self.settings.video_window or (pending and pending[0].inference.done()):
                    await spooled.add(pending.popleft(), source.bucket, job.store)
                progress.frames(spooled.count, len(spooled.times))
            while pending:
                await spooled.add(pending.popleft(), source.bucket, job.store)
        finally:
            flight.holdings.close()
            for waiting in pending:
                waiting.inference.cancel()
            await asyncio.gather(*(waiting.inference for waiting in pending), return_exceptions=True)
            for waiting in pending:
                waiting.holdings.close()
            spooled.close()
        spooled.size, spooled.network_size = source.size, source.bucket
        return spooled

    async def _infer_frame(
        self, model: ServedModel, image: np.ndarray | None, slot: Slot | None, bucket: Size
    ) -> np.ndarray | None:
        """The frame's depth, or None when Triton wrote it into ``slot``."""
        if slot is None:
            assert image is not None
            return await self.triton.infer(model, image)
        await self.triton.infer_in_slot(model, slot, bucket)
        return None

    def _check_spool(self, bucket: Size, clip: Clip) -> None:
        """Cut the clip to the frames whose spool fits ``VIDEO_SPOOL_BYTES`` (known once the size is)."""
        frame_bytes = bucket.pixels * 2
        fitting = max(1, self.settings.video_spool_bytes // frame_bytes)
        clip.limit_frames(fitting, "VIDEO_SPOOL_BYTES at this network size")

    async def _audio(
        self, clip: Clip, frames: SpooledFrames, data: bytes, job: VideoJob
    ) -> tuple[AudioCopy | None, str | None]:
        """Where the colorized video's audio comes from (the source, kept in the job's folder), or why
        there is none; (None, None) when there is nothing to say (no colorized video, or no audio)."""
        if "colorized" not in job.request.tasks or clip.audio_codec is None:
            return None, None
        if clip.audio_codec not in MP4_AUDIO:
            return None, f"not copied: MP4 does not carry {clip.audio_codec} audio"
        source = job.folder / "source"
        await asyncio.get_running_loop().run_in_executor(job.store, source.write_bytes, data)
        return AudioCopy(source, frames.times[0], frames.times[-1] + 1.0 / clip.fps), None

    def _encoding(
        self, frames: SpooledFrames, clip: Clip, job: VideoJob, audio: AudioCopy | None = None
    ) -> ClipEncoding:
        request = job.request
        low, high = frames.range.exact()
        # normalize: the clip's robust range; else a fixed scale, as for images (metric 0..max_depth, relative 0..1)
        color = frames.range.robust() if request.normalize else (0.0, float(job.model.max_depth or 1.0))
        rate = output_rate(clip.fps)
        pts, last = [], -1
        for moment in frames.times:
            last = max(round((moment - frames.times[0]) * rate), last + 1)
            pts.append(last)
        return ClipEncoding(
            spool=frames.path,
            folder=job.folder,
            frames=frames.count,
            network_size=frames.network_size,
            size=frames.size,
            pts=tuple(pts),
            rate=rate,
            tasks=tuple(request.tasks),
            include_raw=request.include_raw,
            depth_range=(low, high),
            color_range=color,
            colormap=request.colormap,
            invert=request.invert,
            deadline=time.time() + self.settings.video_timeout,
            audio=audio,
        )

    async def _deliver(self, files: dict[str, str], job: VideoJob) -> dict:
        """The outputs inline while they fit the response, else uploaded (or a clear error)."""
        request, target = job.request, job.target
        sizes = {task: Path(path).stat().st_size for task, path in files.items()}
        inline_bytes = sum(math.ceil(size / 3) * 4 for size in sizes.values())
        fits = inline_bytes + 200_000 <= self.settings.max_response_bytes  # room for the result's other fields
        if request.output_mode == "url" or (request.output_mode == "auto" and not fits and target is not None):
            assert target is not None  # checked when the job was accepted
            return await self._upload(files, sizes, target, job.job_id)
        if not fits:
            raise ImageError(
                f"the video's outputs are {inline_bytes / 1e6:.1f} MB as base64, over the "
                f"{self.settings.max_response_bytes / 1e6:.0f} MB limit of an inline result; use output_mode "
                "url or auto with a bucket (BUCKET_ENDPOINT_URL or the job's s3Config), or ask for fewer frames"
            )
        loop = asyncio.get_running_loop()
        out = mime_keys(files)
        for task, path in files.items():
            out[OUTPUT_KEYS[task][0]] = await loop.run_in_executor(None, _base64_of, path)
        return out

    async def _upload(self, files: dict[str, str], sizes: dict[str, int], target: StorageTarget, job_id: str) -> dict:
        total = sum(sizes.values())
        if total > self.settings.output_memory_bytes:
            raise ImageError(f"the video's outputs are {total / 1e6:.0f} MB, over OUTPUT_MEMORY_BYTES")
        mimes = mime_keys(files)
        objects, keys = [], []
        async with self.memory.outputs.reserved(total):
            for task, path in files.items():
                key = OUTPUT_KEYS[task][0]
                object_key = self.storage.object_key(job_id, file_name("0", key, mimes))
                objects.append((object_key, Path(path).read_bytes(), content_type(key, mimes)))
                keys.append(key)
            outcomes = await self.storage.upload(target, objects)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome if isinstance(outcome, ImageError) else ImageError("the upload to storage failed")
        return {**mimes, **{url_key(key): url for key, url in zip(keys, outcomes, strict=True)}}


def mime_keys(files: dict[str, str]) -> dict[str, str]:
    """The ``*_mime`` keys of the outputs in ``files`` (``output_names.OUTPUTS`` names each one's key)."""
    keys = {}
    for task in files:
        key, mime = OUTPUT_KEYS[task]
        mime_key = OUTPUTS[key][1]
        if mime_key is not None:
            keys[mime_key] = mime
    return keys


def _base64_of(path: str) -> str:
    return pybase64.b64encode_as_string(Path(path).read_bytes())


class VideoJob:
    """One video job's request and what it holds: its spool folder (removed once no process writes it) and
    the thread its PyAV objects live in."""

    def __init__(
        self,
        source: ImageSource,
        request: DepthRequest,
        model: ServedModel,
        target: StorageTarget | None,
        job_id: str,
        report: Callable[[str], None] | None,
    ) -> None:
        self.source, self.request, self.model, self.target = source, request, model, target
        self.job_id, self.report = job_id, report
        self.described: dict = (
            {"kind": "video_url", "url": safe_text(source.data)}
            if source.type == "url"
            else {"kind": "video_b64", "bytes": 0}
        )
        self.holdings = Holdings()
        self.folder = Path(tempfile.mkdtemp(prefix="video-"))
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="video")  # decoding
        self.store = ThreadPoolExecutor(1, thread_name_prefix="video-store")  # aligning and spooling, in order


def decode_window_bytes(window: int, network_pixels: int, source_pixels: int) -> int:
    """Memory one job's decode-infer pass holds: ``window`` frames' network inputs and depths (uint8 RGB
    in, float32 depth out, and its aligned copy), and ten decoded source frames (the decoder's threads,
    the frame being resized)."""
    return window * network_pixels * (3 + 4 + 4) + (2 + 2 * 4) * source_pixels * 3


class NetworkFrames:
    """A clip's sampled frames as network inputs: FFmpeg resizes each frame straight to the network's
    bucket, chosen from the first frame's displayed size after ``max_size`` (the outputs' size)."""

    def __init__(self, clip: Clip, max_size: int, family: tuple[Size, ...], resample: str) -> None:
        self.max_size = max_size
        self.family = family
        self.size = Size(0, 0)  # of the outputs
        self.bucket = Size(0, 0)  # the network runs at
        self._frames = clip.frames(self._size_for, resample)

    def _size_for(self, displayed: Size) -> Size:
        if self.size == (0, 0):
            self.size = limited_size(displayed, self.max_size)
            self.bucket = nearest_bucket(self.size, self.family)
        return self.bucket

    def next_input(self, slot: Slot | None) -> tuple[float, np.ndarray | None] | None:
        """The next frame's time and network input (None when it went into ``slot``); None at the end."""
        frame = next(self._frames, None)
        if frame is None:
            return None
        if slot is None:
            return frame.time, frame.image
        slot.write_input(frame.image)
        return frame.time, None


class InFlight:
    """One frame between its decode and its spool: its inference, and the slot it may hold."""

    def __init__(self) -> None:
        self.slot: Slot | None = None
        self.holdings = Holdings()
        self.inference: asyncio.Task = None  # type: ignore[assignment]  # set once the frame is decoded


class Progress:
    """``report("frames 240/900")`` at the first frame, then every ``PROGRESS_EVERY`` seconds."""

    def __init__(self, report: Callable[[str], None] | None, expected: int) -> None:
        self.report = report
        self.expected = expected
        self.last = -math.inf

    def frames(self, done: int, sampled: int) -> None:
        if self.report is not None and time.monotonic() - self.last >= PROGRESS_EVERY:
            self.last = time.monotonic()
            self.report(f"frames {done}/{max(self.expected, sampled)}")


class SpooledFrames:
    """The clip's aligned depth frames, appended to a float16 file, with their times and alignments."""

    def __init__(self, path: Path, aligner: Aligner) -> None:
        self.path = path
        self.aligner = aligner
        self.file = path.open("wb")
        self.times: list[float] = []  # of the frames sampled (some may still be at Triton)
        self.alignments: list[Alignment] = []
        self.range = ClipRange()
        self.count = 0
        self.size = Size(0, 0)
        self.network_size = Size(0, 0)

    @property
    def temporal(self) -> str:
        return "align" if self.aligner.active else "none"

    async def add(self, flight: InFlight, bucket: Size, store: ThreadPoolExecutor) -> None:
        """The next frame's depth, once inferred, aligned and written by the job's ``store`` thread (the
        frame's slot, when it has one, is read there and given back after)."""
        try:
            depth = await flight.inference
            if depth is None:
                assert flight.slot is not None
                depth = flight.slot.read_output(bucket)  # a view: read before the slot is given back
            storing = store.submit(self._store, depth)
            flight.holdings.track(storing)
            alignment = await asyncio.wrap_future(storing)
        finally:
            flight.holdings.close()
        self.alignments.append(alignment)
        self.count += 1

    def _store(self, depth: np.ndarray) -> Alignment:
        depth = np.asarray(depth, np.float32)
        if not np.isfinite(np.add.reduce(depth, axis=None, dtype=np.float64)):  # NaN and inf survive a sum
            raise ImageError(f"the model returned NaN or infinite depth for frame {self.count}")
        aligned, alignment = self.aligner.align(depth)
        self.range.add(aligned)
        if not max(abs(self.range.low), abs(self.range.high)) <= FLOAT16_MAX:
            raise ImageError(f"frame {self.count}'s aligned depth is outside float16's range")
        aligned.astype(np.float16).tofile(self.file)
        return alignment

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()

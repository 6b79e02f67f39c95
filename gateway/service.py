"""The request handler: validation, per-image fetch/decode/infer/render, and the response of API.md.

All images of a job run concurrently. Decoding, resizing and rendering run in worker processes
(``imagework``); base64 and header checks in a few threads here, where the job's budget lives; inference
goes to Triton as one request per image so that its dynamic batcher groups images across jobs.
A request that is wrong as a whole returns ``{"error": ...}`` and runs nothing; an image that fails gets
its own ``error`` and costs the others nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pybase64
from PIL import Image

from catalogue.size import Size
from gateway.errors import ImageError, safe_text
from gateway.inputs.budget import JobBudget, estimated_output_bytes, estimated_work_bytes
from gateway.inputs.decode import decode_base64, open_image
from gateway.inputs.fetch import Fetcher
from gateway.inputs.schema import DepthRequest, ImageSource, ParsedRequest, RequestError, parse_request
from gateway.outputs.output_names import OUTPUTS, content_type, file_name, url_key
from gateway.outputs.render import needs_photo
from gateway.served_model import ServedModel
from gateway.serving.imagework import Decoded, HandedOutputs, ImageWorkers, NonFiniteDepth, ParkedOutput, handed_in
from gateway.serving.memory import WorkerMemory
from gateway.serving.model_names import ModelUnavailable
from gateway.serving.ownership import Holdings
from gateway.serving.shared_memory import Slot
from gateway.serving.triton import TritonModels
from gateway.settings import Settings
from gateway.storage import Storage, StorageConfigError, StorageTarget, check_endpoint
from gateway.video_service import VideoJob, VideoService

log = logging.getLogger("gateway")

PARENT_THREADS = 4
NON_FINITE = "the model returned NaN or infinite depth for this image"
ECHOED = ("tasks", "colormap", "output_format", "normalize", "invert", "include_raw", "max_size", "point_cloud_grid")


class Stopwatch:
    """Records the seconds since the previous lap under each lap's name."""

    def __init__(self, laps: dict[str, float]) -> None:
        self.laps = laps
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self.last, 5)
        self.last = now


DEPTH_PNG_DECODE = "depth = depth_min + png / 65535 * (depth_max - depth_min)"


def depth_meaning(metric: bool) -> dict:
    """What the depth values are: units, which way they grow, and how the 16-bit PNG maps back to them."""
    return {
        "depth_units": "m" if metric else "relative",
        "depth_direction": "distance" if metric else "inverse",  # inverse: larger is nearer
        "depth_png_decode": DEPTH_PNG_DECODE,
    }


@dataclass
class JobContext:
    """What the images of one job share: its budget, its download limit and the output memory it holds."""

    budget: JobBudget
    downloads: asyncio.Semaphore  # the job's download limit
    output_bytes: int = 0
    handed: set[HandedOutputs] = dataclasses.field(default_factory=set)  # parked outputs it owns (url mode)


def _decoded_and_opened(text: str, settings: Settings) -> tuple[bytes, Image.Image | ImageError]:
    """A base64 image's bytes and its header, or the error that its header gave (the bytes are described
    either way)."""
    data = decode_base64(text, settings.max_b64_chars)
    try:
        return data, open_image(data, settings.max_pixels)
    except ImageError as error:
        return data, error


def approximate_json_size(value: Any) -> int:
    """Bytes of ``value`` as JSON, to within a few bytes per item, without serializing it.

    Outputs are base64 (ASCII), so their lengths are their JSON sizes; walking the few keys costs
    microseconds where ``json.dumps`` of megabytes costs milliseconds of the event loop.
    """
    if isinstance(value, str):
        return len(value) + 2
    if isinstance(value, bytes):  # an output that will be uploaded: its bytes are what is held
        return len(value)
    if isinstance(value, ParkedOutput):
        return value.size
    if isinstance(value, dict):
        return 2 + sum(len(str(key)) + 4 + approximate_json_size(item) for key, item in value.items())
    if isinstance(value, list | tuple):
        return 2 + sum(approximate_json_size(item) + 1 for item in value)
    return 24


def worker_target(settings: Settings) -> StorageTarget | None:
    """The worker's own bucket (``BUCKET_*``), if one is set; StorageConfigError when it is unusable."""
    if not settings.bucket_endpoint_url:
        return None
    return StorageTarget.configured(
        settings.bucket_endpoint_url,
        settings.bucket_access_key_id or "",
        settings.bucket_secret_access_key or "",
        settings.bucket_name,
        settings.bucket_region,
    )


class DepthService:
    def __init__(
        self,
        settings: Settings,
        triton: TritonModels,
        fetcher: Fetcher,
        progress: Callable[[dict, str], None] | None = None,
    ) -> None:
        self.progress = progress  # runpod's progress_update in the production loop
        self.settings = settings
        self.triton = triton
        self.fetcher = fetcher
        self.executor = ThreadPoolExecutor(PARENT_THREADS, thread_name_prefix="inputs")  # base64, headers
        self.storage = Storage(settings.bucket_prefix, settings.bucket_url_expiry, settings.upload_timeout)
        self.storage_target = worker_target(settings)  # StorageConfigError: the worker does not start
        self.workers = ImageWorkers(settings.cpu_workers)
        self.memory = WorkerMemory(
            settings.input_memory_bytes, settings.work_memory_bytes, settings.output_memory_bytes
        )
        self.videos = VideoService(settings, triton, fetcher, self.workers, self.memory, self.storage)

    async def startup(self) -> None:
        """Start the image workers, load the default model and set up shared memory with Triton, so that
        the first request waits for none of them."""
        self.workers.start()
        model = await self.triton.preload(self.settings.default_model)
        if self.settings.shared_memory == "auto":
            await self.triton.use_shared_memory(model.largest_pixels(None), self.settings.shared_memory_slots)
        await self.triton.close()

    async def handle_job(self, job: dict) -> dict:
        report = None
        if self.progress is not None:
            report = functools.partial(self.progress, job)
        return await self.handle(job.get("input"), report, job.get("s3Config"), str(job.get("id", "job")))

    async def handle(
        self,
        payload: Any,
        report: Callable[[str], None] | None = None,
        s3_config: object = None,
        job_id: str = "job",
    ) -> dict:
        """The response to one job's input; ``report("3/16 images")`` as images of a larger job finish;
        outputs go to storage (the job's ``s3Config`` or the worker's bucket) when ``output_mode`` says so."""
        started = time.perf_counter()
        try:
            parsed, model, dtype, target = await self._accept(payload, s3_config)
        except (RequestError, ModelUnavailable) as error:
            return {"error": str(error)}
        request = parsed.request
        if parsed.video is not None:
            job = VideoJob(parsed.video, request, model, target, job_id, report)
            return await self._video(job, dtype, started)
        job = JobContext(self._job_budget(request, target), self.fetcher.job_downloads())
        total, finished = len(parsed.sources), 0

        async def counted(index: int, source: ImageSource) -> dict:
            nonlocal finished
            result = await self._one(index, source, request, model, job)
            finished += 1
            if report is not None and total > 1:
                report(f"{finished}/{total} images")
            return result

        try:
            with self.triton.using(model.name):  # not unloaded while any image of the job may still need it
                images = (counted(index, source) for index, source in enumerate(parsed.sources))
                results = await asyncio.gather(*images)
            response = self._response(results, request, model, dtype, started)
            return await self._deliver(response, request, target, job_id)
        finally:
            self.memory.outputs.release(job.output_bytes)
            for handed in job.handed:
                handed.discard()  # the job ended before every output was read (cancelled, failed, out of time)

    def _response(
        self, results: list[dict], request: DepthRequest, model: ServedModel, dtype: str, started: float
    ) -> dict:
        return {
            "results": results,
            "model": model.hf_id,
            "license": model.license,
            **{key: getattr(request, key) for key in ECHOED},
            "process_res": request.process_res or model.sizes[0],
            "dtype": dtype,
            "device": "cuda" if model.on_gpu else "cpu",
            "cuda_available": bool(self.triton.gpu),
            "count": len(results),
            "elapsed_sec": round(time.perf_counter() - started, 4),
        }

    async def _video(self, job: VideoJob, dtype: str, started: float) -> dict:
        """A video job's response: one result, its outputs inline or uploaded by the video path itself."""
        with self.triton.using(job.model.name):
            result = await self.videos.serve(job)
        response = self._response([result], job.request, job.model, dtype, started)
        uploaded = any(key.endswith("_url") for key in result)
        temporal = job.request.temporal or "align"
        return {**response, "temporal": temporal, "output_mode": "url" if uploaded else "inline"}

    async def _accept(
        self, payload: Any, s3_config: object
    ) -> tuple[ParsedRequest, ServedModel, str, StorageTarget | None]:
        """The parsed request, its model (loaded), dtype and storage target; RequestError or ModelUnavailable."""
        parsed = parse_request(payload, self.settings.max_images)
        request = parsed.request
        name, dtype = await self.triton.resolve(request.model or self.settings.default_model, request.dtype)
        model = await self.triton.ensure_loaded(name)
        target = await self._storage_target(s3_config)
        if request.output_mode == "url" and target is None:
            raise RequestError(
                "output_mode url needs a bucket: the worker has none configured (BUCKET_ENDPOINT_URL) "
                "and the job carries no s3Config"
            )
        if request.process_res is not None and request.process_res not in model.sizes:
            served = ", ".join(str(size) for size in model.sizes)
            raise RequestError(
                f"process_res {request.process_res} is not served for {model.hf_id}; served sizes: {served}"
            )
        return parsed, model, dtype, target

    def _job_budget(self, request: DepthRequest, target: StorageTarget | None) -> JobBudget:
        """Inline, a job's outputs must fit its response; uploaded, the worker's output memory."""
        inline_only = request.output_mode == "inline" or target is None
        return JobBudget(
            self.settings.max_job_pixels,
            self.settings.max_response_bytes if inline_only else self.settings.output_memory_bytes,
            functools.partial(
                estimated_output_bytes,
                tasks=tuple(request.tasks),
                output_format=request.output_format,
                include_raw=request.include_raw,
                point_cloud_grid=request.point_cloud_grid,
                max_points=request.max_points,
                max_mesh_vertices=request.max_mesh_vertices,
            ),
            "the response" if inline_only else "the job's outputs (OUTPUT_MEMORY_BYTES)",
        )

    async def _deliver(self, response: dict, request: DepthRequest, target: StorageTarget | None, job_id: str) -> dict:
        """The response inline, or with its outputs uploaded when ``output_mode`` (or its size) says so."""
        size = approximate_json_size(response)
        if target is not None and (request.output_mode == "url" or size > self.settings.max_response_bytes):
            response["results"] = await self._upload(response["results"], target, job_id)
            response["output_mode"] = "url"
            size = approximate_json_size(response)
        else:
            response["output_mode"] = "inline"
        if size > self.settings.max_response_bytes:
            limit_mb = self.settings.max_response_bytes / 1e6
            return {
                "error": f"response too large: {size / 1e6:.1f} MB, over the {limit_mb:.0f} MB limit for a job result;"
                " ask for fewer images or tasks, a smaller max_size, or jpg/webp output"
            }
        return response

    async def _storage_target(self, s3_config: object) -> StorageTarget | None:
        """The job's own bucket (checked against the address policy), else the worker's, else None."""
        if s3_config is None:
            return self.storage_target
        try:
            target = await check_endpoint(StorageTarget.from_job(s3_config), self.fetcher.policy)
        except StorageConfigError as error:
            raise RequestError(str(error)) from None
        return target

    async def _upload(self, results: list[dict], target: StorageTarget, job_id: str) -> list[dict]:
        """Every inline output uploaded and replaced by its URL; an image whose upload failed gets an error."""
        objects, owners = [], []
        for result in results:
            for key in OUTPUTS:
                if key in result:
                    object_key = self.storage.object_key(job_id, file_name(str(result["index"]), key, result))
                    data = result[key]  # bytes in url mode; base64 text when auto found it too large
                    if isinstance(data, str):
                        data = await self._cpu(pybase64.b64decode, data)
                    elif isinstance(data, ParkedOutput):
                        data = data.read  # in the upload's thread
                    objects.append((object_key, data, content_type(key, result)))
                    owners.append((result, key))
        outcomes = await self.storage.upload(target, objects) if objects else []
        failed: dict[int, str] = {}
        for (result, key), outcome in zip(owners, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                failed.setdefault(
                    result["index"], str(outcome) if isinstance(outcome, ImageError) else "the upload to storage failed"
                )
                continue
            del result[key]
            result[url_key(key)] = outcome
        return [
            {"index": r["index"], "input": r["input"], "error": failed[r["index"]]} if r["index"] in failed else r
            for r in results
        ]

    async def _finite_depth(self, model: ServedModel, decoded: Decoded, slot: Slot | None) -> np.ndarray | None:
        """The image again on the model's FP32 variant when it is served; else a clear error."""
        if model.precision == "fp32":
            raise ImageError(NON_FINITE)
        try:
            name, _dtype = await self.triton.resolve(model.hf_id, "float32")
            fp32 = await self.triton.ensure_loaded(name)
        except ModelUnavailable:
            raise ImageError(f"{NON_FINITE} in {model.precision}, and no float32 variant is served") from None
        log.warning("non-finite depth from %s; running this image on %s", model.name, fp32.name)
        return await self._infer(fp32, decoded, slot)

    async def _infer_and_render(
        self,
        model: ServedModel,
        decoded: Decoded,
        request: DepthRequest,
        slot: Slot | None,
        holdings: Holdings,
        clock: Stopwatch,
    ) -> dict:
        """The image's outputs; FP16 can overflow on some inputs, so non-finite depth is never rendered:
        it is inferred again in float32 when served, else the image fails clearly."""
        depth = await self._infer(model, decoded, slot)
        clock.lap("infer")
        to_render = dataclasses.replace(decoded, network_input=None)  # the pipe need not carry it again
        uploaded = request.output_mode == "url"  # a request error without a bucket: never inline then
        try:
            return await self.workers.render(to_render, depth, request, model, slot, holdings, uploaded)
        except NonFiniteDepth:
            pass
        depth = await self._finite_depth(model, decoded, slot)
        try:
            outputs = await self.workers.render(to_render, depth, request, model, slot, holdings, uploaded)
        except NonFiniteDepth:
            raise ImageError(f"{NON_FINITE}, in float32 too") from None
        return {**outputs, "fallback_dtype": "float32"}

    async def _infer(self, model: ServedModel, decoded: Decoded, slot: Slot | None) -> np.ndarray | None:
        """The depth, or None when Triton wrote it into ``slot``."""
        if slot is None:
            assert decoded.network_input is not None
            return await self.triton.infer(model, decoded.network_input)
        await self.triton.infer_in_slot(model, slot, decoded.network_size)
        return None

    def _input_bytes(self, source: ImageSource) -> int:
        """The encoded bytes an image source can bring: its base64 decoded, or the download limit."""
        if source.type == "url":
            return self.settings.max_download_bytes
        return min(len(source.data), self.settings.max_b64_chars) * 3 // 4 + 3

    async def _fetch(self, source: ImageSource, job: JobContext, described: dict) -> tuple[bytes, Image.Image]:
        """The encoded image and its checked header (``open_image``). A base64 source is decoded and its header
        read in one call of the CPU threads: each call costs the event loop a hand-off and a wake-up."""
        if source.type == "url":
            data = await self.fetcher.fetch(source.data, job.downloads)
            return data, await self._cpu(open_image, data, self.settings.max_pixels)
        data, header = await self._cpu(_decoded_and_opened, source.data, self.settings)
        described["bytes"] = len(data)
        if isinstance(header, ImageError):
            raise header
        return data, header

    async def _reserve_work(self, size: Size, request: DepthRequest, model: ServedModel, holdings: Holdings) -> None:
        """The image's working memory, from the worker's budget until its holdings are given back."""
        network_pixels = model.largest_pixels(request.process_res)
        needed = estimated_work_bytes(
            size.pixels,
            network_pixels,
            request.tasks,
            request.include_raw,
            needs_photo(request.tasks),
            request.max_points,
            request.max_mesh_vertices,
        )
        await self.memory.work.acquire(needed)
        holdings.on_give_back(functools.partial(self.memory.work.release, needed))

    def _keep_outputs(self, outputs: dict, reserved: int, job: JobContext) -> None:
        """Account the rendered outputs to the job's limit and the worker's output memory (or ImageError)."""
        size = approximate_json_size(outputs)
        job.budget.settle(reserved, size)
        self.memory.outputs.try_acquire(size)
        job.output_bytes += size

    async def _slot(self, model: ServedModel, request: DepthRequest, holdings: Holdings) -> Slot | None:
        """A shared-memory slot for this image when its network size fits one (None: gRPC payloads), held
        until the image's holdings are given back."""
        shared = self.triton.shared
        if shared is None:
            return None
        if not shared.fits(model.largest_pixels(request.process_res)):
            return None
        slot = await shared.acquire()
        holdings.on_give_back(functools.partial(shared.release, slot))
        return slot

    async def _one(
        self, index: int, source: ImageSource, request: DepthRequest, model: ServedModel, job: JobContext
    ) -> dict:
        started = time.perf_counter()
        described: dict = (
            {"kind": "url", "url": safe_text(source.data)} if source.type == "url" else {"kind": "b64", "bytes": 0}
        )
        timings: dict[str, float] = {}
        clock = Stopwatch(timings)
        holdings = Holdings()  # the slot, parked photo and working memory, kept until no process may touch them
        try:
            async with self.memory.inputs.reserved(self._input_bytes(source)) as encoded:
                data, header = await self._fetch(source, job, described)
                encoded.resize(len(data))
                clock.lap("fetch")
                reserved_output = job.budget.admit(*header.size)  # before any pixel is decoded
                await self._reserve_work(Size(*header.size), request, model, holdings)
                slot = await self._slot(model, request, holdings)
                decoded = await self.workers.decode(data, self.settings.max_pixels, request, model, slot, holdings)
                clock.lap("decode")  # and resize to the network
            outputs = await self._infer_and_render(model, decoded, request, slot, holdings, clock)
            job.handed |= handed_in(outputs)
            clock.lap("render")
            self._keep_outputs(outputs, reserved_output, job)
        except ImageError as error:
            return {"index": index, "input": described, "error": str(error)}
        except Exception:
            log.exception("image %d failed unexpectedly", index)
            return {"index": index, "input": described, "error": "internal error while processing this image"}
        finally:
            holdings.close()
        width, height = decoded.size
        return {
            "index": index,
            "input": described,
            "model": model.hf_id,
            "metric": model.metric,
            "width": width,
            "height": height,
            "inference_size": list(decoded.inference_size),
            "network_size": list(decoded.network_size),
            **depth_meaning(model.metric),
            **outputs,
            "timings": timings,
            "elapsed_sec": round(time.perf_counter() - started, 4),
        }

    async def _cpu(self, function: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(function, *args))

"""``python -m gateway``: the Runpod worker, with an embedded Triton when ``TRITON_URL`` is unset.

Runpod's own flags pass through, e.g. ``python -m gateway --rp_serve_api --rp_api_port 8000`` serves
Runpod's local HTTP API. The embedded Triton binds loopback only, is supervised (``gateway.serving.supervisor``)
and stops with the worker; the worker exits with status 1 when Triton cannot be brought back.

In runpod's production loop, with ``LANES`` > 1, this process is the job intake and jobs run in lane
processes (``gateway.serving.lanes``, ``gateway.lane``).

Runpod's logger logs every job's whole output at DEBUG, its default, and fixes its level when runpod is
imported; ``quiet_runpod_logs`` sets it on the logger itself (INFO unless ``RUNPOD_LOG_LEVEL`` or
``RUNPOD_DEBUG_LEVEL`` asks otherwise), whatever was imported first.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import signal
import sys
import time

import runpod

from gateway.inputs.fetch import AddressPolicy, Fetcher
from gateway.service import DepthService, worker_target
from gateway.serving import heartbeat, jobloop
from gateway.serving.health import TritonHealth
from gateway.serving.imagework import keep_freed_memory
from gateway.serving.lanes import LaneJobScaler, Lanes, SharedModels
from gateway.serving.model_lifetime import ModelLifetime
from gateway.serving.model_names import ModelUnavailable
from gateway.serving.result_post import ResultPosts
from gateway.serving.supervisor import TritonSupervisor
from gateway.serving.triton import TritonModels
from gateway.serving.triton_process import EmbeddedTriton, TritonStartError, point_tensorrt_cache
from gateway.settings import TENSORRT_LINK, Settings
from gateway.storage import StorageConfigError

log = logging.getLogger("gateway")


def wait_for_triton(triton: TritonModels, timeout: float) -> None:
    """Wait until Triton answers its repository index, or raise TritonStartError."""

    async def poll() -> None:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        await triton.served_names()
                        return
                    except ModelUnavailable:  # not answering yet
                        await asyncio.sleep(0.5)
        finally:
            await triton.close()

    try:
        asyncio.run(poll())
    except TimeoutError:
        raise TritonStartError(f"Triton at {triton.url} not reachable after {timeout:g} s") from None


def quiet_runpod_logs() -> None:
    from runpod.serverless.modules.rp_logger import RunPodLogger

    RunPodLogger().set_level(os.environ.get("RUNPOD_LOG_LEVEL") or os.environ.get("RUNPOD_DEBUG_LEVEL") or "INFO")


def start_triton(settings: Settings) -> tuple[str, EmbeddedTriton | None, list[int]]:
    """Triton's gRPC URL (started here, on loopback, unless ``TRITON_URL`` names one), the embedded
    server if any, and the ports no image URL may reach; once Triton answers."""
    url = settings.triton_url
    blocked_ports = list(settings.triton_ports)  # never reachable through an image URL
    server = None
    started = time.monotonic()
    if url is None:
        if TENSORRT_LINK.parent.is_dir():  # in the image (the Dockerfile makes it); not on a development machine
            log.info(point_tensorrt_cache(TENSORRT_LINK, settings.tensorrt_cache_dir))
        log.info("starting tritonserver over %s (up to %g s)", settings.model_repository, settings.triton_start_timeout)
        server = EmbeddedTriton(settings.model_repository, settings.triton_start_timeout).start()
        atexit.register(server.stop)
        url = server.grpc_url
        blocked_ports += server.ports
        log.info(
            "tritonserver ready in %.1f s on loopback: gRPC %s, HTTP %s (examples/triton_client.py --url %s)",
            time.monotonic() - started,
            server.grpc_url,
            server.http_url,
            server.grpc_url,
        )
    else:
        port = url.rsplit(":", 1)[-1]
        blocked_ports += [int(port)] if port.isdigit() else []
    wait_for_triton(
        TritonModels(url, settings.max_loaded_models, settings.triton_timeout, settings.triton_retries),
        settings.triton_start_timeout,
    )
    return url, server, blocked_ports


def settings_fetcher(settings: Settings, blocked_ports: list[int]) -> Fetcher:
    """The downloader of image and video URLs, by the worker's settings; ``blocked_ports`` are Triton's."""
    return Fetcher(
        AddressPolicy(settings.url_allowlist, blocked_ports),
        settings.max_download_bytes,
        settings.download_timeout,
        settings.downloads_per_job,
    )


def build_service(settings: Settings, url: str, blocked_ports: list[int], results: ResultPosts | None) -> DepthService:
    """The gateway in this process: preloads the default model and starts the image workers; progress
    updates go out through ``results`` (runpod's production loop; none with the local API)."""
    started = time.monotonic()
    triton = TritonModels(url, settings.max_loaded_models, settings.triton_timeout, settings.triton_retries)
    fetcher = settings_fetcher(settings, blocked_ports)
    service = DepthService(settings, triton, fetcher, results.progress_update if results is not None else None)
    log.info("loading %s and starting %d image workers", settings.default_model, settings.cpu_workers)
    asyncio.run(service.startup())
    log.info("ready in %.1f s", time.monotonic() - started)
    return service


def build_lanes(settings: Settings, url: str, blocked_ports: list[int], count: int) -> Lanes:
    """The job intake's models (the default one preloaded) and its ``count`` lanes."""
    worker_target(settings)  # StorageConfigError here, rather than in every lane
    models = SharedModels(url, settings.max_loaded_models, settings.triton_timeout)

    async def preload() -> None:
        try:
            await models.preload(settings.default_model)
        finally:
            await models.close()

    asyncio.run(preload())
    ports = ",".join(str(port) for port in blocked_ports)

    def environment(index: int) -> dict[str, str]:
        return {**settings.lane_share(count, index), "TRITON_URL": url, "TRITON_PORTS": ports}

    lanes = Lanes(count, environment, models)  # started by the job loop (LaneJobScaler.run)
    atexit.register(lanes.kill)
    log.info("%d lanes, %d image workers in all", count, settings.cpu_workers)
    return lanes


def refuse_job(_job: dict) -> dict:
    raise RuntimeError("jobs run in lanes")  # the lanes' job loop never calls the handler here


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    quiet_runpod_logs()
    keep_freed_memory()
    settings = Settings.from_env()
    production = bool(os.environ.get("RUNPOD_WEBHOOK_GET_JOB"))  # runpod's job loop, not the local API
    count = settings.lane_count() if production else 1
    lanes = None
    try:
        url, server, blocked_ports = start_triton(settings)
        if count > 1:
            lanes = build_lanes(settings, url, blocked_ports, count)
            models: ModelLifetime = lanes.models
            config: dict = {"handler": refuse_job, "lanes": lanes}
        else:
            results = ResultPosts() if production else None  # the job loop's, for results and progress
            service = build_service(settings, url, blocked_ports, results)
            models = service.triton
            config = {"handler": service.handle_job, "results": results}
    except (TritonStartError, ModelUnavailable, StorageConfigError) as error:  # one line, exit 1: replaced
        log.error("could not start: %s", error)
        sys.exit(1)

    def leave() -> None:
        """Stop intake, let the jobs in flight finish, then exit non-zero (``exit_status``)."""
        os.kill(os.getpid(), signal.SIGTERM)

    supervisor = None
    health = TritonHealth(url, None if server is not None else settings.triton_unreachable_exit, leave).start()
    atexit.register(health.stop)
    if server is not None:
        supervisor = TritonSupervisor(
            server,
            models_in_use=lambda: models.loaded,
            on_give_up=leave,
            max_restarts=settings.triton_max_restarts,
        ).start()
        atexit.register(supervisor.stop)  # runs before server.stop (atexit is last in, first out)

    def exit_status() -> int:
        return 1 if health.gave_up or (supervisor is not None and supervisor.gave_up) else 0

    def concurrency(_current: int) -> int:
        if lanes is not None and not lanes.ready:
            return 0  # no lane can take a job yet (starting, or all of them restarting)
        return health.concurrency(settings.concurrency)

    # For the local API (--rp_serve_api); runpod's production loop installs its own, which drains first.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(exit_status()))  # runs atexit (stops the embedded Triton)
    jobloop.install(LaneJobScaler if lanes is not None else jobloop.EagerJobScaler)
    heartbeat.install()
    runpod.serverless.start({**config, "concurrency_modifier": concurrency})
    sys.exit(exit_status())

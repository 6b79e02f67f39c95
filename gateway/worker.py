"""``python -m gateway``: the Runpod worker, with an embedded Triton when ``TRITON_URL`` is unset.

Runpod's own flags pass through, e.g. ``python -m gateway --rp_serve_api --rp_api_port 8000`` serves
Runpod's local HTTP API. The embedded Triton binds loopback only, is supervised (``gateway.serving.supervisor``)
and stops with the worker; the worker exits with status 1 when Triton cannot be brought back.

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
from gateway.service import DepthService
from gateway.serving import jobloop
from gateway.serving.health import TritonHealth
from gateway.serving.imagework import keep_freed_memory
from gateway.serving.model_names import ModelUnavailable
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


def build_service(settings: Settings) -> tuple[DepthService, EmbeddedTriton | None]:
    """Connect to (or start) Triton, wait for it, and preload the default model."""
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
    triton = TritonModels(url, settings.max_loaded_models, settings.triton_timeout, settings.triton_retries)
    wait_for_triton(triton, settings.triton_start_timeout)
    fetcher = Fetcher(
        AddressPolicy(settings.url_allowlist, blocked_ports),
        settings.max_download_bytes,
        settings.download_timeout,
        settings.downloads_per_job,
    )
    production = bool(os.environ.get("RUNPOD_WEBHOOK_GET_JOB"))  # runpod's job loop, not the local API
    progress = runpod.serverless.progress_update if production else None
    service = DepthService(settings, triton, fetcher, progress)
    log.info("loading %s and starting %d image workers", settings.default_model, settings.cpu_workers)
    asyncio.run(service.startup())
    log.info("ready in %.1f s", time.monotonic() - started)
    return service, server


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    quiet_runpod_logs()
    keep_freed_memory()
    settings = Settings.from_env()
    try:
        service, server = build_service(settings)
    except (TritonStartError, ModelUnavailable, StorageConfigError) as error:  # one line, exit 1: replaced
        log.error("could not start: %s", error)
        sys.exit(1)

    def leave() -> None:
        """Stop intake, let the jobs in flight finish, then exit non-zero (``exit_status``)."""
        os.kill(os.getpid(), signal.SIGTERM)

    supervisor = None
    health = TritonHealth(
        service.triton.url, None if server is not None else settings.triton_unreachable_exit, leave
    ).start()
    atexit.register(health.stop)
    if server is not None:
        supervisor = TritonSupervisor(
            server,
            models_in_use=lambda: service.triton.loaded,
            on_give_up=leave,
            max_restarts=settings.triton_max_restarts,
        ).start()
        atexit.register(supervisor.stop)  # runs before server.stop (atexit is last in, first out)

    def exit_status() -> int:
        return 1 if health.gave_up or (supervisor is not None and supervisor.gave_up) else 0

    # For the local API (--rp_serve_api); runpod's production loop installs its own, which drains first.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(exit_status()))  # runs atexit (stops the embedded Triton)
    concurrency = settings.concurrency
    jobloop.install()
    runpod.serverless.start(
        {"handler": service.handle_job, "concurrency_modifier": lambda _current: health.concurrency(concurrency)}
    )
    sys.exit(exit_status())

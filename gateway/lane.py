"""One lane, started by the intake (``gateway.serving.lanes``), never by hand.

It serves jobs the intake sends over its socket (``LANE_FD``) with its own ``DepthService`` (image
workers, gRPC client and shared-memory region on the intake's Triton; models through the intake, see
``lane_models``) and posts each result to the job API itself, as runpod's job loop would (same URL,
headers, retries and deadline, from post threads: ``result_post``). Its settings are the worker's, with the
per-process budgets (CPU workers, memory, shared-memory slots, video spool) the intake gave it a share of.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys

from runpod.serverless.modules import rp_scale

from gateway.service import DepthService
from gateway.serving.imagework import keep_freed_memory
from gateway.serving.jobloop import run_handler
from gateway.serving.lane_link import Link
from gateway.serving.lane_models import LaneModels
from gateway.serving.lanes import LANE_FD, LANE_INDEX, ignore_termination
from gateway.serving.result_post import ResultPosts
from gateway.settings import Settings
from gateway.worker import quiet_runpod_logs, settings_fetcher

log = logging.getLogger("gateway")


class LaneJobs:
    """The jobs running in this lane, each answered (posted) here or stopped when the intake says."""

    def __init__(self, service: DepthService, link: Link, results: ResultPosts) -> None:
        self.config = {"handler": service.handle_job}
        self.link = link
        self.results = results
        self.tasks: dict[str, asyncio.Task] = {}
        self.posting: set[str] = set()
        self.answered = 0

    def start(self, job: dict) -> None:
        job_id = job["id"]
        self.tasks[job_id] = asyncio.create_task(self._run(job))

    def cancel(self, job_id: str) -> None:
        """Stop a job whose handler still runs; one whose result is being posted is left to finish."""
        task = self.tasks.get(job_id)
        if task is not None and job_id not in self.posting:
            task.cancel()

    async def _run(self, job: dict) -> None:
        job_id = job["id"]
        token = rp_scale._set_batch_id(job.get("batchId"))
        try:
            try:
                result = await run_handler(self.config, job)
            except asyncio.CancelledError:
                log.info("job %s stopped", job_id)
                self.link.send("ended", job_id, False)
                return
            self.link.send("ended", job_id, True)
            self.posting.add(job_id)
            try:
                await self.results.post(job_id, result)
                self.answered += 1
            finally:
                self.link.send("answered", job_id)
        finally:
            self.tasks.pop(job_id, None)
            self.posting.discard(job_id)
            rp_scale._reset_batch_id(token)

    async def drain(self) -> None:
        while self.tasks:
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)


async def serve(settings: Settings, sock: socket.socket, index: int) -> None:
    link = await Link.over(sock)
    models = LaneModels(settings.triton_url or "", settings.max_loaded_models, settings.triton_timeout,
                        settings.triton_retries, link)  # fmt: skip
    fetcher = settings_fetcher(settings, list(settings.triton_ports))  # the intake's Triton ports, passed on
    results = ResultPosts()  # results and progress updates
    service = DepthService(settings, models, fetcher, results.progress_update)
    try:
        jobs = LaneJobs(service, link, results)
        reading = asyncio.create_task(receive(link, jobs, models))
        try:
            await service.startup()
        except Exception:
            log.exception("lane %d could not start", index)
            reading.cancel()
            await link.close()
            raise SystemExit(1) from None
        link.send("ready", os.getpid())
        await reading  # until the intake says stop, or is gone
        await jobs.drain()
        log.info("lane %d answered %d jobs", index, jobs.answered)
        await link.close()
    finally:
        results.close()


async def receive(link: Link, jobs: LaneJobs, models: LaneModels) -> None:
    """Act on the intake's messages until it says stop or is gone."""
    try:
        while (message := await link.receive()) is not None:
            kind, *args = message
            if kind == "job":
                jobs.start(args[0])
            elif kind == "cancel":
                jobs.cancel(args[0])
            elif kind == "model":
                models.answered(*args)
            elif kind == "unloaded":
                models.unloaded(args[0])
            elif kind == "stop":
                return
    finally:
        models.lost()


def main() -> None:
    index = int(os.environ[LANE_INDEX])
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(name)s lane {index} %(levelname)s %(message)s",
        stream=sys.stderr,
        force=True,  # runpod's import configured the root logger already
    )
    quiet_runpod_logs()
    ignore_termination()
    keep_freed_memory()
    sock = socket.socket(fileno=int(os.environ[LANE_FD]))
    asyncio.run(serve(Settings.from_env(), sock, index))

"""Runpod's production job loop, adapted so that one worker can keep a GPU busy.

runpod 1.12's ``JobScaler`` (pinned; ``tests/test_jobloop.py`` fails on an SDK whose internals moved)
is used as it is, with two of its steps replaced in a subclass:

- Intake. ``JobScaler.get_jobs`` sleeps a whole second whenever its slots are full, so a worker took at
  most about ``CONCURRENCY`` jobs a second whatever its speed. ``EagerJobScaler`` instead waits for a
  slot to free (an event set when any job ends, with the same one-second ceiling) and asks for every
  free slot at once (job-take-batch).
- Result path. runpod's ``run_job`` formats the whole handler output into two debug f-strings (at any
  log level) and ``send_result`` serializes it with ``json.dumps``, all on the event loop: about 6 ms per
  MB of base64 for every job. ``send_job_result`` posts the same body (``{"output": ...}`` or
  ``{"error": ...}``, to the same job-done URL, through runpod's own ``_transmit`` with its retries)
  serialized once with orjson (about 0.03 ms per MB) and never formatted for logs.

- Shutdown. A job-take in flight when SIGTERM arrives can return jobs after the SDK's ``run_jobs`` has
  stopped draining its queue; the SDK then never runs or answers them. ``EagerJobScaler`` runs them.

Everything else (job-take URLs and batching, the stop channel, heartbeats, SIGTERM draining, per-job
cancellation) is the SDK's own code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson
from runpod.serverless.modules import rp_http, rp_scale
from runpod.serverless.modules.rp_scale import JobScaler

log = logging.getLogger("gateway")

SLOT_WAIT_CEILING = 1.0  # seconds; what the SDK waited unconditionally


def job_result(output: Any) -> dict:
    """The body runpod's ``run_job`` builds from a handler's return value (``error`` lifted to the top)."""
    if not isinstance(output, dict):
        return {"output": output}
    output = dict(output)
    result: dict = {}
    error = output.pop("error", None)
    if output:
        result["output"] = output
    if error:
        result["error"] = error
    return result


async def send_job_result(session: Any, job: dict, result: dict) -> None:
    """POST ``result`` to runpod's job-done URL for ``job``, as ``rp_http.send_result`` does."""
    url = rp_http.JOB_DONE_URL.replace("$ID", job["id"]) + "&isStream=false"
    body = orjson.dumps(result)  # bytes: aiohttp sends them as they are
    try:
        await rp_http._transmit(session, url, body)
    except Exception as error:  # the SDK logs and drops a failed post the same way
        log.error("could not post the result of job %s: %s", job["id"], type(error).__name__)


async def run_and_send(session: Any, config: dict, job: dict) -> None:
    """The handler on one job, then its result posted (runpod's ``handle_job`` without the log formatting)."""
    try:
        result = job_result(await config["handler"](job))
    except Exception:
        log.exception("job %s failed unexpectedly", job["id"])
        result = {"error": "internal error while processing this job"}
    await send_job_result(session, job, result)


class EagerJobScaler(JobScaler):
    """``JobScaler`` that refills a slot as soon as it frees and posts results without extra passes."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.jobs_handler = run_and_send
        self._slot_freed = asyncio.Event()

    async def handle_job(self, session: Any, job: dict) -> None:
        try:
            await super().handle_job(session, job)
        finally:
            self._slot_freed.set()

    async def get_jobs(self, session: Any) -> None:
        """The SDK's intake loop, waiting for a free slot instead of sleeping a second."""
        while self.is_alive():
            await self.set_scale()
            self._slot_freed.clear()
            needed = self.current_concurrency - self.current_occupancy()
            if needed <= 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot_freed.wait(), SLOT_WAIT_CEILING)
                continue
            await self._take(session, needed)

    async def _take(self, session: Any, needed: int) -> None:
        try:
            jobs = await asyncio.wait_for(self.jobs_fetcher(session, needed), timeout=self.jobs_fetcher_timeout)
        except rp_scale.TooManyRequests:
            await asyncio.sleep(5)  # the SDK's debounce
            return
        except TimeoutError:
            return
        except Exception as error:
            log.error("could not take jobs: %s", type(error).__name__)
            await asyncio.sleep(1)
            return
        for job in jobs or []:
            await self.jobs_queue.put(job)
            self.job_progress.add(job)
        if jobs and not self.is_alive():
            await self._drain(session)

    async def _drain(self, session: Any) -> None:
        """Run what a take brought in after shutdown began: ``run_jobs`` may have stopped draining already,
        and a job taken from the platform must be answered (runpod's own loop loses it in that window)."""
        tasks = []
        while not self.jobs_queue.empty():
            tasks.append(asyncio.create_task(self.handle_job(session, self.jobs_queue.get_nowait())))
        await asyncio.gather(*tasks, return_exceptions=True)


def install() -> None:
    """Make runpod's ``run_worker`` build an ``EagerJobScaler`` (it looks ``rp_scale.JobScaler`` up at run time)."""
    rp_scale.JobScaler = EagerJobScaler

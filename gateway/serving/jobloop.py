"""Runpod's production job loop, adapted so that one worker keeps a GPU busy and no job API answer can
take it down.

runpod 1.12's ``JobScaler`` (pinned; ``tests/test_jobloop.py`` fails on an SDK whose internals moved)
keeps its stop channel (per-job cancellation; each answer read by ``jobintake.take_stop_signals``, within
a size bound), heartbeats and SIGTERM handling; ``EagerJobScaler`` replaces these steps:

- Intake. ``JobScaler.get_jobs`` sleeps a whole second whenever it runs ``CONCURRENCY`` jobs, so a worker
  took at most about ``CONCURRENCY`` jobs a second whatever its speed. Here intake waits for room (an
  event set when any job ends, with the same one-second ceiling) and asks for as many jobs as there is
  room for at once (job-take-batch). While jobs run and less than a quarter of the room is free, it lets
  ``TAKE_GATHER`` pass before taking, so that one job-take brings several jobs (one per job ending cost
  the intake more than its jobs' dispatch, bench.worker). Jobs are read and validated by ``jobintake``: a
  malformed entry is logged and skipped, or answered with an error when it has an id; the rest of its
  batch runs.
- Dispatch. ``JobScaler.run_jobs`` wakes every 0.1 s, and with jobs running waits on all of them at
  each wake (a callback added to and removed from every running job, each time any job ends). Here
  jobs start when one is queued or one ends (an event), and each job leaves the running set by its own
  done-callback; with nothing to do the loop wakes once a second (``ROOM_WAIT_CEILING``), to notice a
  shutdown signalled between the event loop's wake-ups.
- Readiness. While ``concurrency_modifier`` answers 0 (the worker cannot serve: Triton is down), no job
  is taken; the queue is not resized.
- Results. A job's result is posted by its own task, on a post thread (``result_post``), with a
  per-attempt timeout, retries with backoff and an overall deadline (``RESULT_POST_DEADLINE``): a
  job-done POST that hangs takes no job's place. The job stays in runpod's in-progress list (heartbeats)
  until its post ends; at most ``CONCURRENCY`` posts wait beside the running jobs, beyond that they take
  jobs' places again, so memory stays bounded. The body is serialized once with orjson (runpod's path
  formats it into debug f-strings and ``json.dumps`` on the event loop: ~6 ms per MB).
- Shutdown. SIGTERM stops intake: a job-take in flight gets ``TAKE_GRACE`` seconds to deliver what it
  has (jobs it brings are run and answered), then is abandoned; the stop channel's long poll is
  abandoned; jobs in flight finish (each bounded by its own deadlines) and their results are posted
  (within ``RESULT_POST_DEADLINE``). With no job in flight the loop ends within ``TAKE_GRACE`` + 1 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable
from typing import Any

from runpod.http_client import AsyncClientSession
from runpod.serverless.modules import rp_job, rp_scale
from runpod.serverless.modules.rp_scale import JobScaler

from gateway.serving.jobintake import Intake, Unreadable, take_jobs, take_stop_signals
from gateway.serving.result_post import RESULT_POST_DEADLINE, ResultPosts

log = logging.getLogger("gateway")

ROOM_WAIT_CEILING = 1.0  # seconds; what the SDK waited unconditionally
TAKE_GRACE = 3.0  # seconds a job-take in flight at SIGTERM may still take
TAKE_FRACTION = 4  # with less than 1/4 of the room free and jobs running, room is gathered first ...
TAKE_GATHER = 0.05  # ... for this many seconds: one job-take then brings several jobs
INTERNAL_ERROR = "internal error while processing this job"


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


async def run_handler(config: dict, job: dict) -> dict:
    """The handler's answer to ``job`` in runpod's result shape; an unexpected failure is a clean error."""
    try:
        return job_result(await config["handler"](job))
    except Exception:
        log.exception("job %s failed unexpectedly", job["id"])
        return {"error": INTERNAL_ERROR}


class EagerJobScaler(JobScaler):
    """``JobScaler`` with validated intake, a readiness gate, detached result posts and bounded shutdown."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.jobs_fetcher = take_jobs
        self.stop_signals_fetcher = take_stop_signals
        self._job_ended = asyncio.Event()  # a job or a post ended, or the worker is stopping
        self._dispatch = asyncio.Event()  # a job was queued or ended, or the worker is stopping
        self._posting: set[str] = set()
        self._posts: set[asyncio.Future] = set()
        self._paused = False
        self.results: ResultPosts = config.get("results") or ResultPosts()  # the service's progress goes here too

    # ------------------------------------------------------------------ the loop's three tasks

    async def run(self) -> None:
        async with AsyncClientSession() as session:
            stop_channel = asyncio.create_task(self.monitor_stop_signals(session))
            try:
                await asyncio.gather(self.get_jobs(session), self.run_jobs(session))
                if self._posts:
                    await asyncio.wait(self._posts, timeout=RESULT_POST_DEADLINE + 5)
            finally:
                self.results.close()
                stop_channel.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await stop_channel

    async def monitor_stop_signals(self, session: Any) -> None:
        """runpod's stop-channel loop, with ``take_stop_signals`` reading each answer; none when the
        stop channel cannot be derived from the job-take URL (runpod checks that only for its own reader)."""
        if rp_job._job_stop_url() is None:
            log.warning("no stop channel can be derived from the job-take URL; per-job stop is disabled")
            return
        await super().monitor_stop_signals(session)

    def kill_worker(self) -> None:
        """Stop, and wake the intake and the dispatcher, which wait for ``_job_ended`` and ``_dispatch``."""
        super().kill_worker()
        self._job_ended.set()
        self._dispatch.set()

    @staticmethod
    async def _woken(event: asyncio.Event) -> None:
        """Until ``event`` is set, or ``ROOM_WAIT_CEILING`` seconds have passed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ROOM_WAIT_CEILING):  # no task of its own per wait, as wait_for makes
                await event.wait()

    async def run_jobs(self, session: Any) -> None:
        """Start queued jobs while there is room, until the worker stops and the queue is empty; then
        wait for the running jobs (a failure other than a stop is logged)."""
        running: set[asyncio.Task] = set()
        while self.is_alive() or not self.jobs_queue.empty():
            while len(running) < self.current_concurrency and not self.jobs_queue.empty():
                job = self.jobs_queue.get_nowait()
                task = asyncio.create_task(self.handle_job(session, job))
                running.add(task)
                task.add_done_callback(running.discard)
                self.jobs_tasks[job["id"]] = task
            self._dispatch.clear()
            await self._woken(self._dispatch)
        for outcome in await asyncio.gather(*running, return_exceptions=True):
            if isinstance(outcome, Exception):
                log.error("a job failed while the worker stopped: %s", type(outcome).__name__)

    def current_occupancy(self) -> int:
        """Jobs queued or running; results waiting for their post count only beyond ``CONCURRENCY``."""
        posting = len(self._posting)
        return super().current_occupancy() - min(posting, self.current_concurrency)

    async def set_scale(self) -> int:  # type: ignore[override]
        """The concurrency the modifier asks for now; 0 pauses intake without resizing the queue."""
        wanted = self.concurrency_modifier(self.current_concurrency)
        if wanted <= 0:
            if not self._paused:
                log.warning("taking no jobs: the worker cannot serve them right now")
            self._paused = True
            return 0
        if self._paused:
            log.info("taking jobs again")
        self._paused = False
        if wanted != self.current_concurrency or self.jobs_queue.maxsize != wanted:
            while self.current_occupancy() > 0:  # the SDK's rule: resize only with nothing in flight
                await asyncio.sleep(0.1)
            self.current_concurrency = wanted
            self.jobs_queue = asyncio.Queue(maxsize=wanted)
        return wanted

    async def get_jobs(self, session: Any) -> None:
        """Take jobs whenever there is room and the worker can serve; wait for room otherwise."""
        gathered = False
        while self.is_alive():
            self._job_ended.clear()
            wanted = await self.set_scale()
            occupancy = self.current_occupancy()
            needed = wanted - occupancy
            if needed <= 0:
                await self._woken(self._job_ended)  # room, or shutdown
                continue
            if needed < wanted // TAKE_FRACTION and occupancy > 0 and not gathered:
                gathered = True  # let a few more jobs end, then take for all of them at once
                await asyncio.sleep(TAKE_GATHER)
                continue
            gathered = False
            await self._take(session, needed)

    async def _take(self, session: Any, needed: int) -> None:
        take = asyncio.ensure_future(self.jobs_fetcher(session, needed))
        stop = asyncio.ensure_future(self._shutdown_event.wait())
        try:
            await asyncio.wait([take, stop], timeout=self.jobs_fetcher_timeout, return_when=asyncio.FIRST_COMPLETED)
            if not take.done() and stop.done():  # SIGTERM: the take may still bring jobs, briefly
                await asyncio.wait([take], timeout=TAKE_GRACE)
            if not take.done():
                take.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await take
                return
            intake = take.result()
        except rp_scale.TooManyRequests:
            await asyncio.sleep(5)  # the SDK's debounce
            return
        except Exception as error:  # whatever the job API answered, the loop goes on
            log.error("could not take jobs: %s", error if isinstance(error, Unreadable) else type(error).__name__)
            await asyncio.sleep(1)
            return
        finally:
            stop.cancel()
        await self._accept(session, intake if isinstance(intake, Intake) else Intake(jobs=list(intake or [])))

    async def _accept(self, session: Any, intake: Intake) -> None:
        """Queue the valid jobs and answer the refused ones; jobs brought in after shutdown began are run
        here (``run_jobs`` may have stopped draining already; runpod's own loop loses them)."""
        for job_id, error in intake.refused:
            self.job_progress.add(job_id)  # in the heartbeats' list until answered, as a job that runs is
            self._post_later(job_id, {"error": error})
        running = set(self.jobs_tasks) | self._posting
        for job in intake.jobs:
            if job["id"] in running:
                log.error("job %s was taken again while in progress; the repeat is skipped", job["id"])
                continue
            await self.jobs_queue.put(job)
            self.job_progress.add(job["id"])
            self._dispatch.set()
        if intake.jobs and not self.is_alive():
            tasks = []
            while not self.jobs_queue.empty():
                tasks.append(asyncio.create_task(self.handle_job(session, self.jobs_queue.get_nowait())))
            await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ one job

    async def handle_job(self, session: Any, job: dict) -> None:
        """Run ``job`` (cancellable through the stop channel); its place frees as soon as ``answer``
        returns, while its answer may still be on its way (it stays in the heartbeats' list until then)."""
        token = rp_scale._set_batch_id(job.get("batchId"))
        job_id = job["id"]
        try:
            await self.answer(session, job)
            if self.config.get("refresh_worker", False):
                self.kill_worker()
        except asyncio.CancelledError:
            log.info("job %s stopped", job_id)
            raise
        finally:
            self.jobs_queue.task_done()
            self.jobs_tasks.pop(job_id, None)
            if job_id not in self._posting:
                self.job_progress.remove(job_id)
            rp_scale._reset_batch_id(token)
            self._job_ended.set()
            self._dispatch.set()

    async def answer(self, session: Any, job: dict) -> None:
        """Run the handler on ``job`` here; its result is posted by a task of its own."""
        result = await run_handler(self.config, job)
        self._post_later(job["id"], result)

    def _post_later(self, job_id: str, result: dict) -> None:
        self._answering(job_id, self.results.post(job_id, result))

    def _answering(self, job_id: str, answer: Awaitable) -> None:
        """``job_id``'s answer is on its way (``answer`` ends when it has arrived or was given up). The job
        is in the heartbeats' list (since ``_accept``) and stays there until then."""
        self._posting.add(job_id)
        future = asyncio.ensure_future(answer)  # a lane's future stays itself: no task per job to wait on it
        self._posts.add(future)
        future.add_done_callback(functools.partial(self._answered, job_id))

    def _answered(self, job_id: str, future: asyncio.Future) -> None:
        self._posts.discard(future)
        self._posting.discard(job_id)
        self.job_progress.remove(job_id)
        self._job_ended.set()
        if not future.cancelled() and future.exception() is not None:
            log.error("posting the result of job %s failed: %r", job_id, future.exception())


def install(scaler: type[EagerJobScaler] = EagerJobScaler) -> None:
    """Make runpod's ``run_worker`` build ``scaler`` (it looks ``rp_scale.JobScaler`` up at run time)."""
    rp_scale.JobScaler = scaler

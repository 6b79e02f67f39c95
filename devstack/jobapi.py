"""A loopback stand-in for Runpod's job API, to run ``python -m gateway`` as it is deployed.

Without ``--rp_serve_api`` the worker runs runpod's production job loop: it long-polls
``RUNPOD_WEBHOOK_GET_JOB`` (``/job-take/<worker>``, or ``/job-take-batch/<worker>?batch_size=N`` when
there is room for several jobs), posts each result to ``RUNPOD_WEBHOOK_POST_OUTPUT`` (``/job-done/<worker>/<job>``)
and long-polls ``/job-stop/<worker>`` for cancellations (``cancel`` queues one); its heartbeat
process pings ``/ping/<worker>`` with the jobs in progress when ``ping_env`` is set. This server speaks that
protocol on 127.0.0.1: jobs are queued with ``submit``, every result is recorded (so a test can see a job
answered twice), as are progress updates (runpod's ``progress_update`` posts ``{"status": "IN_PROGRESS"}``
to the same URL), and the number of jobs in flight is tracked. For tests and benchmarks only; the worker
does not use it.

It can also misbehave as a job API might: answer a take with a raw body (``raw_takes``), hold job-takes
open (``hang_takes``), or let a job's first job-done POST hang and drop it unrecorded (``hang_done``).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections import defaultdict, deque
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, unquote, urlparse

from devstack.local import LOOPBACK_ONLY, LoopbackServer, QuietHandler

LONG_POLL = 0.5  # seconds an empty job-take or stop poll is held open before answering 204 (by default)
HANG = 40.0  # seconds a hanging take or post stays open


class JobApi(LoopbackServer):
    def __init__(self, long_poll: float = LONG_POLL) -> None:
        self.long_poll = long_poll
        self.queue: deque[dict] = deque()
        self.results: defaultdict[str, list[dict]] = defaultdict(list)
        self.progress: defaultdict[str, list[object]] = defaultdict(list)  # IN_PROGRESS posts
        self.taken_at: dict[str, float] = {}
        self.done_at: dict[str, float] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.takes = {"job-take": 0, "job-take-batch": 0}
        self.raw_takes: deque[bytes] = deque()  # answered, in order, to the next takes as they are
        self.hang_takes = False  # takes stay open (up to HANG seconds) without an answer
        self.hang_done: set[str] = set()  # job ids whose first job-done POST hangs, then is dropped
        self.stops: deque[str] = deque()  # job ids the next stop-channel poll tells the worker to stop
        self.pings: list[set[str]] = []  # the in-progress job ids of each heartbeat (``ping_env``)
        self.stopping = threading.Event()  # ends the hangs
        self.failure: str | None = None  # set by ``fail``: every wait_for raises it
        self._lock = threading.Condition()
        super().__init__(self._handler())

    def env(self, worker_id: str = "worker-1") -> dict[str, str]:
        """The variables that point runpod's job loop at this server (and skip runpod's start-up fitness
        checks, one of which connects to a public DNS server)."""
        return {
            **LOOPBACK_ONLY,
            "RUNPOD_WEBHOOK_GET_JOB": f"{self.base}/job-take/$ID?gpu=standin",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{self.base}/job-done/$RUNPOD_POD_ID/$ID?gpu=standin",
            "RUNPOD_POD_ID": worker_id,
        }

    def ping_env(self, interval_ms: int = 1000) -> dict[str, str]:
        """The variables that start runpod's heartbeat process, pinging this server."""
        return {
            "RUNPOD_AI_API_KEY": "stand-in",
            "RUNPOD_WEBHOOK_PING": f"{self.base}/ping/$RUNPOD_POD_ID",
            "RUNPOD_PING_INTERVAL": str(interval_ms),
        }

    def submit(self, job_input: dict, job_id: str | None = None, **fields: object) -> str:
        """Queue a job; ``fields`` go beside ``input`` (e.g. ``s3Config``, as Runpod sends it)."""
        job_id = job_id or uuid.uuid4().hex
        with self._lock:
            self.queue.append({"id": job_id, "input": job_input, **fields})
            self._lock.notify_all()
        return job_id

    def cancel(self, job_id: str) -> None:
        """Tell the worker to stop ``job_id`` (through its stop channel, as a cancelled request is)."""
        with self._lock:
            self.stops.append(job_id)
            self._lock.notify_all()

    def _stops(self) -> list[str]:
        deadline = time.monotonic() + self.long_poll
        with self._lock:
            while not self.stops and (remaining := deadline - time.monotonic()) > 0:
                self._lock.wait(remaining)
            stops = list(self.stops)
            self.stops.clear()
            return stops

    def wait_for(self, job_ids: list[str], timeout: float) -> dict[str, dict]:
        """The first result of each job; raises TimeoutError naming how many are missing, or what ``fail``
        was told."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while any(job_id not in self.results for job_id in job_ids):
                if self.failure is not None:
                    raise RuntimeError(self.failure)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sum(job_id not in self.results for job_id in job_ids)
                    raise TimeoutError(f"{missing} of {len(job_ids)} jobs unanswered after {timeout:g} s")
                self._lock.wait(remaining)
            return {job_id: self.results[job_id][0] for job_id in job_ids}

    def fail(self, reason: str) -> None:
        """Make every ``wait_for``, now and later, raise ``reason`` (the worker that would answer is gone)."""
        with self._lock:
            self.failure = reason
            self._lock.notify_all()

    def _take(self, count: int) -> list[dict]:
        deadline = time.monotonic() + self.long_poll
        with self._lock:
            while not self.queue and (remaining := deadline - time.monotonic()) > 0:
                self._lock.wait(remaining)
            jobs = [self.queue.popleft() for _ in range(min(count, len(self.queue)))]
            now = time.monotonic()
            for job in jobs:
                self.taken_at[job["id"]] = now
            self.in_flight += len(jobs)
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return jobs

    def stop(self) -> None:
        self.stopping.set()
        super().stop()

    def _done(self, job_id: str, result: dict) -> None:
        with self._lock:
            if job_id not in self.results and job_id in self.taken_at:
                self.in_flight -= 1
                self.done_at[job_id] = time.monotonic()
            self.results[job_id].append(result)
            self._lock.notify_all()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(QuietHandler):
            def reply(self, status: int, body: object = None) -> None:
                data = b"" if body is None else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the worker hung up (SIGTERM)
                    self.end_headers()
                    self.wfile.write(data)

            def do_GET(self) -> None:
                url = urlparse(self.path)
                kind = url.path.split("/")[1]
                if kind == "ping":
                    listed = parse_qs(url.query).get("job_id", [""])[0]
                    api.pings.append({job_id for job_id in listed.split(",") if job_id})
                    self.reply(200, {})
                    return
                if kind == "job-stop":
                    stops = api._stops()
                    if stops:
                        self.reply(200, {"jobsToStop": stops})
                    else:
                        self.reply(204)
                    return
                if kind not in api.takes:
                    self.reply(404)
                    return
                api.takes[kind] += 1
                if api.raw_takes:
                    body = api.raw_takes.popleft()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if api.hang_takes:
                    api.stopping.wait(HANG)
                    self.close_connection = True
                    return
                count = int(parse_qs(url.query).get("batch_size", ["1"])[0]) if kind == "job-take-batch" else 1
                jobs = api._take(count)
                if not jobs:
                    self.reply(204)
                else:
                    self.reply(200, jobs if kind == "job-take-batch" else jobs[0])

            def do_POST(self) -> None:
                url = urlparse(self.path)
                parts = url.path.split("/")
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if parts[1] != "job-done" or len(parts) != 4:
                    self.reply(404)
                    return
                posted = json.loads(body)
                job_id = unquote(parts[3])
                if job_id in api.hang_done:  # the first post of this job never gets through
                    api.hang_done.discard(job_id)
                    api.stopping.wait(HANG)
                    self.close_connection = True
                    return
                if posted.get("status") == "IN_PROGRESS":  # runpod's progress_update posts here too
                    api.progress[job_id].append(posted.get("output"))
                else:
                    api._done(job_id, posted)
                self.reply(200, {})

        return Handler

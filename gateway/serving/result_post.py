"""Job-done POSTs to runpod's job API, sent from threads of their own.

``post_result`` sends one job's result as runpod's ``rp_http.send_result`` does (same URL and headers),
serialized once with orjson, with a per-attempt timeout, retries with backoff (connection errors,
timeouts, 429 and 5xx) and an overall deadline: a job-done POST that hangs takes no job's place. The
answer's status decides; its body is read only within ``ANSWER_BYTES`` (an endless one had held the post
until its timeout, all of it in memory).

``ResultPosts`` runs those posts on ``POST_THREADS`` threads, each with its own event loop and HTTP
session; the job loop only waits for them. Progress updates (runpod's ``progress_update``, which started a
thread, an event loop and an HTTP session for each update) go the same way, and a job's result is posted
after its updates in flight. A 3D job's body is about 8 MB of base64: serializing it and
sending it (orjson, aiohttp's join of headers and body, asyncio's send buffer, the kernel's copy) held
the job loop's thread about 11 ms per post (``bench.worker``), much of it the kernel's copy, which
releases the GIL. A large body goes out in pieces (``pieces``), without the join and the buffer's copies.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import quote

import aiohttp
import orjson
from runpod.http_client import AsyncClientSession
from runpod.serverless.modules import rp_http

from gateway.serving.jobintake import Unreadable, read_bounded

log = logging.getLogger("gateway")

RESULT_POST_ATTEMPT = 10.0  # seconds for one job-done POST
RESULT_POST_DEADLINE = 60.0  # seconds for all attempts of one job's result
POST_THREADS = 2
PROGRESS_DEADLINE = 5.0  # seconds for a progress update, all attempts
ANSWER_BYTES = 64 << 10  # of a job-done answer read (its status is what counts)
BODY_PIECE = 256 << 10  # a larger body is sent in pieces of this size


def pieces(body: bytes) -> bytes | AsyncIterator[memoryview]:
    """``body`` for aiohttp: as it is when small, else in views of ``BODY_PIECE`` bytes. Given whole,
    aiohttp joins it to the headers and asyncio (Python 3.11) copies what the socket did not take at once
    into its buffer, the 5.4 MB body of all five 2D tasks three times over; in pieces each is a view of
    it, written as the socket drains (``bench/lane_copies.py``: 2.7 -> 2.3 ms of CPU per 5.4 MB post)."""
    if len(body) <= BODY_PIECE:
        return body

    async def views() -> AsyncIterator[memoryview]:
        whole = memoryview(body)
        for at in range(0, len(whole), BODY_PIECE):
            yield whole[at : at + BODY_PIECE]

    return views()


async def post_result(
    session: aiohttp.ClientSession,
    job_id: str,
    result: dict,
    deadline: float = RESULT_POST_DEADLINE,
    attempt_timeout: float = RESULT_POST_ATTEMPT,
    what: str = "result",
) -> bool:
    """POST ``result`` to runpod's job-done URL for ``job_id`` (as ``rp_http.send_result`` does), retrying
    connection errors, timeouts, 429 and 5xx with backoff until ``deadline`` seconds have passed."""
    url = rp_http.JOB_DONE_URL.replace("$ID", quote(job_id, safe="")) + "&isStream=false"
    body = orjson.dumps(result)
    headers = {
        "charset": "utf-8", "Content-Type": "application/x-www-form-urlencoded", "X-Request-ID": job_id,
        "Content-Length": str(len(body)),  # given, so that a body in pieces is still sent as it is, not chunked
    }  # fmt: skip
    ends = time.monotonic() + deadline
    attempt, outcome = 0, "no attempt"
    while (remaining := ends - time.monotonic()) > 0:
        try:
            async with asyncio.timeout(min(attempt_timeout, remaining)):
                async with session.post(url, data=pieces(body), headers=headers) as response:
                    with contextlib.suppress(Unreadable):  # not used; read (the connection is kept) within a bound
                        await read_bounded(response, ANSWER_BYTES, "job-done answer")
                    if response.status < 300:
                        return True
                    outcome = f"HTTP {response.status}"
                    if response.status < 500 and response.status not in (408, 429):
                        break  # refused: another attempt would be refused too
        except TimeoutError:
            outcome = "timed out"
        except aiohttp.ClientError as error:
            outcome = type(error).__name__
        attempt += 1
        await asyncio.sleep(min(0.5 * 2**attempt, 5.0, max(ends - time.monotonic(), 0)))
    log.error("could not post the %s of job %s (%s, %d attempts)", what, job_id, outcome, attempt + 1)
    return False


class PostThread:
    """One thread running an event loop with its own runpod HTTP session (auth headers from the env)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.in_flight = 0
        self.posts = 0
        self._session: aiohttp.ClientSession | None = None
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="result-post", daemon=True)
        self._thread.start()
        ready.wait()

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def open_session() -> None:
            self._session = AsyncClientSession()

        self.loop.run_until_complete(open_session())
        ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self._session.close())  # type: ignore[union-attr]
        self.loop.close()

    async def run(self, post: Callable[[aiohttp.ClientSession], Awaitable[bool]]) -> bool:
        """``post(session)`` on this thread's loop; cancelling the caller cancels it there."""
        assert self._session is not None
        self.in_flight += 1
        self.posts += 1
        try:
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(post(self._session), self.loop))
        finally:
            self.in_flight -= 1

    def stop(self, timeout: float) -> None:
        """Stop the loop (posts still running there are dropped) and close the session."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)


class ResultPosts:
    """Job results and progress updates posted from ``threads`` threads (started at the first post), each
    post on the one with the fewest in flight (of those, the one that took the fewest). Use from one event
    loop."""

    def __init__(self, threads: int = POST_THREADS) -> None:
        self.threads = threads
        self._threads: list[PostThread] = []
        self._updates: dict[str, set[asyncio.Future]] = {}  # progress posts in flight, per job

    async def post(self, job_id: str, result: dict) -> bool:
        """``post_result`` for ``job_id``, on a post thread, after the job's progress updates in flight."""
        if updates := self._updates.get(job_id):
            await asyncio.wait(set(updates))  # each within PROGRESS_DEADLINE: none arrives after the result
        return await self._run(lambda session: post_result(session, job_id, result))

    def progress_update(self, job: dict, progress: object) -> None:
        """runpod's ``progress_update(job, progress)``: ``{"status": "IN_PROGRESS", "output": progress}`` to
        the job-done URL, best effort (``PROGRESS_DEADLINE``), from a post thread rather than a thread and
        HTTP session of its own per update as runpod's does; the job's result waits for it."""
        job_id, update = job["id"], {"status": "IN_PROGRESS", "output": progress}
        task = asyncio.ensure_future(
            self._run(lambda session: post_result(session, job_id, update, PROGRESS_DEADLINE, what="progress"))
        )
        self._updates.setdefault(job_id, set()).add(task)
        task.add_done_callback(functools.partial(self._updated, job_id))

    def _updated(self, job_id: str, task: asyncio.Future) -> None:
        updates = self._updates.get(job_id, set())
        updates.discard(task)
        if not updates:
            self._updates.pop(job_id, None)

    async def _run(self, post: Callable[[aiohttp.ClientSession], Awaitable[bool]]) -> bool:
        if not self._threads:
            self._threads = [PostThread() for _ in range(self.threads)]
        thread = min(self._threads, key=lambda candidate: (candidate.in_flight, candidate.posts))
        return await thread.run(post)

    def close(self, timeout: float = 5.0) -> None:
        for thread in self._threads:
            thread.stop(timeout)
        self._threads = []

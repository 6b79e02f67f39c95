"""Jobs against Runpod's async API: ``POST /run``, then ``GET /status/{id}`` until the job ends.

What is retried, with exponential backoff and full jitter (``backoff``): HTTP 429 and 5xx, timeouts and
broken connections, and lost jobs: ``/status`` answering 404 or "Job ID not found" (Runpod's local API
forgets a job once reported; a deployed endpoint forgets results after 30 minutes), or a job that stays
queued or unknown past ``job_timeout``, or ends CANCELLED or TIMED_OUT. What is not: a job that FAILED
with its own error (the request was wrong: retrying cannot help) and per-image errors inside a
completed job (they are that image's answer).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from urllib.parse import quote

import aiohttp

ENDED = {"COMPLETED", "FAILED"}
LOST = {"CANCELLED", "TIMED_OUT"}


class Retryable(Exception):
    """Worth another try: the endpoint was busy, failing, slow, or lost the job."""


class LostJob(Retryable):
    """The endpoint no longer knows the job: submit it again rather than keep asking."""


class JobFailed(Exception):
    """Gave up: the message says why (the last reason seen)."""


class WrongMethod(Exception):
    """405: Runpod's local API takes ``POST /status``, a deployed endpoint documents ``GET``."""


def backoff(attempt: int, base: float, cap: float = 30.0) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(cap, base * 2**attempt))


class Endpoint:
    def __init__(
        self,
        base_url: str,
        headers: dict[str, str],
        retries: int = 6,
        request_timeout: float = 600.0,
        job_timeout: float = 3600.0,
        backoff_base: float = 0.5,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = headers
        self.retries = retries
        self.request_timeout = request_timeout
        self.job_timeout = job_timeout
        self.backoff_base = backoff_base
        self.status_method = "GET"  # switched to POST for good on a 405 (Runpod's local API)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Endpoint:
        self._session = aiohttp.ClientSession(headers=self.headers)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._session is not None
        await self._session.close()

    async def run(self, payload: dict) -> dict:
        """The job's final ``/status`` reply (COMPLETED, or FAILED with its own error); raises JobFailed."""
        return await self._with_retries(lambda: self._submit_and_wait(payload))

    async def runsync(self, payload: dict) -> dict:
        """One ``/runsync`` request (single images), with the same retries."""
        return await self._with_retries(lambda: self._runsync_once(payload))

    async def _with_retries(self, attempt: Callable[[], Awaitable[dict]]) -> dict:
        reason = "no attempt"
        for number in range(self.retries + 1):
            if number:
                await asyncio.sleep(backoff(number - 1, self.backoff_base))
            try:
                return await attempt()
            except Retryable as error:
                reason = str(error)
        raise JobFailed(f"gave up after {self.retries + 1} attempts: {reason}")

    async def _submit_and_wait(self, payload: dict) -> dict:
        return await self._wait(await self._submit(payload))

    async def _runsync_once(self, payload: dict) -> dict:
        reply = await self._request("POST", "/runsync", {"input": payload})
        if reply.get("status") in ENDED:
            return reply
        job_id = reply.get("id")
        if not isinstance(job_id, str) or not 0 < len(job_id) <= 256:  # still running, yet no id to ask about
            raise Retryable(f"/runsync answered without an end or a job id: {str(reply)[:100]}")
        return await self._wait(quote(job_id, safe=""))

    async def _submit(self, payload: dict) -> str:
        reply = await self._request("POST", "/run", {"input": payload})
        job_id = reply.get("id")
        if not isinstance(job_id, str) or not 0 < len(job_id) <= 256:
            raise Retryable(f"/run answered without a job id: {str(reply)[:100]}")
        return quote(job_id, safe="")

    async def _wait(self, job_id: str) -> dict:
        deadline = time.monotonic() + self.job_timeout
        pause, busy = 0.2, 0
        while time.monotonic() < deadline:
            try:
                reply = await self._request(self.status_method, f"/status/{job_id}")
            except WrongMethod:
                self.status_method = "POST"
                continue
            except LostJob:
                raise
            except Retryable:
                if busy >= self.retries:
                    raise
                busy += 1  # a status call refused or slow: wait and ask again, the job may be fine
                await asyncio.sleep(backoff(busy, self.backoff_base))
                continue
            status = reply.get("status")
            if status == "FAILED" and "not found" in str(reply.get("error", "")).lower():
                raise LostJob("the endpoint lost the job")
            if status in ENDED:
                return reply
            if status in LOST:
                raise LostJob(f"the job was {status.lower().replace('_', ' ')}")
            await asyncio.sleep(pause)
            pause = min(pause * 1.5, 2.0)
        raise Retryable(f"the job did not end within {self.job_timeout:g} s")

    async def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(total=self.request_timeout)
        route = path.split("/")[1]
        try:
            async with self._session.request(method, self.base_url + path, json=body, timeout=timeout) as response:
                if response.status == 405 and route == "status" and method == "GET":
                    raise WrongMethod
                if response.status == 404 and route == "status":
                    raise LostJob("the endpoint lost the job (404)")
                if response.status == 429 or response.status >= 500:
                    raise Retryable(f"HTTP {response.status} from {route}")
                if response.status >= 400:
                    raise JobFailed(f"HTTP {response.status} from {route}: {(await response.text())[:200]}")
                reply = await response.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError) as error:
            raise Retryable(f"{type(error).__name__} on {route}") from None
        except ValueError:
            raise Retryable(f"{route} answered something that is not JSON") from None
        if not isinstance(reply, dict):
            raise Retryable(f"{route} answered JSON that is not an object")
        return reply

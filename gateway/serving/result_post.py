"""Job-done POSTs to runpod's job API.

``post_result`` sends one job's result as runpod's ``rp_http.send_result`` does (same URL and headers),
serialized once with orjson, with a per-attempt timeout, retries with backoff (connection errors,
timeouts, 429 and 5xx) and an overall deadline: a job-done POST that hangs takes no job's place.
"""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import quote

import aiohttp
import orjson
from runpod.serverless.modules import rp_http

log = logging.getLogger("gateway")

RESULT_POST_ATTEMPT = 10.0  # seconds for one job-done POST
RESULT_POST_DEADLINE = 60.0  # seconds for all attempts of one job's result


async def post_result(
    session: aiohttp.ClientSession,
    job_id: str,
    result: dict,
    deadline: float = RESULT_POST_DEADLINE,
    attempt_timeout: float = RESULT_POST_ATTEMPT,
) -> bool:
    """POST ``result`` to runpod's job-done URL for ``job_id`` (as ``rp_http.send_result`` does), retrying
    connection errors, timeouts, 429 and 5xx with backoff until ``deadline`` seconds have passed."""
    url = rp_http.JOB_DONE_URL.replace("$ID", quote(job_id, safe="")) + "&isStream=false"
    body = orjson.dumps(result)  # bytes: aiohttp sends them as they are
    headers = {"charset": "utf-8", "Content-Type": "application/x-www-form-urlencoded", "X-Request-ID": job_id}
    ends = time.monotonic() + deadline
    attempt, outcome = 0, "no attempt"
    while (remaining := ends - time.monotonic()) > 0:
        try:
            async with asyncio.timeout(min(attempt_timeout, remaining)):
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
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
    log.error("could not post the result of job %s (%s, %d attempts)", job_id, outcome, attempt + 1)
    return False

"""Job-done POSTs from post threads (``gateway.serving.result_post``), against the job-API stand-in."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import threading

import aiohttp
import pytest
from aiohttp import web
from runpod.serverless.modules import rp_http

from devstack.jobapi import JobApi
from gateway.serving import result_post
from gateway.serving.result_post import ResultPosts
from tests.servers import aiohttp_server


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch):
    stand_in = JobApi().start()
    url = stand_in.env()["RUNPOD_WEBHOOK_POST_OUTPUT"].replace("$RUNPOD_POD_ID", "worker-1")
    monkeypatch.setattr(rp_http, "JOB_DONE_URL", url)
    yield stand_in
    stand_in.stop()


def post_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "result-post"]


def test_results_are_posted_whole_from_the_post_threads_not_the_callers(
    api: JobApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    posted_from: dict[str, int] = {}
    real_post = result_post.post_result

    async def recorded(session: object, job_id: str, result: dict) -> bool:
        posted_from[job_id] = threading.get_ident()
        return await real_post(session, job_id, result)  # type: ignore[arg-type]

    monkeypatch.setattr(result_post, "post_result", recorded)
    bodies = {f"job-{n}": base64.b64encode(os.urandom(300_000 + n)).decode() for n in range(6)}

    async def run() -> list[bool]:
        results = ResultPosts(threads=2)
        try:
            posts = (results.post(job, {"output": {"mesh_b64": body}}) for job, body in bodies.items())
            at_once = await asyncio.gather(*posts)
            one_by_one = [await results.post(f"next-{n}", {"output": {}}) for n in range(4)]
            return at_once + one_by_one
        finally:
            results.close()

    assert asyncio.run(run()) == [True] * 10
    assert {job: [r["output"]["mesh_b64"] for r in api.results[job]] for job in bodies} == {
        job: [body] for job, body in bodies.items()
    }  # each once, every byte
    assert threading.get_ident() not in posted_from.values()

    def shares(jobs: list[str]) -> list[int]:
        threads = [posted_from[job] for job in jobs]
        return sorted(threads.count(thread) for thread in set(threads))

    assert shares(list(bodies)) == [3, 3]  # the fewest in flight
    assert shares([f"next-{n}" for n in range(4)]) == [2, 2]  # none in flight: in turn
    assert post_threads() == []  # closed


def test_cancelling_the_caller_cancels_its_post_and_others_still_arrive(
    api: JobApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    stopped = threading.Event()
    real_post = result_post.post_result

    async def post(session: object, job_id: str, result: dict) -> bool:
        if job_id == "slow":
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                stopped.set()
                raise
        return await real_post(session, job_id, result)  # type: ignore[arg-type]

    monkeypatch.setattr(result_post, "post_result", post)

    async def run() -> bool:
        results = ResultPosts(threads=1)
        try:
            slow = asyncio.create_task(results.post("slow", {"output": {}}))
            await asyncio.sleep(0.2)
            slow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await slow
            return await results.post("after", {"output": {"depth_min": 1.5}})
        finally:
            results.close()

    assert asyncio.run(run()) is True
    assert stopped.wait(5)
    assert "slow" not in api.results
    assert api.results["after"] == [{"output": {"depth_min": 1.5}}]


def test_a_refused_post_is_not_retried_and_says_so(api: JobApi, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rp_http, "JOB_DONE_URL", rp_http.JOB_DONE_URL.replace("/job-done/", "/no-such-route/"))

    async def run() -> bool:
        results = ResultPosts(threads=1)
        try:
            return await results.post("refused", {"output": {}})
        finally:
            results.close()

    assert asyncio.run(run()) is False  # a 404 is final: posting again would be refused again
    assert "refused" not in api.results


def test_a_job_done_answer_is_read_within_its_bound_and_its_status_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    """A job API whose job-done answers never end: an accepted result counts, a refused one is not retried
    (read whole, each such answer held its post until the attempt timed out, then it was tried again)."""

    async def endless(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(status=int(request.query["status"]))
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            while True:
                await response.write(b"x" * 65536)
        return response

    async def scenario() -> list[bool]:
        outcomes = []
        routes = [web.post("/job-done/worker/{job}", endless)]
        async with aiohttp_server(routes) as base, aiohttp.ClientSession() as session:
            for status in (200, 400):
                monkeypatch.setattr(rp_http, "JOB_DONE_URL", f"{base}/job-done/worker/$ID?status={status}")
                outcomes.append(await result_post.post_result(session, "j1", {"output": {}}, 6, attempt_timeout=2))
        return outcomes

    assert asyncio.run(scenario()) == [True, False]  # unbounded, the first read ran to each attempt's timeout


@pytest.mark.parametrize("size", [1000, 3 * result_post.BODY_PIECE + 12345])
def test_a_result_arrives_whole_with_its_length_and_again_on_a_retry(
    size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body over ``BODY_PIECE`` goes out in pieces: still one body with its Content-Length (not chunked),
    the same bytes on every attempt (the first answered 503)."""
    arrived: list[tuple[bytes, str | None, str | None]] = []

    async def done(request: web.Request) -> web.Response:
        arrived.append(
            (await request.read(), request.headers.get("Content-Length"), request.headers.get("Transfer-Encoding"))
        )
        return web.Response(status=503 if len(arrived) == 1 else 200)

    result = {"output": {"depth_png_b64": base64.b64encode(os.urandom(size * 3 // 4)).decode()}}

    async def scenario() -> bool:
        async with aiohttp_server([web.post("/job-done/worker/{job}", done)], max_body=16 << 20) as base:
            monkeypatch.setattr(rp_http, "JOB_DONE_URL", f"{base}/job-done/worker/$ID?x=1")
            async with aiohttp.ClientSession() as session:
                return await result_post.post_result(session, "j1", result, 20, attempt_timeout=5)

    assert asyncio.run(scenario())
    assert len(arrived) == 2
    for body, length, encoding in arrived:
        assert json.loads(body) == result
        assert length == str(len(body))
        assert encoding is None


def test_progress_updates_go_from_the_post_threads_and_before_their_jobs_result(
    api: JobApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """runpod's ``progress_update`` shape through ``ResultPosts``: every update of a job has arrived when its
    result does; an update the job API never answers holds the result at most ``PROGRESS_DEADLINE``."""
    monkeypatch.setattr(result_post, "PROGRESS_DEADLINE", 1.0)
    seen_with_result: dict[str, list] = {}
    real_done = api._done

    def recorded(job_id: str, result: dict) -> None:
        seen_with_result[job_id] = sorted(api.progress[job_id])  # the updates that had arrived by then
        real_done(job_id, result)

    monkeypatch.setattr(api, "_done", recorded)

    async def run() -> list[bool]:
        results = ResultPosts(threads=2)
        try:
            for n in range(1, 4):
                results.progress_update({"id": "job-a"}, f"{n}/3 images")
            first = await results.post("job-a", {"output": {"n": 1}})
            api.hang_done.add("job-b")  # its first post (the update) hangs and is dropped
            results.progress_update({"id": "job-b"}, "1/2 images")
            return [first, await results.post("job-b", {"output": {"n": 2}})]
        finally:
            results.close()

    assert asyncio.run(run()) == [True, True]
    assert seen_with_result == {"job-a": ["1/3 images", "2/3 images", "3/3 images"], "job-b": []}
    assert api.results["job-b"] == [{"output": {"n": 2}}]

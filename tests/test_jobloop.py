"""``python -m gateway`` as deployed: runpod's production job loop against a loopback stand-in for its
job API (``devstack.jobapi``), with the real Triton of the session behind it.

Every job must be answered exactly once, with its results intact, per-image errors in place and request
errors as the job's ``error``; jobs run concurrently; intake refills as jobs end (runpod alone slept a
second whenever it ran its ``CONCURRENCY`` jobs); SIGTERM lets the jobs in flight finish and post their results.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import aiohttp
import pytest
from aiohttp import web
from runpod.serverless.modules import rp_http, rp_job, rp_ping, rp_scale
from runpod.serverless.modules.worker_state import PingJobMirror

from devstack.jobapi import JobApi
from devstack.local import LoopbackServer, QuietHandler
from gateway.serving import heartbeat, jobintake, jobloop, result_post
from gateway.serving.triton_process import EmbeddedTriton
from tests import images
from tests.conftest import RELATIVE_ID
from tests.helpers import decode_image, wait_until
from tests.servers import aiohttp_server, running_image_server
from tests.test_robustness import GOOD_IMAGE, b64

ROOT = Path(__file__).resolve().parents[1]
BAD_IMAGE = b64(images.truncated_jpeg())


def start_worker(
    api: JobApi, triton: EmbeddedTriton, log_path: Path, concurrency: int, extra: dict[str, str] | None = None
) -> subprocess.Popen:
    env = {
        **(extra or {}),
        **api.env(),
        "TRITON_URL": triton.grpc_url,
        "TRITON_PORTS": f"{triton.grpc_port},{triton.http_port}",
        "DEPTH_MODEL": RELATIVE_ID,
        "CONCURRENCY": str(concurrency),
        "TRITON_TIMEOUT": "20",
    }
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway"], cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT
        )


@contextlib.contextmanager
def serving_worker(
    api: JobApi,
    triton: EmbeddedTriton,
    log_path: Path,
    concurrency: int,
    extra: dict[str, str] | None = None,
    timeout: float = 120,
) -> Iterator[subprocess.Popen]:
    """``start_worker`` once it has answered a first job; killed afterwards if still running, and ``api``
    stopped."""
    process = start_worker(api, triton, log_path, concurrency, extra)
    try:
        first = api.submit({"image_b64": GOOD_IMAGE})
        api.wait_for([first], timeout=timeout)  # the worker is up and serving
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        api.stop()


@pytest.fixture
def worker(triton: EmbeddedTriton, tmp_path: Path) -> Iterator[tuple[JobApi, subprocess.Popen, Path]]:
    api, log_path = JobApi().start(), tmp_path / "worker.log"
    with serving_worker(api, triton, log_path, concurrency=8, extra={"URL_ALLOWLIST": "127.0.0.1"}) as process:
        yield api, process, log_path


def mixed_job(index: int) -> dict:
    kind = index % 5
    if kind == 0:
        return {"image_b64": GOOD_IMAGE, "tasks": ["depth", "colorized"]}
    if kind == 1:
        return {"images": [{"type": "b64", "data": GOOD_IMAGE}, {"type": "b64", "data": BAD_IMAGE}]}
    if kind == 2:
        return {"image_b64": GOOD_IMAGE, "tasks": ["bogus"]}
    if kind == 3:
        return {"image_b64": BAD_IMAGE}
    return {"images": [{"type": "b64", "data": GOOD_IMAGE}] * 3, "tasks": ["normals"]}


def test_two_hundred_mixed_jobs_are_each_answered_once_and_intact(worker) -> None:
    api, _process, log_path = worker
    job_ids = [api.submit(mixed_job(index)) for index in range(200)]
    results = api.wait_for(job_ids, timeout=240)
    time.sleep(1)  # a duplicate post would arrive now
    assert all(len(api.results[job_id]) == 1 for job_id in job_ids)
    for index, job_id in enumerate(job_ids):
        result, kind = results[job_id], index % 5
        if kind == 2:
            assert set(result) == {"error"}
            assert result["error"].startswith("invalid value 'bogus' for tasks.0")
            continue
        output = result["output"]
        if kind == 0:
            (image,) = output["results"]
            assert decode_image(image["depth_png_b64"]).shape == (24, 32)
            assert decode_image(image["colorized_b64"]).shape == (24, 32, 3)
        elif kind == 1:
            good, bad = output["results"]
            assert good["width"] == 32
            assert bad["error"] == "image data is corrupt or truncated"
        elif kind == 3:
            assert output["results"][0]["error"] == "image data is corrupt or truncated"
        else:
            assert [decode_image(r["normals_b64"]).shape for r in output["results"]] == [(24, 32, 3)] * 3
    assert api.max_in_flight > 1
    assert api.takes["job-take-batch"] > 0  # room for several jobs is asked for at once
    assert "Handler output" not in log_path.read_text()


def test_jobs_of_several_images_report_progress(worker) -> None:
    api, _process, _log = worker
    several = api.submit({"images": [{"type": "b64", "data": GOOD_IMAGE}] * 4})
    single = api.submit({"image_b64": GOOD_IMAGE})
    api.wait_for([several, single], timeout=60)  # a job's result is posted after its progress updates
    assert sorted(api.progress[several]) == ["1/4 images", "2/4 images", "3/4 images", "4/4 images"]
    assert api.progress[single] == []
    assert len(api.results[several]) == 1
    assert len(api.results[several][0]["output"]["results"]) == 4


def test_a_job_cancelled_through_the_stop_channel_stops_and_is_not_answered(worker) -> None:
    api, _process, log_path = worker
    with running_image_server() as server:
        server.add("held.png", images.encode(images.Image.fromarray(images.photo_like(32, 24)), "PNG"), "image/png")
        held = api.submit({"images": [{"type": "url", "data": server.url("/held/held.png")}]})
        wait_until(lambda: held in api.taken_at, 30, "the held job was not taken")
        time.sleep(0.5)  # downloading, held by the server
        api.cancel(held)
        wait_until(lambda: f"job {held} stopped" in log_path.read_text(), 30, "the job was not stopped")
        after = api.submit({"image_b64": GOOD_IMAGE})
        assert "output" in api.wait_for([after], timeout=30)[after]
        server.release.set()  # the download could finish now: nothing may come of it
        time.sleep(1)
    assert held not in api.results


async def posted_nowhere(_session: object, _job_id: str, _result: dict) -> bool:
    return True


def close_post_threads(scaler: rp_scale.JobScaler) -> None:
    """runpod's own scaler has none; ours, run without its ``run``, has them started and not closed."""
    if isinstance(scaler, jobloop.EagerJobScaler):
        scaler.results.close()


def run_scaler(scaler_class: type, monkeypatch: pytest.MonkeyPatch, seconds: float = 1.0) -> tuple[int, list]:
    """Jobs taken in ``seconds`` by a scaler running at most 4 jobs, jobs of 10 ms, and every sleep it asked for."""
    real_sleep = asyncio.sleep
    monkeypatch.setattr(result_post, "post_result", posted_nowhere)
    asked: list[float] = []

    async def recorded_sleep(delay: float, *args: object) -> None:
        asked.append(delay)
        await real_sleep(min(delay, 0.01))  # long sleeps are shortened: the test counts them instead

    monkeypatch.setattr(asyncio, "sleep", recorded_sleep)

    async def run() -> int:
        taken = 0

        async def fetcher(_session: object, count: int) -> list[dict]:
            nonlocal taken
            taken += count
            return [{"id": f"job-{taken - i}", "input": {}} for i in range(count)]

        async def handler(_job: dict) -> dict:
            await real_sleep(0.01)
            return {}

        async def jobs_handler(_session: object, config: dict, job: dict) -> None:  # runpod's own loop calls this
            await config["handler"](job)

        scaler = scaler_class({"handler": handler, "concurrency_modifier": lambda _current: 4})
        scaler.jobs_fetcher, scaler.jobs_handler = fetcher, jobs_handler
        loops = [asyncio.create_task(scaler.get_jobs(None)), asyncio.create_task(scaler.run_jobs(None))]
        await real_sleep(seconds)
        scaler.kill_worker()
        await asyncio.wait_for(asyncio.gather(*loops), 10)
        close_post_threads(scaler)
        return taken

    return asyncio.run(run()), asked


def test_intake_refills_without_sleeping_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    taken, asked = run_scaler(jobloop.EagerJobScaler, monkeypatch)
    assert max(asked, default=0) < 1  # the SDK's loop sleeps a whole second whenever it runs its CONCURRENCY jobs
    assert taken > 40  # 4 places of 10 ms jobs for a second (runpod's own loop: a handful)


def test_runpods_own_intake_sleeps_a_second_when_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: the same run through runpod's JobScaler asks for 1 s sleeps (the defect fixed above)."""
    _taken, asked = run_scaler(rp_scale.JobScaler, monkeypatch)
    assert 1 in asked


def dispatcher_wakes_when_idle(scaler_class: type, monkeypatch: pytest.MonkeyPatch) -> int:
    """How often ``run_jobs`` woke (its sleeps and waits) in one second with no job at all."""
    monkeypatch.setattr(result_post, "post_result", posted_nowhere)
    wakes = 0
    real_sleep, real_wait_for = asyncio.sleep, asyncio.wait_for

    def counted(real):
        async def call(*args, **kwargs):
            nonlocal wakes
            if "run_jobs" in {frame.name for frame in traceback.extract_stack(limit=4)}:
                wakes += 1
            return await real(*args, **kwargs)

        return call

    monkeypatch.setattr(asyncio, "sleep", counted(real_sleep))
    monkeypatch.setattr(asyncio, "wait_for", counted(real_wait_for))

    async def run() -> None:
        scaler = scaler_class({"handler": lambda job: job, "concurrency_modifier": lambda _current: 4})
        loop = asyncio.create_task(scaler.run_jobs(None))
        await real_sleep(1.0)
        scaler.kill_worker()
        await real_wait_for(loop, 10)
        close_post_threads(scaler)

    asyncio.run(run())
    return wakes


def test_the_dispatcher_waits_for_work_instead_of_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    assert dispatcher_wakes_when_idle(jobloop.EagerJobScaler, monkeypatch) <= 2  # its 1 s ceiling
    monkeypatch.undo()
    assert dispatcher_wakes_when_idle(rp_scale.JobScaler, monkeypatch) >= 8  # runpod's: every 0.1 s


def jobs_handled_when_shutdown_meets_a_take(scaler_class: type, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Shutdown begins while a job-take is in flight, and the take returns a job only after ``run_jobs``
    has stopped: which jobs were handled?"""
    monkeypatch.setattr(result_post, "post_result", posted_nowhere)

    async def run() -> list[str]:
        handled: list[str] = []
        takes = 0

        async def handler(job: dict) -> dict:
            handled.append(job["id"])
            return {}

        async def jobs_handler(_session: object, config: dict, job: dict) -> None:
            await config["handler"](job)

        async def fetcher(_session: object, _count: int) -> list[dict]:
            nonlocal takes
            takes += 1
            if takes == 1:
                return [{"id": "first", "input": {}}]
            if takes == 2:
                scaler.kill_worker()  # SIGTERM arrives while this take is in flight
                await asyncio.sleep(0.5)  # run_jobs sees no job and stops
                return [{"id": "in transit", "input": {}}]
            return []

        scaler = scaler_class({"handler": handler, "concurrency_modifier": lambda _current: 1})
        scaler.jobs_fetcher, scaler.jobs_handler = fetcher, jobs_handler
        await asyncio.wait_for(asyncio.gather(scaler.get_jobs(None), scaler.run_jobs(None)), 10)
        close_post_threads(scaler)
        return handled

    return asyncio.run(run())


def test_a_job_taken_as_shutdown_begins_is_still_handled(monkeypatch: pytest.MonkeyPatch) -> None:
    assert jobs_handled_when_shutdown_meets_a_take(jobloop.EagerJobScaler, monkeypatch) == ["first", "in transit"]


def test_runpods_own_loop_loses_a_job_taken_as_shutdown_begins(monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: the window the fix above closes."""
    assert jobs_handled_when_shutdown_meets_a_take(rp_scale.JobScaler, monkeypatch) == ["first"]


def test_sigterm_finishes_the_jobs_in_flight_and_posts_their_results(worker) -> None:
    api, process, _log = worker
    job_ids = [api.submit({"images": [{"type": "b64", "data": GOOD_IMAGE}] * 4}) for _ in range(40)]
    deadline = time.monotonic() + 60
    while api.in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    taken = [job_id for job_id in job_ids if job_id in api.taken_at]
    assert taken, "no job was in flight"
    for job_id in taken:
        assert len(api.results[job_id]) == 1, job_id
        assert all("depth_png_b64" in r for r in api.results[job_id][0]["output"]["results"])
    assert api.in_flight == 0


def test_the_sdk_internals_the_adapter_relies_on_are_there() -> None:
    """runpod is pinned; if an upgrade moves what EagerJobScaler replaces or calls, this fails first."""
    for name in ("get_jobs", "run_jobs", "handle_job", "monitor_stop_signals", "set_scale"):
        assert inspect.iscoroutinefunction(getattr(rp_scale.JobScaler, name)), name
    assert "$ID" in rp_http.JOB_DONE_URL_TEMPLATE or rp_http.JOB_DONE_URL_TEMPLATE == "JOB_DONE_URL"
    assert list(inspect.signature(rp_job._job_get_url).parameters) == ["batch_size"]
    assert callable(rp_scale._set_batch_id)
    assert callable(rp_scale._reset_batch_id)
    scaler = jobloop.EagerJobScaler({"handler": lambda job: job})
    assert scaler.jobs_fetcher is jobintake.take_jobs
    assert scaler.stop_signals_fetcher is jobintake.take_stop_signals
    beat = rp_ping.Heartbeat()  # heartbeat.send_ping replaces its _send_ping and reads these
    for name in ("_send_ping", "_mirror", "_session", "PING_URL", "PING_INTERVAL"):
        assert hasattr(beat, name), name
    assert isinstance(rp_ping.runpod_version, str)
    assert rp_job._job_stop_url() is None or "/job-stop/" in rp_job._job_stop_url()
    timeouts = ("jobs_fetcher_timeout", "stop_signals_fetcher_timeout")
    for name in ("jobs_queue", "job_progress", "jobs_tasks", "_shutdown_event", *timeouts):
        assert hasattr(scaler, name), name


def test_job_results_have_runpods_shape() -> None:
    assert jobloop.job_result({"results": [1]}) == {"output": {"results": [1]}}
    assert jobloop.job_result({"error": "bad request"}) == {"error": "bad request"}
    assert jobloop.job_result([1, 2]) == {"output": [1, 2]}
    assert jobloop.job_result({}) == {}


# --------------------------------------------------------------------------- a job API that misbehaves

GOOD_INPUT = {"image_b64": GOOD_IMAGE}
DEEP_INPUT = "[" * 5000 + "]" * 5000  # past the JSON parser's recursion limit


def raw_job(job_id: str, raw_input: str) -> str:
    return '{"id": "%s", "input": %s}' % (job_id, raw_input)  # noqa: UP031


def test_a_batch_with_malformed_entries_answers_every_job_that_has_an_id(worker) -> None:
    api, process, log_path = worker
    good = json.dumps(GOOD_INPUT)
    batch = ", ".join(
        [
            raw_job("good-1", good),
            "1",
            '"x"',
            "null",
            '{"input": {}}',  # no id
            '{"id": 7, "input": {}}',  # an id that is not a string
            '{"id": "no-input"}',
            raw_job("deep", DEEP_INPUT),
            raw_job("good-2", good),
        ]
    )
    api.raw_takes.append(f"[{batch}]".encode())
    api.raw_takes.append(b'{"id": 5, "input": {}}')  # a single job-take without a usable id
    api.raw_takes.append(b"[1, 2")  # not JSON at all
    results = api.wait_for(["good-1", "good-2", "no-input", "deep"], timeout=60)
    for job_id in ("good-1", "good-2"):
        assert decode_image(results[job_id]["output"]["results"][0]["depth_png_b64"]).shape == (24, 32)
    assert results["no-input"] == {"error": "the job has no input"}
    assert results["deep"] == {"error": "the job's input is not valid JSON or is nested too deeply"}
    after = api.submit(GOOD_INPUT)  # the worker is alive and still takes jobs
    assert "output" in api.wait_for([after], timeout=30)[after]
    assert process.poll() is None
    time.sleep(1)
    assert all(len(api.results[job_id]) == 1 for job_id in ("good-1", "good-2", "no-input", "deep", after))
    assert log_path.read_text().count("job-take entry without a usable id skipped") == 6


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'[{"id": "a", "input": {"x": 1}}, {"id": "b", "input": {"y": NaN}}]', (["a", "b"], [], 0)),
        (('[{"id": "a", "input": {}}, ' + raw_job("deep", DEEP_INPUT) + "]").encode(), (["a"], ["deep"], 0)),
        (("{" + raw_job("deep", DEEP_INPUT)[1:]).encode(), ([], ["deep"], 0)),
        (b'[{"id": "a", "input": {}}, {"id": "a", "input": {}}, 3, {"input": 1}]', (["a"], [], 3)),
        (b'[{"id": "a"}]', ([], ["a"], 0)),
        (b'[{"id": "a", "input": {"s": "\\ud800"}}, {"id": "b", "input": {"x": 1e400}}]', (["a", "b"], [], 0)),
    ],
)
def test_a_take_is_sorted_into_jobs_refusals_and_skips(body: bytes, expected: tuple) -> None:
    intake = jobintake.parse_take(bytearray(body))  # as take_jobs reads it
    assert ([job["id"] for job in intake.jobs], [job_id for job_id, _ in intake.refused], intake.skipped) == expected


def test_a_take_reads_as_json_reads_it() -> None:
    jobs = [{"id": f"j{n}", "input": {"image_b64": GOOD_IMAGE, "x": [n, 0.1, -0.0, None, True]}} for n in range(3)]
    body = json.dumps(jobs)
    for text in (body, body.replace('"x"', '"s": "\\udc00", "x"')):  # fast path, then the fallback's
        assert jobintake.parse_take(text.encode()).jobs == json.loads(text)


@pytest.mark.parametrize("body", [b"null", b"3", b'"text"', b"[1, 2", b"\xff\xfe", b"{} {}", b"[1] x"])
def test_a_take_that_is_not_jobs_at_all_is_unreadable(body: bytes) -> None:
    with pytest.raises(jobintake.Unreadable):
        jobintake.parse_take(body)


async def endless_json(request: web.Request) -> web.StreamResponse:
    """A chunked JSON answer with no end: only the reader's bound stops it."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    with contextlib.suppress(ConnectionError):
        while True:
            await response.write(b"[" * 512)
    return response


def ask_job_api(path: str, answer: Callable, kinds: list[str], fetch: Callable) -> list:
    """``fetch(session)`` once per kind against a loopback job API whose ``path`` calls ``answer(request,
    kind)``, the job-take URL pointing at it; what each returned or the message of what it raised."""

    async def scenario() -> list:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await answer(request, request.query["kind"])

        outcomes: list = []
        async with aiohttp_server([web.get(path, handle)]) as base, aiohttp.ClientSession() as session:
            for kind in kinds:
                rp_job.JOB_GET_URL = f"{base}/job-take/worker?kind={kind}"
                try:
                    outcomes.append(await asyncio.wait_for(fetch(session), 20))
                except jobintake.Unreadable as error:
                    outcomes.append(f"Unreadable: {error}")
                except rp_scale.TooManyRequests:
                    outcomes.append("TooManyRequests")
        return outcomes

    return asyncio.run(scenario())


def test_a_take_body_is_read_within_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """A declared length over the bound is refused before the body is read, an endless chunked body is
    cut at the bound, a blank body is no jobs, a good one is read."""
    limit = 4096
    monkeypatch.setattr(jobintake, "TAKE_BYTES_PER_JOB", limit)
    monkeypatch.setattr(rp_job, "JOB_GET_URL", rp_job.JOB_GET_URL)
    job = {"id": "j1", "input": {"image_b64": "x" * 100}}

    async def take(request: web.Request, kind: str) -> web.StreamResponse:
        if kind == "declared":
            return web.Response(body=b" " * (limit + 1), content_type="application/json")
        if kind == "blank":
            return web.Response(body=b" \n\t ", content_type="application/json")
        if kind == "good":
            return web.json_response([job])
        return await endless_json(request)

    async def fetch(session: aiohttp.ClientSession) -> list[str]:
        return [job["id"] for job in (await jobintake.take_jobs(session, 1)).jobs]

    assert ask_job_api("/job-take/worker", take, ["declared", "chunked", "blank", "good"], fetch) == [
        f"Unreadable: job-take body of {limit + 1} bytes, over {limit}",
        f"Unreadable: job-take body over {limit} bytes",
        [],
        ["j1"],
    ]


def test_a_stop_channel_answer_is_read_within_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stop channel's answers as runpod reads them (ids that are strings; none for 204, another
    content type, a body that is not an object with a list; 429 raised), with the body bounded: an endless
    answer is cut at ``STOP_BYTES`` (runpod's reader would hold it all)."""
    monkeypatch.setattr(rp_job, "JOB_GET_URL", rp_job.JOB_GET_URL)
    limit = jobintake.STOP_BYTES

    async def stop(request: web.Request, kind: str) -> web.StreamResponse:
        answers = {
            "none": web.Response(status=204),
            "ids": web.json_response({"jobsToStop": ["a", 3, None, "b"]}),
            "text": web.Response(text='{"jobsToStop": ["a"]}'),
            "declared": web.Response(body=b" " * (limit + 1), content_type="application/json"),
            "deep": web.Response(body=b"[" * 5000 + b"]" * 5000, content_type="application/json"),
            "no list": web.json_response({"jobsToStop": "a"}),
            "busy": web.Response(status=429),
        }
        return answers[kind] if kind in answers else await endless_json(request)

    kinds = ["none", "ids", "text", "declared", "endless", "deep", "no list", "busy"]
    assert ask_job_api("/job-stop/worker", stop, kinds, jobintake.take_stop_signals) == [
        [],
        ["a", "b"],
        [],
        f"Unreadable: stop-channel body of {limit + 1} bytes, over {limit}",
        f"Unreadable: stop-channel body over {limit} bytes",
        [],
        [],
        "TooManyRequests",
    ]


def test_a_hanging_result_post_takes_no_jobs_place(triton: EmbeddedTriton, tmp_path: Path) -> None:
    api = JobApi().start()
    process = start_worker(api, triton, tmp_path / "worker.log", concurrency=1)  # the slow post: the only job
    try:
        api.wait_for([api.submit(GOOD_INPUT)], timeout=120)
        slow = api.submit(GOOD_INPUT, job_id="slow")
        api.hang_done.add("slow")
        started = time.monotonic()
        others = [api.submit(GOOD_INPUT) for _ in range(6)]
        api.wait_for(others, timeout=15)  # a post holding the place would stop intake for 40 s
        assert time.monotonic() - started < 15
        assert "slow" not in api.results
        api.wait_for([slow], timeout=30)  # the retry after the attempt's timeout gets through
        took = api.done_at[slow] - api.taken_at[slow]
        assert result_post.RESULT_POST_ATTEMPT <= took < result_post.RESULT_POST_DEADLINE
        assert len(api.results[slow]) == 1
        assert "depth_png_b64" in api.results[slow][0]["output"]["results"][0]
    finally:
        process.kill()
        process.wait()
        api.stop()


def test_sigterm_while_a_job_take_hangs_exits_within_the_grace(triton: EmbeddedTriton, tmp_path: Path) -> None:
    api = JobApi().start()
    process = start_worker(api, triton, tmp_path / "worker.log", concurrency=2)
    try:
        api.wait_for([api.submit(GOOD_INPUT)], timeout=120)
        api.hang_takes = True
        takes = sum(api.takes.values())
        deadline = time.monotonic() + 10
        while sum(api.takes.values()) == takes:  # a take that will hang is now open
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert process.wait(timeout=60) == 0
        assert time.monotonic() - started < jobloop.TAKE_GRACE + 5  # runpod's own loop: 91 s
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        api.stop()


def test_no_jobs_are_taken_while_triton_is_down_and_a_lasting_outage_ends_the_worker(
    own_repository: Path, tmp_path: Path
) -> None:
    triton = EmbeddedTriton(own_repository, start_timeout=120).start()
    api = JobApi().start()
    log_path = tmp_path / "worker.log"
    process = start_worker(api, triton, log_path, concurrency=8, extra={"TRITON_UNREACHABLE_EXIT": "8"})
    try:
        api.wait_for([api.submit(GOOD_INPUT)], timeout=120)
        triton.terminate()
        time.sleep(3)  # the worker notices within its 1 s probe
        during = [api.submit(GOOD_INPUT) for _ in range(4)]
        time.sleep(2)
        assert not any(job_id in api.taken_at for job_id in during)  # left for a worker that can serve them
        triton.start()  # back (same ports) before the limit: the jobs are taken and served
        results = api.wait_for(during, timeout=60)
        assert all("depth_png_b64" in results[job_id]["output"]["results"][0] for job_id in during)
        text = log_path.read_text()
        assert text.count("does not answer; taking no jobs until it does") == 1
        assert text.count("taking no jobs: the worker cannot serve them right now") == 1
        assert "Triton answers again after" in text

        started = time.monotonic()
        triton.terminate()  # now for good
        assert process.wait(timeout=60) == 1
        assert 8 <= time.monotonic() - started < 8 + 15
        assert "unreachable for 8 s; leaving so the platform replaces this worker" in log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        triton.stop()
        api.stop()


def test_a_heartbeat_answer_is_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """runpod's heartbeat against a ping endpoint whose answer never ends: the ping is sent with the jobs
    in progress and returns (runpod's own read the body until the endpoint stopped, growing as it read)."""
    pings: list[str] = []

    class Endless(QuietHandler):
        def do_GET(self) -> None:
            pings.append(self.path)
            self.send_response(200)
            self.end_headers()  # no length: the body ends when the connection does
            with contextlib.suppress(OSError):
                for _ in range(6000):  # 64 kB every 10 ms for a minute, unless the client closes first
                    self.wfile.write(b"x" * 65536)
                    time.sleep(0.01)

    server = LoopbackServer(Endless).start()
    try:
        monkeypatch.setenv("RUNPOD_WEBHOOK_PING", f"{server.base}/ping/worker")
        monkeypatch.setattr(rp_ping.Heartbeat, "_send_ping", rp_ping.Heartbeat._send_ping)  # restored after
        heartbeat.install()
        beat = rp_ping.Heartbeat()
        beat._mirror = PingJobMirror()
        beat._mirror.set("job-a,job-b")
        sender = threading.Thread(target=beat._send_ping, daemon=True)
        sender.start()
        sender.join(30)
        assert not sender.is_alive(), "the ping is still reading its answer"
    finally:
        server.stop()
    assert len(pings) == 1
    assert parse_qs(urlparse(pings[0]).query)["job_id"] == ["job-a,job-b"]

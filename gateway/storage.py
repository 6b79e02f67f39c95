"""Outputs as objects in S3-compatible storage, for results too big or too many for a job's JSON.

Where: the worker's bucket (``BUCKET_ENDPOINT_URL``, ``BUCKET_ACCESS_KEY_ID``, ``BUCKET_SECRET_ACCESS_KEY``,
``BUCKET_NAME``: trusted, from the deployment) or the job's own ``s3Config`` (``endpointUrl``,
``accessId``, ``accessSecret``, ``bucketName``, Runpod's shape beside ``input``: untrusted, so its
endpoint goes through the same address policy as image URLs before any connection). Objects are
``<BUCKET_PREFIX>/<job id>/<index>_<output>.<ext>`` with their Content-Type; the result carries presigned
GET URLs valid ``BUCKET_URL_EXPIRY`` seconds (7 days by default, as runpod's own helper).

Uploads run in a thread pool (boto3 blocks), all of a job's at once, under one deadline
(``UPLOAD_TIMEOUT``); clients are kept per endpoint and key. Failures are per image and say what
happened (endpoint unreachable, credentials refused, bucket missing, deadline); an image any of whose
uploads failed reports that error and no URL. No message or log line carries a key or secret.

The endpoint's addresses are checked when the job starts; boto3 resolves the name again when it
connects, so a name whose DNS answer changes in between (rebinding) is not caught: that window is
the same as in most SSRF filters that sit in front of a library they do not control.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import socket
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from gateway.errors import ImageError
from gateway.inputs.fetch import AddressPolicy

log = logging.getLogger("gateway")
S3_CONFIG_FIELDS = ("endpointUrl", "accessId", "accessSecret", "bucketName")
CREDENTIAL_ERRORS = {"SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "InvalidToken", "Forbidden"}
MISSING_BUCKET = {"NoSuchBucket", "404", "NotFound"}


class StorageConfigError(ValueError):
    """The job's ``s3Config`` is unusable; the message names why (never a secret)."""


@dataclass(frozen=True)
class Bucket:
    endpoint_url: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    name: str

    @classmethod
    def from_job(cls, config: object) -> Bucket:
        if not isinstance(config, dict) or set(config) - set(S3_CONFIG_FIELDS):
            raise StorageConfigError(f"s3Config must be an object with {', '.join(S3_CONFIG_FIELDS)}")
        values = [config.get(name) for name in S3_CONFIG_FIELDS]
        if not all(isinstance(value, str) and value.strip() for value in values):
            raise StorageConfigError(f"s3Config needs {', '.join(S3_CONFIG_FIELDS)}, each a non-empty string")
        bucket = cls(*values)
        parts = urlsplit(bucket.endpoint_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise StorageConfigError("s3Config.endpointUrl must be an http or https URL with a host")
        return bucket


async def check_endpoint(bucket: Bucket, policy: AddressPolicy) -> None:
    """Refuse an endpoint that resolves to an address the policy closes (before any connection)."""
    parts = urlsplit(bucket.endpoint_url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            answers = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            raise StorageConfigError("s3Config.endpointUrl: its host name does not resolve") from None
        addresses = [ipaddress.ip_address(answer[4][0]) for answer in answers]
    for address in addresses:
        try:
            policy.check(host, address, port, what="s3Config.endpointUrl")
        except ImageError as error:
            raise StorageConfigError(str(error)) from None


MAX_CLIENTS = 32  # boto3 clients kept (about 0.5 MB each); the least recently used goes first


class Storage:
    """Uploads and presigned URLs; one boto3 client per (endpoint, key), the ``MAX_CLIENTS`` most recently
    used kept (every job may bring its own credentials)."""

    def __init__(self, prefix: str, url_expiry: int, timeout: float, threads: int = 16) -> None:
        self.prefix = prefix.strip("/")
        self.url_expiry = url_expiry
        self.timeout = timeout
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="uploads")
        self._clients: OrderedDict[tuple[str, str, str], object] = OrderedDict()
        self._clients_lock = threading.Lock()  # upload threads share the cache
        self._known_buckets: dict[tuple[str, str], float] = {}

    def _client(self, bucket: Bucket):
        secret_digest = hashlib.sha256(bucket.secret_key.encode()).hexdigest()
        key = (bucket.endpoint_url, bucket.access_key, secret_digest)
        with self._clients_lock:
            if key in self._clients:
                self._clients.move_to_end(key)
                return self._clients[key]
        client = boto3.client(
            "s3",
            endpoint_url=bucket.endpoint_url,
            aws_access_key_id=bucket.access_key,
            aws_secret_access_key=bucket.secret_key,
            region_name="us-east-1",
            config=Config(
                signature_version="s3v4",
                connect_timeout=min(5.0, self.timeout),
                read_timeout=self.timeout,
                retries={"max_attempts": 2, "mode": "standard"},
                max_pool_connections=32,
            ),
        )
        with self._clients_lock:
            self._clients[key] = client
            while len(self._clients) > MAX_CLIENTS:
                self._clients.popitem(last=False)
        return client

    def object_key(self, job_id: str, file_name: str) -> str:
        """``<prefix>/<job id>/<file name>``, the file name being ``<index>_<output>.<ext>``."""
        return f"{self.prefix}/{job_id}/{file_name}" if self.prefix else f"{job_id}/{file_name}"

    async def upload(self, bucket: Bucket, objects: list[tuple[str, bytes, str]]) -> list[str | ImageError]:
        """Upload ``(key, data, content type)`` objects at once; a presigned URL or the error, per object."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                await loop.run_in_executor(self.executor, self._ensure_bucket, bucket)
                return await asyncio.gather(
                    *(loop.run_in_executor(self.executor, self._put, bucket, *obj) for obj in objects),
                    return_exceptions=True,
                )
        except TimeoutError:
            return [ImageError(f"the upload to storage did not finish within {self.timeout:g} s")] * len(objects)
        except ImageError as error:
            return [error] * len(objects)

    def _ensure_bucket(self, bucket: Bucket) -> None:
        key = (bucket.endpoint_url, bucket.name)
        if time.monotonic() - self._known_buckets.get(key, -1e9) < 60:
            return
        try:
            self._client(bucket).head_bucket(Bucket=bucket.name)
        except (ClientError, BotoCoreError) as error:
            raise _describe(error, bucket) from None
        now = time.monotonic()
        self._known_buckets[key] = now
        if len(self._known_buckets) > MAX_CLIENTS:  # forget the ones past their minute
            self._known_buckets = {k: t for k, t in self._known_buckets.items() if now - t < 60}

    def _put(self, bucket: Bucket, key: str, data: bytes, content_type: str) -> str:
        client = self._client(bucket)
        try:
            client.put_object(Bucket=bucket.name, Key=key, Body=data, ContentType=content_type)
            return client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket.name, "Key": key}, ExpiresIn=self.url_expiry
            )
        except (ClientError, BotoCoreError) as error:
            raise _describe(error, bucket) from None


def _describe(error: ClientError | BotoCoreError, bucket: Bucket) -> ImageError:
    """A short, safe sentence for a storage failure (logged with its code, never with credentials)."""
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", "unknown"))
        log.error("storage error %s for bucket %s at %s", code, bucket.name, bucket.endpoint_url)
        if code in CREDENTIAL_ERRORS or code == "403":
            return ImageError("the storage refused the credentials")
        if code in MISSING_BUCKET:
            return ImageError(f"the storage bucket {bucket.name[:63]!r} does not exist")
        return ImageError(f"the upload to storage failed ({code[:40]})")
    log.error("storage unreachable at %s: %s", bucket.endpoint_url, type(error).__name__)
    return ImageError("the storage endpoint is unreachable")  # a BotoCoreError: no answer from the endpoint

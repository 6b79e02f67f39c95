"""Outputs as objects in S3-compatible storage, for results too big or too many for a job's JSON.

Where: the worker's bucket (``BUCKET_ENDPOINT_URL``, ``BUCKET_ACCESS_KEY_ID``, ``BUCKET_SECRET_ACCESS_KEY``,
``BUCKET_NAME``, ``BUCKET_REGION``: trusted, from the deployment, checked at start-up) or the job's own
``s3Config`` (``endpointUrl``, ``accessId``, ``accessSecret``, ``bucketName``, optionally ``region``:
Runpod's shape beside ``input``; untrusted). Objects are ``<BUCKET_PREFIX>/<job id>/<index>_<output>.<ext>``
with their Content-Type; the result carries presigned GET URLs valid ``BUCKET_URL_EXPIRY`` seconds.

An endpoint is parsed once, by one parser, and rebuilt from its parts (scheme, host, port: no user
info, path, query or backslash survives), with its host name checked (letters, digits, hyphens, at most
253 characters). A job's endpoint then goes through the image URLs' address policy, and the
connections are pinned to the address that was checked (``S3Client``): a name that resolves elsewhere
at connect time (DNS rebinding) is never asked again. Bucket names follow S3's naming rules.
The region (for the signature and presigned URLs) is the job's or the worker's, else read from the
endpoint (``s3.<region>.amazonaws.com``, ``<region>.digitaloceanspaces.com``, as Runpod's helper does),
else us-east-1.

Uploads need only ``s3:PutObject`` (no bucket check that needs ``s3:ListBucket`` before them): a missing
bucket is reported from the upload's own error (or, when that only says "internal error", from a
HeadBucket asked after the failure). Uploads run in threads kept per target (endpoint and keys), at most
``UPLOAD_THREADS`` of one job's at once, under the job's deadline (``UPLOAD_TIMEOUT``), so a slow or
hostile endpoint holds only its own target's threads. Failures are per image and say what happened
(endpoint unreachable, credentials refused, bucket missing, deadline, an output the gateway could not
read). No message or log line carries a key or secret.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import re
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from urllib.parse import quote, urlsplit

import certifi
import urllib3
from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from urllib3.exceptions import HTTPError

from gateway.errors import ImageError
from gateway.inputs.fetch import AddressPolicy

log = logging.getLogger("gateway")
Body = bytes | Callable[[], bytes]  # an object's bytes, or what reads them (called in the upload's thread)
S3_CONFIG_FIELDS = ("endpointUrl", "accessId", "accessSecret", "bucketName")
S3_CONFIG_OPTIONAL = ("region",)
CREDENTIAL_ERRORS = {"SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "InvalidToken", "Forbidden"}
MISSING_BUCKET = {"NoSuchBucket", "404", "NotFound"}
DEFAULT_REGION = "us-east-1"
UPLOAD_THREADS = 8  # per job at once
TARGET_THREADS = 64  # per storage target (endpoint and keys), started as needed and kept
MAX_URL_CHARS = 2048
HOST_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
REGION = re.compile(r"[a-z]{2}(?:-[a-z0-9]+){1,3}|[a-z]{3}\d")
ENDPOINT_REGION = (
    re.compile(r"(?:^|\.)s3[.-](?:dualstack\.)?([a-z0-9-]+)\."),
    re.compile(r"^([a-z0-9-]+)\.digitaloceanspaces\.com$"),
)


class StorageConfigError(ValueError):
    """A storage setting is unusable; the message names which and why (never a secret)."""


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str  # lower case; an IP address without brackets
    port: int

    @property
    def url(self) -> str:
        """The URL rebuilt from the parts (the scheme's default port left out, as clients send Host)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = {"http": 80, "https": 443}[self.scheme]
        return f"{self.scheme}://{host}" if self.port == default else f"{self.scheme}://{host}:{self.port}"


def parse_endpoint(url: object, what: str) -> Endpoint:
    """``url`` as (scheme, host, port), or StorageConfigError saying what is wrong with it."""
    if not isinstance(url, str) or not url.strip():
        raise StorageConfigError(f"{what} must be an http or https URL")
    if len(url) > MAX_URL_CHARS:
        raise StorageConfigError(f"{what} is longer than {MAX_URL_CHARS} characters")
    if not url.isprintable() or any(c in url for c in "\\ \t"):
        raise StorageConfigError(f"{what} must not contain spaces, backslashes or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise StorageConfigError(f"{what} is not a valid URL (its host or port)") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StorageConfigError(f"{what} must be an http or https URL with a host")
    if parts.username is not None or parts.password is not None:
        raise StorageConfigError(f"{what} must not carry a user name or password")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise StorageConfigError(f"{what} must be scheme://host[:port] only, without a path or query")
    host = parts.hostname.lower()
    try:
        ipaddress.ip_address(host)
    except ValueError:
        labels = host.rstrip(".").split(".")
        if len(host) > 253 or not all(HOST_LABEL.fullmatch(label) for label in labels):
            raise StorageConfigError(
                f"{what} has an invalid host name (letters, digits and hyphens between dots, at most 253)"
            ) from None
        host = host.rstrip(".")
    return Endpoint(parts.scheme, host, port or (443 if parts.scheme == "https" else 80))


def check_bucket_name(name: object, what: str) -> str:
    """``name`` when S3's bucket naming rules allow it, else StorageConfigError saying which rule fails."""
    if not isinstance(name, str) or not name:
        raise StorageConfigError(f"{what} must be a non-empty string")
    if not 3 <= len(name) <= 63:
        raise StorageConfigError(f"{what} must be 3 to 63 characters long (S3's bucket naming rules)")
    if not BUCKET_NAME.fullmatch(name):
        raise StorageConfigError(
            f"{what} may hold only lower-case letters, digits, dots and hyphens, and must begin and end with a "
            "letter or digit (S3's bucket naming rules)"
        )
    if ".." in name or ".-" in name or "-." in name:
        raise StorageConfigError(f"{what} must not have two dots, or a dot beside a hyphen, in a row")
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return name
    raise StorageConfigError(f"{what} must not look like an IP address")


def check_prefix(prefix: str) -> str:
    """``BUCKET_PREFIX`` without outer slashes; StorageConfigError for segments that would leave it."""
    prefix = prefix.strip("/")
    if len(prefix) > 512 or not prefix.isprintable() or "\\" in prefix:
        raise StorageConfigError("BUCKET_PREFIX must be printable, without backslashes, at most 512 characters")
    if prefix and any(segment in ("", ".", "..") for segment in prefix.split("/")):
        raise StorageConfigError("BUCKET_PREFIX must not have empty, '.' or '..' segments")
    return prefix


def region_for(endpoint: Endpoint, given: str | None) -> str:
    """The region to sign for: the one given, else the endpoint's (AWS and DigitalOcean style), else us-east-1."""
    if given is not None:
        if not REGION.fullmatch(given):
            raise StorageConfigError("the storage region must look like eu-west-1 (letters, digits, hyphens)")
        return given
    for pattern in ENDPOINT_REGION:
        found = pattern.search(endpoint.host)
        if found and REGION.fullmatch(found.group(1)):
            return found.group(1)
    return DEFAULT_REGION


@dataclass(frozen=True)
class StorageTarget:
    """Where one job's outputs go: an S3 endpoint, its keys, the bucket's name and region, and for a job's own
    endpoint the address every connection is pinned to. (Network "buckets" are image shapes; this is S3's.)"""

    endpoint: Endpoint
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    name: str
    region: str = DEFAULT_REGION
    pinned: str | None = None  # the checked address every connection goes to (a job's endpoint)

    @classmethod
    def configured(
        cls, endpoint_url: str, access_key: str, secret_key: str, name: str, region: str | None = None
    ) -> StorageTarget:
        """The worker's bucket from its settings (StorageConfigError at start-up when they are wrong)."""
        endpoint = parse_endpoint(endpoint_url, "BUCKET_ENDPOINT_URL")
        name = check_bucket_name(name, "BUCKET_NAME")
        return cls(endpoint, access_key, secret_key, name, region_for(endpoint, region))

    @classmethod
    def from_job(cls, config: object) -> StorageTarget:
        allowed = set(S3_CONFIG_FIELDS) | set(S3_CONFIG_OPTIONAL)
        if not isinstance(config, dict) or set(config) - allowed:
            raise StorageConfigError(f"s3Config must be an object with {', '.join(S3_CONFIG_FIELDS)} (and region)")
        values = [config.get(name) for name in S3_CONFIG_FIELDS]
        if not all(isinstance(value, str) and value.strip() for value in values):
            raise StorageConfigError(f"s3Config needs {', '.join(S3_CONFIG_FIELDS)}, each a non-empty string")
        endpoint_url, access_key, secret_key, name = values
        endpoint = parse_endpoint(endpoint_url, "s3Config.endpointUrl")
        name = check_bucket_name(name, "s3Config.bucketName")
        region = config.get("region")
        if region is not None and not isinstance(region, str):
            raise StorageConfigError("s3Config.region must be a string")
        return cls(endpoint, access_key, secret_key, name, region_for(endpoint, region))


async def check_endpoint(target: StorageTarget, policy: AddressPolicy) -> StorageTarget:
    """``target`` pinned to its endpoint's checked address, or StorageConfigError when the address policy
    closes any address the name resolves to (before any connection)."""
    endpoint = target.endpoint
    try:
        addresses = [ipaddress.ip_address(endpoint.host)]
    except ValueError:
        try:
            answers = await asyncio.get_running_loop().getaddrinfo(
                endpoint.host, endpoint.port, type=socket.SOCK_STREAM
            )
        except (OSError, UnicodeError):
            raise StorageConfigError("s3Config.endpointUrl: its host name does not resolve") from None
        addresses = [ipaddress.ip_address(answer[4][0].split("%")[0]) for answer in answers]
    for address in addresses:
        try:
            policy.check(endpoint.host, address, endpoint.port, what="s3Config.endpointUrl")
        except ImageError as error:
            raise StorageConfigError(str(error)) from None
    return replace(target, pinned=str(addresses[0]))


MAX_CLIENTS = 32  # connection pools kept; the least recently used goes first
MAX_ERROR_BYTES = 64 << 10  # of an error answer read (S3's are under 1 kB); the rest is never read
PUT_URL_EXPIRY = 300  # seconds a signed PUT stays valid (it is used at once)
ERROR_CODE = re.compile(rb"<Code>([A-Za-z0-9.]{1,64})</Code>")


class StorageAnswer(Exception):
    """The storage answered a request with an error: S3's code, else the HTTP status."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class S3Client:
    """Presigned S3 requests over one connection pool per target.

    Every request is signed locally with botocore's SigV4 query signer (no per-request work beyond the
    signature) and sent with urllib3 to the target's checked address (``pinned``; else its host), with TLS
    checking the endpoint's name and the Host header carrying it, so that a name that resolves elsewhere
    at connect time (DNS rebinding) is never asked. Payloads are unsigned, as in every presigned PUT: a
    body is neither hashed nor checksummed on its way out (TLS carries its integrity). No redirect is
    followed; one retry for a connection that could not be made."""

    def __init__(self, target: StorageTarget, timeout: float) -> None:
        self.target = target
        self.credentials = Credentials(target.access_key, target.secret_key)
        endpoint = target.endpoint
        options = {
            "port": endpoint.port,
            "maxsize": TARGET_THREADS,
            "block": False,
            "timeout": urllib3.Timeout(connect=min(5.0, timeout), read=timeout),
            # One retry when the connection could not be made; none once a request may have been read, and
            # none on an error status (a retry would first read that answer to its end, however long).
            "retries": urllib3.Retry(total=1, connect=1, read=0, redirect=0, status=0, other=0, allowed_methods=None),
        }
        address = target.pinned or endpoint.host
        if endpoint.scheme == "https":
            self.pool: urllib3.HTTPConnectionPool = urllib3.HTTPSConnectionPool(
                address, server_hostname=endpoint.host, assert_hostname=endpoint.host,
                cert_reqs="CERT_REQUIRED", ca_certs=certifi.where(), **options,
            )  # fmt: skip
        else:
            self.pool = urllib3.HTTPConnectionPool(address, **options)
        self.host = urlsplit(endpoint.url).netloc  # what is signed and sent as Host
        # Uploads run in this target's own threads, kept between jobs (starting threads for every job held
        # the event loop ~1 ms per url-mode image): a slow endpoint holds only its own target's threads.
        self.threads = ThreadPoolExecutor(TARGET_THREADS, thread_name_prefix="uploads")

    def signed(self, method: str, key: str | None, expires: int, content_type: str | None = None) -> str:
        """A presigned URL for ``method`` on ``key`` (None: the bucket itself); signed here, no connection."""
        path = f"/{self.target.name}" + ("" if key is None else "/" + quote(key, safe="/~"))
        headers = {"Content-Type": content_type} if content_type else {}
        request = AWSRequest(method=method, url=self.target.endpoint.url + path, headers=headers)
        S3SigV4QueryAuth(self.credentials, "s3", self.target.region, expires=expires).add_auth(request)
        return request.url

    def send(self, method: str, url: str, body: bytes | None = None, content_type: str | None = None) -> int:
        """The status of ``method`` on the presigned ``url``; StorageAnswer with S3's code when it is not
        a success. At most ``MAX_ERROR_BYTES`` of an answer are read."""
        parts = urlsplit(url)
        headers = {"Host": self.host, **({"Content-Type": content_type} if content_type else {})}
        response = self.pool.urlopen(
            method, f"{parts.path}?{parts.query}", body=body, headers=headers, redirect=False, preload_content=False
        )
        try:
            answer = response.read(MAX_ERROR_BYTES)
        finally:
            if response.closed or response.length_remaining == 0:
                response.release_conn()  # read to its end: the connection is reused
            else:
                response.close()  # more than was read: the connection is dropped, the rest never read
        if 200 <= response.status < 300:
            return response.status
        found = ERROR_CODE.search(answer)
        raise StorageAnswer(found.group(1).decode() if found else str(response.status))


class Storage:
    """Uploads and presigned URLs; one ``S3Client`` per (endpoint, key), the ``MAX_CLIENTS`` most recently
    used kept (every job may bring its own credentials)."""

    def __init__(self, prefix: str, url_expiry: int, timeout: float) -> None:
        self.prefix = check_prefix(prefix)
        self.url_expiry = url_expiry
        self.timeout = timeout
        self._clients: OrderedDict[tuple, S3Client] = OrderedDict()
        self._clients_lock = threading.Lock()  # upload threads share the cache

    def _client(self, target: StorageTarget) -> S3Client:
        secret_digest = hashlib.sha256(target.secret_key.encode()).hexdigest()
        key = (target.endpoint, target.name, target.region, target.pinned, target.access_key, secret_digest)
        with self._clients_lock:
            if key in self._clients:
                self._clients.move_to_end(key)
                return self._clients[key]
            client = S3Client(target, self.timeout)
            self._clients[key] = client
            while len(self._clients) > MAX_CLIENTS:
                evicted = self._clients.popitem(last=False)[1]
                evicted.threads.shutdown(wait=False)  # what it still runs ends with its timeouts
                evicted.pool.close()
        return client

    def object_key(self, job_id: str, file_name: str) -> str:
        """``<prefix>/<job id>/<file name>``, the file name being ``<index>_<output>.<ext>``."""
        return f"{self.prefix}/{job_id}/{file_name}" if self.prefix else f"{job_id}/{file_name}"

    async def upload(self, target: StorageTarget, objects: list[tuple[str, Body, str]]) -> list[str | ImageError]:
        """Upload ``(key, data, content type)`` objects in the target's threads, at most ``UPLOAD_THREADS``
        of this job's at once; a presigned URL or the error, per object. ``data`` is the bytes, or what
        reads them in the upload's thread. What a stalled endpoint still holds at the deadline ends with
        its timeouts; objects not started by then never are."""
        loop = asyncio.get_running_loop()
        client = self._client(target)
        turns = asyncio.Semaphore(UPLOAD_THREADS)

        async def put(key: str, data: Body, content_type: str) -> str:
            async with turns:
                return await loop.run_in_executor(client.threads, self._put, client, key, data, content_type)

        try:
            async with asyncio.timeout(self.timeout):
                return await asyncio.gather(*(put(*obj) for obj in objects), return_exceptions=True)
        except TimeoutError:
            return [ImageError(f"the upload to storage did not finish within {self.timeout:g} s")] * len(objects)

    def _put(self, client: S3Client, key: str, data: Body, content_type: str) -> str:
        try:
            body = data() if callable(data) else data
        except OSError as error:  # e.g. a parked output gone: the gateway's fault, not the storage's
            log.error("could not read the output %s for its upload: %s", key, type(error).__name__)
            raise ImageError("an output could not be read for its upload") from None
        try:
            client.send("PUT", client.signed("PUT", key, PUT_URL_EXPIRY, content_type), body, content_type)
        except (StorageAnswer, HTTPError) as error:
            raise self._diagnosed(client, error) from None
        return client.signed("GET", key, self.url_expiry)

    @staticmethod
    def _diagnosed(client: S3Client, error: StorageAnswer | HTTPError) -> ImageError:
        """The upload's error; when the storage refused or failed without naming why (SeaweedFS answers
        AccessDenied or InternalError for a bucket that does not exist), a HeadBucket, asked only now,
        may name the missing bucket (with keys that may not ask it, the refusal stands)."""
        if isinstance(error, StorageAnswer) and error.code in ("InternalError", "AccessDenied"):
            try:
                client.send("HEAD", client.signed("HEAD", None, PUT_URL_EXPIRY))
            except StorageAnswer as head_error:
                if head_error.code in MISSING_BUCKET:
                    return _describe(head_error, client.target)
            except HTTPError:
                pass
        return _describe(error, client.target)


def _describe(error: StorageAnswer | HTTPError, target: StorageTarget) -> ImageError:
    """A short, safe sentence for a storage failure (logged with its code, never with credentials)."""
    if isinstance(error, StorageAnswer):
        code = error.code
        log.error("storage error %s for bucket %s at %s", code, target.name, target.endpoint.url)
        if code in CREDENTIAL_ERRORS or code == "403":
            return ImageError("the storage refused the credentials")
        if code in MISSING_BUCKET:
            return ImageError(f"the storage bucket {target.name[:63]!r} does not exist")
        return ImageError(f"the upload to storage failed ({code[:40]})")
    log.error("storage unreachable at %s: %s", target.endpoint.url, type(error).__name__)
    return ImageError("the storage endpoint is unreachable")  # no answer from the endpoint

"""Loopback HTTP servers for the tests: photos, faults (lies, drips, hangs, redirect loops) and hit counts.

Every server binds 127.0.0.1 on a free port, runs in a daemon thread and is shut down by its fixture;
slow endpoints stop on their own after a bounded time.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlparse

from aiohttp import web

from devstack.local import LoopbackServer, QuietHandler


class ImageServer(LoopbackServer):
    """Serves ``files`` at ``/files/<name>`` plus fault endpoints; counts hits per path."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.files: dict[str, tuple[bytes, str]] = {}
        self.hits: Counter[str] = Counter()
        self.cookies: list[str] = []  # every Cookie header received
        self.stop_event = threading.Event()
        self.release = threading.Event()  # lets ``/held/<name>`` answer
        super().__init__(self._handler_class(), host)

    def add(self, name: str, data: bytes, content_type: str = "image/jpeg") -> str:
        self.files[name] = (data, content_type)
        return f"{self.base}/files/{name}"

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                parsed = urlparse(self.path)
                server.hits[parsed.path] += 1
                if self.headers.get("Cookie"):
                    server.cookies.append(self.headers["Cookie"])
                query = parse_qs(parsed.query)
                route = parsed.path.split("/")[1]
                handler = getattr(self, f"route_{route}", None)
                if handler is None:
                    self.send_error(404)
                    return
                with suppress(BrokenPipeError, ConnectionResetError):
                    handler(parsed.path, query)

            def send_body(self, body: bytes, content_type: str = "image/jpeg", length: int | None = None) -> None:
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                self.wfile.write(body)

            def route_files(self, path: str, _query: dict) -> None:
                name = path.split("/", 2)[2]
                if name not in server.files:
                    self.send_error(404)
                    return
                self.send_body(*server.files[name])

            def route_held(self, path: str, query: dict) -> None:
                """``/held/<name>``: the file once ``release`` is set (at most 60 s later)."""
                server.release.wait(60)
                self.route_files(path, query)

            def route_cookie(self, path: str, _query: dict) -> None:
                """An image that also sets a cookie for the whole host."""
                self.send_response(200)
                self.send_header("Set-Cookie", "session=secret-of-another-client; Path=/")
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", "4")
                self.end_headers()
                self.wfile.write(b"\xff\xd8\xff\xd9")

            def route_redirect(self, _path: str, query: dict) -> None:
                self.send_response(302)
                self.send_header("Location", query["to"][0])
                self.send_header("Content-Length", "0")
                self.end_headers()

            def route_loop(self, path: str, _query: dict) -> None:
                step = int(path.split("/")[2]) if path.count("/") > 1 else 0
                self.route_redirect(path, {"to": [f"/loop/{step + 1}"]})

            def route_lie(self, _path: str, _query: dict) -> None:
                """Claims 1 kB, sends 64 MB (or until the client hangs up)."""
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", "1000")
                self.end_headers()
                chunk = b"\xff" * (1 << 20)
                for _ in range(64):
                    self.wfile.write(chunk)

            def route_huge(self, _path: str, _query: dict) -> None:
                self.send_body(b"\xff" * 10, length=10**10)

            def route_forever(self, _path: str, _query: dict) -> None:
                """Chunked stream that would never end (stops after 60 s or at shutdown)."""
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and not server.stop_event.is_set():
                    self.wfile.write(b"10000\r\n" + b"\xff" * 0x10000 + b"\r\n")

            def route_drip(self, _path: str, _query: dict) -> None:
                """One byte a second of a 1 MB body (stops after 60 s or at shutdown)."""
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(1 << 20))
                self.end_headers()
                for _ in range(60):
                    if server.stop_event.wait(1.0):
                        return
                    self.wfile.write(b"\xff")
                    self.wfile.flush()

            def route_hang(self, _path: str, _query: dict) -> None:
                """Accepts and never answers (for 60 s at most)."""
                server.stop_event.wait(60)

        return Handler

    def stop(self) -> None:
        self.stop_event.set()  # ends the endpoints that stall
        super().stop()


@contextmanager
def running_image_server(host: str = "127.0.0.1") -> Iterator[ImageServer]:
    server = ImageServer(host).start()
    try:
        yield server
    finally:
        server.stop()


class Relay(LoopbackServer):
    """A loopback proxy in front of Runpod's (local) API: forwards ``/run``, ``/runsync`` and ``/status``,
    answers ``failures`` (a list of HTTP statuses, used up in order) instead of forwarding, counts the
    jobs each image was sent in, and the ``/status`` calls open at once (the local API runs a job inside
    its ``/status`` call, so that is the jobs in flight)."""

    def __init__(self, target: str, failures: list[int] | None = None) -> None:
        self.target = target.rstrip("/")
        self.failures = list(failures or [])
        self.sent: Counter[str] = Counter()  # image data -> number of /run requests carrying it
        self.refused: Counter[int] = Counter()
        self.open_status = 0
        self.max_open_status = 0
        self._lock = threading.Lock()
        super().__init__(self._handler_class())
        self.url = self.base

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        relay = self

        class Handler(QuietHandler):
            def answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def forward(self, method: str, body: bytes | None) -> None:
                with relay._lock:
                    failure = relay.failures.pop(0) if relay.failures else None
                if failure is not None:
                    relay.refused[failure] += 1
                    self.answer(failure, b'{"error": "injected"}')
                    return
                if method == "POST" and body and self.path.startswith("/run"):
                    for image in json.loads(body)["input"].get("images", []):
                        with relay._lock:
                            relay.sent[image["data"]] += 1
                status_call = self.path.startswith("/status")
                if status_call:
                    with relay._lock:
                        relay.open_status += 1
                        relay.max_open_status = max(relay.max_open_status, relay.open_status)
                try:
                    request = urllib.request.Request(relay.target + self.path, data=body, method=method)
                    request.add_header("Content-Type", "application/json")
                    try:
                        with urllib.request.urlopen(request, timeout=300) as response:
                            self.answer(response.status, response.read())
                    except urllib.error.HTTPError as error:
                        self.answer(error.code, error.read())
                finally:
                    if status_call:
                        with relay._lock:
                            relay.open_status -= 1

            def do_GET(self) -> None:
                with suppress(BrokenPipeError, ConnectionResetError):
                    self.forward("GET", None)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with suppress(BrokenPipeError, ConnectionResetError):
                    self.forward("POST", body)

        return Handler


class HostileEndpoint(LoopbackServer):
    """Speaks Runpod's /run and /status, answering each job with the next of ``replies`` (its final
    /status body, as crafted by the test), and records the jobs' inputs."""

    def __init__(self, replies: list[object]) -> None:
        self.replies = list(replies)
        self.jobs: dict[str, object] = {}
        self.inputs: list[dict] = []
        self._lock = threading.Lock()
        super().__init__(self._handler_class())
        self.url = self.base

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(QuietHandler):
            def answer(self, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def status(self) -> None:
                job_id = self.path.rsplit("/", 1)[1]
                with endpoint._lock:
                    reply = endpoint.jobs.get(job_id, {"status": "FAILED", "error": "Job ID not found"})
                self.answer(reply)

            def do_GET(self) -> None:
                self.status()

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path.startswith("/status"):
                    self.status()
                    return
                with endpoint._lock:
                    job_id = f"job-{len(endpoint.jobs)}"
                    endpoint.jobs[job_id] = endpoint.replies.pop(0) if endpoint.replies else {"status": "FAILED"}
                    endpoint.inputs.append(body.get("input", {}))
                self.answer({"id": job_id, "status": "IN_QUEUE"})

        return Handler


@asynccontextmanager
async def aiohttp_server(routes: list[web.RouteDef], max_body: int = 1 << 20) -> AsyncIterator[str]:
    """``routes`` served by aiohttp on a free loopback port of the running event loop (for answers that
    stream without end, or requests to look at); its base URL. Request bodies up to ``max_body`` bytes."""
    app = web.Application(client_max_size=max_body)
    app.add_routes(routes)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()

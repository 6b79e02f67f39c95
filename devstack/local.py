"""Run ``python -m gateway`` with Runpod's local API as a child process, and send it jobs; serve
loopback stand-ins (``LoopbackServer``).

For the quickstart, the tests and the benchmarks; the worker itself does not use this.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

from gateway.serving.triton_process import free_port


class QuietHandler(BaseHTTPRequestHandler):
    """The stand-ins' request handler base: HTTP/1.1 keep-alive, no access log on stderr."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass


class LoopbackServer:
    """``handler`` served on a free port of ``host`` from a daemon thread, between ``start`` and ``stop``."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], host: str = "127.0.0.1") -> None:
        family = socket.getaddrinfo(host, 0)[0][0]
        self._httpd = type("Server", (ThreadingHTTPServer,), {"address_family": family})((host, 0), handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.base = f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def start(self) -> Self:
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


# Every worker a stand-in starts: runpod's start-up fitness checks stay off (one connects to a public DNS
# server, 8.8.8.8:53); a local run reaches loopback only.
LOOPBACK_ONLY = {"RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true"}


def start_gateway(env: dict[str, str], port: int, log_path: Path) -> subprocess.Popen:
    """Start the worker with ``env`` added to ours, serving Runpod's local API on 127.0.0.1:``port``."""
    command = [sys.executable, "-m", "gateway", "--rp_serve_api", "--rp_api_port", str(port)]
    with log_path.open("wb") as log:
        return subprocess.Popen(
            command, env={**os.environ, **LOOPBACK_ONLY, **env}, stdout=log, stderr=subprocess.STDOUT
        )


def post(url: str, payload: dict, timeout: float = 120) -> dict:
    """POST ``{"input": payload}`` to ``url``/runsync; returns the parsed reply."""
    body = json.dumps({"input": payload}).encode()
    request = urllib.request.Request(f"{url}/runsync", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@contextmanager
def running_gateway(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """``start_gateway`` on a free port, ready to take jobs; yields its URL and stops it afterwards."""
    port = free_port()
    process = start_gateway(env, port, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_api(process, url, log_path)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_for_api(process: subprocess.Popen, url: str, log_path: Path, timeout: float = 180) -> None:
    """Wait until the local API answers a job; raise RuntimeError with the log's end if it does not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited during start-up:\n{log_path.read_text()[-3000:]}")
        try:
            post(url, {}, timeout=10)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the gateway API was not up after {timeout:g} s:\n{log_path.read_text()[-3000:]}")

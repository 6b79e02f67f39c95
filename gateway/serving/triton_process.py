"""Start and stop a local ``tritonserver`` over a model repository, bound to loopback only.

The binary is ``$TRITONSERVER_BIN``, else NVIDIA's image path ``/opt/tritonserver/bin/tritonserver``,
else the one the ``nvidia-pytriton`` wheel ships (which needs its bundled libraries, a backend directory
holding the Python backend plus the stub for this interpreter, and this interpreter's environment on
PATH so the stub finds numpy and onnxruntime). Triton runs in explicit model-control mode on free ports;
``start`` waits for readiness with a deadline and fails loudly, with the end of Triton's log.

Triton runs in a process group of its own, which its Python-backend stubs share: stopping it (or
cleaning up after it crashed) signals the whole group, so no ``triton_python_backend_stub`` outlives it.

Its output goes to ``tritonserver.log`` (appended, each start marked, so the log of a Triton that crashed
survives the restart) and into the worker's own log, each line prefixed ``triton:`` and at most
``LOG_LINES_PER_SECOND`` of them (bursts of ``LOG_BURST``; what is held back is counted and said), so
Runpod's log view shows why Triton failed.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from gateway.allocator import as_before

NVIDIA_IMAGE_BINARY = Path("/opt/tritonserver/bin/tritonserver")
PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """In a child process: ask Linux to send it ``signum`` when its parent dies, so that it is never
    orphaned."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signum)


class TritonStartError(RuntimeError):
    """Triton did not become ready."""


log = logging.getLogger("gateway")
BACKEND_REGION_PREFIX = "triton_python_backend_shm_region_"
LOG_LINES_PER_SECOND = 50.0
LOG_BURST = 200


class RateLimit:
    """A token bucket: ``allow()`` at most ``rate`` times a second on average, ``burst`` at once."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = float(burst)
        self.last = clock()

    def allow(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


def relay_log(stream, path: Path, limit: RateLimit) -> None:
    """Copy Triton's output (``stream``, until it closes) to ``path`` and, limited, to the worker's log."""
    held_back = 0
    with path.open("ab") as file:
        for raw in iter(stream.readline, b""):
            file.write(raw)
            file.flush()
            if not limit.allow():
                held_back += 1
                continue
            if held_back:
                log.warning("triton: (%d lines held back by the log rate limit; all are in %s)", held_back, path)
                held_back = 0
            log.info("triton: %s", raw.decode(errors="replace").rstrip())
    if held_back:
        log.warning("triton: (%d lines held back by the log rate limit; all are in %s)", held_back, path)


def mapped_shm_files() -> set[str]:
    """Names of the /dev/shm files some live process has mapped (from every ``/proc/<pid>/maps``)."""
    mapped = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                for line in (entry / "maps").read_text().splitlines():
                    path = line.split(maxsplit=5)[-1]
                    if path.startswith("/dev/shm/"):
                        mapped.add(path[len("/dev/shm/") :].removesuffix(" (deleted)"))
    return mapped


def remove_unmapped_backend_regions(min_age: float = 1.0) -> list[str]:
    """Unlink the Python backend's regions in /dev/shm that no live process maps any more: a Triton that
    was killed leaves them behind (tens of MB each time). Regions of another live Triton are mapped and
    stay; ``min_age`` spares one created this instant and not yet mapped."""
    now = time.time()
    candidates = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/dev/shm"):
            if entry.name.startswith(BACKEND_REGION_PREFIX):
                with contextlib.suppress(OSError):
                    if now - entry.stat().st_mtime >= min_age:
                        candidates.append(entry.name)
    if not candidates:
        return []
    mapped = mapped_shm_files()
    removed = []
    for name in candidates:
        if name not in mapped:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join("/dev/shm", name))
                removed.append(name)
    return removed


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _pytriton_root() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonStartError("no tritonserver found: install nvidia-pytriton or set TRITONSERVER_BIN")
    return Path(next(iter(spec.submodule_search_locations)))


class EmbeddedTriton:
    def __init__(self, repository: Path, start_timeout: float = 180.0) -> None:
        self.repository = repository.resolve()
        self.start_timeout = start_timeout
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="tritonserver-"))
        self.log_path = self.workdir / "tritonserver.log"
        self.process: subprocess.Popen | None = None
        self.log_limit = RateLimit(LOG_LINES_PER_SECOND, LOG_BURST)

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def ports(self) -> tuple[int, int]:
        return (self.grpc_port, self.http_port)

    def command_and_env(self) -> tuple[list[str], dict[str, str]]:
        env = as_before(dict(os.environ))  # the gateway's one-arena allocator setting is its own
        args = [
            f"--model-repository={self.repository}",
            "--model-control-mode=explicit",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=false",
            "--exit-timeout-secs=5",
        ]
        override = os.environ.get("TRITONSERVER_BIN")
        if override:
            return [override, *args], env
        if NVIDIA_IMAGE_BINARY.exists():
            return [str(NVIDIA_IMAGE_BINARY), *args], env
        root = _pytriton_root() / "tritonserver"
        backends = self.workdir / "backends"
        if not backends.exists():  # a restart reuses it (a killed Triton's stubs may still run the binary)
            shutil.copytree(root / "backends", backends)
            stub = root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}"
            shutil.copy(stub / "triton_python_backend_stub", backends / "python" / "triton_python_backend_stub")
        libs = root.parent.parent / "nvidia_pytriton.libs"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(libs), env.get("LD_LIBRARY_PATH")]))
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return [str(root / "bin" / "tritonserver"), f"--backend-directory={backends}", *args], env

    def start(self) -> EmbeddedTriton:
        command, env = self.command_and_env()
        with self.log_path.open("ab") as file:
            file.write(f"--- tritonserver starting at {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n".encode())
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=die_with_parent,
            start_new_session=True,  # its own process group, shared with its backend stubs
        )
        threading.Thread(
            target=relay_log, args=(self.process.stdout, self.log_path, self.log_limit), name="triton-log", daemon=True
        ).start()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TritonStartError(f"tritonserver exited with status {self.process.returncode}:\n{self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.2)
        self.stop()
        raise TritonStartError(f"tritonserver not ready after {self.start_timeout:g} s:\n{self.log_tail()}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop Triton and remove its working files."""
        self.terminate()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def terminate(self) -> None:
        """Stop Triton and its backend stubs; ``start`` brings it back on the same ports."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.process.wait()
        self._signal_group(signal.SIGKILL)  # stubs left behind, e.g. after Triton itself was killed
        deadline = time.monotonic() + 5
        while self.group_members() and time.monotonic() < deadline:  # SIGKILL is delivered asynchronously
            time.sleep(0.05)
        removed = remove_unmapped_backend_regions()
        if removed:
            log.info("removed %d shared-memory regions a stopped Triton left in /dev/shm", len(removed))

    def crash(self) -> None:
        """SIGKILL the tritonserver process alone, as an OOM kill would (tests); its stubs stay."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def group_members(self) -> list[int]:
        """Live (not zombie) processes in Triton's process group: Triton and its backend stubs."""
        if self.process is None:
            return []
        members = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                    if fields[0] != "Z" and int(fields[2]) == self.process.pid:  # state, process group
                        members.append(int(entry.name))
        return members

    def _signal_group(self, signum: int) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signum)


def point_tensorrt_cache(link: Path, target: Path) -> str:
    """Make ``link`` (the exported configs' cache path) lead to ``target`` (``TENSORRT_CACHE_DIR``),
    creating it; returns what was done, for the log. Never raises: without a cache, engines are rebuilt."""
    try:
        target.mkdir(parents=True, exist_ok=True)
        if link.resolve() == target.resolve():
            return f"TensorRT engines are cached in {target}"
        if link.is_symlink():
            link.unlink()
        elif link.is_dir():
            link.rmdir()  # the image's empty placeholder; a folder with engines in it is kept (OSError)
        link.symlink_to(target, target_is_directory=True)
    except OSError as error:
        return f"TensorRT engine cache not set up ({error.strerror or error}): engines are rebuilt on each start"
    return f"TensorRT engines are cached in {target} (through {link})"

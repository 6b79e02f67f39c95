"""Shared fixtures: tiny random checkpoints of the three architectures, exported through the real CLI.

Also the network guard: every Python process of the run (this one, and through ``PYTHONPATH`` each
worker, Triton stub and client it starts) refuses connections outside loopback and records them; a run
that recorded any fails at its end.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data

from devstack.local import LOOPBACK_ONLY, post, running_gateway
from export.cli import main as export_main
from export.random_checkpoint import save_random_checkpoint
from gateway.serving.triton_process import EmbeddedTriton
from tests.servers import ImageServer, running_image_server

NETGUARD = Path(__file__).resolve().parent / "netguard"
os.environ["NETGUARD_LOG"] = tempfile.mkstemp(prefix="netguard-", suffix=".log")[1]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(NETGUARD), os.environ.get("PYTHONPATH")]))
os.environ.update(LOOPBACK_ONLY)  # every worker the run starts skips runpod's fitness checks (8.8.8.8:53)
import tests.netguard.sitecustomize  # noqa: E402, F401  # this process too

RELATIVE_ID = "depth-anything/Depth-Anything-V2-Small-hf"
SMALL = "depth_anything_v2_small"  # its Triton name
METRIC_ID = "depth-anything/Depth-Anything-V2-Metric-Indoor-Large-hf"
DPT_ID = "Intel/dpt-large"
TINY_MODELS = (RELATIVE_ID, METRIC_ID, DPT_ID)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny random checkpoint per architecture, saved with ``save_pretrained``."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {model_id: save_random_checkpoint(model_id, root / model_id.replace("/", "--")) for model_id in TINY_MODELS}


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path]) -> Path:
    """A model repository holding the three tiny models (FP16, Python backend, as the local Triton runs them)."""
    repo = tmp_path_factory.mktemp("model_repository")
    for model_id, checkpoint in checkpoints.items():
        argv = [model_id, "--checkpoint", str(checkpoint), "--repository", str(repo), "--backend", "python"]
        assert export_main(argv) == 0
    return repo


# --------------------------------------------------------------------------- the local serving stack

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def serving_repository(repository: Path, checkpoints: dict[str, Path]) -> Path:
    """The tiny models plus an FP32 variant of the relative one (so both dtypes are served)."""
    argv = [RELATIVE_ID, "--checkpoint", str(checkpoints[RELATIVE_ID]), "--repository", str(repository)]
    assert export_main([*argv, "--backend", "python", "--precision", "fp32"]) == 0
    return repository


@pytest.fixture
def own_repository(serving_repository: Path, tmp_path: Path) -> Path:
    """A copy of the small model's repository that a test may take away (or whose Triton it may kill)."""
    repository = tmp_path / "repository"
    repository.mkdir()
    shutil.copytree(serving_repository / SMALL, repository / SMALL)
    return repository


@pytest.fixture(scope="session")
def triton(serving_repository: Path) -> Iterator[EmbeddedTriton]:
    """A real tritonserver on loopback over the tiny models (explicit model control)."""
    server = EmbeddedTriton(serving_repository, start_timeout=120).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory):
    """A real S3 server (SeaweedFS) on loopback that no test stops; each module makes its own bucket."""
    from bench.seaweed import Weed

    server = Weed(tmp_path_factory.mktemp("seaweed")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def image_server() -> Iterator[ImageServer]:
    with running_image_server() as server:
        yield server


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real photos (scikit-image's), some cut to bucket aspect ratios and enlarged past 518 px."""
    chelsea_4x3 = cv2.resize(data.chelsea()[:, 25:425], (1024, 768), interpolation=cv2.INTER_CUBIC)
    large = cv2.resize(data.astronaut()[64:448], (1400, 1050), interpolation=cv2.INTER_CUBIC)  # decoded at 1/2
    return {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea_4x3": chelsea_4x3, "large_4x3": large}


def jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def photo_urls(image_server: ImageServer, photos: dict[str, np.ndarray]) -> dict[str, str]:
    return {name: image_server.add(f"{name}.jpg", jpeg(image)) for name, image in photos.items()}


@pytest.fixture(scope="session")
def gateway_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the shared gateway (``gateway_url``) writes its stdout and stderr."""
    return tmp_path_factory.mktemp("gateway") / "gateway.log"


@pytest.fixture(scope="session")
def gateway_url(triton: EmbeddedTriton, gateway_log: Path) -> Iterator[str]:
    """``python -m gateway`` with Runpod's local API, talking to the test's Triton over gRPC."""
    log_path = gateway_log
    env = {
        "TRITON_URL": triton.grpc_url,
        "TRITON_PORTS": f"{triton.grpc_port},{triton.http_port}",
        "DEPTH_MODEL": RELATIVE_ID,
        "URL_ALLOWLIST": "127.0.0.1",
        "MAX_LOADED_MODELS": "2",
        "CONCURRENCY": "32",
        "TRITON_TIMEOUT": "20",
        "DOWNLOAD_TIMEOUT": "3",
        "MAX_DOWNLOAD_BYTES": str(8 << 20),
    }
    with running_gateway(env, log_path) as url:
        yield url


@pytest.fixture
def run_job(gateway_url: str):
    """Send one job; returns the output, or {"error": ...} for a failed job."""

    def send(payload: dict) -> dict:
        reply = post(gateway_url, payload)
        if reply["status"] == "FAILED":
            return {"error": reply["error"]}
        assert reply["status"] == "COMPLETED", reply
        return reply["output"]

    return send


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any of its processes tried to reach an address outside loopback."""
    dialed = Path(os.environ["NETGUARD_LOG"]).read_text()
    if dialed:
        print(f"\nconnections outside loopback were attempted (pid address:port):\n{dialed}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

"""``python -m gateway`` as a newcomer runs it (embedded Triton), and the people's client against it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from devstack.local import post, start_gateway, wait_for_api
from gateway.serving.triton_process import free_port
from tests.conftest import RELATIVE_ID, ROOT, jpeg


@pytest.fixture(scope="module")
def embedded_gateway(serving_repository: Path, tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("embedded") / "gateway.log"
    env = {"MODEL_REPOSITORY": str(serving_repository), "DEPTH_MODEL": RELATIVE_ID, "TRITON_URL": ""}
    process = start_gateway(env, port, log_path)
    url = f"http://127.0.0.1:{port}"
    wait_for_api(process, url, log_path)
    yield url, process
    process.terminate()
    process.wait(timeout=30)


def tritonservers_of(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid), "-f", "tritonserver"], capture_output=True, text=True)
    return [int(line) for line in found.stdout.split()]


def test_embedded_stack_serves_and_the_client_writes_outputs(
    embedded_gateway, tmp_path: Path, photos: dict[str, np.ndarray]
) -> None:
    url, process = embedded_gateway
    assert len(tritonservers_of(process.pid)) == 1
    photo = tmp_path / "coffee.jpg"
    photo.write_bytes(jpeg(photos["coffee"]))
    out = tmp_path / "out"
    tasks = ["depth", "colorized", "normals", "disparity", "point_cloud"]
    command = [sys.executable, "-m", "gateway.client", str(photo), "--out", str(out), "--endpoint", url]
    missing = str(tmp_path / "missing.jpg")
    every_task = ["--tasks", *tasks, "points", "mesh", "--include-raw"]
    result = subprocess.run([*command, missing, *every_task], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1, result.stderr  # the missing file fails, on its own
    assert f"failed: {missing}: could not read the file: No such file or directory" in result.stderr
    names = sorted(p.name for p in out.iterdir())
    others = ["coffee_depth_raw.npz", "coffee_points.ply", "coffee_mesh.glb", "coffee.json", "run.json"]
    assert names == sorted([f"coffee_{t}.png" for t in tasks] + others)
    assert (out / "coffee_points.ply").read_bytes().startswith(b"ply\nformat binary_little_endian 1.0\n")
    assert (out / "coffee_mesh.glb").read_bytes()[:4] == b"glTF"
    assert cv2.imread(str(out / "coffee_depth.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    assert cv2.imread(str(out / "coffee_colorized.png")).shape == (400, 600, 3)
    assert np.load(out / "coffee_depth_raw.npz")["depth"].shape == (400, 600)
    assert "done 1, failed 1, skipped 0" in result.stdout


def test_embedded_triton_stops_with_the_worker(embedded_gateway) -> None:
    url, process = embedded_gateway
    assert post(url, {})["error"].startswith("no image given")
    children = tritonservers_of(process.pid)
    assert children
    process.terminate()
    process.wait(timeout=30)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in children):
        time.sleep(0.2)
    assert not any(Path(f"/proc/{pid}").exists() for pid in children)

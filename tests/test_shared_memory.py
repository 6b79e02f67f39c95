"""Triton system shared memory between the gateway and a real tritonserver on loopback: outputs equal to
the gRPC-payload path, slots that wait and come back, a region Triton forgot (or lost in a restart) is
registered again, and nothing is left in Triton or /dev/shm when the gateway stops or is killed."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pybase64
import pytest

from devstack.local import post, running_gateway, start_gateway, wait_for_api
from export import triton_config
from gateway.inputs.schema import DepthRequest
from gateway.serving import imagework, shared_memory
from gateway.serving.imagework import Decoded, ImageWorkers, ParkedOutput, handed_in, render_outputs, render_parked
from gateway.serving.ownership import Holdings
from gateway.serving.shared_memory import SHM_DIR, SharedOutputs, SharedPhoto, Slot, slot_bytes, slots_that_fit
from gateway.serving.shm_region import SharedTensors, is_local
from gateway.serving.triton_process import EmbeddedTriton, free_port
from tests import images
from tests.conftest import SMALL
from tests.test_geometry import served
from tests.test_robustness import b64
from tests.test_supervisor import triton_of, wait_until

RELATIVE = "depth-anything/Depth-Anything-V2-Small-hf"
PHOTOS = [b64(images.encode(images.Image.fromarray(images.photo_like(w, h)), "JPEG")) for w, h in
          [(64, 48), (48, 64), (90, 30), (33, 33), (70, 50), (20, 80)] * 2]  # fmt: skip
JOB = {"images": [{"type": "b64", "data": photo} for photo in PHOTOS], "tasks": ["depth", "colorized", "point_cloud"]}


def regions(http_url: str) -> dict[str, dict]:
    with urllib.request.urlopen(f"{http_url}/v2/systemsharedmemory/status", timeout=10) as response:
        return {region["name"]: region for region in json.loads(response.read())}


def unregistered(http_url: str, region: str) -> bool:
    """Unregister ``region`` from Triton; False while Triton says a request still holds it (it drops a
    request's hold after the answer has gone out, so under load an unregister right after may find it)."""
    request = urllib.request.Request(f"{http_url}/v2/systemsharedmemory/region/{region}/unregister", b"", method="POST")
    try:
        urllib.request.urlopen(request, timeout=10).close()
    except urllib.error.HTTPError as error:
        if b"currently in use" not in error.read():
            raise
        return False
    return True


def gateway_pid(log_path: Path) -> int:
    """The worker's pid, from the region name it logged (``depth-gateway-<pid>-<random>``)."""
    return int(region_of(log_path).split("-")[2])


def region_of(log_path: Path) -> str:
    for line in log_path.read_text().splitlines():
        if "shared memory region " in line:
            return line.split("shared memory region ")[1].split()[0]
    raise AssertionError("the gateway registered no shared memory")


def files_of(region: str) -> list[str]:
    return [name for name in os.listdir(SHM_DIR) if name == region]


def outputs(reply: dict) -> list[dict]:
    assert reply["status"] == "COMPLETED", reply
    return [{k: v for k, v in r.items() if k not in ("timings", "elapsed_sec")} for r in reply["output"]["results"]]


def differences(got: list[dict], expected: list[dict]) -> str:
    """Which images and keys differ, with both values (outputs by their length and decoded pixels), so
    that a failure says what went wrong: an image's own values off by rounding, or another image's."""
    lines = []
    for got_one, expected_one in zip(got, expected, strict=True):
        for key in sorted(set(got_one) | set(expected_one)):
            a, b = got_one.get(key), expected_one.get(key)
            if a == b:
                continue
            if isinstance(a, str) and isinstance(b, str) and key.endswith("_b64"):
                pixels = [
                    cv2.imdecode(np.frombuffer(pybase64.b64decode(v), np.uint8), cv2.IMREAD_UNCHANGED) for v in (a, b)
                ]
                same_shape = pixels[0] is not None and pixels[1] is not None and pixels[0].shape == pixels[1].shape
                gap = (
                    int(np.abs(pixels[0].astype(int) - pixels[1].astype(int)).max()) if same_shape else "shapes differ"
                )
                lines.append(
                    f"image {expected_one.get('index')} {key}: {len(a)} against {len(b)} chars, pixels differ by {gap}"
                )
            else:
                lines.append(f"image {expected_one.get('index')} {key}: {a!r:.200} against {b!r:.200}")
    return "\n".join(lines)


@pytest.fixture
def unbatched_triton(own_repository: Path) -> Iterator[EmbeddedTriton]:
    """A tritonserver whose small model runs every request alone (no dynamic batching).

    The tiny FP16 model's depth for an image differs by one FP16 step (about 5e-4 of its values) between a
    batch of one and a larger batch, and which images Triton batches together depends on timing: over
    gRPC all 12 images arrive at once, through 4 slots the last one may arrive alone. Unbatched, each
    image's depth is the same in both runs, so the outputs can be compared byte for byte (a neighbour's
    pixels in an image's result cannot hide in a tolerance)."""
    config_path = own_repository / SMALL / "config.pbtxt"
    config = triton_config.parse(config_path.read_text())
    config.ClearField("dynamic_batching")
    config_path.write_text(triton_config.render(config))
    server = EmbeddedTriton(own_repository, start_timeout=120).start()
    yield server
    server.stop()


def test_shared_memory_serves_the_same_outputs_and_cleans_up(unbatched_triton: EmbeddedTriton, tmp_path: Path) -> None:
    triton = unbatched_triton
    env = {"TRITON_URL": triton.grpc_url, "DEPTH_MODEL": RELATIVE}
    with running_gateway({**env, "TRITON_SHARED_MEMORY": "off"}, tmp_path / "off.log") as url:
        over_grpc = outputs(post(url, JOB))
        assert "shared memory region" not in (tmp_path / "off.log").read_text()
    log_path = tmp_path / "shared.log"
    with running_gateway({**env, "SHARED_MEMORY_SLOTS": "4"}, log_path) as url:  # 12 images wait for 4 slots
        region = region_of(log_path)
        registered = regions(triton.http_url)[region]
        assert registered["key"] == f"/{region}"
        assert registered["byte_size"] == 4 * slot_bytes(518 * 924)  # the largest 518 bucket of DA-V2
        assert files_of(region) == [region]
        photos_before = parked_photos()
        shared = outputs(post(url, JOB))  # point_cloud: each photo parked between its decode and render
        assert all("error" not in result for result in shared)
        assert shared == over_grpc, differences(shared, over_grpc)
        assert parked_photos() <= photos_before

        # Triton forgets the region (as after a restart): the gateway registers it again and carries on.
        wait_until(lambda: unregistered(triton.http_url, region), 10, "Triton still holds the region")
        assert region not in regions(triton.http_url)
        again = outputs(post(url, JOB))
        assert again == over_grpc, differences(again, over_grpc)
        assert region in regions(triton.http_url)
    assert region not in regions(triton.http_url)  # unregistered on exit
    assert files_of(region) == []  # and unlinked


def test_a_larger_network_size_goes_over_grpc(triton: EmbeddedTriton, tmp_path: Path) -> None:
    env = {"TRITON_URL": triton.grpc_url, "DEPTH_MODEL": RELATIVE}
    job = {**JOB, "images": JOB["images"][:2], "process_res": 770}
    with running_gateway({**env, "TRITON_SHARED_MEMORY": "off"}, tmp_path / "off.log") as url:
        over_grpc = outputs(post(url, job))
    with running_gateway(env, tmp_path / "shared.log") as url:
        assert outputs(post(url, job)) == over_grpc
        assert 770 in over_grpc[0]["network_size"]


def http_port_of(pid: int) -> int:
    arguments = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return int(next(arg.split("=")[1] for arg in arguments if arg.startswith("--http-port")))


def test_a_triton_restart_in_the_middle(own_repository: Path, tmp_path: Path) -> None:
    port, log_path = free_port(), tmp_path / "gateway.log"
    env = {"MODEL_REPOSITORY": str(own_repository), "DEPTH_MODEL": RELATIVE, "TRITON_TIMEOUT": "20"}
    process = start_gateway(env, port, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_api(process, url, log_path)
        region = region_of(log_path)
        first = triton_of(process)
        assert region in regions(f"http://127.0.0.1:{http_port_of(first)}")
        during: list[dict] = []
        job = threading.Thread(target=lambda: during.append(post(url, JOB)))
        job.start()
        time.sleep(0.3)
        os.kill(first, signal.SIGKILL)
        job.join(120)
        assert during
        assert during[0]["status"] == "COMPLETED"
        for result in during[0]["output"]["results"]:  # served, or a clean per-image error
            assert "depth_png_b64" in result or result["error"]
        deadline = time.monotonic() + 90
        reply = post(url, JOB)
        while reply["status"] != "COMPLETED" or any("error" in result for result in reply["output"]["results"]):
            assert time.monotonic() < deadline, reply
            time.sleep(1)
            reply = post(url, JOB)
        second = triton_of(process)
        assert second != first
        assert region in regions(f"http://127.0.0.1:{http_port_of(second)}")
        assert all(result["width"] > 0 for result in reply["output"]["results"])
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert files_of(region) == []


def test_a_killed_gateway_leaves_no_region(triton: EmbeddedTriton, tmp_path: Path) -> None:
    port, log_path = free_port(), tmp_path / "gateway.log"
    process = start_gateway({"TRITON_URL": triton.grpc_url, "DEPTH_MODEL": RELATIVE}, port, log_path)
    try:
        wait_for_api(process, f"http://127.0.0.1:{port}", log_path)
        region = region_of(log_path)
        assert files_of(region) == [region]
    finally:
        process.kill()
        process.wait()
    wait_until(lambda: files_of(region) == [], 30)  # Python's resource tracker unlinks it


def test_remote_triton_and_a_full_dev_shm_mean_grpc_payloads() -> None:
    assert is_local("127.0.0.1:8001")
    assert is_local("localhost:8001")
    assert is_local("[::1]:8001")
    assert not is_local("triton.internal:8001")
    assert not is_local("10.0.0.5:8001")
    free = os.statvfs(SHM_DIR).f_bavail * os.statvfs(SHM_DIR).f_frsize
    assert slots_that_fit(10**9, 1 << 20) == free // 2 // (1 << 20)
    assert slots_that_fit(8, 1 << 20) == 8
    assert slots_that_fit(8, free) == 0
    assert slots_that_fit(8, 1, "/no/such/dir") == 0


def parked_photos() -> set[str]:
    return {name for name in os.listdir(SHM_DIR) if name.startswith("psm_")}


def _park(seed: int) -> SharedPhoto | None:
    return SharedPhoto.park(_pixels(seed))


def test_a_photo_parked_by_one_process_is_read_by_another_and_discarded_by_the_gateway() -> None:
    before = parked_photos()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        parked = pool.submit(_park, 3).result()
        assert parked is not None
        assert parked_photos() - before == {parked.name}
        assert pool.submit(parked.read, np.copy).result().tolist() == _pixels(3).tolist()
    parked.discard()
    assert parked_photos() == before
    parked.discard()  # twice is harmless

    # Rendered from a parked photo: the same outputs as from the array itself.
    request = DepthRequest(image_b64="x", tasks=["point_cloud", "points", "mesh"], point_cloud_grid=64)
    depth = np.add.outer(np.linspace(1, 2, 30), np.linspace(0, 1, 40)).astype(np.float32)
    inline = Decoded(None, (40, 30), (40, 30), (40, 30), _pixels(5), None)
    parked = Decoded(None, (40, 30), (40, 30), (40, 30), _park(5), None)
    model = served(RELATIVE)
    assert render_outputs(parked, depth, request, model, None) == render_outputs(inline, depth, request, model, None)
    parked.photo.discard()

    async def abandoned_decode() -> None:
        """A decode whose image was closed (its job cancelled) while a worker still ran it."""
        holdings = Holdings()
        running: Future = Future()
        holdings.track(running, lambda decoded: holdings.on_give_back(decoded.photo.discard))
        holdings.close()
        running.set_result(Decoded(None, (40, 30), (40, 30), (40, 30), _park(4), None))
        await asyncio.sleep(0.05)  # the pool's callback reaches the loop

    asyncio.run(abandoned_decode())
    assert parked_photos() == before


PARK_AND_DIE = """
import os, signal, sys
from gateway.serving.shared_memory import SharedPhoto, new_segment
import cv2
import numpy as np
import pybase64
kept = new_segment([b"x" * 100, bytearray(50)])
gone = SharedPhoto.park(np.zeros((4, 5, 3), np.uint8))
gone.discard()
gone.discard()
print(kept, gone.name, flush=True)
if sys.argv[1] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("end", ["kill", "exit"])
def test_a_segment_its_process_left_behind_is_removed_by_the_resource_tracker(end: str) -> None:
    """Parked segments are registered with multiprocessing's resource tracker as a ``SharedMemory`` is: a
    process killed (or ended) while holding one leaves nothing in /dev/shm; one discarded, even twice, is
    forgotten by the tracker without a complaint."""
    done = subprocess.run([sys.executable, "-c", PARK_AND_DIE, end], capture_output=True, text=True, timeout=60)
    kept, gone = done.stdout.split()
    assert not os.path.exists(os.path.join(SHM_DIR, gone))
    wait_until(lambda: not os.path.exists(os.path.join(SHM_DIR, kept)), timeout=10)
    assert "Traceback" not in done.stderr  # the tracker's complaint about an unknown name
    assert "There appear to be 1 leaked shared_memory" in done.stderr  # kept, and not the discarded one


def test_large_outputs_come_back_through_a_segment_that_is_then_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rendered in an image worker, a 3D image's outputs (over ``PARK_OUTPUTS_FROM``) are parked in shared
    memory and read back equal, key for key and in order, to the outputs rendered in-process; nothing stays
    in /dev/shm, whether the render's caller read them or had gone (its job cancelled). Outputs to upload
    are handed over parked: each is read where it is uploaded (here, each in a thread of its own), and the
    segment is gone after the last read; until then it stays, whatever the image's holdings do, and a job
    that ends first discards it."""
    request = DepthRequest(image_b64="x", tasks=["depth", "points", "mesh"])
    depth = np.add.outer(np.linspace(1, 2, 300), np.linspace(0, 1, 400)).astype(np.float32)
    photo = np.random.default_rng(7).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    decoded = Decoded(None, (400, 300), (400, 300), (400, 300), photo, None)
    model = served(RELATIVE)
    before = parked_photos()

    async def rendered(uploaded: bool, abandon: bool = False) -> dict | None:
        workers = ImageWorkers(1)
        try:
            holdings = Holdings()
            call = workers.render(decoded, depth, request, model, None, holdings, uploaded)
            if not abandon:
                got = await call
                holdings.close()  # the image is done: its slot and working memory go back, not handed outputs
                return got
            task = asyncio.ensure_future(call)
            await asyncio.sleep(0.01)
            task.cancel()
            holdings.close()  # the job is gone while the worker still renders
            await asyncio.sleep(3)
            return None
        finally:
            workers.close()

    expected = render_outputs(decoded, depth, request, model, None)
    got = asyncio.run(rendered(False))
    assert list(got) == list(expected)
    assert got == expected
    assert parked_photos() == before

    expected = render_outputs(decoded, depth, request, model, None, uploaded=True)
    outputs = ("depth_png_b64", "points_b64", "mesh_b64")
    assert sum(len(expected[key]) for key in outputs) > imagework.PARK_OUTPUTS_FROM
    for read in (outputs, outputs[:2]):
        got = asyncio.run(rendered(True))
        assert list(got) == list(expected)
        assert {key: value for key, value in got.items() if key not in outputs} == {
            key: value for key, value in expected.items() if key not in outputs
        }
        (handed,) = handed_in(got)
        assert all(isinstance(got[key], ParkedOutput) and got[key].size == len(expected[key]) for key in outputs)
        assert len(parked_photos() - before) == 1  # still there after the image's holdings were given back
        with ThreadPoolExecutor(len(read)) as threads:
            assert list(threads.map(ParkedOutput.read, [got[key] for key in read])) == [expected[key] for key in read]
        if read == outputs:
            assert parked_photos() == before  # the last read discarded it
        else:
            assert len(parked_photos() - before) == 1  # an output not read yet: still there
            handed.discard()  # the job ended first
            assert parked_photos() == before
            with pytest.raises(FileNotFoundError):
                got["mesh_b64"].read()
    for uploaded in (False, True):
        assert asyncio.run(rendered(uploaded, abandon=True)) is None
        assert parked_photos() == before

    # In this process: the segment holds them until discarded; small outputs and a full /dev/shm stay inline.
    parked = render_parked(decoded, depth, request, model, None)
    assert parked.parked is not None
    assert parked_photos() - before == {parked.parked.name}
    assert parked.fields["mesh_b64"] is None
    assert parked.outputs() == render_outputs(decoded, depth, request, model, None)
    parked.parked.discard()
    assert parked_photos() == before
    small = DepthRequest(image_b64="x", tasks=["disparity"], output_format="jpg")
    assert render_parked(decoded, depth, small, model, None).parked is None

    def full(_key: str, _size: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shared_memory, "allocate", full)
    inline = render_parked(decoded, depth, request, model, None)
    assert inline.parked is None
    assert inline.outputs() == render_outputs(decoded, depth, request, model, None)
    assert parked_photos() == before


def _pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)


def _write_from_another_process(slot: Slot, seed: int) -> None:
    image = np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    slot.write_input(image)


def test_slots_cross_processes_and_wait_out_a_possible_late_write() -> None:
    async def scenario() -> None:
        shared = SharedTensors(slots=2, pixels=40 * 30, timeout=0.5)
        try:
            allocated = os.stat(os.path.join(SHM_DIR, shared.key)).st_blocks * 512
            assert allocated >= shared.byte_size  # its pages exist now: a full /dev/shm cannot SIGBUS a writer later
            first, second = await shared.acquire(), await shared.acquire()
            assert (first.index, second.index) == (0, 1)
            assert second.input_offset >= first.output_offset + 40 * 30 * 4
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                pool.submit(_write_from_another_process, second, 7).result()
            expected = np.random.default_rng(7).integers(0, 256, (30, 40, 3), dtype=np.uint8)
            view = np.ndarray((30, 40, 3), np.uint8, buffer=shared.handle._mpsm_handle.buf, offset=second.input_offset)
            assert np.array_equal(view, expected)

            shared.release(first)
            assert (await asyncio.wait_for(shared.acquire(), 0.1)) == first
            shared.hold_back(second)  # its inference got no answer: Triton may still write into it
            shared.release(second)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(shared.acquire(), 0.3)
            assert (await asyncio.wait_for(shared.acquire(), 1.0)) == second
        finally:
            shared.destroy()
        assert files_of(shared.key) == []

    asyncio.run(scenario())


@pytest.mark.parametrize("text", [True, False])
def test_parked_outputs_read_back_whole_or_not_at_all(text: bool) -> None:
    """Each output comes back in its place (``str`` for text); a segment cut short since it was written is
    an OSError, never a SIGBUS from reading a mapping past the file's end."""
    rng = np.random.default_rng(11)
    outputs = {name: pybase64.b64encode(rng.bytes(size)) for name, size in [("a", 3000), ("b", 0), ("c", 70_001)]}
    parked = SharedOutputs.park(outputs, text=text)
    assert parked is not None
    try:
        got = parked.read()
        assert got == {name: data.decode() if text else data for name, data in outputs.items()}
        assert all(isinstance(value, str if text else bytes) for value in got.values())
        os.truncate(os.path.join(SHM_DIR, parked.name), len(outputs["a"]) + 10)
        with pytest.raises(OSError, match="shorter than written"):
            parked.read()
    finally:
        parked.discard()

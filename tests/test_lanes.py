"""Lanes (``LANES=2``): ``python -m gateway`` as deployed, one job intake and two lane processes, against
the job-API stand-in and the session's real Triton.

Every job is answered exactly once and with its own pixels whichever lane ran it; a job cancelled through
the stop channel stops in the lane that runs it and is not answered, and its place frees; a lane killed
mid-job costs only its own jobs (answered here with a clean error), the other lane's jobs finish intact,
the lane comes back and its shared memory does not stay behind; SIGTERM drains both lanes.
The worker runs at ``CONCURRENCY`` 2, so that a job whose place did not free would block the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from devstack.jobapi import JobApi
from gateway.serving.lane_link import MAX_MESSAGE, Link
from gateway.serving.lanes import LANE_LOST, Lanes, SharedModels
from gateway.serving.model_lifetime import ModelLifetime
from gateway.serving.shared_memory import SHM_DIR
from gateway.serving.triton_process import EmbeddedTriton
from tests import images
from tests.helpers import decode_image, wait_until
from tests.servers import ImageServer, running_image_server
from tests.test_jobloop import mixed_job, serving_worker
from tests.test_robustness import b64

LANES_ENV = {"LANES": "2", "CPU_WORKERS": "2", "URL_ALLOWLIST": "127.0.0.1", "DOWNLOAD_TIMEOUT": "60"}
SIZES = [(40, 30), (36, 28), (44, 20), (24, 32)]  # width, height: a job's depth shape names its image


@pytest.fixture(scope="module")
def lanes_worker(triton: EmbeddedTriton, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    api, log_path = JobApi().start(), tmp_path_factory.mktemp("lanes") / "worker.log"
    with serving_worker(api, triton, log_path, concurrency=2, extra=LANES_ENV, timeout=180) as process:
        yield api, process, log_path


def photo(width: int, height: int, seed: int = 0) -> bytes:
    noise = np.random.default_rng(seed).integers(0, 96, (height, width, 3))
    return images.encode(
        images.Image.fromarray((images.photo_like(width, height) // 2 + noise).astype(np.uint8)), "PNG"
    )


def lane_pids(log_path: Path) -> dict[int, list[int]]:
    """Each lane's processes in the order they became ready."""
    pids: dict[int, list[int]] = {}
    for lane, pid in re.findall(r"lane (\d+) ready \(pid (\d+)\)", log_path.read_text()):
        pids.setdefault(int(lane), []).append(int(pid))
    return pids


def held_job(server: ImageServer, name: str, size: tuple[int, int]) -> dict:
    server.add(name, photo(*size), "image/png")
    return {"images": [{"type": "url", "data": server.url(f"/held/{name}")}]}


def test_every_job_is_answered_once_with_its_own_pixels_whichever_lane_ran_it(lanes_worker) -> None:
    api, _process, log_path = lanes_worker
    assert set(lane_pids(log_path)) == {0, 1}
    photos = [b64(photo(width, height, seed=index)) for index, (width, height) in enumerate(SIZES)]
    alone = {}
    for index, encoded in enumerate(photos):  # each photo's depth, one job at a time
        job = api.submit({"image_b64": encoded})
        alone[index] = decode_image(api.wait_for([job], timeout=60)[job]["output"]["results"][0]["depth_png_b64"])
    jobs = {}
    for index in range(120):
        if index % 3 == 0:
            jobs[api.submit({"image_b64": photos[index % 4]})] = index % 4
        else:
            jobs[api.submit(mixed_job(index))] = None
    results = api.wait_for(list(jobs), timeout=240)
    time.sleep(1)  # a duplicate post would arrive now
    assert all(len(api.results[job_id]) == 1 for job_id in jobs)
    for job_id, source in jobs.items():
        if source is None:
            continue
        depth = decode_image(results[job_id]["output"]["results"][0]["depth_png_b64"]).astype(np.int64)
        assert depth.shape == alone[source].shape
        assert np.abs(depth - alone[source]).max() <= 655  # 1 % of the PNG's range: batching may round apart
    kinds = [index % 5 for index, source in enumerate(jobs.values()) if source is None]
    assert kinds.count(2) > 0
    assert any("invalid value 'bogus' for tasks.0" in r.get("error", "") for r in results.values())


def children_of(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return [int(child) for task in tasks for child in (task / "children").read_text().split()]


def test_a_lanes_image_workers_load_neither_grpc_nor_the_lane(lanes_worker) -> None:
    """An image worker of a lane maps OpenCV (it is one) but not gRPC's extension: spawn imports the
    parent's main module in each child unless it is a ``__main__`` or a ``-c`` string, and a lane's main
    module is its whole serving stack (runpod, the Triton client, gRPC)."""
    _api, _process, log_path = lanes_worker
    for pids in lane_pids(log_path).values():
        workers = [
            child for child in children_of(pids[-1]) if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()
        ]
        assert workers  # (the lane's other child is multiprocessing's resource tracker)
        for worker in workers:
            maps = Path(f"/proc/{worker}/maps").read_text()
            assert "/cv2/" in maps
            assert "cygrpc" not in maps, worker


def test_a_job_cancelled_in_either_lane_stops_there_unanswered_and_frees_its_place(lanes_worker) -> None:
    api, _process, log_path = lanes_worker
    with running_image_server() as server:
        held = [api.submit(held_job(server, f"c{index}.jpg", (32, 24))) for index in range(2)]
        wait_until(lambda: all(job in api.taken_at for job in held), 30, "the held jobs were not taken")
        time.sleep(0.5)  # in their lanes, downloading
        for job in held:
            api.cancel(job)
        stopped = {}

        def both_stopped() -> bool:
            for lane, job in re.findall(r"lane (\d+) INFO job (\w+) stopped", log_path.read_text()):
                stopped[job] = int(lane)
            return all(job in stopped for job in held)

        wait_until(both_stopped, 30, "the lanes did not stop the cancelled jobs")
        assert {stopped[job] for job in held} == {0, 1}  # one in each lane
        follow = [api.submit({"image_b64": b64(photo(32, 24))}) for _ in range(3)]
        results = api.wait_for(follow, timeout=60)  # at concurrency 2: only if both places freed
        assert all("depth_png_b64" in r["output"]["results"][0] for r in results.values())
        assert not any(job in api.results for job in held)


def test_a_lane_killed_mid_job_costs_only_its_own_jobs_and_comes_back(lanes_worker) -> None:
    api, _process, log_path = lanes_worker
    with running_image_server() as server:
        first, second = (api.submit(held_job(server, f"k{index}.jpg", (40, 30))) for index in range(2))
        wait_until(lambda: first in api.taken_at and second in api.taken_at, 30, "the held jobs were not taken")
        time.sleep(0.5)
        victim = lane_pids(log_path)[1][-1]
        regions = list(Path(SHM_DIR).glob(f"depth-gateway-{victim}-*"))
        assert regions, "the lane had no shared-memory region"
        workers = descendants(victim)
        assert workers, "the lane had no image workers"
        os.kill(victim, signal.SIGKILL)
        lost = api.wait_for([second], timeout=30)[second]  # the second job went to lane 1
        assert lost == {"error": LANE_LOST}
        assert first not in api.results  # lane 0's job is still running
        server.release.set()
        kept = api.wait_for([first], timeout=60)[first]
        assert decode_image(kept["output"]["results"][0]["depth_png_b64"]).shape == (30, 40)
    wait_until(lambda: all(gone(pid) for pid in workers), 30, "the killed lane's image workers stayed")
    wait_until(lambda: len(lane_pids(log_path)[1]) == 2, 120, "lane 1 did not come back")
    assert not any(path.exists() for path in regions)
    again = [api.submit({"image_b64": b64(photo(32, 24))}) for _ in range(6)]
    assert all("depth_png_b64" in r["output"]["results"][0] for r in api.wait_for(again, timeout=60).values())
    time.sleep(1)
    assert len(api.results[first]) == 1
    assert len(api.results[second]) == 1


def test_sigterm_drains_both_lanes_and_they_exit(lanes_worker) -> None:
    api, process, log_path = lanes_worker
    jobs = [api.submit({"images": [{"type": "b64", "data": b64(photo(32, 24))}] * 4}) for _ in range(20)]
    wait_until(lambda: any(job in api.taken_at for job in jobs), 60, "no job was taken")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=90) == 0
    taken = [job for job in jobs if job in api.taken_at]
    for job in taken:
        assert len(api.results[job]) == 1, job
        assert all("depth_png_b64" in r for r in api.results[job][0]["output"]["results"])
    answered = {
        int(lane): int(count) for lane, count in re.findall(r"lane (\d+) answered (\d+) jobs", log_path.read_text())
    }
    assert set(answered) == {0, 1}
    assert all(count > 0 for count in answered.values())
    for pids in lane_pids(log_path).values():
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
            assert not list(Path(SHM_DIR).glob(f"depth-gateway-{pid}-*"))


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for a parent that is gone counts)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` now."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        with contextlib.suppress(FileNotFoundError):  # it exited meanwhile
            for task in Path(f"/proc/{parent}/task").iterdir():
                children = [int(child) for child in (task / "children").read_text().split()]
                found += children
                queue += children
    return found


def test_heartbeats_list_every_lanes_jobs_and_lanes_outlive_a_killed_intake(
    triton: EmbeddedTriton, tmp_path: Path
) -> None:
    """With runpod's heartbeat process running (it is forked from the intake), the pings list the jobs of
    both lanes; when the intake is killed outright, each lane still finishes its job, posts the result
    and exits (it sees the intake go: no fork holds the intake's end of its socket)."""
    api, log_path = JobApi().start(), tmp_path / "worker.log"
    extra = {**LANES_ENV, **api.ping_env()}
    stray: list[int] = []
    with serving_worker(api, triton, log_path, concurrency=2, extra=extra, timeout=180) as process:
        try:
            with running_image_server() as server:
                held = [api.submit(held_job(server, f"h{index}.png", (40, 30))) for index in range(2)]
                wait_until(lambda: any(set(held) <= ping for ping in api.pings), 30, "no heartbeat listed both jobs")
                lanes = [pids[-1] for pids in lane_pids(log_path).values()]
                stray = [pid for pid in descendants(process.pid) if pid not in lanes]  # heartbeat, image workers
                process.kill()
                process.wait()
                server.release.set()
                results = api.wait_for(held, timeout=60)
            for job in held:
                assert decode_image(results[job]["output"]["results"][0]["depth_png_b64"]).shape == (30, 40)
            wait_until(lambda: all(gone(pid) for pid in lanes), 60, "a lane outlived its intake")
        finally:
            for pid in stray:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_the_intake_counts_each_lanes_models_and_settles_a_dead_lanes_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The intake's side of the protocol against two stand-in lanes on real socket pairs (no Triton: the
    model lifetime's loads and unloads are replaced by recorders)."""
    loads: list[str] = []

    async def ensure_loaded(self: ModelLifetime, name: str) -> str:
        loads.append(name)
        return f"model {name}"

    async def unload(self: ModelLifetime, name: str) -> None:
        self.loaded.pop(name, None)

    monkeypatch.setattr(ModelLifetime, "ensure_loaded", ensure_loaded)
    monkeypatch.setattr(ModelLifetime, "unload", unload)

    async def scenario() -> None:
        models = SharedModels("127.0.0.1:9", 2, 1.0)
        lanes = Lanes(2, lambda _index: {}, models)
        fakes = []
        for lane in lanes.lanes:
            ours, theirs = socket.socketpair()
            lane.socket = ours
            lane.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            fakes.append(await Link.over(theirs))
        await lanes.open()
        assert lanes.ready == 0
        for index, fake in enumerate(fakes):
            fake.send("ready", 1000 + index)
        fakes[0].send("busy", "m")
        fakes[1].send("busy", "m")
        fakes[1].send("busy", "n")
        fakes[1].send("load", 7, "n", False)
        await asyncio.sleep(0.2)
        assert lanes.ready == 2
        assert dict(models.in_use) == {"m": 2, "n": 1}
        assert loads == ["n"]
        assert await fakes[1].receive() == ("model", 7, "model n")
        first = lanes.dispatch({"id": "a", "input": {}})
        second = lanes.dispatch({"id": "b", "input": {}})  # the least busy lane: the other one
        assert (await fakes[0].receive())[1]["id"] == "a"
        assert (await fakes[1].receive())[1]["id"] == "b"
        fakes[0].send("ended", "a", True)
        fakes[0].send("idle", "m")
        await asyncio.sleep(0.1)
        assert first.ended.result() is True
        assert not first.answered.done()
        await models.unload("x")  # every lane hears of an unload
        assert [await fake.receive() for fake in fakes] == [("unloaded", "x")] * 2
        lanes.closing = True  # no restart here: this test has no lane program to start
        lanes.lanes[1].process.kill()
        await fakes[1].close()
        await asyncio.sleep(0.3)
        assert second.ended.result() is None  # answered by the intake with LANE_LOST
        assert dict(models.in_use) == {"m": 0, "n": 0}  # the dead lane's models are no longer in use
        assert lanes.ready == 1
        fakes[0].send("answered", "a")
        await asyncio.sleep(0.1)
        assert first.answered.done()
        lanes.lanes[0].process.kill()
        await fakes[0].close()
        await asyncio.sleep(0.2)

    asyncio.run(scenario())


# --------------------------------------------------------------------------- the link's framing


def test_the_link_carries_messages_whole_however_the_bytes_arrive(caplog: pytest.LogCaptureFixture) -> None:
    """Many messages in one read, one message over many reads (a job's photo), in order; a frame that
    cannot be read closes the link after the messages before it, with the reason logged."""
    photo_text = "A" * (3 << 20)  # a job far above the split size and the socket's chunks

    async def scenario() -> None:
        ours, theirs = socket.socketpair()
        link = await Link.over(ours)
        raw = theirs.makefile("wb")
        small = [("ended", f"job-{n}", True) for n in range(50)]
        raw.write(b"".join(frame(message) for message in small))  # one write: one or a few reads
        raw.flush()
        big = frame(("job", {"id": "big", "input": {"image_b64": photo_text}}))
        for start in range(0, len(big), 7001):  # an odd step: a header split across two reads too
            raw.write(big[start : start + 7001])
            raw.flush()
            await asyncio.sleep(0)
        assert [await link.receive() for _ in small] == small
        assert await link.receive() == ("job", {"id": "big", "input": {"image_b64": photo_text}})
        raw.write(frame(("answered", "a")) + struct.pack("!I", 5) + b"\x80junk" + frame(("answered", "b")))
        raw.flush()
        assert await link.receive() == ("answered", "a")
        assert await asyncio.wait_for(link.receive(), 5) is None  # the junk closed it; "b" is never read
        raw.close()
        theirs.close()
        await link.close()

    with caplog.at_level("ERROR", logger="gateway"):
        asyncio.run(scenario())
    assert "an unreadable message (ValueError); the link is closed" in caplog.text
    assert "Traceback" not in caplog.text  # closed by the link itself, not by asyncio after an exception


def test_a_link_whose_other_end_goes_answers_none_and_its_send_is_dropped() -> None:
    async def scenario() -> None:
        ours, theirs = socket.socketpair()
        link, other = await Link.over(ours), await Link.over(theirs)
        other.send("ready", 7)
        big = ("job", {"id": "x", "input": {"image_b64": "B" * 200_000}})
        other.send(*big)  # split behind its header
        assert await link.receive() == ("ready", 7)
        assert await link.receive() == big
        await other.close()
        assert await asyncio.wait_for(link.receive(), 5) is None
        link.send("stop")  # the other end is gone: nothing is raised
        await link.close()
        ours, theirs = socket.socketpair()  # a length past the bound: closed at once, nothing buffered for it
        link = await Link.over(ours)
        theirs.sendall(struct.pack("!I", MAX_MESSAGE + 1) + b"x" * 1000)
        assert await asyncio.wait_for(link.receive(), 5) is None
        theirs.close()
        await link.close()

    asyncio.run(scenario())


def frame(message: tuple) -> bytes:
    data = pickle.dumps(message)
    return struct.pack("!I", len(data)) + data

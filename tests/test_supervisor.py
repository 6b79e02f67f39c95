"""Supervision of the embedded Triton: a crash is followed by a restart with the models reloaded, leftover
backend stubs are killed, and a Triton that cannot come back makes the worker exit non-zero."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from devstack.local import post, start_gateway, wait_for_api
from gateway.serving.supervisor import TritonSupervisor
from gateway.serving.triton_process import BACKEND_REGION_PREFIX, EmbeddedTriton, RateLimit, free_port, mapped_shm_files
from tests.conftest import SMALL
from tests.helpers import wait_until
from tests.test_robustness import GOOD_JOB


def model_states(server: EmbeddedTriton) -> dict[str, str]:
    request = urllib.request.Request(f"{server.http_url}/v2/repository/index", b"{}", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return {entry["name"]: entry.get("state", "") for entry in json.loads(response.read())}


def load(server: EmbeddedTriton, name: str) -> None:
    request = urllib.request.Request(f"{server.http_url}/v2/repository/models/{name}/load", b"", method="POST")
    urllib.request.urlopen(request, timeout=300).close()


def test_a_crashed_triton_is_restarted_with_its_models_and_its_stubs_killed(own_repository: Path) -> None:
    server = EmbeddedTriton(own_repository, start_timeout=120).start()
    gave_up = threading.Event()
    supervisor = TritonSupervisor(server, lambda: [SMALL], gave_up.set, first_pause=0.2, poll_interval=0.1)
    try:
        load(server, SMALL)
        supervisor.start()
        crashed_group = server.process.pid
        assert len(server.group_members()) >= 2  # tritonserver and the model's backend stub
        server.crash()
        wait_until(lambda: server.process.pid != crashed_group and server.ready(), 120)
        wait_until(lambda: model_states(server).get(SMALL) == "READY", 120)
        leftovers = [pid for pid in Path("/proc").iterdir() if pid.name.isdigit() and _group_of(pid) == crashed_group]
        assert leftovers == []
        assert len(supervisor.restarts) == 1
        assert not gave_up.is_set()
    finally:
        supervisor.stop()
        server.stop()
    assert server.group_members() == []


def _group_of(proc: Path) -> int | None:
    try:
        return os.getpgid(int(proc.name))
    except (OSError, ValueError):
        return None


def test_supervision_gives_up_after_its_restart_budget(own_repository: Path) -> None:
    server = EmbeddedTriton(own_repository, start_timeout=60).start()
    gave_up = threading.Event()
    supervisor = TritonSupervisor(server, list, gave_up.set, max_restarts=2, first_pause=0.1, poll_interval=0.1)
    try:
        supervisor.start()
        shutil.rmtree(own_repository)  # every restart now fails: Triton cannot read its repository
        server.crash()
        assert gave_up.wait(60)
        assert supervisor.gave_up
        assert len(supervisor.restarts) == 2
        assert not server.running()
    finally:
        supervisor.stop()
        server.stop()


def triton_of(gateway: subprocess.Popen) -> int:
    """The pid of the tritonserver the gateway started."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                name = (entry / "comm").read_text().strip()
            except OSError:
                continue
            if int(stat[1]) == gateway.pid and name == "tritonserver":
                return int(entry.name)
    raise AssertionError("the gateway runs no tritonserver")


def test_the_worker_recovers_from_a_crash_then_exits_non_zero_when_triton_cannot_return(
    own_repository: Path, tmp_path: Path
) -> None:
    port = free_port()
    log_path = tmp_path / "gateway.log"
    env = {"MODEL_REPOSITORY": str(own_repository), "TRITON_MAX_RESTARTS": "2", "TRITON_TIMEOUT": "10"}
    env = {**env, "DEPTH_MODEL": "depth-anything/Depth-Anything-V2-Small-hf"}
    process = start_gateway(env, port, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_api(process, url, log_path)
        os.kill(triton_of(process), 9)
        deadline = time.monotonic() + 90
        while (reply := post(url, GOOD_JOB))["status"] != "COMPLETED" or "error" in reply["output"]["results"][0]:
            assert time.monotonic() < deadline, reply
            time.sleep(1)
        assert "reloaded model depth_anything_v2_small after the restart" in log_path.read_text()

        shutil.rmtree(own_repository)
        crashed = triton_of(process)
        os.kill(crashed, 9)
        assert process.wait(timeout=90) == 1
        assert "giving up" in log_path.read_text()
        leftovers = [pid for pid in Path("/proc").iterdir() if pid.name.isdigit() and _group_of(pid) == crashed]
        assert leftovers == []
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def backend_regions() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith(BACKEND_REGION_PREFIX)}


def test_a_killed_tritons_backend_regions_are_removed_and_a_live_ones_kept(own_repository: Path, triton) -> None:
    live_before = backend_regions() & mapped_shm_files()  # e.g. the session's Triton: must stay
    server = EmbeddedTriton(own_repository, start_timeout=120).start()
    try:
        before = backend_regions()
        load(server, SMALL)
        ours = backend_regions() - before
        assert ours, "the Python backend made no region"
        time.sleep(1.1)
        server.crash()  # tritonserver SIGKILLed, as an OOM kill does: its regions are never unlinked
        server.terminate()  # what the supervisor does before a restart (and stop, at exit)
        assert backend_regions() & ours == set()
        assert live_before <= backend_regions()
    finally:
        server.stop()


def test_tritons_output_reaches_the_worker_log_and_survives_a_restart(
    own_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    server = EmbeddedTriton(own_repository, start_timeout=120).start()
    try:
        wait_until(lambda: any("Started GRPCInferenceService" in r.getMessage() for r in caplog.records), 30)
        relayed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("triton: ")]
        assert any("Started GRPCInferenceService" in line for line in relayed)
        server.crash()  # its log used to be truncated by the restart
        server.start()
        wait_until(lambda: server.log_path.read_text().count("Started GRPCInferenceService") == 2, 30)
        assert server.log_path.read_text().count("--- tritonserver starting at ") == 2
    finally:
        server.stop()


def test_the_log_rate_limit_lets_bursts_through_and_then_a_steady_rate() -> None:
    now = [0.0]
    limit = RateLimit(rate=10.0, burst=5, clock=lambda: now[0])
    assert [limit.allow() for _ in range(7)] == [True] * 5 + [False] * 2
    now[0] += 0.35  # 3.5 tokens back
    assert [limit.allow() for _ in range(4)] == [True] * 3 + [False]
    now[0] += 100  # never more than the burst
    assert sum(limit.allow() for _ in range(20)) == 5

"""The network guard itself: a process started by a test cannot reach an address outside loopback, and
the attempt is recorded (so the run fails); loopback is untouched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from devstack import local
from devstack.jobapi import JobApi

DIAL = """
import socket
for address in [("127.0.0.1", 9), ("8.8.8.8", 53), ("2001:4860:4860::8888", 53)]:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family) as sock:
        try:
            sock.connect(address)
        except OSError as error:
            print(address[0], error.errno)
"""


def test_a_child_process_that_dials_out_is_refused_and_recorded(tmp_path: Path) -> None:
    record = tmp_path / "dialed.log"
    env = {**os.environ, "NETGUARD_LOG": str(record)}  # its own record: this attempt must not fail the run
    result = subprocess.run([sys.executable, "-c", DIAL], env=env, capture_output=True, text=True, timeout=60)
    lines = result.stdout.splitlines()
    assert lines[0] == "127.0.0.1 111"  # loopback reached the kernel (nothing listens on port 9)
    assert lines[1:] == ["8.8.8.8 101", "2001:4860:4860::8888 101"]
    pid = record.read_text().split()[0]
    assert record.read_text().split("\n")[:-1] == [f"{pid} 8.8.8.8:53", f"{pid} 2001:4860:4860::8888:53"]


def test_pip_alone_may_reach_the_package_registry(tmp_path: Path) -> None:
    """pip is recognised by its entry point; anything else in the same run is still refused."""
    record = tmp_path / "dialed.log"
    env = {**os.environ, "NETGUARD_LOG": str(record)}
    probe = "import sys; sys.argv[0] = sys.argv[1]; from tests.netguard import sitecustomize as s; print(s._is_pip())"
    answers = [
        subprocess.run(
            [sys.executable, "-c", probe, argv0], env=env, capture_output=True, text=True, check=True
        ).stdout.strip()
        for argv0 in ("/x/site-packages/pip/__main__.py", "/x/.venv/bin/pip", "-c", "/x/gateway/__main__.py")
    ]
    assert answers == ["True", "True", "False", "False"]


def test_every_worker_a_test_or_stand_in_starts_skips_runpods_fitness_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """runpod's production start-up dials 8.8.8.8:53 unless RUNPOD_SKIP_AUTO_SYSTEM_CHECKS is true: the
    run's environment sets it for every child, and each stand-in sets it itself for the worker it points
    at loopback (even where the caller's environment does not)."""
    assert os.environ["RUNPOD_SKIP_AUTO_SYSTEM_CHECKS"] == "true"
    monkeypatch.delenv("RUNPOD_SKIP_AUTO_SYSTEM_CHECKS")
    started: list[dict] = []
    monkeypatch.setattr(local.subprocess, "Popen", lambda command, env, **_: started.append(env))
    local.start_gateway({"DEPTH_MODEL": "x"}, 8000, tmp_path / "gateway.log")
    api = JobApi().start()
    try:
        job_api_env = api.env()
    finally:
        api.stop()
    for env in (started[0], job_api_env):
        assert env["RUNPOD_SKIP_AUTO_SYSTEM_CHECKS"] == "true"

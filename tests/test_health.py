"""Triton's liveness probe: one gRPC channel that sees a real tritonserver go away and come back."""

from __future__ import annotations

import time
from pathlib import Path

from gateway.serving.health import LiveProbe
from gateway.serving.triton_process import EmbeddedTriton


def answers_within(probe: LiveProbe, url: str, wanted: bool, seconds: float) -> float:
    """Seconds until ``probe`` answers ``wanted`` (asked every 0.2 s, as the watcher asks every second)."""
    started = time.monotonic()
    while probe(url, 1.0) != wanted:
        assert time.monotonic() - started < seconds, f"still not {wanted} after {seconds} s"
        time.sleep(0.2)
    return time.monotonic() - started


def test_one_channel_sees_triton_leave_and_come_back_within_seconds(own_repository: Path) -> None:
    triton = EmbeddedTriton(own_repository, start_timeout=120).start()
    probe = LiveProbe()
    try:
        url = triton.grpc_url
        assert probe(url, 1.0)
        client = probe._client
        triton.terminate()
        answers_within(probe, url, False, 5)
        down_until = time.monotonic() + 15  # long enough for gRPC's default backoff to pass 8 s
        while time.monotonic() < down_until:
            assert not probe(url, 1.0)
            time.sleep(1)
        triton.start()  # the same ports
        assert answers_within(probe, url, True, 10) < 5  # gRPC's own backoff would wait up to 120 s
        assert probe._client is client  # no new channel per question
        assert probe(url, 1.0)
    finally:
        probe.close()
        triton.stop()

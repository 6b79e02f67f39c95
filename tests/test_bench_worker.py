"""``bench.worker``: a url row's ratio to inline pairs the batches of the same round, and a worker that
exits fails the wait for its jobs at once."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.worker import FIGURES, fail_waits_when_it_exits, summarize
from devstack.jobapi import JobApi


def batch(cpu_ms: float) -> dict:
    figures = {f"{key}_per_image": 1.0 for key in FIGURES}
    return figures | {"cpu_ms_per_image": cpu_ms, "per_second": 50.0}


def test_url_over_inline_is_the_median_of_each_rounds_ratio() -> None:
    """The machine drifts between rounds (here round 2 is twice as slow for both modes): each round's url
    batch is compared with its own inline batch, so the drift cancels. The ratio of the medians would say
    0.9, although url cost more than inline in two rounds of three."""
    inline, url = [10.0, 20.0, 30.0], [11.0, 18.0, 36.0]
    runs = {
        "measured": {"depth": [batch(ms) for ms in inline], "depth, url": [batch(ms) for ms in url]},
        "intake": [{"per_second": 200.0}],
        "intake_idle_ms_per_s": 1.0,
    }
    rows = summarize(runs, cal=0.1, lanes=2)["workloads"]
    assert rows["depth, url"]["cpu_over_inline"] == pytest.approx(1.1)  # the rounds: 1.1, 0.9 and 1.2
    assert "cpu_over_inline" not in rows["depth"]
    assert rows["depth"]["cpu_ms_cal"] == pytest.approx(20.0 / 100)  # the median batch, in calibration units


def test_a_batch_fails_at_once_when_its_worker_exits(tmp_path: Path) -> None:
    """A worker that dies (here at its start, as one missing a package did on a lent GPU machine) fails the
    wait for its jobs at once, with its exit status and the end of its log, not at the wait's timeout."""
    log = tmp_path / "worker.log"
    log.write_text("Traceback (most recent call last):\nModuleNotFoundError: No module named 'typing_inspection'\n")
    api = JobApi().start()
    try:
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5); raise SystemExit(3)"])
        fail_waits_when_it_exits(api, worker, log)
        job = api.submit({"image_b64": "unused"})
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="exited with status 3") as failure:
            api.wait_for([job], timeout=120)
        assert time.monotonic() - started < 60
        assert "No module named 'typing_inspection'" in str(failure.value)
        with pytest.raises(RuntimeError, match="exited with status 3"):  # and so does every later wait
            api.wait_for([api.submit({"image_b64": "unused"})], timeout=120)
    finally:
        api.stop()

"""``python -m gateway.client`` over a whole folder, against the local stack behind a loopback relay that
can refuse requests and sees what is sent: outputs mirror the inputs, broken images are listed, a killed
run resumes without redoing anything, 429 and 500 are retried, ``--concurrency`` jobs are in flight."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from gateway.client import cli
from gateway.client.inputs import expand, url_name
from gateway.client.jobs import backoff
from gateway.client.outputs import already_done, expected, remove_temporaries, write_result
from tests import images
from tests.conftest import ROOT
from tests.servers import Relay


@pytest.fixture
def relay(gateway_url: str) -> Iterator[Relay]:
    proxy = Relay(gateway_url).start()
    yield proxy
    proxy.stop()


def make_dataset(root: Path, good: int, broken: int = 0) -> list[Path]:
    """``good`` small photos in nested folders (and ``broken`` files that are not images)."""
    paths = []
    for index in range(good):
        path = root / f"set{index % 3}" / f"day{index % 2}" / f"img{index:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        picture = np.roll(images.photo_like(48, 32), index, axis=1)
        path.write_bytes(images.encode(images.Image.fromarray(picture), "PNG"))
        paths.append(path)
    for index in range(broken):
        path = root / "broken" / f"bad{index}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not an image at all" * (index + 1))
        paths.append(path)
    (root / "notes.txt").write_text("not an input")
    return paths


def client(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "gateway.client", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- pure parts


def test_inputs_expand_from_folders_globs_lists_files_and_urls(tmp_path: Path) -> None:
    make_dataset(tmp_path / "photos", good=4)
    listed = tmp_path / "list.txt"
    listed.write_text("# a comment\n\nphotos/set0/day0/img000.png\nhttps://example.com/a/b c.jpg?x=1\n")
    items = list(expand([str(tmp_path / "photos"), f"@{listed}", str(tmp_path / "photos/set1/*/*.png")]))
    names = [item.name for item in items]
    assert names[:4] == ["set0/day0/img000", "set0/day1/img003", "set1/day1/img001", "set2/day0/img002"]
    assert names[4:6] == ["photos/set0/day0/img000", "url/example.com/a/b_c"]
    assert names[6:] == ["day1/img001"]  # a glob names its matches from where its wildcards start
    assert items[5].is_url
    assert Path(items[4].source).is_file()
    assert url_name("https://host/") == "url/host/index"


def test_output_names_and_atomic_writes(tmp_path: Path) -> None:
    assert expected("a/b", ["depth", "colorized", "mesh"], "webp", True) == [
        ["a/b_depth.png"], ["a/b_colorized.webp", "a/b_colorized.png"], ["a/b_mesh.glb"], ["a/b_depth_raw.npz"]
    ]  # fmt: skip
    result = {
        "depth_png_b64": "iVBORw==",
        "depth_png_mime": "image/png",
        "points_b64": "cGx5",
        "points_mime": "application/x-ply",
    }
    written = write_result(tmp_path, "a/b", result)
    assert [p.relative_to(tmp_path).as_posix() for p in written] == ["a/b_depth.png", "a/b_points.ply"]
    assert already_done(tmp_path, "a/b", ["depth", "points"], "png", False)
    assert not already_done(tmp_path, "a/b", ["depth", "normals"], "png", False)
    (tmp_path / "a" / ".b_depth.png.123.tmp").write_bytes(b"half")
    assert remove_temporaries(tmp_path) == 1
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b_depth.png", "b_points.ply"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--set", "bogus=1"], "request options: unknown field 'bogus'"),
        (["--set", "process_res=big"], "request options: invalid process_res: Input should be a valid integer"),
        (["--tasks", "depth", "shadows"], "request options: invalid value 'shadows' for tasks.1"),
        (["--set", "camera"], "--set takes NAME=JSON, got 'camera'"),
    ],
)
def test_bad_options_are_refused_before_anything_is_sent(tmp_path: Path, options: list[str], message: str) -> None:
    result = client(str(tmp_path), "--out", str(tmp_path / "out"), "--endpoint", "http://127.0.0.1:9", *options)
    assert result.returncode == 2
    assert message in result.stderr


def test_backoff_grows_and_stays_jittered() -> None:
    samples = [backoff(attempt, 0.5) for attempt in range(8) for _ in range(50)]
    assert all(0 <= s <= 30 for s in samples)
    assert max(backoff(0, 0.5) for _ in range(50)) <= 0.5
    assert max(backoff(5, 0.5) for _ in range(200)) > 2


# --------------------------------------------------------------------------- against the local stack


def test_a_folder_end_to_end_with_broken_files(relay: Relay, tmp_path: Path) -> None:
    make_dataset(tmp_path / "in", good=60, broken=5)
    out = tmp_path / "out"
    result = client(str(tmp_path / "in"), "--out", str(out), "--endpoint", relay.url, "--concurrency", "8", "--json")
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    assert summary["done"] == 60
    assert summary["skipped"] == 0
    assert sorted(Path(f["input"]).name for f in summary["failed"]) == [f"bad{i}.jpg" for i in range(5)]
    assert all(f["error"].startswith("not an image") for f in summary["failed"])
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert len(written) == 120  # depth and colorized of each good image
    assert "set1/day0/img004_depth.png" in written
    assert cv2.imread(str(out / "set1/day0/img004_colorized.png")).shape == (32, 48, 3)
    assert relay.max_open_status == 8  # eight jobs in flight, never more


def test_an_interrupted_run_resumes_without_redoing_anything(relay: Relay, tmp_path: Path) -> None:
    make_dataset(tmp_path / "in", good=40)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "gateway.client", str(tmp_path / "in"), "--out", str(out), "--endpoint", relay.url]
    first = subprocess.Popen([*command, "--concurrency", "2", "--tasks", "depth"], cwd=ROOT, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list(out.rglob("*_depth.png"))) < 15 and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)  # a crash: no cleanup at all
    first.wait()
    done_before = {p: p.stat().st_mtime_ns for p in out.rglob("*_depth.png")}
    assert 15 <= len(done_before) < 40
    sent_before = relay.sent.copy()

    second = client(str(tmp_path / "in"), "--out", str(out), "--endpoint", relay.url, "--tasks", "depth", "--json")
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout)
    assert summary["skipped"] == len(done_before)
    assert summary["done"] == 40 - len(done_before)
    assert len(list(out.rglob("*_depth.png"))) == 40
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in done_before.items())  # nothing rewritten
    resent = relay.sent - sent_before
    assert sum(resent.values()) == 40 - len(done_before)  # only what was missing was sent again
    assert not list(out.rglob("*.tmp"))


def test_429_and_500_are_retried_until_the_run_completes(gateway_url: str, tmp_path: Path) -> None:
    relay = Relay(gateway_url, failures=[429] * 4 + [500] * 4 + [503] * 2).start()
    try:
        make_dataset(tmp_path / "in", good=6)
        result = client(str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--endpoint", relay.url, "--json")
    finally:
        relay.stop()
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"done": 6, "skipped": 0, "failed": []}
    assert relay.refused == {429: 4, 500: 4, 503: 2}


def test_an_endpoint_that_keeps_failing_is_reported_per_image(tmp_path: Path) -> None:
    make_dataset(tmp_path / "in", good=2)
    args = cli.parse_args([str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--endpoint", "http://127.0.0.1:9",
                           "--retries", "1", "--json"])  # fmt: skip
    summary = asyncio.run(cli.run(args, cli.request_template(args)))
    assert summary.done == 0
    assert [f["error"] for f in summary.failed] == ["gave up after 2 attempts: ClientConnectorError on run"] * 2


def test_single_images_can_use_runsync(relay: Relay, tmp_path: Path) -> None:
    photo = make_dataset(tmp_path / "in", good=1)[0]
    out = tmp_path / "out"
    result = client(str(photo), "--out", str(out), "--endpoint", relay.url, "--sync", "--tasks", "depth", "points")
    assert result.returncode == 0, result.stderr
    assert "done 1, failed 0, skipped 0" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["img000_depth.png", "img000_points.ply"]
    assert cv2.imread(str(out / "img000_depth.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16

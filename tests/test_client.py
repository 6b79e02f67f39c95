"""``python -m gateway.client`` over a whole folder, against the local stack behind a loopback relay that
can refuse requests and sees what is sent: outputs mirror the inputs with a sidecar each, broken images are
listed, a killed run resumes without redoing anything (and redoes what another request made), 429 and 500
are retried, ``--concurrency`` jobs are in flight; names never collide; and against a hostile endpoint
nothing it says is written unchecked, nor anything outside ``--out``."""

from __future__ import annotations

import asyncio
import base64
import hashlib
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
from PIL import Image

from bench import clips
from gateway.client import DepthClient, cli
from gateway.client.inputs import expand, unique, url_name
from gateway.client.jobs import backoff
from gateway.client.outputs import remove_temporaries, request_digest, resume_state, write_result
from gateway.client.results import check_reply
from tests import images
from tests.conftest import ROOT
from tests.servers import HostileEndpoint, Relay


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
    videos = list(expand(["https://cdn.example.com/clips/walk.MP4?sig=abc", "https://example.com/watch?v=1.mp4",
                          str(tmp_path / "photos/set0/day0/img000.png")]))  # fmt: skip
    assert [item.is_video for item in videos] == [True, False, False]  # by the path's extension, not the query


DEPTH_PNG = cv2.imencode(".png", np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)[1].tobytes()


def test_results_are_written_with_a_sidecar_and_resume_follows_the_request(tmp_path: Path) -> None:
    entry = {
        "index": 0, "depth_png_b64": base64.b64encode(DEPTH_PNG).decode(), "depth_png_mime": "image/png",
        "points_b64": "cGx5", "points_mime": "application/x-ply", "depth_min": 0.5, "depth_max": 7.25,
        "depth_units": "m", "depth_direction": "distance", "model": "m",
        "depth_png_decode": "depth = depth_min + png / 65535 * (depth_max - depth_min)",
    }  # fmt: skip
    (checked,) = check_reply({"status": "COMPLETED", "output": {"results": [entry]}}, 1)
    request = {"tasks": ["depth", "points"], "output_format": "png"}
    written = write_result(tmp_path, "a/b", "photos/a/b.jpg", request, checked)
    assert [p.relative_to(tmp_path).as_posix() for p in written] == ["a/b_depth.png", "a/b_points.ply"]
    sidecar = json.loads((tmp_path / "a" / "b.json").read_text())
    assert sidecar["input"] == "photos/a/b.jpg"
    assert sidecar["request"] == request
    assert sidecar["files"] == ["a/b_depth.png", "a/b_points.ply"]
    assert sidecar["result"]["depth_max"] == 7.25
    assert "depth_png_b64" not in sidecar["result"]
    text = Image.open(tmp_path / "a" / "b_depth.png").text  # the PNG says how to turn it back into depth
    assert (text["depth_min"], text["depth_max"], text["depth_units"]) == ("0.5", "7.25", "m")
    png = cv2.imread(str(tmp_path / "a" / "b_depth.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(png, np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)  # pixels untouched

    assert resume_state(tmp_path, "a/b", request_digest(request)) == "done"
    assert resume_state(tmp_path, "a/b", request_digest({**request, "output_format": "webp"})) == "changed"
    assert resume_state(tmp_path, "a/c", request_digest(request)) == "new"
    (tmp_path / "a" / "b_points.ply").unlink()
    assert resume_state(tmp_path, "a/b", request_digest(request)) == "incomplete"
    (tmp_path / "a" / ".b_depth.png.123.tmp").write_bytes(b"half")
    assert remove_temporaries(tmp_path) == 1


def test_inputs_whose_names_would_collide_get_predictable_unique_names(tmp_path: Path) -> None:
    for relative in ("misc/dup.jpg", "misc/dup.png", "misc/b c.jpg", "misc/b_c.jpg", "a/IMG_0001.jpg",
                     "b/IMG_0001.png", "misc/alone.jpg"):  # fmt: skip
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"x")
    arguments = [str(tmp_path / "misc"), str(tmp_path / "a/IMG_0001.jpg"), str(tmp_path / "b/IMG_0001.png"),
                 "https://example.com/img?id=1", "https://example.com/img?id=2"]  # fmt: skip
    items = unique(expand(arguments))
    names = [item.name for item in items]
    assert len(set(names)) == len(names) == 9
    assert "alone" in names  # no collision, no suffix
    for item in items:
        if item.name != "alone":
            digest = hashlib.sha256(item.source.encode()).hexdigest()[:8]
            assert item.name.endswith(f"~{digest}"), item
    assert [item.name for item in unique(expand(arguments))] == names  # the same on every run


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
    result = client(str(tmp_path / "in"), "--out", str(out), "--endpoint", relay.url, "--concurrency", "8", "--json",
                    "--tasks", "depth", "colorized")  # fmt: skip
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    assert summary["done"] == 60
    assert summary["skipped"] == 0
    assert sorted(Path(f["input"]).name for f in summary["failed"]) == [f"bad{i}.jpg" for i in range(5)]
    assert all(f["error"].startswith("not an image") for f in summary["failed"])
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert len(written) == 60 * 3 + 1  # depth, colorized and the sidecar of each good image; run.json
    sidecar = json.loads((out / "set1/day0/img004.json").read_text())
    assert sidecar["files"] == ["set1/day0/img004_depth.png", "set1/day0/img004_colorized.png"]
    assert sidecar["result"]["depth_units"] == "relative"
    assert {"depth_min", "depth_max", "depth_png_decode", "network_size"} <= set(sidecar["result"])
    run = json.loads((out / "run.json").read_text())
    assert (run["images"], run["done"], len(run["failed"])) == (65, 60, 5)
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

    other = client(str(tmp_path / "in"), "--out", str(out), "--endpoint", relay.url, "--tasks", "depth", "--json",
                   "--set", "process_res=770")  # fmt: skip
    assert other.returncode == 0, other.stderr
    summary = json.loads(other.stdout)  # another request: nothing of the old one is kept as its answer
    assert (summary["skipped"], summary["done"], summary["redone"]) == (0, 40, {"changed": 40, "incomplete": 0})


def test_429_and_500_are_retried_until_the_run_completes(gateway_url: str, tmp_path: Path) -> None:
    relay = Relay(gateway_url, failures=[429] * 4 + [500] * 4 + [503] * 2).start()
    try:
        make_dataset(tmp_path / "in", good=6)
        result = client(str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--endpoint", relay.url, "--json")
    finally:
        relay.stop()
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "done": 6,
        "skipped": 0,
        "redone": {"changed": 0, "incomplete": 0},
        "failed": [],
    }
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
    assert sorted(p.name for p in out.iterdir()) == ["img000.json", "img000_depth.png", "img000_points.ply", "run.json"]
    assert cv2.imread(str(out / "img000_depth.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16


# --------------------------------------------------------------------------- a hostile endpoint

GOOD = {"depth_png_b64": base64.b64encode(DEPTH_PNG).decode(), "depth_png_mime": "image/png"}


def completed(*results: object) -> dict:
    return {"status": "COMPLETED", "output": {"results": list(results)}}


HOSTILE = [
    (completed({"index": 0, "depth_png_url": "file:///etc/passwd", "depth_png_mime": "image/png"}),
     "the endpoint returned depth_png_url that is not an https or http URL"),
    (completed({"index": 0, "depth_png_url": "ftp://example.com/x", "depth_png_mime": "image/png"}),
     "the endpoint returned depth_png_url that is not an https or http URL"),
    (completed({"index": 5, **GOOD}), "the endpoint returned no result for this image"),
    (completed({"index": "0", **GOOD}), "the endpoint returned no result for this image"),
    (completed({"index": -1, **GOOD}), "the endpoint returned no result for this image"),
    (completed({"index": True, **GOOD}), "the endpoint returned no result for this image"),
    (completed({"index": 0, **GOOD, "depth_png_mime": "../../../evil"}),
     "the endpoint returned an unknown depth_png_mime"),
    (completed({"index": 0, "depth_png_b64": "not base64 !!", "depth_png_mime": "image/png"}),
     "the endpoint returned depth_png_b64 that is not valid base64"),
    (completed({"index": 0, **GOOD}, {"index": 0, **GOOD}), "the endpoint returned two results for this image"),
    (completed({"index": 0, "error": {"nested": True}}), "the endpoint returned an unreadable error"),
    (completed({"index": 0, "timings": {}}), "the endpoint returned a result without outputs"),
    (completed(), "the endpoint returned no result for this image"),
    ({"status": "COMPLETED"}, "the endpoint answered COMPLETED without output.results"),
    ({"status": "COMPLETED", "output": [1, 2]}, "the endpoint answered COMPLETED without output.results"),
    ({"status": "FAILED", "error": ["odd"]}, "job failed: no reason given"),
]  # fmt: skip


def test_nothing_a_hostile_endpoint_says_is_written_unchecked(tmp_path: Path) -> None:
    """One image per job, each job answered with one of the crafted replies: every image fails with its
    reason, the run exits 1, and no output file (nor anything outside --out) is written."""
    photos = tmp_path / "in"
    photos.mkdir()
    for index in range(len(HOSTILE)):
        (photos / f"p{index:02d}.png").write_bytes(
            images.encode(images.Image.fromarray(images.photo_like(8, 6)), "PNG")
        )
    endpoint = HostileEndpoint([reply for reply, _message in HOSTILE]).start()
    before = {p for p in tmp_path.rglob("*")}
    try:
        out = tmp_path / "out"
        result = client(str(photos), "--out", str(out), "--endpoint", endpoint.url, "--concurrency", "1", "--json",
                        "--retries", "0")  # fmt: skip
    finally:
        endpoint.stop()
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    summary = json.loads(result.stdout)
    failures = {Path(f["input"]).stem: f["error"] for f in summary["failed"]}
    assert failures == {f"p{index:02d}": message for index, (_reply, message) in enumerate(HOSTILE)}
    assert summary["done"] == 0
    written = {p for p in tmp_path.rglob("*")} - before
    assert {p.relative_to(tmp_path).as_posix() for p in written if p.is_file()} == {"out/run.json"}


def test_a_good_result_beside_bad_ones_is_still_written(tmp_path: Path) -> None:
    photos = tmp_path / "in"
    photos.mkdir()
    for name in ("a", "b", "c"):
        (photos / f"{name}.png").write_bytes(images.encode(images.Image.fromarray(images.photo_like(8, 6)), "PNG"))
    reply = completed({"index": 2, **GOOD}, {"index": 0, "error": "not an image"}, {"index": 7, **GOOD})
    endpoint = HostileEndpoint([reply]).start()
    try:
        result = client(str(photos), "--out", str(tmp_path / "out"), "--endpoint", endpoint.url, "--json",
                        "--images-per-job", "3")  # fmt: skip
    finally:
        endpoint.stop()
    assert result.returncode == 1
    summary = json.loads(result.stdout)
    assert summary["done"] == 1
    assert {Path(f["input"]).stem: f["error"] for f in summary["failed"]} == {
        "a": "not an image", "b": "the endpoint returned no result for this image"
    }  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c.json", "c_depth.png", "run.json"]


def test_videos_beside_photos_get_their_own_jobs_files_and_resume(gateway_url: str, tmp_path: Path) -> None:
    """A folder with photos and videos, tasks that apply to only some of them: each video is its own job
    with the video tasks (and options) of the request, written as .mkv/.npz with a sidecar; a video file
    too large to send inline fails with a clear message; a second run skips every input."""
    data = tmp_path / "in"
    make_dataset(data, good=2)
    (data / "clips").mkdir()
    (data / "clips" / "walk.mp4").write_bytes(clips.encode(clips.frames_of(64, 48, 6), fps=10))
    noise = np.random.default_rng(0).integers(0, 256, (8 << 20,), np.uint8).tobytes()
    (data / "clips" / "huge.mkv").write_bytes(noise)  # too large to send inline
    out = tmp_path / "out"
    args = [str(data), "--out", str(out), "--endpoint", gateway_url, "--json", "--tasks", "depth", "normals",
            "--include-raw", "--set", "fps=5"]  # fmt: skip
    result = client(*args)
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    assert summary["done"] == 3
    (failure,) = summary["failed"]
    assert failure["input"].endswith("huge.mkv")
    assert "too large to send inline" in failure["error"]
    sidecar = json.loads((out / "clips/walk.json").read_text())
    assert sidecar["request"]["tasks"] == ["depth"]  # normals does not apply to a video
    assert sidecar["files"] == ["clips/walk_depth_raw.npz", "clips/walk_depth.mkv"]
    assert (sidecar["result"]["frames"], sidecar["result"]["fps"]) == (3, 5)
    frames, stream, _ = clips.read_frames((out / "clips/walk_depth.mkv").read_bytes())
    assert (len(frames), frames[0].dtype, stream.codec_context.name) == (3, np.uint16, "ffv1")
    assert np.load(out / "clips/walk_depth_raw.npz")["depth"].shape == (3, 48, 64)
    photo = json.loads((out / "set0/day0/img000.json").read_text())
    assert "fps" not in photo["request"]  # video options stay out of image jobs
    assert (out / "set0/day0/img000_normals.png").exists()
    again = json.loads(client(*args).stdout)
    assert (again["done"], again["skipped"]) == (0, 3)


def test_the_library_runs_resumes_and_refuses_bad_options_like_the_command(gateway_url: str, tmp_path: Path) -> None:
    make_dataset(tmp_path / "in", good=3)
    client_api = DepthClient(gateway_url, concurrency=2)
    with pytest.raises(ValueError, match="request options: invalid value 'sepia' for colormap"):
        client_api.run([tmp_path / "in"], tmp_path / "out", colormap="sepia")
    assert not (tmp_path / "out").exists()  # refused before anything was sent or written
    summary = client_api.run([tmp_path / "in"], tmp_path / "out", tasks=["depth", "colorized"], process_res=518)
    assert (summary.done, summary.skipped, summary.failed) == (3, 0, [])
    sidecar = json.loads((tmp_path / "out/set1/day1/img001.json").read_text())
    assert sidecar["request"]["process_res"] == 518
    assert cv2.imread(str(tmp_path / "out/set1/day1/img001_colorized.png")).shape == (32, 48, 3)
    again = client_api.run([tmp_path / "in"], tmp_path / "out", tasks=["depth", "colorized"], process_res=518)
    assert (again.done, again.skipped) == (0, 3)
    with pytest.raises(ValueError, match="needs its api_key"):
        DepthClient(endpoint_id="abc")

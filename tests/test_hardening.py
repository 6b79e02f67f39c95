"""Hardening, round two, through the running gateway: each defect the attack on the worker found.

Decode work and per-job memory, encoder limits, invalid text, bounded error messages and quiet logs; the
fetcher's own defects (SSRF forms, cookies, pool fairness, malformed redirects) are in test_fetch.py,
the budget's arithmetic below, and Triton supervision in test_supervisor.py.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from devstack.local import post
from gateway.errors import ImageError
from gateway.inputs.budget import BASE64_GROWTH, JobBudget, estimated_output_bytes
from tests import images
from tests.helpers import decode_image
from tests.test_robustness import GOOD_IMAGE, assert_clean_message, assert_still_serves, b64


def b64_source(data: bytes) -> dict:
    return {"type": "b64", "data": b64(data)}


GOOD = {"type": "b64", "data": GOOD_IMAGE}


def test_decode_bombs_are_refused_at_once_and_cost_other_images_nothing(gateway_url: str) -> None:
    job = {"images": [b64_source(images.scan_bomb_jpeg()), b64_source(images.strip_bomb_tiff(200_000)), GOOD]}
    started = time.monotonic()
    reply = post(gateway_url, job)
    elapsed = time.monotonic() - started
    assert reply["status"] == "COMPLETED", reply
    scans, strips, good = reply["output"]["results"]
    assert scans["error"] == "JPEG has too many scans: 3005, at most 100"
    assert strips["error"] == "TIFF has too many strips or tiles: 200000, at most 65536"
    assert decode_image(good["depth_png_b64"]).shape == (24, 32)
    assert elapsed < 5  # decoding the scan bomb alone took 12 s


def test_tiny_requests_cannot_make_the_worker_allocate_gigabytes(gateway_url: str) -> None:
    """Four ~100-byte WebPs of 7000 x 7000 pixels each, and a good image."""
    webp = images.huge_canvas_webp()
    job = {"images": [b64_source(webp)] * 4 + [GOOD], "tasks": ["depth"]}
    reply = post(gateway_url, job)
    assert reply["status"] == "COMPLETED", reply
    *huge, good = reply["output"]["results"]
    for result in huge:
        assert result["error"].startswith("this image's outputs (about 32.7 MB) would take the response over")
        assert_clean_message(result["error"])
    assert good["width"] == 32


DECODE_FOUR = """
import json, sys
from concurrent.futures import ThreadPoolExecutor
from gateway.inputs.budget import JobBudget
from gateway.inputs.decode import decode_image, open_image
from gateway.errors import ImageError
from tests.images import huge_canvas_webp
webp = huge_canvas_webp()
budget = JobBudget(64_000_000, 10**12, lambda pixels: 0)

def decode(_):
    try:
        if sys.argv[1] == "budget":  # as the gateway does, before handing the bytes to a worker
            budget.admit(*open_image(webp, 50_000_000).size)
        return decode_image(webp, 50_000_000)  # held until rendered, as the worker does
    except ImageError as error:
        return str(error)

with ThreadPoolExecutor(2) as pool:  # the worker's decode threads on a 2-core machine
    held = list(pool.map(decode, range(4)))
outcomes = [item if isinstance(item, str) else item.shape[0] for item in held]
peak_kb = next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]
print(json.dumps([outcomes, int(peak_kb) // 1024]))
"""


def decode_four_huge_webps(mode: str) -> tuple[list, int]:
    """Outcomes and peak RSS (MB, this process's own VmHWM) of decoding four 49 M-pixel WebPs."""
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-c", DECODE_FOUR, mode]
    output = subprocess.run(command, cwd=root, capture_output=True, text=True, check=True)
    outcomes, peak_mb = json.loads(output.stdout)
    return outcomes, peak_mb


def test_the_pixel_budget_of_a_job_stops_decoding_early() -> None:
    outcomes, peak_with_budget = decode_four_huge_webps("budget")
    assert outcomes == [7000] + ["the job's images exceed 64 M pixels in all; send fewer or smaller images"] * 3
    unbounded, peak_without = decode_four_huge_webps("none")
    assert unbounded == [7000] * 4
    assert peak_without - peak_with_budget > 500  # a second concurrent decode (~0.8 GB) and the held images


def test_job_budget_arithmetic() -> None:
    budget = JobBudget(100, 1000, lambda pixels: pixels * 4)
    budget.admit(10, 5)  # 50 pixels, 200 bytes
    budget.admit(10, 5)
    with pytest.raises(ImageError, match="exceed 0 M pixels"):
        budget.admit(1, 1)
    generous = JobBudget(10**9, 1000, lambda pixels: pixels)
    generous.admit(20, 25)  # 500 bytes
    with pytest.raises(ImageError, match=r"about 0\.0 MB"):
        generous.admit(20, 26)  # 520 more: over
    generous.admit(20, 25)  # the refused image reserved nothing


def test_output_estimates_follow_tasks_formats_and_base64() -> None:
    pixels = 1_000_000
    depth = estimated_output_bytes(pixels, ["depth"], "png", False, 512)
    assert depth == int(0.5 * pixels * BASE64_GROWTH)
    assert estimated_output_bytes(pixels, ["depth"], "png", True, 512) == int(1.5 * pixels * BASE64_GROWTH)
    assert estimated_output_bytes(pixels, ["colorized"], "webp", False, 512) < estimated_output_bytes(
        pixels, ["colorized"], "png", False, 512
    )
    assert estimated_output_bytes(pixels, ["point_cloud"], "png", False, 1000) == int(1e5 * BASE64_GROWTH)


@pytest.mark.parametrize(("fmt", "width", "height"), [("webp", 20000, 10), ("jpg", 10, 70000)])
def test_images_beyond_a_formats_limits_are_written_as_png(gateway_url: str, fmt: str, width: int, height: int) -> None:
    wide = images.encode(images.Image.fromarray(images.photo_like(width, height)), "PNG")
    job = {"images": [b64_source(wide), GOOD], "tasks": ["colorized", "disparity"], "output_format": fmt}
    reply = post(gateway_url, job)
    assert reply["status"] == "COMPLETED", reply
    big, small = reply["output"]["results"]
    assert "error" not in big, big
    assert big["colorized_mime"] == big["disparity_mime"] == "image/png"
    assert decode_image(big["colorized_b64"]).shape == (height, width, 3)
    assert small["colorized_mime"] == f"image/{'jpeg' if fmt == 'jpg' else 'webp'}"


def test_a_lone_surrogate_fails_its_image_and_keeps_the_others(gateway_url: str) -> None:
    body = json.dumps({"input": {"images": [GOOD, {"type": "url", "data": "http://example.com/\ud800"}]}})
    assert "\\ud800" in body  # sent as JSON's escape of a lone surrogate, as a client would
    request = urllib.request.Request(f"{gateway_url}/runsync", body.encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        reply = json.loads(response.read())
    assert reply["status"] == "COMPLETED", reply
    good, bad = reply["output"]["results"]
    assert good["width"] == 32
    assert bad["error"] == "invalid image URL"
    assert bad["input"]["url"] == "http://example.com/\\ud800"  # escaped, valid UTF-8


@pytest.mark.parametrize(
    "job",
    [
        {"model": "m" * 100_000},
        {"colormap": "c" * 100_000},
        {"f" * 100_000: 1},
        {"tasks": ["t" * 100_000]},
        {"model": "\ud800" * 10},
        {"model": "nope"},
        {"images": [{"type": "b64", "data": GOOD_IMAGE, "x" * 50_000: 1}]},
    ],
)
def test_error_messages_quote_only_a_short_prefix_of_the_input(gateway_url: str, job: dict) -> None:
    reply = post(gateway_url, {"image_b64": GOOD_IMAGE, **job})
    assert reply["status"] == "FAILED", reply
    assert_clean_message(reply["error"])
    assert len(reply["error"]) < 250
    reply["error"].encode("utf-8")  # valid text


def test_unknown_model_error_names_the_choices_briefly(gateway_url: str) -> None:
    reply = post(gateway_url, {"image_b64": GOOD_IMAGE, "model": "depth-anything/Depth-Anything-V3"})
    assert reply["error"] == (
        "unknown model 'depth-anything/Depth-Anything-V3'; expected depth-anything/Depth-Anything-V2-"
        "{Small,Base,Large,Metric-Indoor-Large,Metric-Outdoor-Large}-hf or Intel/dpt-large"
    )


def test_jobs_log_no_output_payload_at_the_default_level(gateway_url: str, gateway_log: Path) -> None:
    reply = post(gateway_url, {"image_b64": GOOD_IMAGE, "tasks": ["depth", "colorized"]})
    payload = reply["output"]["results"][0]["colorized_b64"]
    assert_still_serves(gateway_url)
    log = gateway_log.read_text()
    assert "Started." in log  # runpod's INFO lines are there
    assert payload[:64] not in log
    assert "depth_png_b64" not in log
    assert "Handler output" not in log
    assert "DEBUG" not in log


def test_decoded_bombs_leave_the_worker_serving(gateway_url: str) -> None:
    assert_still_serves(gateway_url)
    assert np.isfinite(post(gateway_url, {"image_b64": GOOD_IMAGE})["output"]["results"][0]["depth_mean"])
    assert base64.b64decode(GOOD_IMAGE)[:4] == b"\x89PNG"

"""What the numbers mean and at what detail they were made, through the running gateway (issue 15).

``process_res`` picks the network's size among those the model serves (and batching holds at each);
every result states its units, direction and how to decode the 16-bit PNG, the response the model's
licence; ``disparity`` is reciprocal depth for relative and metric models alike.
"""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest
import tritonclient.http as httpclient

from catalogue.models import MODELS
from devstack.local import post
from gateway.serving.triton_process import EmbeddedTriton
from tests.conftest import DPT_ID, METRIC_ID, RELATIVE_ID
from tests.helpers import decode_image, decode_npz


@pytest.mark.parametrize(
    ("process_res", "network_size"), [(None, [686, 518]), (770, [1022, 770]), (1036, [1372, 1036])]
)
def test_process_res_picks_a_bucket_of_that_network_size(
    run_job, photo_urls: dict[str, str], process_res: int | None, network_size: list[int]
) -> None:
    job = {"image_url": photo_urls["chelsea_4x3"], "tasks": ["depth"]}
    out = run_job(job if process_res is None else {**job, "process_res": process_res})
    assert out["process_res"] == (process_res or 518)
    (result,) = out["results"]
    assert result["network_size"] == network_size
    assert result["inference_size"] == [1024, 768]
    assert decode_image(result["depth_png_b64"]).shape == (768, 1024)


NOT_AN_INTEGER = "invalid process_res: Input should be a valid integer"


@pytest.mark.parametrize(
    ("model", "process_res", "message"),
    [
        (RELATIVE_ID, 900, f"process_res 900 is not served for {RELATIVE_ID}; served sizes: 518, 770, 1036"),
        (DPT_ID, 518, f"process_res 518 is not served for {DPT_ID}; served sizes: 384"),
        (RELATIVE_ID, 0, "invalid process_res: Input should be greater than or equal to 1"),
        (
            RELATIVE_ID,
            "big",
            "invalid process_res: Input should be a valid integer, unable to parse string as an integer",
        ),
        (
            RELATIVE_ID,
            518.5,
            "invalid process_res: Input should be a valid integer, got a number with a fractional part",
        ),
        (RELATIVE_ID, 10**9, "invalid process_res: Input should be less than or equal to 8192"),
    ],
)
def test_sizes_the_model_does_not_serve_are_refused_by_name(
    run_job, photo_urls: dict[str, str], model: str, process_res: object, message: str
) -> None:
    out = run_job({"image_url": photo_urls["coffee"], "model": model, "process_res": process_res})
    assert out == {"error": message}


@pytest.mark.parametrize(
    ("model", "units", "direction"),
    [(RELATIVE_ID, "relative", "inverse"), (METRIC_ID, "m", "distance"), (DPT_ID, "relative", "inverse")],
)
def test_every_result_says_units_direction_and_licence(
    run_job, photo_urls: dict[str, str], model: str, units: str, direction: str
) -> None:
    out = run_job({"image_url": photo_urls["coffee"], "model": model, "include_raw": True})
    assert out["license"] == MODELS[model].license
    (result,) = out["results"]
    assert (result["depth_units"], result["depth_direction"]) == (units, direction)
    assert result["depth_png_decode"] == "depth = depth_min + png / 65535 * (depth_max - depth_min)"
    png = decode_image(result["depth_png_b64"]).astype(np.float64)
    low, high = result["depth_min"], result["depth_max"]
    decoded = low + png / 65535 * (high - low)  # the formula the result states
    raw = decode_npz(result["depth_npz_b64"])
    assert np.abs(decoded - raw).max() <= (high - low) / 65535 * 0.51 + 1e-6


def test_licences_follow_the_model_cards() -> None:
    licences = {model_id: spec.license for model_id, spec in MODELS.items()}
    assert licences == {
        "depth-anything/Depth-Anything-V2-Small-hf": "Apache-2.0",
        "depth-anything/Depth-Anything-V2-Base-hf": "CC-BY-NC-4.0",
        "depth-anything/Depth-Anything-V2-Large-hf": "CC-BY-NC-4.0",
        "depth-anything/Depth-Anything-V2-Metric-Indoor-Large-hf": "Apache-2.0",
        "depth-anything/Depth-Anything-V2-Metric-Outdoor-Large-hf": "Apache-2.0",
        "Intel/dpt-large": "Apache-2.0",
    }


@pytest.mark.parametrize("model", [RELATIVE_ID, METRIC_ID])
def test_disparity_is_reciprocal_depth_through_the_stack(run_job, photo_urls: dict[str, str], model: str) -> None:
    out = run_job(
        {"image_url": photo_urls["astronaut"], "model": model, "tasks": ["depth", "disparity"], "include_raw": True}
    )
    (result,) = out["results"]
    shown = decode_image(result["disparity_b64"]).astype(np.float64)
    if shown.ndim == 3:
        shown = shown[..., 0]
    raw = decode_npz(result["depth_npz_b64"]).astype(np.float64)
    if result["depth_direction"] == "inverse":  # relative: the network's inverse depth as it is
        reciprocal = raw
    else:  # metric: 1 / d, d floored at a thousandth of the map's range
        reciprocal = 1.0 / np.maximum(raw, (raw.max() - raw.min()) * 1e-3)
    expected = (reciprocal - reciprocal.min()) / (reciprocal.max() - reciprocal.min()) * 255
    assert np.abs(shown - expected).max() <= 1.0  # lossless PNG: only the rounding to 8 bits
    assert shown.min() == 0
    assert shown.max() == 255


def test_batching_holds_at_the_largest_network_size(
    gateway_url: str, triton: EmbeddedTriton, photo_urls: dict[str, str]
) -> None:
    client = httpclient.InferenceServerClient(triton.http_url.removeprefix("http://"))

    def counts() -> dict[str, tuple[int, int]]:
        stats = client.get_inference_statistics()["model_stats"]
        return {s["name"]: (s["inference_count"], s["execution_count"]) for s in stats}

    before = counts()
    job = {"image_url": photo_urls["chelsea_4x3"], "tasks": ["depth"], "process_res": 1036}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # 0.65 s per image here (7252 tokens each)
        replies = list(pool.map(lambda _: post(gateway_url, job), range(8)))
    results = [r["output"]["results"][0] for r in replies]
    assert all(r.get("network_size") == [1372, 1036] for r in results), [r.get("error") for r in results]
    after = counts()
    (name,) = [n for n in after if after[n][0] - before.get(n, (0, 0))[0] == 8]
    inferences = after[name][0] - before[name][0]
    executions = after[name][1] - before[name][1]
    assert executions < inferences, (executions, inferences)

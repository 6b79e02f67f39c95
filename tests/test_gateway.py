"""The gateway end to end: Runpod's local API -> gateway -> real tritonserver, images over loopback HTTP."""

from __future__ import annotations

import base64
import concurrent.futures
import io

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image
from transformers import pipeline

from devstack.local import post
from gateway.outputs.postprocess import decode_normals
from tests.conftest import DPT_ID, METRIC_ID, RELATIVE_ID, jpeg
from tests.helpers import correlation, decode_image, decode_npz

ALL_TASKS = ["depth", "colorized", "normals", "disparity", "point_cloud"]
TOP_LEVEL_KEYS = {
    "results", "model", "tasks", "colormap", "output_format", "normalize", "invert", "include_raw", "max_size",
    "point_cloud_grid", "device", "cuda_available", "count", "elapsed_sec", "dtype", "license", "process_res",
    "output_mode",
}  # fmt: skip
RESULT_KEYS = {
    "index", "input", "model", "metric", "width", "height", "inference_size", "network_size", "depth_min",
    "depth_max", "depth_mean", "tasks", "elapsed_sec", "timings", "depth_units", "depth_direction",
    "depth_png_decode",
}  # fmt: skip
TASK_KEYS = {
    "depth": {"depth_png_b64", "depth_png_mime"},
    "colorized": {"colorized_b64", "colorized_mime", "colormap"},
    "normals": {"normals_b64", "normals_mime", "intrinsics"},  # the camera the normals were computed with
    "disparity": {"disparity_b64", "disparity_mime"},
    "point_cloud": {"point_cloud_b64", "point_cloud_mime", "point_cloud_grid"},
}


def b64_of(image: np.ndarray) -> str:
    return base64.b64encode(jpeg(image)).decode()


def raw_depth(result: dict) -> np.ndarray:
    return decode_npz(result["depth_npz_b64"])


def assert_full_result(result: dict, tasks: list[str], width: int, height: int) -> None:
    expected = RESULT_KEYS | set().union(*(TASK_KEYS[t] for t in tasks))
    assert set(result) - {"depth_npz_b64"} == expected
    assert (result["width"], result["height"]) == (width, height)
    for key in ("depth_png_b64", "colorized_b64", "normals_b64", "disparity_b64"):
        if key in result:
            assert decode_image(result[key]).shape[:2] == (height, width)
    assert result["depth_min"] <= result["depth_mean"] <= result["depth_max"]


# --------------------------------------------------------------------------- the seed's example requests


def test_seed_example_depth_only(run_job, photo_urls: dict[str, str], photos: dict) -> None:
    out = run_job({"image_url": photo_urls["coffee"], "tasks": ["depth"]})
    assert set(out) == TOP_LEVEL_KEYS
    assert out["count"] == 1
    assert out["model"] == RELATIVE_ID
    assert out["device"] == "cpu"
    assert out["cuda_available"] is False
    (result,) = out["results"]
    assert result["input"] == {"kind": "url", "url": photo_urls["coffee"]}
    assert result["metric"] is False
    assert_full_result(result, ["depth"], 600, 400)
    assert result["inference_size"] == [600, 400]
    assert list(result["timings"]) == ["fetch", "decode", "infer", "render"]
    assert 0 < sum(result["timings"].values()) <= result["elapsed_sec"] + 1e-4  # rounded to 5 and 4 decimals


def test_seed_example_colorized_viridis(run_job, photo_urls: dict[str, str]) -> None:
    out = run_job({"image_url": photo_urls["astronaut"], "tasks": ["colorized"], "colormap": "viridis"})
    (result,) = out["results"]
    assert_full_result(result, ["colorized"], 512, 512)
    assert result["colormap"] == "viridis"
    assert result["colorized_mime"] == "image/png"


def test_seed_example_four_tasks_turbo_large_model_name(run_job, photo_urls: dict[str, str]) -> None:
    # The repository serves no Large model: the request is refused as a whole, naming what is served.
    out = run_job(
        {
            "image_url": photo_urls["coffee"],
            "tasks": ["depth", "colorized", "normals", "disparity"],
            "colormap": "turbo",
            "model": "depth-anything/Depth-Anything-V2-Large-hf",
        }
    )
    assert "not served" in out["error"]
    assert RELATIVE_ID in out["error"]
    out = run_job(
        {
            "image_url": photo_urls["coffee"],
            "tasks": ["depth", "colorized", "normals", "disparity"],
            "colormap": "turbo",
        }
    )
    assert_full_result(out["results"][0], ["depth", "colorized", "normals", "disparity"], 600, 400)


def test_seed_example_metric_indoor_raw(run_job, photo_urls: dict[str, str]) -> None:
    out = run_job(
        {
            "image_url": photo_urls["coffee"],
            "model": METRIC_ID,
            "tasks": ["depth"],
            "include_raw": True,
            "normalize": False,
        }
    )
    assert out["model"] == METRIC_ID
    assert out["dtype"] == "float16"  # only FP16 is served for it
    (result,) = out["results"]
    assert result["metric"] is True
    depth = raw_depth(result)
    assert depth.dtype == np.float32
    assert depth.shape == (400, 600)
    assert depth.min() > 0
    assert depth.max() <= 20.0


def test_seed_example_mixed_images_magma_webp(run_job, photo_urls: dict[str, str], photos: dict) -> None:
    out = run_job(
        {
            "images": [
                {"type": "url", "data": photo_urls["coffee"]},
                {"type": "b64", "data": b64_of(photos["coffee"])},
            ],
            "tasks": ["colorized", "normals"],
            "colormap": "magma",
            "output_format": "webp",
        }
    )
    assert [r["index"] for r in out["results"]] == [0, 1]
    assert out["results"][1]["input"]["kind"] == "b64"
    assert out["results"][1]["input"]["bytes"] == len(jpeg(photos["coffee"]))
    for result in out["results"]:
        assert_full_result(result, ["colorized", "normals"], 600, 400)
        assert result["colorized_mime"] == "image/webp"
        assert base64.b64decode(result["colorized_b64"])[8:12] == b"WEBP"


def test_seed_example_point_cloud_grid(run_job, photo_urls: dict[str, str]) -> None:
    out = run_job({"image_url": photo_urls["coffee"], "tasks": ["point_cloud"], "point_cloud_grid": 768})
    (result,) = out["results"]
    preview = decode_image(result["point_cloud_b64"])
    assert preview.shape == (768, 768, 3)
    assert result["point_cloud_grid"] == 768
    assert (preview.sum(axis=2) > 0).mean() > 0.01  # points were drawn


def test_seed_example_invert_magma(run_job, photo_urls: dict[str, str]) -> None:
    common = {
        "image_url": photo_urls["coffee"],
        "tasks": ["colorized", "depth", "normals"],
        "colormap": "magma",
        "include_raw": True,
    }
    plain = run_job(common)["results"][0]
    inverted = run_job({**common, "invert": True})["results"][0]
    unit = normalized(raw_depth(plain))
    assert_colormap(decode_image(plain["colorized_b64"]), "magma", unit)
    assert_colormap(decode_image(inverted["colorized_b64"]), "magma", 1 - unit)
    assert inverted["normals_b64"] == plain["normals_b64"]  # invert is for the colorization only


# --------------------------------------------------------------------------- content of every output


def normalized(depth: np.ndarray) -> np.ndarray:
    return (depth - depth.min()) / (depth.max() - depth.min())


def assert_colormap(rgb: np.ndarray, name: str, unit: np.ndarray) -> None:
    """rgb equals matplotlib's colormap of ``unit`` within one level (PNG is lossless).

    A value within float rounding of a bin edge may land in either neighbouring bin, so each pixel may
    match the colour of the bin below or above its exact position.
    """
    source = "gray" if name == "gray" else name
    position = np.clip(unit, 0, 1) * 255
    errors = []
    for index in (np.floor(position), np.ceil(position)):
        expected = np.round(colormaps[source](index / 255)[..., :3] * 255)
        errors.append(np.abs(rgb.astype(int) - expected).max(axis=-1))
    assert np.minimum(*errors).max() <= 1


@pytest.mark.parametrize("colormap", ["viridis", "magma", "inferno", "plasma", "turbo", "gray"])
def test_every_colormap_matches_matplotlib(run_job, photo_urls: dict[str, str], colormap: str) -> None:
    out = run_job(
        {"image_url": photo_urls["coffee"], "tasks": ["depth", "colorized"], "colormap": colormap, "include_raw": True}
    )
    result = out["results"][0]
    assert_colormap(decode_image(result["colorized_b64"]), colormap, normalized(raw_depth(result)))


@pytest.mark.parametrize(
    ("fmt", "mime", "magic"),
    [("png", "image/png", b"\x89PNG"), ("jpg", "image/jpeg", b"\xff\xd8\xff"), ("webp", "image/webp", b"RIFF")],
)
def test_every_output_format(run_job, photo_urls: dict[str, str], fmt: str, mime: str, magic: bytes) -> None:
    out = run_job({"image_url": photo_urls["coffee"], "tasks": ALL_TASKS, "output_format": fmt, "quality": 80})
    result = out["results"][0]
    assert_full_result(result, ALL_TASKS, 600, 400)
    for task in ("colorized", "normals", "disparity"):
        assert result[f"{task}_mime"] == mime
        assert base64.b64decode(result[f"{task}_b64"]).startswith(magic)
    assert result["depth_png_mime"] == "image/png"  # the depth map is always 16-bit PNG
    assert result["point_cloud_mime"] == "image/png"


def test_depth_png_round_trips_to_the_raw_depth(run_job, photo_urls: dict[str, str]) -> None:
    result = run_job({"image_url": photo_urls["astronaut"], "tasks": ["depth"], "include_raw": True})["results"][0]
    png = decode_image(result["depth_png_b64"])
    assert png.dtype == np.uint16
    depth = raw_depth(result)
    low, high = result["depth_min"], result["depth_max"]
    assert (low, high) == pytest.approx((float(depth.min()), float(depth.max())))
    assert result["depth_mean"] == pytest.approx(float(depth.mean()), rel=1e-5)
    restored = png.astype(np.float64) / 65535 * (high - low) + low
    assert np.abs(restored - depth).max() <= (high - low) / 65535 * 0.51 + 1e-6
    assert png.min() == 0
    assert png.max() == 65535


def test_normals_are_unit_vectors_and_disparity_is_reciprocal_depth(run_job, photo_urls: dict[str, str]) -> None:
    tasks = ["depth", "normals", "disparity"]
    result = run_job({"image_url": photo_urls["coffee"], "tasks": tasks, "include_raw": True})["results"][0]
    vectors = decode_normals(decode_image(result["normals_b64"]))
    assert np.abs(np.linalg.norm(vectors, axis=2) - 1).max() < 0.02
    camera = result["intrinsics"]
    rows, cols = np.mgrid[0 : vectors.shape[0], 0 : vectors.shape[1]]
    to_camera = np.stack(  # from each pixel's surface point back to the camera, in the normals' frame (y up, z back)
        [-(cols - camera["cx"]) / camera["fx"], (rows - camera["cy"]) / camera["fy"], np.ones(rows.shape)], axis=-1
    )
    facing = np.einsum("hwc,hwc->hw", vectors, to_camera) / np.linalg.norm(to_camera, axis=2)
    assert facing.min() > -0.02  # every normal faces the camera (up to the 8-bit encoding)
    depth, disparity = raw_depth(result), decode_image(result["disparity_b64"]).astype(float)
    assert disparity.ndim == 2
    assert correlation(disparity, depth) > 0.999  # a relative model's output is inverse depth already


def test_normalize_false_uses_the_metric_scale(run_job, photo_urls: dict[str, str]) -> None:
    job = {"image_url": photo_urls["coffee"], "model": METRIC_ID, "tasks": ["depth", "colorized"], "include_raw": True}
    result = run_job({**job, "normalize": False, "colormap": "gray"})["results"][0]
    assert_colormap(decode_image(result["colorized_b64"]), "gray", raw_depth(result) / 20.0)


def test_dpt_model(run_job, photo_urls: dict[str, str]) -> None:
    out = run_job({"image_url": photo_urls["coffee"], "model": DPT_ID, "tasks": ALL_TASKS})
    assert out["model"] == DPT_ID
    assert_full_result(out["results"][0], ALL_TASKS, 600, 400)


def test_max_size_downscales_inference_but_not_outputs(run_job, photo_urls: dict[str, str]) -> None:
    result = run_job({"image_url": photo_urls["chelsea_4x3"], "tasks": ["depth"], "max_size": 512})["results"][0]
    assert result["inference_size"] == [512, 384]
    assert (result["width"], result["height"]) == (1024, 768)
    assert decode_image(result["depth_png_b64"]).shape == (768, 1024)


def test_dtype_selects_the_precision_variant(run_job, photo_urls: dict[str, str]) -> None:
    job = {"image_url": photo_urls["coffee"], "tasks": ["depth"], "include_raw": True}
    default = run_job(job)
    assert default["dtype"] == "float32"  # CPU server, and an FP32 variant is served
    fp16 = run_job({**job, "dtype": "float16"})
    assert fp16["dtype"] == "float16"
    assert correlation(raw_depth(default["results"][0]), raw_depth(fp16["results"][0])) > 0.999
    refused = run_job({**job, "dtype": "bfloat16"})  # never exported: not offered
    assert refused == {"error": "invalid value 'bfloat16' for dtype: expected 'float16' or 'float32'"}


# --------------------------------------------------------------------------- errors: per image and per request


def test_mixed_sources_in_order_with_broken_entries(
    run_job, photo_urls: dict[str, str], photos: dict, image_server
) -> None:
    out = run_job(
        {
            "image_url": photo_urls["coffee"],
            "image_urls": [image_server.url("/files/missing.jpg")],
            "image_b64": "data:image/jpeg;base64," + b64_of(photos["astronaut"]),
            "images": [{"type": "b64", "data": "bm90IGFuIGltYWdl"}, {"type": "url", "data": photo_urls["astronaut"]}],
            "tasks": ["depth"],
        }
    )
    results = out["results"]
    assert [r["index"] for r in results] == [0, 1, 2, 3, 4]
    assert out["count"] == 5
    assert results[0]["width"] == 600
    assert results[2]["width"] == 512
    assert results[4]["width"] == 512
    assert set(results[1]) == {"index", "input", "error"}
    assert results[1]["error"] == "image download failed with HTTP status 404"
    assert set(results[3]) == {"index", "input", "error"}
    assert "not an image" in results[3]["error"]
    assert results[3]["input"] == {"kind": "b64", "bytes": len(b"not an image")}  # its bytes, decoded before the header


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({}, "no image given"),
        ({"image_url": "x", "model": "depth_anything_v2_small"}, "unknown model"),
        ({"image_url": "x", "model": "../../etc/passwd"}, "unknown model"),
        ({"image_url": "x", "tasks": ["depth", "segmentation"]}, "invalid value 'segmentation' for tasks.1"),
        ({"image_url": "x", "colormap": "jet"}, "invalid value 'jet' for colormap"),
        ({"image_url": "x", "output_format": "gif"}, "invalid value 'gif' for output_format"),
        ({"image_url": "x", "quality": 101}, "invalid quality"),
        ({"image_url": "x", "max_size": 0}, "invalid max_size"),
        ({"image_url": "x", "point_cloud_grid": 100000}, "invalid point_cloud_grid"),
        ({"image_url": "x", "dtype": "int8"}, "invalid value 'int8' for dtype"),
        ({"image_url": "x", "normalize": "maybe"}, "invalid normalize"),
        ({"image_url": "x", "colour": "red"}, "unknown field 'colour'"),
        ({"image_urls": ["x"] * 17}, "too many images: 17 given, at most 16"),
    ],
)
def test_request_level_errors(run_job, payload: dict, message: str) -> None:
    out = run_job(payload)
    assert set(out) == {"error"}
    assert message in out["error"]


# --------------------------------------------------------------------------- parity with transformers' pipeline


@pytest.mark.parametrize(
    ("model_id", "photo", "minimum"),
    [
        (RELATIVE_ID, "astronaut", 0.99),
        (RELATIVE_ID, "chelsea_4x3", 0.99),
        (RELATIVE_ID, "large_4x3", 0.99),  # a JPEG decoded at half scale
        (METRIC_ID, "chelsea_4x3", 0.99),
        (DPT_ID, "coffee", 0.98),
    ],
)
def test_depth_correlates_with_transformers_pipeline(
    run_job, checkpoints, photos: dict, photo_urls: dict[str, str], model_id: str, photo: str, minimum: float
) -> None:
    estimator = pipeline("depth-estimation", model=str(checkpoints[model_id]), device="cpu", dtype=torch.float32)
    image = Image.open(io.BytesIO(jpeg(photos[photo])))
    if model_id != DPT_ID:  # the reference must run the network at the gateway's bucket shape
        processed = estimator.image_processor(image, return_tensors="pt")["pixel_values"].shape[-2:]
        assert tuple(processed) in {(518, 518), (518, 686)}
    reference = estimator(image)["predicted_depth"].numpy()
    job = {
        "image_url": photo_urls[photo],
        "model": model_id,
        "tasks": ["depth"],
        "include_raw": True,
        "dtype": "float16",
    }
    out = run_job(job)
    assert "results" in out, out
    ours = raw_depth(out["results"][0])
    assert ours.shape == reference.shape == photos[photo].shape[:2]
    assert correlation(ours, reference) >= minimum


# --------------------------------------------------------------------------- batching and model lifetime


def test_concurrent_requests_are_batched_by_triton(gateway_url: str, photo_urls: dict[str, str], triton) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(triton.http_url.removeprefix("http://"))
    name = "depth_anything_v2_small"

    def counts() -> tuple[int, int, dict[int, int]]:
        stats = client.get_inference_statistics(name)["model_stats"]
        stats = [s for s in stats if s["name"] == name]
        if not stats:
            return 0, 0, {}
        batches = {b["batch_size"]: b["compute_infer"]["count"] for b in stats[0]["batch_stats"]}
        return stats[0]["inference_count"], stats[0]["execution_count"], batches

    job = {"image_urls": [photo_urls["coffee"]] * 2, "tasks": ["depth"], "dtype": "float16"}
    post(gateway_url, job)  # make sure the model is loaded before the burst
    inferences_before, executions_before, _ = counts()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda _: post(gateway_url, job), range(16)))
    assert all(reply["status"] == "COMPLETED" for reply in replies)
    assert all("error" not in result for reply in replies for result in reply["output"]["results"])
    inferences, executions, batches = counts()
    assert inferences - inferences_before == 32
    assert executions - executions_before < 32
    assert max(batches) > 1


def test_least_recently_used_model_is_unloaded(run_job, photo_urls: dict[str, str], triton) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(triton.http_url.removeprefix("http://"))
    for model_id in (RELATIVE_ID, METRIC_ID, DPT_ID):
        assert "error" not in run_job({"image_url": photo_urls["coffee"], "model": model_id, "dtype": "float16"})
    ready = {m["name"] for m in client.get_model_repository_index() if m.get("state") == "READY"}
    assert ready == {"depth_anything_v2_metric_indoor_large", "dpt_large"}

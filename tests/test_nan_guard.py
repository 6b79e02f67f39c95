"""A depth map with NaN or inf is never rendered: the image is served from the FP32 variant when there is
one (and says so), else it gets a clear error. Against a real tritonserver whose FP16 models return NaN
for bright images, as FP16 overflow does on some inputs."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from catalogue.models import get_spec
from devstack.local import post, running_gateway
from export.triton_config import build_config, render
from gateway.serving.triton_process import EmbeddedTriton
from tests import images
from tests.helpers import decode_image
from tests.test_robustness import b64

MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils

OVERFLOWS = {overflows}


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            image = pb_utils.get_input_tensor_by_name(request, "image").as_numpy()
            depth = image[..., 0].astype(np.float32) / 255 + 1
            if OVERFLOWS:  # bright images overflow
                depth[image.reshape(len(image), -1).mean(axis=1) > 200] = np.nan
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("depth", depth)]))
        return responses
"""
SMALL, BASE = "depth-anything/Depth-Anything-V2-Small-hf", "depth-anything/Depth-Anything-V2-Base-hf"


def add_model(repository: Path, model_id: str, precision: str, overflows: bool) -> None:
    spec = get_spec(model_id)
    model_dir = repository / spec.served_name(precision)
    (model_dir / "1").mkdir(parents=True)
    config = build_config(spec, precision, "python")
    del config.model_warmup[:]
    (model_dir / "config.pbtxt").write_text(render(config))
    (model_dir / "1" / "model.py").write_text(MODEL.format(overflows=overflows))


@pytest.fixture(scope="module")
def overflowing_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    repository = tmp_path_factory.mktemp("overflow")
    add_model(repository, SMALL, "fp16", overflows=True)
    add_model(repository, SMALL, "fp32", overflows=False)
    add_model(repository, BASE, "fp16", overflows=True)  # and no FP32 variant
    triton = EmbeddedTriton(repository, start_timeout=120).start()
    try:
        with running_gateway({"TRITON_URL": triton.grpc_url, "DEPTH_MODEL": SMALL}, repository / "gateway.log") as url:
            yield url
    finally:
        triton.stop()


BRIGHT = b64(images.encode(images.Image.new("RGB", (40, 30), (250, 250, 250)), "PNG"))
DARK = b64(images.encode(images.Image.fromarray(images.photo_like(40, 30) // 2), "PNG"))


def test_nan_depth_is_served_from_the_fp32_variant(overflowing_gateway: str) -> None:
    job = {"images": [{"type": "b64", "data": BRIGHT}, {"type": "b64", "data": DARK}], "dtype": "float16"}
    reply = post(overflowing_gateway, {**job, "tasks": ["depth", "colorized"]})
    bright, dark = reply["output"]["results"]
    assert bright["fallback_dtype"] == "float32"
    assert "fallback_dtype" not in dark
    for result in (bright, dark):
        assert np.isfinite([result["depth_min"], result["depth_max"], result["depth_mean"]]).all()
        assert decode_image(result["depth_png_b64"]).shape == (30, 40)
    assert bright["depth_min"] == pytest.approx(1 + 250 / 255, abs=1e-3)


def test_nan_depth_without_an_fp32_variant_is_a_clear_error(overflowing_gateway: str) -> None:
    job = {"model": BASE, "images": [{"type": "b64", "data": BRIGHT}, {"type": "b64", "data": DARK}]}
    bright, dark = post(overflowing_gateway, job)["output"]["results"]
    assert bright == {
        "index": 0,
        "input": {"kind": "b64", "bytes": len(base64.b64decode(BRIGHT))},
        "error": "the model returned NaN or infinite depth for this image in fp16, and no float32 variant is served",
    }
    assert "depth_png_b64" in dark

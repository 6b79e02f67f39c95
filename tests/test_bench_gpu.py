"""``python -m bench.gpu`` in its dry mode (CPU, tiny models, FP32, the worker through the job-API
stand-in), so the GPU check cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_the_gpu_check_runs_dry_and_reports_every_path(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "bench.gpu", "--dry", "--models", "small", "dpt", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "gpu_dry.json").read_text())
    assert report["device"] == "cpu (dry run)"
    assert [(row["model"], row["batch"]) for row in report["rows"]] == [
        ("small", 1),
        ("small", 2),
        ("dpt", 1),
        ("dpt", 2),
    ]
    for row in report["rows"]:
        paths = row["paths"]
        assert set(paths) == {"pytorch eager", "onnxruntime plain", "onnxruntime fused (4 attention nodes)"}
        for figures in paths.values():
            assert figures["ms"] > 0
            assert figures["images_per_s"] > 0
            assert figures["relative_l2"] < 1e-4  # FP32 everywhere in the dry run
    worker = report["worker"]  # the whole worker through the job-API stand-in, as on a GPU machine
    assert (worker["jobs"], worker["precision"]) == (6, "fp32")
    assert worker["images_per_s"] > 0
    assert worker["cpu_ms_per_image"] > 0
    assert worker["gpu_utilization_median"] is None  # no nvidia-smi here: nothing is made up
    assert report["tensorrt_first_requests"] == {}  # no TensorRT here either


def test_without_a_gpu_it_says_so_instead_of_measuring() -> None:
    result = subprocess.run([sys.executable, "-m", "bench.gpu"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no CUDA here" in result.stdout


def test_the_tensorrt_first_request_check_uses_the_exported_configs_own_options(tmp_path: Path) -> None:
    """The cold/warm TensorRT check (GPU only) builds its session from the config the exporter writes:
    the same profiles, FP16, and both caches in the folder it times, under onnxruntime's option names."""
    from bench.gpu import tensorrt_options
    from catalogue.models import get_spec
    from export.triton_config import profile_parameters, tensorrt_profiles

    spec = get_spec("depth-anything/Depth-Anything-V2-Small-hf")
    options = tensorrt_options(spec, "fp16", tmp_path)
    for key, shapes in profile_parameters(tensorrt_profiles(spec)).items():
        assert options[key] == shapes
    assert options["trt_fp16_enable"] == "1"
    assert tensorrt_options(spec, "fp32", tmp_path)["trt_fp16_enable"] == "0"
    assert options["trt_engine_cache_path"] == options["trt_timing_cache_path"] == str(tmp_path)
    assert options["trt_engine_cache_enable"] == options["trt_timing_cache_enable"] == "1"
    assert int(options["trt_max_workspace_size"]) > 0
    # onnxruntime's TensorRT provider names (its documentation): nothing Triton-only is passed on
    known = {"trt_fp16_enable", "trt_max_workspace_size", "trt_engine_cache_enable", "trt_engine_cache_path",
             "trt_timing_cache_enable", "trt_timing_cache_path", "trt_profile_min_shapes", "trt_profile_opt_shapes",
             "trt_profile_max_shapes"}  # fmt: skip
    assert set(options) == known

"""The deployment files agree with the Triton image they run on (docs/deployment.md says where each
number comes from): the hub's CUDA versions and GPU pools, the gateway's pinned dependencies on the
image's Python 3.12, and the TensorRT keys of the exported configs."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from catalogue.models import MODELS, get_spec
from export.triton_config import (
    LOADED_MODELS,
    TENSORRT_CACHE,
    batch_caps,
    build_config,
    parse,
    profile_parameters,
    render,
    tensorrt_profiles,
)
from gateway.served_model import ServedModel
from gateway.serving.triton import TritonModels
from gateway.serving.triton_process import point_tensorrt_cache
from gateway.settings import TENSORRT_LINK, default_tensorrt_cache
from tests.conftest import RELATIVE_ID, ROOT

TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:25.01-py3"
# Release notes of 25.01: CUDA 12.8.0.038, "requires NVIDIA Driver release 560 or later", compute capability 7.5+.
MIN_HOST_CUDA = (12, 6)  # the CUDA version driver R560 supports
# Runpod's GPU pools (docs.runpod.io/flash/configuration/gpu-types): lowest compute capability, VRAM in GB.
GPU_POOLS = {
    "AMPERE_16": (8.6, 16),
    "AMPERE_24": (8.6, 24),
    "ADA_24": (8.9, 24),
    "ADA_32_PRO": (12.0, 32),
    "AMPERE_48": (8.6, 48),
    "ADA_48_PRO": (8.9, 48),
    "AMPERE_80": (8.0, 80),
    "ADA_80_PRO": (9.0, 80),
    "HOPPER_141": (9.0, 141),
}
# The ONNX Runtime backend README's table "Parameter mapping between ONNX Runtime and Triton ONNXRuntime Backend".
DOCUMENTED_TENSORRT_KEYS = {
    "max_workspace_size_bytes", "trt_max_partition_iterations", "trt_min_subgraph_size", "precision_mode",
    "int8_calibration_table_name", "int8_use_native_calibration_table", "trt_dla_enable", "trt_dla_core",
    "trt_engine_cache_enable", "trt_engine_cache_path", "trt_engine_cache_prefix", "trt_dump_subgraphs",
    "trt_force_sequential_engine_build", "trt_context_memory_sharing_enable", "trt_layer_norm_fp32_fallback",
    "trt_timing_cache_enable", "trt_timing_cache_path", "trt_force_timing_cache", "trt_detailed_build_log",
    "trt_build_heuristics_enable", "trt_sparsity_enable", "trt_builder_optimization_level", "trt_auxiliary_streams",
    "trt_tactic_sources", "trt_extra_plugin_lib_paths", "trt_profile_min_shapes", "trt_profile_max_shapes",
    "trt_profile_opt_shapes", "trt_cuda_graph_enable", "trt_dump_ep_context_model", "trt_ep_context_file_path",
    "trt_ep_context_embed_mode",
}  # fmt: skip


def hub_config() -> dict:
    return json.loads((ROOT / ".runpod" / "hub.json").read_text())["config"]


def test_both_images_build_on_the_documented_triton_release() -> None:
    for dockerfile in ("Dockerfile.triton", "Dockerfile"):
        assert f"ARG TRITON_IMAGE={TRITON_IMAGE}\n" in (ROOT / dockerfile).read_text()
    assert TRITON_IMAGE.split(":")[1].removesuffix("-py3") in (ROOT / "docs" / "deployment.md").read_text()


def test_hub_cuda_versions_follow_the_images_driver_requirement() -> None:
    versions = [tuple(int(part) for part in version.split(".")) for version in hub_config()["allowedCudaVersions"]]
    assert versions
    assert min(versions) == MIN_HOST_CUDA  # no host whose driver is older than R560, and none left out above it
    assert all(major == 12 for major, _minor in versions)
    assert sorted(versions) == [(12, minor) for minor in range(MIN_HOST_CUDA[1], max(versions)[1] + 1)]


def test_hub_gpu_pools_exist_and_fit_the_models() -> None:
    pools = hub_config()["gpuIds"].split(",")
    assert pools
    for pool in pools:
        assert pool in GPU_POOLS, f"{pool} is not a Runpod GPU pool"
        capability, memory = GPU_POOLS[pool]
        assert 8.0 <= capability < 10, pool  # flash attention in ONNX Runtime; no Blackwell consumer cards
        assert memory >= 24, pool
    assert hub_config()["gpuCount"] == 1
    assert hub_config()["containerDiskInGb"] >= 20


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_tensorrt_configs_use_only_documented_backend_keys(precision: str) -> None:
    config = parse(
        render(build_config(get_spec("depth-anything/Depth-Anything-V2-Large-hf"), precision, "onnxruntime", True))
    )
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    assert set(accelerator.parameters) <= DOCUMENTED_TENSORRT_KEYS
    assert {"trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes"} <= set(accelerator.parameters)
    assert accelerator.parameters["precision_mode"] == precision.upper()


def gateway_requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["gateway"]]


def test_gateway_dependencies_resolve_to_wheels_for_python_3_12(tmp_path: Path) -> None:
    """What ``Dockerfile`` installs into the Ubuntu 24.04 image (CPython 3.12, glibc 2.39)."""
    platforms = ["manylinux_2_39_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
               "--disable-pip-version-check", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", "--abi", "cp312", "--target", str(tmp_path / "target"),
               "--report", str(tmp_path / "report.json")]  # fmt: skip
    for platform in platforms:
        command += ["--platform", platform]
    result = subprocess.run([*command, *gateway_requirements()], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    installed = json.loads((tmp_path / "report.json").read_text())["install"]
    wheels = {item["metadata"]["name"].lower(): item["download_info"]["url"].rsplit("/", 1)[1] for item in installed}
    for requirement in gateway_requirements():
        name, version = re.match(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(\S+)", requirement).groups()
        assert f"-{version}-" in wheels[name.lower().replace("_", "-")], requirement
    for name, wheel in wheels.items():
        assert re.search(r"-(cp312-cp312|cp3\d+-abi3|py3-none|py2\.py3-none)-", wheel), f"{name}: {wheel}"


def baked_models() -> list[str]:
    """The model ids the worker image's default build exports (``ARG MODELS`` of its export stage)."""
    match = re.search(r"^ARG MODELS=(.+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert match, "Dockerfile has no default MODELS"
    return match.group(1).split()


def test_the_hub_layout_is_where_runpods_publishing_guide_looks() -> None:
    """hub.json and tests.json in .runpod/; handler.py, Dockerfile and README.md in .runpod/ or the root."""
    assert (ROOT / ".runpod" / "hub.json").is_file()
    assert (ROOT / ".runpod" / "tests.json").is_file()
    for name in ("handler.py", "Dockerfile", "README.md"):
        assert (ROOT / ".runpod" / name).is_file() or (ROOT / name).is_file(), name


def test_the_hub_offers_exactly_the_models_the_default_build_bakes_in() -> None:
    hub = json.loads((ROOT / ".runpod" / "hub.json").read_text())
    (model,) = [entry["input"] for entry in hub["config"]["env"] if entry["key"] == "DEPTH_MODEL"]
    assert [option["value"] for option in model["options"]] == baked_models()
    assert model["default"] in baked_models()
    assert baked_models() == ["depth-anything/Depth-Anything-V2-Small-hf"]  # and the README says how to bake more
    assert "--build-arg MODELS=all" in (ROOT / "README.md").read_text()


# --------------------------------------------------------------------------- TensorRT profiles and cache


@pytest.mark.parametrize("model_id", list(MODELS))
def test_tensorrt_profiles_cover_exactly_the_served_buckets_within_the_activation_budget(model_id: str) -> None:
    """Derived from the model table, not copied: every served bucket fits exactly one profile of its
    network size and orientation, at every batch up to that size's cap; a cap is the largest batch whose
    largest bucket stays within a full batch of the default size's largest bucket; no profile reaches a
    shape larger than its size serves."""
    spec = MODELS[model_id]
    budget = spec.max_batch_size * max(w * h for w, h in spec.buckets)
    caps = batch_caps(spec)
    assert caps[spec.default_res] == spec.max_batch_size  # the default size keeps its full batch
    for size, buckets in spec.families:
        largest = max(w * h for w, h in buckets)
        assert caps[size] * largest <= budget or caps[size] == 1
        assert (caps[size] + 1) * largest > budget or caps[size] == spec.max_batch_size
    profiles = tensorrt_profiles(spec)
    for size, buckets in spec.families:
        for width, height in buckets:
            holding = [p for p in profiles if p.min[1] <= height <= p.max[1] and p.min[2] <= width <= p.max[2]]
            assert len(holding) == 1, (size, height, width)
            assert holding[0].min[0] == 1
            assert holding[0].max[0] == holding[0].opt[0] == caps[size]
    for profile in profiles:
        opt_height, opt_width = profile.opt[1:]
        family = next(buckets for _size, buckets in spec.families if (opt_width, opt_height) in buckets)
        assert profile.max[1] <= max(h for _w, h in family)
        assert profile.max[2] <= max(w for w, _h in family)
    parameters = profile_parameters(profiles)
    assert parameters["trt_profile_max_shapes"].count("image:") == len(profiles)  # one input name per profile


def test_the_gateway_keeps_no_more_requests_of_a_size_in_flight_than_its_cap() -> None:
    config = parse(render(build_config(get_spec(RELATIVE_ID), "fp16", "onnxruntime")))
    model = ServedModel.from_config(config)
    caps = batch_caps(get_spec(RELATIVE_ID))
    assert model.batch_cap(518) is None  # the full batch: Triton's batch size bounds it, requests may queue
    triton = TritonModels("127.0.0.1:1", 2, 1.0, 0)

    async def run() -> None:
        for size, buckets in get_spec(RELATIVE_ID).families[1:]:
            assert model.size_of(buckets[-1]) == size
            limiter = triton._within_batch_cap(model, buckets[-1])
            assert limiter is triton._within_batch_cap(model, buckets[0])  # one limit per network size
            held = []
            for _ in range(caps[size]):
                await limiter.acquire()
                held.append(1)
            assert limiter.locked()  # one more waits until one of these is answered

    asyncio.run(run())


def test_the_tensorrt_cache_follows_the_setting_and_a_network_volume(tmp_path: Path) -> None:
    assert Path(TENSORRT_CACHE) == TENSORRT_LINK  # the configs' path is the one the worker points
    volume = tmp_path / "runpod-volume"
    assert default_tensorrt_cache(volume) == TENSORRT_LINK.parent / "tensorrt-cache-local"
    volume.mkdir()
    assert default_tensorrt_cache(volume) == volume / "tensorrt-cache"
    link = tmp_path / "opt" / "tensorrt-cache"
    link.mkdir(parents=True)  # the image's empty placeholder
    message = point_tensorrt_cache(link, volume / "tensorrt-cache")
    assert message == f"TensorRT engines are cached in {volume / 'tensorrt-cache'} (through {link})"
    (link / "engine.plan").write_bytes(b"engine")
    assert (volume / "tensorrt-cache" / "engine.plan").read_bytes() == b"engine"
    assert point_tensorrt_cache(link, volume / "tensorrt-cache").startswith("TensorRT engines are cached in")
    unwritable = tmp_path / "ro"
    unwritable.mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes anywhere
        assert "engines are rebuilt on each start" in point_tensorrt_cache(link, unwritable / "cache")
    for dockerfile in ("Dockerfile", "Dockerfile.triton"):
        text = (ROOT / dockerfile).read_text()
        assert "mkdir -p /opt/depth/tensorrt-cache && chown -R triton-server:triton-server /opt/depth" in text


def test_onnxruntime_configs_carry_cuda_options_sized_for_the_gpu_and_warm_up_a_full_batch() -> None:
    spec = get_spec(RELATIVE_ID)
    for gpu_gb in (24.0, 80.0):
        config = build_config(spec, "fp16", "onnxruntime", gpu_memory_gb=gpu_gb)
        params = {key: value.string_value for key, value in config.parameters.items()}
        assert params["cudnn_conv_algo_search"] == "1"  # heuristic, not a timed search per new shape
        assert params["arena_extend_strategy"] == "1"  # no power-of-two overshoot
        limit = int(params["gpu_mem_limit"])
        assert limit * LOADED_MODELS <= gpu_gb * (1 << 30)  # the loaded models together fit the GPU
        assert limit * LOADED_MODELS >= 0.8 * gpu_gb * (1 << 30)  # and use most of it
        assert list(config.dynamic_batching.preferred_batch_size) == [spec.max_batch_size]
        full = [warmup for warmup in config.model_warmup if warmup.batch_size == spec.max_batch_size]
        assert [list(w.inputs["image"].dims) for w in full] == [[518, 686, 3]]  # a full batch of 4:3
    python = build_config(spec, "fp32", "python")  # the CPU test stack: no CUDA options, batch-1 warm-up only
    assert "gpu_mem_limit" not in python.parameters
    assert {warmup.batch_size for warmup in python.model_warmup} == {1}


TRITON_ORT = "1.20.1"  # the ONNX Runtime of Triton 25.01's onnxruntime backend (server build.py's version map)
ORT_RUN = """
import json, sys
import numpy as np
import onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
image = np.load(sys.argv[2])
depth = session.run(["depth"], {"image": image})[0]
np.save(sys.argv[3], depth)
print(json.dumps({"version": ort.__version__}))
"""


@pytest.mark.parametrize("served_name", ["depth_anything_v2_small", "dpt_large"])
def test_the_exported_graphs_run_in_the_onnxruntime_triton_25_01_ships(
    served_name: str, repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The exporter's opset, IR version and fused contrib ops load and run in ONNX Runtime 1.20.1 (CPU),
    with the same depth as the ONNX Runtime the tests use."""
    import onnxruntime

    target = tmp_path_factory.getbasetemp() / f"onnxruntime-{TRITON_ORT}"
    if not (target / "onnxruntime").is_dir():
        install = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                   f"onnxruntime=={TRITON_ORT}"]  # fmt: skip
        subprocess.run(install, check=True, capture_output=True, timeout=300)
    graph = repository / served_name / "1" / "model.onnx"
    height, width = get_spec(RELATIVE_ID).buckets[1] if served_name != "dpt_large" else (384, 384)
    image = np.random.default_rng(0).integers(0, 256, (1, height, width, 3), dtype=np.uint8)
    work = tmp_path_factory.mktemp("ort")
    np.save(work / "image.npy", image)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", ORT_RUN, str(graph), str(work / "image.npy"), str(work / "depth.npy")]
    ran = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert json.loads(ran.stdout.splitlines()[-1])["version"] == TRITON_ORT
    ours = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"]).run(["depth"], {"image": image})
    theirs = np.load(work / "depth.npy")
    assert theirs.shape == (1, height, width)
    assert np.allclose(theirs, ours[0], rtol=1e-2, atol=1e-2 * float(np.abs(ours[0]).max()))

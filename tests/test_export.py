"""The exporter through its real CLI on tiny random checkpoints: files, configs, FP16, parity, bad input."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForDepthEstimation

from catalogue.models import MODELS, get_spec
from catalogue.size import Size
from export import parity
from export.cli import main as export_main
from export.fusion import attention_nodes, contrib_nodes
from export.graph import ServingGraph
from export.random_checkpoint import save_random_checkpoint
from export.triton_config import METADATA_KEYS, TENSORRT_CACHE, parse
from tests.conftest import DPT_ID, METRIC_ID, RELATIVE_ID, TINY_MODELS

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export", *args], cwd=ROOT, capture_output=True, text=True)


def session(repository: Path, model_id: str) -> ort.InferenceSession:
    path = repository / get_spec(model_id).triton_name / "1" / "model.onnx"
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def torch_reference(checkpoint: Path, model_id: str, images: np.ndarray) -> np.ndarray:
    model = AutoModelForDepthEstimation.from_pretrained(checkpoint, dtype=torch.float32)
    with torch.no_grad():
        return ServingGraph(model, get_spec(model_id))(torch.from_numpy(images)).numpy()


def python_model(model_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """The exported ``model.py`` imported as Triton's Python backend would, with a stand-in for its utils
    module (only ``initialize`` is called, which uses none of it)."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    spec = importlib.util.spec_from_file_location("exported_model", model_dir / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TritonPythonModel()


def test_python_model_on_a_gpu_instance_fails_to_load_without_cuda(
    repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime falls back to the CPU when the CUDA provider does not load: a GPU instance refuses that
    (here onnxruntime's CPU build is told it has CUDA), while a CPU instance loads and runs on the CPU."""
    model_dir = repository / get_spec(RELATIVE_ID).triton_name
    args = {"model_repository": str(model_dir), "model_version": "1", "model_instance_device_id": "0"}
    model = python_model(model_dir, monkeypatch)
    model.initialize({**args, "model_instance_kind": "CPU"})
    assert model.session.get_providers() == ["CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    gpu_model = python_model(model_dir, monkeypatch)
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"), pytest.raises(RuntimeError, match="did not load"):
        gpu_model.initialize({**args, "model_instance_kind": "GPU"})


@pytest.mark.parametrize("model_id", TINY_MODELS)
def test_export_writes_model_config_and_report(repository: Path, model_id: str) -> None:
    spec = get_spec(model_id)
    model_dir = repository / spec.triton_name
    assert (model_dir / "1" / "model.onnx").stat().st_size > 100_000
    for folder in (model_dir, model_dir / "1"):  # another user (Triton's) can list and enter them
        assert folder.stat().st_mode & 0o005 == 0o005, folder
    for file in (model_dir / "1" / "model.onnx", model_dir / "config.pbtxt"):  # and read these
        assert file.stat().st_mode & 0o004, file
    assert (model_dir / "1" / "model.py").read_text() == (ROOT / "export" / "triton_python_model.py").read_text()
    config = parse((model_dir / "config.pbtxt").read_text())
    assert config.name == spec.triton_name
    assert config.backend == "python"
    assert config.max_batch_size == spec.max_batch_size
    assert config.dynamic_batching.max_queue_delay_microseconds > 0
    warmed = [Size(*w.inputs["image"].dims[1::-1]) for w in config.model_warmup]  # dims are [H, W, 3]
    assert warmed[: len(spec.buckets)] == list(spec.buckets)  # the default family, every bucket
    assert warmed[len(spec.buckets) :] == [buckets[0] for _size, buckets in spec.families[1:]]
    assert set(config.parameters) == set(METADATA_KEYS)
    assert config.parameters["hf_id"].string_value == model_id
    assert config.parameters["kind"].string_value == ("metric" if spec.metric else "relative")
    assert config.parameters["license"].string_value == spec.license
    assert json.loads(config.parameters["buckets"].string_value) == [[b.height, b.width] for b in spec.buckets]
    families = json.loads(config.parameters["bucket_families"].string_value)
    assert list(families) == (["518", "770", "1036"] if spec.dynamic_shape else ["384"])
    patch = 14 if spec.dynamic_shape else 16  # Dinov2's patch, ViT-L/16's
    for size, buckets in families.items():
        assert all(min(bucket) == int(size) and bucket[0] % patch == bucket[1] % patch == 0 for bucket in buckets)

    report = json.loads((model_dir / "export_report.json").read_text())
    assert report["model_id"] == model_id
    assert report["precision"] == "fp16"
    assert report["opset"] >= 17
    assert report["onnx_bytes"] == (model_dir / "1" / "model.onnx").stat().st_size
    shapes = report["parity"]["shapes"]
    expected = ["518x518", "924x518", "1022x770", "1372x1036"] if spec.dynamic_shape else ["384x384"]
    assert [shape["size"] for shape in shapes] == expected  # every network size is checked (width x height)
    for shape in shapes:
        assert 0 < shape["relative_l2"] < report["parity"]["threshold"] == parity.THRESHOLDS["fp16"]
        assert shape["finite"]
        assert shape["batch"] == (3 if shape["size"] in ("518x518", "924x518", "384x384") else 1)


@pytest.mark.parametrize("model_id", TINY_MODELS)
def test_fp16_weights_are_stored_as_fp16(repository: Path, model_id: str) -> None:
    model = onnx.load(str(repository / get_spec(model_id).triton_name / "1" / "model.onnx"))
    big = [t for t in model.graph.initializer if np.prod(t.dims) >= 256]
    assert big, "the graph has no weights"
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)
    inputs, outputs = model.graph.input[0], model.graph.output[0]
    assert (inputs.name, inputs.type.tensor_type.elem_type) == ("image", onnx.TensorProto.UINT8)
    assert (outputs.name, outputs.type.tensor_type.elem_type) == ("depth", onnx.TensorProto.FLOAT)


@pytest.mark.parametrize("model_id", [RELATIVE_ID, METRIC_ID])
@pytest.mark.parametrize("size", [Size(518, 770), Size(686, 518)])  # neither is a parity-report size
@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_matches_torch_at_other_shapes_and_batches(
    repository: Path, checkpoints: dict[str, Path], model_id: str, size: Size, batch: int
) -> None:
    images = parity.photo_batch(size)[:batch]
    exported = session(repository, model_id).run(["depth"], {"image": images})[0]
    expected = torch_reference(checkpoints[model_id], model_id, images)
    assert exported.shape == (batch, size.height, size.width)
    assert parity.relative_l2(exported, expected) < 5e-3
    assert np.std(exported) > 0.05 * np.abs(exported).mean()  # the depth depends on the image


def test_dpt_runs_batches_at_its_fixed_shape(repository: Path, checkpoints: dict[str, Path]) -> None:
    images = parity.photo_batch(Size(384, 384))
    for batch in (1, 3):
        exported = session(repository, DPT_ID).run(["depth"], {"image": images[:batch]})[0]
        assert exported.shape == (batch, 384, 384)
        assert parity.relative_l2(exported, torch_reference(checkpoints[DPT_ID], DPT_ID, images[:batch])) < 5e-3


def test_metric_depth_stays_within_max_depth(repository: Path) -> None:
    depth = session(repository, METRIC_ID).run(["depth"], {"image": parity.photo_batch(Size(770, 518))})[0]
    max_depth = get_spec(METRIC_ID).max_depth
    assert depth.min() > 0
    assert depth.max() <= max_depth
    assert depth.max() - depth.min() > 0.1 * max_depth  # spread over the range, not a constant


def test_fp32_export_with_onnxruntime_backend_and_tensorrt(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    argv = [RELATIVE_ID, "--checkpoint", str(checkpoints[RELATIVE_ID]), "--repository", str(tmp_path)]
    assert export_main([*argv, "--precision", "fp32", "--tensorrt"]) == 0
    model_dir = tmp_path / "depth_anything_v2_small_fp32"
    report = json.loads((model_dir / "export_report.json").read_text())
    assert all(shape["relative_l2"] < 1e-4 for shape in report["parity"]["shapes"])
    config = parse((model_dir / "config.pbtxt").read_text())
    assert config.backend == "onnxruntime"
    assert config.parameters["precision"].string_value == "fp32"
    assert not (model_dir / "1" / "model.py").exists()
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    assert accelerator.parameters["precision_mode"] == "FP32"
    assert accelerator.parameters["trt_engine_cache_enable"] == "1"
    assert accelerator.parameters["trt_timing_cache_enable"] == "1"
    assert accelerator.parameters["trt_engine_cache_path"] == f"{TENSORRT_CACHE}/depth_anything_v2_small_fp32"
    keys = ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")
    written = [accelerator.parameters[key].split(",") for key in keys]
    assert all(shape.startswith("image:") for shapes in written for shape in shapes)
    assert [len(shapes) for shapes in written] == [6, 6, 6]  # three network sizes, two orientations each
    assert contrib_nodes(model_dir / "1" / "model.onnx") == 0  # TensorRT parses only standard ops
    assert report["fused_attention"] == {"nodes": 0, "layers": 4}


@pytest.mark.parametrize("model_id", TINY_MODELS)
def test_the_default_export_fuses_every_layers_attention(repository: Path, model_id: str) -> None:
    model_dir = repository / get_spec(model_id).triton_name
    assert attention_nodes(model_dir / "1" / "model.onnx") == 4  # the tiny models have 4 layers
    report = json.loads((model_dir / "export_report.json").read_text())
    assert report["fused_attention"] == {"nodes": 4, "layers": 4}


def test_the_fp16_graph_is_the_same_where_onnxruntime_has_cuda(
    tmp_path: Path, checkpoints: dict[str, Path], repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exported FP16 graph must not depend on the exporting machine: where onnxruntime reports CUDA,
    its optimizer would first run an onnxruntime pass (on an H200 that folded a cast into an FP32 weight;
    on the CPU provider it breaks the attention fusion). The same nodes and weights as without CUDA."""
    available = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *available])
    argv = [
        RELATIVE_ID,
        "--checkpoint",
        str(checkpoints[RELATIVE_ID]),
        "--repository",
        str(tmp_path),
        "--backend",
        "python",
    ]
    assert export_main(argv) == 0
    name = get_spec(RELATIVE_ID).triton_name
    with_cuda, without = (onnx.load(str(root / name / "1" / "model.onnx")).graph for root in (tmp_path, repository))
    assert [(n.op_type, n.domain) for n in with_cuda.node] == [(n.op_type, n.domain) for n in without.node]
    assert [(t.name, t.data_type, t.raw_data) for t in with_cuda.initializer] == [
        (t.name, t.data_type, t.raw_data) for t in without.initializer
    ]


def test_committed_configs_match_the_generator(tmp_path: Path) -> None:
    assert export_main(["all", "--repository", str(tmp_path), "--config-only"]) == 0
    committed = ROOT / "model_repository"
    names = sorted(spec.triton_name for spec in MODELS.values())
    assert sorted(p.name for p in committed.iterdir() if p.is_dir()) == names
    for name in names:
        generated = (tmp_path / name / "config.pbtxt").read_text()
        assert (committed / name / "config.pbtxt").read_text() == generated, f"{name}: config drifted; regenerate"
        assert parse(generated).backend == "onnxruntime"


def assert_clean_failure(result: subprocess.CompletedProcess, *phrases: str) -> None:
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0]


def test_unknown_model_fails_cleanly(tmp_path: Path) -> None:
    assert_clean_failure(run_cli("depth-anything/nope", "--repository", str(tmp_path)), "unknown model", "nope")
    assert list(tmp_path.iterdir()) == []


def test_missing_checkpoint_fails_cleanly(tmp_path: Path) -> None:
    result = run_cli(RELATIVE_ID, "--checkpoint", str(tmp_path / "absent"), "--repository", str(tmp_path / "repo"))
    assert_clean_failure(result, "does not exist")


def test_checkpoint_of_another_architecture_fails_cleanly(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    repo = tmp_path / "repo"
    result = run_cli(RELATIVE_ID, "--checkpoint", str(checkpoints[DPT_ID]), "--repository", str(repo))
    assert_clean_failure(result, "'dpt'", "'depth_anything'")
    assert list(repo.iterdir()) == []
    result = run_cli(METRIC_ID, "--checkpoint", str(checkpoints[RELATIVE_ID]), "--repository", str(repo))
    assert_clean_failure(result, "relative", "metric")


def test_unwritable_repository_fails_cleanly(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run_cli(RELATIVE_ID, "--checkpoint", str(checkpoints[RELATIVE_ID]), "--repository", str(blocker / "repo"))
    assert_clean_failure(result, "not writable")


def test_checkpoint_with_several_models_is_refused(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    result = run_cli("all", "--checkpoint", str(checkpoints[RELATIVE_ID]), "--repository", str(tmp_path))
    assert_clean_failure(result, "exactly one MODEL")


def test_failed_parity_leaves_the_previous_model_in_place(
    tmp_path: Path, checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    argv = [DPT_ID, "--checkpoint", str(checkpoints[DPT_ID]), "--repository", str(tmp_path)]
    assert export_main(argv) == 0
    steps = [line.split(": ", 1)[1] for line in capsys.readouterr().out.splitlines()]  # where people wait
    layers = json.loads((checkpoints[DPT_ID] / "config.json").read_text())["num_hidden_layers"]
    assert steps[:4] == [f"loading {checkpoints[DPT_ID]}", "exporting ONNX (fp16)", f"fusing the attention of {layers} "
                         "layers", "checking parity with the PyTorch model at every bucket family"]  # fmt: skip
    model_dir = tmp_path / "dpt_large"
    before = {p.relative_to(tmp_path): p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}

    other = save_random_checkpoint(DPT_ID, tmp_path.parent / "other-dpt", seed=7)
    monkeypatch.setitem(parity.THRESHOLDS, "fp16", 1e-9)
    assert export_main([DPT_ID, "--checkpoint", str(other), "--repository", str(tmp_path)]) == 2
    assert "parity check failed at 384x384" in capsys.readouterr().err

    after = {p.relative_to(tmp_path): p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dpt_large"]  # no staging left behind


@pytest.mark.slow
def test_real_size_small_architecture(tmp_path: Path) -> None:
    checkpoint = save_random_checkpoint(RELATIVE_ID, tmp_path / "small", size="full")
    repo = tmp_path / "repo"
    assert export_main([RELATIVE_ID, "--checkpoint", str(checkpoint), "--repository", str(repo)]) == 0
    report = json.loads((repo / "depth_anything_v2_small" / "export_report.json").read_text())
    assert abs(report["parameters"] - 24.8e6) < 0.1e6
    assert 45e6 < report["onnx_bytes"] < 55e6
    assert all(shape["relative_l2"] < 5e-3 for shape in report["parity"]["shapes"])
    assert report["fused_attention"] == {"nodes": 12, "layers": 12}  # the released Small's 12 layers

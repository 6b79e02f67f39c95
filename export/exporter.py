"""Export one checkpoint into a Triton model repository, atomically.

``export_model`` loads the checkpoint (hub id or local HF directory) through ``from_pretrained``, traces
it to ONNX at the requested precision with fused attention (``fusion``; the plain graph for
``--tensorrt``), checks parity against PyTorch FP32, and only then moves
``<name>/config.pbtxt``, ``<name>/1/model.onnx`` (+ ``model.py`` for the Python backend) and
``<name>/export_report.json`` into the repository. Any failure leaves the repository as it was.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import onnxruntime
import torch
import transformers
from transformers import AutoConfig, PreTrainedModel

from catalogue.models import ModelSpec, Precision
from export import fusion
from export.graph import ServingGraph, expected_model_class
from export.onnx_export import OPSET, export_onnx
from export.parity import THRESHOLDS, check_parity
from export.triton_config import GPU_GB, Backend, build_config, render

PYTHON_MODEL_TEMPLATE = Path(__file__).with_name("triton_python_model.py")


class ExportError(Exception):
    """A failure the user can act on; its message is one line naming the problem."""


@dataclass(frozen=True)
class ExportOptions:
    precision: Precision = "fp16"
    backend: Backend = "onnxruntime"
    tensorrt: bool = False
    gpu_memory_gb: float = GPU_GB


def load_checkpoint(spec: ModelSpec, checkpoint: Path | None) -> PreTrainedModel:
    """Load ``spec``'s weights in FP32 from ``checkpoint`` (a local HF directory) or from the hub."""
    source = str(checkpoint) if checkpoint is not None else spec.hf_id
    if checkpoint is not None:
        if not checkpoint.is_dir():
            raise ExportError(f"checkpoint directory {checkpoint} does not exist")
        if not (checkpoint / "config.json").is_file():
            raise ExportError(f"checkpoint directory {checkpoint} has no config.json (not a Hugging Face checkpoint)")
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        hint = "" if checkpoint is not None else "; without hub access pass --checkpoint DIR"
        raise ExportError(f"could not load the config of {source}: {_first_line(error)}{hint}") from None
    _check_architecture(spec, config, source)
    model_class = expected_model_class(spec)
    try:
        model = model_class.from_pretrained(source, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as error:
        raise ExportError(f"could not load the weights of {source}: {_first_line(error)}") from None
    return model.eval()


def _check_architecture(spec: ModelSpec, config: transformers.PretrainedConfig, source: str) -> None:
    expected_type = "depth_anything" if spec.architecture == "depth_anything" else "dpt"
    if config.model_type != expected_type:
        raise ExportError(
            f"{source} holds a {config.model_type!r} model, but {spec.hf_id} needs a {expected_type!r} checkpoint"
        )
    if spec.architecture == "depth_anything":
        kind = getattr(config, "depth_estimation_type", "relative")
        if (kind == "metric") != spec.metric:
            raise ExportError(f"{source} is a {kind} depth model, but {spec.hf_id} is {_kind(spec)}")
        if spec.metric and float(config.max_depth) != spec.max_depth:
            raise ExportError(f"{source} has max_depth {config.max_depth}, but {spec.hf_id} needs {spec.max_depth}")


def _kind(spec: ModelSpec) -> str:
    return "metric" if spec.metric else "relative"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def ensure_writable(repository: Path) -> None:
    """Create ``repository`` if needed and prove we can write in it, or raise ExportError."""
    try:
        repository.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=repository, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ExportError(f"model repository {repository} is not writable: {error.strerror or error}") from None


def write_config(spec: ModelSpec, model_dir: Path, options: ExportOptions) -> None:
    """Write ``config.pbtxt`` (and ``1/model.py`` for the Python backend) into ``model_dir``."""
    config = build_config(spec, options.precision, options.backend, options.tensorrt, options.gpu_memory_gb)
    _atomic_write(model_dir / "config.pbtxt", render(config))
    if options.backend == "python":
        _atomic_write(model_dir / "1" / "model.py", PYTHON_MODEL_TEMPLATE.read_text())


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def export_model(
    spec: ModelSpec,
    repository: Path,
    options: ExportOptions,
    checkpoint: Path | None = None,
    say: Callable[[str], None] = lambda _step: None,
) -> dict:
    """Export ``spec`` into ``repository``; returns the export report (also written as JSON). ``say``
    hears each step as it starts (the command line prints them: an export takes a minute or more)."""
    started = time.perf_counter()
    ensure_writable(repository)
    say(f"loading {checkpoint or spec.hf_id}")
    reference = ServingGraph(load_checkpoint(spec, checkpoint), spec)
    served = copy.deepcopy(reference.model)
    fused = not options.tensorrt  # TensorRT parses only standard ONNX ops, and fuses attention itself
    if fused:
        fusion.prepare(served, spec)
    if options.precision == "fp16":
        served.half()
    name = spec.served_name(options.precision)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.staging-", dir=repository))
    staging.chmod(0o755)  # mkdtemp makes it 0700: Triton running as another user (triton-server) must read it
    try:
        onnx_path = staging / "1" / "model.onnx"
        onnx_path.parent.mkdir()
        say(f"exporting ONNX ({options.precision})")
        export_onnx(ServingGraph(served, spec), spec, onnx_path)
        layers = len(fusion.encoder(served, spec)[0])
        if fused:
            say(f"fusing the attention of {layers} layers")
        attention = fusion.fuse(onnx_path, served, spec, options.precision) if fused else 0
        if fused and attention != layers:
            raise ExportError(f"{spec.hf_id}: attention fusion matched {attention} of {layers} layers")
        _check_initializer_types(onnx_path, options.precision)
        say("checking parity with the PyTorch model at every bucket family")
        parity = check_parity(str(onnx_path), reference, spec)
        _check_parity_results(spec, options.precision, parity)
        report = {
            "model_id": spec.hf_id,
            "triton_name": name,
            "checkpoint": str(checkpoint) if checkpoint is not None else spec.hf_id,
            "precision": options.precision,
            "backend": options.backend,
            "tensorrt": options.tensorrt,
            "opset": OPSET,
            "fused_attention": {"nodes": attention, "layers": layers},
            "parameters": sum(p.numel() for p in reference.model.parameters()),
            "onnx_bytes": onnx_path.stat().st_size,
            "parity": _parity_report(options.precision, parity),
            "versions": VERSIONS,
        }
        report["elapsed_sec"] = round(time.perf_counter() - started, 2)
        write_config(spec, staging, options)
        (staging / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
        _move_into_place(staging, repository / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


VERSIONS = {
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "onnx": onnx.__version__,
    "onnxruntime": onnxruntime.__version__,
}


def _parity_report(precision: Precision, parity: list) -> dict:
    return {
        "reference": "PyTorch FP32, same checkpoint, CPU",
        "metric": "relative L2 over the batch",
        "threshold": THRESHOLDS[precision],
        "shapes": [asdict(result) | {"size": result.label} for result in parity],  # label: width x height
    }


def _check_parity_results(spec: ModelSpec, precision: Precision, parity: list) -> None:
    """ExportError unless every shape's output is finite and within the precision's threshold."""
    threshold = THRESHOLDS[precision]
    for result in parity:
        if not result.finite:
            raise ExportError(f"{spec.hf_id}: the exported model returned NaN or inf at {result.label}")
        if result.relative_l2 > threshold:
            raise ExportError(
                f"{spec.hf_id}: parity check failed at {result.label}: relative L2 error "
                f"{result.relative_l2:.2e} is above the {precision} threshold {threshold:.0e}"
            )


def _check_initializer_types(onnx_path: Path, precision: Precision) -> None:
    """FP16 exports must store their weights in FP16 (only the tiny mean/std stay FP32)."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    weights = [t for t in model.graph.initializer if t.data_type in float_types and math.prod(t.dims) >= 256]
    wanted = onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.FLOAT
    wrong = [t.name for t in weights if t.data_type != wanted]
    if wrong:
        raise ExportError(f"{len(wrong)} weight tensors are not {precision} (first: {wrong[0]})")


def _move_into_place(staging: Path, target: Path) -> None:
    """Replace ``target`` by ``staging`` with two renames, so readers never see a half-written model."""
    previous = None
    if target.exists():
        previous = target.with_name(f".{target.name}.previous-{os.getpid()}")
        os.rename(target, previous)
    os.rename(staging, target)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)

"""``python -m export MODEL [MODEL ...] --repository DIR``: checkpoints to a Triton model repository.

Exit status 0 when every model exported; 2 with a one-line ``error:`` message otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import transformers

from catalogue.models import MODELS, UnknownModelError, get_spec
from export.exporter import ExportError, ExportOptions, export_model, write_config
from export.triton_config import GPU_GB


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export Depth-Anything-V2 / DPT checkpoints to ONNX models in a Triton model repository.",
    )
    parser.add_argument("models", nargs="+", metavar="MODEL", help=f"'all' or any of: {', '.join(MODELS)}")
    parser.add_argument("--repository", type=Path, required=True, help="Triton model repository to write into")
    parser.add_argument("--checkpoint", type=Path, help="local Hugging Face checkpoint directory (one model only)")
    parser.add_argument("--precision", choices=["fp16", "fp32"], default="fp16")
    parser.add_argument("--backend", choices=["onnxruntime", "python"], default="onnxruntime")
    parser.add_argument("--tensorrt", action="store_true", help="add the TensorRT accelerator (onnxruntime backend)")
    sized = "GPU memory the configs' ONNX Runtime limits are sized for (default: the hub's smallest)"
    parser.add_argument("--gpu-memory-gb", type=float, default=GPU_GB, help=sized)
    parser.add_argument("--config-only", action="store_true", help="write only config.pbtxt (and model.py), no weights")
    return parser.parse_args(argv)


def resolve_models(names: list[str]) -> list[str]:
    """Expand 'all' and validate every id (raises UnknownModelError)."""
    ids = list(MODELS) if "all" in names else names
    for model_id in ids:
        get_spec(model_id)
    return list(dict.fromkeys(ids))


def run(args: argparse.Namespace) -> None:
    model_ids = resolve_models(args.models)
    if args.checkpoint is not None and len(model_ids) != 1:
        raise ExportError("--checkpoint takes exactly one MODEL")
    if args.tensorrt and args.backend != "onnxruntime":
        raise ExportError("--tensorrt applies to the onnxruntime backend only")
    if args.gpu_memory_gb <= 0:
        raise ExportError("--gpu-memory-gb must be positive")
    options = ExportOptions(args.precision, args.backend, args.tensorrt, args.gpu_memory_gb)
    for model_id in model_ids:
        spec = get_spec(model_id)
        target = args.repository / spec.served_name(options.precision)
        if args.config_only:
            write_config(spec, target, options)
            print(f"{spec.served_name(options.precision)}: wrote {target / 'config.pbtxt'}")
            continue
        name = spec.served_name(options.precision)

        def say(step: str, name: str = name) -> None:
            print(f"{name}: {step}", flush=True)

        report = export_model(spec, args.repository, options, args.checkpoint, say)
        errors = ", ".join(f"{row['size']} {row['relative_l2']:.2e}" for row in report["parity"]["shapes"])
        print(
            f"{report['triton_name']}: {options.precision} {options.backend}, "
            f"{report['parameters'] / 1e6:.1f}M params, {report['onnx_bytes'] / 1e6:.1f} MB, "
            f"parity rel-L2 {errors} (threshold {report['parity']['threshold']:.0e}), "
            f"{report['elapsed_sec']:.1f} s -> {target}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    transformers.logging.disable_progress_bar()
    try:
        run(args)
    except (ExportError, UnknownModelError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0

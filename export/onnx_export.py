"""Trace a ``ServingGraph`` to ONNX with dynamic batch (and, for Depth-Anything, dynamic H and W)."""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch

from catalogue.models import ModelSpec
from catalogue.size import Size
from export.graph import ServingGraph

OPSET = 17

# Traced at a shape whose patch grid is odd in both directions (37 x 49): there the neck's fusion layers
# must resize their residual, so the traced graph keeps that resize and stays right at every other shape.
DEPTH_ANYTHING_TRACE_SIZE = Size(686, 518)


def trace_size(spec: ModelSpec) -> Size:
    return DEPTH_ANYTHING_TRACE_SIZE if spec.dynamic_shape else spec.buckets[0]


def export_onnx(graph: ServingGraph, spec: ModelSpec, path: Path) -> None:
    """Write ``graph`` as ``image: uint8 [N, H, W, 3]`` -> ``depth: float32 [N, H, W]`` to ``path``."""
    height, width = trace_size(spec).shape
    dummy = torch.randint(0, 256, (1, height, width, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    axes = {0: "batch", 1: "height", 2: "width"} if spec.dynamic_shape else {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python values; the shape tests cover them
        torch.onnx.export(
            graph,
            (dummy,),
            str(path),
            input_names=["image"],
            output_names=["depth"],
            dynamic_axes={"image": axes, "depth": axes},
            opset_version=OPSET,
            dynamo=False,
        )
    onnx.checker.check_model(str(path))

"""Export-time parity: onnxruntime on the exported graph against PyTorch FP32 on the same checkpoint.

Both run on a batch of real photos (the ones scikit-image ships) resized to each checked shape. The error
is the relative L2 norm ``||onnx - torch|| / ||torch||`` over the whole batch. Depth-Anything is checked
at two shapes, neither of them the traced one (one with an even patch grid, one with an odd one), so a
graph that froze the traced shape fails here, and at one shape of each larger network size
(``process_res`` 770 and 1036); DPT has one fixed shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import onnxruntime as ort
import torch
from skimage import data

from catalogue.models import ModelSpec, Precision
from catalogue.size import Size
from export.graph import ServingGraph

# FP16 lands near 1e-3 to 5e-3 on the released weights; FP32 differs only by kernel rounding.
THRESHOLDS: dict[Precision, float] = {"fp16": 1e-2, "fp32": 1e-4}
DEPTH_ANYTHING_PARITY_SIZES = (Size(518, 518), Size(924, 518))


@dataclass(frozen=True)
class ShapeParity:
    height: int
    width: int
    batch: int
    relative_l2: float
    max_abs_error: float
    finite: bool

    @property
    def label(self) -> str:
        return f"{self.width}x{self.height}"


def sample_photos() -> list[np.ndarray]:
    """Real RGB photos shipped with scikit-image (astronaut, coffee, cat)."""
    return [data.astronaut(), data.coffee(), data.chelsea()]


def parity_shapes(spec: ModelSpec) -> tuple[tuple[Size, int], ...]:
    """(size, batch) to check: two shapes of the default family with all three photos, then
    the 4:3 landscape bucket of each larger family with one photo (a larger family costs 2-4x the
    compute, and its graph is the same one: what differs is the size the tracing must not have frozen)."""
    if not spec.dynamic_shape:
        return tuple((bucket, 3) for bucket in spec.buckets)
    larger = tuple((buckets[1], 1) for _res, buckets in spec.families[1:])
    return tuple((size, 3) for size in DEPTH_ANYTHING_PARITY_SIZES) + larger


def photo_batch(size: Size, count: int = 3) -> np.ndarray:
    """The first ``count`` sample photos resized to ``size``, as ``uint8 [N, H, W, 3]``."""
    photos = sample_photos()[:count]
    return np.stack([cv2.resize(photo, size, interpolation=cv2.INTER_AREA) for photo in photos])


def relative_l2(actual: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(actual - reference) / max(np.linalg.norm(reference), 1e-12))


def check_parity(onnx_path: str, reference: ServingGraph, spec: ModelSpec) -> list[ShapeParity]:
    """Run the exported model and the FP32 reference at each parity shape; one result per shape."""
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    results = []
    for size, count in parity_shapes(spec):
        images = photo_batch(size, count)
        exported = session.run(["depth"], {"image": images})[0]
        with torch.no_grad():
            expected = reference(torch.from_numpy(images)).numpy()
        finite = bool(np.isfinite(exported).all())
        error = relative_l2(exported, expected) if finite else float("inf")
        max_abs = float(np.abs(exported - expected).max()) if finite else float("inf")
        results.append(ShapeParity(size.height, size.width, len(images), error, max_abs, finite))
    return results

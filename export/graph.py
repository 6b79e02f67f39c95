"""The exported graph: a torch module that takes ``uint8 [N, H, W, 3]`` RGB and returns depth ``[N, H, W]``.

Scaling to [0, 1], the checkpoint's mean/std and NHWC->NCHW run inside the graph (in FP32), then the
network runs at the model's own precision and the depth comes out as FP32.

Depth-Anything's head ends with ``interpolate(size=(int(patch_h * 14), int(patch_w * 14)))``; under
tracing the ``int()`` freezes the output size at the dummy input's. ``ServingGraph`` therefore runs the
backbone, neck and head layers itself and takes the final size from the input tensor, so the traced
graph follows the input's shape.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DepthAnythingForDepthEstimation, DPTForDepthEstimation, PreTrainedModel

from catalogue.models import ModelSpec


class ServingGraph(nn.Module):
    """Wraps a loaded checkpoint with the serving contract (uint8 NHWC in, FP32 depth out)."""

    def __init__(self, model: PreTrainedModel, spec: ModelSpec) -> None:
        super().__init__()
        self.model = model.eval()
        self.architecture = spec.architecture
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0, persistent=False)

    @property
    def compute_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        pixels = image.permute(0, 3, 1, 2).to(torch.float32)
        pixels = ((pixels - self.mean) / self.std).to(self.compute_dtype)
        if self.architecture == "depth_anything":
            depth = self._depth_anything(pixels)
        else:
            depth = self.model(pixel_values=pixels).predicted_depth
        return depth.to(torch.float32)

    def _depth_anything(self, pixels: torch.Tensor) -> torch.Tensor:
        model: DepthAnythingForDepthEstimation = self.model
        height, width = pixels.shape[-2:]
        patch = model.config.patch_size
        features = model.backbone.forward_with_filtered_kwargs(pixels).feature_maps
        hidden = model.neck(features, height // patch, width // patch)
        head = model.head
        depth = head.conv1(hidden[head.head_in_index])
        depth = nn.functional.interpolate(depth, size=(height, width), mode="bilinear", align_corners=True)
        depth = head.conv3(head.activation1(head.conv2(depth)))
        return (head.activation2(depth) * head.max_depth).squeeze(1)


def expected_model_class(spec: ModelSpec) -> type[PreTrainedModel]:
    """The transformers class the released checkpoint of ``spec`` loads into."""
    return DepthAnythingForDepthEstimation if spec.architecture == "depth_anything" else DPTForDepthEstimation

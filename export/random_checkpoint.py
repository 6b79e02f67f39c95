"""Random-weight checkpoints with the released architectures, saved in Hugging Face format.

Model weights cannot be downloaded everywhere (tests, CI, air-gapped machines), yet the exporter and the
gateway must run through the real ``from_pretrained`` path. This writes a checkpoint directory (config,
safetensors, image processor) built from the same transformers classes as the released ones, either at
full size (same compute, for benchmarks) or tiny (for tests).

Weights are re-drawn at unit gain (normal / sqrt(fan_in)): transformers' own init (std 0.02) makes these
deep stacks output about 1e-7, which FP16 flushes to zero, so parity checks on it would prove nothing.
The head's last convolution is then rescaled on a calibration batch so that the output is O(1), mostly
above zero (relative: ReLU) or spread over (0, max_depth) (metric: sigmoid), and depends on the image.

    python -m export.random_checkpoint depth-anything/Depth-Anything-V2-Small-hf --out ckpt/ [--size tiny]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    DepthAnythingConfig,
    DepthAnythingForDepthEstimation,
    Dinov2Config,
    DPTConfig,
    DPTForDepthEstimation,
    DPTImageProcessorPil,
    PreTrainedModel,
)

from catalogue.models import MODELS, ModelSpec, get_spec

Size = Literal["full", "tiny"]

# Dinov2 backbone sizes of the released DA-V2 checkpoints: hidden, layers, heads, out indices, neck, fusion.
_DA_FULL = {
    "small": (384, 12, 6, [3, 6, 9, 12], [48, 96, 192, 384], 64),
    "base": (768, 12, 12, [3, 6, 9, 12], [96, 192, 384, 768], 128),
    "large": (1024, 24, 16, [5, 12, 18, 24], [256, 512, 1024, 1024], 256),
}
_DA_TINY = (32, 4, 2, [1, 2, 3, 4], [8, 16, 32, 32], 16)


def build_config(spec: ModelSpec, size: Size) -> DepthAnythingConfig | DPTConfig:
    """A transformers config shaped like the released checkpoint of ``spec`` (or a tiny twin)."""
    if spec.architecture == "dpt":
        if size == "full":
            return DPTConfig()  # transformers' defaults are dpt-large's
        return DPTConfig(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=64,
            backbone_out_indices=[0, 1, 2, 3],
            neck_hidden_sizes=[8, 16, 32, 32],
            fusion_hidden_size=16,
            head_in_index=-1,
        )
    variant = "small" if "Small" in spec.hf_id else "base" if "Base" in spec.hf_id else "large"
    hidden, layers, heads, out_indices, neck, fusion = _DA_FULL[variant] if size == "full" else _DA_TINY
    backbone = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=518,
        patch_size=14,
        out_indices=out_indices,
        reshape_hidden_states=False,
        layerscale_value=1.0,
    )
    return DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=hidden,
        neck_hidden_sizes=neck,
        fusion_hidden_size=fusion,
        head_hidden_size=32 if size == "full" else 8,
        depth_estimation_type="metric" if spec.metric else "relative",
        max_depth=int(spec.max_depth or 1),
    )


def image_processor(spec: ModelSpec) -> DPTImageProcessorPil:
    """The image processor the released checkpoint ships (both families use DPTImageProcessor)."""
    if spec.architecture == "dpt":
        return DPTImageProcessorPil(
            size={"height": 384, "width": 384},
            keep_aspect_ratio=False,
            resample=2,
            image_mean=list(spec.mean),
            image_std=list(spec.std),
        )
    return DPTImageProcessorPil(
        size={"height": 518, "width": 518},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        resample=3,
        image_mean=list(spec.mean),
        image_std=list(spec.std),
    )


@torch.no_grad()
def redraw_unit_gain(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every weight matrix and kernel at std 1/sqrt(fan_in); embeddings at std 1."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.ndim < 2:
            continue
        if "position_embeddings" in name or "cls_token" in name or "mask_token" in name:
            std = 1.0
        else:
            std = 1.0 / math.sqrt(param[0].numel())
        param.copy_(torch.randn(param.shape, generator=generator) * std)


@torch.no_grad()
def calibrate_head(model: PreTrainedModel, spec: ModelSpec, seed: int) -> None:
    """Rescale the head's last convolution so its pre-activation has a useful mean and spread."""
    last_conv = [m for m in model.head.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    height, width = spec.buckets[0].shape
    generator = torch.Generator().manual_seed(seed + 1)
    smooth = torch.randn(2, 3, height // 16, width // 16, generator=generator)
    pixels = torch.nn.functional.interpolate(smooth, size=(height, width), mode="bicubic")
    captured: list[torch.Tensor] = []
    hook = last_conv.register_forward_hook(lambda _m, _i, out: captured.append(out))
    model(pixel_values=pixels)
    hook.remove()
    target_mean, target_std = (0.0, 1.5) if spec.metric else (1.0, 0.3)
    scale = target_std / float(captured[0].std())
    last_conv.weight.mul_(scale)
    last_conv.bias.mul_(scale).add_(target_mean - float(captured[0].mean()) * scale)


def build_model(spec: ModelSpec, size: Size, seed: int = 0) -> PreTrainedModel:
    """A random-weight model of ``spec``'s architecture, unit-gain initialised and head-calibrated."""
    config = build_config(spec, size)
    model_class = DPTForDepthEstimation if spec.architecture == "dpt" else DepthAnythingForDepthEstimation
    model = model_class(config).eval()
    redraw_unit_gain(model, seed)
    calibrate_head(model, spec, seed)
    return model


def save_random_checkpoint(model_id: str, out: Path, size: Size = "tiny", seed: int = 0) -> Path:
    """Write a random checkpoint of ``model_id``'s architecture to ``out`` in Hugging Face format."""
    spec = get_spec(model_id)
    out.mkdir(parents=True, exist_ok=True)
    build_model(spec, size, seed).save_pretrained(out)
    image_processor(spec).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=list(MODELS), help="whose architecture to build")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = save_random_checkpoint(args.model, args.out, args.size, args.seed)
    print(f"wrote random {args.size} checkpoint of {args.model} to {path}")


if __name__ == "__main__":
    main()

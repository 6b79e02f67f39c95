"""Fused attention for ONNX Runtime: every transformer layer's attention becomes one ``com.microsoft.Attention``
node (flash attention on Ampere/Hopper with the CUDA provider) instead of MatMul-Softmax-MatMul.

onnxruntime's transformer optimizer (CLIP fusion, ``model_type="clip"``) matches the layers once two things
change before tracing, both exact: Dinov2's LayerScale is folded into the linear layer before it
(``o_proj`` / ``fc2`` weight and bias times lambda), and each residual add is written ``residual + branch``
(transformers writes ``branch + residual``), with eager attention. DPT's ViT layers need only the second.
``fuse`` then rewrites the exported file and returns how many attention nodes it made; the exporter
requires one per layer. TensorRT cannot parse ``com.microsoft`` ops and fuses attention itself, so
``--tensorrt`` exports the plain graph.
"""

from __future__ import annotations

import types
from pathlib import Path

import onnx
import torch
from onnxruntime.transformers.optimizer import optimize_model
from transformers import PretrainedConfig, PreTrainedModel

from catalogue.models import ModelSpec, Precision


def _dinov2_layer(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
    residual = hidden_states
    branch, _ = self.attention(self.norm1(hidden_states), attention_mask=attention_mask, **kwargs)
    hidden_states = residual + branch  # LayerScale folded into o_proj
    return hidden_states + self.mlp(self.norm2(hidden_states))  # and into fc2


def _vit_layer(self, hidden_states: torch.Tensor, **kwargs):
    hidden_states = hidden_states + self.attention(self.layernorm_before(hidden_states), **kwargs)
    return hidden_states + self.output.dense(self.intermediate(self.layernorm_after(hidden_states)))


def encoder(model: PreTrainedModel, spec: ModelSpec):
    """(the transformer's layers, its config)."""
    if spec.architecture == "depth_anything":
        return model.backbone.encoder.layer, model.config.backbone_config
    return model.dpt.encoder.layer, model.config


@torch.no_grad()
def prepare(model: PreTrainedModel, spec: ModelSpec) -> None:
    """Rewrite ``model`` in place, with the same outputs, into the form the fusion matches."""
    for module in model.modules():
        if isinstance(getattr(module, "config", None), PretrainedConfig):
            module.config._attn_implementation = "eager"
    layers, _config = encoder(model, spec)
    for layer in layers:
        if spec.architecture == "depth_anything":
            scale_attention, scale_mlp = layer.layer_scale1.lambda1, layer.layer_scale2.lambda1
            layer.attention.o_proj.weight.mul_(scale_attention[:, None])
            layer.attention.o_proj.bias.mul_(scale_attention)
            layer.mlp.fc2.weight.mul_(scale_mlp[:, None])
            layer.mlp.fc2.bias.mul_(scale_mlp)
            layer.forward = types.MethodType(_dinov2_layer, layer)
        else:
            layer.forward = types.MethodType(_vit_layer, layer)


def fuse(path: Path, model: PreTrainedModel, spec: ModelSpec, precision: Precision) -> int:
    """Fuse the attention of the ONNX file at ``path`` in place; returns the number of Attention nodes."""
    _layers, config = encoder(model, spec)
    optimized = optimize_model(
        str(path),
        model_type="clip",
        num_heads=config.num_attention_heads,
        hidden_size=config.hidden_size,
        use_gpu=precision == "fp16",  # the FP16 graph is for GPUs; the CPU provider still runs it
        # No onnxruntime pre-pass for FP16: it runs only where onnxruntime has CUDA, and there it folds the
        # position embeddings' cast into an FP32 copy (seen on an H200). Without it the graph is the same on
        # every machine, which is what the tests check on the CPU.
        opt_level=0 if precision == "fp16" else None,
    )
    optimized.save_model_to_file(str(path))
    return attention_nodes(path)


def attention_nodes(path: Path) -> int:
    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(node.op_type == "Attention" and node.domain == "com.microsoft" for node in graph.node)


def contrib_nodes(path: Path) -> int:
    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(node.domain == "com.microsoft" for node in graph.node)

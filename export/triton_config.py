"""Build a model's Triton ``config.pbtxt`` from its spec, with the protobuf classes tritonclient ships.

The config carries the model's metadata as ``parameters`` (see ``METADATA_KEYS``) so that a client can
discover everything it needs (HF id, relative or metric, max depth, precision, shape buckets per network
size, licence) from Triton's model-config endpoint instead of a second hard-coded table.
"""

from __future__ import annotations

import json
from typing import Literal

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from catalogue.models import ModelSpec, Precision

Backend = Literal["onnxruntime", "python"]

METADATA_KEYS = (
    "hf_id",
    "architecture",
    "kind",
    "max_depth",
    "precision",
    "buckets",
    "bucket_families",
    "resample",
    "license",
)
MAX_QUEUE_DELAY_US = 2000
QUEUED_BATCHES = 8  # Triton's queue holds this many full batches, then rejects (the gateway retries with backoff)
QUEUE_TIMEOUT_US = 60_000_000  # a request that waited this long is rejected; requests may ask for less
TENSORRT_WORKSPACE_BYTES = 4 << 30
TENSORRT_CACHE = "/cache/tensorrt"  # mount a volume here so that engines survive restarts


def tensorrt_profiles(spec: ModelSpec) -> dict[str, str]:
    """One explicit TensorRT profile spanning every bucket of every network size, batch 1 to the maximum,
    tuned for a full batch of the default family's 4:3 bucket: no engine is rebuilt for a new shape."""
    heights = [height for height, _width in spec.all_buckets]
    widths = [width for _height, width in spec.all_buckets]
    opt_height, opt_width = spec.buckets[1] if len(spec.buckets) > 1 else spec.buckets[0]

    def shape(batch: int, height: int, width: int) -> str:
        return f"image:{batch}x{height}x{width}x3"

    return {
        "trt_profile_min_shapes": shape(1, min(heights), min(widths)),
        "trt_profile_opt_shapes": shape(spec.max_batch_size, opt_height, opt_width),
        "trt_profile_max_shapes": shape(spec.max_batch_size, max(heights), max(widths)),
    }


def warmup_shapes(spec: ModelSpec) -> list[tuple[int, int]]:
    """Every bucket of the default family, and the square one of each other family.

    Warming all 21 Depth-Anything shapes of a real-size model on a CPU would add about a minute to every
    start; the first request at another shape of a larger family pays its one-time cost instead.
    """
    return [*spec.buckets, *(buckets[0] for _size, buckets in spec.families[1:])]


def queue_policy(max_batch_size: int) -> mc.ModelQueuePolicy:
    """A bounded queue: ``QUEUED_BATCHES`` full batches at most, and no request kept past its own timeout
    (the gateway sends the rest of its deadline) or ``QUEUE_TIMEOUT_US``; Triton rejects the rest at once
    instead of queueing without end."""
    return mc.ModelQueuePolicy(
        timeout_action=mc.ModelQueuePolicy.REJECT,
        default_timeout_microseconds=QUEUE_TIMEOUT_US,
        allow_timeout_override=True,
        max_queue_size=QUEUED_BATCHES * max_batch_size,
    )


def build_config(spec: ModelSpec, precision: Precision, backend: Backend, tensorrt: bool = False) -> mc.ModelConfig:
    """The full ModelConfig message for one exported model."""
    if tensorrt and backend != "onnxruntime":
        raise ValueError("--tensorrt applies to the onnxruntime backend only")
    name = spec.served_name(precision)
    image_dims = [-1, -1, 3] if spec.dynamic_shape else [*spec.buckets[0], 3]
    config = mc.ModelConfig(
        name=name,
        backend=backend,
        max_batch_size=spec.max_batch_size,
        input=[mc.ModelInput(name="image", data_type=mc.TYPE_UINT8, dims=image_dims)],
        output=[mc.ModelOutput(name="depth", data_type=mc.TYPE_FP32, dims=image_dims[:2])],
        instance_group=[mc.ModelInstanceGroup(count=1, kind=mc.ModelInstanceGroup.KIND_AUTO)],
        dynamic_batching=mc.ModelDynamicBatching(
            max_queue_delay_microseconds=MAX_QUEUE_DELAY_US, default_queue_policy=queue_policy(spec.max_batch_size)
        ),
        model_warmup=[
            mc.ModelWarmup(
                name=f"bucket_{height}x{width}",
                batch_size=1,
                inputs={
                    "image": mc.ModelWarmup.Input(data_type=mc.TYPE_UINT8, dims=[height, width, 3], zero_data=True)
                },
            )
            for height, width in warmup_shapes(spec)
        ],
    )
    metadata = {
        "hf_id": spec.hf_id,
        "architecture": spec.architecture,
        "kind": "metric" if spec.metric else "relative",
        "max_depth": "" if spec.max_depth is None else str(spec.max_depth),
        "precision": precision,
        "buckets": json.dumps([list(bucket) for bucket in spec.buckets]),  # the default family
        "bucket_families": json.dumps({str(size): [list(b) for b in buckets] for size, buckets in spec.families}),
        "resample": spec.resample,
        "license": spec.license,
    }
    for key, value in metadata.items():
        config.parameters[key].string_value = value
    if tensorrt:
        accelerator = mc.ModelOptimizationPolicy.ExecutionAccelerators.Accelerator(name="tensorrt")
        accelerator.parameters.update(
            {
                "precision_mode": "FP16" if precision == "fp16" else "FP32",
                "max_workspace_size_bytes": str(TENSORRT_WORKSPACE_BYTES),
                "trt_engine_cache_enable": "1",
                "trt_engine_cache_path": f"{TENSORRT_CACHE}/{name}",
                "trt_timing_cache_enable": "1",
                "trt_timing_cache_path": f"{TENSORRT_CACHE}/{name}",
                **tensorrt_profiles(spec),
            }
        )
        config.optimization.execution_accelerators.gpu_execution_accelerator.append(accelerator)
    return config


def render(config: mc.ModelConfig) -> str:
    """The config as Triton's protobuf text format."""
    return text_format.MessageToString(config)


def parse(text: str) -> mc.ModelConfig:
    """Parse a ``config.pbtxt`` (raises ``text_format.ParseError`` if it is not a valid ModelConfig)."""
    return text_format.Parse(text, mc.ModelConfig())

"""Build a model's Triton ``config.pbtxt`` from its spec, with the protobuf classes tritonclient ships.

The config carries the model's metadata as ``parameters`` (see ``METADATA_KEYS``) so that a client can
discover everything it needs (HF id, relative or metric, max depth, precision, shape buckets per network
size, licence) from Triton's model-config endpoint instead of a second hard-coded table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from catalogue.models import ModelSpec, Precision
from catalogue.size import Size

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
    "batch_caps",
)
MAX_QUEUE_DELAY_US = 2000
QUEUED_BATCHES = 8  # Triton's queue holds this many full batches, then rejects (the gateway retries with backoff)
QUEUE_TIMEOUT_US = 60_000_000  # a request that waited this long is rejected; requests may ask for less
TENSORRT_WORKSPACE_BYTES = 4 << 30
GPU_GB = 24.0  # the smallest GPU the hub offers (--gpu-memory-gb for others)
GPU_SHARE = 0.85  # of the GPU's memory for the models' arenas: the rest for CUDA contexts and Triton
LOADED_MODELS = 2  # the gateway's MAX_LOADED_MODELS default
TENSORRT_CACHE = "/opt/depth/tensorrt-cache"  # fixed in the image; the worker points it at TENSORRT_CACHE_DIR


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimization profile: the box of shapes an engine accepts, and the shape it is tuned at."""

    min: tuple[int, int, int]  # (batch, height, width)
    opt: tuple[int, int, int]
    max: tuple[int, int, int]


def activation_budget(spec: ModelSpec) -> int:
    """Pixels one batch may hold: a full batch of the default network size's largest bucket, the shapes the
    model's batch size was chosen for (activations grow with batch x pixels)."""
    return spec.max_batch_size * max(bucket.pixels for bucket in spec.buckets)


def four_by_three(buckets: tuple[Size, ...]) -> Size:
    """The bucket closest to 4:3 landscape (the commonest photo shape)."""
    return min(buckets, key=lambda bucket: abs(bucket.width / bucket.height - 4 / 3))


def batch_caps(spec: ModelSpec) -> dict[int, int]:
    """Per network size, the largest batch whose largest bucket stays within ``activation_budget``: the full
    batch at the default size, fewer at the larger ones. The gateway keeps no more requests of a size in
    flight (so Triton never forms a larger batch), and each TensorRT profile ends there."""
    budget = activation_budget(spec)
    return {
        size: max(1, min(spec.max_batch_size, budget // max(bucket.pixels for bucket in buckets)))
        for size, buckets in spec.families
    }


def tensorrt_profiles(spec: ModelSpec) -> list[Profile]:
    """One profile per network size and orientation (landscape and square; portrait), spanning exactly the
    buckets served there, batch 1 to that size's ``batch_caps``, tuned at a full batch of its 4:3 (or 3:4)
    bucket. No engine is rebuilt for a served shape, and none is built for a shape never served (one
    profile over every size reached 1848x1848 at batch 32: several GB for one activation of the head)."""
    caps = batch_caps(spec)
    profiles = []
    for size, buckets in spec.families:
        landscape = tuple(bucket for bucket in buckets if bucket.landscape)
        portrait = tuple(bucket.turned() for bucket in buckets if not bucket.landscape)  # as landscape
        for group, turned in ((landscape, False), (portrait, True)):
            if not group:
                continue

            def shape(batch: int, extent: Size, turned: bool = turned) -> tuple[int, int, int]:
                return (batch, *(extent.turned() if turned else extent).shape)

            smallest = Size(min(bucket.width for bucket in group), min(bucket.height for bucket in group))
            largest = Size(max(bucket.width for bucket in group), max(bucket.height for bucket in group))
            cap = caps[size]
            profiles.append(Profile(shape(1, smallest), shape(cap, four_by_three(group)), shape(cap, largest)))
    return profiles


def profile_parameters(profiles: list[Profile]) -> dict[str, str]:
    """ONNX Runtime's TensorRT options: the input named once per profile makes several profiles."""

    def shapes(pick: str) -> str:
        return ",".join("image:{}x{}x{}x3".format(*getattr(profile, pick)) for profile in profiles)

    return {f"trt_profile_{pick}_shapes": shapes(pick) for pick in ("min", "opt", "max")}


def warmup_shapes(spec: ModelSpec) -> list[Size]:
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


def cuda_parameters(gpu_memory_gb: float) -> dict[str, str]:
    """ONNX Runtime's CUDA options (the onnxruntime backend reads them from the model's ``parameters``).

    - ``cudnn_conv_algo_search`` 1 (heuristic): the default (exhaustive) times every convolution algorithm
      on the first call of each new (batch, shape), and the dynamic batcher makes up to 32 batch sizes
      per bucket, so the first minutes of traffic would pay hundreds of searches;
    - ``arena_extend_strategy`` 1 (same as requested): the default grows the arena by powers of two, so a
      model can hold almost twice what it uses;
    - ``gpu_mem_limit``: each model's arena at most its share of the GPU, ``GPU_SHARE`` of its memory over
      ``LOADED_MODELS`` (``MAX_LOADED_MODELS``' default), so that two loaded models cannot starve each other.
    """
    limit = int(gpu_memory_gb * GPU_SHARE * (1 << 30) / LOADED_MODELS)
    return {"cudnn_conv_algo_search": "1", "arena_extend_strategy": "1", "gpu_mem_limit": str(limit)}


def build_config(
    spec: ModelSpec, precision: Precision, backend: Backend, tensorrt: bool = False, gpu_memory_gb: float = GPU_GB
) -> mc.ModelConfig:
    """The full ModelConfig message for one exported model (ONNX Runtime's CUDA options sized for a GPU of
    ``gpu_memory_gb``)."""
    if tensorrt and backend != "onnxruntime":
        raise ValueError("--tensorrt applies to the onnxruntime backend only")
    name = spec.served_name(precision)
    image_dims = [-1, -1, 3] if spec.dynamic_shape else [*spec.buckets[0].shape, 3]
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
        model_warmup=[warmup(f"bucket_{b.width}x{b.height}", 1, b) for b in warmup_shapes(spec)],
    )
    parameters = metadata(spec, precision)
    if backend == "onnxruntime":
        parameters |= cuda_parameters(gpu_memory_gb)
        config.dynamic_batching.preferred_batch_size.append(spec.max_batch_size)
        hot = four_by_three(spec.buckets)  # the hot path: a full batch of the commonest shape
        config.model_warmup.append(warmup(f"full_batch_{hot.width}x{hot.height}", spec.max_batch_size, hot))
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    if tensorrt:
        config.optimization.execution_accelerators.gpu_execution_accelerator.append(
            tensorrt_accelerator(spec, precision, name)
        )
    return config


def warmup(name: str, batch: int, size: Size) -> mc.ModelWarmup:
    """A warm-up request of ``batch`` zero images of ``size``."""
    image = mc.ModelWarmup.Input(data_type=mc.TYPE_UINT8, dims=[*size.shape, 3], zero_data=True)
    return mc.ModelWarmup(name=name, batch_size=batch, inputs={"image": image})


def metadata(spec: ModelSpec, precision: Precision) -> dict[str, str]:
    """The model's facts as config ``parameters`` (``METADATA_KEYS``), for clients and the gateway."""
    return {
        "hf_id": spec.hf_id,
        "architecture": spec.architecture,
        "kind": "metric" if spec.metric else "relative",
        "max_depth": "" if spec.max_depth is None else str(spec.max_depth),
        "precision": precision,
        # [height, width] as the input's dims (the order configs have always had); the default family
        "buckets": json.dumps([list(bucket.shape) for bucket in spec.buckets]),
        "bucket_families": json.dumps({str(res): [list(b.shape) for b in family] for res, family in spec.families}),
        "resample": spec.resample,
        "license": spec.license,
        "batch_caps": json.dumps({str(size): cap for size, cap in batch_caps(spec).items()}),
    }


def tensorrt_accelerator(
    spec: ModelSpec, precision: Precision, name: str
) -> mc.ModelOptimizationPolicy.ExecutionAccelerators.Accelerator:
    """ONNX Runtime's TensorRT execution provider: precision, caches and the served profiles."""
    accelerator = mc.ModelOptimizationPolicy.ExecutionAccelerators.Accelerator(name="tensorrt")
    accelerator.parameters.update(
        {
            "precision_mode": "FP16" if precision == "fp16" else "FP32",
            "max_workspace_size_bytes": str(TENSORRT_WORKSPACE_BYTES),
            "trt_engine_cache_enable": "1",
            "trt_engine_cache_path": f"{TENSORRT_CACHE}/{name}",
            "trt_timing_cache_enable": "1",
            "trt_timing_cache_path": f"{TENSORRT_CACHE}/{name}",
            **profile_parameters(tensorrt_profiles(spec)),
        }
    )
    return accelerator


def render(config: mc.ModelConfig) -> str:
    """The config as Triton's protobuf text format."""
    return text_format.MessageToString(config)


def parse(text: str) -> mc.ModelConfig:
    """Parse a ``config.pbtxt`` (raises ``text_format.ParseError`` if it is not a valid ModelConfig)."""
    return text_format.Parse(text, mc.ModelConfig())

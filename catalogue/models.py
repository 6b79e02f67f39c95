"""The six served checkpoints: one table, the single place that maps a Hugging Face id to everything else.

Each entry says how the checkpoint is preprocessed, which network shapes ("buckets", each a ``Size``) it is served at,
its Triton name and how large a batch it may take. The exporter writes this metadata into each model's
``config.pbtxt`` so that the gateway can learn it from Triton at serving time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from catalogue.size import Size

Architecture = Literal["depth_anything", "dpt"]
Precision = Literal["fp16", "fp32"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Where transformers' processor (short side 518, aspect kept, multiple of 14) puts the common camera aspect
# ratios 1:1, 4:3, 3:2 and 16:9, landscape and portrait.
DEPTH_ANYTHING_BUCKETS: tuple[Size, ...] = (
    Size(518, 518),
    Size(686, 518),
    Size(518, 686),
    Size(770, 518),
    Size(518, 770),
    Size(924, 518),
    Size(518, 924),
)
DPT_BUCKETS: tuple[Size, ...] = (Size(384, 384),)
PATCH = 14


def scaled_family(base: tuple[Size, ...], short_side: int) -> tuple[Size, ...]:
    """``base`` (a 518 px family) scaled to ``short_side``, each side a multiple of the 14 px patch."""
    factor = short_side / min(base[0])
    return tuple(Size(*(round(side * factor / PATCH) * PATCH for side in size)) for size in base)


# Network short sides ("process_res") -> buckets. Depth-Anything runs at any multiple of 14: 518 is its
# training size and the default, 770 and 1036 trade latency for finer edges. DPT-large has one size.
DEPTH_ANYTHING_FAMILIES: tuple[tuple[int, tuple[Size, ...]], ...] = tuple(
    (size, scaled_family(DEPTH_ANYTHING_BUCKETS, size)) for size in (518, 770, 1036)
)
DPT_FAMILIES: tuple[tuple[int, tuple[Size, ...]], ...] = ((384, DPT_BUCKETS),)


@dataclass(frozen=True)
class ModelSpec:
    """Everything the exporter and the gateway need to know about one checkpoint."""

    hf_id: str
    triton_name: str
    architecture: Architecture
    metric: bool
    max_depth: float | None
    families: tuple[tuple[int, tuple[Size, ...]], ...]  # (process_res, buckets); the first is the default
    max_batch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: Literal["bicubic", "bilinear"]
    license: str  # SPDX id, as the checkpoint's model card states it

    @property
    def default_res(self) -> int:
        return self.families[0][0]

    @property
    def buckets(self) -> tuple[Size, ...]:
        """The default family's buckets."""
        return self.families[0][1]

    @property
    def all_buckets(self) -> tuple[Size, ...]:
        return tuple(bucket for _size, buckets in self.families for bucket in buckets)

    @property
    def dynamic_shape(self) -> bool:
        """Whether the network takes any H, W (multiples of 14) or only its one fixed bucket."""
        return self.architecture == "depth_anything"

    def served_name(self, precision: Precision) -> str:
        """Triton model name of this checkpoint at one precision (FP16 is the plain name)."""
        return self.triton_name if precision == "fp16" else f"{self.triton_name}_fp32"


def _depth_anything(hf_id: str, name: str, batch: int, license: str, max_depth: float | None = None) -> ModelSpec:
    return ModelSpec(
        hf_id=hf_id,
        triton_name=name,
        architecture="depth_anything",
        metric=max_depth is not None,
        max_depth=max_depth,
        families=DEPTH_ANYTHING_FAMILIES,
        max_batch_size=batch,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        resample="bicubic",
        license=license,
    )


MODELS: dict[str, ModelSpec] = {
    spec.hf_id: spec
    for spec in (
        _depth_anything("depth-anything/Depth-Anything-V2-Small-hf", "depth_anything_v2_small", 32, "Apache-2.0"),
        _depth_anything("depth-anything/Depth-Anything-V2-Base-hf", "depth_anything_v2_base", 16, "CC-BY-NC-4.0"),
        _depth_anything("depth-anything/Depth-Anything-V2-Large-hf", "depth_anything_v2_large", 8, "CC-BY-NC-4.0"),
        _depth_anything(
            "depth-anything/Depth-Anything-V2-Metric-Indoor-Large-hf",
            "depth_anything_v2_metric_indoor_large",
            8,
            "Apache-2.0",  # the metric checkpoints' cards; their Large encoder alone is CC-BY-NC-4.0
            max_depth=20.0,
        ),
        _depth_anything(
            "depth-anything/Depth-Anything-V2-Metric-Outdoor-Large-hf",
            "depth_anything_v2_metric_outdoor_large",
            8,
            "Apache-2.0",
            max_depth=80.0,
        ),
        ModelSpec(
            hf_id="Intel/dpt-large",
            triton_name="dpt_large",
            architecture="dpt",
            metric=False,
            max_depth=None,
            families=DPT_FAMILIES,
            max_batch_size=8,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            resample="bilinear",
            license="Apache-2.0",
        ),
    )
}

DEFAULT_MODEL = "depth-anything/Depth-Anything-V2-Small-hf"


class UnknownModelError(ValueError):
    """A model id that is not one of the six served checkpoints."""


def get_spec(model_id: str) -> ModelSpec:
    """The spec for a Hugging Face id; raises UnknownModelError naming the valid ids."""
    try:
        return MODELS[model_id]
    except KeyError:
        valid = ", ".join(MODELS)
        raise UnknownModelError(f"unknown model {model_id!r}; expected one of: {valid}, or 'all'") from None

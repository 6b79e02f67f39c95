"""What a served model is: its Triton name, HF id, kind, precision, network-size buckets, resample filter,
licence and device, as its Triton config says. Pure (no Triton client), so that the image workers and
the outputs can use it without importing gRPC; ``from_config`` reads the config message it is given."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from catalogue.size import Size


@dataclass(frozen=True)
class ServedModel:
    name: str
    hf_id: str
    metric: bool
    max_depth: float | None
    precision: str
    families: tuple[tuple[int, tuple[Size, ...]], ...]  # (network short side, buckets); first = default
    resample: str
    on_gpu: bool
    license: str
    batch_caps: tuple[tuple[int, int], ...] = ()  # (network short side, most requests of it in flight)

    @property
    def buckets(self) -> tuple[Size, ...]:
        """The default network size's buckets."""
        return self.families[0][1]

    @property
    def sizes(self) -> tuple[int, ...]:
        """The network short sides (``process_res``) served, the default first."""
        return tuple(size for size, _buckets in self.families)

    def family(self, size: int | None) -> tuple[Size, ...]:
        """The buckets of network size ``size`` (None: the default); KeyError if it is not served."""
        return self.buckets if size is None else dict(self.families)[size]

    def largest_pixels(self, size: int | None) -> int:
        """Pixels of the largest bucket of network size ``size`` (None: the default)."""
        return max(bucket.pixels for bucket in self.family(size))

    def size_of(self, bucket: Size) -> int:
        """The network short side whose family holds ``bucket``."""
        for size, buckets in self.families:
            if bucket in buckets:
                return size
        return min(bucket)

    def batch_cap(self, size: int) -> int | None:
        """The most requests of network size ``size`` to keep in flight, when that is less than the full
        batch of the default size (None: no cap; Triton's own batch size bounds it, and requests may queue
        there, so that the next batch is ready when one ends)."""
        caps = dict(self.batch_caps)
        cap = caps.get(size)
        return cap if cap is not None and cap < caps.get(self.sizes[0], cap + 1) else None

    @classmethod
    def from_config(cls, config: Any) -> ServedModel:
        """From a ``ModelConfig`` message (tritonclient's ``model_config_pb2``) the exporter wrote."""
        gpu_kind = 1  # ModelInstanceGroup.KIND_GPU in model_config.proto
        params = {key: value.string_value for key, value in config.parameters.items()}
        buckets = _sizes(json.loads(params["buckets"]))
        families = ((min(buckets[0]), buckets),)  # a config written before network-size families
        if params.get("bucket_families"):
            families = tuple(
                (int(size), _sizes(family)) for size, family in json.loads(params["bucket_families"]).items()
            )
        caps = json.loads(params.get("batch_caps") or "{}")  # absent from configs written before the caps
        return cls(
            name=config.name,
            hf_id=params["hf_id"],
            metric=params["kind"] == "metric",
            max_depth=float(params["max_depth"]) if params.get("max_depth") else None,
            precision=params["precision"],
            families=families,
            resample=params.get("resample", "bicubic"),
            on_gpu=any(group.kind == gpu_kind for group in config.instance_group),
            license=params.get("license", "unknown"),
            batch_caps=tuple((int(size), int(cap)) for size, cap in caps.items()),
        )


def _sizes(dims: list[list[int]]) -> tuple[Size, ...]:
    """Buckets from a config's ``[height, width]`` lists (the image input's dims)."""
    return tuple(Size(width, height) for height, width in dims)

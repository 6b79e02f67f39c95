"""One image's CPU work before inference: the network input. Pure.

``prepare`` applies ``max_size`` and snaps to the model's nearest bucket (the network shape closest to the
photo's aspect ratio); ``network_bucket`` says which bucket a photo of a given size runs at, so that a
JPEG can be decoded no larger than it needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from catalogue.size import Size
from gateway.inputs.resize import limited_size, nearest_bucket, shrink_to, to_bucket
from gateway.served_model import ServedModel


@dataclass(frozen=True)
class Prepared:
    network_input: np.ndarray
    inference_size: Size  # after max_size

    @property
    def network_size(self) -> Size:
        """The size the network ran at: a bucket of the requested network size."""
        return Size.of(self.network_input)


def network_bucket(size: Size, max_size: int, model: ServedModel, process_res: int | None = None) -> Size:
    """The bucket a photo of ``size`` runs at."""
    return nearest_bucket(limited_size(size, max_size), model.family(process_res))


def prepare(
    image: np.ndarray,
    max_size: int,
    model: ServedModel,
    process_res: int | None = None,
    size: Size | None = None,
) -> Prepared:
    """``max_size`` applied, then the nearest bucket of network size ``process_res`` (None: the default).

    ``size`` is the photo's when ``image`` is a reduced-scale decode of it (at least the
    bucket's size); default: ``image``'s own.
    """
    inference_size = limited_size(size or Size.of(image), max_size)
    bucket = nearest_bucket(inference_size, model.family(process_res))
    return Prepared(to_bucket(shrink_to(image, inference_size), bucket, model.resample), inference_size)

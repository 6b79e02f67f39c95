"""What a request's model and dtype may name, and the Triton name each resolves to: the model table's one
naming rule (``catalogue.models``), so a request's text never becomes a model name. Pure."""

from __future__ import annotations

from catalogue.models import MODELS, Precision

DTYPE_PRECISION: dict[str, Precision] = {"float16": "fp16", "float32": "fp32"}  # what the exporter writes


def common_start(words: list[str]) -> str:
    """The characters every one of ``words`` starts with."""
    first, last = min(words), max(words)
    length = 0
    while length < len(first) and first[length] == last[length]:
        length += 1
    return first[:length]


def brief(ids: list[str]) -> str:
    """``ids`` as few words: ids sharing a start and an end become ``start{a,b,c}end``."""
    groups: dict[str, list[str]] = {}
    for model_id in ids:
        groups.setdefault(model_id.split("/", 1)[0], []).append(model_id)
    words = []
    for group in groups.values():
        if len(group) == 1:
            words.append(group[0])
            continue
        start = common_start(group)
        end = common_start([model_id[len(start) :][::-1] for model_id in group])[::-1]
        middles = [model_id[len(start) : len(model_id) - len(end)] for model_id in group]
        words.append(f"{start}{{{','.join(middles)}}}{end}")
    return " or ".join(words)


MODEL_CHOICES = f"expected {brief(list(MODELS))}"


class ModelUnavailable(ValueError):
    """The requested model or dtype is not served; the message names what is."""


def variant_name(hf_id: str, dtype: str) -> str:
    """Triton name of ``hf_id`` at ``dtype``: the model table's one naming rule, as the exporter uses it."""
    return MODELS[hf_id].served_name(DTYPE_PRECISION[dtype])

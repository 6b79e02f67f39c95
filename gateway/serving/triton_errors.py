"""Triton's errors as the gateway sees them: which are transient (retried), which mean a model Triton lost,
and the short, safe sentence each becomes. Pure."""

from __future__ import annotations

TRANSIENT = {"StatusCode.UNAVAILABLE", "StatusCode.RESOURCE_EXHAUSTED"}


def model_missing(message: str) -> bool:
    """Triton's words for a model it does not have loaded (e.g. after a restart in explicit mode)."""
    message = message.lower()
    return "unknown model" in message or "not found" in message or "not ready" in message


def describe(status: str, message: str) -> str:
    """A short, safe sentence for a Triton error (Triton reports a full queue as UNAVAILABLE)."""
    if status == "StatusCode.RESOURCE_EXHAUSTED" or "queue size" in message.lower():
        return "the depth model is overloaded; try again later"
    if status == "StatusCode.UNAVAILABLE":
        return "the inference server is unavailable right now; try again shortly"
    return "depth inference failed"

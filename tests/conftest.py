"""Shared fixtures: tiny random checkpoints of the three architectures, exported through the real CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.cli import main as export_main
from export.random_checkpoint import save_random_checkpoint

RELATIVE_ID = "depth-anything/Depth-Anything-V2-Small-hf"
METRIC_ID = "depth-anything/Depth-Anything-V2-Metric-Indoor-Large-hf"
DPT_ID = "Intel/dpt-large"
TINY_MODELS = (RELATIVE_ID, METRIC_ID, DPT_ID)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny random checkpoint per architecture, saved with ``save_pretrained``."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {model_id: save_random_checkpoint(model_id, root / model_id.replace("/", "--")) for model_id in TINY_MODELS}


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path]) -> Path:
    """A model repository holding the three tiny models (FP16, Python backend, as the local Triton runs them)."""
    repo = tmp_path_factory.mktemp("model_repository")
    for model_id, checkpoint in checkpoints.items():
        argv = [model_id, "--checkpoint", str(checkpoint), "--repository", str(repo), "--backend", "python"]
        assert export_main(argv) == 0
    return repo

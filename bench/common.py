"""Shared benchmark helpers: machine description, interleaved timing, medians, JSON results."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    packages = ["numpy", "opencv-python-headless", "pillow", "matplotlib", "torch", "transformers", "onnxruntime"]
    versions = {}
    for name in packages:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "versions": versions}


def interleaved(pairs: dict[str, tuple[Callable[[], object], Callable[[], object]]], repeats: int) -> dict:
    """Median milliseconds of each (ours, baseline) pair, the two timed alternately, ``repeats`` times."""
    samples: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in pairs}
    for _ in range(repeats):
        for name, (ours, baseline) in pairs.items():
            for function, bucket in ((ours, samples[name][0]), (baseline, samples[name][1])):
                started = time.perf_counter()
                function()
                bucket.append((time.perf_counter() - started) * 1000)
    return {
        name: {
            "ours_ms": statistics.median(a),
            "seed_ms": statistics.median(b),
            "ratio": statistics.median(b) / statistics.median(a),
        }
        for name, (a, b) in samples.items()
    }


def write(name: str, payload: dict, folder: Path = RESULTS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    return path

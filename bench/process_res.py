"""What each network size (``process_res``) costs on a CPU: onnxruntime on the exported FP32 graph.

    python -m bench.process_res [--repeats 5]

For Depth-Anything-V2-Small with random weights, tiny (the test model) and real size (same compute as the
released checkpoint): the FP32 graph the CPU stack serves is exported once, then timed on onnxruntime's
CPU provider at the 4:3 landscape bucket of each network size (686x518, 1022x770, 1372x1036), batch 1,
the median of ``--repeats`` runs after one warm-up. Writes bench/results/process_res.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.common import write
from catalogue.models import get_spec
from export.graph import ServingGraph
from export.onnx_export import export_onnx
from export.parity import photo_batch
from export.random_checkpoint import build_model

MODEL_ID = "depth-anything/Depth-Anything-V2-Small-hf"


def time_sizes(size: str, repeats: int) -> dict[str, float]:
    spec = get_spec(MODEL_ID)
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "model.onnx"
        export_onnx(ServingGraph(build_model(spec, size), spec), spec, path)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        timings = {}
        for process_res, buckets in spec.families:
            size = buckets[1]
            image = photo_batch(size, count=1)
            session.run(["depth"], {"image": image})  # warm-up
            samples = []
            for _ in range(repeats):
                started = time.perf_counter()
                depth = session.run(["depth"], {"image": image})[0]
                samples.append((time.perf_counter() - started) * 1000)
            assert depth.shape == (1, *size.shape)
            assert np.isfinite(depth).all()
            timings[f"{process_res} ({size.width}x{size.height})"] = statistics.median(samples)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results = {size: time_sizes(size, args.repeats) for size in ("tiny", "full")}
    print("| network size | tiny Small (ms) | real-size Small (ms) | real size vs 518 |")
    print("|---|---:|---:|---:|")
    base = next(iter(results["full"].values()))
    for label in results["full"]:
        full = results["full"][label]
        print(f"| {label} | {results['tiny'][label]:.0f} | {full:.0f} | {full / base:.1f}x |")
    print(f"wrote {write('process_res', {'repeats': args.repeats, 'median_ms': results})}")


if __name__ == "__main__":
    main()

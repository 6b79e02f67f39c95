"""What each model needs in GPU memory at its largest batch and bucket, estimated from a measured CPU run.

No GPU here, so: the real-size architecture (random weights, ``export.random_checkpoint --size full``) is
exported to its plain ONNX graph in FP32 and run by ONNX Runtime on the CPU at batch 1 and at batch 2 on
the largest bucket of each network size, each in a fresh process; the growth of its peak RSS (reset after
loading) over the loaded session is the graph's working memory (ONNX Runtime's planned activations,
as its memory-pattern planner lays them out). Its growth from batch 1 to batch 2 is the part that scales
with the batch. The GPU estimate for a batch of the size's cap (``batch_caps``), in FP16 (half the bytes)::

    weights (parameters x 2 B) + (fixed + cap x per image) / 2

It leaves out cuDNN/cuBLAS workspaces and the CUDA context (about 0.5-1 GB per process) and the
fused-attention kernels' savings; treat it as an order of magnitude until a GPU run replaces it
(``python -m bench.gpu``). Results in ``bench/results/gpu_memory.json``.

    python -m bench.gpu_memory [--models small base large dpt]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import write
from catalogue.models import get_spec
from export.exporter import load_checkpoint
from export.graph import ServingGraph
from export.onnx_export import export_onnx
from export.random_checkpoint import save_random_checkpoint
from export.triton_config import batch_caps

MODELS = {
    "small": "depth-anything/Depth-Anything-V2-Small-hf",
    "base": "depth-anything/Depth-Anything-V2-Base-hf",
    "large": "depth-anything/Depth-Anything-V2-Large-hf",
    "dpt": "Intel/dpt-large",
}
RUN = """
import json, sys
from pathlib import Path
import numpy as np
import onnxruntime as ort

def status(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
    return int(line.split()[1])

options = ort.SessionOptions()
options.intra_op_num_threads = 2
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
Path("/proc/self/clear_refs").write_text("5")  # the peak so far (loading, optimizing) no longer counts
loaded = status("VmRSS")
batch, height, width = (int(v) for v in sys.argv[2:5])
session.run(["depth"], {"image": np.zeros((batch, height, width, 3), np.uint8)})
print(json.dumps({"loaded_kb": loaded, "peak_kb": status("VmHWM")}))
"""


def working_memory(graph: Path, batch: int, height: int, width: int) -> int:
    """Bytes the run added to the process's peak, over the loaded session."""
    done = subprocess.run(
        [sys.executable, "-c", RUN, str(graph), str(batch), str(height), str(width)],
        capture_output=True,
        text=True,
        check=True,
    )
    measured = json.loads(done.stdout.splitlines()[-1])
    return (measured["peak_kb"] - measured["loaded_kb"]) * 1024


def attention_bytes(model, height: int, width: int) -> int:
    """One layer's attention scores and probabilities for one image, FP32, as the plain graph holds them
    (heads x tokens^2 twice); fused attention (ONNX Runtime's flash attention, TensorRT's MHA) never
    materializes them."""
    config = getattr(model.config, "backbone_config", None) or model.config
    heads = config.num_attention_heads
    patch = getattr(config, "patch_size", 14)
    tokens = (height // patch) * (width // patch) + 1
    return 2 * heads * tokens * tokens * 4


def measure(model_id: str, root: Path, sizes: list[int] | None) -> dict:
    spec = get_spec(model_id)
    checkpoint = save_random_checkpoint(model_id, root / "checkpoint", size="full")
    model = load_checkpoint(spec, checkpoint)
    parameters = sum(p.numel() for p in model.parameters())
    graph = root / "model.onnx"
    with torch.no_grad():
        export_onnx(ServingGraph(model, spec), spec, graph)
    caps = batch_caps(spec)
    rows = {}
    for size, buckets in spec.families:
        if sizes and size not in sizes:
            continue
        largest = max(buckets, key=lambda bucket: bucket.pixels)
        height, width = largest.shape
        one, two = (working_memory(graph, batch, height, width) for batch in (1, 2))
        per_image = max(two - one, 0)
        fixed = max(one - per_image, 0)
        cap = caps[size]
        rows[str(size)] = {
            "bucket": list(largest),  # (width, height)
            "batch_cap": cap,
            "cpu_fp32_batch1_bytes": one,
            "cpu_fp32_per_image_bytes": per_image,
            "attention_matrices_bytes": attention_bytes(model, height, width),
            "gpu_fp16_estimate_bytes": parameters * 2 + (fixed + cap * per_image) // 2,
        }
    return {"parameters": parameters, "sizes": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--sizes", nargs="+", type=int, help="only these network sizes (default: all)")
    args = parser.parse_args()
    results = {}
    for name in args.models:
        with tempfile.TemporaryDirectory() as root:
            results[MODELS[name]] = measure(MODELS[name], Path(root), args.sizes)
        print(f"measured {name}", flush=True)
    print("\n| model | network size | largest bucket | CPU FP32, batch 1 | per image | of which one layer's "
          "attention matrices | cap | GPU FP16 at the cap, plain graph (est.) |")  # fmt: skip
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for model_id, result in results.items():
        for size, row in result["sizes"].items():
            width, height = row["bucket"]
            gb = {key: value / 2**30 for key, value in row.items() if key.endswith("_bytes")}
            print(f"| `{model_id}` | {size} | {width}x{height} | {gb['cpu_fp32_batch1_bytes']:.2f} GB "
                  f"| {gb['cpu_fp32_per_image_bytes']:.2f} GB | {gb['attention_matrices_bytes']:.2f} GB "
                  f"| {row['batch_cap']} | {gb['gpu_fp16_estimate_bytes']:.1f} GB |")  # fmt: skip
    name = "gpu_memory" if args.models == list(MODELS) and not args.sizes else "gpu_memory_" + "-".join(args.models)
    print(f"wrote {write(name, {'results': results, 'sizes': args.sizes, 'numpy': np.__version__})}")


if __name__ == "__main__":
    main()

"""One command that checks a GPU machine: PyTorch FP16 eager against onnxruntime's CUDA provider on the
plain and on the fused graph (and TensorRT where ``tensorrt`` imports), for the four architectures at
real size (random weights: ``export.random_checkpoint``), at batch 1, 8 and 32.

    python -m bench.gpu [--models small base large dpt] [--batches 1 8 32] [--out bench/results]
    python -m bench.gpu --dry      # CPU, tiny models, FP32: what CI runs so that this cannot rot

With TensorRT, what the first request of each bucket costs with an empty engine cache and with a filled
one (``tensorrt_first_requests``, the exported config's own options). Then the whole worker as deployed
(``worker_figures``): the local tritonserver with the real-size Small
(Python backend, onnxruntime's CUDA provider inside), runpod's production job loop against the job-API
stand-in, 600 one-image jobs: images/s, CPU per image and the GPU's utilization from ``nvidia-smi``.

For each model, path and batch: milliseconds per batch and images/s (median of ``--repeats`` after a
warm-up), the ratio to PyTorch, and parity (relative L2) against PyTorch FP32 on the same photos. The
fused graph is the exporter's default (``export.fusion``); the plain one is what ``--tensorrt`` ships.
Writes ``gpu.json`` (``gpu_dry.json`` in dry mode). On the lent GPU machine, onnxruntime-gpu travels as
wheel parts (``../shared/gpu/prepare-wheels.sh``); this script calls ``onnxruntime.preload_dlls()``.
"""

from __future__ import annotations

import argparse
import base64
import copy
import importlib.util
import shutil
import statistics
import subprocess
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from bench.common import RESULTS, write
from catalogue.models import get_spec
from export import fusion
from export.graph import ServingGraph
from export.onnx_export import export_onnx
from export.parity import photo_batch, relative_l2
from export.random_checkpoint import build_model
from export.triton_config import tensorrt_accelerator

ARCHITECTURES = {
    "small": "depth-anything/Depth-Anything-V2-Small-hf",
    "base": "depth-anything/Depth-Anything-V2-Base-hf",
    "large": "depth-anything/Depth-Anything-V2-Large-hf",
    "dpt": "Intel/dpt-large",
}


def timed(function, repeats: int) -> float:
    function()  # warm-up (kernel selection, TensorRT engine build)
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000


def sessions(graph_fp: ServingGraph, spec, precision: str, root: Path, providers: list) -> dict[str, object]:
    """The plain and the fused ONNX graph of ``graph_fp``'s model, each in an inference session."""
    made = {}
    plain = root / "plain.onnx"
    export_onnx(graph_fp, spec, plain)
    made["onnxruntime plain"] = ort.InferenceSession(str(plain), providers=providers)
    fused_model = copy.deepcopy(graph_fp.model)
    fusion.prepare(fused_model, spec)
    fused = root / "fused.onnx"
    export_onnx(ServingGraph(fused_model, spec), spec, fused)
    nodes = fusion.fuse(fused, fused_model, spec, precision)
    made[f"onnxruntime fused ({nodes} attention nodes)"] = ort.InferenceSession(str(fused), providers=providers)
    on_gpu = "CUDAExecutionProvider" in [p if isinstance(p, str) else p[0] for p in providers]
    if on_gpu and importlib.util.find_spec("tensorrt") is not None:
        trt = [("TensorrtExecutionProvider", {"trt_fp16_enable": precision == "fp16"}), *providers]
        made["onnxruntime TensorRT"] = ort.InferenceSession(str(plain), providers=trt)
    return made


def measure(name: str, dry: bool, batches: list[int], repeats: int) -> tuple[list[dict], dict | None]:
    """The rows of one model, and what its first requests cost with TensorRT (None without it)."""
    spec = get_spec(ARCHITECTURES[name])
    device = "cpu" if dry else "cuda"
    precision = "fp32" if dry else "fp16"
    reference = ServingGraph(build_model(spec, "tiny" if dry else "full"), spec)
    served = ServingGraph(copy.deepcopy(reference.model), spec)
    if precision == "fp16":
        served.model.half()
    providers = ["CPUExecutionProvider"] if dry else [("CUDAExecutionProvider", {"device_id": 0})]
    size = spec.buckets[0] if dry or not spec.dynamic_shape else spec.buckets[1]
    rows = []
    first_requests = None
    with tempfile.TemporaryDirectory() as root:
        runners = sessions(served, spec, precision, Path(root), providers)
        if "onnxruntime TensorRT" in runners:
            first_requests = tensorrt_first_requests(Path(root) / "plain.onnx", spec, precision, providers)
        served_on_device = served.to(device)
        for batch in batches:
            images = np.concatenate([photo_batch(size)] * (batch // 3 + 1))[:batch]
            with torch.no_grad():
                expected = reference(torch.from_numpy(images)).numpy()
                tensor = torch.from_numpy(images).to(device)

                def eager(tensor: torch.Tensor = tensor) -> torch.Tensor:
                    out = served_on_device(tensor)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    return out

                torch_ms = timed(eager, repeats)
                torch_out = eager().float().cpu().numpy()
            row = {"model": name, "batch": batch, "size": list(size), "paths": {}}
            row["paths"]["pytorch eager"] = {
                "ms": torch_ms, "images_per_s": batch / torch_ms * 1000, "relative_l2": relative_l2(torch_out, expected)
            }  # fmt: skip
            for path, session in runners.items():
                ms = timed(lambda session=session, images=images: session.run(["depth"], {"image": images}), repeats)
                out = session.run(["depth"], {"image": images})[0]
                row["paths"][path] = {
                    "ms": ms, "images_per_s": batch / ms * 1000, "vs_pytorch": torch_ms / ms,
                    "relative_l2": relative_l2(out, expected),
                }  # fmt: skip
            rows.append(row)
    return rows, first_requests


# Triton's onnxruntime backend passes the TensorRT accelerator's parameters to onnxruntime under these
# provider options (its ``onnxruntime.cc``); everything else keeps its name.
TRITON_TO_ORT = {"precision_mode": "trt_fp16_enable", "max_workspace_size_bytes": "trt_max_workspace_size"}


def tensorrt_options(spec, precision: str, cache: Path) -> dict[str, str]:
    """onnxruntime's TensorRT provider options as the exported config sets them (the served profiles,
    FP16, engine and timing caches), with the caches under ``cache``."""
    parameters = dict(tensorrt_accelerator(spec, precision, spec.served_name(precision)).parameters)
    options = {TRITON_TO_ORT.get(key, key): value for key, value in parameters.items()}
    options["trt_fp16_enable"] = "1" if parameters["precision_mode"] == "FP16" else "0"
    for key in ("trt_engine_cache_path", "trt_timing_cache_path"):
        options[key] = str(cache)
    return options


def tensorrt_first_requests(plain: Path, spec, precision: str, providers: list) -> dict:
    """What the first request of each served bucket costs with TensorRT, with an empty engine cache (the
    engines are built) and again in a new session over the filled cache (they are loaded): seconds for
    the session and the first request of every bucket of the default size, and a later request's ms."""
    with tempfile.TemporaryDirectory() as folder:
        options = tensorrt_options(spec, precision, Path(folder))
        photos = {bucket: photo_batch(bucket, 1) for bucket in spec.buckets}  # made before any timing
        figures = {}
        for state in ("empty cache", "filled cache"):
            started = time.perf_counter()
            session = ort.InferenceSession(str(plain), providers=[("TensorrtExecutionProvider", options), *providers])
            firsts = {}
            for bucket, photo in photos.items():
                begun = time.perf_counter()
                session.run(["depth"], {"image": photo})
                firsts[f"{bucket.width}x{bucket.height}"] = time.perf_counter() - begun
            figures[state] = {
                "total_s": time.perf_counter() - started,
                "first_request_s": firsts,
                "later_request_ms": timed(partial(session.run, ["depth"], {"image": photos[spec.buckets[0]]}), 5),
            }
        return figures


class GpuSampler:
    """``nvidia-smi``'s utilization and memory every 200 ms while a batch runs (nothing without it)."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            command = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                       "-lms", "200"]  # fmt: skip
            self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *_: object) -> None:
        if self.process is not None:
            self.process.terminate()

    def figures(self) -> dict:
        if self.process is None:
            return {"gpu_utilization_median": None, "gpu_memory_mb_max": None}
        out, _ = self.process.communicate(timeout=10)
        samples = [line.split(",") for line in out.splitlines() if line.count(",") == 1]
        utilization = [float(u) for u, _m in samples]
        memory = [float(m) for _u, m in samples]
        return {
            "gpu_utilization_median": statistics.median(utilization) if utilization else None,
            "gpu_memory_mb_max": max(memory, default=None),
        }


def worker_figures(dry: bool, jobs: int) -> dict:
    """The whole worker as deployed on this machine: the real-size Small (tiny in dry runs) exported for
    the Python backend of the local ``tritonserver`` (onnxruntime's CUDA provider inside it on a GPU),
    runpod's production job loop against the job-API stand-in, ``jobs`` one-image jobs of a 1024x768
    JPEG with ``depth``: images/s, CPU per image, and the GPU's utilization while they ran."""
    from bench.worker import MODEL_ID, deployed_worker, photo_jpeg, run_batch
    from export.cli import main as export_main
    from export.random_checkpoint import save_random_checkpoint

    photo = base64.b64encode(photo_jpeg()).decode()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        checkpoint = save_random_checkpoint(MODEL_ID, root / "checkpoint", size="tiny" if dry else "full")
        repository = root / "repository"
        precision = "fp32" if dry else "fp16"
        argv = [MODEL_ID, "--checkpoint", str(checkpoint), "--repository", str(repository), "--backend", "python"]
        if export_main([*argv, "--precision", precision]) != 0:
            raise RuntimeError("the export for the worker check failed")
        with deployed_worker(root, repository, {"TRITON_TIMEOUT": "120"}, start_timeout=600) as (api, worker):
            api.wait_for([api.submit({"image_b64": photo})], timeout=600)  # warm
            with GpuSampler() as sampler:
                batch = run_batch(api, worker.pid, [{"image_b64": photo}] * jobs, 1)
        return {
            "model": MODEL_ID,
            "precision": precision,
            "jobs": jobs,
            "lanes": batch["lanes"],  # the default for this machine's CPUs (LANES)
            "images_per_s": batch["per_second"],
            "cpu_ms_per_image": batch["cpu_ms_per_image"],
            "serial_ms_per_image": batch["serial_ms_per_image"],
            **sampler.figures(),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="CPU, tiny models, FP32 (CI)")
    parser.add_argument("--models", nargs="+", choices=list(ARCHITECTURES), default=list(ARCHITECTURES))
    parser.add_argument("--batches", nargs="+", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker-jobs", type=int, help="jobs for the worker check (0: skip it)")
    args = parser.parse_args(argv)
    if not args.dry:
        ort.preload_dlls()
        if not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers():
            print("no CUDA here (torch and onnxruntime-gpu are needed); run with --dry to check the script")
            return 2
    batches = args.batches or ([1, 2] if args.dry else [1, 8, 32])
    repeats = args.repeats or (2 if args.dry else 10)
    rows, first_requests = [], {}
    for name in args.models:
        model_rows, model_first_requests = measure(name, args.dry, batches, repeats)
        rows += model_rows
        if model_first_requests is not None:
            first_requests[name] = model_first_requests
    print(f"{'model':6} {'batch':>5}  {'path':40} {'ms':>9} {'images/s':>9} {'vs torch':>8} {'rel L2':>9}")
    for row in rows:
        for path, figures in row["paths"].items():
            ratio = f"{figures['vs_pytorch']:.2f}x" if "vs_pytorch" in figures else "-"
            print(f"{row['model']:6} {row['batch']:5}  {path:40} {figures['ms']:9.2f} {figures['images_per_s']:9.1f} "
                  f"{ratio:>8} {figures['relative_l2']:9.2e}")  # fmt: skip
    jobs = args.worker_jobs if args.worker_jobs is not None else (6 if args.dry else 600)
    worker = worker_figures(args.dry, jobs) if jobs else None
    if worker is not None:
        print(f"worker as deployed ({worker['precision']} Small, {jobs} one-image jobs): "
              f"{worker['images_per_s']:.1f} images/s, {worker['cpu_ms_per_image']:.1f} ms CPU per image, "
              f"GPU utilization median {worker['gpu_utilization_median']}")  # fmt: skip
    device = "cpu (dry run)" if args.dry else torch.cuda.get_device_name(0)
    for name, figures in first_requests.items():
        for state, numbers in figures.items():
            print(f"TensorRT {name}, {state}: session and the first request of each bucket {numbers['total_s']:.1f} s, "
                  f"later requests {numbers['later_request_ms']:.1f} ms")  # fmt: skip
    payload = {"device": device, "rows": rows, "worker": worker, "tensorrt_first_requests": first_requests}
    path = write("gpu_dry" if args.dry else "gpu", payload, folder=args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""End-to-end throughput of the local stack: images/s and latency with 1, 4 and 16 concurrent clients.

    python -m bench.e2e [--checkpoint DIR] [--requests 48]

Exports a model (default: a tiny random Depth-Anything-V2 checkpoint, Python backend, as the local Triton
runs it) into a temporary repository, starts a real tritonserver and the gateway (Runpod's local API),
serves a 1024x768 photo over loopback, and sends jobs of one image URL with the tasks depth + colorized.
Reports images/s, latency percentiles, where the time goes (the gateway's per-stage timings, Triton's
queue and compute times) and Triton's batch sizes: with concurrency, model executions < inferences.
Writes bench/results/e2e.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import tritonclient.http as httpclient
from PIL import Image
from skimage import data

from bench.common import write
from devstack.local import post, start_gateway, wait_for_api
from export.cli import main as export_main
from export.random_checkpoint import save_random_checkpoint
from gateway.serving.triton_process import EmbeddedTriton, free_port
from tests.servers import running_image_server

MODEL_ID = "depth-anything/Depth-Anything-V2-Small-hf"
NAME = "depth_anything_v2_small"


def triton_counters(client: httpclient.InferenceServerClient) -> dict:
    (stats,) = [s for s in client.get_inference_statistics(NAME)["model_stats"] if s["name"] == NAME]
    return {
        "inferences": stats["inference_count"],
        "executions": stats["execution_count"],
        "queue_ns": stats["inference_stats"]["queue"]["ns"],
        "compute_ns": stats["inference_stats"]["compute_infer"]["ns"],
        "batches": {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]},
    }


def run_level(url: str, image_url: str, concurrency: int, requests: int, client) -> dict:
    job = {"image_url": image_url, "tasks": ["depth", "colorized"], "dtype": "float16"}
    before = triton_counters(client)
    latencies, stages = [], []

    def one(_: int) -> None:
        started = time.perf_counter()
        reply = post(url, job)
        latencies.append(time.perf_counter() - started)
        result = reply["output"]["results"][0]
        assert "error" not in result, result
        stages.append(result["timings"])

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    after = triton_counters(client)
    inferences = after["inferences"] - before["inferences"]
    executions = after["executions"] - before["executions"]
    batches = {size: count - before["batches"].get(size, 0) for size, count in after["batches"].items()}
    percentiles = np.percentile(latencies, [50, 90, 99]) * 1000
    return {
        "concurrency": concurrency,
        "requests": requests,
        "images_per_s": requests / wall,
        "latency_ms": {"p50": percentiles[0], "p90": percentiles[1], "p99": percentiles[2]},
        "gateway_stage_ms_median": {k: statistics.median(s[k] for s in stages) * 1000 for k in stages[0]},
        "triton_queue_ms_mean": (after["queue_ns"] - before["queue_ns"]) / max(inferences, 1) / 1e6,
        "triton_compute_ms_per_execution": (after["compute_ns"] - before["compute_ns"]) / max(executions, 1) / 1e6,
        "inferences": inferences,
        "executions": executions,
        "batch_sizes": {str(k): v for k, v in sorted(batches.items()) if v},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="HF checkpoint (default: a tiny random one)")
    parser.add_argument("--requests", type=int, default=48, help="jobs per concurrency level")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    checkpoint = args.checkpoint or save_random_checkpoint(MODEL_ID, work / "checkpoint", size="tiny")
    repository = work / "model_repository"
    assert (
        export_main([MODEL_ID, "--checkpoint", str(checkpoint), "--repository", str(repository), "--backend", "python"])
        == 0
    )

    photo = cv2.resize(data.astronaut()[64:448], (1024, 768), interpolation=cv2.INTER_CUBIC)
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "JPEG", quality=92)
    triton = EmbeddedTriton(repository).start()
    port = free_port()
    env = {"TRITON_URL": triton.grpc_url, "DEPTH_MODEL": MODEL_ID, "URL_ALLOWLIST": "127.0.0.1", "CONCURRENCY": "32"}
    gateway = start_gateway(env, port, work / "gateway.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_api(gateway, url, work / "gateway.log")
        client = httpclient.InferenceServerClient(triton.http_url.removeprefix("http://"))
        with running_image_server() as server:
            image_url = server.add("photo.jpg", buffer.getvalue())
            run_level(url, image_url, 4, 8, client)  # warm-up
            levels = [run_level(url, image_url, c, args.requests, client) for c in args.levels]
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
        triton.stop()

    print(f"local stack, {MODEL_ID} architecture ({'given' if args.checkpoint else 'tiny random'} weights), CPU")
    print(
        f"{'clients':>7} {'img/s':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'infer':>6} {'execs':>6}  batch sizes"
    )
    for level in levels:
        p50, p90, p99 = level["latency_ms"].values()
        print(
            f"{level['concurrency']:>7} {level['images_per_s']:7.1f} {p50:8.1f} {p90:8.1f} {p99:8.1f}"
            f" {level['inferences']:>6} {level['executions']:>6}  {level['batch_sizes']}"
        )
    print("\nmedian ms per stage (gateway) and Triton queue / compute:")
    for level in levels:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in level["gateway_stage_ms_median"].items())
        print(
            f"  {level['concurrency']:>2} clients: {stages}; triton queue {level['triton_queue_ms_mean']:.1f},"
            f" compute/execution {level['triton_compute_ms_per_execution']:.1f}"
        )
    path = write("e2e", {"model": MODEL_ID, "weights": str(args.checkpoint or "tiny random"), "levels": levels})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

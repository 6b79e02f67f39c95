"""What one worker sustains, measured as deployed: runpod's production job loop, an instant model.

    python -m bench.worker [--runs 3] [--images 60] [--tiny-jobs 300] [--workloads "all five, url" 3D ...]

``python -m gateway`` (no ``--rp_serve_api``) takes jobs from a loopback stand-in for Runpod's job API
(``devstack.jobapi``) and sends inference to a real tritonserver whose model has the real config of
Depth-Anything-V2-Small but answers at once (a smooth map computed from the image in about a
millisecond), so only the gateway is measured; Triton runs in its own process and is excluded.

Figures, each the median of ``--runs`` runs:

- intake: tiny one-image jobs (64x64 PNG, task depth) per second, first take to last result;
- gateway CPU per 1024x768 JPEG image (all of the worker's threads) for ``depth``, ``depth`` +
  ``colorized``, all five tasks and 3D (``depth``, ``points``, ``mesh``), inline, and some of them with
  ``output_mode`` url (uploaded to SeaweedFS on loopback, started by the benchmark);
- serial CPU per image: the CPU time of the worker's busiest thread (from ``/proc/<pid>/task/*/schedstat``)
  divided by the images: it bounds one worker whatever its core count.

CPU figures are also given in units of a calibration workload timed in the same run ("cal", issue 9):
Pillow decodes the 1024x768 JPEG, converts it to 8-bit grayscale and saves it times 257 as a 16-bit PNG
with Pillow's defaults; the least CPU time of 15 runs, taken before and after, averaged. The projection
for a 16-core host is ``min(16 / cpu_per_image, 1 / serial_per_image)`` images/s: the cores, or the one
thread every image passes through, whichever runs out first (an upper bound: it ignores GIL waits).
Writes bench/results/worker.json (with ``--env NAME=VALUE``: worker_name-value.json, e.g. the gRPC-payload
baseline ``--env TRITON_SHARED_MEMORY=off``).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from skimage import data

from bench.common import write
from bench.seaweed import ADMIN, Weed
from catalogue.models import MODELS
from devstack.jobapi import JobApi
from export.triton_config import build_config, render
from gateway.serving.triton_process import EmbeddedTriton

MODEL_ID = "depth-anything/Depth-Anything-V2-Small-hf"
ALL_TASKS = ["depth", "colorized", "normals", "disparity", "point_cloud"]
THREE_D = ["depth", "points", "mesh"]
WORKLOADS = {  # name -> (tasks, output_mode); url: outputs uploaded to SeaweedFS on loopback
    "depth": (["depth"], "inline"),
    "depth+colorized": (["depth", "colorized"], "inline"),
    "all five": (ALL_TASKS, "inline"),
    "depth, url": (["depth"], "url"),
    "all five, url": (ALL_TASKS, "url"),
    "3D": (THREE_D, "inline"),
    "3D, url": (THREE_D, "url"),
}
TARGETS = {  # issue 9, in cal
    "cpu": {"depth": 0.27, "depth+colorized": 0.40, "all five": 0.80},
    "serial": {"depth": 0.05, "depth+colorized": 0.06, "all five": 0.10},
    "intake": 150,
}
INSTANT_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.ramps = {}

    def execute(self, requests):
        responses = []
        for request in requests:
            image = pb_utils.get_input_tensor_by_name(request, "image").as_numpy()
            n, h, w, _ = image.shape
            if (h, w) not in self.ramps:
                self.ramps[(h, w)] = np.add.outer(np.linspace(1, 2, h), np.linspace(0, 1, w)).astype(np.float32)
            depth = self.ramps[(h, w)] + image[..., 1].astype(np.float32) * np.float32(1 / 255)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("depth", depth)]))
        return responses
"""


def instant_repository(root: Path) -> Path:
    spec = MODELS[MODEL_ID]
    model_dir = root / spec.triton_name
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(render(build_config(spec, "fp16", "python")))
    (model_dir / "1" / "model.py").write_text(INSTANT_MODEL)
    return root


def photo_jpeg() -> bytes:
    image = cv2.resize(data.astronaut(), (1024, 768), interpolation=cv2.INTER_AREA)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def calibration(jpeg: bytes, runs: int = 15) -> float:
    """Least CPU seconds of the calibration workload (see the module docstring)."""
    best = float("inf")
    for _ in range(runs):
        started = time.process_time()
        gray = Image.open(io.BytesIO(jpeg)).convert("L")
        wide = Image.fromarray(np.asarray(gray).astype(np.uint16) * np.uint16(257))
        wide.save(io.BytesIO(), "PNG")
        best = min(best, time.process_time() - started)
    return best


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of every live thread of ``pid`` (schedstat: nanoseconds on the CPU)."""
    times = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            times[int(task.name)] = int((task / "schedstat").read_text().split()[0]) / 1e9
        except (OSError, ValueError):
            continue
    return times


def process_cpu(pid: int) -> float:
    """CPU seconds of the whole process, exited threads included (utime + stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The worker's image processes (its direct children; Triton runs apart)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, ValueError):
                continue
    return found


def snapshot(pid: int) -> dict:
    pool = children(pid)
    return {
        "gateway_threads": thread_cpu(pid),
        "gateway_cpu": process_cpu(pid),
        "pool_threads": {(child, tid): t for child in pool for tid, t in thread_cpu(child).items()},
        "pool_cpu": {child: process_cpu(child) for child in pool},
    }


def run_batch(api: JobApi, pid: int, jobs: list[dict], images_per_job: int) -> dict:
    before = snapshot(pid)
    ids = [api.submit(job) for job in jobs]
    results = api.wait_for(ids, timeout=600)
    after = snapshot(pid)
    failed = [r for r in results.values() if "error" in r or any("error" in i for i in r["output"]["results"])]
    if failed:
        raise RuntimeError(f"{len(failed)} jobs failed, e.g. {json.dumps(failed[0])[:300]}")
    images = len(jobs) * images_per_job

    def per_image(seconds: float) -> float:
        return seconds / images * 1000

    gateway_threads = {t: after["gateway_threads"][t] - before["gateway_threads"].get(t, 0.0)
                       for t in after["gateway_threads"]}  # fmt: skip
    pool_threads = [t - before["pool_threads"].get(key, 0.0) for key, t in after["pool_threads"].items()]
    pool_cpu = sum(t - before["pool_cpu"].get(child, 0.0) for child, t in after["pool_cpu"].items())
    gateway_cpu = after["gateway_cpu"] - before["gateway_cpu"]
    span = max(api.done_at[i] for i in ids) - min(api.taken_at[i] for i in ids)
    return {
        "images": images,
        "wall_s": span,
        "per_second": len(jobs) / span,
        "cpu_ms_per_image": per_image(gateway_cpu + pool_cpu),
        "serial_ms_per_image": per_image(max(gateway_threads.values())),
        "event_loop_ms_per_image": per_image(gateway_threads[pid]),
        "gateway_process_ms_per_image": per_image(gateway_cpu),
        "busiest_pool_thread_ms_per_image": per_image(max(pool_threads, default=0.0)),
        "gateway_threads_ms_per_image": sorted((per_image(t) for t in gateway_threads.values()), reverse=True)[:5],
    }


def start_worker(api: JobApi, triton: EmbeddedTriton, log_path: Path, extra: dict[str, str]) -> subprocess.Popen:
    env = {**os.environ, **api.env(), "TRITON_URL": triton.grpc_url, "DEPTH_MODEL": MODEL_ID, **extra}
    with log_path.open("wb") as log:
        return subprocess.Popen([sys.executable, "-m", "gateway"], env=env, stdout=log, stderr=subprocess.STDOUT)


@contextlib.contextmanager
def deployed_worker(
    root: Path, repository: Path, extra: dict[str, str], bucket: str | None = None, start_timeout: float = 180
) -> Iterator[tuple[JobApi, subprocess.Popen]]:
    """``python -m gateway`` as deployed, on a real tritonserver over ``repository`` and the job-API
    stand-in, with its outputs' ``bucket`` on SeaweedFS when one is named; everything stopped after."""
    with contextlib.ExitStack() as stack:
        if bucket is not None:
            (root / "weed").mkdir()
            weed = Weed(root / "weed").start()
            stack.callback(weed.stop)
            weed.client().create_bucket(Bucket=bucket)
            extra = {"BUCKET_ENDPOINT_URL": weed.url, "BUCKET_NAME": bucket, "BUCKET_ACCESS_KEY_ID": ADMIN[0],
                     "BUCKET_SECRET_ACCESS_KEY": ADMIN[1], **extra}  # fmt: skip
        triton = EmbeddedTriton(repository, start_timeout=start_timeout).start()
        stack.callback(triton.stop)
        api = JobApi().start()
        stack.callback(api.stop)
        worker = start_worker(api, triton, root / "worker.log", extra)
        stack.callback(worker.wait, timeout=60)
        stack.callback(worker.terminate)
        yield api, worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--images", type=int, default=60, help="1024x768 images per run and workload")
    parser.add_argument("--tiny-jobs", type=int, default=300, help="tiny jobs per intake run")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="a worker setting")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS),
                        help="only these rows (the results file then says which)")  # fmt: skip
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.env)

    jpeg = photo_jpeg()
    photo_b64 = base64.b64encode(jpeg).decode()
    tiny = io.BytesIO()
    Image.fromarray(cv2.resize(data.astronaut(), (64, 64), interpolation=cv2.INTER_AREA)).save(tiny, "PNG")
    tiny_b64 = base64.b64encode(tiny.getvalue()).decode()
    cal_before = calibration(jpeg)

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        with deployed_worker(root, instant_repository(root / "repository"), extra, bucket="outputs") as (api, worker):
            api.wait_for([api.submit({"image_b64": photo_b64, "tasks": ALL_TASKS})], timeout=300)  # warm-up
            intake = [
                run_batch(api, worker.pid, [{"image_b64": tiny_b64}] * args.tiny_jobs, 1) for _ in range(args.runs)
            ]
            measured = {
                name: [
                    run_batch(api, worker.pid, [{"image_b64": photo_b64, "tasks": tasks, "output_mode": mode}]
                              * args.images, 1)
                    for _ in range(args.runs)
                ]
                for name, (tasks, mode) in WORKLOADS.items()
                if name in args.workloads
            }  # fmt: skip
    cal = (cal_before + calibration(jpeg)) / 2

    def median(runs: list[dict], key: str) -> float:
        return statistics.median(run[key] for run in runs)

    rows = {
        name: {
            "cpu_ms": median(runs, "cpu_ms_per_image"),
            "serial_ms": median(runs, "serial_ms_per_image"),
            "cpu_cal": median(runs, "cpu_ms_per_image") / (cal * 1000),
            "serial_cal": median(runs, "serial_ms_per_image") / (cal * 1000),
            "gateway_process_ms": median(runs, "gateway_process_ms_per_image"),
            "busiest_pool_thread_ms": median(runs, "busiest_pool_thread_ms_per_image"),
            "images_per_s_here": median(runs, "per_second"),
        }
        for name, runs in measured.items()
    }
    for row in rows.values():
        row["projected_16_core_images_per_s"] = min(16 / row["cpu_ms"], 1 / row["serial_ms"]) * 1000
        row["projected_16_core_if_gil_bound"] = min(16 / row["cpu_ms"], 1 / row["gateway_process_ms"]) * 1000
        row["projected_24_core_images_per_s"] = min(24 / row["cpu_ms"], 1 / row["serial_ms"]) * 1000
    intake_rate = median(intake, "per_second")

    print(f"calibration: {cal * 1000:.0f} ms CPU (mean of before/after); {args.runs} runs each, medians")
    print("| figure | measured | target | met |\n|---|---:|---:|:-:|")
    print(f"| intake, tiny one-image jobs | {intake_rate:.0f} jobs/s | >= {TARGETS['intake']} jobs/s "
          f"| {'yes' if intake_rate >= TARGETS['intake'] else 'no'} |")  # fmt: skip
    for kind, key in (("cpu", "gateway CPU per 1024x768 image"), ("serial", "serial CPU per image")):
        for name, row in rows.items():
            value, target = row[f"{kind}_cal"], TARGETS[kind].get(name)
            wanted, met = ("-", "-") if target is None else (f"<= {target} cal", "yes" if value <= target else "no")
            print(f"| {key}, `{name}` | {value:.3f} cal ({row[f'{kind}_ms']:.1f} ms) | {wanted} | {met} |")
    print("\n| workload | whole gateway process | busiest image-worker thread | 16 cores, projected | "
          "same, if one GIL held all the gateway process's CPU | 24 cores, projected "
          "| here (2 cores, Triton beside) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| `{name}` | {row['gateway_process_ms']:.1f} ms | {row['busiest_pool_thread_ms']:.1f} ms "
              f"| {row['projected_16_core_images_per_s']:.0f} images/s | {row['projected_16_core_if_gil_bound']:.0f} "
              f"images/s | {row['projected_24_core_images_per_s']:.0f} images/s "
              f"| {row['images_per_s_here']:.0f} images/s |")  # fmt: skip
    payload = {
        "calibration_ms": cal * 1000,
        "runs": args.runs,
        "worker_settings": extra,
        "intake_jobs_per_s": intake_rate,
        "intake_runs": intake,
        "workloads": rows,
        "raw": measured,
        "targets": TARGETS,
    }
    name = "_".join(["worker", *(f"{key}-{value}".lower() for key, value in extra.items())])
    if args.workloads != list(WORKLOADS):
        name += "_only-" + "-".join(workload.replace(", ", "-").replace(" ", "-") for workload in args.workloads)
    path = write(name, payload)  # worker.json for the defaults
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""What one worker sustains, measured as deployed: runpod's production job loop, an instant model.

    python -m bench.worker [--runs 3] [--images 60] [--tiny-jobs 300] [--lanes 1 2 3] [--workloads 3D ...]

``python -m gateway`` (no ``--rp_serve_api``) takes jobs from a loopback stand-in for Runpod's job API
(``devstack.jobapi``) and sends inference to a real tritonserver whose model has the real config of
Depth-Anything-V2-Small but answers at once (a smooth map computed from the image in about a
millisecond), so only the gateway is measured; Triton runs in its own process and is excluded.

One worker is started per ``--lanes`` setting (``LANES``: gateway processes behind the one job intake,
``gateway.serving.lanes``); figures, each the median of ``--runs`` runs. The runs are rounds: every
workload once per round, so that this machine's drift over a run reaches them alike, and a url row's
``cpu_over_inline`` is the median of its rounds' ratios to the inline row of the same tasks.

- intake: tiny one-image jobs (64x64 PNG, task depth) per second, first take to last result;
- CPU per 1024x768 JPEG image, every process of the worker (intake, lanes, image workers), for ``depth``,
  ``depth`` + ``colorized``, all five tasks and 3D (``depth``, ``points``, ``mesh``), inline, and some of
  them with ``output_mode`` url (uploaded to SeaweedFS on loopback, started by the benchmark);
- serial CPU per image: the CPU time of the busiest thread of the intake and the lanes (from
  ``/proc/<pid>/task/*/schedstat``) divided by all the worker's images: one worker cannot go faster than
  one image per that much, whatever its core count. The intake's busiest thread alone is the path every
  job shares (with one lane, the intake is the lane).

CPU figures are also given in units of a calibration workload timed in the same run ("cal", issue 9):
Pillow decodes the 1024x768 JPEG, converts it to 8-bit grayscale and saves it times 257 as a 16-bit PNG
with Pillow's defaults; the least CPU time of 15 runs, taken before and after, averaged. The projection
for a host of ``cores`` cores is ``min(cores / cpu_per_image, 1 / serial_per_image)`` images/s for the
lanes setting measured: the cores, or the busiest thread, whichever runs out first (an upper bound: it
ignores GIL waits). A 16-core host gets 2 lanes by default and a 24-core host 3 (one per 8 CPU workers).
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
import threading
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
# An empty job-take or stop poll is held open this long by the stand-in (runpod's job API long-polls too):
# with its default half second, the idle intake's polling alone cost ~60 ms of CPU a second here, which
# a short batch would book to its images.
LONG_POLL = 5.0
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
    """The direct children of ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, ValueError):
                continue
    return found


def is_lane(pid: int) -> bool:
    try:
        return b"gateway.lane" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def snapshot(pid: int) -> dict:
    """CPU so far of the worker's processes: the intake (``pid``: the only gateway process without lanes),
    its lanes, and every other process below them (image workers, runpod's heartbeat; Triton runs apart)."""
    lanes = [child for child in children(pid) if is_lane(child)]
    gateways = [pid, *lanes]
    pool = [child for gateway in gateways for child in children(gateway) if child not in lanes]
    return {
        "lanes": len(lanes),
        "threads": {(process, tid): t for process in gateways for tid, t in thread_cpu(process).items()},
        "cpu": {process: process_cpu(process) for process in gateways},
        "pool_threads": {(child, tid): t for child in pool for tid, t in thread_cpu(child).items()},
        "pool_cpu": {child: process_cpu(child) for child in pool},
    }


def idle_rates(pid: int, seconds: float = 5.0) -> dict[int, float]:
    """CPU seconds per second of each of the intake's threads while no job runs: runpod's loop polls
    (its 0.1 s wait for tasks, the stop channel, empty job-takes) whatever the load."""
    before, started = thread_cpu(pid), time.monotonic()
    time.sleep(seconds)
    after, spent = thread_cpu(pid), time.monotonic() - started
    return {tid: (t - before.get(tid, 0.0)) / spent for tid, t in after.items()}


def run_batch(api: JobApi, pid: int, jobs: list[dict], images_per_job: int) -> dict:
    before, started, takes = snapshot(pid), time.monotonic(), sum(api.takes.values())
    ids = [api.submit(job) for job in jobs]
    results = api.wait_for(ids, timeout=600)
    after, duration = snapshot(pid), time.monotonic() - started
    failed = [r for r in results.values() if "error" in r or any("error" in i for i in r["output"]["results"])]
    if failed:
        raise RuntimeError(f"{len(failed)} jobs failed, e.g. {json.dumps(failed[0])[:300]}")
    images = len(jobs) * images_per_job

    def per_image(seconds: float) -> float:
        return seconds / images * 1000

    def spent(kind: str) -> dict:
        return {key: value - before[kind].get(key, 0.0) for key, value in after[kind].items()}

    threads, cpu, pool_threads = spent("threads"), spent("cpu"), spent("pool_threads")
    intake_threads = [t for (process, _tid), t in threads.items() if process == pid]
    span = max(api.done_at[i] for i in ids) - min(api.taken_at[i] for i in ids)
    return {
        "images": images,
        "lanes": max(1, after["lanes"]),  # with one, the intake is the lane
        "wall_s": span,
        "per_second": len(jobs) / span,
        "cpu_ms_per_image": per_image(sum(cpu.values()) + sum(spent("pool_cpu").values())),
        "serial_ms_per_image": per_image(max(threads.values())),
        "intake_serial_ms_per_image": per_image(max(intake_threads)),
        "intake_thread_s": {str(tid): t for (process, tid), t in threads.items() if process == pid},
        "duration_s": duration,
        "takes_per_job": (sum(api.takes.values()) - takes) / len(jobs),
        "event_loop_ms_per_image": per_image(threads[(pid, pid)]),
        "gateway_process_ms_per_image": per_image(max(cpu.values())),
        "intake_process_ms_per_image": per_image(cpu[pid]),
        "busiest_pool_thread_ms_per_image": per_image(max(pool_threads.values(), default=0.0)),
        "gateway_threads_ms_per_image": sorted((per_image(t) for t in threads.values()), reverse=True)[:5],
    }


def start_worker(api: JobApi, triton: EmbeddedTriton, log_path: Path, extra: dict[str, str]) -> subprocess.Popen:
    env = {**os.environ, **api.env(), "TRITON_URL": triton.grpc_url, "DEPTH_MODEL": MODEL_ID, **extra}
    with log_path.open("wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "gateway"], env=env, stdout=log, stderr=subprocess.STDOUT)
    fail_waits_when_it_exits(api, worker, log_path)
    return worker


def fail_waits_when_it_exits(api: JobApi, worker: subprocess.Popen, log_path: Path) -> None:
    """Once ``worker`` exits, a batch waiting for its answers fails at once with the end of its log,
    instead of at the wait's timeout (a worker that dies at import would otherwise hold a run 10 minutes)."""

    def watch() -> None:
        status = worker.wait()
        try:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        except OSError:  # its folder removed at the end of a run
            tail = "(no log)"
        api.fail(f"the worker exited with status {status}; the end of its log:\n{tail}")

    threading.Thread(target=watch, name="worker-watch", daemon=True).start()


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
        api = JobApi(long_poll=LONG_POLL).start()
        stack.callback(api.stop)
        worker = start_worker(api, triton, root / "worker.log", extra)
        stack.callback(worker.wait, timeout=60)
        stack.callback(worker.terminate)
        yield api, worker


FIGURES = {  # run_batch's key (without _per_image) -> what it is
    "cpu_ms": "CPU of every process of the worker (intake, lanes, image workers) per image",
    "serial_ms": "the busiest thread of the intake and lanes, per image of the whole worker",
    "intake_serial_ms": "the intake's busiest thread (the path every job shares) per image",
    "intake_serial_net_ms": "the same, less what that thread spends idle (idle_rates) over the batch's time",
    "gateway_process_ms": "the busiest gateway process (intake or a lane) per image of the whole worker",
    "intake_process_ms": "the intake process per image",
    "busiest_pool_thread_ms": "the busiest image-worker thread per image",
}


def measure(args: argparse.Namespace, extra: dict[str, str], lanes: int, photo_b64: str, tiny_b64: str) -> dict:
    """Every workload's runs on one worker with ``lanes`` lanes (its own Triton and bucket)."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        settings = {**extra, "LANES": str(lanes)}
        repository = instant_repository(root / "repository")
        with deployed_worker(root, repository, settings, bucket="outputs") as (api, worker):
            api.wait_for([api.submit({"image_b64": photo_b64, "tasks": ALL_TASKS})], timeout=300)  # warm-up
            intake = [
                run_batch(api, worker.pid, [{"image_b64": tiny_b64}] * args.tiny_jobs, 1) for _ in range(args.runs)
            ]
            measured: dict[str, list[dict]] = {name: [] for name in WORKLOADS if name in args.workloads}
            for _round in range(args.runs):
                for name, batches in measured.items():
                    tasks, mode = WORKLOADS[name]
                    job = {"image_b64": photo_b64, "tasks": tasks, "output_mode": mode}
                    batches.append(run_batch(api, worker.pid, [job] * args.images, 1))
            idle = idle_rates(worker.pid)  # after the batches: an idle spell before them slowed the first one
    for batch in [*intake, *(run for runs in measured.values() for run in runs)]:
        busy = [t - idle.get(int(tid), 0.0) * batch["duration_s"] for tid, t in batch["intake_thread_s"].items()]
        batch["intake_serial_net_ms_per_image"] = max(busy) / batch["images"] * 1000
    return {"intake": intake, "measured": measured, "intake_idle_ms_per_s": 1000 * idle.get(worker.pid, 0.0)}


def summarize(runs: dict, cal: float, lanes: int) -> dict:
    """Medians of one lanes setting's runs, in ms and cal, with what they bound."""

    def median(batch: list[dict], key: str) -> float:
        return statistics.median(run[key] for run in batch)

    rows = {}
    for name, batch in runs["measured"].items():
        row = {key: median(batch, f"{key}_per_image") for key in FIGURES}
        in_cal = ("cpu_ms", "serial_ms", "intake_serial_ms", "intake_serial_net_ms")
        row |= {f"{key}_cal": row[key] / (cal * 1000) for key in in_cal}
        row["images_per_s_here"] = median(batch, "per_second")
        for cores in (16, 24):
            row[f"projected_{cores}_core_images_per_s"] = min(cores / row["cpu_ms"], 1 / row["serial_ms"]) * 1000
        inline = runs["measured"].get(name.removesuffix(", url")) if name.endswith(", url") else None
        if inline:  # the same round's inline batch of the same tasks
            pairs = zip(batch, inline, strict=True)
            row["cpu_over_inline"] = statistics.median(url["cpu_ms_per_image"] / same["cpu_ms_per_image"]
                                                       for url, same in pairs)  # fmt: skip
        rows[name] = row
    return {"lanes": lanes, "intake_jobs_per_s": median(runs["intake"], "per_second"),
            "intake_idle_ms_per_s": runs["intake_idle_ms_per_s"], "workloads": rows}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--images", type=int, default=60, help="1024x768 images per run and workload")
    parser.add_argument("--tiny-jobs", type=int, default=300, help="tiny jobs per intake run")
    parser.add_argument("--lanes", type=int, nargs="+", default=[1, 2, 3], help="one worker per lanes setting")
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
    raw = {lanes: measure(args, extra, lanes, photo_b64, tiny_b64) for lanes in args.lanes}
    cal = (cal_before + calibration(jpeg)) / 2
    settings = {lanes: summarize(runs, cal, lanes) for lanes, runs in raw.items()}

    print(f"calibration: {cal * 1000:.0f} ms CPU (mean of before/after); {args.runs} runs each, medians")
    for lanes, summary in settings.items():
        rows = summary["workloads"]
        print(f"\n## {lanes} lane(s): intake {summary['intake_jobs_per_s']:.0f} tiny jobs/s, "
              f"idle intake {summary['intake_idle_ms_per_s']:.0f} ms CPU/s\n")  # fmt: skip
        print(
            "| workload | CPU per image | url / inline | busiest thread | intake's busiest thread (less idle) "
            "| busiest process | 16 cores | 24 cores | here |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        )
        for name, row in rows.items():
            ratio = f"{row['cpu_over_inline']:.2f}x" if "cpu_over_inline" in row else "-"
            print(f"| `{name}` | {row['cpu_ms_cal']:.3f} cal | {ratio} | {row['serial_ms_cal']:.3f} cal "
                  f"| {row['intake_serial_ms_cal']:.4f} ({row['intake_serial_net_ms_cal']:.4f}) cal "
                  f"| {row['gateway_process_ms']:.1f} ms "
                  f"| {row['projected_16_core_images_per_s']:.0f}/s | {row['projected_24_core_images_per_s']:.0f}/s "
                  f"| {row['images_per_s_here']:.0f}/s |")  # fmt: skip
    print("\ntargets (issue 9, one lane):", json.dumps(TARGETS))
    payload = {
        "calibration_ms": cal * 1000,
        "runs": args.runs,
        "worker_settings": extra,
        "figures": FIGURES,
        "lanes": settings,
        "raw": raw,
        "targets": TARGETS,
    }
    name = "_".join(["worker", *(f"{key}-{value}".lower() for key, value in extra.items())])
    if args.workloads != list(WORKLOADS) or args.lanes != [1, 2, 3]:
        chosen = [workload.replace(", ", "-").replace(" ", "-") for workload in args.workloads]
        name += "_only-" + "-".join([*chosen, *(f"{lanes}lanes" for lanes in args.lanes)])
    path = write(name, payload)  # worker.json for the defaults
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

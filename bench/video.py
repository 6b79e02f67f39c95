"""What video costs, measured as deployed: runpod's production job loop, an instant model, 1080p clips.

Three parts, all in calibration units (``bench.worker``'s workload: a 1024x768 JPEG to a 16-bit PNG):

1. The worker: CPU per sampled 1080p frame (decode, resize to ``max_size`` 1024, network input, align,
   spool, and the outputs' encoding) for ``depth`` and ``depth`` + ``colorized``, the whole worker and
   its image-worker processes; the event loop (the one thread every job shares), the whole gateway
   process (all of it, were one GIL to hold it) and the encoding process (one job's serial part) per
   frame; frames/s of one job here. Projected for a 16-core host running many jobs:
   ``min(16 / CPU per frame, 1 / event loop per frame)``, and the same with the whole gateway process
   in place of the event loop; one job alone is bounded by its encoding process (``1 / encoding``).
2. ``VIDEO_WINDOW`` 1 against the default: frames at Triton at once, one request each.
3. The H.264 preset for the colorized video: CPU per 1024x576 frame and bytes, libx264 presets
   against each other on the same frames (and FFV1's cost for the depth video).

Run: ``python -m bench.video`` (about 3 minutes on 2 cores); results in ``bench/results/video.json``.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import tempfile
import time
from pathlib import Path

import av
import cv2
import numpy as np

from bench import clips
from bench.common import machine, write
from bench.worker import (
    calibration,
    children,
    deployed_worker,
    instant_repository,
    photo_jpeg,
    process_cpu,
    thread_cpu,
)
from devstack.jobapi import JobApi
from gateway.outputs import postprocess as pp

MODEL_ID = "depth-anything/Depth-Anything-V2-Small-hf"
WORKLOADS = {"depth": ["depth"], "depth+colorized": ["depth", "colorized"]}
PRESETS = ("ultrafast", "superfast", "veryfast", "faster")


def source_clip(frames: int) -> bytes:
    """A 1080p, 30 frames/s panning clip (H.264, as phones record)."""
    return clips.encode(clips.panning(1920, 1080, frames, pan=6), fps=30, x264={"crf": "23", "preset": "veryfast"})


def measure_job(api: JobApi, pid: int, job: dict) -> dict:
    """One video job: CPU per frame of the worker and its processes, and its serial parts."""
    pool = children(pid)
    threads_before = thread_cpu(pid)
    before = {"gateway": process_cpu(pid), **{child: process_cpu(child) for child in pool}}
    job_id = api.submit(job)
    output = api.wait_for([job_id], timeout=900)[job_id]["output"]
    (result,) = output["results"]
    if "error" in result:
        raise RuntimeError(result["error"])
    threads_after = thread_cpu(pid)
    after = {"gateway": process_cpu(pid), **{child: process_cpu(child) for child in pool}}
    frames = result["frames"]
    children_cpu = {child: after[child] - before[child] for child in pool}
    wall = api.done_at[job_id] - api.taken_at[job_id]
    return {
        "frames": frames,
        "wall_s": wall,
        "frames_per_s": frames / wall,
        "cpu_ms_per_frame": (after["gateway"] - before["gateway"] + sum(children_cpu.values())) / frames * 1000,
        "gateway_ms_per_frame": (after["gateway"] - before["gateway"]) / frames * 1000,
        "event_loop_ms_per_frame": (threads_after[pid] - threads_before.get(pid, 0.0)) / frames * 1000,
        "encoding_ms_per_frame": max(children_cpu.values(), default=0.0) / frames * 1000,
        "timings": result["timings"],
    }


def worker_figures(clip: bytes, runs: int, window: int | None) -> dict:
    """Jobs with their outputs in a bucket (SeaweedFS on loopback): the path a video's outputs take."""
    extra = {"CPU_WORKERS": "2", "MAX_VIDEO_FRAMES": "100000"}
    if window is not None:
        extra["VIDEO_WINDOW"] = str(window)
    video_b64 = base64.b64encode(clip).decode()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        with deployed_worker(root, instant_repository(root / "repository"), extra, bucket="videos") as (api, worker):
            warm = api.submit(
                {"video_b64": video_b64, "max_frames": 5, "tasks": ["depth", "colorized"], "output_mode": "url"}
            )
            api.wait_for([warm], timeout=300)
            workloads = WORKLOADS if window is None else {"depth": ["depth"]}
            return {
                name: [
                    measure_job(api, worker.pid, {"video_b64": video_b64, "tasks": tasks, "output_mode": "url"})
                    for _ in range(runs)
                ]
                for name, tasks in workloads.items()
            }


def preset_figures(clip: bytes, frames: int = 60) -> dict:
    """libx264 presets and FFV1 on the colorized and 16-bit frames of the clip at 1024x576."""
    pictures = []
    with av.open(io.BytesIO(clip)) as container:
        for frame in container.decode(video=0):
            gray = frame.to_ndarray(format="gray", width=1024, height=576).astype(np.float32) / 255
            pictures.append(gray)
            if len(pictures) == frames:
                break
    colour = [pp.colorize(np.ascontiguousarray(cv2.GaussianBlur(p, (0, 0), 2)), "viridis") for p in pictures]
    wide = [(p * 65535).astype(np.uint16) for p in pictures]
    figures = {}
    for name, codec, pix, images, options in [
        *((f"libx264 {preset}", "libx264", "yuv420p", colour, {"preset": preset, "crf": "20"}) for preset in PRESETS),
        ("ffv1 gray16le", "ffv1", "gray16le", wide, {"level": "3", "slices": "4"}),
    ]:
        buffer = io.BytesIO()
        started = time.process_time()
        with av.open(buffer, "w", format="mp4" if codec == "libx264" else "matroska") as out:
            stream = out.add_stream(codec, rate=30, options={**options, "threads": "1"})
            stream.width, stream.height, stream.pix_fmt = 1024, 576, pix
            for image in images:
                for packet in stream.encode(
                    av.VideoFrame.from_ndarray(image, format="rgb24" if pix == "yuv420p" else pix)
                ):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        cpu = time.process_time() - started
        figures[name] = {
            "ms_per_frame": cpu / len(images) * 1000,
            "kb_per_frame": len(buffer.getvalue()) / len(images) / 1000,
        }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--frames", type=int, default=90, help="1080p frames of the clip (30 frames/s)")
    args = parser.parse_args()
    jpeg = photo_jpeg()
    cal_before = calibration(jpeg)
    clip = source_clip(args.frames)
    measured = worker_figures(clip, args.runs, None)
    windows = {"1": worker_figures(clip, args.runs, 1)["depth"], "8 (default)": measured["depth"]}
    presets = preset_figures(clip)
    cal = (cal_before + calibration(jpeg)) / 2 * 1000  # ms

    def median(runs: list[dict], key: str) -> float:
        return statistics.median(run[key] for run in runs)

    rows = {}
    for name, runs in measured.items():
        keys = ("cpu_ms_per_frame", "event_loop_ms_per_frame", "gateway_ms_per_frame", "encoding_ms_per_frame")
        cpu, loop, gateway, encoding = (median(runs, key) for key in keys)
        rows[name] = {
            "cpu_ms": cpu,
            "cpu_cal": cpu / cal,
            "event_loop_ms": loop,
            "gateway_process_ms": gateway,
            "encoding_ms": encoding,
            "frames_per_s_here": median(runs, "frames_per_s"),
            "projected_16_core_frames_per_s": min(16 / cpu, 1 / loop) * 1000,
            "projected_16_core_if_gil_bound": min(16 / cpu, 1 / gateway) * 1000,
            "one_job_frames_per_s_bound": 1000 / encoding,
        }
    print(
        f"machine: {machine()['cpu']}, {machine()['cores']} cores; calibration {cal:.0f} ms; {args.runs} runs, medians"
    )
    print("\n| tasks | CPU per 1080p frame | event loop | gateway process | encoding process "
          "| one job here | 16 cores, many jobs (projected) | same, if one GIL held the gateway process |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|")  # fmt: skip
    for name, row in rows.items():
        print(f"| `{name}` | {row['cpu_cal']:.2f} cal ({row['cpu_ms']:.0f} ms) | {row['event_loop_ms']:.1f} ms "
              f"| {row['gateway_process_ms']:.1f} ms "
              f"| {row['encoding_ms']:.1f} ms | {row['frames_per_s_here']:.0f} frames/s "
              f"| {row['projected_16_core_frames_per_s']:.0f} frames/s "
              f"| {row['projected_16_core_if_gil_bound']:.0f} frames/s |")  # fmt: skip
    print("\n| VIDEO_WINDOW | one `depth` job here |\n|---|---:|")
    for name, runs in windows.items():
        print(f"| {name} | {median(runs, 'frames_per_s'):.0f} frames/s |")
    print("\n| encoder (1024x576, one thread) | CPU per frame | size per frame |\n|---|---:|---:|")
    for name, figure in presets.items():
        print(f"| {name} | {figure['ms_per_frame']:.1f} ms | {figure['kb_per_frame']:.0f} kB |")
    payload = {"machine": machine(), "calibration_ms": cal, "runs": args.runs, "frames": args.frames, "rows": rows,
               "windows": windows, "presets": presets, "raw": measured}  # fmt: skip
    print(f"wrote {write('video', payload)}")


if __name__ == "__main__":
    main()

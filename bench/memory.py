"""Peak working memory of one image, per task set: what ``budget.estimated_work_bytes`` must stay above.

    python -m bench.memory

Each case runs in a fresh process whose peak RSS (``VmHWM``) is reset after its imports: a 2304x1728 (4 MP) JPEG is
decoded and prepared for the network, a smooth depth map at the network size stands in for the model,
and the outputs of the task set are rendered, as an image worker does (``keep_freed_memory`` on). The
peak RSS growth over the process's start is reported next to the estimate the worker reserves for the
same image. Writes bench/results/memory.json.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys

from bench.common import write
from catalogue.models import MODELS

MODEL_ID = "depth-anything/Depth-Anything-V2-Small-hf"
WIDTH, HEIGHT = 2304, 1728
ALL_TASKS = ["depth", "colorized", "normals", "disparity", "point_cloud", "points", "mesh"]
CASES = [
    (["depth"], None),
    (["colorized"], None),
    (["normals"], None),
    (["disparity"], None),
    (["point_cloud"], None),
    (["points"], None),
    (["mesh"], None),
    (ALL_TASKS, None),
    (["depth", "point_cloud"], 1036),
]


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        lines = status.read().splitlines()
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> int:
    """Reset this process's peak RSS (imports may have peaked higher than the work); the RSS now."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    return status_bytes("VmRSS")


def one_case(tasks: list[str], process_res: int | None) -> dict:
    """In this (fresh) process: the peak of one image's decode and render."""
    import cv2
    import numpy as np
    from PIL import Image
    from skimage import data

    from export.triton_config import build_config
    from gateway.inputs.budget import estimated_work_bytes
    from gateway.inputs.schema import parse_request
    from gateway.outputs.render import needs_photo
    from gateway.served_model import ServedModel
    from gateway.serving.imagework import decode_and_prepare, keep_freed_memory, render_outputs

    keep_freed_memory()
    photo = cv2.resize(data.astronaut(), (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC)
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "JPEG", quality=95)
    payload: dict = {"image_b64": "x", "tasks": tasks, "include_raw": "depth" in tasks}
    if process_res:
        payload["process_res"] = process_res
    if "points" in tasks:
        payload["max_points"] = 5_000_000
    if "mesh" in tasks:
        payload["max_mesh_vertices"] = 2_000_000
    request = parse_request(payload, 16).request
    model = ServedModel.from_config(build_config(MODELS[MODEL_ID], "fp32", "onnxruntime"))
    before = reset_peak()
    decoded = decode_and_prepare(buffer.getvalue(), 50_000_000, request, model, None)
    width, height = decoded.network_size
    depth = np.add.outer(np.linspace(1, 2, height), np.linspace(0, 1, width)).astype(np.float32)
    outputs = render_outputs(decoded, depth, request, model, None)
    peak = status_bytes("VmHWM") - before
    network = model.largest_pixels(process_res)
    estimate = estimated_work_bytes(
        WIDTH * HEIGHT, network, tasks, request.include_raw, needs_photo(tasks), request.max_points,
        request.max_mesh_vertices,
    )  # fmt: skip
    return {
        "tasks": tasks,
        "process_res": process_res,
        "peak_mb": round(peak / 1e6, 1),
        "estimate_mb": round(estimate / 1e6, 1),
        "outputs_mb": round(sum(len(v) for v in outputs.values() if isinstance(v, str)) / 1e6, 1),
    }


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--case":
        tasks, process_res = json.loads(sys.argv[2])
        print(json.dumps(one_case(tasks, process_res)))
        return
    rows = []
    for tasks, process_res in CASES:
        line = subprocess.run(
            [sys.executable, "-m", "bench.memory", "--case", json.dumps([tasks, process_res])],
            capture_output=True, text=True, check=True,
        ).stdout.strip().splitlines()[-1]  # fmt: skip
        rows.append(json.loads(line))
        row = rows[-1]
        print(f"{'+'.join(row['tasks']):>58} res {row['process_res'] or 518:>4}: peak {row['peak_mb']:7.1f} MB, "
              f"estimate {row['estimate_mb']:7.1f} MB, outputs {row['outputs_mb']:6.1f} MB")  # fmt: skip
    write("memory", {"image": f"{WIDTH}x{HEIGHT} JPEG", "cases": rows})


if __name__ == "__main__":
    main()

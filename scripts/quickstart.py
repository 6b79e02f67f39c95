"""From nothing to depth maps: export the default model, start the local stack, send a photo through every task.

Run through ``scripts/quickstart.sh`` (which installs what this needs). Steps, each timed:
1. export the model (``$DEPTH_MODEL``, default Depth-Anything-V2-Small) from the hub, from a local
   Hugging Face checkpoint given with ``--checkpoint DIR`` or ``$CHECKPOINT``, or from a tiny random-weight
   checkpoint of the same architecture it makes itself (``--random-weights``: no weights needed at all), into
   ``OUT/model_repository`` with the Python backend (the local tritonserver has only that one), in FP32
   when there is no GPU; skipped when that model was already exported from the same checkpoint path;
2. start ``python -m gateway`` (embedded Triton + Runpod's local API) on a free port;
3. send a sample photo (scikit-image's, or ``--image FILE``) through every task (``--tasks`` to choose,
   ``--format`` for the image outputs) with the client;
4. print where the outputs are.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
from skimage import data

from devstack.local import start_gateway, wait_for_api
from gateway.serving.triton_process import free_port

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["depth", "colorized", "normals", "disparity", "point_cloud", "points", "mesh"]
NO_WEIGHTS = """\
No model weights: the hub is not reachable from here and no local checkpoint was given.
Pass a Hugging Face checkpoint directory of {model}:
    scripts/quickstart.sh --checkpoint /path/to/checkpoint      (or CHECKPOINT=/path/to/checkpoint)
To try the pipeline without real weights (the outputs are then not depth, everything else is real):
    scripts/quickstart.sh --random-weights
"""


def step(label: str, timings: list[tuple[str, float]]):
    class Timer:
        def __enter__(self) -> None:
            print(f"==> {label}", flush=True)
            self.started = time.perf_counter()

        def __exit__(self, *exc: object) -> None:
            timings.append((label, time.perf_counter() - self.started))

    return Timer()


def default_precision() -> str:
    """FP16 on a GPU; FP32 without one, where onnxruntime runs FP32 faster than FP16 (real-size Small at
    686x518 on this project's 2-core CPU: 1267 ms against 1650 ms) and exactly."""
    import torch  # the exporter's dependency; imported here only, it takes seconds

    if torch.cuda.is_available():
        return "fp16"
    print("no GPU: exporting and serving FP32, which is faster than FP16 on a CPU", flush=True)
    return "fp32"


def already_exported(repository: Path, model: str, precision: str, checkpoint: Path | None) -> bool:
    """Whether ``model`` at ``precision`` is in ``repository``, exported from the same checkpoint (its
    export report says which); the hub's weights count as the same only for the same model id."""
    from catalogue.models import MODELS

    report_path = repository / MODELS[model].served_name(precision) / "export_report.json"
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError):
        return False
    source = str(checkpoint) if checkpoint is not None else model
    return report.get("checkpoint") == source and report.get("precision") == precision


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=os.environ.get("CHECKPOINT") or None)
    parser.add_argument("--model", default=os.environ.get("DEPTH_MODEL", "depth-anything/Depth-Anything-V2-Small-hf"))
    parser.add_argument("--out", type=Path, default=ROOT / "out")
    parser.add_argument("--image", type=Path, help="your own photo (default: a sample photo)")
    parser.add_argument("--random-weights", action="store_true", help="make a random-weight checkpoint and use it")
    parser.add_argument("--tasks", nargs="+", default=TASKS, help="tasks to ask for (default: all seven)")
    parser.add_argument("--format", choices=["png", "webp", "jpg"], default="png", help="colorized, normals, disparity")
    args = parser.parse_args()
    out = args.out.resolve()
    repository = out / "model_repository"
    timings: list[tuple[str, float]] = []

    if args.random_weights and not args.checkpoint:
        args.checkpoint = out / "checkpoints" / "random"
        if not (args.checkpoint / "config.json").exists():
            with step(f"make a random-weight checkpoint of {args.model}", timings):
                command = [sys.executable, "-m", "export.random_checkpoint", args.model, "--out", str(args.checkpoint)]
                command += ["--size", "tiny"]  # seconds to export: it shows every part working, not their speed
                subprocess.run(command, cwd=ROOT, check=True)
    precision = default_precision()
    if already_exported(repository, args.model, precision, args.checkpoint):
        print(f"==> export: {args.model} ({precision}) is already exported from the same checkpoint; skipped")
    else:
        with step(f"export {args.model} ({precision}); about a minute on a CPU", timings):
            command = [sys.executable, "-m", "export", args.model, "--repository", str(repository)]
            command += ["--backend", "python", "--precision", precision]
            if args.checkpoint:
                command += ["--checkpoint", str(args.checkpoint)]
            exported = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
            print(exported.stdout.strip())
            if exported.returncode != 0:
                print(exported.stderr.strip(), file=sys.stderr)
                if not args.checkpoint and "could not load" in exported.stderr:
                    print(NO_WEIGHTS.format(model=args.model), file=sys.stderr)
                return 2

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"MODEL_REPOSITORY": str(repository), "DEPTH_MODEL": args.model, "TRITON_URL": ""}
    log_path = out / "gateway.log"
    with step("start Triton and the gateway", timings):
        gateway = start_gateway(env, port, log_path)
        try:
            wait_for_api(gateway, url, log_path, timeout=300)
        except RuntimeError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    try:
        image = args.image
        if image is None:
            image = out / "sample.jpg"
            cv2.imwrite(str(image), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
        with step(f"depth for {image.name}: {' '.join(args.tasks)}", timings):
            command = [
                sys.executable,
                "-m",
                "gateway.client",
                str(image),
                "--endpoint",
                url,
                "--out",
                str(out / "results"),
            ]
            sent = subprocess.run(
                [*command, "--tasks", *args.tasks, "--format", args.format, "--include-raw"], cwd=ROOT
            )
            if sent.returncode != 0:
                return 1
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
    print("\nTimings:")
    for label, seconds in timings:
        print(f"  {seconds:7.2f} s  {label}")
    print(f"\nOutputs: {out / 'results'}\nGateway log: {log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

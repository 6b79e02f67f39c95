"""From nothing to depth maps: export the default model, start the local stack, send a photo through every task.

Run through ``scripts/quickstart.sh`` (which installs what this needs). Steps, each timed:
1. export the model (``$DEPTH_MODEL``, default Depth-Anything-V2-Small) from the hub, or from a local
   Hugging Face checkpoint given with ``--checkpoint DIR`` or ``$CHECKPOINT``, into ``OUT/model_repository``
   with the Python backend (the local tritonserver has only that one);
2. start ``python -m gateway`` (embedded Triton + Runpod's local API) on a free port;
3. send a sample photo (scikit-image's, or ``--image FILE``) through all five tasks with the client;
4. print where the outputs are.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cv2
from skimage import data

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["depth", "colorized", "normals", "disparity", "point_cloud"]
NO_WEIGHTS = """\
No model weights: the hub is not reachable from here and no local checkpoint was given.
Pass a Hugging Face checkpoint directory of {model}:
    scripts/quickstart.sh --checkpoint /path/to/checkpoint      (or CHECKPOINT=/path/to/checkpoint)
To try the pipeline without real weights, make a random-weight one first:
    .venv/bin/python -m export.random_checkpoint {model} --out checkpoints/random
"""


def step(label: str, timings: list[tuple[str, float]]):
    class Timer:
        def __enter__(self) -> None:
            print(f"==> {label}", flush=True)
            self.started = time.perf_counter()

        def __exit__(self, *exc: object) -> None:
            timings.append((label, time.perf_counter() - self.started))

    return Timer()


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_api(process: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("error: the gateway exited during start-up (see its log above)")
        try:
            request = urllib.request.Request(f"{url}/runsync", data=b'{"input": {}}', method="POST")
            request.add_header("Content-Type", "application/json")
            urllib.request.urlopen(request, timeout=5).read()
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"error: the gateway API did not come up within {timeout:g} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=os.environ.get("CHECKPOINT") or None)
    parser.add_argument("--model", default=os.environ.get("DEPTH_MODEL", "depth-anything/Depth-Anything-V2-Small-hf"))
    parser.add_argument("--out", type=Path, default=ROOT / "out")
    parser.add_argument("--image", type=Path, help="your own photo (default: a sample photo)")
    args = parser.parse_args()
    out = args.out.resolve()
    repository = out / "model_repository"
    timings: list[tuple[str, float]] = []

    with step(f"export {args.model}", timings):
        command = [sys.executable, "-m", "export", args.model, "--repository", str(repository), "--backend", "python"]
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
    env = {**os.environ, "MODEL_REPOSITORY": str(repository), "DEPTH_MODEL": args.model, "TRITON_URL": ""}
    with step("start Triton and the gateway", timings):
        command = [sys.executable, "-m", "gateway", "--rp_serve_api", "--rp_api_port", str(port)]
        log = (out / "gateway.log").open("wb")
        gateway = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for_api(gateway, url, timeout=300)
    try:
        image = args.image
        if image is None:
            image = out / "sample.jpg"
            cv2.imwrite(str(image), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
        with step(f"depth for {image.name}, all tasks", timings):
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
            sent = subprocess.run([*command, "--tasks", *TASKS, "--include-raw"], cwd=ROOT)
            if sent.returncode != 0:
                return 1
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
    print("\nTimings:")
    for label, seconds in timings:
        print(f"  {seconds:7.2f} s  {label}")
    print(f"\nOutputs: {out / 'results'}\nGateway log: {out / 'gateway.log'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

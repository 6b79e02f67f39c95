"""CPU of the two multi-megabyte copies a lane makes for an inline result: reading the image worker's
parked base64 back, and posting the job-done body.

    python -m bench.lane_copies [--repeats 15]

The payload is all five 2D tasks as ``bench.worker``'s worker renders them for its 1024x768 photo (its
instant model's depth), base64 as in an inline answer.

- Parked read: ``SharedOutputs.read`` (text decoded straight from the mapped segment) against what it
  replaced, each output read as bytes (``pread``) and then decoded.
- Job-done post: ``result_post.pieces`` (a large body in views, with its Content-Length) against the body
  given to aiohttp whole, both through one aiohttp session to a loopback aiohttp server in another process
  (its work is not counted).

CPU is this thread's (``time.thread_time``, user and system: the kernel's copies count), ours and the
baseline alternately, ``--repeats`` rounds of 10 calls, medians. Writes bench/results/lane_copies.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp
import numpy as np
import orjson
import pybase64

from bench.common import write
from bench.cpu_postprocess import MODEL
from bench.worker import photo_jpeg
from catalogue.size import Size
from gateway.inputs.decode import decode_image
from gateway.inputs.network_input import prepare
from gateway.inputs.schema import DepthRequest
from gateway.outputs.encode import keep
from gateway.outputs.output_names import OUTPUTS
from gateway.outputs.render import render
from gateway.serving.imagework import keep_freed_memory
from gateway.serving.result_post import pieces
from gateway.serving.shared_memory import SHM_DIR, SharedOutputs
from gateway.serving.triton_process import free_port

SERVER = """
import sys
from aiohttp import web
async def done(request):
    await request.read()
    return web.Response(text="ok")
app = web.Application(client_max_size=64 << 20)
app.router.add_post("/done", done)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    ends = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > ends:
                raise
            time.sleep(0.05)


def five_outputs() -> dict[str, bytes]:
    """The encoded outputs of all five 2D tasks for ``bench.worker``'s photo and its instant model's depth
    (a ramp plus the network input's green channel), as that benchmark's worker renders them."""
    photo = decode_image(photo_jpeg(), 50_000_000)
    network = prepare(photo, 1024, MODEL).network_input
    height, width = network.shape[:2]
    ramp = np.add.outer(np.linspace(1, 2, height), np.linspace(0, 1, width)).astype(np.float32)
    depth = ramp + network[..., 1].astype(np.float32) * np.float32(1 / 255)
    request = DepthRequest(image_b64="x", tasks=["depth", "colorized", "normals", "disparity", "point_cloud"])
    rendered = render(Size.of(photo), photo, depth, request, MODEL, pack=keep)
    return {key: value for key, value in rendered.items() if key in OUTPUTS}


def read_then_decode(parked: SharedOutputs) -> dict[str, str]:
    """The replaced read: every output as bytes from the file, then decoded."""
    fd = os.open(os.path.join(SHM_DIR, parked.name), os.O_RDONLY)
    try:
        outputs = {key: os.pread(fd, size, at) for key, (at, size) in parked.spans.items()}
    finally:
        os.close(fd)
    return {key: data.decode("ascii") for key, data in outputs.items()}


async def timed(ours: Callable[[], Awaitable[object]], baseline: Callable[[], Awaitable[object]], rounds: int) -> dict:
    samples: dict[str, list[float]] = {"ours": [], "baseline": []}
    for _ in range(rounds):
        for name, function in (("ours", ours), ("baseline", baseline)):
            started = time.thread_time()
            for _ in range(10):
                await function()
            samples[name].append((time.thread_time() - started) * 100)  # ms per call
    ours_ms, baseline_ms = statistics.median(samples["ours"]), statistics.median(samples["baseline"])
    return {"ours_ms": ours_ms, "baseline_ms": baseline_ms, "ratio": ours_ms / baseline_ms}


async def run(rounds: int, port: int) -> dict:
    outputs = {key: pybase64.b64encode(data) for key, data in five_outputs().items()}
    parked = SharedOutputs.park(outputs, text=True)
    if parked is None:
        raise SystemExit(f"no room in {SHM_DIR} for the parked outputs")
    try:

        async def mapped() -> None:
            parked.read()

        async def pread() -> None:
            read_then_decode(parked)

        assert parked.read() == read_then_decode(parked)
        figures = {"parked read": await timed(mapped, pread, rounds)}
    finally:
        parked.discard()
    body = orjson.dumps({"output": {key: data.decode() for key, data in outputs.items()}})
    url = f"http://127.0.0.1:{port}/done"
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    async with aiohttp.ClientSession() as session:

        async def post(data: object, extra: dict) -> None:
            async with session.post(url, data=data, headers={**headers, **extra}) as response:
                await response.read()
                assert response.status == 200

        async def in_pieces() -> None:
            await post(pieces(body), {"Content-Length": str(len(body))})

        async def whole() -> None:
            await post(body, {})

        figures["job-done post"] = await timed(in_pieces, whole, rounds)
    return {"body_bytes": len(body), "figures": figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    keep_freed_memory()  # as in the lanes: the heap is reused, not page-faulted in again
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])
    try:
        wait_for_port(port)
        results = asyncio.run(run(args.repeats, port))
    finally:
        server.kill()
        server.wait()
    print(f"{results['body_bytes'] / 1e6:.1f} MB of base64 (all five 2D tasks), CPU ms per call, medians")
    print("| step | ours | baseline | ours / baseline |")
    print("|---|---:|---:|---:|")
    for name, row in results["figures"].items():
        print(f"| {name} | {row['ours_ms']:.2f} | {row['baseline_ms']:.2f} | {row['ratio']:.2f} |")
    print(write("lane_copies", {"repeats": args.repeats, **results}))


if __name__ == "__main__":
    main()

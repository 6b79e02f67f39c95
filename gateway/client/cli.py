"""Command line: ``python -m gateway.client INPUT... --out OUT [options]``.

Every INPUT (file, folder, glob, ``@list.txt``, URL; see ``inputs``) becomes one image; ``--images-per-job``
of them make a job (default 1). Jobs go to a deployed endpoint (``--endpoint-id`` with
``RUNPOD_API_KEY``) or a local one (``--endpoint URL``, Runpod's local API), at most ``--concurrency`` in
flight (``--sync`` sends one ``/runsync`` request per job instead of ``/run`` + ``/status``). An image
whose outputs are all under ``--out`` already is skipped. Request options: ``--tasks``, ``--model``,
``--colormap``, ``--format``, ``--include-raw``, and any other field of the API as ``--set NAME=JSON``
(``--set process_res=770``, ``--set 'camera={"fov_x": 70}'``); the request is validated against the
API's schema before anything is sent. Prints a progress bar on a terminal and a summary at the end
(``--json``: the summary as JSON on stdout). Exit status 0 when every image succeeded (or was skipped),
1 when any failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from gateway.client.inputs import Item, expand
from gateway.client.jobs import Endpoint, JobFailed
from gateway.client.outputs import already_done, remove_temporaries, write_result
from gateway.inputs.schema import RequestError, parse_request

DEPLOYED = "https://api.runpod.ai/v2/{endpoint_id}"


@dataclass
class Summary:
    done: int = 0
    skipped: int = 0
    failed: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"done": self.done, "skipped": self.skipped, "failed": self.failed}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gateway.client", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders, globs, @list.txt, URLs")
    parser.add_argument("--out", type=Path, required=True, help="folder for the outputs (mirrors the inputs)")
    parser.add_argument("--tasks", nargs="+", default=["depth", "colorized"])
    parser.add_argument("--model")
    parser.add_argument("--colormap")
    parser.add_argument("--format", choices=["png", "webp", "jpg"], default="png")
    parser.add_argument("--include-raw", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=JSON", help="any other request field")
    parser.add_argument("--endpoint", default="http://127.0.0.1:8000", help="Runpod local API base URL")
    parser.add_argument("--endpoint-id", help="a deployed Runpod endpoint (needs RUNPOD_API_KEY)")
    parser.add_argument("--images-per-job", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=8, help="jobs in flight")
    parser.add_argument("--retries", type=int, default=6)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per HTTP request")
    parser.add_argument("--sync", action="store_true", help="/runsync, one request per job")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_intermixed_args(argv)  # inputs may come after options too
    if args.images_per_job < 1 or args.concurrency < 1 or args.retries < 0:
        parser.error("--images-per-job and --concurrency must be at least 1, --retries at least 0")
    return args


def request_template(args: argparse.Namespace) -> dict:
    """The request options every job carries, checked against the API's schema (raises ValueError)."""
    template: dict = {"tasks": args.tasks, "output_format": args.format}
    if args.model:
        template["model"] = args.model
    if args.colormap:
        template["colormap"] = args.colormap
    if args.include_raw:
        template["include_raw"] = True
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes NAME=JSON, got {item!r}")
        try:
            template[name] = json.loads(value)
        except json.JSONDecodeError:
            template[name] = value  # a bare word: a string
    try:
        parse_request({**template, "image_b64": "AA=="}, max_images=10**6)
    except RequestError as error:
        raise ValueError(f"request options: {error}") from None
    return template


def endpoint(args: argparse.Namespace) -> Endpoint:
    headers = {"Content-Type": "application/json"}
    base = args.endpoint
    if args.endpoint_id:
        key = os.environ.get("RUNPOD_API_KEY")
        if not key:
            raise ValueError("--endpoint-id needs RUNPOD_API_KEY in the environment")
        headers["Authorization"] = f"Bearer {key}"
        base = DEPLOYED.format(endpoint_id=args.endpoint_id)
    return Endpoint(base, headers, retries=args.retries, request_timeout=args.timeout)


def source_of(item: Item) -> dict:
    if item.is_url:
        return {"type": "url", "data": item.source}
    return {"type": "b64", "data": base64.b64encode(Path(item.source).read_bytes()).decode()}


class Run:
    def __init__(self, args: argparse.Namespace, template: dict, client: Endpoint, progress: tqdm) -> None:
        self.args = args
        self.template = template
        self.client = client
        self.progress = progress
        self.summary = Summary()

    def pending(self, items: Iterator[Item]) -> Iterator[list[Item]]:
        """Jobs of ``--images-per-job`` images whose outputs are not all there yet."""
        tasks, fmt, raw = self.template["tasks"], self.args.format, self.args.include_raw
        todo = (i for i in items if not self._skip(i, already_done(self.args.out, i.name, tasks, fmt, raw)))
        while chunk := list(itertools.islice(todo, self.args.images_per_job)):
            yield chunk

    def _skip(self, item: Item, done: bool) -> bool:
        if done:
            self.summary.skipped += 1
            self.progress.update(1)
        return done

    async def worker(self, jobs: Iterator[list[Item]]) -> None:
        for job in jobs:  # the workers share one iterator: each takes the next job when it is free
            await self.one_job(job)

    async def one_job(self, items: list[Item]) -> None:
        images, sent = [], []
        for item in items:
            try:
                images.append(await asyncio.to_thread(source_of, item))
                sent.append(item)
            except OSError as error:
                self.fail(item, f"could not read the file: {error.strerror or error}")
        if not sent:
            return
        payload = {**self.template, "images": images}
        try:
            reply = await (self.client.runsync(payload) if self.args.sync else self.client.run(payload))
        except JobFailed as error:
            for item in sent:
                self.fail(item, str(error))
            return
        if reply.get("status") != "COMPLETED":
            for item in sent:
                self.fail(item, f"job failed: {reply.get('error', 'no reason given')}")
            return
        for result in reply["output"]["results"]:
            item = sent[result["index"]]
            if "error" in result:
                self.fail(item, result["error"])
                continue
            try:
                await asyncio.to_thread(write_result, self.args.out, item.name, result)
            except OSError as error:  # an output URL that could not be fetched
                self.fail(item, f"could not download an output: {error}")
                continue
            self.summary.done += 1
            self.progress.update(1)

    def fail(self, item: Item, reason: str) -> None:
        self.summary.failed.append({"input": item.source, "error": reason})
        self.progress.update(1)


async def run(args: argparse.Namespace, template: dict) -> Summary:
    remove_temporaries(args.out)  # an interrupted run's half-written files
    total = sum(1 for _ in expand(args.inputs))  # a cheap first pass, for the progress bar's ETA
    quiet = args.json or not sys.stderr.isatty()
    with tqdm(total=total, unit="image", disable=quiet, dynamic_ncols=True) as progress:
        async with endpoint(args) as client:
            job_run = Run(args, template, client, progress)
            jobs = job_run.pending(expand(args.inputs))
            await asyncio.gather(*(job_run.worker(jobs) for _ in range(args.concurrency)))
    return job_run.summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        template = request_template(args)
        endpoint(args)  # the credentials, before any work
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        summary = asyncio.run(run(args, template))
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to continue", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(summary.as_dict()))
    else:
        for failure in summary.failed:
            print(f"failed: {failure['input']}: {failure['error']}", file=sys.stderr)
        print(f"done {summary.done}, failed {len(summary.failed)}, skipped {summary.skipped}; outputs in {args.out}")
    return 1 if summary.failed else 0

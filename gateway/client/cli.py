"""Command line: ``python -m gateway.client INPUT... --out OUT [options]``; ``--help`` says it all
(``DESCRIPTION`` and ``EPILOG`` below). Exit status 0 when every image succeeded or was skipped, 1 when any
failed, 2 for bad arguments, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from tqdm import tqdm

from gateway.client.inputs import Item, expand, unique
from gateway.client.jobs import Endpoint, JobFailed
from gateway.client.outputs import remove_temporaries, request_digest, resume_state, write_atomically, write_result
from gateway.client.results import BadReply, check_reply
from gateway.inputs.schema import VIDEO_ONLY, VIDEO_TASKS, RequestError, parse_request

DEPLOYED = "https://api.runpod.ai/v2/{endpoint_id}"
MAX_VIDEO_FILE_BYTES = 7 << 20  # base64 grows it by 4/3: Runpod's /run takes 10 MB
DESCRIPTION = """Depth for a whole dataset: every INPUT becomes one image or video, sent to a depth endpoint (a
deployed Runpod endpoint with --endpoint-id and RUNPOD_API_KEY, or a local one with --endpoint); its
outputs and a sidecar JSON are written under --out, mirroring the inputs."""
EPILOG = """inputs:
  a file; a folder (every image and video below it); a glob (quote it: 'photos/**/*.jpg'); @list.txt (one
  path or URL a line); an http(s) URL. Image and video URLs on private networks are refused by the worker
  unless its URL_ALLOWLIST lets them through.

videos:
  .mp4 .m4v .mov .mkv .webm .avi files and URLs: one job each, with the tasks of --tasks that apply to a
  video (depth: a 16-bit FFV1 .mkv; colorized: an H.264 .mp4; --include-raw: the float16 .npz of every
  frame); --set fps=5, --set temporal=none, ... pass the video options. A video file is sent inline, so
  at most 7 MB (Runpod's request limit); larger videos must be given by URL.

file names:
  an input named trip/img1 (its path relative to the folder or glob, its stem for a file, url/<host>/<path>
  for a URL; characters other than letters, digits and ._- become _) gets trip/img1_depth.png,
  trip/img1_colorized.png, ... and trip/img1.json (the request, the result's fields: depth range, units,
  direction, the PNG's decode formula, intrinsics; and the files). The depth PNG carries the same facts as
  PNG text chunks. Inputs whose names collide (dup.jpg and dup.png, URLs that differ in their query, ...)
  each get ~<first 8 hex digits of the SHA-256 of the input> appended. OUT/run.json summarizes the run.

resume:
  an input is skipped when its sidecar records the same request (tasks, format, model, --set fields) and
  all the files it lists exist; a changed request or a missing file runs it again (the summary says how
  many of each). Rerun the same command after an interruption.

exit status:
  0 every image succeeded or was skipped; 1 some failed (each is listed, with why); 2 bad arguments;
  130 interrupted."""


@dataclass
class Summary:
    done: int = 0
    skipped: int = 0
    redone: dict[str, int] = field(default_factory=lambda: {"changed": 0, "incomplete": 0})
    failed: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"done": self.done, "skipped": self.skipped, "redone": self.redone, "failed": self.failed}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.client", description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders, globs, @list.txt, URLs")
    parser.add_argument("--out", type=Path, required=True, help="folder for the outputs (mirrors the inputs)")
    parser.add_argument("--tasks", nargs="+", default=["depth"], help="depth colorized normals disparity "
                        "point_cloud points mesh (the API's tasks)")  # fmt: skip
    parser.add_argument("--model", help="a model id (the endpoint's DEPTH_MODEL when not given)")
    parser.add_argument("--colormap", help="viridis, magma, inferno, plasma, turbo or gray (the API's default)")
    parser.add_argument("--format", choices=["png", "webp", "jpg"], default="png", help="colorized, normals, disparity")
    parser.add_argument("--include-raw", action="store_true", help="also the float32 depth as .npz")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=JSON",
                        help="any other request field, e.g. process_res=770 or 'camera={\"fov_x\": 70}'")  # fmt: skip
    parser.add_argument("--endpoint", default="http://127.0.0.1:8000", help="Runpod local API base URL")
    parser.add_argument("--endpoint-id", help="a deployed Runpod endpoint (needs RUNPOD_API_KEY)")
    parser.add_argument("--images-per-job", type=int, default=1, help="images sent in one job")
    parser.add_argument("--concurrency", type=int, default=8, help="jobs in flight")
    parser.add_argument("--retries", type=int, default=6, help="attempts after the first, with backoff")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per HTTP request")
    parser.add_argument("--sync", action="store_true", help="/runsync, one request per job")
    plain_http = "fetch outputs given as plain http URLs (allowed anyway from a loopback endpoint)"
    parser.add_argument("--allow-http", action="store_true", help=plain_http)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_intermixed_args(argv)  # inputs may come after options too
    if args.images_per_job < 1 or args.concurrency < 1 or args.retries < 0:
        parser.error("--images-per-job and --concurrency must be at least 1, --retries at least 0")
    return args


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, description and epilog kept as written."""


def request_template(args: argparse.Namespace) -> dict:
    """The request options every job carries, from the command line (raises ValueError)."""
    fields: dict = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes NAME=JSON, got {item!r}")
        try:
            fields[name] = json.loads(value)
        except json.JSONDecodeError:
            fields[name] = value  # a bare word: a string
    return build_template(args.tasks, args.model, args.colormap, args.format, args.include_raw, fields)


def build_template(
    tasks: list[str], model: str | None, colormap: str | None, output_format: str, include_raw: bool, fields: dict
) -> dict:
    """The request options, checked against the API's schema for images and, where a task applies to
    them, for videos (ValueError naming the first problem)."""
    template: dict = {"tasks": list(tasks), "output_format": output_format}
    if model:
        template["model"] = model
    if colormap:
        template["colormap"] = colormap
    if include_raw:
        template["include_raw"] = True
    template.update(fields)
    videos = video_template(template)
    try:
        parse_request({**image_template(template), "image_b64": "AA=="}, max_images=10**6)
        if videos is not None:
            parse_request({**videos, "video_b64": "AA=="}, max_images=1)
    except RequestError as error:
        raise ValueError(f"request options: {error}") from None
    return template


def image_template(template: dict) -> dict:
    """The options an image job carries (the video-only ones left out)."""
    return {key: value for key, value in template.items() if key not in VIDEO_ONLY}


def video_template(template: dict) -> dict | None:
    """The options a video job carries: only the tasks that apply to a video (None: none does)."""
    tasks = [task for task in template["tasks"] if task in VIDEO_TASKS]
    return {**template, "tasks": tasks} if tasks else None


def endpoint(args: argparse.Namespace) -> Endpoint:
    headers = {"Content-Type": "application/json"}
    base = args.endpoint
    if args.endpoint_id:
        key = getattr(args, "api_key", None) or os.environ.get("RUNPOD_API_KEY")
        if not key:
            raise ValueError("--endpoint-id needs RUNPOD_API_KEY in the environment")
        headers["Authorization"] = f"Bearer {key}"
        base = DEPLOYED.format(endpoint_id=args.endpoint_id)
    return Endpoint(base, headers, retries=args.retries, request_timeout=args.timeout)


def source_of(item: Item) -> dict:
    if item.is_url:
        return {"type": "url", "data": item.source}
    return {"type": "b64", "data": base64.b64encode(Path(item.source).read_bytes()).decode()}


def allows_http(args: argparse.Namespace) -> bool:
    """Plain-http output URLs: when asked for, or when the endpoint itself is on loopback (local runs)."""
    host = urlsplit(args.endpoint).hostname or ""
    return args.allow_http or (not args.endpoint_id and (host == "localhost" or host.startswith("127.")))


class Run:
    def __init__(self, args: argparse.Namespace, template: dict, client: Endpoint, progress: tqdm) -> None:
        self.args = args
        self.template = image_template(template)
        self.video_template = video_template(template)
        self.digests = {False: request_digest(self.template), True: request_digest(self.video_template or {})}
        self.client = client
        self.progress = progress
        self.allow_http = allows_http(args)
        self.summary = Summary()

    def pending(self, items: list[Item]) -> Iterator[list[Item]]:
        """Jobs of ``--images-per-job`` images, or of one video, that this request has not produced yet."""
        chunk: list[Item] = []
        for item in items:
            if self._skip(item):
                continue
            if item.is_video:
                yield [item]
                continue
            chunk.append(item)
            if len(chunk) == self.args.images_per_job:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def _skip(self, item: Item) -> bool:
        state = resume_state(self.args.out, item.name, self.digests[item.is_video])
        if state in self.summary.redone:
            self.summary.redone[state] += 1
        if state == "done":
            self.summary.skipped += 1
            self.progress.update(1)
        return state == "done"

    async def worker(self, jobs: Iterator[list[Item]]) -> None:
        for job in jobs:  # the workers share one iterator: each takes the next job when it is free
            await self.one_job(job)

    async def one_job(self, items: list[Item]) -> None:
        if items[0].is_video:
            await self.one_video(items[0])
            return
        images, sent = [], []
        for item in items:
            try:
                images.append(await asyncio.to_thread(source_of, item))
                sent.append(item)
            except OSError as error:
                self.fail(item, f"could not read the file: {error.strerror or error}")
        if not sent:
            return
        await self.send({**self.template, "images": images}, sent, self.template)

    async def one_video(self, item: Item) -> None:
        if self.video_template is None:
            self.fail(item, f"none of --tasks applies to a video ({', '.join(VIDEO_TASKS)} do)")
            return
        if item.is_url:
            source = {"video_url": item.source}
        else:
            try:
                size = os.path.getsize(item.source)
                if size > MAX_VIDEO_FILE_BYTES:
                    self.fail(item, f"a video file of {size / 1e6:.1f} MB is too large to send inline "
                                    f"(at most {MAX_VIDEO_FILE_BYTES / 1e6:.1f} MB): give it by URL")  # fmt: skip
                    return
                data = await asyncio.to_thread(Path(item.source).read_bytes)
            except OSError as error:
                self.fail(item, f"could not read the file: {error.strerror or error}")
                return
            source = {"video_b64": base64.b64encode(data).decode()}
        await self.send({**self.video_template, **source}, [item], self.video_template)

    async def send(self, payload: dict, sent: list[Item], request: dict) -> None:
        """One job; each input's outputs and sidecar written, or its failure recorded."""
        try:
            reply = await (self.client.runsync(payload) if self.args.sync else self.client.run(payload))
            if reply.get("status") != "COMPLETED":
                error = reply.get("error")
                raise BadReply(f"job failed: {error[:300] if isinstance(error, str) else 'no reason given'}")
            answers = check_reply(reply, len(sent), self.allow_http)
        except (JobFailed, BadReply) as error:
            for item in sent:
                self.fail(item, str(error))
            return
        for item, answer in zip(sent, answers, strict=True):
            if isinstance(answer, str):
                self.fail(item, answer)
                continue
            try:
                await asyncio.to_thread(
                    write_result, self.args.out, item.name, item.source, request, answer, self.allow_http
                )
            except (OSError, ValueError) as error:  # an output URL that could not be fetched, refused, too big
                self.fail(item, f"could not fetch an output: {error}")
                continue
            self.summary.done += 1
            self.progress.update(1)

    def fail(self, item: Item, reason: str) -> None:
        self.summary.failed.append({"input": item.source, "error": reason})
        self.progress.update(1)


async def run(args: argparse.Namespace, template: dict) -> Summary:
    remove_temporaries(args.out)  # an interrupted run's half-written files
    items = unique(expand(args.inputs))  # every name known first: collisions are resolved before any work
    quiet = args.json or not sys.stderr.isatty()
    started = time.time()
    with tqdm(total=len(items), unit="input", disable=quiet, dynamic_ncols=True) as progress:
        async with endpoint(args) as client:
            job_run = Run(args, template, client, progress)
            jobs = job_run.pending(items)
            await asyncio.gather(*(job_run.worker(jobs) for _ in range(args.concurrency)))
    record = {"endpoint": args.endpoint_id or args.endpoint, "request": template, "images": len(items),
              "started": started, "finished": time.time(), **job_run.summary.as_dict()}  # fmt: skip
    write_atomically(args.out / "run.json", json.dumps(record, indent=1).encode())
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
        redone = ", ".join(f"{count} {why}" for why, count in summary.redone.items() if count)
        print(f"done {summary.done}, failed {len(summary.failed)}, skipped {summary.skipped} (same request"
              f"{'; redone: ' + redone if redone else ''}); outputs in {args.out}")  # fmt: skip
    return 1 if summary.failed else 0

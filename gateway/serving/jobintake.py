"""Jobs and stop signals from the job API, validated before the job loop sees them. Pure apart from the
GETs of ``take_jobs`` and ``take_stop_signals`` (each body read within a size bound).

runpod's ``get_job`` hands the loop whatever the job-take answer holds: an entry without ``id`` or one
that is not an object crashes the loop (the worker exits, the whole batch unanswered), and a batch
holding one input nested deeper than the JSON parser's recursion limit is dropped whole (no job of it
ever answered). Here the body is read within a size bound and parsed, by orjson (a 1 MB take of four
photos: 0.38 against 0.64 ms for ``json``; integers past 64 bits become floats, which no field of the
API accepts either way); what orjson refuses is parsed again by ``json``, so a body is read as ``json``
reads it (NaN, lone surrogates, depth). When that parser refuses it too (too deep), its top level is split
by a scanner that does not recurse and each job is parsed on its own, so one bad job costs only itself.
Each entry ends as a job to run, a job to answer with an error (it has an id, the rest is wrong), or a
logged skip (no usable id: nothing can be answered). runpod's ``get_stop_signals`` reads the stop
channel's answer whole into memory; ``take_stop_signals`` reads it the same way within ``STOP_BYTES``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from runpod.http_client import TooManyRequests
from runpod.serverless.modules import rp_job

log = logging.getLogger("gateway")

MAX_ID_CHARS = 256
TAKE_BYTES_PER_JOB = 32 << 20  # a job's body is at most 20 MB on the platform (/runsync), plus its fields
STOP_BYTES = 1 << 20  # a stop-channel answer: job ids (thousands of them at MAX_ID_CHARS)
TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},:]', re.DOTALL)  # strings skipped whole, in C


@dataclass
class Intake:
    """What one job-take brought: jobs to run, jobs to answer with an error, and entries skipped."""

    jobs: list[dict] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (job id, error)
    skipped: int = 0


class Unreadable(ValueError):
    """A job API answer that cannot be read: over its size bound, or (a job-take) not JSON of the expected
    shape at all."""


def children(text: str) -> list[tuple[str | None, str]]:
    """The top-level items of the JSON array or object that ``text`` is, without recursion (any depth):
    ``(None, raw element)`` for an array, ``(raw key, raw value)`` for an object; Unreadable otherwise."""
    text = text.strip()
    if len(text) < 2 or text[0] not in "[{" or text[-1] != {"[": "]", "{": "}"}[text[0]]:
        raise Unreadable("not a JSON array or object")
    items: list[tuple[str | None, str]] = []
    depth, start, key = 0, 1, None
    for token in TOKEN.finditer(text):
        mark = token.group()
        if mark in "[{":
            depth += 1
        elif mark in "]}":
            depth -= 1
            if depth == 0 and token.end() != len(text):
                raise Unreadable("text after the end of the JSON value")
        elif depth == 1 and mark == ":" and text[0] == "{" and key is None:
            key, start = text[start : token.start()].strip(), token.end()
            continue
        if (depth == 1 and mark == ",") or depth == 0:
            raw = text[start : token.start()].strip()
            if raw or items or mark == ",":
                items.append((key, raw))
            key, start = None, token.end()
    if depth != 0:
        raise Unreadable("unbalanced JSON")
    return items


def job_id(entry: Any) -> str | None:
    """The entry's id when it is one the loop can answer under: a short string of printable characters."""
    if not isinstance(entry, dict):
        return None
    value = entry.get("id")
    if isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS and value.isprintable():
        return value
    return None


def sort_entry(entry: Any, intake: Intake, seen: set[str]) -> None:
    """File one parsed entry under ``intake``."""
    identifier = job_id(entry)
    if identifier is None:
        intake.skipped += 1
        log.error("job-take entry without a usable id skipped (%s)", type(entry).__name__)
        return
    if identifier in seen:
        intake.skipped += 1
        log.error("job %s appears twice in one take; the repeat is skipped", identifier)
        return
    seen.add(identifier)
    if "input" not in entry:
        intake.refused.append((identifier, "the job has no input"))
        return
    intake.jobs.append(entry)


def sort_unparsed(raw: str, intake: Intake, seen: set[str]) -> None:
    """An entry the parser refused: answered with an error when its id can still be read."""
    identifier = None
    try:
        for key, value in children(raw):
            if key is not None and json.loads(key) == "id":
                identifier = job_id({"id": json.loads(value)})
    except (Unreadable, ValueError, RecursionError):
        identifier = None
    if identifier is None or identifier in seen:
        intake.skipped += 1
        log.error("unreadable job-take entry skipped")
        return
    seen.add(identifier)
    intake.refused.append((identifier, "the job's input is not valid JSON or is nested too deeply"))


def parse_take(body: bytes | bytearray) -> Intake:
    """The jobs of one job-take body (one job object, or an array of them)."""
    intake, seen = Intake(), set[str]()
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    else:
        if isinstance(parsed, (dict, list)):
            for entry in [parsed] if isinstance(parsed, dict) else parsed:
                sort_entry(entry, intake, seen)
            return intake
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise Unreadable("the job-take body is not UTF-8") from None
    try:
        parsed = json.loads(text)
    except RecursionError:
        parsed = None  # split below, job by job
    except ValueError:
        raise Unreadable("the job-take body is not JSON") from None
    if isinstance(parsed, dict):
        sort_entry(parsed, intake, seen)
    elif isinstance(parsed, list):
        for entry in parsed:
            sort_entry(entry, intake, seen)
    elif parsed is not None:
        raise Unreadable(f"the job-take body is a JSON {type(parsed).__name__}")
    else:
        stripped = text.strip()
        raws = [stripped] if stripped.startswith("{") else [raw for _key, raw in children(stripped)]
        for raw in raws:
            try:
                sort_entry(json.loads(raw), intake, seen)
            except (ValueError, RecursionError):
                sort_unparsed(raw, intake, seen)
    return intake


def raise_for_status(response: aiohttp.ClientResponse) -> None:
    """runpod's handling of an error status: 429 as its ``TooManyRequests`` (the loop backs off), others
    as aiohttp's."""
    if response.status == 429:
        raise TooManyRequests(response.request_info, response.history, status=429, message=response.reason)
    response.raise_for_status()


async def read_bounded(response: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    """The response's body, refused (Unreadable) once it declares or brings more than ``limit`` bytes."""
    if response.content_length is not None and response.content_length > limit:
        raise Unreadable(f"{what} body of {response.content_length} bytes, over {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():  # as it arrives: one join below, no regrowing buffer
        size += len(chunk)
        if size > limit:
            raise Unreadable(f"{what} body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def take_jobs(session: aiohttp.ClientSession, count: int) -> Intake:
    """One job-take (batch when ``count`` > 1) as runpod's ``get_job`` sends it, with the body bounded."""
    async with session.get(rp_job._job_get_url(count)) as response:
        if response.status in (204, 400):  # no jobs; 400 is FlashBoot's "nothing for you"
            return Intake()
        raise_for_status(response)
        body = await read_bounded(response, TAKE_BYTES_PER_JOB * max(count, 1), "job-take")
    if not body or body.isspace():  # isspace stops at the first other byte (strip copied the whole body)
        return Intake()
    return parse_take(body)


async def take_stop_signals(session: aiohttp.ClientSession) -> list[str]:
    """The job ids the stop channel says to stop, read as runpod's ``get_stop_signals`` reads them (204: none;
    429: TooManyRequests; a body that is not a JSON object with a ``jobsToStop`` list: none, logged; ids that
    are not strings dropped), with the body bounded (``STOP_BYTES``; runpod read it whole)."""
    url = rp_job._job_stop_url()
    if url is None:
        return []
    async with session.get(url) as response:
        if response.status == 204:
            return []
        raise_for_status(response)
        if response.content_type != "application/json":
            log.warning("stop-channel answer of type %.100s ignored", response.content_type)
            return []
        body = await read_bounded(response, STOP_BYTES, "stop-channel")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        log.warning("stop-channel answer that is not JSON ignored")
        return []
    job_ids = payload.get("jobsToStop", []) if isinstance(payload, dict) else None
    if not isinstance(job_ids, list):
        log.warning("stop-channel answer without a jobsToStop list ignored")
        return []
    return [job_id for job_id in job_ids if isinstance(job_id, str)]

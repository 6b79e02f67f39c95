"""An endpoint's answer, checked before anything is written: the endpoint may be broken or hostile. Pure.

A COMPLETED job must carry ``output.results``, a list; each entry is an object whose ``index`` (an int,
not a bool) names one image the job sent, at most once. An image's result is either its ``error`` (a
string) or its outputs: ``<name>_b64`` (valid base64) or ``<name>_url`` (https, or http when allowed),
each with a known MIME type where the API gives one. Anything else fails that image with a message that
says what was wrong; an image the endpoint answered nothing for fails too. The rest of the result
(depth range, units, intrinsics, ...) is kept as metadata for the sidecar, without the outputs.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from gateway.outputs.output_names import EXTENSIONS, OUTPUTS, url_key

MAX_ERROR_CHARS = 300


class BadReply(Exception):
    """The whole answer is unusable (every image of the job fails with this message)."""


@dataclass
class Checked:
    """One image's usable result: its outputs (bytes inline, or a URL to fetch) and its metadata."""

    inline: dict[str, bytes] = field(default_factory=dict)  # output key -> bytes
    linked: dict[str, str] = field(default_factory=dict)  # output key -> URL
    mimes: dict[str, str | None] = field(default_factory=dict)  # output key -> MIME type (None: npz)
    metadata: dict = field(default_factory=dict)


def check_reply(reply: object, count: int, allow_http: bool = False) -> list[Checked | str]:
    """For each of the ``count`` images sent: its checked result, or why it is unusable. BadReply when
    the answer as a whole is not a completed job's."""
    if not isinstance(reply, dict):
        raise BadReply("the endpoint's answer is not a JSON object")
    output = reply.get("output")
    if not isinstance(output, dict) or not isinstance(output.get("results"), list):
        raise BadReply("the endpoint answered COMPLETED without output.results")
    answers: list[Checked | str | None] = [None] * count
    seen: set[int] = set()
    for entry in output["results"]:
        if not isinstance(entry, dict):
            continue
        index = entry.get("index")
        if type(index) is not int or not 0 <= index < count:
            continue  # no image of this job: nothing of it is written
        if index in seen:
            answers[index] = "the endpoint returned two results for this image"
            continue
        seen.add(index)
        answers[index] = check_result(entry, allow_http)
    return [answer if answer is not None else "the endpoint returned no result for this image" for answer in answers]


def check_result(entry: dict, allow_http: bool) -> Checked | str:
    """One result entry: checked outputs and metadata, or why it is unusable."""
    if "error" in entry:
        error = entry["error"]
        return error[:MAX_ERROR_CHARS] if isinstance(error, str) else "the endpoint returned an unreadable error"
    checked = Checked()
    for key, (_suffix, mime_key) in OUTPUTS.items():
        mime = entry.get(mime_key) if mime_key else None
        if key in entry:
            try:
                checked.inline[key] = base64.b64decode(entry[key], validate=True)
            except (binascii.Error, TypeError, ValueError):
                return f"the endpoint returned {key} that is not valid base64"
        elif url_key(key) in entry:
            url = entry[url_key(key)]
            schemes = ("https", "http") if allow_http else ("https",)
            if not isinstance(url, str) or urlsplit(url).scheme not in schemes or not urlsplit(url).hostname:
                allowed = " or ".join(schemes)
                return f"the endpoint returned {url_key(key)} that is not an {allowed} URL"
            checked.linked[key] = url
        else:
            continue
        if mime_key is not None and (not isinstance(mime, str) or mime not in EXTENSIONS):
            return f"the endpoint returned an unknown {mime_key}"
        checked.mimes[key] = mime
    if not checked.mimes:
        return "the endpoint returned a result without outputs"
    excluded = set(OUTPUTS) | {url_key(key) for key in OUTPUTS}
    checked.metadata = {key: value for key, value in entry.items() if key not in excluded}
    return checked

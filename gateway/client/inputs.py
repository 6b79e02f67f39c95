"""Input arguments -> images and videos, lazily, each with the relative output name its files get. Pure.

- a file: itself, named by its stem;
- a folder: every image and video below it (by extension, sorted), named by its path relative to the folder;
- a glob (``*``, ``?``, ``[``; ``**`` recursive): its matches, named relative to the part before the
  first wildcard;
- ``@list.txt``: one path or URL a line (``#`` comments and blank lines skipped); relative paths are
  relative to the list's folder and named as written;
- an http(s) URL: ``url/<host>/<path>``.

Names use ``/`` and keep only letters, digits, ``._-`` (anything else becomes ``_``). Inputs whose names
would collide (``dup.jpg`` and ``dup.png``, ``a/IMG_1.jpg`` and ``b/IMG_1.jpg`` given as files, URLs that
differ in their query, ``b c.jpg`` and ``b_c.jpg``) each get ``~`` and the first 8 hex digits of the
SHA-256 of their source appended (``unique``): predictable, and stable from run to run.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi"}
MEDIA_EXTENSIONS = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Item:
    source: str  # a path or an http(s) URL
    name: str  # relative output name without task or extension, e.g. "trip/day1/img001"

    @property
    def is_url(self) -> bool:
        return is_url(self.source)

    @property
    def is_video(self) -> bool:
        """By the extension of the file, or of the URL's path."""
        path = urlsplit(self.source).path if self.is_url else self.source
        return PurePosixPath(path).suffix.lower() in VIDEO_EXTENSIONS


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def expand(arguments: Iterable[str]) -> Iterator[Item]:
    for argument in arguments:
        if argument.startswith("@"):
            yield from from_list(Path(argument[1:]))
        elif is_url(argument):
            yield Item(argument, url_name(argument))
        elif Path(argument).is_dir():
            yield from from_folder(Path(argument))
        elif any(char in argument for char in "*?["):
            yield from from_glob(argument)
        else:  # a file (a missing one fails when it is read, with its own error)
            yield Item(argument, safe_name(PurePosixPath(Path(argument).stem)))


def from_folder(root: Path) -> Iterator[Item]:
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        for file in sorted(files):
            path = Path(folder) / file
            if path.suffix.lower() in MEDIA_EXTENSIONS:
                yield Item(str(path), safe_name(PurePosixPath(path.relative_to(root).with_suffix("").as_posix())))


def from_glob(pattern: str) -> Iterator[Item]:
    prefix = re.split(r"[*?\[]", pattern, maxsplit=1)[0]  # the folders before the first wildcard
    base = Path(prefix) if prefix.endswith("/") else Path(prefix).parent
    for match in sorted(glob.iglob(pattern, recursive=True)):
        path = Path(match)
        if path.is_file() and path.suffix.lower() in MEDIA_EXTENSIONS:
            relative = path.relative_to(base) if path.is_relative_to(base) else Path(path.name)
            yield Item(match, safe_name(PurePosixPath(relative.with_suffix("").as_posix())))


def from_list(list_file: Path) -> Iterator[Item]:
    with list_file.open() as lines:
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if is_url(line):
                yield Item(line, url_name(line))
                continue
            written = Path(line)
            path = written if written.is_absolute() else list_file.parent / written
            relative = written.relative_to(written.anchor) if written.is_absolute() else written
            yield Item(str(path), safe_name(PurePosixPath(relative.with_suffix("").as_posix())))


def url_name(url: str) -> str:
    parts = urlsplit(url)
    path = parts.path.strip("/")
    stem = PurePosixPath(path).with_suffix("").as_posix() if path else "index"
    return safe_name(PurePosixPath("url", parts.hostname or "host", stem))


def safe_name(path: PurePosixPath) -> str:
    parts = [_UNSAFE.sub("_", part) for part in path.parts if part not in ("", ".", "..", "/")]
    return "/".join(part.strip("_") or "_" for part in parts) or "image"


def unique(items: Iterable[Item]) -> list[Item]:
    """``items`` with every name that more than one of them has made unique (see the module docstring)."""
    items = list(items)
    counts = Counter(item.name for item in items)
    return [
        Item(item.source, f"{item.name}~{hashlib.sha256(item.source.encode()).hexdigest()[:8]}")
        if counts[item.name] > 1
        else item
        for item in items
    ]

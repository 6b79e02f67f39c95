"""glibc's allocator for the gateway's processes: every thread allocates from the one main heap.

The gateway's threads (result posts, the reads of parked outputs, uploads) handle multi-megabyte buffers.
In a thread's own glibc arena, a block that does not fit the arena's heap gets a new heap, which is
unmapped again when the block is freed, so every 8 MB result body page-faulted in afresh: orjson took
19 ms for one in a post thread against 0.6 ms on the main thread, whose heap ``keep_freed_memory``
keeps. One arena (``glibc.malloc.arena_max=1``) puts every thread on the main heap. glibc reads the
setting once, before any thread starts (numpy's import starts one), so it travels in ``GLIBC_TUNABLES``:
``python -m gateway`` restarts itself with it when it is missing, and the lanes and image workers
inherit it. Other settings in ``GLIBC_TUNABLES`` are kept. An embedded tritonserver is not the gateway's:
it gets ``GLIBC_TUNABLES`` as it was before the restart (``as_before``), so its own threads keep
their arenas.
"""

from __future__ import annotations

import os
import sys

ARENA_MAX = "glibc.malloc.arena_max"
ONE_ARENA = f"{ARENA_MAX}=1"
BEFORE = "GATEWAY_GLIBC_TUNABLES_BEFORE"  # GLIBC_TUNABLES as the gateway was started with it


def with_one_arena(tunables: str) -> str:
    """``tunables`` (a ``GLIBC_TUNABLES`` value) with the arena setting replaced by ``ONE_ARENA``."""
    kept = [item for item in tunables.split(":") if item and item.split("=")[0] != ARENA_MAX]
    return ":".join([*kept, ONE_ARENA])


def restart_with_one_arena() -> None:
    """Execute this process again, same command line, with ``ONE_ARENA``; nothing when it has it already."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if ONE_ARENA in tunables.split(":"):
        return
    os.environ[BEFORE] = tunables
    os.environ["GLIBC_TUNABLES"] = with_one_arena(tunables)
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def as_before(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a process that is not the gateway's: ``GLIBC_TUNABLES`` as before the restart."""
    if BEFORE not in env:
        return env
    env = dict(env)
    before = env.pop(BEFORE)
    if before:
        env["GLIBC_TUNABLES"] = before
    else:
        env.pop("GLIBC_TUNABLES", None)
    return env

"""The gateway's allocator settings: one glibc arena, so that threads reuse the main heap's pages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from gateway import allocator

THREAD_FAULTS = """
import base64, os, resource, threading
import orjson
from gateway.serving.imagework import keep_freed_memory
keep_freed_memory()
parts = ("points_b64", "mesh_b64")  # a 3D result: two 4 MB base64 strings
body = {"output": {"results": [{key: base64.b64encode(os.urandom(3_000_000)).decode() for key in parts}]}}
def posts():
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(10):
        data = orjson.dumps(body)
        del data
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
faults = [posts()]  # the main thread's (a job loop's)
thread = threading.Thread(target=lambda: faults.append(posts()))  # a post thread's
thread.start()
thread.join()
print(faults[1])
"""


def test_threads_reuse_freed_memory_too_with_one_arena() -> None:
    """A result post thread serializes 8 MB bodies: run as the gateway runs (one glibc arena) it reuses the
    main heap's pages instead of faulting 8 MB (2,048 pages) in afresh for each of ten bodies, as it does
    in an arena of its own."""

    def faults(tunables: str) -> int:
        env = {**os.environ, "GLIBC_TUNABLES": tunables}
        run = subprocess.run([sys.executable, "-c", THREAD_FAULTS], capture_output=True, text=True, check=True, env=env)
        return int(run.stdout)

    assert faults("") > 10 * 2048
    assert faults(allocator.with_one_arena("")) < 2048


RESTART = """
import json
import os
from gateway.allocator import restart_with_one_arena
print(os.environ.get("GLIBC_TUNABLES", "-"), flush=True)
restart_with_one_arena()
print("running with", os.environ["GLIBC_TUNABLES"])
"""


def test_the_gateway_restarts_itself_with_one_arena_once() -> None:
    env = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.tcache_count=7:glibc.malloc.arena_max=8"}
    run = subprocess.run([sys.executable, "-c", RESTART], capture_output=True, text=True, check=True, env=env)
    assert run.stdout.splitlines() == [
        "glibc.malloc.tcache_count=7:glibc.malloc.arena_max=8",  # as started
        "glibc.malloc.tcache_count=7:glibc.malloc.arena_max=1",  # the same command again, with one arena
        "running with glibc.malloc.tcache_count=7:glibc.malloc.arena_max=1",  # and only once
    ]


def test_triton_started_by_the_gateway_gets_the_tunables_it_was_started_with() -> None:
    """The one-arena setting is the gateway's own: tritonserver's environment has GLIBC_TUNABLES as the
    gateway was started with it (or none), the rest of the environment unchanged."""
    restarted = {"PATH": "/bin", allocator.BEFORE: "glibc.malloc.tcache_count=7", "GLIBC_TUNABLES": "x=1"}
    assert allocator.as_before(restarted) == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"}
    assert allocator.as_before({"PATH": "/bin", allocator.BEFORE: "", "GLIBC_TUNABLES": "x"}) == {"PATH": "/bin"}
    never_restarted = {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=1"}
    assert allocator.as_before(never_restarted) == never_restarted


CHILD_ENV = """
import json, os
from gateway.allocator import restart_with_one_arena
restart_with_one_arena()
from pathlib import Path
from gateway.serving.triton_process import EmbeddedTriton
_command, env = EmbeddedTriton(Path("/nowhere")).command_and_env()
print(json.dumps([os.environ["GLIBC_TUNABLES"], env.get("GLIBC_TUNABLES")]))
"""


def test_a_restarted_gateway_runs_with_one_arena_and_its_triton_without() -> None:
    env = {key: value for key, value in os.environ.items() if key not in ("GLIBC_TUNABLES", allocator.BEFORE)}
    run = subprocess.run([sys.executable, "-c", CHILD_ENV], capture_output=True, text=True, check=True, env=env)
    assert json.loads(run.stdout) == [allocator.ONE_ARENA, None]

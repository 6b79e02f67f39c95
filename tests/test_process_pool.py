"""The image workers' process pool with real spawned processes: a process killed mid-call fails that call
alone (with the image's clean error), its neighbours' calls finish, a new process takes its place, and
the image's holdings see the dead call as ended; a call withdrawn before any process took it never
runs; results, exceptions and unpicklable calls come back as they are."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import time
from pathlib import Path

import pytest

from gateway.errors import ImageError
from gateway.serving.imagework import ImageWorkers
from gateway.serving.ownership import Holdings
from gateway.serving.process_pool import ProcessPool


def hold(marker: Path, seconds: float) -> int:
    """In a worker: say which process runs the call, then work ``seconds``."""
    marker.write_text(str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()


def fail() -> None:
    raise ValueError("raised in the worker")


def nothing() -> None:
    return None


async def marked(marker: Path, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while not marker.exists() or not marker.read_text():
        assert time.monotonic() < deadline, f"no process ran {marker.name}"
        await asyncio.sleep(0.02)
    return int(marker.read_text())


def test_a_killed_process_fails_only_its_own_call_and_is_replaced(tmp_path: Path) -> None:
    workers = ImageWorkers(2)

    async def start_up() -> None:  # as the worker does: in an event loop of its own, before the job loop's
        workers.start()

    async def scenario() -> None:
        try:
            doomed_holdings, kept_holdings = Holdings(), Holdings()
            given_back: list[str] = []
            doomed_holdings.on_give_back(lambda: given_back.append("doomed"))
            doomed = asyncio.ensure_future(
                workers._run(functools.partial(hold, tmp_path / "doomed", 60), doomed_holdings)
            )
            kept = asyncio.ensure_future(workers._run(functools.partial(hold, tmp_path / "kept", 2), kept_holdings))
            doomed_pid, kept_pid = await marked(tmp_path / "doomed"), await marked(tmp_path / "kept")
            assert doomed_pid != kept_pid
            os.kill(doomed_pid, signal.SIGKILL)
            with pytest.raises(ImageError, match="a worker process stopped"):
                await asyncio.wait_for(doomed, 30)
            assert await asyncio.wait_for(kept, 30) == kept_pid  # its neighbour's call is not affected
            doomed_holdings.close()
            assert given_back == ["doomed"]  # the dead call has ended: the image's resources come back

            # Two calls at once run in two live processes: the survivor and the dead one's replacement.
            after = [functools.partial(hold, tmp_path / f"after{index}", 0.5) for index in range(2)]
            pids = await asyncio.wait_for(asyncio.gather(*(workers._run(call, Holdings()) for call in after)), 60)
            assert len(set(pids)) == 2
            assert doomed_pid not in pids
            assert kept_pid in pids
        finally:
            workers.close()

    asyncio.run(start_up())
    asyncio.run(scenario())


def test_a_withdrawn_call_never_runs_and_answers_come_back_as_they_are(tmp_path: Path) -> None:
    async def scenario() -> None:
        pool = ProcessPool(1, nothing)  # started by its first call
        try:
            busy = await pool.submit(functools.partial(hold, tmp_path / "busy", 1))
            waiting = await pool.submit(functools.partial(hold, tmp_path / "withdrawn", 0))
            await marked(tmp_path / "busy")
            pool.withdraw(waiting)  # the one process is busy: nobody has taken it
            pool.withdraw(busy)  # taken: it runs to its end
            assert waiting.cancelled()
            assert await busy == await marked(tmp_path / "busy")
            with pytest.raises(ValueError, match="raised in the worker"):
                await (await pool.submit(fail))
            with pytest.raises(Exception, match="pickle"):  # a lambda cannot reach a process
                await (await pool.submit(lambda: 1))
            assert await (await pool.submit(functools.partial(sum, [1, 2, 3]))) == 6  # and the process still serves
            assert not (tmp_path / "withdrawn").exists()
        finally:
            pool.close()

    asyncio.run(scenario())

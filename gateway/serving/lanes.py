"""Lanes: several gateway processes behind one job intake, so that one worker is not capped by one
process's event loop and GIL.

The intake (``python -m gateway`` with ``LANES`` > 1) runs runpod's production job loop alone: job-take,
heartbeats (the in-progress list holds every lane's jobs), the stop channel, readiness and SIGTERM. Each
job goes whole to the lane running the fewest jobs (``gateway.lane``: its own ``DepthService``,
image workers, gRPC client and shared-memory region on the one Triton), which runs it and posts its
result to the job API itself, so that no output passes through the intake. The lane tells the intake
when the job's place frees (``ended``: its handler returned, its result is being posted) and when its
answer is done (``answered``); the job stays in the heartbeats' list until then.

- Cancellation: the stop channel cancels the job's task in the intake, which tells its lane; the lane
  cancels the job there (with the ownership rules of a single process) and says so, and only then does
  the job's place free (``CANCEL_WAIT`` at most). A cancelled job is not answered, as in runpod's loop.
- A lane that dies: each job it had not finished is answered here with ``LANE_LOST`` (once: the lane
  never posted it); a job whose result it was posting is not answered again (it may have arrived), and
  this is logged. Its shared-memory region is unregistered from Triton and unlinked, its models are no
  longer counted as in use, and it is started again (after ``RESTART_DELAY``, doubling while it keeps
  dying before it is ready, up to ``RESTART_DELAY_MAX``). No job is taken while no lane is ready.
- Models: only the intake loads and unloads them (``SharedModels``), for the lanes (``lane_models``).
- SIGTERM goes to the intake; lanes ignore it. Once the job loop has drained (every lane's jobs
  answered), the lanes are told to stop and exit; a lane whose intake vanished finishes its jobs, posts
  their results and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tritonclient.grpc as grpcsync
from tritonclient.utils import InferenceServerException

from gateway.serving.jobloop import EagerJobScaler
from gateway.serving.lane_link import Link
from gateway.serving.model_lifetime import ModelLifetime
from gateway.serving.model_names import ModelUnavailable
from gateway.serving.shared_memory import SHM_DIR

log = logging.getLogger("gateway")

LANE_FD = "GATEWAY_LANE_FD"  # the lane's end of its socket pair
LANE_INDEX = "GATEWAY_LANE"
LANE_LOST = "the worker process running this job stopped unexpectedly; the job can be submitted again"
CANCEL_WAIT = 30.0  # seconds a cancelled job's place waits for its lane to stop it
RESTART_DELAY = 1.0
RESTART_DELAY_MAX = 30.0
SOCKET_BUFFER = 4 << 20
# A lane runs from a ``-c`` string, not ``-m gateway.lane``: spawn imports the parent's main module in every
# child it starts unless that is a ``__main__`` or ``-c``, and the lane's is its whole serving stack (runpod,
# the Triton client, gRPC): +53 MB RSS and +1.9 s start-up per image-worker process, measured.
LANE_MAIN = "from gateway.lane import main; main()"
STOP_WAIT = 30.0  # seconds a stopped lane has to exit after its jobs are answered


class NoLane(RuntimeError):
    """No lane is ready to take a job."""


class SharedModels(ModelLifetime):
    """The intake's model lifetime: every unload is told to the lanes (``on_unload``)."""

    def __init__(self, url: str, max_loaded: int, timeout: float) -> None:
        super().__init__(url, max_loaded, timeout)
        self.on_unload: Callable[[str], None] = lambda _name: None

    async def unload(self, name: str) -> None:
        await super().unload(name)
        self.on_unload(name)


@dataclass
class LaneJob:
    """A job in a lane: ``ended`` is True once its result is being posted, False when the lane stopped it
    (cancelled: no answer), None when the lane died first; ``answered`` once the lane's post is over."""

    job_id: str
    lane: Lane
    ended: asyncio.Future
    answered: asyncio.Future


@dataclass
class Lane:
    index: int
    process: subprocess.Popen | None = None
    socket: socket.socket | None = None  # the intake's end until the link is opened
    link: Link | None = None
    serving: asyncio.Task | None = None  # reads the lane's messages until its link closes, then settles it
    ready: bool = False
    jobs: dict[str, LaneJob] = field(default_factory=dict)
    running: int = 0  # its jobs whose ``ended`` is not set yet
    busy: Counter = field(default_factory=Counter)  # models in use by its jobs
    restart_delay: float = RESTART_DELAY

    def end(self, entry: LaneJob, posting: bool | None) -> None:
        """``entry`` (one of its jobs) has ended: ``posting`` as ``LaneJob.ended`` says."""
        if not entry.ended.done():
            entry.ended.set_result(posting)
            self.running -= 1


class Lanes:
    """The lane processes, seen from the intake's event loop."""

    def __init__(self, count: int, environment: Callable[[int], dict[str, str]], models: SharedModels) -> None:
        self.lanes = [Lane(index) for index in range(count)]
        self.environment = environment  # a lane's variables beside the intake's own
        self.models = models
        models.on_unload = self._unloaded
        self.closing = False
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ processes

    def _spawn(self, lane: Lane) -> None:
        ours, theirs = socket.socketpair()
        for end in (ours, theirs):  # a job (a photo's base64) in one send, not many small ones
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        env = {**os.environ, **self.environment(lane.index), LANE_FD: str(theirs.fileno()), LANE_INDEX: str(lane.index)}
        with theirs:
            lane.process = subprocess.Popen(
                [sys.executable, "-c", LANE_MAIN], env=env, pass_fds=(theirs.fileno(),), cwd=Path.cwd()
            )
        lane.socket = ours

    async def open(self) -> None:
        """Start the lane processes and connect to them. Not before the job loop runs: runpod forks its
        heartbeat process first, and a fork taken after would hold the intake's ends of the lanes'
        sockets, so that a lane would not see the intake go."""
        for lane in self.lanes:
            if lane.socket is None:
                self._spawn(lane)
            await self._connect(lane)

    async def _connect(self, lane: Lane) -> None:
        assert lane.socket is not None
        lane.link = await Link.over(lane.socket)
        lane.socket = None
        lane.serving = asyncio.ensure_future(self._serve(lane))

    def _background(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def ready(self) -> int:
        return sum(lane.ready for lane in self.lanes)

    async def close(self) -> None:
        """Tell every lane to stop (its jobs are over: the job loop has drained) and wait until each has
        exited (killed after ``STOP_WAIT``) and is settled (``_lost``)."""
        self.closing = True
        for lane in self.lanes:
            if lane.link is not None:
                lane.link.send("stop")
        await asyncio.gather(*(lane.serving for lane in self.lanes if lane.serving is not None))
        for task in list(self._tasks):
            task.cancel()

    def kill(self) -> None:
        """At exit: no lane outlives the intake (they are normally gone by now)."""
        for lane in self.lanes:
            if lane.process is not None and lane.process.poll() is None:
                lane.process.kill()
                lane.process.wait()

    # ------------------------------------------------------------------ jobs

    def dispatch(self, job: dict) -> LaneJob:
        """Send ``job`` to the ready lane running the fewest jobs."""
        ready = [lane for lane in self.lanes if lane.ready]
        if not ready:
            raise NoLane("no lane is ready")
        lane = min(ready, key=lambda candidate: candidate.running)
        loop = asyncio.get_running_loop()
        entry = LaneJob(job["id"], lane, loop.create_future(), loop.create_future())
        lane.jobs[entry.job_id] = entry
        lane.running += 1
        assert lane.link is not None
        lane.link.send("job", job)
        return entry

    def cancel(self, entry: LaneJob) -> None:
        """Ask the job's lane to stop it (unless the job is no longer there)."""
        lane = entry.lane
        if lane.jobs.get(entry.job_id) is entry and lane.link is not None:
            lane.link.send("cancel", entry.job_id)

    # ------------------------------------------------------------------ messages from a lane

    async def _serve(self, lane: Lane) -> None:
        assert lane.link is not None
        while (message := await lane.link.receive()) is not None:
            kind, *args = message
            if kind == "ready":
                lane.ready, lane.restart_delay = True, RESTART_DELAY
                log.info("lane %d ready (pid %d)", lane.index, args[0])
            elif kind == "ended":
                self._ended(lane, *args)
            elif kind == "answered":
                entry = lane.jobs.pop(args[0], None)
                if entry is not None and not entry.answered.done():
                    entry.answered.set_result(None)
            elif kind in ("load", "preload"):
                self._background(self._load(lane, kind, *args))
            elif kind == "busy":
                lane.busy[args[0]] += 1
                self.models.in_use[args[0]] += 1
            elif kind == "idle" and lane.busy[args[0]] > 0:
                lane.busy[args[0]] -= 1
                self.models.in_use[args[0]] -= 1
        await self._lost(lane)

    def _ended(self, lane: Lane, job_id: str, posting: bool) -> None:
        entry = lane.jobs.get(job_id)
        if entry is None:
            return
        if not posting:
            del lane.jobs[job_id]
        lane.end(entry, posting)

    async def _load(self, lane: Lane, kind: str, request: int, name: str, missing: bool = False) -> None:
        try:
            if kind == "preload":
                answer: object = await self.models.preload(name)
            else:
                if missing:  # Triton lost it (restarted): load it again
                    self.models.loaded.pop(name, None)
                answer = await self.models.ensure_loaded(name)
        except ModelUnavailable as error:
            answer = str(error)
        if lane.link is not None:
            lane.link.send("model", request, answer)

    def _unloaded(self, name: str) -> None:
        for lane in self.lanes:
            if lane.link is not None:
                lane.link.send("unloaded", name)

    async def _lost(self, lane: Lane) -> None:
        """The lane's link closed: it exited (told to, or not). Its unfinished jobs are answered here."""
        was_ready, lane.ready = lane.ready, False
        for entry in lane.jobs.values():
            if not entry.ended.done():
                lane.end(entry, None)
            elif not entry.answered.done():
                log.error("lane %d stopped while posting the result of job %s; it may not have arrived",
                          lane.index, entry.job_id)  # fmt: skip
                entry.answered.set_result(None)
        lane.jobs.clear()
        for name, count in lane.busy.items():
            self.models.in_use[name] -= count
        lane.busy.clear()
        if lane.link is not None:
            await lane.link.close()
            lane.link = None
        process = lane.process
        assert process is not None
        loop = asyncio.get_running_loop()
        try:
            code = await asyncio.wait_for(loop.run_in_executor(None, process.wait), STOP_WAIT)
        except TimeoutError:
            log.error("lane %d did not exit; killed", lane.index)
            process.kill()
            code = await loop.run_in_executor(None, process.wait)
        self._forget_memory(process.pid)
        if self.closing:
            return
        log.error("lane %d (pid %d) exited with status %s; starting it again in %g s",
                  lane.index, process.pid, code, lane.restart_delay)  # fmt: skip
        await asyncio.sleep(lane.restart_delay)
        if not was_ready:
            lane.restart_delay = min(lane.restart_delay * 2, RESTART_DELAY_MAX)
        if not self.closing:
            self._spawn(lane)
            await self._connect(lane)

    def _forget_memory(self, pid: int) -> None:
        """The shared-memory region of a lane that exited without closing it: unregistered from Triton
        (which maps it until then) and unlinked."""
        prefix = f"depth-gateway-{pid}-"
        leftovers = list(Path(SHM_DIR).glob(prefix + "*"))
        if not leftovers:
            return
        with contextlib.suppress(InferenceServerException):
            client = grpcsync.InferenceServerClient(self.models.url)
            try:
                for path in leftovers:
                    client.unregister_system_shared_memory(path.name, client_timeout=5)
            finally:
                client.close()
        for path in leftovers:
            path.unlink(missing_ok=True)


class LaneJobScaler(EagerJobScaler):
    """``EagerJobScaler`` whose jobs run in lanes (``config["lanes"]``): the lane posts each result."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.lanes: Lanes = config["lanes"]

    async def run(self) -> None:
        await self.lanes.open()
        try:
            await super().run()
        finally:
            await self.lanes.close()

    async def answer(self, session: Any, job: dict) -> None:
        job_id = job["id"]
        try:
            entry = self.lanes.dispatch(job)
        except NoLane:
            self._post_later(job_id, {"error": LANE_LOST})
            return
        try:
            posting = await asyncio.shield(entry.ended)
        except asyncio.CancelledError:
            self.lanes.cancel(entry)
            posting = None
            with contextlib.suppress(TimeoutError):
                posting = await asyncio.wait_for(asyncio.shield(entry.ended), CANCEL_WAIT)
            if posting:  # the lane had finished it: its result is on its way
                self._answering(job_id, entry.answered)
            raise
        if posting is None:
            self._post_later(job_id, {"error": LANE_LOST})
        elif posting:
            self._answering(job_id, entry.answered)


def ignore_termination() -> None:
    """In a lane: SIGTERM and SIGINT are the intake's to act on (it tells the lanes when to stop)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

"""Worker processes fed by the event loop, one call at a time each: a process that dies fails only its call.

Used for the image workers instead of ``concurrent.futures.ProcessPoolExecutor``, for two reasons:

- A process that dies (a decoder crashing on a hostile photo, a kill, the OOM killer) fails the one call
  it was running, and a new process takes its place. ProcessPoolExecutor marks the whole pool broken
  instead and fails every call in it, other jobs' images included.
- A call is pickled onto an idle process's socket by the event loop, and its answer read by the loop's
  own reader (``lane_link.Link``'s framing): no queue-feeder and manager threads between them.

Calls wait in order for an idle process. A call whose caller stops waiting before a process took it is
never run; once taken, it runs to its end (a process cannot be stopped mid-call without losing it), and
its future says when it has ended (``ownership.Holdings`` waits for that). A process found dead while
idle is replaced before it is given a call.

Processes start with multiprocessing's ``spawn`` (no fork of a process that runs gRPC threads; they share
the parent's resource tracker, which unlinks what a killed process left in /dev/shm), from the thread that
starts the pool or runs its event loop (``die_with_parent`` in an initializer is tied to that thread).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import multiprocessing
import os
import pickle
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.serving.lane_link import HEADER, SPLIT_AT, Link

log = logging.getLogger("gateway")

SOCKET_BUFFER = 1 << 20  # an answer under PARK_OUTPUTS_FROM (256 kB) goes in one write
RESTART_DELAY = 1.0  # seconds before a process that died before it was ready is started again
START_TIMEOUT = 120.0  # seconds a process may take to import and run its initializer at start-up
CONTEXT = multiprocessing.get_context("spawn")
STOP_WAIT = 10.0  # seconds a closed pool's processes get to finish their calls before they are killed


class ProcessDied(Exception):
    """The process running a call stopped before it answered."""


@dataclass
class _Call:
    function: Callable[[], Any]
    future: asyncio.Future
    taken: bool = False  # a process has it: it runs to its end


@dataclass(eq=False)
class _Process:
    process: Any  # multiprocessing's SpawnProcess
    socket: socket.socket  # our end, shut down to tell the process to stop
    link: Link | None = None  # on the event loop that uses the pool


@dataclass
class ProcessPool:
    """``size`` processes, each running ``initializer`` once and then the calls it is given. Started before
    any event loop runs (``start``) or by the first call; used from one event loop."""

    size: int
    initializer: Callable[[], None]
    _calls: deque[_Call] = field(default_factory=deque)
    _idle: deque[_Process] = field(default_factory=deque)
    _processes: set[_Process] = field(default_factory=set)
    _attached: asyncio.Future | None = None
    _tasks: set[asyncio.Task] = field(default_factory=set)
    _closed: bool = False

    def start(self) -> None:
        """Start the processes and wait until each has run its initializer (without an event loop: the
        worker starts its image workers before the job loop's event loop runs)."""
        if self._processes or self._closed:
            return
        atexit.register(self.close)  # before multiprocessing's own exit hook joins the processes
        started = [self._spawn() for _ in range(self.size)]
        for worker in started:
            worker.socket.settimeout(START_TIMEOUT)
            try:
                ready = _receive(worker.socket)
            except OSError:
                ready = None
            if ready is None:
                self.close()
                raise RuntimeError("an image worker process did not start")
            worker.socket.settimeout(None)

    async def submit(self, function: Callable[[], Any]) -> asyncio.Future:
        """``function()``'s result (or exception, or ``ProcessDied``) from a process, as a future that
        only the pool sets: await it through ``asyncio.shield`` and ``withdraw`` it when no longer awaited."""
        if self._attached is None:
            self._attached = asyncio.ensure_future(self._attach())
        await asyncio.shield(self._attached)
        call = _Call(function, asyncio.get_running_loop().create_future())
        self._calls.append(call)
        self._dispatch()
        return call.future

    def withdraw(self, future: asyncio.Future) -> None:
        """The call's caller no longer waits: it is never run if no process has taken it yet."""
        for call in self._calls:
            if call.future is future and not call.taken:
                future.cancel()
                self._calls.remove(call)
                return

    def close(self) -> None:
        """Stop the processes: each ends after its current call (``STOP_WAIT`` at most), then is killed.
        Calls not yet taken are cancelled. May be called after the event loop has closed."""
        self._closed = True
        for call in self._calls:
            call.future.cancel()
        self._calls.clear()
        for task in self._tasks:
            with contextlib.suppress(RuntimeError):  # the loop has closed: the task went with it
                task.cancel()
        for worker in self._processes:
            with contextlib.suppress(OSError):
                worker.socket.shutdown(socket.SHUT_RDWR)
        for worker in self._processes:
            worker.process.join(STOP_WAIT)
            if worker.process.exitcode is None:
                worker.process.kill()
                worker.process.join()
        self._processes.clear()
        self._idle.clear()

    # ------------------------------------------------------------------ processes

    def _spawn(self) -> _Process:
        ours, theirs = socket.socketpair()
        for end in (ours, theirs):
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        with theirs:
            process = CONTEXT.Process(target=serve_calls, args=(theirs, self.initializer), daemon=True)
            process.start()
        worker = _Process(process, ours)
        self._processes.add(worker)
        return worker

    async def _attach(self) -> None:
        """Link the started processes to this event loop (starting them first if ``start`` was not called)."""
        if not self._processes:
            started = await asyncio.gather(*(self._started() for _ in range(self.size)))
            if None in started:
                raise RuntimeError("an image worker process did not start")
        for worker in list(self._processes):
            if worker.link is None:
                worker.link = await Link.over(worker.socket)
            self._background(self._keep(worker))

    def _background(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _keep(self, worker: _Process | None) -> None:
        """Keep one process serving calls: a new one each time it dies."""
        while not self._closed:
            if worker is None:
                worker = await self._started()
                if worker is None:
                    await asyncio.sleep(RESTART_DELAY)
                    continue
            assert worker.link is not None
            self._idle.append(worker)
            self._dispatch()
            await worker.link.wait_closed()  # it died (or the pool closed)
            with contextlib.suppress(ValueError):
                self._idle.remove(worker)
            self._processes.discard(worker)
            worker = None

    async def _started(self) -> _Process | None:
        """A new process, linked, once it has run its initializer and said so; None when it died first."""
        worker = self._spawn()
        worker.link = await Link.over(worker.socket)
        if await worker.link.receive() is None:
            code = await self._ended(worker)
            log.error("an image worker process stopped before it was ready (exit status %s)", code)
            return None
        return worker

    async def _ended(self, worker: _Process) -> int | None:
        """The exit status of a process whose link closed (killed if it still runs: its link is broken)."""
        self._processes.discard(worker)
        if worker.process.exitcode is None:
            worker.process.kill()
        await asyncio.get_running_loop().run_in_executor(None, worker.process.join)
        return worker.process.exitcode

    # ------------------------------------------------------------------ calls

    def _dispatch(self) -> None:
        while self._calls and self._idle:
            worker = self._idle.popleft()
            assert worker.link is not None
            if worker.link.is_closed:
                continue  # died while idle: its keeper starts another
            call = self._calls.popleft()
            call.taken = True
            self._background(self._run(worker, call))

    async def _run(self, worker: _Process, call: _Call) -> None:
        assert worker.link is not None
        try:
            worker.link.send("call", call.function)
        except Exception as error:  # could not be pickled: the process never saw it
            call.future.set_exception(error)
            self._idle.append(worker)
            self._dispatch()
            return
        answer = await worker.link.receive()
        if answer is None:
            code = await self._ended(worker)
            log.error("an image worker process stopped (exit status %s) during a call; starting another", code)
            call.future.set_exception(ProcessDied(f"the process stopped (exit status {code})"))
            return
        kind, value = answer
        if kind == "ok":
            call.future.set_result(value)
        else:
            call.future.set_exception(value)
        self._idle.append(worker)
        self._dispatch()


# ---------------------------------------------------------------------- in the worker process


def serve_calls(sock: socket.socket, initializer: Callable[[], None]) -> None:
    """A worker process's life: the initializer, "ready", then each call received and answered in turn,
    until the pool's end of the socket closes."""
    initializer()
    _send(sock, ("ready", os.getpid()))
    while (message := _receive(sock)) is not None:
        _call, function = message
        try:
            answer: tuple = ("ok", function())
        except Exception as error:
            answer = ("error", error)
        _send(sock, answer)


def _send(sock: socket.socket, answer: tuple) -> None:
    try:
        data = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as error:  # a result or exception that cannot be pickled: say so instead
        data = pickle.dumps(("error", RuntimeError(f"an answer that cannot be pickled ({type(error).__name__})")))
    if len(data) < SPLIT_AT:
        sock.sendall(HEADER.pack(len(data)) + data)
    else:
        sock.sendall(HEADER.pack(len(data)))
        sock.sendall(data)


def _receive(sock: socket.socket) -> Any:
    """The next message, or None when the pool's end closed."""
    header = _read(sock, HEADER.size)
    if header is None:
        return None
    data = _read(sock, HEADER.unpack(header)[0])
    return None if data is None else pickle.loads(data)


def _read(sock: socket.socket, size: int) -> bytearray | None:
    data = bytearray(size)
    view, got = memoryview(data), 0
    while got < size:
        count = sock.recv_into(view[got:])
        if count == 0:
            return None
        got += count
    return data

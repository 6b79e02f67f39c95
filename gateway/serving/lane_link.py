"""The link between two of this worker's processes (the intake and a lane, a lane and an image worker):
messages over a Unix socket pair.

A message is a tuple whose first item names its kind, pickled behind a 4-byte length. Both ends are this
worker's own processes, started together from the same code, so pickle is safe here and is the cheapest
way to carry a job (its base64 strings are copied, not escaped). ``send`` only buffers (it never waits),
so it may be called from synchronous code on the event loop; ``receive`` answers None once the other
end has gone.

Pool to image worker (``process_pool``): ``("call", function)``; back: ``("ready", pid)``, ``("ok", result)``,
``("error", exception)``.
Intake to lane: ``("job", job)``, ``("cancel", job_id)``, ``("model", request, ServedModel | error)``,
``("unloaded", name)``, ``("stop",)``.
Lane to intake: ``("ready", pid)``, ``("ended", job_id, posting)``, ``("answered", job_id)``,
``("load", request, name, missing)``, ``("preload", request, hf_id)``, ``("busy", name)``, ``("idle", name)``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import pickle
import socket
import struct
import typing

log = logging.getLogger("gateway")

HEADER = struct.Struct("!I")
MAX_MESSAGE = 1 << 30  # a job's body is bounded far below this by the job intake
SPLIT_AT = 1 << 16  # a larger message is written behind its header, not copied into one buffer with it


class Link(asyncio.Protocol):
    """One end of a lane's socket pair, used from one event loop.

    Messages are cut from the bytes as they arrive (``data_received``) and queued, so that a read that
    brings several of them wakes ``receive`` once; a frame that cannot be read closes the link (both ends
    are this worker's own code: it is a bug, and the other end is then treated as gone).
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._messages: collections.deque[tuple] = collections.deque()
        self._waiter: asyncio.Future | None = None
        self._closed = asyncio.get_running_loop().create_future()

    @classmethod
    async def over(cls, sock: socket.socket) -> Link:
        _transport, link = await asyncio.get_running_loop().create_unix_connection(cls, sock=sock)
        return link

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)  # uvloop's is not asyncio's class

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while len(buffer) - start >= HEADER.size:
            (length,) = HEADER.unpack_from(buffer, start)
            end = start + HEADER.size + length
            if length > MAX_MESSAGE:
                self._broken(f"a message of {length} bytes")
                return
            if len(buffer) < end:
                break
            unreadable = None
            with memoryview(buffer) as view:
                try:
                    self._messages.append(pickle.loads(view[start + HEADER.size : end]))
                except Exception as error:  # whatever unpickling raised, the link is broken
                    unreadable = type(error).__name__
            if unreadable is not None:  # outside the view: the buffer can be cleared
                self._broken(f"an unreadable message ({unreadable})")
                return
            start = end
        del buffer[:start]
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed.done():
            self._closed.set_result(None)
        self._wake()

    # ------------------------------------------------------------------ the link

    def _broken(self, what: str) -> None:
        log.error("%s; the link is closed", what)
        self._buffer.clear()
        assert self.transport is not None
        self.transport.abort()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def send(self, *message: object) -> None:
        """Queue ``message`` for the other end; dropped when the link is already closed."""
        if self.transport is None or self.transport.is_closing():
            return
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) < SPLIT_AT:
            self.transport.write(HEADER.pack(len(data)) + data)
        else:  # a job: no copy of its photo to put four bytes in front of it
            self.transport.write(HEADER.pack(len(data)))
            self.transport.write(data)

    async def receive(self) -> tuple | None:
        """The next message, or None when the other end closed the link (or died)."""
        while not self._messages:
            if self._closed.done():
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._messages.popleft()

    @property
    def is_closed(self) -> bool:
        return self._closed.done()

    async def wait_closed(self) -> None:
        """Until the link has closed (the other end gone, or ``close``); cancelling the wait does not close it."""
        await asyncio.shield(self._closed)

    async def close(self) -> None:
        if self.transport is None:
            return
        self.transport.close()
        await self._closed

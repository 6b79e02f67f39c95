"""The link between the job intake and one lane process: messages over a Unix socket pair.

A message is a tuple whose first item names its kind, pickled behind a 4-byte length. Both ends are this
worker's own processes, started together from the same code, so pickle is safe here and is the cheapest
way to carry a job (its base64 strings are copied, not escaped). ``send`` only buffers (it never waits),
so it may be called from synchronous code on the event loop; ``receive`` answers None once the other
end has gone.

Intake to lane: ``("job", job)``, ``("cancel", job_id)``, ``("model", request, ServedModel | error)``,
``("unloaded", name)``, ``("stop",)``.
Lane to intake: ``("ready", pid)``, ``("ended", job_id, posting)``, ``("answered", job_id)``,
``("load", request, name, missing)``, ``("preload", request, hf_id)``, ``("busy", name)``, ``("idle", name)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import socket
import struct

HEADER = struct.Struct("!I")
MAX_MESSAGE = 1 << 30  # a job's body is bounded far below this by the job intake


class Link:
    """One end of a lane's socket pair, used from one event loop."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def over(cls, sock: socket.socket) -> Link:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
        return cls(reader, writer)

    def send(self, *message: object) -> None:
        """Queue ``message`` for the other end; dropped when the link is already closed."""
        if self.writer.is_closing():
            return
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.writer.write(HEADER.pack(len(data)) + data)

    async def receive(self) -> tuple | None:
        """The next message, or None when the other end closed the link (or died)."""
        try:
            (length,) = HEADER.unpack(await self.reader.readexactly(HEADER.size))
            if length > MAX_MESSAGE:
                raise ValueError(f"lane message of {length} bytes")
            return pickle.loads(await self.reader.readexactly(length))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()

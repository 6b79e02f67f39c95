"""What one image holds across processes, and when it may be given back.

An image holds a shared-memory slot (its network input and depth) and sometimes a parked photo. Image
worker processes write and read them, and a cancelled ``await`` does not stop a process: a decode that
nobody waits for any more still writes its slot. ``Holdings`` therefore gives an image's resources back
only when both are true: the gateway is done with the image (``close``, whatever cancelled it), and every
process call started for it has ended (``track``). Triton's own late writes are covered by the slot's
hold-back (``SharedTensors.release``), which runs as one of these give-backs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class Holdings:
    """One image's resources and the process calls that may still use them. Use from its event loop."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._running: set[Future | asyncio.Future] = set()
        self._give_backs: list[Callable[[], None]] = []
        self._closed = False

    def on_give_back(self, give_back: Callable[[], None]) -> None:
        """Run ``give_back`` once the image is closed and no process call of it is running."""
        self._give_backs.append(give_back)
        self._maybe_give_back()

    def track(self, future: Future | asyncio.Future, on_result: Callable[[Any], None] | None = None) -> None:
        """A process (or thread) call that may use the resources; ``on_result(result)`` when it succeeds,
        whether or not anyone still awaits it (e.g. to hold the photo it parked)."""
        self._running.add(future)
        if isinstance(future, asyncio.Future):  # set on this loop (``process_pool``)
            future.add_done_callback(lambda done: self._ended(done, on_result))
            return

        def ended(done: Future) -> None:  # in the pool's thread: hand over to the loop
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to give back to
                self._loop.call_soon_threadsafe(self._ended, done, on_result)

        future.add_done_callback(ended)

    def _ended(self, future: Future | asyncio.Future, on_result: Callable[[Any], None] | None) -> None:
        if on_result is not None and not future.cancelled() and future.exception() is None:
            on_result(future.result())
        self._running.discard(future)
        self._maybe_give_back()

    def close(self) -> None:
        """The gateway is done with the image (answered, failed or cancelled)."""
        self._closed = True
        self._maybe_give_back()

    def _maybe_give_back(self) -> None:
        if not self._closed or self._running:
            return
        give_backs, self._give_backs = self._give_backs, []
        for give_back in reversed(give_backs):
            give_back()

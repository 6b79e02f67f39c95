"""Keeps the embedded Triton alive: restart with backoff, reload the models in use, or give up loudly.

A thread watches the ``tritonserver`` process. When it dies unexpectedly (crash, OOM kill), its leftover
backend stubs are killed, it is started again on the same ports after a growing pause, and the models
the gateway had loaded are loaded again so the next job pays no load time. After ``max_restarts``
failed or repeated restarts within ``window`` seconds the supervisor gives up: it calls ``on_give_up``
(the worker then stops taking jobs, lets Runpod's loop drain and exits non-zero, so the platform
replaces the worker) instead of failing every job forever.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable

from gateway.serving.triton_process import EmbeddedTriton, TritonStartError

log = logging.getLogger("gateway")


class TritonSupervisor:
    def __init__(
        self,
        server: EmbeddedTriton,
        models_in_use: Callable[[], Iterable[str]],
        on_give_up: Callable[[], None],
        max_restarts: int = 5,
        window: float = 300.0,
        first_pause: float = 1.0,
        poll_interval: float = 0.5,
    ) -> None:
        self.server = server
        self.models_in_use = models_in_use
        self.on_give_up = on_give_up
        self.max_restarts = max_restarts
        self.window = window
        self.first_pause = first_pause
        self.poll_interval = poll_interval
        self.restarts: list[float] = []  # monotonic times of restart attempts
        self.gave_up = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="triton-supervisor", daemon=True)

    def start(self) -> TritonSupervisor:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (before a deliberate shutdown of Triton)."""
        self._stop.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_interval):
            if self.server.running():
                continue
            if not self._restart():
                self.gave_up = True
                log.error("Triton could not be restarted %d times in %g s; giving up", self.max_restarts, self.window)
                self.on_give_up()
                return

    def _restart(self) -> bool:
        """Restart until Triton is up (True) or the restart budget is spent (False)."""
        while not self._stop.is_set():
            now = time.monotonic()
            self.restarts = [t for t in self.restarts if now - t < self.window]
            if len(self.restarts) >= self.max_restarts:
                return False
            pause = self.first_pause * 2 ** len(self.restarts)
            log.error("Triton exited (status %s); restarting in %g s", self.server.process.returncode, pause)
            self.server.terminate()  # its stubs
            if self._stop.wait(pause):
                return True
            self.restarts.append(time.monotonic())
            try:
                self.server.start()
            except TritonStartError as error:
                log.error("Triton restart failed: %s", str(error).splitlines()[0])
                continue
            self._reload()
            return True
        return True

    def _reload(self) -> None:
        for name in self._names():
            request = urllib.request.Request(f"{self.server.http_url}/v2/repository/models/{name}/load", method="POST")
            try:
                with urllib.request.urlopen(request, timeout=600):
                    log.info("reloaded model %s after the restart", name)
            except (urllib.error.URLError, OSError) as error:
                log.error("could not reload %s after the restart: %s", name, error)

    def _names(self) -> list[str]:
        for _ in range(3):  # the event loop may change the collection while it is copied
            with contextlib.suppress(RuntimeError):
                return list(self.models_in_use())
        return []

"""Whether the worker can serve right now: Triton answers that it is live.

A thread asks Triton's gRPC liveness every ``interval`` seconds (not its readiness: with strict readiness
Triton reports not-ready while any model loads, which the LRU does in normal service). While Triton does not answer (a
supervised restart of the embedded server, a remote one unreachable) the job loop takes no jobs
(``concurrency_modifier`` answers 0) instead of taking them only to fail each in milliseconds; each
change is logged once. A remote Triton that stays unreachable for ``give_up_after`` seconds makes the
worker leave (``on_give_up``: it stops taking jobs, drains and exits non-zero) so that the platform
replaces it; the embedded one is the supervisor's to restart or give up on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import tritonclient.grpc as grpcsync
from tritonclient.utils import InferenceServerException

log = logging.getLogger("gateway")


def triton_live(url: str, timeout: float) -> bool:
    """One liveness question to Triton's gRPC endpoint at ``url``."""
    client = grpcsync.InferenceServerClient(url)
    try:
        return bool(client.is_server_live(client_timeout=timeout))
    except InferenceServerException:
        return False
    finally:
        client.close()


class TritonHealth:
    def __init__(
        self,
        url: str,
        give_up_after: float | None,
        on_give_up: Callable[[], None],
        interval: float = 1.0,
        probe: Callable[[str, float], bool] = triton_live,
    ) -> None:
        self.url = url
        self.give_up_after = give_up_after
        self.on_give_up = on_give_up
        self.interval = interval
        self.probe = probe
        self.up = True  # the worker starts only once Triton answered
        self.gave_up = False
        self.down_since: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="triton-health", daemon=True)

    def start(self) -> TritonHealth:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def concurrency(self, wanted: int) -> int:
        """``wanted`` while Triton answers, else 0 (runpod's ``concurrency_modifier``)."""
        return wanted if self.up else 0

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.observe(self.probe(self.url, max(self.interval, 1.0)))
            if self.gave_up:
                return

    def observe(self, up: bool) -> None:
        """Record one liveness answer; log changes; give up when down for too long."""
        now = time.monotonic()
        if up:
            if not self.up:
                log.info("Triton answers again after %.0f s; taking jobs", now - (self.down_since or now))
            self.up, self.down_since = True, None
            return
        if self.up:
            log.error("Triton at %s does not answer; taking no jobs until it does", self.url)
            self.up, self.down_since = False, now
        if self.give_up_after is not None and now - (self.down_since or now) >= self.give_up_after:
            log.error("Triton at %s unreachable for %.0f s; leaving so the platform replaces this worker",
                      self.url, now - (self.down_since or now))  # fmt: skip
            self.gave_up = True
            self.on_give_up()

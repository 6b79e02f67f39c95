"""Whether the worker can serve right now: Triton answers that it is live.

A thread asks Triton's gRPC liveness every ``interval`` seconds (not its readiness: with strict readiness
Triton reports not-ready while any model loads, which the LRU does in normal service). While Triton does not answer (a
supervised restart of the embedded server, a remote one unreachable) the job loop takes no jobs
(``concurrency_modifier`` answers 0) instead of taking them only to fail each in milliseconds; each
change is logged once. A remote Triton that stays unreachable for ``give_up_after`` seconds makes the
worker leave (``on_give_up``: it stops taking jobs, drains and exits non-zero) so that the platform
replaces it; the embedded one is the supervisor's to restart or give up on.

The probe keeps one gRPC channel (``LiveProbe``): with a new channel for each question (name resolution,
connection, HTTP/2 set-up) a question cost the probing thread 3.2 ms of CPU, against 1.8 ms (medians,
a tritonserver on loopback). Its reconnection backoff is capped at ``RECONNECT_MS``, so a Triton that
comes back is seen within about a second, as with a new channel (gRPC's default backoff grows to 120 s).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import tritonclient.grpc as grpcsync
from tritonclient.utils import InferenceServerException

log = logging.getLogger("gateway")


RECONNECT_MS = 1000  # gRPC's default backoff grows to 120 s between reconnection attempts


class LiveProbe:
    """Liveness questions to Triton's gRPC endpoint over one channel, opened at the first question."""

    def __init__(self) -> None:
        self._client: grpcsync.InferenceServerClient | None = None

    def __call__(self, url: str, timeout: float) -> bool:
        if self._client is None:
            backoff = [(f"grpc.{name}_reconnect_backoff_ms", RECONNECT_MS) for name in ("initial", "min", "max")]
            self._client = grpcsync.InferenceServerClient(url, channel_args=backoff)
        try:
            return bool(self._client.is_server_live(client_timeout=timeout))
        except InferenceServerException:
            return False

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class TritonHealth:
    def __init__(
        self,
        url: str,
        give_up_after: float | None,
        on_give_up: Callable[[], None],
        interval: float = 1.0,
        probe: Callable[[str, float], bool] | None = None,
    ) -> None:
        self.url = url
        self.give_up_after = give_up_after
        self.on_give_up = on_give_up
        self.interval = interval
        self.probe = probe or LiveProbe()
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
        try:
            while not self._stop.wait(self.interval):
                self.observe(self.probe(self.url, max(self.interval, 1.0)))
                if self.gave_up:
                    return
        finally:
            if isinstance(self.probe, LiveProbe):
                self.probe.close()

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

"""runpod's heartbeat, with its answer left unread.

runpod 1.12's heartbeat process (``rp_ping.Heartbeat``, forked from the job intake) pings the job API
every ``RUNPOD_PING_INTERVAL`` with the jobs in progress, through ``requests`` without ``stream``: it reads
each answer's body whole into memory, and its timeout only bounds the wait between two reads, so an
endless answer would grow that process without end and stop its pings. Only the answer's status was ever
looked at (and only logged), so ``send_ping`` sends the same request (URL, parameters, session, retries,
timeout) and closes the answer without reading its body. ``install`` puts it in place before the
heartbeat process is forked.
"""

from __future__ import annotations

import logging

import requests
from runpod.serverless.modules import rp_ping

log = logging.getLogger("gateway")


def send_ping(heartbeat: rp_ping.Heartbeat) -> None:
    """One ping, as ``Heartbeat._send_ping`` sends it; the answer's body is not read."""
    job_ids = heartbeat._mirror.get() if heartbeat._mirror is not None else None
    params = {"job_id": job_ids, "runpod_version": rp_ping.runpod_version}
    try:
        with heartbeat._session.get(
            heartbeat.PING_URL, params=params, timeout=heartbeat.PING_INTERVAL * 2, stream=True
        ) as answer:
            log.debug("heartbeat sent: HTTP %d", answer.status_code)
    except requests.RequestException as error:
        log.error("heartbeat failed: %s", type(error).__name__)


def install() -> None:
    rp_ping.Heartbeat._send_ping = send_ping  # type: ignore[method-assign]

"""Depth for a whole dataset from a running endpoint (the user's side): ``python -m gateway.client`` or,
from Python, ``DepthClient(endpoint).run(inputs, out)`` (``api``).

Inputs (``inputs``) are expanded lazily from files, folders, globs and ``@list.txt`` files of paths or
URLs; jobs (``jobs``) go to Runpod's async API (``/run`` then ``/status/{id}``) with at most
``--concurrency`` in flight and retries on 429, 5xx, timeouts and lost jobs; outputs (``outputs``) mirror
the input tree under ``--out``, written atomically, so a rerun skips what is done. No runpod and no
tritonclient here: aiohttp, tqdm, and the request schema to refuse bad options before sending.
"""

from gateway.client.api import DepthClient

__all__ = ["DepthClient"]

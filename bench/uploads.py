"""CPU per uploaded object: the storage's presigned PUT against boto3's ``put_object``, on real S3.

    python -m bench.uploads [--repeats 7] [--objects 40]

SeaweedFS on loopback (started here). Per object: the upload and its presigned GET URL, as a url-mode
output needs. Ours is ``gateway.storage.Storage._put`` (botocore's SigV4 query signer, one urllib3 pool
per target); the baseline is what it replaced, a boto3 client configured as the worker's was (path
addressing, no CRC32 of bodies, two attempts) calling ``put_object`` and ``generate_presigned_url``. Both
run in this process, one after the other, ``--objects`` objects a batch, ``--repeats`` batches each,
interleaved; CPU time (``time.process_time``: this process's user and system time, so the kernel's copy
of the body to the socket counts and the server's work does not), medians. Sizes: 200 kB (a colour map)
and 1 MB (a 16-bit depth PNG). Writes bench/results/uploads.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import boto3
from botocore.config import Config

from bench.common import write
from bench.seaweed import ADMIN, Weed
from gateway.storage import Storage, StorageTarget

SIZES = {"200 kB": 200_000, "1 MB": 1_000_000}
BUCKET = "bench-uploads"


def boto3_put(target: StorageTarget) -> Callable[[str, bytes], str]:
    """The replaced path: boto3's put_object, then a presigned GET."""
    client = boto3.client(
        "s3", endpoint_url=target.endpoint.url, aws_access_key_id=target.access_key,
        aws_secret_access_key=target.secret_key, region_name=target.region,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}, retries={"max_attempts": 2},
                      request_checksum_calculation="when_required", response_checksum_validation="when_required"),
    )  # fmt: skip

    def put(key: str, data: bytes) -> str:
        client.put_object(Bucket=target.name, Key=key, Body=data, ContentType="image/png")
        return client.generate_presigned_url("get_object", Params={"Bucket": target.name, "Key": key}, ExpiresIn=60)

    return put


def cpu_ms_per_object(put: Callable[[str, bytes], str], data: bytes, objects: int, tag: str) -> float:
    started = time.process_time()
    for n in range(objects):
        url = put(f"bench/{tag}/{n}.png", data)
        assert url.startswith("http"), url
    return (time.process_time() - started) / objects * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--objects", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        weed = Weed(Path(folder)).start()
        try:
            weed.client().create_bucket(Bucket=BUCKET)
            target = StorageTarget.configured(weed.url, *ADMIN, BUCKET)
            storage = Storage("", 60, 30.0)
            paths = {
                "ours": lambda key, data: storage._put(storage._client(target), key, data, "image/png"),
                "boto3 put_object": boto3_put(target),
            }
            rows = {}
            for label, size in SIZES.items():
                data = os.urandom(size)
                samples: dict[str, list[float]] = {name: [] for name in paths}
                for put in paths.values():  # warm: connections, clients
                    cpu_ms_per_object(put, data, 3, "warm")
                for _ in range(args.repeats):
                    for name, put in paths.items():
                        samples[name].append(cpu_ms_per_object(put, data, args.objects, name.split()[0]))
                rows[label] = {name: statistics.median(values) for name, values in samples.items()}
                rows[label]["ratio"] = rows[label]["boto3 put_object"] / rows[label]["ours"]
        finally:
            weed.stop()
    print("| object | presigned PUT (ours) | boto3 put_object | ratio |\n|---|---:|---:|---:|")
    for label, row in rows.items():
        print(f"| {label} | {row['ours']:.2f} ms | {row['boto3 put_object']:.2f} ms | {row['ratio']:.2f}x |")
    print(f"wrote {write('uploads', {'repeats': args.repeats, 'objects': args.objects, 'cpu_ms_per_object': rows})}")


if __name__ == "__main__":
    main()

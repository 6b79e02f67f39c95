"""Gateway settings, read once from the environment. Every variable has a safe default."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL = "depth-anything/Depth-Anything-V2-Small-hf"
CGROUP = Path("/sys/fs/cgroup")
# One lane's gateway process spends about a tenth of an image's CPU on its own threads (bench.worker):
# eight cores of image workers keep it below saturation.
CORES_PER_LANE = 8


def cgroup_cpu_limit(root: Path = CGROUP) -> float | None:
    """CPUs the container's cgroup quota allows (v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us`` over its
    period); None when there is no quota or no cgroup file to read."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for folder in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota <= 0 or period <= 0 else quota / period
    return None


def usable_cpus(root: Path = CGROUP) -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup's quota (a container on a
    128-core host limited to 16 vCPUs: 16, where ``os.cpu_count()`` says 128)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


RUNPOD_VOLUME = Path("/runpod-volume")
TENSORRT_LINK = Path("/opt/depth/tensorrt-cache")  # the exported configs' fixed path (export.triton_config)


def default_tensorrt_cache(volume: Path = RUNPOD_VOLUME) -> Path:
    """TensorRT engines outlive the container on Runpod's network volume when one is attached; else they
    stay inside the container (rebuilt after every cold start)."""
    return volume / "tensorrt-cache" if volume.is_dir() else TENSORRT_LINK.parent / "tensorrt-cache-local"


def _items(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _choice(raw: str, allowed: tuple[str, ...]) -> str:
    if raw.lower() not in allowed:
        raise ValueError(f"expected one of {', '.join(allowed)}, not {raw!r}")
    return raw.lower()


@dataclass(frozen=True)
class Settings:
    default_model: str = DEFAULT_MODEL
    triton_url: str | None = None
    model_repository: Path = Path("model_repository")
    max_loaded_models: int = 2
    concurrency: int = 32
    max_images: int = 16
    max_download_bytes: int = 25 << 20
    download_timeout: float = 15.0
    downloads_per_job: int = 4
    max_b64_chars: int = 36 << 20
    max_pixels: int = 50_000_000
    max_job_pixels: int = 64_000_000
    max_response_bytes: int = 10_000_000  # Runpod's cap on a /run result (the client uses /run)
    triton_timeout: float = 60.0
    triton_retries: int = 3
    triton_start_timeout: float = 180.0
    triton_max_restarts: int = 5
    triton_unreachable_exit: float = 300.0
    cpu_workers: int = field(default_factory=usable_cpus)
    url_allowlist: tuple[str, ...] = ()
    bucket_endpoint_url: str | None = None
    bucket_access_key_id: str | None = None
    bucket_secret_access_key: str | None = field(default=None, repr=False)
    bucket_name: str = "depth-outputs"
    bucket_region: str | None = None
    bucket_prefix: str = "depth"
    bucket_url_expiry: int = 7 * 24 * 3600
    upload_timeout: float = 60.0
    triton_ports: tuple[int, ...] = (8000, 8001, 8002)
    shared_memory: str = "auto"
    shared_memory_slots: int = 64
    input_memory_bytes: int = 512 << 20
    work_memory_bytes: int = 3 << 30
    output_memory_bytes: int = 2 << 30
    max_video_bytes: int = 200 << 20
    max_video_seconds: float = 120.0
    max_video_frames: int = 1800
    max_video_pixels: int = 3840 * 2160
    video_spool_bytes: int = 2 << 30
    video_timeout: float = 900.0
    video_window: int = 8
    tensorrt_cache_dir: Path = field(default_factory=lambda: default_tensorrt_cache())
    lanes: int = 0  # 0: one per CORES_PER_LANE CPU workers

    def lane_count(self) -> int:
        """Gateway processes behind the job intake (``gateway.serving.lanes``)."""
        return self.lanes if self.lanes > 0 else max(1, self.cpu_workers // CORES_PER_LANE)

    def lane_share(self, count: int, index: int) -> dict[str, str]:
        """The variables that give lane ``index`` of ``count`` its share of the per-process budgets."""

        def share(total: int) -> int:
            return total // count + (index < total % count)

        return {
            "CPU_WORKERS": str(max(1, share(self.cpu_workers))),
            "SHARED_MEMORY_SLOTS": str(max(1, share(self.shared_memory_slots))),
            "INPUT_MEMORY_BYTES": str(self.input_memory_bytes // count),
            "WORK_MEMORY_BYTES": str(self.work_memory_bytes // count),
            "OUTPUT_MEMORY_BYTES": str(self.output_memory_bytes // count),
            "VIDEO_SPOOL_BYTES": str(self.video_spool_bytes // count),
            "LANES": "1",
        }

    @classmethod
    def from_env(cls) -> Settings:
        """Defaults, overridden by every variable of ``ENVIRONMENT`` that is set and not empty."""
        values = {
            name: parse(os.environ[variable].strip())
            for name, (variable, parse) in ENVIRONMENT.items()
            if os.environ.get(variable, "").strip()
        }
        return cls(**values)


# Settings field -> (environment variable, parser).
ENVIRONMENT: dict[str, tuple[str, Callable[[str], object]]] = {
    "default_model": ("DEPTH_MODEL", str),
    "triton_url": ("TRITON_URL", str),
    "model_repository": ("MODEL_REPOSITORY", Path),
    "max_loaded_models": ("MAX_LOADED_MODELS", int),
    "concurrency": ("CONCURRENCY", int),
    "max_images": ("MAX_IMAGES", int),
    "max_download_bytes": ("MAX_DOWNLOAD_BYTES", int),
    "download_timeout": ("DOWNLOAD_TIMEOUT", float),
    "downloads_per_job": ("DOWNLOADS_PER_JOB", int),
    "max_b64_chars": ("MAX_B64_CHARS", int),
    "max_pixels": ("MAX_PIXELS", int),
    "max_job_pixels": ("MAX_JOB_PIXELS", int),
    "max_response_bytes": ("MAX_RESPONSE_BYTES", int),
    "triton_timeout": ("TRITON_TIMEOUT", float),
    "triton_retries": ("TRITON_RETRIES", int),
    "triton_start_timeout": ("TRITON_START_TIMEOUT", float),
    "triton_max_restarts": ("TRITON_MAX_RESTARTS", int),
    "triton_unreachable_exit": ("TRITON_UNREACHABLE_EXIT", float),
    "cpu_workers": ("CPU_WORKERS", int),
    "url_allowlist": ("URL_ALLOWLIST", _items),
    "bucket_endpoint_url": ("BUCKET_ENDPOINT_URL", str),
    "bucket_access_key_id": ("BUCKET_ACCESS_KEY_ID", str),
    "bucket_secret_access_key": ("BUCKET_SECRET_ACCESS_KEY", str),
    "bucket_name": ("BUCKET_NAME", str),
    "bucket_region": ("BUCKET_REGION", str),
    "bucket_prefix": ("BUCKET_PREFIX", str),
    "bucket_url_expiry": ("BUCKET_URL_EXPIRY", int),
    "upload_timeout": ("UPLOAD_TIMEOUT", float),
    "triton_ports": ("TRITON_PORTS", lambda raw: tuple(int(port) for port in _items(raw))),
    "shared_memory": ("TRITON_SHARED_MEMORY", lambda raw: _choice(raw, ("auto", "off"))),
    "shared_memory_slots": ("SHARED_MEMORY_SLOTS", int),
    "input_memory_bytes": ("INPUT_MEMORY_BYTES", int),
    "work_memory_bytes": ("WORK_MEMORY_BYTES", int),
    "output_memory_bytes": ("OUTPUT_MEMORY_BYTES", int),
    "max_video_bytes": ("MAX_VIDEO_BYTES", int),
    "max_video_seconds": ("MAX_VIDEO_SECONDS", float),
    "max_video_frames": ("MAX_VIDEO_FRAMES", int),
    "max_video_pixels": ("MAX_VIDEO_PIXELS", int),
    "video_spool_bytes": ("VIDEO_SPOOL_BYTES", int),
    "video_timeout": ("VIDEO_TIMEOUT", float),
    "video_window": ("VIDEO_WINDOW", int),
    "tensorrt_cache_dir": ("TENSORRT_CACHE_DIR", Path),
    "lanes": ("LANES", int),
}

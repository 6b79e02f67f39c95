"""Gateway settings, read once from the environment. Every variable has a safe default."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL = "depth-anything/Depth-Anything-V2-Small-hf"


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def _list(name: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in os.environ.get(name, "").split(",") if item.strip())


@dataclass(frozen=True)
class Settings:
    default_model: str = DEFAULT_MODEL
    triton_url: str | None = None
    model_repository: Path = Path("model_repository")
    max_loaded_models: int = 2
    concurrency: int = 8
    max_images: int = 16
    max_download_bytes: int = 25 << 20
    download_timeout: float = 15.0
    max_b64_chars: int = 36 << 20
    max_pixels: int = 50_000_000
    max_response_bytes: int = 20_000_000
    triton_timeout: float = 60.0
    triton_retries: int = 3
    triton_start_timeout: float = 180.0
    postprocess_threads: int = field(default_factory=lambda: os.cpu_count() or 2)
    url_allowlist: tuple[str, ...] = ()
    triton_ports: tuple[int, ...] = (8000, 8001, 8002)

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            default_model=os.environ.get("DEPTH_MODEL", DEFAULT_MODEL),
            triton_url=os.environ.get("TRITON_URL") or None,
            model_repository=Path(os.environ.get("MODEL_REPOSITORY", "model_repository")),
            max_loaded_models=_int("MAX_LOADED_MODELS", 2),
            concurrency=_int("CONCURRENCY", 8),
            max_images=_int("MAX_IMAGES", 16),
            max_download_bytes=_int("MAX_DOWNLOAD_BYTES", 25 << 20),
            download_timeout=_float("DOWNLOAD_TIMEOUT", 15.0),
            max_b64_chars=_int("MAX_B64_CHARS", 36 << 20),
            max_pixels=_int("MAX_PIXELS", 50_000_000),
            max_response_bytes=_int("MAX_RESPONSE_BYTES", 20_000_000),
            triton_timeout=_float("TRITON_TIMEOUT", 60.0),
            triton_retries=_int("TRITON_RETRIES", 3),
            triton_start_timeout=_float("TRITON_START_TIMEOUT", 180.0),
            postprocess_threads=_int("POSTPROCESS_THREADS", os.cpu_count() or 2),
            url_allowlist=_list("URL_ALLOWLIST"),
            triton_ports=tuple(int(port) for port in _list("TRITON_PORTS")) or (8000, 8001, 8002),
        )

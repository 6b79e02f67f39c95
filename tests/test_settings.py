"""Settings from the environment: every field has a variable, empty means default, bad values fail loudly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gateway.settings import ENVIRONMENT, Settings


def test_every_field_has_a_variable() -> None:
    assert set(ENVIRONMENT) == {field.name for field in dataclasses.fields(Settings)}


def test_values_are_parsed_and_empty_means_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_IMAGES", "3")
    monkeypatch.setenv("DOWNLOAD_TIMEOUT", "2.5")
    monkeypatch.setenv("MODEL_REPOSITORY", "/models")
    monkeypatch.setenv("URL_ALLOWLIST", "images.example, 10.0.0.0/8,")
    monkeypatch.setenv("TRITON_PORTS", "9000,9001")
    monkeypatch.setenv("TRITON_URL", "")
    settings = Settings.from_env()
    assert settings.max_images == 3
    assert settings.download_timeout == 2.5
    assert settings.model_repository == Path("/models")
    assert settings.url_allowlist == ("images.example", "10.0.0.0/8")
    assert settings.triton_ports == (9000, 9001)
    assert settings.triton_url is None
    assert settings.max_response_bytes == 10_000_000  # Runpod's /run cap


def test_a_malformed_number_fails_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_IMAGES", "many")
    with pytest.raises(ValueError, match="many"):
        Settings.from_env()


def test_shared_memory_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (Settings().shared_memory, Settings().shared_memory_slots) == ("auto", 64)
    monkeypatch.setenv("TRITON_SHARED_MEMORY", "OFF")
    monkeypatch.setenv("SHARED_MEMORY_SLOTS", "8")
    assert (Settings.from_env().shared_memory, Settings.from_env().shared_memory_slots) == ("off", 8)
    monkeypatch.setenv("TRITON_SHARED_MEMORY", "sometimes")
    with pytest.raises(ValueError, match="expected one of auto, off, not 'sometimes'"):
        Settings.from_env()
    monkeypatch.setenv("TRITON_SHARED_MEMORY", "auto")
    monkeypatch.setenv("SHARED_MEMORY_SLOTS", "eight")
    with pytest.raises(ValueError, match="eight"):
        Settings.from_env()

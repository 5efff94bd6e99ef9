"""build_engine picks the engine the settings ask for, and refuses vllm where it cannot run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from gateway.engine.base import Engine
from gateway.engine.factory import build_engine, resolve_engine_name, vllm_available
from gateway.errors import EngineUnavailableError
from gateway.settings import Settings, SettingsError


def _settings(tmp_path: Path, engine: str) -> Settings:
    return Settings(engine=engine, load_format="dummy", cache_dir=str(tmp_path))  # type: ignore[arg-type]


def test_fake(tmp_path: Path) -> None:
    from gateway.engine.fake import FakeEngine

    engine = build_engine(_settings(tmp_path, "fake"))
    assert isinstance(engine, FakeEngine) and isinstance(engine, Engine)


def test_reference_is_built_but_not_loaded(tmp_path: Path) -> None:
    from gateway.engine.reference.engine import ReferenceEngine

    engine = build_engine(_settings(tmp_path, "reference"))
    assert isinstance(engine, ReferenceEngine) and isinstance(engine, Engine)
    assert (engine.name, engine.model_id, engine.sample_rate) == ("reference", "dummy-seed0", 24000)
    with pytest.raises(EngineUnavailableError):  # not loaded until start()
        engine.components
    assert not (tmp_path / "dummy").exists()  # nothing is written before start()


def test_auto_follows_the_machine(tmp_path: Path) -> None:
    expected = "vllm" if vllm_available() else "reference"
    assert resolve_engine_name(_settings(tmp_path, "auto")) == expected


@pytest.mark.skipif(vllm_available(), reason="vllm can run here")
def test_vllm_where_it_cannot_run_is_a_settings_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as info:
        build_engine(_settings(tmp_path, "vllm"))
    message = str(info.value)
    assert "--engine reference" in message
    if importlib.util.find_spec("vllm") is None:
        assert "vllm package" in message
    else:
        assert "CUDA" in message


def test_vllm_with_families_it_does_not_serve_yet_is_a_settings_error(tmp_path: Path) -> None:
    settings = Settings(engine="vllm", models=("chatterbox", "chatterbox-turbo"), cache_dir=str(tmp_path))
    with pytest.raises(SettingsError, match="serves only chatterbox so far; chatterbox-turbo run on --engine reference"):
        resolve_engine_name(settings)
    auto = Settings(engine="auto", models=("chatterbox-multilingual",), cache_dir=str(tmp_path))
    assert resolve_engine_name(auto) == "reference"

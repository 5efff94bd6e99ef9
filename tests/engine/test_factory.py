"""build_engine picks the engine the settings ask for, and refuses vllm where it cannot run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from gateway.engine.base import Engine
from gateway.engine.factory import build_engine, resolve_engine_name, vllm_available, vllm_installed
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
    assert ("CUDA" if vllm_installed() else "vllm package") in message


def test_a_folder_named_vllm_is_not_vllm(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """pytest puts folders such as tests/engine on the path, where ``vllm`` is a test folder
    (a namespace package to the import system); a package with an ``__init__.py`` is one."""
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    (tmp_path / "vllm").mkdir()
    assert not vllm_installed() and not vllm_available()
    (tmp_path / "vllm" / "__init__.py").write_text("")
    importlib.invalidate_caches()
    assert vllm_installed()


def test_vllm_serves_every_family_and_auto_picks_it_for_any_mix(tmp_path: Path) -> None:
    models = ("chatterbox", "chatterbox-turbo", "chatterbox-multilingual")
    for chosen in (models, models[1:2], models[2:], models[:2]):
        auto = Settings(engine="auto", models=chosen, cache_dir=str(tmp_path))
        assert resolve_engine_name(auto) == ("vllm" if vllm_available() else "reference")
        if vllm_available():
            assert resolve_engine_name(Settings(engine="vllm", models=chosen, cache_dir=str(tmp_path))) == "vllm"


def test_the_vllm_engine_holds_a_runtime_per_loaded_family(tmp_path: Path) -> None:
    from gateway.engine.vllm.engine import VllmEngine

    settings = Settings(engine="vllm", load_format="dummy", models=("chatterbox-turbo", "chatterbox-multilingual"),
                        cache_dir=str(tmp_path))
    engine = VllmEngine(settings)
    assert engine.models == ("chatterbox-turbo", "chatterbox-multilingual") == tuple(engine.runtimes)
    assert engine.model_id == "dummy-seed0/chatterbox-turbo"
    with pytest.raises(EngineUnavailableError):  # nothing loaded before start()
        engine.components_of("chatterbox-multilingual")

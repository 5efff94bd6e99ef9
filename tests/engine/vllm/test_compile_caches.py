"""The vLLM engine's compile caches (vLLM's, inductor's, Triton's) under ``cache_dir``, the one
folder a deployment keeps (the Docker image's volume), unless the environment names them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from gateway.engine.vllm.compile_caches import CACHES, use_compile_caches
from gateway.engine.vllm.engine import VllmEngine
from gateway.errors import EngineUnavailableError
from gateway.settings import load_settings

VARIABLES = [variable for variable, _ in CACHES]


def test_each_cache_goes_under_cache_dir_unless_the_environment_names_it(tmp_path: Path) -> None:
    environ = {"TRITON_CACHE_DIR": "/fast/triton", "TORCHINDUCTOR_CACHE_DIR": ""}  # empty: not named
    where = use_compile_caches(tmp_path / "cache", environ)
    assert where == {"VLLM_CACHE_ROOT": str(tmp_path / "cache" / "compile" / "vllm"),
                     "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache" / "compile" / "inductor"),
                     "TRITON_CACHE_DIR": "/fast/triton"}
    assert environ == where  # what vLLM, inductor, Triton and vLLM's engine-core process will read


def test_inductors_own_default_written_by_importing_dynamo_counts_as_not_named(tmp_path: Path) -> None:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    environ = {"TORCHINDUCTOR_CACHE_DIR": default_cache_dir()}  # what `import torch._dynamo` leaves
    where = use_compile_caches(tmp_path, environ)
    assert where["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compile" / "inductor")


def test_a_home_relative_cache_dir_is_expanded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    where = use_compile_caches("~/models", {})
    assert where["VLLM_CACHE_ROOT"] == str(tmp_path / "models" / "compile" / "vllm")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the engine would go on to start vLLM")
def test_the_engine_sets_them_before_anything_loads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torch._dynamo  # noqa: F401 - as upstream's model code does before any engine loads

    for variable in VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "operator-chosen"))
    settings = load_settings(environ={}, overrides={"load_format": "dummy", "cache_dir": str(tmp_path / "cache")})
    engine = VllmEngine(settings)
    with pytest.raises(EngineUnavailableError):  # no GPU here: it stops right after
        engine._load()
    assert os.environ["VLLM_CACHE_ROOT"] == str(tmp_path / "cache" / "compile" / "vllm")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "compile" / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "operator-chosen")

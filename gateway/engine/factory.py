"""One place that turns ``settings.engine`` into an engine object (built, not started).

Engine modules are imported only when chosen: the fake engine needs no torch, and the vLLM
engine's imports exist only on GPU machines.
"""

from __future__ import annotations

import importlib.util

from gateway.engine.base import Engine
from gateway.settings import Settings, SettingsError


def vllm_installed() -> bool:
    """The vllm package is on the path (looked up, not imported: importing it costs seconds).
    A directory named ``vllm`` without an ``__init__.py`` (a test folder pytest put on the
    path, a stray checkout) is a namespace package to the import system, not vLLM."""
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin not in (None, "namespace")


def vllm_available() -> bool:
    """CUDA present and the vllm package installed (checked without importing vllm)."""
    if not vllm_installed():
        return False
    import torch

    return torch.cuda.is_available()


def resolve_engine_name(settings: Settings) -> str:
    """``reference``, ``vllm`` or ``fake``; ``auto`` picks vllm where it can run (it serves
    every model family, any mix of them in one process).

    Raises :class:`~gateway.settings.SettingsError` (the CLI prints it and exits) when vllm is
    asked for on a machine that cannot run it.
    """
    if settings.engine == "auto":
        return "vllm" if vllm_available() else "reference"
    if settings.engine == "vllm" and not vllm_available():
        missing = "a CUDA GPU" if vllm_installed() else "the vllm package"
        raise SettingsError(
            f"--engine vllm needs {missing}. Install the GPU extra (pip install "
            "'chatterbox-gateway[gpu]') on a CUDA machine, or use --engine reference."
        )
    return settings.engine


def build_engine(settings: Settings) -> Engine:
    if settings.cluster:
        # gateway.cluster builds its engines with this factory (in each replica), so the
        # cluster engine is made by its own module: gateway.cluster.remote_engine.
        raise SettingsError(
            "cluster mode's engine is gateway.cluster.remote_engine.build_remote_engine(settings); "
            "pass it to create_app(settings, engine=...), as `serve --cluster` does."
        )
    name = resolve_engine_name(settings)
    if name == "reference":
        from gateway.engine.reference.engine import ReferenceEngine

        return ReferenceEngine(settings)
    if name == "vllm":
        from gateway.engine.vllm.engine import VllmEngine

        return VllmEngine(settings)
    from gateway.engine.fake import FakeEngine

    return FakeEngine()


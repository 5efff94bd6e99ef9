"""The Engine protocol's voice and text methods for engines built on the upstream Chatterbox
modules (``gateway.engine.checkpoint.components``): the reference engine and the vLLM engine condition
voices and count text tokens identically, so they share this one implementation.

A subclass provides ``_ready()``, returning its loaded ``Components`` (or raising
``EngineUnavailableError`` while it is not ready), and ``settings``; an engine that serves
several model families overrides ``_components_for(model)``. ``components`` is imported
lazily: it pulls in torch and the upstream code, which the HTTP layer must not import.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.errors import EngineError
from gateway.models.families import FAMILIES, ORIGINAL
from gateway.settings import Settings


class UpstreamVoices:
    _ready: Callable[[], Any]
    """Defined by each engine: its loaded ``Components``, or ``EngineUnavailableError``."""
    settings: Settings

    def _components_for(self, model: str) -> Any:
        components = self._ready()
        if components.family.id != model:
            raise EngineError(f"the {getattr(self, 'name', 'engine')} engine has not loaded the model {model}")
        return components

    def weights_id(self, model: str) -> str:
        from gateway.engine.checkpoint.weights import model_identity

        return model_identity(self.settings, FAMILIES[model])

    def compute_conditionals(self, clip: Path, model: str = ORIGINAL) -> Any:
        from gateway.engine.checkpoint.components import compute_conditionals

        return compute_conditionals(self._components_for(model), clip)

    def save_conditionals(self, conditionals: Any, path: Path) -> None:
        from gateway.engine.checkpoint.components import save_conditionals

        save_conditionals(conditionals, path)

    def load_conditionals(self, path: Path, model: str = ORIGINAL) -> Any:
        from gateway.engine.checkpoint.components import load_conditionals

        return load_conditionals(path, self._components_for(model).device)

    def builtin_conditionals(self, model: str = ORIGINAL) -> Any | None:
        return self._components_for(model).builtin_conditionals

    def count_text_tokens(self, text: str, model: str = ORIGINAL, language: str = "en") -> int:
        from gateway.engine.checkpoint.components import count_chunk_tokens

        return count_chunk_tokens(self._components_for(model), text, language)

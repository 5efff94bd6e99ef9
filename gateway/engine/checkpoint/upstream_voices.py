"""The Engine protocol's voice and text methods for engines built on the upstream Chatterbox
modules (``gateway.engine.checkpoint.components``): the reference engine and the vLLM engine condition
voices and count text tokens identically, so they share this one implementation.

A subclass provides ``_ready()``, returning its loaded ``Components`` (or raising
``EngineUnavailableError`` while it is not ready). ``components`` is imported lazily: it
pulls in torch and the upstream code, which the HTTP layer must not import.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


class UpstreamVoices:
    _ready: Callable[[], Any]
    """Defined by each engine: its loaded ``Components``, or ``EngineUnavailableError``."""

    def compute_conditionals(self, clip: Path) -> Any:
        from gateway.engine.checkpoint.components import compute_conditionals

        return compute_conditionals(self._ready(), clip)

    def save_conditionals(self, conditionals: Any, path: Path) -> None:
        from gateway.engine.checkpoint.components import save_conditionals

        save_conditionals(conditionals, path)

    def load_conditionals(self, path: Path) -> Any:
        from gateway.engine.checkpoint.components import load_conditionals

        return load_conditionals(path, self._ready().device)

    def builtin_conditionals(self) -> Any | None:
        return self._ready().builtin_conditionals

    def count_text_tokens(self, text: str) -> int:
        from gateway.engine.checkpoint.components import count_text_tokens

        return count_text_tokens(self._ready().tokenizer, text)

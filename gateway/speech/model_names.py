"""Model names a client may send, and the canonical model each one means.

``chatterbox`` is the model; the OpenAI names (``tts-1``, ``tts-1-hd``, ``gpt-4o-mini-tts``
and their dated snapshots) are aliases for it, so apps written for OpenAI work unchanged.
"""

from __future__ import annotations

import re

from gateway.errors import ModelNotFoundError

CHATTERBOX = "chatterbox"
OWNER = "resemble-ai"
# Chatterbox's public release (2025-05-28), used as the models' `created` timestamp.
CREATED = 1748390400

ALIASES: dict[str, str] = {
    "tts-1": CHATTERBOX,
    "tts-1-hd": CHATTERBOX,
    "tts-1-1106": CHATTERBOX,
    "tts-1-hd-1106": CHATTERBOX,
    "gpt-4o-mini-tts": CHATTERBOX,
    "gpt-4o-mini-tts-2025-03-20": CHATTERBOX,
    "gpt-4o-mini-tts-2025-12-15": CHATTERBOX,
}
CANONICAL: tuple[str, ...] = (CHATTERBOX,)

# Any dated snapshot OpenAI may publish later resolves too.
_DATED_SNAPSHOT = re.compile(r"gpt-4o-mini-tts-\d{4}-\d{2}-\d{2}")


def resolve_model(name: str) -> str:
    """The canonical model for a requested name; ModelNotFoundError (404) for unknown names."""
    key = name.strip().lower()
    if key in CANONICAL:
        return key
    if key in ALIASES:
        return ALIASES[key]
    if _DATED_SNAPSHOT.fullmatch(key):
        return CHATTERBOX
    known = ", ".join(model_ids())
    raise ModelNotFoundError(
        f"The model '{name}' does not exist. Available models: {known}.", param="model", code="model_not_found"
    )


def model_ids() -> list[str]:
    """Every id GET /v1/models lists: the canonical models, then the aliases."""
    return [*CANONICAL, *ALIASES]

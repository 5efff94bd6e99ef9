"""Model names a client may send, resolved to a loaded family of the registry.

The canonical ids are the families' (``chatterbox``, ``chatterbox-turbo``,
``chatterbox-multilingual``, see :mod:`gateway.models.families`); a server loads the ones in
its ``models`` setting. OpenAI's names are aliases, so apps written for OpenAI work unchanged,
each pointing at the loaded family nearest OpenAI's meaning:

- ``tts-1`` (OpenAI's fast model): Turbo when loaded, else the original;
- ``tts-1-hd`` (OpenAI's quality model): the original;
- ``gpt-4o-mini-tts`` and its dated snapshots (OpenAI's multilingual, instructable model):
  Multilingual when loaded, else the original;

and, where that family is not loaded either, the first family of ``models``. The
``model_aliases`` setting (``alias=family`` entries) overrides these and adds names of its
own. A known family that is not loaded, or any other name, is a 404 ``model_not_found`` that
names what is loaded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from gateway.errors import ModelNotFoundError
from gateway.models.families import FAMILIES, MULTILINGUAL, ORIGINAL, TURBO, Family

OWNER = "resemble-ai"
# Chatterbox's public release (2025-05-28), used as the models' `created` timestamp.
CREATED = 1748390400

DEFAULT_ALIASES: dict[str, tuple[str, ...]] = {
    # alias -> the families it prefers, in order; the first loaded one wins
    "tts-1": (TURBO, ORIGINAL),
    "tts-1-1106": (TURBO, ORIGINAL),
    "tts-1-hd": (ORIGINAL,),
    "tts-1-hd-1106": (ORIGINAL,),
    "gpt-4o-mini-tts": (MULTILINGUAL, ORIGINAL),
    "gpt-4o-mini-tts-2025-03-20": (MULTILINGUAL, ORIGINAL),
    "gpt-4o-mini-tts-2025-12-15": (MULTILINGUAL, ORIGINAL),
}

# Any dated snapshot OpenAI may publish later resolves like gpt-4o-mini-tts.
_DATED_SNAPSHOT = re.compile(r"gpt-4o-mini-tts-\d{4}-\d{2}-\d{2}")
_ALIAS_NAME = re.compile(r"[a-z0-9][a-z0-9._:-]{0,63}")


class ModelNames:
    """The names one server answers to: its loaded families and their aliases."""

    def __init__(self, loaded: Sequence[str], alias_overrides: Iterable[str] = ()) -> None:
        self.loaded: tuple[str, ...] = tuple(loaded)
        self.aliases: dict[str, str] = {
            alias: self._first_loaded(preferred) for alias, preferred in DEFAULT_ALIASES.items()
        }
        self.aliases.update(parse_alias_overrides(alias_overrides, self.loaded))

    def _first_loaded(self, preferred: tuple[str, ...]) -> str:
        return next((name for name in preferred if name in self.loaded), self.loaded[0])

    def resolve(self, name: str) -> Family:
        """The loaded family a requested name means; ModelNotFoundError (404) otherwise."""
        key = name.strip().lower()
        target = self.aliases.get(key)
        if target is None and _DATED_SNAPSHOT.fullmatch(key):
            target = self.aliases["gpt-4o-mini-tts"]
        if target is None and key in self.loaded:
            target = key
        if target is not None:
            return FAMILIES[target]
        loaded = ", ".join(self.loaded)
        if key in FAMILIES:
            message = f"The model '{name}' is not loaded on this server. Loaded models: {loaded} (see GET /v1/models)."
        else:
            message = f"The model '{name}' does not exist. Loaded models: {loaded}; aliases: {', '.join(self.aliases)}."
        raise ModelNotFoundError(message, param="model", code="model_not_found")

    def ids(self) -> list[str]:
        """Every id GET /v1/models lists: the loaded families, then the aliases."""
        return [*self.loaded, *self.aliases]


def parse_alias_overrides(entries: Iterable[str], loaded: Sequence[str]) -> dict[str, str]:
    """``alias=family`` entries as a dict; ValueError (naming the entry) for a bad one."""
    out: dict[str, str] = {}
    for entry in entries:
        alias, sep, target = (part.strip().lower() for part in entry.partition("="))
        if not sep or not _ALIAS_NAME.fullmatch(alias):
            raise ValueError(f"model alias {entry!r} is not of the form alias=family")
        if alias in FAMILIES:
            raise ValueError(f"model alias {entry!r} would hide the model {alias}")
        if target not in loaded:
            raise ValueError(f"model alias {entry!r} points at {target!r}, which is not loaded (models: {', '.join(loaded)})")
        out[alias] = target
    return out

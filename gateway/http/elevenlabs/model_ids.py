"""ElevenLabs ``model_id`` -> a loaded Chatterbox family.

Clients send ElevenLabs' ids by default (Pipecat and LiveKit ``eleven_turbo_v2_5`` or
``eleven_flash_v2_5``, the SDK ``eleven_multilingual_v2``), so each maps onto the loaded family
nearest its meaning, in order of preference, the first loaded one winning:

- ``eleven_flash_v2_5``, ``eleven_turbo_v2_5`` (fast, multilingual): Turbo, Multilingual, the original;
- other ``eleven_flash_*`` / ``eleven_turbo_*`` (fast, English): Turbo, the original;
- ``eleven_multilingual_*``, ``eleven_v3*``, ``eleven_v4*``: Multilingual, the original;
- any other ``eleven_*`` id: the original;
- absent: the server's models in their configured order.

With ``language_code``, the first family of that list that speaks the language wins (so a
German request for ``eleven_flash_v2_5`` reaches Multilingual when it is loaded); when none
does, the first one is used and the language check answers 400 naming what it speaks.

Our own names (``chatterbox``, ``chatterbox-turbo``, ``tts-1``, ...) work as they do on the
OpenAI route, and ``elevenlabs_model_aliases`` (``id=family`` entries) adds or overrides ids.
Anything else is a 404 ``model_not_found``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from gateway.errors import ModelNotFoundError
from gateway.models.families import FAMILIES, MULTILINGUAL, ORIGINAL, TURBO, Family
from gateway.speech.languages import normalise_code
from gateway.speech.model_names import ModelNames, parse_alias_overrides

_RULES: tuple[tuple[re.Pattern[str], tuple[str, ...]], ...] = (
    (re.compile(r"eleven_(?:flash|turbo)_v2_5(?:_.*)?"), (TURBO, MULTILINGUAL, ORIGINAL)),
    (re.compile(r"eleven_(?:flash|turbo)(?:_.*)?"), (TURBO, ORIGINAL)),
    (re.compile(r"eleven_(?:multilingual|v3|v4)(?:_.*)?"), (MULTILINGUAL, ORIGINAL)),
    (re.compile(r"eleven_.*"), (ORIGINAL,)),
)


class ElevenLabsModels:
    """The model ids one server answers to on its ElevenLabs face."""

    def __init__(self, names: ModelNames, overrides: Iterable[str] = ()) -> None:
        self._names = names
        self.overrides = parse_alias_overrides(overrides, names.loaded)

    def resolve(self, model_id: str | None, language: str | None = None) -> Family:
        """The family ``model_id`` means for a request in ``language``; 404 when unknown."""
        loaded = self._names.loaded
        if model_id is None or not model_id.strip():
            return self._pick(loaded, language)
        key = model_id.strip().lower()
        if key in self.overrides:
            return FAMILIES[self.overrides[key]]
        for pattern, preferred in _RULES:
            if pattern.fullmatch(key):
                return self._pick(tuple(name for name in preferred if name in loaded) or loaded, language)
        try:
            return self._names.resolve(model_id)
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(
                f"{exc.message} ElevenLabs ids (eleven_flash_v2_5, eleven_multilingual_v2, ...) map onto them too.",
                param="model_id",
            ) from None

    @staticmethod
    def _pick(candidates: tuple[str, ...], language: str | None) -> Family:
        if language is not None:
            code = normalise_code(language)
            for name in candidates:
                if code in FAMILIES[name].languages:
                    return FAMILIES[name]
        return FAMILIES[candidates[0]]

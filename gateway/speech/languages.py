"""The language a request is spoken in: given (ISO 639-1), or detected from the input text.

- A family with one language (the original, Turbo: English) takes ``language`` absent or
  ``en``; any other value is a 400 naming ``language``.
- The multilingual family takes any of its 23 codes. Absent, the language is detected from
  the text with Lingua (``lingua-language-detector``: its n-gram models ship inside the
  wheel, nothing is downloaded), among the supported languages and their close neighbours
  (Ukrainian, Belarusian, Bulgarian, Persian, Urdu, Indonesian, Catalan, Romanian, Czech), so
  that text in a neighbour is reported as unsupported rather than read as Russian or Malay.
  Text in no detectable language (digits, punctuation) or in an unsupported one is a 400
  naming ``language`` that lists the supported codes.

Codes are matched case-insensitively; a region suffix (``pt-BR``) and ``nb``/``nn`` (Norwegian
Bokmål/Nynorsk) are accepted for the base language.
"""

from __future__ import annotations

import functools
import threading

from gateway.errors import InvalidRequestError
from gateway.models.families import Family

_NEIGHBOURS = ("uk", "be", "bg", "fa", "ur", "id", "ca", "ro", "cs")
_SYNONYMS = {"nb": "no", "nn": "no", "iw": "he", "in": "id"}
_DETECTOR_LOCK = threading.Lock()


def normalise_code(code: str) -> str:
    base = code.strip().lower().replace("_", "-").split("-", 1)[0]
    return _SYNONYMS.get(base, base)


def resolve_language(family: Family, requested: str | None, text: str) -> str:
    """The ISO 639-1 code to speak ``text`` in with ``family``; InvalidRequestError (400) else.

    Detection (only for a multilingual family without ``requested``) is CPU work of well
    under a millisecond per sentence once Lingua's models are loaded; the first call loads
    them (seconds): call this from a worker thread.
    """
    supported = family.languages
    if requested is not None:
        code = normalise_code(requested)
        if code in supported:
            return code
        if not family.multilingual:
            raise InvalidRequestError(
                f"The model '{family.id}' speaks only {', '.join(supported)}; for language '{requested}' "
                "use chatterbox-multilingual (see GET /v1/models).",
                param="language",
                code="unsupported_language",
            )
        raise _unsupported(family, f"Unsupported language '{requested}'")
    if not family.multilingual:
        return supported[0]
    detected = detect_language(text, (*supported, *_NEIGHBOURS))
    if detected is None:
        raise _unsupported(family, "Could not detect the language of 'input'; pass 'language'")
    if detected not in supported:
        raise _unsupported(family, f"'input' looks like language '{detected}', which the model does not speak")
    return detected


def _unsupported(family: Family, what: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"{what}. The model '{family.id}' supports: {', '.join(family.languages)}.",
        param="language",
        code="unsupported_language",
    )


def detect_language(text: str, candidates: tuple[str, ...]) -> str | None:
    """The most likely of ``candidates`` (ISO 639-1) for ``text``; None when text has no words."""
    result = _detector(tuple(sorted(set(candidates)))).detect_language_of(text)
    if result is None:
        return None
    return normalise_code(result.iso_code_639_1.name)


def _detector(candidates: tuple[str, ...]):  # noqa: ANN202 - lingua's type, imported lazily
    with _DETECTOR_LOCK:  # one build per candidate set, even when requests race for it
        return _build_detector(candidates)


@functools.cache
def _build_detector(candidates: tuple[str, ...]):  # noqa: ANN202
    from lingua import IsoCode639_1, Language, LanguageDetectorBuilder  # heavy: loaded on first use only

    languages = set()
    for code in candidates:
        for name in ("nb", "nn") if code == "no" else (code,):
            languages.add(Language.from_iso_code_639_1(getattr(IsoCode639_1, name.upper())))
    return LanguageDetectorBuilder.from_languages(*languages).build()

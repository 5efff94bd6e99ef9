"""The `language` of a request: given, or detected with Lingua for the multilingual family."""

from __future__ import annotations

import pytest

from gateway.errors import InvalidRequestError
from gateway.models.families import FAMILIES, MULTILINGUAL, ORIGINAL, TURBO
from gateway.speech.languages import resolve_language

MTL = FAMILIES[MULTILINGUAL]


@pytest.mark.parametrize(("given", "expected"), [("fr", "fr"), ("FR", "fr"), ("pt-BR", "pt"), ("zh_TW", "zh"), ("nb", "no"), ("iw", "he")])
def test_given_codes_are_normalised(given: str, expected: str) -> None:
    assert resolve_language(MTL, given, "whatever") == expected


@pytest.mark.parametrize("model", [ORIGINAL, TURBO])
def test_english_models_take_english_or_nothing(model: str) -> None:
    family = FAMILIES[model]
    assert resolve_language(family, None, "Bonjour à tous, comment allez-vous ?") == "en"  # no detection there
    assert resolve_language(family, "en-GB", "Hello.") == "en"
    with pytest.raises(InvalidRequestError) as caught:
        resolve_language(family, "es", "Hola.")
    assert caught.value.param == "language" and caught.value.status_code == 400
    assert "chatterbox-multilingual" in caught.value.message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello there, how are you doing today?", "en"),
        ("Bonjour à tous, comment allez-vous aujourd'hui ?", "fr"),
        ("Hallo zusammen, wie geht es euch heute?", "de"),
        ("Привет всем, как у вас сегодня дела?", "ru"),
        ("今日はとても良い天気ですね。", "ja"),
        ("今天天气很好，我们去公园散步吧。", "zh"),
        ("안녕하세요, 오늘 날씨가 정말 좋네요.", "ko"),
        ("Habari za asubuhi, rafiki yangu mpendwa?", "sw"),
        ("שלום לכולם, מה שלומכם היום?", "he"),
        ("Hei alle sammen, hvordan har dere det i dag?", "no"),
    ],
)
def test_absent_language_is_detected_from_the_text(text: str, expected: str) -> None:
    assert resolve_language(MTL, None, text) == expected


@pytest.mark.parametrize(
    ("given", "text"),
    [
        ("xx", "Hello."),
        ("uk", "Привіт"),
        (None, "Привіт усім, як у вас справи сьогодні?"),  # Ukrainian: a neighbour, not read as Russian
        (None, "12345 ... !!!"),  # nothing to detect
    ],
)
def test_unsupported_or_undetectable_is_a_400_listing_the_supported(given: str | None, text: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        resolve_language(MTL, given, text)
    error = caught.value
    assert (error.status_code, error.param, error.code) == (400, "language", "unsupported_language")
    assert "ar, da, de, el, en, es, fi, fr, he, hi, it, ja, ko, ms, nl, no, pl, pt, ru, sv, sw, tr, zh" in error.message
